/**
 * Loads the compiled addon (LOWBIT_NATIVE_PATH when set, else build/Release/lowbit.node)
 * and declares its exact shape. Only ts/ modules call it; arguments are
 * validated before they get here.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

import type { ConvGeometry } from './train/kernels';

/** Where a tensor's parameters change: see QuantLayout in ts/quant-params.ts. */
export interface NativeLayout {
  kind: 0 | 1 | 2;
  outer: number;
  axisLen: number;
  inner: number;
  blockSize: number;
}

export interface NativeParams {
  scale: Float32Array;
  zeroPoint: Int32Array;
  qmin: number;
  qmax: number;
  layout: NativeLayout;
}

export type Codes = Int8Array | Uint8Array;

export interface NativeCpuInfo {
  arch: string;
  features: Record<string, boolean>;
  quantizeKernels: string[];
  gemmKernels: string[];
  /** float32 SGEMM kernels usable here, best first. */
  sgemmKernels: string[];
  selectedQuantizeKernel: string | null;
  selectedGemmKernel: string | null;
  selectedSgemmKernel: string | null;
  kernelOverride: string | null;
  kernelOverrideError: string | null;
  kernelOverrideErrors: { quantize?: string; gemm?: string; sgemm?: string };
  maxThreads: number;
}

/** Window geometry for im2col/col2im and pooling (defined with the kernels that use it). */
export type NativeConvGeometry = ConvGeometry;

export interface NativeErrorStats {
  squaredError: number;
  signal: number;
  maxAbsError: number;
  finiteCount: number;
  clippedCount: number;
}

export interface NativeBinding {
  cpuInfo(): NativeCpuInfo;
  /** Returns the index of the first NaN in x, or -1. */
  quantize(x: Float32Array, out: Codes, params: NativeParams, kernel: string, threads: number): number;
  quantizeAsync(x: Float32Array, out: Codes, params: NativeParams, kernel: string, threads: number): Promise<number>;
  dequantize(q: Codes, isSigned: boolean, out: Float32Array, params: NativeParams, kernel: string, threads: number): void;
  groupRanges(x: Float32Array, layout: NativeLayout, lo: Float32Array, hi: Float32Array, kernel: string, threads: number): number;
  groupRangesAsync(x: Float32Array, layout: NativeLayout, lo: Float32Array, hi: Float32Array, kernel: string, threads: number): Promise<number>;
  searchRangesMse(x: Float32Array, layout: NativeLayout, lo: Float32Array, hi: Float32Array, kernel: string, threads: number,
    qmin: number, qmax: number, symmetric: boolean, candidates: number, norm: 1 | 2): number;
  searchRangesMseAsync(x: Float32Array, layout: NativeLayout, lo: Float32Array, hi: Float32Array, kernel: string, threads: number,
    qmin: number, qmax: number, symmetric: boolean, candidates: number, norm: 1 | 2): Promise<number>;
  /** Fills out (6 × groups: count, mean, mean |x - mean|, Σ (x - mean)², min, max); returns the first NaN index or -1. */
  groupMoments(x: Float32Array, layout: NativeLayout, out: Float64Array, kernel: string, threads: number): number;
  groupMomentsAsync(x: Float32Array, layout: NativeLayout, out: Float64Array, kernel: string, threads: number): Promise<number>;
  groupErrors(x: Float32Array, layout: NativeLayout, lo: Float32Array, hi: Float32Array, qmin: number, qmax: number,
    symmetric: boolean, norm: 1 | 2, out: Float64Array, kernel: string, threads: number): void;
  groupErrorsAsync(x: Float32Array, layout: NativeLayout, lo: Float32Array, hi: Float32Array, qmin: number, qmax: number,
    symmetric: boolean, norm: 1 | 2, out: Float64Array, kernel: string, threads: number): Promise<number>;
  lsqForward(v: Float32Array, layout: NativeLayout, step: Float32Array, qn: number, qp: number, out: Float32Array,
    kernel: string, threads: number): void;
  lsqBackward(v: Float32Array, gradOut: Float32Array, layout: NativeLayout, step: Float32Array, qn: number, qp: number,
    gradIn: Float32Array, gradStep: Float64Array, kernel: string, threads: number): void;
  /** [min, max, finite count, index of the first NaN or -1] of a calibration batch (±Infinity skipped). */
  finiteRange(x: Float32Array): [number, number, number, number];
  /** Index of the first code outside [qmin, qmax], or -1. */
  firstCodeOutside(q: Codes, isSigned: boolean, qmin: number, qmax: number): number;
  /** Adds x's finite values to an |x| histogram (and negative ones to negativeCounts); returns how many were 0. */
  histogramAdd(x: Float32Array, binsPerUnit: number, counts: Float64Array, negativeCounts: Float64Array): number;
  paramsFromRanges(lo: Float32Array, hi: Float32Array, qmin: number, qmax: number, symmetric: boolean,
    scale: Float32Array, zeroPoint: Int32Array): void;
  errorStats(x: Float32Array, q: Codes, isSigned: boolean, params: NativeParams): NativeErrorStats;
  /** Returns the index of the first value outside the type's range, or -1. */
  packInt4(values: Codes, isSigned: boolean, out: Uint8Array): number;
  unpackInt4(packed: Uint8Array, length: number, isSigned: boolean, out: Codes): void;
  packInt2(values: Codes, isSigned: boolean, out: Uint8Array): number;
  unpackInt2(packed: Uint8Array, length: number, isSigned: boolean, out: Codes): void;
  packMatrix(b: Codes, k: number, n: number, threads: number): PackedHandle;
  matmulInt8(a: Codes, b: Codes | PackedHandle, m: number, k: number, n: number, aZeroPoint: number,
    bZeroPoint: Int32Array, bZeroPointPerColumn: boolean, out: Int32Array, kernel: string, threads: number): void;
  matmulInt8Async(a: Codes, b: Codes | PackedHandle, m: number, k: number, n: number, aZeroPoint: number,
    bZeroPoint: Int32Array, bZeroPointPerColumn: boolean, out: Int32Array, kernel: string, threads: number): Promise<number>;
  packInt4Matrix(values: Codes, k: number, n: number, blockSize: number, scale: Float32Array, zeroPoint: Int32Array,
    threads: number): PackedInt4Handle | number;
  matmulInt4(a: Codes, b: PackedInt4Handle, m: number, aZeroPoint: number, aScale: number, out: Float32Array, kernel: string,
    threads: number): void;
  int32ToFloat(c: Int32Array, m: number, n: number, aScale: number, bScale: Float32Array, perColumn: boolean,
    bias: Float32Array | null, y: Float32Array): void;
  requantizeInt32(c: Int32Array, m: number, n: number, aScale: number, bScale: Float32Array, perColumn: boolean,
    yScale: number, yZeroPoint: number, qmin: number, qmax: number, relu: boolean, y: Codes): void;
  // float32 training kernels (ts/train/kernels.ts); lengths must be exact, outputs may not overlap inputs.
  sgemm(transA: boolean, transB: boolean, m: number, n: number, k: number, a: Float32Array, b: Float32Array,
    c: Float32Array, accumulate: boolean, kernel: string, threads: number): void;
  im2col(x: Float32Array, batch: number, geometry: NativeConvGeometry, col: Float32Array, threads: number): void;
  col2im(col: Float32Array, batch: number, geometry: NativeConvGeometry, dx: Float32Array, threads: number): void;
  batchNormForward(x: Float32Array, batch: number, channels: number, spatial: number, gamma: Float32Array,
    beta: Float32Array, epsilon: number, y: Float32Array, mean: Float32Array, variance: Float32Array,
    invStd: Float32Array, threads: number): void;
  batchNormBackward(x: Float32Array, dy: Float32Array, batch: number, channels: number, spatial: number,
    gamma: Float32Array, mean: Float32Array, invStd: Float32Array, dx: Float32Array, dGamma: Float32Array,
    dBeta: Float32Array, threads: number): void;
  activationForward(kind: string, x: Float32Array, y: Float32Array, alpha: number, beta: number, threads: number): void;
  activationBackward(kind: string, x: Float32Array, dy: Float32Array, dx: Float32Array, alpha: number, beta: number,
    threads: number): void;
  maxPoolForward(x: Float32Array, batch: number, geometry: NativeConvGeometry, y: Float32Array, argmax: Int32Array,
    threads: number): void;
  /** Serial; throws a RangeError naming the first argmax entry outside [-1, dx.length) before writing. */
  maxPoolBackward(dy: Float32Array, argmax: Int32Array, dx: Float32Array): void;
  averagePoolForward(x: Float32Array, batch: number, geometry: NativeConvGeometry, countIncludePad: boolean,
    y: Float32Array, threads: number): void;
  averagePoolBackward(dy: Float32Array, batch: number, geometry: NativeConvGeometry, countIncludePad: boolean,
    dx: Float32Array, threads: number): void;
  /** Depthwise convolution, w [channels, kernelH·kernelW] (train_ops.h). */
  depthwiseConvForward(x: Float32Array, w: Float32Array, batch: number, geometry: NativeConvGeometry, y: Float32Array,
    threads: number): void;
  depthwiseConvBackwardInput(dy: Float32Array, w: Float32Array, batch: number, geometry: NativeConvGeometry,
    dx: Float32Array, threads: number): void;
  depthwiseConvBackwardWeight(dy: Float32Array, x: Float32Array, batch: number, geometry: NativeConvGeometry,
    dw: Float32Array, threads: number): void;
  /** U with H⁻¹ = UᵀU written to u; false when h is not positive definite (linalg.h). */
  upperFactorOfInverse(h: Float64Array, n: number, u: Float64Array): boolean;
  /** FloatKernels.gptqRoundBlock with the group parameters as separate arrays (binding/train_binding.cc). */
  gptqRoundBlock(w: Float32Array, rows: number, n: number, u: Float64Array, b0: number, b1: number, group: Int32Array,
    scale: Float32Array, zeroPoint: Int32Array, qmin: Int32Array, qmax: Int32Array, values: Int32Array, errors: Float32Array): void;
}

/** Opaque native handle of a packed B matrix. */
export type PackedHandle = { readonly __packedHandle: unique symbol };
/** Opaque native handle of a packed int4 B matrix. */
export type PackedInt4Handle = { readonly __packedInt4Handle: unique symbol };

/** Every function of NativeBinding: a file that lacks one is another module, or a lowbit.node built from older sources. */
const NATIVE_FUNCTIONS = [
  'cpuInfo', 'quantize', 'quantizeAsync', 'dequantize', 'groupRanges', 'groupRangesAsync', 'searchRangesMse',
  'searchRangesMseAsync', 'groupMoments', 'groupMomentsAsync', 'groupErrors', 'groupErrorsAsync', 'lsqForward', 'lsqBackward',
  'finiteRange', 'firstCodeOutside', 'histogramAdd', 'paramsFromRanges', 'errorStats', 'packInt4', 'unpackInt4',
  'packInt2', 'unpackInt2', 'packMatrix', 'matmulInt8', 'matmulInt8Async', 'packInt4Matrix', 'matmulInt4',
  'int32ToFloat', 'requantizeInt32', 'sgemm', 'im2col', 'col2im', 'batchNormForward', 'batchNormBackward',
  'activationForward', 'activationBackward', 'maxPoolForward', 'maxPoolBackward', 'averagePoolForward',
  'averagePoolBackward', 'depthwiseConvForward', 'depthwiseConvBackwardInput', 'depthwiseConvBackwardWeight',
  'upperFactorOfInverse', 'gptqRoundBlock',
] as const satisfies ReadonlyArray<keyof NativeBinding>;
// A compile error here means NATIVE_FUNCTIONS misses a function NativeBinding declares.
const listsEveryFunction: Exclude<keyof NativeBinding, (typeof NATIVE_FUNCTIONS)[number]> extends never ? true : never = true;
void listsEveryFunction;

/** The addon could not be loaded; the message lists what was tried and the fixes. */
export class NativeLoadError extends Error {
  /** `fromEnv`: the file came from LOWBIT_NATIVE_PATH, the only one tried then. */
  constructor(tried: string[], causes: string[], fromEnv = false) {
    super(
      'lowbit: could not load its native addon.\n' +
        tried.map((p, i) => `  tried ${p}${fromEnv ? ' (LOWBIT_NATIVE_PATH)' : ''}: ${causes[i]}`).join('\n') +
        '\nPossible solutions:\n' +
        (fromEnv
          ? '  - point LOWBIT_NATIVE_PATH at a lowbit.node built for this platform, or unset it to load the one npm install built\n'
          : '  - rebuild it: `npm rebuild lowbit` (or `npm run build:native` in a clone); this needs cmake >= 3.18 and g++ or clang with C++17\n' +
            '  - set LOWBIT_NATIVE_PATH to a lowbit.node built for this platform\n') +
        `  - check that Node.js is >= 20.19 (this is ${process.version})`,
    );
    this.name = 'NativeLoadError';
  }
}

let binding: NativeBinding | undefined;

export function native(): NativeBinding {
  if (binding) return binding;
  // A path the user set is the only one tried: falling back to another build would run other code than asked for.
  const chosen = process.env.LOWBIT_NATIVE_PATH;
  // Relative to the working directory (at this first call), as the shell that set it reads it; require would take
  // this module's folder.
  binding = chosen ? loadBinding([path.resolve(chosen)], true) : loadBinding([path.join(__dirname, '..', '..', 'build', 'Release', 'lowbit.node')]);
  return binding;
}

/**
 * The first of these files that is lowbit's addon with every function; a NativeLoadError saying why for each when
 * none is (`fromEnv`: the file is LOWBIT_NATIVE_PATH's).
 */
export function loadBinding(tried: string[], fromEnv = false): NativeBinding {
  const causes: string[] = [];
  for (const file of tried) {
    if (!fs.existsSync(file)) {
      causes.push('no such file');
      continue;
    }
    let loaded: Partial<Record<string, unknown>>;
    try {
      loaded = require(file) as Partial<Record<string, unknown>>;
    } catch (e) {
      causes.push((e as Error).message.split('\n')[0]);
      continue;
    }
    const missing = NATIVE_FUNCTIONS.filter((name) => typeof loaded?.[name] !== 'function');
    if (missing.length === NATIVE_FUNCTIONS.length) {
      causes.push('it loads, but is not lowbit\'s addon (none of its functions)');
    } else if (missing.length > 0) {
      causes.push(`a lowbit addon built from other sources: it lacks ${missing.slice(0, 3).join(', ')}${missing.length > 3 ? ` and ${missing.length - 3} more` : ''}`);
    } else {
      return loaded as unknown as NativeBinding;
    }
  }
  throw new NativeLoadError(tried, causes, fromEnv);
}
