/**
 * ACIQ bias correction (Banner et al. §5, ALGORITHMS.md §2.9).
 *  - Weights, per output channel c: restore the mean and the spread of the
 *    float weights in the quantized ones. Default 'moments' (the authors'
 *    code): Wq ← (Wq − mean(Wq))·std(W)/std(Wq) + mean(W), which restores both
 *    exactly (population std); 'paper' applies eq. 13, w ← ξ·(w + μ) with
 *    μ = E(W) − E(Wq) and ξ = ‖W − E(W)‖ / ‖Wq − E(Wq)‖, which does not restore
 *    the mean unless ξ = 1.
 *  - Data-driven: the expected output shift E[W·x] − E[Ŵ·x̂] per output channel,
 *    to add to the layer's bias.
 */
import { invalidType, invalidValue } from '../errors';
import { checkFloat32Array, checkInteger, checkKnownKeys, checkShape, isPlainObject } from '../validate';

export interface WeightBiasCorrectionOptions {
  /** Tensor shape; output channels along `axis`. */
  shape: readonly number[];
  /** Output-channel axis. Default 0. */
  axis?: number;
  method?: 'moments' | 'paper';
}

/** NaN, an infinity or a non-number would make every sum it enters NaN: named by its index instead. */
function checkFiniteValues(name: string, values: ArrayLike<unknown>): void {
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (typeof v !== 'number') throw invalidType(`${name}[${i}]`, 'a finite number', v);
    if (!Number.isFinite(v)) throw invalidValue(`${name}[${i}]`, 'a finite number', v);
  }
}

function channelView(shape: number[], axis: number) {
  const outer = shape.slice(0, axis).reduce((a, b) => a * b, 1);
  const channels = shape[axis];
  const inner = shape.slice(axis + 1).reduce((a, b) => a * b, 1);
  const forEach = (c: number, fn: (index: number) => void) => {
    for (let o = 0; o < outer; o++) for (let i = 0; i < inner; i++) fn((o * channels + c) * inner + i);
  };
  return { channels, count: outer * inner, forEach };
}

/** Corrected dequantized weights, per output channel (see the module comment). */
export function correctWeightBias(original: Float32Array, quantized: Float32Array, options: WeightBiasCorrectionOptions): Float32Array {
  const w = checkFloat32Array('original', original);
  const wq = checkFloat32Array('quantized', quantized);
  if (wq.length !== w.length) throw invalidValue('quantized', `a Float32Array of original.length = ${w.length}`, wq);
  checkFiniteValues('original', w);
  checkFiniteValues('quantized', wq);
  if (!isPlainObject(options)) throw invalidType('options', 'an options object { shape, axis?, method? }', options);
  checkKnownKeys('options', options, ['shape', 'axis', 'method']);
  const shape = checkShape('options.shape', options.shape);
  if (shape.reduce((a, b) => a * b, 1) !== w.length) throw invalidValue('options.shape', `dimensions whose product is ${w.length}`, options.shape);
  const axis = options.axis === undefined ? 0 : checkInteger('options.axis', options.axis, 0, shape.length - 1);
  const method = options.method ?? 'moments';
  if (method !== 'moments' && method !== 'paper') throw invalidValue('options.method', "'moments' or 'paper'", method);
  const view = channelView(shape, axis);
  if (view.count === 0) throw invalidValue('options.shape', 'channels with at least one weight (the moments are undefined otherwise)', shape);
  const out = new Float32Array(w.length);
  for (let c = 0; c < view.channels; c++) {
    let sw = 0;
    let sq = 0;
    view.forEach(c, (i) => {
      sw += w[i];
      sq += wq[i];
    });
    const mw = sw / view.count;
    const mq = sq / view.count;
    let vw = 0;
    let vq = 0;
    view.forEach(c, (i) => {
      vw += (w[i] - mw) ** 2;
      vq += (wq[i] - mq) ** 2;
    });
    const ratio = vq > 0 ? Math.sqrt(vw / vq) : 1;  // std(W)/std(Wq) = ξ (the same ratio of norms)
    if (method === 'moments') {
      view.forEach(c, (i) => (out[i] = (wq[i] - mq) * ratio + mw));
    } else {
      const mu = mw - mq;
      view.forEach(c, (i) => (out[i] = ratio * (wq[i] + mu)));
    }
  }
  return out;
}

/**
 * Expected output shift per output channel, E[W·x] − E[Ŵ·x̂], for a linear layer
 * (weights [out, in]) or a convolution (weights [out, in, ...kernel]) from the
 * mean input per input channel (and the mean quantized input, default the same).
 * Add it to the bias after quantizing the layer.
 */
export function expectedOutputShift(original: Float32Array, quantized: Float32Array, shape: readonly number[],
  inputMean: ArrayLike<number>, quantizedInputMean: ArrayLike<number> = inputMean): Float64Array {
  const w = checkFloat32Array('original', original);
  const wq = checkFloat32Array('quantized', quantized);
  const dims = checkShape('shape', shape);
  if (dims.length < 2) throw invalidValue('shape', 'at least [out, in]', shape);
  if (dims.reduce((a, b) => a * b, 1) !== w.length || wq.length !== w.length) throw invalidValue('shape', `dimensions whose product is ${w.length} (and quantized of that length)`, shape);
  const [out, inp] = dims;
  const spatial = dims.slice(2).reduce((a, b) => a * b, 1);
  if (inputMean.length !== inp || quantizedInputMean.length !== inp) throw invalidValue('inputMean', `${inp} values (one per input channel)`, inputMean);
  checkFiniteValues('original', w);
  checkFiniteValues('quantized', wq);
  checkFiniteValues('inputMean', inputMean);
  checkFiniteValues('quantizedInputMean', quantizedInputMean);
  const shift = new Float64Array(out);
  for (let o = 0; o < out; o++) {
    let s = 0;
    for (let i = 0; i < inp; i++) {
      for (let t = 0; t < spatial; t++) {
        const idx = (o * inp + i) * spatial + t;
        s += w[idx] * inputMean[i] - wq[idx] * quantizedInputMean[i];
      }
    }
    shift[o] = s;
  }
  return shift;
}
