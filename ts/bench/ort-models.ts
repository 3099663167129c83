/**
 * Single-operator ONNX models built in code (onnx-buf) and run with
 * onnxruntime-node: the reference lowbit is compared with in tests and benches.
 */
import { create, toBinary } from '@bufbuild/protobuf';
import {
  AttributeProto_AttributeType, ModelProtoSchema, TensorProto_DataType, type TensorProto, type ValueInfoProto,
} from 'onnx-buf';
import type * as Ort from 'onnxruntime-node';

export { TensorProto_DataType as DataType };

let ortModule: typeof Ort | undefined;

/** onnxruntime-node, which lowbit runs models with, is missing, of a version lowbit cannot use, or fails to load. */
export class OnnxruntimeMissingError extends Error {
  /** True when the package is not installed at all (rather than too old, or failing to load). */
  readonly notInstalled: boolean;
  constructor(message: string, notInstalled = false, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'OnnxruntimeMissingError';
    this.notInstalled = notInstalled;
  }
}

/**
 * @internal onnxruntime-node, an optional peer dependency: loaded on first use, with a clear error when absent, too old or
 * failing to load. (Internal: lowbit's declarations do not need onnxruntime-node's types.)
 */
export function ort(): typeof Ort {
  if (!ortModule) {
    let version: string;
    try {
      version = (require('onnxruntime-node/package.json') as { version: string }).version;
    } catch (e) {
      throw new OnnxruntimeMissingError('lowbit runs models (calibration, evaluation, distillation, fine-tuning) in onnxruntime-node, an optional ' +
        `peer dependency that is not installed (${(e as Error).message.split('\n')[0]}). Install it: npm install onnxruntime-node@^1.${MIN_ORT_MINOR}.0 ` +
        '(offline, set ONNXRUNTIME_NODE_INSTALL=skip: its install script fetches CUDA binaries from nuget.org). ' +
        'Weight-only quantization (no activations, no data-driven bias correction) works without it, unevaluated.', true, { cause: e });
    }
    const problem = ortVersionProblem(version);
    if (problem) throw new OnnxruntimeMissingError(problem);
    try {
      ortModule = require('onnxruntime-node') as typeof Ort;
    } catch (e) {
      // (Its native library missing or built for another platform or Node.js.)
      throw new OnnxruntimeMissingError(`onnxruntime-node ${version} is installed but does not load (${(e as Error).message.split('\n')[0]}): ` +
        `reinstall it for this platform and Node.js (npm install onnxruntime-node@^1.${MIN_ORT_MINOR}.0).`, false, { cause: e });
    }
  }
  return ortModule;
}

/** The oldest onnxruntime-node 1.x lowbit accepts (the peer dependency's range; tested with it). */
const MIN_ORT_MINOR = 30;

/**
 * Why this onnxruntime-node version cannot be used, or undefined. lowbit runs onnxruntime on worker threads, where
 * older versions abort the whole process (onnxruntime#24486).
 */
export function ortVersionProblem(version: string): string | undefined {
  const [major, minor] = version.split('.').map(Number);
  if (major === 1 && minor >= MIN_ORT_MINOR) return undefined;
  return `lowbit needs onnxruntime-node 1.${MIN_ORT_MINOR} or a later 1.x, but ${version} is installed: npm install onnxruntime-node@^1.${MIN_ORT_MINOR}.0`;
}

/** True when onnxruntime-node can be loaded. */
export function hasOrt(): boolean {
  return ortProblem() === undefined;
}

/** Why onnxruntime-node cannot be used (not installed, too old, failing to load), or undefined when it can. */
export function ortProblem(): OnnxruntimeMissingError | undefined {
  try {
    ort();
    return undefined;
  } catch (e) {
    return e instanceof OnnxruntimeMissingError ? e : new OnnxruntimeMissingError(`onnxruntime-node does not load: ${(e as Error).message}`, false, { cause: e });
  }
}

type Typed = Float32Array | Int8Array | Uint8Array | Int16Array | Uint16Array | Int32Array;

export interface TensorSpec {
  name: string;
  type: TensorProto_DataType;
  dims: number[];
}

export interface InitializerSpec extends TensorSpec {
  data: Typed;
}

export interface NodeSpec {
  opType: string;
  domain?: string;
  opset?: number;
  inputs: TensorSpec[];
  initializers?: InitializerSpec[];
  /** Input names of the node in order ('' for an omitted optional input); default: inputs then initializers. */
  nodeInputs?: string[];
  outputs: TensorSpec[];
  attributes?: Record<string, number>;
}

function valueInfo(t: TensorSpec): ValueInfoProto {
  return {
    name: t.name,
    type: {
      value: {
        case: 'tensorType',
        value: { elemType: t.type, shape: { dim: t.dims.map((d) => ({ value: { case: 'dimValue', value: BigInt(d) } })) } },
      },
    },
  } as unknown as ValueInfoProto;
}

const bytes = (a: ArrayBufferView) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

/** A model with one node, its inputs as graph inputs and its constants as initializers. */
export function singleNodeModel(spec: NodeSpec): Uint8Array {
  const initializers = spec.initializers ?? [];
  const attribute = Object.entries(spec.attributes ?? {}).map(([name, v]) => ({ name, type: AttributeProto_AttributeType.INT, i: BigInt(v) }));
  const opsetImport = [{ domain: '', version: BigInt(spec.opset ?? 21) }];
  if (spec.domain) opsetImport.push({ domain: spec.domain, version: 1n });
  const model = create(ModelProtoSchema, {
    irVersion: 10n,
    producerName: 'lowbit-tests',
    opsetImport,
    graph: {
      name: spec.opType,
      node: [{
        opType: spec.opType, domain: spec.domain ?? '',
        input: spec.nodeInputs ?? [...spec.inputs, ...initializers].map((t) => t.name),
        output: spec.outputs.map((t) => t.name), attribute,
      }],
      initializer: initializers.map((t) => ({ name: t.name, dataType: t.type, dims: t.dims.map(BigInt), rawData: bytes(t.data) }) as unknown as TensorProto),
      input: spec.inputs.map(valueInfo),
      output: spec.outputs.map(valueInfo),
    },
  } as never);
  return toBinary(ModelProtoSchema, model);
}

/**
 * A model y = QuantizeLinear(x, scale, zeroPoint) (opset 21) with x a float
 * input of shape `shape`; scale/zeroPoint are initializers of `scaleShape`.
 */
export function quantizeLinearModel(opts: {
  shape: number[]; scale: Float32Array; zeroPoint: Int8Array | Uint8Array | Int16Array | Uint16Array; scaleShape: number[];
  axis?: number; blockSize?: number;
}): Uint8Array {
  const zp = opts.zeroPoint;
  const zpType = zp instanceof Int8Array ? TensorProto_DataType.INT8 : zp instanceof Uint8Array ? TensorProto_DataType.UINT8
    : zp instanceof Int16Array ? TensorProto_DataType.INT16 : TensorProto_DataType.UINT16;
  const attributes: Record<string, number> = {};
  if (opts.axis !== undefined) attributes.axis = opts.axis;
  if (opts.blockSize !== undefined) attributes.block_size = opts.blockSize;
  return singleNodeModel({
    opType: 'QuantizeLinear',
    inputs: [{ name: 'x', type: TensorProto_DataType.FLOAT, dims: opts.shape }],
    initializers: [
      { name: 'scale', type: TensorProto_DataType.FLOAT, dims: opts.scaleShape, data: opts.scale },
      { name: 'zp', type: zpType, dims: opts.scaleShape, data: opts.zeroPoint },
    ],
    outputs: [{ name: 'y', type: zpType, dims: opts.shape }],
    attributes,
  });
}

const byteType = (a: Int8Array | Uint8Array) => (a instanceof Int8Array ? TensorProto_DataType.INT8 : TensorProto_DataType.UINT8);

/**
 * y = MatMulInteger(a, b, aZp, bZp) with a an input [m, k] and b a constant [k, n]
 * (as in a real model, so onnxruntime pre-packs it).
 */
export function matMulIntegerModel(a: { signed: boolean; m: number; k: number }, b: Int8Array | Uint8Array, n: number,
  aZeroPoint: number, bZeroPoint: Int8Array | Uint8Array): Uint8Array {
  const aType = a.signed ? TensorProto_DataType.INT8 : TensorProto_DataType.UINT8;
  return singleNodeModel({
    opType: 'MatMulInteger',
    opset: 10,
    inputs: [{ name: 'a', type: aType, dims: [a.m, a.k] }],
    initializers: [
      { name: 'b', type: byteType(b), dims: [a.k, n], data: b },
      { name: 'azp', type: aType, dims: [], data: a.signed ? Int8Array.of(aZeroPoint) : Uint8Array.of(aZeroPoint) },
      { name: 'bzp', type: byteType(b), dims: bZeroPoint.length === 1 ? [] : [n], data: bZeroPoint },
    ],
    outputs: [{ name: 'y', type: TensorProto_DataType.INT32, dims: [a.m, n] }],
  });
}

/** @internal An onnxruntime session for the benchmarks. */
export async function session(model: Uint8Array, threads = 1, extra?: Record<string, string>): Promise<Ort.InferenceSession> {
  return ort().InferenceSession.create(model, {
    intraOpNumThreads: threads, interOpNumThreads: 1, graphOptimizationLevel: 'basic',
    ...(extra ? { extra: { session: extra } } : {}),
  });
}

/** @internal Runs a QuantizeLinear model on x; returns y. */
export async function runQuantizeLinear(s: Ort.InferenceSession, x: Float32Array, shape: number[]): Promise<Int8Array | Uint8Array | Int16Array | Uint16Array> {
  const out = await s.run({ x: new (ort().Tensor)('float32', x, shape) });
  return out.y.data as Int8Array | Uint8Array | Int16Array | Uint16Array;
}

/** y = MatMul(a, b) in float32 with b a constant [k, n]. */
export function matMulFloatModel(m: number, k: number, n: number, b: Float32Array): Uint8Array {
  return singleNodeModel({
    opType: 'MatMul', opset: 13,
    inputs: [{ name: 'a', type: TensorProto_DataType.FLOAT, dims: [m, k] }],
    initializers: [{ name: 'b', type: TensorProto_DataType.FLOAT, dims: [k, n], data: b }],
    outputs: [{ name: 'y', type: TensorProto_DataType.FLOAT, dims: [m, n] }],
  });
}

/**
 * com.microsoft MatMulNBits (4-bit weights, uint4 with zero point 8, blocks along k):
 * b holds n rows of ceil(k / blockSize) blocks of blockSize / 2 bytes, low nibble first.
 */
export function matMulNBitsModel(m: number, k: number, n: number, blockSize: number, b: Uint8Array, scales: Float32Array,
  accuracyLevel: number): Uint8Array {
  const blocks = Math.ceil(k / blockSize);
  return singleNodeModel({
    opType: 'MatMulNBits', domain: 'com.microsoft', opset: 21,
    inputs: [{ name: 'a', type: TensorProto_DataType.FLOAT, dims: [m, k] }],
    initializers: [
      { name: 'b', type: TensorProto_DataType.UINT8, dims: [n, blocks, blockSize / 2], data: b },
      { name: 'scales', type: TensorProto_DataType.FLOAT, dims: [n * blocks], data: scales },
    ],
    outputs: [{ name: 'y', type: TensorProto_DataType.FLOAT, dims: [m, n] }],
    attributes: { K: k, N: n, bits: 4, block_size: blockSize, accuracy_level: accuracyLevel },
  });
}
