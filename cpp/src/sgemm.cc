// SGEMM driver (packing, blocking, threading, dispatch), im2col/col2im and
// BatchNormalization for the training engine. See sgemm.h.
#include "lowbit/sgemm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "lowbit/gemm.h"  // AlignedBytes

namespace lowbit {

#if !LOWBIT_BUILT_SGEMM_X86
const SgemmKernel* sgemm_kernel_avx2() { return nullptr; }
const SgemmKernel* sgemm_kernel_avx512() { return nullptr; }
#endif

namespace {

struct Candidate {
  const SgemmKernel* kernel;
  bool supported;
};

std::vector<Candidate> candidates_best_first(const CpuFeatures& cpu) {
  return {
      {sgemm_kernel_avx512(), cpu.avx512f && cpu.avx512vl && cpu.avx512dq},
      {sgemm_kernel_avx2(), cpu.avx2 && cpu.fma},
      {sgemm_kernel_scalar(), true},
  };
}

inline size_t ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }

constexpr size_t kNc = 384;     // columns of C per work item (B block: kKc × kNc floats, L2)
constexpr size_t kMcMax = 128;  // rows of C per work item at most

// op(A) [m, k] -> panels of mr rows: panel r holds (p, i) at r·mr·k + p·mr + i,
// rows past m zero. A K block starting at p0 is then at offset p0·mr.
void pack_a_panel(const SgemmArgs& g, size_t mr, size_t r, float* dst) {
  const size_t i0 = r * mr, rows = std::min(mr, g.m - i0), k = g.k;
  if (g.trans_a) {
    for (size_t p = 0; p < k; ++p) {
      std::memcpy(dst + p * mr, g.a + p * g.m + i0, rows * sizeof(float));
      std::fill(dst + p * mr + rows, dst + (p + 1) * mr, 0.0f);
    }
  } else {
    for (size_t i = 0; i < rows; ++i) {
      const float* src = g.a + (i0 + i) * k;
      for (size_t p = 0; p < k; ++p) dst[p * mr + i] = src[p];
    }
    for (size_t i = rows; i < mr; ++i)
      for (size_t p = 0; p < k; ++p) dst[p * mr + i] = 0.0f;
  }
}

// op(B)[p0 : p0 + kc, j0 : j1] -> panels of nr columns: panel q holds (p, j)
// at q·nr·kc + p·nr + j, columns past j1 zero.
void pack_b_block(const SgemmArgs& g, size_t nr, size_t p0, size_t kc, size_t j0, size_t j1, float* dst) {
  const size_t width = j1 - j0, panels = ceil_div(width, nr);
  if (width % nr) {
    float* last = dst + (panels - 1) * nr * kc;
    std::fill(last, last + nr * kc, 0.0f);
  }
  if (!g.trans_b) {
    for (size_t q = 0; q < panels; ++q) {
      const size_t cols = std::min(nr, width - q * nr);
      float* panel = dst + q * nr * kc;
      const float* src = g.b + p0 * g.n + j0 + q * nr;
      if (cols == 32)  // constant sizes let the compiler inline the copies
        for (size_t p = 0; p < kc; ++p) std::memcpy(panel + p * 32, src + p * g.n, 32 * sizeof(float));
      else if (cols == 16)
        for (size_t p = 0; p < kc; ++p) std::memcpy(panel + p * nr, src + p * g.n, 16 * sizeof(float));
      else
        for (size_t p = 0; p < kc; ++p) std::memcpy(panel + p * nr, src + p * g.n, cols * sizeof(float));
    }
  } else {
    // B is [n, k]: transpose 4 × 4 blocks (4 columns' rows, 4 k) into the panel.
    for (size_t jl = 0; jl < width; jl += 4) {
      const size_t cols = std::min<size_t>(4, width - jl);
      float* panel = dst + (jl / nr) * nr * kc + jl % nr;
      const float* src = g.b + (j0 + jl) * g.k + p0;
      size_t p = 0;
#if defined(__SSE2__)
      if (cols == 4) {
        for (; p + 4 <= kc; p += 4) {
          __m128 r0 = _mm_loadu_ps(src + p), r1 = _mm_loadu_ps(src + g.k + p);
          __m128 r2 = _mm_loadu_ps(src + 2 * g.k + p), r3 = _mm_loadu_ps(src + 3 * g.k + p);
          _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
          _mm_storeu_ps(panel + p * nr, r0);
          _mm_storeu_ps(panel + (p + 1) * nr, r1);
          _mm_storeu_ps(panel + (p + 2) * nr, r2);
          _mm_storeu_ps(panel + (p + 3) * nr, r3);
        }
      }
#endif
      for (; p < kc; ++p)
        for (size_t c = 0; c < cols; ++c) panel[p * nr + c] = src[c * g.k + p];
    }
  }
}

}  // namespace

std::vector<std::string> available_sgemm_kernels(const CpuFeatures& cpu) {
  std::vector<std::string> names;
  for (const auto& c : candidates_best_first(cpu))
    if (c.kernel && c.supported) names.emplace_back(c.kernel->name);
  return names;
}

const SgemmKernel* find_sgemm_kernel(const std::string& name, const CpuFeatures& cpu) {
  for (const auto& c : candidates_best_first(cpu)) {
    if (!c.kernel || !c.supported) continue;
    if (name.empty() || name == c.kernel->name) return c.kernel;
  }
  return nullptr;
}

void sgemm(const SgemmKernel& kernel, const SgemmArgs& g, ThreadPool* pool, unsigned threads) {
  if (!kernel.tile) return sgemm_reference(g, pool, threads);
  const size_t m = g.m, n = g.n, k = g.k;
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!g.accumulate) std::fill_n(g.c, m * n, 0.0f);
    return;
  }
  const size_t mr = kernel.mr, nr = kernel.nr;
  const size_t m_panels = ceil_div(m, mr);
  // Waking the pool costs more than a tiny product gains (no effect on results).
  if (double(m) * double(n) * double(k) < 262144.0) threads = 1;

  AlignedBytes a_packed;
  a_packed.allocate(m_panels * mr * k * sizeof(float));
  float* ap = reinterpret_cast<float*>(a_packed.data.get());
  pool->parallel_for(m_panels, threads, [&](size_t r, unsigned) { pack_a_panel(g, mr, r, ap + r * mr * k); });

  // Work items are blocks of C. Their shape only decides which thread computes
  // an element, never the order of its sum (fixed by kSgemmKc), so it may
  // depend on the thread count: aim for 2 items per thread, splitting N first
  // (each item packs its own B block, so splitting M repeats packing).
  const size_t want_items = 2 * size_t(pool->threads_for(SIZE_MAX, threads));
  const size_t n_panels = ceil_div(n, nr);
  size_t n_blocks = std::max(ceil_div(n, kNc), std::min(want_items, n_panels));
  const size_t nc = ceil_div(n_panels, n_blocks) * nr;  // balanced, whole panels
  n_blocks = ceil_div(n, nc);
  size_t m_blocks = std::max(ceil_div(m, kMcMax), n_blocks >= want_items ? 1 : ceil_div(want_items, n_blocks));
  m_blocks = std::min(m_blocks, m_panels);
  const size_t mc_panels = ceil_div(m_panels, m_blocks);
  m_blocks = ceil_div(m_panels, mc_panels);

  const size_t b_floats = nc * std::min(kSgemmKc, k);
  std::vector<AlignedBytes> scratch(pool->threads_for(m_blocks * n_blocks, threads));

  pool->parallel_for(m_blocks * n_blocks, threads, [&](size_t item, unsigned t) {
    if (!scratch[t].data) scratch[t].allocate(b_floats * sizeof(float));
    float* bp = reinterpret_cast<float*>(scratch[t].data.get());
    const size_t jb = item / m_blocks, ib = item % m_blocks;
    const size_t j0 = jb * nc, j1 = std::min(n, j0 + nc);
    const size_t r0 = ib * mc_panels, r1 = std::min(m_panels, r0 + mc_panels);
    for (size_t p0 = 0; p0 < k; p0 += kSgemmKc) {
      const size_t kc = std::min(kSgemmKc, k - p0);
      pack_b_block(g, nr, p0, kc, j0, j1, bp);
      // B panel outer, A panel inner: one kc × nr B panel stays in L1.
      for (size_t q = 0; q * nr < j1 - j0; ++q) {
        const size_t jj = j0 + q * nr;
        for (size_t r = r0; r < r1; ++r) {
          SgemmTile t{ap + r * mr * k + p0 * mr, bp + q * nr * kc, kc, std::min(mr, m - r * mr),
                      std::min(nr, j1 - jj), g.c + r * mr * n + jj, n, g.accumulate || p0 > 0};
          kernel.tile(t);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------
// im2col / col2im

namespace {

// Output positions o in [0, out) whose input index o·stride - pad + offset lies in [0, size).
inline void valid_range(size_t out, size_t stride, size_t pad, size_t offset, size_t size, size_t* lo, size_t* hi) {
  // o·stride + offset >= pad  and  o·stride + offset < size + pad
  *lo = offset >= pad ? 0 : ceil_div(pad - offset, stride);
  *hi = offset >= size + pad ? 0 : ceil_div(size + pad - offset, stride);
  *lo = std::min(*lo, out);
  *hi = std::min(std::max(*hi, *lo), out);
}

}  // namespace

void im2col(const float* x, size_t batch, const ConvGeometry& g, float* col, ThreadPool* pool, unsigned threads) {
  const size_t plane = g.height * g.width, taps = g.kernel_h * g.kernel_w, pixels = g.col_cols();
  pool->parallel_for(batch * g.channels, threads, [&](size_t item, unsigned) {
    const float* src = x + item * plane;
    float* dst = col + item * taps * pixels;  // image n, channel c: rows c·taps.. of image n
    for (size_t ky = 0; ky < g.kernel_h; ++ky) {
      size_t oy_lo, oy_hi;
      valid_range(g.out_h, g.stride_h, g.pad_top, ky * g.dilation_h, g.height, &oy_lo, &oy_hi);
      for (size_t kx = 0; kx < g.kernel_w; ++kx) {
        size_t ox_lo, ox_hi;
        valid_range(g.out_w, g.stride_w, g.pad_left, kx * g.dilation_w, g.width, &ox_lo, &ox_hi);
        float* row = dst + (ky * g.kernel_w + kx) * pixels;
        std::fill(row, row + oy_lo * g.out_w, 0.0f);
        for (size_t oy = oy_lo; oy < oy_hi; ++oy) {
          float* out = row + oy * g.out_w;
          const float* in = src + (oy * g.stride_h + ky * g.dilation_h - g.pad_top) * g.width;
          std::fill(out, out + ox_lo, 0.0f);
          const size_t ix0 = ox_lo * g.stride_w + kx * g.dilation_w - g.pad_left;
          if (g.stride_w == 1)
            std::memcpy(out + ox_lo, in + ix0, (ox_hi - ox_lo) * sizeof(float));
          else
            for (size_t ox = ox_lo; ox < ox_hi; ++ox) out[ox] = in[ix0 + (ox - ox_lo) * g.stride_w];
          std::fill(out + ox_hi, out + g.out_w, 0.0f);
        }
        std::fill(row + oy_hi * g.out_w, row + pixels, 0.0f);
      }
    }
  });
}

void col2im(const float* col, size_t batch, const ConvGeometry& g, float* dx, ThreadPool* pool, unsigned threads) {
  const size_t plane = g.height * g.width, taps = g.kernel_h * g.kernel_w, pixels = g.col_cols();
  pool->parallel_for(batch * g.channels, threads, [&](size_t item, unsigned) {
    float* dst = dx + item * plane;
    const float* src = col + item * taps * pixels;
    std::fill(dst, dst + plane, 0.0f);
    for (size_t ky = 0; ky < g.kernel_h; ++ky) {
      size_t oy_lo, oy_hi;
      valid_range(g.out_h, g.stride_h, g.pad_top, ky * g.dilation_h, g.height, &oy_lo, &oy_hi);
      for (size_t kx = 0; kx < g.kernel_w; ++kx) {
        size_t ox_lo, ox_hi;
        valid_range(g.out_w, g.stride_w, g.pad_left, kx * g.dilation_w, g.width, &ox_lo, &ox_hi);
        const float* row = src + (ky * g.kernel_w + kx) * pixels;
        for (size_t oy = oy_lo; oy < oy_hi; ++oy) {
          const float* in = row + oy * g.out_w;
          float* out = dst + (oy * g.stride_h + ky * g.dilation_h - g.pad_top) * g.width;
          const size_t ix0 = ox_lo * g.stride_w + kx * g.dilation_w - g.pad_left;
          for (size_t ox = ox_lo; ox < ox_hi; ++ox) out[ix0 + (ox - ox_lo) * g.stride_w] += in[ox];
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------
// BatchNormalization (training mode)

void batch_norm_forward(const float* x, size_t batch, size_t channels, size_t spatial, const float* gamma,
                        const float* beta, float epsilon, float* y, float* mean, float* variance, float* inv_std,
                        ThreadPool* pool, unsigned threads) {
  const size_t count = batch * spatial;
  pool->parallel_for(channels, threads, [&](size_t c, unsigned) {
    double sum = 0;
    for (size_t b = 0; b < batch; ++b) {
      const float* v = x + (b * channels + c) * spatial;
      for (size_t s = 0; s < spatial; ++s) sum += v[s];
    }
    const double mu = count ? sum / double(count) : 0.0;
    double sq = 0;
    for (size_t b = 0; b < batch; ++b) {
      const float* v = x + (b * channels + c) * spatial;
      for (size_t s = 0; s < spatial; ++s) {
        const double d = double(v[s]) - mu;
        sq += d * d;
      }
    }
    const double var = count ? sq / double(count) : 0.0;
    const float mean_f = float(mu), inv_f = float(1.0 / std::sqrt(var + double(epsilon)));
    mean[c] = mean_f;
    variance[c] = float(var);
    inv_std[c] = inv_f;
    const float gm = gamma[c], bt = beta[c];
    for (size_t b = 0; b < batch; ++b) {
      const float* v = x + (b * channels + c) * spatial;
      float* out = y + (b * channels + c) * spatial;
      for (size_t s = 0; s < spatial; ++s) out[s] = gm * ((v[s] - mean_f) * inv_f) + bt;
    }
  });
}

void batch_norm_backward(const float* x, const float* dy, size_t batch, size_t channels, size_t spatial,
                         const float* gamma, const float* mean, const float* inv_std, float* dx, float* d_gamma,
                         float* d_beta, ThreadPool* pool, unsigned threads) {
  const size_t count = batch * spatial;
  pool->parallel_for(channels, threads, [&](size_t c, unsigned) {
    const float mu = mean[c], is = inv_std[c];
    double sum_dy = 0, sum_dy_xhat = 0;
    for (size_t b = 0; b < batch; ++b) {
      const float* v = x + (b * channels + c) * spatial;
      const float* g = dy + (b * channels + c) * spatial;
      for (size_t s = 0; s < spatial; ++s) {
        sum_dy += g[s];
        sum_dy_xhat += double(g[s]) * double((v[s] - mu) * is);
      }
    }
    d_gamma[c] = float(sum_dy_xhat);
    d_beta[c] = float(sum_dy);
    if (count == 0) return;
    const double scale = double(gamma[c]) * double(is) / double(count), big_m = double(count);
    for (size_t b = 0; b < batch; ++b) {
      const float* v = x + (b * channels + c) * spatial;
      const float* g = dy + (b * channels + c) * spatial;
      float* out = dx + (b * channels + c) * spatial;
      for (size_t s = 0; s < spatial; ++s) {
        const double xhat = double((v[s] - mu) * is);
        out[s] = float(scale * (big_m * double(g[s]) - sum_dy - xhat * sum_dy_xhat));
      }
    }
  });
}

}  // namespace lowbit
