// Activations and pooling for the training engine. See train_ops.h.
#include "lowbit/train_ops.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace lowbit {

namespace {

constexpr size_t kChunk = 16384;          // elements per element-wise work item
constexpr size_t kSerialBelow = 65536;    // waking the pool costs more than it saves below this
constexpr double kSerialWorkBelow = 32768.0;  // pooling: window taps

// Runs body(begin, end) over [0, n) in fixed chunks.
template <class Body>
void for_chunks(size_t n, ThreadPool* pool, unsigned threads, const Body& body) {
  if (n == 0) return;
  if (n < kSerialBelow) threads = 1;
  const size_t chunks = (n + kChunk - 1) / kChunk;
  pool->parallel_for(chunks, threads, [&](size_t c, unsigned) { body(c * kChunk, std::min(n, (c + 1) * kChunk)); });
}

// Clip in T (float when both bounds are float32 values, else double, as the
// reference compares float32 x with float64 bounds). The comparisons are
// Math.max(lo, x) and Math.min(hi, ·): NaN x propagates, and on a ±0 tie max
// prefers +0 and min -0; which form does that depends on the bound's sign bit.
template <class T, bool kLoNeg, bool kHiNeg>
void clip_loop(const float* x, float* y, size_t begin, size_t end, T lo, T hi) {
  for (size_t i = begin; i < end; ++i) {
    const T t = T(x[i]);
    const T m = kLoNeg ? (t < lo ? lo : t) : (t <= lo ? lo : t);
    y[i] = float(kHiNeg ? (m >= hi ? hi : m) : (m > hi ? hi : m));
  }
}

template <class T>
void clip_range(const float* x, float* y, size_t begin, size_t end, T lo, T hi) {
  const bool ln = std::signbit(lo), hn = std::signbit(hi);
  if (ln && hn) clip_loop<T, true, true>(x, y, begin, end, lo, hi);
  else if (ln) clip_loop<T, true, false>(x, y, begin, end, lo, hi);
  else if (hn) clip_loop<T, false, true>(x, y, begin, end, lo, hi);
  else clip_loop<T, false, false>(x, y, begin, end, lo, hi);
}

template <class T>
void clip_grad_range(const float* x, const float* dy, float* dx, size_t begin, size_t end, T lo, T hi) {
  for (size_t i = begin; i < end; ++i) {
    const T t = T(x[i]);
    dx[i] = dy[i] * (t > lo && t < hi ? 1.0f : 0.0f);
  }
}

bool is_float_value(double v) { return double(float(v)) == v; }  // also true for ±inf

}  // namespace

void activation_forward(Activation kind, const float* x, size_t n, float* y, double alpha, double beta,
                        ThreadPool* pool, unsigned threads) {
  if (kind == Activation::kClip && (std::isnan(alpha) || std::isnan(beta))) {
    std::fill_n(y, n, std::numeric_limits<float>::quiet_NaN());  // Math.max/min with a NaN bound
    return;
  }
  const bool clip_in_float = is_float_value(alpha) && is_float_value(beta);
  for_chunks(n, pool, threads, [&](size_t begin, size_t end) {
    switch (kind) {
      case Activation::kRelu:
        for (size_t i = begin; i < end; ++i) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
        break;
      case Activation::kClip:
        if (clip_in_float) clip_range<float>(x, y, begin, end, float(alpha), float(beta));
        else clip_range<double>(x, y, begin, end, alpha, beta);
        break;
      case Activation::kHardSigmoid:
        // In double, like the reference: alpha·x + beta may round differently in float.
        for (size_t i = begin; i < end; ++i) {
          const double t = alpha * double(x[i]) + beta;
          const double m = t > 1.0 ? 1.0 : t;  // NaN stays
          y[i] = float(m <= 0.0 ? 0.0 : m);    // -0 becomes +0, as Math.max(0, -0)
        }
        break;
      case Activation::kHardSwish:
        for (size_t i = begin; i < end; ++i) {
          const double v = double(x[i]);
          double s = v / 6.0 + 0.5;  // a division, not ·(1/6): that rounds differently
          s = s > 1.0 ? 1.0 : s;
          s = s <= 0.0 ? 0.0 : s;
          y[i] = float(v * s);
        }
        break;
    }
  });
}

void activation_backward(Activation kind, const float* x, const float* dy, size_t n, float* dx, double alpha,
                         double beta, ThreadPool* pool, unsigned threads) {
  const bool clip_in_float = is_float_value(alpha) && is_float_value(beta);
  for_chunks(n, pool, threads, [&](size_t begin, size_t end) {
    switch (kind) {
      case Activation::kRelu:
        for (size_t i = begin; i < end; ++i) dx[i] = dy[i] * (x[i] > 0.0f ? 1.0f : 0.0f);
        break;
      case Activation::kClip:
        // NaN bounds compare false: a zero derivative, as in the reference.
        if (clip_in_float) clip_grad_range<float>(x, dy, dx, begin, end, float(alpha), float(beta));
        else clip_grad_range<double>(x, dy, dx, begin, end, alpha, beta);
        break;
      case Activation::kHardSigmoid:
        for (size_t i = begin; i < end; ++i) {
          const double t = alpha * double(x[i]) + beta;
          dx[i] = float(double(dy[i]) * (t > 0.0 && t < 1.0 ? alpha : 0.0));
        }
        break;
      case Activation::kHardSwish:
        for (size_t i = begin; i < end; ++i) {
          const double v = double(x[i]);
          const double d = v <= -3.0 ? 0.0 : v >= 3.0 ? 1.0 : v / 3.0 + 0.5;
          dx[i] = float(double(dy[i]) * d);
        }
        break;
    }
  });
}

// ---------------------------------------------------------------------------
// Pooling

namespace {

// One output row (or column) of windows: taps [lo, hi) are inside the image;
// taps [0, counted) lie before size + pad (count_include_pad's divisor).
struct AxisWindow {
  int64_t base;  // o·stride - pad
  size_t lo, hi, counted;
};

// The first tap k in [0, taps] with base + k·dilation >= limit.
size_t first_tap(int64_t base, size_t dilation, int64_t limit, size_t taps) {
  if (base >= limit) return 0;
  const uint64_t need = uint64_t(limit - base), d = dilation;
  return size_t(std::min<uint64_t>((need + d - 1) / d, taps));
}

std::vector<AxisWindow> axis_windows(size_t out, size_t stride, size_t pad, size_t dilation, size_t taps, size_t size) {
  std::vector<AxisWindow> w(out);
  for (size_t o = 0; o < out; ++o) {
    const int64_t base = int64_t(o * stride) - int64_t(pad);
    const size_t lo = first_tap(base, dilation, 0, taps);
    const size_t hi = std::max(lo, first_tap(base, dilation, int64_t(size), taps));
    w[o] = {base, lo, hi, first_tap(base, dilation, int64_t(size + pad), taps)};
  }
  return w;
}

struct PoolPlan {
  std::vector<AxisWindow> rows, cols;
  size_t plane_in, plane_out, planes;
  unsigned threads;
  PoolPlan(size_t batch, const ConvGeometry& g, unsigned requested)
      : rows(axis_windows(g.out_h, g.stride_h, g.pad_top, g.dilation_h, g.kernel_h, g.height)),
        cols(axis_windows(g.out_w, g.stride_w, g.pad_left, g.dilation_w, g.kernel_w, g.width)),
        plane_in(g.height * g.width),
        plane_out(g.out_h * g.out_w),
        planes(batch * g.channels),
        threads(double(planes) * double(plane_out) * double(g.kernel_h * g.kernel_w) < kSerialWorkBelow ? 1
                                                                                                          : requested) {}
  size_t divisor(const AxisWindow& r, const AxisWindow& c, bool count_include_pad) const {
    return count_include_pad ? r.counted * c.counted : (r.hi - r.lo) * (c.hi - c.lo);
  }
};

}  // namespace

void max_pool_forward(const float* x, size_t batch, const ConvGeometry& g, float* y, int32_t* argmax, ThreadPool* pool,
                      unsigned threads) {
  const PoolPlan plan(batch, g, threads);
  pool->parallel_for(plan.planes, plan.threads, [&](size_t p, unsigned) {
    const float* src = x + p * plan.plane_in;
    float* out = y + p * plan.plane_out;
    int32_t* arg = argmax + p * plan.plane_out;
    for (size_t oy = 0; oy < g.out_h; ++oy) {
      const AxisWindow& r = plan.rows[oy];
      for (size_t ox = 0; ox < g.out_w; ++ox) {
        const AxisWindow& c = plan.cols[ox];
        float best = -std::numeric_limits<float>::infinity();
        int64_t at = -1;
        for (size_t ky = r.lo; ky < r.hi; ++ky) {
          const size_t row = size_t(r.base + int64_t(ky * g.dilation_h)) * g.width;
          for (size_t kx = c.lo; kx < c.hi; ++kx) {
            const size_t i = row + size_t(c.base + int64_t(kx * g.dilation_w));
            // The reference's `v > best || bestAt < 0`: ties keep the first, NaN never wins later.
            if (at < 0 || src[i] > best) {
              best = src[i];
              at = int64_t(i);
            }
          }
        }
        out[oy * g.out_w + ox] = best;
        arg[oy * g.out_w + ox] = at < 0 ? -1 : int32_t(p * plan.plane_in + size_t(at));
      }
    }
  });
}

ptrdiff_t max_pool_backward(const float* dy, const int32_t* argmax, size_t n, float* dx, size_t dx_len) {
  for (size_t i = 0; i < n; ++i)
    if (argmax[i] < -1 || (argmax[i] >= 0 && size_t(argmax[i]) >= dx_len)) return ptrdiff_t(i);
  std::fill_n(dx, dx_len, 0.0f);
  for (size_t i = 0; i < n; ++i) {
    const int32_t at = argmax[i];  // read once and bounded again: a shared buffer may change between the loops
    if (at >= 0 && size_t(at) < dx_len) dx[at] += dy[i];
  }
  return -1;
}

void average_pool_forward(const float* x, size_t batch, const ConvGeometry& g, bool count_include_pad, float* y,
                          ThreadPool* pool, unsigned threads) {
  const PoolPlan plan(batch, g, threads);
  pool->parallel_for(plan.planes, plan.threads, [&](size_t p, unsigned) {
    const float* src = x + p * plan.plane_in;
    float* out = y + p * plan.plane_out;
    for (size_t oy = 0; oy < g.out_h; ++oy) {
      const AxisWindow& r = plan.rows[oy];
      for (size_t ox = 0; ox < g.out_w; ++ox) {
        const AxisWindow& c = plan.cols[ox];
        double sum = 0;  // in double and scan order, as the reference
        for (size_t ky = r.lo; ky < r.hi; ++ky) {
          const float* row = src + size_t(r.base + int64_t(ky * g.dilation_h)) * g.width;
          for (size_t kx = c.lo; kx < c.hi; ++kx) sum += row[size_t(c.base + int64_t(kx * g.dilation_w))];
        }
        out[oy * g.out_w + ox] = float(sum / double(plan.divisor(r, c, count_include_pad)));
      }
    }
  });
}

void average_pool_backward(const float* dy, size_t batch, const ConvGeometry& g, bool count_include_pad, float* dx,
                           ThreadPool* pool, unsigned threads) {
  const PoolPlan plan(batch, g, threads);
  pool->parallel_for(plan.planes, plan.threads, [&](size_t p, unsigned) {
    const float* in = dy + p * plan.plane_out;
    float* dst = dx + p * plan.plane_in;
    std::fill_n(dst, plan.plane_in, 0.0f);
    for (size_t oy = 0; oy < g.out_h; ++oy) {
      const AxisWindow& r = plan.rows[oy];
      for (size_t ox = 0; ox < g.out_w; ++ox) {
        const AxisWindow& c = plan.cols[ox];
        // d stays double and each add rounds to float, exactly as `dx[i] += dy / divisor` in TypeScript.
        const double d = double(in[oy * g.out_w + ox]) / double(plan.divisor(r, c, count_include_pad));
        for (size_t ky = r.lo; ky < r.hi; ++ky) {
          float* row = dst + size_t(r.base + int64_t(ky * g.dilation_h)) * g.width;
          for (size_t kx = c.lo; kx < c.hi; ++kx) {
            float& v = row[size_t(c.base + int64_t(kx * g.dilation_w))];
            v = float(double(v) + d);
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------
// Depthwise convolution

namespace {

// Outputs [lo, hi) whose input o·stride - pad + tap·dilation lies in [0, size).
struct TapSpan {
  size_t lo, hi;
  int64_t offset;  // input index of output 0: tap·dilation - pad
};

TapSpan tap_span(size_t out, size_t stride, size_t pad, size_t dilation, size_t tap, size_t size) {
  const int64_t offset = int64_t(tap * dilation) - int64_t(pad);
  const int64_t s = int64_t(stride);
  // o·s + offset >= 0  <=>  o >= ceil(-offset / s); o·s + offset <= size - 1  <=>  o <= floor((size - 1 - offset) / s).
  const int64_t last = int64_t(size) - 1 - offset;
  const int64_t lo = std::min<int64_t>(int64_t(out), offset >= 0 ? 0 : (-offset + s - 1) / s);
  const int64_t hi = std::max<int64_t>(lo, last < 0 ? 0 : std::min<int64_t>(int64_t(out), last / s + 1));
  return {size_t(lo), size_t(hi), offset};
}

struct DepthwisePlan {
  std::vector<TapSpan> rows, cols;  // per ky, per kx
  size_t plane_in, plane_out, taps;
  unsigned threads;
  DepthwisePlan(size_t batch, const ConvGeometry& g, unsigned requested) : plane_in(g.height * g.width), plane_out(g.out_h * g.out_w),
                                                                            taps(g.kernel_h * g.kernel_w) {
    for (size_t ky = 0; ky < g.kernel_h; ++ky) rows.push_back(tap_span(g.out_h, g.stride_h, g.pad_top, g.dilation_h, ky, g.height));
    for (size_t kx = 0; kx < g.kernel_w; ++kx) cols.push_back(tap_span(g.out_w, g.stride_w, g.pad_left, g.dilation_w, kx, g.width));
    threads = double(batch * g.channels) * double(plane_out) * double(taps) < kSerialWorkBelow ? 1 : requested;
  }

  // For each tap (ky, kx order) and output row, the in-image run: row_op(tap, x_at, y_at, count) where
  // output y_at + i reads image position x_at + i·stride_w of the plane.
  template <class RowOp>
  void for_each_run(const ConvGeometry& g, const RowOp& row_op) const {
    for (size_t ky = 0; ky < g.kernel_h; ++ky) {
      const TapSpan& r = rows[ky];
      for (size_t kx = 0; kx < g.kernel_w; ++kx) {
        const TapSpan& c = cols[kx];
        for (size_t oy = r.lo; oy < r.hi; ++oy) {
          const size_t x_at = size_t(int64_t(oy * g.stride_h) + r.offset) * g.width + size_t(int64_t(c.lo * g.stride_w) + c.offset);
          row_op(ky * g.kernel_w + kx, x_at, oy * g.out_w + c.lo, c.hi - c.lo);
        }
      }
    }
  }
};

}  // namespace

void depthwise_conv_forward(const float* x, const float* w, size_t batch, const ConvGeometry& g, float* y, ThreadPool* pool,
                            unsigned threads) {
  const DepthwisePlan plan(batch, g, threads);
  pool->parallel_for(batch * g.channels, plan.threads, [&](size_t p, unsigned) {
    const float* src = x + p * plan.plane_in;
    const float* filter = w + (p % g.channels) * plan.taps;
    float* out = y + p * plan.plane_out;
    std::fill_n(out, plan.plane_out, 0.0f);
    plan.for_each_run(g, [&](size_t tap, size_t x_at, size_t y_at, size_t count) {
      const float wv = filter[tap];
      if (g.stride_w == 1) {  // contiguous: vectorizes
        for (size_t i = 0; i < count; ++i) out[y_at + i] += wv * src[x_at + i];
      } else {
        for (size_t i = 0; i < count; ++i) out[y_at + i] += wv * src[x_at + i * g.stride_w];
      }
    });
  });
}

void depthwise_conv_backward_input(const float* dy, const float* w, size_t batch, const ConvGeometry& g, float* dx,
                                   ThreadPool* pool, unsigned threads) {
  const DepthwisePlan plan(batch, g, threads);
  pool->parallel_for(batch * g.channels, plan.threads, [&](size_t p, unsigned) {
    const float* grad = dy + p * plan.plane_out;
    const float* filter = w + (p % g.channels) * plan.taps;
    float* dst = dx + p * plan.plane_in;
    std::fill_n(dst, plan.plane_in, 0.0f);
    plan.for_each_run(g, [&](size_t tap, size_t x_at, size_t y_at, size_t count) {
      const float wv = filter[tap];
      if (g.stride_w == 1) {
        for (size_t i = 0; i < count; ++i) dst[x_at + i] += wv * grad[y_at + i];
      } else {
        for (size_t i = 0; i < count; ++i) dst[x_at + i * g.stride_w] += wv * grad[y_at + i];
      }
    });
  });
}

void depthwise_conv_backward_weight(const float* dy, const float* x, size_t batch, const ConvGeometry& g, float* dw,
                                    ThreadPool* pool, unsigned threads) {
  const DepthwisePlan plan(batch, g, threads);
  pool->parallel_for(g.channels, plan.threads, [&](size_t ch, unsigned) {
    // Images outermost: each tap's sum still runs over (image, oy, ox) in order.
    std::vector<double> sums(plan.taps, 0.0);
    for (size_t n = 0; n < batch; ++n) {
      const size_t p = n * g.channels + ch;
      const float* src = x + p * plan.plane_in;
      const float* grad = dy + p * plan.plane_out;
      plan.for_each_run(g, [&](size_t tap, size_t x_at, size_t y_at, size_t count) {
        double sum = sums[tap];
        for (size_t i = 0; i < count; ++i) sum += double(grad[y_at + i]) * double(src[x_at + i * g.stride_w]);
        sums[tap] = sum;
      });
    }
    for (size_t t = 0; t < plan.taps; ++t) dw[ch * plan.taps + t] = float(sums[t]);
  });
}

}  // namespace lowbit
