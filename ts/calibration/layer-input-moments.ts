/**
 * LayerInputMoments: running moments of the vectors one layer's weights meet
 * (an im2col column for Conv, padding included; a row of the input matrix for
 * Gemm/MatMul), one set per convolution group, summed over all calibration
 * batches: the mean (for data-driven bias correction, E[W·x] − E[Ŵ·x]) and,
 * when asked for, the Gram matrix Σ x·xᵀ (its diagonal blocks) — the Hessian of the layer's output
 * error ‖(Ŵ − W)·X‖² that GPTQ rounding (methods/gptq.ts) minimises. Fixed
 * memory (at most columns·512 floats per group with the Gram blocks, columns
 * without), so calibration memory does not grow with the number of batches.
 */
import { create } from '@bufbuild/protobuf';
import { AttributeProto_AttributeType, AttributeProtoSchema, NodeProtoSchema, type NodeProto } from 'onnx-buf';

import { intAttribute, intsAttribute } from '../onnx/graph';
import { nativeKernels, type FloatKernels } from '../train/kernels';
import { windowGeometry } from '../train/ops';
import { columnChunks, type GramBlock } from '../methods/gptq';

export type LayerInput =
  | { kind: 'conv'; node: NodeProto; weightDims: number[] }
  /** Gemm/MatMul: the input's last axis meets the weights (first axis when Gemm's transA is set). */
  | { kind: 'matrix'; columns: number; transposed: boolean };

/**
 * Rows of a [size, size] Gram block, summed over k vectors, computed between pauses: about 2^27 multiply-adds
 * (64 rows × 512 columns × 4 096 pixels, some 10 ms of single-threaded SGEMM here), at least one row.
 */
export function gramBlockRows(size: number, k: number): number {
  return Math.max(1, Math.min(size, Math.floor(2 ** 27 / (size * k))));
}

/** Why a layer's input moments cannot be used (see LayerInputMoments.finite). */
export const NON_FINITE_INPUT = 'the float model gives its input NaN or infinite values on the calibration data';

export class LayerInputMoments {
  /** Columns of each group's vectors (weights one output meets). */
  readonly columns: number;
  readonly groups: number;
  /** Per group, Σ x ([columns]). */
  readonly sums: Float64Array[];
  /**
   * Per group, the diagonal blocks of Σ x·xᵀ over column chunks of at most
   * `maxColumns` (all GPTQ uses; the whole matrix could need gigabytes for wide
   * convolutions); empty unless `gram` was asked for.
   */
  readonly grams: Array<Array<GramBlock & { matrix: Float32Array }>>;
  /** Vectors summed so far (per group). */
  count = 0;
  private readonly kernels: FloatKernels;

  /** A 2-D view of a 1-D convolution (height 1), so one im2col serves both. */
  private readonly conv2d: NodeProto | undefined;

  /** Whether moments can be gathered for this layer: Gemm/MatMul and 1-D or 2-D convolutions. */
  static supports(layer: LayerInput): boolean {
    return layer.kind === 'matrix' || layer.weightDims.length === 3 || layer.weightDims.length === 4;
  }

  constructor(readonly layer: LayerInput, options: { gram?: boolean; maxColumns?: number; kernels?: FloatKernels } = {}) {
    if (!LayerInputMoments.supports(layer)) throw new RangeError('input moments are gathered for Gemm, MatMul and 1-D or 2-D Conv only');
    this.kernels = options.kernels ?? nativeKernels({ threads: 1 });
    this.conv2d = layer.kind === 'conv' ? (layer.weightDims.length === 3 ? asConv2d(layer.node) : layer.node) : undefined;
    if (layer.kind === 'conv') {
      this.groups = intAttribute(layer.node, 'group', 1);
      this.columns = layer.weightDims.slice(1).reduce((a, b) => a * b, 1);
    } else {
      this.groups = 1;
      this.columns = layer.columns;
    }
    this.sums = Array.from({ length: this.groups }, () => new Float64Array(this.columns));
    const chunks = columnChunks(this.columns, options.maxColumns ?? 512);
    this.grams = options.gram
      ? Array.from({ length: this.groups }, () => chunks.map(({ first, size }) => ({ first, size, matrix: new Float32Array(size * size) })))
      : [];
  }

  /**
   * Whether the moments are finite: a NaN or ±Infinity in an input (the float model computes them: a Log of 0, an
   * Exp overflowing) makes its sums non-finite for good, as an input beyond ±2^64 makes the float32 Gram blocks.
   */
  get finite(): boolean {
    return this.sums.every((s) => s.every(Number.isFinite)) && this.grams.every((blocks) => blocks.every((b) => b.matrix.every(Number.isFinite)));
  }

  /** Per group, the mean vector E[x]. */
  means(): Float64Array[] {
    return this.sums.map((s) => Float64Array.from(s, (v) => v / Math.max(1, this.count)));
  }

  observe(data: Float32Array, dims: readonly number[]): void {
    for (const _ of this.observeSteps(data, dims));
  }

  /**
   * observe in pieces: yields after each block of Gram rows (see gramBlockRows) and each convolution group, so that a caller can let
   * the event loop turn in between (one wide layer's Gram update on a large batch took over 100 ms). The sums do not
   * depend on the pieces: SGEMM sums each element in an order fixed by K alone.
   */
  *observeSteps(data: Float32Array, dims: readonly number[]): Generator<void, void, void> {
    const d = this.columns;
    if (this.layer.kind === 'matrix') {
      const rows = data.length / d;
      const transposed = this.layer.transposed;
      if (!Number.isInteger(rows) || (transposed ? dims[0] : dims[dims.length - 1]) !== d) {
        throw new RangeError(`expected ${d} values on the axis the weights meet, got dims [${dims.join(', ')}]`);
      }
      const sums = this.sums[0];
      for (let i = 0; i < data.length; i++) sums[transposed ? Math.floor(i / rows) : i % d] += data[i];
      for (const { first, size, matrix } of this.grams[0] ?? []) {
        // This chunk's columns as a dense [size, rows] block (transposed: A is [K, M], already so).
        const x = transposed ? data.subarray(first * rows, (first + size) * rows) : new Float32Array(size * rows);
        if (!transposed) for (let r = 0; r < rows; r++) for (let c = 0; c < size; c++) x[c * rows + r] = data[r * d + first + c];
        yield* this.gramRows(x, size, rows, matrix);
      }
      this.count += rows;
      return;
    }
    const oneD = this.layer.weightDims.length === 3;
    const [kernelH, kernelW] = oneD ? [1, this.layer.weightDims[2]] : this.layer.weightDims.slice(2);
    if (oneD && dims.length !== 3) throw new RangeError(`a 1-D convolution expects a 3-D [N, C, L] input, got [${dims.join(', ')}]`);
    const full = windowGeometry(this.conv2d!, oneD ? [dims[0], dims[1], 1, dims[2]] : dims, kernelH, kernelW);
    const groupChannels = full.channels / this.groups;
    const geometry = { ...full, channels: groupChannels };
    const pixels = geometry.outH * geometry.outW;
    const plane = full.height * full.width;
    const col = new Float32Array(d * pixels);
    for (let b = 0; b < dims[0]; b++) {
      for (let g = 0; g < this.groups; g++) {
        const start = (b * full.channels + g * groupChannels) * plane;
        this.kernels.im2col(data.subarray(start, start + groupChannels * plane), 1, geometry, col);
        const sums = this.sums[g];
        for (let r = 0; r < d; r++) {
          let s = 0;
          for (let p = r * pixels; p < (r + 1) * pixels; p++) s += col[p];
          sums[r] += s;
        }
        for (const { first, size, matrix } of this.grams[g] ?? []) {
          yield* this.gramRows(col.subarray(first * pixels, (first + size) * pixels), size, pixels, matrix);
        }
        yield;
      }
      this.count += pixels;
    }
  }

  /** matrix += x·xᵀ for x [size, k], by blocks of gramBlockRows rows of the result, yielding after each. */
  private *gramRows(x: Float32Array, size: number, k: number, matrix: Float32Array): Generator<void, void, void> {
    const block = gramBlockRows(size, k);
    for (let r0 = 0; r0 < size; r0 += block) {
      const m = Math.min(block, size - r0);
      this.kernels.sgemm({ transA: false, transB: true, m, n: size, k, a: x.subarray(r0 * k, (r0 + m) * k), b: x, c: matrix.subarray(r0 * size, (r0 + m) * size), accumulate: true });
      yield;
    }
  }
}

/** The node with its 1-D strides, dilations and pads as 2-D ones over a height of 1. */
function asConv2d(node: NodeProto): NodeProto {
  const ints = (name: string, values: number[]) => create(AttributeProtoSchema, { name, type: AttributeProto_AttributeType.INTS, ints: values.map(BigInt) });
  const strides = intsAttribute(node, 'strides') ?? [1];
  const dilations = intsAttribute(node, 'dilations') ?? [1];
  const pads = intsAttribute(node, 'pads') ?? [0, 0];
  const kept = node.attribute.filter((a) => !['strides', 'dilations', 'pads', 'kernel_shape'].includes(a.name));
  return create(NodeProtoSchema, {
    ...node, attribute: [...kept, ints('strides', [1, strides[0]]), ints('dilations', [1, dilations[0]]), ints('pads', [0, pads[0], 0, pads[1]])],
  } as never);
}
