// Dense float64 linear algebra for GPTQ rounding (ts/methods/gptq.ts).
//
// upper_factor_of_inverse is bit-identical to the TypeScript reference
// (`referenceKernels.upperFactorOfInverse`, ts/train/kernels.ts): the same
// operations in the same order (dot products with four partial sums, ((s0 + s1)
// + s2) + s3; no fused multiply-add, the build compiles with
// -ffp-contract=off). GPTQ's integers depend on every bit of U, and the TypeScript
// reference is what they were pinned against. Single-threaded.
#pragma once

#include <cstddef>

namespace lowbit {

// U with H⁻¹ = UᵀU (upper triangular), for a symmetric positive definite h
// [n, n] (row-major): Cholesky H = V·Vᵀ with V upper, computed from the last row
// up, then U = V⁻¹. Writes u [n, n] (zero below the diagonal) and returns true;
// returns false (u unspecified) when h is not positive definite (a pivot that
// is not > 0, NaN included). h and u must not overlap.
bool upper_factor_of_inverse(const double* h, size_t n, double* u);

}  // namespace lowbit
