// NEON GEMM microkernel (Armv8.0, no dot product): up to 2 rows × 16 columns.
// a'' = a' - 128 (a' ^ 0x80) is a signed byte, so every product a''·b' fits
// in 16 bits: vmull_s8 makes 8 exact s16 products, vpadalq_s16 adds pairs into
// s32 lanes (no saturation anywhere). Per 16-byte chunk of a group (4 columns ×
// 4 k) one accumulator pair holds [c0 k01, c0 k23, c1 k01, c1 k23] and the
// same for c2, c3; vpaddq folds them to one lane per column at the end. The
// epilogue adds back 128 · Σ b' per column.
#include <arm_neon.h>

#include <cstring>

#include "lowbit/gemm.h"

namespace lowbit {
namespace {

inline int8x16_t group_of_row(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return veorq_s8(vreinterpretq_s8_u32(vdupq_n_u32(v)), vdupq_n_s8(int8_t(0x80)));
}

template <int MR>
void tile_rows(const GemmTile& t) {
  int32x4_t acc[MR][8];
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < 8; ++q) acc[r][q] = vdupq_n_s32(0);
  const size_t groups = t.kp / 4;
  for (size_t g = 0; g < groups; ++g) {
    int8x16_t b[4];
    for (int q = 0; q < 4; ++q) b[q] = vld1q_s8(t.b + g * 64 + q * 16);
    for (int r = 0; r < MR; ++r) {
      const int8x16_t a = group_of_row(t.a + g * t.a_group_stride + r * 4);
      for (int q = 0; q < 4; ++q) {
        acc[r][2 * q] = vpadalq_s16(acc[r][2 * q], vmull_s8(vget_low_s8(b[q]), vget_low_s8(a)));
        acc[r][2 * q + 1] = vpadalq_s16(acc[r][2 * q + 1], vmull_high_s8(b[q], a));
      }
    }
  }
  int32_t out[16];
  for (int r = 0; r < MR; ++r) {
    const int32x4_t row = vdupq_n_s32(t.row_sums[r]);
    for (int q = 0; q < 4; ++q) {
      // [c0 k01, c0 k23, c1 k01, c1 k23] + [c2 ..., c3 ...] -> [c0, c1, c2, c3]
      int32x4_t sums = vpaddq_s32(acc[r][2 * q], acc[r][2 * q + 1]);
      const int32x4_t col_sums = vld1q_s32(t.b_col_sums + q * 4);
      sums = vaddq_s32(sums, vshlq_n_s32(col_sums, 7));  // a' = a'' + 128
      const int32x4_t zb = vld1q_s32(t.zb + q * 4);
      const int32x4_t ct = vld1q_s32(t.col_term + q * 4);
      vst1q_s32(out + q * 4, vsubq_s32(vaddq_s32(sums, ct), vmulq_s32(zb, row)));
    }
    std::memcpy(t.c + r * t.ldc, out, t.store_cols * sizeof(int32_t));
  }
}

void tile(const GemmTile& t) {
  if (t.rows == 1) tile_rows<1>(t);
  else tile_rows<2>(t);
}

const GemmKernel kKernel = {"neon", 2, 16, tile};

}  // namespace

const GemmKernel* gemm_kernel_neon() { return &kKernel; }

}  // namespace lowbit
