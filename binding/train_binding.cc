// N-API glue for the float32 training kernels (cpp/include/lowbit/sgemm.h,
// cpp/include/lowbit/train_ops.h) and GPTQ's float64 factorization
// (cpp/include/lowbit/linalg.h), the float kernels of ts/train/kernels.ts.
// Synchronous: they are called once per op inside a training step, and the
// work is spread over the Context's thread pool. Argument order is private to
// ts/native.ts. Lengths are checked exactly (the layouts in ts/train/kernels.ts
// are exact), and outputs may not share memory with inputs.
#include <climits>

#include "context.h"
#include "napi_args.h"
#include "lowbit/linalg.h"
#include "lowbit/sgemm.h"
#include "lowbit/train_ops.h"

namespace lowbit_binding {
namespace {

const float* floats_in(const Napi::Value& v, const char* name, size_t* length) {
  return array_of<float>(v, name, napi_float32_array, length);
}
float* floats_out(const Napi::Value& v, const char* name, size_t* length) {
  return array_of<float>(v, name, napi_float32_array, length);
}

void need_length(Napi::Env env, const char* name, size_t got, size_t want, const char* formula) {
  if (got != want)
    throw_range(env, std::string(name) + ".length must be " + formula + " = " + std::to_string(want) + " (got " +
                         std::to_string(got) + ")");
}

size_t product(Napi::Env env, std::initializer_list<size_t> factors, const char* what) {
  size_t p = 1;
  for (size_t f : factors)
    if (__builtin_mul_overflow(p, f, &p)) throw_range(env, std::string(what) + " overflows");
  return p;
}

// Byte ranges, so arrays of different element types (argmax vs y) compare too.
template <class A, class B>
bool overlap(const A* a, size_t na, const B* b, size_t nb) {
  const char *pa = reinterpret_cast<const char*>(a), *pb = reinterpret_cast<const char*>(b);
  return na && nb && pa < pb + nb * sizeof(B) && pb < pa + na * sizeof(A);
}
template <class A, class B>
void no_overlap(Napi::Env env, const A* out, size_t nout, const char* out_name, const B* in, size_t nin,
                const char* in_name) {
  if (overlap(out, nout, in, nin))
    throw_range(env, std::string(out_name) + " must not share memory with " + in_name);
}

unsigned threads_of(const Napi::Value& v) {
  const size_t t = size_of(v, "threads");
  return t > UINT_MAX ? UINT_MAX : unsigned(t);
}

// sgemm(transA, transB, m, n, k, a, b, c, accumulate, kernel, threads)
Napi::Value Sgemm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  lowbit::SgemmArgs g;
  g.trans_a = bool_of(info[0], "transA");
  g.trans_b = bool_of(info[1], "transB");
  g.m = size_of(info[2], "m");
  g.n = size_of(info[3], "n");
  g.k = size_of(info[4], "k");
  size_t na, nb, nc;
  g.a = floats_in(info[5], "a", &na);
  g.b = floats_in(info[6], "b", &nb);
  g.c = floats_out(info[7], "c", &nc);
  need_length(env, "a", na, product(env, {g.m, g.k}, "m * k"), "m * k");
  need_length(env, "b", nb, product(env, {g.k, g.n}, "k * n"), "k * n");
  need_length(env, "c", nc, product(env, {g.m, g.n}, "m * n"), "m * n");
  no_overlap(env, g.c, nc, "c", g.a, na, "a");
  no_overlap(env, g.c, nc, "c", g.b, nb, "b");
  g.accumulate = bool_of(info[8], "accumulate");
  Context& ctx = Context::of(env);
  const lowbit::SgemmKernel& kernel = ctx.sgemm_kernel(env, string_of(info[9], "kernel"));
  lowbit::sgemm(kernel, g, ctx.pool.get(), threads_of(info[10]));
  return env.Undefined();
}

size_t geometry_field(const Napi::Object& o, const char* key, size_t min) {
  const std::string name = std::string("geometry.") + key;
  const size_t v = size_of(o.Get(key), name.c_str());
  if (v < min || v > size_t(INT32_MAX))
    throw_range(o.Env(), name + " must be an integer in [" + std::to_string(min) + ", 2^31)");
  return v;
}

lowbit::ConvGeometry geometry_of(const Napi::Value& v) {
  if (!v.IsObject()) throw_type(v.Env(), "geometry must be an object");
  Napi::Object o = v.As<Napi::Object>();
  lowbit::ConvGeometry g;
  g.channels = geometry_field(o, "channels", 0);
  g.height = geometry_field(o, "height", 0);
  g.width = geometry_field(o, "width", 0);
  g.kernel_h = geometry_field(o, "kernelH", 0);
  g.kernel_w = geometry_field(o, "kernelW", 0);
  g.pad_top = geometry_field(o, "padTop", 0);
  g.pad_left = geometry_field(o, "padLeft", 0);
  g.stride_h = geometry_field(o, "strideH", 1);
  g.stride_w = geometry_field(o, "strideW", 1);
  g.dilation_h = geometry_field(o, "dilationH", 1);
  g.dilation_w = geometry_field(o, "dilationW", 1);
  g.out_h = geometry_field(o, "outH", 0);
  g.out_w = geometry_field(o, "outW", 0);
  return g;
}

struct ConvCall {
  lowbit::ConvGeometry g;
  size_t batch, image_len, col_len;
  ConvCall(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    batch = size_of(info[1], "batch");
    g = geometry_of(info[2]);
    image_len = product(env, {batch, g.channels, g.height, g.width}, "batch * channels * height * width");
    col_len = product(env, {batch, g.channels, g.kernel_h, g.kernel_w, g.out_h, g.out_w},
                      "batch * channels * kernelH * kernelW * outH * outW");
  }
};

// im2col(x, batch, geometry, col, threads)
Napi::Value Im2col(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ConvCall call(info);
  size_t nx, ncol;
  const float* x = floats_in(info[0], "x", &nx);
  float* col = floats_out(info[3], "col", &ncol);
  need_length(env, "x", nx, call.image_len, "batch * channels * height * width");
  need_length(env, "col", ncol, call.col_len, "batch * channels * kernelH * kernelW * outH * outW");
  no_overlap(env, col, ncol, "col", x, nx, "x");
  Context& ctx = Context::of(env);
  lowbit::im2col(x, call.batch, call.g, col, ctx.pool.get(), threads_of(info[4]));
  return env.Undefined();
}

// col2im(col, batch, geometry, dx, threads)
Napi::Value Col2im(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ConvCall call(info);
  size_t ncol, ndx;
  const float* col = floats_in(info[0], "col", &ncol);
  float* dx = floats_out(info[3], "dx", &ndx);
  need_length(env, "col", ncol, call.col_len, "batch * channels * kernelH * kernelW * outH * outW");
  need_length(env, "dx", ndx, call.image_len, "batch * channels * height * width");
  no_overlap(env, dx, ndx, "dx", col, ncol, "col");
  Context& ctx = Context::of(env);
  lowbit::col2im(col, call.batch, call.g, dx, ctx.pool.get(), threads_of(info[4]));
  return env.Undefined();
}

struct BnShape {
  size_t batch, channels, spatial, total;
  BnShape(const Napi::CallbackInfo& info, size_t first) {
    batch = size_of(info[first], "batch");
    channels = size_of(info[first + 1], "channels");
    spatial = size_of(info[first + 2], "spatial");
    total = product(info.Env(), {batch, channels, spatial}, "batch * channels * spatial");
  }
};

// batchNormForward(x, batch, channels, spatial, gamma, beta, epsilon, y, mean, variance, invStd, threads)
Napi::Value BatchNormForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const BnShape s(info, 1);
  size_t nx, ng, nbeta, ny, nm, nv, ni;
  const float* x = floats_in(info[0], "x", &nx);
  const float* gamma = floats_in(info[4], "gamma", &ng);
  const float* beta = floats_in(info[5], "beta", &nbeta);
  if (!info[6].IsNumber()) throw_type(env, "epsilon must be a number");
  const double eps = info[6].As<Napi::Number>().DoubleValue();
  if (!(eps >= 0) || !std::isfinite(eps)) throw_range(env, "epsilon must be a finite number >= 0");
  float* y = floats_out(info[7], "y", &ny);
  float* mean = floats_out(info[8], "mean", &nm);
  float* variance = floats_out(info[9], "variance", &nv);
  float* inv_std = floats_out(info[10], "invStd", &ni);
  need_length(env, "x", nx, s.total, "batch * channels * spatial");
  need_length(env, "y", ny, s.total, "batch * channels * spatial");
  need_length(env, "gamma", ng, s.channels, "channels");
  need_length(env, "beta", nbeta, s.channels, "channels");
  need_length(env, "mean", nm, s.channels, "channels");
  need_length(env, "variance", nv, s.channels, "channels");
  need_length(env, "invStd", ni, s.channels, "channels");
  const std::pair<const float*, size_t> ins[] = {{x, nx}, {gamma, ng}, {beta, nbeta}};
  const char* in_names[] = {"x", "gamma", "beta"};
  const std::pair<float*, size_t> outs[] = {{y, ny}, {mean, nm}, {variance, nv}, {inv_std, ni}};
  const char* out_names[] = {"y", "mean", "variance", "invStd"};
  for (int o = 0; o < 4; ++o)
    for (int i = 0; i < 3; ++i) no_overlap(env, outs[o].first, outs[o].second, out_names[o], ins[i].first, ins[i].second, in_names[i]);
  Context& ctx = Context::of(env);
  lowbit::batch_norm_forward(x, s.batch, s.channels, s.spatial, gamma, beta, float(eps), y, mean, variance, inv_std,
                             ctx.pool.get(), threads_of(info[11]));
  return env.Undefined();
}

// batchNormBackward(x, dy, batch, channels, spatial, gamma, mean, invStd, dx, dGamma, dBeta, threads)
Napi::Value BatchNormBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const BnShape s(info, 2);
  size_t nx, ndy, ng, nm, ni, ndx, ndg, ndb;
  const float* x = floats_in(info[0], "x", &nx);
  const float* dy = floats_in(info[1], "dy", &ndy);
  const float* gamma = floats_in(info[5], "gamma", &ng);
  const float* mean = floats_in(info[6], "mean", &nm);
  const float* inv_std = floats_in(info[7], "invStd", &ni);
  float* dx = floats_out(info[8], "dx", &ndx);
  float* d_gamma = floats_out(info[9], "dGamma", &ndg);
  float* d_beta = floats_out(info[10], "dBeta", &ndb);
  need_length(env, "x", nx, s.total, "batch * channels * spatial");
  need_length(env, "dy", ndy, s.total, "batch * channels * spatial");
  need_length(env, "dx", ndx, s.total, "batch * channels * spatial");
  need_length(env, "gamma", ng, s.channels, "channels");
  need_length(env, "mean", nm, s.channels, "channels");
  need_length(env, "invStd", ni, s.channels, "channels");
  need_length(env, "dGamma", ndg, s.channels, "channels");
  need_length(env, "dBeta", ndb, s.channels, "channels");
  const std::pair<const float*, size_t> ins[] = {{x, nx}, {dy, ndy}, {gamma, ng}, {mean, nm}, {inv_std, ni}};
  const char* in_names[] = {"x", "dy", "gamma", "mean", "invStd"};
  const std::pair<float*, size_t> outs[] = {{dx, ndx}, {d_gamma, ndg}, {d_beta, ndb}};
  const char* out_names[] = {"dx", "dGamma", "dBeta"};
  for (int o = 0; o < 3; ++o)
    for (int i = 0; i < 5; ++i) no_overlap(env, outs[o].first, outs[o].second, out_names[o], ins[i].first, ins[i].second, in_names[i]);
  Context& ctx = Context::of(env);
  lowbit::batch_norm_backward(x, dy, s.batch, s.channels, s.spatial, gamma, mean, inv_std, dx, d_gamma, d_beta,
                              ctx.pool.get(), threads_of(info[11]));
  return env.Undefined();
}

// ---------------------------------------------------------------------------
// Activations and pooling (train_ops.h)

lowbit::Activation activation_of(const Napi::Value& v) {
  const std::string kind = string_of(v, "kind");
  if (kind == "relu") return lowbit::Activation::kRelu;
  if (kind == "clip") return lowbit::Activation::kClip;
  if (kind == "hardSigmoid") return lowbit::Activation::kHardSigmoid;
  if (kind == "hardSwish") return lowbit::Activation::kHardSwish;
  throw_range(v.Env(), "kind must be 'relu', 'clip', 'hardSigmoid' or 'hardSwish' (got '" + kind + "')");
}

// activationForward(kind, x, y, alpha, beta, threads)
Napi::Value ActivationForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const lowbit::Activation kind = activation_of(info[0]);
  size_t nx, ny;
  const float* x = floats_in(info[1], "x", &nx);
  float* y = floats_out(info[2], "y", &ny);
  need_length(env, "y", ny, nx, "x.length");
  no_overlap(env, y, ny, "y", x, nx, "x");
  const double alpha = number_of(info[3], "alpha"), beta = number_of(info[4], "beta");
  Context& ctx = Context::of(env);
  lowbit::activation_forward(kind, x, nx, y, alpha, beta, ctx.pool.get(), threads_of(info[5]));
  return env.Undefined();
}

// activationBackward(kind, x, dy, dx, alpha, beta, threads)
Napi::Value ActivationBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const lowbit::Activation kind = activation_of(info[0]);
  size_t nx, ndy, ndx;
  const float* x = floats_in(info[1], "x", &nx);
  const float* dy = floats_in(info[2], "dy", &ndy);
  float* dx = floats_out(info[3], "dx", &ndx);
  need_length(env, "dy", ndy, nx, "x.length");
  need_length(env, "dx", ndx, nx, "x.length");
  no_overlap(env, dx, ndx, "dx", x, nx, "x");
  no_overlap(env, dx, ndx, "dx", dy, ndy, "dy");
  const double alpha = number_of(info[4], "alpha"), beta = number_of(info[5], "beta");
  Context& ctx = Context::of(env);
  lowbit::activation_backward(kind, x, dy, nx, dx, alpha, beta, ctx.pool.get(), threads_of(info[6]));
  return env.Undefined();
}

struct PoolCall {
  lowbit::ConvGeometry g;
  size_t batch, image_len, out_len;
  // batch at info[batch_arg], the geometry after it.
  explicit PoolCall(const Napi::CallbackInfo& info, size_t batch_arg = 1) {
    Napi::Env env = info.Env();
    batch = size_of(info[batch_arg], "batch");
    g = geometry_of(info[batch_arg + 1]);
    image_len = product(env, {batch, g.channels, g.height, g.width}, "batch * channels * height * width");
    out_len = product(env, {batch, g.channels, g.out_h, g.out_w}, "batch * channels * outH * outW");
  }
};

// maxPoolForward(x, batch, geometry, y, argmax, threads)
Napi::Value MaxPoolForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  PoolCall call(info);
  size_t nx, ny, narg;
  const float* x = floats_in(info[0], "x", &nx);
  float* y = floats_out(info[3], "y", &ny);
  int32_t* argmax = array_of<int32_t>(info[4], "argmax", napi_int32_array, &narg);
  need_length(env, "x", nx, call.image_len, "batch * channels * height * width");
  need_length(env, "y", ny, call.out_len, "batch * channels * outH * outW");
  need_length(env, "argmax", narg, call.out_len, "batch * channels * outH * outW");
  if (nx > size_t(INT32_MAX)) throw_range(env, "x.length must be < 2^31 (argmax is an Int32Array)");
  no_overlap(env, y, ny, "y", x, nx, "x");
  no_overlap(env, argmax, narg, "argmax", x, nx, "x");
  no_overlap(env, argmax, narg, "argmax", y, ny, "y");
  Context& ctx = Context::of(env);
  lowbit::max_pool_forward(x, call.batch, call.g, y, argmax, ctx.pool.get(), threads_of(info[5]));
  return env.Undefined();
}

// maxPoolBackward(dy, argmax, dx)
Napi::Value MaxPoolBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t ndy, narg, ndx;
  const float* dy = floats_in(info[0], "dy", &ndy);
  const int32_t* argmax = array_of<int32_t>(info[1], "argmax", napi_int32_array, &narg);
  float* dx = floats_out(info[2], "dx", &ndx);
  need_length(env, "argmax", narg, ndy, "dy.length");
  no_overlap(env, dx, ndx, "dx", dy, ndy, "dy");
  no_overlap(env, dx, ndx, "dx", argmax, narg, "argmax");
  const ptrdiff_t bad = lowbit::max_pool_backward(dy, argmax, ndy, dx, ndx);
  if (bad >= 0)
    throw_range(env, "argmax[" + std::to_string(bad) + "] = " + std::to_string(argmax[bad]) + " is outside [-1, dx.length = " +
                         std::to_string(ndx) + ")");
  return env.Undefined();
}

// averagePoolForward(x, batch, geometry, countIncludePad, y, threads)
Napi::Value AveragePoolForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  PoolCall call(info);
  const bool count_pad = bool_of(info[3], "countIncludePad");
  size_t nx, ny;
  const float* x = floats_in(info[0], "x", &nx);
  float* y = floats_out(info[4], "y", &ny);
  need_length(env, "x", nx, call.image_len, "batch * channels * height * width");
  need_length(env, "y", ny, call.out_len, "batch * channels * outH * outW");
  no_overlap(env, y, ny, "y", x, nx, "x");
  Context& ctx = Context::of(env);
  lowbit::average_pool_forward(x, call.batch, call.g, count_pad, y, ctx.pool.get(), threads_of(info[5]));
  return env.Undefined();
}

// averagePoolBackward(dy, batch, geometry, countIncludePad, dx, threads)
Napi::Value AveragePoolBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  PoolCall call(info);
  const bool count_pad = bool_of(info[3], "countIncludePad");
  size_t ndy, ndx;
  const float* dy = floats_in(info[0], "dy", &ndy);
  float* dx = floats_out(info[4], "dx", &ndx);
  need_length(env, "dy", ndy, call.out_len, "batch * channels * outH * outW");
  need_length(env, "dx", ndx, call.image_len, "batch * channels * height * width");
  no_overlap(env, dx, ndx, "dx", dy, ndy, "dy");
  Context& ctx = Context::of(env);
  lowbit::average_pool_backward(dy, call.batch, call.g, count_pad, dx, ctx.pool.get(), threads_of(info[5]));
  return env.Undefined();
}

// Depthwise convolution: the geometry's channels are the groups; w is [channels, kernelH·kernelW].
// Every call is (in0, in1, batch, geometry, out, threads); each array is an image, the weights or an output map.
enum class DepthwiseArray { kImage, kWeights, kOutput };

struct DepthwiseArg {
  const char* name;
  DepthwiseArray kind;
};

using DepthwiseKernel = void (*)(const float*, const float*, size_t, const lowbit::ConvGeometry&, float*, lowbit::ThreadPool*,
                                 unsigned);

Napi::Value DepthwiseCall(const Napi::CallbackInfo& info, DepthwiseArg in0, DepthwiseArg in1, DepthwiseArg out,
                          DepthwiseKernel kernel) {
  Napi::Env env = info.Env();
  const PoolCall call(info, 2);
  const size_t w_len = product(env, {call.g.channels, call.g.kernel_h, call.g.kernel_w}, "channels * kernelH * kernelW");
  auto check = [&](const DepthwiseArg& a, size_t n) {
    if (a.kind == DepthwiseArray::kImage) need_length(env, a.name, n, call.image_len, "batch * channels * height * width");
    else if (a.kind == DepthwiseArray::kWeights) need_length(env, a.name, n, w_len, "channels * kernelH * kernelW");
    else need_length(env, a.name, n, call.out_len, "batch * channels * outH * outW");
  };
  size_t n0, n1, nout;
  const float* p0 = floats_in(info[0], in0.name, &n0);
  const float* p1 = floats_in(info[1], in1.name, &n1);
  float* pout = floats_out(info[4], out.name, &nout);
  check(in0, n0);
  check(in1, n1);
  check(out, nout);
  no_overlap(env, pout, nout, out.name, p0, n0, in0.name);
  no_overlap(env, pout, nout, out.name, p1, n1, in1.name);
  Context& ctx = Context::of(env);
  kernel(p0, p1, call.batch, call.g, pout, ctx.pool.get(), threads_of(info[5]));
  return env.Undefined();
}

// depthwiseConvForward(x, w, batch, geometry, y, threads)
Napi::Value DepthwiseConvForward(const Napi::CallbackInfo& info) {
  return DepthwiseCall(info, {"x", DepthwiseArray::kImage}, {"w", DepthwiseArray::kWeights}, {"y", DepthwiseArray::kOutput},
                       lowbit::depthwise_conv_forward);
}

// depthwiseConvBackwardInput(dy, w, batch, geometry, dx, threads)
Napi::Value DepthwiseConvBackwardInput(const Napi::CallbackInfo& info) {
  return DepthwiseCall(info, {"dy", DepthwiseArray::kOutput}, {"w", DepthwiseArray::kWeights}, {"dx", DepthwiseArray::kImage},
                       lowbit::depthwise_conv_backward_input);
}

// depthwiseConvBackwardWeight(dy, x, batch, geometry, dw, threads)
Napi::Value DepthwiseConvBackwardWeight(const Napi::CallbackInfo& info) {
  return DepthwiseCall(info, {"dy", DepthwiseArray::kOutput}, {"x", DepthwiseArray::kImage}, {"dw", DepthwiseArray::kWeights},
                       lowbit::depthwise_conv_backward_weight);
}

// upperFactorOfInverse(h, n, u) -> whether h was positive definite (u written)
Napi::Value UpperFactorOfInverse(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t nh, nu;
  const double* h = array_of<double>(info[0], "h", napi_float64_array, &nh);
  const size_t n = size_of(info[1], "n");
  double* u = array_of<double>(info[2], "u", napi_float64_array, &nu);
  const size_t nn = product(env, {n, n}, "n * n");
  need_length(env, "h", nh, nn, "n * n");
  need_length(env, "u", nu, nn, "n * n");
  no_overlap(env, u, nu, "u", h, nh, "h");
  return Napi::Boolean::New(env, lowbit::upper_factor_of_inverse(h, n, u));
}

// gptqRoundBlock(w, rows, n, u, b0, b1, group, scale, zeroPoint, qmin, qmax, values, errors)
Napi::Value GptqRoundBlock(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t nw, nu, ngroup, nscale, nzp, nqmin, nqmax, nvalues, nerrors;
  float* w = array_of<float>(info[0], "w", napi_float32_array, &nw);
  const size_t rows = size_of(info[1], "rows"), n = size_of(info[2], "n");
  const double* u = array_of<double>(info[3], "u", napi_float64_array, &nu);
  const size_t b0 = size_of(info[4], "b0"), b1 = size_of(info[5], "b1");
  const int32_t* group = array_of<int32_t>(info[6], "group", napi_int32_array, &ngroup);
  const float* scale = array_of<float>(info[7], "scale", napi_float32_array, &nscale);
  const int32_t* zero_point = array_of<int32_t>(info[8], "zeroPoint", napi_int32_array, &nzp);
  const int32_t* qmin = array_of<int32_t>(info[9], "qmin", napi_int32_array, &nqmin);
  const int32_t* qmax = array_of<int32_t>(info[10], "qmax", napi_int32_array, &nqmax);
  int32_t* values = array_of<int32_t>(info[11], "values", napi_int32_array, &nvalues);
  float* errors = array_of<float>(info[12], "errors", napi_float32_array, &nerrors);
  if (b0 > b1 || b1 > n) throw_range(env, "columns must satisfy b0 <= b1 <= n (got b0 = " + std::to_string(b0) + ", b1 = " +
                                              std::to_string(b1) + ", n = " + std::to_string(n) + ")");
  const size_t block = product(env, {rows, b1 - b0}, "rows * (b1 - b0)");
  need_length(env, "w", nw, product(env, {rows, n}, "rows * n"), "rows * n");
  need_length(env, "u", nu, product(env, {n, n}, "n * n"), "n * n");
  need_length(env, "group", ngroup, block, "rows * (b1 - b0)");
  need_length(env, "values", nvalues, block, "rows * (b1 - b0)");
  need_length(env, "errors", nerrors, block, "rows * (b1 - b0)");
  need_length(env, "zeroPoint", nzp, nscale, "scale.length");
  need_length(env, "qmin", nqmin, nscale, "scale.length");
  need_length(env, "qmax", nqmax, nscale, "scale.length");
  for (size_t i = 0; i < ngroup; ++i)
    if (group[i] < 0 || size_t(group[i]) >= nscale)
      throw_range(env, "group[" + std::to_string(i) + "] must be in [0, scale.length) (got " + std::to_string(group[i]) + ")");
  no_overlap(env, errors, nerrors, "errors", w, nw, "w");
  no_overlap(env, values, nvalues, "values", group, ngroup, "group");
  no_overlap(env, w, nw, "w", group, ngroup, "group");
  no_overlap(env, errors, nerrors, "errors", group, ngroup, "group");
  lowbit::gptq_round_block(w, rows, n, u, b0, b1, group, nscale, scale, zero_point, qmin, qmax, values, errors);
  return env.Undefined();
}

}  // namespace

void register_train_functions(Napi::Env env, Napi::Object exports) {
  exports.Set("sgemm", Napi::Function::New(env, Sgemm, "sgemm"));
  exports.Set("im2col", Napi::Function::New(env, Im2col, "im2col"));
  exports.Set("col2im", Napi::Function::New(env, Col2im, "col2im"));
  exports.Set("batchNormForward", Napi::Function::New(env, BatchNormForward, "batchNormForward"));
  exports.Set("batchNormBackward", Napi::Function::New(env, BatchNormBackward, "batchNormBackward"));
  exports.Set("activationForward", Napi::Function::New(env, ActivationForward, "activationForward"));
  exports.Set("activationBackward", Napi::Function::New(env, ActivationBackward, "activationBackward"));
  exports.Set("maxPoolForward", Napi::Function::New(env, MaxPoolForward, "maxPoolForward"));
  exports.Set("maxPoolBackward", Napi::Function::New(env, MaxPoolBackward, "maxPoolBackward"));
  exports.Set("averagePoolForward", Napi::Function::New(env, AveragePoolForward, "averagePoolForward"));
  exports.Set("averagePoolBackward", Napi::Function::New(env, AveragePoolBackward, "averagePoolBackward"));
  exports.Set("depthwiseConvForward", Napi::Function::New(env, DepthwiseConvForward, "depthwiseConvForward"));
  exports.Set("depthwiseConvBackwardInput", Napi::Function::New(env, DepthwiseConvBackwardInput, "depthwiseConvBackwardInput"));
  exports.Set("depthwiseConvBackwardWeight", Napi::Function::New(env, DepthwiseConvBackwardWeight, "depthwiseConvBackwardWeight"));
  exports.Set("upperFactorOfInverse", Napi::Function::New(env, UpperFactorOfInverse, "upperFactorOfInverse"));
  exports.Set("gptqRoundBlock", Napi::Function::New(env, GptqRoundBlock, "gptqRoundBlock"));
}

}  // namespace lowbit_binding
