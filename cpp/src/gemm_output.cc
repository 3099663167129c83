// Float and requantized outputs of the integer GEMM (see gemm.h).
#include <algorithm>
#include <cmath>

#include "lowbit/gemm.h"

namespace lowbit {

void unpack_b(const PackedB& b, uint8_t* out) {
  const uint8_t flip = b.b_signed ? 0x00 : 0x80;
  for (size_t kk = 0; kk < b.k; ++kk)
    for (size_t j = 0; j < b.n; ++j)
      out[kk * b.n + j] = uint8_t(b.panel(j / kPanelWidth)[(kk / 4) * 64 + (j % kPanelWidth) * 4 + kk % 4]) ^ flip;
}

void int32_to_float(const int32_t* c, size_t m, size_t n, float a_scale, const float* b_scale,
                    bool b_scale_per_column, const float* bias, float* y) {
  for (size_t i = 0; i < m; ++i)
    for (size_t j = 0; j < n; ++j) {
      const float multiplier = a_scale * b_scale[b_scale_per_column ? j : 0];
      float v = float(c[i * n + j]) * multiplier;
      if (bias) v = v + bias[j];
      y[i * n + j] = v;
    }
}

void requantize_int32(const int32_t* c, size_t m, size_t n, float a_scale, const float* b_scale,
                      bool b_scale_per_column, float y_scale, int32_t y_zero_point, int32_t qmin,
                      int32_t qmax, bool relu, uint8_t* y) {
  const float lo = float((relu ? std::max(qmin, y_zero_point) : qmin) - y_zero_point);
  const float hi = float(qmax - y_zero_point);
  for (size_t i = 0; i < m; ++i)
    for (size_t j = 0; j < n; ++j) {
      const float multiplier = (a_scale * b_scale[b_scale_per_column ? j : 0]) / y_scale;
      float r = std::nearbyint(float(c[i * n + j]) * multiplier);
      r = r > lo ? r : lo;  // NaN cannot occur: finite scales, finite products
      r = r < hi ? r : hi;
      y[i * n + j] = uint8_t(int32_t(r) + y_zero_point);
    }
}

}  // namespace lowbit
