/**
 * Sum-preserving rounding: after round-to-nearest, flip the fewest roundings
 * (those nearest their rounding threshold, one step each) so that each
 * convolution filter's taps over one input channel sum to the nearest integer
 * of their real values, Σ q = round(Σ (x/s + z)), as far as one step per
 * element and the integer range allow.
 *
 * Why: a filter whose taps nearly cancel (a depthwise edge detector, Σ W ≈ 0
 * beside taps of ±6) answers flat regions with Σ W · x. Round-to-nearest can
 * change that sum by several steps — at 8 bits, 4× the filter's own response on
 * flat input in the PP-OCRv4 recognizer's first depthwise conv. Flipping one
 * rounding moves an element by less than one step, so the error of each element
 * stays below one step while the error of the sum drops below half a step. This
 * is the integer-grid form of the mean part of ACIQ's weight bias correction,
 * which cannot be written as integers with one symmetric scale. Weights
 * without spatial taps (1×1 convolutions, Gemm, MatMul) are left as rounded:
 * measured on the PP-OCR classifier, preserving the sum over all of a channel's
 * inputs there lowered the output cosine.
 */
import { integerRange, roundHalfToEven, scaleIndices, type QuantizedTensor } from '../quant-params';

/**
 * Returns a copy of `q` (quantized from `source` by round-to-nearest) whose
 * integers are re-rounded so that every run of `run` consecutive elements keeps
 * its sum (see the module comment). For a convolution weight [O, I, kh, kw],
 * `run` = kh·kw: each filter's taps over one input channel, which is its
 * response to a flat region of that channel. Every run must lie in one scale
 * group (true for per-tensor, per-output-channel, GDRQ-group and blocked
 * reduction-axis scales). `q` is not modified.
 */
export function preserveRunSums(q: QuantizedTensor, source: Float32Array, run: number): QuantizedTensor {
  if (source.length !== q.values.length) throw new RangeError(`preserveRunSums: source has ${source.length} values for ${q.values.length} codes.`);
  const values = q.values.slice();
  const group = scaleIndices(q);
  for (let start = 0; start + run <= values.length; start += run) {
    const g = group[start];
    const scale = q.scale[g];
    if (!(scale > 0)) continue;
    const bits = q.channelBits ? q.channelBits[g] : q.bits;
    const { qmin, qmax } = integerRange(bits, q.signed);
    const zero = q.zeroPoint[g];
    // Signed distance of each element from its integer, in steps; the residual also
    // counts what clipping removed, which the other taps then make up for.
    const offset = new Float64Array(run);
    let residual = 0;
    for (let i = 0; i < run; i++) {
      const exact = source[start + i] / scale + zero;
      offset[i] = Math.min(qmax, Math.max(qmin, exact)) - values[start + i];
      residual += exact - values[start + i];
    }
    if (!Number.isFinite(residual)) throw new RangeError(`preserveRunSums: source holds NaN or an infinity in elements ${start}..${start + run - 1}.`);
    let flips = roundHalfToEven(residual);  // as the codes themselves were rounded, whatever the residual's sign
    if (flips === 0) continue;
    const direction = Math.sign(flips);
    // Flip those nearest their threshold first: largest offset in the direction of the residual.
    const order = Array.from(offset.keys()).sort((a, b) => direction * (offset[b] - offset[a]) || a - b);
    for (const i of order) {
      if (flips === 0) break;
      const moved = values[start + i] + direction;
      if (moved < qmin || moved > qmax) continue;
      values[start + i] = moved;
      flips -= direction;
    }
  }
  return { ...q, values };
}
