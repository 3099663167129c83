// Tensor-level quantization entry points: walk a QuantLayout, split it into
// contiguous pieces, and hand each piece to one kernel table. Called by the
// N-API binding and by the native tests; no Node types here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "lowbit/quant_params.h"
#include "lowbit/quantize_kernels.h"
#include "lowbit/thread_pool.h"

namespace lowbit {

constexpr int64_t kNoNaN = -1;

// Where work runs: which kernels, which pool, how many threads (0 = all).
struct Exec {
  const QuantizeKernels* kernels;
  ThreadPool* pool;
  unsigned threads;
};

// out[i] = quantize(x[i]) for every element (one byte per element).
// Returns the index of the first NaN, or kNoNaN.
int64_t quantize_tensor(const Exec& exec, const float* x, const QuantParams& params, uint8_t* out);

// out[i] = dequantize(q[i]); codes are int8 when is_signed, else uint8.
void dequantize_tensor(const Exec& exec, const uint8_t* q, bool is_signed,
                       const QuantParams& params, float* out);

// Per group, the range [lo, hi] of its finite values (lo = +Inf, hi = -Inf
// when the group has none). Returns the index of the first NaN, or kNoNaN.
int64_t group_ranges(const Exec& exec, const float* x, const QuantLayout& layout, float* lo,
                     float* hi);

// Per group, the clip range that minimises the squared quantization error
// over `candidates` shrink ratios r = 1, 1 - 1/c, ..., 1/c of the finite range
// (the whole range scaled by r, so zero stays inside). lo/hi hold the chosen
// ranges on return. Returns the index of the first NaN, or kNoNaN.
// `norm` 2 minimises the squared error (the kernel's squared_error), norm 1
// the absolute error (GDRQ's L1 quantized loss; scalar, the same on every path).
int64_t search_ranges_mse(const Exec& exec, const float* x, const QuantLayout& layout,
                          int32_t qmin, int32_t qmax, bool symmetric, unsigned candidates,
                          float* lo, float* hi, int norm = 2);

// Per group, the error of quantizing with the parameters of range [lo[g], hi[g]]:
// Σ (x - x̂)^2 (norm 2) or Σ |x - x̂| (norm 1) over the group's finite values.
void group_errors(const Exec& exec, const float* x, const QuantLayout& layout, const float* lo,
                  const float* hi, int32_t qmin, int32_t qmax, bool symmetric, int norm, double* out);

// LSQ over a 'tensor' or 'channel' layout with one step per group.
void lsq_forward_tensor(const Exec& exec, const float* v, const QuantLayout& layout, const float* step,
                        int32_t qn, int32_t qp, float* out);
// Writes grad_in and, per group, Σ grad_out · ∂v̂/∂step (not yet multiplied by
// the gradient scale). The sums are the same for every path and thread count:
// each fixed-size piece is summed by one kernel call, pieces are added in order.
void lsq_backward_tensor(const Exec& exec, const float* v, const float* grad_out, const QuantLayout& layout,
                         const float* step, int32_t qn, int32_t qp, float* grad_in, double* grad_step);

// Per group, over its finite values: count, mean, mean |x - mean| (Laplace b),
// Σ (x - mean)² (for σ), min and max. Partial sums are per fixed-size piece and
// added in piece order, so results do not depend on the thread count.
struct GroupMoments {
  std::vector<double> count, mean, mean_abs_dev, sum_sq_dev, min, max;
};
int64_t group_moments(const Exec& exec, const float* x, const QuantLayout& layout, GroupMoments* out);

// One calibration batch (ts/calibration/observers.ts; single-threaded: onnxruntime's
// thread runs the model meanwhile). finite_range: the least and greatest finite
// values and how many values are finite (±Infinity skipped; +inf/-inf when none);
// returns the index of the first NaN, or kNoNaN. histogram_add: each finite value
// into the |x| histogram, bin min(bins − 1, floor(|x|·bins_per_unit)) in float64,
// negative ones also into negative_counts; returns how many values were exactly 0.
int64_t finite_range(const float* x, size_t n, float* min, float* max, size_t* finite);
size_t histogram_add(const float* x, size_t n, double bins_per_unit, size_t bins, double* counts,
                     double* negative_counts);

struct ErrorStats {
  double squared_error = 0;  // over finite inputs
  double signal = 0;         // sum of x^2 over finite inputs
  double max_abs_error = 0;  // over finite inputs
  size_t finite_count = 0;
  size_t clipped_count = 0;  // round(x / scale) + zp fell outside [qmin, qmax]
};

ErrorStats error_stats(const float* x, const uint8_t* q, bool is_signed, const QuantParams& params);

// ONNX INT4/UINT4 and INT2/UINT2 packing (element 0 in the lowest bits).
// pack_* returns the index of the first value outside the type's range, or -1
// (nothing is written past it). unpack_* sign-extends when is_signed.
int64_t pack_int4(const uint8_t* values, size_t n, bool is_signed, uint8_t* out);
void unpack_int4(const uint8_t* packed, size_t n, bool is_signed, uint8_t* out);
int64_t pack_int2(const uint8_t* values, size_t n, bool is_signed, uint8_t* out);
void unpack_int2(const uint8_t* packed, size_t n, bool is_signed, uint8_t* out);

// Index of the first code outside [qmin, qmax] (int8 when is_signed, else
// uint8), or -1: a quantized tensor built by hand may hold codes its bits cannot.
int64_t first_code_outside(const uint8_t* q, size_t n, bool is_signed, int32_t qmin, int32_t qmax);

}  // namespace lowbit
