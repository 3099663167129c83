/**
 * Tensor-level quantization: quantizeTensor / quantizeTensorAsync /
 * dequantize / quantizationError. TypeScript validates and decides ranges;
 * the native kernels round, saturate and reduce.
 */
import { checkKernel } from './cpu';
import { invalidType, invalidValue, withArticle } from './errors';
import { tensorStats } from './methods/aciq';
import { allocateBits } from './methods/bit-allocation';
import { groupValues } from './methods/groups';
import { isBuiltInRangeMethod, rangeMethod, rangeMethodNames, type GroupRanges, type RangeMethod, type RangeMethodOptions, type RangeRequest } from './methods/registry';
import { native, type NativeParams } from './native';
import {
  integerRange, nativeParams, tensorLayout, type Granularity, type QuantizedTensor, type TensorLayout,
} from './quant-params';
import {
  checkAttached, checkBoolean, copyIntoOut, checkChoice, checkFloat32Array, checkInteger, checkKnownKeys, checkShape, isPlainObject, overlaps, readOnce,
} from './validate';

export interface QuantizeOptions {
  /** Tensor dimensions; their product must equal data.length. Required. */
  shape: readonly number[];
  /** Integer width, 2..8. Default 8. */
  bits?: number;
  /** Two's complement (Int8Array values) or unsigned (Uint8Array values). Default true. */
  signed?: boolean;
  /** Zero point 0 (true) or an affine range with a zero point (false). Default true. */
  symmetric?: boolean;
  /** One scale for the tensor, per channel, per block or per group of channels along `axis`. Default 'tensor'. */
  granularity?: Granularity;
  /** The channel, blocked or grouped axis; negative counts from the end. Default 0. */
  axis?: number;
  /** Block length along `axis` ('block' only), ONNX block_size semantics. Default 32. */
  blockSize?: number;
  /** Number of contiguous channel groups along `axis` ('group' only); must divide the axis length. */
  groups?: number;
  /**
   * How ranges are chosen: 'minmax', 'mse', 'aciq', 'percentile' or 'kl'.
   * Default 'minmax' ('mse' with norm 1 for granularity 'group'). Not with `scale`.
   */
  method?: string;
  /** ACIQ prior: 'laplace' | 'gauss' | 'auto'. Default 'laplace'. */
  prior?: RangeMethodOptions['prior'];
  /** ACIQ: one-sided (post-ReLU) statistics. Default: when the group's minimum is >= 0. */
  oneSided?: boolean;
  /** 'mse' search norm: 2 (squared error) or 1 (absolute error). Default 2 (1 for 'group'). */
  norm?: 1 | 2;
  /** 'percentile': percent of |x| kept. Default 99.99. */
  percentile?: number;
  /**
   * Per-channel bit allocation ('channel' only): each channel gets its own bits so that
   * their mean is `averageBits` (bins ∝ α^(2/3), α = the channel's σ, or its Laplace b with prior 'laplace').
   */
  bitAllocation?: { averageBits: number; minBits?: number; maxBits?: number; prior?: 'gauss' | 'laplace' };
  /** Explicit scale(s): a number or one per group (row-major in the scale shape). Skips range estimation. */
  scale?: number | ArrayLike<number>;
  /** Explicit zero point(s) to go with `scale`. Default 0. */
  zeroPoint?: number | ArrayLike<number>;
  /** Force a kernel ('avx512', 'avx2', 'scalar', … see cpuInfo().kernels.quantize). Default: the best one. */
  kernel?: string;
  /** Native threads to use. Default: all cores (one for minmax ranges and quantizing below 2^18 values). */
  threads?: number;
  /**
   * Where to write the values (reused across calls to skip allocating and
   * page-faulting a fresh array): Int8Array when signed, Uint8Array when not,
   * of data.length, not overlapping data. The result's `values` is this array.
   */
  out?: Int8Array | Uint8Array;
}

export interface KernelOptions {
  /** Force a kernel (see cpuInfo().kernels.quantize). Default: the best one. */
  kernel?: string;
  /** Native threads to use. Default: all cores. */
  threads?: number;
}

export interface DequantizeOptions extends KernelOptions {
  /** Where to write the floats (reused across calls): a Float32Array of q.values.length not overlapping q.values. */
  out?: Float32Array;
}

export interface QuantizationError {
  /** Mean squared error over the finite elements. */
  mse: number;
  /** Signal-to-quantization-noise ratio in dB over the finite elements (Infinity when exact). */
  sqnrDb: number;
  /** Largest |x - dequantize(q)| over the finite elements. */
  maxAbsError: number;
  /** Fraction of elements whose rounded value fell outside the integer range (±Infinity included). */
  clippedFraction: number;
}

const QUANTIZE_OPTION_KEYS = [
  'shape', 'bits', 'signed', 'symmetric', 'granularity', 'axis', 'blockSize', 'groups', 'method', 'prior', 'oneSided',
  'norm', 'percentile', 'bitAllocation', 'scale', 'zeroPoint', 'kernel', 'threads', 'out',
] as const;
const GRANULARITIES: readonly Granularity[] = ['tensor', 'channel', 'block', 'group'];
export const DEFAULT_BLOCK_SIZE = 32;

interface Plan {
  data: Float32Array;
  shape: number[];
  bits: number;
  signed: boolean;
  symmetric: boolean;
  granularity: Granularity;
  axis?: number;
  blockSize?: number;
  groups?: number;
  layout: TensorLayout;
  qmin: number;
  qmax: number;
  method?: RangeMethod;
  methodOptions: RangeMethodOptions;
  bitAllocation?: { averageBits: number; minBits: number; maxBits: number; prior: 'gauss' | 'laplace' };
  explicit?: { scale: Float32Array; zeroPoint: Int32Array };
  kernel: string;
  /** As the caller gave it (0: all): the range searches (mse, aciq, percentile, kl) use it. */
  threads: number;
  /** For the passes linear in the values (minmax ranges, quantizing): one for a small tensor unless the caller chose. */
  linearThreads: number;
  out?: Int8Array | Uint8Array;
}

/**
 * Below this many values quantizeTensor's linear passes (minmax ranges, quantizing) run on one thread unless
 * options.threads says otherwise (measured with minmax per channel: up to 2^16 values one thread was about 3× faster,
 * at 2^18 even).
 */
const PARALLEL_MIN_VALUES = 1 << 18;

function checkThreads(v: unknown): number {
  return v === undefined ? 0 : checkInteger('options.threads', v, 1, 1024);
}

/** An output array the caller passed in: right type and length, attached, not overlapping the input. */
function checkOut<T extends ArrayBufferView>(
  name: string, v: unknown, type: { new (n: number): T; name: string }, length: number, input: ArrayBufferView,
): T {
  if (!(v instanceof type) || (v as unknown as { length: number }).length !== length) {
    throw invalidType(name, `${withArticle(type.name)} of length ${length}`, v);
  }
  checkAttached(name, v);
  if (overlaps(v, input)) throw invalidValue(name, 'an array that does not share memory with the input', v, 'Use a separate buffer.');
  return v;
}

function resolveAxis(name: string, v: unknown, rank: number): number {
  if (rank === 0) throw invalidValue('options.shape', 'at least one dimension for a channel or block granularity', []);
  const axis = v === undefined ? 0 : checkInteger(name, v, -rank, rank - 1);
  return axis < 0 ? axis + rank : axis;
}

function explicitValues(name: string, v: unknown, groups: number, scaleShape: number[]): number[] {
  if (typeof v === 'number') return new Array<number>(groups).fill(v);
  if (Array.isArray(v) || ArrayBuffer.isView(v)) {
    if (ArrayBuffer.isView(v)) checkAttached(name, v);
    const list = Array.from(v as ArrayLike<number>);
    if (list.length !== groups) {
      throw invalidValue(name, `a number or ${groups} values (scale shape [${scaleShape.join(', ')}])`, v);
    }
    return list;
  }
  throw invalidType(name, 'a number or an array of numbers', v);
}

/** The most channels a tensor with no values may have (2^24: 128 MB of scales and zero points). */
export const EMPTY_TENSOR_MAX_CHANNELS = 2 ** 24;

function plan(data: unknown, given: unknown): Plan {
  const x = checkFloat32Array('data', data);
  const options = readOnce(given);
  if (!isPlainObject(options)) {
    throw invalidType('options', 'an options object with at least { shape }', options,
      'For example quantizeTensor(data, { shape: [data.length] }).');
  }
  checkKnownKeys('options', options, QUANTIZE_OPTION_KEYS);
  const shape = checkShape('options.shape', options.shape);
  const count = shape.reduce((a, b) => a * b, 1);
  if (count !== x.length) {
    throw invalidValue('options.shape', `dimensions whose product is data.length = ${x.length}`, options.shape,
      `Their product is ${count}.`);
  }
  const bits = options.bits === undefined ? 8 : checkInteger('options.bits', options.bits, 2, 8);
  const signed = options.signed === undefined ? true : checkBoolean('options.signed', options.signed);
  const symmetric = options.symmetric === undefined ? true : checkBoolean('options.symmetric', options.symmetric);
  const granularity = options.granularity === undefined ? 'tensor' : checkChoice('options.granularity', options.granularity, GRANULARITIES);
  let axis: number | undefined;
  let blockSize: number | undefined;
  let groups: number | undefined;
  if (granularity === 'tensor') {
    if (options.axis !== undefined) throw invalidValue('options.axis', "no axis with granularity 'tensor'", options.axis, "Use granularity 'channel', 'block' or 'group' to quantize along an axis.");
  } else {
    axis = resolveAxis('options.axis', options.axis, shape.length);
  }
  if (granularity === 'block') {
    blockSize = options.blockSize === undefined ? DEFAULT_BLOCK_SIZE : checkInteger('options.blockSize', options.blockSize, 1, Number.MAX_SAFE_INTEGER);
  } else if (options.blockSize !== undefined) {
    throw invalidValue('options.blockSize', "no blockSize without granularity 'block'", options.blockSize);
  }
  if (granularity === 'group') {
    const channels = shape[axis!];
    if (options.groups === undefined) throw invalidType('options.groups', "the number of channel groups for granularity 'group'", undefined);
    groups = checkInteger('options.groups', options.groups, 1, Math.max(1, channels));
    if (channels % groups !== 0) {
      const divisors = [];
      for (let d = 1; d <= channels; d++) if (channels % d === 0) divisors.push(d);
      const nearest = divisors.sort((a, b) => Math.abs(a - groups!) - Math.abs(b - groups!)).slice(0, 2).sort((a, b) => a - b);
      throw invalidValue('options.groups', `a divisor of the ${channels} channels along axis ${axis}`, groups,
        `Try ${nearest.join(' or ')}.`);
    }
  } else if (options.groups !== undefined) {
    throw invalidValue('options.groups', "no groups without granularity 'group'", options.groups);
  }
  const layout = tensorLayout(shape, granularity, axis ?? 0, granularity === 'group' ? groups! : blockSize ?? 0);
  // Only a tensor with no values can have more channels than values; each would still get a scale and a zero point.
  if (layout.groups > Math.max(x.length, EMPTY_TENSOR_MAX_CHANNELS)) {
    throw invalidValue('options.shape', `at most ${EMPTY_TENSOR_MAX_CHANNELS} channels (or groups) along axis ${axis} for a tensor with no values`, options.shape,
      'Its parameters would take gigabytes while quantizing nothing; skip the call for an empty tensor.');
  }
  const { qmin, qmax } = integerRange(bits, signed);
  const kernel = checkKernel('quantize', options.kernel);
  const threads = checkThreads(options.threads);
  // By default a small tensor's linear passes stay on the calling thread: waking the pool's workers cost more than
  // the work (minmax per channel of a 16×16 weight: about 200 µs with both threads against 26 µs with one, here).
  const linearThreads = options.threads === undefined && x.length < PARALLEL_MIN_VALUES ? 1 : threads;
  const out = options.out === undefined ? undefined : (signed
    ? checkOut<Int8Array | Uint8Array>('options.out', options.out, Int8Array, x.length, x)
    : checkOut<Int8Array | Uint8Array>('options.out', options.out, Uint8Array, x.length, x));
  const methodOptions = checkMethodOptions(options, granularity);
  const base = { data: x, shape, bits, signed, symmetric, granularity, axis, blockSize, groups, layout, qmin, qmax, kernel, threads, linearThreads, out, methodOptions };

  if (options.scale === undefined) {
    if (options.zeroPoint !== undefined) throw invalidValue('options.zeroPoint', 'no zeroPoint without an explicit scale', options.zeroPoint, 'Pass scale too, or leave both unset to estimate them.');
    if (options.method !== undefined && typeof options.method !== 'string') {
      throw invalidType('options.method', `one of ${rangeMethodNames().map((n) => `'${n}'`).join(', ')}`, options.method);
    }
    const method = rangeMethod(options.method ?? (granularity === 'group' ? 'mse' : 'minmax'));
    checkMethodReadsOptions(options, method.name);
    let bitAllocation: Plan['bitAllocation'];
    if (options.bitAllocation !== undefined) {
      bitAllocation = checkBitAllocation(options.bitAllocation, granularity, bits);
    }
    return { ...base, method, bitAllocation };
  }
  if (options.bitAllocation !== undefined) throw invalidValue('options.bitAllocation', 'no bit allocation with an explicit scale', options.bitAllocation);
  if (options.method !== undefined) throw invalidValue('options.method', 'no method with an explicit scale', options.method, 'An explicit scale replaces range estimation; drop one of them.');
  for (const key of RANGE_METHOD_OPTIONS) {
    if (options[key] !== undefined) throw invalidValue(`options.${key}`, `no ${key} with an explicit scale`, options[key], `It sets how a range method estimates ranges; an explicit scale replaces that. Drop one of them.`);
  }
  const scales = explicitValues('options.scale', options.scale, layout.groups, layout.scaleShape);
  const scale = new Float32Array(scales.length);
  scales.forEach((s, i) => {
    if (typeof s !== 'number') throw invalidType(`options.scale[${i}]`, 'a positive finite float32 number', s);
    const f = Math.fround(s);
    if (!(f > 0) || !Number.isFinite(f)) {
      throw invalidValue(`options.scale[${i}]`, 'a positive finite float32 number', s,
        'ONNX QuantizeLinear needs scale > 0.');
    }
    scale[i] = f;
  });
  const zeroPoint = new Int32Array(layout.groups);
  if (options.zeroPoint !== undefined) {
    explicitValues('options.zeroPoint', options.zeroPoint, layout.groups, layout.scaleShape).forEach((z, i) => {
      zeroPoint[i] = checkInteger(`options.zeroPoint[${i}]`, z, qmin, qmax);
    });
    if (options.symmetric === true && zeroPoint.some((z) => z !== 0)) {
      throw invalidValue('options.symmetric', 'false (or unset) with a non-zero zeroPoint', true, 'Symmetric quantization has zero point 0.');
    }
  }
  return { ...base, explicit: { scale, zeroPoint } };
}

/** The range-method options, and which of them each built-in method reads (a registered method may read any). */
const RANGE_METHOD_OPTIONS = ['prior', 'oneSided', 'norm', 'percentile'] as const;
const BUILT_IN_METHOD_READS: Record<string, readonly string[]> = { minmax: [], mse: ['norm'], aciq: ['prior', 'oneSided'], percentile: ['percentile'], kl: [] };

/** An option the chosen built-in method does not read would be ignored without a word: refused, naming who reads it. */
function checkMethodReadsOptions(o: Record<string, unknown>, method: string): void {
  const reads = BUILT_IN_METHOD_READS[method];
  if (!reads) return;
  for (const key of RANGE_METHOD_OPTIONS) {
    if (o[key] === undefined || reads.includes(key)) continue;
    const readers = Object.keys(BUILT_IN_METHOD_READS).filter((m) => BUILT_IN_METHOD_READS[m].includes(key)).map((m) => `'${m}'`).join(' or ');
    throw invalidValue(`options.${key}`, `no ${key} with method '${method}' (only ${readers} reads it)`, o[key], `Set options.method to ${readers}, or leave ${key} out.`);
  }
}

function checkMethodOptions(o: Record<string, unknown>, granularity: Granularity): RangeMethodOptions {
  const m: RangeMethodOptions = {};
  if (o.prior !== undefined) m.prior = checkChoice('options.prior', o.prior, ['laplace', 'gauss', 'auto'] as const);
  if (o.oneSided !== undefined) m.oneSided = checkBoolean('options.oneSided', o.oneSided);
  if (o.norm !== undefined) m.norm = checkInteger('options.norm', o.norm, 1, 2) as 1 | 2;
  else if (granularity === 'group') m.norm = 1;
  if (o.percentile !== undefined) {
    if (typeof o.percentile !== 'number' || !(o.percentile > 0 && o.percentile <= 100)) throw invalidValue('options.percentile', 'a number in (0, 100]', o.percentile);
    m.percentile = o.percentile;
  }
  return m;
}

function checkBitAllocation(given: unknown, granularity: Granularity, bits: number): NonNullable<Plan['bitAllocation']> {
  const v = readOnce(given);
  if (!isPlainObject(v)) throw invalidType('options.bitAllocation', 'an object { averageBits, minBits?, maxBits?, prior? }', v);
  if (granularity !== 'channel') throw invalidValue('options.granularity', "'channel' with bitAllocation (bits are allocated per channel)", granularity);
  checkKnownKeys('options.bitAllocation', v, ['averageBits', 'minBits', 'maxBits', 'prior']);
  const minBits = v.minBits === undefined ? 2 : checkInteger('options.bitAllocation.minBits', v.minBits, 2, 8);
  const maxBits = v.maxBits === undefined ? Math.max(minBits, bits) : checkInteger('options.bitAllocation.maxBits', v.maxBits, minBits, 8);
  const averageBits = v.averageBits;
  if (typeof averageBits !== 'number' || !(averageBits >= minBits && averageBits <= maxBits)) {
    throw invalidValue('options.bitAllocation.averageBits', `a number in [minBits, maxBits] = [${minBits}, ${maxBits}]`, averageBits);
  }
  const prior = v.prior === undefined ? 'gauss' : checkChoice('options.bitAllocation.prior', v.prior, ['gauss', 'laplace'] as const);
  return { averageBits, minBits, maxBits, prior };
}

function nanError(index: number): RangeError {
  return invalidValue(`data[${index}]`, 'a number (±Infinity saturates)', NaN,
    'Replace or mask NaN values before quantizing.');
}

function rangeRequest(p: Plan): RangeRequest {
  return {
    data: p.data, layout: p.layout.native, groups: p.layout.groups, bits: p.bits, qmin: p.qmin, qmax: p.qmax,
    symmetric: p.symmetric, kernel: p.kernel, threads: p.method?.name === 'minmax' ? p.linearThreads : p.threads, options: p.methodOptions,
  };
}

/**
 * What a range method returned, checked: registered methods are the user's code, and a range of NaN, ±Infinity or
 * lo > hi would become a scale of 1 without a word.
 */
function checkRanges(p: Plan, r: unknown): GroupRanges {
  const method = `range method '${p.method!.name}'`;
  const groups = p.layout.groups;
  if (!isPlainObject(r)) throw invalidType(`the result of ${method}`, 'an object { lo, hi, nanIndex }', r);
  const { lo, hi, nanIndex } = r;
  for (const [key, v] of [['lo', lo], ['hi', hi]] as const) {
    if (!(v instanceof Float32Array) || v.length !== groups) throw invalidType(`${key} returned by ${method}`, `a Float32Array of ${groups} values (one per group)`, v);
  }
  if (typeof nanIndex !== 'number' || !Number.isInteger(nanIndex) || nanIndex < -1) throw invalidType(`nanIndex returned by ${method}`, '-1 or the index of the first NaN', nanIndex);
  const [l, h] = [lo as Float32Array, hi as Float32Array];
  if (nanIndex >= 0) return { lo: l, hi: h, nanIndex };
  for (let g = 0; g < groups; g++) {
    // [Infinity, -Infinity]: a group without finite values (the native parameters then take scale 1).
    if (l[g] === Infinity && h[g] === -Infinity) continue;
    if (!Number.isFinite(l[g]) || !Number.isFinite(h[g]) || l[g] > h[g]) {
      throw invalidValue(`group ${g}'s range returned by ${method}`, 'finite bounds with lo <= hi (or [Infinity, -Infinity] for a group without finite values)', `[${l[g]}, ${h[g]}]`,
        isBuiltInRangeMethod(p.method!.name) ? 'This is a lowbit bug: please report it with the data and options.'
          : 'Fix the method: leave infinite values out of its ranges, as the built-in methods do.');
    }
  }
  return { lo: l, hi: h, nanIndex };
}

function paramsFromRanges(p: Plan, lo: Float32Array, hi: Float32Array): { scale: Float32Array; zeroPoint: Int32Array } {
  const scale = new Float32Array(p.layout.groups);
  const zeroPoint = new Int32Array(p.layout.groups);
  native().paramsFromRanges(lo, hi, p.qmin, p.qmax, p.symmetric, scale, zeroPoint);
  return { scale, zeroPoint };
}

function result(p: Plan, values: Int8Array | Uint8Array, params: { scale: Float32Array; zeroPoint: Int32Array }): QuantizedTensor {
  const q: QuantizedTensor = {
    values, scale: params.scale, zeroPoint: params.zeroPoint, shape: p.shape, scaleShape: p.layout.scaleShape,
    bits: p.bits, signed: p.signed, granularity: p.granularity,
  };
  if (p.axis !== undefined) q.axis = p.axis;
  if (p.blockSize !== undefined) q.blockSize = p.blockSize;
  if (p.groups !== undefined) q.groups = p.groups;
  return q;
}

function quantizeParams(p: Plan, params: { scale: Float32Array; zeroPoint: Int32Array }): NativeParams {
  return { ...params, qmin: p.qmin, qmax: p.qmax, layout: p.layout.native };
}

/**
 * Quantizes a float tensor exactly as ONNX QuantizeLinear does:
 * `q = saturate(roundHalfToEven(x / scale) + zeroPoint)`.
 * Scales come from `options.scale` or from a range method ('minmax', 'mse').
 *
 * @throws {TypeError} wrong argument types (data not a Float32Array, …)
 * @throws {RangeError} bad values (shape/length mismatch, bits outside 2..8, NaN in data, …)
 * @example
 * const q = quantizeTensor(new Float32Array([-1, -0.3, 0, 0.25, 0.75, 1.25, 10]),
 *   { shape: [7], scale: 0.5 });
 * q.values  // Int8Array [-2, -1, 0, 0, 2, 2, 20]
 */
export function quantizeTensor(data: Float32Array, options: QuantizeOptions): QuantizedTensor {
  const p = plan(data, options);
  if (p.bitAllocation) return quantizeWithBitAllocation(p);
  let params = p.explicit;
  if (!params) {
    const ranges = checkRanges(p, p.method!.ranges(rangeRequest(p)));
    if (ranges.nanIndex >= 0) throw nanError(ranges.nanIndex);
    params = paramsFromRanges(p, ranges.lo, ranges.hi);
  }
  const values = p.out ?? (p.signed ? new Int8Array(p.data.length) : new Uint8Array(p.data.length));
  const nan = native().quantize(p.data, values, quantizeParams(p, params), p.kernel, p.linearThreads);
  if (nan >= 0) throw nanError(nan);
  return result(p, values, params);
}

/**
 * quantizeTensor off the main thread: range estimation and quantization run
 * on native worker threads. `data` is copied when the call starts, so the
 * caller may write, transfer or resize it meanwhile; `options.out` is written
 * when the work ends.
 */
export function quantizeTensorAsync(data: Float32Array, options: QuantizeOptions): Promise<QuantizedTensor> {
  return quantizeOffThread(data, options, true);
}

/**
 * quantizeTensorAsync, reading `data` in place when `copy` is false: for lowbit's own arrays, which no caller can
 * transfer or resize while the native threads read them.
 */
export async function quantizeOffThread(data: Float32Array, options: QuantizeOptions, copy: boolean): Promise<QuantizedTensor> {
  const planned = plan(data, options);
  if (planned.bitAllocation) return quantizeWithBitAllocation(planned);
  // The native threads read and write memory only lowbit holds: a caller's buffer may move (transfer) or shrink (resize).
  const explicit = planned.explicit && { scale: planned.explicit.scale.slice(), zeroPoint: planned.explicit.zeroPoint.slice() };
  const p = copy ? { ...planned, data: planned.data.slice(), out: undefined, explicit } : planned;
  let params = p.explicit;
  if (!params) {
    const ranges = checkRanges(p, await p.method!.rangesAsync(rangeRequest(p)));
    if (ranges.nanIndex >= 0) throw nanError(ranges.nanIndex);
    params = paramsFromRanges(p, ranges.lo, ranges.hi);
  }
  checkAttached('data', p.data);
  const values = p.out ?? (p.signed ? new Int8Array(p.data.length) : new Uint8Array(p.data.length));
  const nan = await native().quantizeAsync(p.data, values, quantizeParams(p, params), p.kernel, p.linearThreads);
  if (nan >= 0) throw nanError(nan);
  const out = planned.out && planned.out !== values ? copyIntoOut(planned.out, values, 'quantizeTensorAsync') : values;
  return result(planned, out, params);
}

/**
 * Per-channel bit allocation: allocate bits from each channel's spread, then
 * quantize every channel on its own with its bits, range method and range.
 */
function quantizeWithBitAllocation(p: Plan): QuantizedTensor {
  const alloc = p.bitAllocation!;
  const nan = native().groupRanges(p.data, p.layout.native, new Float32Array(p.layout.groups), new Float32Array(p.layout.groups), p.kernel, p.linearThreads);
  if (nan >= 0) throw nanError(nan);
  const channels = p.layout.groups;
  if (channels === 0) {
    // No channel to give bits to: the empty result any zero-size tensor gets.
    const out = result(p, p.out ?? (p.signed ? new Int8Array(0) : new Uint8Array(0)), { scale: new Float32Array(0), zeroPoint: new Int32Array(0) });
    out.channelBits = new Uint8Array(0);
    return out;
  }
  const alphas = new Float64Array(channels);
  const perChannel: Float32Array[] = [];
  for (const [g, values] of groupValues(p.data, p.layout.native)) {
    perChannel[g] = values.slice();
    let finite = 0;
    for (const v of values) if (Number.isFinite(v)) finite++;
    if (finite === 0) continue;
    const stats = tensorStats(values, 'data');
    alphas[g] = alloc.prior === 'gauss' ? stats.sigma : stats.laplaceB;
  }
  const channelBits = Uint8Array.from(allocateBits(alphas, alloc.averageBits, { minBits: alloc.minBits, maxBits: alloc.maxBits }));
  const scale = new Float32Array(channels);
  const zeroPoint = new Int32Array(channels);
  const codes: Array<Int8Array | Uint8Array> = [];
  for (let c = 0; c < channels; c++) {
    const q = quantizeTensor(perChannel[c], {
      shape: [perChannel[c].length], bits: channelBits[c], signed: p.signed, symmetric: p.symmetric,
      method: p.method!.name, ...p.methodOptions, kernel: p.kernel || undefined, threads: p.threads || undefined,
    });
    scale[c] = q.scale[0];
    zeroPoint[c] = q.zeroPoint[0];
    codes[c] = q.values;
  }
  // Scatter each channel's codes back to the tensor's layout.
  const values = p.out ?? (p.signed ? new Int8Array(p.data.length) : new Uint8Array(p.data.length));
  const { outer, axisLen, inner } = p.layout.native;
  for (let c = 0; c < channels; c++) {
    for (let o = 0; o < outer; o++) values.set(codes[c].subarray(o * inner, (o + 1) * inner), (o * axisLen + c) * inner);
  }
  const bits = channelBits.reduce((a, b) => Math.max(a, b), 0);
  const out = result({ ...p, bits }, values, { scale, zeroPoint });
  out.channelBits = channelBits;
  return out;
}

/** Checks a QuantizedTensor (possibly built by hand) and returns its layout. */
export function checkQuantizedTensor(name: string, given: unknown): { q: QuantizedTensor; layout: TensorLayout } {
  if (!isPlainObject(given)) throw invalidType(name, 'a QuantizedTensor (as returned by quantizeTensor)', given);
  const q = readOnce(given);
  const bits = checkInteger(`${name}.bits`, q.bits, 2, 8);
  const signed = checkBoolean(`${name}.signed`, q.signed);
  const want = signed ? Int8Array : Uint8Array;
  if (!(q.values instanceof want)) {
    throw invalidType(`${name}.values`, `${want.name} (signed is ${signed})`, q.values);
  }
  checkAttached(`${name}.values`, q.values);
  const shape = checkShape(`${name}.shape`, q.shape);
  q.shape = shape;  // the checked copy, not the caller's array, read again downstream
  const count = shape.reduce((a, b) => a * b, 1);
  if (count !== q.values.length) {
    throw invalidValue(`${name}.shape`, `dimensions whose product is values.length = ${q.values.length}`, q.shape);
  }
  const granularity = checkChoice(`${name}.granularity`, q.granularity, GRANULARITIES);
  let axis = 0;
  let blockSize = 0;
  if (granularity !== 'tensor') {
    if (shape.length === 0) throw invalidValue(`${name}.shape`, 'at least one dimension for a channel, block or group granularity', q.shape);
    axis = checkInteger(`${name}.axis`, q.axis, 0, shape.length - 1);
    if (granularity === 'block') blockSize = checkInteger(`${name}.blockSize`, q.blockSize, 1, Number.MAX_SAFE_INTEGER);
    if (granularity === 'group') {
      blockSize = checkInteger(`${name}.groups`, q.groups, 1, Math.max(1, shape[axis]));
      if (shape[axis] % blockSize !== 0) throw invalidValue(`${name}.groups`, `a divisor of ${shape[axis]}`, q.groups);
    }
  }
  const layout = tensorLayout(shape, granularity, axis, blockSize);
  const { qmin, qmax } = integerRange(bits, signed);
  if (!(q.scale instanceof Float32Array) || q.scale.length !== layout.groups) {
    throw invalidType(`${name}.scale`, `a Float32Array of ${layout.groups} scales`, q.scale);
  }
  if (!(q.zeroPoint instanceof Int32Array) || q.zeroPoint.length !== layout.groups) {
    throw invalidType(`${name}.zeroPoint`, `an Int32Array of ${layout.groups} zero points`, q.zeroPoint);
  }
  checkAttached(`${name}.scale`, q.scale);
  checkAttached(`${name}.zeroPoint`, q.zeroPoint);
  q.scale.forEach((s, i) => {
    if (!(s > 0) || !Number.isFinite(s)) throw invalidValue(`${name}.scale[${i}]`, 'a positive finite number', s);
  });
  q.zeroPoint.forEach((z, i) => {
    if (z < qmin || z > qmax) throw invalidValue(`${name}.zeroPoint[${i}]`, `an integer in [${qmin}, ${qmax}]`, z);
  });
  if (q.channelBits !== undefined) {
    // Bit allocation's per-channel widths: one per channel, none wider than bits.
    if (granularity !== 'channel' || !(q.channelBits instanceof Uint8Array) || q.channelBits.length !== layout.groups ||
      q.channelBits.some((b) => b < 2 || b > bits)) {
      throw invalidValue(`${name}.channelBits`, `a Uint8Array of ${layout.groups} widths in [2, ${bits}] with granularity 'channel' (or no channelBits)`, q.channelBits);
    }
  }
  checkCodesInRange(name, q as unknown as QuantizedTensor, layout);
  return { q: q as unknown as QuantizedTensor, layout };
}

/** Every code fits its bits (its channel's, with bit allocation): an int4 tensor holding 100 is not one. */
function checkCodesInRange(name: string, q: QuantizedTensor, layout: TensorLayout): void {
  const refuse = (at: number, bits: number, widthFrom = `${name}.bits`): never => {
    const { qmin, qmax } = integerRange(bits, q.signed);
    throw invalidValue(`${name}.values[${at}]`, `a ${bits}-bit ${q.signed ? 'signed' : 'unsigned'} code in [${qmin}, ${qmax}]`,
      q.values[at], `Its width is ${widthFrom}: build values with quantizeTensor, or give the width the codes need.`);
  };
  if (q.channelBits === undefined) {
    if (q.bits === 8) return;  // Int8Array/Uint8Array (checked against signed above) hold only 8-bit codes
    const { qmin, qmax } = integerRange(q.bits, q.signed);
    const at = native().firstCodeOutside(q.values, q.signed, qmin, qmax);
    if (at >= 0) refuse(at, q.bits);
    return;
  }
  // Bit-allocated tensors are rare; channels may be single elements apart, so one pass here.
  const { axisLen, inner } = layout.native;
  const ranges = Array.from(q.channelBits, (b) => integerRange(b, q.signed));
  for (let e = 0; e < q.values.length; e++) {
    const c = Math.floor(e / inner) % axisLen;
    if (q.values[e] < ranges[c].qmin || q.values[e] > ranges[c].qmax) refuse(e, q.channelBits[c], `${name}.channelBits[${c}]`);
  }
}

function checkDequantizeOptions(given: unknown, q: QuantizedTensor): { kernel: string; threads: number; out?: Float32Array } {
  const options = readOnce(given);
  if (options === undefined) return { kernel: checkKernel('quantize', undefined), threads: 0 };
  if (!isPlainObject(options)) throw invalidType('options', 'an object { kernel?, threads?, out? }', options);
  checkKnownKeys('options', options, ['kernel', 'threads', 'out']);
  const out = options.out === undefined ? undefined : checkOut('options.out', options.out, Float32Array, q.values.length, q.values);
  return { kernel: checkKernel('quantize', options.kernel), threads: checkThreads(options.threads), out };
}

/**
 * Maps a quantized tensor back to floats: `(q - zeroPoint) · scale`, as ONNX DequantizeLinear.
 * @example
 * dequantize(quantizeTensor(new Float32Array([0.3]), { shape: [1], scale: 0.1 }))  // Float32Array [0.3000000119]
 */
export function dequantize(q: QuantizedTensor, options?: DequantizeOptions): Float32Array {
  const { q: t, layout } = checkQuantizedTensor('q', q);
  const { kernel, threads, out: given } = checkDequantizeOptions(options, t);
  const out = given ?? new Float32Array(t.values.length);
  native().dequantize(t.values, t.signed, out, nativeParams(t, layout), kernel, threads);
  return out;
}

/**
 * How far a quantized tensor is from the original floats.
 * @example
 * const x = new Float32Array([0.1, 0.2, 0.3]);
 * quantizationError(x, quantizeTensor(x, { shape: [3], bits: 4 })).sqnrDb  // ≈ 27.8
 */
export function quantizationError(original: Float32Array, q: QuantizedTensor): QuantizationError {
  const x = checkFloat32Array('original', original);
  const { q: t, layout } = checkQuantizedTensor('q', q);
  if (x.length !== t.values.length) {
    throw invalidValue('original', `a Float32Array of length ${t.values.length} (q.values.length)`, x);
  }
  const nan = native().finiteRange(x)[3];  // the first NaN (natively: findIndex with a callback took ~40 ms a 2048×2048 layer)
  if (nan >= 0) throw invalidValue(`original[${nan}]`, 'a number or ±Infinity (as quantizeTensor takes)', NaN, 'Compare against the data that was quantized.');
  const s = native().errorStats(x, t.values, t.signed, nativeParams(t, layout));
  const mse = s.finiteCount === 0 ? 0 : s.squaredError / s.finiteCount;
  const sqnrDb = s.squaredError === 0 ? Infinity : 10 * Math.log10(s.signal / s.squaredError);
  return {
    mse,
    sqnrDb,
    maxAbsError: s.maxAbsError,
    clippedFraction: x.length === 0 ? 0 : (t.channelBits ? clippedWithChannelBits(x, t, layout) : s.clippedCount) / x.length,
  };
}

/** Elements outside their own channel's integer range, for bit-allocated tensors (channels of different widths). */
function clippedWithChannelBits(x: Float32Array, t: QuantizedTensor, layout: TensorLayout): number {
  const { outer, axisLen, inner } = layout.native;
  let clipped = 0;
  for (let c = 0; c < axisLen; c++) {
    const xs = new Float32Array(outer * inner);
    const codes = t.signed ? new Int8Array(outer * inner) : new Uint8Array(outer * inner);
    for (let o = 0; o < outer; o++) {
      const from = (o * axisLen + c) * inner;
      xs.set(x.subarray(from, from + inner), o * inner);
      codes.set(t.values.subarray(from, from + inner), o * inner);
    }
    const channel = { scale: t.scale.subarray(c, c + 1), zeroPoint: t.zeroPoint.subarray(c, c + 1), bits: t.channelBits![c], signed: t.signed };
    clipped += native().errorStats(xs, codes, t.signed, nativeParams(channel, tensorLayout([xs.length], 'tensor', 0, 0))).clippedCount;
  }
  return clipped;
}
