/**
 * `npm run bench -- large-model`: quantizing a model whose weights dominate (a chain of 2048×2048 MatMuls,
 * weights in an external data file, as large models are stored, and the same model as one file for one setting):
 * wall time and peak resident memory against
 * the model's size, and the longest the event loop was held at once. Each setting runs in its own process, since
 * peak memory is per process. Every process loads lowbit and onnxruntime (when installed) before it starts the
 * clock, whether its setting uses onnxruntime or not, so a process that only loads them is the baseline of all.
 */
import { create } from '@bufbuild/protobuf';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { ModelProtoSchema, TensorProto_DataType } from 'onnx-buf';

import { ONE_BUFFER_LIMIT, serializeModel, writeModelWithExternalData } from '../onnx/model-io';
import { quantizeModel, type QuantizeModelOptions } from '../onnx/quantize-model';
import { hasOrt, ort } from './ort-models';
import { inChildProcessJson, table } from './timing';

const WIDTH = 2048;

export interface LargeModelCase {
  /** The model with its weights in external data, and the same model as one file (absent when it would reach 2 GB). */
  model: string;
  oneFile?: string;
  setting: string;
}

const ONE_FILE_SETTING = 'W8 (per channel), weights only, no evaluation, model read from one file';
const ONE_FILE_EVALUATED_SETTING = 'W8 (per channel), weights only, evaluated, model read from one file';
/** The settings that quantize the model kept in one file. */
const ONE_FILE_SETTINGS = new Set([ONE_FILE_SETTING, ONE_FILE_EVALUATED_SETTING]);

const SETTINGS: Array<[string, Partial<QuantizeModelOptions> | 'baseline']> = [
  ['baseline: lowbit and onnxruntime (when installed) loaded, nothing quantized', 'baseline'],
  ['W8 (per channel), weights only, no evaluation', { weights: { bits: 8 }, evaluationFeeds: [] }],
  ['W4 (block 32), weights only, no evaluation', { weights: { bits: 4, granularity: 'block', blockSize: 32 }, evaluationFeeds: [] }],
  // As a model of 2 GB or more is written: the data streamed to <output>.data tensor by tensor, no whole-model buffer.
  ['W8 (per channel), weights only, no evaluation, external data output', { weights: { bits: 8 }, evaluationFeeds: [], externalData: true }],
  ['W4 (block 32), weights only, no evaluation, external data output', { weights: { bits: 4, granularity: 'block', blockSize: 32 }, evaluationFeeds: [], externalData: true }],
  ['W8 (per channel), weights only, evaluated in onnxruntime (the default)', { weights: { bits: 8 } }],
  ['W8A8 (minmax), 4 calibration inputs, no evaluation', { weights: { bits: 8 }, activations: { bits: 8 }, evaluationFeeds: [] }],
  // Models under 2 GB are often one file, weights inline: reading it is then part of the work.
  [ONE_FILE_SETTING, { weights: { bits: 8 }, evaluationFeeds: [] }],
  [ONE_FILE_EVALUATED_SETTING, { weights: { bits: 8 } }],
];

/**
 * A [batch, 2048] → MatMul × layers model (weights uniform in ±1/√2048) written to `file`, its weights in
 * `<file>.data` unless `inline`; returns the weights' size in bytes.
 */
export async function writeMatMulChain(file: string, layers: number, inline = false, batch = 1): Promise<number> {
  const initializer = [];
  const node = [];
  let x = 'input';
  for (let l = 0; l < layers; l++) {
    const w = new Float32Array(WIDTH * WIDTH);
    let s = 12345 + l;
    for (let i = 0; i < w.length; i++) {
      s = (Math.imul(s, 1103515245) + 12345) >>> 0;
      w[i] = (s / 2 ** 32 - 0.5) * (2 / Math.sqrt(WIDTH));
    }
    initializer.push({ name: `w${l}`, dataType: TensorProto_DataType.FLOAT, dims: [BigInt(WIDTH), BigInt(WIDTH)], rawData: new Uint8Array(w.buffer) });
    node.push({ opType: 'MatMul', name: `matmul${l}`, input: [x, `w${l}`], output: [`y${l}`] });
    x = `y${l}`;
  }
  const tensor = (name: string) => ({
    name, type: { value: { case: 'tensorType', value: { elemType: TensorProto_DataType.FLOAT, shape: { dim: [batch, WIDTH].map((d) => ({ value: { case: 'dimValue', value: BigInt(d) } })) } } } },
  });
  const model = create(ModelProtoSchema, {
    irVersion: 8n, producerName: 'lowbit bench', opsetImport: [{ domain: '', version: 13n }],
    graph: { name: 'matmul-chain', node, initializer, input: [tensor('input')], output: [tensor(x)] },
  } as never);
  if (inline) {
    fs.writeFileSync(file, serializeModel(model));
    return layers * WIDTH * WIDTH * 4;
  }
  // Streamed tensor by tensor: a chain of 2 GB or more cannot be one buffer.
  await writeModelWithExternalData(model, file);
  return fs.statSync(`${file}.data`).size;
}

/** In the child process: one setting; prints { ms, peakMb, longestStallMs }. */
export async function runLargeModelCase(c: LargeModelCase): Promise<{ ms: number; peakMb: number; longestStallMs: number }> {
  const setting = SETTINGS.find(([name]) => name === c.setting)![1];
  if (hasOrt()) ort();  // in every process alike: the baseline holds it
  // How late a 10 ms timer fires at worst: the longest stretch the event loop was held.
  const delay = monitorEventLoopDelay({ resolution: 10 });
  delay.enable();
  const t0 = performance.now();
  if (setting !== 'baseline') {
    const calibration = setting.activations
      ? Array.from({ length: 4 }, (_, i) => ({ input: { data: Float32Array.from({ length: WIDTH }, (_, j) => Math.sin(i * 7 + j)), dims: [1, WIDTH] } }))
      : undefined;
    const model = ONE_FILE_SETTINGS.has(c.setting) ? c.oneFile! : c.model;
    await quantizeModel(model, { ...(setting as QuantizeModelOptions), ...(calibration ? { calibration } : {}), outputPath: `${model}.q.onnx` });
  }
  const ms = performance.now() - t0;
  delay.disable();
  return { ms, peakMb: peakResidentMb(), longestStallMs: delay.max / 1e6 };
}

/**
 * This process's peak resident memory. On Linux from VmHWM, which starts afresh at exec: getrusage's maxrss
 * survives exec, so a child would report the parent's peak (here the parent that just wrote the model).
 */
function peakResidentMb(): number {
  try {
    const hwm = /VmHWM:\s*(\d+) kB/.exec(fs.readFileSync('/proc/self/status', 'utf8'));
    if (hwm) return Number(hwm[1]) / 1024;
  } catch {
    // not Linux
  }
  return process.resourceUsage().maxRSS / 1024;
}

export async function benchLargeModel(options: { megabytes: number; json: boolean }): Promise<void> {
  const layers = Math.max(1, Math.round((options.megabytes * 1e6) / (WIDTH * WIDTH * 4)));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-large-'));
  try {
    const file = path.join(dir, 'matmul-chain.onnx');
    const bytes = await writeMatMulChain(file, layers);
    const modelMb = bytes / 2 ** 20;
    const oneFile = path.join(dir, 'matmul-chain-one-file.onnx');
    const fitsOneFile = bytes < ONE_BUFFER_LIMIT;
    if (fitsOneFile) await writeMatMulChain(oneFile, layers, true);
    const ortInstalled = hasOrt();
    const needsOrt = (o: Partial<QuantizeModelOptions> | 'baseline') => o !== 'baseline' && (o.activations !== undefined || o.evaluationFeeds === undefined);
    const settings = SETTINGS.filter(([setting, o]) => (fitsOneFile || !ONE_FILE_SETTINGS.has(setting)) && (ortInstalled || !needsOrt(o)));
    const results = settings.map(([setting]) => {
      const c: LargeModelCase = { model: file, oneFile, setting };
      return { setting, ...inChildProcessJson<{ ms: number; peakMb: number; longestStallMs: number }>({ bench: 'large-model', c }) };
    });
    const baseline = results[0].peakMb;
    const rows = results.slice(1).map((r) => ({
      setting: r.setting, seconds: Number((r.ms / 1000).toFixed(2)), 'MB/s of weights': Math.round(modelMb / (r.ms / 1000)),
      'peak RSS MB': Math.round(r.peakMb), 'above baseline / model size': `${((r.peakMb - baseline) / modelMb).toFixed(2)}x`,
      'longest event-loop stall s': Number((r.longestStallMs / 1000).toFixed(2)),
    }));
    if (options.json) {
      console.log(JSON.stringify({ modelMb, baselineMb: baseline, rows }, null, 2));
      return;
    }
    console.log(`large-model: ${layers} MatMuls of ${WIDTH}x${WIDTH}, ${modelMb.toFixed(0)} MiB of float32 weights in external data; ` +
      `baseline process (lowbit${ortInstalled ? ' and onnxruntime' : ''} loaded) ${Math.round(baseline)} MB` +
      `${fitsOneFile ? '' : '; no one-file row: the model reaches 2 GB'}` +
      `${ortInstalled ? '' : '; onnxruntime-node is not installed: no calibrated or evaluated rows'}\n`);
    console.log(table(rows));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
