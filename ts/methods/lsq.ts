/**
 * LSQ, learned step size quantization (Esser et al., ICLR 2020; ALGORITHMS.md §3):
 *   v̂ = roundHalfToEven(clip(v / s, -Q_N, Q_P)) · s
 *   ∂v̂/∂v = 1 inside (-Q_N < v/s < Q_P), else 0 (straight-through estimator)
 *   ∂v̂/∂s = round(v/s) - v/s inside, -Q_N at or below, Q_P at or above
 * Signed: Q_N = 2^(b-1), Q_P = 2^(b-1) - 1; unsigned: Q_N = 0, Q_P = 2^b - 1.
 * The step gradient is Σ gradOut · ∂v̂/∂s over the elements of a step, times
 * gradScale (default 1/√(N·Q_P)). Per-tensor steps (a number) or per-channel
 * steps (a Float32Array, with `shape` and `axis`). Native kernels.
 */
import { checkKernel } from '../cpu';
import { invalidType, invalidValue } from '../errors';
import { native, type NativeLayout } from '../native';
import { tensorLayout } from '../quant-params';
import { checkBoolean, checkFloat32Array, checkInteger, checkKnownKeys, checkShape, isPlainObject } from '../validate';

export interface LsqOptions {
  bits: number;
  /** Default true (weights); false for post-ReLU activations. */
  signed?: boolean;
  /** Tensor shape, needed for per-channel steps. Default [v.length]. */
  shape?: readonly number[];
  /** Channel axis of per-channel steps. Default 0. */
  axis?: number;
  kernel?: string;
  threads?: number;
}

export interface LsqBackwardOptions extends LsqOptions {
  /** Multiplier of the step gradient. Default lsqGradScale(v.length, bits, signed). */
  gradScale?: number;
}

/** Q_N and Q_P of a `bits`-wide integer (LSQ notation). */
export function lsqLevels(bits: number, signed: boolean): { qn: number; qp: number } {
  checkInteger('bits', bits, 1, 32);
  checkBoolean('signed', signed);
  return signed ? { qn: 2 ** (bits - 1), qp: 2 ** (bits - 1) - 1 } : { qn: 0, qp: 2 ** bits - 1 };
}

function checkLsqBits(v: unknown): number {
  return checkInteger('options.bits', v, 2, 8);
}

interface Plan {
  v: Float32Array;
  layout: NativeLayout;
  step: Float32Array;
  qn: number;
  qp: number;
  kernel: string;
  threads: number;
  perChannel: boolean;
}

function plan(v: unknown, step: unknown, options: unknown, backward = false): Plan {
  const x = checkFloat32Array('v', v);
  if (!isPlainObject(options)) throw invalidType('options', 'an object with bits', options);
  // A misspelt key ('singed') would silently keep its default.
  checkKnownKeys('options', options, ['bits', 'signed', 'shape', 'axis', 'kernel', 'threads', ...(backward ? ['gradScale'] : [])]);
  const bits = checkLsqBits(options.bits);
  const signed = options.signed === undefined ? true : checkBoolean('options.signed', options.signed);
  const { qn, qp } = lsqLevels(bits, signed);
  const shape = options.shape === undefined ? [x.length] : checkShape('options.shape', options.shape);
  if (shape.reduce((a, b) => a * b, 1) !== x.length) throw invalidValue('options.shape', `dimensions whose product is v.length = ${x.length}`, options.shape);
  let layout: NativeLayout;
  let steps: Float32Array;
  let perChannel = false;
  if (typeof step === 'number') {
    // Checked before it becomes a float32 (1e-50 would read as 0).
    if (!(step > 0) || !Number.isFinite(Math.fround(step)) || Math.fround(step) === 0) throw invalidValue('step', 'a positive finite float32 number', step);
    layout = tensorLayout(shape, 'tensor', 0, 0).native;
    steps = Float32Array.of(step);
  } else if (step instanceof Float32Array) {
    const axis = options.axis === undefined ? 0 : checkInteger('options.axis', options.axis, 0, Math.max(0, shape.length - 1));
    if (shape.length === 0 || shape[axis] !== step.length) {
      throw invalidValue('step', `one step per channel (${shape.length ? shape[axis] : 0} along axis ${axis})`, step);
    }
    layout = tensorLayout(shape, 'channel', axis, 0).native;
    steps = step;
    perChannel = true;
  } else {
    throw invalidType('step', 'a positive number, or a Float32Array of per-channel steps', step);
  }
  steps.forEach((s, i) => {
    if (!(s > 0) || !Number.isFinite(s)) throw invalidValue(perChannel ? `step[${i}]` : 'step', 'a positive finite number', s);
  });
  for (let i = 0; i < x.length; i++) {
    if (Number.isNaN(x[i])) throw invalidValue(`v[${i}]`, 'a number', NaN, 'Remove NaN values first.');
  }
  const kernel = checkKernel('quantize', options.kernel);
  const threads = options.threads === undefined ? 0 : checkInteger('options.threads', options.threads, 1, 1024);
  return { v: x, layout, step: steps, qn, qp, kernel, threads, perChannel };
}

/**
 * LSQ forward: v̂ = round(clip(v / step, -Q_N, Q_P)) · step (round half to even).
 * @example
 * lsqQuantize(new Float32Array([0.37, 1.0]), 0.1, { bits: 4 })  // ≈ [0.4, 0.7]
 */
export function lsqQuantize(v: Float32Array, step: number | Float32Array, options: LsqOptions): Float32Array {
  const p = plan(v, step, options);
  const out = new Float32Array(p.v.length);
  native().lsqForward(p.v, p.layout, p.step, p.qn, p.qp, out, p.kernel, p.threads);
  return out;
}

/**
 * LSQ backward: the input gradient (straight-through inside the range) and the
 * step gradient(s), multiplied by `gradScale`.
 */
export function lsqBackward(v: Float32Array, step: number | Float32Array, gradOut: Float32Array, options: LsqBackwardOptions):
  { gradInput: Float32Array; gradStep: number | Float64Array } {
  const p = plan(v, step, options, true);
  const g = checkFloat32Array('gradOut', gradOut);
  if (g.length !== p.v.length) throw invalidValue('gradOut', `a Float32Array of v.length = ${p.v.length}`, g);
  const nan = native().finiteRange(g)[3];
  if (nan >= 0) throw invalidValue(`gradOut[${nan}]`, 'a number', NaN, 'A NaN gradient comes from an earlier layer: check the values there.');
  if (p.v.length === 0 && options.gradScale === undefined) {
    throw invalidValue('v', 'a non-empty Float32Array (the gradient scale 1/√(N·Q_P) needs N ≥ 1)', p.v, 'Or pass options.gradScale.');
  }
  const signed = options.signed ?? true;
  const gradScale = options.gradScale === undefined ? lsqGradScale(p.v.length, options.bits, signed) : options.gradScale;
  if (typeof gradScale !== 'number' || !Number.isFinite(gradScale)) throw invalidValue('options.gradScale', 'a finite number', gradScale);
  const gradInput = new Float32Array(p.v.length);
  const sums = new Float64Array(p.step.length);
  native().lsqBackward(p.v, g, p.layout, p.step, p.qn, p.qp, gradInput, sums, p.kernel, p.threads);
  for (let i = 0; i < sums.length; i++) sums[i] *= gradScale;
  return { gradInput, gradStep: p.perChannel ? sums : sums[0] };
}

/** The step-gradient scale g = 1 / √(count · Q_P). */
export function lsqGradScale(count: number, bits: number, signed = true): number {
  checkInteger('count', count, 1, Number.MAX_SAFE_INTEGER);
  const { qp } = lsqLevels(checkInteger('bits', bits, 2, 8), signed);
  return 1 / Math.sqrt(count * qp);
}

/** The initial step s₀ = 2·mean(|v|) / √Q_P. */
export function lsqInitStep(v: Float32Array, options: { bits: number; signed?: boolean }): number {
  const x = checkFloat32Array('v', v);
  if (x.length === 0) throw invalidValue('v', 'a non-empty Float32Array (the mean is undefined otherwise)', x);
  if (!isPlainObject(options)) throw invalidType('options', 'an options object { bits, signed? }', options);
  checkKnownKeys('options', options, ['bits', 'signed']);
  const signed = options.signed === undefined ? true : checkBoolean('options.signed', options.signed);
  const { qp } = lsqLevels(checkLsqBits(options.bits), signed);
  let sum = 0;
  for (let i = 0; i < x.length; i++) {
    if (!Number.isFinite(x[i])) throw invalidValue(`v[${i}]`, 'a finite number', x[i]);
    sum += Math.abs(x[i]);
  }
  return (2 * (sum / x.length)) / Math.sqrt(qp);
}
