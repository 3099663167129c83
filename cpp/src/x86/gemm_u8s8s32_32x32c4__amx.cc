// AMX-INT8 GEMM microkernel: a 32 × 32 tile as 2 × 2 tiles of 16 × 16 int32.
// Tile registers: tmm0-3 accumulators C[rows 0-15 | 16-31][cols 0-15 | 16-31],
// tmm4-5 A (16 rows × 64 k bytes, row-major packed A, row stride lda),
// tmm6-7 B (16 group rows × 64 bytes: one packed panel's 64 k, stride 64).
// Per 64 k: 4 loads, 4 tdpbusd (u8 × s8 → s32, no saturation). The epilogue
// (zero-point terms) is AVX-512, as in the AVX-512 VNNI kernel.
//
// This machine kind has no AMX, so this kernel cannot be tested where it was
// written: gemm_kernel_self_test must pass on the running CPU before dispatch
// offers it (CpuFeatures::amx_verified), and the native tests compare it with
// the reference wherever AMX exists.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "avx512_gemm_common.h"
#include "lowbit/gemm.h"

namespace lowbit {
namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "AMX tile configuration is 64 bytes");

void configure() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

void tile(const GemmTile& t) {
  configure();
  const bool two_panels = t.cols > 16;
  const size_t lda = t.a_group_stride;
  const uint8_t* a0 = t.a;
  const uint8_t* a1 = t.a + 16 * lda;
  const int8_t* b0 = t.b;
  const int8_t* b1 = t.b + t.panel_stride;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (size_t k = 0; k < t.kp; k += 64) {
    _tile_loadd(4, a0 + k, lda);
    _tile_loadd(5, a1 + k, lda);
    _tile_loadd(6, b0 + k * 16, 64);  // 64 k = 16 group rows of 64 bytes
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(2, 5, 6);
    if (two_panels) {
      _tile_loadd(7, b1 + k * 16, 64);
      _tile_dpbusd(1, 4, 7);
      _tile_dpbusd(3, 5, 7);
    }
  }
  alignas(64) int32_t c[32 * 32];
  _tile_stored(0, c, 32 * 4);
  _tile_stored(2, c + 16 * 32, 32 * 4);
  if (two_panels) {
    _tile_stored(1, c + 16, 32 * 4);
    _tile_stored(3, c + 16 * 32 + 16, 32 * 4);
  }
  _tile_release();
  for (int v = 0; v < (two_panels ? 2 : 1); ++v) {
    const size_t first = size_t(v) * 16;
    if (first >= t.store_cols) break;
    const __mmask16 m = column_mask(first, t.store_cols);
    const __m512i col_term = _mm512_loadu_si512(t.col_term + first);
    const __m512i zb = _mm512_loadu_si512(t.zb + first);
    for (size_t r = 0; r < t.rows; ++r) {
      const __m512i acc = _mm512_load_si512(c + r * 32 + first);
      const __m512i row = _mm512_mullo_epi32(zb, _mm512_set1_epi32(t.row_sums[r]));
      _mm512_mask_storeu_epi32(t.c + r * t.ldc + first, m, _mm512_sub_epi32(_mm512_add_epi32(acc, col_term), row));
    }
  }
}

const GemmKernel kKernel = {"amx", 32, 32, tile, 64};

}  // namespace

const GemmKernel* gemm_kernel_amx() { return &kKernel; }

}  // namespace lowbit
