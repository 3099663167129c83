// quantizeModel and the CLI on inputs found by an audit: streams as calibration data, .npy folders that do not
// line up, evaluation per sample, cancelling, and ONNX rewrites (Slice ends, com.microsoft biases, Gemm alpha,
// Dropout masks, IR versions, external data paths).
import { create, fromBinary, toBinary } from '@bufbuild/protobuf';
import { expect } from 'chai';
import { spawn, spawnSync } from 'node:child_process';
import { runInNewContext } from 'node:vm';
import * as v8 from 'node:v8';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { EventEmitter, getEventListeners } from 'node:events';
import * as readline from 'node:readline';
import { Readable } from 'node:stream';
import {
  AttributeProto_AttributeType, AttributeProtoSchema, ModelProtoSchema, NodeProtoSchema, SparseTensorProtoSchema, StringStringEntryProtoSchema, TensorProto_DataLocation, TensorProto_DataType,
  TensorProtoSchema, ValueInfoProtoSchema,
} from 'onnx-buf';

import { ort } from '../../ts/bench/ort-models';
import { abortable } from '../../ts/onnx/passes/pass';
import { calibrate, checkFeed, makeObserver, readNpyFeed } from '../../ts/onnx/calibrate';
import { HistogramObserver } from '../../ts/calibration/observers';
import { quantizeTensor } from '../../ts/quantize';
import { floatData as floatDataOf, Graph, isChannelVector } from '../../ts/onnx/graph';
import { inspectModel } from '../../ts/onnx/inspect';
import { OnnxModelError, readModel, serializeModel } from '../../ts/onnx/model-io';
import { foldBatchNorm } from '../../ts/onnx/passes/fold-batchnorm';
import { quantized } from '../../ts/onnx/passes/quantize-weights';
import { densifySparseInitializers } from '../../ts/onnx/passes/sparse-initializers';
import { upgradeOpset } from '../../ts/onnx/passes/upgrade-opset';
import { compareOutputs, quantizeModel, randomFeeds } from '../../ts/onnx/quantize-model';
import { toFloat16Array } from '../../ts/float16';
import { finetune } from '../../ts/train/finetune';
import { writeNpy } from '../helpers/npy';
import { buildModel, heInit, valueInfo } from '../helpers/onnx-builder';
import { rng } from '../helpers/random';

const root = path.resolve(__dirname, '..', '..', '..');
const mnist = path.join(root, 'assets', 'mnist-cnn.onnx');
const calibrationFolder = path.join(root, 'assets', 'mnist-calibration');
const images = readNpyFeed(path.join(calibrationFolder, 'input', fs.readdirSync(path.join(calibrationFolder, 'input')).sort()[0]));

/** MNIST images [from, from + count) of the bundled calibration batch, as one feed. */
function feed(from: number, count: number) {
  return { input: { data: (images.data as Float32Array).slice(from * 784, (from + count) * 784), dims: [count, 1, 28, 28] } };
}

async function run(model: Uint8Array, feeds: Record<string, { data: Float32Array; dims: number[] }>) {
  const O = ort();
  const session = await O.InferenceSession.create(model);
  const out = await session.run(Object.fromEntries(Object.entries(feeds).map(([k, v]) => [k, new O.Tensor('float32', v.data, v.dims)])));
  await session.release();
  return out;
}

describe('calibration data read once or twice', () => {
  it('a Node stream (a new iterator per call, over data read once) gets one pass: GPTQ with activations reports it', async () => {
    const batches = [feed(0, 8), feed(8, 8)];
    const { report } = await quantizeModel(mnist, {
      weights: { bits: 4, rounding: 'gptq' }, activations: { bits: 8 }, calibration: Readable.from(batches), evaluationFeeds: [],
    });
    expect(report.calibrationBatches).to.equal(2);
    const gptq = report.passes.find((p) => p.pass === 'gptq-inputs')!;
    expect(gptq.skipped[0].reason).to.match(/can be read only once/);
  });

  it('a re-iterable dataset that is also an EventEmitter gets both passes; a readline interface and a web stream one', async () => {
    const batches = [feed(0, 8), feed(8, 8)];
    class Dataset extends EventEmitter {
      reads = 0;
      * [Symbol.iterator]() {
        this.reads++;
        this.emit('read');
        yield* batches;
      }
    }
    const dataset = new Dataset();
    const options = { weights: { bits: 4 as const, rounding: 'gptq' as const }, activations: { bits: 8 as const }, evaluationFeeds: [] };
    const both = await quantizeModel(mnist, { ...options, calibration: dataset });
    expect(both.report.passes.find((p) => p.pass === 'gptq-inputs')!.skipped).to.deep.equal([]);
    expect(dataset.reads).to.equal(2);
    const lines = readline.createInterface({ input: Readable.from([]) });
    const webStream = new ReadableStream({ start(c) { batches.forEach((b) => c.enqueue(b)); c.close(); } });
    for (const once of [Object.assign(lines, { [Symbol.asyncIterator]: async function * () { yield* batches; } }), webStream]) {
      const { report } = await quantizeModel(mnist, { ...options, calibration: once as unknown as AsyncIterable<ReturnType<typeof feed>> });
      expect(report.passes.find((p) => p.pass === 'gptq-inputs')!.skipped[0].reason).to.match(/can be read only once/);
    }
    lines.close();
  });

  it('an object that reads twice but gives fewer batches the second time is an error naming options.calibration', async () => {
    let reads = 0;
    const shrinking = { * [Symbol.iterator]() { reads++; yield feed(0, 8); if (reads === 1) yield feed(8, 8); } };
    let caught: unknown;
    await quantizeModel(mnist, { weights: { bits: 4, rounding: 'gptq' }, activations: { bits: 8 }, calibration: shrinking, evaluationFeeds: [] })
      .catch((e) => (caught = e));
    expect((caught as Error).message).to.match(/the same 2 batches on its second reading .* for options\.calibration but received "1 batches"/);
  });
});

describe('calibration feeds of the wrong array type', () => {
  it('name the conversion (Float64Array, Array, int64 input from numbers) or the other realm', async () => {
    const cases: Array<[unknown, RegExp]> = [
      [new Float64Array(784), /received Float64Array of length 784\. Convert it with Float32Array\.from\(values\)\.$/],
      [new Array(784).fill(0), /received Array of length 784\. Convert it with Float32Array\.from\(values\)\.$/],
      [runInNewContext('new Float32Array(784)'), /This Float32Array comes from another JavaScript realm .*new Float32Array\(array\)\.$/],
    ];
    for (const [data, message] of cases) {
      let caught: unknown;
      await quantizeModel(mnist, { weights: { bits: 8 }, activations: { bits: 8 }, calibration: [{ input: { data, dims: [1, 1, 28, 28] } }] as never })
        .catch((e) => (caught = e));
      expect(caught).to.be.instanceOf(TypeError);
      expect((caught as Error).message).to.match(/^Expected a Float32Array \(float32 input\) for calibration\[0\]\.input\.data but /).and.match(message);
    }
    const ids = buildModel({ inputDims: [2], output: 'y', initializers: {}, nodes: [{ op: 'Identity', inputs: ['input'], output: 'y' }] });
    const typed = edited(ids, (m) => { (m.graph!.input[0].type!.value.value as { elemType: number }).elemType = TensorProto_DataType.INT64; });
    expect(() => checkFeed(readModel(typed), { input: { data: [1, 2], dims: [2] } }, 0))
      .to.throw(TypeError, /^Expected a BigInt64Array \(int64 input\) for calibration\[0\]\.input\.data but received \[1, 2\]\. Convert it with BigInt64Array\.from\(values, BigInt\)\.$/);
  });
});

describe('calibration observers (audit)', () => {
  it('KL ranges for signed (symmetric) activations assume the levels such a quantizer has above 0, as quantizeTensor\'s kl does', () => {
    const r = rng(7);
    const n = 1 << 16;
    const data = Float32Array.from({ length: n }, () => { const u = r() - 0.5; return Math.max(0, -Math.sign(u) * Math.log(1 - 2 * Math.abs(u))); });
    for (const bits of [4, 8]) {
      const observer = makeObserver('kl');
      for (let b = 0; b < 8; b++) observer.observe(data.subarray((b * n) / 8, ((b + 1) * n) / 8));
      const direct = quantizeTensor(data, { shape: [n], bits, method: 'kl' });  // signed symmetric
      expect(observer.range(bits, true).hi).to.be.closeTo(direct.scale[0] * (2 ** (bits - 1) - 1), 1e-6);
    }
  });

  it('a histogram\'s bins do not depend on batch order when the maximum is a power of two (bins are half-open)', () => {
    const nonEmpty = (h: HistogramObserver) => [...h.counts.keys()].filter((i) => h.counts[i] > 0);
    const a = new HistogramObserver().observe(Float32Array.of(1)).observe(Float32Array.of(3));
    const b = new HistogramObserver().observe(Float32Array.of(3)).observe(Float32Array.of(1));
    const merged = new HistogramObserver().observe(Float32Array.of(1)).merge(new HistogramObserver().observe(Float32Array.of(3)));
    expect(nonEmpty(a)).to.deep.equal(nonEmpty(b));
    expect(nonEmpty(merged)).to.deep.equal(nonEmpty(b));
    expect(a.percentileRange(50)).to.deep.equal(b.percentileRange(50));
  });

  it('16-bit activations with ACIQ or KL ranges are refused before calibrating', async () => {
    for (const method of ['aciq', 'kl'] as const) {
      let caught: unknown;
      await quantizeModel(mnist, { weights: { bits: 8 }, activations: { bits: 16, method }, calibration: [feed(0, 2)] }).catch((e) => (caught = e));
      expect((caught as Error).message).to.match(/'minmax', 'percentile' or 'mse' with 16-bit activations .* for options\.activations\.method/);
    }
  });
});

describe('.npy calibration folders that do not line up', () => {
  let dir: string;
  beforeEach(() => (dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-npy-'))));
  afterEach(() => fs.rmSync(dir, { recursive: true }));
  const write = (input: string, name: string, dims: number[], data: Float32Array) => {
    fs.mkdirSync(path.join(dir, input), { recursive: true });
    writeNpy(path.join(dir, input, name), '<f4', dims, data);
  };

  it('names a subfolder that holds no .npy file, and takes .NPY files too', async () => {
    fs.mkdirSync(path.join(dir, 'input'));
    fs.writeFileSync(path.join(dir, 'input', 'notes.txt'), 'not a batch');
    const e = await quantizeModel(mnist, { weights: { bits: 8 }, activations: { bits: 8 }, calibration: dir, evaluationFeeds: [] }).catch((x: Error) => x);
    expect(e).to.be.instanceOf(RangeError);
    expect((e as Error).message).to.equal(`${dir}: the subfolder input/ holds no .npy file: put one .npy batch per file in each input's subfolder.`);
    write('input', 'A.NPY', [2, 1, 28, 28], feed(0, 2).input.data);
    const { report } = await quantizeModel(mnist, { weights: { bits: 8 }, activations: { bits: 8 }, calibration: dir, evaluationFeeds: [] });
    expect(report.calibrationBatches).to.equal(1);
  });

  it('skips hidden subfolders, refuses subfolders with different file counts and names the files of a bad batch', async () => {
    write('input', 'a.npy', [2, 1, 28, 28], feed(0, 2).input.data);
    write('input', 'b.npy', [2, 1, 28, 28], feed(2, 2).input.data);
    fs.mkdirSync(path.join(dir, '.ipynb_checkpoints'));
    fs.mkdirSync(path.join(dir, 'input', 'c.npy'));  // a folder named like a batch is no batch
    const { report } = await quantizeModel(mnist, { weights: { bits: 8 }, activations: { bits: 8 }, calibration: dir, evaluationFeeds: [] });
    expect(report.calibrationBatches).to.equal(2);
    write('extra', 'a.npy', [2], Float32Array.of(1, 2));
    let caught: unknown;
    await quantizeModel(mnist, { weights: { bits: 8 }, activations: { bits: 8 }, calibration: dir, evaluationFeeds: [] }).catch((e) => (caught = e));
    expect((caught as Error).message).to.match(/one \.npy file per batch, as many as the others; found extra\/ 1, input\/ 2/);
    fs.rmSync(path.join(dir, 'extra'), { recursive: true });
    write('input', 'b.npy', [2, 1, 28, 27], new Float32Array(2 * 28 * 27));
    caught = undefined;
    await quantizeModel(mnist, { weights: { bits: 8 }, activations: { bits: 8 }, calibration: dir, evaluationFeeds: [] }).catch((e) => (caught = e));
    expect((caught as Error).message).to.match(/calibration\[1\]\.input\.dims .*\(from .*input[/\\]b\.npy\)/);
  });

  it('refuses a .npy file with bytes after its data', () => {
    write('input', 'a.npy', [2], Float32Array.of(1, 2));
    fs.appendFileSync(path.join(dir, 'input', 'a.npy'), Buffer.from([0, 0]));
    expect(() => readNpyFeed(path.join(dir, 'input', 'a.npy'))).to.throw(/the data \(10 bytes\) do not match the shape \(2 of <f4\)/);
  });

  it('a batch with a dimension of 0 gives no values: the error names the tensor and the cause', async () => {
    let caught: unknown;
    await quantizeModel(mnist, {
      weights: { bits: 8 }, activations: { bits: 8 }, evaluationFeeds: [], calibration: [{ input: { data: new Float32Array(0), dims: [0, 1, 28, 28] } }],
    }).catch((e) => (caught = e));
    expect((caught as Error).message).to.match(/batches on which the model computes values for tensor 'input' .* but received "?1 batches on which it is empty"?\. A batch with a dimension of 0/);
  });
});

describe('the evaluation', () => {
  it('averages the cosine per sample: one feed of two images scores as two feeds of one', async () => {
    const two = await quantizeModel(mnist, { weights: { bits: 2 }, evaluationFeeds: [feed(0, 2)] });
    const ones = await quantizeModel(mnist, { weights: { bits: 2 }, evaluationFeeds: [feed(0, 1), feed(1, 1)] });
    expect(two.report.evaluation!.samples).to.equal(2);
    expect(ones.report.evaluation!.samples).to.equal(2);
    expect(two.report.evaluation!.outputs[0].cosine).to.be.closeTo(ones.report.evaluation!.outputs[0].cosine, 1e-6);
  });

  it('weight-only quantization with calibration data given is evaluated on its first batches, not on random inputs', async () => {
    const { report } = await quantizeModel(mnist, { weights: { bits: 8 }, calibration: [feed(0, 3), feed(3, 3)] });
    expect(report.evaluation!.samples).to.equal(6);
    expect(report.calibrationBatches).to.equal(undefined);  // nothing was calibrated
  });

  it('an output of a data-dependent size that quantization changed is left out of the cosine and reported', async () => {
    // y = Compress(x, x > t): how many values pass depends on x, which the 2-bit weights move.
    const model = buildModel({
      inputDims: [1, 16], output: 'y', opset: 13, initializers: { w: { dims: [16, 16], data: heInit(256, 16, 21) }, t: { dims: [], data: [0] } },
      nodes: [
        { op: 'MatMul', inputs: ['input', 'w'], output: 'h', name: 'mm' },
        { op: 'Reshape', inputs: ['h', 'flat'], output: 'f' },
        { op: 'Greater', inputs: ['f', 't'], output: 'keep' },
        { op: 'Compress', inputs: ['f', 'keep'], output: 'y' },
      ],
      int64: { flat: [-1] },
    });
    const r = rng(2);
    const feeds = Array.from({ length: 8 }, () => ({ input: { data: Float32Array.from({ length: 16 }, () => r() - 0.5), dims: [1, 16] } }));
    const { report } = await quantizeModel(model, { weights: { bits: 2, granularity: 'tensor' }, firstLastLayerBits: 2, evaluationFeeds: feeds });
    const out = report.evaluation!.outputs.find((o) => o.name === 'y');
    const uncompared = report.evaluation!.uncompared?.find((o) => o.name === 'y');
    // Some feeds changed the size: left out there (or on every feed: reported as not compared).
    expect((out?.reshapedFeeds ?? 0) > 0 || uncompared !== undefined).to.equal(true);
    if (out) expect(Number.isFinite(out.cosine)).to.equal(true);
  });

  it('an output whose rank the quantized model changed is a lowbit bug, not a NaN cosine', async () => {
    const relu = buildModel({ inputDims: [1, 4], output: 'y', initializers: {}, nodes: [{ op: 'Relu', inputs: ['input'], output: 'y' }] });
    const shorter = buildModel({
      inputDims: [1, 4], output: 'y', initializers: {}, int64: { shape: [4] },
      nodes: [{ op: 'Reshape', inputs: ['input', 'shape'], output: 'y' }],
    });
    let caught: unknown;
    await compareOutputs(relu, shorter, [{ input: { data: Float32Array.of(1, 2, 3, 4), dims: [1, 4] } }]).catch((e) => (caught = e));
    expect((caught as Error).message).to.match(/output 'y' has dims \[4\] where the float model's has \[1, 4\]: a rewrite changed what the model computes/);
  });
});

describe('stopping quantizeModel', () => {
  it('an aborted signal rejects with its reason at the next step and leaves no output file', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-abort-'));
    const stop = new AbortController();
    const reason = new Error('stopped by the test');
    let stages = 0;
    let caught: unknown;
    await quantizeModel(mnist, {
      weights: { bits: 8 }, activations: { bits: 8 }, calibration: calibrationFolder, outputPath: path.join(dir, 'q.onnx'), signal: stop.signal,
      onProgress: () => { if (++stages === 3) stop.abort(reason); },
    }).catch((e) => (caught = e));
    expect(caught).to.equal(reason);
    expect(stages).to.equal(3);
    expect(fs.readdirSync(dir)).to.deep.equal([]);
    // Aborted before the call: nothing runs.
    await quantizeModel(mnist, { weights: { bits: 8 }, signal: AbortSignal.abort(reason), onProgress: () => stages++ }).catch((e) => (caught = e));
    expect(caught).to.equal(reason);
    expect(stages).to.equal(3);
    let typed: unknown;
    await quantizeModel(mnist, { weights: { bits: 8 }, signal: 'stop' as never }).catch((e) => (typed = e));
    expect((typed as Error).message).to.match(/Expected an AbortSignal .* for options\.signal but received "stop"/);
    fs.rmSync(dir, { recursive: true });
  });

  it('calibration stops with the reason after the onnxruntime run or the observer in progress, not at the end of the batch', async () => {
    const stop = new AbortController();
    const reason = new Error('stopped during an observer');
    let observed = 0;
    let batches = 0;
    const data = [feed(0, 4), feed(4, 4), feed(8, 4)];
    const run = calibrate(readModel(mnist), ['r1'], data, 'minmax', {
      signal: stop.signal, onBatch: () => batches++,
      tensorObservers: [{ tensor: 'c1', observe: () => { observed++; stop.abort(reason); } }],
    });
    let caught: unknown;
    await run.catch((e) => (caught = e));
    expect(caught).to.equal(reason);
    expect([observed, batches]).to.deep.equal([1, 0]);
  });

  it('an abort ends the wait for a slow async source at once, and tells the source to stop (calibrate and finetune)', async () => {
    // The source's second batch comes only when the gate opens, after the abort has been seen (or 5 s later without the fix).
    const gated = <T>(first: T, onAbortSeen: Promise<unknown>) => {
      const events: string[] = [];
      let timer: NodeJS.Timeout | undefined;
      const gate = Promise.race([onAbortSeen, new Promise((r) => (timer = setTimeout(r, 5000)))]).then(() => events.push('gate opened'));
      const source = {
        [Symbol.asyncIterator]() {
          let sent = false;
          return {
            next: async (): Promise<IteratorResult<T>> => {
              if (!sent) { sent = true; return { value: first, done: false }; }
              await gate;
              return { value: first, done: false };
            },
            return: async (): Promise<IteratorResult<T>> => { events.push('source told to stop'); return { value: undefined, done: true }; },
          };
        },
      };
      return { source, events, done: () => clearTimeout(timer) };
    };
    const reason = new Error('stopped while waiting for data');
    let seen!: () => void;
    const abortSeen = new Promise<void>((r) => (seen = r));
    const stop = new AbortController();
    const { source, events, done } = gated(feed(0, 4), abortSeen);
    const run = calibrate(readModel(mnist), ['r1'], source, 'minmax', { signal: stop.signal, onBatch: () => setTimeout(() => stop.abort(reason), 20) });
    await run.then(() => events.push('finished'), (e) => events.push(e === reason ? 'rejected with the reason' : `rejected: ${e}`));
    seen();
    await new Promise((r) => setImmediate(r));
    // (The gate opens only after the rejection: without the race, the rejection waited for it.)
    expect(events.slice(0, 2)).to.deep.equal(['source told to stop', 'rejected with the reason']);
    done();

    let trainingSeen!: () => void;
    const trainingAbortSeen = new Promise<void>((r) => (trainingSeen = r));
    const stopTraining = new AbortController();
    const batch = { inputs: { data: new Float32Array(4 * 784).fill(0.5), dims: [4, 1, 28, 28] }, labels: Int32Array.of(1, 2, 3, 4) };
    const training = gated(batch, trainingAbortSeen);
    await finetune(mnist, training.source, { epochs: 1, signal: stopTraining.signal, onStep: () => setTimeout(() => stopTraining.abort(reason), 20) })
      .then(() => training.events.push('finished'), (e) => training.events.push(e === reason ? 'rejected with the reason' : `rejected: ${e}`));
    trainingSeen();
    await new Promise((r) => setImmediate(r));
    expect(training.events.slice(0, 2)).to.deep.equal(['source told to stop', 'rejected with the reason']);
    training.done();
  });

  it('abortable: an abort from inside next(), or between batches, ends the loop with the reason; listeners do not pile up; a throwing next() is not told to stop', async () => {
    const counting = (next: (calls: number) => Promise<IteratorResult<number>> | IteratorResult<number>) => {
      const seen = { next: 0, returned: 0 };
      // (next() may answer synchronously or throw, as a hand-written iterator can.)
      const source = { [Symbol.asyncIterator]: () => ({
        next: () => next(++seen.next),
        return: async () => { seen.returned++; return { value: undefined, done: true as const }; },
      }) } as unknown as AsyncIterable<number>;
      return { source, seen };
    };
    const drain = async (source: AsyncIterable<number>, signal: AbortSignal, onItem: (n: number) => void = () => undefined) => {
      try {
        for await (const n of abortable(source, signal)) onItem(n);
        return 'finished';
      } catch (e) {
        return e;
      }
    };
    // The source aborts while making its next batch, which never comes.
    const inside = new AbortController();
    const reason = new Error('aborted inside next()');
    const a = counting((calls) => (calls === 1 ? { value: 1, done: false } : (inside.abort(reason), new Promise(() => undefined))));
    expect(await drain(a.source, inside.signal)).to.equal(reason);
    expect(a.seen).to.deep.equal({ next: 2, returned: 1 });
    // Aborted by the reader between batches: the source is not asked for more.
    const between = new AbortController();
    const b = counting(() => ({ value: 1, done: false }));
    const listeners: number[] = [];
    expect(await drain(b.source, between.signal, () => { listeners.push(getEventListeners(between.signal, 'abort').length); between.abort(reason); })).to.equal(reason);
    expect(b.seen.next).to.equal(1);
    expect(listeners).to.deep.equal([0]);  // none left from the delivered batch's wait
    expect(getEventListeners(between.signal, 'abort')).to.have.length(0);
    // A source whose next() throws: the error, and no return() (as with for await).
    const failing = new Error('the source failed');
    const c = counting(() => { throw failing; });
    expect(await drain(c.source, new AbortController().signal)).to.equal(failing);
    expect(c.seen.returned).to.equal(0);
  });

  it('abortable holds no batch it has delivered (one promise shared by every wait kept them all until the loop ended)', async () => {
    v8.setFlagsFromString('--expose-gc');
    const gc = runInNewContext('gc') as () => void;
    let first: WeakRef<object> | undefined;
    const source = (async function* () {
      for (let i = 0; i < 4; i++) yield { data: new Float32Array(1024) };
    })();
    let seen = 0;
    for await (const batch of abortable(source, new AbortController().signal)) {
      if (seen++ === 0) first = new WeakRef(batch);
      if (seen === 3) {
        await new Promise((r) => setImmediate(r));
        gc();
        expect(first!.deref(), 'the first batch, two batches later').to.equal(undefined);
      }
    }
    expect(seen).to.equal(4);
  });

  it('an abort as the write starts removes its temporary files (external data too)', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-abort-'));
    for (const externalData of [true, false]) {
      const stop = new AbortController();
      const reason = new Error('stopped at the write');
      let caught: unknown;
      await quantizeModel(mnist, {
        weights: { bits: 8 }, outputPath: path.join(dir, 'q.onnx'), externalData, evaluationFeeds: [], signal: stop.signal,
        // The write's own checks see it: the data file's first chunk, or the model file's write.
        onProgress: (stage) => { if (stage === 'write') stop.abort(reason); },
      }).catch((e) => (caught = e));
      expect(caught).to.equal(reason);
      expect(fs.readdirSync(dir)).to.deep.equal([]);
    }
    fs.rmSync(dir, { recursive: true });
  });

  it('`lowbit quantize` stops on SIGINT, removes partial output and exits with 130', async function () {
    this.timeout(60000);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-sigint-'));
    const cli = path.join(root, 'dist', 'ts', 'cli.js');
    const child = spawn(process.execPath, [cli, 'quantize', mnist, '--abits', '8', '--calib', calibrationFolder, '--rounding', 'gptq', '-o', 'q.onnx'], { cwd: dir });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => {
      stderr += d.toString();
      if (/calibrate…/.test(stderr) && !child.killed) child.kill('SIGINT');
    });
    const status = await new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    expect(stderr).to.match(/SIGINT: stopping, removing partial output/);
    expect(stderr).to.match(/lowbit: interrupted \(SIGINT\): nothing was written/);
    expect(status).to.equal(130);
    expect(fs.readdirSync(dir)).to.deep.equal([]);
    fs.rmSync(dir, { recursive: true });
  });
});

describe('`lowbit quantize --report`', () => {
  it('writes an infinite SQNR as "Infinity"; when the report cannot be written, removes the model it wrote and says so', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-report-'));
    const preload = path.join(os.tmpdir(), `lowbit-report-preload-${process.pid}.js`);
    try {
      // Weights on the 8-bit grid (k/127): quantized exactly, an SQNR of Infinity.
      const exact = buildModel({
        inputDims: [1, 4], output: 'y', initializers: { w: { dims: [4, 2], data: [127, -127, 64, 0, -3, 5, 100, -50].map((k) => k / 127) } },
        nodes: [{ op: 'MatMul', inputs: ['input', 'w'], output: 'y', name: 'mm' }],
      });
      fs.writeFileSync(path.join(dir, 'exact.onnx'), exact);
      const cli = path.join(root, 'dist', 'ts', 'cli.js');
      const good = spawnSync(process.execPath, [cli, 'quantize', 'exact.onnx', '--granularity', 'tensor', '--report', 'r.json', '--no-evaluate'], { cwd: dir, encoding: 'utf8' });
      expect(good.status, good.stderr).to.equal(0);
      expect(JSON.parse(fs.readFileSync(path.join(dir, 'r.json'), 'utf8')).layers[0].weightSqnrDb).to.equal('Infinity');
      fs.rmSync(path.join(dir, 'exact.q.onnx'));
      // A report folder nothing can be written to is found before any work.
      const early = spawnSync(process.execPath, [cli, 'quantize', 'exact.onnx', '--report', '/proc/lowbit-report.json', '--no-evaluate'], { cwd: dir, encoding: 'utf8' });
      expect(early.status).to.equal(1);
      expect(early.stderr).to.match(/a folder lowbit can write to for --report but received "\/proc\/lowbit-report\.json"/);
      expect(fs.readdirSync(dir).sort()).to.deep.equal(['exact.onnx', 'r.json']);
      // A write that fails all the same at the end (a full disk, a folder gone): simulated by a preloaded module that
      // sends the report's write to /proc.
      fs.writeFileSync(preload, `const io = require(${JSON.stringify(path.join(root, 'dist', 'ts', 'onnx', 'model-io.js'))});
  const real = io.writeFileAtomic;
  io.writeFileAtomic = (file, bytes) => real(file === 'report.json' ? '/proc/lowbit-report.json' : file, bytes);\n`);
      const lowbitFailingReport = (...args: string[]) => spawnSync(process.execPath, ['-r', preload, cli, ...args], { cwd: dir, encoding: 'utf8' });
      const bad = lowbitFailingReport('quantize', 'exact.onnx', '--report', 'report.json', '--no-evaluate');
      expect(bad.status).to.equal(1);
      expect(bad.stderr).to.match(/Could not write \/proc\/lowbit-report\.json \(\w+\)\. Check that its folder exists and is writable\. Removed exact\.q\.onnx, which this run wrote\.\n/);
      expect(fs.readdirSync(dir).sort()).to.deep.equal(['exact.onnx', 'r.json']);
      // An output that was there before the run was replaced by it: removing it would leave neither, so it is kept.
      fs.writeFileSync(path.join(dir, 'exact.q.onnx'), 'an earlier output');
      const over = lowbitFailingReport('quantize', 'exact.onnx', '--report', 'report.json', '--no-evaluate');
      expect(over.status).to.equal(1);
      expect(over.stderr).to.match(/Could not write \/proc\/lowbit-report\.json \(\w+\)\. .* Kept exact\.q\.onnx: this run wrote it over an earlier output, which is gone\.\n/);
      expect(readModel(path.join(dir, 'exact.q.onnx')).graph!.node.some((n) => n.opType === 'DequantizeLinear')).to.equal(true);  // this run's model
      // With external data the model and its data file are one unit: both kept (the model needs its data), or both removed.
      const pair = lowbitFailingReport('quantize', 'exact.onnx', '--external-data', '--report', 'report.json', '--no-evaluate');
      expect(pair.status).to.equal(1);
      expect(pair.stderr).to.match(/ Kept exact\.q\.onnx and exact\.q\.onnx\.data: this run wrote them over an earlier output, which is gone\.\n/);
      expect(readModel(path.join(dir, 'exact.q.onnx')).graph!.initializer.length).to.be.above(0);  // its data file is there to read
      fs.rmSync(path.join(dir, 'exact.q.onnx'));
      fs.rmSync(path.join(dir, 'exact.q.onnx.data'));
      const fresh = lowbitFailingReport('quantize', 'exact.onnx', '--external-data', '--report', 'report.json', '--no-evaluate');
      expect(fresh.stderr).to.match(/ Removed exact\.q\.onnx and exact\.q\.onnx\.data, which this run wrote\.\n/);
      expect(fs.readdirSync(dir).sort()).to.deep.equal(['exact.onnx', 'r.json']);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
      fs.rmSync(preload, { force: true });
    }
  });
});

describe('reading model files', () => {
  it('an unreadable file is named in the error', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-read-'));
    const file = path.join(dir, 'notes.onnx');
    fs.writeFileSync(file, 'hello, not a model');
    expect(() => readModel(file)).to.throw(/notes\.onnx is not an ONNX model/);
    let caught: unknown;
    await quantizeModel(file, { weights: { bits: 8 } }).catch((e) => (caught = e));
    expect((caught as Error).message).to.match(/notes\.onnx is not an ONNX model/);
    fs.rmSync(dir, { recursive: true });
  });
});

describe('inspectModel gives the quantizer\'s reasons', () => {
  it('a MatMul with a rank-3 weight and a W·x MatMul are reported as left float, with the reason quantizeModel gives', async () => {
    const r = rng(3);
    const model = buildModel({
      inputDims: [2, 8, 8], output: 'z',
      initializers: { w3: { dims: [2, 8, 8], data: Float32Array.from({ length: 128 }, () => r() - 0.5) }, w: { dims: [8, 8], data: heInit(64, 8, 4) } },
      nodes: [{ op: 'MatMul', inputs: ['input', 'w3'], output: 'y', name: 'mm3' }, { op: 'MatMul', inputs: ['w', 'y'], output: 'z', name: 'wx' }],
    });
    const layers = (await inspectModel(model)).layers;
    const mm3 = layers.find((l) => l.node === 'mm3')!;
    expect(mm3.quantized).to.equal(false);
    expect(mm3.reason).to.match(/weight shape \[2, 8, 8\] is not a MatMul weight this pass handles/);
    expect(layers.find((l) => l.node === 'wx')!.reason).to.match(/its constant is the first input \(W·x\)/);
  });
});

/** Reads a model, lets `edit` change it, and serializes it. */
function edited(bytes: Uint8Array, edit: (m: ReturnType<typeof readModel>) => void): Uint8Array {
  const m = readModel(bytes);
  edit(m);
  return serializeModel(m);
}

describe('ONNX rewrites found by the audit', () => {
  it('opset conversion keeps a Slice end of INT64_MAX (PyTorch\'s x[:, 1:]) exact', async () => {
    const model = edited(buildModel({
      inputDims: [1, 3, 4, 4], output: 'y', opset: 9, initializers: { w: { dims: [4, 3, 1, 1], data: heInit(12, 3, 1) } },
      nodes: [
        { op: 'Conv', inputs: ['input', 'w'], output: 'c', name: 'conv' },
        { op: 'Slice', inputs: ['c'], output: 'y', attrs: { starts: [1], ends: [1], axes: [1] } },
      ],
    }), (m) => {
      m.graph!.node[1].attribute.find((a) => a.name === 'ends')!.ints = [2n ** 63n - 1n];
    });
    const x = { input: { data: Float32Array.from({ length: 48 }, (_, i) => Math.sin(i)), dims: [1, 3, 4, 4] } };
    const { model: q, report } = await quantizeModel(model, { weights: { bits: 8 }, evaluationFeeds: [x] });
    expect(report.opset.to).to.equal(13);
    expect((await run(q, x)).y.dims).to.deep.equal([1, 3, 4, 4]);
    expect(report.evaluation!.outputs[0].cosine).to.be.above(0.999);
  });

  it('opset conversion: an old Softmax on a zero-size tensor stays zero-size (Reshape allowzero); Split with an empty split input gets num_outputs', async () => {
    const softmax = buildModel({
      inputDims: [1, 'boxes', 3], output: 'y', opset: 11, initializers: {},
      nodes: [{ op: 'Softmax', inputs: ['input'], output: 'y', attrs: { axis: 2 } }],
    });
    const graph = new Graph(readModel(softmax));
    upgradeOpset(graph, 21);
    const none = { input: { data: new Float32Array(0), dims: [1, 0, 3] } };
    expect((await run(softmax, none)).y.dims).to.deep.equal([1, 0, 3]);
    expect((await run(serializeModel(graph.model), none)).y.dims).to.deep.equal([1, 0, 3]);
    const some = { input: { data: Float32Array.of(1, 2, 3, 0, 0, 0), dims: [1, 2, 3] } };
    expect(Array.from((await run(serializeModel(graph.model), some)).y.data as Float32Array)).to.deep.equal(Array.from((await run(softmax, some)).y.data as Float32Array));
    const split = edited(buildModel({
      inputDims: [2, 4], output: 'y', opset: 13, initializers: {},
      nodes: [{ op: 'Split', inputs: ['input', ''], output: 'y', attrs: { axis: 1 } }],
    }), (m) => {
      m.graph!.node[0].output.push('y2');
      m.graph!.output.push(create(ValueInfoProtoSchema, valueInfo('y2') as never));
    });
    const upgraded = new Graph(readModel(split));
    expect(upgradeOpset(upgraded, 21).changed).to.include('split0: Split num_outputs');
    const out = await run(serializeModel(upgraded.model), { input: { data: Float32Array.from({ length: 8 }, (_, i) => i), dims: [2, 4] } });
    expect(Array.from(out.y2.data as Float32Array)).to.deep.equal([2, 3, 6, 7]);
  });

  it('a model kept below opset 13 (com.microsoft Q/DQ) gets its int32 biases in that domain too, and runs in onnxruntime', async () => {
    const r = rng(5);
    const model = edited(buildModel({
      inputDims: [2, 4, 5, 5], output: 'y', opset: 11,
      initializers: {
        w: { dims: [4, 4, 3, 3], data: heInit(144, 36, 2) }, b: { dims: [4], data: [0.1, 0.2, 0.3, 0.4] },
        w2: { dims: [6, 36], data: heInit(216, 36, 3) }, b2: { dims: [6], data: [0, 0.1, 0, 0.1, 0, 0.1] },
      },
      int64: { k: [2] },
      nodes: [
        { op: 'Conv', inputs: ['input', 'w', 'b'], output: 'c', name: 'conv', attrs: { kernel_shape: [3, 3] } },
        { op: 'Relu', inputs: ['c'], output: 'r' },
        { op: 'Flatten', inputs: ['r'], output: 'f' },
        { op: 'Gemm', inputs: ['f', 'w2', 'b2'], output: 'y', name: 'fc', attrs: { transB: 1 } },
        { op: 'TopK', inputs: ['y', 'k'], output: 'values' },  // changed at opset 10 → 11 only; kept: no conversion to 13
      ],
    }), (m) => {
      m.graph!.node[4].output = ['values', 'indices'];
    });
    const calibration = [1, 2, 3].map(() => ({ input: { data: Float32Array.from({ length: 200 }, () => r() * 2 - 1), dims: [2, 4, 5, 5] } }));
    const { model: q, report } = await quantizeModel(model, { weights: { bits: 8 }, activations: { bits: 8 }, calibration });
    expect(report.opset.microsoftDomainFallback).to.be.a('string');
    const dq = fromBinary(ModelProtoSchema, q).graph!.node.filter((n) => n.opType === 'DequantizeLinear');
    expect(dq.filter((n) => n.name.endsWith('_bias_dq'))).to.have.length(2);
    expect(dq.every((n) => n.domain === 'com.microsoft')).to.equal(true);
    expect(report.evaluation!.outputs[0].cosine).to.be.above(0.999);
  });

  it('data-driven bias correction of a Gemm scales the shift by alpha / beta (alpha = -1: the same error as alpha = 1)', async () => {
    const r = rng(11);
    const gemm = (alpha: number, beta: number) => buildModel({
      inputDims: [8, 32], output: 'y', opset: 13,
      initializers: { w: { dims: [16, 32], data: heInit(512, 32, 7) }, b: { dims: [16], data: new Float32Array(16) } },
      nodes: [{ op: 'Gemm', inputs: ['input', 'w', 'b'], output: 'y', name: 'fc', attrs: { transB: 1, alpha, beta } }],
    });
    // Inputs with a mean: rounding errors shift the outputs' means, which the correction removes.
    const calibration = Array.from({ length: 4 }, () => ({ input: { data: Float32Array.from({ length: 256 }, () => 1 + r()), dims: [8, 32] } }));
    const meanError = async (alpha: number, beta: number, correct: boolean) => {
      const { model } = await quantizeModel(gemm(alpha, beta), {
        weights: { bits: 4 }, activations: { bits: 16, biasCorrection: correct }, calibration, evaluationFeeds: [],
      });
      const f = (await run(gemm(alpha, beta), calibration[0])).y.data as Float32Array;
      const q = (await run(model, calibration[0])).y.data as Float32Array;
      const perChannel = new Float64Array(16);
      for (let i = 0; i < f.length; i++) perChannel[i % 16] += (q[i] - f[i]) / 8;
      return perChannel.reduce((a, v) => a + Math.abs(v), 0) / 16;
    };
    const uncorrected = await meanError(1, 1, false);
    const corrected = await meanError(1, 1, true);
    expect(corrected).to.be.below(uncorrected / 4);
    // The bias is 0, so these Gemms compute ±the same: their corrected errors match (beta = 0 ignores C: an Add takes the shift).
    for (const [alpha, beta] of [[-1, 1], [1, 0.5], [2, 0.25], [1, 0]]) expect(await meanError(alpha, beta, true), `alpha ${alpha} beta ${beta}`).to.be.closeTo(corrected * Math.abs(alpha), 1e-3);
  });

  it('a BatchNormalization with training_mode = 1 (batch statistics) is not folded', () => {
    const model = buildModel({
      inputDims: [2, 3, 4, 4], output: 'y', opset: 15,
      initializers: {
        w: { dims: [3, 3, 1, 1], data: heInit(9, 3, 1) }, g: { dims: [3], data: [1, 1, 1] }, b: { dims: [3], data: [0, 0, 0] },
        m: { dims: [3], data: [0, 0, 0] }, v: { dims: [3], data: [1, 1, 1] },
      },
      nodes: [
        { op: 'Conv', inputs: ['input', 'w'], output: 'c', name: 'conv' },
        { op: 'BatchNormalization', inputs: ['c', 'g', 'b', 'm', 'v'], output: 'y', name: 'bn', attrs: { training_mode: 1 } },
      ],
    });
    const report = foldBatchNorm(new Graph(readModel(model)));
    expect(report.changed).to.deep.equal([]);
    expect(report.skipped).to.deep.equal([{ node: 'bn', reason: 'it is in training mode (training_mode = 1: batch statistics)' }]);
  });

  it('nodes it inserts get names no node of the model has (a model with nodes named input_q, conv_weight_dq…)', async () => {
    const taken = ['input_q', 'input_dq', 'conv_weight_dq', 'conv_bias_dq'];
    const model = buildModel({
      inputDims: [2, 3, 4, 4], output: 'y',
      initializers: { w: { dims: [3, 3, 1, 1], data: heInit(9, 3, 1) }, b: { dims: [3], data: [0.1, -0.2, 0.3] } },
      nodes: [
        { op: 'Conv', inputs: ['input', 'w', 'b'], output: 'c', name: 'conv' },
        ...taken.map((name, i) => ({ op: 'Relu', inputs: [i ? `r${i - 1}` : 'c'], output: i === taken.length - 1 ? 'y' : `r${i}`, name })),
      ],
    });
    const calibration = [{ input: { data: Float32Array.from({ length: 96 }, (_, i) => Math.sin(i)), dims: [2, 3, 4, 4] } }];
    const { model: quantized } = await quantizeModel(model, { weights: { bits: 8 }, activations: { bits: 8 }, calibration });
    const names = readModel(quantized).graph!.node.map((n) => n.name);
    expect(names.filter((n) => n === 'input_q' || n.startsWith('input_q_'))).to.have.length(2);
    expect(new Set(names).size).to.equal(names.length);
    const out = await run(quantized, calibration[0]);
    expect(out.y.dims).to.deep.equal([2, 3, 4, 4]);
  });

  it('Constant nodes given as value_float / value_ints become value tensors first (the passes read constants so), reported', async () => {
    const model = buildModel({
      inputDims: [2, 4], output: 'y',
      initializers: { w: { dims: [4, 3], data: heInit(12, 4, 2) } },
      nodes: [
        { op: 'Gemm', inputs: ['input', 'w'], output: 'h', name: 'fc' },
        { op: 'Constant', inputs: [], output: 'lo', name: 'lo', attrs: { value_float: -0.25 } },
        { op: 'Constant', inputs: [], output: 'hi', name: 'hi', attrs: { value_float: 0.5 } },
        { op: 'Clip', inputs: ['h', 'lo', 'hi'], output: 'c' },
        { op: 'Constant', inputs: [], output: 'axes', name: 'axes', attrs: { value_ints: [1] } },
        { op: 'Unsqueeze', inputs: ['c', 'axes'], output: 'y' },
      ],
    });
    const { model: quantized, report } = await quantizeModel(model, { weights: { bits: 8 } });
    expect(report.passes.find((p) => p.pass === 'constant-attributes-as-tensors')!.changed).to.deep.equal([
      'lo: its value_float given as a value tensor', 'hi: its value_float given as a value tensor', 'axes: its value_ints given as a value tensor']);
    const g = new Graph(readModel(quantized));
    expect(Array.from(floatDataOf(g.constant('hi')!)!)).to.deep.equal([0.5]);
    expect(g.constant('axes')!.dataType).to.equal(TensorProto_DataType.INT64);
    const x = { input: { data: Float32Array.from({ length: 8 }, (_, i) => Math.sin(i) * 4), dims: [2, 4] } };
    const [a, b] = [await run(model, x), await run(quantized, x)];
    expect(b.y.dims).to.deep.equal([2, 1, 3]);
    Array.from(a.y.data as Float32Array).forEach((v, i) => expect((b.y.data as Float32Array)[i]).to.be.closeTo(v, 0.02));
  });

  it('a BatchNormalization after a Conv or Gemm whose bias is computed (not a constant) is not folded: the bias would be lost', async () => {
    for (const op of ['Conv', 'Gemm']) {
      const conv = op === 'Conv';
      const model = buildModel({
        inputDims: conv ? [2, 3, 4, 4] : [2, 3], output: 'y',
        initializers: {
          w: { dims: conv ? [3, 3, 1, 1] : [3, 3], data: heInit(9, 3, 1) }, b: { dims: [3], data: [0.5, -1, 2] },
          g: { dims: [3], data: [1, 2, 0.5] }, beta: { dims: [3], data: [0, 0.1, 0] }, m: { dims: [3], data: [0.1, 0, 0] }, v: { dims: [3], data: [1, 4, 1] },
        },
        nodes: [
          { op: 'Relu', inputs: ['b'], output: 'computed' },
          { op, inputs: ['input', 'w', 'computed'], output: 'c', name: 'layer', attrs: conv ? {} : { transB: 1 } },
          { op: 'BatchNormalization', inputs: ['c', 'g', 'beta', 'm', 'v'], output: 'y', name: 'bn' },
        ],
      });
      const graph = new Graph(readModel(model));
      const report = foldBatchNorm(graph);
      expect(report.changed, op).to.deep.equal([]);
      expect(report.skipped, op).to.deep.equal([{ node: 'bn', reason: "the bias 'computed' is computed, not a constant: it cannot be folded into a new constant bias" }]);
      const x = { input: { data: Float32Array.from({ length: conv ? 96 : 6 }, (_, i) => Math.cos(i)), dims: conv ? [2, 3, 4, 4] : [2, 3] } };
      const [a, b] = [await run(model, x), await run(serializeModel(graph.model), x)];
      Array.from(a.y.data as Float32Array).forEach((v, i) => expect((b.y.data as Float32Array)[i], op).to.be.closeTo(v, 1e-5));
    }
  });

  it('a Dropout whose mask is read is not converted past opset 10 (its mask became bool); an unread one is dropped with its declared type', async () => {
    const model = buildModel({
      inputDims: [1, 3], output: 'y', opset: 9, initializers: {},
      nodes: [{ op: 'Dropout', inputs: ['input'], output: 'd' }, { op: 'Mul', inputs: ['d', 'mask'], output: 'y' }],
    });
    const withMask = edited(model, (m) => { m.graph!.node[0].output = ['d', 'mask']; });
    expect(() => upgradeOpset(new Graph(readModel(withMask)), 13)).to.throw(/Dropout \(.*\) whose mask output is used/);
    const unread = edited(model, (m) => {
      m.graph!.node[0].output = ['d', 'mask'];
      m.graph!.node[1].input = ['d', 'd'];
    });
    const declared = edited(unread, (m) => { m.graph!.valueInfo.push(create(ValueInfoProtoSchema, valueInfo('mask', TensorProto_DataType.FLOAT, [1, 3]) as never)); });
    const graph = new Graph(readModel(declared));
    expect(upgradeOpset(graph, 13).changed).to.include("dropout0: Dropout's unread mask output dropped (float before opset 10, bool after)");
    expect(graph.graph.node[0].output).to.deep.equal(['d']);
    // onnxruntime refused the converted model with the float mask declared ("does not match expected type (tensor(bool))").
    const x = { input: { data: Float32Array.of(1, -2, 3), dims: [1, 3] } };
    expect(Array.from((await run(serializeModel(graph.model), x)).y.data as Float32Array)).to.deep.equal([1, 4, 9]);
  });

  it('raising the opset raises the IR version to the one the opset came with (INT4 needs IR 10); IR 3\'s initializer inputs go', async () => {
    const model = edited(buildModel({
      inputDims: [1, 16], output: 'y', opset: 9, initializers: { w: { dims: [16, 8], data: heInit(128, 16, 9) }, b: { dims: [8], data: new Float32Array(8).fill(0.5) } },
      nodes: [{ op: 'MatMul', inputs: ['input', 'w'], output: 'm', name: 'mm' }, { op: 'Add', inputs: ['m', 'b'], output: 'y' }],
    }), (m) => {
      // IR 3 lists initializers among the inputs (b stays a float initializer).
      m.irVersion = 3n;
      m.graph!.input.push({ ...m.graph!.input[0], name: 'w' }, { ...m.graph!.input[0], name: 'b' });
    });
    const { model: q } = await quantizeModel(model, { weights: { bits: 4, granularity: 'block', blockSize: 16 }, evaluationFeeds: [] });
    const out = fromBinary(ModelProtoSchema, q);
    expect(out.opsetImport.find((o) => o.domain === '')!.version).to.equal(21n);
    expect(out.irVersion).to.equal(10n);
    expect(out.graph!.input.map((i) => i.name)).to.deep.equal(['input']);
  });

  it('an initializer that is also a graph input (IR 4 on: overridable) and gets quantized is reported as no longer an input', async () => {
    const model = edited(buildModel({
      inputDims: [1, 16], output: 'y', initializers: { w: { dims: [16, 8], data: heInit(128, 16, 9) }, b: { dims: [8], data: new Float32Array(8).fill(0.5) } },
      nodes: [{ op: 'MatMul', inputs: ['input', 'w'], output: 'm', name: 'mm' }, { op: 'Add', inputs: ['m', 'b'], output: 'y' }],
    }), (m) => {
      m.graph!.input.push({ ...m.graph!.input[0], name: 'w' }, { ...m.graph!.input[0], name: 'b' });
    });
    const { model: q, report } = await quantizeModel(model, { weights: { bits: 8 }, evaluationFeeds: [] });
    // b stays float, and overridable.
    expect(fromBinary(ModelProtoSchema, q).graph!.input.map((i) => i.name)).to.deep.equal(['input', 'b']);
    expect(report.passes.find((p) => p.pass === 'overridable-initializers')?.changed).to.deep.equal(
      ['w: a graph input with a default (a feed could replace it), quantized or folded into a layer, so no longer an input']);
    // A BatchNormalization's parameters as inputs: folded into the convolution, they go too.
    const bn = edited(buildModel({
      inputDims: [1, 2, 5, 5], output: 'y', initializers: {
        w: { dims: [3, 2, 3, 3], data: heInit(54, 18, 4) }, scale: { dims: [3], data: [1.5, 0.5, 2] }, bias: { dims: [3], data: [0.1, 0, -0.1] },
        mean: { dims: [3], data: [0.2, -0.1, 0] }, variance: { dims: [3], data: [1, 2, 0.5] },
      },
      nodes: [{ op: 'Conv', inputs: ['input', 'w'], output: 'c', name: 'conv' }, { op: 'BatchNormalization', inputs: ['c', 'scale', 'bias', 'mean', 'variance'], output: 'y', name: 'bn' }],
    }), (m) => {
      m.graph!.input.push({ ...m.graph!.input[0], name: 'scale' });
    });
    const folded = await quantizeModel(bn, { weights: { bits: 8 }, evaluationFeeds: [] });
    expect(folded.report.passes.find((p) => p.pass === 'fold-batchnorm')!.changed).to.have.length(1);
    expect(folded.report.passes.find((p) => p.pass === 'overridable-initializers')?.changed).to.deep.equal(
      ['scale: a graph input with a default (a feed could replace it), quantized or folded into a layer, so no longer an input']);
    // Read by two layers, one kept float: it stays an input for that one only.
    const shared = edited(buildModel({
      inputDims: [1, 16], output: 'y', initializers: { w: { dims: [16, 16], data: heInit(256, 16, 6) } },
      nodes: [{ op: 'MatMul', inputs: ['input', 'w'], output: 'a', name: 'first' }, { op: 'MatMul', inputs: ['a', 'w'], output: 'y', name: 'second' }],
    }), (m) => {
      m.graph!.input.push({ ...m.graph!.input[0], name: 'w', type: { ...m.graph!.input[0].type! } });
    });
    const partly = await quantizeModel(shared, { weights: { bits: 8 }, keepFloat: ['second'], evaluationFeeds: [] });
    expect(fromBinary(ModelProtoSchema, partly.model).graph!.input.map((i) => i.name)).to.deep.equal(['input', 'w']);
    expect(partly.report.passes.find((p) => p.pass === 'overridable-initializers')?.changed).to.deep.equal([
      'w: a graph input with a default (a feed could replace it), quantized for some of the layers that read it; it stays an input for the others (left float), so a feed for it now reaches only those']);
    // Nothing to say when no initializer is an input.
    const plain = await quantizeModel(buildModel({
      inputDims: [1, 16], output: 'y', initializers: { w: { dims: [16, 8], data: heInit(128, 16, 9) } },
      nodes: [{ op: 'MatMul', inputs: ['input', 'w'], output: 'y', name: 'mm' }],
    }), { weights: { bits: 8 }, evaluationFeeds: [] });
    expect(plain.report.passes.map((p) => p.pass)).to.not.include('overridable-initializers');
  });

  it('a large layer whose bytes are not 4-byte aligned is copied in pieces into the same values; a NaN past the first piece is named', async () => {
    const n = 600;  // 360 000 weights: more than one piece (2^18 values) to copy and scan
    const bytes = buildModel({
      inputDims: [1, n], output: 'y', initializers: { w: { dims: [n, n], data: heInit(n * n, n, 8) } },
      nodes: [{ op: 'MatMul', inputs: ['input', 'w'], output: 'y', name: 'mm' }],
    });
    const offsets = [0, 1, 2, 3].map((shift) => {
      const buffer = new Uint8Array(bytes.length + shift);
      buffer.set(bytes, shift);
      return buffer.subarray(shift);
    });
    expect(new Set(offsets.map((b) => readModel(b).graph!.initializer[0].rawData.byteOffset % 4)).size).to.equal(4);
    const models = await Promise.all(offsets.map(async (b) => Buffer.from((await quantizeModel(b, { weights: { bits: 8 }, evaluationFeeds: [] })).model)));
    for (const m of models.slice(1)) expect(m.equals(models[0])).to.equal(true);
    const broken = heInit(n * n, n, 8);
    broken[300_001] = NaN;
    const withNaN = buildModel({
      inputDims: [1, n], output: 'y', initializers: { w: { dims: [n, n], data: broken } },
      nodes: [{ op: 'MatMul', inputs: ['input', 'w'], output: 'y', name: 'mm' }],
    });
    const shifted = new Uint8Array(withNaN.length + 1);
    shifted.set(withNaN, 1);
    for (const b of [withNaN, shifted.subarray(1)]) {
      const caught = await quantizeModel(b, { weights: { bits: 8 }, evaluationFeeds: [] }).catch((e: Error) => e);
      expect((caught as Error).message).to.match(/MatMul 'mm': its weights 'w' hold NaN at index 300001/);
    }
  });

  it('external data output takes the initializers of If branches too (a shared quantized weight written once) and runs the same', async () => {
    const n = 64;
    const branch = (name: string, negate: boolean) => ({
      name: `${name}_branch`, type: AttributeProto_AttributeType.GRAPH,
      g: {
        name, output: [valueInfo(`${name}_y`, TensorProto_DataType.FLOAT, [1, n])],
        node: negate
          ? [{ opType: 'MatMul', name: `${name}_mm`, input: ['x', 'W'], output: [`${name}_m`] }, { opType: 'Neg', name: `${name}_neg`, input: [`${name}_m`], output: [`${name}_y`] }]
          : [{ opType: 'MatMul', name: `${name}_mm`, input: ['x', 'W'], output: [`${name}_y`] }],
      },
    });
    const model = toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 13n }],
      graph: {
        name: 'merged', input: [valueInfo('x', TensorProto_DataType.FLOAT, [1, n]), valueInfo('c', TensorProto_DataType.BOOL, [])], output: [valueInfo('y', TensorProto_DataType.FLOAT, [1, n])],
        initializer: [{ name: 'W', dataType: TensorProto_DataType.FLOAT, dims: [BigInt(n), BigInt(n)], rawData: new Uint8Array(heInit(n * n, n, 3).buffer) }],
        node: [{ opType: 'If', name: 'if', input: ['c'], output: ['y'], attribute: [branch('then', false), branch('else', true)] }],
      },
    } as never));
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-subext-'));
    const file = path.join(dir, 'q.onnx');
    const inline = await quantizeModel(model, { weights: { bits: 8 }, evaluationFeeds: [] });
    await quantizeModel(model, { weights: { bits: 8 }, outputPath: file, externalData: true, evaluationFeeds: [] });
    const written = fromBinary(ModelProtoSchema, fs.readFileSync(file));
    const large: Array<{ external: boolean }> = [];
    const walk = (g: NonNullable<typeof written.graph>) => {
      for (const t of g.initializer) if (t.dataLocation === TensorProto_DataLocation.EXTERNAL || t.rawData.length >= 1024) large.push({ external: t.dataLocation === TensorProto_DataLocation.EXTERNAL });
      for (const node of g.node) for (const a of node.attribute) for (const sub of [a.g, ...a.graphs]) if (sub) walk(sub);
    };
    walk(written.graph!);
    expect(large.length).to.be.at.least(2);  // the quantized weight in each branch
    expect(large.every((t) => t.external)).to.equal(true);
    expect(fs.statSync(`${file}.data`).size).to.be.below(2 * n * n);  // one copy of the int8 codes
    const O = ort();
    for (const c of [true, false]) {
      const feeds = { x: new O.Tensor('float32', Float32Array.from({ length: n }, (_, i) => Math.cos(i)), [1, n]), c: new O.Tensor('bool', Uint8Array.of(c ? 1 : 0), []) };
      const fromFile = await O.InferenceSession.create(file);
      const fromBytes = await O.InferenceSession.create(inline.model);
      expect(Array.from((await fromFile.run(feeds)).y.data as Float32Array)).to.deep.equal(Array.from((await fromBytes.run(feeds)).y.data as Float32Array));
      await fromFile.release();
      await fromBytes.release();
    }
    fs.rmSync(dir, { recursive: true });
  });

  it('the input model named by another path (a symbolic link, a hard link, a linked folder) is refused as the output path, also at 2 GB or more (limit lowered)', async () => {
    const io: { ONE_BUFFER_LIMIT: number } = require('../../ts/onnx/model-io');
    const limit = io.ONE_BUFFER_LIMIT;
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-inplace-'));
    const file = path.join(dir, 'm.onnx');
    fs.writeFileSync(file, buildModel({
      inputDims: [1, 64], output: 'y', initializers: { w: { dims: [64, 64], data: heInit(4096, 64, 5) } },
      nodes: [{ op: 'MatMul', inputs: ['input', 'w'], output: 'y', name: 'mm' }],
    }));
    // The same file by its own path, a symbolic link, a hard link, and a path through a linked folder.
    fs.symlinkSync(file, path.join(dir, 'soft.onnx'));
    fs.linkSync(file, path.join(dir, 'hard.onnx'));
    fs.symlinkSync(dir, path.join(dir, 'folder'));
    const names = ['m.onnx', 'soft.onnx', 'hard.onnx', path.join('folder', 'm.onnx')];
    const before = fs.readFileSync(file);
    try {
      for (const limited of [false, true]) {
        if (limited) io.ONE_BUFFER_LIMIT = 1;
        for (const name of names) {
          let caught: unknown;
          await quantizeModel(file, { weights: { bits: 4 }, outputPath: path.join(dir, name) }).catch((e) => (caught = e));
          expect(caught, name).to.be.instanceOf(RangeError);
          expect((caught as Error).message, name).to.match(/^Expected a path other than the input model's file \(.*\) for options\.outputPath but received ".*", which names that file: writing it would destroy the input/);
        }
      }
    } finally {
      io.ONE_BUFFER_LIMIT = limit;
    }
    expect(fs.readdirSync(dir).sort()).to.deep.equal(['folder', 'hard.onnx', 'm.onnx', 'soft.onnx']);
    expect(fs.readFileSync(file).equals(before)).to.equal(true);
    fs.rmSync(dir, { recursive: true });
  });

  it('an external data location in a sibling folder whose name starts like the model\'s folder is refused', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-ext-'));
    fs.mkdirSync(path.join(dir, 'm'));
    fs.mkdirSync(path.join(dir, 'm2'));
    fs.writeFileSync(path.join(dir, 'm2', 'secret.bin'), Buffer.from(Float32Array.of(7, 8).buffer));
    const model = create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 13n }],
      graph: {
        name: 'g', node: [{ opType: 'Add', input: ['x', 'b'], output: ['y'] }],
        initializer: [{
          name: 'b', dataType: TensorProto_DataType.FLOAT, dims: [2n], dataLocation: TensorProto_DataLocation.EXTERNAL,
          externalData: [{ key: 'location', value: '../m2/secret.bin' }],
        }],
        input: [{ name: 'x', type: { value: { case: 'tensorType', value: { elemType: TensorProto_DataType.FLOAT } } } }],
        output: [{ name: 'y', type: { value: { case: 'tensorType', value: { elemType: TensorProto_DataType.FLOAT } } } }],
      },
    } as never);
    fs.writeFileSync(path.join(dir, 'm', 'model.onnx'), toBinary(ModelProtoSchema, model));
    expect(() => readModel(path.join(dir, 'm', 'model.onnx'))).to.throw(/points outside the model's folder \(\.\.\/m2\/secret\.bin\)/);
    // A file of the model's folder whose name starts with two dots is inside.
    fs.writeFileSync(path.join(dir, 'm', '..weights.bin'), Buffer.from(Float32Array.of(7, 8).buffer));
    model.graph!.initializer[0].externalData = [create(StringStringEntryProtoSchema, { key: 'location', value: '..weights.bin' })];
    fs.writeFileSync(path.join(dir, 'm', 'model.onnx'), toBinary(ModelProtoSchema, model));
    expect(Array.from(new Float32Array(readModel(path.join(dir, 'm', 'model.onnx')).graph!.initializer[0].rawData.slice().buffer))).to.deep.equal([7, 8]);
    fs.rmSync(dir, { recursive: true });
  });
});

describe('sparse initializers', () => {
  // x [N, 8] → MatMul W1 [8, 6] → Relu → Gemm W2 [4, 6] (transB): W1 stored with linear indices and float_data, W2 with
  // coordinates and raw data; the dense model holds the same values with zeros elsewhere.
  const r = rng(11);
  const w1 = Float32Array.from({ length: 48 }, (_, i) => (i % 3 === 0 ? r() - 0.5 : 0));
  const w2 = Float32Array.from({ length: 24 }, (_, i) => (i % 2 === 1 ? r() - 0.5 : 0));
  const dense = buildModel({
    inputDims: ['N', 8], output: 'y', initializers: { W1: { dims: [8, 6], data: w1 }, W2: { dims: [4, 6], data: w2 } },
    nodes: [
      { op: 'MatMul', inputs: ['input', 'W1'], output: 'h', name: 'mm' }, { op: 'Relu', inputs: ['h'], output: 'r' },
      { op: 'Gemm', inputs: ['r', 'W2'], output: 'y', name: 'gemm', attrs: { transB: 1 } },
    ],
  });
  const sparseModel = (mutate?: (indices: bigint[]) => void) => {
    const model = readModel(dense);
    const g = model.graph!;
    const nonzero = (w: Float32Array) => [...w.keys()].filter((i) => w[i] !== 0);
    const at1 = nonzero(w1);
    const linear = at1.map(BigInt);
    mutate?.(linear);
    const at2 = nonzero(w2);
    g.initializer = [];
    g.sparseInitializer = [
      create(SparseTensorProtoSchema, {
        values: { name: 'W1', dataType: TensorProto_DataType.FLOAT, dims: [BigInt(at1.length)], floatData: at1.map((i) => w1[i]) },
        indices: { name: 'W1_indices', dataType: TensorProto_DataType.INT64, dims: [BigInt(at1.length)], int64Data: linear }, dims: [8n, 6n],
      }),
      create(SparseTensorProtoSchema, {
        values: { name: 'W2', dataType: TensorProto_DataType.FLOAT, dims: [BigInt(at2.length)], rawData: new Uint8Array(Float32Array.from(at2, (i) => w2[i]).buffer) },
        indices: {
          name: 'W2_indices', dataType: TensorProto_DataType.INT64, dims: [BigInt(at2.length), 2n],
          rawData: new Uint8Array(BigInt64Array.from(at2.flatMap((i) => [BigInt(Math.floor(i / 6)), BigInt(i % 6)])).buffer),
        },
        dims: [4n, 6n],
      }),
    ];
    return toBinary(ModelProtoSchema, model);
  };
  const x = { input: { data: Float32Array.from({ length: 24 }, () => r() * 2 - 1), dims: [3, 8] } };

  it('become dense initializers with the values onnxruntime reads, and their layers are quantized', async () => {
    const bytes = sparseModel();
    const graph = new Graph(readModel(bytes));
    const pass = densifySparseInitializers(graph);
    expect(pass.changed).to.deep.equal(['W1: 16 stored values made a dense [8, 6] initializer', 'W2: 12 stored values made a dense [4, 6] initializer']);
    const made = serializeModel(graph.model);
    expect(Array.from((await run(made, x)).y.data as Float32Array)).to.deep.equal(Array.from((await run(bytes, x)).y.data as Float32Array));
    expect(Array.from((await run(made, x)).y.data as Float32Array)).to.deep.equal(Array.from((await run(dense, x)).y.data as Float32Array));
    const { report } = await quantizeModel(bytes, { weights: { bits: 8 }, evaluationFeeds: [x] });
    expect(report.layers.map((l) => [l.node, l.bits])).to.deep.equal([['mm', 8], ['gemm', 8]]);
    expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.999);
    expect((await inspectModel(bytes)).layers.map((l) => [l.node, l.quantized])).to.deep.equal([['mm', true], ['gemm', true]]);
  });

  it('with an index outside the dims are an OnnxModelError naming the tensor', async () => {
    const bytes = sparseModel((indices) => (indices[3] = 48n));
    let caught: unknown;
    await quantizeModel(bytes, { weights: { bits: 8 } }).catch((e) => (caught = e));
    expect(caught).to.be.instanceOf(OnnxModelError);
    expect((caught as Error).message).to.equal("Sparse initializer 'W1': value 3 has index 48, outside its 48 elements. The model file is corrupted; re-export it.");
  });
});

describe('per-row biases (shape [M, 1] with M equal to the channel count)', () => {
  // A fixed batch of N rows and N output channels: C [N, 1] adds one value per row, which a per-channel rewrite
  // ([N], one value per column) would turn into another model.
  const r = rng(21);
  const n = 6;
  const dense = (rows: number, cols: number) => ({ dims: [rows, cols], data: Array.from({ length: rows * cols }, () => r() - 0.5) });
  const column = () => ({ dims: [n, 1], data: Array.from({ length: n }, () => r() * 2 - 1) });
  const bn = () => ({ g: { dims: [n], data: Array.from({ length: n }, () => 0.5 + r()) }, b: { dims: [n], data: Array.from({ length: n }, () => r() - 0.5) },
    m: { dims: [n], data: Array.from({ length: n }, () => r() - 0.5) }, v: { dims: [n], data: Array.from({ length: n }, () => 0.5 + r()) } });
  const feeds = (count: number, seed: number) => {
    const q = rng(seed);
    return Array.from({ length: count }, () => ({ input: { data: Float32Array.from({ length: n * 16 }, () => q() * 2 - 1), dims: [n, 16] } }));
  };
  const p = bn();
  const models: Array<[string, Uint8Array, object]> = [
    ['Gemm, int32 bias with calibrated activations', buildModel({
      inputDims: [n, 16], output: 'y', initializers: { W: dense(16, n), C: column() },
      nodes: [{ op: 'Gemm', inputs: ['input', 'W', 'C'], output: 'y', name: 'gemm' }],
    }), { weights: { bits: 8 }, activations: { bits: 8 }, calibration: feeds(4, 1) }],
    ['Gemm then BatchNormalization', buildModel({
      inputDims: [n, 16], output: 'y', initializers: { W: dense(16, n), C: column(), g: p.g, b: p.b, m: p.m, v: p.v },
      nodes: [{ op: 'Gemm', inputs: ['input', 'W', 'C'], output: 'h', name: 'gemm' }, { op: 'BatchNormalization', inputs: ['h', 'g', 'b', 'm', 'v'], output: 'y', name: 'bn' }],
    }), { weights: { bits: 8 } }],
    ['MatMul, Add, BatchNormalization', buildModel({
      inputDims: [n, 16], output: 'y', initializers: { W: dense(16, n), C: column(), g: p.g, b: p.b, m: p.m, v: p.v },
      nodes: [
        { op: 'MatMul', inputs: ['input', 'W'], output: 'h', name: 'mm' }, { op: 'Add', inputs: ['h', 'C'], output: 'a', name: 'add' },
        { op: 'BatchNormalization', inputs: ['a', 'g', 'b', 'm', 'v'], output: 'y', name: 'bn' },
      ],
    }), { weights: { bits: 8 } }],
    ['Gemm, data-driven bias correction', buildModel({
      inputDims: [n, 16], output: 'y', initializers: { W: dense(16, n), C: column() },
      nodes: [{ op: 'Gemm', inputs: ['input', 'W', 'C'], output: 'y', name: 'gemm' }],
    }), { weights: { bits: 8 }, activations: { bits: 8, method: 'dynamic', biasCorrection: true }, calibration: feeds(4, 1) }],
  ];

  it('are told from per-channel shapes: [N], [1, N], a scalar for one channel', () => {
    const t = (dims: number[]) => create(TensorProtoSchema, { name: 't', dataType: TensorProto_DataType.FLOAT, dims: dims.map(BigInt) });
    expect([[6], [1, 6], [1, 1, 6], [6, 1], [2, 3], [], [1]].map((d) => isChannelVector(t(d), 6))).to.deep.equal([true, true, true, false, false, false, false]);
    expect([[], [1], [1, 1]].map((d) => isChannelVector(t(d), 1))).to.deep.equal([true, true, true]);
  });

  it('are left as they are (reported), and the quantized model computes what the float one does', async () => {
    for (const [name, model, options] of models) {
      const { report } = await quantizeModel(model, { ...options, evaluationFeeds: feeds(2, 9) } as never);
      expect(report.evaluation!.outputs[0].cosine, name).to.be.greaterThan(0.999);
      const skipped = report.passes.flatMap((pass) => pass.skipped.map((s) => `${pass.pass}: ${s.reason}`));
      expect(skipped.some((s) => /one value per (output )?channel|per-channel float constant bias/.test(s)), `${name}: ${skipped.join('; ')}`).to.equal(true);
    }
  });
});


describe('MatMul weights with leading dimensions of 1', () => {
  // x·W with W [1, K, N] or [1, 1, K, N] (one matrix, as some exporters write it) is quantized like [K, N];
  // a batched weight [2, K, N] (two matrices) is not, and says so.
  const model = buildModel({
    inputDims: [2, 5, 64], output: 'y', opset: 13,
    initializers: {
      w0: { dims: [64, 64], data: heInit(4096, 64, 9) }, w1: { dims: [1, 64, 48], data: heInit(3072, 64, 1) }, b1: { dims: [48], data: heInit(48, 4, 2) },
      w2: { dims: [1, 1, 48, 10], data: heInit(480, 48, 3) }, w3: { dims: [2, 48, 10], data: heInit(960, 48, 5) },
    },
    nodes: [
      { op: 'MatMul', inputs: ['input', 'w0'], output: 'h0', name: 'mm0' },
      { op: 'MatMul', inputs: ['h0', 'w1'], output: 'h1', name: 'mm1' },
      { op: 'Add', inputs: ['h1', 'b1'], output: 'a' },
      { op: 'Relu', inputs: ['a'], output: 'r' },
      { op: 'MatMul', inputs: ['r', 'w2'], output: 'y0', name: 'mm2' },
      { op: 'MatMul', inputs: ['r', 'w3'], output: 'y1', name: 'batched' },
      { op: 'Add', inputs: ['y0', 'y1'], output: 'y' },
    ],
  });
  const r = rng(4);
  const feeds = [0, 1, 2, 3].map(() => ({ input: { data: Float32Array.from({ length: 640 }, () => r() * 2 - 1 + 0.3), dims: [2, 5, 64] } }));

  it('are quantized per output channel (the last axis) or in blocks along K, in every setting, and run in onnxruntime', async () => {
    const settings = {
      'W8': { weights: { bits: 8 as const } },
      'W4 blocks': { weights: { bits: 4 as const, granularity: 'block' as const, blockSize: 16 }, firstLastLayerBits: 4 },
      'W8A8 with bias correction': { weights: { bits: 8 as const }, activations: { bits: 8 as const, method: 'minmax' as const, biasCorrection: true }, calibration: feeds },
      'W8A8 dynamic': { weights: { bits: 8 as const }, activations: { bits: 8 as const, method: 'dynamic' as const } },
      'W8A8 outputs': { weights: { bits: 8 as const }, activations: { bits: 8 as const, method: 'minmax' as const, outputs: true }, calibration: feeds },
      'W8 with bit allocation': { weights: { bits: 8 as const, bitAllocation: { averageBits: 4 } } },
    };
    // onnxruntime's fusions at its default level (where the evaluation runs too) mishandled 3-D weights in two
    // places: DynamicQuantizeMatMul dropped mm1's bias, and QLinearMatMul refused per-column scales of a 3-D weight.
    const runAtDefaultLevel = async (bytes: Uint8Array, feed: (typeof feeds)[number]) => {
      const session = await ort().InferenceSession.create(bytes);
      try {
        return (await session.run({ input: new (ort().Tensor)('float32', feed.input.data, feed.input.dims) })).y.data as Float32Array;
      } finally {
        await session.release();
      }
    };
    const float = await runAtDefaultLevel(model, feeds[3]);
    const leftFloat: Record<string, string[]> = {
      'W8A8 dynamic': ['mm1', 'mm2'].map((n, i) => `${n}: its weight is ${i + 3}-D (onnxruntime's fused dynamic MatMul miscomputes layers whose weight is not 2-D): input left float`),
      'W8A8 outputs': ['mm1', 'mm2'].map((n, i) => `${n}: its weight is ${i + 3}-D: onnxruntime fuses a quantized MatMul output into QLinearMatMul, which fails at its default optimisation level on per-column or blocked scales of a weight that is not 2-D; its output stays float`),
    };
    for (const [name, options] of Object.entries(settings)) {
      const { model: q, report } = await quantizeModel(model, { ...options, evaluationFeeds: feeds });
      const blocked = name === 'W4 blocks';
      const granularity = (axis: number) => (blocked ? `block 16 on axis ${axis - 1}` : `channel on axis ${axis}`);
      expect(report.layers.map((l) => [l.node, l.shape.join('x'), l.granularity]), name).to.deep.equal([
        ['mm0', '64x64', blocked ? 'block 16 on axis 0' : 'channel on axis 1'], ['mm1', '1x64x48', granularity(2)], ['mm2', '1x1x48x10', granularity(3)]]);
      const skipped = report.passes.flatMap((p) => p.skipped.map((s) => `${s.node}: ${s.reason}`));
      expect(skipped.filter((s) => !s.startsWith('batched')), name).to.deep.equal(leftFloat[name] ?? []);
      expect(skipped.filter((s) => s.startsWith('batched')), name).to.deep.equal(['batched: weight shape [2, 48, 10] is not a MatMul weight this pass handles (2-D, or with leading dimensions of 1 ([1, K, N]))']);
      const atDefaultLevel = await runAtDefaultLevel(q, feeds[3]);
      const worst = atDefaultLevel.reduce((w, v, i) => Math.max(w, Math.abs(v - float[i])), 0);
      expect(worst, name).to.be.below(blocked || name.includes('allocation') ? 1 : 0.1);
      // The layers' own errors are those of their bits (a misread axis gives tens of dB less), and the model runs.
      for (const l of report.layers) expect(l.weightSqnrDb, `${name} ${l.node}`).to.be.above(l.bits === 8 ? 45 : 20);
      expect(report.evaluation!.outputs[0].cosine, name).to.be.above(blocked || name.includes('allocation') ? 0.99 : 0.9999);
      const graph = fromBinary(ModelProtoSchema, q).graph!;
      expect(graph.initializer.some((t) => t.name === 'w1' || t.name === 'w2'), name).to.equal(false);
    }
    // One scale per weight: QLinearMatMul takes it at any rank, so the outputs are quantized and it runs fused.
    const perTensor = await quantizeModel(model, { weights: { bits: 8, granularity: 'tensor' }, activations: { bits: 8, method: 'minmax', outputs: true }, calibration: feeds, evaluationFeeds: [] });
    expect(perTensor.report.passes.find((p) => p.pass === 'output-placement')!.skipped).to.deep.equal([]);
    const outputs = await runAtDefaultLevel(perTensor.model, feeds[3]);
    expect(outputs.reduce((worst, v, i) => Math.max(worst, Math.abs(v - float[i])), 0)).to.be.below(0.1);
  });

  it('take GPTQ rounding over the right axis (it lowers their output error below rounding to nearest)', async () => {
    const layerSqnr = async (rounding: 'nearest' | 'gptq') => {
      const { report } = await quantizeModel(model, { weights: { bits: 4, rounding }, firstLastLayerBits: 4, calibration: feeds, evaluationFeeds: feeds });
      return new Map(report.layers.map((l) => [l.node, l.outputSqnrDb!]));
    };
    const nearest = await layerSqnr('nearest');
    const gptq = await layerSqnr('gptq');
    for (const node of ['mm0', 'mm1', 'mm2']) expect(gptq.get(node)! - nearest.get(node)!, node).to.be.above(3);
  });
});

describe('malformed and unusual models (second audit)', () => {
  const info = (name: string, dims?: number[]) => valueInfo(name, TensorProto_DataType.FLOAT, dims);
  const floats = (name: string, dims: number[], values: ArrayLike<number>) => ({
    name, dataType: TensorProto_DataType.FLOAT, dims: dims.map(BigInt), rawData: new Uint8Array(Float32Array.from(values).buffer),
  });
  const model = (graph: Record<string, unknown>, opsetImport = [{ domain: '', version: 13n }]) =>
    toBinary(ModelProtoSchema, create(ModelProtoSchema, { irVersion: 8n, opsetImport, graph: { name: 'g', ...graph } } as never));

  it('a Gemm whose transB is any value but 0 is read as transposed, as onnxruntime reads it (BN folding, int32 bias, GPTQ, dynamic)', async () => {
    const r = rng(21);
    const w = heInit(32, 8, 3);  // [4, 8] read transposed: 8 inputs, 4 outputs
    const gemmBn = (transB: number) => model({
      input: [info('x', [2, 8])], output: [info('y')],
      node: [
        { opType: 'Gemm', name: 'gemm', input: ['x', 'w', 'c'], output: ['h'], attribute: [{ name: 'transB', type: AttributeProto_AttributeType.INT, i: BigInt(transB) }] },
        { opType: 'BatchNormalization', name: 'bn', input: ['h', 'g', 'b', 'm', 'v'], output: ['y'] },
      ],
      initializer: [floats('w', [4, 8], w), floats('c', [4], [0.1, -0.2, 0.3, 0]), floats('g', [4], [1, 2, 3, 4]), floats('b', [4], [0.1, 0.2, 0.3, 0.4]),
        floats('m', [4], [0.5, 0, -0.5, 1]), floats('v', [4], [1, 2, 0.5, 1])],
    });
    const feeds = [0, 1, 2].map(() => ({ x: { data: Float32Array.from({ length: 16 }, () => r() * 2 - 1), dims: [2, 8] } }));
    const O = ort();
    const run = async (bytes: Uint8Array) => {
      const s = await O.InferenceSession.create(bytes);
      try {
        return Array.from((await s.run({ x: new O.Tensor('float32', feeds[0].x.data, [2, 8]) })).y.data as Float32Array);
      } finally {
        await s.release();
      }
    };
    const reference = await run(gemmBn(1));
    expect(await run(gemmBn(2))).to.deep.equal(reference);  // onnxruntime: transB 2 is transB 1
    for (const options of [
      { weights: { bits: 8 as const } },
      { weights: { bits: 8 as const }, activations: { bits: 8 as const, method: 'minmax' as const, biasCorrection: true }, calibration: feeds },
      { weights: { bits: 8 as const, rounding: 'gptq' as const }, calibration: feeds },
      { weights: { bits: 8 as const }, activations: { bits: 8 as const, method: 'dynamic' as const } },
    ]) {
      const got = await quantizeModel(gemmBn(2), { ...options, evaluationFeeds: feeds });
      const want = await quantizeModel(gemmBn(1), { ...options, evaluationFeeds: feeds });
      expect(got.report.layers.map((l) => l.granularity), JSON.stringify(options)).to.deep.equal(['channel on axis 0']);
      expect(got.report.evaluation!.outputs[0].cosine, JSON.stringify(options)).to.be.above(0.9999);
      expect(got.report.passes.flatMap((p) => p.skipped), JSON.stringify(options)).to.deep.equal(want.report.passes.flatMap((p) => p.skipped));
      expect(got.report.passes.flatMap((p) => p.changed), JSON.stringify(options)).to.deep.equal(want.report.passes.flatMap((p) => p.changed));
    }
  });

  it('BatchNormalization parameters of the wrong length are not folded (no NaN bias), with the reason', async () => {
    const bytes = model({
      input: [info('x', [1, 4])], output: [info('y')],
      node: [{ opType: 'Gemm', name: 'gemm', input: ['x', 'w'], output: ['h'] }, { opType: 'BatchNormalization', name: 'bn', input: ['h', 'g', 'b', 'm', 'v'], output: ['y'] }],
      initializer: [floats('w', [4, 4], heInit(16, 4, 1)), floats('g', [4], [1, 1, 1, 1]), floats('b', [4], [0, 0, 0, 0]), floats('m', [3], [0, 0, 0]), floats('v', [4], [1, 1, 1, 1])],
    });
    const { report } = await quantizeModel(bytes, { weights: { bits: 8 }, evaluationFeeds: [] });
    expect(report.passes.find((p) => p.pass === 'fold-batchnorm')!.skipped).to.deep.equal([
      { node: 'bn', reason: "BatchNormalization's scale, bias, mean and variance hold 4, 4, 3, 4 values but the weights have 4 channels" }]);
  });
});

describe('output paths and model files (second audit)', () => {
  const matmul = () => buildModel({
    inputDims: [1, 8], output: 'y', initializers: { w: { dims: [8, 4], data: heInit(32, 8, 1) } },
    nodes: [{ op: 'MatMul', inputs: ['input', 'w'], output: 'y', name: 'mm' }],
  });
  // The same model with its weight in w.bin (external data), offset and length as given.
  const withExternalWeight = (dir: string, entries: Array<[string, string]>, dataFile = 'w.bin') => {
    const model = readModel(matmul());
    const w = model.graph!.initializer[0];
    if (!fs.existsSync(path.join(dir, dataFile))) fs.writeFileSync(path.join(dir, dataFile), Buffer.concat([Buffer.alloc(16), Buffer.from(w.rawData)]));
    w.rawData = new Uint8Array(0);
    w.dataLocation = TensorProto_DataLocation.EXTERNAL;
    w.externalData = [['location', dataFile], ...entries].map(([key, value]) => create(StringStringEntryProtoSchema, { key, value }));
    const file = path.join(dir, 'm.onnx');
    fs.writeFileSync(file, serializeModel(model));
    return file;
  };
  let dir: string;
  beforeEach(() => { dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-paths-')); });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('an output path that is a named pipe is refused before any work, and stays a pipe', async () => {
    const pipe = path.join(dir, 'pipe.onnx');
    expect(spawnSync('mkfifo', [pipe]).status).to.equal(0);
    const stages: string[] = [];
    const e = await quantizeModel(matmul(), { weights: { bits: 8 }, outputPath: pipe, evaluationFeeds: [], onProgress: (s) => stages.push(s) }).catch((x: Error) => x);
    expect(e).to.be.instanceOf(RangeError);
    expect((e as Error).message).to.equal(`Expected a regular file path for options.outputPath but received "${pipe}", which is a named pipe: lowbit writes a ` +
      'temporary file and renames it over the path, which would replace it. Write to a file, then copy it there.');
    expect(stages).to.deep.equal([]);
    expect(fs.lstatSync(pipe).isFIFO()).to.equal(true);
  });

  it('an output path that is a symbolic link is written through (the link stays, the file it names, in another folder, gets the model); with external data it is refused', async () => {
    fs.mkdirSync(path.join(dir, 'elsewhere'));
    const target = path.join(dir, 'elsewhere', 'target.onnx');
    const link = path.join(dir, 'link.onnx');
    fs.writeFileSync(target, 'old');
    fs.symlinkSync(path.join('elsewhere', 'target.onnx'), link);  // relative, as ln -s writes it
    const { model } = await quantizeModel(matmul(), { weights: { bits: 8 }, outputPath: link, evaluationFeeds: [] });
    expect(fs.lstatSync(link).isSymbolicLink()).to.equal(true);
    expect(fs.readFileSync(target)).to.deep.equal(Buffer.from(model));
    // Two files found next to each other: a runtime opening the link would look for the data next to the link.
    const e = await quantizeModel(matmul(), { weights: { bits: 8 }, outputPath: link, evaluationFeeds: [], externalData: true }).catch((x: Error) => x);
    expect(e).to.be.instanceOf(RangeError);
    expect((e as Error).message).to.equal(`Expected a path that is not a symbolic link for options.outputPath but received "${link}", which is one: a model with ` +
      'external data is two files, found next to each other, which a link does not keep together. Give the real path.');
    expect(fs.readdirSync(dir).sort()).to.deep.equal(['elsewhere', 'link.onnx']);
    expect(fs.readdirSync(path.join(dir, 'elsewhere'))).to.deep.equal(['target.onnx']);
  });

  it("externalData with '<outputPath>.data' a folder is refused before any work, and the folder is left as it was", async () => {
    const out = path.join(dir, 'q.onnx');
    fs.mkdirSync(`${out}.data`);
    fs.writeFileSync(path.join(`${out}.data`, 'notes.txt'), 'mine');
    const e = await quantizeModel(matmul(), { weights: { bits: 8 }, outputPath: out, externalData: true, evaluationFeeds: [] }).catch((x: Error) => x);
    expect(e).to.be.instanceOf(RangeError);
    expect((e as Error).message).to.equal(`Expected a file path for options.outputPath's data file but received "${out}.data", which is a folder.`);
    expect(fs.readdirSync(dir)).to.deep.equal(['q.onnx.data']);
    expect(fs.readdirSync(`${out}.data`)).to.deep.equal(['notes.txt']);
  });

  it('an output path that is the input model or its external data file is refused (quantizeModel, finetune), and the input stays', async () => {
    const file = withExternalWeight(dir, [['offset', '16']]);
    const before = [fs.readFileSync(file), fs.readFileSync(path.join(dir, 'w.bin'))];
    for (const [outputPath, which] of [[file, 'file'], [path.join(dir, 'w.bin'), 'external data file']] as const) {
      const e = await quantizeModel(file, { weights: { bits: 8 }, outputPath, evaluationFeeds: [] }).catch((x: Error) => x);
      expect(e, outputPath).to.be.instanceOf(RangeError);
      expect((e as Error).message).to.match(new RegExp(`^Expected a path other than the input model's ${which} \\(.*\\) for options.outputPath but received ".*", which names that file`));
    }
    fs.renameSync(path.join(dir, 'w.bin'), path.join(dir, 'w.data'));  // so that 'w' + '.data' is the data file
    withExternalWeight(dir, [['offset', '16']], 'w.data');
    const e = await quantizeModel(file, { weights: { bits: 8 }, outputPath: path.join(dir, 'w'), externalData: true, evaluationFeeds: [] }).catch((x: Error) => x);
    expect((e as Error).message).to.match(/^Expected a path other than the input model's external data file \(.*\) for options.outputPath's data file but received/);
    fs.renameSync(path.join(dir, 'w.data'), path.join(dir, 'w.bin'));
    withExternalWeight(dir, [['offset', '16']]);
    const f = await finetune(file, { inputs: { data: new Float32Array(16), dims: [2, 8] }, labels: Uint8Array.of(0, 1) }, { outputPath: file, epochs: 1 }).catch((x: Error) => x);
    expect((f as Error).message).to.match(/^Expected a path other than the input model's file \(.*\) for options.outputPath but received/);
    expect([fs.readFileSync(file), fs.readFileSync(path.join(dir, 'w.bin'))]).to.deep.equal(before);
  });

  it('an external data file that is a named pipe is an OnnxModelError, not a wait for ever', () => {
    const file = withExternalWeight(dir, [], 'pipe.bin');
    fs.rmSync(path.join(dir, 'pipe.bin'));
    expect(spawnSync('mkfifo', [path.join(dir, 'pipe.bin')]).status).to.equal(0);
    // In a child: opening a pipe for reading waits in a way that not even process.exit ends.
    const script = `require(${JSON.stringify(path.join(root, 'dist', 'ts', 'index.js'))}).inspectModel(${JSON.stringify(file)})` +
      '.then(() => console.log("resolved"), (e) => console.log(e.name + ": " + e.message))';
    const child = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 20000, killSignal: 'SIGKILL' });
    expect(child.signal, 'the read waited on the pipe').to.equal(null);
    expect(child.stdout.trim()).to.equal(`OnnxModelError: Tensor w: its external data file ${path.join(dir, 'pipe.bin')} cannot be read (it is not a regular file). ` +
      "Put the model's data file next to it, as it was written.");
  });

  it('external data offsets and lengths are decimal digits only, as onnxruntime reads them', async () => {
    for (const [key, value] of [['offset', ''], ['offset', ' 16'], ['offset', '0x10'], ['length', '1.28e2'], ['offset', '-16']]) {
      const file = withExternalWeight(dir, [[key, value], ...(key === 'offset' ? [['length', '128'] as [string, string]] : [['offset', '16'] as [string, string]])]);
      const e = await inspectModel(file).catch((x: Error) => x);
      expect(e, `${key} ${JSON.stringify(value)}`).to.be.instanceOf(OnnxModelError);
      expect((e as Error).message).to.equal(`Tensor w: its external data ${key} is ${JSON.stringify(value)}, not a byte count in decimal digits: ` +
        'the model file is corrupted or was written wrongly; re-export it.');
    }
    const good = await inspectModel(withExternalWeight(dir, [['offset', '16'], ['length', '128']]));
    expect(good.layers[0].quantized).to.equal(true);
  });
});

describe('model contents refused (second audit)', () => {
  const withModel = (edit: (m: ReturnType<typeof readModel>) => void) => {
    const m = readModel(buildModel({
      inputDims: [1, 8], output: 'y', initializers: { w: { dims: [8, 4], data: heInit(32, 8, 1) } },
      nodes: [{ op: 'MatMul', inputs: ['input', 'w'], output: 'y', name: 'mm' }],
    }));
    edit(m);
    return serializeModel(m);
  };

  it('an opset_import with the default domain twice, none, or a version below 1 is an OnnxModelError (quantizeModel and inspectModel)', async () => {
    const cases: Array<[string, (m: ReturnType<typeof readModel>) => void, string]> = [
      ['twice', (m) => m.opsetImport.push({ ...m.opsetImport[0], domain: 'ai.onnx', version: 9n }), '2 versions (13, 9)'],
      ['none', (m) => { m.opsetImport[0].domain = 'com.microsoft'; }, 'no version'],
      ['version 0', (m) => { m.opsetImport[0].version = 0n; }, 'version 0'],
      ['version -5', (m) => { m.opsetImport[0].version = -5n; }, 'version -5'],
    ];
    for (const [label, edit, what] of cases) {
      const e = await quantizeModel(withModel(edit), { weights: { bits: 8 }, evaluationFeeds: [] }).catch((x: Error) => x);
      expect(e, label).to.be.instanceOf(OnnxModelError);
      expect((e as Error).message, label).to.equal(`This model imports ${what} of the default ONNX domain in its opset_import, where a model imports one, ` +
        "1 or later (onnxruntime reads the last of several, lowbit's passes would change the first): fix the model's opset_import (or re-export it).");
      // inspect says so too, rather than listing layers quantizeModel would never reach.
      const inspected = await inspectModel(withModel(edit)).catch((x: Error) => x);
      expect((inspected as Error).message, `inspect: ${label}`).to.equal((e as Error).message);
    }
    // The same version twice is one import: the conversion leaves a single entry, at the new version.
    const { model: same } = await quantizeModel(withModel((m) => m.opsetImport.push({ ...m.opsetImport[0], domain: 'ai.onnx' })), { weights: { bits: 4 }, evaluationFeeds: [] });
    expect(fromBinary(ModelProtoSchema, same).opsetImport.filter((o) => o.domain === '' || o.domain === 'ai.onnx').map((o) => o.version)).to.deep.equal([21n]);
  });

  it('a weight with a negative dimension, or float16 int32_data outside 0..65535, is an OnnxModelError (quantizeModel and inspectModel)', async () => {
    const negative = withModel((m) => { m.graph!.initializer[0].dims = [-8n, -4n]; });
    const half = withModel((m) => {
      const w = m.graph!.initializer[0];
      w.dataType = TensorProto_DataType.FLOAT16;
      w.rawData = new Uint8Array(0);
      w.int32Data = Array.from({ length: 32 }, (_, i) => (i === 5 ? 0x13c00 : 0x3c00));
    });
    for (const [bytes, message] of [
      [negative, "Tensor 'w' has dims [-8, -4]: a dimension below 0 is no size. The model file is corrupted or was written wrongly; re-export it."],
      [half, "Tensor 'w' (float16) holds 80896 at index 5 of its int32_data, which is no float16 bit pattern (0 to 65535): the model file is corrupted or was written wrongly; re-export it."],
    ] as const) {
      for (const run of [() => quantizeModel(bytes, { weights: { bits: 8 }, evaluationFeeds: [] }), () => inspectModel(bytes)]) {
        const e = await run().catch((x: Error) => x);
        expect(e).to.be.instanceOf(OnnxModelError);
        expect((e as Error).message).to.equal(message);
      }
    }
  });

  it('4- or 16-bit activations on a model that cannot reach opset 21 are refused before calibration', async () => {
    const bytes = withModel((m) => {
      // MeanVarianceNormalization: not one of the operators the opset conversion knows.
      m.graph!.node.unshift(create(NodeProtoSchema, { opType: 'MeanVarianceNormalization', name: 'mvn', input: ['input'], output: ['normalized'] }));
      m.graph!.node[1].input[0] = 'normalized';
    });
    const calibration = [0, 1].map((s) => ({ input: { data: Float32Array.from({ length: 8 }, (_, i) => Math.cos(i + s)), dims: [1, 8] } }));
    for (const bits of [4, 16] as const) {
      const stages: string[] = [];
      const e = await quantizeModel(bytes, { weights: { bits: 8 }, activations: { bits, method: 'minmax' }, calibration, onProgress: (s) => stages.push(s) }).catch((x: Error) => x);
      expect(e).to.be.instanceOf(OnnxModelError);
      expect((e as Error).message).to.equal(`${bits}-bit activations need opset 21, and this model (opset 13) cannot be converted: MeanVarianceNormalization (mvn) ` +
        'changed between opset 13 and the target and is not converted here. Use 8-bit activations (options.activations.bits 8), or convert the model to opset 21 first.');
      expect(stages.some((s) => s.startsWith('calibrate'))).to.equal(false);
    }
  });

  it('invalid structure is an OnnxModelError before any pass, also when no evaluation would load the model in onnxruntime', async () => {
    const cases: Array<[string, (m: ReturnType<typeof readModel>) => void, string]> = [
      ['a value defined twice', (m) => {
        m.graph!.node.push(create(NodeProtoSchema, { opType: 'Relu', name: 'again', input: ['input'], output: ['y'] }));
      }, "The value 'y' is defined twice (an output of node 'mm', and an output of node 'again'): ONNX defines each value once, so the model is invalid; re-export it."],
      ['a node output named like the input', (m) => {
        m.graph!.node.unshift(create(NodeProtoSchema, { opType: 'Relu', name: 'shadow', input: ['w'], output: ['input'] }));
      }, "The value 'input' is defined twice (graph input 'input', and an output of node 'shadow'): ONNX defines each value once, so the model is invalid; re-export it."],
      ['a graph output nothing produces', (m) => {
        m.graph!.output.push({ ...m.graph!.output[0], name: 'ghost' });
      }, "Graph output 'ghost' is not produced by any node, input or initializer: the model is invalid; re-export it."],
      ['a node without op_type', (m) => {
        m.graph!.node.push(create(NodeProtoSchema, { opType: '', name: 'blank', input: ['y'], output: ['z'] }));
      }, "Node 'blank' has no op_type: the model is invalid; re-export it."],
      ['a mistyped attribute', (m) => {
        m.graph!.node[0].opType = 'Gemm';
        m.graph!.node[0].attribute.push(create(AttributeProtoSchema, { name: 'transB', type: AttributeProto_AttributeType.FLOAT, f: 1 }));
      }, "Node 'mm' (Gemm): attribute 'transB' is FLOAT, where it is INT: the model is invalid (onnxruntime refuses it too); re-export it."],
      ['two nodes of one name', (m) => {
        m.graph!.node.push(create(NodeProtoSchema, { opType: 'Relu', name: 'mm', input: ['y'], output: ['z'] }));
      }, "Two nodes are named 'mm': ONNX names each node of a graph once (onnxruntime refuses the model too); rename one or re-export the model."],
      ['a Conv with group 0', (m) => {
        m.graph!.node.push(create(NodeProtoSchema, { opType: 'Conv', name: 'conv', input: ['y', 'w'], output: ['z'],
          attribute: [create(AttributeProtoSchema, { name: 'group', type: AttributeProto_AttributeType.INT, i: 0n })] }));
      }, "Node 'conv' (Conv): attribute 'group' is 0, where it must be 1 or more: the model is invalid (onnxruntime refuses it too); re-export it."],
      ['a Conv whose group does not divide its filters', (m) => {
        m.graph!.initializer.push(create(TensorProtoSchema, { name: 'cw', dataType: TensorProto_DataType.FLOAT, dims: [8n, 1n, 1n, 1n], floatData: new Array(8).fill(1) }));
        m.graph!.node.push(create(NodeProtoSchema, { opType: 'Conv', name: 'conv', input: ['y', 'cw'], output: ['z'],
          attribute: [create(AttributeProtoSchema, { name: 'group', type: AttributeProto_AttributeType.INT, i: 3n })] }));
      }, "Node 'conv' (Conv): its weight 'cw' has 8 filters, which group 3 does not divide: the model is invalid (onnxruntime refuses it too); re-export it."],
    ];
    for (const [label, edit, message] of cases) {
      const e = await quantizeModel(withModel(edit), { weights: { bits: 8 }, evaluationFeeds: [] }).catch((x: Error) => x);
      expect(e, label).to.be.instanceOf(OnnxModelError);
      expect((e as Error).message, label).to.equal(message);
    }
  });

  it('a weight constant of another type is reported as that, not as a computed input; external data naming no file says so', async () => {
    const { report } = await quantizeModel(withModel((m) => {
      const w = m.graph!.initializer[0];
      w.name = 'wd';
      w.dataType = TensorProto_DataType.DOUBLE;
      w.rawData = new Uint8Array(new Float64Array(32).fill(0.5).buffer);
      m.graph!.node.push(create(NodeProtoSchema, { opType: 'MatMul', name: 'mm2', input: ['input', 'w2'], output: ['y2'] }));
      m.graph!.initializer.push(create(TensorProtoSchema, { name: 'w2', dataType: TensorProto_DataType.FLOAT, dims: [8n, 4n], rawData: new Uint8Array(new Float32Array(32).fill(0.25).buffer) }));
      m.graph!.node[0].input[1] = 'wd';
      m.graph!.output.push({ ...m.graph!.output[0], name: 'y2' });
    }), { weights: { bits: 8 }, evaluationFeeds: [] });
    expect(report.passes.flatMap((p) => p.skipped)).to.deep.include({ node: 'mm', reason: 'its weight is a DOUBLE constant, not float32 or float16' });
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-noloc-'));
    const file = path.join(dir, 'm.onnx');
    fs.writeFileSync(file, withModel((m) => {
      const w = m.graph!.initializer[0];
      w.rawData = new Uint8Array(0);
      w.dataLocation = TensorProto_DataLocation.EXTERNAL;
      w.externalData = [create(StringStringEntryProtoSchema, { key: 'offset', value: '0' })];
    }));
    const e = await inspectModel(file).catch((x: Error) => x);
    fs.rmSync(dir, { recursive: true });
    expect(e).to.be.instanceOf(OnnxModelError);
    expect((e as Error).message).to.equal('Tensor w keeps its data externally but names no data file (location null): the model file is corrupted or was written wrongly; re-export it.');
  });

  it('inspectModel refuses a structurally invalid model as quantizeModel does', async () => {
    const bytes = withModel((m) => { m.graph!.output.push({ ...m.graph!.output[0], name: 'ghost' }); });
    const e = await inspectModel(bytes).catch((x: Error) => x);
    expect(e).to.be.instanceOf(OnnxModelError);
    expect((e as Error).message).to.equal("Graph output 'ghost' is not produced by any node, input or initializer: the model is invalid; re-export it.");
  });

  it('inspect leaves the statistics blank for layers without float weights (quantized) and gives NaN, not ±Infinity, when all are NaN', async () => {
    const allNaN = await inspectModel(withModel((m) => { m.graph!.initializer[0].rawData = new Uint8Array(new Float32Array(32).fill(NaN).buffer); }));
    expect([allNaN.layers[0].min, allNaN.layers[0].max, allNaN.layers[0].std, allNaN.layers[0].nonFinite]).to.deep.equal([NaN, NaN, NaN, 32]);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-inspect-'));
    const file = path.join(dir, 'q.onnx');
    await quantizeModel(withModel(() => undefined), { weights: { bits: 8 }, evaluationFeeds: [], outputPath: file });
    const cli = spawnSync(process.execPath, [path.join(root, 'dist', 'ts', 'cli.js'), 'inspect', file], { encoding: 'utf8' });
    fs.rmSync(dir, { recursive: true });
    expect(cli.status, cli.stderr).to.equal(0);
    const row = cli.stdout.split('\n').find((l) => l.startsWith('mm '))!;
    expect(row).to.not.include('NaN');
    expect(row).to.match(/^mm\s+MatMul\s+no: its weight is already quantized/);
  });

  it('options that do nothing on a model say so in the report: groups that divide no layer, gather without a Gather', async () => {
    const { report } = await quantizeModel(withModel(() => undefined), { weights: { bits: 4, groups: 3, gather: true }, evaluationFeeds: [] });
    expect(report.passes.find((p) => p.pass === 'quantize-weights')!.skipped).to.deep.equal([
      { node: 'mm', reason: 'groups: its 4 output channels do not divide into 3 groups; quantized per channel' }]);
    expect(report.passes.find((p) => p.pass === 'quantize-gather')!.skipped).to.deep.equal([
      { node: '(model)', reason: 'it has no Gather of a float table (an embedding) to quantize' }]);
    const { report: grouped } = await quantizeModel(withModel(() => undefined), { weights: { bits: 4, groups: 2 }, evaluationFeeds: [] });
    expect(grouped.passes.find((p) => p.pass === 'quantize-weights')!.skipped).to.deep.equal([]);
    expect(grouped.layers[0].granularity).to.equal('2 groups on axis 1');
  });

  it('model bytes whose buffer was detached are a TypeError saying so', async () => {
    const bytes = withModel(() => undefined);
    structuredClone(bytes.buffer, { transfer: [bytes.buffer as ArrayBuffer] });
    for (const run of [() => quantizeModel(bytes, { weights: { bits: 8 } }), () => inspectModel(bytes)]) {
      const e = await run().catch((x: Error) => x);
      expect(e).to.be.instanceOf(TypeError);
      expect((e as Error).message).to.match(/^Expected a typed array with an attached buffer for model but received Uint8Array on a detached buffer\. The buffer was transferred/);
    }
  });
});

describe('layers quantized on native worker threads from the caller\'s model bytes (concurrency audit)', () => {
  it('are copied first: the caller moving their buffer and writing into it while the threads work changes nothing', async () => {
    const r = rng(41);
    const data = Float32Array.from({ length: 1031 * 1021 }, () => r() * 2 - 1);  // past 2^20: quantized off the event loop
    const how = { shape: [1031, 1021], bits: 4 as const, method: 'mse' as const, granularity: 'channel' as const, axis: 0 };
    const want = quantizeTensor(data, how);
    const steps = quantized(data, how, true, true);
    const work = steps.next();
    expect(work.done).to.equal(false);
    // The caller transfers the bytes (the backing store moves with them) and reuses the memory.
    new Float32Array(structuredClone(data.buffer, { transfer: [data.buffer] })).fill(1e6);
    await work.value;
    const got = steps.next();
    expect(got.done).to.equal(true);
    const q = got.value as ReturnType<typeof quantizeTensor>;
    expect(Buffer.from(q.values.buffer).equals(Buffer.from(want.values.buffer))).to.equal(true);
    expect(q.scale).to.deep.equal(want.scale);
  });

  it('quantizeModel asks for the copy for bytes given to it, not for a model it read from a path', async () => {
    const bytes = buildModel({
      inputDims: [1, 1031], output: 'y', initializers: { w: { dims: [1031, 1021], data: heInit(1031 * 1021, 1031, 5) } },
      nodes: [{ op: 'MatMul', inputs: ['input', 'w'], output: 'y', name: 'mm' }],
    });
    const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-caller-')), 'mm.onnx');
    fs.writeFileSync(file, bytes);
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const quantizeModule: { quantizeOffThread: (...a: unknown[]) => unknown } = require('../../ts/quantize');
    const real = quantizeModule.quantizeOffThread;
    const copies: unknown[] = [];
    quantizeModule.quantizeOffThread = (...a: unknown[]) => (copies.push(a[2]), real(...a));
    try {
      await quantizeModel(bytes, { weights: { bits: 8 }, evaluationFeeds: [] });
      await quantizeModel(file, { weights: { bits: 8 }, evaluationFeeds: [] });
    } finally {
      quantizeModule.quantizeOffThread = real;
      fs.rmSync(path.dirname(file), { recursive: true });
    }
    expect(copies).to.deep.equal([true, false]);
  });
});

describe('a weight with no values but billions of output channels', () => {
  it('is left float with the reason (quantizeTensor would refuse it), not an error naming quantizeTensor\'s options', async () => {
    const model = buildModel({ inputDims: [1, 0], output: 'y', initializers: { w: { dims: [0, 2 ** 31], data: [] } },
      nodes: [{ op: 'MatMul', inputs: ['input', 'w'], output: 'y', name: 'mm' }] });
    let caught: unknown;
    await quantizeModel(model, { weights: { bits: 8 }, evaluationFeeds: [] }).catch((e) => (caught = e));
    // Its only layer: the model would be unchanged, and the error gives the layer's reason.
    expect(caught).to.be.instanceOf(OnnxModelError);
    expect((caught as Error).message).to.match(/MatMul 'mm': its weight \[0, 2147483648\] has no values but 2147483648 output channels: nothing to quantize, and a scale per channel would take gigabytes\.$/);
  });
});

describe('the evaluation on inputs that say nothing (second audit)', () => {
  const mm = (inputDims: Array<number | string>, w = heInit(32, 8, 1)) => buildModel({
    inputDims, output: 'y', initializers: { w: { dims: [8, 4], data: w } },
    nodes: [{ op: 'MatMul', inputs: ['input', 'w'], output: 'y', name: 'mm' }],
  });

  it('made-up inputs are reported with their dims (symbolic ones set to 1), and the CLI says what they are worth', async () => {
    const { report } = await quantizeModel(mm(['batch', 8]), { weights: { bits: 8 } });
    expect(report.evaluation!.madeUpInputs).to.deep.equal({ input: [1, 8] });
    const { report: given } = await quantizeModel(mm(['batch', 8]), { weights: { bits: 8 }, evaluationFeeds: [{ input: { data: new Float32Array(8).fill(1), dims: [1, 8] } }] });
    expect(given.evaluation!.madeUpInputs).to.equal(undefined);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-madeup-'));
    fs.writeFileSync(path.join(dir, 'm.onnx'), mm(['batch', 8]));
    const cli = spawnSync(process.execPath, [path.join(root, 'dist', 'ts', 'cli.js'), 'quantize', 'm.onnx'], { cwd: dir, encoding: 'utf8' });
    fs.rmSync(dir, { recursive: true });
    expect(cli.status, cli.stderr).to.equal(0);
    expect(cli.stdout).to.match(/output y: cosine [0-9.]+ vs float, SQNR [0-9.]+ dB, top-1 agreement [0-9.]+% \(2 made-up samples\)\n/);
    expect(cli.stdout).to.include('note: compared on made-up inputs (input [1, 8]; symbolic dimensions set to 1): this shows the model runs more than how close it stays; pass --calib <folder> to compare on real inputs.');
  });

  it('made-up inputs are generated in pieces, turning the event loop; the same seed gives the same standard normal values (float and float16)', async () => {
    const model = fromBinary(ModelProtoSchema, mm([1, 1 << 22]));
    let turns = 0;
    let done = false;
    const spin = () => { if (!done) { turns++; setImmediate(spin); } };
    setImmediate(spin);
    const [a, b, c] = [await randomFeeds(model, 1), await randomFeeds(model, 1), await randomFeeds(model, 2)];
    done = true;
    expect(turns, 'event-loop turns while 3 × 2^22 values were made up').to.be.at.least(3);
    const values = (f: unknown) => (f as Record<string, { data: Float32Array }>).input.data;
    expect(values(a)).to.have.length(1 << 22);
    expect(Buffer.from(values(a).buffer).equals(Buffer.from(values(b).buffer)), 'same seed, same values').to.equal(true);
    expect(Buffer.from(values(a).buffer).equals(Buffer.from(values(c).buffer)), 'another seed, other values').to.equal(false);
    const moments = (v: ArrayLike<number>) => {
      let sum = 0, squares = 0;
      for (let i = 0; i < v.length; i++) { sum += v[i]; squares += v[i] * v[i]; }
      return { mean: sum / v.length, std: Math.sqrt(squares / v.length - (sum / v.length) ** 2) };
    };
    const m = moments(values(a));
    expect(m.mean).to.be.closeTo(0, 0.01);
    expect(m.std).to.be.closeTo(1, 0.01);
    (model.graph!.input[0].type!.value.value as { elemType: number }).elemType = TensorProto_DataType.FLOAT16;
    const half = await randomFeeds(model, 1);
    const bits = (half as Record<string, { data: Uint16Array }>).input.data;
    expect(bits).to.be.instanceOf(Uint16Array);
    expect(Buffer.from(bits.buffer).equals(Buffer.from(toFloat16Array(values(a)).buffer)), 'float16 of the float values').to.equal(true);
  });

  it('an input with a dimension of 0, or too many values to make up, skips the made-up evaluation and says why', async () => {
    const { report: zero } = await quantizeModel(mm([0, 8]), { weights: { bits: 8 } });
    expect(zero.evaluation).to.equal(undefined);
    expect(zero.evaluationSkipped).to.equal("input 'input' has a dimension of 0 (dims [0, 8]): made-up inputs would hold no values; pass evaluationFeeds");
    const { report: huge } = await quantizeModel(mm([2 ** 20, 2 ** 20, 8]), { weights: { bits: 8 } });
    expect(huge.evaluationSkipped).to.equal("input 'input' has dims [1048576, 1048576, 8], 8796093022208 values, more than lowbit makes up for one input (16777216); pass evaluationFeeds");
  });

  it('empty feeds and float outputs holding NaN are left out of the cosine (uncompared when every feed is), not counted as agreement', async () => {
    const { report: empty } = await quantizeModel(mm(['batch', 8]), { weights: { bits: 8 }, evaluationFeeds: [{ input: { data: new Float32Array(0), dims: [0, 8] } }] });
    expect(empty.evaluation).to.deep.equal({ samples: 0, outputs: [], uncompared: [{ name: 'y', reason: 'it was empty on 1 feed' }] });
    // Inputs of 3e38 overflow: NaN/Infinity in the float model's output on the second feed only.
    const feeds = [0.5, 3e38].map((v) => ({ input: { data: new Float32Array(8).fill(v), dims: [1, 8] } }));
    const { report } = await quantizeModel(mm([1, 8]), { weights: { bits: 8 }, evaluationFeeds: feeds });
    expect(report.evaluation!.outputs).to.have.length(1);
    expect(report.evaluation!.outputs[0].nonFiniteFeeds).to.equal(1);
    expect(report.evaluation!.samples).to.equal(1);  // the feed left out is not counted
    expect(report.evaluation!.outputs[0].cosine).to.be.above(0.999);  // from the first feed alone
    const { report: all } = await quantizeModel(mm([1, 8]), { weights: { bits: 8 }, evaluationFeeds: [feeds[1]] });
    expect(all.evaluation!.outputs).to.deep.equal([]);
    expect(all.evaluation!.uncompared).to.deep.equal([{ name: 'y', reason: "the float model's output held NaN or an infinity on 1 feed" }]);
  });

});

describe('QDQ audit: biases that are not finite, layers left float', () => {
  it('a NaN or infinite bias stays float with the reason (Math.round(NaN) in an Int32Array was a bias of 0)', async () => {
    for (const bad of [NaN, Infinity]) {
      const model = buildModel({
        inputDims: [1, 1, 4, 4], nodes: [{ op: 'Conv', inputs: ['input', 'w', 'b'], output: 'y', name: 'conv', attrs: { kernel_shape: [3, 3] } }],
        initializers: { w: { dims: [2, 1, 3, 3], data: Array.from({ length: 18 }, (_, i) => Math.sin(i)) }, b: { dims: [2], data: [bad, 1] } }, output: 'y',
      });
      const calibration = [{ input: { data: Float32Array.from({ length: 16 }, (_, i) => Math.cos(i)), dims: [1, 1, 4, 4] } }];
      const { report } = await quantizeModel(model, { weights: { bits: 8 }, activations: { bits: 8 }, calibration, evaluationFeeds: [] });
      expect(report.passes.find((p) => p.pass === 'quantize-bias'), String(bad)).to.deep.include({ changed: [], skipped: [{ node: 'conv', reason: 'the bias holds NaN or an infinity' }] });
    }
  });

  it('with quantized layer outputs, a keepFloat layer reads the float tensor: onnxruntime does not quantize it behind the user\'s back', async () => {
    const weights = (n: number, step: number) => ({ dims: [4, 4, 3, 3], data: Array.from({ length: n }, (_, i) => Math.sin(i * step) * 0.4) });
    const conv = (name: string, input: string, output: string, w: string) => ({ op: 'Conv', inputs: [input, w], output, name, attrs: { kernel_shape: [3, 3], pads: [1, 1, 1, 1] } });
    const model = buildModel({
      inputDims: [1, 4, 6, 6], nodes: [conv('c1', 'input', 'h1', 'w1'), conv('kept', 'h1', 'h2', 'w2'), conv('c3', 'h2', 'y', 'w3')],
      initializers: { w1: weights(144, 0.7), w2: weights(144, 1.3), w3: weights(144, 2.1) }, output: 'y',
    });
    const x = Float32Array.from({ length: 144 }, (_, i) => Math.cos(i * 0.37));
    const { model: q, report } = await quantizeModel(model, { weights: { bits: 8 }, activations: { bits: 8, outputs: true }, keepFloat: ['kept'],
      calibration: [{ input: { data: x, dims: [1, 4, 6, 6] } }], evaluationFeeds: [] });
    const graph = readModel(q).graph!;
    expect(graph.node.find((n) => n.name === 'kept')!.input[0]).to.equal('h1');
    expect(report.passes.find((p) => p.pass === 'quantize-activations')!.skipped).to.deep.equal([{ node: 'h1', reason: 'only layers left float read it' }]);
    expect(report.layers.find((l) => l.node === 'c1')!.outputActivation).to.equal(undefined);
    // What onnxruntime makes of it: kept stays a float Conv (before, a QLinearConv with a per-tensor int8 weight).
    const optimized = path.join(os.tmpdir(), `lowbit-kept-${process.pid}.onnx`);
    try {
      await ort().InferenceSession.create(q, { graphOptimizationLevel: 'basic', optimizedModelFilePath: optimized });
      const nodes = readModel(optimized).graph!.node;
      expect(nodes.filter((n) => n.opType === 'QLinearConv').map((n) => n.name)).to.not.include.members(nodes.filter((n) => n.name.startsWith('kept')).map((n) => n.name));
      expect(nodes.find((n) => n.name === 'kept')?.opType).to.equal('Conv');
    } finally {
      fs.rmSync(optimized, { force: true });
    }
    // A MatMul of two activations (attention's scores) has no weights of its own: it keeps reading the dequantized value.
    const attention = buildModel({
      inputDims: [4, 8], nodes: [{ op: 'MatMul', inputs: ['input', 'w'], output: 'a', name: 'proj' }, { op: 'Transpose', inputs: ['a'], output: 't', name: 'tr' },
        { op: 'MatMul', inputs: ['a', 't'], output: 'y', name: 'scores' }],
      initializers: { w: { dims: [8, 8], data: Array.from({ length: 64 }, (_, i) => Math.sin(i) * 0.3) } }, output: 'y',
    });
    const xa = Float32Array.from({ length: 32 }, (_, i) => Math.cos(i));
    const scores = readModel((await quantizeModel(attention, { weights: { bits: 8 }, activations: { bits: 8, outputs: true },
      calibration: [{ input: { data: xa, dims: [4, 8] } }], evaluationFeeds: [] })).model).graph!.node.find((n) => n.name === 'scores')!;
    expect(scores.input[0]).to.equal('a_dequantized');
  });
});
