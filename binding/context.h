// Per-Napi::Env state: detected CPU features, the thread pool and the kernel
// override read once from LOWBIT_KERNEL. Worker threads get their own; there
// are no process globals.
#pragma once

#include <napi.h>

#include <map>
#include <memory>
#include <string>

#include "lowbit/cpu_features.h"
#include "lowbit/gemm.h"
#include "lowbit/quantize.h"
#include "lowbit/sgemm.h"
#include "lowbit/thread_pool.h"

namespace lowbit_binding {

struct Context {
  lowbit::CpuFeatures cpu;
  std::unique_ptr<lowbit::ThreadPool> pool;
  // LOWBIT_KERNEL, parsed: "name" forces every operation that has a kernel of
  // that name; "quantize:avx2,gemm:scalar,sgemm:avx2" forces per operation.
  std::string kernel_env;
  std::map<std::string, std::string> forced;  // operation (or "*") -> kernel name
  std::string kernel_env_error;               // why LOWBIT_KERNEL is malformed (unknown name, empty or repeated entry)

  static Context& of(Napi::Env env) { return *env.GetInstanceData<Context>(); }

  // The quantize kernels for a call: `requested` (options.kernel) wins, then
  // LOWBIT_KERNEL, then the best available. Throws a clear error otherwise.
  const lowbit::QuantizeKernels& quantize_kernels(Napi::Env env, const std::string& requested) const;
  // The GEMM kernel for a call, the same way; null means the scalar reference.
  const lowbit::GemmKernel* gemm_kernel(Napi::Env env, const std::string& requested) const;
  // The float32 SGEMM kernel for a call, the same way.
  const lowbit::SgemmKernel& sgemm_kernel(Napi::Env env, const std::string& requested) const;
  // The LOWBIT_KERNEL choice for an operation whose kernel names are `known`.
  std::string forced_kernel(const std::string& operation, const std::vector<std::string>& known) const;

  lowbit::Exec exec(Napi::Env env, const std::string& kernel, unsigned threads) const {
    return lowbit::Exec{&quantize_kernels(env, kernel), pool.get(), threads};
  }
};

void register_quantize_functions(Napi::Env env, Napi::Object exports);
void register_gemm_functions(Napi::Env env, Napi::Object exports);
void register_train_functions(Napi::Env env, Napi::Object exports);

}  // namespace lowbit_binding
