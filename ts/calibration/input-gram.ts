/**
 * InputGram: the running Gram matrix Σ x·xᵀ of the vectors one layer's weights
 * meet (an im2col column for Conv, a row of the input matrix for Gemm/MatMul),
 * one matrix per convolution group, summed over all calibration batches. It is
 * the Hessian of the layer's output error ‖(Ŵ − W)·X‖² that GPTQ rounding
 * (methods/gptq.ts) minimises. Fixed memory (columns² floats per group), so
 * calibration memory does not grow with the number of batches.
 */
import type { NodeProto } from 'onnx-buf';

import { intAttribute } from '../onnx/graph';
import { nativeKernels, type FloatKernels } from '../train/kernels';
import { windowGeometry } from '../train/ops';

export type GramLayer =
  | { kind: 'conv'; node: NodeProto; weightDims: number[] }
  /** Gemm/MatMul: the input's last axis meets the weights (first axis when Gemm's transA is set). */
  | { kind: 'matrix'; columns: number; transposed: boolean };

export class InputGram {
  /** Columns of each Gram matrix (weights one output meets in one group). */
  readonly columns: number;
  readonly groups: number;
  /** One row-major [columns, columns] matrix per group. */
  readonly matrices: Float32Array[];
  /** Vectors summed so far. */
  count = 0;
  private readonly kernels: FloatKernels;

  constructor(readonly layer: GramLayer, kernels: FloatKernels = nativeKernels({ threads: 1 })) {
    this.kernels = kernels;
    if (layer.kind === 'conv') {
      this.groups = intAttribute(layer.node, 'group', 1);
      this.columns = layer.weightDims.slice(1).reduce((a, b) => a * b, 1);
    } else {
      this.groups = 1;
      this.columns = layer.columns;
    }
    this.matrices = Array.from({ length: this.groups }, () => new Float32Array(this.columns * this.columns));
  }

  observe(data: Float32Array, dims: readonly number[]): void {
    const d = this.columns;
    if (this.layer.kind === 'matrix') {
      const rows = data.length / d;
      if (!Number.isInteger(rows) || (this.layer.transposed ? dims[0] : dims[dims.length - 1]) !== d) {
        throw new RangeError(`expected ${d} values on the axis the weights meet, got dims [${dims.join(', ')}]`);
      }
      // transposed: A is [K, M] and its columns are the vectors.
      this.kernels.sgemm({ transA: !this.layer.transposed, transB: this.layer.transposed, m: d, n: d, k: rows, a: data, b: data,
        c: this.matrices[0], accumulate: true });
      this.count += rows;
      return;
    }
    const [, , kernelH, kernelW] = this.layer.weightDims;
    const full = windowGeometry(this.layer.node, dims, kernelH, kernelW);
    const groupChannels = full.channels / this.groups;
    const geometry = { ...full, channels: groupChannels };
    const pixels = geometry.outH * geometry.outW;
    const plane = full.height * full.width;
    const col = new Float32Array(d * pixels);
    for (let b = 0; b < dims[0]; b++) {
      for (let g = 0; g < this.groups; g++) {
        const start = (b * full.channels + g * groupChannels) * plane;
        this.kernels.im2col(data.subarray(start, start + groupChannels * plane), 1, geometry, col);
        this.kernels.sgemm({ transA: false, transB: true, m: d, n: d, k: pixels, a: col, b: col, c: this.matrices[g], accumulate: true });
      }
      this.count += pixels;
    }
  }
}
