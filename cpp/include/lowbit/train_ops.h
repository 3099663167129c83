// Element-wise activations and 2-D pooling for the CPU training engine
// (ts/train/kernels.ts). Each function is bit-identical to the TypeScript
// reference (`referenceKernels`), which computes in float64 and rounds to
// float32 on store: so do these wherever float32 arithmetic could round
// differently (clip bounds that are not float32 values, hardSigmoid,
// hardSwish, average sums and divisions), and follow JavaScript's Math.min /
// Math.max on NaN and signed zeros. NaN payloads are not specified.
//
// Threading: element-wise work over fixed chunks, pooling over (image, channel)
// planes; each output element is computed by one thread in a fixed order, so
// results never depend on the thread count.
#pragma once

#include <cstddef>
#include <cstdint>

#include "lowbit/sgemm.h"  // ConvGeometry
#include "lowbit/thread_pool.h"

namespace lowbit {

enum class Activation {
  kRelu,         // y = x > 0 ? x : 0; dy/dx = x > 0
  kClip,         // y = min(beta, max(alpha, x)); dy/dx = alpha < x < beta
  kHardSigmoid,  // y = max(0, min(1, alpha·x + beta)); dy/dx = alpha where 0 < alpha·x + beta < 1
  kHardSwish,    // y = x·max(0, min(1, x/6 + 1/2)); dy/dx = 0 (x <= -3), 1 (x >= 3), else x/3 + 1/2
};

// y[i] = f(x[i]) for i < n. alpha/beta: the bounds (clip) or slope and offset
// (hardSigmoid); ignored by relu and hardSwish.
void activation_forward(Activation kind, const float* x, size_t n, float* y, double alpha, double beta,
                        ThreadPool* pool, unsigned threads);
// dx[i] = dy[i]·f'(x[i]) (the product is taken even where f' = 0, so a NaN or
// infinite dy gives NaN there, as in the reference).
void activation_backward(Activation kind, const float* x, const float* dy, size_t n, float* dx, double alpha,
                         double beta, ThreadPool* pool, unsigned threads);

// Pooling windows follow im2col's geometry: window (oy, ox) reads rows
// oy·stride_h - pad_top + ky·dilation_h (and likewise columns); positions
// outside the image are skipped. out_h/out_w may make windows run past the
// bottom/right edge (ceil_mode).

// y [batch, C, out_h, out_w] = the window maximum; argmax = its index in x
// (the first maximum in (ky, kx) scan order; the first in-image value is taken
// even when NaN, and a NaN is never replaced). A window with no in-image
// position gives y = -inf and argmax = -1.
void max_pool_forward(const float* x, size_t batch, const ConvGeometry& g, float* y, int32_t* argmax, ThreadPool* pool,
                      unsigned threads);
// dx [dx_len] = 0, then dx[argmax[i]] += dy[i] for i = 0..n-1 in order
// (argmax = -1 is skipped). Returns the first i whose argmax is outside
// [-1, dx_len) without writing anything, else -1. Serial: argmax may point
// anywhere, so there are no planes to split by, and the scatter is memory-bound.
ptrdiff_t max_pool_backward(const float* dy, const int32_t* argmax, size_t n, float* dx, size_t dx_len);

// y = (Σ window values in double) / divisor, divisor = the number of in-image
// positions, or with count_include_pad the number of positions with row <
// height + pad_top and column < width + pad_left (the explicit top/left-sized
// padding, not windows running past it).
void average_pool_forward(const float* x, size_t batch, const ConvGeometry& g, bool count_include_pad, float* y,
                          ThreadPool* pool, unsigned threads);
// dx is overwritten: each window adds dy/divisor (double) to its in-image
// positions, dx = float(dx + d) per add, in (oy, ox, ky, kx) order per plane.
void average_pool_backward(const float* dy, size_t batch, const ConvGeometry& g, bool count_include_pad, float* dx,
                           ThreadPool* pool, unsigned threads);

// Depthwise convolution (one filter per channel, ONNX Conv with group = channels
// and one output channel per group), windows as im2col's; w is [C, kernel_h·kernel_w].
// Taps are summed in float, in (ky, kx) order, starting from 0, without FMA:
// y = Σ w·x over in-image taps. Threads split (image, channel) planes (backward
// weight: channels), so results never depend on the thread count.
void depthwise_conv_forward(const float* x, const float* w, size_t batch, const ConvGeometry& g, float* y, ThreadPool* pool,
                            unsigned threads);
// dx is overwritten: for each tap in (ky, kx) order, then (oy, ox) order, dx += w·dy (float).
void depthwise_conv_backward_input(const float* dy, const float* w, size_t batch, const ConvGeometry& g, float* dx,
                                   ThreadPool* pool, unsigned threads);
// dw [C, kernel_h·kernel_w] is overwritten: Σ over (image, oy, ox) of dy·x, summed in double in that order.
void depthwise_conv_backward_weight(const float* dy, const float* x, size_t batch, const ConvGeometry& g, float* dw,
                                    ThreadPool* pool, unsigned threads);

}  // namespace lowbit
