/**
 * Integer matrix multiplication: ONNX MatMulInteger (matmulInt8), onnxruntime
 * MatMulIntegerToFloat (matmulInt8ToFloat) and ONNX QLinearMatMul
 * (matmulInt8Requantized), with B optionally pre-packed once (packMatrix).
 * Row-major A [m, k] and B [k, n]; int8 or uint8 each.
 */
import { checkKernel } from './cpu';
import { invalidType, invalidValue } from './errors';
import { native, type PackedHandle, type PackedInt4Handle } from './native';
import type { QuantizedTensor } from './quant-params';
import { checkQuantizedTensor } from './quantize';
import { checkAttached, checkBoolean, checkInteger, copyIntoOut, isPlainObject, checkKnownKeys, otherRealm, overlaps, readOnce } from './validate';

type Bytes = Int8Array | Uint8Array;

const handles = new WeakMap<PackedMatrix, PackedHandle>();
const fromPackMatrix = Symbol('packMatrix');

/** A B matrix packed for the GEMM kernels; build it with packMatrix and reuse it across calls. */
export class PackedMatrix {
  /** Rows of B (the reduction length). */
  readonly k: number;
  /** Columns of B. */
  readonly n: number;
  /** Element type of the original B: true for int8, false for uint8. */
  readonly signed: boolean;

  /** Not for users (a private token refuses other callers): packMatrix() makes them. */
  constructor(token: symbol, handle: PackedHandle, k: number, n: number, signed: boolean) {
    if (token !== fromPackMatrix) throw new TypeError('PackedMatrix objects come from packMatrix(b, k, n); do not construct them.');
    this.k = k;
    this.n = n;
    this.signed = signed;
    handles.set(this, handle);
    Object.freeze(this);
  }
}

export interface MatmulOptions {
  /** Zero point of A, in A's element type. Default 0. */
  aZeroPoint?: number;
  /** Zero point of B: one number, or one per column (Int32Array of n). In B's element type. Default 0. */
  bZeroPoint?: number | Int32Array;
  /** Native threads. Default: all cores. */
  threads?: number;
  /** Force a kernel: one of cpuInfo().gemmKernels. Default: the best one. */
  kernel?: string;
  /** Where to write C (at least m·n entries); the result is a view of its first m·n. */
  out?: Int32Array;
}

export interface MatmulToFloatOptions extends Omit<MatmulOptions, 'out'> {
  /** Scale of A. */
  aScale: number;
  /** Scale of B: one number, or one per column (Float32Array of n). */
  bScale: number | Float32Array;
  /** Added per column after scaling (Float32Array of n). */
  bias?: Float32Array;
}

export interface MatmulRequantizedOptions extends MatmulToFloatOptions {
  /** Scale of the output. */
  yScale: number;
  /** Zero point of the output, in its element type. Default 0. */
  yZeroPoint?: number;
  /** Output element type: true for int8, false for uint8. Default: A's type. */
  signed?: boolean;
  /** Clamp negative outputs to the zero point (a fused ReLU). Default false. */
  relu?: boolean;
}

function checkBytes(name: string, v: unknown): Bytes {
  if (!(v instanceof Int8Array || v instanceof Uint8Array)) {
    throw invalidType(name, 'an Int8Array or Uint8Array', v, otherRealm(v, 'Int8Array') ?? otherRealm(v, 'Uint8Array') ?? 'Quantize floats first (quantizeTensor).');
  }
  checkAttached(name, v);
  return v;
}

function checkDims(m: unknown, k: unknown, n: unknown): { m: number; k: number; n: number } {
  const dims = {
    m: checkInteger('m', m, 0, Number.MAX_SAFE_INTEGER),
    k: checkInteger('k', k, 0, Number.MAX_SAFE_INTEGER),
    n: checkInteger('n', n, 0, Number.MAX_SAFE_INTEGER),
  };
  if (dims.m * dims.k * dims.n > Number.MAX_SAFE_INTEGER || dims.m * dims.n > 2 ** 32 - 1) {
    throw invalidValue('m, k, n', 'dimensions with m·k·n < 2^53 and m·n < 2^32', `${dims.m}×${dims.k}×${dims.n}`);
  }
  return dims;
}

const range = (signed: boolean) => (signed ? [-128, 127] : [0, 255]);

interface Resolved {
  a: Bytes;
  b: Bytes | PackedHandle;
  bSigned: boolean;
  m: number;
  k: number;
  n: number;
  aZeroPoint: number;
  bZeroPoint: Int32Array;
  perColumn: boolean;
  kernel: string;
  threads: number;
  out: Int32Array;
}

const MATMUL_KEYS = ['aZeroPoint', 'bZeroPoint', 'threads', 'kernel', 'out'];

function resolve(a: unknown, b: unknown, m: unknown, k: unknown, n: unknown, options: unknown, extraKeys: string[] = []): Resolved {
  const A = checkBytes('a', a);
  const dims = checkDims(m, k, n);
  if (A.length !== dims.m * dims.k) throw invalidValue('a', `an array of m·k = ${dims.m * dims.k} elements`, A);
  let B: Bytes | PackedHandle;
  let bSigned: boolean;
  if (b instanceof PackedMatrix) {
    if (b.k !== dims.k || b.n !== dims.n) {
      throw invalidValue('b', `a PackedMatrix of k = ${dims.k}, n = ${dims.n}`, b,
        `It was packed with k = ${b.k}, n = ${b.n}; pack B again with the dimensions of this product.`);
    }
    B = handles.get(b)!;
    bSigned = b.signed;
  } else {
    const bytes = b instanceof Int8Array || b instanceof Uint8Array ? checkBytes('b', b) : undefined;
    if (!bytes) throw invalidType('b', 'an Int8Array, a Uint8Array or a PackedMatrix', b);
    if (bytes.length !== dims.k * dims.n) throw invalidValue('b', `an array of k·n = ${dims.k * dims.n} elements`, bytes);
    B = bytes;
    bSigned = bytes instanceof Int8Array;
  }
  const opts = options === undefined ? {} : readOnce(options);
  if (!isPlainObject(opts)) throw invalidType('options', 'an options object', options);
  checkKnownKeys('options', opts, [...MATMUL_KEYS, ...extraKeys]);
  const aSigned = A instanceof Int8Array;
  const [alo, ahi] = range(aSigned);
  const [blo, bhi] = range(bSigned);
  const aZeroPoint = opts.aZeroPoint === undefined ? 0 : checkInteger('options.aZeroPoint', opts.aZeroPoint, alo, ahi);
  let bZeroPoint: Int32Array;
  let perColumn = false;
  if (opts.bZeroPoint === undefined || typeof opts.bZeroPoint === 'number') {
    bZeroPoint = Int32Array.of(opts.bZeroPoint === undefined ? 0 : checkInteger('options.bZeroPoint', opts.bZeroPoint, blo, bhi));
  } else if (opts.bZeroPoint instanceof Int32Array) {
    if (opts.bZeroPoint.length !== dims.n) throw invalidValue('options.bZeroPoint', `a number or an Int32Array of n = ${dims.n}`, opts.bZeroPoint);
    opts.bZeroPoint.forEach((z, j) => checkInteger(`options.bZeroPoint[${j}]`, z, blo, bhi));
    bZeroPoint = opts.bZeroPoint;
    perColumn = true;
  } else {
    throw invalidType('options.bZeroPoint', 'a number or an Int32Array (one per column)', opts.bZeroPoint);
  }
  const kernel = checkKernel('gemm', opts.kernel);
  const threads = opts.threads === undefined ? 0 : checkInteger('options.threads', opts.threads, 1, 1024);
  let out: Int32Array;
  if (opts.out === undefined) {
    out = new Int32Array(dims.m * dims.n);
  } else {
    if (!(opts.out instanceof Int32Array)) throw invalidType('options.out', 'an Int32Array', opts.out);
    checkAttached('options.out', opts.out);
    if (opts.out.length < dims.m * dims.n) throw invalidValue('options.out', `an Int32Array of at least m·n = ${dims.m * dims.n} elements`, opts.out);
    checkSeparate(opts.out, A, B);
    out = opts.out;
  }
  return { a: A, b: B, bSigned, ...dims, aZeroPoint, bZeroPoint, perColumn, kernel, threads, out };
}

/** An output must not share bytes with an input: kernels write C while they still read A and B. */
function checkSeparate(out: ArrayBufferView, ...inputs: unknown[]): void {
  for (const input of inputs) {
    if (ArrayBuffer.isView(input) && overlaps(out, input)) {
      throw invalidValue('options.out', 'an array that shares no memory with a or b', out, 'Pass a separate array (or none).');
    }
  }
}

function call(r: Resolved): void {
  native().matmulInt8(r.a, r.b, r.m, r.k, r.n, r.aZeroPoint, r.bZeroPoint, r.perColumn, r.out, r.kernel, r.threads);
}

const view = (r: Resolved) => (r.out.length === r.m * r.n ? r.out : r.out.subarray(0, r.m * r.n));

/**
 * Packs B [k, n] (int8 or uint8, row-major) once for repeated products.
 * @example
 * const w = packMatrix(weights, 4096, 4096);
 * const y = matmulInt8(activations, w, 1, 4096, 4096);
 */
export function packMatrix(b: Int8Array | Uint8Array, k: number, n: number, given?: { threads?: number }): PackedMatrix {
  const options = readOnce(given);
  const B = checkBytes('b', b);
  const dims = checkDims(0, k, n);
  if (B.length !== dims.k * dims.n) throw invalidValue('b', `an array of k·n = ${dims.k * dims.n} elements`, B);
  if (options !== undefined && !isPlainObject(options)) throw invalidType('options', 'an object { threads? }', options);
  if (options) checkKnownKeys('options', options, ['threads']);
  const threads = options?.threads === undefined ? 0 : checkInteger('options.threads', options.threads, 1, 1024);
  return new PackedMatrix(fromPackMatrix, native().packMatrix(B, dims.k, dims.n, threads), dims.k, dims.n, B instanceof Int8Array);
}

/**
 * C = (A - aZeroPoint) · (B - bZeroPoint) in int32, exactly as ONNX MatMulInteger
 * (sums wrap modulo 2^32 like int32 arithmetic).
 * @example
 * matmulInt8(new Uint8Array([1, 2, 3, 4]), new Int8Array([1, -1, 2, 0]), 2, 2, 2)  // Int32Array [5, -1, 11, -3]
 */
export function matmulInt8(a: Int8Array | Uint8Array, b: Int8Array | Uint8Array | PackedMatrix, m: number, k: number, n: number,
  options?: MatmulOptions): Int32Array {
  const r = resolve(a, b, m, k, n, options);
  call(r);
  return view(r);
}

/**
 * matmulInt8 on native worker threads. The inputs are copied when the call starts (a PackedMatrix is lowbit's own),
 * so the caller may write, transfer or resize them meanwhile; `options.out` is written when the work ends.
 */
export async function matmulInt8Async(a: Int8Array | Uint8Array, b: Int8Array | Uint8Array | PackedMatrix, m: number, k: number,
  n: number, given?: MatmulOptions): Promise<Int32Array> {
  const options = readOnce(given);  // the out compared below is the out resolve checked
  const r = resolve(a, b, m, k, n, options);
  // The native threads touch memory only lowbit holds: a caller's buffer may move (transfer) or shrink (resize).
  const own: Resolved = {
    ...r, a: copyOf(r.a), b: ArrayBuffer.isView(r.b) ? copyOf(r.b) : r.b,
    bZeroPoint: r.bZeroPoint.slice(), out: r.out === options?.out ? new Int32Array(r.m * r.n) : r.out,
  };
  await native().matmulInt8Async(own.a, own.b, own.m, own.k, own.n, own.aZeroPoint, own.bZeroPoint, own.perColumn, own.out, own.kernel, own.threads);
  if (own.out !== r.out) copyIntoOut(r.out, own.out, 'matmulInt8Async');
  return view(r);
}

/** A copy of the bytes (a Node Buffer is a Uint8Array whose slice() is a view of the same memory, not a copy). */
function copyOf(v: Bytes): Bytes {
  return v instanceof Int8Array ? new Int8Array(v) : new Uint8Array(v);
}

function checkScale(name: string, v: unknown): number {
  if (typeof v !== 'number') throw invalidType(name, 'a positive finite number', v);
  const f = Math.fround(v);
  if (!(f > 0) || !Number.isFinite(f)) throw invalidValue(name, 'a positive finite float32 number', v);
  return f;
}

function checkColumnScales(name: string, v: unknown, n: number): { scale: Float32Array; perColumn: boolean } {
  if (typeof v === 'number') return { scale: Float32Array.of(checkScale(name, v)), perColumn: false };
  if (!(v instanceof Float32Array) || v.length !== n) throw invalidType(name, `a number or a Float32Array of n = ${n}`, v);
  v.forEach((s, j) => checkScale(`${name}[${j}]`, s));
  return { scale: v, perColumn: true };
}

function scaled(r: Resolved, o: Record<string, unknown>, yScale = 1): { aScale: number; bScale: Float32Array; perColumn: boolean } {
  const aScale = checkScale('options.aScale', o.aScale);
  const { scale, perColumn } = checkColumnScales('options.bScale', o.bScale, r.n);
  // The kernels multiply C by aScale·bScale (/ yScale) in float32: an infinite factor would turn C = 0 into NaN.
  const column = perColumn ? (j: number) => `options.bScale[${j}]` : () => 'options.bScale';
  const bad = scale.findIndex((b) => !Number.isFinite(Math.fround(aScale * b)));
  if (bad >= 0) {
    throw invalidValue(column(bad), 'scales whose product aScale·bScale is a finite float32', scale[bad],
      `aScale is ${aScale}: rescale the quantized values.`);
  }
  // A finite product over a yScale too small: name yScale, the factor that is out of range.
  const over = scale.findIndex((b) => !Number.isFinite(Math.fround(Math.fround(aScale * b) / yScale)));
  if (over >= 0) {
    throw invalidValue('options.yScale', 'a scale large enough that aScale·bScale / yScale is a finite float32', yScale,
      `aScale is ${aScale} and ${column(over)} ${scale[over]}: use a larger output scale.`);
  }
  return { aScale, bScale: scale, perColumn };
}

/**
 * onnxruntime MatMulIntegerToFloat: y = float(C) · (aScale · bScale_j) + bias_j, C as in matmulInt8.
 */
export function matmulInt8ToFloat(a: Int8Array | Uint8Array, b: Int8Array | Uint8Array | PackedMatrix, m: number, k: number,
  n: number, given: MatmulToFloatOptions): Float32Array {
  const options = readOnce(given);
  if (!isPlainObject(options)) throw invalidType('options', 'an options object with aScale and bScale', options);
  const r = resolve(a, b, m, k, n, options, ['aScale', 'bScale', 'bias']);
  if ((options as MatmulOptions).out !== undefined) throw invalidValue('options.out', 'no out (the output is a new Float32Array)', (options as MatmulOptions).out);
  const s = scaled(r, options as unknown as Record<string, unknown>);
  let bias: Float32Array | null = null;
  if (options.bias !== undefined) {
    if (!(options.bias instanceof Float32Array) || options.bias.length !== r.n) throw invalidType('options.bias', `a Float32Array of n = ${r.n}`, options.bias);
    bias = options.bias;
  }
  call(r);
  const y = new Float32Array(r.m * r.n);
  native().int32ToFloat(r.out, r.m, r.n, s.aScale, s.bScale, s.perColumn, bias, y);
  return y;
}

/**
 * ONNX QLinearMatMul: y = saturate(roundHalfToEven(float(C) · (aScale·bScale_j / yScale)) + yZeroPoint).
 */
export function matmulInt8Requantized(a: Int8Array | Uint8Array, b: Int8Array | Uint8Array | PackedMatrix, m: number, k: number,
  n: number, given: MatmulRequantizedOptions): Int8Array | Uint8Array {
  const options = readOnce(given);
  if (!isPlainObject(options)) throw invalidType('options', 'an options object with aScale, bScale and yScale', options);
  const r = resolve(a, b, m, k, n, options, ['aScale', 'bScale', 'yScale', 'yZeroPoint', 'signed', 'relu', 'bias']);
  if (options.bias !== undefined) throw invalidValue('options.bias', 'no bias (QLinearMatMul has none)', options.bias, 'Use matmulInt8ToFloat for a float bias.');
  if (options.out !== undefined) throw invalidValue('options.out', 'no out (the output is a new int8/uint8 array)', options.out);
  const yScale = checkScale('options.yScale', options.yScale);
  const s = scaled(r, options as unknown as Record<string, unknown>, yScale);
  const signed = options.signed === undefined ? r.a instanceof Int8Array : checkBoolean('options.signed', options.signed);
  const [qmin, qmax] = range(signed);
  const yZeroPoint = options.yZeroPoint === undefined ? 0 : checkInteger('options.yZeroPoint', options.yZeroPoint, qmin, qmax);
  const relu = options.relu === undefined ? false : checkBoolean('options.relu', options.relu);
  call(r);
  const y = signed ? new Int8Array(r.m * r.n) : new Uint8Array(r.m * r.n);
  native().requantizeInt32(r.out, r.m, r.n, s.aScale, s.bScale, s.perColumn, yScale, yZeroPoint, qmin, qmax, relu, y);
  return y;
}

const int4Handles = new WeakMap<PackedInt4Matrix, PackedInt4Handle>();

/** int4/uint4 weights [k, n] with block-wise scales along k, packed for matmulInt4 (build with packInt4Matrix). */
export class PackedInt4Matrix {
  readonly k: number;
  readonly n: number;
  readonly blockSize: number;
  /** true for int4, false for uint4. */
  readonly signed: boolean;

  /** Not for users (a private token refuses other callers): packInt4Matrix() makes them. */
  constructor(token: symbol, handle: PackedInt4Handle, k: number, n: number, blockSize: number, signed: boolean) {
    if (token !== fromPackMatrix) throw new TypeError('PackedInt4Matrix objects come from packInt4Matrix(q); do not construct them.');
    this.k = k;
    this.n = n;
    this.blockSize = blockSize;
    this.signed = signed;
    int4Handles.set(this, handle);
    Object.freeze(this);
  }
}

/**
 * Packs a 4-bit weight matrix for matmulInt4. `q` is what
 * quantizeTensor(w, { shape: [k, n], bits: 4, granularity: 'block', axis: 0, blockSize })
 * returns: block size a power of two >= 16 along k (axis 0).
 * @example
 * const q = quantizeTensor(w, { shape: [4096, 4096], bits: 4, granularity: 'block', axis: 0, blockSize: 32 });
 * const b = packInt4Matrix(q);
 */
export function packInt4Matrix(q: QuantizedTensor, given?: { threads?: number }): PackedInt4Matrix {
  const options = readOnce(given);
  const { q: t } = checkQuantizedTensor('q', q);
  if (t.shape.length !== 2) throw invalidValue('q.shape', 'a matrix shape [k, n]', t.shape);
  if (t.bits > 4) throw invalidValue('q.bits', 'at most 4', t.bits, 'Quantize with bits: 4.');
  if (t.granularity !== 'block' || t.axis !== 0) {
    throw invalidValue('q.granularity', "'block' along axis 0 (blocks over k)", t.granularity,
      "Quantize with { granularity: 'block', axis: 0, blockSize: 32 } (or another power of two >= 16).");
  }
  const blockSize = t.blockSize!;
  if (blockSize < 16 || (blockSize & (blockSize - 1)) !== 0) {
    throw invalidValue('q.blockSize', 'a power of two >= 16', blockSize);
  }
  if (options !== undefined && !isPlainObject(options)) throw invalidType('options', 'an object { threads? }', options);
  if (options) checkKnownKeys('options', options, ['threads']);
  const threads = options?.threads === undefined ? 0 : checkInteger('options.threads', options.threads, 1, 1024);
  const [k, n] = t.shape;
  const handle = native().packInt4Matrix(t.values, k, n, blockSize, t.scale, t.zeroPoint, threads);
  // checkQuantizedTensor refused codes outside the bits (at most 4) already.
  if (typeof handle === 'number') throw new Error(`lowbit bug: packInt4Matrix found q.values[${handle}] outside 4 bits after the check`);
  return new PackedInt4Matrix(fromPackMatrix, handle, k, n, blockSize, t.signed);
}

export interface MatmulInt4Options {
  /** Scale of A. */
  aScale: number;
  /** Zero point of A, in A's element type. Default 0. */
  aZeroPoint?: number;
  /** Native threads. Default: all cores. */
  threads?: number;
  /** Force a kernel: one of cpuInfo().gemmKernels. */
  kernel?: string;
  /** Where to write y (at least m·n floats). */
  out?: Float32Array;
}

/**
 * W4A8: y = Σ_blocks (aScale · bScale[block, j]) · Σ_{k in block} (A - aZeroPoint)(B - bZeroPoint[block, j]),
 * with int8/uint8 activations A [m, k] and packed 4-bit weights B [k, n].
 * The per-block products are accumulated in float in block order, the same on every kernel.
 */
export function matmulInt4(a: Int8Array | Uint8Array, b: PackedInt4Matrix, m: number, k: number, n: number,
  given: MatmulInt4Options): Float32Array {
  const options = readOnce(given);
  const A = checkBytes('a', a);
  if (!(b instanceof PackedInt4Matrix)) throw invalidType('b', 'a PackedInt4Matrix (from packInt4Matrix)', b);
  const dims = checkDims(m, k, n);
  if (b.k !== dims.k || b.n !== dims.n) {
    throw invalidValue('b', `a PackedInt4Matrix of k = ${dims.k}, n = ${dims.n}`, b, `It was packed with k = ${b.k}, n = ${b.n}.`);
  }
  if (A.length !== dims.m * dims.k) throw invalidValue('a', `an array of m·k = ${dims.m * dims.k} elements`, A);
  if (!isPlainObject(options)) throw invalidType('options', 'an options object with aScale', options);
  checkKnownKeys('options', options, ['aScale', 'aZeroPoint', 'threads', 'kernel', 'out']);
  const aScale = checkScale('options.aScale', options.aScale);
  const [alo, ahi] = range(A instanceof Int8Array);
  const aZeroPoint = options.aZeroPoint === undefined ? 0 : checkInteger('options.aZeroPoint', options.aZeroPoint, alo, ahi);
  const kernel = checkKernel('gemm', options.kernel);
  const threads = options.threads === undefined ? 0 : checkInteger('options.threads', options.threads, 1, 1024);
  let out: Float32Array;
  if (options.out === undefined) {
    out = new Float32Array(dims.m * dims.n);
  } else {
    if (!(options.out instanceof Float32Array) || options.out.length < dims.m * dims.n) {
      throw invalidType('options.out', `a Float32Array of at least m·n = ${dims.m * dims.n} elements`, options.out);
    }
    checkAttached('options.out', options.out);
    checkSeparate(options.out, A);
    out = options.out;
  }
  native().matmulInt4(A, int4Handles.get(b)!, dims.m, aZeroPoint, aScale, out, kernel, threads);
  return out.length === dims.m * dims.n ? out : out.subarray(0, dims.m * dims.n);
}
