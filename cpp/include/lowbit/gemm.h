// Integer GEMM with ONNX MatMulInteger semantics:
//   C[i, j] = Σ_k (A[i, k] - aZp) · (B[k, j] - bZp[j])   (int32, wrapping)
// for row-major A [M, K] and B [K, N], each int8 or uint8.
//
// Every kernel multiplies an unsigned byte a' by a signed byte b' (the VNNI
// instruction shape) and the driver folds types and zero points back in:
// a' = A + ca (ca = 128 when A is signed, i.e. a' = A ^ 0x80), b' = B - cb
// (cb = 128 when B is unsigned), so with za = aZp + ca and zb_j = bZp_j - cb
//   C[i, j] = Σ a'b' - zb_j · Σ_k a'[i, k] - za · Σ_k b'[k, j] + K · za · zb_j
// which is exact in int32 arithmetic modulo 2^32, like the reference.
//
// Packed B (PackedB): panels of 16 columns; inside a panel, groups of 4 k:
// byte (k, j) of panel p sits at p * kp * 16 + (k / 4) * 64 + (j % 16) * 4 + k % 4,
// with K padded to kp = ceil(K / 4) * 4 and N to np = ceil(N / 16) * 16 by zeros.
// One 64-byte group row is one zmm for vpdpbusd and one AMX B-tile row.
// Packed A (per kernel, mr rows per block): the 4-byte groups of a block's
// rows interleaved, so one group of all mr rows is mr·4 contiguous bytes:
// byte (i, k) sits at (i / mr) · kp · mr + (k / 4) · mr · 4 + (i % mr) · 4 + k % 4;
// rows past M and k past K are zero. Plus the row sums Σ_k a'[i, k].
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lowbit/cpu_features.h"
#include "lowbit/thread_pool.h"

namespace lowbit {

constexpr size_t kPanelWidth = 16;  // columns per packed-B panel
constexpr size_t kGroupDepth = 4;   // k per group

// 64-byte aligned byte storage.
struct AlignedBytes {
  struct Free {
    void operator()(void* p) const;
  };
  std::unique_ptr<uint8_t, Free> data;
  size_t size = 0;
  void allocate(size_t bytes);
};

struct PackedB {
  size_t k = 0, n = 0, kp = 0, np = 0;
  bool b_signed = true;      // element type of the original B
  AlignedBytes bytes;        // b' panels, as described above
  std::vector<int32_t> col_sums;  // Σ_k b'[k, j], np entries (0 for padding)
  const int8_t* panel(size_t p) const {
    return reinterpret_cast<const int8_t*>(bytes.data.get()) + p * kp * kPanelWidth;
  }
};

// Packs B [K, N] (row-major, ldb = n) for every GEMM kernel.
void pack_b(const uint8_t* b, size_t k, size_t n, bool b_signed, PackedB* out, ThreadPool* pool,
            unsigned threads);

// One microkernel call: rows [0, rows) of packed A times columns [0, cols) of
// the panels starting at b (panel stride = kp * 16 bytes), over kp.
struct GemmTile {
  const uint8_t* a;        // packed a' block: group g of row r at a + g * a_group_stride + r * 4
  size_t a_group_stride;   // = kernel mr * 4
  size_t rows;             // 1..kernel mr
  const int8_t* b;         // first panel
  size_t panel_stride;     // bytes between panels
  size_t kp;               // multiple of 4
  size_t cols;             // 1..kernel nr (columns that exist in packed B: <= np - j0)
  size_t store_cols;       // columns to write (<= cols)
  int32_t* c;
  size_t ldc;
  const int32_t* col_term;  // per column: K·za·zb_j - za·Σb'_j  (at j0)
  const int32_t* zb;        // per column zb_j (at j0)
  const int32_t* row_sums;  // per row Σ a' (at i0)
};

struct GemmKernel {
  const char* name;
  size_t mr;  // rows per tile
  size_t nr;  // columns per tile (a multiple of 16)
  void (*tile)(const GemmTile& t);
};

const GemmKernel* gemm_kernel_portable();  // plain C++ through the real packing/tiling
const GemmKernel* gemm_kernel_avx2();
const GemmKernel* gemm_kernel_avxvnni();
const GemmKernel* gemm_kernel_avx512vnni();
// The AVX-VNNI kernel's source compiled with AVX-512VL+VNNI (EVEX) instead of
// AVX-VNNI (VEX): lets machines without AVX-VNNI test that code. Tests only.
const GemmKernel* gemm_kernel_avxvnni_as_evex();

// Kernel names usable on this CPU, best first ("scalar" = the reference loops).
std::vector<std::string> available_gemm_kernels(const CpuFeatures& cpu);
// The kernel for `name` ("" = best). Null for "scalar" (use gemm_reference) or
// when unusable here; *known tells whether the name exists at all.
const GemmKernel* find_gemm_kernel(const std::string& name, const CpuFeatures& cpu, bool* usable);

struct GemmArgs {
  const uint8_t* a;       // [M, K] row-major bytes
  bool a_signed;
  size_t m, k, n;
  int32_t a_zero_point;   // in A's element type
  const int32_t* b_zero_point;  // one per column when b_zp_per_column, else one
  bool b_zp_per_column;
  int32_t* c;             // [M, N]
};

// C = A·B through packed B with `kernel` (must not be null).
void gemm_packed(const GemmKernel& kernel, const GemmArgs& args, const PackedB& b, ThreadPool* pool,
                 unsigned threads);

// The reference: plain loops over the unpacked operands, uint32 wrapping arithmetic.
void gemm_reference(const GemmArgs& args, const uint8_t* b, bool b_signed, ThreadPool* pool,
                    unsigned threads);

}  // namespace lowbit

namespace lowbit {

// Unpacks B back to its original bytes [K, N] (for the reference path).
void unpack_b(const PackedB& b, uint8_t* out);

// onnxruntime MatMulIntegerToFloat output: with multiplier_j = a_scale·b_scale_j
// (float), y = float(c)·multiplier_j + bias_j, each operation rounded to float.
void int32_to_float(const int32_t* c, size_t m, size_t n, float a_scale, const float* b_scale,
                    bool b_scale_per_column, const float* bias, float* y);

// ONNX QLinearMatMul output: with multiplier_j = (a_scale·b_scale_j) / y_scale
// (float), y = saturate(roundHalfToEven(float(c)·multiplier_j) + y_zp) to
// [qmin, qmax]; relu raises the lower bound to y_zp.
void requantize_int32(const int32_t* c, size_t m, size_t n, float a_scale, const float* b_scale,
                      bool b_scale_per_column, float y_scale, int32_t y_zero_point, int32_t qmin,
                      int32_t qmax, bool relu, uint8_t* y);

}  // namespace lowbit
