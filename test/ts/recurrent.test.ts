// LSTM, GRU and RNN weights (W and R) quantized through DequantizeLinear, or as DynamicQuantizeLSTM: passes/quantize-recurrent.
import { create, toBinary } from '@bufbuild/protobuf';
import { expect } from 'chai';
import { AttributeProto_AttributeType, ModelProtoSchema, NodeProtoSchema, TensorProto_DataType, type ModelProto } from 'onnx-buf';

import { ort } from '../../ts/bench/ort-models';
import { dimsOf, floatData, Graph, intAttribute, makeIntAttribute } from '../../ts/onnx/graph';
import { fromFloat16Array, toFloat16Array } from '../../ts/float16';
import { inspectModel } from '../../ts/onnx/inspect';
import { readModel, serializeModel } from '../../ts/onnx/model-io';
import { quantizeModel } from '../../ts/onnx/quantize-model';
import { quantizeTensor } from '../../ts/quantize';
import { unpackInt4 } from '../../ts/pack';
import { buildModel, valueInfo as info } from '../helpers/onnx-builder';
import { normalFeeds, rng } from '../helpers/random';

const [T, D, H] = [6, 24, 16];
const GATES = { LSTM: 4, GRU: 3, RNN: 1 } as const;

function values(dims: number[], scale: number, seed: number): { dims: number[]; data: Float32Array } {
  const r = rng(seed);
  return { dims, data: Float32Array.from({ length: dims.reduce((a, b) => a * b, 1) }, () => (r() - 0.5) * scale) };
}

/** input [T, 1, D] → op (hidden H, `directions`) → Y [T, directions, 1, H]. */
function recurrentModel(op: keyof typeof GATES, directions = 1, opset = 14): Uint8Array {
  const g = GATES[op];
  return buildModel({
    opset, inputDims: [T, 1, D], output: 'y',
    initializers: { W: values([directions, g * H, D], 0.6, 1), R: values([directions, g * H, H], 0.6, 2), B: values([directions, 2 * g * H], 0.2, 3) },
    nodes: [{ op, inputs: ['input', 'W', 'R', 'B'], output: 'y', name: 'recurrent', attrs: { hidden_size: H, ...(directions === 2 ? { direction: 'bidirectional' } : {}) } }],
  });
}

async function run(model: Uint8Array | ModelProto, feeds: Array<{ data: Float32Array; dims: number[] }>): Promise<Float32Array[]> {
  const O = ort();
  const session = await O.InferenceSession.create(model instanceof Uint8Array ? model : serializeModel(model), { graphOptimizationLevel: 'disabled' });
  const out: Float32Array[] = [];
  for (const x of feeds) out.push((await session.run({ [session.inputNames[0]]: new O.Tensor('float32', x.data, x.dims) }))[session.outputNames[0]].data as Float32Array);
  await session.release();
  return out;
}

/** The model with each DequantizeLinear's output computed in float and stored as a constant: what the QDQ model should compute. */
function withDequantizedConstants(model: Uint8Array): ModelProto {
  const m = readModel(model);
  const g = new Graph(m);
  for (const dq of m.graph!.node.filter((n) => n.opType === 'DequantizeLinear')) {
    const [values, scale] = dq.input.map((n) => g.constant(n)!);
    const dims = values.dims.map(Number);
    const q = values.dataType === TensorProto_DataType.INT8 ? Int8Array.from(new Int8Array(values.rawData.buffer, values.rawData.byteOffset, values.rawData.length))
      : unpackInt4(values.rawData, dims.reduce((a, b) => a * b, 1));
    const s = floatData(scale)!;
    const axis = intAttribute(dq, 'axis', 1);
    const block = intAttribute(dq, 'block_size', 0);
    const inner = dims.slice(axis + 1).reduce((a, b) => a * b, 1);
    const out = Float32Array.from(q, (v, i) => {
      if (s.length === 1) return v * s[0];
      if (block === 0) return v * s[Math.floor(i / inner) % dims[axis]];
      const row = Math.floor(i / dims[2]);
      return v * s[row * Math.ceil(dims[2] / block) + Math.floor((i % dims[2]) / block)];
    });
    const reader = m.graph!.node.find((n) => n.input.includes(dq.output[0]))!;
    const name = `${dq.output[0]}_folded`;
    m.graph!.initializer.push({ ...values, name, dataType: TensorProto_DataType.FLOAT, rawData: new Uint8Array(out.buffer) } as never);
    reader.input[reader.input.indexOf(dq.output[0])] = name;
  }
  const dqInputs = new Set(m.graph!.node.filter((n) => n.opType === 'DequantizeLinear').flatMap((n) => n.input));
  m.graph!.node = m.graph!.node.filter((n) => n.opType !== 'DequantizeLinear');
  m.graph!.initializer = m.graph!.initializer.filter((t) => !dqInputs.has(t.name));
  return m;
}

describe('recurrent weights (LSTM, GRU, RNN)', () => {
  const feeds = normalFeeds(3, [T, 1, D], 7).map((f) => f.x);

  for (const op of ['LSTM', 'GRU', 'RNN'] as const) {
    it(`${op}: W and R become int8 per gate row (axis 1), exactly quantizeTensor's values, and onnxruntime computes what the dequantized weights give`, async () => {
      const bytes = recurrentModel(op);
      const { model, report } = await quantizeModel(bytes, { weights: { bits: 8 } });
      const g = GATES[op];
      expect(report.layers).to.have.length(1);
      const [layer] = report.layers;
      expect(layer).to.include({ node: 'recurrent', op, weight: 'W', bits: 8, granularity: 'channel on axis 1', method: 'minmax', output: 'y' });
      expect(layer.shape).to.deep.equal([1, g * H, D]);
      expect(layer.recurrentWeight).to.include({ weight: 'R' });
      expect(layer.recurrentWeight!.shape).to.deep.equal([1, g * H, H]);
      expect(layer.weightSqnrDb).to.be.within(35, 60);
      expect(layer.outputSqnrDb).to.be.greaterThan(30);
      const q = readModel(model);
      const node = q.graph!.node.find((n) => n.opType === op)!;
      const graph = new Graph(q);
      for (const [slot, name, seed] of [[1, 'W', 1], [2, 'R', 2]] as const) {
        const dq = graph.producer(node.input[slot])!;
        expect(dq.opType).to.equal('DequantizeLinear');
        expect(intAttribute(dq, 'axis', 1)).to.equal(1);
        const [v, s] = dq.input.map((n) => graph.constant(n)!);
        const original = values(slot === 1 ? [1, g * H, D] : [1, g * H, H], 0.6, seed);
        const want = quantizeTensor(original.data, { shape: original.dims, bits: 8, granularity: 'channel', axis: 1 });
        expect(v.dataType, name).to.equal(TensorProto_DataType.INT8);
        expect(Array.from(new Int8Array(v.rawData.buffer, v.rawData.byteOffset, v.rawData.length)), name).to.deep.equal(Array.from(want.values));
        expect(Array.from(floatData(s)!), name).to.deep.equal(Array.from(want.scale));
      }
      expect(q.graph!.initializer.map((t) => t.name)).to.not.include.members(['W', 'R']);  // the float weights left
      const [got, simulated, float] = [await run(model, feeds), await run(withDequantizedConstants(model), feeds), await run(bytes, feeds)];
      got.forEach((o, k) => o.forEach((v, i) => expect(v).to.be.closeTo(simulated[k][i], 1e-5)));
      expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.999);
      // …and close to the float model's.
      float.forEach((o, k) => o.forEach((v, i) => expect(got[k][i]).to.be.closeTo(v, 0.05)));
    });
  }

  it('bidirectional LSTM, 4-bit blocks: int4 along each gate row (axis 2, a short last block), opset 21; per tensor: one scale', async () => {
    const bytes = recurrentModel('LSTM', 2, 9);
    const { model, report } = await quantizeModel(bytes, { weights: { bits: 4, granularity: 'block', blockSize: 16 } });
    expect(report.opset).to.deep.equal({ from: 9, to: 21 });
    expect(report.layers[0]).to.include({ granularity: 'block 16 on axis 2', bits: 4 });
    const q = readModel(model);
    const graph = new Graph(q);
    const dq = graph.producer(q.graph!.node.find((n) => n.opType === 'LSTM')!.input[1])!;
    expect([intAttribute(dq, 'axis', 1), intAttribute(dq, 'block_size', 0)]).to.deep.equal([2, 16]);
    expect(graph.constant(dq.input[0])!.dataType).to.equal(TensorProto_DataType.INT4);
    expect(graph.constant(dq.input[1])!.dims.map(Number)).to.deep.equal([2, 4 * H, Math.ceil(D / 16)]);  // 24 inputs: a block of 16 and one of 8
    const [got, simulated] = [await run(model, feeds), await run(withDequantizedConstants(model), feeds)];
    got.forEach((o, k) => o.forEach((v, i) => expect(v).to.be.closeTo(simulated[k][i], 1e-5)));
    expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.98);

    const tensor = await quantizeModel(bytes, { weights: { bits: 8, granularity: 'tensor' } });
    expect(tensor.report.layers[0].granularity).to.equal('tensor');
    const qt = readModel(tensor.model);
    const tg = new Graph(qt);
    const tdq = tg.producer(qt.graph!.node.find((n) => n.opType === 'LSTM')!.input[2])!;
    expect(tdq.attribute).to.have.length(0);
    const [tv, ts] = tdq.input.map((n) => tg.constant(n)!);
    expect(ts.dims).to.have.length(0);
    const R = values([2, 4 * H, H], 0.6, 2);
    const want = quantizeTensor(R.data, { shape: R.dims, bits: 8, granularity: 'tensor' });
    expect(Array.from(new Int8Array(tv.rawData.buffer, tv.rawData.byteOffset, tv.rawData.length))).to.deep.equal(Array.from(want.values));
    expect(floatData(ts)![0]).to.equal(want.scale[0]);
  });

  it('W and R given by Constant nodes (whose tensors are unnamed): quantized, their constants named after the values the node reads', async () => {
    const m = readModel(recurrentModel('RNN'));
    for (const name of ['W', 'R']) {
      const i = m.graph!.initializer.findIndex((t) => t.name === name);
      const [t] = m.graph!.initializer.splice(i, 1);
      m.graph!.node.unshift(create(NodeProtoSchema, { opType: 'Constant', name: `${name}_constant`, output: [name],
        attribute: [{ name: 'value', type: AttributeProto_AttributeType.TENSOR, t: { ...t, name: '' } }] } as never));
    }
    const { model, report } = await quantizeModel(serializeModel(m), { weights: { bits: 8 }, evaluationFeeds: feeds.map((x) => ({ input: x })) });
    expect(report.layers.map((l) => [l.op, l.weight, l.recurrentWeight!.weight])).to.deep.equal([['RNN', 'W', 'R']]);
    const q = readModel(model);
    expect(q.graph!.initializer.map((t) => t.name)).to.deep.equal(['B', 'W_quantized', 'W_scale', 'R_quantized', 'R_scale']);
    expect(q.graph!.node.filter((n) => n.opType === 'Constant')).to.have.length(0);
    expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.999);
  });

  it('W long enough for blocks and R not: each is reported with its own granularity', async () => {
    const bytes = buildModel({
      opset: 14, inputDims: [T, 1, 64], output: 'y',
      initializers: { W: values([1, 4 * H, 64], 0.6, 1), R: values([1, 4 * H, H], 0.6, 2) },
      nodes: [{ op: 'LSTM', inputs: ['input', 'W', 'R'], output: 'y', name: 'lstm', attrs: { hidden_size: H } }],
    });
    const { report } = await quantizeModel(bytes, { weights: { bits: 4, granularity: 'block', blockSize: 32 }, evaluationFeeds: [] });
    expect(report.layers[0].granularity).to.equal('block 32 on axis 2');
    expect(report.layers[0].recurrentWeight!.granularity).to.equal('channel on axis 1');  // 16 columns: shorter than a block
    expect(report.passes.find((p) => p.pass === 'quantize-recurrent')!.changed).to.deep.equal(['lstm: 4-bit W (block 32 on axis 2) and R (channel on axis 1)']);
  });

  it('W and R held by a branch: their DequantizeLinear goes first in the branch, the float weights leave it', async () => {
    const tensor = (name: string, t: { dims: number[]; data: Float32Array }) => ({ name, dataType: TensorProto_DataType.FLOAT, dims: t.dims.map(BigInt), rawData: new Uint8Array(t.data.buffer.slice(0)) });
    const hidden = [{ name: 'hidden_size', type: AttributeProto_AttributeType.INT, i: BigInt(H) }];
    const bytes = toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 17n }],
      graph: {
        name: 'branch weights', input: [info('x', TensorProto_DataType.FLOAT, [T, 1, D]), info('flag', TensorProto_DataType.BOOL, [])], output: [info('y')],
        node: [{ opType: 'If', name: 'if', input: ['flag'], output: ['y'], attribute: [
          { name: 'then_branch', type: AttributeProto_AttributeType.GRAPH, g: {
            name: 'then', output: [info('t')], initializer: [tensor('W', values([1, 4 * H, D], 0.6, 1)), tensor('R', values([1, 4 * H, H], 0.6, 2))],
            node: [{ opType: 'Relu', name: 'relu', input: ['x'], output: ['xr'] }, { opType: 'LSTM', name: 'lstm', input: ['xr', 'W', 'R'], output: ['t'], attribute: hidden }] } },
          { name: 'else_branch', type: AttributeProto_AttributeType.GRAPH, g: { name: 'else', output: [info('e')], node: [{ opType: 'Neg', name: 'neg', input: ['x'], output: ['e'] }] } },
        ] }],
      },
    } as never));
    const x = feeds[0];
    const { model, report } = await quantizeModel(bytes, { weights: { bits: 8 }, evaluationFeeds: [{ x, flag: { data: Uint8Array.of(1), dims: [] } }] });
    const then = readModel(model).graph!.node[0].attribute.find((a) => a.name === 'then_branch')!.g!;
    expect(then.node.map((n) => n.opType)).to.deep.equal(['DequantizeLinear', 'DequantizeLinear', 'Relu', 'LSTM']);
    expect(then.initializer.map((t) => t.name)).to.deep.equal(['W_quantized', 'W_scale', 'R_quantized', 'R_scale']);
    expect(report.layers.map((l) => [l.node, l.subgraph, l.branch])).to.deep.equal([['lstm', 'if', 'then_branch']]);
    expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.999);
  });

  it('keepFloat keeps them (by name or op type, a misspelling named); the options for Conv/Gemm/MatMul layers and quantized activations are said not to apply', async () => {
    const bytes = recurrentModel('GRU');
    await expectRejected(quantizeModel(bytes, { weights: { bits: 8 }, keepFloat: ['GRU'] }), /No Conv, Gemm, MatMul, LSTM, GRU or RNN layer with constant float weights was found/);
    const typo = await quantizeModel(buildModel({
      opset: 14, inputDims: [T, 1, D], output: 'z',
      initializers: { W: values([1, 3 * H, D], 0.6, 1), R: values([1, 3 * H, H], 0.6, 2), M: values([H, 4], 0.5, 4) },
      nodes: [{ op: 'GRU', inputs: ['input', 'W', 'R'], output: 'y', name: 'gru', attrs: { hidden_size: H } }, { op: 'MatMul', inputs: ['y', 'M'], output: 'z', name: 'head' }],
    }), { weights: { bits: 8, biasCorrection: true }, keepFloat: ['GRUs'] });
    expect(typo.report.passes.flatMap((p) => p.skipped)).to.deep.include.members([
      { node: 'GRUs', reason: "keepFloat: no Conv, Gemm, MatMul, LSTM, GRU or RNN layer of this model has this name or op type (did you mean 'gru'?); it keeps nothing" },
      { node: 'gru', reason: 'weights.biasCorrection: for Conv, Gemm and MatMul layers; its W and R take weights.bits, granularity and method alone' },
    ]);
    expect(typo.report.layers.map((l) => [l.node, l.op])).to.deep.equal([['head', 'MatMul'], ['gru', 'GRU']]);
    const kept = await quantizeModel(buildModel({
      opset: 14, inputDims: [T, 1, D], output: 'z',
      initializers: { W: values([1, 3 * H, D], 0.6, 1), R: values([1, 3 * H, H], 0.6, 2), M: values([H, 4], 0.5, 4) },
      nodes: [{ op: 'GRU', inputs: ['input', 'W', 'R'], output: 'y', name: 'gru', attrs: { hidden_size: H } }, { op: 'MatMul', inputs: ['y', 'M'], output: 'z', name: 'head' }],
    }), { weights: { bits: 8 }, keepFloat: ['gru'], activations: { bits: 8, method: 'minmax' }, calibration: normalFeeds(2, [T, 1, D], 3, 'input') });
    expect(kept.report.layers.map((l) => l.node)).to.deep.equal(['head']);
    expect(kept.report.passes.flatMap((p) => p.skipped)).to.deep.include({ node: 'gru', reason: 'kept in float (keepFloat)' });
    const calibrated = await quantizeModel(bytes, { weights: { bits: 8 }, activations: { bits: 8, method: 'minmax' }, calibration: normalFeeds(2, [T, 1, D], 3, 'input') });
    expect(calibrated.report.passes.flatMap((p) => p.skipped)).to.deep.include({ node: 'recurrent', reason: 'its inputs and states stay float (activations are quantized for Conv, Gemm and MatMul)' });
  });

  it('float16 W and R get float16 scales (opset 19), their codes rounded against them', async () => {
    const m = readModel(recurrentModel('GRU'));
    const g = new Graph(m);
    const halves = new Map<string, Float32Array>();
    for (const name of ['W', 'R']) {
      const t = g.constant(name)!;
      const h = toFloat16Array(floatData(t)!);
      halves.set(name, fromFloat16Array(h));
      Object.assign(t, { dataType: TensorProto_DataType.FLOAT16, rawData: new Uint8Array(h.buffer) });
    }
    // (onnxruntime's CPU GRU takes float32 only: the structure is checked, not run.)
    const { model, report } = await quantizeModel(serializeModel(m), { weights: { bits: 8 }, evaluationFeeds: [] });
    expect(report.opset).to.deep.equal({ from: 14, to: 19 });
    const q = readModel(model);
    const qg = new Graph(q);
    const gru = q.graph!.node.find((n) => n.opType === 'GRU')!;
    for (const [slot, name] of [[1, 'W'], [2, 'R']] as const) {
      const [v, scale] = qg.producer(gru.input[slot])!.input.map((n) => qg.constant(n)!);
      expect(scale.dataType, name).to.equal(TensorProto_DataType.FLOAT16);
      const scales = fromFloat16Array(new Uint16Array(scale.rawData.slice().buffer));
      const data = halves.get(name)!;
      const dims = dimsOf(v);
      const want = quantizeTensor(data, { shape: dims, bits: 8, granularity: 'channel', axis: 1, scale: scales });
      expect(Array.from(new Int8Array(v.rawData.buffer, v.rawData.byteOffset, v.rawData.length)), name).to.deep.equal(Array.from(want.values));
    }
  });

  for (const [directions, granularity] of [[1, 'channel'], [2, 'channel'], [2, 'tensor']] as const) {
    it(`dynamic activations: an LSTM (${directions} direction${directions > 1 ? 's' : ''}, per ${granularity}) becomes DynamicQuantizeLSTM with int8 W and R transposed, per direction, and stays close to float`, async () => {
      const h0 = values([directions, 1, H], 1, 9);
      const bytes = buildModel({
        opset: 14, inputDims: [T, 1, D], output: 'y',
        initializers: { W: values([directions, 4 * H, D], 0.6, 1), R: values([directions, 4 * H, H], 0.6, 2), B: values([directions, 8 * H], 0.2, 3), h0 },
        nodes: [{ op: 'LSTM', inputs: ['input', 'W', 'R', 'B', '', 'h0'], output: 'y', name: 'lstm', attrs: { hidden_size: H, ...(directions === 2 ? { direction: 'bidirectional' } : {}) } }],
      });
      const { model, report } = await quantizeModel(bytes, { weights: { bits: 8, granularity }, activations: { bits: 8, method: 'dynamic' }, evaluationFeeds: feeds.map((x) => ({ input: x })) });
      const q = readModel(model);
      const graph = new Graph(q);
      const [node] = q.graph!.node;
      expect([node.opType, node.domain, q.graph!.node.length]).to.deep.equal(['DynamicQuantizeLSTM', 'com.microsoft', 1]);
      expect(node.input.slice(3, 8)).to.deep.equal(['B', '', 'h0', '', '']);
      expect(report.layers[0]).to.deep.include({ op: 'LSTM', granularity: granularity === 'channel' ? 'channel on axis 1 per direction' : 'tensor per direction', input: { bits: 8, dynamic: true } });
      for (const [slot, scaleSlot, k, seed] of [[1, 8, D, 1], [2, 10, H, 2]] as const) {
        const [v, scale, zero] = [node.input[slot], node.input[scaleSlot], node.input[scaleSlot + 1]].map((n) => graph.constant(n)!);
        const original = values([directions, 4 * H, k], 0.6, seed);
        const want = quantizeTensor(original.data, { shape: granularity === 'tensor' ? [directions, 4 * H * k] : [directions * 4 * H, k], bits: 8, granularity: 'channel', axis: 0 });
        expect(dimsOf(v)).to.deep.equal([directions, k, 4 * H]);
        const codes = new Int8Array(v.rawData.buffer, v.rawData.byteOffset, v.rawData.length);
        // Stored [direction, k, row]: the code of row r, column c is want's [direction·4H + r, c].
        for (let d = 0; d < directions; d++) {
          for (const [r, c] of [[0, 0], [4 * H - 1, k - 1], [7, 3], [2 * H, k - 2]]) expect(codes[(d * k + c) * 4 * H + r]).to.equal(want.values[(d * 4 * H + r) * k + c]);
        }
        expect(Array.from(codes).sort()).to.deep.equal(Array.from(want.values).sort());
        expect(Array.from(floatData(scale)!)).to.deep.equal(Array.from(want.scale));
        expect(dimsOf(scale)).to.deep.equal(granularity === 'tensor' ? [directions] : [directions, 4 * H]);
        expect([zero.dataType, dimsOf(zero), Array.from(zero.rawData).every((b) => b === 0)]).to.deep.equal([TensorProto_DataType.INT8, dimsOf(scale), true]);
      }
      expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.9995);
      expect(report.layers[0].outputSqnrDb).to.be.greaterThan(30);
    });
  }

  it('dynamic activations leave GRU, RNN and batch-first LSTMs in the DequantizeLinear form and say why', async () => {
    const skippedOf = async (bytes: Uint8Array, weights: { bits: 8 }) => {
      const { report, model } = await quantizeModel(bytes, { weights, activations: { bits: 8, method: 'dynamic' }, evaluationFeeds: [] });
      return { ops: readModel(model).graph!.node.map((n) => n.opType).sort(), skipped: report.passes.flatMap((p) => p.skipped).filter((x) => x.node === 'recurrent').map((x) => x.reason) };
    };
    expect(await skippedOf(recurrentModel('GRU'), { bits: 8 })).to.deep.equal({
      ops: ['DequantizeLinear', 'DequantizeLinear', 'GRU'], skipped: ['dynamic activations: onnxruntime has no dynamically quantized GRU; weights only (DequantizeLinear)'] });
    expect((await skippedOf(recurrentModel('RNN'), { bits: 8 })).skipped).to.deep.equal(['dynamic activations: onnxruntime has no dynamically quantized RNN; weights only (DequantizeLinear)']);
    const batchFirst = readModel(recurrentModel('LSTM'));
    batchFirst.graph!.node[0].attribute.push(makeIntAttribute('layout', 1));
    expect((await skippedOf(serializeModel(batchFirst), { bits: 8 })).skipped).to.deep.equal(
      ['dynamic activations: its layout is 1 (batch first), which DynamicQuantizeLSTM does not take; weights only (DequantizeLinear)']);
  });

  it('a computed or already quantized W is named as the reason nothing is quantized; inspect lists W and R of each recurrent node', async () => {
    const bytes = buildModel({
      opset: 14, inputDims: [T, 1, D], output: 'y',
      initializers: { W0: values([4 * H, D], 0.6, 1), R: values([1, 4 * H, H], 0.6, 2) },
      int64: { zero: [0] },
      nodes: [{ op: 'Unsqueeze', inputs: ['W0', 'zero'], output: 'W' }, { op: 'Relu', inputs: ['W'], output: 'Wr' },
        { op: 'LSTM', inputs: ['input', 'Wr', 'R'], output: 'y', name: 'lstm', attrs: { hidden_size: H } }],
    });
    const computed = 'its W is computed when the model runs (not from constants that lowbit folds: see the fold-weight-chains pass); store it as an initializer to quantize it';
    await expectRejected(quantizeModel(bytes, { weights: { bits: 8 } }), new RegExp(`LSTM 'lstm': ${computed.replace(/[()]/g, '\\$&')}`));
    const stats = await inspectModel(recurrentModel('LSTM'));
    expect(stats.layers.map((l) => [l.node, l.weight, l.op, l.shape, l.quantized])).to.deep.equal([['recurrent', 'W', 'LSTM', [1, 4 * H, D], true], ['recurrent', 'R', 'LSTM', [1, 4 * H, H], true]]);
    expect((await inspectModel(bytes)).layers.map((l) => [l.node, l.weight, l.quantized, l.reason])).to.deep.equal([['lstm', 'W', false, computed], ['lstm', 'R', false, computed]]);
    // A W already quantized (read through a DequantizeLinear) is said to be.
    const quantizedW = buildModel({
      opset: 14, inputDims: [T, 1, D], output: 'y', initializers: { s: { dims: [], data: [0.01] }, R: values([1, 4 * H, H], 0.6, 2) },
      nodes: [{ op: 'Cast', inputs: ['R'], output: 'Rq', attrs: { to: TensorProto_DataType.INT8 } }, { op: 'DequantizeLinear', inputs: ['Rq', 's'], output: 'W' },
        { op: 'LSTM', inputs: ['input', 'W', 'R'], output: 'y', name: 'lstm', attrs: { hidden_size: H } }],
    });
    await expectRejected(quantizeModel(quantizedW, { weights: { bits: 8 } }), /LSTM 'lstm': its W is already quantized \(it comes from a DequantizeLinear\)/);
  });

  it('an LSTM inside both branches of an If, reading the main graph\'s W and R: quantized once, one DequantizeLinear each beside them, runs in onnxruntime', async () => {
    const W = values([1, 4 * H, D], 0.6, 1);
    const R = values([1, 4 * H, H], 0.6, 2);
    const tensor = (name: string, t: { dims: number[]; data: Float32Array }) => ({ name, dataType: TensorProto_DataType.FLOAT, dims: t.dims.map(BigInt), rawData: new Uint8Array(t.data.buffer.slice(0)) });
    const lstm = (name: string, out: string) => ({ opType: 'LSTM', name, input: ['x', 'W', 'R'], output: [out], attribute: [{ name: 'hidden_size', type: AttributeProto_AttributeType.INT, i: BigInt(H) }] });
    const bytes = toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 17n }],
      graph: {
        name: 'branches', input: [info('x', TensorProto_DataType.FLOAT, [T, 1, D]), info('flag', TensorProto_DataType.BOOL, [])], output: [info('y')],
        initializer: [tensor('W', W), tensor('R', R)],
        node: [{ opType: 'If', name: 'if', input: ['flag'], output: ['y'], attribute: [
          { name: 'then_branch', type: AttributeProto_AttributeType.GRAPH, g: { name: 'then', output: [info('t')], node: [lstm('lstm_then', 't')] } },
          { name: 'else_branch', type: AttributeProto_AttributeType.GRAPH, g: { name: 'else', output: [info('e')], node: [lstm('lstm_else', 'e')] } },
        ] }],
      },
    } as never));
    const x = feeds[0];
    const evaluationFeeds = [1, 0].map((flag) => ({ x, flag: { data: Uint8Array.of(flag), dims: [] } }));
    const { model, report } = await quantizeModel(bytes, { weights: { bits: 8 }, evaluationFeeds });
    expect(report.layers.map((l) => [l.node, l.subgraph, l.branch, typeof l.outputSqnrDb])).to.deep.equal([
      ['lstm_then', 'if', 'then_branch', 'number'], ['lstm_else', 'if', 'else_branch', 'number']]);
    expect(report.layers[1].weightSqnrDb).to.equal(report.layers[0].weightSqnrDb);
    expect(report.passes.flatMap((p) => p.skipped)).to.deep.include({ node: 'if', reason: 'If has subgraphs: the weights of their recurrent (LSTM, GRU, RNN) layers are quantized, the rest stays in float' });
    // One DequantizeLinear per weight, beside it in the main graph; the branches read its output.
    const q = readModel(model);
    expect(q.graph!.node.map((n) => n.opType).sort()).to.deep.equal(['DequantizeLinear', 'DequantizeLinear', 'If']);
    expect(q.graph!.initializer.map((t) => [t.name, t.dataType])).to.deep.equal([['W_quantized', TensorProto_DataType.INT8], ['W_scale', TensorProto_DataType.FLOAT],
      ['R_quantized', TensorProto_DataType.INT8], ['R_scale', TensorProto_DataType.FLOAT]]);
    for (const b of q.graph!.node.find((n) => n.opType === 'If')!.attribute.map((a) => a.g!)) {
      expect(b.node.map((n) => [n.opType, ...n.input])).to.deep.equal([['LSTM', 'x', 'W_dequantized', 'R_dequantized']]);
      expect(b.initializer).to.have.length(0);
    }
    expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.999);
    // The outputs of both branches against the float model's, in onnxruntime.
    const O = ort();
    const outputs = async (m: Uint8Array) => {
      const session = await O.InferenceSession.create(m);
      const out: Float32Array[] = [];
      for (const f of evaluationFeeds) out.push((await session.run({ x: new O.Tensor('float32', x.data, x.dims), flag: new O.Tensor('bool', f.flag.data, []) })).y.data as Float32Array);
      await session.release();
      return out;
    };
    const [want, got] = [await outputs(bytes), await outputs(model)];
    got.forEach((o, k) => o.forEach((v, i) => expect(v).to.be.closeTo(want[k][i], 0.05)));
  });
});

async function expectRejected(p: Promise<unknown>, pattern: RegExp): Promise<void> {
  let error: unknown;
  try {
    await p;
  } catch (e) {
    error = e;
  }
  expect(error, 'rejected').to.be.instanceOf(Error);
  expect((error as Error).message).to.match(pattern);
}
