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

// Packs A [M, K] for a kernel with `mr` rows per tile (layout above); row sums
// are kept per block of `block_size` k (0: one block, all of K).
struct PackedA {
  AlignedBytes bytes;
  size_t mr = 0, kp = 0;  // kp: bytes per row-block row (row-major) or the interleaved depth
  size_t row_stride = 0;          // rows rounded up to mr
  std::vector<int32_t> row_sums;  // [blocks][row_stride]
  const uint8_t* block(size_t row_block) const { return bytes.data.get() + row_block * mr * kp; }
};
// With `row_major`, each block of mr rows is stored row by row (kp bytes a row)
// instead of interleaved: the AMX kernel loads A tiles with a row stride.
// With `centered`, the bytes are s = A - 128 (uint8 A) or A (int8 A), read as
// int8, and the row sums are Σ s: the W4A8 kernels use it when the A zero point
// is 128 (uint8) or 0 (int8), so that s = A - aZp exactly.
void pack_a(const uint8_t* a, bool a_signed, size_t m, size_t k, size_t kp, size_t mr, size_t block_size,
            PackedA* out, ThreadPool* pool, unsigned threads, bool row_major = false, bool centered = false);

// Packs B [K, N] (row-major, ldb = n) for every GEMM kernel.
void pack_b(const uint8_t* b, size_t k, size_t n, bool b_signed, PackedB* out, ThreadPool* pool,
            unsigned threads);

// One microkernel call: rows [0, rows) of packed A times columns [0, cols) of
// the panels starting at b (panel stride = kp * 16 bytes), over kp.
struct GemmTile {
  const uint8_t* a;        // packed a' block: group g of row r at a + g * a_group_stride + r * 4
  size_t a_group_stride;   // = kernel mr * 4 (interleaved A); for row-major A: the row stride
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
  const int32_t* b_col_sums;  // per column Σ b' (at j0), for kernels that offset a'
};

struct GemmKernel {
  const char* name;
  size_t mr;  // rows per tile
  size_t nr;  // columns per tile (a multiple of 16)
  void (*tile)(const GemmTile& t);
  // A packed row-major with rows padded to a multiple of this many bytes
  // (0: the interleaved layout). The kernel may read B panels up to that depth:
  // PackedB keeps slack after the last panel, and the zero padding of A makes
  // whatever lies there count as nothing.
  size_t a_row_align = 0;
};

const GemmKernel* gemm_kernel_portable();  // plain C++ through the real packing/tiling
const GemmKernel* gemm_kernel_avx2();
const GemmKernel* gemm_kernel_avxvnni();
const GemmKernel* gemm_kernel_avx512vnni();
// The AVX-VNNI kernel's source compiled with AVX-512VL+VNNI (EVEX) instead of
// AVX-VNNI (VEX): lets machines without AVX-VNNI test that code. Tests only.
const GemmKernel* gemm_kernel_avxvnni_as_evex();
const GemmKernel* gemm_kernel_neon();
const GemmKernel* gemm_kernel_neondot();
const GemmKernel* gemm_kernel_amx();

// Runs `kernel` on small random products (both signednesses, zero points,
// ragged shapes) and compares with gemm_reference: true when bit-identical.
// Used before dispatching to a kernel this project could not test on its own
// machines (AMX), so a wrong kernel is never picked.
bool gemm_kernel_self_test(const GemmKernel& kernel, ThreadPool* pool);

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

// ---------------------------------------------------------------------------
// W4A8: int4/uint4 weights with block-wise scales along K, int8/uint8 activations.
//   y[i, j] = Σ_blocks fl(aScale · bScale[blk, j]) · float(P[i, j, blk]),
//   P = Σ_{k in blk} (A[i, k] - aZp) · (B[k, j] - bZp[blk, j])       (int32)
// accumulated in float in block order (each product and sum rounded to
// float), the same order in every path, so every path gives the same floats.
// Weights are stored as unsigned nibbles u = B + 8 (int4) or u = B (uint4),
// with the zero point moved the same way (u - zb_u = B - bZp), so kernels
// never sign-extend. Two groups share 64 bytes: byte q holds int8-layout byte
// q of group 2p in its low nibble and of group 2p + 1 in its high nibble, so
// one load, an AND and a shift give two groups ready for vpdpbusd.
namespace lowbit {

struct PackedB4 {
  size_t k = 0, n = 0, kp = 0, np = 0, block_size = 0, blocks = 0;  // kp: multiple of 8
  bool b_signed = true;
  AlignedBytes nibbles;            // panels of kp / 8 group pairs × 64 bytes
  std::vector<float> scale;        // [blocks × n]
  std::vector<int32_t> zero_point; // [blocks × n], in B's int4 domain
  std::vector<int32_t> col_sums;   // [blocks × np]: Σ_{k in block} B[k, j]
  // Call-independent parts of the per-block terms, panel-major so a tile reads
  // them sequentially: entry (blk, j) at term_index(blk, j); 0 in padding.
  std::vector<int32_t> zb;         // B's zero point in the u domain
  std::vector<int32_t> term_base;  // len · zb - Σ b'  (the column term is za · term_base)
  std::vector<float> scale_np;     // B's scale
  bool uniform_zb = false;         // every block and column has the same zero point
  size_t panel_bytes() const { return kp * 8; }
  size_t panel_terms() const { return blocks * kPanelWidth; }
  size_t term_index(size_t blk, size_t j) const {
    return (j / kPanelWidth) * panel_terms() + blk * kPanelWidth + j % kPanelWidth;
  }
  const uint8_t* panel(size_t p) const { return nibbles.data.get() + p * panel_bytes(); }
};

// values: one int4 (signed) or uint4 per byte, [K, N] row-major; scale and
// zero_point: [ceil(K / block_size), N]. Returns the index of the first value
// outside the type's range, or -1.
int64_t pack_b_int4(const uint8_t* values, size_t k, size_t n, bool is_signed, size_t block_size,
                    const float* scale, const int32_t* zero_point, PackedB4* out, ThreadPool* pool,
                    unsigned threads);

// One W4A8 tile over all blocks: rows [0, rows) of packed A (as in GemmTile),
// columns [0, cols) of the nibble panels at b.
struct Int4Tile {
  const uint8_t* a;
  size_t a_group_stride;
  size_t rows;
  const uint8_t* b;
  size_t panel_stride;      // bytes between nibble panels
  size_t cols, store_cols;
  size_t block_groups;      // groups per block (block_size / 4, even)
  size_t blocks;
  size_t total_groups;      // kp / 4, even (the last block may be shorter)
  // Per block and column, panel-major from the tile's first panel: (blk, column
  // c) at (c / 16) * panel_terms + blk * 16 + c % 16.
  const int32_t* zb;
  const int32_t* term_base;  // len·zb - Σ b'
  const float* b_scale;
  size_t panel_terms;
  int32_t za;                // aZp + 128 for int8 A (the a' domain)
  // A packed centered (s = A - aZp as int8, row_sums Σ s; see pack_a): then
  // P = Σ s·u - zb·Σ s, and za, term_base and b_col_sums are not needed.
  bool centered;
  bool uniform_zb;           // zb is the same everywhere (zb[0])
  float a_scale;
  const int32_t* row_sums;  // [blocks][row_stride] at i0: Σ_{k in block} a'
  size_t row_stride;
  const int32_t* b_col_sums;  // Σ_{k in block} b', laid out like zb
  float* y;
  size_t ldy;
};

struct Int4Kernel {
  const char* name;
  size_t mr, nr;
  void (*tile)(const Int4Tile& t);
};

// A dedicated W4A8 kernel for an int8 kernel, or null (then the driver unpacks
// each block into int8 panels and runs the int8 kernel on them).
const Int4Kernel* int4_kernel_for(const GemmKernel& kernel, size_t m);
const Int4Kernel* int4_kernel_avx512vnni(size_t m);

struct Int4Args {
  const uint8_t* a;
  bool a_signed;
  size_t m;
  int32_t a_zero_point;
  float a_scale;
  float* y;  // [M, N]
};

void gemm_int4(const GemmKernel& kernel, const Int4Args& args, const PackedB4& b, ThreadPool* pool,
               unsigned threads);
// Plain loops over the unpacked values in the documented order.
void gemm_int4_reference(const Int4Args& args, const PackedB4& b, ThreadPool* pool, unsigned threads);

}  // namespace lowbit
