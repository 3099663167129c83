/**
 * How close a model's outputs are to the float model's, feed by feed: mean per-sample cosine, SQNR and top-1
 * agreement (shared by quantizeModel's evaluation and its per-layer sensitivity).
 */
import { withArticle } from '../errors';
import { floatValues } from './calibrate';
import { OnnxModelError } from './model-io';
/** A model output as onnxruntime gives it. */
type Output = { type: string; data: unknown; dims: readonly number[] };

/** The float outputs' comparison: `cosine` is the mean over compared samples. */
export interface OutputComparisonResult {
  samples: number;
  /**
   * `sqnrDb`: the float values' power over the squared differences, summed over every compared value (for an output
   * of one value per sample, such as a probability, whose per-sample cosine is 1 whatever the value); Infinity with
   * no difference, -Infinity when the quantized values hold NaN or an infinity, or the float values are all zero
   * and the quantized ones not.
   */
  outputs: Array<{ name: string; cosine: number; sqnrDb: number; top1Agreement?: number; reshapedFeeds?: number; nonFiniteFeeds?: number; quantizedNonFiniteFeeds?: number }>;
  uncompared?: Array<{ name: string; reason: string }>;
}

export function cosine(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let ab = 0;
  let aa = 0;
  let bb = 0;
  for (let i = 0; i < a.length; i++) {
    ab += a[i] * b[i];
    aa += a[i] * a[i];
    bb += b[i] * b[i];
  }
  if (aa === 0 || bb === 0) return aa === bb ? 1 : 0;  // a zero output matches only a zero output
  return ab / Math.sqrt(aa * bb);
}

/** The mean of the compared float outputs' cosines (undefined: none was compared). */
export function meanCosine(result: OutputComparisonResult): number | undefined {
  return result.outputs.length ? result.outputs.reduce((sum, o) => sum + o.cosine, 0) / result.outputs.length : undefined;
}

function sqnrDb(power: number, noise: number): number {
  if (!Number.isFinite(noise)) return -Infinity;
  return noise === 0 ? Infinity : 10 * Math.log10(power / noise);
}

/** Why an output was compared on no feed: each feed left it out for one of these. */
function uncomparedReason(s: { reshaped: number; nonFinite: number; empty: number }): string {
  return [
    ...(s.reshaped ? [`its shape differed between the two models (a data-dependent size) on ${s.reshaped} feed${s.reshaped === 1 ? '' : 's'}`] : []),
    ...(s.nonFinite ? [`the float model's output held NaN or an infinity on ${s.nonFinite} feed${s.nonFinite === 1 ? '' : 's'}`] : []),
    ...(s.empty ? [`it was empty on ${s.empty} feed${s.empty === 1 ? '' : 's'}`] : []),
  ].join('; ');
}

/**
 * Sums, feed by feed, how the outputs of a model (the quantized one) match the float model's. A feed holds as many
 * samples as its first input's first dimension (`batch`); an output whose first dimension is that batch is compared
 * sample by sample, any other as one sample per feed. A sample whose values hold NaN or an infinity (the float ones
 * do not) scores 0 and disagrees.
 */
export class OutputComparison {
  private readonly sums = new Map<string, {
    cos: number; compared: number; agree: number; ranked: number; reshaped: number; nonFinite: number; quantNonFinite: number; empty: number;
    power: number; noise: number;
  }>();
  private readonly integers = new Map<string, { type: string; equal: number; total: number }>();
  private samples = 0;

  /** One feed's outputs, by the float model's output names. */
  add(index: number, batch: number, names: readonly string[], f: Record<string, Output>, q: Record<string, Output>): void {
    let comparedHere = false;  // samples counts the feeds some output was compared on
    for (const name of names) {
      if (f[name].type !== 'float32' && f[name].type !== 'float16') {
        // An integer output (an argmax, token ids) has no cosine: how many values match instead.
        const entry = this.integers.get(name) ?? { type: f[name].type, equal: 0, total: 0 };
        this.integers.set(name, entry);
        const [a, b] = [f[name].data, q[name].data] as ArrayLike<number | bigint | boolean>[];
        if (q[name].dims.join() !== f[name].dims.join()) continue;
        for (let i = 0; i < a.length; i++) entry.equal += a[i] === b[i] ? 1 : 0;
        entry.total += a.length;
        continue;
      }
      const a = floatValues(f[name]);
      const b = floatValues(q[name]);
      const dims = f[name].dims;
      const entry = this.sums.get(name) ?? { cos: 0, compared: 0, agree: 0, ranked: 0, reshaped: 0, nonFinite: 0, quantNonFinite: 0, empty: 0, power: 0, noise: 0 };
      this.sums.set(name, entry);
      if (q[name].dims.join() !== dims.join()) {
        if (q[name].dims.length !== dims.length) {
          throw new OnnxModelError(`On evaluation feed ${index}, the quantized model's output '${name}' has dims [${q[name].dims.join(', ')}] where the float ` +
            `model's has [${dims.join(', ')}]: a rewrite changed what the model computes. This is a lowbit bug: please report it with the model and options.`);
        }
        // A data-dependent size (after NonZero, Compress, non-max suppression…) that the quantized values moved: not comparable.
        entry.reshaped++;
        continue;
      }
      // Nothing to compare: an empty output (a batch of 0), or a float output already NaN or infinite (the
      // cosine would be NaN, its argmax meaningless).
      if (a.length === 0) {
        entry.empty++;
        continue;
      }
      if (!a.every(Number.isFinite)) {
        entry.nonFinite++;
        continue;
      }
      const rows = dims.length >= 2 && dims[0] === batch && batch > 0 ? batch : 1;
      const size = a.length / rows;
      // A sample whose quantized values hold NaN or an infinity (the float ones do not) scores 0 and disagrees.
      const broken = !b.every(Number.isFinite);
      if (broken) entry.quantNonFinite++;
      const finite = (from: number, to: number) => !broken || b.subarray(from, to).every(Number.isFinite);
      for (let r = 0; r < rows; r++) {
        if (finite(r * size, (r + 1) * size)) entry.cos += cosine(a.subarray(r * size, (r + 1) * size), b.subarray(r * size, (r + 1) * size));
      }
      entry.compared += rows;
      comparedHere = true;
      for (let i = 0; i < a.length; i++) {
        entry.power += a[i] * a[i];
        entry.noise += (a[i] - b[i]) ** 2;  // NaN where b is not finite: -Infinity dB below
      }
      const classes = dims[dims.length - 1];
      if (classes > 1 && a.length % classes === 0) {
        for (let r = 0; r < a.length / classes; r++) {
          let ia = 0;
          let ib = 0;
          for (let c = 1; c < classes; c++) {
            if (a[r * classes + c] > a[r * classes + ia]) ia = c;
            if (b[r * classes + c] > b[r * classes + ib]) ib = c;
          }
          entry.agree += ia === ib && finite(r * classes, (r + 1) * classes) ? 1 : 0;
          entry.ranked++;
        }
      }
    }
    if (comparedHere) this.samples += batch;
  }

  result(): OutputComparisonResult {
    const uncompared = [
      ...[...this.sums].filter(([, s]) => s.compared === 0).map(([name, s]) => ({ name, reason: uncomparedReason(s) })),
      ...[...this.integers].map(([name, s]) => ({ name, reason: `${withArticle(`${s.type} output`)}, which has no cosine: ${s.equal} of its ${s.total} values equal the float model's` })),
    ];
    return {
      samples: this.samples,
      outputs: [...this.sums].filter(([, s]) => s.compared > 0).map(([name, s]) => ({
        name, cosine: s.cos / s.compared, sqnrDb: sqnrDb(s.power, s.noise), ...(s.ranked > 0 ? { top1Agreement: s.agree / s.ranked } : {}), ...(s.reshaped > 0 ? { reshapedFeeds: s.reshaped } : {}),
        ...(s.nonFinite > 0 ? { nonFiniteFeeds: s.nonFinite } : {}), ...(s.quantNonFinite > 0 ? { quantizedNonFiniteFeeds: s.quantNonFinite } : {}),
      })),
      ...(uncompared.length > 0 ? { uncompared } : {}),
    };
  }
}

/** The batch of a feed: its first input's first dimension (1 for a scalar input). */
export function feedBatch(feeds: Record<string, { dims: readonly number[] }>): number {
  const firstDims = Object.values(feeds)[0]?.dims ?? [];
  return firstDims.length > 0 ? firstDims[0] : 1;
}
