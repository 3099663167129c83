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
import { integerRange, roundHalfToEven, scaleIndices, type QuantizedTensor } from '../quant-params';
import { pauseClock } from '../onnx/passes/pass';
import { nativeKernels, type FloatKernels } from '../train/kernels';

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
  /** SGEMM for the block updates. Default: the addon's. */
  kernels?: FloatKernels;
}

/**
 * U with H⁻¹ = UᵀU (upper triangular), for a symmetric positive definite H [n, n]:
 * H = V·Vᵀ with V upper (Cholesky from the last row up), then U = V⁻¹.
 * Undefined when H is not positive definite.
 */
export function upperFactorOfInverse(h: Float64Array, n: number): Float64Array | undefined {
  const v = new Float64Array(n * n);
  for (let j = n - 1; j >= 0; j--) {
    const rowJ = j * n;
    const s = h[rowJ + j] - dotFrom(v, rowJ, v, rowJ, j + 1, n);
    if (!(s > 0)) return undefined;
    const vjj = Math.sqrt(s);
    v[rowJ + j] = vjj;
    for (let i = 0; i < j; i++) v[i * n + j] = (h[i * n + j] - dotFrom(v, i * n, v, rowJ, j + 1, n)) / vjj;
  }
  // U = V⁻¹, row by row from the bottom: U_ii = 1/V_ii, U_ij = −(Σ_{i<k≤j} V_ik·U_kj) / V_ii.
  const u = new Float64Array(n * n);
  for (let i = n - 1; i >= 0; i--) {
    const rowI = i * n;
    const vii = v[rowI + i];
    u[rowI + i] = 1 / vii;
    for (let k = i + 1; k < n; k++) {
      const vik = v[rowI + k];
      if (vik !== 0) axpyFrom(-vik, u, k * n, u, rowI, k, n);
    }
    for (let j = i + 1; j < n; j++) u[rowI + j] /= vii;
  }
  return u;
}

/** Σ_{k=from}^{to−1} a[ai+k]·b[bi+k], four partial sums (the loops of the factorisation). */
function dotFrom(a: Float64Array, ai: number, b: Float64Array, bi: number, from: number, to: number): number {
  let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  let k = from;
  for (; k + 3 < to; k += 4) {
    s0 += a[ai + k] * b[bi + k];
    s1 += a[ai + k + 1] * b[bi + k + 1];
    s2 += a[ai + k + 2] * b[bi + k + 2];
    s3 += a[ai + k + 3] * b[bi + k + 3];
  }
  for (; k < to; k++) s0 += a[ai + k] * b[bi + k];
  return s0 + s1 + s2 + s3;
}

/** y[yi+k] += alpha·x[xi+k] for k in [from, to). */
function axpyFrom(alpha: number, x: Float64Array, xi: number, y: Float64Array, yi: number, from: number, to: number): void {
  let k = from;
  for (; k + 3 < to; k += 4) {
    y[yi + k] += alpha * x[xi + k];
    y[yi + k + 1] += alpha * x[xi + k + 1];
    y[yi + k + 2] += alpha * x[xi + k + 2];
    y[yi + k + 3] += alpha * x[xi + k + 3];
  }
  for (; k < to; k++) y[yi + k] += alpha * x[xi + k];
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
  for (let gram = 0; gram < grams.length; gram++) {
    for (const chunk of grams[gram]) {
      const factor = factorChunk(chunk, options.damping ?? 0.01);
      if (!factor) continue;
      if (pause()) yield;
      // Rows × columns of this chunk (in rounding order). Errors feed forward within a block of
      // columns one by one, and onto the later columns once per block through SGEMM (GPTQ's lazy
      // batch updates): the row loop costs rows·n·block instead of rows·n².
      const rowStart = gram * view.rowsPerGram;
      const rows = Math.min(view.rows, (gram + 1) * view.rowsPerGram) - rowStart;
      const n = chunk.size;
      const w = new Float32Array(rows * n);
      for (let r = 0; r < rows; r++) {
        const base = (rowStart + r) * view.rowStride;
        for (let a = 0; a < n; a++) w[r * n + a] = source[base + factor.order[a] * view.columnStride];
      }
      const state: ChunkState = { q, values, scaleIndex, ranges, view, kernels, order: factor.order, u: factor.u, n, w, rows, rowStart };
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
function factorChunk({ first, size: n, matrix: full }: GramBlock, damping: number): { order: number[]; u: Float64Array } | undefined {
  const local = Array.from({ length: n }, (_, i) => i).sort((a, b) => full[b * n + b] - full[a * n + a] || a - b);
  const h = new Float64Array(n * n);
  let meanDiagonal = 0;
  for (let a = 0; a < n; a++) {
    for (let b = 0; b < n; b++) h[a * n + b] = full[local[a] * n + local[b]];
    meanDiagonal += h[a * n + a] / n;
  }
  if (!(meanDiagonal > 0)) return undefined;
  for (let damp = damping; damp < 1e3; damp *= 10) {
    const damped = h.slice();
    for (let a = 0; a < n; a++) damped[a * n + a] += damp * meanDiagonal + (h[a * n + a] === 0 ? meanDiagonal : 0);
    const u = upperFactorOfInverse(damped, n);
    if (u) return { order: local.map((i) => first + i), u };
  }
  return undefined;
}

interface ChunkState {
  q: QuantizedTensor;
  values: QuantizedTensor['values'];
  scaleIndex: ReturnType<typeof scaleIndices>;
  ranges: Array<{ qmin: number; qmax: number }>;
  view: WeightMatrixView;
  kernels: FloatKernels;
  order: number[];
  u: Float64Array;
  n: number;
  w: Float32Array;
  rows: number;
  rowStart: number;
}

/** Rounds columns [b0, b1) of a chunk and carries their errors onto the later columns. */
function roundColumnBlock(st: ChunkState, b0: number, b1: number): void {
  const { q, values, scaleIndex, ranges, view, order, u, n, w, rows, rowStart } = st;
  const width = b1 - b0;
  const errors = new Float32Array(rows * width);
  for (let r = 0; r < rows; r++) {
    const base = (rowStart + r) * view.rowStride;
    for (let a = b0; a < b1; a++) {
      const e = base + order[a] * view.columnStride;
      const g = scaleIndex[e];
      const s = q.scale[g];
      if (!(s > 0)) continue;
      const z = q.zeroPoint[g];
      const { qmin, qmax } = ranges[g];
      const wa = w[r * n + a];
      const integer = Math.min(qmax, Math.max(qmin, roundHalfToEven(wa / s) + z));
      values[e] = integer;
      const err = (wa - (integer - z) * s) / u[a * n + a];
      errors[r * width + (a - b0)] = err;
      for (let c = a + 1; c < b1; c++) w[r * n + c] -= err * u[a * n + c];
    }
  }
  const rest = n - b1;
  if (rest === 0) return;
  const uBlock = new Float32Array(width * rest);
  for (let a = 0; a < width; a++) for (let c = 0; c < rest; c++) uBlock[a * rest + c] = u[(b0 + a) * n + b1 + c];
  const update = new Float32Array(rows * rest);
  st.kernels.sgemm({ transA: false, transB: false, m: rows, n: rest, k: width, a: errors, b: uBlock, c: update, accumulate: false });
  for (let r = 0; r < rows; r++) for (let c = 0; c < rest; c++) w[r * n + b1 + c] -= update[r * rest + c];
}
