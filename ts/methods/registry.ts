/**
 * Range methods: how a quantizer picks the clip range [lo, hi] of each group.
 * The scale and zero point then follow from the range (paramsFromRanges, in
 * C++, as onnxruntime computes them). Methods register here under their name.
 */
import { HistogramObserver, klLevels } from '../calibration/observers';
import { invalidType, invalidValue } from '../errors';
import { closestName } from '../validate';
import { native, type NativeLayout } from '../native';
import { aciqRange, type AciqPrior } from './aciq';
import { pauser } from '../onnx/passes/pass';
import { groupValues } from './groups';

/** Method-specific options, as given to quantizeTensor. */
export interface RangeMethodOptions {
  /** ACIQ prior: 'laplace', 'gauss' or 'auto' (the smaller analytic MSE, never worse than minmax). Default 'laplace'. */
  prior?: AciqPrior | 'auto';
  /** ACIQ: treat the tensor as one-sided (post-ReLU). Default: when its minimum is >= 0. */
  oneSided?: boolean;
  /** 'mse' search: 2 minimises the squared error, 1 the absolute error (GDRQ's L1 quantized loss). Default 2. */
  norm?: 1 | 2;
  /** 'percentile': share of |x| kept, in percent. Default 99.99. */
  percentile?: number;
}

export interface RangeRequest {
  data: Float32Array;
  layout: NativeLayout;
  groups: number;
  bits: number;
  qmin: number;
  qmax: number;
  symmetric: boolean;
  kernel: string;
  threads: number;
  options: RangeMethodOptions;
}

export interface GroupRanges {
  lo: Float32Array;
  hi: Float32Array;
  /** Index of the first NaN in the data, or -1. */
  nanIndex: number;
}

export interface RangeMethod {
  readonly name: string;
  readonly description: string;
  ranges(request: RangeRequest): GroupRanges;
  rangesAsync(request: RangeRequest): Promise<GroupRanges>;
}

/** Clip candidates the MSE search tries per group: ratios 1, 0.99, …, 0.01 of the range. */
export const MSE_SEARCH_CANDIDATES = 100;

function outputs(groups: number): { lo: Float32Array; hi: Float32Array } {
  return { lo: new Float32Array(groups), hi: new Float32Array(groups) };
}

function minmaxRanges(r: RangeRequest): GroupRanges {
  const { lo, hi } = outputs(r.groups);
  const nanIndex = native().groupRanges(r.data, r.layout, lo, hi, r.kernel, r.threads);
  return { lo, hi, nanIndex };
}

/** A method computed in TypeScript per group, after the native pass that finds NaN and min/max. */
function perGroup(name: string, description: string, compute: (r: RangeRequest, values: Float32Array) => { lo: number; hi: number }): RangeMethod {
  // One pass over the groups, in steps: the async path turns the event loop between them (a weight in blocks of 32
  // is hundreds of thousands of groups, each a histogram built in TypeScript).
  function* steps(r: RangeRequest, minmax: GroupRanges, out: GroupRanges): Generator<void> {
    for (const [g, values] of groupValues(r.data, r.layout)) {
      if (!(minmax.lo[g] <= minmax.hi[g])) continue;  // no finite values: range [0, 0]
      const { lo, hi } = compute(r, values);
      out.lo[g] = lo;
      out.hi[g] = hi;
      yield;
    }
  }
  const result = (r: RangeRequest): GroupRanges => ({ ...outputs(r.groups), nanIndex: -1 });  // returned only when minmax found no NaN
  return {
    name, description,
    ranges(r) {
      const [minmax, out] = [minmaxRanges(r), result(r)];
      if (minmax.nanIndex >= 0) return minmax;
      for (const _ of steps(r, minmax, out));
      return out;
    },
    async rangesAsync(r) {
      // The NaN and min/max pass on a worker thread too: a whole-tensor pass.
      const [minmax, out] = [await minmaxRangesAsync(r), result(r)];
      if (minmax.nanIndex >= 0) return minmax;
      const pause = pauser();
      for (const _ of steps(r, minmax, out)) await pause();
      return out;
    },
  };
}

/** Each group's squared quantization error with `ranges` (a native pass over the tensor; off the event loop async). */
function groupErrorsOf(r: RangeRequest, ranges: GroupRanges): Float64Array {
  const e = new Float64Array(r.groups);
  native().groupErrors(r.data, r.layout, ranges.lo, ranges.hi, r.qmin, r.qmax, r.symmetric, 2, e, r.kernel, r.threads);
  return e;
}

async function groupErrorsOfAsync(r: RangeRequest, ranges: GroupRanges): Promise<Float64Array> {
  const e = new Float64Array(r.groups);
  await native().groupErrorsAsync(r.data, r.layout, ranges.lo, ranges.hi, r.qmin, r.qmax, r.symmetric, 2, e, r.kernel, r.threads);
  return e;
}

/** Keeps, per group, whichever of two ranges has the smaller measured error (`e1`, `e2`). */
function keepSmallerError(r: RangeRequest, chosen: GroupRanges, other: GroupRanges, e1: Float64Array, e2: Float64Array): void {
  for (let g = 0; g < r.groups; g++) {
    if (e2[g] < e1[g]) {
      chosen.lo[g] = other.lo[g];
      chosen.hi[g] = other.hi[g];
    }
  }
}

async function minmaxRangesAsync(r: RangeRequest): Promise<GroupRanges> {
  const { lo, hi } = outputs(r.groups);
  const nanIndex = await native().groupRangesAsync(r.data, r.layout, lo, hi, r.kernel, r.threads);
  return { lo, hi, nanIndex };
}

const minmax: RangeMethod = {
  name: 'minmax',
  description: 'range of the finite values of each group (widened to contain 0)',
  ranges: minmaxRanges,
  rangesAsync: minmaxRangesAsync,
};

const mse: RangeMethod = {
  name: 'mse',
  description: `per-group search over ${MSE_SEARCH_CANDIDATES} shrunken ranges minimising the squared (or absolute) quantization error`,
  ranges(r) {
    const { lo, hi } = outputs(r.groups);
    const nanIndex = native().searchRangesMse(r.data, r.layout, lo, hi, r.kernel, r.threads,
      r.qmin, r.qmax, r.symmetric, MSE_SEARCH_CANDIDATES, r.options.norm ?? 2);
    return { lo, hi, nanIndex };
  },
  async rangesAsync(r) {
    const { lo, hi } = outputs(r.groups);
    const nanIndex = await native().searchRangesMseAsync(r.data, r.layout, lo, hi, r.kernel, r.threads,
      r.qmin, r.qmax, r.symmetric, MSE_SEARCH_CANDIDATES, r.options.norm ?? 2);
    return { lo, hi, nanIndex };
  },
};

/** ACIQ ranges from native per-group moments (no per-group work in TypeScript). */
function aciqFromMoments(r: RangeRequest, moments: Float64Array, nanIndex: number): GroupRanges {
  const out = { ...outputs(r.groups), nanIndex };
  if (nanIndex >= 0) return out;
  const g = r.groups;
  for (let i = 0; i < g; i++) {
    const count = moments[i];
    if (count === 0) continue;  // no finite values: range [0, 0]
    const stats = {
      count, mean: moments[g + i], laplaceB: moments[2 * g + i],
      sigma: count > 1 ? Math.sqrt(moments[3 * g + i] / (count - 1)) : 0, min: moments[4 * g + i], max: moments[5 * g + i],
    };
    const range = aciqRange(stats, r.bits, r.options.prior ?? 'laplace', r.options.oneSided ?? stats.min >= 0, r.symmetric && r.qmin < 0);
    out.lo[i] = range.lo;
    out.hi[i] = range.hi;
  }
  return out;
}

/** Prior 'auto' compares the ACIQ ranges with minmax's: the moments' min and max (0 where a group has no finite value). */
function minmaxForAuto(r: RangeRequest, out: GroupRanges, moments: Float64Array): GroupRanges | undefined {
  if (r.options.prior !== 'auto' || out.nanIndex >= 0) return undefined;
  const g = r.groups;
  const minmaxRange = { lo: Float32Array.from({ length: g }, (_, i) => moments[4 * g + i]), hi: Float32Array.from({ length: g }, (_, i) => moments[5 * g + i]), nanIndex: -1 };
  for (let i = 0; i < g; i++) {
    if (moments[i] === 0) minmaxRange.lo[i] = minmaxRange.hi[i] = 0;
  }
  return minmaxRange;
}

const aciq: RangeMethod = {
  name: 'aciq',
  description: "analytical clipping (ACIQ): MSE-optimal clip of a Laplace or Gaussian fit; prior 'auto' is never worse than minmax",
  ranges(r) {
    const moments = new Float64Array(6 * r.groups);
    const out = aciqFromMoments(r, moments, native().groupMoments(r.data, r.layout, moments, r.kernel, r.threads));
    const alternative = minmaxForAuto(r, out, moments);
    if (alternative) keepSmallerError(r, out, alternative, groupErrorsOf(r, out), groupErrorsOf(r, alternative));
    return out;
  },
  async rangesAsync(r) {
    const moments = new Float64Array(6 * r.groups);
    const out = aciqFromMoments(r, moments, await native().groupMomentsAsync(r.data, r.layout, moments, r.kernel, r.threads));
    const alternative = minmaxForAuto(r, out, moments);
    if (alternative) keepSmallerError(r, out, alternative, await groupErrorsOfAsync(r, out), await groupErrorsOfAsync(r, alternative));
    return out;
  },
};

const percentile = perGroup('percentile', 'clip at a percentile of |x| (default 99.99)', (r, values) =>
  new HistogramObserver().observe(values).percentileRange(r.options.percentile ?? 99.99));

const kl = perGroup('kl', 'TensorRT-style entropy calibration: 2048-bin histogram, minimum KL divergence against the quantized histogram (128 levels at 8 bits)',
  (r, values) => {
    const h = new HistogramObserver().observe(values);
    return h.klRange(klLevels(r.bits, h.min >= 0 && (r.qmin === 0 || !r.symmetric)));
  });

const registry = new Map<string, RangeMethod>([minmax, mse, aciq, percentile, kl].map((m) => [m.name, m]));
const BUILT_IN = new Set(registry.keys());

/**
 * Adds a range method under its name (options.method then takes it). The built-in methods cannot be replaced: the
 * whole process would take the new one.
 */
export function registerRangeMethod(method: RangeMethod): void {
  if (typeof method !== 'object' || method === null) {
    throw invalidType('method', 'an object { name, description, ranges, rangesAsync }', method);
  }
  if (typeof method.name !== 'string' || method.name === '') throw invalidType('method.name', 'a non-empty string', method.name);
  if (BUILT_IN.has(method.name)) {
    throw invalidValue('method.name', `a name other than the built-in methods' (${[...BUILT_IN].map((n) => `'${n}'`).join(', ')})`, method.name, 'Register it under a name of its own.');
  }
  if (typeof method.description !== 'string') throw invalidType('method.description', 'a string', method.description);
  for (const key of ['ranges', 'rangesAsync'] as const) {
    if (typeof method[key] !== 'function') throw invalidType(`method.${key}`, 'a function (request) => { lo, hi, nanIndex }', method[key]);
  }
  registry.set(method.name, method);
}

export function isBuiltInRangeMethod(name: string): boolean {
  return BUILT_IN.has(name);
}

export function rangeMethodNames(): string[] {
  return [...registry.keys()];
}

export function rangeMethod(name: unknown): RangeMethod {
  const method = typeof name === 'string' ? registry.get(name) : undefined;
  if (!method) {
    const close = typeof name === 'string' ? closestName(name, rangeMethodNames()) : undefined;
    throw invalidValue('options.method', `one of ${rangeMethodNames().map((n) => `'${n}'`).join(', ')}`, name, close ? `Did you mean '${close}'?` : undefined);
  }
  return method;
}
