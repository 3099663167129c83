// Helpers shared by the AVX-512 GEMM kernels (VNNI, W4A8, AMX epilogue). Only
// included by translation units built with AVX-512 flags; `static inline`
// keeps each copy inside its own unit.
#pragma once

#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace lowbit {

// One 4-byte group of a' broadcast to every 32-bit lane.
static inline __m512i broadcast_group(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// Store mask for the 16 columns starting at `first` when `store_cols` exist.
static inline __mmask16 column_mask(size_t first, size_t store_cols) {
  const size_t n = store_cols - first;
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}

}  // namespace lowbit
