// AVX2 + FMA SGEMM micro-kernel: 6 rows × 16 columns (12 ymm accumulators,
// 2 for B, 1 broadcast), over a packed K block. Rows and the 8-column half are
// template parameters so edge tiles do no wasted FMAs; column tails are
// loaded and stored with masks.
#include <immintrin.h>

#include <cstdint>

#include "lowbit/sgemm.h"

namespace lowbit {
namespace {

constexpr size_t kMr = 6, kNr = 16;

alignas(32) const int32_t kMaskTable[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

inline __m256i cols_mask(size_t cols) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMaskTable + 8 - (cols >= 8 ? 8 : cols)));
}

template <int R, int V>
void tile_rv(const SgemmTile& t) {
  __m256 acc[R][V];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) acc[r][v] = _mm256_setzero_ps();
  const float* a = t.a;
  const float* b = t.b;
  for (size_t p = 0; p < t.kc; ++p, a += kMr, b += kNr) {
    __m256 bv[V];
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) bv[v] = _mm256_load_ps(b + 8 * v);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r);
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  const bool full = t.cols == size_t(8 * V);
  const __m256i m0 = cols_mask(t.cols), m1 = cols_mask(t.cols > 8 ? t.cols - 8 : 0);
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    float* c = t.c + r * t.ldc;
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) {
      __m256 out = acc[r][v];
      if (full) {
        if (t.add) out = _mm256_add_ps(_mm256_loadu_ps(c + 8 * v), out);
        _mm256_storeu_ps(c + 8 * v, out);
      } else {
        const __m256i mk = v == 0 ? m0 : m1;
        if (t.add) out = _mm256_add_ps(_mm256_maskload_ps(c + 8 * v, mk), out);
        _mm256_maskstore_ps(c + 8 * v, mk, out);
      }
    }
  }
}

template <int V>
void tile_v(const SgemmTile& t) {
  switch (t.rows) {
    case 1: return tile_rv<1, V>(t);
    case 2: return tile_rv<2, V>(t);
    case 3: return tile_rv<3, V>(t);
    case 4: return tile_rv<4, V>(t);
    case 5: return tile_rv<5, V>(t);
    default: return tile_rv<6, V>(t);
  }
}

void tile(const SgemmTile& t) {
  if (t.cols > 8) tile_v<2>(t);
  else tile_v<1>(t);
}

}  // namespace

const SgemmKernel* sgemm_kernel_avx2() {
  static const SgemmKernel k{"avx2", kMr, kNr, tile};
  return &k;
}

}  // namespace lowbit
