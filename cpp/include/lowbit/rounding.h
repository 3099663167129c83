// The quantization rule, written once. Every kernel (scalar reference, AVX2,
// AVX-512) implements exactly this and is tested bit-exact against it.
//
// ONNX QuantizeLinear: q = saturate(round_half_to_even(x / scale) + zero_point)
//  - float32 division, not a multiply by the reciprocal (they differ on ties);
//  - ties to even (std::nearbyint in the default rounding mode);
//  - saturation happens in float before the integer conversion, against
//    [qmin - zp, qmax - zp], so ±Inf and huge quotients saturate without UB;
//    the comparisons are written as x86 maxps/minps evaluate them, so a NaN
//    quotient lands on the lower bound in every path (NaN input is rejected
//    before it gets here; this only keeps the kernels defined).
// DequantizeLinear: x = float(q - zero_point) * scale.
#pragma once

// These helpers are `static` on purpose: they are compiled into translation
// units built with different instruction-set flags, and a shared (weak) inline
// definition could let the linker hand the AVX-512 copy to the scalar path.
// For the same reason they call the compiler's builtins, not std::nearbyint and
// std::fabs (inline library functions: weak copies in unoptimised builds).

#include <cmath>
#include <cstdint>

namespace lowbit {

static inline float clamp_like_maxps_minps(float v, float lo, float hi) {
  v = v > lo ? v : lo;
  v = v < hi ? v : hi;
  return v;
}

static inline int32_t quantize_value(float x, float scale, int32_t zero_point, int32_t qmin, int32_t qmax) {
  float r = __builtin_nearbyintf(x / scale);
  r = clamp_like_maxps_minps(r, float(qmin - zero_point), float(qmax - zero_point));
  return int32_t(r) + zero_point;
}

static inline float dequantize_value(int32_t q, float scale, int32_t zero_point) {
  return float(q - zero_point) * scale;
}

static inline bool is_finite_value(float x) { return __builtin_fabsf(x) < INFINITY; }

// LSQ for one element (see QuantizeKernels::lsq_backward): writes the input
// gradient and returns ∂v̂/∂step.
static inline float lsq_element(float v, float grad_out, float step, int32_t qn, int32_t qp, float* grad_in) {
  const float q = v / step;
  if (q <= float(-qn)) {
    *grad_in = 0.0f;
    return float(-qn);
  }
  if (q >= float(qp)) {
    *grad_in = 0.0f;
    return float(qp);
  }
  *grad_in = grad_out;
  return __builtin_nearbyintf(q) - q;
}

}  // namespace lowbit
