// Native tests of the training engine's activations and pooling against naive
// loops written like the TypeScript reference (float64 arithmetic, Math.min /
// Math.max spelled out): bit-identical results (any NaN matches any NaN) for
// odd sizes, NaN/±inf/±0 inputs, ties, stride/pad/dilation and windows past
// the edge, and for 1, 2 and 3 threads.
#include <cmath>
#include <cstring>
#include <limits>

#include "harness.h"
#include "lowbit/train_ops.h"

using harness::Rng;
using harness::str;
using namespace lowbit;

void register_train_ops_tests();

namespace {

const double kInf = std::numeric_limits<double>::infinity();
const double kNaN = std::numeric_limits<double>::quiet_NaN();

// JavaScript's Math.max / Math.min of two numbers.
double js_max(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return kNaN;
  if (a == b) return std::signbit(a) ? b : a;  // +0 beats -0
  return a > b ? a : b;
}
double js_min(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return kNaN;
  if (a == b) return std::signbit(a) ? a : b;  // -0 beats +0
  return a < b ? a : b;
}

// ops.ts's forward and derivative, in double; the caller rounds to float.
double naive_f(Activation kind, double v, double alpha, double beta) {
  switch (kind) {
    case Activation::kRelu: return v > 0 ? v : 0;
    case Activation::kClip: return js_min(beta, js_max(alpha, v));
    case Activation::kHardSigmoid: return js_max(0, js_min(1, alpha * v + beta));
    case Activation::kHardSwish: return v * js_max(0, js_min(1, v / 6 + 0.5));
  }
  return kNaN;
}
double naive_df(Activation kind, double v, double alpha, double beta) {
  switch (kind) {
    case Activation::kRelu: return v > 0 ? 1 : 0;
    case Activation::kClip: return v > alpha && v < beta ? 1 : 0;
    case Activation::kHardSigmoid: {
      const double t = alpha * v + beta;
      return t > 0 && t < 1 ? alpha : 0;
    }
    case Activation::kHardSwish: return v <= -3 ? 0 : v >= 3 ? 1 : v / 3 + 0.5;
  }
  return kNaN;
}

// Same bits, or both NaN.
bool same(float a, float b) { return (std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, sizeof(float)) == 0; }

std::string first_difference(const char* what, const std::vector<float>& got, const std::vector<float>& want,
                             const std::vector<float>* input = nullptr) {
  if (got.size() != want.size()) return str(what, ": size ", got.size(), " != ", want.size());
  for (size_t i = 0; i < got.size(); ++i)
    if (!same(got[i], want[i]))
      return str(what, "[", i, "]: want ", want[i], " (signbit ", std::signbit(want[i]), ") got ", got[i], " (signbit ",
                 std::signbit(got[i]), ")", input ? str(" for x = ", (*input)[i]) : std::string());
  return "";
}

// Random values with the special cases sprinkled in.
std::vector<float> activation_inputs(size_t n, Rng& rng) {
  const float specials[] = {float(kNaN), float(kInf), float(-kInf), 0.0f, -0.0f, 3.0f, -3.0f, 6.0f, -2.5f, 2.5f, 1.0f,
                            0.1f, 1e-40f, -1e-40f, 3.4e38f, -3.4e38f, 0.7f, 2.0f, -6.0f, 5.0f};
  std::vector<float> x(n);
  for (size_t i = 0; i < n; ++i)
    x[i] = rng.integer(0, 3) == 0 ? specials[rng.integer(0, int(sizeof(specials) / sizeof(float)) - 1)] : rng.range(-8.0f, 8.0f);
  return x;
}

// Odd sizes, one chunk + 1, and enough to be threaded.
const size_t kActivationSizes[] = {0, 1, 7, 33, 1000, 16385, 70001};

struct ActCase {
  Activation kind;
  const char* name;
  double alpha, beta;
};

std::vector<ActCase> activation_cases() {
  return {
      {Activation::kRelu, "relu", 0, 0},
      {Activation::kHardSwish, "hardSwish", 0, 0},
      {Activation::kClip, "clip [0, 6]", 0, 6},
      {Activation::kClip, "clip [-inf, inf]", -kInf, kInf},
      {Activation::kClip, "clip [-inf, 0]", -kInf, 0},
      {Activation::kClip, "clip [-0, +inf]", -0.0, kInf},
      {Activation::kClip, "clip [-1, -0]", -1, -0.0},
      {Activation::kClip, "clip [0.1, 0.7] (bounds not float32 values)", 0.1, 0.7},
      {Activation::kClip, "clip [2, 1] (min > max)", 2, 1},
      {Activation::kClip, "clip [NaN, 1]", kNaN, 1},
      {Activation::kClip, "clip [0, NaN]", 0, kNaN},
      {Activation::kClip, "clip [1e300, inf] (bound beyond float32)", 1e300, kInf},
      {Activation::kHardSigmoid, "hardSigmoid 0.2, 0.5", double(0.2f), double(0.5f)},
      {Activation::kHardSigmoid, "hardSigmoid 1/6, 0.5 (double)", 1.0 / 6.0, 0.5},
      {Activation::kHardSigmoid, "hardSigmoid -0.3, 0.1", -0.3, 0.1},
  };
}

// ---------------------------------------------------------------------------
// Pooling

struct PoolCase {
  size_t batch;
  ConvGeometry g;
  const char* what;
};

// out_h/out_w from pads (bottom/right) and ceil_mode, as ops.ts axisGeometry does.
size_t out_size(size_t size, size_t k, size_t stride, size_t dilation, size_t pad_begin, size_t pad_end, bool ceil_mode) {
  const long extent = long(dilation * (k - 1) + 1), span = long(size + pad_begin + pad_end) - extent;
  long out = (ceil_mode ? (span + long(stride) - 1) / long(stride) : span / long(stride)) + 1;
  if (ceil_mode && (out - 1) * long(stride) >= long(size + pad_begin)) out--;
  return size_t(std::max(0L, out));
}

ConvGeometry pool_geometry(size_t c, size_t h, size_t w, size_t kh, size_t kw, size_t pt, size_t pl, size_t pb, size_t pr,
                           size_t sh, size_t sw, size_t dh, size_t dw, bool ceil_mode) {
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
  g.out_h = out_size(h, kh, sh, dh, pt, pb, ceil_mode);
  g.out_w = out_size(w, kw, sw, dw, pl, pr, ceil_mode);
  return g;
}

std::vector<PoolCase> pool_cases() {
  return {
      {2, pool_geometry(3, 8, 8, 2, 2, 0, 0, 0, 0, 2, 2, 1, 1, false), "2x2 stride 2"},
      {2, pool_geometry(3, 7, 9, 3, 3, 1, 1, 1, 1, 2, 2, 1, 1, true), "3x3 stride 2 pad 1 ceil"},
      {1, pool_geometry(2, 7, 7, 2, 2, 0, 0, 0, 0, 2, 2, 1, 1, true), "2x2 stride 2 ceil (windows past the edge)"},
      {3, pool_geometry(2, 9, 8, 3, 2, 2, 1, 0, 2, 2, 3, 2, 1, false), "asymmetric pads, strides, dilation 2"},
      {1, pool_geometry(2, 10, 11, 3, 3, 1, 2, 1, 1, 3, 2, 2, 2, true), "dilation 2 ceil"},
      {2, pool_geometry(1, 3, 3, 2, 2, 3, 3, 3, 3, 1, 1, 1, 1, false), "pads wider than the kernel (empty windows)"},
      {1, pool_geometry(2, 5, 4, 5, 4, 0, 0, 0, 0, 1, 1, 1, 1, false), "window = the whole image"},
      {2, pool_geometry(4, 13, 13, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, false), "3x3 stride 1 pad 1"},
      {8, pool_geometry(16, 28, 28, 2, 2, 0, 0, 0, 0, 2, 2, 1, 1, false), "threaded size 8x16x28x28"},
  };
}

std::string pool_name(const PoolCase& c) {
  const auto& g = c.g;
  return str(c.what, ": batch ", c.batch, " C", g.channels, " ", g.height, "x", g.width, " k", g.kernel_h, "x", g.kernel_w,
             " pad ", g.pad_top, ",", g.pad_left, " stride ", g.stride_h, ",", g.stride_w, " dilation ", g.dilation_h, ",",
             g.dilation_w, " out ", g.out_h, "x", g.out_w);
}

// ops.ts pool(): every tap checked, padding counted as it does.
struct NaivePool {
  std::vector<float> y;
  std::vector<int32_t> arg;
  std::vector<double> divisor;  // per output position
};

NaivePool naive_pool(const std::vector<float>& x, const PoolCase& c, bool max, bool count_pad) {
  const auto& g = c.g;
  const size_t planes = c.batch * g.channels, out = g.out_h * g.out_w;
  NaivePool r{std::vector<float>(planes * out), std::vector<int32_t>(planes * out), std::vector<double>(out)};
  for (size_t p = 0; p < planes; ++p)
    for (size_t oy = 0; oy < g.out_h; ++oy)
      for (size_t ox = 0; ox < g.out_w; ++ox) {
        double best = -kInf, sum = 0;
        long best_at = -1, count = 0, padded = 0;
        for (size_t ky = 0; ky < g.kernel_h; ++ky)
          for (size_t kx = 0; kx < g.kernel_w; ++kx) {
            const long iy = long(oy * g.stride_h) - long(g.pad_top) + long(ky * g.dilation_h);
            const long ix = long(ox * g.stride_w) - long(g.pad_left) + long(kx * g.dilation_w);
            if (iy < 0 || iy >= long(g.height) || ix < 0 || ix >= long(g.width)) {
              if (iy < long(g.height + g.pad_top) && ix < long(g.width + g.pad_left)) padded++;
              continue;
            }
            const long at = long(p * g.height * g.width) + iy * long(g.width) + ix;
            const double v = x[size_t(at)];
            if (v > best || best_at < 0) best = v, best_at = at;
            sum += v;
            count++;
          }
        const size_t o = p * out + oy * g.out_w + ox;
        if (max) {
          r.y[o] = float(best);
          r.arg[o] = int32_t(best_at);
        } else {
          const double divisor = double(count_pad ? count + padded : count);
          r.y[o] = float(sum / divisor);
          r.divisor[oy * g.out_w + ox] = divisor;
        }
      }
  return r;
}

std::vector<float> naive_average_backward(const std::vector<float>& dy, const PoolCase& c, const std::vector<double>& divisor) {
  const auto& g = c.g;
  const size_t planes = c.batch * g.channels, out = g.out_h * g.out_w, plane = g.height * g.width;
  std::vector<float> dx(planes * plane, 0.0f);
  for (size_t p = 0; p < planes; ++p)
    for (size_t oy = 0; oy < g.out_h; ++oy)
      for (size_t ox = 0; ox < g.out_w; ++ox) {
        const double d = double(dy[p * out + oy * g.out_w + ox]) / divisor[oy * g.out_w + ox];
        for (size_t ky = 0; ky < g.kernel_h; ++ky) {
          const long iy = long(oy * g.stride_h) - long(g.pad_top) + long(ky * g.dilation_h);
          if (iy < 0 || iy >= long(g.height)) continue;
          for (size_t kx = 0; kx < g.kernel_w; ++kx) {
            const long ix = long(ox * g.stride_w) - long(g.pad_left) + long(kx * g.dilation_w);
            if (ix >= 0 && ix < long(g.width)) {
              float& v = dx[p * plane + size_t(iy) * g.width + size_t(ix)];
              v = float(double(v) + d);
            }
          }
        }
      }
  return dx;
}

}  // namespace

void register_train_ops_tests() {
  for (const auto& ac : activation_cases()) {
    harness::add(str("activation ", ac.name, " forward/backward equal the naive float64 loops bit for bit (NaN, ±inf, ±0, "
                     "sizes 0..70001), threads 1/2/3 identical"), [ac] {
      ThreadPool pool(3);
      Rng rng(size_t(ac.kind) * 31 + size_t(std::fabs(ac.alpha) * 7 + 3));
      for (size_t n : kActivationSizes) {
        const auto x = activation_inputs(n, rng), dy = activation_inputs(n, rng);
        std::vector<float> want_y(n), want_dx(n);
        for (size_t i = 0; i < n; ++i) {
          want_y[i] = float(naive_f(ac.kind, x[i], ac.alpha, ac.beta));
          want_dx[i] = float(double(dy[i]) * naive_df(ac.kind, x[i], ac.alpha, ac.beta));
        }
        for (unsigned threads : {1u, 2u, 3u}) {
          std::vector<float> y(n, 77.0f), dx(n, 77.0f);
          activation_forward(ac.kind, x.data(), n, y.data(), ac.alpha, ac.beta, &pool, threads);
          activation_backward(ac.kind, x.data(), dy.data(), n, dx.data(), ac.alpha, ac.beta, &pool, threads);
          std::string why = first_difference("y", y, want_y, &x);
          if (why.empty()) why = first_difference("dx", dx, want_dx, &x);
          if (!why.empty()) return str("n = ", n, ", ", threads, " threads: ", why);
        }
      }
      return std::string();
    });
  }

  for (const auto& pc : pool_cases()) {
    harness::add("maxPool forward/backward equal the naive loops (ties, NaN, -inf), threads 1/2/3 identical: " + pool_name(pc),
                 [pc] {
      const auto& g = pc.g;
      ThreadPool pool(3);
      Rng rng(pc.batch * 101 + g.height * 7 + g.kernel_h);
      const size_t xs = pc.batch * g.channels * g.height * g.width, ys = pc.batch * g.channels * g.out_h * g.out_w;
      // Small integers: many ties. A few NaN and -inf.
      std::vector<float> x(xs);
      for (auto& v : x) {
        const int r = rng.integer(0, 40);
        v = r == 0 ? float(kNaN) : r == 1 ? float(-kInf) : float(rng.integer(-2, 2));
      }
      std::vector<float> dy(ys);
      for (auto& v : dy) v = rng.range(-1.0f, 1.0f);
      const NaivePool want = naive_pool(x, pc, true, false);
      std::vector<float> want_dx(xs, 0.0f);
      for (size_t i = 0; i < ys; ++i)
        if (want.arg[i] >= 0) want_dx[size_t(want.arg[i])] = float(double(want_dx[size_t(want.arg[i])]) + double(dy[i]));
      for (unsigned threads : {1u, 2u, 3u}) {
        std::vector<float> y(ys, 5.0f), dx(xs, 5.0f);
        std::vector<int32_t> arg(ys, 12345);
        max_pool_forward(x.data(), pc.batch, g, y.data(), arg.data(), &pool, threads);
        if (arg != want.arg) {
          for (size_t i = 0; i < ys; ++i)
            if (arg[i] != want.arg[i]) return str(threads, " threads: argmax[", i, "] = ", arg[i], ", want ", want.arg[i]);
        }
        std::string why = first_difference("y", y, want.y);
        if (!why.empty()) return str(threads, " threads: ", why);
        if (max_pool_backward(dy.data(), arg.data(), ys, dx.data(), xs) != -1) return std::string("backward refused argmax");
        why = first_difference("dx", dx, want_dx);
        if (!why.empty()) return str(threads, " threads: ", why);
      }
      return std::string();
    });

    for (bool count_pad : {false, true}) {
      harness::add(str("averagePool count_include_pad=", count_pad,
                       " forward/backward equal the naive loops bit for bit, threads 1/2/3 identical: ", pool_name(pc)),
                   [pc, count_pad] {
        const auto& g = pc.g;
        ThreadPool pool(3);
        Rng rng(pc.batch * 103 + g.width * 5 + count_pad);
        const size_t xs = pc.batch * g.channels * g.height * g.width, ys = pc.batch * g.channels * g.out_h * g.out_w;
        std::vector<float> x(xs), dy(ys);
        for (auto& v : x) v = rng.range(-3.0f, 3.0f);
        for (auto& v : dy) v = rng.range(-1.0f, 1.0f);
        const NaivePool want = naive_pool(x, pc, false, count_pad);
        const auto want_dx = naive_average_backward(dy, pc, want.divisor);
        for (unsigned threads : {1u, 2u, 3u}) {
          std::vector<float> y(ys, 5.0f), dx(xs, 5.0f);
          average_pool_forward(x.data(), pc.batch, g, count_pad, y.data(), &pool, threads);
          average_pool_backward(dy.data(), pc.batch, g, count_pad, dx.data(), &pool, threads);
          std::string why = first_difference("y", y, want.y);
          if (why.empty()) why = first_difference("dx", dx, want_dx);
          if (!why.empty()) return str(threads, " threads: ", why);
        }
        return std::string();
      });
    }
  }

  for (const auto& pc : pool_cases()) {
    harness::add("depthwise conv forward/backward equal the naive loops bit for bit, threads 1/2/3 identical: " + pool_name(pc), [pc] {
      const auto& g = pc.g;
      ThreadPool pool(3);
      Rng rng(pc.batch * 107 + g.width * 3 + g.kernel_w);
      const size_t planes = pc.batch * g.channels, taps = g.kernel_h * g.kernel_w;
      const size_t xs = planes * g.height * g.width, ys = planes * g.out_h * g.out_w;
      std::vector<float> x(xs), w(g.channels * taps), dy(ys);
      for (auto& v : x) v = rng.range(-3.0f, 3.0f);
      for (auto& v : w) v = rng.range(-1.0f, 1.0f);
      for (auto& v : dy) v = rng.range(-1.0f, 1.0f);
      // Every tap checked against the image bounds; sums in the documented orders.
      std::vector<float> want_y(ys, 0.0f), want_dx(xs, 0.0f), want_dw(w.size());
      std::vector<double> dw_sum(w.size(), 0.0);
      for (size_t p = 0; p < planes; ++p)
        for (size_t ky = 0; ky < g.kernel_h; ++ky)
          for (size_t kx = 0; kx < g.kernel_w; ++kx)
            for (size_t oy = 0; oy < g.out_h; ++oy)
              for (size_t ox = 0; ox < g.out_w; ++ox) {
                const long iy = long(oy * g.stride_h + ky * g.dilation_h) - long(g.pad_top);
                const long ix = long(ox * g.stride_w + kx * g.dilation_w) - long(g.pad_left);
                if (iy < 0 || ix < 0 || iy >= long(g.height) || ix >= long(g.width)) continue;
                const size_t xi = (p * g.height + size_t(iy)) * g.width + size_t(ix), yi = (p * g.out_h + oy) * g.out_w + ox;
                const size_t wi = (p % g.channels) * taps + ky * g.kernel_w + kx;
                want_y[yi] = want_y[yi] + w[wi] * x[xi];
                want_dx[xi] = want_dx[xi] + w[wi] * dy[yi];
              }
      for (size_t c = 0; c < g.channels; ++c)
        for (size_t t = 0; t < taps; ++t)
          for (size_t n = 0; n < pc.batch; ++n)
            for (size_t oy = 0; oy < g.out_h; ++oy)
              for (size_t ox = 0; ox < g.out_w; ++ox) {
                const long iy = long(oy * g.stride_h + (t / g.kernel_w) * g.dilation_h) - long(g.pad_top);
                const long ix = long(ox * g.stride_w + (t % g.kernel_w) * g.dilation_w) - long(g.pad_left);
                if (iy < 0 || ix < 0 || iy >= long(g.height) || ix >= long(g.width)) continue;
                const size_t p = n * g.channels + c;
                dw_sum[c * taps + t] += double(dy[(p * g.out_h + oy) * g.out_w + ox]) * double(x[(p * g.height + size_t(iy)) * g.width + size_t(ix)]);
              }
      for (size_t i = 0; i < w.size(); ++i) want_dw[i] = float(dw_sum[i]);
      for (unsigned threads : {1u, 2u, 3u}) {
        std::vector<float> y(ys, 5.0f), dx(xs, 5.0f), dw(w.size(), 5.0f);
        depthwise_conv_forward(x.data(), w.data(), pc.batch, g, y.data(), &pool, threads);
        depthwise_conv_backward_input(dy.data(), w.data(), pc.batch, g, dx.data(), &pool, threads);
        depthwise_conv_backward_weight(dy.data(), x.data(), pc.batch, g, dw.data(), &pool, threads);
        std::string why = first_difference("y", y, want_y);
        if (why.empty()) why = first_difference("dx", dx, want_dx);
        if (why.empty()) why = first_difference("dw", dw, want_dw);
        if (!why.empty()) return str(threads, " threads: ", why);
      }
      return std::string();
    });
  }

  harness::add("maxPool backward: argmax -1 is skipped, collisions add in order, an out-of-range argmax is refused untouched", [] {
    const float dy[] = {1.0f, 2.0f, 1e8f, 1.0f, -1e8f};
    const int32_t arg[] = {0, -1, 2, 2, 2};
    std::vector<float> dx(3, 9.0f);
    if (max_pool_backward(dy, arg, 5, dx.data(), 3) != -1) return std::string("refused a valid argmax");
    // ((1e8 + 1) in float = 1e8) - 1e8 = 0: the order is the array's.
    if (dx[0] != 1.0f || dx[1] != 0.0f || dx[2] != 0.0f) return str("dx = ", dx[0], ", ", dx[1], ", ", dx[2]);
    const int32_t bad[] = {0, 3};
    const int32_t neg[] = {-2};
    std::vector<float> untouched(3, 9.0f);
    if (max_pool_backward(dy, bad, 2, untouched.data(), 3) != 1) return std::string("argmax 3 of 3 accepted");
    if (max_pool_backward(dy, neg, 1, untouched.data(), 3) != 0) return std::string("argmax -2 accepted");
    if (untouched != std::vector<float>(3, 9.0f)) return std::string("a refused call wrote dx");
    return std::string();
  });
}
