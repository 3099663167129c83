/**
 * A tiny pre-LayerNorm transformer as exporters write one: token ids → embedding + positions, two blocks of
 * multi-head attention (Reshape/Transpose heads, a Softmax over scaled scores) and an MLP with GELU, a final
 * LayerNorm and an output MatMul. Below opset 17 LayerNorm is decomposed (ReduceMean with an axes attribute, which
 * opset 18 moved to an input), below 20 GELU is the Erf formula.
 */
import { create, toBinary } from '@bufbuild/protobuf';
import { AttributeProto_AttributeType, ModelProtoSchema, TensorProto_DataType } from 'onnx-buf';

import { valueInfo as info } from './onnx-builder';
import { gaussian, rng } from './random';

export const TRANSFORMER = { vocabulary: 64, sequence: 16, width: 32, heads: 4 };

export function tinyTransformer(opset: number, seed = 7): Uint8Array {
  const { vocabulary: V, sequence: S, width: D, heads: H } = TRANSFORMER;
  const r = rng(seed);
  const gauss = () => gaussian(r);
  const initializer: object[] = [];
  const floats = (name: string, dims: number[], value: () => number) => {
    const data = Float32Array.from({ length: dims.reduce((a, b) => a * b, 1) }, value);
    initializer.push({ name, dataType: TensorProto_DataType.FLOAT, dims: dims.map(BigInt), rawData: new Uint8Array(data.buffer) });
    return name;
  };
  const int64s = (name: string, values: number[]) => {
    initializer.push({ name, dataType: TensorProto_DataType.INT64, dims: [BigInt(values.length)], rawData: new Uint8Array(BigInt64Array.from(values.map(BigInt)).buffer) });
    return name;
  };
  const node: object[] = [];
  const op = (opType: string, input: string[], attrs: Record<string, number | number[]> = {}, out = `v${node.length}`, name = `${opType.toLowerCase()}${node.length}`) => {
    node.push({
      opType, name, input, output: [out],
      attribute: Object.entries(attrs).map(([name, v]) => (Array.isArray(v) ? { name, type: AttributeProto_AttributeType.INTS, ints: v.map(BigInt) }
        : Number.isInteger(v) ? { name, type: AttributeProto_AttributeType.INT, i: BigInt(v) } : { name, type: AttributeProto_AttributeType.FLOAT, f: v })),
    });
    return out;
  };
  const scalars = new Set<string>();
  const scalar = (name: string, v: number) => {
    if (!scalars.has(name)) initializer.push({ name, dataType: TensorProto_DataType.FLOAT, dims: [], rawData: new Uint8Array(Float32Array.of(v).buffer) });
    scalars.add(name);
    return name;
  };
  const layerNorm = (x: string, tag: string) => {
    const gain = floats(`${tag}.gain`, [D], () => 1 + 0.1 * gauss());
    const bias = floats(`${tag}.bias`, [D], () => 0.1 * gauss());
    if (opset >= 17) return op('LayerNormalization', [x, gain, bias], { axis: -1, epsilon: 1e-5 });
    const centred = op('Sub', [x, op('ReduceMean', [x], { axes: [-1] })]);
    const variance = op('ReduceMean', [op('Pow', [centred, scalar('two', 2)])], { axes: [-1] });
    return op('Add', [op('Mul', [op('Div', [centred, op('Sqrt', [op('Add', [variance, scalar('eps', 1e-5)])])]), gain]), bias]);
  };
  const linear = (x: string, tag: string, inputs: number, outputs: number) =>
    op('Add', [op('MatMul', [x, floats(`${tag}.weight`, [inputs, outputs], () => gauss() / Math.sqrt(inputs))], {}, `${tag}.matmul`, tag),
      floats(`${tag}.bias`, [outputs], () => 0.02 * gauss())]);
  floats('embedding', [V, D], gauss);
  floats('positions', [S, D], () => 0.1 * gauss());
  int64s('heads', [0, 0, H, D / H]);
  int64s('merged', [0, 0, D]);
  let x = op('Add', [op('Gather', ['embedding', 'ids'], { axis: 0 }), 'positions']);
  for (let b = 0; b < 2; b++) {
    const h = layerNorm(x, `block${b}.norm1`);
    const perHead = (t: string) => op('Transpose', [op('Reshape', [linear(h, `block${b}.${t}`, D, D), 'heads'])], { perm: [0, 2, 1, 3] });
    const q = perHead('query');
    const kT = op('Transpose', [perHead('key')], { perm: [0, 1, 3, 2] });
    const v = perHead('value');
    const scores = op('MatMul', [q, kT], {}, `block${b}.scores`, `block${b}.scores`);
    const attention = op('Softmax', [op('Div', [scores, scalar('scale', Math.sqrt(D / H))])], { axis: -1 });
    const mixed = op('MatMul', [attention, v], {}, `block${b}.mixed`, `block${b}.mixed`);
    const context = op('Reshape', [op('Transpose', [mixed], { perm: [0, 2, 1, 3] }), 'merged']);
    x = op('Add', [x, linear(context, `block${b}.out`, D, D)]);
    const u = linear(layerNorm(x, `block${b}.norm2`), `block${b}.up`, D, 4 * D);
    const gelu = opset >= 20 ? op('Gelu', [u]) : op('Mul', [op('Mul', [u, op('Add', [op('Erf', [op('Div', [u, scalar('sqrt2', Math.SQRT2)])]), scalar('one', 1)])]), scalar('half', 0.5)]);
    x = op('Add', [x, linear(gelu, `block${b}.down`, 4 * D, D)]);
  }
  op('MatMul', [layerNorm(x, 'final'), floats('head.weight', [D, V], () => gauss() / Math.sqrt(D))], {}, 'logits');
  return toBinary(ModelProtoSchema, create(ModelProtoSchema, {
    irVersion: 8n, producerName: 'lowbit test', opsetImport: [{ domain: '', version: BigInt(opset) }],
    graph: {
      name: 'tiny-transformer', node, initializer,
      input: [info('ids', TensorProto_DataType.INT64, ['batch', S])],
      output: [info('logits', TensorProto_DataType.FLOAT, ['batch', S, V])],
    },
  } as never));
}

/** A feed of `batch` random token sequences. */
export function tokenFeed(seed: number, batch = 2): { ids: { data: BigInt64Array; dims: number[] } } {
  const r = rng(seed);
  const { vocabulary, sequence } = TRANSFORMER;
  return { ids: { data: BigInt64Array.from({ length: batch * sequence }, () => BigInt(Math.floor(r() * vocabulary))), dims: [batch, sequence] } };
}
