// Layout walking for the tensor-level entry points (see quantize.h).
#include "lowbit/quantize.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "lowbit/rounding.h"

namespace lowbit {

void params_from_range(float lo, float hi, int32_t qmin, int32_t qmax, bool symmetric,
                       float* scale, int32_t* zero_point) {
  if (!(lo <= hi)) lo = hi = 0.0f;  // a group without finite values
  const double rmin = std::min(double(lo), 0.0);
  const double rmax = std::max(double(hi), 0.0);
  double s;
  if (symmetric) {
    const double magnitude = qmin < 0 ? std::max(-rmin, rmax) : rmax;
    s = magnitude / double(qmax);
  } else {
    s = (rmax - rmin) / double(qmax - qmin);
  }
  float fs = float(s);
  int32_t zp = 0;
  if (!(fs >= std::numeric_limits<float>::min()) || !std::isfinite(fs)) {
    fs = 1.0f;  // zero-width (or vanishing) range: onnxruntime uses scale 1, zero point 0
  } else if (!symmetric) {
    double z = std::nearbyint(double(qmin) - rmin / double(fs));
    zp = int32_t(std::min(std::max(z, double(qmin)), double(qmax)));
  }
  *scale = fs;
  *zero_point = zp;
}

namespace {

constexpr size_t kChunk = 1 << 16;  // elements per work item

// A contiguous run of elements whose parameters start at `group`: one shared
// (scale, zp) for kShared, one per element for kPerElement, one per block of
// block_size elements for kPerBlock.
struct Piece {
  enum Mode { kShared, kPerElement, kPerBlock };
  size_t offset;
  size_t len;
  size_t group;
  Mode mode;
};

// Splits a layout into lines (contiguous spans with a regular parameter
// pattern) and lines into chunks of at most kChunk elements: the work items.
class PieceGrid {
 public:
  explicit PieceGrid(const QuantLayout& l) : l_(l) {
    if (l.kind == Granularity::kTensor) {
      lines_ = 1;
      line_len_ = l.element_count();
      along_axis_ = false;
    } else if (l.inner > 1) {
      lines_ = l.outer * l.axis_len;
      line_len_ = l.inner;
      along_axis_ = false;
    } else {
      lines_ = l.outer;
      line_len_ = l.axis_len * l.inner;  // inner is 0 or 1 here
      along_axis_ = true;
    }
    chunk_ = kChunk;
    if (along_axis_ && l.kind == Granularity::kBlock)
      chunk_ = std::max(l.block_size, kChunk / l.block_size * l.block_size);
    chunks_per_line_ = line_len_ == 0 ? 0 : (line_len_ + chunk_ - 1) / chunk_;
  }

  size_t count() const { return lines_ * chunks_per_line_; }

  Piece at(size_t k) const {
    const size_t line = k / chunks_per_line_;
    const size_t start = (k % chunks_per_line_) * chunk_;
    const size_t len = std::min(chunk_, line_len_ - start);
    const size_t offset = line * line_len_ + start;
    if (l_.kind == Granularity::kTensor) return {offset, len, 0, Piece::kShared};
    if (!along_axis_) {
      const size_t o = line / l_.axis_len, d = line % l_.axis_len;
      if (l_.kind == Granularity::kChannel) return {offset, len, d, Piece::kShared};
      const size_t group = (o * l_.blocks_per_axis() + d / l_.block_size) * l_.inner + start;
      return {offset, len, group, Piece::kPerElement};
    }
    if (l_.kind == Granularity::kChannel) return {offset, len, start, Piece::kPerElement};
    return {offset, len, line * l_.blocks_per_axis() + start / l_.block_size, Piece::kPerBlock};
  }

  // Calls run(offset, len, group) for shared-parameter runs and
  // per_element(offset, len, group) for per-element runs.
  template <class Run, class PerElement>
  void visit(const Piece& p, Run&& run, PerElement&& per_element) const {
    switch (p.mode) {
      case Piece::kShared: run(p.offset, p.len, p.group); break;
      case Piece::kPerElement: per_element(p.offset, p.len, p.group); break;
      case Piece::kPerBlock:
        for (size_t s = 0; s < p.len; s += l_.block_size)
          run(p.offset + s, std::min(l_.block_size, p.len - s), p.group + s / l_.block_size);
        break;
    }
  }

  // True when no two pieces share a group (so pieces may write group results directly).
  bool pieces_own_groups() const { return along_axis_ && l_.kind == Granularity::kBlock; }

 private:
  QuantLayout l_;
  size_t lines_ = 0, line_len_ = 0, chunk_ = kChunk, chunks_per_line_ = 0;
  bool along_axis_ = false;
};

int64_t first_nan(const float* x, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (std::isnan(x[i])) return int64_t(i);
  return kNoNaN;
}

// The elements of group g, contiguous: either a pointer into x or a copy in scratch.
const float* group_elements(const QuantLayout& l, size_t g, const float* x,
                            std::vector<float>& scratch, size_t* n) {
  switch (l.kind) {
    case Granularity::kTensor:
      *n = l.element_count();
      return x;
    case Granularity::kChannel:
      if (l.outer == 1) {
        *n = l.inner;
        return x + g * l.inner;
      }
      scratch.resize(l.outer * l.inner);
      for (size_t o = 0; o < l.outer; ++o)
        std::copy_n(x + (o * l.axis_len + g) * l.inner, l.inner, scratch.data() + o * l.inner);
      *n = scratch.size();
      return scratch.data();
    case Granularity::kBlock: {
      const size_t nb = l.blocks_per_axis();
      const size_t i = g % l.inner, j = (g / l.inner) % nb, o = g / l.inner / nb;
      const size_t d0 = j * l.block_size, d1 = std::min(l.axis_len, d0 + l.block_size);
      *n = d1 - d0;
      if (l.inner == 1) return x + o * l.axis_len + d0;
      scratch.resize(*n);
      for (size_t d = d0; d < d1; ++d) scratch[d - d0] = x[(o * l.axis_len + d) * l.inner + i];
      return scratch.data();
    }
  }
  *n = 0;
  return x;
}

}  // namespace

int64_t quantize_tensor(const Exec& exec, const float* x, const QuantParams& params, uint8_t* out) {
  const PieceGrid grid(params.layout);
  const QuantizeKernels& k = *exec.kernels;
  std::atomic<bool> nan{false};
  exec.pool->parallel_for(grid.count(), exec.threads, [&](size_t item, unsigned) {
    bool piece_nan = false;
    grid.visit(
        grid.at(item),
        [&](size_t off, size_t len, size_t g) {
          piece_nan |= k.quantize_run(x + off, len, params.scale[g], params.zero_point[g],
                                      params.qmin, params.qmax, out + off);
        },
        [&](size_t off, size_t len, size_t g) {
          piece_nan |= k.quantize_vec(x + off, len, params.scale + g, params.zero_point + g,
                                      params.qmin, params.qmax, out + off);
        });
    if (piece_nan) nan.store(true, std::memory_order_relaxed);
  });
  return nan.load() ? first_nan(x, params.layout.element_count()) : kNoNaN;
}

void dequantize_tensor(const Exec& exec, const uint8_t* q, bool is_signed,
                       const QuantParams& params, float* out) {
  const PieceGrid grid(params.layout);
  const QuantizeKernels& k = *exec.kernels;
  exec.pool->parallel_for(grid.count(), exec.threads, [&](size_t item, unsigned) {
    grid.visit(
        grid.at(item),
        [&](size_t off, size_t len, size_t g) {
          k.dequantize_run(q + off, len, is_signed, params.scale[g], params.zero_point[g], out + off);
        },
        [&](size_t off, size_t len, size_t g) {
          k.dequantize_vec(q + off, len, is_signed, params.scale + g, params.zero_point + g,
                           out + off);
        });
  });
}

int64_t group_ranges(const Exec& exec, const float* x, const QuantLayout& layout, float* lo,
                     float* hi) {
  const PieceGrid grid(layout);
  const QuantizeKernels& k = *exec.kernels;
  const size_t groups = layout.group_count();
  std::fill_n(lo, groups, INFINITY);
  std::fill_n(hi, groups, -INFINITY);
  std::atomic<bool> nan{false};
  // Pieces that share groups reduce into per-thread partials merged below;
  // min and max are exact, so the merge order does not matter.
  const bool direct = grid.pieces_own_groups();
  const unsigned threads = exec.pool->threads_for(grid.count(), exec.threads);
  std::vector<float> partial(direct ? 0 : size_t(threads) * groups * 2);
  for (unsigned t = 0; t < (direct ? 0u : threads); ++t) {
    std::fill_n(partial.begin() + size_t(t) * groups * 2, groups, INFINITY);
    std::fill_n(partial.begin() + size_t(t) * groups * 2 + groups, groups, -INFINITY);
  }
  exec.pool->parallel_for(grid.count(), threads, [&](size_t item, unsigned t) {
    float* plo = direct ? lo : partial.data() + size_t(t) * groups * 2;
    float* phi = direct ? hi : plo + groups;
    bool piece_nan = false;
    grid.visit(
        grid.at(item),
        [&](size_t off, size_t len, size_t g) {
          piece_nan |= k.finite_range(x + off, len, plo + g, phi + g);
        },
        [&](size_t off, size_t len, size_t g) {
          for (size_t i = 0; i < len; ++i) {
            const float v = x[off + i];
            if (std::isnan(v)) piece_nan = true;
            if (!is_finite_value(v)) continue;
            plo[g + i] = v < plo[g + i] ? v : plo[g + i];
            phi[g + i] = v > phi[g + i] ? v : phi[g + i];
          }
        });
    if (piece_nan) nan.store(true, std::memory_order_relaxed);
  });
  if (!direct) {
    for (unsigned t = 0; t < threads; ++t) {
      const float* plo = partial.data() + size_t(t) * groups * 2;
      const float* phi = plo + groups;
      for (size_t g = 0; g < groups; ++g) {
        lo[g] = plo[g] < lo[g] ? plo[g] : lo[g];
        hi[g] = phi[g] > hi[g] ? phi[g] : hi[g];
      }
    }
  }
  return nan.load() ? first_nan(x, layout.element_count()) : kNoNaN;
}

namespace {

// Σ |x - x̂| over finite x, in element order (one definition for every path).
double abs_error(const float* x, size_t n, float scale, int32_t zp, int32_t qmin, int32_t qmax) {
  double sum = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!is_finite_value(x[i])) continue;
    const float e = x[i] - dequantize_value(quantize_value(x[i], scale, zp, qmin, qmax), scale, zp);
    sum += std::fabs(double(e));
  }
  return sum;
}

double range_error(const QuantizeKernels& k, const float* data, size_t n, float lo, float hi, int32_t qmin,
                   int32_t qmax, bool symmetric, int norm) {
  float scale;
  int32_t zp;
  params_from_range(lo, hi, qmin, qmax, symmetric, &scale, &zp);
  return norm == 1 ? abs_error(data, n, scale, zp, qmin, qmax) : k.squared_error(data, n, scale, zp, qmin, qmax);
}

}  // namespace

void group_errors(const Exec& exec, const float* x, const QuantLayout& layout, const float* lo,
                  const float* hi, int32_t qmin, int32_t qmax, bool symmetric, int norm, double* out) {
  const size_t groups = layout.group_count();
  const unsigned threads = exec.pool->threads_for(groups, exec.threads);
  std::vector<std::vector<float>> scratch(threads);
  exec.pool->parallel_for(groups, threads, [&](size_t g, unsigned t) {
    size_t n;
    const float* data = group_elements(layout, g, x, scratch[t], &n);
    out[g] = range_error(*exec.kernels, data, n, lo[g], hi[g], qmin, qmax, symmetric, norm);
  });
}

int64_t search_ranges_mse(const Exec& exec, const float* x, const QuantLayout& layout,
                          int32_t qmin, int32_t qmax, bool symmetric, unsigned candidates,
                          float* lo, float* hi, int norm) {
  const int64_t nan = group_ranges(exec, x, layout, lo, hi);
  if (nan != kNoNaN) return nan;
  const size_t groups = layout.group_count();
  candidates = std::max(1u, candidates);
  const QuantizeKernels& k = *exec.kernels;
  auto candidate_range = [&](size_t g, unsigned c, float* clo, float* chi) {
    const float ratio = float(double(candidates - c) / double(candidates));
    *clo = lo[g] * ratio;
    *chi = hi[g] * ratio;
  };
  auto candidate_error = [&](size_t g, unsigned c, const float* data, size_t n) {
    float clo, chi;
    candidate_range(g, c, &clo, &chi);
    return range_error(k, data, n, clo, chi, qmin, qmax, symmetric, norm);
  };
  auto pick = [&](size_t g, const std::vector<double>& err) {
    unsigned best = 0;
    for (unsigned c = 1; c < candidates; ++c)
      if (err[c] < err[best]) best = c;  // ties keep the wider range
    float clo, chi;
    candidate_range(g, best, &clo, &chi);
    lo[g] = clo;
    hi[g] = chi;
  };
  auto searchable = [&](size_t g) { return lo[g] <= hi[g] && (lo[g] != 0.0f || hi[g] != 0.0f); };
  const unsigned threads = exec.pool->threads_for(groups, exec.threads);
  if (groups >= 2 * size_t(threads)) {
    // Many groups: one thread searches a whole group.
    std::vector<std::vector<float>> scratch(threads);
    std::vector<std::vector<double>> errors(threads, std::vector<double>(candidates));
    exec.pool->parallel_for(groups, threads, [&](size_t g, unsigned t) {
      if (!searchable(g)) return;
      size_t n;
      const float* data = group_elements(layout, g, x, scratch[t], &n);
      for (unsigned c = 0; c < candidates; ++c) errors[t][c] = candidate_error(g, c, data, n);
      pick(g, errors[t]);
    });
  } else {
    // Few large groups: the candidates of one group run in parallel.
    std::vector<float> scratch;
    std::vector<double> errors(candidates);
    for (size_t g = 0; g < groups; ++g) {
      if (!searchable(g)) continue;
      size_t n;
      const float* data = group_elements(layout, g, x, scratch, &n);
      exec.pool->parallel_for(candidates, exec.threads, [&](size_t c, unsigned) {
        errors[c] = candidate_error(g, unsigned(c), data, n);
      });
      pick(g, errors);
    }
  }
  for (size_t g = 0; g < groups; ++g)
    if (!(lo[g] <= hi[g])) lo[g] = hi[g] = 0.0f;
  return kNoNaN;
}

int64_t finite_range(const float* x, size_t n, float* min, float* max, size_t* finite) {
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  size_t count = 0;
  for (size_t i = 0; i < n; ++i) {
    const float v = x[i];
    if (std::isnan(v)) return int64_t(i);
    if (std::isinf(v)) continue;
    ++count;
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  *min = lo;
  *max = hi;
  *finite = count;
  return kNoNaN;
}

size_t histogram_add(const float* x, size_t n, double bins_per_unit, size_t bins, double* counts,
                     double* negative_counts) {
  size_t zeros = 0;
  const double last = double(bins - 1);
  for (size_t i = 0; i < n; ++i) {
    const float v = x[i];
    if (!std::isfinite(v)) continue;
    const double at = std::fabs(double(v)) * bins_per_unit;
    const size_t b = at < last ? size_t(at) : bins - 1;  // floor: at is not negative (and never NaN here)
    counts[b] += 1;
    if (v < 0) negative_counts[b] += 1;
    else if (v == 0) ++zeros;
  }
  return zeros;
}

int64_t group_moments(const Exec& exec, const float* x, const QuantLayout& layout, GroupMoments* out) {
  const size_t groups = layout.group_count();
  std::vector<float> lo(groups), hi(groups);
  const int64_t nan = group_ranges(exec, x, layout, lo.data(), hi.data());
  if (nan != kNoNaN) return nan;
  out->count.assign(groups, 0);
  out->mean.assign(groups, 0);
  out->mean_abs_dev.assign(groups, 0);
  out->sum_sq_dev.assign(groups, 0);
  out->min.assign(lo.begin(), lo.end());
  out->max.assign(hi.begin(), hi.end());
  // One thread per group, elements in a fixed order: the same sums for any thread count.
  const unsigned threads = exec.pool->threads_for(groups, exec.threads);
  std::vector<std::vector<float>> scratch(threads);
  exec.pool->parallel_for(groups, threads, [&](size_t g, unsigned t) {
    size_t n;
    const float* data = group_elements(layout, g, x, scratch[t], &n);
    double count = 0, sum = 0;
    for (size_t i = 0; i < n; ++i) {
      if (!is_finite_value(data[i])) continue;
      count += 1;
      sum += data[i];
    }
    const double mean = count > 0 ? sum / count : 0;
    double abs_dev = 0, sq_dev = 0;
    for (size_t i = 0; i < n; ++i) {
      if (!is_finite_value(data[i])) continue;
      const double d = double(data[i]) - mean;
      abs_dev += std::fabs(d);
      sq_dev += d * d;
    }
    out->count[g] = count;
    out->mean[g] = mean;
    out->mean_abs_dev[g] = count > 0 ? abs_dev / count : 0;
    out->sum_sq_dev[g] = sq_dev;
  });
  return kNoNaN;
}

void lsq_forward_tensor(const Exec& exec, const float* v, const QuantLayout& layout, const float* step,
                        int32_t qn, int32_t qp, float* out) {
  const PieceGrid grid(layout);
  const QuantizeKernels& k = *exec.kernels;
  exec.pool->parallel_for(grid.count(), exec.threads, [&](size_t item, unsigned) {
    grid.visit(
        grid.at(item), [&](size_t off, size_t len, size_t g) { k.lsq_forward(v + off, len, step[g], qn, qp, out + off); },
        [&](size_t off, size_t len, size_t g) {
          for (size_t i = 0; i < len; ++i) k.lsq_forward(v + off + i, 1, step[g + i], qn, qp, out + off + i);
        });
  });
}

void lsq_backward_tensor(const Exec& exec, const float* v, const float* grad_out, const QuantLayout& layout,
                         const float* step, int32_t qn, int32_t qp, float* grad_in, double* grad_step) {
  const PieceGrid grid(layout);
  const QuantizeKernels& k = *exec.kernels;
  const size_t groups = layout.group_count();
  // One partial sum per piece (per element for per-element pieces), added in piece order below.
  std::vector<std::vector<std::pair<size_t, double>>> partial(grid.count());
  exec.pool->parallel_for(grid.count(), exec.threads, [&](size_t item, unsigned) {
    grid.visit(
        grid.at(item),
        [&](size_t off, size_t len, size_t g) {
          partial[item].emplace_back(g, k.lsq_backward(v + off, grad_out + off, len, step[g], qn, qp, grad_in + off));
        },
        [&](size_t off, size_t len, size_t g) {
          for (size_t i = 0; i < len; ++i)
            partial[item].emplace_back(
                g + i, k.lsq_backward(v + off + i, grad_out + off + i, 1, step[g + i], qn, qp, grad_in + off + i));
        });
  });
  std::fill_n(grad_step, groups, 0.0);
  for (const auto& piece : partial)
    for (const auto& [g, sum] : piece) grad_step[g] += sum;
}

ErrorStats error_stats(const float* x, const uint8_t* q, bool is_signed, const QuantParams& p) {
  ErrorStats s;
  auto one = [&](size_t i, float scale, int32_t zp) {
    const float v = x[i];
    const int32_t code = is_signed ? int32_t(int8_t(q[i])) : int32_t(q[i]);
    const float r = std::nearbyint(v / scale) + float(zp);
    if (!(r >= float(p.qmin) && r <= float(p.qmax))) ++s.clipped_count;
    if (!is_finite_value(v)) return;
    const double e = double(v) - double(dequantize_value(code, scale, zp));
    s.squared_error += e * e;
    s.signal += double(v) * double(v);
    s.max_abs_error = std::max(s.max_abs_error, std::fabs(e));
    ++s.finite_count;
  };
  const PieceGrid grid(p.layout);
  for (size_t item = 0; item < grid.count(); ++item) {
    grid.visit(
        grid.at(item),
        [&](size_t off, size_t len, size_t g) {
          for (size_t i = off; i < off + len; ++i) one(i, p.scale[g], p.zero_point[g]);
        },
        [&](size_t off, size_t len, size_t g) {
          for (size_t i = 0; i < len; ++i) one(off + i, p.scale[g + i], p.zero_point[g + i]);
        });
  }
  return s;
}

namespace {

template <int kBits>
int64_t pack_bits(const uint8_t* values, size_t n, bool is_signed, uint8_t* out) {
  constexpr int kPerByte = 8 / kBits;
  constexpr int kMask = (1 << kBits) - 1;
  const int lo = is_signed ? -(1 << (kBits - 1)) : 0;
  const int hi = is_signed ? (1 << (kBits - 1)) - 1 : kMask;
  std::fill_n(out, (n + kPerByte - 1) / kPerByte, uint8_t(0));
  for (size_t i = 0; i < n; ++i) {
    const int v = is_signed ? int(int8_t(values[i])) : int(values[i]);
    if (v < lo || v > hi) return int64_t(i);
    out[i / kPerByte] |= uint8_t((v & kMask) << (kBits * (i % kPerByte)));
  }
  return -1;
}

template <int kBits>
void unpack_bits(const uint8_t* packed, size_t n, bool is_signed, uint8_t* out) {
  constexpr int kPerByte = 8 / kBits;
  constexpr int kMask = (1 << kBits) - 1;
  for (size_t i = 0; i < n; ++i) {
    int v = (packed[i / kPerByte] >> (kBits * (i % kPerByte))) & kMask;
    if (is_signed && v >= (1 << (kBits - 1))) v -= 1 << kBits;
    out[i] = uint8_t(v);
  }
}

}  // namespace

int64_t pack_int4(const uint8_t* v, size_t n, bool s, uint8_t* out) { return pack_bits<4>(v, n, s, out); }
void unpack_int4(const uint8_t* p, size_t n, bool s, uint8_t* out) { unpack_bits<4>(p, n, s, out); }
int64_t pack_int2(const uint8_t* v, size_t n, bool s, uint8_t* out) { return pack_bits<2>(v, n, s, out); }
void unpack_int2(const uint8_t* p, size_t n, bool s, uint8_t* out) { unpack_bits<2>(p, n, s, out); }

namespace {
template <typename Code>
int64_t first_outside(const Code* q, size_t n, int32_t qmin, int32_t qmax) {
  // A branch-free min/max pass (vectorised by the compiler) first: tensors are almost always in range.
  int32_t lo = qmin, hi = qmax;
  for (size_t i = 0; i < n; ++i) {
    lo = std::min<int32_t>(lo, q[i]);
    hi = std::max<int32_t>(hi, q[i]);
  }
  if (lo >= qmin && hi <= qmax) return -1;
  for (size_t i = 0; i < n; ++i)
    if (q[i] < qmin || q[i] > qmax) return int64_t(i);
  return -1;
}
}  // namespace

int64_t first_code_outside(const uint8_t* q, size_t n, bool is_signed, int32_t qmin, int32_t qmax) {
  return is_signed ? first_outside(reinterpret_cast<const int8_t*>(q), n, qmin, qmax)
                   : first_outside(q, n, qmin, qmax);
}

}  // namespace lowbit
