// Native tests of upper_factor_of_inverse: UᵀU·H = I to rounding for odd
// sizes, zeros below the diagonal, and false for matrices that are not
// positive definite (a negative or zero pivot, NaN). Bit-identity with the
// TypeScript reference is checked from mocha (test/ts/methods.test.ts).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "harness.h"
#include "lowbit/linalg.h"

using harness::Rng;
using harness::str;

void register_linalg_tests();

namespace {

// X·Xᵀ + n·1e-3·I for a random X [n, n + 3]: symmetric positive definite.
std::vector<double> spd(size_t n, uint64_t seed) {
  Rng rng(seed);
  const size_t m = n + 3;
  std::vector<double> x(n * m), h(n * n);
  for (auto& v : x) v = rng.uniform() - 0.5;
  for (size_t i = 0; i < n; ++i)
    for (size_t j = 0; j < n; ++j) {
      double s = 0;
      for (size_t k = 0; k < m; ++k) s += x[i * m + k] * x[j * m + k];
      h[i * n + j] = s + (i == j ? double(n) * 1e-3 : 0);
    }
  return h;
}

std::string check_inverse(size_t n) {
  const std::vector<double> h = spd(n, 1000 + n);
  std::vector<double> u(n * n, 7.0);
  if (!lowbit::upper_factor_of_inverse(h.data(), n, u.data())) return str("n=", n, ": refused a positive definite matrix");
  double worst = 0;
  for (size_t i = 0; i < n; ++i)
    for (size_t j = 0; j < i; ++j)
      if (u[i * n + j] != 0) return str("n=", n, ": U[", i, ",", j, "] = ", u[i * n + j], " below the diagonal");
  // (UᵀU·H)[i][j] = Σ_k (UᵀU)[i][k]·H[k][j]
  std::vector<double> inv(n * n, 0.0);
  for (size_t i = 0; i < n; ++i)
    for (size_t j = 0; j < n; ++j)
      for (size_t k = 0; k < n; ++k) inv[i * n + j] += u[k * n + i] * u[k * n + j];
  for (size_t i = 0; i < n; ++i)
    for (size_t j = 0; j < n; ++j) {
      double s = 0;
      for (size_t k = 0; k < n; ++k) s += inv[i * n + k] * h[k * n + j];
      worst = std::max(worst, std::fabs(s - (i == j ? 1.0 : 0.0)));
    }
  return worst < 1e-8 ? "" : str("n=", n, ": |UᵀU·H − I| reaches ", worst);
}

}  // namespace

void register_linalg_tests() {
  harness::add("linalg: upper_factor_of_inverse gives UᵀU = H⁻¹ (odd sizes, n = 1 … 67)", [] {
    for (size_t n : {1, 2, 3, 4, 5, 7, 8, 9, 31, 33, 67}) {
      std::string why = check_inverse(n);
      if (!why.empty()) return why;
    }
    return std::string();
  });
  harness::add("linalg: upper_factor_of_inverse refuses matrices that are not positive definite", [] {
    const double indefinite[] = {1, 2, 2, 1};
    const double zero_pivot[] = {1, 0, 0, 0};
    const double nan_entry[] = {1, 0, 0, std::numeric_limits<double>::quiet_NaN()};
    double u[4];
    for (const double* h : {indefinite, zero_pivot, nan_entry})
      if (lowbit::upper_factor_of_inverse(h, 2, u)) return std::string("accepted a matrix that is not positive definite");
    double none = 0;
    if (!lowbit::upper_factor_of_inverse(&none, 0, &none)) return std::string("refused the empty matrix");
    return std::string();
  });
  harness::add("linalg: gptq_round_block rounds, clamps, carries errors within the block and skips groups without a scale", [] {
    // Row 0: group 0 (step 0.1, signed 4-bit); row 1: group 2 (step 1, zero point 3, 0..15); row 2: group 1 (no
    // scale) throughout: left alone, and its later columns not updated.
    float w[] = {0.26f, 0.1f, 0.9f, 5.0f, 2.4f, 20.0f, 0.3f, 0.4f, 0.5f};
    const double u[] = {1, 0.5, 0.25, 0, 2, 0.5, 0, 0, 1};
    const int32_t group[] = {0, 0, 0, 1, 2, 2, 1, 1, 1};
    const float scale[] = {0.1f, 0.0f, 1.0f};
    const int32_t zero_point[] = {0, 0, 3}, qmin[] = {-8, -8, 0}, qmax[] = {7, 7, 15};
    int32_t values[9] = {-99, -99, -99, -99, -99, -99, -99, -99, -99};
    float errors[9] = {9, 9, 9, 9, 9, 9, 9, 9, 9};
    lowbit::gptq_round_block(w, 3, 3, u, 0, 3, group, 3, scale, zero_point, qmin, qmax, values, errors);
    const int32_t want_values[] = {3, 1, 7, -99, 5, 15, -99, -99, -99};
    const double want_errors[] = {-0.04, 0.01, 0.205, 0, 0.2, 7.9, 0, 0, 0};
    for (int i = 0; i < 9; ++i) {
      if (values[i] != want_values[i]) return str("values[", i, "] = ", values[i], ", want ", want_values[i]);
      if (std::fabs(errors[i] - want_errors[i]) > 1e-5) return str("errors[", i, "] = ", errors[i], ", want ", want_errors[i]);
    }
    if (w[6] != 0.3f || w[7] != 0.4f || w[8] != 0.5f) return str("a row without a scale changed: ", w[6], " ", w[7], " ", w[8]);
    // Ties round to even; only columns [b0, b1) = [1, 3) of 4 are rounded or moved (U_01 and U_23 would move the others).
    float ties[] = {2.5f, -2.5f, 3.5f, 1.0f};
    const double u4[] = {1, 0.5, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0.5, 0, 0, 0, 1};
    const int32_t g0[] = {0, 0};
    const float step[] = {1.0f};
    const int32_t z0[] = {0}, lo[] = {-8}, hi[] = {7};
    int32_t q[2];
    float e[2];
    lowbit::gptq_round_block(ties, 1, 4, u4, 1, 3, g0, 1, step, z0, lo, hi, q, e);
    if (q[0] != -2 || q[1] != 4) return str("ties: ", q[0], " ", q[1], ", want -2 4");
    if (ties[0] != 2.5f || ties[3] != 1.0f) return str("columns outside the block changed: ", ties[0], " ", ties[3]);
    // NaN rounds to 0 with a NaN error; a group index out of range is skipped, not read.
    float odd[] = {std::numeric_limits<float>::quiet_NaN(), 0.7f};
    const double u2[] = {1, 0, 0, 1};
    const int32_t g_odd[] = {0, 5};
    int32_t q2[2] = {-99, -99};
    float e2[2];
    lowbit::gptq_round_block(odd, 1, 2, u2, 0, 2, g_odd, 1, step, z0, lo, hi, q2, e2);
    if (q2[0] != 0 || !std::isnan(e2[0]) || q2[1] != -99 || e2[1] != 0) return str("NaN / bad group: ", q2[0], " ", e2[0], " ", q2[1], " ", e2[1]);
    return std::string();
  });
}
