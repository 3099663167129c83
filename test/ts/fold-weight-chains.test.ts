// Weights computed from constants by data movement (Slice, Concat, Unsqueeze…) folded into constants: passes/fold-weight-chains.
import { create, toBinary } from '@bufbuild/protobuf';
import { expect } from 'chai';
import { AttributeProto_AttributeType, ModelProtoSchema, TensorProto_DataType, TensorProtoSchema, ValueInfoProtoSchema, type NodeProto } from 'onnx-buf';

import { ort } from '../../ts/bench/ort-models';
import { toFloat16Array } from '../../ts/float16';
import { allNodes, dimsOf, Graph } from '../../ts/onnx/graph';
import { readModel, serializeModel } from '../../ts/onnx/model-io';
import { foldWeightChains } from '../../ts/onnx/passes/fold-weight-chains';
import { inspectModel } from '../../ts/onnx/inspect';
import { quantizeModel } from '../../ts/onnx/quantize-model';
import { buildModel, valueInfo as info, type NodeSpec } from '../helpers/onnx-builder';
import { normalFeeds, rng } from '../helpers/random';

/** W0 [4, 6] = 0…23 and W1 [2, 6] = 100…111: every element tells where it came from. */
const initializers = {
  W0: { dims: [4, 6], data: Array.from({ length: 24 }, (_, i) => i) },
  W1: { dims: [2, 6], data: Array.from({ length: 12 }, (_, i) => 100 + i) },
};

const CHAINS: Array<{ what: string; opset: number; nodes: NodeSpec[]; int64: Record<string, number[]> }> = [
  { what: 'Slice with negative starts, ends and step along one axis', opset: 13,
    nodes: [{ op: 'Slice', inputs: ['W0', 's', 'e', 'a', 'st'], output: 'W' }], int64: { s: [-1], e: [-6], a: [1], st: [-2] } },
  { what: 'Slice over two axes with out-of-range bounds clamped, axes left out (all, in order)', opset: 13,
    nodes: [{ op: 'Slice', inputs: ['W0', 's', 'e'], output: 'W' }], int64: { s: [1, -100], e: [100, 4] } },
  { what: 'Slice with a negative axis and a step of 3, a negative step running off the start', opset: 13,
    nodes: [{ op: 'Slice', inputs: ['W0', 's', 'e', 'a', 'st'], output: 'W' }], int64: { s: [0, 3], e: [6, -100], a: [-1, 0], st: [3, -1] } },
  { what: 'Concat on a negative axis of a Slice and a constant (a gate reordering)', opset: 13,
    nodes: [{ op: 'Slice', inputs: ['W0', 's', 'e', 'a'], output: 'top' }, { op: 'Concat', inputs: ['W1', 'top', 'W1'], output: 'W', attrs: { axis: -2 } }],
    int64: { s: [2], e: [4], a: [0] } },
  { what: 'Reshape with 0 and -1, Transpose, Flatten', opset: 13,
    nodes: [{ op: 'Reshape', inputs: ['W0', 'shape'], output: 'r' }, { op: 'Transpose', inputs: ['r'], output: 't', attrs: { perm: [2, 0, 1] } },
      { op: 'Flatten', inputs: ['t'], output: 'W', attrs: { axis: 2 } }], int64: { shape: [0, -1, 2] } },
  { what: 'Unsqueeze with a negative axis, Squeeze of one axis, Squeeze of all ones, Transpose with no perm', opset: 13,
    nodes: [{ op: 'Unsqueeze', inputs: ['W0', 'ua'], output: 'u' }, { op: 'Squeeze', inputs: ['u', 'sa'], output: 'q' },
      { op: 'Squeeze', inputs: ['q'], output: 'q2' }, { op: 'Transpose', inputs: ['q2'], output: 'W' }], int64: { ua: [0, -1], sa: [0] } },
  { what: 'Slice with open ends as exporters write them (±2^53), forward and backward', opset: 13,
    nodes: [{ op: 'Slice', inputs: ['W0', 's', 'e', 'a', 'st'], output: 'W' }], int64: { s: [1, -1], e: [2 ** 53, -(2 ** 53)], a: [0, 1], st: [1, -1] } },
  { what: 'opset 11: Unsqueeze and Squeeze take attributes; Flatten on a negative axis', opset: 11,
    nodes: [{ op: 'Unsqueeze', inputs: ['W0'], output: 'u', attrs: { axes: [0, 3] } }, { op: 'Squeeze', inputs: ['u'], output: 'q', attrs: { axes: [0] } },
      { op: 'Flatten', inputs: ['q'], output: 'W', attrs: { axis: -2 } }], int64: {} },
  { what: 'opset 9: Slice and Unsqueeze take attributes, Identity', opset: 9,
    nodes: [{ op: 'Slice', inputs: ['W0'], output: 's', attrs: { starts: [1, 1], ends: [3, 1000], axes: [0, 1] } },
      { op: 'Unsqueeze', inputs: ['s'], output: 'u', attrs: { axes: [0] } }, { op: 'Identity', inputs: ['u'], output: 'W' }], int64: {} },
];

/** What onnxruntime computes for the chain's output W. */
async function ortValue(opset: number, nodes: NodeSpec[], int64: Record<string, number[]>): Promise<{ dims: number[]; data: Float32Array }> {
  const O = ort();
  const session = await O.InferenceSession.create(buildModel({ opset, inputDims: [1], output: 'W', initializers, int64, nodes }));
  const out = (await session.run({ input: new O.Tensor('float32', Float32Array.of(0), [1]) })).W;
  await session.release();
  return { dims: [...out.dims], data: out.data as Float32Array };
}

/** The chain feeding a Gemm's weight (transB, so any 2-D shape is a weight), folded by the pass. */
async function folded(opset: number, nodes: NodeSpec[], int64: Record<string, number[]>) {
  const g = new Graph(readModel(buildModel({ opset, inputDims: [1, 1], output: 'y', initializers, int64, nodes: [...nodes, { op: 'Gemm', inputs: ['input', 'W'], output: 'y', name: 'layer', attrs: { transB: 1 } }] })));
  const report = await foldWeightChains(g);
  const layer = g.graph.node.find((n) => n.opType === 'Gemm')!;
  return { g, report, layer, constant: g.constant(layer.input[1]) };
}

describe('fold-weight-chains', () => {
  for (const { what, opset, nodes, int64 } of CHAINS) {
    it(`${what}: the folded constant is onnxruntime's value, bit for bit; the chain and the constants it alone read are gone`, async () => {
      const want = await ortValue(opset, nodes, int64);
      const { g, report, constant } = await folded(opset, nodes, int64);
      expect(constant, report.changed.join()).to.not.equal(undefined);
      expect(dimsOf(constant!)).to.deep.equal(want.dims);
      expect(Array.from(new Float32Array(constant!.rawData.slice().buffer))).to.deep.equal(Array.from(want.data));
      expect(report.changed).to.have.length(1);
      expect(g.graph.node.map((n) => n.opType)).to.deep.equal(['Gemm']);
      // (W1 stays where the chain does not read it.)
      expect(g.graph.initializer.map((t) => t.name)).to.deep.equal([...(nodes.some((n) => n.inputs.includes('W1')) ? [] : ['W1']), constant!.name]);
    });
  }

  it('float16 weights are moved as they are (float16 in, float16 out)', async () => {
    const half = buildModel({ opset: 13, inputDims: [1, 1], output: 'y', initializers: {}, nodes: [
      { op: 'Slice', inputs: ['H', 's', 'e'], output: 'W' }, { op: 'Gemm', inputs: ['input', 'W'], output: 'y', name: 'layer', attrs: { transB: 1 } }], int64: { s: [1], e: [3] } });
    const m = readModel(half);
    const values = toFloat16Array(Float32Array.from({ length: 8 }, (_, i) => i / 4));
    m.graph!.initializer.push(create(TensorProtoSchema, { name: 'H', dataType: TensorProto_DataType.FLOAT16, dims: [4n, 2n], rawData: new Uint8Array(values.buffer) }));
    const g = new Graph(m);
    await foldWeightChains(g);
    const constant = g.constant(g.graph.node.find((n) => n.opType === 'Gemm')!.input[1])!;
    expect(constant.dataType).to.equal(TensorProto_DataType.FLOAT16);
    expect(Array.from(new Uint16Array(constant.rawData.slice().buffer))).to.deep.equal(Array.from(values.subarray(2, 6)));
  });

  it('says why a chain of constants is not folded: a graph input\'s default, a parameter computed at run time, parameters that do not fit', async () => {
    const skipped = async (bytes: Uint8Array) => {
      const g = new Graph(readModel(bytes));
      const report = await foldWeightChains(g);
      expect(report.changed).to.deep.equal([]);
      return report.skipped;
    };
    const layer = { op: 'Gemm', inputs: ['input', 'W'], output: 'y', name: 'layer', attrs: { transB: 1 } };
    const m = readModel(buildModel({ opset: 13, inputDims: [1, 1], output: 'y', initializers, int64: { s: [1], e: [3] }, nodes: [{ op: 'Slice', inputs: ['W0', 's', 'e'], output: 'W' }, layer] }));
    m.graph!.input.push(create(ValueInfoProtoSchema, info('W0', TensorProto_DataType.FLOAT, [4, 6]) as never));
    expect(await skipped(serializeModel(m))).to.deep.equal([{ node: 'layer', reason: "its weight 'W' is computed from constants, not folded: 'W0' is also a graph input (a default a feed may replace)" }]);
    expect(await skipped(buildModel({ opset: 13, inputDims: [1, 1], output: 'y', initializers, nodes: [
      { op: 'Shape', inputs: ['input'], output: 'shape' }, { op: 'Reshape', inputs: ['W0', 'shape'], output: 'W', name: 'r' }, layer] }))).to.deep.equal([
      { node: 'layer', reason: "its weight 'W' is computed from constants, not folded: Reshape 'r' reads 'shape', which is not an integer constant" }]);
    expect(await skipped(buildModel({ opset: 13, inputDims: [1, 1], output: 'y', initializers, nodes: [
      { op: 'Transpose', inputs: ['W0'], output: 'W', name: 't', attrs: { perm: [0, 0] } }, layer] }))).to.deep.equal([
      { node: 'layer', reason: "its weight 'W' is computed from constants, not folded: Transpose 't': its parameters do not fit its input [4, 6]" }]);
  });

  it('leaves chains with other operators, integer data, computed parameters and keepFloat readers; keeps nodes something else reads', async () => {
    const nodes = (first: NodeSpec): NodeSpec[] => [first, { op: 'Gemm', inputs: ['input', 'W'], output: 'y', name: 'layer', attrs: { transB: 1 } }];
    const unfolded = async (spec: NodeSpec[], keepFloat: string[] = [], int64: Record<string, number[]> = { s: [1], e: [3] }) => {
      const g = new Graph(readModel(buildModel({ opset: 13, inputDims: [1, 1], output: 'y', initializers, int64, nodes: spec })));
      const report = await foldWeightChains(g, keepFloat);
      return { g, report };
    };
    for (const spec of [
      nodes({ op: 'Relu', inputs: ['W0'], output: 'W' }),  // computes
      nodes({ op: 'Slice', inputs: ['s', 's', 'e'], output: 'W' }),  // integer data
      [{ op: 'Shape', inputs: ['input'], output: 'shape' }, ...nodes({ op: 'Reshape', inputs: ['W0', 'shape'], output: 'W' })],  // computed shape
    ]) {
      const { report, g } = await unfolded(spec);
      expect(report.changed, spec[0].op).to.deep.equal([]);
      expect(g.graph.node.map((n) => n.opType)).to.deep.equal(spec.map((n) => n.op));
    }
    expect((await unfolded(nodes({ op: 'Slice', inputs: ['W0', 's', 'e'], output: 'W' }), ['layer'])).report.changed).to.deep.equal([]);
    expect((await unfolded(nodes({ op: 'Slice', inputs: ['W0', 's', 'e'], output: 'W' }), ['Gemm'])).report.changed).to.deep.equal([]);
    // The Slice's output is also read by a Relu: the Slice stays (and W0 with it), the Gemm reads the folded copy.
    const shared = await unfolded([{ op: 'Slice', inputs: ['W0', 's', 'e'], output: 'W' }, { op: 'Gemm', inputs: ['input', 'W'], output: 'g', name: 'layer', attrs: { transB: 1 } },
      { op: 'Relu', inputs: ['W'], output: 'r' }, { op: 'MatMul', inputs: ['g', 'r'], output: 'y' }]);
    expect(shared.report.changed).to.have.length(1);
    expect(shared.g.graph.node.map((n) => n.opType)).to.deep.equal(['Slice', 'Gemm', 'Relu', 'MatMul']);
    expect(shared.g.graph.node[1].input[1]).to.equal('W_folded');
    expect(shared.g.graph.initializer.map((t) => t.name)).to.include.members(['W0', 'W_folded']);
  });

  it('an LSTM cell applied in two bodies, each reordering the same W and R (as PyTorch exports LSTMCell): one folded constant per weight, one DequantizeLinear; the model computes what it did', async () => {
    const [T, D, H] = [5, 8, 6];
    const r = rng(3);
    const tensor = (name: string, dims: number[]) => ({
      name, dataType: TensorProto_DataType.FLOAT, dims: dims.map(BigInt), rawData: new Uint8Array(Float32Array.from({ length: dims.reduce((a, b) => a * b, 1) }, () => r() - 0.5).buffer),
    });
    const ints = (name: string, v: number[]) => ({ name, dataType: TensorProto_DataType.INT64, dims: [BigInt(v.length)], rawData: new Uint8Array(BigInt64Array.from(v.map(BigInt)).buffer) });
    // In each body: W = Unsqueeze(Concat(W0[0:H], W0[3H:4H], W0[H:3H]), 0), R likewise (PyTorch's i, f, g, o gates to ONNX's i, o, f, c).
    const node = (opType: string, input: string[], output: string, attrs: Record<string, number> = {}): Partial<NodeProto> => ({
      opType, input, output: [output], name: output, attribute: Object.entries(attrs).map(([k, v]) => ({ name: k, type: AttributeProto_AttributeType.INT, i: BigInt(v) })) as never,
    });
    const reorder = (p: string, w: string) => [
      node('Slice', [w, 'z', 'h1', 'z'], `${p}_${w}_a`), node('Slice', [w, 'h3', 'h4', 'z'], `${p}_${w}_b`), node('Slice', [w, 'h1', 'h3', 'z'], `${p}_${w}_c`),
      node('Concat', [`${p}_${w}_a`, `${p}_${w}_b`, `${p}_${w}_c`], `${p}_${w}_cat`, { axis: 0 }), node('Unsqueeze', [`${p}_${w}_cat`, 'z'], `${p}_${w}`),
    ];
    const body = (p: string, x: string, out: string) => ({
      name: p, output: [info(out)], initializer: [],
      node: [...reorder(p, 'W0'), ...reorder(p, 'R0'), { ...node('LSTM', [x, `${p}_W0`, `${p}_R0`], `${p}_y`, { hidden_size: H }) }, node('Squeeze', [`${p}_y`, 'one'], out)],
    });
    const ifNode = (name: string, x: string, out: string) => ({
      opType: 'If', name, input: ['flag'], output: [out], attribute: [
        { name: 'then_branch', type: AttributeProto_AttributeType.GRAPH, g: body(`${name}_then`, x, `${name}_t`) },
        { name: 'else_branch', type: AttributeProto_AttributeType.GRAPH, g: body(`${name}_else`, x, `${name}_e`) },
      ],
    });
    const bytes = toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 17n }],
      graph: {
        name: 'cell twice', input: [info('x', TensorProto_DataType.FLOAT, [T, 1, D]), info('flag', TensorProto_DataType.BOOL, [])], output: [info('y')],
        initializer: [tensor('W0', [4 * H, D]), tensor('R0', [4 * H, H]), ints('z', [0]), ints('one', [1]), ints('h1', [H]), ints('h3', [3 * H]), ints('h4', [4 * H]), tensor('P', [H, D])],
        node: [ifNode('first', 'x', 'h'), { opType: 'MatMul', name: 'proj', input: ['h', 'P'], output: ['p'] }, { opType: 'Unsqueeze', name: 'back', input: ['p', 'z'], output: ['p0'] }, { opType: 'Squeeze', name: 'again', input: ['p0', 'z'], output: ['p1'] },
          ifNode('second', 'p1', 'y')],
      },
    } as never));
    const g = new Graph(readModel(bytes));
    const report = await foldWeightChains(g);
    expect(report.changed).to.have.length(8);  // W and R of 4 LSTMs
    // Two folded constants (W and R, identical in every body), in the main graph beside W0 and R0, which went.
    expect(g.graph.initializer.map((t) => t.name).filter((n) => n.endsWith('_folded'))).to.have.length(2);
    expect(g.graph.initializer.map((t) => t.name)).to.not.include.members(['W0', 'R0']);
    expect(allNodes(g).map(({ node: n }) => n.opType).filter((op) => ['Slice', 'Concat', 'Unsqueeze'].includes(op))).to.deep.equal(['Unsqueeze']);  // 'back' stays
    const O = ort();
    const x = normalFeeds(1, [T, 1, D], 2)[0].x;
    const outputs = async (m: Uint8Array) => {
      const s = await O.InferenceSession.create(m, { graphOptimizationLevel: 'disabled' });
      const out: number[][] = [];
      for (const flag of [1, 0]) out.push(Array.from((await s.run({ x: new O.Tensor('float32', x.data, x.dims), flag: new O.Tensor('bool', Uint8Array.of(flag), []) })).y.data as Float32Array));
      await s.release();
      return out;
    };
    // (onnxruntime may take another LSTM kernel path for constant weights: equal to float rounding.)
    const [got, want] = [await outputs(serializeModel(g.model)), await outputs(bytes)];
    got.forEach((o, k) => o.forEach((v, i) => expect(v).to.be.closeTo(want[k][i], 1e-6)));
    // Quantized: W and R once each (their DequantizeLinear in the main graph, read by the four LSTMs), and the layer.
    const evaluationFeeds = [1, 0].map((flag) => ({ x, flag: { data: Uint8Array.of(flag), dims: [] } }));
    const q = await quantizeModel(bytes, { weights: { bits: 8 }, evaluationFeeds });
    expect(q.report.passes.find((p) => p.pass === 'fold-weight-chains')!.changed).to.have.length(8);
    expect(q.report.layers.map((l) => [l.op, l.subgraph, l.branch])).to.deep.equal([['MatMul', undefined, undefined],
      ['LSTM', 'first', 'then_branch'], ['LSTM', 'first', 'else_branch'], ['LSTM', 'second', 'then_branch'], ['LSTM', 'second', 'else_branch']]);
    const qm = readModel(q.model);
    expect(qm.graph!.node.filter((n) => n.opType === 'DequantizeLinear')).to.have.length(3);
    expect(allNodes(new Graph(qm)).filter(({ node: n }) => n.opType === 'DequantizeLinear')).to.have.length(3);
    expect(q.report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.999);
    for (const l of q.report.layers) expect(l.outputSqnrDb, l.node).to.be.greaterThan(30);
    // inspect sees the folded weights: the LSTMs' W and R are listed as quantized.
    const stats = await inspectModel(bytes);
    expect(stats.layers.filter((l) => l.op === 'LSTM').map((l) => [l.shape, l.quantized])).to.deep.equal(Array.from({ length: 4 }, () => [[[1, 4 * H, D], true], [[1, 4 * H, H], true]]).flat());
  });
});
