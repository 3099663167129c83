/**
 * finetune(): float training learns, runs are deterministic, LSQ/GDRQ exports
 * run in onnxruntime and equal the engine's quantized forward pass, bad input
 * gets typed errors, and the event loop keeps running. Small MNIST subsets.
 */
import { create } from '@bufbuild/protobuf';
import { expect } from 'chai';
import { AttributeProto_AttributeType, AttributeProtoSchema, NodeProtoSchema, TensorProto_DataType } from 'onnx-buf';
import { Readable } from 'node:stream';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { finetune, OnnxModelError, TrainingError, type LabelledBatch } from '../../ts/index';
import { distillationLoss } from '../../ts/train/finetune';
import { nativeKernels } from '../../ts/train/kernels';
import { makeParameter, TrainableModel } from '../../ts/train/model';
import { GdrqWeightQuantizer, LsqQuantizer } from '../../ts/train/quantizers';
import { ort } from '../../ts/bench/ort-models';
import { readModel } from '../../ts/onnx/model-io';
import { floatData } from '../../ts/onnx/graph';
import { loadMnist } from '../../ts/train/mnist';
import { writeNpy } from '../helpers/npy';
import { branchedMlp, buildModel, editedModel, mnistCnn } from '../helpers/onnx-builder';

const BUNDLED = path.resolve(__dirname, '..', '..', '..', 'assets', 'mnist-cnn.onnx');

function subset(split: 'train' | 't10k', count: number): LabelledBatch {
  const set = loadMnist(split, count);
  return { inputs: { data: set.images, dims: [set.count, 1, 28, 28] }, labels: set.labels };
}

async function ortLogits(model: Uint8Array, batch: LabelledBatch): Promise<Float32Array> {
  const o = ort();
  // onnxruntime's default session options (graph optimisations 'all'): what users run.
  const session = await o.InferenceSession.create(model);
  const result = await session.run({ [session.inputNames[0]]: new o.Tensor('float32', batch.inputs.data, batch.inputs.dims) });
  return result[session.outputNames[0]].data as Float32Array;
}

function argmaxAgreement(a: Float32Array, b: Float32Array, classes: number): number {
  let same = 0;
  for (let i = 0; i < a.length / classes; i++) {
    const arg = (x: Float32Array) => { let k = 0; for (let c = 1; c < classes; c++) if (x[i * classes + c] > x[i * classes + k]) k = c; return k; };
    if (arg(a) === arg(b)) same++;
  }
  return same / (a.length / classes);
}

async function expectError(p: Promise<unknown>, type: new (...a: never[]) => Error, pattern: RegExp): Promise<Error> {
  try {
    await p;
  } catch (e) {
    expect(e).to.be.instanceOf(type);
    expect((e as Error).message).to.match(pattern);
    return e as Error;
  }
  return expect.fail(`expected ${type.name} matching ${pattern}`);
}

describe('finetune: float training', () => {
  it('trains the MNIST CNN from scratch to > 90% on held-out digits (4 000 images, two epochs)', async () => {
    const test = subset('t10k', 500);
    const { history, model, forward } = await finetune(mnistCnn(1), subset('train', 4000), {
      epochs: 2, batchSize: 32, learningRate: 0.05, validation: test,
    });
    expect(history).to.have.length(2);
    expect(history[1].validationAccuracy).to.be.above(0.9);
    // The exported float model computes what the engine computes.
    const engine = forward(test.inputs);
    const runtime = await ortLogits(model, test);
    const scale = engine.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
    runtime.forEach((v, i) => expect(v).to.be.closeTo(engine[i], 1e-4 * scale));
  });

  it('is deterministic for a seed, and identical for 1 and 2 threads', async () => {
    const data = subset('train', 192);
    const run = (threads: number, seed = 3) => finetune(mnistCnn(2), data, { epochs: 1, batchSize: 32, seed, threads });
    const [a, b, c, d] = [await run(1), await run(1), await run(2), await run(1, 4)];
    expect(Buffer.from(a.model).equals(Buffer.from(b.model))).to.equal(true);
    expect(Buffer.from(a.model).equals(Buffer.from(c.model))).to.equal(true);
    expect(Buffer.from(a.model).equals(Buffer.from(d.model))).to.equal(false);
  });

  it('accepts an async iterable of batches that restarts every epoch; a one-shot one is refused before training, one that runs dry fails in epoch 2', async () => {
    const data = subset('train', 128);
    const batches = {
      async *[Symbol.asyncIterator]() {
        for (let i = 0; i < 128; i += 64) {
          yield { inputs: { data: data.inputs.data.subarray(i * 784, (i + 64) * 784), dims: [64, 1, 28, 28] }, labels: data.labels.subarray(i, i + 64) };
        }
      },
    };
    const { history } = await finetune(mnistCnn(3), batches, { epochs: 2 });
    expect(history.map((h) => h.images)).to.deep.equal([128, 128]);
    // One-shot: a generator, and an object handing out the same iterator each time. Refused before any step.
    const once = batches[Symbol.asyncIterator]();
    for (const oneShot of [batches[Symbol.asyncIterator](), { [Symbol.asyncIterator]: () => once }]) {
      let steps = 0;
      try {
        await finetune(mnistCnn(3), oneShot, { epochs: 2, onStep: () => steps++ });
        expect.fail('expected a RangeError');
      } catch (e) {
        expect(e).to.be.instanceOf(RangeError);
        expect((e as Error).message).to.match(/for data but received .*can be read only once.*epochs: 1/);
      }
      expect(steps).to.equal(0);
      // With one epoch it is fine.
      expect((await finetune(mnistCnn(3), oneShot, { epochs: 1 })).history[0].images).to.equal(128);
    }
    const stream = Readable.from([]);
    try {
      await finetune(mnistCnn(3), stream, { epochs: 2 });
      expect.fail('expected a RangeError');
    } catch (e) {
      expect((e as Error).message).to.match(/received a stream, which can be read only once\. Collect its batches into an array, or pass epochs: 1\./);
    }
    // An object that is its own iterator and starts over when asked for it (a common hand-written dataset) trains.
    const list = [0, 64].map((i) => ({ inputs: { data: data.inputs.data.subarray(i * 784, (i + 64) * 784), dims: [64, 1, 28, 28] }, labels: data.labels.subarray(i, i + 64) }));
    const resetting = {
      at: 0,
      [Symbol.asyncIterator]() { this.at = 0; return this; },
      async next() { return this.at < list.length ? { value: list[this.at++], done: false as const } : { value: undefined, done: true as const }; },
    };
    expect((await finetune(mnistCnn(3), resetting, { epochs: 2 })).history.map((h) => h.images)).to.deep.equal([128, 128]);
    // New iterators over a source read once: empty from the second epoch on.
    let source: AsyncIterator<unknown> | undefined;
    const runsDry = {
      [Symbol.asyncIterator]: () => {
        source ??= batches[Symbol.asyncIterator]();
        return { next: () => source!.next() };
      },
    };
    try {
      await finetune(mnistCnn(3), runsDry as typeof batches, { epochs: 2 });
      expect.fail('expected a TrainingError');
    } catch (e) {
      expect(e).to.be.instanceOf(TrainingError);
      expect((e as Error).message).to.match(/no batch in epoch 2/);
    }
    // Empty from the start: nothing to restart, so no hint about restarting.
    const empty = await finetune(mnistCnn(3), { async *[Symbol.asyncIterator]() { /* no batches */ } }, { epochs: 2 }).then(() => undefined, (e: Error) => e);
    expect(empty).to.be.instanceOf(TrainingError);
    expect(empty!.message).to.equal('The training data yielded no batch. Give at least one batch { inputs, labels }.');
  });

  it('learning-rate schedules: cosine decays towards 0 over the run, constant stays', async () => {
    const data = subset('train', 256);
    const rates: number[] = [];
    const cosine = await finetune(mnistCnn(5), data, { epochs: 2, batchSize: 64, learningRate: 0.02, onStep: () => undefined, onEpoch: (e) => rates.push(e.learningRate) });
    expect(cosine.history.map((h) => h.learningRate)).to.deep.equal(rates);
    // The last step of 8 uses progress 7/8: 0.01·(1 + cos(7π/8)).
    expect(rates[1]).to.be.closeTo(0.01 * (1 + Math.cos((7 * Math.PI) / 8)), 1e-12);
    const constant = await finetune(mnistCnn(5), data, { epochs: 2, batchSize: 64, learningRate: 0.02, learningRateSchedule: 'constant' });
    expect(constant.history.map((h) => h.learningRate)).to.deep.equal([0.02, 0.02]);
  });

  it('validation turns the event loop between its batches', async () => {
    let ticks = 0, validating = false, done = false;
    const tick = () => { if (validating) ticks++; if (!done) setImmediate(tick); };
    tick();
    // One step of training; then 1 024 validation images in batches of 256, each followed by a turn.
    await finetune(mnistCnn(4), subset('train', 16), { epochs: 1, batchSize: 16, validation: subset('t10k', 1024),
      onStep: () => { validating = true; }, onEpoch: () => { validating = false; } });
    done = true;
    expect(ticks).to.be.at.least(4);
  });

  it('keeps the event loop running', async () => {
    let ticks = 0;
    const timer = setInterval(() => ticks++, 1);
    await finetune(mnistCnn(4), subset('train', 512), { epochs: 1, batchSize: 16 });
    clearInterval(timer);
    expect(ticks).to.be.above(5);
  });
});

describe('finetune: quantization-aware training and QDQ export', () => {
  const train = () => subset('train', 512);
  const test = subset('t10k', 256);

  const cases = [['lsq', 4, 4, {}], ['lsq', 2, 4, {}], ['gdrq', 2, 4, {}], ['gdrq', 4, 4, {}], ['gdrq', 2, 4, { activationSteps: 'learned' }]] as const;
  for (const [method, wbits, abits, extra] of cases) {
    const variant = Object.keys(extra).length ? ` (${JSON.stringify(extra)})` : '';
    it(`${method} W${wbits}A${abits}${variant}: onnxruntime's output on the export equals the engine's quantized forward pass`, async () => {
      const result = await finetune(BUNDLED, train(), {
        method, weightBits: wbits, activationBits: abits, epochs: 1, batchSize: 64, learningRate: 0.005, ...extra,
      });
      const engine = result.forward(test.inputs);
      const runtime = await ortLogits(result.model, test);
      const scale = engine.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
      // onnxruntime sums convolutions in another order (and GDRQ folds its group scales into the BN), so a
      // last-bit difference can move one of the 200 704 activations feeding the 8-bit Gemm (or the 4-bit Conv) across a rounding
      // threshold: that image's logits then differ by one activation step times a weight. Expect almost every
      // image to agree to float tolerance, and the rest to differ by no more than a few such steps.
      const differing = new Set<number>();
      let largest = 0;
      runtime.forEach((v, i) => {
        const d = Math.abs(v - engine[i]);
        if (d > 1e-5 * scale) differing.add(Math.floor(i / 10));
        largest = Math.max(largest, d);
      });
      expect(differing.size / (runtime.length / 10), 'share of images whose logits differ').to.be.at.most(0.04);
      expect(largest / scale, 'largest logit difference relative to the largest logit').to.be.below(2e-3);
      expect(argmaxAgreement(engine, runtime, 10)).to.be.above(0.99);
      const quantized = result.layers.filter((l) => l.weightBits !== undefined);
      expect(quantized.map((l) => [l.weightBits, l.activationBits])).to.deep.equal([[8, 8], [wbits, abits], [8, 8]]);
      const graph = readModel(result.model).graph!;
      expect(graph.node.filter((n) => n.opType === 'DequantizeLinear').length).to.equal(6);
      if (method === 'gdrq') expect(result.layers.filter((l) => l.foldedIntoBatchNorm).map((l) => l.node)).to.deep.equal(['conv2']);
    });
  }
  it('reduceRange keeps 8-bit weights in [-64, 63] while training and in the export (LSQ and GDRQ edge layers), which onnxruntime runs as the engine does', async () => {
    const int8Codes = (bytes: Uint8Array) => {
      const graph = readModel(bytes).graph!;
      return graph.node.filter((n) => n.opType === 'DequantizeLinear').map((n) => graph.initializer.find((t) => t.name === n.input[0]))
        .filter((t) => t?.dataType === TensorProto_DataType.INT8).map((t) => Array.from(new Int8Array(Uint8Array.from(t!.rawData).buffer)));
    };
    const extremes = (codes: number[][]) => [Math.min(...codes.flat()), Math.max(...codes.flat())];
    for (const method of ['lsq', 'gdrq'] as const) {
      // 'max' steps (no clipping at the start): the codes span the whole range.
      const options = { method, weightBits: 4 as const, activationBits: 4 as const, epochs: 1, batchSize: 64, learningRate: 0.005, stepInit: 'max' as const };
      const full = await finetune(BUNDLED, train(), options);
      const reduced = await finetune(BUNDLED, train(), { ...options, reduceRange: true });
      // The two 8-bit edge layers' weights (conv1 and fc): int8 codes, reaching ±127 without reduceRange.
      expect(int8Codes(full.model), method).to.have.length(2);
      expect(Math.max(...extremes(int8Codes(full.model)).map(Math.abs)), method).to.be.above(100);
      const [low, high] = extremes(int8Codes(reduced.model));
      expect([low >= -64, high <= 63, Math.max(-low, high) >= 60], method).to.deep.equal([true, true, true]);
      const engine = reduced.forward(test.inputs);
      expect(argmaxAgreement(engine, await ortLogits(reduced.model, test), 10), method).to.be.above(0.99);
    }
    // GDRQ's own 8-bit weight quantizer (weightBits 8: conv2): group steps searched for the 7-bit levels, so the
    // codes reach the ends of [-64, 63] at the Scale-Clip threshold (searched at 8 bits, a third of them saturated).
    const gdrq8 = await finetune(BUNDLED, train(), { method: 'gdrq', weightBits: 8, activationBits: 8, epochs: 1, batchSize: 64, learningRate: 0.005, reduceRange: true });
    const codes8 = int8Codes(gdrq8.model);
    expect(codes8).to.have.length(3);
    expect(gdrq8.layers.map((l) => [l.weightBits, l.weightCodeBits])).to.deep.equal([[8, 7], [8, 7], [8, 7]]);
    for (const layer of codes8) expect([Math.min(...layer) >= -64, Math.max(...layer) <= 63]).to.deep.equal([true, true]);
    expect(Math.max(...codes8[1].map(Math.abs)), 'conv2 (GDRQ)').to.be.at.least(60);
    expect(codes8[1].filter((c) => c >= 63 || c <= -64).length / codes8[1].length, 'conv2 codes at the ends').to.be.below(0.05);
    expect(argmaxAgreement(gdrq8.forward(test.inputs), await ortLogits(gdrq8.model, test), 10)).to.be.above(0.99);
    await finetune(BUNDLED, train(), { method: 'lsq', reduceRange: 'yes' as never }).then(() => expect.fail('accepted'), (e) => expect((e as Error).message).to.match(/a boolean for options\.reduceRange/));
  });

  it('the first and last layers by data flow keep firstLastLayerBits: a stem of parallel layers and several heads', async () => {
    const inputs = { data: Float32Array.from({ length: 64 * 8 }, (_, i) => Math.sin(i * 0.37)), dims: [64, 8] };
    const labels = Int32Array.from({ length: 64 }, (_, i) => i % 4);
    const { layers } = await finetune(branchedMlp(3), { inputs, labels }, { method: 'lsq', weightBits: 4, activationBits: 4, epochs: 1, batchSize: 32 });
    expect(layers.filter((l) => l.weightBits !== undefined).map((l) => [l.node, l.weightBits, l.activationBits])).to.deep.equal([
      ['s1', 8, 8], ['s2', 8, 8], ['mid', 4, 4], ['side', 8, 8], ['h1', 8, 8], ['h2', 8, 8]]);
  });
});

describe('finetune: distillation from the float model (no labels)', () => {
  it('distillationLoss: zero at the teacher, KL and (q - p)/rows otherwise, top-1 agreement per row', () => {
    const logits = { data: Float32Array.of(Math.log(0.7), Math.log(0.2), Math.log(0.1), 0, 0, 0), dims: [1, 2, 3] };
    const teacher = Float32Array.of(0.7, 0.2, 0.1, 0.1, 0.3, 0.6);
    const d = new Float32Array(6);
    const r = distillationLoss(logits, teacher, d);
    const klSecond = 0.1 * Math.log(0.1 * 3) + 0.3 * Math.log(0.3 * 3) + 0.6 * Math.log(0.6 * 3);
    expect(r.rows).to.equal(2);
    expect(r.correct).to.equal(1);
    expect(r.loss).to.be.closeTo(klSecond / 2, 1e-6);
    const want = [0, 0, 0, (1 / 3 - 0.1) / 2, (1 / 3 - 0.3) / 2, (1 / 3 - 0.6) / 2];
    d.forEach((v, i) => expect(v).to.be.closeTo(want[i], 1e-6));
  });

  it('W8A8 LSQ with max-initialised steps and zero points learns from unlabelled inputs; the export runs in onnxruntime as the engine computes', async () => {
    // Inputs in [-1, 1]: the first layer's activations are signed, so their quantizer gets a zero point.
    const shift = (b: LabelledBatch) => ({ inputs: { data: b.inputs.data.map((v) => 2 * v - 1), dims: b.inputs.dims } });
    const train = shift(subset('train', 256)), test = shift(subset('t10k', 128));
    const float = await finetune(BUNDLED, train, { distill: true, epochs: 1, batchSize: 32, learningRate: 0.001 });
    expect(float.history[0].accuracy, 'float agreement with itself').to.be.above(0.99);
    const result = await finetune(BUNDLED, train, {
      distill: true, method: 'lsq', weightBits: 8, activationBits: 8, perChannel: true, stepInit: 'max', epochs: 1, batchSize: 32,
      learningRate: 1e-4, optimizer: 'adam', weightDecay: 0, validation: test,
    });
    expect(result.history[0].loss).to.be.a('number').and.to.be.below(0.05);
    expect(result.history[0].validationAccuracy, 'top-1 agreement with the float model').to.be.above(0.97);
    const graph = readModel(result.model).graph!;
    const zeroPoints = graph.node.filter((n) => n.opType === 'QuantizeLinear').map((n) => graph.initializer.find((t) => t.name === n.input[2])!);
    expect(zeroPoints.some((z) => z.rawData[0] > 0), 'an asymmetric (uint8, zero point > 0) activation').to.equal(true);
    const engine = result.forward(test.inputs);
    const runtime = await ortLogits(result.model, { ...test, labels: new Int32Array(128) });
    expect(argmaxAgreement(engine, runtime, 10)).to.be.above(0.99);
    const scale = engine.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
    let largest = 0;
    runtime.forEach((v, i) => (largest = Math.max(largest, Math.abs(v - engine[i]))));
    expect(largest / scale).to.be.below(2e-3);
  });

  it("'max' steps start from the activation range of the first 64 inputs, not just the first batch", async () => {
    const images = subset('train', 96);
    const data = images.inputs.data.map((v) => 2 * v - 1);
    data.subarray(50 * 784, 51 * 784).forEach((v, i, row) => (row[i] = 3 * v)); // input 50 alone sets the range
    const r = await finetune(BUNDLED, { inputs: { data, dims: [96, 1, 28, 28] } }, {
      distill: true, method: 'lsq', weightBits: 8, activationBits: 8, stepInit: 'max', batchSize: 16, learningRate: Number.MIN_VALUE,
    });
    const first64 = data.subarray(0, 64 * 784);
    const [min, max] = [first64.reduce((m, v) => Math.min(m, v)), first64.reduce((m, v) => Math.max(m, v))];
    const [min50, max50] = [data.subarray(50 * 784, 51 * 784).reduce((m, v) => Math.min(m, v)), data.subarray(50 * 784, 51 * 784).reduce((m, v) => Math.max(m, v))];
    expect([min, max]).to.deep.equal([min50, max50]);
    const step = (max - min) / 255;
    expect(r.layers[0].activationScale).to.be.closeTo(step, 1e-6 * step);
    const graph = readModel(r.model).graph!;
    const q = graph.node.find((n) => n.opType === 'QuantizeLinear' && n.input[0] === 'input')!;
    expect(graph.initializer.find((t) => t.name === q.input[2])!.rawData[0]).to.equal(Math.round(-min / step));
    // An unsigned activation (conv2's input, after ReLU and MaxPool): [0, max over the 64 inputs], zero point 0.
    const float = new TrainableModel(readModel(BUNDLED));
    const pooled = float.forward({ data: first64, dims: [64, 1, 28, 28] }, false, nativeKernels()).values.get('p1')!.data;
    const highest = pooled.reduce((m, v) => Math.max(m, v));
    expect(r.layers[1].activationScale).to.be.closeTo(highest / 255, 0.02 * highest / 255);
    const q2 = graph.node.find((n) => n.opType === 'QuantizeLinear' && n.input[0] === 'p1')!;
    expect(graph.initializer.find((t) => t.name === q2.input[2])!.rawData[0]).to.equal(0);
  });

  it('learnSteps: false trains the weights at the initial steps', async () => {
    const data = subset('train', 128);
    const options = { method: 'lsq', weightBits: 4, activationBits: 4, epochs: 1, batchSize: 32, learningRate: 0.01 } as const;
    const start = await finetune(BUNDLED, data, { ...options, learningRate: Number.MIN_VALUE });
    const fixed = await finetune(BUNDLED, data, { ...options, learnSteps: false });
    const learned = await finetune(BUNDLED, data, options);
    const scales = (r: typeof start) => r.layers.map((l) => [l.weightScale, l.activationScale]);
    expect(scales(fixed)).to.deep.equal(scales(start));
    expect(scales(learned)).to.not.deep.equal(scales(start));
    expect(Buffer.from(fixed.model).equals(Buffer.from(start.model)), 'the weights were trained').to.equal(false);
  });

  it('Adam lowers the loss of float training', async () => {
    const { history } = await finetune(mnistCnn(6), subset('train', 1024), { epochs: 2, batchSize: 32, learningRate: 0.003, optimizer: 'adam' });
    expect(history[1].loss).to.be.below(history[0].loss);
    expect(history[1].accuracy).to.be.above(0.8);
  });
});

describe('finetune: bad input', () => {
  const data = subset('train', 64);

  it('labels that do not match the inputs or the model output', async () => {
    await expectError(finetune(BUNDLED, { inputs: data.inputs, labels: data.labels.subarray(0, 10) }), RangeError, /one label per input \(N = dims\[0\] = 64\) for data\.labels/);
    const wrong = Uint8Array.from(data.labels);
    wrong[5] = 12;
    await expectError(finetune(BUNDLED, { inputs: data.inputs, labels: wrong }), RangeError, /\[0, 9\].*10 classes.* for data\.labels\[5\] but received 12/);
    await expectError(finetune(BUNDLED, { inputs: data.inputs, labels: Array.from(data.labels) as never }), TypeError, /Int32Array or Uint8Array.*for data\.labels/);
  });

  it('inputs of the wrong shape, type or values', async () => {
    await expectError(finetune(BUNDLED, { inputs: { data: data.inputs.data, dims: [64, 784] }, labels: data.labels }), RangeError, /'input' shape \[N, 1, 28, 28\] for data\.inputs\.dims/);
    await expectError(finetune(BUNDLED, { inputs: { data: data.inputs.data, dims: [64, 1, 28, 27] }, labels: data.labels }), RangeError, /product of dims.*for data\.inputs\.data/);
    await expectError(finetune(BUNDLED, { inputs: { data: Float64Array.from(data.inputs.data) as never, dims: [64, 1, 28, 28] }, labels: data.labels }), TypeError, /Float32Array/);
    const nan = Float32Array.from(data.inputs.data);
    nan[100] = NaN;
    await expectError(finetune(BUNDLED, { inputs: { data: nan, dims: [64, 1, 28, 28] }, labels: data.labels }), RangeError, /finite number for data\.inputs\.data\[100\]/);
    // The dims received are shown as themselves; a transferred buffer is named as such (it used to read as "length 0").
    await expectError(finetune(BUNDLED, { inputs: { data: data.inputs.data, dims: [64, 784] }, labels: data.labels }), RangeError, /but received \[64, 784\]\./);
    const moved = Float32Array.from(data.inputs.data);
    structuredClone(moved.buffer, { transfer: [moved.buffer] });
    await expectError(finetune(BUNDLED, { inputs: { data: moved, dims: [64, 1, 28, 28] }, labels: data.labels }), TypeError, /an attached buffer for data\.inputs\.data but received Float32Array on a detached buffer\. The buffer was transferred/);
    const labels = Uint8Array.from(data.labels);
    structuredClone(labels.buffer, { transfer: [labels.buffer] });
    await expectError(finetune(BUNDLED, { inputs: data.inputs, labels }), TypeError, /an attached buffer for data\.labels/);
  });

  it('options out of range and unknown options', async () => {
    await expectError(finetune(BUNDLED, data, { method: 'pact' as never }), RangeError, /options\.method/);
    await expectError(finetune(BUNDLED, data, { weightBits: 3 as never }), RangeError, /one of 2, 4, 8 for options\.weightBits/);
    await expectError(finetune(BUNDLED, data, { learningRate: -1 }), RangeError, /options\.learningRate/);
    await expectError(finetune(BUNDLED, data, { epoch: 2 } as never), Error, /epoch/);
    await expectError(finetune(BUNDLED, data, { optimizer: 'rmsprop' as never }), RangeError, /options\.optimizer/);
    await expectError(finetune(BUNDLED, data, { stepInit: 'mean' as never }), RangeError, /options\.stepInit/);
    await expectError(finetune(BUNDLED, data, { distill: 1 as never }), TypeError, /a boolean for options\.distill/);
    for (const momentum of [1, 5]) {
      await expectError(finetune(BUNDLED, data, { momentum }), RangeError, new RegExp(`^Expected a number in \\[0, 1\\) for options\\.momentum but received ${momentum}\\. 0\\.9 is usual\\.$`));
    }
    await expectError(finetune(BUNDLED, { inputs: data.inputs }), TypeError, /Int32Array or Uint8Array.*data\.labels.*options\.distill/);
  });

  it('options of the wrong type are TypeErrors; keepFloat entries that keep nothing, or are empty, and bad thread counts are refused for every kernel (audit)', async () => {
    await expectError(finetune(BUNDLED, data, { weightBits: '4' as never }), TypeError, /one of 2, 4, 8 for options\.weightBits but received "4"/);
    await expectError(finetune(BUNDLED, data, { learningRate: '0.1' as never }), TypeError, /options\.learningRate/);
    await expectError(finetune(BUNDLED, data, { weightDecay: '0' as never }), TypeError, /options\.weightDecay/);
    await expectError(finetune(BUNDLED, data, { method: 'lsq', keepFloat: ['Conv1'] }), RangeError,
      /the name or op type of a layer the engine quantizes \(a Conv, Gemm or MatMul whose weight is an initializer\) for options\.keepFloat\[0\] but received "Conv1"\. Did you mean 'conv1'\?/);
    await expectError(finetune(BUNDLED, data, { method: 'lsq', keepFloat: ['conv1', ''] }), RangeError, /options\.keepFloat\[1\] but received ""\. Remove the empty entry/);
    await expectError(finetune(BUNDLED, data, { kernel: 'reference', threads: -5 }), RangeError, /an integer in \[1, 1024\] for options\.threads but received -5/);
    // A name that is there keeps its layer float: the LSQ model has no QDQ pair on it.
    const { model } = await finetune(BUNDLED, subset('train', 32), { method: 'lsq', keepFloat: ['conv1'], epochs: 1, batchSize: 32 });
    const nodes = readModel(model).graph!.node;
    const conv1 = nodes.find((n) => n.name === 'conv1')!;
    expect(nodes.some((n) => n.opType === 'DequantizeLinear' && conv1.input.includes(n.output[0])), 'conv1 reads a DequantizeLinear').to.equal(false);
    expect(nodes.some((n) => n.opType === 'DequantizeLinear'), 'other layers are quantized').to.equal(true);
  });

  it('a layer whose geometry would make an absurdly large array is refused by name before training, not allocated', async () => {
    const model = readModel(BUNDLED);
    const conv1 = model.graph!.node.find((n) => n.name === 'conv1')!;
    const pads = conv1.attribute.find((a) => a.name === 'pads')!;
    pads.ints = [8200n, 8200n, 8200n, 8200n];  // 8 × 16426² ≈ 2.2e9 values: allocatable, and 8.6 GB of it
    let caught: unknown;
    await finetune(model, data, { epochs: 1, batchSize: 8 }).catch((e) => (caught = e));
    expect(caught).to.be.instanceOf(TrainingError);
    expect((caught as TrainingError).layer).to.equal('conv1');
    // Found on one sample before training: no batch size helps.
    expect((caught as Error).message).to.match(/^Conv node 'conv1': its output would hold \d+ values for a batch of 1, more than a training step allocates at once \(2\^30 float32 values, 4 GiB\): check the layer's pads, strides and dilations\.$/);
  });

  it('unsupported operators are named before training starts', async () => {
    const bytes = buildModel({
      inputDims: ['N', 4], nodes: [{ op: 'Gemm', inputs: ['input', 'w'], output: 'h' }, { op: 'Tanh', inputs: ['h'], output: 'y' }],
      initializers: { w: { dims: [4, 2], data: [1, 2, 3, 4, 5, 6, 7, 8] } }, output: 'y',
    });
    await expectError(finetune(bytes, { inputs: { data: new Float32Array(8), dims: [2, 4] }, labels: Int32Array.of(0, 1) }), TrainingError, /not support: Tanh/);
  });

  it('BatchNormalization over [N, C]: a last batch of one sample joins the one before; a batch of one is an error naming the node', async () => {
    const bytes = buildModel({
      inputDims: ['N', 4],
      nodes: [
        { op: 'Gemm', inputs: ['input', 'w'], output: 'h' },
        { op: 'BatchNormalization', inputs: ['h', 'g', 'b', 'm', 'v'], output: 'n', name: 'bn' },
        { op: 'Gemm', inputs: ['n', 'w2'], output: 'y' },
      ],
      initializers: {
        w: { dims: [4, 3], data: [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3] }, w2: { dims: [3, 2], data: [1, -1, 0.5, 0.2, -0.3, 1] },
        g: { dims: [3], data: [1, 1, 1] }, b: { dims: [3], data: [0, 0, 0] }, m: { dims: [3], data: [0, 0, 0] }, v: { dims: [3], data: [1, 1, 1] },
      },
      output: 'y',
    });
    const data = (n: number) => ({ inputs: { data: Float32Array.from({ length: 4 * n }, (_, i) => Math.sin(i)), dims: [n, 4] }, labels: Int32Array.from({ length: n }, (_, i) => i % 2) });
    const sizes: number[] = [];
    const { history } = await finetune(bytes, data(9), { batchSize: 4, epochs: 1, onStep: (p) => sizes.push(p.step) });
    expect(sizes).to.deep.equal([1, 2]);  // 4 + 5 samples, not 4 + 4 + 1
    expect(history[0].images).to.equal(9);
    await expectError(finetune(bytes, data(2), { batchSize: 1, epochs: 1 }), Error,
      /BatchNormalization node 'bn': a batch of 1 sample gives one value per channel, so no batch statistics: train with batches of 2 or more samples/);
    // From an iterable (no merging): the stop keeps what the batches before it trained.
    const nine = data(9);
    const batches = [0, 4, 8].map((from) => {
      const to = Math.min(9, from + 4);
      return { inputs: { data: nine.inputs.data.slice(from * 4, to * 4), dims: [to - from, 4] }, labels: nine.labels.slice(from, to) };
    });
    const stop = await expectError(finetune(bytes, batches as unknown as AsyncIterable<LabelledBatch>, { epochs: 1 }), TrainingError,
      /^Training stopped at epoch 1, step 3: BatchNormalization node 'bn': a batch of 1 sample .*\. The error's model holds the weights trained before this batch\.$/);
    expect((stop as TrainingError).step).to.equal(3);
    expect((stop as TrainingError).layer).to.equal('bn');
    expect((stop as TrainingError).model).to.be.instanceOf(Uint8Array);
  });

  it('BatchNormalization statistics in initializers other inputs read too (deduplicated by an exporter) get their own copies', async () => {
    const bytes = buildModel({
      inputDims: ['N', 2, 4, 4],
      nodes: [
        { op: 'Conv', inputs: ['input', 'w1', 'zeros'], output: 'c1', name: 'conv1' },
        { op: 'BatchNormalization', inputs: ['c1', 'ones', 'zeros', 'zeros', 'ones'], output: 'n1', name: 'bn1' },
        { op: 'Relu', inputs: ['n1'], output: 'r1' },
        { op: 'Conv', inputs: ['r1', 'w2'], output: 'c2', name: 'conv2' },
        { op: 'BatchNormalization', inputs: ['c2', 'ones', 'zeros', 'zeros', 'ones'], output: 'n2', name: 'bn2' },
        { op: 'GlobalAveragePool', inputs: ['n2'], output: 'p' },
        { op: 'Flatten', inputs: ['p'], output: 'f' },
        { op: 'Gemm', inputs: ['f', 'fw'], output: 'y', attrs: { transB: 1 } },
      ],
      initializers: {
        w1: { dims: [2, 2, 1, 1], data: [1, 0.5, -0.5, 1] }, w2: { dims: [2, 2, 1, 1], data: [0.3, 1, 1, -0.2] },
        zeros: { dims: [2], data: [0, 0] }, ones: { dims: [2], data: [1, 1] }, fw: { dims: [2, 2], data: [1, -1, -1, 1] },
      },
      output: 'y',
    });
    const data = { inputs: { data: Float32Array.from({ length: 8 * 32 }, (_, i) => Math.sin(i) + 0.5), dims: [8, 2, 4, 4] }, labels: Int32Array.from({ length: 8 }, (_, i) => i % 2) };
    // 'ones' with its values in float_data, as some exporters store small tensors: the copies keep them.
    const proto = readModel(bytes);
    Object.assign(proto.graph!.initializer.find((t) => t.name === 'ones')!, { rawData: new Uint8Array(0), floatData: [1, 1] });
    const { model } = await finetune(proto, data, { epochs: 1, batchSize: 4 });
    const g = readModel(model!).graph!;
    const values = (name: string) => Array.from(floatData(g.initializer.find((t) => t.name === name)!)!);
    const [bn1, bn2] = g.node.filter((n) => n.opType === 'BatchNormalization');
    const statistics = [bn1.input[3], bn1.input[4], bn2.input[3], bn2.input[4]];
    expect(new Set(statistics).size).to.equal(4);
    const conv1 = g.node.find((n) => n.name === 'conv1')!;
    expect(statistics).not.to.include(conv1.input[2]);
    // Each moved on its own: the running means are the batches' means, not the trained bias (nor each other).
    expect(values(bn1.input[3])).not.to.deep.equal(values(conv1.input[2]));
    expect(values(bn1.input[3])).not.to.deep.equal(values(bn2.input[3]));
    expect(values(bn1.input[4])).not.to.deep.equal(values(bn2.input[4]));
    // 'zeros' made by a Constant node whose tensor has no name (as numpy_helper and Paddle write them): the copies
    // are named after the value.
    const constant = readModel(bytes);
    const zeros = constant.graph!.initializer.find((t) => t.name === 'zeros')!;
    constant.graph!.initializer = constant.graph!.initializer.filter((t) => t !== zeros);
    constant.graph!.node.unshift(create(NodeProtoSchema, { opType: 'Constant', name: 'zeros_node', output: ['zeros'], attribute: [
      create(AttributeProtoSchema, { name: 'value', type: AttributeProto_AttributeType.TENSOR, t: { ...zeros, name: '' } })] }));
    const trained = readModel((await finetune(constant, data, { epochs: 1, batchSize: 4 })).model!).graph!;
    const means = trained.node.filter((n) => n.opType === 'BatchNormalization').map((n) => n.input[3]);
    expect(means.every((m) => /^zeros_\d+$/.test(m)), means.join()).to.equal(true);
    expect(new Set(means).size).to.equal(2);
  });

  it('a model with BatchNormalization in training mode, or Dropout with training_mode true, is refused before training', async () => {
    const bn = buildModel({
      inputDims: ['N', 3, 2, 2],
      nodes: [
        { op: 'BatchNormalization', inputs: ['input', 'g', 'b', 'm', 'v'], output: 'n', name: 'bn', attrs: { training_mode: 1 } },
        { op: 'Flatten', inputs: ['n'], output: 'y' },
      ],
      initializers: { g: { dims: [3], data: [1, 1, 1] }, b: { dims: [3], data: [0, 0, 0] }, m: { dims: [3], data: [0, 0, 0] }, v: { dims: [3], data: [1, 1, 1] } },
      output: 'y', opset: 15,
    });
    expect(() => new TrainableModel(readModel(bn))).to.throw(TrainingError, /BatchNormalization 'bn' is in training mode .*model\.eval\(\)/);
    const dropout = readModel(buildModel({
      inputDims: ['N', 4], nodes: [{ op: 'Gemm', inputs: ['input', 'w'], output: 'h' }, { op: 'Dropout', inputs: ['h', 'ratio', 'tm'], output: 'y', name: 'drop' }],
      initializers: { w: { dims: [4, 2], data: [1, 2, 3, 4, 5, 6, 7, 8] }, ratio: { dims: [], data: [0.5] } }, output: 'y',
    }));
    dropout.graph!.initializer.push({ ...dropout.graph!.initializer[1], name: 'tm', dataType: 9, dims: [], rawData: Uint8Array.of(1) });
    expect(() => new TrainableModel(dropout)).to.throw(TrainingError, /Dropout 'drop' has training_mode true/);
    dropout.graph!.initializer[2].rawData = Uint8Array.of(0);
    expect(() => new TrainableModel(dropout)).not.to.throw();
  });

  it('logits with more rows than samples (a Reshape to [-1, classes]) are refused before training, not trained against the wrong labels', async () => {
    const bytes = buildModel({
      inputDims: ['N', 4], nodes: [{ op: 'MatMul', inputs: ['input', 'w'], output: 'h' }, { op: 'Reshape', inputs: ['h', 'shape'], output: 'y' }],
      initializers: { w: { dims: [4, 6], data: Array.from({ length: 24 }, (_, i) => (i % 5) / 5 - 0.4) } }, int64: { shape: [-1, 2] }, output: 'y',
    });
    let steps = 0;
    await expectError(finetune(bytes, { inputs: { data: new Float32Array(8).fill(1), dims: [2, 4] }, labels: Int32Array.of(0, 1) }, { onStep: () => steps++ }),
      TrainingError, /^The model's output 'y' is \[3, 2\] for 1 input sample; fine-tuning a classifier needs logits \[N, classes\], one row per sample\.$/);
    expect(steps).to.equal(0);
  });

  it('a model with nothing to train (its weight behind a Transpose) is refused, not trained without change; one behind an Identity trains', async () => {
    const behind = (op: string) => buildModel({
      inputDims: ['N', 4], nodes: [{ op, inputs: ['w'], output: 'wi' }, { op: 'Gemm', inputs: ['input', 'wi'], output: 'y', attrs: op === 'Transpose' ? { transB: 1 } : {} }],
      initializers: { w: { dims: [4, 2], data: [1, 2, 3, 4, 5, 6, 7, 8] } }, output: 'y',
    });
    const few = { inputs: { data: Float32Array.from({ length: 8 }, (_, i) => Math.sin(i)), dims: [2, 4] }, labels: Int32Array.of(0, 1) };
    for (const method of ['float', 'lsq'] as const) {
      await expectError(finetune(behind('Transpose'), few, { method }), TrainingError, /^The model has no weight the engine can train: .* weights behind Transpose or Cast nodes stay constants: fold those nodes into their initializers \(as onnxsim does\), and fine-tune that model\.$/);
      const { model } = await finetune(behind('Identity'), few, { method, epochs: 1 });
      const trained = readModel(model!);
      const w = trained.graph!.initializer.find((t) => t.name === 'w');
      if (method === 'float') expect(Array.from(floatData(w!)!)).not.to.deep.equal([1, 2, 3, 4, 5, 6, 7, 8]);
      else expect(trained.graph!.node.map((n) => n.opType)).to.include('DequantizeLinear');  // the weight quantized for export
    }
    const proto = readModel(behind('Identity'));
    await finetune(proto, few, { epochs: 1 });
    expect(proto.graph!.node.map((n) => n.opType)).to.deep.equal(['Identity', 'Gemm']);  // a caller's ModelProto is left as it was
  });

  it('a quantized export the model cannot reach (opset 6, below what lowbit converts) is refused before training', async () => {
    const bytes = buildModel({
      opset: 6, inputDims: ['N', 4], nodes: [{ op: 'Gemm', inputs: ['input', 'w'], output: 'y' }],
      initializers: { w: { dims: [4, 2], data: [1, 2, 3, 4, 5, 6, 7, 8] } }, output: 'y',
    });
    let steps = 0;
    await expectError(finetune(bytes, { inputs: { data: new Float32Array(8).fill(0.5), dims: [2, 4] }, labels: Int32Array.of(0, 1) },
      // Its one layer is first and last: 8 bits, per-axis QDQ of opset 13.
      { method: 'lsq', epochs: 50, onStep: () => steps++ }), TrainingError, /^The quantized model needs opset 13, and this model \(opset 6\) cannot be converted: .*\(Found before training\.\)$/);
    expect(steps).to.equal(0);
  });

  it('a model whose own shapes do not fit (Gemm after a mismatched Flatten) is an OnnxModelError before training, also when distilling', async () => {
    const bytes = buildModel({
      inputDims: ['N', 1, 4, 4], nodes: [{ op: 'Flatten', inputs: ['input'], output: 'f' }, { op: 'Gemm', inputs: ['f', 'w'], output: 'y' }],
      initializers: { w: { dims: [15, 2], data: new Float32Array(30).fill(0.1) } }, output: 'y',
    });
    const inputs = { data: new Float32Array(32).fill(1), dims: [2, 1, 4, 4] };
    const pattern = /^The model does not compute on data's input dims \[1, 1, 4, 4\]: Gemm node .*inner sizes 16 and 15 differ/;
    await expectError(finetune(bytes, { inputs, labels: Int32Array.of(0, 1) }), OnnxModelError, pattern);
    await expectError(finetune(bytes, { inputs }, { distill: true, epochs: 1 }), OnnxModelError, pattern);
  });

  it('a model of invalid structure is an OnnxModelError, as from quantizeModel; an output no operator computes is refused (mutation fuzz)', async () => {
    const edited = (edit: (nodes: import('onnx-buf').NodeProto[]) => void) => editedModel(BUNDLED, edit);
    const data = subset('train', 8);
    // Each reached the loss as an undefined tensor: "Cannot read properties of undefined (reading 'dims')".
    await expectError(finetune(edited((nodes) => { nodes.find((n) => n.name === 'fc')!.output[0] = 'bn2.gamma'; }), data),
      OnnxModelError, /^The value 'bn2.gamma' is defined twice \(initializer 'bn2.gamma', and an output of node 'fc'\)/);
    await expectError(finetune(edited((nodes) => Object.assign(nodes.find((n) => n.name === 'fc')!, { opType: 'Constant' })), data),
      OnnxModelError, /^Node 'fc' \(Constant\) has no value attribute \(value, value_float, value_ints…\): the model is invalid/);
    const constantOutput = buildModel({
      inputDims: ['N', 1, 2, 2], nodes: [{ op: 'Flatten', inputs: ['input'], output: 'f' }, { op: 'Gemm', inputs: ['f', 'w'], output: 'z' }],
      initializers: { w: { dims: [4, 2], data: new Float32Array(8).fill(0.1) } }, output: 'w',
    });
    await expectError(finetune(constantOutput, { inputs: { data: new Float32Array(8), dims: [2, 1, 2, 2] }, labels: Int32Array.of(0, 1) }),
      TrainingError, /^The model's output 'w' is not computed by any of its operators \(it is a constant or an input\)/);
  });

  it('a non-finite loss stops training, names the step and the layer, and keeps the last good weights', async () => {
    const e = await expectError(finetune(mnistCnn(9), subset('train', 256), { batchSize: 32, learningRate: 1e30, momentum: 0 }), TrainingError,
      /epoch 1, step \d+: (the loss is (NaN|Infinity|-Infinity);|the loss is finite, but) values first became non-finite in (the output|the running statistics) of \w+\./) as TrainingError;
    expect(e.step).to.be.above(1);
    expect(e.layer).to.be.a('string');
    const weights = readModel(e.model!).graph!.initializer.map((t) => floatData(t)).filter((d): d is Float32Array => !!d);
    expect(weights.every((w) => w.every(Number.isFinite))).to.equal(true);
    // The last good model still runs.
    const out = await ortLogits(e.model!, subset('t10k', 4));
    expect(out.length).to.equal(40);
  });

  it('writes the model atomically when outputPath is given', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-ft-'));
    try {
      const file = path.join(dir, 'out.onnx');
      const r = await finetune(BUNDLED, data, { outputPath: file });
      expect(Buffer.from(fs.readFileSync(file)).equals(Buffer.from(r.model))).to.equal(true);
      expect(fs.readdirSync(dir)).to.deep.equal(['out.onnx']);
      let caught: unknown;
      await finetune(BUNDLED, data, { outputPath: path.join(dir, 'missing', 'out.onnx') }).catch((e) => (caught = e));
      expect(caught).to.be.instanceOf(RangeError);
      expect((caught as Error).message).to.match(/existing folder for options\.outputPath .*missing does not exist/);
      // A folder it cannot write to is found before training, not when the trained model is written (root writes
      // anywhere chmod forbids: sysfs refuses new files to everyone).
      const locked = process.getuid?.() === 0 ? '/sys' : path.join(dir, 'locked');
      if (locked !== '/sys') fs.mkdirSync(locked, { mode: 0o500 });
      let epochs = 0;
      caught = undefined;
      await finetune(BUNDLED, data, { outputPath: path.join(locked, 'out.onnx'), onEpoch: () => void epochs++ }).catch((e) => (caught = e));
      expect(caught).to.be.instanceOf(RangeError);
      expect((caught as Error).message).to.match(/a folder lowbit can write to for options\.outputPath but received ".*out\.onnx": creating a file in .* failed \((EACCES|EPERM|EROFS)/);
      expect(epochs).to.equal(0);
      if (locked !== '/sys') expect(fs.readdirSync(locked)).to.deep.equal([]);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('finetune: quantizer set-up and non-finite values (audit)', () => {
  const batchesOf = (data: LabelledBatch, size: number) => ({
    async *[Symbol.asyncIterator]() {
      const n = data.inputs.dims[0];
      for (let i = 0; i < n; i += size) {
        yield { inputs: { data: data.inputs.data.subarray(i * 784, (i + size) * 784), dims: [size, 1, 28, 28] }, labels: data.labels.subarray(i, i + size) };
      }
    },
  });

  it('LSQ and GDRQ train on an async iterable of batches (the probe runs the float model, before any step exists)', async () => {
    for (const method of ['lsq', 'gdrq'] as const) {
      const { history } = await finetune(BUNDLED, batchesOf(subset('train', 64), 32), { method, weightBits: 4, activationBits: 4 });
      expect(history[0].images).to.equal(64);
    }
  });

  it("GDRQ with 'max' step initialisation runs (its running clips pass values through while the LSQ edge layers observe)", async () => {
    const { history } = await finetune(BUNDLED, subset('train', 64), { method: 'gdrq', weightBits: 2, activationBits: 4, stepInit: 'max', batchSize: 32 });
    expect(history[0].images).to.equal(64);
  });

  it('LSQ activation steps made in the first forward pass take the first update like every other parameter', async () => {
    // One step: with a learning rate of ~0 the activation steps stay at their initial values, with 0.05 they move.
    const data = subset('train', 64);
    const opts = { method: 'lsq' as const, weightBits: 4 as const, activationBits: 4 as const, epochs: 1, batchSize: 64, learningRateSchedule: 'constant' as const };
    const still = await finetune(BUNDLED, data, { ...opts, learningRate: Number.MIN_VALUE });
    const moved = await finetune(BUNDLED, data, { ...opts, learningRate: 0.05 });
    const changed = still.layers.filter((l, i) => l.activationScale !== moved.layers[i].activationScale);
    expect(changed.length).to.equal(still.layers.length);
  });

  it('QAT stops on non-finite values that fake quantizers hide from the loss, and on an update that makes parameters non-finite', async () => {
    const run = (learningRate: number) => finetune(BUNDLED, subset('train', 256), { method: 'lsq', weightBits: 2, activationBits: 4, batchSize: 32, learningRate, momentum: 0 });
    // lr 1e30: step 1's update leaves huge finite weights; step 2's convolutions overflow, and the next quantizer maps Infinity to a code.
    const masked = await expectError(run(1e30), TrainingError,
      /step 2: the loss is finite, but values first became non-finite in the output of conv\d/) as TrainingError;
    // lr 1e20: step 2's batch statistics overflow into bn2's running variance, which no output shows.
    const statistics = await expectError(run(1e20), TrainingError, /step 2: .* values first became non-finite in the running statistics of bn2\./) as TrainingError;
    // lr 1e300: the first update overflows the weights themselves.
    const broken = await expectError(run(1e300), TrainingError, /step 1: its update made parameter '[\w.]+' non-finite/) as TrainingError;
    for (const e of [masked, statistics, broken]) {
      expect(e.layer).to.be.a('string');
      const weights = readModel(e.model!).graph!.initializer.map((t) => floatData(t)).filter((d): d is Float32Array => !!d);
      expect(weights.every((w) => w.every(Number.isFinite))).to.equal(true);
    }
  });

  it('GDRQ stopped on a non-finite update returns an export with finite weights and scales (an MLP without BatchNormalization)', async () => {
    // (The fake-quantized weights stay bounded, so the activations here stay finite and the update is what stops it;
    // the running clip thresholds' own restore is not isolated by this test.)
    const r = (seed: number) => { let v = seed; return () => ((v = (v * 1103515245 + 12345) % 2147483648) / 2147483648) * 2 - 1; };
    const next = r(3);
    const dense = (rows: number, cols: number) => ({ dims: [rows, cols], data: Array.from({ length: rows * cols }, next) });
    const mlp = buildModel({
      inputDims: ['N', 784], output: 'y',
      initializers: { w1: dense(784, 32), w2: dense(32, 32), w3: dense(32, 32), w4: dense(32, 10) },
      nodes: [
        { op: 'MatMul', inputs: ['input', 'w1'], output: 'h1', name: 'fc1' }, { op: 'Relu', inputs: ['h1'], output: 'r1' },
        { op: 'MatMul', inputs: ['r1', 'w2'], output: 'h2', name: 'fc2' }, { op: 'Relu', inputs: ['h2'], output: 'r2' },
        { op: 'MatMul', inputs: ['r2', 'w3'], output: 'h3', name: 'fc3' }, { op: 'Relu', inputs: ['h3'], output: 'r3' },
        { op: 'MatMul', inputs: ['r3', 'w4'], output: 'y', name: 'fc4' },
      ],
    });
    const set = subset('train', 256);
    const flat = { inputs: { data: set.inputs.data, dims: [256, 784] }, labels: set.labels };
    const e = await expectError(finetune(mlp, flat, { method: 'gdrq', weightBits: 2, activationBits: 4, batchSize: 32, learningRate: 1e30, momentum: 0 }),
      TrainingError, /step 2: its update made parameter 'w1' non-finite/) as TrainingError;
    const tensors = readModel(e.model!).graph!.initializer.map((t) => floatData(t)).filter((d): d is Float32Array => !!d);
    expect(tensors.every((t) => t.every(Number.isFinite))).to.equal(true);
  });

  it('Infinity reaching a GDRQ running clip or a new LSQ activation step stops training naming the layer', async () => {
    // Weights scaled by 1e20 make fc3's output overflow in the first forward pass; fc4's activation quantizer sees
    // Infinity. (The running clip's threshold, or LSQ's first step, took it before, and the kernel refused the
    // infinite step with a RangeError.)
    const r = (seed: number) => { let v = seed; return () => ((v = (v * 1103515245 + 12345) % 2147483648) / 2147483648) * 2 - 1; };
    const next = r(5);
    const dense = (rows: number, cols: number, scale = 1) => ({ dims: [rows, cols], data: Array.from({ length: rows * cols }, () => next() * scale) });
    const layers = [dense(784, 16), dense(16, 16, 1e20), dense(16, 16, 1e20), dense(16, 16), dense(16, 10)];
    const nodes = layers.flatMap((_, i) => [
      { op: 'MatMul', inputs: [i === 0 ? 'input' : `r${i}`, `w${i + 1}`], output: i === layers.length - 1 ? 'y' : `h${i + 1}`, name: `fc${i + 1}` },
      ...(i === layers.length - 1 ? [] : [{ op: 'Relu', inputs: [`h${i + 1}`], output: `r${i + 1}` }]),
    ]);
    const mlp = buildModel({ inputDims: ['N', 784], output: 'y', initializers: Object.fromEntries(layers.map((w, i) => [`w${i + 1}`, w])), nodes });
    const set = subset('train', 64);
    for (const method of ['gdrq', 'lsq'] as const) {
      const e = await expectError(finetune(mlp, { inputs: { data: set.inputs.data, dims: [64, 784] }, labels: set.labels },
        { method, weightBits: 4, activationBits: 4, batchSize: 32, learningRate: 1e-3 }),
      TrainingError, /step 1: the loss is finite, but values first became non-finite in the output of fc3, on the first batch, before any update: the model as given with its quantizers computes them, so the error holds no model\./) as TrainingError;
      // No update ran: there are no trained weights to return, and the activation clips were never observed.
      expect([e.step, e.layer, e.model], method).to.deep.equal([1, 'fc3', undefined]);
    }
  });

  it('GDRQ stopped by values that overflow returns the model of the last good step, running clip thresholds included', async () => {
    // The first layer's input goes through a running clip (edge layers at 4 bits too). Batch 3 holds values near the
    // float32 maximum: its threshold update stays finite, fc1's output overflows. The error's model must be the one
    // after step 1 (the weights step 2 ran with), thresholds included: the same bytes as training on batch 1 alone.
    const r = (seed: number) => { let v = seed; return () => ((v = (v * 1103515245 + 12345) % 2147483648) / 2147483648) * 2 - 1; };
    const next = r(5);
    const dense = (rows: number, cols: number) => ({ dims: [rows, cols], data: Array.from({ length: rows * cols }, next) });
    const mlp = buildModel({
      inputDims: ['N', 784], output: 'y', initializers: { w1: dense(784, 16), w2: dense(16, 16), w3: dense(16, 10) },
      nodes: [
        { op: 'MatMul', inputs: ['input', 'w1'], output: 'h1', name: 'fc1' }, { op: 'Relu', inputs: ['h1'], output: 'r1' },
        { op: 'MatMul', inputs: ['r1', 'w2'], output: 'h2', name: 'fc2' }, { op: 'Relu', inputs: ['h2'], output: 'r2' },
        { op: 'MatMul', inputs: ['r2', 'w3'], output: 'y', name: 'fc3' },
      ],
    });
    const set = subset('train', 96);
    const batch = (i: number, scale = 1) => ({
      inputs: { data: set.inputs.data.slice(i * 32 * 784, (i + 1) * 32 * 784).map((v) => v * scale), dims: [32, 784] }, labels: set.labels.slice(i * 32, (i + 1) * 32),
    });
    const iterable = (batches: ReturnType<typeof batch>[]) => ({ async * [Symbol.asyncIterator]() { yield* batches; } });
    const options = { method: 'gdrq' as const, weightBits: 4 as const, activationBits: 4 as const, firstLastLayerBits: 4 as const, learningRate: 0.05 };
    const e = await expectError(finetune(mlp, iterable([batch(0), batch(1), batch(2, 1e38)]), options),
      TrainingError, /step 3: the loss is finite, but values first became non-finite in the output of fc1/) as TrainingError;
    const afterStep1 = await finetune(mlp, iterable([batch(0)]), options);
    const tensors = (bytes: Uint8Array) => readModel(bytes).graph!.initializer.map((t) => [t.name, Array.from(floatData(t) ?? [])] as const);
    expect(tensors(e.model!)).to.deep.equal(tensors(afterStep1.model));
    expect(tensors(e.model!).filter(([name]) => /r1.*scale|scale.*r1/.test(name)).length, 'a running clip scale is compared').to.be.greaterThan(0);
    // Stopped at step 2, the last good weights are the ones given, with the clip thresholds step 1's forward pass
    // observed on them (the snapshot before step 1 held them unset: scales of 1e-8, every activation saturated).
    const early = await expectError(finetune(mlp, iterable([batch(0), batch(1, 1e38)]), options),
      TrainingError, /step 2: the loss is finite, but values first became non-finite in the output of fc1/) as TrainingError;
    const clipScales = tensors(early.model!).filter(([name]) => /^(input|r\d).*scale/.test(name));
    expect(clipScales.map(([name]) => name), 'the three layers\' input clip scales').to.have.length(3);
    for (const [name, values] of clipScales) expect(values[0], name).to.be.greaterThan(1e-4);
  });

  it('the last update is checked too: a diverging final step is an error, not a returned model', async () => {
    const e = await expectError(finetune(mnistCnn(9), subset('train', 32), { batchSize: 32, learningRate: 1e300, momentum: 0 }), TrainingError,
      /epoch 1, step 1: its update made parameter '[\w.]+' non-finite/) as TrainingError;
    expect(e.step).to.equal(1);
    const weights = readModel(e.model!).graph!.initializer.map((t) => floatData(t)).filter((d): d is Float32Array => !!d);
    expect(weights.every((w) => w.every(Number.isFinite))).to.equal(true);
  });

  it('a MatMul whose constant weight comes first (W·x) quantizes x as the activation, in the engine and in the export', async () => {
    const r = (seed: number) => { let s = seed; return () => ((s = (s * 1103515245 + 12345) % 2147483648) / 2147483648) * 2 - 1; };
    const next = r(1);
    const bytes = buildModel({
      inputDims: ['N', 4], output: 'y', initializers: { W: { dims: [3, 4], data: Array.from({ length: 12 }, next) } },
      nodes: [
        { op: 'Transpose', inputs: ['input'], output: 't', attrs: { perm: [1, 0] } },
        { op: 'MatMul', inputs: ['W', 't'], output: 'm', name: 'mm' },
        { op: 'Transpose', inputs: ['m'], output: 'y', attrs: { perm: [1, 0] } },
      ],
    });
    const data = { inputs: { data: Float32Array.from({ length: 64 }, next), dims: [16, 4] }, labels: Int32Array.from({ length: 16 }, (_, i) => i % 3) };
    const result = await finetune(bytes, data, { method: 'lsq', epochs: 1, batchSize: 16, learningRate: 1e-3 });
    const graph = readModel(result.model).graph!;
    const matmul = graph.node.find((n) => n.opType === 'MatMul')!;
    const producer = (name: string) => graph.node.find((n) => n.output.includes(name));
    // x's side goes through QuantizeLinear -> DequantizeLinear from the Transpose; W's side is its DequantizeLinear of constant codes.
    expect(producer(matmul.input[1])!.opType).to.equal('DequantizeLinear');
    expect(producer(producer(matmul.input[1])!.input[0])!.opType).to.equal('QuantizeLinear');
    expect(producer(producer(producer(matmul.input[1])!.input[0])!.input[0])!.opType).to.equal('Transpose');
    expect(producer(matmul.input[0])!.opType).to.equal('DequantizeLinear');
    expect(producer(producer(matmul.input[0])!.input[0]) ?? 'constant codes').to.equal('constant codes');
    expect(result.layers[0].activationScale).to.not.equal(result.layers[0].weightScale![0]);
  });

  it("an LSQ activation quantizer with 'max' steps on all-negative values (no positive level) gets a finite step gradient", () => {
    const q = new LsqQuantizer('a', 4, 'activation', undefined, undefined, 'max');
    const x = { data: Float32Array.of(-1, -2, -0.5, -3), dims: [1, 4] };
    q.initialize(x);
    q.forward(x, true);
    q.backward(x, undefined, Float32Array.of(1, 1, 1, 1));
    expect(Array.from(q.parameters[0].grad).every(Number.isFinite)).to.equal(true);
  });

  it('LSQ activation gradient scale 1/√(N·Q_P) takes N = features per sample: the rows of x·W inputs, the columns of a W·x matrix', () => {
    // One input, [8 features, 32 samples] as W·x reads it, and its transpose [32 samples, 8 features] as x·W does.
    const values = Float32Array.from({ length: 256 }, (_, i) => Math.sin(i * 0.7) * 2);
    const columns = { data: values, dims: [8, 32] };
    const rows = { data: Float32Array.from({ length: 256 }, (_, i) => values[(i % 8) * 32 + Math.floor(i / 8)]), dims: [32, 8] };
    const stepGradient = (x: { data: Float32Array; dims: number[] }, columnSamples: boolean) => {
      const q = new LsqQuantizer('a', 4, 'activation', true, undefined, 'lsq', columnSamples);
      q.initialize(x);
      q.forward(x, true);
      q.backward(x, undefined, new Float32Array(256).fill(1));
      return q.parameters[0].grad[0];
    };
    const ofRows = stepGradient(rows, false);
    expect(ofRows).to.not.equal(0);
    // The same values and features per sample: the same gradient (to summation order); without columnSamples the
    // W·x matrix counted its 32 columns as features, √(32/8) = 2 times smaller.
    expect(stepGradient(columns, true)).to.be.closeTo(ofRows, 1e-6 * Math.abs(ofRows));
    expect(stepGradient(columns, false)).to.be.closeTo(ofRows / 2, 1e-6 * Math.abs(ofRows));
    // Batched W·x, [2, 8, 16]: still 8 features per sample (it counted 8·16).
    const batched = { data: Float32Array.from({ length: 256 }, (_, i) => values[(i % 128 % 16) + 32 * (i % 128 >> 4) + 16 * (i >> 7)]), dims: [2, 8, 16] };
    expect(stepGradient(batched, true)).to.be.closeTo(ofRows, 1e-6 * Math.abs(ofRows));
  });

  it('a GDRQ weight quantizer on an all-zero weight (Scale-Clip threshold 0) passes its gradient: the layer can train', () => {
    const weight = makeParameter('w', new Float32Array(8), [2, 4], true);
    const q = new GdrqWeightQuantizer('w', 2, weight, 0, 2, 2, 'learned');
    const x = { data: weight.value, dims: weight.dims };
    const { saved } = q.forward(x);
    const dx = q.backward(x, saved, Float32Array.from({ length: 8 }, (_, i) => i - 3.5));
    expect(Array.from(dx).some((g) => g !== 0)).to.equal(true);
  });

  it('pooling with pads as large as the kernel is an error before training (windows wholly in the padding)', async () => {
    const bytes = buildModel({
      inputDims: ['N', 1, 4, 4], output: 'y', initializers: { w: { dims: [2, 4], data: [0.1, 0.2, 0.3, 0.4, -0.1, -0.2, -0.3, -0.4] } },
      nodes: [
        { op: 'AveragePool', inputs: ['input'], output: 'p', attrs: { kernel_shape: [2, 2], strides: [2, 2], pads: [2, 2, 2, 2] } },
        { op: 'Flatten', inputs: ['p'], output: 'f' },
        { op: 'ReduceMean', inputs: ['f'], output: 'g', attrs: { axes: [1], keepdims: 1 } },
        { op: 'Gemm', inputs: ['g', 'w'], output: 'y', attrs: { transB: 0 } },
      ],
    });
    const data = { inputs: { data: new Float32Array(32), dims: [2, 1, 4, 4] }, labels: Int32Array.of(0, 1) };
    let caught: unknown;
    await finetune(bytes, data, { epochs: 1 }).catch((e) => (caught = e));
    expect((caught as Error).message).to.match(/pads \[2, 2, 2, 2\] must be smaller than the 2×2 kernel/);
  });
});

describe('lowbit finetune (CLI)', () => {
  it('fine-tunes from an inputs.npy/labels.npy folder with LSQ W4A4, shows progress and the epoch table, writes the model', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-cli-ft-'));
    const set = subset('train', 256);
    const data = path.join(dir, 'data');
    fs.mkdirSync(data);
    writeNpy(path.join(data, 'inputs.npy'), '<f4', [256, 1, 28, 28], set.inputs.data);
    writeNpy(path.join(data, 'labels.npy'), '|u1', [256], set.labels as Uint8Array);
    const cli = path.resolve(__dirname, '..', '..', 'ts', 'cli.js');
    const r = spawnSync(process.execPath, [cli, 'finetune', BUNDLED, '--data', data, '--validation', data, '--method', 'lsq', '--batch-size', '32'],
      { cwd: dir, encoding: 'utf8' });
    expect(r.status, r.stderr).to.equal(0);
    expect(r.stderr).to.match(/epoch 1 .*8\/8 steps \| loss \d\.\d{4} \| accuracy \d+\.\d\d%/);
    expect(r.stdout).to.match(/validation accuracy %/);
    expect(r.stdout).to.match(/wrote mnist-cnn\.lsq\.onnx \(lsq W4A4\)/);
    expect(readModel(path.join(dir, 'mnist-cnn.lsq.onnx')).graph!.node.some((n) => n.opType === 'QuantizeLinear')).to.equal(true);
    const bad = spawnSync(process.execPath, [cli, 'finetune', BUNDLED, '--data', path.join(dir, 'nope')], { cwd: dir, encoding: 'utf8' });
    expect(bad.status).to.equal(1);
    expect(bad.stderr).to.match(/lowbit: .*inputs\.npy/);
    const badLimit = spawnSync(process.execPath, [cli, 'finetune', BUNDLED, '--data', data, '--limit', '0'], { cwd: dir, encoding: 'utf8' });
    expect(badLimit.stderr).to.match(/Expected a positive integer for --limit but received 0\./);
    // Distillation needs inputs only.
    fs.rmSync(path.join(data, 'labels.npy'));
    const distilled = spawnSync(process.execPath, [cli, 'finetune', BUNDLED, '--data', data, '--distill', '--wbits', '8', '--abits', '8',
      '--step-init', 'max', '--per-channel', '--fixed-steps', '--optimizer', 'adam', '--lr', '0.0001', '--batch-size', '64', '-o', 'distilled.onnx'], { cwd: dir, encoding: 'utf8' });
    expect(distilled.status, distilled.stderr).to.equal(0);
    expect(distilled.stdout).to.match(/train agreement %/);
    expect(fs.existsSync(path.join(dir, 'distilled.onnx'))).to.equal(true);
    fs.rmSync(dir, { recursive: true });
  });

  it("refuses an output over the training data's files, and names the flag and file of bad data, not the API's parameter", () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-cli-ft-'));
    try {
      const set = subset('train', 32);
      const [data, validation] = [path.join(dir, 'data'), path.join(dir, 'validation')];
      for (const folder of [data, validation]) {
        fs.mkdirSync(folder);
        writeNpy(path.join(folder, 'inputs.npy'), '<f4', [32, 1, 28, 28], set.inputs.data);
      }
      const labels = Uint8Array.from(set.labels);
      writeNpy(path.join(data, 'labels.npy'), '|u1', [32], labels);
      labels[5] = 12;
      writeNpy(path.join(validation, 'labels.npy'), '|u1', [32], labels);
      const cli = path.resolve(__dirname, '..', '..', 'ts', 'cli.js');
      const lowbit = (...args: string[]) => spawnSync(process.execPath, [cli, 'finetune', BUNDLED, ...args], { cwd: dir, encoding: 'utf8' });
      const before = fs.readFileSync(path.join(data, 'inputs.npy'));
      for (const [flag, file] of [['--data', 'inputs.npy'], ['--data', 'labels.npy'], ['--validation', 'inputs.npy']]) {
        const r = lowbit('--data', data, '--validation', validation, '-o', path.join(flag === '--data' ? data : validation, file));
        expect(r.status).to.equal(1);
        expect(r.stderr).to.include(`Expected --output to name a file other than ${flag}'s ${file} (`);
      }
      expect(fs.readFileSync(path.join(data, 'inputs.npy')).equals(before)).to.equal(true);
      const bad = lowbit('--data', data, '--validation', validation, '-o', 'out.onnx');
      expect(bad.status).to.equal(1);
      expect(bad.stderr).to.match(/ for --validation's labels\.npy\[5\] but received 12/);
    } finally {
      fs.rmSync(dir, { recursive: true });
    }
  });
});
