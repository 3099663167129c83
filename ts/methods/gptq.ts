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
 * chunks of at most `maxColumns` (H's off-chunk blocks ignored), which keeps
 * the cubic cost of the factorisation small.
 */
import { integerRange, roundHalfToEven, scaleIndices, type QuantizedTensor } from '../quant-params';

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
  /** Largest column chunk solved jointly. Default 512. */
  maxColumns?: number;
}

/**
 * U with H⁻¹ = UᵀU (upper triangular), for a symmetric positive definite H [n, n]:
 * H = V·Vᵀ with V upper (Cholesky from the last row up), then U = V⁻¹.
 * Undefined when H is not positive definite.
 */
export function upperFactorOfInverse(h: Float64Array, n: number): Float64Array | undefined {
  const v = new Float64Array(n * n);
  for (let j = n - 1; j >= 0; j--) {
    let s = h[j * n + j];
    for (let k = j + 1; k < n; k++) s -= v[j * n + k] * v[j * n + k];
    if (!(s > 0)) return undefined;
    const vjj = Math.sqrt(s);
    v[j * n + j] = vjj;
    for (let i = 0; i < j; i++) {
      let t = h[i * n + j];
      for (let k = j + 1; k < n; k++) t -= v[i * n + k] * v[j * n + k];
      v[i * n + j] = t / vjj;
    }
  }
  // U = V⁻¹, row by row from the bottom: U_ii = 1/V_ii, U_ij = −(Σ_{i<k≤j} V_ik·U_kj) / V_ii.
  const u = new Float64Array(n * n);
  for (let i = n - 1; i >= 0; i--) {
    const vii = v[i * n + i];
    u[i * n + i] = 1 / vii;
    for (let k = i + 1; k < n; k++) {
      const vik = v[i * n + k];
      if (vik === 0) continue;
      for (let j = k; j < n; j++) u[i * n + j] -= vik * u[k * n + j];
    }
    for (let j = i + 1; j < n; j++) u[i * n + j] /= vii;
  }
  return u;
}

/**
 * Returns a copy of `q` (quantized from `source` with its scales already chosen)
 * whose integers are re-rounded by GPTQ against the Gram matrices `grams`
 * ([columns, columns] each, one per `view.rowsPerGram` rows). `q` is not modified.
 */
export function gptqRound(q: QuantizedTensor, source: Float32Array, grams: ArrayLike<number>[], view: WeightMatrixView,
  options: GptqOptions = {}): QuantizedTensor {
  const values = q.values.slice();
  const scaleIndex = scaleIndices(q);
  const damping = options.damping ?? 0.01;
  const maxColumns = options.maxColumns ?? 512;
  const { columns } = view;
  const chunks = Math.ceil(columns / maxColumns);
  const ranges = Array.from({ length: q.scale.length }, (_, g) => integerRange(q.channelBits ? q.channelBits[g] : q.bits, q.signed));
  for (let gram = 0; gram < grams.length; gram++) {
    const full = grams[gram];
    for (let chunk = 0; chunk < chunks; chunk++) {
      const first = Math.floor((chunk * columns) / chunks);
      const n = Math.floor(((chunk + 1) * columns) / chunks) - first;
      // Largest diagonal first (GPTQ's "act order"): the most-used inputs are rounded
      // while the most columns remain to absorb their error.
      const order = Array.from({ length: n }, (_, i) => first + i).sort((a, b) => full[b * columns + b] - full[a * columns + a] || a - b);
      const h = new Float64Array(n * n);
      let meanDiagonal = 0;
      for (let a = 0; a < n; a++) {
        for (let b = 0; b < n; b++) h[a * n + b] = full[order[a] * columns + order[b]];
        meanDiagonal += h[a * n + a] / n;
      }
      if (!(meanDiagonal > 0)) continue;  // inputs always zero: any rounding gives the same output
      let u: Float64Array | undefined;
      for (let damp = damping; !u && damp < 1e3; damp *= 10) {
        const damped = h.slice();
        for (let a = 0; a < n; a++) damped[a * n + a] += damp * meanDiagonal + (h[a * n + a] === 0 ? meanDiagonal : 0);
        u = upperFactorOfInverse(damped, n);
      }
      if (!u) continue;
      const w = new Float64Array(n);
      const rowEnd = Math.min(view.rows, (gram + 1) * view.rowsPerGram);
      for (let row = gram * view.rowsPerGram; row < rowEnd; row++) {
        const base = row * view.rowStride;
        for (let a = 0; a < n; a++) w[a] = source[base + order[a] * view.columnStride];
        for (let a = 0; a < n; a++) {
          const e = base + order[a] * view.columnStride;
          const g = scaleIndex[e];
          const s = q.scale[g];
          if (!(s > 0)) continue;
          const z = q.zeroPoint[g];
          const { qmin, qmax } = ranges[g];
          const integer = Math.min(qmax, Math.max(qmin, roundHalfToEven(w[a] / s) + z));
          values[e] = integer;
          const err = (w[a] - (integer - z) * s) / u[a * n + a];
          for (let b = a + 1; b < n; b++) w[b] -= err * u[a * n + b];
        }
      }
    }
  }
  return { ...q, values };
}
