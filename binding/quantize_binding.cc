// N-API glue for the tensor quantization entry points in cpp/include/lowbit/quantize.h.
// Argument order is private to ts/native.ts, which declares the same shapes.
#include <cmath>

#include "async_task.h"
#include "context.h"
#include "napi_args.h"

namespace lowbit_binding {
namespace {

using lowbit::QuantLayout;
using lowbit::QuantParams;

void expect_length(Napi::Env env, size_t got, size_t want, const char* name) {
  if (got != want)
    throw_range(env, std::string(name) + " has " + std::to_string(got) + " elements, expected " +
                         std::to_string(want));
}

// {scale: Float32Array, zeroPoint: Int32Array, qmin, qmax, layout} -> QuantParams. Every field is read (a getter
// can run any code, even detach an array) before any array's memory is taken; `arrays` gets the scale and zeroPoint
// arrays the params point into, for an async call to keep alive.
QuantParams params_of(const Napi::Value& v, std::vector<Napi::Value>* arrays = nullptr) {
  Napi::Env env = v.Env();
  if (!v.IsObject()) throw_type(env, "params must be an object");
  Napi::Object o = v.As<Napi::Object>();
  QuantParams p;
  p.layout = layout_of(o.Get("layout"));
  const Napi::Value qmin = o.Get("qmin"), qmax = o.Get("qmax"), scale = o.Get("scale"), zero_point = o.Get("zeroPoint");
  p.qmin = int_of(qmin, "params.qmin");
  p.qmax = int_of(qmax, "params.qmax");
  if (!byte_code_range(p.qmin, p.qmax))
    throw_range(env, "params.qmin/qmax must describe an 8-bit (or narrower) integer range");
  size_t ns, nz;
  p.scale = array_of<float>(scale, "params.scale", napi_float32_array, &ns);
  p.zero_point = array_of<int32_t>(zero_point, "params.zeroPoint", napi_int32_array, &nz);
  if (arrays) *arrays = {scale, zero_point};
  const size_t groups = p.layout.group_count();
  expect_length(env, ns, groups, "params.scale");
  expect_length(env, nz, groups, "params.zeroPoint");
  for (size_t g = 0; g < groups; ++g) {
    if (!(p.scale[g] > 0.0f) || !std::isfinite(p.scale[g]))
      throw_range(env, "params.scale[" + std::to_string(g) + "] must be positive and finite");
    if (p.zero_point[g] < p.qmin || p.zero_point[g] > p.qmax)
      throw_range(env, "params.zeroPoint[" + std::to_string(g) + "] is outside [qmin, qmax]");
  }
  return p;
}

unsigned threads_of(const Napi::Value& v) {
  size_t t = size_of(v, "threads");
  return unsigned(std::min<size_t>(t, 1024));
}

// quantize(x, out, params, kernel, threads) -> index of the first NaN or -1. (Here and below, option objects are
// read before any array's memory is taken: see params_of.)
struct QuantizeCall {
  const float* x;
  uint8_t* out;
  QuantParams params;
  std::vector<Napi::Value> params_arrays;
  lowbit::Exec exec;

  explicit QuantizeCall(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    size_t nx, nout;
    params = params_of(info[2], &params_arrays);
    x = array_of<float>(info[0], "x", napi_float32_array, &nx);
    out = codes_of(info[1], "out", &nout);
    expect_length(env, nx, params.layout.element_count(), "x");
    expect_length(env, nout, nx, "out");
    exec = Context::of(env).exec(env, string_of(info[3], "kernel"), threads_of(info[4]));
  }
  double run() const { return double(lowbit::quantize_tensor(exec, x, params, out)); }
};

Napi::Value Quantize(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), QuantizeCall(info).run());
}

Napi::Value QuantizeAsync(const Napi::CallbackInfo& info) {
  QuantizeCall call(info);
  std::vector<Napi::Value> keep = {info[0], info[1]};
  keep.insert(keep.end(), call.params_arrays.begin(), call.params_arrays.end());
  return AsyncTask::Start(info.Env(), keep, [call] { return call.run(); });
}

// dequantize(q, isSigned, out, params, kernel, threads)
Napi::Value Dequantize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t nq, nout;
  QuantParams params = params_of(info[3]);
  bool is_signed = bool_of(info[1], "isSigned");
  const uint8_t* q = codes_of(info[0], "q", &nq, is_signed);
  float* out = array_of<float>(info[2], "out", napi_float32_array, &nout);
  expect_length(env, nq, params.layout.element_count(), "q");
  expect_length(env, nout, nq, "out");
  auto exec = Context::of(env).exec(env, string_of(info[4], "kernel"), threads_of(info[5]));
  lowbit::dequantize_tensor(exec, q, is_signed, params, out);
  return env.Undefined();
}

// groupRanges(x, layout, lo, hi, kernel, threads) / searchRangesMse(x, layout, lo, hi, kernel,
// threads, qmin, qmax, symmetric, candidates) -> index of the first NaN or -1
struct RangesCall {
  const float* x;
  QuantLayout layout;
  float* lo;
  float* hi;
  lowbit::Exec exec;
  bool search = false;
  int32_t qmin = 0, qmax = 0;
  bool symmetric = true;
  unsigned candidates = 0;
  int norm = 2;

  RangesCall(const Napi::CallbackInfo& info, bool with_search) : search(with_search) {
    Napi::Env env = info.Env();
    size_t nx, nlo, nhi;
    layout = layout_of(info[1]);
    x = array_of<float>(info[0], "x", napi_float32_array, &nx);
    lo = array_of<float>(info[2], "lo", napi_float32_array, &nlo);
    hi = array_of<float>(info[3], "hi", napi_float32_array, &nhi);
    expect_length(env, nx, layout.element_count(), "x");
    expect_length(env, nlo, layout.group_count(), "lo");
    expect_length(env, nhi, layout.group_count(), "hi");
    exec = Context::of(env).exec(env, string_of(info[4], "kernel"), threads_of(info[5]));
    if (search) {
      qmin = int_of(info[6], "qmin");
      qmax = int_of(info[7], "qmax");
      if (qmin >= qmax || qmin < -128 || qmax > 255) throw_range(env, "qmin/qmax out of range");
      symmetric = bool_of(info[8], "symmetric");
      size_t c = size_of(info[9], "candidates");
      if (c < 1 || c > 10000) throw_range(env, "candidates must be in 1..10000");
      candidates = unsigned(c);
      norm = int_of(info[10], "norm");
      if (norm != 1 && norm != 2) throw_range(env, "norm must be 1 or 2");
    }
  }
  double run() const {
    if (search)
      return double(lowbit::search_ranges_mse(exec, x, layout, qmin, qmax, symmetric, candidates, lo, hi, norm));
    return double(lowbit::group_ranges(exec, x, layout, lo, hi));
  }
};

Napi::Value GroupRanges(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), RangesCall(info, false).run());
}
Napi::Value GroupRangesAsync(const Napi::CallbackInfo& info) {
  RangesCall call(info, false);
  return AsyncTask::Start(info.Env(), {info[0], info[2], info[3]}, [call] { return call.run(); });
}
Napi::Value SearchRangesMse(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), RangesCall(info, true).run());
}
Napi::Value SearchRangesMseAsync(const Napi::CallbackInfo& info) {
  RangesCall call(info, true);
  return AsyncTask::Start(info.Env(), {info[0], info[2], info[3]}, [call] { return call.run(); });
}

// groupErrors(x, layout, lo, hi, qmin, qmax, symmetric, norm, out: Float64Array, kernel, threads), and
// groupErrorsAsync (the same on a worker thread; resolves with 0 once `out` is filled).
struct ErrorsCall {
  const float* x = nullptr;
  QuantLayout layout;
  const float* lo = nullptr;
  const float* hi = nullptr;
  int32_t qmin = 0, qmax = 0;
  bool symmetric = false;
  int norm = 2;
  double* out = nullptr;
  lowbit::Exec exec;

  explicit ErrorsCall(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    size_t nx, nlo, nhi, nout;
    layout = layout_of(info[1]);
    x = array_of<float>(info[0], "x", napi_float32_array, &nx);
    lo = array_of<float>(info[2], "lo", napi_float32_array, &nlo);
    hi = array_of<float>(info[3], "hi", napi_float32_array, &nhi);
    qmin = int_of(info[4], "qmin");
    qmax = int_of(info[5], "qmax");
    if (qmin >= qmax || qmin < -128 || qmax > 255) throw_range(env, "qmin/qmax out of range");
    symmetric = bool_of(info[6], "symmetric");
    norm = int_of(info[7], "norm");
    if (norm != 1 && norm != 2) throw_range(env, "norm must be 1 or 2");
    out = array_of<double>(info[8], "out", napi_float64_array, &nout);
    expect_length(env, nx, layout.element_count(), "x");
    expect_length(env, nlo, layout.group_count(), "lo");
    expect_length(env, nhi, layout.group_count(), "hi");
    expect_length(env, nout, layout.group_count(), "out");
    exec = Context::of(env).exec(env, string_of(info[9], "kernel"), threads_of(info[10]));
  }
  void run() const { lowbit::group_errors(exec, x, layout, lo, hi, qmin, qmax, symmetric, norm, out); }
};

Napi::Value GroupErrors(const Napi::CallbackInfo& info) {
  ErrorsCall(info).run();
  return info.Env().Undefined();
}
Napi::Value GroupErrorsAsync(const Napi::CallbackInfo& info) {
  ErrorsCall call(info);
  return AsyncTask::Start(info.Env(), {info[0], info[2], info[3], info[8]}, [call] {
    call.run();
    return 0.0;
  });
}

// lsqForward(v, layout, step: Float32Array, qn, qp, out, kernel, threads)
// lsqBackward(v, gradOut, layout, step, qn, qp, gradIn, gradStep: Float64Array, kernel, threads)
struct LsqCall {
  const float* v = nullptr;
  const float* grad_out = nullptr;
  QuantLayout layout;
  const float* step = nullptr;
  int32_t qn = 0, qp = 0;
  float* out = nullptr;
  double* grad_step = nullptr;
  lowbit::Exec exec;

  LsqCall(const Napi::CallbackInfo& info, bool backward) {
    Napi::Env env = info.Env();
    size_t nv, ng = 0, ns, no, ngs = 0;
    layout = layout_of(info[backward ? 2 : 1]);
    int a = 0;
    v = array_of<float>(info[a++], "v", napi_float32_array, &nv);
    if (backward) grad_out = array_of<float>(info[a++], "gradOut", napi_float32_array, &ng);
    a++;  // the layout
    if (layout.kind == lowbit::Granularity::kBlock) throw_range(env, "LSQ steps are per tensor or per channel");
    step = array_of<float>(info[a++], "step", napi_float32_array, &ns);
    qn = int_of(info[a++], "qn");
    qp = int_of(info[a++], "qp");
    // Integer range [-qn, qp]: signed (qn = qp + 1), unsigned (qn = 0) or with a zero point (qn = z, qp = 2^b - 1 - z);
    // up to 16-bit codes (fake quantization of 16-bit activations; the kernels work in float).
    if (qn < 0 || qp < 0 || qn + qp < 1 || qn > 65535 || qp > 65535) throw_range(env, "qn/qp out of range");
    out = array_of<float>(info[a++], backward ? "gradIn" : "out", napi_float32_array, &no);
    if (backward) grad_step = array_of<double>(info[a++], "gradStep", napi_float64_array, &ngs);
    expect_length(env, nv, layout.element_count(), "v");
    expect_length(env, no, nv, "out");
    expect_length(env, ns, layout.group_count(), "step");
    if (backward) {
      expect_length(env, ng, nv, "gradOut");
      expect_length(env, ngs, layout.group_count(), "gradStep");
    }
    for (size_t g = 0; g < ns; ++g)
      if (!(step[g] > 0.0f) || !std::isfinite(step[g])) throw_range(env, "step[" + std::to_string(g) + "] must be positive and finite");
    exec = Context::of(env).exec(env, string_of(info[a], "kernel"), threads_of(info[a + 1]));
  }
};

Napi::Value LsqForward(const Napi::CallbackInfo& info) {
  LsqCall c(info, false);
  lowbit::lsq_forward_tensor(c.exec, c.v, c.layout, c.step, c.qn, c.qp, c.out);
  return info.Env().Undefined();
}

Napi::Value LsqBackward(const Napi::CallbackInfo& info) {
  LsqCall c(info, true);
  lowbit::lsq_backward_tensor(c.exec, c.v, c.grad_out, c.layout, c.step, c.qn, c.qp, c.out, c.grad_step);
  return info.Env().Undefined();
}

// groupMoments(x, layout, out: Float64Array (6 × groups: count, mean, b, Σd², min, max), kernel, threads) -> NaN index or -1
struct MomentsCall {
  const float* x;
  QuantLayout layout;
  double* out;
  lowbit::Exec exec;
  explicit MomentsCall(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    size_t nx, nout;
    layout = layout_of(info[1]);
    x = array_of<float>(info[0], "x", napi_float32_array, &nx);
    out = array_of<double>(info[2], "out", napi_float64_array, &nout);
    expect_length(env, nx, layout.element_count(), "x");
    expect_length(env, nout, 6 * layout.group_count(), "out");
    exec = Context::of(env).exec(env, string_of(info[3], "kernel"), threads_of(info[4]));
  }
  double run() const {
    lowbit::GroupMoments m;
    const int64_t nan = lowbit::group_moments(exec, x, layout, &m);
    if (nan != lowbit::kNoNaN) return double(nan);
    const size_t g = layout.group_count();
    const std::vector<double>* fields[] = {&m.count, &m.mean, &m.mean_abs_dev, &m.sum_sq_dev, &m.min, &m.max};
    for (size_t f = 0; f < 6; ++f) std::copy(fields[f]->begin(), fields[f]->end(), out + f * g);
    return -1;
  }
};

Napi::Value GroupMomentsSync(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), MomentsCall(info).run());
}
Napi::Value GroupMomentsAsync(const Napi::CallbackInfo& info) {
  MomentsCall call(info);
  return AsyncTask::Start(info.Env(), {info[0], info[2]}, [call] { return call.run(); });
}

// finiteRange(x) -> [min, max, finite, nanIndex (-1: none)]
Napi::Value FiniteRange(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t n;
  const float* x = array_of<float>(info[0], "x", napi_float32_array, &n);
  float lo, hi;
  size_t finite = 0;
  const int64_t nan = lowbit::finite_range(x, n, &lo, &hi, &finite);
  Napi::Array r = Napi::Array::New(env, 4);
  r.Set(uint32_t(0), double(lo));
  r.Set(uint32_t(1), double(hi));
  r.Set(uint32_t(2), double(finite));
  r.Set(uint32_t(3), double(nan));
  return r;
}

// firstCodeOutside(q, isSigned, qmin, qmax) -> index of the first code outside [qmin, qmax], or -1
Napi::Value FirstCodeOutside(const Napi::CallbackInfo& info) {
  size_t n;
  const bool is_signed = bool_of(info[1], "isSigned");
  const uint8_t* q = codes_of(info[0], "q", &n, is_signed);
  const int32_t qmin = int32_t(number_of(info[2], "qmin")), qmax = int32_t(number_of(info[3], "qmax"));
  return Napi::Number::New(info.Env(), double(lowbit::first_code_outside(q, n, is_signed, qmin, qmax)));
}

// histogramAdd(x, binsPerUnit, counts, negativeCounts) -> how many values were exactly 0
Napi::Value HistogramAdd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t n, ncounts, nnegative;
  const float* x = array_of<float>(info[0], "x", napi_float32_array, &n);
  const double bins_per_unit = number_of(info[1], "binsPerUnit");
  if (!(bins_per_unit >= 0) || std::isinf(bins_per_unit)) throw_range(env, "binsPerUnit must be a finite number >= 0");
  double* counts = array_of<double>(info[2], "counts", napi_float64_array, &ncounts);
  double* negative = array_of<double>(info[3], "negativeCounts", napi_float64_array, &nnegative);
  if (ncounts == 0) throw_range(env, "counts must not be empty");
  expect_length(env, nnegative, ncounts, "negativeCounts");
  return Napi::Number::New(env, double(lowbit::histogram_add(x, n, bins_per_unit, ncounts, counts, negative)));
}

// paramsFromRanges(lo, hi, qmin, qmax, symmetric, scaleOut, zeroPointOut)
Napi::Value ParamsFromRanges(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t nlo, nhi, ns, nz;
  const float* lo = array_of<float>(info[0], "lo", napi_float32_array, &nlo);
  const float* hi = array_of<float>(info[1], "hi", napi_float32_array, &nhi);
  int32_t qmin = int_of(info[2], "qmin"), qmax = int_of(info[3], "qmax");
  // Up to 16 bits: activation scales for uint16/int16 QuantizeLinear (integer codes elsewhere stay within 8 bits).
  if (qmin >= qmax || qmin < -32768 || qmax > 65535) throw_range(env, "qmin/qmax out of range");
  bool symmetric = bool_of(info[4], "symmetric");
  float* scale = array_of<float>(info[5], "scale", napi_float32_array, &ns);
  int32_t* zp = array_of<int32_t>(info[6], "zeroPoint", napi_int32_array, &nz);
  expect_length(env, nhi, nlo, "hi");
  expect_length(env, ns, nlo, "scale");
  expect_length(env, nz, nlo, "zeroPoint");
  for (size_t g = 0; g < nlo; ++g) lowbit::params_from_range(lo[g], hi[g], qmin, qmax, symmetric, &scale[g], &zp[g]);
  return env.Undefined();
}

// errorStats(x, q, isSigned, params) -> {squaredError, signal, maxAbsError, finiteCount, clippedCount}
Napi::Value ErrorStats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t nx, nq;
  QuantParams params = params_of(info[3]);
  const float* x = array_of<float>(info[0], "x", napi_float32_array, &nx);
  bool is_signed = bool_of(info[2], "isSigned");
  const uint8_t* q = codes_of(info[1], "q", &nq, is_signed);
  expect_length(env, nx, params.layout.element_count(), "x");
  expect_length(env, nq, nx, "q");
  lowbit::ErrorStats s = lowbit::error_stats(x, q, is_signed, params);
  Napi::Object r = Napi::Object::New(env);
  r.Set("squaredError", s.squared_error);
  r.Set("signal", s.signal);
  r.Set("maxAbsError", s.max_abs_error);
  r.Set("finiteCount", double(s.finite_count));
  r.Set("clippedCount", double(s.clipped_count));
  return r;
}

// pack(values, isSigned, out) -> first out-of-range index or -1; unpack(packed, n, isSigned, out)
template <int kBits>
Napi::Value Pack(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t nv, nout;
  bool is_signed = bool_of(info[1], "isSigned");
  const uint8_t* values = codes_of(info[0], "values", &nv, is_signed);
  uint8_t* out = array_of<uint8_t>(info[2], "out", napi_uint8_array, &nout);
  const size_t per_byte = 8 / kBits;
  expect_length(env, nout, (nv + per_byte - 1) / per_byte, "out");
  int64_t bad = kBits == 4 ? lowbit::pack_int4(values, nv, is_signed, out)
                           : lowbit::pack_int2(values, nv, is_signed, out);
  return Napi::Number::New(env, double(bad));
}

template <int kBits>
Napi::Value Unpack(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t np, nout;
  const uint8_t* packed = array_of<uint8_t>(info[0], "packed", napi_uint8_array, &np);
  size_t n = size_of(info[1], "length");
  bool is_signed = bool_of(info[2], "isSigned");
  uint8_t* out = codes_of(info[3], "out", &nout);
  const size_t per_byte = 8 / kBits;
  expect_length(env, np, (n + per_byte - 1) / per_byte, "packed");
  expect_length(env, nout, n, "out");
  if (kBits == 4) lowbit::unpack_int4(packed, n, is_signed, out);
  else lowbit::unpack_int2(packed, n, is_signed, out);
  return env.Undefined();
}

}  // namespace

void register_quantize_functions(Napi::Env env, Napi::Object exports) {
  exports.Set("quantize", Napi::Function::New(env, Quantize, "quantize"));
  exports.Set("quantizeAsync", Napi::Function::New(env, QuantizeAsync, "quantizeAsync"));
  exports.Set("dequantize", Napi::Function::New(env, Dequantize, "dequantize"));
  exports.Set("groupRanges", Napi::Function::New(env, GroupRanges, "groupRanges"));
  exports.Set("groupRangesAsync", Napi::Function::New(env, GroupRangesAsync, "groupRangesAsync"));
  exports.Set("searchRangesMse", Napi::Function::New(env, SearchRangesMse, "searchRangesMse"));
  exports.Set("searchRangesMseAsync", Napi::Function::New(env, SearchRangesMseAsync, "searchRangesMseAsync"));
  exports.Set("groupMoments", Napi::Function::New(env, GroupMomentsSync, "groupMoments"));
  exports.Set("groupMomentsAsync", Napi::Function::New(env, GroupMomentsAsync, "groupMomentsAsync"));
  exports.Set("groupErrors", Napi::Function::New(env, GroupErrors, "groupErrors"));
  exports.Set("groupErrorsAsync", Napi::Function::New(env, GroupErrorsAsync, "groupErrorsAsync"));
  exports.Set("lsqForward", Napi::Function::New(env, LsqForward, "lsqForward"));
  exports.Set("lsqBackward", Napi::Function::New(env, LsqBackward, "lsqBackward"));
  exports.Set("finiteRange", Napi::Function::New(env, FiniteRange, "finiteRange"));
  exports.Set("firstCodeOutside", Napi::Function::New(env, FirstCodeOutside, "firstCodeOutside"));
  exports.Set("histogramAdd", Napi::Function::New(env, HistogramAdd, "histogramAdd"));
  exports.Set("paramsFromRanges", Napi::Function::New(env, ParamsFromRanges, "paramsFromRanges"));
  exports.Set("errorStats", Napi::Function::New(env, ErrorStats, "errorStats"));
  exports.Set("packInt4", Napi::Function::New(env, Pack<4>, "packInt4"));
  exports.Set("unpackInt4", Napi::Function::New(env, Unpack<4>, "unpackInt4"));
  exports.Set("packInt2", Napi::Function::New(env, Pack<2>, "packInt2"));
  exports.Set("unpackInt2", Napi::Function::New(env, Unpack<2>, "unpackInt2"));
}

}  // namespace lowbit_binding
