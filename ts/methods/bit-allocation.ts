/**
 * ACIQ per-channel bit allocation (Banner et al. §4, ALGORITHMS.md §2.8):
 * with a quota of B = N·2^M̄ bins, channel i gets B_i = α_i^(2/3) / Σ_j α_j^(2/3) · B
 * bins (minimising Σ α_i² / (3·B_i²)), i.e. M_i = round(log2 B_i) bits, clamped to
 * [minBits, maxBits]. Rounding can miss the target mean, so, as in the authors'
 * code, the target is adjusted (target += (goal − mean) / 2, at most 10 times,
 * until |goal − mean| < 0.01).
 */
import { invalidType, invalidValue } from '../errors';
import { checkOptions } from '../validate';

export interface BitAllocationOptions {
  /** Fewest bits a channel may get. Default 2 (the quantizers here support 2..8). */
  minBits?: number;
  /** Most bits a channel may get. Default 8. */
  maxBits?: number;
  /** 'round' (the paper's eq. 11) or 'floor'. Default 'round'. */
  rounding?: 'round' | 'floor';
}

export function allocateBits(alphas: ArrayLike<number>, averageBits: number, options?: BitAllocationOptions): Int32Array {
  if (!alphas || typeof alphas.length !== 'number') throw invalidType('alphas', 'an array of per-channel clip values', alphas);
  if (alphas.length === 0) throw invalidValue('alphas', 'at least one channel', alphas);
  if (alphas.length > 2 ** 28) throw invalidValue('alphas', 'at most 2^28 channels', alphas);
  const o = checkOptions('options', options, ['minBits', 'maxBits', 'rounding']);
  const minBits = o.minBits ?? 2;
  const maxBits = o.maxBits ?? 8;
  if (!Number.isInteger(minBits) || minBits < 1 || minBits > 8) throw invalidValue('options.minBits', 'an integer in [1, 8]', minBits);
  if (!Number.isInteger(maxBits) || maxBits < minBits || maxBits > 8) throw invalidValue('options.maxBits', `an integer in [${minBits}, 8]`, maxBits);
  if (typeof averageBits !== 'number' || !(averageBits >= minBits && averageBits <= maxBits)) {
    throw invalidValue('averageBits', `a number in [minBits, maxBits] = [${minBits}, ${maxBits}]`, averageBits);
  }
  const rounding = o.rounding ?? 'round';
  if (rounding !== 'round' && rounding !== 'floor') throw invalidValue('options.rounding', "'round' or 'floor'", rounding);
  const n = alphas.length;
  const weights = new Float64Array(n);
  let total = 0;
  for (let i = 0; i < n; i++) {
    const a = alphas[i];
    if (typeof a !== 'number' || !(a >= 0) || !Number.isFinite(a)) throw invalidValue(`alphas[${i}]`, 'a non-negative finite number', a);
    weights[i] = a ** (2 / 3);
    total += weights[i];
  }
  const bits = new Int32Array(n);
  const assign = (target: number) => {
    const budget = n * 2 ** target;
    let sum = 0;
    for (let i = 0; i < n; i++) {
      const share = total > 0 ? (weights[i] / total) * budget : 2 ** target;
      const raw = share > 0 ? Math.log2(share) : -Infinity;
      const m = rounding === 'round' ? Math.round(raw) : Math.floor(raw);
      bits[i] = Math.min(maxBits, Math.max(minBits, m));
      sum += bits[i];
    }
    return sum / n;
  };
  let target = averageBits;
  for (let iteration = 0; iteration < 10; iteration++) {
    const mean = assign(target);
    if (Math.abs(averageBits - mean) < 0.01) break;
    target += (averageBits - mean) / 2;
  }
  return bits;
}
