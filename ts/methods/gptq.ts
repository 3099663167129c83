/**
 * GPTQ rounding (Frantar et al., 2022, after Optimal Brain Quantization): round
 * a layer's weights one input column at a time and push each rounding error
 * onto the columns not yet rounded, weighted by the inverse of the Gram matrix
 * H = Σ x·xᵀ of the layer's calibration inputs, so that the layer's output
 * error ‖(Ŵ − W)·X‖² — not the weights' own error — is what rounding keeps
 * small. The scales stay as chosen (minmax, mse or aciq); only the integers
 * change, each at most a few steps from round-to-nearest.
 *
 * Per output row, with U the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU):
 *   for i in columns (largest diagonal of H first): q_i = round(w_i / s);
 *   e = (w_i − s·q_i) / U_ii;  w_j −= e·U_ij for the later columns j.
 * H is damped by 1% of its mean diagonal. Wide layers are solved in column
 * chunks (`GramBlock`s: only H's diagonal blocks are gathered and used), which
 * keeps calibration memory and the cubic cost of the factorisation small;
 * within a chunk, errors reach the later columns in blocks through SGEMM (the
 * paper's lazy batch updates).
 */
import { integerRange, scaleIndices, type QuantizedTensor } from '../quant-params';
import { pauseClock } from '../onnx/passes/pass';
import { nativeKernels, type FloatKernels, type GptqGroupParams } from '../train/kernels';

/** H over one chunk of columns: [size, size], row-major, for columns first … first + size − 1. */
export interface GramBlock {
  first: number;
  size: number;
  matrix: ArrayLike<number>;
}

/** Splits `columns` into near-equal contiguous chunks of at most `maxColumns`. */
export function columnChunks(columns: number, maxColumns: number): Array<{ first: number; size: number }> {
  const chunks = Math.ceil(columns / maxColumns);
  return Array.from({ length: chunks }, (_, c) => {
    const first = Math.floor((c * columns) / chunks);
    return { first, size: Math.floor(((c + 1) * columns) / chunks) - first };
  });
}

/** Where weight (row, column) lives in the weight tensor, and which Gram matrix its row uses. */
export interface WeightMatrixView {
  rows: number;
  columns: number;
  /** Element index of (row, column) = row·rowStride + column·columnStride. */
  rowStride: number;
  columnStride: number;
  /** Rows per Gram matrix (grouped convolution: output channels per group). */
  rowsPerGram: number;
}

export interface GptqOptions {
  /** Damping added to H's diagonal, as a fraction of its mean diagonal. Default 0.01. */
  damping?: number;
  /** Columns whose errors are pushed onto the later columns at once (lazy batch). Default 32. */
  block?: number;
  /** SGEMM for the block updates and the factorization (upperFactorOfInverse). Default: the addon's. */
  kernels?: FloatKernels;
}

/**
 * Returns a copy of `q` (quantized from `source` with its scales already chosen)
 * whose integers are re-rounded by GPTQ against the Gram matrices `grams` (per
 * group of `view.rowsPerGram` rows, the diagonal blocks of its [columns, columns]
 * H, covering every column once). `q` is not modified.
 */
export function gptqRound(q: QuantizedTensor, source: Float32Array, grams: GramBlock[][], view: WeightMatrixView,
  options: GptqOptions = {}): QuantizedTensor {
  const steps = gptqRoundSteps(q, source, grams, view, options);
  for (;;) {
    const r = steps.next();
    if (r.done) return r.value;
  }
}

/** Milliseconds of GPTQ work between pauses for the event loop. */
const PAUSE_AFTER_MS = 10;

/**
 * gptqRound in pieces: yields `undefined` (a pause, see Steps) after each Gram block's factorization and between
 * column blocks once PAUSE_AFTER_MS have passed, so that one wide layer does not hold the event loop throughout.
 * The result does not depend on where it pauses. (The arithmetic lives in plain functions, which V8 optimizes
 * better than a generator's body.)
 */
export function* gptqRoundSteps(q: QuantizedTensor, source: Float32Array, grams: GramBlock[][], view: WeightMatrixView,
  options: GptqOptions = {}): Generator<undefined, QuantizedTensor, void> {
  const pause = pauseClock(PAUSE_AFTER_MS);
  const values = q.values.slice();
  const scaleIndex = scaleIndices(q);
  const block = options.block ?? 32;
  const kernels = options.kernels ?? nativeKernels();
  const ranges = Array.from({ length: q.scale.length }, (_, g) => integerRange(q.channelBits ? q.channelBits[g] : q.bits, q.signed));
  const params: GptqGroupParams = {
    scale: q.scale, zeroPoint: q.zeroPoint, qmin: Int32Array.from(ranges, (r) => r.qmin), qmax: Int32Array.from(ranges, (r) => r.qmax),
  };
  // Buffers for the largest chunk, reused by every chunk and block of the layer (see Scratch).
  let largest = 0;
  for (const chunks of grams) for (const c of chunks) largest = Math.max(largest, c.size);
  const maxRows = Math.min(view.rows, view.rowsPerGram);
  const scratch: Scratch = {
    h: new Float64Array(largest * largest), u: new Float64Array(largest * largest), w: new Float32Array(maxRows * largest),
    errors: new Float32Array(maxRows * block), uBlock: new Float32Array(block * largest), update: new Float32Array(maxRows * largest),
    group: new Int32Array(maxRows * block), rounded: new Int32Array(maxRows * block), element: new Float64Array(maxRows * block),
  };
  for (let gram = 0; gram < grams.length; gram++) {
    for (const chunk of grams[gram]) {
      const factor = factorChunk(chunk, options.damping ?? 0.01, kernels, scratch);
      if (!factor) continue;
      if (pause()) yield;
      // Rows × columns of this chunk (in rounding order). Errors feed forward within a block of
      // columns one by one, and onto the later columns once per block through SGEMM (GPTQ's lazy
      // batch updates): the row loop costs rows·n·block instead of rows·n².
      const rowStart = gram * view.rowsPerGram;
      const rows = Math.min(view.rows, (gram + 1) * view.rowsPerGram) - rowStart;
      const n = chunk.size;
      const w = scratch.w.subarray(0, rows * n);
      for (let r = 0; r < rows; r++) {
        const base = (rowStart + r) * view.rowStride;
        for (let a = 0; a < n; a++) w[r * n + a] = source[base + factor.order[a] * view.columnStride];
      }
      const state: ChunkState = { values, scaleIndex, params, view, kernels, order: factor.order, u: factor.u, n, w, rows, rowStart, scratch };
      for (let b0 = 0; b0 < n; b0 += block) {
        roundColumnBlock(state, b0, Math.min(n, b0 + block));
        if (pause()) yield;
      }
    }
  }
  return { ...q, values };
}

/**
 * A Gram chunk's columns in rounding order (largest diagonal first, GPTQ's "act order": the most-used inputs are
 * rounded while the most columns remain to absorb their error) and the upper factor of its damped inverse;
 * undefined when the inputs are always zero (any rounding gives the same output) or no damping makes it invertible.
 */
function factorChunk({ first, size: n, matrix: full }: GramBlock, damping: number, kernels: FloatKernels, scratch: Scratch):
  { order: number[]; u: Float64Array } | undefined {
  const local = Array.from({ length: n }, (_, i) => i).sort((a, b) => full[b * n + b] - full[a * n + a] || a - b);
  const h = scratch.h.subarray(0, n * n);
  const diagonal = new Float64Array(n);
  let meanDiagonal = 0;
  for (let a = 0; a < n; a++) {
    for (let b = 0; b < n; b++) h[a * n + b] = full[local[a] * n + local[b]];
    diagonal[a] = h[a * n + a];
    meanDiagonal += diagonal[a] / n;
  }
  if (!(meanDiagonal > 0)) return undefined;
  const u = scratch.u.subarray(0, n * n);
  for (let damp = damping; damp < 1e3; damp *= 10) {
    for (let a = 0; a < n; a++) h[a * n + a] = diagonal[a] + (damp * meanDiagonal + (diagonal[a] === 0 ? meanDiagonal : 0));
    if (kernels.upperFactorOfInverse(h, n, u)) return { order: local.map((i) => first + i), u };
  }
  return undefined;
}

/**
 * Working arrays of a layer's chunks and column blocks, which are processed one at a time, each used through a
 * subarray of its size: allocating them per chunk and block cost more than the native factorization on this
 * development machine, where fresh memory is slow to touch. h, u: the chunk's damped H and its factor; w: the
 * chunk's weights being rounded; errors, uBlock, update: one block's SGEMM operands; group, rounded, element: its
 * elements' parameter groups, integers and indices in the weight tensor.
 */
interface Scratch {
  h: Float64Array;
  u: Float64Array;
  w: Float32Array;
  errors: Float32Array;
  uBlock: Float32Array;
  update: Float32Array;
  group: Int32Array;
  rounded: Int32Array;
  element: Float64Array;
}

interface ChunkState {
  values: QuantizedTensor['values'];
  scaleIndex: ReturnType<typeof scaleIndices>;
  params: GptqGroupParams;
  view: WeightMatrixView;
  kernels: FloatKernels;
  order: number[];
  u: Float64Array;
  n: number;
  w: Float32Array;
  rows: number;
  rowStart: number;
  scratch: Scratch;
}

/** Rounds columns [b0, b1) of a chunk and carries their errors onto the later columns. */
function roundColumnBlock(st: ChunkState, b0: number, b1: number): void {
  const { values, scaleIndex, params, view, order, u, n, w, rows, rowStart, scratch } = st;
  const width = b1 - b0;
  // The block's elements: their parameter groups and current integers (which the kernel keeps where it skips).
  const group = scratch.group.subarray(0, rows * width);
  const rounded = scratch.rounded.subarray(0, rows * width);
  const element = scratch.element.subarray(0, rows * width);
  for (let r = 0; r < rows; r++) {
    const base = (rowStart + r) * view.rowStride;
    for (let a = b0, at = r * width; a < b1; a++, at++) {
      const e = base + order[a] * view.columnStride;
      element[at] = e;
      group[at] = scaleIndex[e];
      rounded[at] = values[e];
    }
  }
  const errors = scratch.errors.subarray(0, rows * width);
  st.kernels.gptqRoundBlock(w, rows, n, u, b0, b1, group, params, rounded, errors);
  for (let at = 0; at < element.length; at++) values[element[at]] = rounded[at];
  const rest = n - b1;
  if (rest === 0) return;
  const uBlock = scratch.uBlock.subarray(0, width * rest);
  for (let a = 0; a < width; a++) for (let c = 0; c < rest; c++) uBlock[a * rest + c] = u[(b0 + a) * n + b1 + c];
  const update = scratch.update.subarray(0, rows * rest);
  st.kernels.sgemm({ transA: false, transB: false, m: rows, n: rest, k: width, a: errors, b: uBlock, c: update, accumulate: false });
  for (let r = 0; r < rows; r++) for (let c = 0; c < rest; c++) w[r * n + b1 + c] -= update[r * rest + c];
}
