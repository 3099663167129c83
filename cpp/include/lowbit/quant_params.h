// QuantParams: the one seam between the TypeScript layer (which decides ranges
// and scales) and the kernels (which round, clamp, pack and multiply).
//
// A tensor is viewed as [outer, axis_len, inner] around its quantization axis.
// Element (o, d, i) sits at flat index (o * axis_len + d) * inner + i, and its
// parameters are scale[group] / zero_point[group] with
//   tensor  : group = 0                         (outer = axis_len = 1, inner = N)
//   channel : group = d                         (ONNX per-axis, scale shape [D])
//   block   : group = (o * nb + d / B) * inner + i, nb = ceil(D / B)
//             (ONNX blocked: scale shape = x shape with ceil(D/B) on axis)
// Mirrored by `QuantParams` / `QuantLayout` in ts/quant-params.ts.
#pragma once

#include <cstddef>
#include <cstdint>

namespace lowbit {

enum class Granularity : int { kTensor = 0, kChannel = 1, kBlock = 2 };

struct QuantLayout {
  Granularity kind = Granularity::kTensor;
  size_t outer = 1;
  size_t axis_len = 1;
  size_t inner = 0;
  size_t block_size = 0;  // only for kBlock, >= 1

  size_t element_count() const { return outer * axis_len * inner; }
  size_t blocks_per_axis() const {
    return block_size == 0 ? 0 : (axis_len + block_size - 1) / block_size;
  }
  size_t group_count() const {
    switch (kind) {
      case Granularity::kTensor: return 1;
      case Granularity::kChannel: return axis_len;
      case Granularity::kBlock: return outer * blocks_per_axis() * inner;
    }
    return 0;
  }
};

struct QuantParams {
  const float* scale = nullptr;        // group_count() entries, each > 0 and finite
  const int32_t* zero_point = nullptr; // group_count() entries, each in [qmin, qmax]
  int32_t qmin = -128;                 // saturation range of the integer type
  int32_t qmax = 127;
  QuantLayout layout;
};

// Integer range of a `bits`-wide integer (two's complement when is_signed).
inline void integer_range(int bits, bool is_signed, int32_t* qmin, int32_t* qmax) {
  if (is_signed) {
    *qmin = -(int32_t(1) << (bits - 1));
    *qmax = (int32_t(1) << (bits - 1)) - 1;
  } else {
    *qmin = 0;
    *qmax = (int32_t(1) << bits) - 1;
  }
}

// Scale and zero point for a clip range [lo, hi], as onnxruntime computes them:
// the range is widened to contain 0 so that 0 is exact; symmetric means zero
// point 0 with scale = max|range| / qmax (the restricted range for signed
// types, the full [0, qmax] for unsigned ones); a zero-width range (scale below
// FLT_MIN) gets scale 1 and zero point 0.
// Scale is computed in double and rounded once to float.
void params_from_range(float lo, float hi, int32_t qmin, int32_t qmax, bool symmetric,
                       float* scale, int32_t* zero_point);

}  // namespace lowbit
