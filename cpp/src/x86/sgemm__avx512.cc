// AVX-512 SGEMM micro-kernel: 8 rows × 32 columns (16 zmm accumulators), one
// FMA per row and 16 columns per k, over a packed K block. Rows and the
// 16-column half are template parameters so edge tiles do no wasted FMAs;
// column tails are stored with masks.
#include <immintrin.h>

#include "lowbit/sgemm.h"

namespace lowbit {
namespace {

constexpr size_t kMr = 8, kNr = 32;

inline __mmask16 cols_mask(size_t cols) { return cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1u); }

template <int R, int V>
void tile_rv(const SgemmTile& t) {
  __m512 acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  const float* a = t.a;
  const float* b = t.b;
  for (size_t p = 0; p < t.kc; ++p, a += kMr, b += kNr) {
    __m512 bv[V];
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) bv[v] = _mm512_load_ps(b + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r]);
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  const __mmask16 m0 = cols_mask(t.cols), m1 = t.cols > 16 ? cols_mask(t.cols - 16) : 0;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* c = t.c + r * t.ldc;
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) {
      const __mmask16 mk = v == 0 ? m0 : m1;
      __m512 out = acc[r][v];
      if (t.add) out = _mm512_add_ps(_mm512_maskz_loadu_ps(mk, c + 16 * v), out);
      _mm512_mask_storeu_ps(c + 16 * v, mk, out);
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
    case 6: return tile_rv<6, V>(t);
    case 7: return tile_rv<7, V>(t);
    default: return tile_rv<8, V>(t);
  }
}

void tile(const SgemmTile& t) {
  if (t.cols > 16) tile_v<2>(t);
  else tile_v<1>(t);
}

}  // namespace

const SgemmKernel* sgemm_kernel_avx512() {
  static const SgemmKernel k{"avx512", kMr, kNr, tile};
  return &k;
}

}  // namespace lowbit
