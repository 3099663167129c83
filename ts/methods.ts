/**
 * Range methods: how a quantizer picks the clip range [lo, hi] of each group.
 * The scale and zero point then follow from the range (paramsFromRanges, in
 * C++, as onnxruntime computes them). New methods (ACIQ, percentile, …)
 * register here under their name.
 */
import { invalidValue } from './errors';
import { native, type NativeLayout } from './native';

export interface RangeRequest {
  data: Float32Array;
  layout: NativeLayout;
  groups: number;
  qmin: number;
  qmax: number;
  symmetric: boolean;
  kernel: string;
  threads: number;
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

const minmax: RangeMethod = {
  name: 'minmax',
  description: 'range of the finite values of each group (widened to contain 0)',
  ranges(r) {
    const { lo, hi } = outputs(r.groups);
    const nanIndex = native().groupRanges(r.data, r.layout, lo, hi, r.kernel, r.threads);
    return { lo, hi, nanIndex };
  },
  async rangesAsync(r) {
    const { lo, hi } = outputs(r.groups);
    const nanIndex = await native().groupRangesAsync(r.data, r.layout, lo, hi, r.kernel, r.threads);
    return { lo, hi, nanIndex };
  },
};

const mse: RangeMethod = {
  name: 'mse',
  description: `per-group search over ${MSE_SEARCH_CANDIDATES} shrunken ranges minimising the squared quantization error`,
  ranges(r) {
    const { lo, hi } = outputs(r.groups);
    const nanIndex = native().searchRangesMse(r.data, r.layout, lo, hi, r.kernel, r.threads,
      r.qmin, r.qmax, r.symmetric, MSE_SEARCH_CANDIDATES);
    return { lo, hi, nanIndex };
  },
  async rangesAsync(r) {
    const { lo, hi } = outputs(r.groups);
    const nanIndex = await native().searchRangesMseAsync(r.data, r.layout, lo, hi, r.kernel, r.threads,
      r.qmin, r.qmax, r.symmetric, MSE_SEARCH_CANDIDATES);
    return { lo, hi, nanIndex };
  },
};

const registry = new Map<string, RangeMethod>([minmax, mse].map((m) => [m.name, m]));

/** Registers a range method under its name (later methods use this). */
export function registerRangeMethod(method: RangeMethod): void {
  registry.set(method.name, method);
}

export function rangeMethodNames(): string[] {
  return [...registry.keys()];
}

export function rangeMethod(name: unknown): RangeMethod {
  const method = typeof name === 'string' ? registry.get(name) : undefined;
  if (!method) {
    throw invalidValue('options.method', `one of ${rangeMethodNames().map((n) => `'${n}'`).join(', ')}`, name);
  }
  return method;
}
