// AVX2 quantization kernels. Compiled with -mavx2 only (no FMA: the rule in
// rounding.h has no fused operations). Register use: the main loop handles
// 32 floats as 4 ymm vectors; a tail shorter than 32 is copied into a padded
// stack block and run through the same code, so tails exercise the SIMD path.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "lowbit/quantize_kernels.h"
#include "lowbit/rounding.h"

namespace lowbit {
namespace {

constexpr size_t kBlock = 32;

inline __m256i quantize8(__m256 x, __m256 scale, __m256i zp, __m256 lo, __m256 hi) {
  __m256 r = _mm256_div_ps(x, scale);
  r = _mm256_round_ps(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  r = _mm256_max_ps(r, lo);  // NaN -> lo, like rounding.h
  r = _mm256_min_ps(r, hi);
  return _mm256_add_epi32(_mm256_cvttps_epi32(r), zp);
}

// Low bytes of 32 int32 lanes (a, b, c, d in element order) -> 32 bytes.
inline __m256i narrow32(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i low8 = _mm256_set1_epi32(0xFF);
  __m256i ab = _mm256_packus_epi32(_mm256_and_si256(a, low8), _mm256_and_si256(b, low8));
  __m256i cd = _mm256_packus_epi32(_mm256_and_si256(c, low8), _mm256_and_si256(d, low8));
  __m256i abcd = _mm256_packus_epi16(ab, cd);
  return _mm256_permutevar8x32_epi32(abcd, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

inline __m256 bound(int32_t q, __m256i zp) {
  return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_set1_epi32(q), zp));
}

// One block of 32 elements; scale/zp either broadcast (kVec = false) or loaded.
template <bool kVec>
inline __m256 quantize_block(const float* x, const float* scale_v, const int32_t* zp_v,
                             __m256 scale_s, __m256i zp_s, int32_t qmin, int32_t qmax,
                             uint8_t* out) {
  __m256i q[4];
  __m256 nan = _mm256_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    __m256 v = _mm256_loadu_ps(x + 8 * j);
    __m256 s = kVec ? _mm256_loadu_ps(scale_v + 8 * j) : scale_s;
    __m256i z = kVec ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(zp_v + 8 * j)) : zp_s;
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    q[j] = quantize8(v, s, z, bound(qmin, z), bound(qmax, z));
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), narrow32(q[0], q[1], q[2], q[3]));
  return nan;
}

template <bool kVec>
bool quantize_avx2(const float* x, size_t n, const float* scale_v, const int32_t* zp_v,
                   float scale_s, int32_t zp_s, int32_t qmin, int32_t qmax, uint8_t* out) {
  const __m256 vs = _mm256_set1_ps(scale_s);
  const __m256i vz = _mm256_set1_epi32(zp_s);
  __m256 nan = _mm256_setzero_ps();
  size_t i = 0;
  for (; i + kBlock <= n; i += kBlock)
    nan = _mm256_or_ps(nan, quantize_block<kVec>(x + i, kVec ? scale_v + i : nullptr,
                                                 kVec ? zp_v + i : nullptr, vs, vz, qmin, qmax,
                                                 out + i));
  if (i < n) {
    const size_t rest = n - i;
    alignas(32) float xb[kBlock] = {};
    alignas(32) float sb[kBlock];
    alignas(32) int32_t zb[kBlock] = {};
    alignas(32) uint8_t ob[kBlock];
    std::memcpy(xb, x + i, rest * sizeof(float));
    if (kVec) {
      for (size_t j = 0; j < kBlock; ++j) sb[j] = 1.0f;
      std::memcpy(sb, scale_v + i, rest * sizeof(float));
      std::memcpy(zb, zp_v + i, rest * sizeof(int32_t));
    }
    nan = _mm256_or_ps(nan, quantize_block<kVec>(xb, sb, zb, vs, vz, qmin, qmax, ob));
    std::memcpy(out + i, ob, rest);
  }
  return _mm256_movemask_ps(nan) != 0;
}

bool quantize_run_avx2(const float* x, size_t n, float scale, int32_t zp, int32_t qmin,
                       int32_t qmax, uint8_t* out) {
  return quantize_avx2<false>(x, n, nullptr, nullptr, scale, zp, qmin, qmax, out);
}

bool quantize_vec_avx2(const float* x, size_t n, const float* scale, const int32_t* zp,
                       int32_t qmin, int32_t qmax, uint8_t* out) {
  return quantize_avx2<true>(x, n, scale, zp, 1.0f, 0, qmin, qmax, out);
}

inline __m256i load_codes8(const uint8_t* q, bool is_signed) {
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q));
  return is_signed ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
}

template <bool kVec>
void dequantize_avx2(const uint8_t* q, size_t n, bool is_signed, const float* scale_v,
                     const int32_t* zp_v, float scale_s, int32_t zp_s, float* out) {
  const __m256 vs = _mm256_set1_ps(scale_s);
  const __m256i vz = _mm256_set1_epi32(zp_s);
  auto step = [&](const uint8_t* qp, const float* sp, const int32_t* zpp, float* op) {
    __m256 s = kVec ? _mm256_loadu_ps(sp) : vs;
    __m256i z = kVec ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(zpp)) : vz;
    __m256i c = _mm256_sub_epi32(load_codes8(qp, is_signed), z);
    _mm256_storeu_ps(op, _mm256_mul_ps(_mm256_cvtepi32_ps(c), s));
  };
  size_t i = 0;
  for (; i + 8 <= n; i += 8) step(q + i, kVec ? scale_v + i : nullptr, kVec ? zp_v + i : nullptr, out + i);
  if (i < n) {
    const size_t rest = n - i;
    uint8_t qb[8] = {};
    alignas(32) float sb[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    alignas(32) int32_t zb[8] = {};
    alignas(32) float ob[8];
    std::memcpy(qb, q + i, rest);
    if (kVec) {
      std::memcpy(sb, scale_v + i, rest * sizeof(float));
      std::memcpy(zb, zp_v + i, rest * sizeof(int32_t));
    }
    step(qb, sb, zb, ob);
    std::memcpy(out + i, ob, rest * sizeof(float));
  }
}

void dequantize_run_avx2(const uint8_t* q, size_t n, bool is_signed, float scale, int32_t zp,
                         float* out) {
  dequantize_avx2<false>(q, n, is_signed, nullptr, nullptr, scale, zp, out);
}

void dequantize_vec_avx2(const uint8_t* q, size_t n, bool is_signed, const float* scale,
                         const int32_t* zp, float* out) {
  dequantize_avx2<true>(q, n, is_signed, scale, zp, 1.0f, 0, out);
}

inline __m256 finite_mask(__m256 v) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  return _mm256_cmp_ps(_mm256_and_ps(v, abs_mask), _mm256_set1_ps(INFINITY), _CMP_LT_OQ);
}

bool finite_range_avx2(const float* x, size_t n, float* lo, float* hi) {
  const __m256 pinf = _mm256_set1_ps(INFINITY), ninf = _mm256_set1_ps(-INFINITY);
  __m256 vlo = pinf, vhi = ninf, nan = _mm256_setzero_ps();
  auto step = [&](__m256 v) {
    __m256 ok = finite_mask(v);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    vlo = _mm256_min_ps(vlo, _mm256_blendv_ps(pinf, v, ok));
    vhi = _mm256_max_ps(vhi, _mm256_blendv_ps(ninf, v, ok));
  };
  size_t i = 0;
  for (; i + 8 <= n; i += 8) step(_mm256_loadu_ps(x + i));
  if (i < n) {
    alignas(32) float xb[8] = {INFINITY, INFINITY, INFINITY, INFINITY,
                               INFINITY, INFINITY, INFINITY, INFINITY};
    std::memcpy(xb, x + i, (n - i) * sizeof(float));
    step(_mm256_load_ps(xb));
  }
  alignas(32) float l[8], h[8];
  _mm256_store_ps(l, vlo);
  _mm256_store_ps(h, vhi);
  float rl = *lo, rh = *hi;
  for (int j = 0; j < 8; ++j) {
    rl = l[j] < rl ? l[j] : rl;
    rh = h[j] > rh ? h[j] : rh;
  }
  *lo = rl;
  *hi = rh;
  return _mm256_movemask_ps(nan) != 0;
}

double squared_error_avx2(const float* x, size_t n, float scale, int32_t zp, int32_t qmin,
                          int32_t qmax) {
  const __m256 vs = _mm256_set1_ps(scale);
  const __m256i vz = _mm256_set1_epi32(zp);
  const __m256 lo = bound(qmin, vz), hi = bound(qmax, vz);
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();  // lanes 0-3, 4-7
  const size_t n8 = n - n % 8;
  for (size_t i = 0; i < n8; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    __m256i q = quantize8(v, vs, vz, lo, hi);
    __m256 xhat = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, vz)), vs);
    __m256 e = _mm256_and_ps(_mm256_sub_ps(v, xhat), finite_mask(v));
    __m256d e0 = _mm256_cvtps_pd(_mm256_castps256_ps128(e));
    __m256d e1 = _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1));
    acc0 = _mm256_add_pd(acc0, _mm256_mul_pd(e0, e0));
    acc1 = _mm256_add_pd(acc1, _mm256_mul_pd(e1, e1));
  }
  alignas(32) double lane[8];
  _mm256_store_pd(lane, acc0);
  _mm256_store_pd(lane + 4, acc1);
  double sum = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  for (size_t i = n8; i < n; ++i) {
    if (!is_finite_value(x[i])) continue;
    float e = x[i] - dequantize_value(quantize_value(x[i], scale, zp, qmin, qmax), scale, zp);
    sum += double(e) * double(e);
  }
  return sum;
}

void lsq_forward_avx2(const float* v, size_t n, float step, int32_t qn, int32_t qp, float* out) {
  const __m256 s = _mm256_set1_ps(step), lo = _mm256_set1_ps(float(-qn)), hi = _mm256_set1_ps(float(qp));
  auto step8 = [&](const float* src, float* dst) {
    __m256 q = _mm256_min_ps(_mm256_max_ps(_mm256_div_ps(_mm256_loadu_ps(src), s), lo), hi);
    q = _mm256_round_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_ps(dst, _mm256_mul_ps(q, s));
  };
  size_t i = 0;
  for (; i + 8 <= n; i += 8) step8(v + i, out + i);
  if (i < n) {
    alignas(32) float vb[8] = {}, ob[8];
    std::memcpy(vb, v + i, (n - i) * sizeof(float));
    step8(vb, ob);
    std::memcpy(out + i, ob, (n - i) * sizeof(float));
  }
}

double lsq_backward_avx2(const float* v, const float* grad_out, size_t n, float step, int32_t qn, int32_t qp,
                         float* grad_in) {
  const __m256 s = _mm256_set1_ps(step), lo = _mm256_set1_ps(float(-qn)), hi = _mm256_set1_ps(float(qp));
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  auto step8 = [&](const float* vp, const float* gp, float* gi) {
    const __m256 q = _mm256_div_ps(_mm256_loadu_ps(vp), s);
    const __m256 g = _mm256_loadu_ps(gp);
    const __m256 below = _mm256_cmp_ps(q, lo, _CMP_LE_OQ), above = _mm256_cmp_ps(q, hi, _CMP_GE_OQ);
    const __m256 inside = _mm256_andnot_ps(_mm256_or_ps(below, above), _mm256_castsi256_ps(_mm256_set1_epi32(-1)));
    __m256 d = _mm256_sub_ps(_mm256_round_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), q);
    d = _mm256_blendv_ps(d, lo, below);
    d = _mm256_blendv_ps(d, hi, above);
    _mm256_storeu_ps(gi, _mm256_and_ps(g, inside));
    const __m256d g0 = _mm256_cvtps_pd(_mm256_castps256_ps128(g)), g1 = _mm256_cvtps_pd(_mm256_extractf128_ps(g, 1));
    const __m256d d0 = _mm256_cvtps_pd(_mm256_castps256_ps128(d)), d1 = _mm256_cvtps_pd(_mm256_extractf128_ps(d, 1));
    acc0 = _mm256_add_pd(acc0, _mm256_mul_pd(g0, d0));
    acc1 = _mm256_add_pd(acc1, _mm256_mul_pd(g1, d1));
  };
  const size_t n8 = n - n % 8;
  for (size_t i = 0; i < n8; i += 8) step8(v + i, grad_out + i, grad_in + i);
  alignas(32) double lane[8];
  _mm256_store_pd(lane, acc0);
  _mm256_store_pd(lane + 4, acc1);
  double sum = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  for (size_t i = n8; i < n; ++i)  // the tail in order, as the reference does
    sum += double(grad_out[i]) * double(lsq_element(v[i], grad_out[i], step, qn, qp, &grad_in[i]));
  return sum;
}

const QuantizeKernels kAvx2 = {
    "avx2",          quantize_run_avx2, quantize_vec_avx2,  dequantize_run_avx2,
    dequantize_vec_avx2, finite_range_avx2, squared_error_avx2, lsq_forward_avx2, lsq_backward_avx2,
};

}  // namespace

const QuantizeKernels* quantize_kernels_avx2() { return &kAvx2; }

}  // namespace lowbit
