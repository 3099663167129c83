// AVX2 GEMM microkernel, exact: no vpmaddubsw (its 16-bit saturation changes
// results for full-range u8 × s8). B bytes are widened to 16 bits and
// multiplied with vpmaddwd (s16 × s16 → s32 pair sums, at most 2·255·128).
// One group of 4 k × 4 columns is 16 bytes → 16 s16 → vpmaddwd against
// (a0, a1, a2, a3) repeated → 8 s32 lanes holding two partial sums per
// column; the pairs are added at the end. Tile: up to 2 rows × 16 columns.
#include <immintrin.h>

#include <cstring>

#include "lowbit/gemm.h"

namespace lowbit {
namespace {

inline __m256i broadcast_quad(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  const __m128i words = _mm_cvtepu8_epi16(_mm_cvtsi32_si128(v));  // a0..a3 as s16
  return _mm256_broadcastq_epi64(words);
}

// Pair sums of two accumulators (columns c..c+3 and c+4..c+7) → 8 column sums.
inline __m256i fold_pairs(__m256i lo, __m256i hi) {
  return _mm256_permute4x64_epi64(_mm256_hadd_epi32(lo, hi), 0xD8);
}

template <int MR>
void tile_rows(const GemmTile& t) {
  __m256i acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < 4; ++q) acc[r][q] = _mm256_setzero_si256();
  const size_t groups = t.kp / 4;
  for (size_t g = 0; g < groups; ++g) {
    __m256i va[MR];
    for (int r = 0; r < MR; ++r) va[r] = broadcast_quad(t.a + g * t.a_group_stride + r * 4);
    for (int q = 0; q < 4; ++q) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(t.b + g * 64 + q * 16));
      const __m256i b16 = _mm256_cvtepi8_epi16(bytes);
      for (int r = 0; r < MR; ++r) acc[r][q] = _mm256_add_epi32(acc[r][q], _mm256_madd_epi16(b16, va[r]));
    }
  }
  alignas(32) int32_t out[16];
  for (int r = 0; r < MR; ++r) {
    const __m256i row = _mm256_set1_epi32(t.row_sums[r]);
    for (int v = 0; v < 2; ++v) {
      const __m256i sums = fold_pairs(acc[r][2 * v], acc[r][2 * v + 1]);
      const __m256i zb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.zb + v * 8));
      const __m256i ct = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.col_term + v * 8));
      _mm256_store_si256(reinterpret_cast<__m256i*>(out + v * 8),
                         _mm256_sub_epi32(_mm256_add_epi32(sums, ct), _mm256_mullo_epi32(zb, row)));
    }
    std::memcpy(t.c + r * t.ldc, out, t.store_cols * sizeof(int32_t));
  }
}

void tile(const GemmTile& t) {
  if (t.rows == 1) tile_rows<1>(t);
  else tile_rows<2>(t);
}

const GemmKernel kKernel = {"avx2", 2, 16, tile};

}  // namespace

const GemmKernel* gemm_kernel_avx2() { return &kKernel; }

}  // namespace lowbit
