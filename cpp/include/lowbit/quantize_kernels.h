// The per-instruction-set quantization kernels, as one table per path.
// Each table lives in its own translation unit compiled with that ISA's flags
// (cpp/src/ref/, cpp/src/x86/); everything else is built for the baseline.
// All kernels implement rounding.h exactly; tests compare them bit for bit.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "lowbit/cpu_features.h"

namespace lowbit {

struct QuantizeKernels {
  const char* name;
  // n contiguous elements with one (scale, zp). Writes one byte per element:
  // the low 8 bits of the saturated integer (int8 or uint8 depending on the
  // range). Returns true when some x is NaN (the output is then unspecified).
  bool (*quantize_run)(const float* x, size_t n, float scale, int32_t zp, int32_t qmin,
                       int32_t qmax, uint8_t* out);
  // Same with per-element parameters scale[i], zp[i].
  bool (*quantize_vec)(const float* x, size_t n, const float* scale, const int32_t* zp,
                       int32_t qmin, int32_t qmax, uint8_t* out);
  // (q - zp) * scale; q read as int8 when is_signed, else uint8.
  void (*dequantize_run)(const uint8_t* q, size_t n, bool is_signed, float scale, int32_t zp,
                         float* out);
  void (*dequantize_vec)(const uint8_t* q, size_t n, bool is_signed, const float* scale,
                         const int32_t* zp, float* out);
  // Widens [*lo, *hi] by the finite values of x (±Inf are ignored). Returns
  // true when some x is NaN.
  bool (*finite_range)(const float* x, size_t n, float* lo, float* hi);
  // Sum over finite x of (x - dequantize(quantize(x)))^2, accumulated in
  // double in 8 lanes (element i in lane i % 8 up to the last multiple of 8),
  // lanes combined as ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)), then the tail in
  // order: a fixed order, so every path returns the same double.
  double (*squared_error)(const float* x, size_t n, float scale, int32_t zp, int32_t qmin,
                          int32_t qmax);
  // LSQ forward (Esser et al.): out = roundHalfToEven(clip(v / step, -qn, qp)) · step.
  void (*lsq_forward)(const float* v, size_t n, float step, int32_t qn, int32_t qp, float* out);
  // LSQ backward with the straight-through estimator: grad_in = grad_out where
  // -qn < v/step < qp, else 0; returns Σ grad_out · ∂v̂/∂step with ∂v̂/∂step =
  // round(v/step) - v/step inside, -qn below, qp above, summed in double in the
  // same fixed 8-lane order as squared_error.
  double (*lsq_backward)(const float* v, const float* grad_out, size_t n, float step, int32_t qn,
                         int32_t qp, float* grad_in);
};

// Tables of the paths this binary was built with; null when not built.
const QuantizeKernels* quantize_kernels_scalar();
const QuantizeKernels* quantize_kernels_avx2();
const QuantizeKernels* quantize_kernels_avx512();

// Names of the quantize paths usable on this CPU, best first.
std::vector<std::string> available_quantize_kernels(const CpuFeatures& cpu);
// The table for `name` ("" = best available), or null when the name is not
// usable here (unknown, not built, or not supported by the CPU/OS).
const QuantizeKernels* find_quantize_kernels(const std::string& name, const CpuFeatures& cpu);

}  // namespace lowbit
