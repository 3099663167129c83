// GEMM driver: packing, zero-point algebra, tiling and threading (see gemm.h).
#include "lowbit/gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

namespace lowbit {

void AlignedBytes::Free::operator()(void* p) const { std::free(p); }

void AlignedBytes::allocate(size_t bytes) {
  const size_t rounded = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
  if (!p) throw std::runtime_error("out of memory: could not allocate " + std::to_string(bytes) + " bytes for packed operands");
  data.reset(static_cast<uint8_t*>(p));
  size = bytes;
}

namespace {

inline size_t round_up(size_t v, size_t m) { return (v + m - 1) / m * m; }

// Bytes after the last B panel that kernels reading whole 64-k tiles may touch.
constexpr size_t kPackedBSlack = 16 * 64;

// Integer arithmetic modulo 2^32, as the reference computes it.
inline int32_t wrap(uint32_t v) { return int32_t(v); }
inline uint32_t u(int32_t v) { return uint32_t(v); }

}  // namespace

void pack_b(const uint8_t* b, size_t k, size_t n, bool b_signed, PackedB* out, ThreadPool* pool,
            unsigned threads) {
  out->k = k;
  out->n = n;
  out->kp = round_up(k, kGroupDepth);
  out->np = round_up(n, kPanelWidth);
  out->b_signed = b_signed;
  out->bytes.allocate(out->kp * out->np + kPackedBSlack);
  std::memset(out->bytes.data.get() + out->kp * out->np, 0, kPackedBSlack);  // read (times zero) by whole-tile kernels
  out->col_sums.assign(out->np, 0);
  const uint8_t flip = b_signed ? 0x00 : 0x80;  // b' = B - 128 for uint8 B
  const size_t panels = out->np / kPanelWidth;
  pool->parallel_for(panels, threads, [&](size_t p, unsigned) {
    int8_t* dst = reinterpret_cast<int8_t*>(out->bytes.data.get()) + p * out->kp * kPanelWidth;
    std::memset(dst, 0, out->kp * kPanelWidth);
    const size_t j0 = p * kPanelWidth;
    const size_t width = std::min(kPanelWidth, n - j0);
    uint32_t sums[kPanelWidth] = {};
    // Row by row, so B is read contiguously (16 bytes of each row per panel).
    for (size_t kk = 0; kk < k; ++kk) {
      const uint8_t* src = b + kk * n + j0;
      int8_t* group = dst + (kk / 4) * 64 + kk % 4;
      for (size_t jj = 0; jj < width; ++jj) {
        const int8_t v = int8_t(src[jj] ^ flip);
        group[jj * 4] = v;
        sums[jj] += u(v);
      }
    }
    for (size_t jj = 0; jj < width; ++jj) out->col_sums[j0 + jj] = wrap(sums[jj]);
  });
}

namespace {

void tile_portable(const GemmTile& t) {
  for (size_t r = 0; r < t.rows; ++r) {
    for (size_t j = 0; j < t.store_cols; ++j) {
      const int8_t* panel = t.b + (j / kPanelWidth) * t.panel_stride;
      uint32_t acc = 0;
      for (size_t g = 0; g < t.kp / 4; ++g)
        for (size_t q = 0; q < 4; ++q)
          acc += u(int32_t(t.a[g * t.a_group_stride + r * 4 + q]) * int32_t(panel[g * 64 + (j % kPanelWidth) * 4 + q]));
      t.c[r * t.ldc + j] = wrap(acc + u(t.col_term[j]) - u(t.zb[j]) * u(t.row_sums[r]));
    }
  }
}

const GemmKernel kPortable = {"portable", 4, 16, tile_portable};

}  // namespace

const GemmKernel* gemm_kernel_portable() { return &kPortable; }

#if !LOWBIT_BUILT_AMX
const GemmKernel* gemm_kernel_amx() { return nullptr; }
#endif

bool gemm_kernel_self_test(const GemmKernel& kernel, ThreadPool* pool) {
  uint64_t state = 0x9E3779B97F4A7C15ull;
  auto next = [&] {
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return uint8_t((state * 2685821657736338717ull) >> 56);
  };
  const size_t shapes[][3] = {{1, 1, 1}, {3, 70, 17}, {33, 130, 40}, {40, 64, 33}, {17, 300, 70}};
  for (const auto& s : shapes)
    for (int types = 0; types < 4; ++types) {
      const size_t m = s[0], k = s[1], n = s[2];
      std::vector<uint8_t> a(m * k), b(k * n);
      for (auto& v : a) v = next();
      for (auto& v : b) v = next();
      const bool as = types & 1, bs = types & 2;
      std::vector<int32_t> zb(n);
      for (auto& z : zb) z = bs ? int8_t(next()) : next();
      const int32_t za = as ? int8_t(next()) : next();
      std::vector<int32_t> want(m * n), got(m * n);
      GemmArgs args{a.data(), as, m, k, n, za, zb.data(), true, want.data()};
      gemm_reference(args, b.data(), bs, pool, 1);
      PackedB packed;
      pack_b(b.data(), k, n, bs, &packed, pool, 1);
      args.c = got.data();
      gemm_packed(kernel, args, packed, pool, 1);
      if (want != got) return false;
    }
  return true;
}

#if !LOWBIT_BUILT_ARM_GEMM
const GemmKernel* gemm_kernel_neon() { return nullptr; }
const GemmKernel* gemm_kernel_neondot() { return nullptr; }
#endif

#if !LOWBIT_BUILT_X86_GEMM
const GemmKernel* gemm_kernel_avx2() { return nullptr; }
const GemmKernel* gemm_kernel_avx512vnni() { return nullptr; }
const GemmKernel* gemm_kernel_avxvnni_as_evex() { return nullptr; }
#endif
#if !LOWBIT_BUILT_AVXVNNI
const GemmKernel* gemm_kernel_avxvnni() { return nullptr; }
#endif

namespace {

struct GemmCandidate {
  const GemmKernel* kernel;
  bool supported;
};

std::vector<GemmCandidate> gemm_candidates(const CpuFeatures& cpu) {
  return {
      // AVX-512 VNNI too: the W4A8 path of AMX machines runs the VNNI kernel (int4_kernel_for).
      {gemm_kernel_amx(), cpu.amx_int8 && cpu.amx_permitted && cpu.amx_verified && cpu.has_avx512_core() && cpu.avx512vnni},
      {gemm_kernel_avx512vnni(), cpu.has_avx512_core() && cpu.avx512vnni},
      {gemm_kernel_avxvnni(), cpu.avx2 && cpu.avxvnni},
      {gemm_kernel_avx2(), cpu.avx2},
      {gemm_kernel_neondot(), cpu.neon_dotprod},
      {gemm_kernel_neon(), cpu.neon},
      {gemm_kernel_portable(), true},
  };
}

}  // namespace

std::vector<std::string> available_gemm_kernels(const CpuFeatures& cpu) {
  std::vector<std::string> names;
  for (const auto& c : gemm_candidates(cpu))
    if (c.kernel && c.supported) names.emplace_back(c.kernel->name);
  names.emplace_back("scalar");
  return names;
}

const GemmKernel* find_gemm_kernel(const std::string& name, const CpuFeatures& cpu, bool* usable) {
  *usable = true;
  if (name == "scalar") return nullptr;
  for (const auto& c : gemm_candidates(cpu)) {
    if (!c.kernel || !c.supported) continue;
    if (name.empty() || name == c.kernel->name) return c.kernel;
  }
  *usable = false;
  return nullptr;
}

namespace {

// Σ of the packed bytes (src[i] ^ flip) over n bytes, read as uint8 or as int8,
// modulo 2^32 like the kernels' int32 sums. Separate from the copy so both loops
// vectorise. (x ^ 0x80) is int8(x) + 128 as uint8 and uint8(x) - 128 as int8.
uint32_t packed_sum(const uint8_t* src, size_t n, uint8_t flip, bool as_int8) {
  uint32_t sum = 0;
  const bool source_as_int8 = (flip != 0) != as_int8;
  if (source_as_int8) {
    const int8_t* s = reinterpret_cast<const int8_t*>(src);
    for (size_t i = 0; i < n; ++i) sum += uint32_t(int32_t(s[i]));
  } else {
    for (size_t i = 0; i < n; ++i) sum += src[i];
  }
  if (flip == 0) return sum;
  return as_int8 ? sum - uint32_t(128) * uint32_t(n) : sum + uint32_t(128) * uint32_t(n);
}

using Words4 = uint32_t __attribute__((vector_size(16)));

// out[q] = {in[0][q], in[1][q], in[2][q], in[3][q]}.
inline void transpose4(const Words4 in[4], Words4 out[4]) {
#if defined(__clang__)
#define LOWBIT_SHUFFLE(a, b, i0, i1, i2, i3) __builtin_shufflevector(a, b, i0, i1, i2, i3)
#else
#define LOWBIT_SHUFFLE(a, b, i0, i1, i2, i3) __builtin_shuffle(a, b, Words4{i0, i1, i2, i3})
#endif
  const Words4 t0 = LOWBIT_SHUFFLE(in[0], in[1], 0, 4, 1, 5), t1 = LOWBIT_SHUFFLE(in[0], in[1], 2, 6, 3, 7);
  const Words4 t2 = LOWBIT_SHUFFLE(in[2], in[3], 0, 4, 1, 5), t3 = LOWBIT_SHUFFLE(in[2], in[3], 2, 6, 3, 7);
  out[0] = LOWBIT_SHUFFLE(t0, t2, 0, 1, 4, 5);
  out[1] = LOWBIT_SHUFFLE(t0, t2, 2, 3, 6, 7);
  out[2] = LOWBIT_SHUFFLE(t1, t3, 0, 1, 4, 5);
  out[3] = LOWBIT_SHUFFLE(t1, t3, 2, 3, 6, 7);
#undef LOWBIT_SHUFFLE
}

}  // namespace

void pack_a(const uint8_t* a, bool a_signed, size_t m, size_t k, size_t kp, size_t mr, size_t block_size,
            PackedA* out, ThreadPool* pool, unsigned threads, bool row_major, bool centered) {
  // a' = A + 128 for int8 A (uint8 bytes); centered: s = A - 128 for uint8 A (int8 bytes).
  const uint8_t flip = a_signed != centered ? 0x80 : 0x00;
  const uint32_t flip4 = flip * 0x01010101u;
  const size_t row_blocks = (m + mr - 1) / mr;
  const size_t sum_blocks = block_size == 0 ? 1 : (k + block_size - 1) / block_size;
  // Blocks are multiples of 4 k, so whole groups never straddle two blocks.
  const size_t span = block_size == 0 ? std::max<size_t>(k, 1) : block_size;
  out->mr = mr;
  out->kp = kp;
  out->row_stride = row_blocks * mr;
  out->bytes.allocate(row_blocks * mr * kp);
  out->row_sums.assign(std::max<size_t>(sum_blocks, 1) * out->row_stride, 0);
  // By value: the byte stores below may alias anything reached by reference.
  uint8_t* const bytes = out->bytes.data.get();
  int32_t* const row_sums = out->row_sums.data();
  const size_t row_stride = out->row_stride;
  pool->parallel_for(row_blocks, threads, [=](size_t rb, unsigned) {
    uint8_t* dst = bytes + rb * mr * kp;
    const size_t rows = std::min(mr, m - rb * mr);
    // Padding rows and the bytes past k must be zero; full blocks are overwritten.
    if (rows < mr || kp != k) std::memset(dst, 0, mr * kp);
    const uint8_t* first = a + rb * mr * k;
    for (size_t r = 0; r < rows; ++r) {
      const size_t i = rb * mr + r;
      const uint8_t* src = first + r * k;
      for (size_t k0 = 0, blk = 0; k0 < k; k0 += span, ++blk) {
        row_sums[blk * row_stride + i] = wrap(packed_sum(src + k0, std::min(k, k0 + span) - k0, flip, centered));
      }
      if (row_major) {
        uint8_t* row = dst + r * kp;
        for (size_t kk = 0; kk < k; ++kk) row[kk] = uint8_t(src[kk] ^ flip);
      }
    }
    if (row_major) return;
    // Interleaved: group g of row r at g·mr·4 + r·4; written group by group so the
    // stores are sequential.
    const size_t groups = k / 4, group_stride = mr * 4;
    size_t g = 0;
    // Four groups of four rows at a time: a 4×4 transpose of 32-bit words.
    const size_t rows4 = rows / 4 * 4;
    const Words4 flips = {flip4, flip4, flip4, flip4};
    for (; g + 4 <= groups; g += 4) {
      uint8_t* to = dst + g * group_stride;
      for (size_t r = 0; r < rows4; r += 4) {
        Words4 in[4], outw[4];
        for (int q = 0; q < 4; ++q) {
          std::memcpy(&in[q], first + (r + q) * k + 4 * g, 16);
          in[q] ^= flips;
        }
        transpose4(in, outw);
        for (int q = 0; q < 4; ++q) std::memcpy(to + q * group_stride + r * 4, &outw[q], 16);
      }
      for (size_t r = rows4; r < rows; ++r) {
        uint32_t w[4];
        std::memcpy(w, first + r * k + 4 * g, 16);
        for (int q = 0; q < 4; ++q) {
          w[q] ^= flip4;
          std::memcpy(to + q * group_stride + r * 4, &w[q], 4);
        }
      }
    }
    for (; g < groups; ++g) {
      uint8_t* to = dst + g * group_stride;
      for (size_t r = 0; r < rows; ++r) {
        uint32_t w;
        std::memcpy(&w, first + r * k + 4 * g, 4);
        w ^= flip4;
        std::memcpy(to + r * 4, &w, 4);
      }
    }
    for (size_t r = 0; r < rows; ++r) {
      for (size_t kk = groups * 4; kk < k; ++kk) dst[groups * group_stride + r * 4 + kk % 4] = uint8_t(first[r * k + kk] ^ flip);
    }
  });
}

void gemm_packed(const GemmKernel& kernel, const GemmArgs& args, const PackedB& b, ThreadPool* pool,
                 unsigned threads) {
  const size_t m = args.m, k = args.k, n = args.n, kp = b.kp;
  if (m == 0 || n == 0) return;
  // a' = A + ca; zero points in the a'/b' domain.
  const int32_t za = args.a_zero_point + (args.a_signed ? 128 : 0);
  const int32_t cb = b.b_signed ? 0 : 128;
  std::vector<int32_t> zb(b.np, 0), col_term(b.np, 0);
  for (size_t j = 0; j < n; ++j) {
    zb[j] = (args.b_zp_per_column ? args.b_zero_point[j] : args.b_zero_point[0]) - cb;
    col_term[j] = wrap(u(int32_t(k)) * u(za) * u(zb[j]) - u(za) * u(b.col_sums[j]));
  }
  PackedA a_packed;
  const bool row_major = kernel.a_row_align != 0;
  const size_t a_depth = row_major ? round_up(kp, kernel.a_row_align) : kp;
  pack_a(args.a, args.a_signed, m, k, a_depth, kernel.mr, 0, &a_packed, pool, threads, row_major);
  // Tiles in N-major order: consecutive items share a block of B panels.
  const size_t mt = (m + kernel.mr - 1) / kernel.mr;
  const size_t nt = (n + kernel.nr - 1) / kernel.nr;
  pool->parallel_for(mt * nt, threads, [&](size_t item, unsigned) {
    const size_t ti = item % mt, tj = item / mt;
    const size_t i0 = ti * kernel.mr, j0 = tj * kernel.nr;
    GemmTile t;
    t.a = a_packed.block(ti);
    t.a_group_stride = row_major ? a_depth : kernel.mr * 4;
    t.rows = std::min(kernel.mr, m - i0);
    t.b = b.panel(j0 / kPanelWidth);
    t.panel_stride = kp * kPanelWidth;
    t.kp = row_major ? a_depth : kp;
    t.cols = std::min(kernel.nr, b.np - j0);
    t.store_cols = std::min(kernel.nr, n - j0);
    t.c = args.c + i0 * n + j0;
    t.ldc = n;
    t.col_term = col_term.data() + j0;
    t.zb = zb.data() + j0;
    t.row_sums = a_packed.row_sums.data() + i0;
    t.b_col_sums = b.col_sums.data() + j0;
    kernel.tile(t);
  });
}

void gemm_reference(const GemmArgs& args, const uint8_t* b, bool b_signed, ThreadPool* pool,
                    unsigned threads) {
  auto value = [](uint8_t byte, bool is_signed) { return is_signed ? int32_t(int8_t(byte)) : int32_t(byte); };
  pool->parallel_for(args.m, threads, [&](size_t i, unsigned) {
    for (size_t j = 0; j < args.n; ++j) {
      const int32_t bzp = args.b_zp_per_column ? args.b_zero_point[j] : args.b_zero_point[0];
      uint32_t acc = 0;
      for (size_t kk = 0; kk < args.k; ++kk)
        acc += u(value(args.a[i * args.k + kk], args.a_signed) - args.a_zero_point) *
               u(value(b[kk * args.n + j], b_signed) - bzp);
      args.c[i * args.n + j] = wrap(acc);
    }
  });
}

}  // namespace lowbit
