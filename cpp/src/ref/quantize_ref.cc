// Scalar reference quantization kernels: written for clarity, never
// vectorised by hand; the definition every SIMD path is tested against.
#include <cmath>

#include "lowbit/quantize_kernels.h"
#include "lowbit/rounding.h"

namespace lowbit {
namespace {

bool quantize_run_ref(const float* x, size_t n, float scale, int32_t zp, int32_t qmin,
                      int32_t qmax, uint8_t* out) {
  bool nan = false;
  for (size_t i = 0; i < n; ++i) {
    nan |= std::isnan(x[i]);
    out[i] = uint8_t(quantize_value(x[i], scale, zp, qmin, qmax));
  }
  return nan;
}

bool quantize_vec_ref(const float* x, size_t n, const float* scale, const int32_t* zp,
                      int32_t qmin, int32_t qmax, uint8_t* out) {
  bool nan = false;
  for (size_t i = 0; i < n; ++i) {
    nan |= std::isnan(x[i]);
    out[i] = uint8_t(quantize_value(x[i], scale[i], zp[i], qmin, qmax));
  }
  return nan;
}

inline int32_t load_code(const uint8_t* q, size_t i, bool is_signed) {
  return is_signed ? int32_t(int8_t(q[i])) : int32_t(q[i]);
}

void dequantize_run_ref(const uint8_t* q, size_t n, bool is_signed, float scale, int32_t zp,
                        float* out) {
  for (size_t i = 0; i < n; ++i) out[i] = dequantize_value(load_code(q, i, is_signed), scale, zp);
}

void dequantize_vec_ref(const uint8_t* q, size_t n, bool is_signed, const float* scale,
                        const int32_t* zp, float* out) {
  for (size_t i = 0; i < n; ++i)
    out[i] = dequantize_value(load_code(q, i, is_signed), scale[i], zp[i]);
}

bool finite_range_ref(const float* x, size_t n, float* lo, float* hi) {
  bool nan = false;
  float l = *lo, h = *hi;
  for (size_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) {
      nan = true;
    } else if (is_finite_value(x[i])) {
      l = x[i] < l ? x[i] : l;
      h = x[i] > h ? x[i] : h;
    }
  }
  *lo = l;
  *hi = h;
  return nan;
}

double squared_error_ref(const float* x, size_t n, float scale, int32_t zp, int32_t qmin,
                         int32_t qmax) {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  auto err2 = [&](float v) -> double {
    if (!is_finite_value(v)) return 0.0;
    float e = v - dequantize_value(quantize_value(v, scale, zp, qmin, qmax), scale, zp);
    return double(e) * double(e);
  };
  const size_t n8 = n - n % 8;
  for (size_t i = 0; i < n8; ++i) lane[i % 8] += err2(x[i]);
  double sum = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  for (size_t i = n8; i < n; ++i) sum += err2(x[i]);
  return sum;
}

void lsq_forward_ref(const float* v, size_t n, float step, int32_t qn, int32_t qp, float* out) {
  for (size_t i = 0; i < n; ++i) {
    const float r = std::nearbyint(clamp_like_maxps_minps(v[i] / step, float(-qn), float(qp)));
    out[i] = r * step;
  }
}

double lsq_backward_ref(const float* v, const float* grad_out, size_t n, float step, int32_t qn, int32_t qp,
                        float* grad_in) {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  auto one = [&](size_t i) -> double {
    return double(grad_out[i]) * double(lsq_element(v[i], grad_out[i], step, qn, qp, &grad_in[i]));
  };
  const size_t n8 = n - n % 8;
  for (size_t i = 0; i < n8; ++i) lane[i % 8] += one(i);
  double sum = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  for (size_t i = n8; i < n; ++i) sum += one(i);
  return sum;
}

const QuantizeKernels kScalar = {
    "scalar",         quantize_run_ref, quantize_vec_ref,  dequantize_run_ref,
    dequantize_vec_ref, finite_range_ref, squared_error_ref, lsq_forward_ref, lsq_backward_ref,
};

}  // namespace

const QuantizeKernels* quantize_kernels_scalar() { return &kScalar; }

}  // namespace lowbit
