// float32 kernels for the CPU training engine (ts/train/kernels.ts):
//   sgemm                    C[m, n] = op(A)·op(B) (+ C), row-major
//   im2col / col2im          NCHW convolution lowering and its adjoint
//   batch_norm_forward/backward   training-mode BatchNormalization
//
// SGEMM paths: "scalar" is the reference (each C element summed over k in
// order in float, then added to C when accumulating); the SIMD paths pack
// op(A) into mr-row panels and op(B) into nr-column panels per K block of
// kSgemmKc, and an FMA micro-kernel sums each K block in order. Every C
// element is computed by exactly one thread in an order that depends only on
// the shape, so results are bit-identical for any thread count.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "lowbit/cpu_features.h"
#include "lowbit/thread_pool.h"

namespace lowbit {

constexpr size_t kSgemmKc = 256;  // K block of the SIMD paths (fixes their summation order)

struct SgemmArgs {
  bool trans_a = false;  // A is [k, m] (lda = m) instead of [m, k] (lda = k)
  bool trans_b = false;  // B is [n, k] (ldb = k) instead of [k, n] (ldb = n)
  size_t m = 0, n = 0, k = 0;
  const float* a = nullptr;
  const float* b = nullptr;
  float* c = nullptr;      // [m, n]
  bool accumulate = false; // C += op(A)·op(B)
};

// One micro-kernel call: rows × cols of C from a packed A panel and a packed
// B panel over kc. add: C += acc, else C = acc.
struct SgemmTile {
  const float* a;  // a[p * mr + i], i < rows (rows past `rows` are zero)
  const float* b;  // b[p * nr + j], j < nr (columns past `cols` are zero)
  size_t kc;       // >= 1
  size_t rows;     // 1..mr
  size_t cols;     // 1..nr
  float* c;
  size_t ldc;
  bool add;
};

struct SgemmKernel {
  const char* name;
  size_t mr, nr;                         // tile shape (0 for the reference)
  void (*tile)(const SgemmTile& t);      // null: the scalar reference
};

const SgemmKernel* sgemm_kernel_scalar();
const SgemmKernel* sgemm_kernel_avx2();    // null when not built
const SgemmKernel* sgemm_kernel_avx512();  // null when not built

// Names of the SGEMM kernels usable on this CPU, best first (ends with "scalar").
std::vector<std::string> available_sgemm_kernels(const CpuFeatures& cpu);
// The kernel for `name` ("" = best), or null when unknown / unusable here.
const SgemmKernel* find_sgemm_kernel(const std::string& name, const CpuFeatures& cpu);

// threads: 0 = all of the pool's threads.
void sgemm(const SgemmKernel& kernel, const SgemmArgs& args, ThreadPool* pool, unsigned threads);
void sgemm_reference(const SgemmArgs& args, ThreadPool* pool, unsigned threads);

struct ConvGeometry {
  size_t channels = 0, height = 0, width = 0;
  size_t kernel_h = 1, kernel_w = 1;
  size_t pad_top = 0, pad_left = 0;  // bottom/right follow from out_h/out_w
  size_t stride_h = 1, stride_w = 1;   // >= 1
  size_t dilation_h = 1, dilation_w = 1;  // >= 1
  size_t out_h = 0, out_w = 0;
  size_t col_rows() const { return channels * kernel_h * kernel_w; }
  size_t col_cols() const { return out_h * out_w; }
};

// x [batch, C, H, W] -> col [batch, C·kh·kw, outH·outW]; padding reads as 0.
void im2col(const float* x, size_t batch, const ConvGeometry& g, float* col, ThreadPool* pool, unsigned threads);
// The adjoint: dx [batch, C, H, W] is overwritten with the sum of col's entries
// (each plane summed by one thread in (ky, kx, oy, ox) order).
void col2im(const float* col, size_t batch, const ConvGeometry& g, float* dx, ThreadPool* pool, unsigned threads);

// x, y: [batch, channels, spatial]. Per channel: mean and biased variance
// (accumulated in double, two passes), invStd = 1/sqrt(var + eps),
// y = gamma·(x - mean)·invStd + beta with the float mean and invStd.
void batch_norm_forward(const float* x, size_t batch, size_t channels, size_t spatial, const float* gamma,
                        const float* beta, float epsilon, float* y, float* mean, float* variance, float* inv_std,
                        ThreadPool* pool, unsigned threads);
// dx = gamma·invStd/M·(M·dy - Σdy - x̂·Σdy·x̂), dGamma = Σdy·x̂, dBeta = Σdy
// (M = batch·spatial; x̂ = (x - mean)·invStd in float; sums in double).
void batch_norm_backward(const float* x, const float* dy, size_t batch, size_t channels, size_t spatial,
                         const float* gamma, const float* mean, const float* inv_std, float* dx, float* d_gamma,
                         float* d_beta, ThreadPool* pool, unsigned threads);

}  // namespace lowbit
