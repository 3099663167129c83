// The bundled example (assets/mnist-cnn.onnx, trained by experiments/train-mnist-cnn.ts):
// the one-command try-it and W8A8 accuracy.
import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { TensorProto_DataType } from 'onnx-buf';

import { mnistAccuracy } from '../../experiments/ptq';
import { ort } from '../../ts/bench/ort-models';
import { readModel } from '../../ts/onnx/model-io';
import { floatData } from '../../ts/onnx/graph';
import { unpackInt2 } from '../../ts/pack';
import { quantizeModel } from '../../ts/onnx/quantize-model';

const root = path.resolve(__dirname, '..', '..', '..');
const model = path.join(root, 'assets', 'mnist-cnn.onnx');

/** Per quantized layer (by node name), its weight DequantizeLinear's stored codes (raw bytes) and scales. */
function weightQuantizers(bytes: Uint8Array): Map<string, { codes: Uint8Array; scale: Float32Array }> {
  const graph = readModel(bytes).graph!;
  const init = (name: string) => graph.initializer.find((t) => t.name === name)!;
  return new Map(graph.node.filter((n) => ['Conv', 'Gemm'].includes(n.opType)).map((n) => {
    const dq = graph.node.find((d) => d.opType === 'DequantizeLinear' && d.output[0] === n.input[1])!;
    return [n.name, { codes: init(dq.input[0]).rawData, scale: floatData(init(dq.input[1]))! }];
  }));
}

describe('bundled MNIST CNN example', () => {
  it('`lowbit quantize` without a model quantizes it to W8A8 and writes the result', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-cli-'));
    const r = spawnSync(process.execPath, [path.join(root, 'dist', 'ts', 'cli.js'), 'quantize'], { cwd: dir, encoding: 'utf8' });
    expect(r.status, r.stderr).to.equal(0);
    expect(r.stdout).to.match(/bundled example/);
    expect(r.stdout).to.match(/activation tensors quantized \(minmax ranges\) from 1 calibration batch$/m);
    expect(r.stdout).to.match(/wrote mnist-cnn\.q\.onnx/);
    expect(r.stdout).to.match(/note: onnxruntime runs layers whose outputs are not quantized in float; --quantize-outputs/);
    expect(fs.existsSync(path.join(dir, 'mnist-cnn.q.onnx'))).to.equal(true);
    fs.rmSync(dir, { recursive: true });
  });

  it('`lowbit quantize --rounding gptq --abits 16 --calib` runs; without --calib it says what to pass', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-cli-'));
    const cli = path.join(root, 'dist', 'ts', 'cli.js');
    const calib = path.join(root, 'assets', 'mnist-calibration');
    const r = spawnSync(process.execPath, [cli, 'quantize', model, '--wbits', '4', '--abits', '16', '--rounding', 'gptq', '--calib', calib], { cwd: dir, encoding: 'utf8' });
    expect(r.status, r.stderr).to.equal(0);
    expect(r.stdout).to.match(/conv2 +Conv +16x8x3x3 +4 +channel on axis 0 +minmax, gptq rounding/);
    expect(r.stdout).to.match(/opset 13 -> 21/);
    const missing = spawnSync(process.execPath, [cli, 'quantize', model, '--rounding', 'gptq'], { cwd: dir, encoding: 'utf8' });
    expect(missing.status).to.equal(1);
    expect(missing.stderr).to.match(/--rounding gptq needs calibration data: pass --calib <folder>/);
    expect(fs.readdirSync(dir)).to.deep.equal(['mnist-cnn.q.onnx']);
    fs.rmSync(dir, { recursive: true });
  });

  it("`--method mse` with --abits takes 'mse' for the activation ranges too (the API's ranges); --amethod overrides it", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-cli-'));
    const cli = path.join(root, 'dist', 'ts', 'cli.js');
    const calibration = path.join(root, 'assets', 'mnist-calibration');
    const ranges = (args: string[]) => {
      const r = spawnSync(process.execPath, [cli, 'quantize', model, '--abits', '4', '--calib', calibration, '--report', 'r.json', '--no-evaluate', ...args], { cwd: dir, encoding: 'utf8' });
      expect(r.status, r.stderr).to.equal(0);
      return (JSON.parse(fs.readFileSync(path.join(dir, 'r.json'), 'utf8')).activations as Array<{ range: number[] }>).map((a) => a.range);
    };
    const api = async (method: 'mse' | 'minmax') => (await quantizeModel(model, {
      weights: { bits: 8, method: 'mse' }, activations: { bits: 4, method }, calibration, evaluationFeeds: [],
    })).report.activations.map((a) => a.range);
    const mse = await api('mse');
    expect(ranges(['--method', 'mse'])).to.deep.equal(mse);
    expect(ranges(['--method', 'mse', '--amethod', 'minmax'])).to.deep.equal(await api('minmax')).and.not.deep.equal(mse);
    fs.rmSync(dir, { recursive: true });
  });

  it('a --report path in a missing folder or a missing --calib folder fails before any work and writes nothing; --report writes JSON', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-cli-'));
    const cli = path.join(root, 'dist', 'ts', 'cli.js');
    const badReport = spawnSync(process.execPath, [cli, 'quantize', model, '--report', path.join(dir, 'missing', 'r.json')], { cwd: dir, encoding: 'utf8' });
    expect(badReport.status).to.equal(1);
    expect(badReport.stderr).to.match(/a file path in an existing folder for --report .* does not exist\. Create it first\./);
    const badCalib = spawnSync(process.execPath, [cli, 'quantize', model, '--abits', '8', '--calib', path.join(dir, 'nope')], { cwd: dir, encoding: 'utf8' });
    expect(badCalib.status).to.equal(1);
    expect(badCalib.stderr).to.match(/Expected a folder for --calib but received ".*nope", which does not exist: check the path\./);
    expect(fs.readdirSync(dir)).to.deep.equal([]);
    const good = spawnSync(process.execPath, [cli, 'quantize', model, '--report', 'r.json'], { cwd: dir, encoding: 'utf8' });
    expect(good.status, good.stderr).to.equal(0);
    expect(JSON.parse(fs.readFileSync(path.join(dir, 'r.json'), 'utf8')).layers).to.have.length(3);
    expect(JSON.parse(fs.readFileSync(path.join(dir, 'r.json'), 'utf8')).evaluation.outputs).to.have.length(1);
    expect(good.stdout).to.match(/output logits: cosine/);
    expect(fs.readdirSync(dir).sort()).to.deep.equal(['mnist-cnn.q.onnx', 'r.json']);
    const skipped = spawnSync(process.execPath, [cli, 'quantize', model, '--report', 'r.json', '--no-evaluate'], { cwd: dir, encoding: 'utf8' });
    expect(skipped.status, skipped.stderr).to.equal(0);
    expect(skipped.stdout).not.to.match(/cosine/);
    expect(JSON.parse(fs.readFileSync(path.join(dir, 'r.json'), 'utf8')).evaluation).to.equal(undefined);
    fs.rmSync(dir, { recursive: true });
  });

  it('a number option given text, or 0 where 0 is not allowed, fails before any work; a keepFloat name that matches no layer is reported with the close one', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-cli-'));
    const cli = path.join(root, 'dist', 'ts', 'cli.js');
    const text = spawnSync(process.execPath, [cli, 'quantize', model, '--abits', 'abc', '--calib', 'x'], { cwd: dir, encoding: 'utf8' });
    expect(text.status).to.equal(1);
    expect(text.stderr).to.match(/option '--abits <bits>' argument 'abc' is invalid\. expected a number, got 'abc'/);
    // 0 used to read as "not given" (weight-only) for --abits and as no bit allocation for --bit-allocation.
    // The API's errors name the CLI's flags.
    const calib = path.join(root, 'assets', 'mnist-calibration');
    const zeroBits = spawnSync(process.execPath, [cli, 'quantize', model, '--abits', '0', '--calib', calib], { cwd: dir, encoding: 'utf8' });
    expect(zeroBits.stderr).to.match(/Expected 4, 8 or 16 for --abits but received 0\./);
    const zeroMean = spawnSync(process.execPath, [cli, 'quantize', model, '--bit-allocation', '0'], { cwd: dir, encoding: 'utf8' });
    expect(zeroMean.stderr).to.match(/Expected a number in \[2, 8\] \(the mean bits per weight\) for --bit-allocation but received 0\./);
    const wbits = spawnSync(process.execPath, [cli, 'quantize', model, '--wbits', '3'], { cwd: dir, encoding: 'utf8' });
    expect(wbits.stderr).to.match(/for --wbits but received 3\./);
    // --amethod without --abits would have been ignored.
    const amethod = spawnSync(process.execPath, [cli, 'quantize', model, '--amethod', 'kl', '--calib', calib], { cwd: dir, encoding: 'utf8' });
    expect(amethod.status).to.equal(1);
    expect(amethod.stderr).to.match(/--amethod kl sets how activations are quantized: pass --abits 8/);
    expect(fs.readdirSync(dir)).to.deep.equal([]);
    const typo = spawnSync(process.execPath, [cli, 'quantize', model, '--keep-float', 'Conv2', '--no-evaluate'], { cwd: dir, encoding: 'utf8' });
    expect(typo.status, typo.stderr).to.equal(0);
    expect(typo.stdout).to.include("skipped by quantize-weights: Conv2: keepFloat: no Conv, Gemm or MatMul layer of this model has this name or op type (did you mean 'conv2'?); it keeps nothing");
    // Spaces and empty entries in the list are dropped (an empty name would keep every unnamed layer).
    const spaced = spawnSync(process.execPath, [cli, 'quantize', model, '--keep-float', ' conv2, ,', '--no-evaluate'], { cwd: dir, encoding: 'utf8' });
    expect(spaced.status, spaced.stderr).to.equal(0);
    expect(spaced.stdout).to.include('skipped by quantize-weights: conv2: kept in float (keepFloat)');
    expect(spaced.stdout).to.not.include('it keeps nothing');
    fs.rmSync(dir, { recursive: true });
  });

  it('W8A8 keeps the float accuracy on 2000 test images (within 0.3 points)', async () => {
    const float = await mnistAccuracy(new Uint8Array(fs.readFileSync(model)), 2000);
    expect(float).to.be.greaterThan(0.9);
    const { model: q, report } = await quantizeModel(model, {
      weights: { bits: 8 }, activations: { bits: 8 }, calibration: path.join(root, 'assets', 'mnist-calibration'),
    });
    expect(report.passes.find((p) => p.pass === 'quantize-bias')!.changed.length).to.equal(3);  // both convs and the Gemm
    expect(report.layers.every((l) => (l.outputSqnrDb ?? 0) > 30)).to.equal(true);
    expect(Math.abs((await mnistAccuracy(q, 2000)) - float)).to.be.at.most(0.003);
  });
});

describe('layer outputs quantized (activations.outputs) on the bundled MNIST CNN', () => {
  const calibration = path.join(root, 'assets', 'mnist-calibration');
  // The operators onnxruntime runs after its graph optimisations (QDQ fusions are at level 'extended').
  const optimizedOps = async (bytes: Uint8Array): Promise<string[]> => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-ort-'));
    const file = path.join(dir, 'optimized.onnx');
    const session = await ort().InferenceSession.create(bytes, { graphOptimizationLevel: 'extended', optimizedModelFilePath: file });
    await session.release();
    const ops = readModel(file).graph!.node.map((n) => n.opType);
    fs.rmSync(dir, { recursive: true });
    return ops;
  };

  it('onnxruntime runs both convolutions as QLinearConv (one without it), within 0.3 points of float accuracy', async () => {
    const float = await mnistAccuracy(new Uint8Array(fs.readFileSync(model)), 2000);
    const inputsOnly = await quantizeModel(model, { weights: { bits: 8 }, activations: { bits: 8 }, calibration, evaluationFeeds: [] });
    const withOutputs = await quantizeModel(model, { weights: { bits: 8 }, activations: { bits: 8, outputs: true }, calibration, evaluationFeeds: [] });
    // Without it only conv1 is fused: onnxruntime moves conv2's input Q/DQ back across MaxPool and Relu onto conv1's output.
    expect((await optimizedOps(inputsOnly.model)).filter((op) => op === 'QLinearConv')).to.have.length(1);
    expect((await optimizedOps(withOutputs.model)).filter((op) => op === 'QLinearConv')).to.have.length(2);
    expect(Math.abs((await mnistAccuracy(withOutputs.model, 2000)) - float)).to.be.at.most(0.003);
  });

  it('quantizes conv outputs after their Relu and shares the parameters through MaxPool and Flatten: onnxruntime removes the Relus', async () => {
    // conv1 (BN folded) → Relu → MaxPool → conv2 → Relu → MaxPool → Flatten → Gemm (the model's output stays float).
    const { model: q, report } = await quantizeModel(model, { weights: { bits: 8 }, activations: { bits: 8, outputs: true }, calibration, evaluationFeeds: [] });
    const graph = readModel(q).graph!;
    const producer = (t: string) => graph.node.find((n) => n.output.includes(t));
    const quantizers = graph.node.filter((n) => n.opType === 'QuantizeLinear');
    const quantizedBy = (op: string) => quantizers.filter((n) => producer(n.input[0])?.opType === op);
    expect(quantizedBy('Relu')).to.have.length(2);
    expect(quantizedBy('Conv')).to.have.length(0);
    expect(quantizedBy('MaxPool')).to.have.length(2);
    expect(quantizedBy('Flatten')).to.have.length(1);
    // Each MaxPool/Flatten quantizer uses its input's scale and zero point: DequantizeLinear → op → QuantizeLinear, one pair.
    for (const qn of [...quantizedBy('MaxPool'), ...quantizedBy('Flatten')]) {
      const dq = producer(producer(qn.input[0])!.input[0])!;
      expect(dq.opType).to.equal('DequantizeLinear');
      const bytes = (names: string[]) => names.map((t) => Array.from(graph.initializer.find((i) => i.name === t)!.rawData));
      expect(bytes(qn.input.slice(1))).to.deep.equal(bytes(dq.input.slice(1)));
    }
    // Relu outputs: zero point 0, so the quantizer clamps as the Relu does.
    for (const a of report.activations.filter((x) => quantizedBy('Relu').some((n) => n.input[0] === x.tensor))) expect(a.zeroPoint).to.equal(0);
    expect(report.passes.find((p) => p.pass === 'output-placement')!.changed).to.have.length(5);
    const ops = await optimizedOps(q);
    expect(ops.filter((op) => op === 'Relu')).to.have.length(0);
    expect(ops.filter((op) => op === 'QLinearConv')).to.have.length(2);
    // Signed (symmetric) activations: the zero point is not the minimum, onnxruntime would keep the Relu; quantized before it.
    const signed = await quantizeModel(model, { weights: { bits: 8 }, activations: { bits: 8, signed: true, outputs: true }, calibration, evaluationFeeds: [] });
    const placement = signed.report.passes.find((p) => p.pass === 'output-placement')!;
    expect(placement.skipped.map((s) => s.node)).to.deep.equal(['conv1', 'conv2']);
    expect(placement.skipped[0].reason).to.match(/signed activations/);
    expect(placement.changed).to.have.length(0);
  });

  it('weights.reduceRange keeps 8-bit weight values in [-64, 63] (also with GPTQ and bit allocation), within 0.3 points of float (the runs without bit allocation, whose mean is 6 bits)', async () => {
    const float = await mnistAccuracy(new Uint8Array(fs.readFileSync(model)), 2000);
    const int8Values = (bytes: Uint8Array) => {
      const graph = readModel(bytes).graph!;
      return graph.node.filter((n) => n.opType === 'DequantizeLinear').map((n) => graph.initializer.find((t) => t.name === n.input[0]))
        .filter((t) => t?.dataType === TensorProto_DataType.INT8).flatMap((t) => Array.from(new Int8Array(Uint8Array.from(t!.rawData).buffer)));
    };
    const full = await quantizeModel(model, { weights: { bits: 8 }, activations: { bits: 8, outputs: true }, calibration, evaluationFeeds: [] });
    expect(Math.max(...int8Values(full.model).map(Math.abs))).to.equal(127);
    for (const weights of [{ bits: 8 as const, reduceRange: true }, { bits: 8 as const, reduceRange: true, rounding: 'gptq' as const },
      { bits: 8 as const, reduceRange: true, bitAllocation: { averageBits: 6 } }]) {
      const reduced = await quantizeModel(model, { weights, activations: { bits: 8, outputs: true }, calibration, evaluationFeeds: [] });
      const values = int8Values(reduced.model);
      expect(values.length).to.be.greaterThan(1000);
      expect(Math.min(...values), JSON.stringify(weights)).to.be.at.least(-64);
      expect(Math.max(...values), JSON.stringify(weights)).to.be.at.most(63);
      expect(reduced.report.layers.every((l) => l.bits === 8 && l.method.includes('reduced range'))).to.equal(true);
      if (!weights.bitAllocation) expect(Math.abs((await mnistAccuracy(reduced.model, 2000)) - float)).to.be.at.most(0.003);
    }
  });

  it('rejects a non-boolean value; the CLI flag needs --abits', async () => {
    const error = await quantizeModel(model, { weights: { bits: 8 }, activations: { bits: 8, outputs: 'yes' as never }, calibration }).catch((e: Error) => e);
    expect(String(error)).to.match(/TypeError: Expected a boolean for options\.activations\.outputs/);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-cli-'));
    const cli = path.join(root, 'dist', 'ts', 'cli.js');
    const bad = spawnSync(process.execPath, [cli, 'quantize', model, '--quantize-outputs'], { cwd: dir, encoding: 'utf8' });
    expect(bad.status).to.equal(1);
    expect(bad.stderr).to.match(/--quantize-outputs quantizes activations: pass --abits 8/);
    const good = spawnSync(process.execPath, [cli, 'quantize', model, '--abits', '8', '--calib', calibration, '--quantize-outputs'], { cwd: dir, encoding: 'utf8' });
    expect(good.status, good.stderr).to.equal(0);
    expect(good.stdout).not.to.match(/--quantize-outputs lets it/);
    expect(good.stdout).to.match(/conv2 .* 8 \[0, [\d.]+\] → 8 \[-?[\d.]+, [\d.]+\]/);
    fs.rmSync(dir, { recursive: true });
  });
});

describe('pipeline methods on the bundled MNIST CNN', () => {
  it('at W2A4, MSE weights with data-driven bias correction recover most of what minmax loses', async () => {
    const calibration = path.join(root, 'assets', 'mnist-calibration');
    const float = await mnistAccuracy(new Uint8Array(fs.readFileSync(model)), 2000);
    const naive = await quantizeModel(model, { weights: { bits: 2 }, activations: { bits: 4 }, firstLastLayerBits: 2, calibration });
    const better = await quantizeModel(model, {
      weights: { bits: 2, method: 'mse' }, activations: { bits: 4, biasCorrection: true }, firstLastLayerBits: 2, calibration,
    });
    expect(better.report.passes.find((p) => p.pass === 'bias-correction')!.changed.length).to.equal(3);
    const lost = float - (await mnistAccuracy(naive.model, 2000));
    const recovered = (await mnistAccuracy(better.model, 2000)) - (float - lost);
    expect(lost).to.be.greaterThan(0.1);
    expect(recovered / lost).to.be.greaterThan(0.7);
  });

  it('the first and last layers keep 8-bit inputs as well as 8-bit weights, unless firstLastLayerBits says otherwise', async () => {
    const calibration = path.join(root, 'assets', 'mnist-calibration');
    const bitsOf = (report: Awaited<ReturnType<typeof quantizeModel>>['report']) => report.activations.map((a) => [a.tensor, a.bits]);
    const edges8 = await quantizeModel(model, { weights: { bits: 4 }, activations: { bits: 4 }, calibration, evaluationFeeds: [] });
    expect(edges8.report.layers.map((l) => l.bits)).to.deep.equal([8, 4, 8]);
    // conv1 reads the model input, conv2 the pooled conv1 output, the Gemm the flattened features.
    expect(bitsOf(edges8.report).map(([, bits]) => bits)).to.deep.equal([8, 4, 8]);
    // With outputs: conv1's and conv2's outputs (after their Relus) at 4 bits, the second pooled one sharing its input's 4 bits,
    // the flattened features (the Gemm's input) at their own 8 bits; the Gemm's output is the model's (float).
    const outputs = await quantizeModel(model, { weights: { bits: 4 }, activations: { bits: 4, outputs: true }, calibration, evaluationFeeds: [] });
    expect(bitsOf(outputs.report)).to.deep.equal([['input', 8], ['p1', 4], ['flat', 8], ['r1', 4], ['r2', 4], ['p2', 4]]);
    // Per layer, as the report's layer table shows them: input bits and clip, and output bits.
    expect(outputs.report.layers.map((l) => [l.input?.bits, l.outputActivation?.bits])).to.deep.equal([[8, 4], [4, 4], [8, undefined]]);
    expect((outputs.report.layers[1].input as { range: [number, number] }).range).to.deep.equal(outputs.report.activations.find((a) => a.tensor === 'p1')!.range);
    const all4 = await quantizeModel(model, { weights: { bits: 4 }, activations: { bits: 4 }, firstLastLayerBits: 4, calibration, evaluationFeeds: [] });
    expect(bitsOf(all4.report).map(([, bits]) => bits)).to.deep.equal([4, 4, 4]);
    const graph = readModel(edges8.model).graph!;
    const zeroPointTypes = graph.node.filter((n) => n.opType === 'QuantizeLinear').map((n) => graph.initializer.find((t) => t.name === n.input[2])!.dataType);
    // The 4-bit input is stored in 8 bits, clipped to [0, 15] (fit-onnxruntime: onnxruntime's default optimisations reject uint4 there).
    expect(zeroPointTypes).to.deep.equal([TensorProto_DataType.UINT8, TensorProto_DataType.UINT8, TensorProto_DataType.UINT8]);
    const clips = graph.node.filter((n) => n.opType === 'Clip' && graph.node.some((q) => q.opType === 'QuantizeLinear' && q.output[0] === n.input[0]));
    expect(clips.map((c) => c.input.slice(1).map((b) => graph.initializer.find((t) => t.name === b)!.rawData[0]))).to.deep.equal([[0, 15]]);
  });

  it('weight bias correction (std) rescales the channel scales without data', async () => {
    const plain = await quantizeModel(model, { weights: { bits: 2 }, firstLastLayerBits: 2, evaluationFeeds: [] });
    const corrected = await quantizeModel(model, { weights: { bits: 2, biasCorrection: true }, firstLastLayerBits: 2, evaluationFeeds: [] });
    const [before, after] = [weightQuantizers(plain.model), weightQuantizers(corrected.model)];
    expect([...after.keys()]).to.deep.equal(['conv1', 'conv2', 'fc']);
    for (const [layer, q] of after) {
      // The codes stay; each channel's scale changes by its own factor.
      expect(Buffer.from(q.codes).equals(Buffer.from(before.get(layer)!.codes)), layer).to.equal(true);
      const ratios = q.scale.map((v, c) => v / before.get(layer)!.scale[c]);
      expect(new Set(ratios).size, layer).to.be.greaterThan(1);
    }
    // The Gemm's weights are the model's own (no BatchNormalization folds into it): each row's factor is
    // std(W_c) / std(Ŵ_c), Ŵ the plain model's dequantized row (codes − 0)·s_c.
    const w = floatData(readModel(fs.readFileSync(model)).graph!.initializer.find((t) => t.name === 'fc.weight')!)!;
    const codes = unpackInt2(before.get('fc')!.codes, w.length, true);
    const std = (v: ArrayLike<number>) => {
      const values = Array.from(v);
      const mean = values.reduce((a, b) => a + b, 0) / values.length;
      return Math.sqrt(values.reduce((a, b) => a + (b - mean) ** 2, 0) / values.length);
    };
    for (let c = 0; c < 10; c++) {
      const s = before.get('fc')!.scale[c];
      const row = w.subarray(c * 784, (c + 1) * 784);
      const dequantized = Array.from(codes.subarray(c * 784, (c + 1) * 784), (q) => q * s);
      expect(after.get('fc')!.scale[c] / s, `fc row ${c}`).to.be.closeTo(std(row) / std(dequantized), 1e-5 * (std(row) / std(dequantized)));
    }
  });

  it('GDRQ groups: one scale per group of output channels, written per channel (the BN-folded form)', async () => {
    const { report, model: q } = await quantizeModel(model, { weights: { bits: 2, groups: 4, scaleClip: 2 }, firstLastLayerBits: 2, evaluationFeeds: [] });
    expect(report.layers.filter((l) => l.granularity === '4 groups on axis 0').length).to.equal(2);  // conv1 (8) and conv2 (16); fc has 10
    for (const [layer, channels] of [['conv1', 8], ['conv2', 16]] as const) {
      const { scale } = weightQuantizers(q).get(layer)!;
      expect(scale.length, layer).to.equal(channels);
      const groups = Array.from({ length: 4 }, (_, g) => new Set(scale.subarray(g * channels / 4, (g + 1) * channels / 4)));
      expect(groups.map((g) => g.size), layer).to.deep.equal([1, 1, 1, 1]);  // one value per group of consecutive channels
      expect(new Set(groups.map((g) => [...g][0])).size, layer).to.be.greaterThan(1);
    }
    await quantizeModel(model, { weights: { bits: 2, groups: 0 } }).then(() => expect.fail('accepted groups 0'), (e) => expect((e as Error).message).to.match(/options\.weights\.groups/));
  });

  it('bit allocation gives the conv channels mixed widths with the requested mean', async () => {
    const { report } = await quantizeModel(model, {
      weights: { bits: 4, bitAllocation: { averageBits: 3 } }, firstLastLayerBits: 4, evaluationFeeds: [],
    });
    const allocated = report.layers.filter((l) => l.channelBits);
    expect(allocated.length).to.be.greaterThan(0);
    for (const l of allocated) {
      const bits = l.channelBits!;
      expect(bits.reduce((a, b) => a + b, 0) / bits.length).to.be.closeTo(3, 0.26);
      expect(new Set(bits).size).to.be.greaterThan(1);
    }
  });
});
