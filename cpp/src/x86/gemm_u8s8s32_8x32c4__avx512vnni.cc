// AVX-512 VNNI GEMM microkernel: up to 8 rows × 32 columns (2 packed panels)
// per tile. Per group of 4 k: two zmm loads of B (16 columns × 4 bytes each),
// one 32-bit broadcast of a' per row, and vpdpbusd (u8 × s8 → s32, no
// saturation) into 8 × 2 accumulators. Small tiles (GEMV) keep two
// accumulator sets over alternating groups to hide vpdpbusd latency.
#include <immintrin.h>

#include <cstring>

#include "avx512_gemm_common.h"
#include "lowbit/gemm.h"

namespace lowbit {
namespace {

template <int MR, int NV, int KU>
void tile_vnni(const GemmTile& t) {
  __m512i acc[KU][MR][NV];
  for (int u = 0; u < KU; ++u)
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[u][r][v] = _mm512_setzero_si512();
  const int8_t* b0 = t.b;
  const int8_t* b1 = t.b + t.panel_stride;
  const size_t groups = t.kp / 4;
  size_t g = 0;
  for (; g + KU <= groups; g += KU) {
    for (int u = 0; u < KU; ++u) {
      __m512i vb[NV];
      vb[0] = _mm512_loadu_si512(b0 + (g + u) * 64);
      if (NV == 2) vb[NV - 1] = _mm512_loadu_si512(b1 + (g + u) * 64);
      for (int r = 0; r < MR; ++r) {
        const __m512i va = broadcast_group(t.a + (g + u) * t.a_group_stride + r * 4);
        for (int v = 0; v < NV; ++v) acc[u][r][v] = _mm512_dpbusd_epi32(acc[u][r][v], va, vb[v]);
      }
    }
  }
  for (; g < groups; ++g) {
    __m512i vb[NV];
    vb[0] = _mm512_loadu_si512(b0 + g * 64);
    if (NV == 2) vb[NV - 1] = _mm512_loadu_si512(b1 + g * 64);
    for (int r = 0; r < MR; ++r) {
      const __m512i va = broadcast_group(t.a + g * t.a_group_stride + r * 4);
      for (int v = 0; v < NV; ++v) acc[0][r][v] = _mm512_dpbusd_epi32(acc[0][r][v], va, vb[v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const size_t first = size_t(v) * 16;
    if (first >= t.store_cols) break;
    const __mmask16 m = column_mask(first, t.store_cols);
    const __m512i col_term = _mm512_loadu_si512(t.col_term + first);
    const __m512i zb = _mm512_loadu_si512(t.zb + first);
    for (int r = 0; r < MR; ++r) {
      __m512i sum = acc[0][r][v];
      for (int u = 1; u < KU; ++u) sum = _mm512_add_epi32(sum, acc[u][r][v]);
      const __m512i row = _mm512_mullo_epi32(zb, _mm512_set1_epi32(t.row_sums[r]));
      sum = _mm512_sub_epi32(_mm512_add_epi32(sum, col_term), row);
      _mm512_mask_storeu_epi32(t.c + r * t.ldc + first, m, sum);
    }
  }
}

template <int MR>
void tile_rows(const GemmTile& t) {
  constexpr int KU = MR <= 2 ? 2 : 1;
  if (t.cols > 16) tile_vnni<MR, 2, KU>(t);
  else tile_vnni<MR, 1, KU>(t);
}

void tile(const GemmTile& t) {
  switch (t.rows) {
    case 1: tile_rows<1>(t); break;
    case 2: tile_rows<2>(t); break;
    case 3: tile_rows<3>(t); break;
    case 4: tile_rows<4>(t); break;
    case 5: tile_rows<5>(t); break;
    case 6: tile_rows<6>(t); break;
    case 7: tile_rows<7>(t); break;
    default: tile_rows<8>(t); break;
  }
}

const GemmKernel kKernel = {"avx512vnni", 8, 32, tile};

}  // namespace

const GemmKernel* gemm_kernel_avx512vnni() { return &kKernel; }

}  // namespace lowbit
