// Dense float64 linear algebra for GPTQ rounding (ts/methods/gptq.ts).
//
// Both functions are bit-identical to their TypeScript references
// (`referenceKernels.upperFactorOfInverse` and `.gptqRoundBlock`, ts/train/kernels.ts): the same
// operations in the same order (dot products with four partial sums, ((s0 + s1)
// + s2) + s3; no fused multiply-add, the build compiles with
// -ffp-contract=off). GPTQ's integers depend on every bit of U, and the TypeScript
// reference is what they were pinned against. Single-threaded.
#pragma once

#include <cstddef>
#include <cstdint>

namespace lowbit {

// U with H⁻¹ = UᵀU (upper triangular), for a symmetric positive definite h
// [n, n] (row-major): Cholesky H = V·Vᵀ with V upper, computed from the last row
// up, then U = V⁻¹. Writes u [n, n] (zero below the diagonal) and returns true;
// returns false (u unspecified) when h is not positive definite (a pivot that
// is not > 0, NaN included). h and u must not overlap.
bool upper_factor_of_inverse(const double* h, size_t n, double* u);

// GPTQ's rounding of columns [b0, b1) of a chunk, row by row: w [rows, n]
// (float32, columns in rounding order, modified in place), u [n, n] the upper
// factor above. For each row r and column a of the block, with the element's
// parameter group g = group[r·width + a − b0] (width = b1 − b0):
//   q = clamp(nearbyint(w/s) + z, qmin, qmax), e = (w − (q − z)·s) / U_aa,
//   w_c −= e·U_ac for the later columns c < b1 of the block (float64, stored
// float32); values and errors [rows, width] get q and e (float32). A group whose
// scale is not > 0 leaves its elements' values untouched and their errors 0, as
// does a group index outside [0, groups) (the binding refuses those up front; the
// check here keeps reads in bounds if group changes meanwhile). A NaN q is stored
// as 0 and its error stays NaN, as a JavaScript Int32Array store does; the
// default rounding mode (to nearest) is assumed.
void gptq_round_block(float* w, size_t rows, size_t n, const double* u, size_t b0, size_t b1, const int32_t* group,
                      size_t groups, const float* scale, const int32_t* zero_point, const int32_t* qmin,
                      const int32_t* qmax, int32_t* values, float* errors);

}  // namespace lowbit
