// AVX-512 VNNI W4A8 microkernel: up to 4 rows × 32 columns. Per group of 4 k
// and panel: one 32-byte load of nibbles, AND / shift into the 64-byte int8
// group layout (sign-extended for int4 by (v ^ 8) - 8), then vpdpbusd per row.
// After each block the int32 sums become P (zero-point terms) and are added
// to float accumulators as float(P) · multiplier, exactly as gemm_int4_reference.
#include <immintrin.h>

#include <cstring>

#include "lowbit/gemm.h"

namespace lowbit {
namespace {

inline __m512i broadcast_group(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

template <bool kSigned>
inline __m512i unpack_group(const uint8_t* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(raw, low4);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
  __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  if (kSigned) {
    const __m512i eight = _mm512_set1_epi8(8);
    v = _mm512_sub_epi8(_mm512_xor_si512(v, eight), eight);
  }
  return v;
}

template <int MR, int NV, bool kSigned>
void tile_w4(const Int4Tile& t) {
  __m512 y[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) y[r][v] = _mm512_setzero_ps();
  for (size_t blk = 0; blk < t.blocks; ++blk) {
    const size_t g0 = blk * t.block_groups;
    const size_t g1 = g0 + t.block_groups < t.total_groups ? g0 + t.block_groups : t.total_groups;
    __m512i acc[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_si512();
    for (size_t g = g0; g < g1; ++g) {
      __m512i vb[NV];
      for (int v = 0; v < NV; ++v) vb[v] = unpack_group<kSigned>(t.b + v * t.panel_stride + g * 32);
      for (int r = 0; r < MR; ++r) {
        const __m512i va = broadcast_group(t.a + g * t.a_group_stride + r * 4);
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], va, vb[v]);
      }
    }
    const size_t e = blk * t.term_stride;
    for (int v = 0; v < NV; ++v) {
      const __m512i col_term = _mm512_loadu_si512(t.col_term + e + v * 16);
      const __m512i zb = _mm512_loadu_si512(t.zb + e + v * 16);
      const __m512 mult = _mm512_loadu_ps(t.multiplier + e + v * 16);
      for (int r = 0; r < MR; ++r) {
        const __m512i row = _mm512_mullo_epi32(zb, _mm512_set1_epi32(t.row_sums[blk * t.row_stride + r]));
        const __m512i p = _mm512_sub_epi32(_mm512_add_epi32(acc[r][v], col_term), row);
        y[r][v] = _mm512_add_ps(y[r][v], _mm512_mul_ps(_mm512_cvtepi32_ps(p), mult));
      }
    }
  }
  for (int v = 0; v < NV; ++v) {
    const size_t first = size_t(v) * 16;
    if (first >= t.store_cols) break;
    const size_t n = t.store_cols - first;
    const __mmask16 m = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
    for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(t.y + r * t.ldy + first, m, y[r][v]);
  }
}

template <int MR>
void tile_rows(const Int4Tile& t) {
  if (t.cols > 16) {
    if (t.b_signed) tile_w4<MR, 2, true>(t);
    else tile_w4<MR, 2, false>(t);
  } else {
    if (t.b_signed) tile_w4<MR, 1, true>(t);
    else tile_w4<MR, 1, false>(t);
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

}  // namespace

const Int4Kernel* int4_kernel_avx512vnni() { return &kKernel; }

}  // namespace lowbit
