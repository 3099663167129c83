// Scalar SGEMM reference: C[i, j] = (accumulate ? C[i, j] : 0) + Σ_p A(i, p)·B(p, j)
// where the sum starts at 0 and adds each product in p order, in float. The
// loop order follows the memory layout, but the result is exactly that of the
// naive triple loop (products and sums rounded one at a time, no FMA).
#include <algorithm>

#include "lowbit/sgemm.h"

namespace lowbit {

namespace {

constexpr size_t kColumnChunk = 1024;  // columns of one C row per work item

}  // namespace

void sgemm_reference(const SgemmArgs& g, ThreadPool* pool, unsigned threads) {
  const size_t m = g.m, n = g.n, k = g.k;
  if (m == 0 || n == 0) return;
  const size_t chunks = (n + kColumnChunk - 1) / kColumnChunk;
  pool->parallel_for(m * chunks, threads, [&](size_t item, unsigned) {
    const size_t i = item / chunks;
    const size_t j0 = (item % chunks) * kColumnChunk, j1 = std::min(n, j0 + kColumnChunk);
    const size_t width = j1 - j0;
    float acc[kColumnChunk];
    auto a_at = [&](size_t p) { return g.trans_a ? g.a[p * m + i] : g.a[i * k + p]; };
    if (!g.trans_b) {
      // Row p of B is contiguous: add a_ip·B[p, j0:j1] to the row sums.
      std::fill_n(acc, width, 0.0f);
      for (size_t p = 0; p < k; ++p) {
        const float ap = a_at(p);
        const float* brow = g.b + p * n + j0;
        for (size_t j = 0; j < width; ++j) acc[j] += ap * brow[j];
      }
    } else {
      // Column j of op(B) is row j of B: dot products, 8 columns at a time so
      // the 8 independent sums overlap (each still adds in p order).
      for (size_t j = 0; j < width; j += 8) {
        const size_t cols = std::min<size_t>(8, width - j);
        const float* bcol = g.b + (j0 + j) * k;
        float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (size_t p = 0; p < k; ++p) {
          const float ap = a_at(p);
          for (size_t c = 0; c < cols; ++c) s[c] += ap * bcol[c * k + p];
        }
        std::copy_n(s, cols, acc + j);
      }
    }
    float* c = g.c + i * n + j0;
    if (g.accumulate)
      for (size_t j = 0; j < width; ++j) c[j] += acc[j];
    else
      std::copy_n(acc, width, c);
  });
}

const SgemmKernel* sgemm_kernel_scalar() {
  static const SgemmKernel k{"scalar", 0, 0, nullptr};
  return &k;
}

}  // namespace lowbit
