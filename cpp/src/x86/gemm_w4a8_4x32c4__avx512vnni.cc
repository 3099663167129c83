// AVX-512 VNNI W4A8 microkernel: up to 4 rows × 32 columns (2 × 64 for GEMV
// shapes). Per pair of groups (8 k) and panel: one 64-byte load of nibbles,
// an AND for the even group and a shift + AND for the odd one (unsigned
// nibbles u, see gemm.h), then vpdpbusd per row.
// After each block the int32 sums become P (zero-point terms) and are added
// to float accumulators as float(P) · multiplier, exactly as gemm_int4_reference.
// CENTERED (A zero point 128 for uint8, 0 for int8): A arrives as s = A - aZp in
// int8 and the nibbles are the unsigned operand, so P = Σ s·u - zb·Σ s needs no
// per-column term; with one zero point everywhere (UNIFORM) zb·Σ s is a scalar
// per row. In the GEMV the per-column terms cost as much as the dot products.
#include <immintrin.h>

#include <cstring>

#include "avx512_gemm_common.h"
#include "lowbit/gemm.h"

namespace lowbit {
namespace {

template <int MR, int NV, bool CENTERED, bool UNIFORM>
void tile_w4(const Int4Tile& t) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 y[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) y[r][v] = _mm512_setzero_ps();
  const __m512i za = _mm512_set1_epi32(t.za);
  const __m512 a_scale = _mm512_set1_ps(t.a_scale);
  for (size_t blk = 0; blk < t.blocks; ++blk) {
    const size_t g0 = blk * t.block_groups;
    const size_t g1 = g0 + t.block_groups < t.total_groups ? g0 + t.block_groups : t.total_groups;
    __m512i acc[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_si512();
    for (size_t g = g0; g < g1; g += 2) {  // group counts are even (kp is a multiple of 8)
      __m512i even[NV], odd[NV];
      for (int v = 0; v < NV; ++v) {
        const __m512i raw = _mm512_loadu_si512(t.b + v * t.panel_stride + (g / 2) * 64);
        even[v] = _mm512_and_si512(raw, low4);
        odd[v] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
      }
      for (int r = 0; r < MR; ++r) {
        const __m512i va0 = broadcast_group(t.a + g * t.a_group_stride + r * 4);
        const __m512i va1 = broadcast_group(t.a + (g + 1) * t.a_group_stride + r * 4);
        for (int v = 0; v < NV; ++v) {
          if (CENTERED) {
            acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], even[v], va0);
            acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], odd[v], va1);
          } else {
            acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], va0, even[v]);
            acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], va1, odd[v]);
          }
        }
      }
    }
    const int32_t* row_sums = t.row_sums + blk * t.row_stride;
    __m512i row_term[MR];  // UNIFORM: zb·Σ s per row
    if (CENTERED && UNIFORM) {
      for (int r = 0; r < MR; ++r) row_term[r] = _mm512_set1_epi32(int32_t(uint32_t(t.zb[0]) * uint32_t(row_sums[r])));
    }
    for (int v = 0; v < NV; ++v) {
      const size_t e = v * t.panel_terms + blk * 16;
      const __m512 mult = _mm512_mul_ps(a_scale, _mm512_loadu_ps(t.b_scale + e));
      if (CENTERED) {
        const __m512i zb = UNIFORM ? _mm512_setzero_si512() : _mm512_loadu_si512(t.zb + e);
        for (int r = 0; r < MR; ++r) {
          const __m512i row = UNIFORM ? row_term[r] : _mm512_mullo_epi32(zb, _mm512_set1_epi32(row_sums[r]));
          const __m512i p = _mm512_sub_epi32(acc[r][v], row);
          y[r][v] = _mm512_add_ps(y[r][v], _mm512_mul_ps(_mm512_cvtepi32_ps(p), mult));
        }
        continue;
      }
      const __m512i col_term = _mm512_mullo_epi32(za, _mm512_loadu_si512(t.term_base + e));
      const __m512i zb = _mm512_loadu_si512(t.zb + e);
      for (int r = 0; r < MR; ++r) {
        const __m512i row = _mm512_mullo_epi32(zb, _mm512_set1_epi32(row_sums[r]));
        const __m512i p = _mm512_sub_epi32(_mm512_add_epi32(acc[r][v], col_term), row);
        y[r][v] = _mm512_add_ps(y[r][v], _mm512_mul_ps(_mm512_cvtepi32_ps(p), mult));
      }
    }
  }
  for (int v = 0; v < NV; ++v) {
    const size_t first = size_t(v) * 16;
    if (first >= t.store_cols) break;
    const __mmask16 m = column_mask(first, t.store_cols);
    for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(t.y + r * t.ldy + first, m, y[r][v]);
  }
}

template <int MR, int NV>
void tile_cols(const Int4Tile& t) {
  if (!t.centered) tile_w4<MR, NV, false, false>(t);
  else if (t.uniform_zb) tile_w4<MR, NV, true, true>(t);
  else tile_w4<MR, NV, true, false>(t);
}

template <int MR>
void tile_rows(const Int4Tile& t) {
  if (t.cols > 16) tile_cols<MR, 2>(t);
  else tile_cols<MR, 1>(t);
}

// GEMV-shaped calls (one or two rows): 64 columns per tile, so more
// independent accumulators hide the vpdpbusd latency within short blocks.
void tile_wide(const Int4Tile& t) {
  const size_t nv = (t.cols + 15) / 16;
  if (t.rows == 1) {
    switch (nv) {
      case 1: tile_cols<1, 1>(t); break;
      case 2: tile_cols<1, 2>(t); break;
      case 3: tile_cols<1, 3>(t); break;
      default: tile_cols<1, 4>(t); break;
    }
  } else {
    switch (nv) {
      case 1: tile_cols<2, 1>(t); break;
      case 2: tile_cols<2, 2>(t); break;
      case 3: tile_cols<2, 3>(t); break;
      default: tile_cols<2, 4>(t); break;
    }
  }
}

void tile(const Int4Tile& t) {
  switch (t.rows) {
    case 1: tile_rows<1>(t); break;
    case 2: tile_rows<2>(t); break;
    case 3: tile_rows<3>(t); break;
    default: tile_rows<4>(t); break;
  }
}

const Int4Kernel kKernel = {"avx512vnni", 4, 32, tile};
const Int4Kernel kWide = {"avx512vnni", 2, 64, tile_wide};

}  // namespace

const Int4Kernel* int4_kernel_avx512vnni(size_t m) { return m <= 2 ? &kWide : &kKernel; }

}  // namespace lowbit
