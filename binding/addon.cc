// Module entry: creates the per-env Context and registers the functions.
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

void parse_kernel_env(Context& ctx) {
  const char* raw = std::getenv("LOWBIT_KERNEL");
  if (!raw || !*raw) return;
  ctx.kernel_env = raw;
  std::stringstream in(ctx.kernel_env);
  std::string item;
  while (std::getline(in, item, ',')) {
    auto colon = item.find(':');
    if (colon == std::string::npos) ctx.forced["*"] = item;
    else ctx.forced[item.substr(0, colon)] = item.substr(colon + 1);
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
  features.Set("neon", c.neon);
  features.Set("neonDotprod", c.neon_dotprod);
  Napi::Object result = Napi::Object::New(env);
  result.Set("arch", c.arch);
  result.Set("features", features);
  auto names = lowbit::available_quantize_kernels(c);
  Napi::Array quantize = Napi::Array::New(env, names.size());
  for (size_t i = 0; i < names.size(); ++i) quantize.Set(uint32_t(i), names[i]);
  result.Set("quantizeKernels", quantize);
  result.Set("maxThreads", double(ctx.pool->max_threads()));
  result.Set("kernelOverride", ctx.kernel_env.empty() ? env.Null() : Napi::String::New(env, ctx.kernel_env));
  // The kernel a call without options.kernel gets, or why LOWBIT_KERNEL cannot be honoured.
  try {
    result.Set("selectedQuantizeKernel", ctx.quantize_kernels(env, "").name);
    result.Set("kernelOverrideError", env.Null());
  } catch (const Napi::Error& e) {
    result.Set("selectedQuantizeKernel", env.Null());
    result.Set("kernelOverrideError", e.Message());
  }
  return result;
}

}  // namespace

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* ctx = new Context();
  ctx->cpu = lowbit::detect_cpu_features(/*request_amx=*/true);
  unsigned hw = std::thread::hardware_concurrency();
  ctx->pool = std::make_unique<lowbit::ThreadPool>(hw == 0 ? 1 : hw);
  parse_kernel_env(*ctx);
  env.SetInstanceData(ctx);  // deleted with the env
  exports.Set("cpuInfo", Napi::Function::New(env, CpuInfo, "cpuInfo"));
  register_quantize_functions(env, exports);
  return exports;
}

std::string Context::forced_kernel(const std::string& operation) const {
  auto it = forced.find(operation);
  if (it != forced.end()) return it->second;
  it = forced.find("*");
  return it != forced.end() ? it->second : std::string();
}

const lowbit::QuantizeKernels& Context::quantize_kernels(Napi::Env env,
                                                         const std::string& requested) const {
  std::string name = requested;
  const char* source = "options.kernel";
  if (name.empty()) {
    name = forced_kernel("quantize");
    source = "LOWBIT_KERNEL";
  }
  if (const auto* k = lowbit::find_quantize_kernels(name, cpu)) return *k;
  const auto available = lowbit::available_quantize_kernels(cpu);
  const bool known = name == "scalar" || name == "avx2" || name == "avx512";
  std::string msg = std::string(source) + " asks for quantize kernel '" + name + "', which " +
                    (known ? "this CPU (or build) does not support" : "does not exist") +
                    ". Use one of: " + join(available) +
                    (std::string(source) == "LOWBIT_KERNEL" ? " (or unset LOWBIT_KERNEL)." : ".");
  throw Napi::Error::New(env, msg);
}

}  // namespace lowbit_binding

static Napi::Object InitLowbit(Napi::Env env, Napi::Object exports) {
  return lowbit_binding::Init(env, exports);
}

NODE_API_MODULE(lowbit, InitLowbit)
