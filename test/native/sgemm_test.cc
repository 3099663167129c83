// Native tests of the float32 training kernels: every SGEMM kernel against the
// scalar reference (odd sizes, tails, long K, all transposes, accumulate),
// bit-identical results for 1, 2 and 3 threads; im2col/col2im against naive
// loops and each other (adjointness); BatchNormalization against double math.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

#include "harness.h"
#include "lowbit/sgemm.h"

using harness::Rng;
using harness::str;
using namespace lowbit;

void register_sgemm_tests();

namespace {

const CpuFeatures& cpu() {
  static const CpuFeatures f = detect_cpu_features(/*request_amx=*/false);
  return f;
}

struct KernelCase {
  const char* name;
  const SgemmKernel* kernel;
  bool supported;
  const char* missing;
};

std::vector<KernelCase> kernels() {
  return {
#if defined(__x86_64__)
      {"avx512", sgemm_kernel_avx512(), cpu().avx512f && cpu().avx512vl && cpu().avx512dq, "no AVX-512F (with VL, DQ)"},
      {"avx2", sgemm_kernel_avx2(), cpu().avx2 && cpu().fma, "no AVX2 + FMA"},
#endif
      // (The scalar kernel is the reference itself: it is checked against a naive loop below.)
  };
}

std::vector<float> random_floats(size_t n, Rng& rng, float lo = -1.0f, float hi = 1.0f) {
  std::vector<float> v(n);
  for (auto& x : v) x = rng.range(lo, hi);
  return v;
}

struct Problem {
  bool ta, tb;
  size_t m, n, k;
  bool accumulate;
  std::vector<float> a, b, c0;
  float a_at(size_t i, size_t p) const { return ta ? a[p * m + i] : a[i * k + p]; }
  float b_at(size_t p, size_t j) const { return tb ? b[j * k + p] : b[p * n + j]; }
  SgemmArgs args(float* c) const {
    SgemmArgs g;
    g.trans_a = ta;
    g.trans_b = tb;
    g.m = m;
    g.n = n;
    g.k = k;
    g.a = a.data();
    g.b = b.data();
    g.c = c;
    g.accumulate = accumulate;
    return g;
  }
};

Problem make_problem(bool ta, bool tb, size_t m, size_t n, size_t k, bool accumulate, Rng& rng) {
  Problem p{ta, tb, m, n, k, accumulate, random_floats(m * k, rng), random_floats(k * n, rng), random_floats(m * n, rng)};
  return p;
}

std::vector<float> run(const SgemmKernel& kernel, const Problem& p, ThreadPool& pool, unsigned threads) {
  std::vector<float> c = p.c0;
  sgemm(kernel, p.args(c.data()), &pool, threads);
  return c;
}

std::string describe(const char* kernel, const Problem& p) {
  return str(kernel, " m=", p.m, " n=", p.n, " k=", p.k, " transA=", p.ta, " transB=", p.tb, " accumulate=", p.accumulate);
}

// got vs want within 1e-5·(Σ|a b| + |c0|) + 1e-30 per element.
std::string compare(const char* kernel, const Problem& p, const std::vector<float>& want, const std::vector<float>& got) {
  for (size_t i = 0; i < p.m; ++i)
    for (size_t j = 0; j < p.n; ++j) {
      double mag = p.accumulate ? std::fabs(double(p.c0[i * p.n + j])) : 0.0;
      for (size_t q = 0; q < p.k; ++q) mag += std::fabs(double(p.a_at(i, q)) * double(p.b_at(q, j)));
      const double w = want[i * p.n + j], g = got[i * p.n + j];
      if (!(std::fabs(w - g) <= 1e-5 * mag + 1e-30))
        return str(describe(kernel, p), ": at (", i, ", ", j, ") want ", w, " got ", g, " (Σ|ab| = ", mag, ")");
    }
  return "";
}

std::string check_kernel(const SgemmKernel& kernel, const Problem& p, ThreadPool& pool) {
  const auto want = run(*sgemm_kernel_scalar(), p, pool, 1);
  const auto got1 = run(kernel, p, pool, 1);
  std::string why = compare(kernel.name, p, want, got1);
  if (!why.empty()) return why;
  for (unsigned threads : {2u, 3u}) {
    const auto got = run(kernel, p, pool, threads);
    if (std::memcmp(got.data(), got1.data(), got.size() * sizeof(float)) != 0)
      return str(describe(kernel.name, p), ": ", threads, " threads differ from 1 thread");
  }
  return "";
}

const size_t kSizes[] = {0, 1, 2, 3, 5, 7, 13, 17, 31, 33, 64, 65, 100, 257};

// ---------------------------------------------------------------------------
// im2col / col2im

struct Geo {
  size_t batch;
  ConvGeometry g;
};

ConvGeometry geometry(size_t c, size_t h, size_t w, size_t kh, size_t kw, size_t pt, size_t pl, size_t pb, size_t pr,
                      size_t sh, size_t sw, size_t dh, size_t dw) {
  ConvGeometry g;
  g.channels = c;
  g.height = h;
  g.width = w;
  g.kernel_h = kh;
  g.kernel_w = kw;
  g.pad_top = pt;
  g.pad_left = pl;
  g.stride_h = sh;
  g.stride_w = sw;
  g.dilation_h = dh;
  g.dilation_w = dw;
  const long eh = long(dh * (kh - 1) + 1), ew = long(dw * (kw - 1) + 1);
  g.out_h = size_t(std::max(0L, (long(h + pt + pb) - eh) / long(sh) + 1));
  g.out_w = size_t(std::max(0L, (long(w + pl + pr) - ew) / long(sw) + 1));
  return g;
}

std::vector<Geo> geometries() {
  return {
      {2, geometry(3, 7, 6, 3, 3, 1, 1, 1, 1, 2, 2, 2, 2)},   // stride 2, pad 1, dilation 2
      {1, geometry(1, 5, 5, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1)},
      {3, geometry(4, 8, 9, 3, 2, 0, 2, 1, 0, 1, 3, 1, 1)},   // asymmetric padding and strides
      {2, geometry(2, 4, 4, 1, 1, 0, 0, 0, 0, 2, 2, 1, 1)},   // 1×1, stride 2
      {1, geometry(2, 3, 3, 5, 5, 3, 3, 3, 3, 1, 1, 1, 1)},   // padding wider than the image
      {2, geometry(3, 11, 10, 3, 3, 2, 1, 0, 2, 3, 2, 2, 3)},
      {4, geometry(8, 28, 28, 5, 5, 2, 2, 2, 2, 1, 1, 1, 1)},
  };
}

long signed_at(size_t o, size_t stride, size_t pad, size_t k, size_t dilation) {
  return long(o * stride) - long(pad) + long(k * dilation);
}

std::vector<float> naive_im2col(const std::vector<float>& x, const Geo& geo) {
  const auto& g = geo.g;
  std::vector<float> col(geo.batch * g.col_rows() * g.col_cols());
  size_t idx = 0;
  for (size_t n = 0; n < geo.batch; ++n)
    for (size_t c = 0; c < g.channels; ++c)
      for (size_t ky = 0; ky < g.kernel_h; ++ky)
        for (size_t kx = 0; kx < g.kernel_w; ++kx)
          for (size_t oy = 0; oy < g.out_h; ++oy)
            for (size_t ox = 0; ox < g.out_w; ++ox) {
              const long iy = signed_at(oy, g.stride_h, g.pad_top, ky, g.dilation_h);
              const long ix = signed_at(ox, g.stride_w, g.pad_left, kx, g.dilation_w);
              const bool in = iy >= 0 && ix >= 0 && iy < long(g.height) && ix < long(g.width);
              col[idx++] = in ? x[((n * g.channels + c) * g.height + size_t(iy)) * g.width + size_t(ix)] : 0.0f;
            }
  return col;
}

std::vector<float> naive_col2im(const std::vector<float>& col, const Geo& geo) {
  const auto& g = geo.g;
  std::vector<float> dx(geo.batch * g.channels * g.height * g.width, 0.0f);
  size_t idx = 0;
  for (size_t n = 0; n < geo.batch; ++n)
    for (size_t c = 0; c < g.channels; ++c)
      for (size_t ky = 0; ky < g.kernel_h; ++ky)
        for (size_t kx = 0; kx < g.kernel_w; ++kx)
          for (size_t oy = 0; oy < g.out_h; ++oy)
            for (size_t ox = 0; ox < g.out_w; ++ox, ++idx) {
              const long iy = signed_at(oy, g.stride_h, g.pad_top, ky, g.dilation_h);
              const long ix = signed_at(ox, g.stride_w, g.pad_left, kx, g.dilation_w);
              if (iy >= 0 && ix >= 0 && iy < long(g.height) && ix < long(g.width))
                dx[((n * g.channels + c) * g.height + size_t(iy)) * g.width + size_t(ix)] += col[idx];
            }
  return dx;
}

std::string geo_name(const Geo& geo) {
  const auto& g = geo.g;
  return str("batch ", geo.batch, " C", g.channels, " ", g.height, "x", g.width, " k", g.kernel_h, "x", g.kernel_w,
             " pad ", g.pad_top, ",", g.pad_left, " stride ", g.stride_h, ",", g.stride_w, " dilation ", g.dilation_h,
             ",", g.dilation_w, " out ", g.out_h, "x", g.out_w);
}

// ---------------------------------------------------------------------------
// BatchNormalization in double

struct BnWant {
  std::vector<double> y, mean, var, inv_std, dx, d_gamma, d_beta;
};

BnWant naive_bn(const std::vector<float>& x, const std::vector<float>& dy, size_t batch, size_t channels, size_t spatial,
                const std::vector<float>& gamma, const std::vector<float>& beta, double eps) {
  BnWant w;
  const size_t total = batch * channels * spatial;
  w.y.resize(total);
  w.dx.resize(total);
  const double count = double(batch * spatial);
  for (size_t c = 0; c < channels; ++c) {
    auto at = [&](size_t b, size_t s) { return (b * channels + c) * spatial + s; };
    double sum = 0, sq = 0;
    for (size_t b = 0; b < batch; ++b)
      for (size_t s = 0; s < spatial; ++s) sum += x[at(b, s)];
    const double mu = sum / count;
    for (size_t b = 0; b < batch; ++b)
      for (size_t s = 0; s < spatial; ++s) sq += (x[at(b, s)] - mu) * (x[at(b, s)] - mu);
    const double var = sq / count, is = 1.0 / std::sqrt(var + eps);
    double sdy = 0, sdyx = 0;
    for (size_t b = 0; b < batch; ++b)
      for (size_t s = 0; s < spatial; ++s) {
        const double xh = (x[at(b, s)] - mu) * is;
        w.y[at(b, s)] = gamma[c] * xh + beta[c];
        sdy += dy[at(b, s)];
        sdyx += dy[at(b, s)] * xh;
      }
    for (size_t b = 0; b < batch; ++b)
      for (size_t s = 0; s < spatial; ++s) {
        const double xh = (x[at(b, s)] - mu) * is;
        w.dx[at(b, s)] = gamma[c] * is / count * (count * dy[at(b, s)] - sdy - xh * sdyx);
      }
    w.mean.push_back(mu);
    w.var.push_back(var);
    w.inv_std.push_back(is);
    w.d_gamma.push_back(sdyx);
    w.d_beta.push_back(sdy);
  }
  return w;
}

// |got - want| <= rel·scale + abs
std::string close(const char* what, const std::vector<float>& got, const std::vector<double>& want, double rel,
                  double scale_floor) {
  for (size_t i = 0; i < want.size(); ++i) {
    const double tol = rel * std::max(std::fabs(want[i]), scale_floor);
    if (!(std::fabs(double(got[i]) - want[i]) <= tol)) return str(what, "[", i, "]: want ", want[i], " got ", got[i]);
  }
  return "";
}

}  // namespace

void register_sgemm_tests() {
  for (const auto& kc : kernels()) {
    const std::string skip = kc.kernel && kc.supported ? "" : str(kc.missing, kc.kernel ? "" : " (not built)");
    for (int trans = 0; trans < 4; ++trans) {
      const bool ta = trans & 1, tb = trans & 2;
      for (bool acc : {false, true}) {
        const std::string name = str("sgemm ", kc.name, " vs scalar reference: transA=", ta, " transB=", tb,
                                     " accumulate=", acc, ", sampled sizes {0..257}^3, threads 1/2/3 identical");
        harness::add(name, [=] {
          Rng rng(1000 + trans * 2 + acc);
          ThreadPool pool(3);
          const size_t count = sizeof(kSizes) / sizeof(kSizes[0]);
          // Every size appears in every position, plus random triples.
          for (size_t s = 0; s < count + 40; ++s) {
            size_t m, n, k;
            if (s < count) {
              m = kSizes[s];
              n = kSizes[(s + 5) % count];
              k = kSizes[(s + 9) % count];
            } else {
              m = kSizes[rng.integer(0, int(count) - 1)];
              n = kSizes[rng.integer(0, int(count) - 1)];
              k = kSizes[rng.integer(0, int(count) - 1)];
              if (m * n * k > 2000000) k = 17;
            }
            const Problem p = make_problem(ta, tb, m, n, k, acc, rng);
            std::string why = check_kernel(*kc.kernel, p, pool);
            if (!why.empty()) return why;
          }
          return std::string();
        }, skip);
      }
      harness::add(str("sgemm ", kc.name, " long K and training shapes: transA=", ta, " transB=", tb), [=] {
        Rng rng(2000 + trans);
        ThreadPool pool(3);
        const size_t shapes[][3] = {{3, 5, 1000}, {33, 65, 1031}, {8, 17, 2049}, {64, 100, 1000},
                                    {16, 784, 72}, {32, 10, 3136}, {9, 400, 257}};
        for (const auto& s : shapes)
          for (bool acc : {false, true}) {
            const Problem p = make_problem(ta, tb, s[0], s[1], s[2], acc, rng);
            std::string why = check_kernel(*kc.kernel, p, pool);
            if (!why.empty()) return why;
          }
        return std::string();
      }, skip);
    }
  }

  harness::add("sgemm scalar reference equals the naive float triple loop bit for bit: every transpose and accumulate, "
               "each size of {0, 1, 2, 3, 5, 7, 13, 17, 31, 33, 64, 65, 100, 257} in every position, long K, threads 1/2/3", [] {
    Rng rng(7);
    ThreadPool pool(3);
    const size_t count = sizeof(kSizes) / sizeof(kSizes[0]);
    std::vector<std::array<size_t, 3>> shapes;
    for (size_t s = 0; s < count; ++s) shapes.push_back({kSizes[s], kSizes[(s + 5) % count], kSizes[(s + 9) % count]});
    for (const auto& s : std::vector<std::array<size_t, 3>>{{13, 1100, 37}, {3, 5, 1000}, {8, 17, 2049}, {2, 0, 3}, {4, 3, 0}})
      shapes.push_back(s);
    for (int trans = 0; trans < 4; ++trans)
      for (bool acc : {false, true})
        for (const auto& [m, n, k] : shapes) {
          const Problem p = make_problem(trans & 1, trans & 2, m, n, k, acc, rng);
          for (unsigned threads : {1u, 2u, 3u}) {
            const auto got = run(*sgemm_kernel_scalar(), p, pool, threads);
            for (size_t i = 0; i < p.m; ++i)
              for (size_t j = 0; j < p.n; ++j) {
                float s = 0.0f;
                for (size_t q = 0; q < p.k; ++q) s += p.a_at(i, q) * p.b_at(q, j);
                if (acc) s = p.c0[i * p.n + j] + s;
                if (std::memcmp(&s, &got[i * p.n + j], sizeof(float)) != 0)
                  return str(describe("scalar", p), " threads ", threads, ": at (", i, ", ", j, ") want ", s, " got ", got[i * p.n + j]);
              }
          }
        }
    return std::string();
  });

  harness::add("sgemm kernels: scalar is always available and listed last; unknown names are refused", [] {
    auto names = available_sgemm_kernels(cpu());
    if (names.empty() || names.back() != "scalar") return std::string("scalar is not the last kernel");
    if (find_sgemm_kernel("", cpu()) == nullptr || find_sgemm_kernel("", cpu())->name != names.front())
      return std::string("the default kernel is not the first listed");
    if (find_sgemm_kernel("bogus", cpu()) != nullptr) return std::string("an unknown name was accepted");
    return std::string();
  });

  for (const auto& geo : geometries()) {
    harness::add("im2col and col2im equal the naive loops, are adjoint, and are thread-count independent: " + geo_name(geo), [geo] {
      const auto& g = geo.g;
      Rng rng(geo.batch * 131 + g.channels * 17 + g.height);
      ThreadPool pool(3);
      const size_t xs = geo.batch * g.channels * g.height * g.width, cs = geo.batch * g.col_rows() * g.col_cols();
      const auto x = random_floats(xs, rng), c = random_floats(cs, rng);
      std::vector<float> col(cs, 123.0f), dx(xs, 123.0f);
      im2col(x.data(), geo.batch, g, col.data(), &pool, 1);
      if (col != naive_im2col(x, geo)) return std::string("im2col differs from the naive loop");
      col2im(c.data(), geo.batch, g, dx.data(), &pool, 1);
      const auto want_dx = naive_col2im(c, geo);
      if (std::memcmp(dx.data(), want_dx.data(), xs * sizeof(float)) != 0) return std::string("col2im differs from the naive loop");
      double lhs = 0, rhs = 0, mag = 0;
      for (size_t i = 0; i < cs; ++i) lhs += double(col[i]) * c[i], mag += std::fabs(double(col[i]) * c[i]);
      for (size_t i = 0; i < xs; ++i) rhs += double(x[i]) * dx[i];
      if (std::fabs(lhs - rhs) > 1e-5 * mag + 1e-12) return str("<im2col(x), c> = ", lhs, " but <x, col2im(c)> = ", rhs);
      for (unsigned threads : {2u, 3u}) {
        std::vector<float> col2(cs, -1.0f), dx2(xs, -1.0f);
        im2col(x.data(), geo.batch, g, col2.data(), &pool, threads);
        col2im(c.data(), geo.batch, g, dx2.data(), &pool, threads);
        if (col2 != col || std::memcmp(dx2.data(), dx.data(), xs * sizeof(float)) != 0)
          return str(threads, " threads differ from 1 thread");
      }
      return std::string();
    });
  }

  const size_t bn_shapes[][3] = {{4, 3, 49}, {1, 5, 1}, {8, 16, 196}, {2, 1, 1000}, {32, 8, 1}};
  for (const auto& s : bn_shapes) {
    for (float offset : {0.0f, 100.0f}) {
      harness::add(str("batchNorm forward/backward vs double math: batch ", s[0], " channels ", s[1], " spatial ", s[2],
                       " data offset ", offset, ", threads 1/2 identical"), [s, offset] {
        const size_t batch = s[0], channels = s[1], spatial = s[2], total = batch * channels * spatial;
        Rng rng(batch * 7 + channels * 3 + spatial + size_t(offset));
        ThreadPool pool(2);
        const auto x = random_floats(total, rng, offset - 2.0f, offset + 2.0f), dy = random_floats(total, rng);
        const auto gamma = random_floats(channels, rng, 0.5f, 2.0f), beta = random_floats(channels, rng);
        const float eps = 1e-5f;
        const BnWant w = naive_bn(x, dy, batch, channels, spatial, gamma, beta, eps);
        std::vector<float> out[2][7];
        for (unsigned threads : {1u, 2u}) {
          auto& o = out[threads - 1];
          o[0].assign(total, 9.0f);  // y
          for (int i = 1; i < 4; ++i) o[i].assign(channels, 9.0f);  // mean, var, invStd
          o[4].assign(total, 9.0f);  // dx
          o[5].assign(channels, 9.0f);
          o[6].assign(channels, 9.0f);
          batch_norm_forward(x.data(), batch, channels, spatial, gamma.data(), beta.data(), eps, o[0].data(), o[1].data(),
                             o[2].data(), o[3].data(), &pool, threads);
          batch_norm_backward(x.data(), dy.data(), batch, channels, spatial, gamma.data(), o[1].data(), o[3].data(),
                              o[4].data(), o[5].data(), o[6].data(), &pool, threads);
        }
        for (int i = 0; i < 7; ++i)
          if (out[0][i] != out[1][i]) return str("output ", i, ": 2 threads differ from 1 thread");
        const auto& o = out[0];
        // x̂ is rounded to float: ~1e-7 relative to |x| / std, which the offset data makes large.
        const double rel = offset == 0.0f ? 2e-5 : 2e-3;
        std::string why;
        if (why.empty()) why = close("mean", o[1], w.mean, 1e-6, 1e-6);
        if (why.empty()) why = close("variance", o[2], w.var, 1e-5, 1e-6);
        if (why.empty()) why = close("invStd", o[3], w.inv_std, 1e-5, 1e-6);
        if (why.empty()) why = close("y", o[0], w.y, rel, 1.0);
        if (why.empty()) why = close("dx", o[4], w.dx, rel, 1.0);
        if (why.empty()) why = close("dGamma", o[5], w.d_gamma, rel, std::sqrt(double(batch * spatial)));
        if (why.empty()) why = close("dBeta", o[6], w.d_beta, 1e-5, std::sqrt(double(batch * spatial)));
        return why;
      });
    }
  }
}
