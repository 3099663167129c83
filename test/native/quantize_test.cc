// Native tests of the quantization kernels and drivers: every SIMD path
// against the scalar reference (bit-exact), the ONNX vectors, layouts,
// thread-count independence and packing.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <future>
#include <mutex>
#include <thread>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <limits>
#include <memory>

#include "harness.h"
#include "lowbit/quantize.h"
#include "lowbit/rounding.h"

using harness::Rng;
using harness::str;
using namespace lowbit;

void register_quantize_tests();

namespace {

const CpuFeatures& cpu() {
  static const CpuFeatures f = detect_cpu_features(false);
  return f;
}

struct Path {
  const char* name;
  const QuantizeKernels* kernels;
  const char* missing;  // why it cannot run here, or nullptr
};

std::vector<Path> simd_paths() {
  std::vector<Path> paths;
  [[maybe_unused]] auto add = [&](const char* name, const QuantizeKernels* k, bool supported, const char* need) {
    const char* missing = nullptr;
    if (!k) missing = "not built (another architecture, or a compiler without its flags)";
    else if (!supported) missing = need;
    paths.push_back({name, k, missing});
  };
#if defined(__x86_64__)
  add("avx2", quantize_kernels_avx2(), cpu().avx2, "no AVX2");
  add("avx512", quantize_kernels_avx512(), cpu().has_avx512_core(), "no AVX-512 (F/BW/VL/DQ)");
#endif
  return paths;
}

const QuantizeKernels& ref() { return *quantize_kernels_scalar(); }

struct Config {
  int bits;
  bool is_signed;
  float scale;
  int32_t zp;
};

std::vector<Config> configs() {
  std::vector<Config> c;
  const float scales[] = {0.5f, 0.1f, 0.0078125f, 3.0f, 1e-30f, 1e30f, 1e-40f, 3e38f};
  for (int bits : {2, 4, 8}) {
    for (bool s : {true, false}) {
      int32_t qmin, qmax;
      integer_range(bits, s, &qmin, &qmax);
      for (float scale : scales)
        for (int32_t zp : {qmin, 0, qmax, (qmin + qmax) / 2})
          if (zp >= qmin && zp <= qmax) c.push_back({bits, s, scale, zp});
    }
  }
  return c;
}

// Values that hit ties, saturation, signed zeros, infinities and subnormals.
std::vector<float> tricky_data(size_t n, float scale, Rng& rng) {
  std::vector<float> x(n);
  for (size_t i = 0; i < n; ++i) {
    switch (rng.integer(0, 9)) {
      case 0: x[i] = (float(rng.integer(-300, 300)) + 0.5f) * scale; break;  // ties
      case 1: x[i] = float(rng.integer(-300, 300)) * scale; break;
      case 2: x[i] = rng.integer(0, 1) ? INFINITY : -INFINITY; break;
      case 3: x[i] = rng.integer(0, 1) ? 0.0f : -0.0f; break;
      case 4: x[i] = rng.range(-3e38f, 3e38f); break;
      case 5: x[i] = rng.range(-1e-38f, 1e-38f); break;
      default: x[i] = rng.range(-200.0f, 200.0f) * scale; break;
    }
  }
  return x;
}

std::string compare_bytes(const std::vector<uint8_t>& want, const std::vector<uint8_t>& got,
                          const std::vector<float>& x, const std::string& what) {
  for (size_t i = 0; i < want.size(); ++i)
    if (want[i] != got[i])
      return str(what, ": first difference at ", i, " (x=", x[i], "): want ", int(want[i]),
                 " got ", int(got[i]));
  return "";
}

void register_kernel_tests() {
  for (const Path& path : simd_paths()) {
    const std::string skip = path.missing ? path.missing : "";
    const QuantizeKernels* k = path.kernels;
    harness::add(str("quantize_run/", path.name, " matches scalar for n = 0..1024, all configs"),
                 [k] {
                   Rng rng(1);
                   for (const Config& c : configs()) {
                     int32_t qmin, qmax;
                     integer_range(c.bits, c.is_signed, &qmin, &qmax);
                     for (size_t n = 0; n <= 1024; n += (c.scale == 0.5f ? 1 : 37)) {
                       auto x = tricky_data(n, c.scale, rng);
                       std::vector<uint8_t> want(n + 1, 0xAB), got(n + 1, 0xAB);
                       bool nw = ref().quantize_run(x.data(), n, c.scale, c.zp, qmin, qmax, want.data());
                       bool ng = k->quantize_run(x.data(), n, c.scale, c.zp, qmin, qmax, got.data());
                       auto why = compare_bytes(want, got, x, str("n=", n, " bits=", c.bits, " signed=", c.is_signed, " scale=", c.scale, " zp=", c.zp));
                       if (!why.empty()) return why;
                       if (nw != ng) return str("NaN flag differs at n=", n);
                     }
                   }
                   return std::string();
                 },
                 skip);
    harness::add(str("quantize_vec/", path.name, " matches scalar with per-element parameters"),
                 [k] {
                   Rng rng(2);
                   for (int bits : {2, 3, 4, 8})
                     for (bool s : {true, false}) {
                       int32_t qmin, qmax;
                       integer_range(bits, s, &qmin, &qmax);
                       for (size_t n = 0; n <= 300; ++n) {
                         auto x = tricky_data(n, 0.25f, rng);
                         std::vector<float> scale(n);
                         std::vector<int32_t> zp(n);
                         for (size_t i = 0; i < n; ++i) {
                           scale[i] = i % 3 == 0 ? 0.25f : rng.range(1e-3f, 10.0f);
                           zp[i] = rng.integer(qmin, qmax);
                         }
                         std::vector<uint8_t> want(n), got(n);
                         ref().quantize_vec(x.data(), n, scale.data(), zp.data(), qmin, qmax, want.data());
                         k->quantize_vec(x.data(), n, scale.data(), zp.data(), qmin, qmax, got.data());
                         auto why = compare_bytes(want, got, x, str("n=", n, " bits=", bits));
                         if (!why.empty()) return why;
                       }
                     }
                   return std::string();
                 },
                 skip);
    harness::add(str("quantize_run/", path.name, " flags NaN at any position"),
                 [k] {
                   for (size_t n = 1; n <= 130; ++n)
                     for (size_t at : {size_t(0), n / 2, n - 1}) {
                       std::vector<float> x(n, 1.0f);
                       x[at] = NAN;
                       std::vector<uint8_t> out(n);
                       if (!k->quantize_run(x.data(), n, 1.0f, 0, -128, 127, out.data()))
                         return str("NaN at ", at, " of ", n, " not flagged");
                       float lo = INFINITY, hi = -INFINITY;
                       if (!k->finite_range(x.data(), n, &lo, &hi))
                         return str("finite_range: NaN at ", at, " of ", n, " not flagged");
                     }
                   return std::string();
                 },
                 skip);
    harness::add(str("dequantize/", path.name, " matches scalar (run and per-element)"),
                 [k] {
                   Rng rng(3);
                   for (bool s : {true, false})
                     for (size_t n = 0; n <= 1024; ++n) {
                       std::vector<uint8_t> q(n);
                       std::vector<float> scale(n);
                       std::vector<int32_t> zp(n);
                       for (size_t i = 0; i < n; ++i) {
                         q[i] = uint8_t(rng.next());
                         scale[i] = rng.range(1e-6f, 100.0f);
                         zp[i] = s ? rng.integer(-128, 127) : rng.integer(0, 255);
                       }
                       std::vector<float> want(n), got(n);
                       ref().dequantize_run(q.data(), n, s, 0.37f, zp.empty() ? 0 : zp[0], want.data());
                       k->dequantize_run(q.data(), n, s, 0.37f, zp.empty() ? 0 : zp[0], got.data());
                       if (std::memcmp(want.data(), got.data(), n * sizeof(float)) != 0)
                         return str("dequantize_run differs at n=", n, " signed=", s);
                       ref().dequantize_vec(q.data(), n, s, scale.data(), zp.data(), want.data());
                       k->dequantize_vec(q.data(), n, s, scale.data(), zp.data(), got.data());
                       if (std::memcmp(want.data(), got.data(), n * sizeof(float)) != 0)
                         return str("dequantize_vec differs at n=", n, " signed=", s);
                     }
                   return std::string();
                 },
                 skip);
    harness::add(str("finite_range/", path.name, " and scalar give the least and greatest finite value and flag NaN, for n = 0..1024"),
                 [k] {
                   Rng rng(4);
                   for (size_t n = 0; n <= 1024; ++n) {
                     auto x = tricky_data(n, 1.0f, rng);
                     const bool with_nan = n % 3 == 1;
                     if (with_nan) x[size_t(rng.integer(0, int(n) - 1))] = NAN;
                     float lo = INFINITY, hi = -INFINITY;  // a plain loop over the finite values
                     for (float v : x)
                       if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
                     float wl = INFINITY, wh = -INFINITY, gl = INFINITY, gh = -INFINITY;
                     const bool wn = ref().finite_range(x.data(), n, &wl, &wh);
                     const bool gn = k->finite_range(x.data(), n, &gl, &gh);
                     if (wn != with_nan || gn != with_nan)
                       return str("n=", n, ": NaN flag scalar ", wn, ", simd ", gn, ", want ", with_nan);
                     if (with_nan) continue;  // (the bounds are not used then)
                     if (!(wl == lo && wh == hi)) return str("scalar n=", n, ": want [", lo, ", ", hi, "] got [", wl, ", ", wh, "]");
                     if (!(gl == lo && gh == hi)) return str("simd n=", n, ": want [", lo, ", ", hi, "] got [", gl, ", ", gh, "]");
                   }
                   return std::string();
                 },
                 skip);
    harness::add(str("lsq_forward and lsq_backward/", path.name, " match scalar bit for bit (values, gradients, step sums)"),
                 [k] {
                   Rng rng(6);
                   for (int bits : {2, 4, 8})
                     for (bool s : {true, false}) {
                       const int32_t qn = s ? (1 << (bits - 1)) : 0, qp = s ? (1 << (bits - 1)) - 1 : (1 << bits) - 1;
                       for (size_t n = 0; n <= 300; ++n) {
                         const float step = n % 2 ? 0.125f : rng.range(0.01f, 0.5f);
                         auto v = tricky_data(n, step, rng);
                         for (auto& x : v)
                           if (!std::isfinite(x) || std::fabs(x) > 1e6f) x = rng.range(-50.0f, 50.0f) * step;
                         std::vector<float> g(n), want(n), got(n), gw(n), gg(n);
                         for (auto& x : g) x = rng.range(-1.0f, 1.0f);
                         ref().lsq_forward(v.data(), n, step, qn, qp, want.data());
                         k->lsq_forward(v.data(), n, step, qn, qp, got.data());
                         if (std::memcmp(want.data(), got.data(), n * 4) != 0) return str("forward differs at n=", n);
                         const double sw = ref().lsq_backward(v.data(), g.data(), n, step, qn, qp, gw.data());
                         const double sg = k->lsq_backward(v.data(), g.data(), n, step, qn, qp, gg.data());
                         if (std::memcmp(gw.data(), gg.data(), n * 4) != 0) return str("grad_in differs at n=", n);
                         if (std::memcmp(&sw, &sg, sizeof(double)) != 0) return str("step gradient differs at n=", n, ": ", sw, " vs ", sg);
                       }
                     }
                   return std::string();
                 },
                 skip);
    harness::add(str("squared_error/", path.name, " returns the same double as scalar"),
                 [k] {
                   Rng rng(5);
                   for (const Config& c : configs()) {
                     int32_t qmin, qmax;
                     integer_range(c.bits, c.is_signed, &qmin, &qmax);
                     for (size_t n = 0; n <= 1024; n += (c.scale == 0.1f ? 1 : 53)) {
                       auto x = tricky_data(n, c.scale, rng);
                       for (auto& v : x)
                         if (std::fabs(v) > 1e30f) v = 1.0f;  // keep the sums finite
                       double want = ref().squared_error(x.data(), n, c.scale, c.zp, qmin, qmax);
                       double got = k->squared_error(x.data(), n, c.scale, c.zp, qmin, qmax);
                       if (std::memcmp(&want, &got, sizeof(double)) != 0)
                         return str("n=", n, " scale=", c.scale, ": want ", want, " got ", got);
                     }
                   }
                   return std::string();
                 },
                 skip);
  }
}

void register_rule_tests() {
  harness::add("T1: round half to even", [] {
    const float in[] = {0.5f, 1.5f, 2.5f, 3.5f, -0.5f, -1.5f, -2.5f, 2.4999f, 2.5001f};
    const int want[] = {0, 2, 2, 4, 0, -2, -2, 2, 3};
    for (int i = 0; i < 9; ++i)
      if (quantize_value(in[i], 1.0f, 0, -128, 127) != want[i])
        return str(in[i], " -> ", quantize_value(in[i], 1.0f, 0, -128, 127), ", want ", want[i]);
    return std::string();
  });
  harness::add("T2: ONNX QuantizeLinear per-tensor vectors", [] {
    const float x[] = {-1.0f, -0.3f, 0.0f, 0.25f, 0.75f, 1.25f, 10.0f};
    struct V { int32_t qmin, qmax, zp; int want[7]; } vs[] = {
        {-128, 127, 0, {-2, -1, 0, 0, 2, 2, 20}},
        {-8, 7, 0, {-2, -1, 0, 0, 2, 2, 7}},
        {0, 15, 8, {6, 7, 8, 8, 10, 10, 15}},
        {0, 255, 128, {126, 127, 128, 128, 130, 130, 148}},
    };
    for (auto& v : vs)
      for (int i = 0; i < 7; ++i) {
        int got = quantize_value(x[i], 0.5f, v.zp, v.qmin, v.qmax);
        if (got != v.want[i]) return str("range [", v.qmin, ",", v.qmax, "] x=", x[i], ": ", got, " want ", v.want[i]);
      }
    return std::string();
  });
  harness::add("divides by the scale rather than multiplying by its reciprocal", [] {
    // Find a tie x = (k + 0.5) * s where x / s and x * (1 / s) round differently.
    for (int i = 1; i < 1000000; ++i) {
      const float s = 0.0001f * float(i);
      const float x = 2.5f * s;
      const float div = std::nearbyint(x / s), mul = std::nearbyint(x * (1.0f / s));
      if (div == mul) continue;
      const int got = quantize_value(x, s, 0, -128, 127);
      if (got != int(div)) return str("s=", s, " x=", x, ": got ", got, " want ", div, " (reciprocal gives ", mul, ")");
      return std::string();
    }
    return std::string("found no scale where division and reciprocal differ");
  });
  harness::add("params_from_range: T14 onnxruntime affine and symmetric parameters", [] {
    float s;
    int32_t z;
    params_from_range(-1.0f, 3.0f, 0, 255, false, &s, &z);
    if (s != float(4.0 / 255.0) || z != 64) return str("uint8 asymmetric: ", s, " ", z);
    params_from_range(-1.0f, 3.0f, -128, 127, true, &s, &z);
    if (s != float(3.0 / 127.0) || z != 0) return str("int8 symmetric: ", s, " ", z);
    for (bool sym : {false, true}) {
      params_from_range(0.0f, 0.0f, -8, 7, sym, &s, &z);
      if (s != 1.0f || z != 0) return str("zero range: ", s, " ", z);
      params_from_range(0.0f, 1e-40f, 0, 15, sym, &s, &z);
      if (s != 1.0f || z != 0) return str("vanishing range: ", s, " ", z);
    }
    params_from_range(2.0f, 5.0f, 0, 15, false, &s, &z);  // widened to [0, 5]
    if (s != float(5.0 / 15.0) || z != 0) return str("positive range: ", s, " ", z);
    return std::string();
  });
}

// Per-element reference for a layout: computes each element's group directly.
size_t group_of(const QuantLayout& l, size_t idx) {
  const size_t i = l.inner ? idx % l.inner : 0;
  const size_t d = l.inner ? (idx / l.inner) % l.axis_len : 0;
  const size_t o = l.inner ? idx / l.inner / l.axis_len : 0;
  switch (l.kind) {
    case Granularity::kTensor: return 0;
    case Granularity::kChannel: return d;
    case Granularity::kBlock: return (o * l.blocks_per_axis() + d / l.block_size) * l.inner + i;
  }
  return 0;
}

std::vector<QuantLayout> layouts() {
  std::vector<QuantLayout> ls;
  auto mk = [](Granularity k, size_t o, size_t a, size_t in, size_t b) {
    QuantLayout l;
    l.kind = k; l.outer = o; l.axis_len = a; l.inner = in; l.block_size = b;
    return l;
  };
  ls.push_back(mk(Granularity::kTensor, 1, 1, 0, 0));
  ls.push_back(mk(Granularity::kTensor, 1, 1, 200003, 0));
  ls.push_back(mk(Granularity::kChannel, 1, 7, 33, 0));
  ls.push_back(mk(Granularity::kChannel, 5, 3, 70001, 0));
  ls.push_back(mk(Granularity::kChannel, 9, 131, 1, 0));
  ls.push_back(mk(Granularity::kChannel, 2, 100000, 1, 0));
  ls.push_back(mk(Granularity::kBlock, 3, 37, 1, 8));      // ragged last block
  ls.push_back(mk(Granularity::kBlock, 2, 150001, 1, 32)); // long lines
  ls.push_back(mk(Granularity::kBlock, 2, 11, 5, 4));      // blocks across an inner axis
  ls.push_back(mk(Granularity::kBlock, 1, 5, 3, 16));      // one block bigger than the axis
  return ls;
}

void register_driver_tests() {
  harness::add("quantize/dequantize/ranges drivers match a per-element reference for every layout, path and thread count", [] {
    Rng rng(6);
    for (const QuantLayout& l : layouts()) {
      const size_t n = l.element_count(), groups = l.group_count();
      std::vector<float> x(n);
      for (auto& v : x) v = rng.range(-4.0f, 4.0f);
      std::vector<float> scale(groups);
      std::vector<int32_t> zp(groups);
      for (size_t g = 0; g < groups; ++g) { scale[g] = rng.range(0.01f, 0.1f); zp[g] = rng.integer(0, 15); }
      QuantParams p;
      p.scale = scale.data(); p.zero_point = zp.data(); p.qmin = 0; p.qmax = 15; p.layout = l;
      std::vector<uint8_t> want(n);
      std::vector<float> want_lo(groups, INFINITY), want_hi(groups, -INFINITY);
      for (size_t i = 0; i < n; ++i) {
        size_t g = group_of(l, i);
        want[i] = uint8_t(quantize_value(x[i], scale[g], zp[g], 0, 15));
        want_lo[g] = std::min(want_lo[g], x[i]);
        want_hi[g] = std::max(want_hi[g], x[i]);
      }
      for (const auto& name : available_quantize_kernels(cpu())) {
        for (unsigned threads : {1u, 2u, 3u}) {
          ThreadPool pool(3);
          Exec exec{find_quantize_kernels(name, cpu()), &pool, threads};
          std::vector<uint8_t> got(n);
          if (quantize_tensor(exec, x.data(), p, got.data()) != kNoNaN) return str("spurious NaN");
          for (size_t i = 0; i < n; ++i)
            if (got[i] != want[i]) return str(name, " threads=", threads, " kind=", int(l.kind), " element ", i, ": ", int(got[i]), " want ", int(want[i]));
          std::vector<float> deq(n);
          dequantize_tensor(exec, got.data(), false, p, deq.data());
          for (size_t i = 0; i < n; ++i) {
            size_t g = group_of(l, i);
            if (deq[i] != dequantize_value(want[i], scale[g], zp[g])) return str("dequantize element ", i);
          }
          std::vector<float> lo(groups), hi(groups);
          group_ranges(exec, x.data(), l, lo.data(), hi.data());
          for (size_t g = 0; g < groups; ++g)
            if (lo[g] != want_lo[g] || hi[g] != want_hi[g]) return str(name, " ranges of group ", g);
        }
      }
    }
    return std::string();
  });
  harness::add("drivers report the first NaN index", [] {
    ThreadPool pool(2);
    Exec exec{quantize_kernels_scalar(), &pool, 2};
    std::vector<float> x(300000, 1.0f);
    x[200001] = NAN;
    x[250000] = NAN;
    QuantLayout l;
    l.inner = x.size();
    float lo, hi, s = 1.0f;
    int32_t z = 0;
    if (group_ranges(exec, x.data(), l, &lo, &hi) != 200001) return std::string("group_ranges");
    QuantParams p;
    p.scale = &s; p.zero_point = &z; p.layout = l;
    std::vector<uint8_t> out(x.size());
    if (quantize_tensor(exec, x.data(), p, out.data()) != 200001) return std::string("quantize_tensor");
    return std::string();
  });
  harness::add("mse search: same ranges on every path and thread count; never worse than minmax", [] {
    Rng rng(7);
    for (const QuantLayout& l : layouts()) {
      if (l.element_count() > 400000) continue;
      const size_t n = l.element_count(), groups = l.group_count();
      std::vector<float> x(n);
      for (auto& v : x) {  // heavy-tailed: clipping pays off
        float u = rng.range(1e-6f, 1.0f);
        v = (rng.integer(0, 1) ? 1.0f : -1.0f) * -std::log(u);
      }
      std::vector<float> ref_lo, ref_hi;
      for (const auto& name : available_quantize_kernels(cpu()))
        for (unsigned threads : {1u, 2u}) {
          ThreadPool pool(2);
          Exec exec{find_quantize_kernels(name, cpu()), &pool, threads};
          std::vector<float> lo(groups), hi(groups);
          search_ranges_mse(exec, x.data(), l, -8, 7, true, 100, lo.data(), hi.data());
          if (ref_lo.empty()) { ref_lo = lo; ref_hi = hi; continue; }
          if (lo != ref_lo || hi != ref_hi) return str(name, " threads=", threads, " chose different ranges");
        }
      if (l.kind == Granularity::kTensor && n > 0) {
        ThreadPool pool(1);
        Exec exec{quantize_kernels_scalar(), &pool, 1};
        float mlo, mhi, s1, s2;
        int32_t z1, z2;
        group_ranges(exec, x.data(), l, &mlo, &mhi);
        params_from_range(mlo, mhi, -8, 7, true, &s1, &z1);
        params_from_range(ref_lo[0], ref_hi[0], -8, 7, true, &s2, &z2);
        double e1 = ref().squared_error(x.data(), n, s1, z1, -8, 7);
        double e2 = ref().squared_error(x.data(), n, s2, z2, -8, 7);
        if (!(e2 <= e1)) return str("mse ", e2, " worse than minmax ", e1);
        if (!(e2 < 0.9 * e1)) return str("mse search did not clip a heavy-tailed tensor: ", e2, " vs ", e1);
      }
    }
    return std::string();
  });
  harness::add("group_moments: count, mean, mean |x - mean|, Σ (x - mean)², min, max per group, for any thread count", [] {
    Rng rng(8);
    for (const QuantLayout& l : layouts()) {
      if (l.element_count() > 400000) continue;
      const size_t n = l.element_count(), groups = l.group_count();
      std::vector<float> x(n);
      for (auto& v : x) v = rng.range(-3.0f, 5.0f);
      if (n > 10) x[n / 2] = INFINITY;  // ignored, like every range statistic
      std::vector<double> cnt(groups), sum(groups);
      for (size_t i = 0; i < n; ++i)
        if (std::isfinite(x[i])) {
          cnt[group_of(l, i)] += 1;
          sum[group_of(l, i)] += x[i];
        }
      std::vector<double> abs_dev(groups), sq(groups);
      for (size_t i = 0; i < n; ++i)
        if (std::isfinite(x[i])) {
          const size_t g = group_of(l, i);
          const double d = x[i] - sum[g] / cnt[g];
          abs_dev[g] += std::fabs(d);
          sq[g] += d * d;
        }
      GroupMoments first;
      for (unsigned threads : {1u, 2u, 3u}) {
        ThreadPool pool(3);
        Exec exec{quantize_kernels_scalar(), &pool, threads};
        GroupMoments m;
        if (group_moments(exec, x.data(), l, &m) != kNoNaN) return std::string("spurious NaN");
        for (size_t g = 0; g < groups; ++g) {
          if (m.count[g] != cnt[g]) return str("count of group ", g);
          const double mean = cnt[g] > 0 ? sum[g] / cnt[g] : 0;
          if (std::fabs(m.mean[g] - mean) > 1e-9 * (1 + std::fabs(mean))) return str("mean of group ", g);
          if (cnt[g] > 0 && std::fabs(m.mean_abs_dev[g] - abs_dev[g] / cnt[g]) > 1e-9) return str("b of group ", g);
          if (std::fabs(m.sum_sq_dev[g] - sq[g]) > 1e-9 * (1 + sq[g])) return str("sum of squares of group ", g);
        }
        if (threads == 1) first = m;
        else if (m.mean != first.mean || m.mean_abs_dev != first.mean_abs_dev || m.sum_sq_dev != first.sum_sq_dev)
          return str("results differ between 1 and ", threads, " threads");
      }
    }
    return std::string();
  });
  harness::add("mse search handles all-zero and constant groups", [] {
    ThreadPool pool(1);
    Exec exec{quantize_kernels_scalar(), &pool, 1};
    QuantLayout l;
    l.kind = Granularity::kChannel; l.outer = 1; l.axis_len = 3; l.inner = 4;
    std::vector<float> x = {0, 0, 0, 0, 2, 2, 2, 2, -3, -3, -3, -3};
    float lo[3], hi[3];
    search_ranges_mse(exec, x.data(), l, -128, 127, true, 100, lo, hi);
    if (lo[0] != 0 || hi[0] != 0) return str("zero group: [", lo[0], ", ", hi[0], "]");
    if (hi[1] != 2.0f || lo[2] != -3.0f) return str("constant groups lost their value: ", hi[1], " ", lo[2]);
    return std::string();
  });
}

void register_pack_tests() {
  harness::add("T3: INT4/UINT4 packing and unpacking", [] {
    auto pack = [](std::vector<int> v, bool s) {
      std::vector<uint8_t> in(v.begin(), v.end()), out((v.size() + 1) / 2);
      int64_t bad = pack_int4(in.data(), in.size(), s, out.data());
      return std::make_pair(bad, out);
    };
    auto a = pack({1, -2, 3}, true);
    if (a.first != -1 || a.second != std::vector<uint8_t>{0xE1, 0x03}) return std::string("int4 [1,-2,3]");
    auto b = pack({-8, 7}, true);
    if (b.second != std::vector<uint8_t>{0x78}) return std::string("int4 [-8,7]");
    auto c = pack({15, 0, 5}, false);
    if (c.second != std::vector<uint8_t>{0x0F, 0x05}) return std::string("uint4 [15,0,5]");
    if (pack({1, 8}, true).first != 1) return std::string("8 accepted as int4");
    uint8_t back[3];
    unpack_int4(a.second.data(), 3, true, back);
    if (int8_t(back[0]) != 1 || int8_t(back[1]) != -2 || int8_t(back[2]) != 3) return std::string("unpack int4");
    return std::string();
  });
  harness::add("INT2/UINT2 packing: four per byte, lowest bits first, round trip", [] {
    std::vector<uint8_t> in = {uint8_t(-2), 1, 0, uint8_t(-1), 1}, out(2), back(5);
    if (pack_int2(in.data(), 5, true, out.data()) != -1) return std::string("rejected valid int2");
    // -2 -> 10b, 1 -> 01b, 0 -> 00b, -1 -> 11b: byte0 = 11 00 01 10 = 0xC6
    if (out[0] != 0xC6 || out[1] != 0x01) return str("bytes ", int(out[0]), " ", int(out[1]));
    unpack_int2(out.data(), 5, true, back.data());
    if (back != in) return std::string("round trip");
    std::vector<uint8_t> u = {3, 0, 2, 1}, uo(1);
    pack_int2(u.data(), 4, false, uo.data());
    if (uo[0] != 0x63) return str("uint2 byte ", int(uo[0]));
    if (pack_int2(u.data(), 4, true, uo.data()) != 0) return std::string("3 accepted as int2");
    return std::string();
  });
  harness::add("first_code_outside: the first int8/uint8 code outside [qmin, qmax], at every position of odd lengths", [] {
    for (size_t n : {1u, 7u, 33u, 65u}) {
      for (size_t at = 0; at < n; ++at) {
        std::vector<uint8_t> q(n, uint8_t(-3));  // -3 as int8 (in [-8, 7]), 253 as uint8
        if (first_code_outside(q.data(), n, true, -8, 7) != -1) return str("int4 codes flagged, n ", n);
        if (first_code_outside(q.data(), n, false, 0, 15) != 0) return str("uint4 253 not at 0, n ", n);
        q[at] = 8;
        if (n > at + 1) q[at + 1] = uint8_t(-9);
        if (first_code_outside(q.data(), n, true, -8, 7) != int64_t(at)) return str("8 at ", at, " of ", n);
        q[at] = uint8_t(-3);
        const int64_t want = n > at + 1 ? int64_t(at + 1) : -1;
        if (first_code_outside(q.data(), n, true, -8, 7) != want) return str("-9 at ", at + 1, " of ", n);
        if (first_code_outside(q.data(), n, true, -128, 127) != -1) return str("int8 range flagged, n ", n);
      }
    }
    if (first_code_outside(nullptr, 0, true, -2, 1) != -1) return std::string("empty tensor flagged");
    return std::string();
  });
}

}  // namespace

void register_calibration_tests() {
  harness::add("calibration: finite_range skips ±Infinity and finds the first NaN; histogram_add bins |x| and counts zeros", [] {
    const float inf = std::numeric_limits<float>::infinity();
    const float x[] = {0.5f, -inf, -3.0f, 0.0f, -0.0f, inf, 7.75f, -0.25f};
    float lo, hi;
    size_t finite;
    if (lowbit::finite_range(x, 8, &lo, &hi, &finite) != lowbit::kNoNaN || lo != -3.0f || hi != 7.75f || finite != 6)
      return str("finite_range: ", lo, " ", hi, " ", finite);
    const float with_nan[] = {1, 2, std::numeric_limits<float>::quiet_NaN(), 4};
    if (lowbit::finite_range(with_nan, 4, &lo, &hi, &finite) != 2) return std::string("finite_range did not report the NaN at 2");
    if (lowbit::finite_range(&inf, 1, &lo, &hi, &finite) != lowbit::kNoNaN || finite != 0 || lo != inf || hi != -inf)
      return str("finite_range of no finite values: ", lo, " ", hi, " ", finite);
    // 8 bins over [0, 8): one unit per bin; 7.75 in the last bin, anything larger clamps to it.
    std::vector<double> counts(8, 0), negative(8, 0);
    const size_t zeros = lowbit::histogram_add(x, 8, 1.0, 8, counts.data(), negative.data());
    const std::vector<double> want_counts = {4, 0, 0, 1, 0, 0, 0, 1}, want_negative = {1, 0, 0, 1, 0, 0, 0, 0};
    if (zeros != 2 || counts != want_counts || negative != want_negative) return str("histogram_add: zeros ", zeros);
    const float big = 1e30f;
    lowbit::histogram_add(&big, 1, 1.0, 8, counts.data(), negative.data());
    if (counts[7] != 2) return std::string("a value past the last bin was not clamped into it");
    return std::string();
  });
}

void register_quantize_tests() {
  register_rule_tests();
  register_kernel_tests();
  register_driver_tests();
  register_pack_tests();
  register_calibration_tests();
}

namespace {

// Occupies a 2-thread pool with a job whose items wait until release() (which also waits for the job to end).
class BusyPool {
 public:
  explicit BusyPool(lowbit::ThreadPool& pool)
      : holder_([this, &pool] {
          pool.parallel_for(2, 2, [this](size_t, unsigned) {
            std::unique_lock<std::mutex> lock(m_);
            busy_ = true;
            cv_.notify_all();
            cv_.wait(lock, [this] { return released_; });
          });
        }) {
    std::unique_lock<std::mutex> lock(m_);
    cv_.wait(lock, [this] { return busy_; });
  }
  ~BusyPool() { release(); }
  void release() {
    {
      std::lock_guard<std::mutex> lock(m_);
      released_ = true;
    }
    cv_.notify_all();
    if (holder_.joinable()) holder_.join();
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  bool busy_ = false, released_ = false;
  std::thread holder_;  // declared last: it starts once the members it uses exist
};

}  // namespace

void register_thread_pool_tests();
void register_thread_pool_tests() {
  harness::add("thread pool: an exception in a worker is rethrown in the caller, and the pool keeps working", [] {
    lowbit::ThreadPool pool(2);
    bool caught = false;
    try {
      pool.parallel_for(100, 2, [](size_t item, unsigned) {
        if (item == 57) throw std::runtime_error("boom");
      });
    } catch (const std::runtime_error& e) {
      caught = std::string(e.what()) == "boom";
    }
    if (!caught) return std::string("exception not rethrown");
    std::atomic<size_t> sum{0};
    pool.parallel_for(1000, 2, [&](size_t item, unsigned) { sum += item; });
    if (sum != 499500) return std::string("pool broken after an exception");
    return std::string();
  });
  harness::add("thread pool: a caller arriving while another job has the workers runs its items itself, not waiting", [] {
    lowbit::ThreadPool pool(2);
    BusyPool busy(pool);
    auto second = std::async(std::launch::async, [&] {
      std::vector<unsigned> seen(100, 99);
      pool.parallel_for(100, 2, [&](size_t item, unsigned thread) { seen[item] = thread; });
      return seen;
    });
    const bool finished = second.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
    busy.release();
    if (!finished) return std::string("the second caller waited for the first job");
    for (unsigned t : second.get())
      if (t != 0) return std::string("the second caller's items ran on another thread than its own");
    return std::string();
  });
  harness::add("thread pool: a caller that found the workers busy shares its remaining items once they are free", [] {
    lowbit::ThreadPool pool(2);
    BusyPool busy(pool);
    constexpr size_t kItems = 200;
    std::vector<std::atomic<int>> runs(kItems);
    std::vector<unsigned> thread_of(kItems, 99);
    pool.parallel_for(kItems, 2, [&](size_t item, unsigned thread) {
      runs[item]++;
      thread_of[item] = thread;
      if (item == 10) busy.release();  // the first job is over: the workers are free from the next item on
      if (item > 10) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    });
    for (size_t i = 0; i < kItems; ++i)
      if (runs[i] != 1) return str("item ", i, " ran ", int(runs[i]), " times");
    for (size_t i = 0; i <= 10; ++i)
      if (thread_of[i] != 0) return str("item ", i, " (before the workers were free) ran on thread ", thread_of[i]);
    if (std::count(thread_of.begin(), thread_of.end(), 1u) == 0)
      return std::string("no item ran on the worker after it was free: the caller kept them all");
    return std::string();
  });
}
