// See linalg.h. Loops written as the TypeScript reference's (kernels.ts); the
// compiler vectorizes the element-wise update (axpy) and keeps the order of each
// dot product's four partial sums.
#include "lowbit/linalg.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace lowbit {
namespace {

// Σ_{k=from}^{to−1} a[k]·b[k] with four partial sums (k ≡ 0, 1, 2, 3 from `from`), the tail in the first.
double dot_from(const double* a, const double* b, size_t from, size_t to) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  size_t k = from;
  for (; k + 3 < to; k += 4) {
    s0 += a[k] * b[k];
    s1 += a[k + 1] * b[k + 1];
    s2 += a[k + 2] * b[k + 2];
    s3 += a[k + 3] * b[k + 3];
  }
  for (; k < to; ++k) s0 += a[k] * b[k];
  return s0 + s1 + s2 + s3;
}

// y[k] += alpha·x[k] for k in [from, to).
void axpy_from(double alpha, const double* x, double* y, size_t from, size_t to) {
  for (size_t k = from; k < to; ++k) y[k] += alpha * x[k];
}

}  // namespace

bool upper_factor_of_inverse(const double* h, size_t n, double* u) {
  // V is built in u (fresh memory is slow to touch, and U replaces V row by row below).
  if (n > 0) std::memset(u, 0, n * n * sizeof(double));
  for (size_t j = n; j-- > 0;) {
    const double* vj = u + j * n;
    const double s = h[j * n + j] - dot_from(vj, vj, j + 1, n);
    if (!(s > 0)) return false;
    const double vjj = std::sqrt(s);
    u[j * n + j] = vjj;
    for (size_t i = 0; i < j; ++i) u[i * n + j] = (h[i * n + j] - dot_from(u + i * n, vj, j + 1, n)) / vjj;
  }
  // U = V⁻¹, row by row from the bottom: U_ii = 1/V_ii, U_ij = −(Σ_{i<k≤j} V_ik·U_kj) / V_ii. Row i of U needs
  // row i of V (kept aside) and the rows of U below it, so it can replace row i of V.
  std::vector<double> vi(n);
  for (size_t i = n; i-- > 0;) {
    double* ui = u + i * n;
    std::memcpy(vi.data(), ui, n * sizeof(double));
    std::memset(ui, 0, n * sizeof(double));
    const double vii = vi[i];
    ui[i] = 1 / vii;
    for (size_t k = i + 1; k < n; ++k) {
      const double vik = vi[k];
      if (vik != 0) axpy_from(-vik, u + k * n, ui, k, n);
    }
    for (size_t j = i + 1; j < n; ++j) ui[j] /= vii;
  }
  return true;
}

void gptq_round_block(float* w, size_t rows, size_t n, const double* u, size_t b0, size_t b1, const int32_t* group,
                      size_t groups, const float* scale, const int32_t* zero_point, const int32_t* qmin,
                      const int32_t* qmax, int32_t* values, float* errors) {
  const size_t width = b1 - b0;
  for (size_t r = 0; r < rows; ++r) {
    float* row = w + r * n;
    for (size_t a = b0; a < b1; ++a) {
      const size_t at = r * width + (a - b0);
      const int32_t g = group[at];
      const double s = g >= 0 && size_t(g) < groups ? double(scale[g]) : 0.0;
      if (!(s > 0)) {
        errors[at] = 0;
        continue;
      }
      const double z = zero_point[g];
      const double wa = row[a];
      double q = std::nearbyint(wa / s) + z;
      // Math.min/max propagate NaN, std::min/max do not: clamp only numbers, and store NaN as 0 (as Int32Array does).
      if (!std::isnan(q)) q = std::min(double(qmax[g]), std::max(double(qmin[g]), q));
      values[at] = std::isnan(q) ? 0 : int32_t(q);
      const double e = (wa - (q - z) * s) / u[a * n + a];
      errors[at] = float(e);
      const double* ua = u + a * n;
      for (size_t c = a + 1; c < b1; ++c) row[c] = float(double(row[c]) - e * ua[c]);
    }
  }
}

}  // namespace lowbit
