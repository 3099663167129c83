// NEON dot-product GEMM microkernel (Armv8.2 DotProd, sdot): up to 4 rows ×
// 16 columns. The 4 rows' bytes of one group are 16 contiguous bytes of packed
// A (lane r = row r), so vdotq_laneq_s32 multiplies a 4-column chunk of B by
// one row's 4 k at a time. sdot is signed × signed: a'' = a' ^ 0x80 = a' - 128,
// and the epilogue adds back 128 · Σ b' per column. 16 accumulators.
#include <arm_neon.h>

#include <cstring>

#include "lowbit/gemm.h"

namespace lowbit {
namespace {

template <int MR>
void tile_rows(const GemmTile& t) {
  int32x4_t acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < 4; ++q) acc[r][q] = vdupq_n_s32(0);
  const size_t groups = t.kp / 4;
  const int8x16_t flip = vdupq_n_s8(int8_t(0x80));
  for (size_t g = 0; g < groups; ++g) {
    int8x16_t b[4];
    for (int q = 0; q < 4; ++q) b[q] = vld1q_s8(t.b + g * 64 + q * 16);
    // Rows 0..3 of this group (the kernel's mr is 4, so 16 bytes are always there).
    const int8x16_t a = veorq_s8(vld1q_s8(reinterpret_cast<const int8_t*>(t.a + g * t.a_group_stride)), flip);
    for (int q = 0; q < 4; ++q) {
      acc[0][q] = vdotq_laneq_s32(acc[0][q], b[q], a, 0);
      if (MR > 1) acc[MR > 1 ? 1 : 0][q] = vdotq_laneq_s32(acc[MR > 1 ? 1 : 0][q], b[q], a, 1);
      if (MR > 2) acc[MR > 2 ? 2 : 0][q] = vdotq_laneq_s32(acc[MR > 2 ? 2 : 0][q], b[q], a, 2);
      if (MR > 3) acc[MR > 3 ? 3 : 0][q] = vdotq_laneq_s32(acc[MR > 3 ? 3 : 0][q], b[q], a, 3);
    }
  }
  int32_t out[16];
  for (int r = 0; r < MR; ++r) {
    const int32x4_t row = vdupq_n_s32(t.row_sums[r]);
    for (int q = 0; q < 4; ++q) {
      const int32x4_t sums = vaddq_s32(acc[r][q], vshlq_n_s32(vld1q_s32(t.b_col_sums + q * 4), 7));
      const int32x4_t zb = vld1q_s32(t.zb + q * 4);
      const int32x4_t ct = vld1q_s32(t.col_term + q * 4);
      vst1q_s32(out + q * 4, vsubq_s32(vaddq_s32(sums, ct), vmulq_s32(zb, row)));
    }
    std::memcpy(t.c + r * t.ldc, out, t.store_cols * sizeof(int32_t));
  }
}

void tile(const GemmTile& t) {
  switch (t.rows) {
    case 1: tile_rows<1>(t); break;
    case 2: tile_rows<2>(t); break;
    case 3: tile_rows<3>(t); break;
    default: tile_rows<4>(t); break;
  }
}

const GemmKernel kKernel = {"neondot", 4, 16, tile};

}  // namespace

const GemmKernel* gemm_kernel_neondot() { return &kKernel; }

}  // namespace lowbit
