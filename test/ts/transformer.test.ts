// A tiny transformer (token ids, attention, LayerNorm, GELU) through quantizeModel at the opsets exporters write:
// every setting runs in onnxruntime, and the 4-bit ones convert the model to opset 21 (ReduceMean's axes move to
// an input at 18) without changing what it computes.
import { expect } from 'chai';
import { create, fromBinary, toBinary } from '@bufbuild/protobuf';
import { AttributeProto_AttributeType, ModelProtoSchema, NodeProtoSchema, TensorProto_DataType } from 'onnx-buf';

import { ort } from '../../ts/bench/ort-models';
import { inspectModel } from '../../ts/onnx/inspect';
import { readModel } from '../../ts/onnx/model-io';
import { quantizeModel, type QuantizeModelOptions } from '../../ts/onnx/quantize-model';
import { rng } from '../helpers/random';
import { cosine, valueInfo as value } from '../helpers/onnx-builder';
import { tinyTransformer, tokenFeed } from '../helpers/transformer';

const toOrt = (feed: ReturnType<typeof tokenFeed>) => ({ ids: new (ort().Tensor)('int64', feed.ids.data, feed.ids.dims) });

async function logits(model: Uint8Array, feed: ReturnType<typeof tokenFeed>): Promise<Float32Array> {
  const session = await ort().InferenceSession.create(model);
  try {
    return (await session.run(toOrt(feed))).logits.data as Float32Array;
  } finally {
    await session.release();
  }
}


describe('a tiny transformer (token ids, attention, LayerNorm, GELU)', () => {
  const calibration = [1, 2, 3, 4].map((s) => tokenFeed(s));
  const evaluationFeeds = [5, 6].map((s) => tokenFeed(s));
  const attentionProducts = ['block0.mixed', 'block0.scores', 'block1.mixed', 'block1.scores'];

  it('opset 14 (LayerNorm and GELU decomposed): W8, W8A8 static and dynamic keep the logits; attention products stay float, reported', async () => {
    const model = tinyTransformer(14);
    const settings: Array<[string, Partial<QuantizeModelOptions>, number]> = [
      ['W8', { weights: { bits: 8 } }, 0.9999],
      ['W8A8', { weights: { bits: 8 }, activations: { bits: 8 }, calibration }, 0.9995],
      ['W8A8 dynamic', { weights: { bits: 8 }, activations: { bits: 8, method: 'dynamic' } }, 0.9995],
    ];
    for (const [label, options, atLeast] of settings) {
      const { model: q, report } = await quantizeModel(model, { evaluationFeeds, ...options } as QuantizeModelOptions);
      expect(report.opset, label).to.deep.equal({ from: 14, to: 14 });
      expect(report.layers, label).to.have.length(13);  // 2 × (query, key, value, out, up, down) and the head
      const skipped = report.passes.find((p) => p.pass === 'quantize-weights')!.skipped;
      expect(skipped.map((s) => s.node).sort(), label).to.deep.equal(attentionProducts);
      expect(new Set(skipped.map((s) => s.reason)), label).to.deep.equal(new Set(['its weight is not a float constant (a computed input)']));
      expect(report.evaluation!.samples, label).to.equal(4);
      expect(report.evaluation!.outputs[0].cosine, label).to.be.greaterThan(atLeast);
      expect(cosine(await logits(q, tokenFeed(9)), await logits(model, tokenFeed(9))), label).to.be.greaterThan(atLeast);
    }
  });

  it('4-bit blocked weights convert opsets 14, 17 and 20 to 21 (ReduceMean axes as an input); at opset 14, GPTQ rounding beats nearest', async () => {
    for (const opset of [14, 17, 20]) {
      const model = tinyTransformer(opset);
      const weights = { bits: 4 as const, granularity: 'block' as const, blockSize: 32 };
      const nearest = await quantizeModel(model, { weights, evaluationFeeds });
      expect(nearest.report.opset, `opset ${opset}`).to.deep.equal({ from: opset, to: 21 });
      const graph = fromBinary(ModelProtoSchema, nearest.model).graph!;
      const reduceMeans = graph.node.filter((n) => n.opType === 'ReduceMean');
      expect(reduceMeans, `opset ${opset}`).to.have.length(opset < 17 ? 10 : 0);
      for (const n of reduceMeans) {
        expect(n.attribute.map((a) => a.name)).to.not.include('axes');
        expect(n.input).to.have.length(2);
      }
      // The first and last layers at 8 bits (firstLastLayerBits): the first block's query, key and value projections all
      // read the embedding (no layer before them), the head is last; the 9 others in 4-bit blocks of 32.
      expect(nearest.report.layers.map((l) => l.bits)).to.deep.equal([8, 8, 8, ...new Array(9).fill(4), 8]);
      const direct = cosine(await logits(nearest.model, tokenFeed(9)), await logits(model, tokenFeed(9)));
      expect(direct, `opset ${opset}`).to.be.greaterThan(0.98);
      expect(nearest.report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.98);
      if (opset !== 14) continue;
      // Options that work on whole output channels do nothing to blocked layers, and say so per layer.
      const perChannel = await quantizeModel(model, { weights: { ...weights, bitAllocation: { averageBits: 3 }, biasCorrection: true }, evaluationFeeds: [] });
      const skipped = perChannel.report.passes.find((p) => p.pass === 'quantize-weights')!.skipped.filter((s) => !attentionProducts.includes(s.node));
      expect(skipped.filter((s) => s.reason.startsWith('bitAllocation: its weights are quantized in blocks'))).to.have.length(9);  // not the first and last
      expect(skipped.filter((s) => s.reason.startsWith('biasCorrection: its weights are quantized in blocks'))).to.have.length(13);
      expect(skipped).to.have.length(22);
      const gptq = await quantizeModel(model, { weights: { ...weights, rounding: 'gptq' }, calibration, evaluationFeeds });
      expect(gptq.report.evaluation!.outputs[0].cosine).to.be.greaterThan(nearest.report.evaluation!.outputs[0].cosine);
      expect(gptq.report.layers.filter((l) => l.gptqUnderdetermined)).to.deep.equal([]);  // 128 token vectors, at most 128 inputs
      // One sequence (16 vectors) for layers of 32 and 128 inputs: every layer is reported.
      const few = await quantizeModel(model, { weights: { ...weights, rounding: 'gptq' }, calibration: [tokenFeed(1, 1)], evaluationFeeds: [] });
      expect(few.report.layers.map((l) => l.gptqUnderdetermined?.blockInputs)).to.deep.equal([32, 32, 32, 32, 32, 128, 32, 32, 32, 32, 32, 128, 32]);
      expect(new Set(few.report.layers.map((l) => l.gptqUnderdetermined?.inputVectors))).to.deep.equal(new Set([16]));
      expect(few.report.passes.find((p) => p.pass === 'quantize-weights')!.changed).to.include('block0.down: GPTQ rounding from 16 calibration input vectors ' +
        'for its 128 inputs; it may do worse than rounding to nearest on other data: calibrate on more');
    }
  });

  it('inspect lists the embedding table with its statistics, quantized only with weights.gather, and says when even that leaves it float', async () => {
    const model = tinyTransformer(14);
    const { layers } = await inspectModel(model);
    expect(layers.filter((l) => l.op !== 'Gather')).to.have.length(17);  // 13 weights and 4 attention products
    const [table] = layers.filter((l) => l.op === 'Gather');
    expect(table).to.include({ quantized: false, reason: 'an embedding table: quantized with weights.gather (CLI --gather)', nonFinite: 0 });
    expect(table.shape).to.deep.equal([64, 32]);
    expect(table.std).to.be.within(0.8, 1.2);  // drawn from N(0, 1)
    const { report } = await quantizeModel(model, { weights: { bits: 8, gather: true }, evaluationFeeds });
    expect(report.layers.map((l) => l.node)).to.include(table.node);
    // Gathering columns: quantize-gather leaves it, and inspect says why.
    const columns = fromBinary(ModelProtoSchema, model);
    columns.graph!.node.find((n) => n.opType === 'Gather')!.attribute[0].i = 1n;
    const [byColumn] = (await inspectModel(toBinary(ModelProtoSchema, columns))).layers.filter((l) => l.op === 'Gather');
    expect(byColumn.reason).to.equal("an embedding table, float even with weights.gather: it gathers along the table's columns, not its rows");
    // A table with a NaN: quantizeModel refuses it with weights.gather, and inspect says so.
    const withNaN = fromBinary(ModelProtoSchema, model);
    const embedding = withNaN.graph!.initializer.find((t) => t.name === 'embedding')!;
    new DataView(embedding.rawData.buffer, embedding.rawData.byteOffset).setFloat32(8, NaN, true);
    const [broken] = (await inspectModel(toBinary(ModelProtoSchema, withNaN))).layers.filter((l) => l.op === 'Gather');
    expect(broken).to.include({ nonFinite: 1, reason: '1 of its weights are NaN or ±Infinity: quantizeModel stops with an error with weights.gather unless the table is kept float (keepFloat)' });
  });

  it('an output projection tied to the embedding through a Transpose is quantized from a folded copy; the table stays for its Gather', async () => {
    const model = tinyTransformer(14);
    const tied = fromBinary(ModelProtoSchema, model);
    const head = tied.graph!.node.find((n) => n.output[0] === 'logits')!;
    const headWeight = head.input[1];
    // The model's own head weight becomes the embedding's transpose, so the float outputs change: compare against it.
    const embedding = tied.graph!.initializer.find((t) => t.name === 'embedding')!;
    tied.graph!.initializer = tied.graph!.initializer.filter((t) => t.name !== headWeight);
    head.input[1] = 'embedding_t';
    tied.graph!.node.splice(tied.graph!.node.indexOf(head), 0, create(NodeProtoSchema, {
      opType: 'Transpose', name: 'tie', input: ['embedding'], output: ['embedding_t'],
      attribute: [{ name: 'perm', type: AttributeProto_AttributeType.INTS, ints: [1n, 0n] }],
    }));
    const bytes = toBinary(ModelProtoSchema, tied);
    for (const gather of [false, true]) {
      const { model: q, report } = await quantizeModel(bytes, { weights: { bits: 8, gather }, evaluationFeeds });
      expect(report.passes.find((p) => p.pass === 'fold-weight-chains')!.changed).to.deep.equal([
        `${head.name}: its weight 'embedding_t' (Transpose of constants) folded into the constant 'embedding_t_folded' [32, 64]`]);
      expect(report.layers.map((l) => l.node)).to.include(head.name);
      expect(report.layers.find((l) => l.node === head.name)!.shape).to.deep.equal([32, 64]);
      expect(report.evaluation!.outputs[0].cosine, `gather ${gather}`).to.be.greaterThan(0.9995);
      expect(cosine(await logits(q, tokenFeed(9)), await logits(bytes, tokenFeed(9)))).to.be.greaterThan(0.9995);
      // The table stays for the Gather (float, or quantized with gather), and no float transposed copy is left.
      const out = fromBinary(ModelProtoSchema, q).graph!;
      expect(out.initializer.some((t) => t.name === 'embedding')).to.equal(!gather);
      expect(out.initializer.some((t) => t.name === 'embedding_t_folded')).to.equal(false);
      expect(out.node.some((n) => n.name === 'tie')).to.equal(false);
    }
    // A head kept float keeps its Transpose (a float copy would store the table twice).
    const keptHead = await quantizeModel(bytes, { weights: { bits: 8 }, keepFloat: [head.name], evaluationFeeds: [] });
    const keptFold = keptHead.report.passes.find((p) => p.pass === 'fold-weight-chains')!;
    expect([keptFold.changed, keptFold.skipped]).to.deep.equal([[], []]);
    expect(fromBinary(ModelProtoSchema, keptHead.model).graph!.node.some((n) => n.name === 'tie')).to.equal(true);
    expect(embedding.dims).to.deep.equal([64n, 32n]);
    const [inspected] = (await inspectModel(bytes)).layers.filter((l) => l.node === head.name);
    expect(inspected).to.include({ quantized: true });
    expect(inspected.shape).to.deep.equal([32, 64]);
  });

  it('a head inside an If branch reading a Transpose of a constant is quantized from a transposed copy (fold-weight-chains works inside bodies too)', async () => {
    const r = rng(12);
    const table = Float32Array.from({ length: 16 * 8 }, () => r() - 0.5);
    const bytes = toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 13n }],
      graph: {
        name: 'branch-head', input: [value('in', TensorProto_DataType.FLOAT, [1, 8]), value('flag', TensorProto_DataType.BOOL, [])], output: [value('y')],
        initializer: [
          { name: 'E', dataType: TensorProto_DataType.FLOAT, dims: [16n, 8n], rawData: new Uint8Array(table.buffer) },
          { name: 'I', dataType: TensorProto_DataType.FLOAT, dims: [8n, 8n], rawData: new Uint8Array(Float32Array.from({ length: 64 }, (_, i) => (i % 9 === 0 ? 1 : 0)).buffer) },
        ],
        // proj (an identity matrix: exact at 8 bits) gives the quantizer a main-graph layer.
        node: [{ opType: 'MatMul', name: 'proj', input: ['in', 'I'], output: ['x'] }, { opType: 'If', name: 'if', input: ['flag'], output: ['y'], attribute: [
          { name: 'then_branch', type: AttributeProto_AttributeType.GRAPH, g: { name: 'then', output: [value('t')], node: [
            { opType: 'Transpose', name: 'tie', input: ['E'], output: ['Et'], attribute: [{ name: 'perm', type: AttributeProto_AttributeType.INTS, ints: [1n, 0n] }] },
            { opType: 'MatMul', name: 'head', input: ['x', 'Et'], output: ['t'] },
          ] } },
          { name: 'else_branch', type: AttributeProto_AttributeType.GRAPH, g: { name: 'else', output: [value('e')], node: [{ opType: 'Relu', name: 'relu', input: ['x'], output: ['e'] }] } },
        ] }],
      },
    } as never));
    const { model, report } = await quantizeModel(bytes, { weights: { bits: 8 }, evaluationFeeds: [] });
    expect(report.passes.flatMap((p) => p.skipped.filter((s) => s.node.includes('head')))).to.deep.equal([]);
    expect(report.passes.find((p) => p.pass === 'fold-weight-chains')!.changed).to.deep.equal(["head: its weight 'Et' (Transpose of constants) folded into the constant 'Et_folded' [8, 16]"]);
    expect(report.layers.map((l) => [l.node, l.subgraph])).to.deep.equal([['proj', undefined], ['head', 'if']]);
    // The Transpose and E went; the model runs and computes x·Eᵀ to 8-bit rounding.
    const session = await ort().InferenceSession.create(model);
    const x = Float32Array.from({ length: 8 }, (_, i) => i / 8);
    const out = (await session.run({ in: new (ort().Tensor)('float32', x, [1, 8]), flag: new (ort().Tensor)('bool', Uint8Array.of(1), []) })).y.data as Float32Array;
    await session.release();
    // (onnxruntime runs proj's 8-bit weights as MatMulNBits, which rounds a little on its own.)
    expect(readModel(model).graph!.initializer.map((t) => t.name)).to.not.include('E');
    for (const j of [0, 3, 15]) expect(out[j]).to.be.closeTo(x.reduce((sum, v, k) => sum + v * table[j * 8 + k], 0), 0.01);
  });
});
