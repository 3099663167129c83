// AVX-512 quantization kernels (F + BW + VL + DQ). The main loop handles 64
// floats as 4 zmm vectors; tails use masked loads and stores, so every length
// runs through the vector code.
#include <immintrin.h>

#include <cmath>

#include "lowbit/quantize_kernels.h"
#include "lowbit/rounding.h"

namespace lowbit {
namespace {

inline __mmask16 tail_mask(size_t rest) { return __mmask16((1u << rest) - 1u); }

inline __m512 bound(int32_t q, __m512i zp) {
  return _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_set1_epi32(q), zp));
}

inline __m512i quantize16(__m512 x, __m512 scale, __m512i zp, int32_t qmin, int32_t qmax) {
  __m512 r = _mm512_div_ps(x, scale);
  r = _mm512_roundscale_ps(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  r = _mm512_max_ps(r, bound(qmin, zp));  // NaN -> lower bound, like rounding.h
  r = _mm512_min_ps(r, bound(qmax, zp));
  return _mm512_add_epi32(_mm512_cvttps_epi32(r), zp);
}

template <bool kVec>
inline __mmask16 quantize_step(const float* x, const float* scale_v, const int32_t* zp_v,
                               __m512 vs, __m512i vz, int32_t qmin, int32_t qmax, uint8_t* out,
                               __mmask16 m) {
  __m512 v = _mm512_maskz_loadu_ps(m, x);
  __m512 s = kVec ? _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), m, scale_v) : vs;
  __m512i z = kVec ? _mm512_maskz_loadu_epi32(m, zp_v) : vz;
  __m128i q = _mm512_cvtepi32_epi8(quantize16(v, s, z, qmin, qmax));
  _mm_mask_storeu_epi8(out, m, q);
  return _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
}

template <bool kVec>
bool quantize_avx512(const float* x, size_t n, const float* scale_v, const int32_t* zp_v,
                     float scale_s, int32_t zp_s, int32_t qmin, int32_t qmax, uint8_t* out) {
  const __m512 vs = _mm512_set1_ps(scale_s);
  const __m512i vz = _mm512_set1_epi32(zp_s);
  __mmask16 nan = 0;
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    for (size_t j = i; j < i + 64; j += 16)
      nan |= quantize_step<kVec>(x + j, kVec ? scale_v + j : nullptr, kVec ? zp_v + j : nullptr,
                                 vs, vz, qmin, qmax, out + j, 0xFFFF);
  }
  for (; i < n; i += 16) {
    __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : tail_mask(n - i);
    nan |= quantize_step<kVec>(x + i, kVec ? scale_v + i : nullptr, kVec ? zp_v + i : nullptr, vs,
                               vz, qmin, qmax, out + i, m);
  }
  return nan != 0;
}

bool quantize_run_avx512(const float* x, size_t n, float scale, int32_t zp, int32_t qmin,
                         int32_t qmax, uint8_t* out) {
  return quantize_avx512<false>(x, n, nullptr, nullptr, scale, zp, qmin, qmax, out);
}

bool quantize_vec_avx512(const float* x, size_t n, const float* scale, const int32_t* zp,
                         int32_t qmin, int32_t qmax, uint8_t* out) {
  return quantize_avx512<true>(x, n, scale, zp, 1.0f, 0, qmin, qmax, out);
}

template <bool kVec>
void dequantize_avx512(const uint8_t* q, size_t n, bool is_signed, const float* scale_v,
                       const int32_t* zp_v, float scale_s, int32_t zp_s, float* out) {
  const __m512 vs = _mm512_set1_ps(scale_s);
  const __m512i vz = _mm512_set1_epi32(zp_s);
  for (size_t i = 0; i < n; i += 16) {
    __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : tail_mask(n - i);
    __m128i b = _mm_maskz_loadu_epi8(m, q + i);
    __m512i c = is_signed ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b);
    __m512 s = kVec ? _mm512_maskz_loadu_ps(m, scale_v + i) : vs;
    __m512i z = kVec ? _mm512_maskz_loadu_epi32(m, zp_v + i) : vz;
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c, z)), s));
  }
}

void dequantize_run_avx512(const uint8_t* q, size_t n, bool is_signed, float scale, int32_t zp,
                           float* out) {
  dequantize_avx512<false>(q, n, is_signed, nullptr, nullptr, scale, zp, out);
}

void dequantize_vec_avx512(const uint8_t* q, size_t n, bool is_signed, const float* scale,
                           const int32_t* zp, float* out) {
  dequantize_avx512<true>(q, n, is_signed, scale, zp, 1.0f, 0, out);
}

inline __mmask16 finite_mask(__m512 v, __mmask16 m) {
  return _mm512_mask_cmp_ps_mask(m, _mm512_abs_ps(v), _mm512_set1_ps(INFINITY), _CMP_LT_OQ);
}

bool finite_range_avx512(const float* x, size_t n, float* lo, float* hi) {
  __m512 vlo = _mm512_set1_ps(INFINITY), vhi = _mm512_set1_ps(-INFINITY);
  __mmask16 nan = 0;
  for (size_t i = 0; i < n; i += 16) {
    __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : tail_mask(n - i);
    __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    __mmask16 ok = finite_mask(v, m);
    nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
    vlo = _mm512_mask_min_ps(vlo, ok, vlo, v);
    vhi = _mm512_mask_max_ps(vhi, ok, vhi, v);
  }
  float l = _mm512_reduce_min_ps(vlo), h = _mm512_reduce_max_ps(vhi);
  *lo = l < *lo ? l : *lo;
  *hi = h > *hi ? h : *hi;
  return nan != 0;
}

double squared_error_avx512(const float* x, size_t n, float scale, int32_t zp, int32_t qmin,
                            int32_t qmax) {
  const __m512 vs = _mm512_set1_ps(scale);
  const __m512i vz = _mm512_set1_epi32(zp);
  __m512d acc = _mm512_setzero_pd();  // lane j holds elements i with i % 8 == j
  auto errors = [&](const float* p, __mmask16 m) {
    __m512 v = _mm512_maskz_loadu_ps(m, p);
    __m512i q = quantize16(v, vs, vz, qmin, qmax);
    __m512 xhat = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q, vz)), vs);
    return _mm512_maskz_sub_ps(finite_mask(v, m), v, xhat);
  };
  const size_t n8 = n - n % 8;
  size_t i = 0;
  for (; i + 16 <= n8; i += 16) {
    __m512 e = errors(x + i, 0xFFFF);
    __m512d e0 = _mm512_cvtps_pd(_mm512_castps512_ps256(e));
    __m512d e1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)));
    acc = _mm512_add_pd(acc, _mm512_mul_pd(e0, e0));
    acc = _mm512_add_pd(acc, _mm512_mul_pd(e1, e1));
  }
  if (i < n8) {  // one group of 8 left
    __m512d e0 = _mm512_cvtps_pd(_mm512_castps512_ps256(errors(x + i, 0x00FF)));
    acc = _mm512_add_pd(acc, _mm512_mul_pd(e0, e0));
  }
  alignas(64) double lane[8];
  _mm512_store_pd(lane, acc);
  double sum = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  for (size_t t = n8; t < n; ++t) {
    if (!is_finite_value(x[t])) continue;
    float e = x[t] - dequantize_value(quantize_value(x[t], scale, zp, qmin, qmax), scale, zp);
    sum += double(e) * double(e);
  }
  return sum;
}

void lsq_forward_avx512(const float* v, size_t n, float step, int32_t qn, int32_t qp, float* out) {
  const __m512 s = _mm512_set1_ps(step), lo = _mm512_set1_ps(float(-qn)), hi = _mm512_set1_ps(float(qp));
  for (size_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : tail_mask(n - i);
    __m512 q = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(m, v + i), s), lo), hi);
    q = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(q, s));
  }
}

double lsq_backward_avx512(const float* v, const float* grad_out, size_t n, float step, int32_t qn, int32_t qp,
                           float* grad_in) {
  const __m512 s = _mm512_set1_ps(step), lo = _mm512_set1_ps(float(-qn)), hi = _mm512_set1_ps(float(qp));
  __m512d acc = _mm512_setzero_pd();
  // A plain struct, not std::pair: its inline members would be weak symbols an unoptimised build could share.
  struct GradAndDiff {
    __m512 g, d;
  };
  auto products = [&](size_t i, __mmask16 m) {
    const __m512 q = _mm512_div_ps(_mm512_maskz_loadu_ps(m, v + i), s);
    const __m512 g = _mm512_maskz_loadu_ps(m, grad_out + i);
    const __mmask16 below = _mm512_cmp_ps_mask(q, lo, _CMP_LE_OQ), above = _mm512_cmp_ps_mask(q, hi, _CMP_GE_OQ);
    __m512 d = _mm512_sub_ps(_mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), q);
    d = _mm512_mask_mov_ps(d, below, lo);
    d = _mm512_mask_mov_ps(d, above, hi);
    _mm512_mask_storeu_ps(grad_in + i, m, _mm512_maskz_mov_ps(__mmask16(~(below | above)), g));
    return GradAndDiff{g, d};
  };
  const size_t n8 = n - n % 8;
  size_t i = 0;
  for (; i + 16 <= n8; i += 16) {
    auto [g, d] = products(i, 0xFFFF);
    const __m512d g0 = _mm512_cvtps_pd(_mm512_castps512_ps256(g)), d0 = _mm512_cvtps_pd(_mm512_castps512_ps256(d));
    const __m512d g1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(g), 1)));
    const __m512d d1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d), 1)));
    acc = _mm512_add_pd(acc, _mm512_mul_pd(g0, d0));
    acc = _mm512_add_pd(acc, _mm512_mul_pd(g1, d1));
  }
  if (i < n8) {
    auto [g, d] = products(i, 0x00FF);
    acc = _mm512_add_pd(acc, _mm512_mul_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(g)), _mm512_cvtps_pd(_mm512_castps512_ps256(d))));
    i += 8;
  }
  alignas(64) double lane[8];
  _mm512_store_pd(lane, acc);
  double sum = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  if (i < n) {  // the tail (< 8 elements) in order, as the reference does
    const __mmask16 m = tail_mask(n - i);
    auto [g, d] = products(i, m);
    alignas(64) float gs[16], ds[16];
    _mm512_store_ps(gs, g);
    _mm512_store_ps(ds, d);
    for (size_t t = 0; t < n - i; ++t) sum += double(gs[t]) * double(ds[t]);
  }
  return sum;
}

const QuantizeKernels kAvx512 = {
    "avx512",          quantize_run_avx512, quantize_vec_avx512,  dequantize_run_avx512,
    dequantize_vec_avx512, finite_range_avx512, squared_error_avx512, lsq_forward_avx512, lsq_backward_avx512,
};

}  // namespace

const QuantizeKernels* quantize_kernels_avx512() { return &kAvx512; }

}  // namespace lowbit
