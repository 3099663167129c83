/**
 * ACIQ, analytical clipping for integer quantization (Banner, Nahshan, Soudry,
 * NeurIPS 2019): the clip α that minimises the expected squared error of a
 * Laplace or Gaussian tensor quantized to M bits with 2^M bins over [-α, α]
 * (ALGORITHMS.md §2). Noise model: clipping error of the tails plus
 * α² / (3·4^M) of rounding noise.
 *  - Laplace(b): MSE = 2b²·e^(-α/b) + α²/(3·4^M); optimum α/b = W0(3·4^M).
 *  - Gauss(σ):   MSE = (α² + σ²)·erfc(α/(√2σ)) - √(2/π)·α·σ·e^(-α²/2σ²) + α²/(3·4^M);
 *                optimum from α·[erfc(α/√2σ) + 1/(3·4^M)] = √(2/π)·σ·e^(-α²/2σ²), solved once per M.
 *  - One-sided (post-ReLU) tensors use the (M+1)-bit constant (half the range, same bins) on unsigned or asymmetric
 *    codes, and the M-bit one on signed symmetric codes, whose half above 0 is all they use (aciqRange's symmetricGrid).
 */
import { invalidType, invalidValue } from '../errors';
import { bisect, erfc, lambertW0 } from './special';
import { checkAttached, checkBoolean, checkOptions, isPlainObject } from '../validate';

export type AciqPrior = 'laplace' | 'gauss';

// Public calls take 1..8 bits (the paper's table starts at M = 1); the one-sided
// constant of 8 bits is the 9-bit one, hence the internal limit.
function checkBits(bits: unknown, name = 'bits', max = 8): number {
  if (typeof bits !== 'number') throw invalidType(name, `an integer in [1, ${max}]`, bits);
  if (!Number.isInteger(bits) || bits < 1 || bits > max) throw invalidValue(name, `an integer in [1, ${max}]`, bits);
  return bits;
}

function checkPrior(prior: unknown, auto: boolean): void {
  const choices = auto ? ['laplace', 'gauss', 'auto'] : ['laplace', 'gauss'];
  if (!choices.includes(prior as string)) {
    const expected = `one of ${choices.map((c) => `'${c}'`).join(', ')}`;
    throw typeof prior === 'string' ? invalidValue('prior', expected, prior) : invalidType('prior', expected, prior);
  }
}

function checkScaleParam(name: string, v: unknown, what = ' (b for Laplace, σ for Gauss)'): number {
  if (typeof v !== 'number') throw invalidType(name, `a non-negative finite number${what}`, v);
  if (!(v >= 0) || !Number.isFinite(v)) throw invalidValue(name, `a non-negative finite number${what}`, v);
  return v;
}

const laplaceCache = new Map<number, number>();
const gaussCache = new Map<number, number>();

/** Optimal α / b for a Laplace prior at M bits: W0(3·4^M). */
export function aciqLaplaceConstant(bits: number): number {
  checkBits(bits, 'bits', 9);
  let c = laplaceCache.get(bits);
  if (c === undefined) {
    c = lambertW0(3 * 4 ** bits);
    laplaceCache.set(bits, c);
  }
  return c;
}

/** Optimal α / σ for a Gaussian prior at M bits: the root of the first-order condition. */
export function aciqGaussConstant(bits: number): number {
  checkBits(bits, 'bits', 9);
  let c = gaussCache.get(bits);
  if (c === undefined) {
    const noise = 1 / (3 * 4 ** bits);
    const foc = (a: number) => a * (erfc(a / Math.SQRT2) + noise) - Math.sqrt(2 / Math.PI) * Math.exp((-a * a) / 2);
    c = bisect(foc, 1e-6, 20);
    gaussCache.set(bits, c);
  }
  return c;
}

/** Analytic expected squared error of clipping at α and quantizing to `bits` (ACIQ's model). */
export function aciqExpectedMse(prior: AciqPrior, alpha: number, scaleParam: number, bits: number): number {
  checkPrior(prior, false);
  checkScaleParam('alpha', alpha, ' (the clip distance)');
  checkScaleParam('scaleParam', scaleParam);
  checkBits(bits, 'bits', 16);
  const noise = (alpha * alpha) / (3 * 4 ** bits);
  if (scaleParam === 0) return noise;
  if (prior === 'laplace') return 2 * scaleParam * scaleParam * Math.exp(-alpha / scaleParam) + noise;
  const s = scaleParam;
  return (alpha * alpha + s * s) * erfc(alpha / (Math.SQRT2 * s)) -
    Math.sqrt(2 / Math.PI) * alpha * s * Math.exp((-alpha * alpha) / (2 * s * s)) + noise;
}

/**
 * The MSE-optimal clip α (distance from the mean) for a `bits`-bit quantizer.
 * @param scaleParam Laplace b (mean |x - mean|) or Gaussian σ.
 * @example
 * aciqAlpha(4, 'laplace', 1)  // 5.02864014 (= W0(768))
 */
export function aciqAlpha(bits: number, prior: AciqPrior, scaleParam: number, options?: { oneSided?: boolean }): number {
  checkBits(bits);
  if (prior !== 'laplace' && prior !== 'gauss') throw invalidValue('prior', "'laplace' or 'gauss'", prior);
  const b = checkScaleParam('scaleParam', scaleParam);
  const { oneSided } = checkOptions('options', options, ['oneSided']) as { oneSided?: unknown };
  if (oneSided !== undefined) checkBoolean('options.oneSided', oneSided);
  const m = oneSided ? bits + 1 : bits;
  return b * (prior === 'laplace' ? aciqLaplaceConstant(m) : aciqGaussConstant(m));
}

export interface TensorStats {
  count: number;
  mean: number;
  /** Laplace scale: mean |x - mean|. */
  laplaceB: number;
  /** Unbiased standard deviation. */
  sigma: number;
  min: number;
  max: number;
}

/** Mean, Laplace b = mean|x - mean|, unbiased σ, min and max of the finite values (ALGORITHMS.md §2.5). */
export function tensorStats(x: ArrayLike<number>, name = 'x'): TensorStats {
  if (typeof name !== 'string') throw invalidType('name', 'a string (the tensor name for error messages)', name);
  if (!Array.isArray(x) && !(ArrayBuffer.isView(x) && !(x instanceof DataView))) throw invalidType(name, 'an array or typed array of numbers', x);
  if (ArrayBuffer.isView(x)) checkAttached(name, x);
  let n = 0;
  let sum = 0;
  let min = Infinity;
  let max = -Infinity;
  for (let i = 0; i < x.length; i++) {
    const v = x[i];
    if (typeof v !== 'number') throw invalidValue(`${name}[${i}]`, 'a number', v, 'Convert the values with Number() first.');
    if (Number.isNaN(v)) throw invalidValue(`${name}[${i}]`, 'a number', v, 'Remove NaN values first.');
    if (!Number.isFinite(v)) continue;
    n++;
    sum += v;
    if (v < min) min = v;
    if (v > max) max = v;
  }
  if (n === 0) throw invalidValue(name, 'at least one finite value (the statistics are undefined otherwise)', x);
  // Values near the float64 limit overflow the sums: the statistics would be Infinity and NaN.
  if (!Number.isFinite(sum)) throw invalidValue(name, 'values whose sum stays finite (float64)', x, 'Scale them down first.');
  const mean = sum / n;
  let abs = 0;
  let sq = 0;
  for (let i = 0; i < x.length; i++) {
    const v = x[i];
    if (!Number.isFinite(v)) continue;
    abs += Math.abs(v - mean);
    sq += (v - mean) * (v - mean);
  }
  if (!Number.isFinite(sq)) throw invalidValue(name, 'values whose squared spread stays finite (float64)', x, 'Scale them down first.');
  return { count: n, mean, laplaceB: abs / n, sigma: n > 1 ? Math.sqrt(sq / (n - 1)) : 0, min, max };
}

export interface AciqChoice {
  prior: AciqPrior;
  alpha: number;
  /** Clip range: [max(min, mean - α), min(max, mean + α)], or [0, max(mean, 0) + α] one-sided. */
  lo: number;
  hi: number;
  expectedMse: number;
}

/**
 * ACIQ clip range of a tensor (or one group) from its statistics, for one prior or the analytic best ('auto').
 * `symmetricGrid`: the codes are signed and symmetric (zero point 0), so one-sided values fill only the half of them
 * above 0 — 2^(M−1) bins over [0, α], the M-bit constant — not all 2^M of an unsigned grid (the (M+1)-bit one).
 */
export function aciqRange(stats: TensorStats, bits: number, prior: AciqPrior | 'auto', oneSided: boolean, symmetricGrid = false): AciqChoice {
  if (!isPlainObject(stats) || (['mean', 'laplaceB', 'sigma', 'min', 'max'] as const).some((k) => typeof stats[k] !== 'number')) {
    throw invalidType('stats', 'the { mean, laplaceB, sigma, min, max } numbers tensorStats() returns', stats);
  }
  for (const k of ['mean', 'min', 'max'] as const) if (!Number.isFinite(stats[k])) throw invalidValue(`stats.${k}`, 'a finite number', stats[k]);
  for (const k of ['laplaceB', 'sigma'] as const) checkScaleParam(`stats.${k}`, stats[k], '');
  if (!(stats.min <= stats.mean && stats.mean <= stats.max)) {
    throw invalidValue('stats', 'min <= mean <= max (as tensorStats() returns them)', `min ${stats.min}, mean ${stats.mean}, max ${stats.max}`);
  }
  checkBits(bits);
  checkPrior(prior, true);
  checkBoolean('oneSided', oneSided);
  checkBoolean('symmetricGrid', symmetricGrid);
  const fullGrid = oneSided && !symmetricGrid;  // one-sided values over every code: the (M+1)-bit constant
  const candidates: AciqPrior[] = prior === 'auto' ? ['laplace', 'gauss'] : [prior];
  let best: AciqChoice | undefined;
  for (const p of candidates) {
    const scale = p === 'laplace' ? stats.laplaceB : stats.sigma;
    const alpha = aciqAlpha(bits, p, scale, { oneSided: fullGrid });
    const expectedMse = aciqExpectedMse(p, alpha, scale, fullGrid ? bits + 1 : bits);
    const lo = oneSided ? 0 : Math.max(stats.min, stats.mean - alpha);
    // One-sided over values all below 0: nothing to keep above the 0 it starts from, [0, 0].
    const hi = oneSided ? Math.max(0, Math.min(stats.max, Math.max(stats.mean, 0) + alpha)) : Math.min(stats.max, stats.mean + alpha);
    if (!best || expectedMse < best.expectedMse) best = { prior: p, alpha, lo, hi, expectedMse };
  }
  return best!;
}
