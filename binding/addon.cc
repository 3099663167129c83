// Module entry: creates the per-env Context and registers the functions.
#include <algorithm>
#include <cstdlib>
#include <sstream>
#include <thread>

#include "context.h"
#include "napi_args.h"

namespace lowbit_binding {

namespace {

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + v[i];
  return s;
}

const std::vector<std::string> kQuantizeKernelNames = {"avx512", "avx2", "scalar"};
const std::vector<std::string> kGemmKernelNames = {"amx", "avx512vnni", "avxvnni", "avx2", "neondot", "neon", "portable", "scalar"};
const std::vector<std::string> kSgemmKernelNames = {"avx512", "avx2", "scalar"};

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

void parse_kernel_env(Context& ctx) {
  const char* raw = std::getenv("LOWBIT_KERNEL");
  if (!raw || !*raw) return;
  ctx.kernel_env = raw;
  // getline drops a trailing empty entry ("gemm:avx2,"); one elsewhere is an entry without a kernel name (below).
  if (ctx.kernel_env.back() == ',')
    ctx.kernel_env_error = "LOWBIT_KERNEL has an empty entry ('" + ctx.kernel_env + "'). Fix or unset LOWBIT_KERNEL.";
  std::stringstream in(ctx.kernel_env);
  std::string item;
  while (std::getline(in, item, ',')) {
    auto colon = item.find(':');
    const std::string op = colon == std::string::npos ? "*" : item.substr(0, colon);
    const std::string name = colon == std::string::npos ? item : item.substr(colon + 1);
    if (name.empty())
      ctx.kernel_env_error = "LOWBIT_KERNEL has an entry '" + item + "' without a kernel name. Fix or unset LOWBIT_KERNEL.";
    else if (ctx.forced.count(op))
      ctx.kernel_env_error = "LOWBIT_KERNEL names " + (op == "*" ? std::string("a kernel for every operation") : "the operation '" + op + "'") +
                             " twice ('" + ctx.forced[op] + "' and '" + name + "'). Fix or unset LOWBIT_KERNEL.";
    if (colon == std::string::npos) {
      ctx.forced["*"] = item;
      if (!contains(kQuantizeKernelNames, item) && !contains(kGemmKernelNames, item) && !contains(kSgemmKernelNames, item))
        ctx.kernel_env_error = "LOWBIT_KERNEL names '" + item + "', which is no kernel of any operation (quantize: " +
                               join(kQuantizeKernelNames) + "; gemm: " + join(kGemmKernelNames) + "; sgemm: " +
                               join(kSgemmKernelNames) + "). Fix or unset LOWBIT_KERNEL.";
    } else {
      if (op != "quantize" && op != "gemm" && op != "sgemm")
        ctx.kernel_env_error = "LOWBIT_KERNEL names the operation '" + op + "'; operations are quantize, gemm and sgemm. Fix or unset LOWBIT_KERNEL.";
      ctx.forced[op] = name;
    }
  }
}

Napi::Value CpuInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const Context& ctx = Context::of(env);
  const auto& c = ctx.cpu;
  Napi::Object features = Napi::Object::New(env);
  features.Set("avx2", c.avx2);
  features.Set("fma", c.fma);
  features.Set("avx512f", c.avx512f);
  features.Set("avx512bw", c.avx512bw);
  features.Set("avx512vl", c.avx512vl);
  features.Set("avx512dq", c.avx512dq);
  features.Set("avx512vnni", c.avx512vnni);
  features.Set("avxvnni", c.avxvnni);
  features.Set("amxTile", c.amx_tile);
  features.Set("amxInt8", c.amx_int8);
  features.Set("amxPermitted", c.amx_permitted);
  features.Set("amxVerified", c.amx_verified);
  features.Set("neon", c.neon);
  features.Set("neonDotprod", c.neon_dotprod);
  Napi::Object result = Napi::Object::New(env);
  result.Set("arch", c.arch);
  result.Set("features", features);
  auto names = lowbit::available_quantize_kernels(c);
  Napi::Array quantize = Napi::Array::New(env, names.size());
  for (size_t i = 0; i < names.size(); ++i) quantize.Set(uint32_t(i), names[i]);
  result.Set("quantizeKernels", quantize);
  auto gemm_names = lowbit::available_gemm_kernels(c);
  Napi::Array gemm = Napi::Array::New(env, gemm_names.size());
  for (size_t i = 0; i < gemm_names.size(); ++i) gemm.Set(uint32_t(i), gemm_names[i]);
  result.Set("gemmKernels", gemm);
  auto sgemm_names = lowbit::available_sgemm_kernels(c);
  Napi::Array sgemm = Napi::Array::New(env, sgemm_names.size());
  for (size_t i = 0; i < sgemm_names.size(); ++i) sgemm.Set(uint32_t(i), sgemm_names[i]);
  result.Set("sgemmKernels", sgemm);
  result.Set("maxThreads", double(ctx.pool->max_threads()));
  result.Set("kernelOverride", ctx.kernel_env.empty() ? env.Null() : Napi::String::New(env, ctx.kernel_env));
  // The kernel a call without options.kernel gets, or why LOWBIT_KERNEL cannot be honoured (per operation, and the
  // first such reason overall).
  result.Set("kernelOverrideError", env.Null());
  Napi::Object errors = Napi::Object::New(env);
  const auto failed = [&](const char* op, const char* key, const Napi::Error& e) {
    result.Set(key, env.Null());
    errors.Set(op, e.Message());
    if (result.Get("kernelOverrideError").IsNull()) result.Set("kernelOverrideError", e.Message());
  };
  try {
    result.Set("selectedQuantizeKernel", ctx.quantize_kernels(env, "").name);
  } catch (const Napi::Error& e) {
    failed("quantize", "selectedQuantizeKernel", e);
  }
  try {
    const lowbit::GemmKernel* k = ctx.gemm_kernel(env, "");
    result.Set("selectedGemmKernel", k ? k->name : "scalar");
  } catch (const Napi::Error& e) {
    failed("gemm", "selectedGemmKernel", e);
  }
  try {
    result.Set("selectedSgemmKernel", ctx.sgemm_kernel(env, "").name);
  } catch (const Napi::Error& e) {
    failed("sgemm", "selectedSgemmKernel", e);
  }
  result.Set("kernelOverrideErrors", errors);
  return result;
}

}  // namespace

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* ctx = new Context();
  ctx->cpu = lowbit::detect_cpu_features(/*request_amx=*/true);
  unsigned hw = std::thread::hardware_concurrency();
  ctx->pool = std::make_unique<lowbit::ThreadPool>(hw == 0 ? 1 : hw);
  // The AMX kernel is offered only after it reproduces the reference here.
  if (ctx->cpu.amx_int8 && ctx->cpu.amx_permitted && ctx->cpu.has_avx512_core() && lowbit::gemm_kernel_amx())
    ctx->cpu.amx_verified = lowbit::gemm_kernel_self_test(*lowbit::gemm_kernel_amx(), ctx->pool.get());
  parse_kernel_env(*ctx);
  env.SetInstanceData(ctx);  // deleted with the env
  exports.Set("cpuInfo", Napi::Function::New(env, CpuInfo, "cpuInfo"));
  register_quantize_functions(env, exports);
  register_gemm_functions(env, exports);
  register_train_functions(env, exports);
  return exports;
}

std::string Context::forced_kernel(const std::string& operation, const std::vector<std::string>& known) const {
  auto it = forced.find(operation);
  if (it != forced.end()) return it->second;
  it = forced.find("*");
  return it != forced.end() && contains(known, it->second) ? it->second : std::string();
}

namespace {

[[noreturn]] void throw_kernel_error(Napi::Env env, const char* operation, const std::string& name, bool from_env,
                                     const std::vector<std::string>& known, const std::vector<std::string>& available) {
  const std::string source = from_env ? "LOWBIT_KERNEL" : "options.kernel";
  throw Napi::Error::New(env, source + " asks for " + operation + " kernel '" + name + "', which " +
                                  (contains(known, name) ? "this CPU (or build) does not support" : "does not exist") +
                                  ". Use one of: " + join(available) + (from_env ? " (or unset LOWBIT_KERNEL)." : "."));
}

}  // namespace

const lowbit::QuantizeKernels& Context::quantize_kernels(Napi::Env env, const std::string& requested) const {
  if (requested.empty() && !kernel_env_error.empty()) throw Napi::Error::New(env, kernel_env_error);
  const std::string name = requested.empty() ? forced_kernel("quantize", kQuantizeKernelNames) : requested;
  if (const auto* k = lowbit::find_quantize_kernels(name, cpu)) return *k;
  throw_kernel_error(env, "quantize", name, requested.empty(), kQuantizeKernelNames, lowbit::available_quantize_kernels(cpu));
}

const lowbit::GemmKernel* Context::gemm_kernel(Napi::Env env, const std::string& requested) const {
  if (requested.empty() && !kernel_env_error.empty()) throw Napi::Error::New(env, kernel_env_error);
  const std::string name = requested.empty() ? forced_kernel("gemm", kGemmKernelNames) : requested;
  bool usable = false;
  const lowbit::GemmKernel* k = lowbit::find_gemm_kernel(name, cpu, &usable);
  if (!usable) throw_kernel_error(env, "gemm", name, requested.empty(), kGemmKernelNames, lowbit::available_gemm_kernels(cpu));
  return k;
}

const lowbit::SgemmKernel& Context::sgemm_kernel(Napi::Env env, const std::string& requested) const {
  if (requested.empty() && !kernel_env_error.empty()) throw Napi::Error::New(env, kernel_env_error);
  const std::string name = requested.empty() ? forced_kernel("sgemm", kSgemmKernelNames) : requested;
  if (const auto* k = lowbit::find_sgemm_kernel(name, cpu)) return *k;
  throw_kernel_error(env, "sgemm", name, requested.empty(), kSgemmKernelNames, lowbit::available_sgemm_kernels(cpu));
}

}  // namespace lowbit_binding

static Napi::Object InitLowbit(Napi::Env env, Napi::Object exports) {
  return lowbit_binding::Init(env, exports);
}

NODE_API_MODULE(lowbit, InitLowbit)
