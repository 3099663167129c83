// Native GEMM tests: every kernel bit-exact against the reference loops over
// odd shapes, long K, both signednesses, zero points at both ends, full-range
// values, and 1 or 2 threads.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "harness.h"
#include "lowbit/gemm.h"

using harness::Rng;
using harness::str;
using namespace lowbit;

void register_gemm_tests();
void register_int4_tests();

namespace {

const CpuFeatures& cpu() {
  static const CpuFeatures f = detect_cpu_features(/*request_amx=*/true);
  return f;
}

struct KernelCase {
  const char* name;
  const GemmKernel* kernel;
  bool supported;
  const char* missing;
};

std::vector<KernelCase> kernels() {
  return {
      {"portable", gemm_kernel_portable(), true, ""},
#if defined(__x86_64__)
      {"avx2", gemm_kernel_avx2(), cpu().avx2, "no AVX2"},
      {"avxvnni", gemm_kernel_avxvnni(), cpu().avx2 && cpu().avxvnni, "no AVX-VNNI"},
      {"avxvnni code with EVEX vpdpbusd", gemm_kernel_avxvnni_as_evex(), cpu().avx512f && cpu().avx512vl && cpu().avx512vnni,
       "no AVX-512 VNNI"},
      {"avx512vnni", gemm_kernel_avx512vnni(), cpu().has_avx512_core() && cpu().avx512vnni, "no AVX-512 VNNI"},
      {"amx", gemm_kernel_amx(), cpu().amx_int8 && cpu().amx_permitted && cpu().has_avx512_core(),
       cpu().amx_int8 ? "AMX present but Linux refused the tile permission" : "no AMX"},
#endif
#if defined(__aarch64__)
      {"neon", gemm_kernel_neon(), cpu().neon, "no NEON"},
      {"neondot", gemm_kernel_neondot(), cpu().neon_dotprod, "no NEON dot product (asimddp)"},
#endif
  };
}

struct Shape {
  size_t m, k, n;
};

std::vector<Shape> shapes() {
  return {{1, 1, 1},   {1, 7, 1},    {2, 3, 5},    {3, 3, 3},    {5, 5, 5},     {9, 11, 13},
          {1, 64, 33}, {1, 300, 50}, {8, 16, 32},  {9, 17, 33},  {17, 31, 47},  {13, 64, 48},
          {4, 4097, 19}, {3, 4096, 40}, {33, 5, 65}, {0, 5, 3},  {3, 0, 4},     {2, 5, 0}};
}

std::vector<uint8_t> random_bytes(size_t n, Rng& rng, int mode) {
  std::vector<uint8_t> v(n);
  for (auto& x : v) {
    switch (mode) {
      case 0: x = uint8_t(rng.next()); break;                     // full range
      case 1: x = rng.integer(0, 1) ? 0x80 : 0x7F; break;         // -128 / 127 (int8), 128 / 127 (uint8)
      default: x = rng.integer(0, 1) ? 0xFF : 0x00; break;        // 255 / 0 (uint8), -1 / 0 (int8)
    }
  }
  return v;
}

std::string run_case(const GemmKernel& k, const Shape& s, bool a_signed, bool b_signed, int32_t azp,
                     const std::vector<int32_t>& bzp, bool per_column, int mode, unsigned threads, Rng& rng) {
  auto a = random_bytes(s.m * s.k, rng, mode);
  auto b = random_bytes(s.k * s.n, rng, mode);
  ThreadPool pool(2);
  std::vector<int32_t> want(s.m * s.n, 0x5A5A5A5A), got(s.m * s.n, 0x5A5A5A5A);
  GemmArgs args{a.data(), a_signed, s.m, s.k, s.n, azp, bzp.data(), per_column, want.data()};
  gemm_reference(args, b.data(), b_signed, &pool, 1);
  PackedB packed;
  pack_b(b.data(), s.k, s.n, b_signed, &packed, &pool, threads);
  args.c = got.data();
  gemm_packed(k, args, packed, &pool, threads);
  for (size_t i = 0; i < want.size(); ++i)
    if (want[i] != got[i]) {
      size_t diffs = 0;
      for (size_t j = 0; j < want.size(); ++j) diffs += want[j] != got[j];
      return str(k.name, " ", s.m, "x", s.k, "x", s.n, " a_signed=", a_signed, " b_signed=", b_signed,
                 " azp=", azp, " bzp[0]=", bzp[0], " per_column=", per_column, " threads=", threads,
                 ": first difference at (", i / s.n, ", ", i % s.n, "): want ", want[i], " got ", got[i],
                 "; ", diffs, " of ", want.size(), " differ");
    }
  return "";
}

}  // namespace

// The AMX kernel's data contract in plain C++: row-major A (a_row_align 64,
// row stride in a_group_stride), B read in whole 64-k tiles up to t.kp (past
// the panel's real depth, into the next panel or the slack), 32 × 32 tiles.
// Checks the driver side of the AMX path on machines without AMX.
void row_major_tile(const GemmTile& t) {
  for (size_t r = 0; r < t.rows; ++r)
    for (size_t j = 0; j < t.store_cols; ++j) {
      const int8_t* panel = t.b + (j / 16) * t.panel_stride;
      uint32_t acc = 0;
      for (size_t k = 0; k < t.kp; ++k)
        acc += uint32_t(int32_t(t.a[r * t.a_group_stride + k]) * int32_t(panel[(k / 4) * 64 + (j % 16) * 4 + k % 4]));
      t.c[r * t.ldc + j] = int32_t(acc + uint32_t(t.col_term[j]) - uint32_t(t.zb[j]) * uint32_t(t.row_sums[r]));
    }
}

void broken_tile(const GemmTile& t) {
  for (size_t r = 0; r < t.rows; ++r)
    for (size_t j = 0; j < t.store_cols; ++j) t.c[r * t.ldc + j] = 0;
}

void register_gemm_tests() {
  harness::add("row-major A packing with 64-byte rows and whole-tile B reads (the AMX data path, in plain C++)", [] {
    ThreadPool pool(2);
    const GemmKernel row_major = {"row-major", 32, 32, row_major_tile, 64};
    if (!gemm_kernel_self_test(row_major, &pool)) return std::string("row-major path differs from the reference");
    Rng rng(45);
    for (const Shape& s : shapes()) {
      std::vector<int32_t> bzp(s.n ? s.n : 1, 3);
      for (unsigned threads : {1u, 2u}) {
        auto why = run_case(row_major, s, true, false, -5, bzp, true, 0, threads, rng);
        if (!why.empty()) return why;
      }
    }
    return std::string();
  });
  harness::add("AMX is offered only with AVX-512 VNNI too (AMX machines run W4A8 on the VNNI kernel)", [] {
    CpuFeatures f;
    f.arch = "x86_64";
    f.avx2 = f.fma = f.avx512f = f.avx512bw = f.avx512vl = f.avx512dq = true;
    f.amx_tile = f.amx_int8 = f.amx_permitted = f.amx_verified = true;
    const auto offers_amx = [&] {
      const auto names = available_gemm_kernels(f);
      return std::find(names.begin(), names.end(), "amx") != names.end();
    };
    if (offers_amx()) return std::string("amx offered on a CPU without AVX-512 VNNI");
    f.avx512vnni = true;
    if (!offers_amx()) return std::string("amx not offered with AVX-512 VNNI");
    return std::string();
  }, gemm_kernel_amx() ? "" : "the AMX kernel is not in this build (another architecture, or a compiler without its flags)");
  harness::add("gemm_kernel_self_test accepts a correct kernel and rejects a wrong one", [] {
    ThreadPool pool(2);
    if (!gemm_kernel_self_test(*gemm_kernel_portable(), &pool)) return std::string("rejected the portable kernel");
    const GemmKernel broken = {"broken", 4, 16, broken_tile};
    if (gemm_kernel_self_test(broken, &pool)) return std::string("accepted a kernel that writes zeros");
    return std::string();
  });
  harness::add("gemm reference: ONNX MatMulInteger example", [] {
    // onnx MatMulInteger doc example: A uint8 2x4 (zp 12), B uint8 4x3 (zp 0).
    const uint8_t a[] = {11, 7, 3, 10, 6, 1};
    const uint8_t b[] = {1, 4, 2, 5, 3, 6};
    // A [2,3] - 0, B [3,2] - 1: checked by hand.
    ThreadPool pool(1);
    int32_t zp_b = 1;
    int32_t c[4];
    GemmArgs args{a, false, 2, 3, 2, 0, &zp_b, false, c};
    gemm_reference(args, b, false, &pool, 1);
    // row0 = [11,7,3], B-1 = [[0,3],[1,4],[2,5]] -> [7+6, 33+28+15] = [13, 76]
    // row1 = [10,6,1] -> [6+2, 30+24+5] = [8, 59]
    if (c[0] != 13 || c[1] != 76 || c[2] != 8 || c[3] != 59)
      return str("got ", c[0], " ", c[1], " ", c[2], " ", c[3]);
    return std::string();
  });
  for (const KernelCase& kc : kernels()) {
    const GemmKernel* k = kc.kernel;
    const std::string skip = !k ? "not built (another architecture, or a compiler without its flags)" : (kc.supported ? "" : kc.missing);
    harness::add(str("gemm/", kc.name, " bit-exact vs reference: odd shapes, long K, all signedness and zero-point ends, 1 and 2 threads"),
                 [k] {
                   Rng rng(42);
                   for (const Shape& s : shapes())
                     for (int types = 0; types < 4; ++types) {
                       const bool as = types & 1, bs = types & 2;
                       const int32_t alo = as ? -128 : 0, ahi = as ? 127 : 255;
                       const int32_t blo = bs ? -128 : 0, bhi = bs ? 127 : 255;
                       for (int zcase = 0; zcase < 3; ++zcase) {
                         const int32_t azp = zcase == 0 ? 0 : zcase == 1 ? alo : ahi;
                         std::vector<int32_t> bzp(s.n ? s.n : 1);
                         for (auto& z : bzp) z = zcase == 0 ? 0 : zcase == 1 ? bhi : rng.integer(blo, bhi);
                         const bool per_column = zcase == 2;
                         const int mode = zcase;  // zcase 1/2 also use extreme values
                         for (unsigned threads : {1u, 2u}) {
                           auto why = run_case(*k, s, as, bs, azp, bzp, per_column, mode, threads, rng);
                           if (!why.empty()) return why;
                         }
                       }
                     }
                   return std::string();
                 },
                 skip);
    harness::add(str("gemm/", kc.name, " wraps like int32 arithmetic when sums overflow (K = 70000)"),
                 [k] {
                   Rng rng(43);
                   std::vector<int32_t> bzp{-128};
                   return run_case(*k, {3, 70000, 17}, false, true, 0, bzp, false, 2, 2, rng);
                 },
                 skip);
  }
}

void register_int4_tests() {
  struct Case4 {
    size_t m, k, n, block;
  };
  const std::vector<Case4> cases = {{1, 16, 1, 16},  {3, 32, 5, 16},   {5, 100, 17, 32}, {9, 64, 33, 64},
                                    {1, 4096, 40, 128}, {13, 70, 48, 16}, {2, 17, 31, 16}, {1, 64, 200, 16}, {2, 48, 70, 32}};
  std::vector<KernelCase> ks = kernels();
  for (const KernelCase& kc : ks) {
    const GemmKernel* k = kc.kernel;
    const std::string skip = !k ? "not built (another architecture, or a compiler without its flags)" : (kc.supported ? "" : kc.missing);
    harness::add(str("gemm_int4/", kc.name, int4_kernel_for(*(k ? k : gemm_kernel_portable()), 1) ? " (dedicated W4A8 kernel)" : " (int8 kernel on unpacked blocks)",
                     " equals the W4A8 reference: ragged blocks, int4/uint4, zero points (random, A centred, one B zero point), 1 and 2 threads"),
                 [k, cases] {
                   Rng rng(44);
                   for (const Case4& c : cases)
                     for (int types = 0; types < 16; ++types) {
                       const bool as = types & 1, bs = types & 2;
                       // A's zero point 128 (uint8) / 0 (int8) selects the centred kernel path;
                       // one zero point for all of B selects its scalar row term.
                       const bool centred_a = types & 4, one_b_zero_point = types & 8;
                       const size_t blocks = (c.k + c.block - 1) / c.block;
                       std::vector<uint8_t> a(c.m * c.k), b(c.k * c.n);
                       for (auto& v : a) v = uint8_t(rng.next());
                       for (auto& v : b) v = uint8_t(bs ? rng.integer(-8, 7) : rng.integer(0, 15));
                       std::vector<float> scale(blocks * c.n);
                       std::vector<int32_t> zp(blocks * c.n);
                       for (auto& s : scale) s = rng.range(0.001f, 0.1f);
                       for (auto& z : zp) z = bs ? rng.integer(-8, 7) : rng.integer(0, 15);
                       if (one_b_zero_point) std::fill(zp.begin(), zp.end(), zp[0]);
                       ThreadPool pool(2);
                       PackedB4 packed;
                       if (pack_b_int4(b.data(), c.k, c.n, bs, c.block, scale.data(), zp.data(), &packed, &pool, 2) != -1)
                         return std::string("pack rejected valid values");
                       const int32_t azp = centred_a ? (as ? 0 : 128) : as ? rng.integer(-128, 127) : rng.integer(0, 255);
                       std::vector<float> want(c.m * c.n), got(c.m * c.n);
                       Int4Args args{a.data(), as, c.m, azp, 0.02f, want.data()};
                       gemm_int4_reference(args, packed, &pool, 1);
                       // An independent check of the reference itself: doubles, no packing.
                       for (size_t i = 0; i < c.m; ++i)
                         for (size_t j = 0; j < c.n; ++j) {
                           double y = 0;
                           for (size_t kk = 0; kk < c.k; ++kk) {
                             const int av = as ? int(int8_t(a[i * c.k + kk])) : int(a[i * c.k + kk]);
                             const int bv = bs ? int(int8_t(b[kk * c.n + j])) : int(b[kk * c.n + j]);
                             y += double(av - azp) * double(bv - zp[(kk / c.block) * c.n + j]) * 0.02 * scale[(kk / c.block) * c.n + j];
                           }
                           if (std::abs(y - want[i * c.n + j]) > 1e-4 * (1 + std::abs(y)))
                             return str("reference off at ", i, ",", j, ": ", want[i * c.n + j], " vs ", y);
                         }
                       for (unsigned threads : {1u, 2u}) {
                         args.y = got.data();
                         gemm_int4(*k, args, packed, &pool, threads);
                         if (std::memcmp(want.data(), got.data(), want.size() * sizeof(float)) != 0) {
                           for (size_t i = 0; i < want.size(); ++i)
                             if (std::memcmp(&want[i], &got[i], 4) != 0)
                               return str(c.m, "x", c.k, "x", c.n, " block ", c.block, " a_signed=", as, " b_signed=", bs,
                                          " aZp=", azp, " one B zero point=", one_b_zero_point, " threads=", threads, ": first difference at ", i, ": want ", want[i], " got ", got[i]);
                         }
                       }
                     }
                   return std::string();
                 },
                 skip);
  }
}
