/**
 * GDRQ, group-based distribution reshaping (Yu et al., CVPRW 2020; ALGORITHMS.md §4).
 *  - scaleClip: W_c = clip(W, -T, T), T = k · mean|W| (k = 2 keeps a uniform
 *    distribution unchanged), per tensor or per contiguous channel group.
 *  - ActivationScaleClip: the same for activations with a running (EMA)
 *    threshold and k = 3 by default. The paper's exact k and update are
 *    UNCONFIRMED; these defaults follow the public implementations and are options.
 *  - Group scales become a per-channel gain on the integer accumulator and
 *    vanish into batch normalization: foldScalesIntoBatchNorm.
 * Group-based quantization itself is quantizeTensor(w, { granularity: 'group', groups, axis }).
 */
import { invalidType, invalidValue } from '../errors';
import { native } from '../native';
import { checkFloat32Array, checkInteger, checkOptions, checkShape } from '../validate';

export interface ScaleClipOptions {
  /** Threshold multiplier. Default 2. */
  k?: number;
  /** Tensor shape and channel axis for per-group thresholds. Default: one threshold. */
  shape?: readonly number[];
  axis?: number;
  /** Contiguous channel groups along `axis`, each with its own threshold. Default 1. */
  groups?: number;
}

function checkK(k: unknown, fallback: number): number {
  if (k === undefined) return fallback;
  if (typeof k !== 'number' || !(k > 0) || !Number.isFinite(k)) throw invalidValue('options.k', 'a positive finite number', k);
  return k;
}

/** Scale-Clip: returns the clipped copy and the threshold of each group. */
export function scaleClip(w: Float32Array, opts?: ScaleClipOptions): { clipped: Float32Array; thresholds: Float64Array } {
  const x = checkFloat32Array('w', w);
  const options = checkOptions('options', opts, ['k', 'shape', 'axis', 'groups']);
  if (x.length === 0) throw invalidValue('w', 'a non-empty tensor (mean|W| is undefined otherwise)', x);
  const k = checkK(options.k, 2);
  const shape = options.shape === undefined ? [x.length] : checkShape('options.shape', options.shape);
  if (shape.reduce((a, b) => a * b, 1) !== x.length) throw invalidValue('options.shape', `dimensions whose product is w.length = ${x.length}`, options.shape);
  const axis = options.axis === undefined ? 0 : checkInteger('options.axis', options.axis, 0, shape.length - 1);
  const groups = options.groups === undefined ? 1 : checkInteger('options.groups', options.groups, 1, shape[axis]);
  if (shape.length === 0) throw invalidValue('options.shape', 'at least one dimension (the channels to group)', options.shape);
  if (shape[axis] % groups !== 0) throw invalidValue('options.groups', `a divisor of the ${shape[axis]} channels along axis ${axis}`, groups);
  const outer = shape.slice(0, axis).reduce((a, b) => a * b, 1);
  const run = (shape[axis] / groups) * shape.slice(axis + 1).reduce((a, b) => a * b, 1);
  const sums = new Float64Array(groups);
  const counts = new Float64Array(groups);
  for (let o = 0; o < outer; o++) {
    for (let g = 0; g < groups; g++) {
      const base = (o * groups + g) * run;
      for (let i = 0; i < run; i++) {
        const v = x[base + i];
        if (!Number.isFinite(v)) throw invalidValue(`w[${base + i}]`, 'a finite number', v);
        sums[g] += Math.abs(v);
      }
      counts[g] += run;
    }
  }
  const thresholds = Float64Array.from(sums, (s, g) => (k * s) / counts[g]);
  const clipped = new Float32Array(x.length);
  for (let o = 0; o < outer; o++) {
    for (let g = 0; g < groups; g++) {
      const t = thresholds[g];
      const base = (o * groups + g) * run;
      for (let i = 0; i < run; i++) clipped[base + i] = Math.min(t, Math.max(-t, x[base + i]));
    }
  }
  return { clipped, thresholds };
}

/** Scale-Clip for activations: T follows an exponential moving average of k·mean|A| over batches. */
export class ActivationScaleClip {
  readonly k: number;
  readonly momentum: number;
  /** The running threshold (undefined before the first batch). */
  threshold: number | undefined;

  constructor(options?: { k?: number; momentum?: number }) {
    const o = checkOptions('options', options, ['k', 'momentum']);
    this.k = checkK(o.k, 3);
    const m = o.momentum ?? 0.99;
    if (typeof m !== 'number' || !(m >= 0 && m < 1)) throw invalidValue('options.momentum', 'a number in [0, 1)', m);
    this.momentum = m;
  }

  /** Updates the threshold from a batch: T ← m·T + (1 - m)·k·mean|A| (the first batch sets it). */
  update(batch: Float32Array): number {
    const x = checkFloat32Array('batch', batch);
    if (x.length === 0) throw invalidValue('batch', 'a non-empty batch', x);
    let sum = 0;
    for (let i = 0; i < x.length; i++) {
      if (!Number.isFinite(x[i])) throw invalidValue(`batch[${i}]`, 'a finite number', x[i]);
      sum += Math.abs(x[i]);
    }
    const t = (this.k * sum) / x.length;
    this.threshold = this.threshold === undefined ? t : this.momentum * this.threshold + (1 - this.momentum) * t;
    return this.threshold;
  }

  /** Clips a batch to [-T, T] with the current threshold. */
  apply(batch: Float32Array): Float32Array {
    const x = checkFloat32Array('batch', batch);
    if (this.threshold === undefined) throw invalidValue('threshold', 'a threshold from update(batch) first', undefined);
    const t = this.threshold;
    const nan = native().finiteRange(x)[3];
    if (nan >= 0) throw invalidValue(`batch[${nan}]`, 'a number', NaN, 'Remove NaN values first.');
    return Float32Array.from(x, (v) => Math.min(t, Math.max(-t, v)));
  }
}

export interface BatchNormParams {
  gamma: ArrayLike<number>;
  beta: ArrayLike<number>;
  mean: ArrayLike<number>;
  variance: ArrayLike<number>;
  epsilon?: number;
}

/**
 * Folds per-channel scales α_c of an integer accumulator ŷ into the following
 * batch normalization: BN(α_c·ŷ) = gain_c·ŷ + shift_c with
 * gain = γ·α / √(var + ε) and shift = β − γ·μ / √(var + ε).
 * @example
 * foldScalesIntoBatchNorm({ gamma: [1.5], beta: [0.2], mean: [0.1], variance: [4], epsilon: 0 }, [0.05])
 * // { gain: [0.0375], shift: [0.125] }
 */
export function foldScalesIntoBatchNorm(bn: BatchNormParams, channelScale: ArrayLike<number>): { gain: Float64Array; shift: Float64Array } {
  if (!bn || typeof bn !== 'object') throw invalidType('bn', 'an object { gamma, beta, mean, variance, epsilon? }', bn);
  if (!channelScale || typeof channelScale.length !== 'number') throw invalidType('channelScale', 'an array of per-channel scales', channelScale);
  const n = channelScale.length;
  for (const key of ['gamma', 'beta', 'mean', 'variance'] as const) {
    const v = bn[key];
    if (!v || v.length !== n) throw invalidValue(`bn.${key}`, `${n} values (one per channel, like channelScale)`, v);
  }
  const eps = bn.epsilon ?? 1e-5;
  if (typeof eps !== 'number' || !(eps >= 0) || !Number.isFinite(eps)) throw invalidValue('bn.epsilon', 'a non-negative finite number', eps);
  // Every element a finite number: a string would concatenate ('4' + 0 = '40'), NaN would spread.
  for (const [name, values] of [['bn.gamma', bn.gamma], ['bn.beta', bn.beta], ['bn.mean', bn.mean], ['bn.variance', bn.variance], ['channelScale', channelScale]] as const) {
    for (let c = 0; c < n; c++) {
      if (typeof values[c] !== 'number' || !Number.isFinite(values[c])) throw invalidValue(`${name}[${c}]`, 'a finite number', values[c]);
    }
  }
  const gain = new Float64Array(n);
  const shift = new Float64Array(n);
  for (let c = 0; c < n; c++) {
    const variance = bn.variance[c];
    if (!(variance + eps > 0)) throw invalidValue(`bn.variance[${c}]`, 'variance + epsilon > 0', variance);
    const inv = 1 / Math.sqrt(variance + eps);
    gain[c] = bn.gamma[c] * channelScale[c] * inv;
    shift[c] = bn.beta[c] - bn.gamma[c] * bn.mean[c] * inv;
  }
  return { gain, shift };
}
