// Per-layer sensitivity (options.sensitivity): the model's outputs with one layer quantized, every other float.
import { create, toBinary } from '@bufbuild/protobuf';
import { expect } from 'chai';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { AttributeProto_AttributeType, ModelProtoSchema, TensorProto_DataType } from 'onnx-buf';

import { readModel } from '../../ts/onnx/model-io';
import { quantizeModel, type QuantizeModelOptions } from '../../ts/onnx/quantize-model';
import { graftLayer } from '../../ts/onnx/sensitivity';
import { branchedMlp, buildModel, heInit, valueInfo as info } from '../helpers/onnx-builder';
import { normalFeeds, rng } from '../helpers/random';

const assets = path.resolve(__dirname, '..', '..', '..', 'assets');
const mnistCnn = path.join(assets, 'mnist-cnn.onnx');
const mnistCalibration = path.join(assets, 'mnist-calibration');

/**
 * Each layer's sensitivity against quantizeModel run with every other layer in keepFloat (the model quantized at that
 * layer alone, compared with the input model rather than the prepared one): the same loss within 2%, the same top-1.
 */
async function expectSameAsAlone(model: string | Uint8Array, options: QuantizeModelOptions): Promise<Array<[string, number]>> {
  const { report } = await quantizeModel(model, { ...options, sensitivity: true });
  const names = report.layers.map((l) => l.node);
  const losses: Array<[string, number]> = [];
  for (const l of report.layers) {
    expect(l.sensitivitySkipped, l.node).to.equal(undefined);
    const alone = (await quantizeModel(model, { ...options, keepFloat: names.filter((n) => n !== l.node) })).report;
    expect(alone.layers.map((x) => x.node)).to.deep.equal([l.node]);
    const [loss, aloneLoss] = [1 - l.sensitivity!.cosine, 1 - alone.evaluation!.outputs[0].cosine];
    expect(Math.abs(loss - aloneLoss), `${l.node}: ${loss} vs ${aloneLoss}`).to.be.at.most(0.02 * aloneLoss + 1e-9);
    expect(l.sensitivity!.top1Agreement).to.equal(alone.evaluation!.outputs[0].top1Agreement);
    losses.push([l.node, loss]);
  }
  return losses;
}

describe('quantizeModel sensitivity', function () {
  this.timeout(300_000);

  it('measures each layer of the MNIST CNN as the model quantized at that layer alone (both bias corrections: changed biases go with the layer)', async () => {
    const options: QuantizeModelOptions = { weights: { bits: 8, biasCorrection: true }, activations: { bits: 8, biasCorrection: true }, calibration: mnistCalibration };
    const losses = await expectSameAsAlone(mnistCnn, options);
    expect(losses.map(([n]) => n)).to.deep.equal(['conv1', 'conv2', 'fc']);
    for (const [, loss] of losses) expect(loss).to.be.greaterThan(0);
  });

  it('leaves the quantized model as it is, and times the stage', async () => {
    const options: QuantizeModelOptions = { weights: { bits: 4 }, activations: { bits: 8 }, calibration: mnistCalibration };
    const plain = await quantizeModel(mnistCnn, options);
    const measured = await quantizeModel(mnistCnn, { ...options, sensitivity: true });
    expect(Buffer.from(measured.model).equals(Buffer.from(plain.model))).to.equal(true);
    expect(measured.report.timingsMs.sensitivity).to.be.a('number');
    expect(plain.report.layers.some((l) => l.sensitivity)).to.equal(false);
    // conv2 is the only 4-bit layer (the first and last take 8 bits): it loses most.
    const byLoss = [...measured.report.layers].sort((a, b) => a.sensitivity!.cosine - b.sensitivity!.cosine);
    expect(byLoss[0].node).to.equal('conv2');
  });

  it('takes a MatMul whose data-driven bias correction added an Add after it under its output name', async () => {
    const model = branchedMlp(3);
    const calibration = normalFeeds(4, [16, 8], 11, 'input');
    const options: QuantizeModelOptions = { weights: { bits: 8 }, activations: { bits: 8, biasCorrection: true }, calibration, evaluationFeeds: normalFeeds(3, [16, 8], 21, 'input') };
    const { report, model: quantized } = await quantizeModel(model, { ...options, sensitivity: true });
    // The correction Adds are there (the MatMuls have no bias of their own).
    expect(readModel(quantized).graph!.node.filter((n) => n.name.endsWith('_bias_correction_add')).length).to.be.greaterThan(0);
    // `side` reaches the output only through its Shape: quantizing it alone changes nothing.
    expect(report.layers.find((l) => l.node === 'side')!.sensitivity!.cosine).to.equal(1);
    await expectSameAsAlone(model, options);
  });

  it('takes a MatMul with the bias Add after it whose constant data-driven bias correction changed (the layer output is the Add\'s)', async () => {
    const model = buildModel({
      inputDims: ['N', 8], output: 'y',
      initializers: {
        W1: { dims: [8, 16], data: heInit(128, 8, 1) }, b1: { dims: [16], data: heInit(16, 4, 2) },
        W2: { dims: [16, 4], data: heInit(64, 16, 3) }, b2: { dims: [4], data: heInit(4, 4, 4) },
      },
      nodes: [
        { op: 'MatMul', name: 'mm1', inputs: ['input', 'W1'], output: 'h' }, { op: 'Add', name: 'add1', inputs: ['h', 'b1'], output: 'hb' },
        { op: 'Relu', name: 'relu', inputs: ['hb'], output: 'r' },
        { op: 'MatMul', name: 'mm2', inputs: ['r', 'W2'], output: 'o' }, { op: 'Add', name: 'add2', inputs: ['o', 'b2'], output: 'y' },
      ],
    });
    const options: QuantizeModelOptions = {
      weights: { bits: 8 }, activations: { bits: 8, biasCorrection: true }, calibration: normalFeeds(4, [16, 8], 12, 'input'), evaluationFeeds: normalFeeds(3, [16, 8], 23, 'input'),
    };
    const { report } = await quantizeModel(model, options);
    expect(report.layers.map((l) => l.output)).to.deep.equal(['hb', 'y']);
    await expectSameAsAlone(model, options);
  });

  it('takes the DynamicQuantizeLinear, MatMulInteger and scale nodes of dynamic activations', async () => {
    const model = branchedMlp(4);
    const options: QuantizeModelOptions = { weights: { bits: 8 }, activations: { bits: 8, method: 'dynamic' }, evaluationFeeds: normalFeeds(3, [16, 8], 22, 'input') };
    const { model: quantized } = await quantizeModel(model, options);
    expect(readModel(quantized).graph!.node.some((n) => n.opType === 'MatMulInteger')).to.equal(true);
    const losses = await expectSameAsAlone(model, options);
    expect(losses.filter(([n, loss]) => n !== 'side' && loss > 0).length).to.equal(5);
  });

  it('measures layers inside an If branch too (on the feeds that run it), as the model quantized there alone', async () => {
    const r = rng(5);
    const matrix = (name: string) => ({ name, dataType: TensorProto_DataType.FLOAT, dims: [32n, 32n], rawData: new Uint8Array(Float32Array.from({ length: 1024 }, () => (r() - 0.5) / 4).buffer) });
    const mm = (x: string, w: string, y: string) => ({ opType: 'MatMul', name: y, input: [x, w], output: [y] });
    const bytes = toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 17n }],
      graph: {
        name: 'branches', input: [info('x', TensorProto_DataType.FLOAT, [1, 32]), info('flag', TensorProto_DataType.BOOL, [])], output: [info('y')],
        initializer: [matrix('A'), matrix('W')],
        node: [mm('x', 'A', 'h'), { opType: 'If', name: 'if', input: ['flag'], output: ['y'], attribute: [
          { name: 'then_branch', type: AttributeProto_AttributeType.GRAPH, g: { name: 'then', output: [info('t1')], node: [mm('h', 'W', 't1')] } },
          { name: 'else_branch', type: AttributeProto_AttributeType.GRAPH, g: { name: 'else', output: [info('e1')], node: [{ opType: 'Neg', name: 'neg', input: ['h'], output: ['e1'] }] } },
        ] }],
      },
    } as never));
    const x = normalFeeds(1, [1, 32], 4)[0].x;
    const evaluationFeeds = [{ x, flag: { data: Uint8Array.of(1), dims: [] } as never }, { x, flag: { data: Uint8Array.of(0), dims: [] } as never }];
    const { report } = await quantizeModel(bytes, { weights: { bits: 4 }, sensitivity: true, evaluationFeeds });
    expect(report.layers.find((l) => l.node === 'h')!.sensitivity!.cosine).to.be.within(0.9, 1).and.to.be.below(1);
    const t1 = report.layers.find((l) => l.node === 't1')!;
    expect(t1.subgraph).to.equal('if');
    // The else branch (half the feeds) does not read it: those samples stay exact, the others move.
    expect(t1.sensitivity!.cosine).to.be.below(1);
    const alone = (await quantizeModel(bytes, { weights: { bits: 4 }, keepFloat: ['h'], evaluationFeeds })).report;
    expect(alone.layers.map((l) => l.node)).to.deep.equal(['t1']);
    // t1 is its branch's last layer, 8 bits in both runs (firstLastLayerBits): the same loss.
    expect(t1.bits).to.equal(alone.layers[0].bits);
    const aloneLoss = 1 - alone.evaluation!.outputs[0].cosine;
    expect(Math.abs(1 - t1.sensitivity!.cosine - aloneLoss)).to.be.at.most(0.02 * aloneLoss);
  });

  it('measures a layer in an If nested inside an If branch, as the model quantized there alone', async () => {
    const r = rng(6);
    const matrix = (name: string) => ({ name, dataType: TensorProto_DataType.FLOAT, dims: [32n, 32n], rawData: new Uint8Array(Float32Array.from({ length: 1024 }, () => (r() - 0.5) / 4).buffer) });
    const neg = (x: string, y: string) => ({ opType: 'Neg', name: y, input: [x], output: [y] });
    const branches = (then: object, otherwise: object) => [
      { name: 'then_branch', type: AttributeProto_AttributeType.GRAPH, g: then }, { name: 'else_branch', type: AttributeProto_AttributeType.GRAPH, g: otherwise },
    ];
    const inner = { opType: 'If', name: 'inner', input: ['flag'], output: ['i1'], attribute: branches(
      { name: 'deep_then', output: [info('d1')], node: [{ opType: 'MatMul', name: 'deep', input: ['h', 'W'], output: ['d1'] }] },
      { name: 'deep_else', output: [info('d2')], node: [neg('h', 'd2')] }) };
    const bytes = toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 17n }],
      graph: {
        name: 'nested', input: [info('x', TensorProto_DataType.FLOAT, [2, 32]), info('flag', TensorProto_DataType.BOOL, [])], output: [info('y')],
        initializer: [matrix('A'), matrix('W')],
        node: [{ opType: 'MatMul', name: 'h', input: ['x', 'A'], output: ['h'] }, { opType: 'If', name: 'outer', input: ['flag'], output: ['y'], attribute: branches(
          { name: 'outer_then', output: [info('i1')], node: [inner] }, { name: 'outer_else', output: [info('e1')], node: [neg('h', 'e1')] }) }],
      },
    } as never));
    const flag = { data: Uint8Array.of(1), dims: [] } as never;
    const evaluationFeeds = normalFeeds(3, [2, 32], 8).map((f) => ({ x: f.x, flag }));
    const losses = await expectSameAsAlone(bytes, { weights: { bits: 8 }, evaluationFeeds });
    expect(losses.map(([n]) => n)).to.deep.equal(['h', 'deep']);
    for (const [, loss] of losses) expect(loss).to.be.greaterThan(0);
  });

  it('measures a layer in a Loop body, as the model quantized there alone', async () => {
    const r = rng(7);
    const matrix = (name: string) => ({ name, dataType: TensorProto_DataType.FLOAT, dims: [32n, 32n], rawData: new Uint8Array(Float32Array.from({ length: 1024 }, () => (r() - 0.5) / 4).buffer) });
    const scalar = (name: string, dataType: number, bytes: Uint8Array) => ({ name, dataType, dims: [], rawData: bytes });
    const body = {
      name: 'body', input: [info('i', TensorProto_DataType.INT64, []), info('c', TensorProto_DataType.BOOL, []), info('v')], output: [info('c_out', TensorProto_DataType.BOOL, []), info('v_out')],
      node: [{ opType: 'Identity', name: 'keep_going', input: ['c'], output: ['c_out'] }, { opType: 'MatMul', name: 'step', input: ['v', 'W'], output: ['v_out'] }],
    };
    const bytes = toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 17n }],
      graph: {
        name: 'loop', input: [info('x', TensorProto_DataType.FLOAT, [2, 32])], output: [info('y')],
        initializer: [matrix('A'), matrix('W'), scalar('trips', TensorProto_DataType.INT64, new Uint8Array(BigInt64Array.of(3n).buffer)), scalar('go', TensorProto_DataType.BOOL, Uint8Array.of(1))],
        node: [{ opType: 'MatMul', name: 'h', input: ['x', 'A'], output: ['h'] },
          { opType: 'Loop', name: 'loop', input: ['trips', 'go', 'h'], output: ['y'], attribute: [{ name: 'body', type: AttributeProto_AttributeType.GRAPH, g: body }] }],
      },
    } as never));
    const evaluationFeeds = normalFeeds(3, [2, 32], 9);
    const losses = await expectSameAsAlone(bytes, { weights: { bits: 8 }, evaluationFeeds });
    expect(losses.map(([n]) => n)).to.deep.equal(['h', 'step']);
    for (const [, loss] of losses) expect(loss).to.be.greaterThan(0);
  });

  it('refuses a sensitivity that is not a boolean, or without evaluation feeds', async () => {
    const model = branchedMlp(3);
    let caught: unknown;
    await quantizeModel(model, { weights: { bits: 8 }, sensitivity: 'yes' as never }).catch((e) => (caught = e));
    expect(caught).to.be.instanceOf(TypeError);
    expect((caught as Error).message).to.equal('Expected a boolean for options.sensitivity but received "yes".');
    caught = undefined;
    await quantizeModel(model, { weights: { bits: 8 }, sensitivity: true, evaluationFeeds: [] }).catch((e) => (caught = e));
    expect((caught as Error).message).to.match(/^Expected feeds to evaluate on \(options\.sensitivity measures on them; .*\) for options\.evaluationFeeds but received \[\]\. /);
  });
});

describe('quantizeModel accuracyTarget', function () {
  this.timeout(300_000);
  // W4A4 with 8-bit first and last layers: conv2 is the layer that loses most.
  const options: QuantizeModelOptions = { weights: { bits: 4 }, activations: { bits: 4 }, calibration: mnistCalibration };

  it('keeps the most sensitive layers in float, one more per try, until the cosine is reached, and writes that model', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-target-'));
    try {
      const outputPath = path.join(dir, 'q.onnx');
      const { model, report } = await quantizeModel(mnistCnn, { ...options, accuracyTarget: { cosine: 0.9999 }, outputPath });
      const target = report.accuracyTarget!;
      expect(target.met).to.equal(true);
      expect(target.keptFloat).to.deep.equal(['conv2']);
      expect(target.tried.map((t) => t.floatLayers)).to.deep.equal([0, 1]);
      expect(target.tried[0].cosine).to.be.below(0.9999);
      expect(target.tried[1].cosine).to.be.at.least(0.9999).and.to.equal(report.evaluation!.outputs[0].cosine);
      const kept = await quantizeModel(mnistCnn, { ...options, keepFloat: ['conv2'] });
      expect(Buffer.from(model).equals(Buffer.from(kept.model))).to.equal(true);
      expect(fs.readFileSync(outputPath).equals(Buffer.from(model))).to.equal(true);
      expect(fs.readdirSync(dir)).to.deep.equal(['q.onnx']);  // one write, no leftovers
      expect(report.layers.map((l) => l.node)).to.deep.equal(['conv1', 'fc']);
      expect(report.layers.every((l) => l.sensitivity)).to.equal(true);
      // The ranking keeps the layer the search left float, with what it measured.
      expect(target.ranking.map((l) => l.node)[0]).to.equal('conv2');
      expect(target.ranking.map((l) => l.node).sort()).to.deep.equal(['conv1', 'conv2', 'fc']);
      expect(target.ranking.find((l) => l.node === 'fc')!.sensitivity).to.deep.equal(report.layers.find((l) => l.node === 'fc')!.sensitivity);
      expect(report.timingsMs['accuracy-target']).to.be.a('number');
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('stops at maxFloatLayers with the closest model when the target is out of reach, and tries nothing more when the first run meets it', async () => {
    const farReport = (await quantizeModel(mnistCnn, { ...options, accuracyTarget: { cosine: 1, maxFloatLayers: 1 } })).report;
    const far = farReport.accuracyTarget!;
    expect(far.met).to.equal(false);
    expect(far.tried.length).to.equal(2);
    const best = far.tried.reduce((a, b) => (b.cosine > a.cosine ? b : a));
    expect(far.keptFloat.length).to.equal(best.floatLayers);
    expect(far.limit).to.equal(1);
    expect(farReport.evaluation!.outputs[0].cosine).to.equal(best.cosine);  // the closest try is the one returned
    const near = (await quantizeModel(mnistCnn, { ...options, accuracyTarget: { cosine: 0.99 } })).report.accuracyTarget!;
    expect(near).to.deep.include({ met: true, keptFloat: [] });
    expect(near.tried.length).to.equal(1);
  });

  it('refuses targets it cannot judge or reach: bad values, no feeds, calibration read once, external data', async () => {
    const refused = async (o: Partial<QuantizeModelOptions>) => {
      let caught: Error | undefined;
      await quantizeModel(mnistCnn, { ...options, ...o } as QuantizeModelOptions).catch((e) => (caught = e));
      return caught?.message ?? 'no error';
    };
    expect(await refused({ accuracyTarget: { cosine: 1.5 } })).to.equal('Expected a number in (0, 1] (the mean output cosine to reach) for options.accuracyTarget.cosine but received 1.5.');
    expect(await refused({ accuracyTarget: { cosine: 0.9, maxFloatLayers: 0.5 } })).to.match(/^Expected a positive integer for options\.accuracyTarget\.maxFloatLayers but received 0\.5/);
    expect(await refused({ accuracyTarget: { cosine: 0.9 }, evaluationFeeds: [] })).to.match(/for options\.evaluationFeeds but received \[\]/);
    expect(await refused({ weights: { bits: 8 }, activations: false, calibration: undefined, accuracyTarget: { cosine: 0.9 } })).to.match(/made-up inputs/);
    const once = (function* () { yield* normalFeeds(2, [1, 1, 28, 28], 1, 'input'); })();
    expect(await refused({ calibration: once, accuracyTarget: { cosine: 0.9 } })).to.match(/^Expected calibration data that can be read again/);
    expect(await refused({ accuracyTarget: { cosine: 0.9 }, externalData: true, outputPath: path.join(os.tmpdir(), 'x.onnx') })).to.match(/options\.externalData/);
    // The tries write nothing, but the output path is checked as a run checks it: never the input model.
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-target-'));
    try {
      const copy = path.join(dir, 'm.onnx');
      fs.copyFileSync(mnistCnn, copy);
      let caught: Error | undefined;
      await quantizeModel(copy, { ...options, accuracyTarget: { cosine: 0.9 }, outputPath: copy }).catch((e) => (caught = e));
      expect(caught?.message).to.match(/options\.outputPath/);
      expect(fs.readFileSync(copy).equals(fs.readFileSync(mnistCnn))).to.equal(true);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('keepFloat', () => {
  it('names an unnamed layer by the label reports give it ("MatMul(y)")', async () => {
    const matrix = (name: string, seed: number) => ({ name, dataType: TensorProto_DataType.FLOAT, dims: [4n, 4n], rawData: new Uint8Array(heInit(16, 4, seed).buffer) });
    const model = toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 17n }],
      graph: {
        name: 'unnamed', input: [info('x', TensorProto_DataType.FLOAT, [1, 4])], output: [info('y')], initializer: [matrix('W', 1), matrix('V', 2)],
        node: [{ opType: 'MatMul', input: ['x', 'W'], output: ['h'] }, { opType: 'MatMul', input: ['h', 'V'], output: ['y'] }],
      },
    } as never));
    const all = (await quantizeModel(model, { weights: { bits: 8 }, evaluationFeeds: [] })).report.layers.map((l) => l.node);
    expect(all).to.deep.equal(['MatMul(h)', 'MatMul(y)']);
    const { report } = await quantizeModel(model, { weights: { bits: 8 }, evaluationFeeds: [], keepFloat: ['MatMul(y)'] });
    expect(report.layers.map((l) => l.node)).to.deep.equal(['MatMul(h)']);
    // Not reported as a keepFloat entry that keeps nothing.
    expect(report.passes.flatMap((p) => p.skipped).filter((s) => /keeps nothing/.test(s.reason))).to.deep.equal([]);
  });
});

describe('graftLayer', () => {
  const weight = { dims: [4, 4], data: heInit(16, 4, 1) };
  it('refuses when the layer\'s inputs pass through anything but quantization nodes', () => {
    const base = readModel(buildModel({ inputDims: [1, 4], output: 'y', initializers: { W: weight }, nodes: [{ op: 'MatMul', name: 'mm', inputs: ['input', 'W'], output: 'y' }] }));
    const donor = readModel(buildModel({
      inputDims: [1, 4], output: 'y', initializers: { W: weight },
      nodes: [{ op: 'Relu', name: 'relu', inputs: ['input'], output: 'r' }, { op: 'MatMul', name: 'mm', inputs: ['r', 'W'], output: 'y' }],
    }));
    expect(graftLayer(base, donor, ['y'], 'mm', 'MatMul')).to.match(/pass through Relu 'relu', which is not part of quantizing it/);
    expect(graftLayer(base, donor, ['nothing'], 'mm', 'MatMul')).to.match(/computes no value 'nothing'/);
  });
  it('takes the donor\'s weights under new names where the base has others of the same name', () => {
    const base = readModel(buildModel({ inputDims: [1, 4], output: 'y', initializers: { W: weight }, nodes: [{ op: 'MatMul', name: 'mm', inputs: ['input', 'W'], output: 'y' }] }));
    const other = { dims: [4, 4], data: weight.data.map((v) => v * 2) };
    const donor = readModel(buildModel({ inputDims: [1, 4], output: 'y', initializers: { W: other }, nodes: [{ op: 'MatMul', name: 'mm', inputs: ['input', 'W'], output: 'y' }] }));
    const grafted = graftLayer(base, donor, ['y'], 'mm', 'MatMul');
    if (typeof grafted === 'string') throw new Error(grafted);
    const mm = grafted.graph!.node.find((n) => n.name === 'mm')!;
    expect(mm.input[1]).to.not.equal('W');
    // The base's W is read by nothing else, so it goes; the base itself is unchanged.
    expect(grafted.graph!.initializer.map((t) => t.name)).to.deep.equal([mm.input[1]]);
    expect(base.graph!.initializer.map((t) => t.name)).to.deep.equal(['W']);
    const sameW = graftLayer(base, readModel(buildModel({ inputDims: [1, 4], output: 'y', initializers: { W: weight }, nodes: [{ op: 'MatMul', name: 'mm', inputs: ['input', 'W'], output: 'y' }] })), ['y'], 'mm', 'MatMul');
    expect(typeof sameW !== 'string' && sameW.graph!.node.find((n) => n.name === 'mm')!.input[1]).to.equal('W');
  });
});
