/**
 * Single-operator ONNX models built in code (onnx-buf) and run with
 * onnxruntime-node: the reference lowbit is compared with in tests and benches.
 */
import { create, toBinary } from '@bufbuild/protobuf';
import {
  AttributeProto_AttributeType, ModelProtoSchema, TensorProto_DataType, type TensorProto, type ValueInfoProto,
} from 'onnx-buf';
import * as ort from 'onnxruntime-node';

export { ort };

function valueInfo(name: string, elemType: TensorProto_DataType, dims: number[]): ValueInfoProto {
  return {
    name,
    type: {
      value: {
        case: 'tensorType',
        value: { elemType, shape: { dim: dims.map((d) => ({ value: { case: 'dimValue', value: BigInt(d) } })) } },
      },
    },
  } as unknown as ValueInfoProto;
}

function initializer(name: string, dataType: TensorProto_DataType, dims: number[], raw: Uint8Array): TensorProto {
  return { name, dataType, dims: dims.map(BigInt), rawData: raw } as unknown as TensorProto;
}

const bytes = (a: ArrayBufferView) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

/**
 * A model y = QuantizeLinear(x, scale, zeroPoint) (opset 21) with x a float
 * input of shape `shape`; scale/zeroPoint are initializers of `scaleShape`.
 */
export function quantizeLinearModel(opts: {
  shape: number[]; scale: Float32Array; zeroPoint: Int8Array | Uint8Array; scaleShape: number[];
  axis?: number; blockSize?: number;
}): Uint8Array {
  const zpType = opts.zeroPoint instanceof Int8Array ? TensorProto_DataType.INT8 : TensorProto_DataType.UINT8;
  const attribute = [];
  if (opts.axis !== undefined) attribute.push({ name: 'axis', type: AttributeProto_AttributeType.INT, i: BigInt(opts.axis) });
  if (opts.blockSize !== undefined) attribute.push({ name: 'block_size', type: AttributeProto_AttributeType.INT, i: BigInt(opts.blockSize) });
  const model = create(ModelProtoSchema, {
    irVersion: 10n,
    producerName: 'lowbit-tests',
    opsetImport: [{ domain: '', version: 21n }],
    graph: {
      name: 'q',
      node: [{ opType: 'QuantizeLinear', input: ['x', 'scale', 'zp'], output: ['y'], attribute }],
      initializer: [
        initializer('scale', TensorProto_DataType.FLOAT, opts.scaleShape, bytes(opts.scale)),
        initializer('zp', zpType, opts.scaleShape, bytes(opts.zeroPoint)),
      ],
      input: [valueInfo('x', TensorProto_DataType.FLOAT, opts.shape)],
      output: [valueInfo('y', zpType, opts.shape)],
    },
  } as never);
  return toBinary(ModelProtoSchema, model);
}

export async function session(model: Uint8Array, threads = 1): Promise<ort.InferenceSession> {
  return ort.InferenceSession.create(model, { intraOpNumThreads: threads, interOpNumThreads: 1, graphOptimizationLevel: 'basic' });
}

/** Runs a QuantizeLinear model on x; returns y. */
export async function runQuantizeLinear(s: ort.InferenceSession, x: Float32Array, shape: number[]): Promise<Int8Array | Uint8Array> {
  const out = await s.run({ x: new ort.Tensor('float32', x, shape) });
  return out.y.data as Int8Array | Uint8Array;
}
