/**
 * Streaming calibration observers: each keeps a fixed amount of state, however
 * many batches it sees (memory does not grow with the number of batches), and
 * can be merged with another observer of the same kind. The loops over a batch's
 * values are native (finiteRange, histogramAdd, group moments); the searches over
 * the kept state are here.
 *
 *  - MinMaxObserver: running min/max, or an exponential moving average of the
 *    per-batch min/max (onnxruntime's CalibMovingAverage).
 *  - HistogramObserver: histogram of |x| with `bins` bins over [0, R], R a power
 *    of two that doubles as needed (re-binning merges 2^k old bins into one,
 *    exactly); ranges by percentile, by KL divergence (TensorRT entropy
 *    calibration: 2048 bins, 128 quantized levels) or by the least expected
 *    squared error (negative values also counted apart, and exact zeros).
 *  - ChannelRangeObserver: per-channel min/max of NC… tensors (depthwise input equalization).
 *  - AciqObserver: per-batch mean, Laplace b and σ averaged over batches
 *    (weighted by count; the authors average per-batch statistics), global
 *    min/max, and the ACIQ clip range from them.
 */
import { invalidType, invalidValue } from '../errors';
import { aciqRange, tensorStats, type AciqPrior } from '../methods/aciq';
import { native } from '../native';
import { integerRange } from '../quant-params';
import { checkAttached, checkBoolean, checkInteger, checkOptions, otherRealm } from '../validate';

export interface Range {
  lo: number;
  hi: number;
}

function checkBatch(batch: unknown): Float32Array {
  if (!(batch instanceof Float32Array)) throw invalidType('batch', 'a Float32Array', batch, otherRealm(batch, 'Float32Array'));
  checkAttached('batch', batch);
  return batch;
}

/** `other` must be an observer of this kind (merging another kind, or a plain object, would give NaN ranges). */
function checkOther<T>(other: unknown, kind: abstract new (...args: never[]) => T): T {
  if (!(other instanceof kind)) throw invalidType('other', `${/^[AEIOU]/.test(kind.name) ? 'an' : 'a'} ${kind.name} to merge`, other, 'Merge observers of one kind.');
  return other;
}

/** The error for a NaN at `index` of an observed batch. */
function nanInBatch(index: number): RangeError {
  return invalidValue(`batch[${index}]`, 'a number', NaN, 'Remove NaN values before calibration.');
}

function batchMinMax(batch: Float32Array): { min: number; max: number; finite: number } {
  const [min, max, finite, nan] = native().finiteRange(batch);
  if (nan >= 0) throw nanInBatch(nan);
  return { min, max, finite };
}

export class MinMaxObserver {
  private min = Infinity;
  private max = -Infinity;
  private batches = 0;

  /** @param options.movingAverage - if set (0 < c <= 1), min/max follow avg += c·(batch - avg). */
  private readonly options: { movingAverage?: number };

  constructor(options?: { movingAverage?: number }) {
    this.options = checkOptions('options', options, ['movingAverage']);
    const c = this.options.movingAverage;
    if (c !== undefined && typeof c !== 'number') throw invalidType('options.movingAverage', 'a number in (0, 1]', c);
    if (c !== undefined && !(c > 0 && c <= 1)) throw invalidValue('options.movingAverage', 'a number in (0, 1]', c);
  }

  observe(batch: Float32Array): this {
    const { min, max, finite } = batchMinMax(checkBatch(batch));
    if (finite === 0) return this;
    const c = this.options.movingAverage;
    if (c === undefined || this.batches === 0) {
      this.min = Math.min(this.min, min);
      this.max = Math.max(this.max, max);
    } else {
      this.min += c * (min - this.min);
      this.max += c * (max - this.max);
    }
    this.batches++;
    return this;
  }

  merge(other: MinMaxObserver): this {
    checkOther(other, MinMaxObserver);
    if (other.options.movingAverage !== this.options.movingAverage) {
      throw invalidValue('other.options.movingAverage', `${this.options.movingAverage ?? 'none'}, as this observer's`, other.options.movingAverage ?? 'none',
        'Merge observers made with the same options.');
    }
    // (With a moving average the union of the two ranges is kept: the averages' orders are unknown.)
    this.min = Math.min(this.min, other.min);
    this.max = Math.max(this.max, other.max);
    this.batches += other.batches;
    return this;
  }

  range(): Range {
    if (this.batches === 0) throw invalidValue('observer', 'at least one observed batch with finite values', 'none');
    return { lo: this.min, hi: this.max };
  }
}

export class HistogramObserver {
  readonly bins: number;
  /** Counts of |x| per bin over [0, limit). */
  readonly counts: Float64Array;
  /** Counts of the negative values by |x|, over the same bins (counts holds them too). */
  readonly negativeCounts: Float64Array;
  /** Upper end of the histogram: a power of two (0 before any non-zero value). */
  limit = 0;
  /** How many values were exactly 0 (in counts' first bin too). */
  zeros = 0;
  min = Infinity;
  max = -Infinity;
  total = 0;

  constructor(options?: { bins?: number }) {
    const o = checkOptions('options', options, ['bins']);
    const bins = o.bins ?? 2048;
    // (A million bins is ~16 MB of counts; more gains nothing over 8-bit grids.)
    if (!Number.isInteger(bins) || bins < 128 || bins > 2 ** 20 || bins % 128 !== 0) throw invalidValue('options.bins', 'a multiple of 128 from 128 to 2^20', bins);
    this.bins = bins;
    this.counts = new Float64Array(bins);
    this.negativeCounts = new Float64Array(bins);
  }

  /** Makes room for |x| up to maxAbs: the limit becomes a power of two strictly above it, so every bin is half-open. */
  private grow(maxAbs: number): void {
    if (maxAbs === 0 || maxAbs < this.limit) return;
    let limit = this.limit === 0 ? 2 ** Math.floor(Math.log2(maxAbs)) : this.limit;
    while (limit <= maxAbs) limit *= 2;
    // (A closed top bin would hold a power-of-two maximum that a wider histogram puts in the next bin up.)
    this.rebin(limit);
  }

  /** Re-bins to a limit that is this one times a power of two. */
  private rebin(limit: number): void {
    if (limit <= this.limit) return;
    if (this.limit > 0) {
      const factor = limit / this.limit;  // a power of two: old bins nest exactly
      for (const counts of [this.counts, this.negativeCounts]) {
        for (let i = 0; i < this.bins; i++) {
          const c = counts[i];
          counts[i] = 0;
          counts[Math.floor(i / factor)] += c;
        }
      }
    }
    this.limit = limit;
  }

  observe(batch: Float32Array): this {
    const { min, max, finite } = batchMinMax(checkBatch(batch));
    if (finite === 0) return this;
    this.min = Math.min(this.min, min);
    this.max = Math.max(this.max, max);
    this.grow(Math.max(Math.abs(min), Math.abs(max)));
    this.zeros += native().histogramAdd(batch, this.limit > 0 ? this.bins / this.limit : 0, this.counts, this.negativeCounts);
    this.total += finite;
    return this;
  }

  merge(other: HistogramObserver): this {
    checkOther(other, HistogramObserver);
    if (other.bins !== this.bins) throw invalidValue('other.bins', `${this.bins} bins`, other.bins);
    if (other.total === 0) return this;
    this.rebin(other.limit);
    // Other's bins nest in ours (both limits powers of two); an other holding only zeros has them all in bin 0.
    const factor = other.limit === 0 ? Infinity : this.limit / other.limit;
    for (let i = 0; i < other.bins; i++) {
      this.counts[Math.floor(i / factor)] += other.counts[i];
      this.negativeCounts[Math.floor(i / factor)] += other.negativeCounts[i];
    }
    this.zeros += other.zeros;
    this.min = Math.min(this.min, other.min);
    this.max = Math.max(this.max, other.max);
    this.total += other.total;
    return this;
  }

  private check(): void {
    if (this.total === 0) throw invalidValue('observer', 'at least one observed finite value', 'none');
  }

  private clip(threshold: number): Range {
    return { lo: Math.max(this.min, -threshold), hi: Math.min(this.max, threshold) };
  }

  /** The range that keeps `percentile` percent of |x| (e.g. 99.99). */
  percentileRange(percentile = 99.99): Range {
    this.check();
    if (typeof percentile !== 'number' || !(percentile > 0 && percentile <= 100)) throw invalidValue('percentile', 'a number in (0, 100]', percentile);
    const target = (this.total * percentile) / 100;
    let cumulative = 0;
    const width = this.limit / this.bins;
    for (let i = 0; i < this.bins; i++) {
      cumulative += this.counts[i];
      if (cumulative >= target) return this.clip((i + 1) * width);
    }
    return this.clip(this.limit);
  }

  /**
   * TensorRT-style entropy calibration: the threshold (a bin edge from
   * `levels` bins up) whose clipped, `levels`-level quantized distribution has the
   * smallest KL divergence from the clipped reference distribution. `levels` is
   * the number of quantization steps between 0 and the threshold (TensorRT's 128
   * is int8's); `klLevels` gives it for other bit widths. The first bin's count
   * is replaced by the second's (as NVIDIA's pytorch-quantization does): after a
   * ReLU most values are exactly 0, and that spike alone would make a tiny clip
   * look like a faithful distribution. The search starts at 1/16 of the histogram.
   */
  klRange(levels = 128): Range {
    this.check();
    if (!Number.isInteger(levels) || levels < 1 || levels > this.bins) throw invalidValue('levels', `an integer in [1, ${this.bins}]`, levels);
    if (this.limit === 0) return { lo: 0, hi: 0 };
    const nb = this.bins;
    const h = Float64Array.from(this.counts);
    h[0] = h[1];
    // Prefix sums of h, h·log h and of the non-empty bins: within a merged group Q is one constant c, so
    // Σ p·log(p/c) over the group is (Σ h·log h − log(total·c)·Σ h) / total, and a candidate threshold
    // costs O(levels) instead of O(bins) logs.
    const mass = new Float64Array(nb + 1);
    const massLogMass = new Float64Array(nb + 1);
    const nonEmpty = new Float64Array(nb + 1);
    for (let j = 0; j < nb; j++) {
      mass[j + 1] = mass[j] + h[j];
      massLogMass[j + 1] = massLogMass[j] + (h[j] > 0 ? h[j] * Math.log(h[j]) : 0);
      nonEmpty[j + 1] = nonEmpty[j] + (h[j] !== 0 ? 1 : 0);
    }
    const total = mass[nb];
    if (total === 0) return this.clip(this.limit);
    const logTotal = Math.log(total);
    let bestKl = Infinity;
    let bestI = nb;
    // Thresholds below 1/16 of the histogram (TensorRT's first candidate, bin 128 of
    // 2048) are not tried: with few levels, P and Q are each normalised, so a clip that
    // moves most of the mass into the last bin can still look faithful.
    for (let i = Math.max(levels, nb / 16); i <= nb; i++) {
      // P: the first i bins, the clipped tail added to the last. Q: the i bins merged into `levels`
      // groups, each group's mass spread evenly over its non-empty bins, normalised to qs; Q is floored
      // at eps where P has mass.
      const qs = mass[i];
      if (qs === 0) continue;
      const eps = 1e-4 / i;
      const merged = i / levels;
      let sum = 0;  // Σ h·log(h / (total·q)) over the non-empty bins before the last one
      let lastQ = 0;
      for (let g = 0; g < levels; g++) {
        const start = Math.floor(g * merged);
        const stop = g === levels - 1 ? i : Math.floor((g + 1) * merged);
        const groupMass = mass[stop] - mass[start];
        if (groupMass === 0) continue;
        const q = Math.max(groupMass / (nonEmpty[stop] - nonEmpty[start]) / qs, eps);
        // Bin i − 1 (in the last group) carries the tail: its term is added below.
        const end = g === levels - 1 ? i - 1 : stop;
        if (g === levels - 1 && h[i - 1] !== 0) lastQ = q;
        const m = mass[end] - mass[start];
        if (m > 0) sum += massLogMass[end] - massLogMass[start] - m * (logTotal + Math.log(q));
      }
      let kl = sum / total;
      const lastP = (h[i - 1] + (total - mass[i])) / total;
      if (lastP > 0) kl += lastP * Math.log(lastP / Math.max(lastQ, eps));
      if (kl < bestKl) {
        bestKl = kl;
        bestI = i;
      }
    }
    return this.clip((bestI * this.limit) / nb);
  }

  /**
   * The range whose quantizer has the least expected squared error on the observed values: each bin's
   * values taken as uniform over the bin, each side of zero from its own counts; inside the representable
   * range the rounding noise Δ²/12 (exact zeros cost nothing: 0 is always representable), outside it the
   * squared distance to the nearer end. Candidates: the observed ends scaled by 1, 1 − 1/candidates, …,
   * 1/candidates, each end on its own for an asymmetric range, one threshold for a symmetric one (never a
   * range whose low end passes its high end). `signed` (default true) and `symmetric` (default: `signed`) must
   * be those the range is then quantized with (activations: both equal to `activations.signed`). The model
   * charges every in-range value Δ²/12, so values piled on one point other than 0 (a Clip's bound, 8-bit
   * pixels) count more rounding noise than they get.
   */
  mseRange(bits: number, opts?: { signed?: boolean; symmetric?: boolean; candidates?: number }): Range {
    this.check();
    const options = checkOptions('options', opts, ['signed', 'symmetric', 'candidates']);
    if (!Number.isInteger(bits) || bits < 2 || bits > 16) throw invalidValue('bits', 'an integer in [2, 16]', bits);
    const candidates = options.candidates === undefined ? 100 : checkInteger('options.candidates', options.candidates, 1, 1000);
    const signed = options.signed === undefined ? true : checkBoolean('options.signed', options.signed);
    const symmetric = options.symmetric === undefined ? signed : checkBoolean('options.symmetric', options.symmetric);
    const { qmin, qmax } = integerRange(bits, signed);
    if (this.limit === 0) return { lo: this.min, hi: this.max };  // only zeros
    const ratios = Array.from({ length: candidates }, (_, c) => (candidates - c) / candidates);
    let los: number[];
    let his: number[];
    if (symmetric) {
      const ranges = ratios.map((r) => this.clip(Math.max(-this.min, this.max) * r));
      los = ranges.map((r) => r.lo);
      his = ranges.map((r) => r.hi);
    } else {
      // Every pair of a low and a high end.
      const lows = this.min < 0 ? ratios.map((r) => this.min * r) : [this.min];
      const highs = this.max > 0 ? ratios.map((r) => this.max * r) : [this.max];
      los = lows.flatMap((lo) => highs.map(() => lo));
      his = lows.flatMap(() => highs);
    }
    const count = los.length;
    const scale = new Float32Array(count);
    const zeroPoint = new Int32Array(count);
    native().paramsFromRanges(Float32Array.from(los), Float32Array.from(his), qmin, qmax, symmetric, scale, zeroPoint);
    const positive = new BinMoments(this, false);
    const negative = new BinMoments(this, true);
    let best = 0;
    let bestError = Infinity;
    for (let c = 0; c < count; c++) {
      // One-sided data: a high end below the lowest value (or a low end above the highest) is no range.
      if (!(los[c] <= his[c])) continue;
      const s = scale[c];
      const pos = positive.split((qmax - zeroPoint[c]) * s);
      const neg = negative.split((zeroPoint[c] - qmin) * s);
      const error = ((pos.inside + neg.inside) * s * s) / 12 + pos.clipped + neg.clipped;
      if (error < bestError) {
        bestError = error;
        best = c;
      }
    }
    return { lo: los[best], hi: his[best] };
  }
}

/**
 * One side of a histogram (the positive values, or the negative ones by magnitude), without exact zeros, with
 * suffix sums of count, count·centre and count·(centre² + width²/12) per bin, so that the squared error of
 * clipping at any threshold is O(1).
 */
class BinMoments {
  private readonly width: number;
  private readonly counts: Float64Array;
  private readonly s0: Float64Array;
  private readonly s1: Float64Array;
  private readonly s2: Float64Array;

  constructor(h: HistogramObserver, negative: boolean) {
    const n = h.bins;
    this.width = h.limit / n;
    this.counts = negative ? h.negativeCounts : h.counts.map((c, i) => c - h.negativeCounts[i] - (i === 0 ? h.zeros : 0));
    this.s0 = new Float64Array(n + 1);
    this.s1 = new Float64Array(n + 1);
    this.s2 = new Float64Array(n + 1);
    const w = this.width;
    for (let i = n - 1; i >= 0; i--) {
      const c = this.counts[i];
      const m = (i + 0.5) * w;
      this.s0[i] = this.s0[i + 1] + c;
      this.s1[i] = this.s1[i + 1] + c * m;
      this.s2[i] = this.s2[i + 1] + c * (m * m + (w * w) / 12);
    }
  }

  /** Values up to `threshold` (count `inside`) and the squared error of clipping the rest to it (`clipped`). */
  split(threshold: number): { inside: number; clipped: number } {
    const n = this.counts.length;
    const w = this.width;
    const t = Math.max(0, threshold);
    const k = Math.floor(t / w);
    if (k >= n) return { inside: this.s0[0], clipped: 0 };
    // Bin k holds t: the part below it is inside; the part above contributes ∫(x − t)² over [t, b) per unit width.
    const c = this.counts[k];
    const above = (k + 1) * w - t;
    const inside = this.s0[0] - this.s0[k] + (c * (w - above)) / w;
    const clipped = (c * above ** 3) / (3 * w) + this.s2[k + 1] - 2 * t * this.s1[k + 1] + t * t * this.s0[k + 1];
    return { inside, clipped };
  }
}

/**
 * Quantization steps between 0 and the clip threshold for `bits`: 2^bits − 1
 * when the values are never negative (an unsigned range starting at 0), else
 * 2^(bits−1) (a range symmetric about 0; 128 at 8 bits, TensorRT's value).
 */
export function klLevels(bits: number, neverNegative: boolean): number {
  if (!Number.isInteger(bits) || bits < 2 || bits > 8) throw invalidValue('bits', 'an integer in [2, 8]', bits);
  return neverNegative ? 2 ** bits - 1 : 2 ** (bits - 1);
}

/**
 * ACIQ statistics over every batch, in fixed memory: the mean and σ pooled exactly (sums of squares merged as
 * Chan et al.), the Laplace b = E|x − mean| from each batch's own b, shifted to the pooled mean as a Laplace
 * variable's is (E|X − c| = d + b·e^(−d/b) at distance d from its centre). Batches with one mean average their
 * b as the ACIQ authors' offline statistics do; batches of one value each (b 0) give their mean |x − mean|.
 */
export class AciqObserver {
  private count = 0;
  private mean = 0;
  /** Σ (x − mean)² over the values seen. */
  private squares = 0;
  private laplaceB = 0;
  private min = Infinity;
  private max = -Infinity;

  observe(batch: Float32Array): this {
    const x = checkBatch(batch);
    if (batchMinMax(x).finite === 0) return this;
    const s = tensorStats(x, 'batch');
    this.accumulate(s.count, s.mean, s.laplaceB, s.count > 1 ? s.sigma * s.sigma * (s.count - 1) : 0, s.min, s.max);
    return this;
  }

  private accumulate(n: number, mean: number, b: number, squares: number, min: number, max: number): void {
    const total = this.count + n;
    const pooled = this.mean + ((mean - this.mean) * n) / total;
    const shifted = (d: number, scale: number) => (scale > 0 ? d + scale * Math.exp(-d / scale) : d);
    this.laplaceB = (this.count * shifted(Math.abs(this.mean - pooled), this.laplaceB) + n * shifted(Math.abs(mean - pooled), b)) / total;
    this.squares += squares + ((mean - this.mean) ** 2 * this.count * n) / total;
    this.mean = pooled;
    this.count = total;
    this.min = Math.min(this.min, min);
    this.max = Math.max(this.max, max);
  }

  merge(other: AciqObserver): this {
    checkOther(other, AciqObserver);
    if (other.count > 0) this.accumulate(other.count, other.mean, other.laplaceB, other.squares, other.min, other.max);
    return this;
  }

  /**
   * ACIQ clip range for `bits` (one-sided when every value seen was >= 0 unless told); `symmetricGrid`: for signed
   * symmetric codes (see aciqRange).
   */
  range(bits: number, prior: AciqPrior | 'auto' = 'laplace', oneSided?: boolean, symmetricGrid = false): Range {
    if (this.count === 0) throw invalidValue('observer', 'at least one observed finite value', 'none');
    const sigma = this.count > 1 ? Math.sqrt(this.squares / (this.count - 1)) : 0;
    const stats = { count: this.count, mean: this.mean, laplaceB: this.laplaceB, sigma, min: this.min, max: this.max };
    const r = aciqRange(stats, bits, prior, oneSided ?? this.min >= 0, symmetricGrid);
    return { lo: r.lo, hi: r.hi };
  }
}

/**
 * Per-channel (axis 1) minimum and maximum of an NC… tensor, over every batch it sees: the finite values, as the
 * other observers (the quantized model saturates ±Infinity); NaN is refused.
 */
export class ChannelRangeObserver {
  lo?: Float64Array;
  hi?: Float64Array;

  observe(data: Float32Array, dims: readonly number[]): void {
    const [n, c] = [dims[0], dims[1]];
    const inner = data.length / (n * c);
    this.lo ??= new Float64Array(c).fill(Infinity);
    this.hi ??= new Float64Array(c).fill(-Infinity);
    if (this.lo.length !== c) throw new RangeError(`a tensor with ${c} channels where ${this.lo.length} were seen before`);
    for (let b = 0; b < n; b++) {
      for (let ch = 0; ch < c; ch++) {
        let lo = this.lo[ch];
        let hi = this.hi[ch];
        for (let i = (b * c + ch) * inner, end = i + inner; i < end; i++) {
          const v = data[i];
          if (v > -Infinity && v < Infinity) {
            if (v < lo) lo = v;
            if (v > hi) hi = v;
          } else if (Number.isNaN(v)) throw nanInBatch(i);
        }
        this.lo[ch] = lo;
        this.hi[ch] = hi;
      }
    }
  }
}
