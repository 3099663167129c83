/** Small ONNX models built in code, for the training-engine tests and experiments. */
import { create, toBinary } from '@bufbuild/protobuf';
import { AttributeProto_AttributeType, ModelProtoSchema, TensorProto_DataType, type NodeProto } from 'onnx-buf';

import { readModel, serializeModel } from '../../ts/onnx/model-io';

import { rng } from './random';

export type Attr = number | number[] | string;

export interface NodeSpec {
  op: string;
  inputs: string[];
  output: string;
  name?: string;
  attrs?: Record<string, Attr>;
}

export interface ModelSpec {
  inputDims: Array<number | string>;
  nodes: NodeSpec[];
  /** Float initializers (int64 when listed in int64). */
  initializers: Record<string, { dims: number[]; data: ArrayLike<number> }>;
  int64?: Record<string, number[]>;
  output: string;
  opset?: number;
}

function attribute(name: string, v: Attr) {
  if (typeof v === 'string') return { name, type: AttributeProto_AttributeType.STRING, s: new TextEncoder().encode(v) };
  if (Array.isArray(v)) return { name, type: AttributeProto_AttributeType.INTS, ints: v.map(BigInt) };
  return Number.isInteger(v) && !['alpha', 'beta', 'epsilon', 'momentum', 'min', 'max'].includes(name)
    ? { name, type: AttributeProto_AttributeType.INT, i: BigInt(v) }
    : { name, type: AttributeProto_AttributeType.FLOAT, f: v };
}

const shape = (dims: Array<number | string>) => ({
  dim: dims.map((d) => (typeof d === 'number' ? { value: { case: 'dimValue', value: BigInt(d) } } : { value: { case: 'dimParam', value: d } })),
});

/** A graph input or output: a tensor of this element type (float by default), with these dims when given (a string: symbolic). */
export function valueInfo(name: string, elemType: number = TensorProto_DataType.FLOAT, dims?: Array<number | string>) {
  return { name, type: { value: { case: 'tensorType', value: { elemType, ...(dims ? { shape: shape(dims) } : {}) } } } };
}

/** Cosine similarity of two equally long vectors, in float64. */
export function cosine(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let ab = 0, aa = 0, bb = 0;
  for (let i = 0; i < a.length; i++) {
    ab += a[i] * b[i];
    aa += a[i] * a[i];
    bb += b[i] * b[i];
  }
  return ab / Math.sqrt(aa * bb);
}

export function buildModel(spec: ModelSpec): Uint8Array {
  const initializer = [
    ...Object.entries(spec.initializers).map(([name, t]) => ({
      name, dataType: TensorProto_DataType.FLOAT, dims: t.dims.map(BigInt), rawData: new Uint8Array(Float32Array.from(t.data).buffer),
    })),
    ...Object.entries(spec.int64 ?? {}).map(([name, values]) => ({
      name, dataType: TensorProto_DataType.INT64, dims: [BigInt(values.length)], rawData: new Uint8Array(BigInt64Array.from(values.map(BigInt)).buffer),
    })),
  ];
  const model = create(ModelProtoSchema, {
    irVersion: 8n, producerName: 'lowbit test', opsetImport: [{ domain: '', version: BigInt(spec.opset ?? 13) }],
    graph: {
      name: 'test',
      node: spec.nodes.map((n, i) => ({
        opType: n.op, name: n.name ?? `${n.op.toLowerCase()}${i}`, input: n.inputs, output: [n.output],
        attribute: Object.entries(n.attrs ?? {}).map(([k, v]) => attribute(k, v)),
      })),
      initializer,
      input: [{ name: 'input', type: { value: { case: 'tensorType', value: { elemType: TensorProto_DataType.FLOAT, shape: shape(spec.inputDims) } } } }],
      output: [{ name: spec.output, type: { value: { case: 'tensorType', value: { elemType: TensorProto_DataType.FLOAT } } } }],
    },
  } as never);
  return toBinary(ModelProtoSchema, model);
}

/**
 * A one-channel MatMul whose 8-bit quantized output overflows float32 where the float one does not: its largest
 * weight sets the int8 scale s, and w1 = 50.6·s rounds up to 51·s (0.8% larger), so the second feed, making x·w1
 * 3.395e38, overflows (3.403e38) only quantized. Feeds: finite in both, overflowing quantized, overflowing both.
 * `followers` MatMuls by 1 (next1, next2…) carry its output on to the model's output y.
 */
export function overflowingMatMul(followers = 0) {
  const largest = 3e38;
  const w1 = 50.6 * (largest / 127);
  const out = (i: number) => (i === followers ? 'y' : `y${i}`);
  const model = buildModel({
    inputDims: [1, 3],
    nodes: [{ op: 'MatMul', inputs: ['input', 'W'], output: out(0), name: 'mm' },
      ...Array.from({ length: followers }, (_, i) => ({ op: 'MatMul', inputs: [out(i), 'one'], output: out(i + 1), name: `next${i + 1}` }))],
    initializers: { W: { dims: [3, 1], data: [w1, 0, largest] }, ...(followers ? { one: { dims: [1, 1], data: [1] } } : {}) },
    output: 'y',
  });
  const feed = (x: number) => ({ input: { data: Float32Array.of(x, 0, 0), dims: [1, 3] } });
  return { model, feeds: [feed(0.5), feed(3.395e38 / w1), feed(10)] };
}

/** Uniform He initialisation. */
export function heInit(count: number, fanIn: number, seed: number): Float32Array {
  const r = rng(seed);
  const bound = Math.sqrt(6 / fanIn);
  return Float32Array.from({ length: count }, () => (r() * 2 - 1) * bound);
}

export interface ConvBlock {
  channels: number;
  /** MaxPool 2×2 after the block. */
  pool: boolean;
}

/**
 * An untrained CNN for 1×28×28 inputs: per block Conv 3×3 (pad 1) → BatchNorm →
 * ReLU (→ MaxPool 2), then Flatten → Gemm (10 classes).
 */
export function cnn(seed: number, blocks: ConvBlock[]): Uint8Array {
  const nodes: NodeSpec[] = [];
  const initializers: ModelSpec['initializers'] = {};
  let x = 'input', channels = 1, size = 28;
  blocks.forEach((b, i) => {
    const k = i + 1;
    const c = b.channels;
    nodes.push(
      { op: 'Conv', name: `conv${k}`, inputs: [x, `conv${k}.weight`, `conv${k}.bias`], output: `c${k}`, attrs: { kernel_shape: [3, 3], pads: [1, 1, 1, 1] } },
      { op: 'BatchNormalization', name: `bn${k}`, inputs: [`c${k}`, `bn${k}.gamma`, `bn${k}.beta`, `bn${k}.mean`, `bn${k}.var`], output: `b${k}`, attrs: { epsilon: 1e-5 } },
      { op: 'Relu', name: `relu${k}`, inputs: [`b${k}`], output: `r${k}` });
    x = `r${k}`;
    if (b.pool) {
      nodes.push({ op: 'MaxPool', name: `pool${k}`, inputs: [x], output: `p${k}`, attrs: { kernel_shape: [2, 2], strides: [2, 2] } });
      x = `p${k}`;
      size /= 2;
    }
    Object.assign(initializers, {
      [`conv${k}.weight`]: { dims: [c, channels, 3, 3], data: heInit(c * channels * 9, channels * 9, seed + k) },
      [`conv${k}.bias`]: { dims: [c], data: new Float32Array(c) },
      [`bn${k}.gamma`]: { dims: [c], data: new Float32Array(c).fill(1) }, [`bn${k}.beta`]: { dims: [c], data: new Float32Array(c) },
      [`bn${k}.mean`]: { dims: [c], data: new Float32Array(c) }, [`bn${k}.var`]: { dims: [c], data: new Float32Array(c).fill(1) },
    });
    channels = c;
  });
  const features = channels * size * size;
  nodes.push(
    { op: 'Flatten', name: 'flatten', inputs: [x], output: 'flat', attrs: { axis: 1 } },
    { op: 'Gemm', name: 'fc', inputs: ['flat', 'fc.weight', 'fc.bias'], output: 'logits', attrs: { transB: 1 } });
  initializers['fc.weight'] = { dims: [10, features], data: heInit(10 * features, features, seed) };
  initializers['fc.bias'] = { dims: [10], data: new Float32Array(10) };
  return buildModel({ inputDims: ['N', 1, 28, 28], nodes, initializers, output: 'logits' });
}

/** The bundled example's architecture, untrained: Conv(8) → pool → Conv(16) → pool → Gemm. */
export function mnistCnn(seed: number): Uint8Array {
  return cnn(seed, [{ channels: 8, pool: true }, { channels: 16, pool: true }]);
}

/**
 * An MLP whose first and last layers are not one each (input [N, 8], output [N, 4]): a stem of two parallel MatMuls
 * (s1, s2) summed, a middle one (mid), two heads (h1, h2) summed into the output, and `side`, read by the rest only
 * through its Shape (for a Reshape). By data flow s1 and s2 are first layers; side, h1 and h2 last ones.
 */
export function branchedMlp(seed: number): Uint8Array {
  const mm = (name: string, x: string) => ({ op: 'MatMul', name, inputs: [x, `${name}.weight`], output: name });
  const names = ['s1', 's2', 'mid', 'side', 'h1', 'h2'];
  const initializers: ModelSpec['initializers'] = Object.fromEntries(names.map((n, i) => {
    const [k, c] = [n === 's1' || n === 's2' ? 8 : 16, n === 'h1' || n === 'h2' ? 4 : 16];
    return [`${n}.weight`, { dims: [k, c], data: heInit(k * c, k, seed + i) }];
  }));
  return buildModel({
    inputDims: ['N', 8], initializers, output: 'y',
    nodes: [mm('s1', 'input'), mm('s2', 'input'), { op: 'Add', name: 'stem', inputs: ['s1', 's2'], output: 'sum' },
      { op: 'Relu', name: 'relu', inputs: ['sum'], output: 'act' }, mm('mid', 'act'), mm('side', 'mid'),
      { op: 'Shape', name: 'shape', inputs: ['side'], output: 'side_shape' },
      { op: 'Reshape', name: 'reshape', inputs: ['mid', 'side_shape'], output: 'features' },
      mm('h1', 'features'), mm('h2', 'features'), { op: 'Add', name: 'heads', inputs: ['h1', 'h2'], output: 'y' }],
  });
}

/** A model file's bytes after `edit` of its main graph's nodes (and its default opset set to `opset`, when given). */
export function editedModel(file: string, edit: (nodes: NodeProto[]) => void, opset?: number): Uint8Array {
  const m = readModel(file);
  if (opset !== undefined) m.opsetImport[0].version = BigInt(opset);
  edit(m.graph!.node);
  return serializeModel(m);
}
