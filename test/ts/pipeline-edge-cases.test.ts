// quantizeModel and the CLI on inputs found by an audit: streams as calibration data, .npy folders that do not
// line up, evaluation per sample, cancelling, and ONNX rewrites (Slice ends, com.microsoft biases, Gemm alpha,
// Dropout masks, IR versions, external data paths).
import { create, fromBinary, toBinary } from '@bufbuild/protobuf';
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Readable } from 'node:stream';
import { ModelProtoSchema, TensorProto_DataLocation, TensorProto_DataType } from 'onnx-buf';

import { ort } from '../../ts/bench/ort-models';
import { readNpyFeed } from '../../ts/onnx/calibrate';
import { Graph } from '../../ts/onnx/graph';
import { inspectModel } from '../../ts/onnx/inspect';
import { readModel, serializeModel } from '../../ts/onnx/model-io';
import { upgradeOpset } from '../../ts/onnx/passes/upgrade-opset';
import { compareOutputs, quantizeModel } from '../../ts/onnx/quantize-model';
import { writeNpy } from '../helpers/npy';
import { buildModel, heInit } from '../helpers/onnx-builder';
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

  it('an object that reads twice but gives fewer batches the second time is an error naming options.calibration', async () => {
    let reads = 0;
    const shrinking = { * [Symbol.iterator]() { reads++; yield feed(0, 8); if (reads === 1) yield feed(8, 8); } };
    let caught: unknown;
    await quantizeModel(mnist, { weights: { bits: 4, rounding: 'gptq' }, activations: { bits: 8 }, calibration: shrinking, evaluationFeeds: [] })
      .catch((e) => (caught = e));
    expect((caught as Error).message).to.match(/the same 2 batches on its second reading .* for options\.calibration but received "1 batches"/);
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

  it('an output whose shape the quantized model changed is a lowbit bug, not a NaN cosine', async () => {
    const relu = buildModel({ inputDims: [1, 4], output: 'y', initializers: {}, nodes: [{ op: 'Relu', inputs: ['input'], output: 'y' }] });
    const shorter = buildModel({
      inputDims: [1, 4], output: 'y', initializers: {}, int64: { starts: [0], ends: [2], axes: [1] },
      nodes: [{ op: 'Slice', inputs: ['input', 'starts', 'ends', 'axes'], output: 'y' }],
    });
    let caught: unknown;
    await compareOutputs(relu, shorter, [{ input: { data: Float32Array.of(1, 2, 3, 4), dims: [1, 4] } }]).catch((e) => (caught = e));
    expect((caught as Error).message).to.match(/output 'y' has dims \[1, 2\] where the float model's has \[1, 4\]: a rewrite changed what the model computes/);
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

  it('an abort during the write removes the temporary files (external data too)', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-abort-'));
    const stop = new AbortController();
    let caught: unknown;
    await quantizeModel(mnist, {
      weights: { bits: 8 }, outputPath: path.join(dir, 'q.onnx'), externalData: true, evaluationFeeds: [], signal: stop.signal,
      onProgress: (stage) => { if (stage === 'write') setImmediate(() => stop.abort(new Error('late'))); },
    }).catch((e) => (caught = e));
    // Either the write finished before the abort took effect, or nothing of it is left.
    if (caught) expect(fs.readdirSync(dir)).to.deep.equal([]);
    else expect(fs.readdirSync(dir).sort()).to.deep.equal(['q.onnx', 'q.onnx.data']);
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
    const gemm = (alpha: number) => buildModel({
      inputDims: [8, 32], output: 'y', opset: 13,
      initializers: { w: { dims: [16, 32], data: heInit(512, 32, 7) }, b: { dims: [16], data: new Float32Array(16) } },
      nodes: [{ op: 'Gemm', inputs: ['input', 'w', 'b'], output: 'y', name: 'fc', attrs: { transB: 1, alpha } }],
    });
    // Inputs with a mean: rounding errors shift the outputs' means, which the correction removes.
    const calibration = Array.from({ length: 4 }, () => ({ input: { data: Float32Array.from({ length: 256 }, () => 1 + r()), dims: [8, 32] } }));
    const meanError = async (alpha: number, correct: boolean) => {
      const { model } = await quantizeModel(gemm(alpha), {
        weights: { bits: 4 }, activations: { bits: 16, biasCorrection: correct }, calibration, evaluationFeeds: [],
      });
      const f = (await run(gemm(alpha), calibration[0])).y.data as Float32Array;
      const q = (await run(model, calibration[0])).y.data as Float32Array;
      const perChannel = new Float64Array(16);
      for (let i = 0; i < f.length; i++) perChannel[i % 16] += (q[i] - f[i]) / 8;
      return perChannel.reduce((a, v) => a + Math.abs(v), 0) / 16;
    };
    const uncorrected = await meanError(1, false);
    const corrected = await meanError(1, true);
    expect(corrected).to.be.below(uncorrected / 4);
    expect(await meanError(-1, true)).to.be.closeTo(corrected, 1e-3);
  });

  it('a Dropout whose mask is read is not converted past opset 10 (its mask became bool)', () => {
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
    expect(() => upgradeOpset(new Graph(readModel(unread)), 13)).not.to.throw();
  });

  it('raising the opset raises the IR version to the one the opset came with (INT4 needs IR 10)', async () => {
    const model = edited(buildModel({
      inputDims: [1, 16], output: 'y', opset: 9, initializers: { w: { dims: [16, 8], data: heInit(128, 16, 9) } },
      nodes: [{ op: 'MatMul', inputs: ['input', 'w'], output: 'y', name: 'mm' }],
    }), (m) => { m.irVersion = 3n; });
    const { model: q } = await quantizeModel(model, { weights: { bits: 4, granularity: 'block', blockSize: 16 }, evaluationFeeds: [] });
    const out = fromBinary(ModelProtoSchema, q);
    expect(out.opsetImport.find((o) => o.domain === '')!.version).to.equal(21n);
    expect(out.irVersion).to.equal(10n);
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
    fs.rmSync(dir, { recursive: true });
  });
});
