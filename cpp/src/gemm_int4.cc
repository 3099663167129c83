// W4A8 driver: packing int4 weights, per-block zero-point terms, tiling (see gemm.h).
#include <algorithm>
#include <cstring>

#include "lowbit/gemm.h"

namespace lowbit {

namespace {

inline uint32_t u(int32_t v) { return uint32_t(v); }
inline int32_t wrap(uint32_t v) { return int32_t(v); }
inline size_t round_up(size_t v, size_t m) { return (v + m - 1) / m * m; }

// Position of (k, column-in-panel jj) in a nibble panel: byte, and whether the
// value sits in the high nibble (odd groups).
inline void nibble_position(size_t kk, size_t jj, size_t* byte, bool* high) {
  const size_t g = kk / 4;
  *byte = (g / 2) * 64 + jj * 4 + kk % 4;
  *high = g % 2 == 1;
}

inline int32_t value_of(uint8_t byte, bool is_signed) {
  return is_signed ? int32_t(int8_t(byte)) : int32_t(byte);
}

}  // namespace

int64_t pack_b_int4(const uint8_t* values, size_t k, size_t n, bool is_signed, size_t block_size,
                    const float* scale, const int32_t* zero_point, PackedB4* out, ThreadPool* pool,
                    unsigned threads) {
  const int lo = is_signed ? -8 : 0, hi = is_signed ? 7 : 15;
  for (size_t i = 0; i < k * n; ++i) {
    const int v = value_of(values[i], is_signed);
    if (v < lo || v > hi) return int64_t(i);
  }
  out->k = k;
  out->n = n;
  out->kp = round_up(k, 2 * kGroupDepth);
  out->np = round_up(n, kPanelWidth);
  out->block_size = block_size;
  out->blocks = (k + block_size - 1) / block_size;
  out->b_signed = is_signed;
  out->scale.assign(scale, scale + out->blocks * n);
  out->zero_point.assign(zero_point, zero_point + out->blocks * n);
  out->col_sums.assign(out->blocks * out->np, 0);
  out->zb.assign(out->blocks * out->np, 0);
  out->term_base.assign(out->blocks * out->np, 0);
  out->scale_np.assign(out->blocks * out->np, 0.0f);
  out->nibbles.allocate(out->np / kPanelWidth * out->panel_bytes());
  pool->parallel_for(out->np / kPanelWidth, threads, [&](size_t p, unsigned) {
    uint8_t* dst = out->nibbles.data.get() + p * out->panel_bytes();
    std::memset(dst, 0, out->panel_bytes());
    for (size_t jj = 0; jj < kPanelWidth && p * kPanelWidth + jj < n; ++jj) {
      const size_t j = p * kPanelWidth + jj;
      const int32_t offset = is_signed ? 8 : 0;  // u = B + 8 for int4
      for (size_t kk = 0; kk < k; ++kk) {
        const int32_t v = value_of(values[kk * n + j], is_signed) + offset;
        size_t byte;
        bool high;
        nibble_position(kk, jj, &byte, &high);
        dst[byte] |= uint8_t(v << (high ? 4 : 0));
        int32_t& sum = out->col_sums[out->term_index(kk / block_size, j)];
        sum = wrap(u(sum) + u(v));
      }
      for (size_t blk = 0; blk < out->blocks; ++blk) {
        const size_t e = out->term_index(blk, j), len = std::min(block_size, k - blk * block_size);
        out->zb[e] = zero_point[blk * n + j] + offset;
        out->term_base[e] = wrap(u(int32_t(len)) * u(out->zb[e]) - u(out->col_sums[e]));
        out->scale_np[e] = scale[blk * n + j];
      }
    }
  });
  out->uniform_zb = std::all_of(zero_point, zero_point + out->blocks * n, [&](int32_t z) { return z == zero_point[0]; });
  return -1;
}

namespace {

// B[k, j] of a packed int4 matrix.
int32_t unpacked_value(const PackedB4& b, size_t kk, size_t j) {
  size_t byte;
  bool high;
  nibble_position(kk, j % kPanelWidth, &byte, &high);
  const int32_t v = (b.panel(j / kPanelWidth)[byte] >> (high ? 4 : 0)) & 0x0F;
  return b.b_signed ? v - 8 : v;
}

// Unpacks `groups` groups (starting at an even group) of `panels` nibble panels
// into int8 panels (64 bytes a group) of u values.
void unpack_panels(const uint8_t* src, size_t src_panel_stride, size_t panels, size_t groups, int8_t* dst,
                   size_t dst_panel_stride) {
  for (size_t p = 0; p < panels; ++p)
    for (size_t g = 0; g < groups; ++g) {
      const uint8_t* s = src + p * src_panel_stride + (g / 2) * 64;
      int8_t* d = dst + p * dst_panel_stride + g * 64;
      const int shift = g % 2 ? 4 : 0;
      for (size_t q = 0; q < 64; ++q) d[q] = int8_t((s[q] >> shift) & 0x0F);
    }
}

// Any int8 kernel as a W4A8 tile: unpack a block, run the int8 tile into an
// int32 buffer (its epilogue yields P), then accumulate float(P) · multiplier.
void int4_tile_generic(const GemmKernel& kernel, const Int4Tile& t, std::vector<int8_t>& scratch,
                       std::vector<int32_t>& partial) {
  const size_t panels = (t.cols + kPanelWidth - 1) / kPanelWidth;
  scratch.resize(panels * t.block_groups * 64);
  partial.resize(kernel.mr * kernel.nr);
  int32_t col_term[32], zb[32], col_sums[32];
  float multiplier[32];
  for (size_t r = 0; r < t.rows; ++r) std::fill_n(t.y + r * t.ldy, t.store_cols, 0.0f);
  for (size_t blk = 0; blk < t.blocks; ++blk) {
    const size_t g0 = blk * t.block_groups;
    const size_t groups = std::min(t.block_groups, t.total_groups - g0);
    unpack_panels(t.b + g0 * 32, t.panel_stride, panels, groups, scratch.data(), groups * 64);
    GemmTile it;
    it.a = t.a + g0 * t.a_group_stride;
    it.a_group_stride = t.a_group_stride;
    it.rows = t.rows;
    it.b = scratch.data();
    it.panel_stride = groups * 64;
    it.kp = groups * 4;
    it.cols = t.cols;
    it.store_cols = t.store_cols;
    it.c = partial.data();
    it.ldc = kernel.nr;
    for (size_t j = 0; j < t.cols; ++j) {
      const size_t e = (j / kPanelWidth) * t.panel_terms + blk * kPanelWidth + j % kPanelWidth;
      col_term[j] = wrap(u(t.za) * u(t.term_base[e]));
      multiplier[j] = t.a_scale * t.b_scale[e];
      zb[j] = t.zb[e];
      col_sums[j] = t.b_col_sums[e];
    }
    it.col_term = col_term;
    it.zb = zb;
    it.row_sums = t.row_sums + blk * t.row_stride;
    it.b_col_sums = col_sums;
    kernel.tile(it);
    for (size_t r = 0; r < t.rows; ++r)
      for (size_t j = 0; j < t.store_cols; ++j)
        t.y[r * t.ldy + j] = t.y[r * t.ldy + j] + float(partial[r * kernel.nr + j]) * multiplier[j];
  }
}

}  // namespace

#if !LOWBIT_BUILT_X86_GEMM
const Int4Kernel* int4_kernel_avx512vnni(size_t) { return nullptr; }
#endif

const Int4Kernel* int4_kernel_for(const GemmKernel& kernel, size_t m) {
  // AMX machines have AVX-512 VNNI; the W4A8 tiles use it (AMX's A layout differs).
  if (&kernel == gemm_kernel_avx512vnni() || &kernel == gemm_kernel_amx()) return int4_kernel_avx512vnni(m);
  return nullptr;
}

void gemm_int4(const GemmKernel& kernel, const Int4Args& args, const PackedB4& b, ThreadPool* pool,
               unsigned threads) {
  const size_t m = args.m, n = b.n;
  if (m == 0 || n == 0) return;
  if (b.k == 0) {
    std::fill_n(args.y, m * n, 0.0f);
    return;
  }
  const Int4Kernel* fast = int4_kernel_for(kernel, m);
  const size_t mr = fast ? fast->mr : kernel.mr, nr = fast ? fast->nr : kernel.nr;
  const int32_t za = args.a_zero_point + (args.a_signed ? 128 : 0);
  // s = A - aZp fits int8 exactly when za (a' domain) is 128: the fast kernel then
  // needs no column terms (P = Σ s·u - zb·Σ s).
  const bool centered = fast && za == 128;
  PackedA a;
  pack_a(args.a, args.a_signed, m, b.k, b.kp, mr, b.block_size, &a, pool, threads, false, centered);
  const size_t mt = (m + mr - 1) / mr, nt = (n + nr - 1) / nr;
  const unsigned used = pool->threads_for(mt * nt, threads);
  std::vector<std::vector<int8_t>> scratch(used);
  std::vector<std::vector<int32_t>> partial(used);
  std::vector<std::vector<float>> ytile(used, std::vector<float>(mr * nr));
  pool->parallel_for(mt * nt, threads, [&](size_t item, unsigned thread) {
    const size_t ti = item % mt, tj = item / mt;
    const size_t i0 = ti * mr, j0 = tj * nr;
    Int4Tile t;
    t.a = a.block(ti);
    t.a_group_stride = mr * 4;
    t.rows = std::min(mr, m - i0);
    t.b = b.panel(j0 / kPanelWidth);
    t.panel_stride = b.panel_bytes();
    t.cols = std::min(nr, b.np - j0);
    t.store_cols = std::min(nr, n - j0);
    t.block_groups = b.block_size / 4;
    t.blocks = b.blocks;
    t.total_groups = b.kp / 4;
    t.zb = b.zb.data() + b.term_index(0, j0);
    t.term_base = b.term_base.data() + b.term_index(0, j0);
    t.b_scale = b.scale_np.data() + b.term_index(0, j0);
    t.panel_terms = b.panel_terms();
    t.za = za;
    t.centered = centered;
    t.uniform_zb = b.uniform_zb;
    t.a_scale = args.a_scale;
    t.row_sums = a.row_sums.data() + i0;
    t.row_stride = a.row_stride;
    t.b_col_sums = b.col_sums.data() + b.term_index(0, j0);
    t.y = ytile[thread].data();
    t.ldy = nr;
    if (fast) fast->tile(t);
    else int4_tile_generic(kernel, t, scratch[thread], partial[thread]);
    for (size_t r = 0; r < t.rows; ++r)
      std::memcpy(args.y + (i0 + r) * n + j0, t.y + r * nr, t.store_cols * sizeof(float));
  });
}

void gemm_int4_reference(const Int4Args& args, const PackedB4& b, ThreadPool* pool, unsigned threads) {
  auto a_value = [&](size_t i, size_t kk) { return value_of(args.a[i * b.k + kk], args.a_signed); };
  pool->parallel_for(args.m, threads, [&](size_t i, unsigned) {
    for (size_t j = 0; j < b.n; ++j) {
      float y = 0.0f;
      for (size_t blk = 0; blk < b.blocks; ++blk) {
        const int32_t bzp = b.zero_point[blk * b.n + j];
        uint32_t p = 0;
        for (size_t kk = blk * b.block_size; kk < std::min(b.k, (blk + 1) * b.block_size); ++kk)
          p += u(a_value(i, kk) - args.a_zero_point) * u(unpacked_value(b, kk, j) - bzp);
        const float multiplier = args.a_scale * b.scale[blk * b.n + j];
        y = y + float(wrap(p)) * multiplier;
      }
      args.y[i * b.n + j] = y;
    }
  });
}

}  // namespace lowbit
