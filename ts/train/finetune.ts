/**
 * finetune(): trains an ONNX classifier on the CPU — in float, or
 * quantization-aware with LSQ or GDRQ — with SGD (momentum, weight decay,
 * cosine learning-rate decay), seeded shuffling, and returns the trained model
 * as ONNX (a QDQ model with the learned scales for LSQ/GDRQ). Deterministic for
 * a given seed and thread count. The event loop gets a turn after every step.
 * With `distill`, no labels are needed: the model learns to reproduce the
 * float model's output distribution (computed by onnxruntime).
 */
import { clone } from '@bufbuild/protobuf';
import { ModelProtoSchema, type ModelProto } from 'onnx-buf';

import { invalidType, invalidValue } from '../errors';
import { ort } from '../bench/ort-models';
import { checkNotModelFile, checkOutputPath, OnnxModelError, readModelAsync, serializeModelAsync, writeFileAtomicAsync } from '../onnx/model-io';
import { openSession, runSession, type OrtSession } from '../onnx/ort-session';
import { seededRandom } from '../random';
import { checkAttached, checkChoice, checkInteger, checkKeepFloat, checkNumber, closestName, checkKnownKeys, generatorKind, isPlainObject, isStream, iterability, otherRealm } from '../validate';
import { exportBlocker, exportModel, type ExportLayer } from './export';
import { nativeKernels, referenceKernels, type FloatKernels } from './kernels';
import { checkKernel } from '../cpu';
import { TrainableModel, TrainingError, type LayerQuantizers, type Parameter } from './model';
import { OpError, OpSizeError } from './ops';
import { abortable, nodeLabel } from '../onnx/passes/pass';
import { edgeLayers, reducedRangeBits } from '../onnx/passes/quantize-weights';
import { GdrqWeightQuantizer, LsqQuantizer, RunningClipQuantizer, type StepInit } from './quantizers';
import type { Tensor } from './tensor';

/** A batch of inputs; labels (class indices, one per input) are needed unless distilling. */
export interface InputBatch {
  inputs: { data: Float32Array; dims: number[] };
  labels?: Int32Array | Uint8Array;
}

export interface LabelledBatch extends InputBatch {
  labels: Int32Array | Uint8Array;
}

export type TrainingData = InputBatch | AsyncIterable<InputBatch> | Iterable<InputBatch>;

export interface FinetuneOptions {
  /** 'float' (default), 'lsq' or 'gdrq'. */
  method?: 'float' | 'lsq' | 'gdrq';
  /** Weight bits of the quantized layers: 2, 4 (default) or 8. */
  weightBits?: 2 | 4 | 8;
  /** Activation bits at the inputs of the quantized layers: 4 (default) or 8. */
  activationBits?: 4 | 8;
  /** Bits of the first and last quantized layers by data flow (see edgeLayers; weights and input activations). Default 8. */
  firstLastLayerBits?: 2 | 4 | 8;
  /** Node names or op types to keep in float. */
  keepFloat?: string[];
  epochs?: number;
  batchSize?: number;
  /** Initial learning rate. Default 0.01. */
  learningRate?: number;
  /** 'cosine' (default): decay to 0 over the run, as in LSQ's recipe; 'constant'. */
  learningRateSchedule?: 'cosine' | 'constant';
  /** 'sgd' with momentum (default) or 'adam'. */
  optimizer?: 'sgd' | 'adam';
  /** SGD momentum. Default 0.9. */
  momentum?: number;
  /** L2 weight decay of Conv/Gemm/MatMul weights. Default 1e-4 (LSQ: 5e-5 at 3 bits, 2.5e-5 at 2 bits). */
  weightDecay?: number;
  seed?: number;
  /** LSQ: one weight step per output channel instead of per tensor. */
  perChannel?: boolean;
  /**
   * Keep 8-bit weights in the 7-bit range [-64, 63] while training and in the export, as quantizeModel's
   * weights.reduceRange: onnxruntime's uint8×int8 kernels on x86 CPUs without VNNI can saturate otherwise.
   */
  reduceRange?: boolean;
  /**
   * LSQ: initial steps 2⟨|v|⟩/√Q_P ('lsq', the paper's, default) or 'max': no clipping, the minmax PTQ starting point
   * (better at 8 bits) — weights max|w|/Q_P, activations the [min, max] seen on the first 64 inputs (first batch of an
   * iterable), with a zero point for signed ranges.
   */
  stepInit?: StepInit;
  /**
   * Whether the quantizers' steps (LSQ steps, GDRQ group steps) are trained along with the weights. Default true.
   * false keeps them where they started and trains the weights only: with stepInit 'max' that is QAT at the
   * calibrated minmax scales, which was the stable choice for an 8-bit recognizer (the ocr-qat experiment).
   */
  learnSteps?: boolean;
  /** GDRQ: groups of output channels per layer (default 4), Scale-Clip k of weights (2) and activations (5). */
  groups?: number;
  scaleClipK?: number;
  activationClipK?: number;
  /** GDRQ group steps: 'learned' with the LSQ gradient (default) or re-'search'ed with the L1 loss every epoch. */
  groupSteps?: 'learned' | 'search';
  /**
   * GDRQ activations: clipped at the 'running' Scale-Clip threshold (default, the
   * paper's), or with a 'learned' LSQ step (a variant: GDRQ weights, LSQ inputs).
   */
  activationSteps?: 'running' | 'learned';
  /**
   * Knowledge distillation: the loss is the KL divergence from the float model's softmax output to the trained
   * model's (over the output's last axis, e.g. per frame of a sequence model), so batches need no labels, and
   * "accuracy" is top-1 agreement with the float model. Default false.
   */
  distill?: boolean;
  /** BatchNormalization keeps normalising with its running statistics while training. Default: true when distilling. */
  freezeBatchNorm?: boolean;
  /** Data to measure accuracy (or, distilling, agreement with the float model) on after every epoch (the engine's forward in inference mode). */
  validation?: InputBatch;
  /** Native threads (default all) and SGEMM kernel ('reference' = the TypeScript reference kernels). */
  threads?: number;
  kernel?: string;
  onEpoch?: (entry: EpochRecord) => void;
  onStep?: (progress: StepProgress) => void;
  /** Also write the result here (atomically). */
  outputPath?: string;
  /** Stops training at the next step (and the write) with the signal's reason; nothing is written. */
  signal?: AbortSignal;
}

export interface EpochRecord {
  epoch: number;
  loss: number;
  accuracy: number;
  validationAccuracy?: number;
  learningRate: number;
  seconds: number;
  images: number;
}

export interface StepProgress {
  epoch: number;
  step: number;
  stepsPerEpoch?: number;
  loss: number;
  accuracy: number;
}

export interface FinetuneResult {
  model: Uint8Array;
  history: EpochRecord[];
  /** What export wrote per quantized layer (bits, scales, BN folding). */
  layers: ExportLayer[];
  /** The engine's inference-mode forward pass of the trained model (quantizers included): the output for a batch. */
  forward(inputs: { data: Float32Array; dims: number[] }): Float32Array;
}

const KNOWN_OPTIONS = ['method', 'weightBits', 'activationBits', 'firstLastLayerBits', 'keepFloat', 'epochs', 'batchSize',
  'learningRate', 'learningRateSchedule', 'optimizer', 'momentum', 'weightDecay', 'seed', 'perChannel', 'reduceRange', 'groups', 'scaleClipK', 'activationClipK', 'groupSteps', 'activationSteps',
  'stepInit', 'learnSteps', 'distill', 'freezeBatchNorm', 'validation', 'threads', 'kernel', 'onEpoch', 'onStep', 'outputPath', 'signal'];

function positive(name: string, v: unknown, fallback: number): number {
  return v === undefined ? fallback : checkNumber(name, v, 'a positive finite number', (n) => Number.isFinite(n) && n > 0);
}

function nonNegative(name: string, v: unknown, fallback: number): number {
  return v === undefined ? fallback : checkNumber(name, v, 'a finite number ≥ 0', (n) => Number.isFinite(n) && n >= 0);
}

function momentumOf(v: unknown): number {
  const momentum = nonNegative('options.momentum', v, 0.9);
  // At 1 or more the velocity never decays: every step adds to it and SGD diverges.
  if (momentum >= 1) throw invalidValue('options.momentum', 'a number in [0, 1)', momentum, '0.9 is usual.');
  return momentum;
}

function checkBatch(name: string, batch: unknown, needLabels: boolean): InputBatch {
  if (!isPlainObject(batch)) throw invalidType(name, 'an object { inputs: { data, dims }, labels }', batch);
  const inputs = batch.inputs;
  if (!isPlainObject(inputs) && !(inputs && typeof inputs === 'object')) throw invalidType(`${name}.inputs`, 'an object { data: Float32Array, dims: [N, ...] }', inputs);
  const { data, dims } = inputs as { data: unknown; dims: unknown };
  if (!(data instanceof Float32Array)) throw invalidType(`${name}.inputs.data`, 'a Float32Array', data, otherRealm(data, 'Float32Array'));
  checkAttached(`${name}.inputs.data`, data);
  if (!Array.isArray(dims) || dims.length === 0 || !dims.every((d) => Number.isInteger(d) && d > 0)) {
    throw invalidValue(`${name}.inputs.dims`, 'an array of positive integers [N, ...]', dims);
  }
  const count = dims.reduce((a: number, b: number) => a * b, 1);
  if (count !== data.length) throw invalidValue(`${name}.inputs.data`, `${count} values (the product of dims [${dims.join(', ')}])`, data);
  for (let i = 0; i < data.length; i++) {
    if (!Number.isFinite(data[i])) throw invalidValue(`${name}.inputs.data[${i}]`, 'a finite number', data[i]);
  }
  if (!needLabels) return { inputs: { data, dims: dims as number[] } };
  const labels = batch.labels;
  if (!(labels instanceof Int32Array) && !(labels instanceof Uint8Array)) {
    throw invalidType(`${name}.labels`, 'an Int32Array or Uint8Array of class indices', labels,
      otherRealm(labels, 'Int32Array') ?? otherRealm(labels, 'Uint8Array') ?? 'Or set options.distill to train without labels.');
  }
  checkAttached(`${name}.labels`, labels);
  if (labels.length !== dims[0]) {
    throw invalidValue(`${name}.labels`, `one label per input (N = dims[0] = ${dims[0]})`, labels, `It has ${labels.length}.`);
  }
  return { inputs: { data, dims: dims as number[] }, labels };
}

interface Settings {
  method: 'float' | 'lsq' | 'gdrq';
  weightBits: 2 | 4 | 8;
  activationBits: 4 | 8;
  firstLastLayerBits: 2 | 4 | 8;
  keepFloat: string[];
  epochs: number;
  batchSize: number;
  learningRate: number;
  schedule: 'cosine' | 'constant';
  optimizer: 'sgd' | 'adam';
  momentum: number;
  weightDecay: number;
  seed: number;
  perChannel: boolean;
  reduceRange: boolean;
  groups: number;
  scaleClipK: number;
  activationClipK: number;
  groupSteps: 'learned' | 'search';
  activationSteps: 'running' | 'learned';
  stepInit: StepInit;
  learnSteps: boolean;
  distill: boolean;
  freezeBatchNorm: boolean;
}

export function checkFinetuneOptions(options: unknown): Settings & { raw: FinetuneOptions } {
  if (options === undefined) options = {};
  if (!isPlainObject(options)) throw invalidType('options', 'an object', options);
  checkKnownKeys('options', options, KNOWN_OPTIONS);
  const o = options as FinetuneOptions;
  if (o.outputPath !== undefined) checkOutputPath('options.outputPath', o.outputPath);
  const method = o.method === undefined ? 'float' : checkChoice('options.method', o.method, ['float', 'lsq', 'gdrq'] as const);
  const bits = (name: string, v: unknown, fallback: number, allowed: number[]) =>
    v === undefined ? fallback : checkNumber(name, v, `one of ${allowed.join(', ')}`, (n) => allowed.includes(n));
  const weightBits = bits('options.weightBits', o.weightBits, 4, [2, 4, 8]) as 2 | 4 | 8;
  const defaultDecay = method === 'float' || weightBits >= 4 ? 1e-4 : 2.5e-5;
  checkKeepFloat('options.keepFloat', o.keepFloat, 'an array of node names or op types');
  // Checked here for every kernel (the reference kernels take no threads, and would ignore a bad count).
  if (o.threads !== undefined) checkInteger('options.threads', o.threads, 1, 1024);
  for (const flag of ['distill', 'freezeBatchNorm', 'perChannel', 'reduceRange', 'learnSteps'] as const) {
    if (o[flag] !== undefined && typeof o[flag] !== 'boolean') throw invalidType(`options.${flag}`, 'a boolean', o[flag]);
  }
  if (o.signal !== undefined && !(o.signal instanceof AbortSignal)) throw invalidType('options.signal', 'an AbortSignal (AbortController.signal)', o.signal);
  for (const fn of ['onEpoch', 'onStep'] as const) {
    if (o[fn] !== undefined && typeof o[fn] !== 'function') throw invalidType(`options.${fn}`, 'a function', o[fn]);
  }
  return {
    method, weightBits,
    activationBits: bits('options.activationBits', o.activationBits, 4, [4, 8]) as 4 | 8,
    firstLastLayerBits: bits('options.firstLastLayerBits', o.firstLastLayerBits, 8, [2, 4, 8]) as 2 | 4 | 8,
    keepFloat: o.keepFloat ?? [],
    epochs: o.epochs === undefined ? 1 : checkInteger('options.epochs', o.epochs, 1, 100_000),
    batchSize: o.batchSize === undefined ? 32 : checkInteger('options.batchSize', o.batchSize, 1, 1 << 20),
    learningRate: positive('options.learningRate', o.learningRate, 0.01),
    schedule: o.learningRateSchedule === undefined ? 'cosine' : checkChoice('options.learningRateSchedule', o.learningRateSchedule, ['cosine', 'constant'] as const),
    optimizer: o.optimizer === undefined ? 'sgd' : checkChoice('options.optimizer', o.optimizer, ['sgd', 'adam'] as const),
    momentum: momentumOf(o.momentum),
    weightDecay: nonNegative('options.weightDecay', o.weightDecay, defaultDecay),
    seed: o.seed === undefined ? 0 : checkInteger('options.seed', o.seed, 0, 2 ** 32 - 1),
    perChannel: !!o.perChannel,
    reduceRange: !!o.reduceRange,
    groups: o.groups === undefined ? 4 : checkInteger('options.groups', o.groups, 1, 1 << 16),
    scaleClipK: positive('options.scaleClipK', o.scaleClipK, 2),
    activationClipK: positive('options.activationClipK', o.activationClipK, 5),
    groupSteps: o.groupSteps === undefined ? 'learned' : checkChoice('options.groupSteps', o.groupSteps, ['learned', 'search'] as const),
    activationSteps: o.activationSteps === undefined ? 'running'
      : checkChoice('options.activationSteps', o.activationSteps, ['running', 'learned'] as const),
    stepInit: o.stepInit === undefined ? 'lsq' : checkChoice('options.stepInit', o.stepInit, ['lsq', 'max'] as const),
    learnSteps: o.learnSteps ?? true,
    distill: !!o.distill,
    freezeBatchNorm: o.freezeBatchNorm ?? !!o.distill,
    raw: o,
  };
}

/** Why some weights are not trainable, and the fix: the engine trains only initializers a layer reads directly or through an Identity. */
const CONSTANT_WEIGHTS = 'weights behind Transpose or Cast nodes stay constants: fold those nodes into their initializers (as onnxsim does)';

function buildQuantizers(model: TrainableModel, s: Settings): void {
  if (s.method === 'float') return;
  const names = (l: typeof model.layers[number]) => [l.label, l.node.opType, l.node.name];
  // A keepFloat entry that keeps nothing is most likely misspelt: training the layer quantized would go unnoticed.
  const known = [...new Set(model.layers.flatMap(names).filter((n) => n !== ''))];
  s.keepFloat.forEach((entry, i) => {
    if (known.includes(entry)) return;
    const close = closestName(entry, known);
    throw invalidValue(`options.keepFloat[${i}]`, 'the name or op type of a layer the engine quantizes (a Conv, Gemm or MatMul whose weight is an initializer)', entry,
      close ? `Did you mean '${close}'?` : `Its layers: ${known.slice(0, 12).join(', ')}${known.length > 12 ? ', …' : ''}.`);
  });
  const layers = model.layers.filter((l) => !names(l).some((n) => s.keepFloat.includes(n)));
  if (layers.length === 0) {
    throw new TrainingError(model.layers.length === 0
      ? `The model has no Conv, Gemm or MatMul layer whose weight is an initializer it reads directly (or through an Identity), so nothing to quantize (${CONSTANT_WEIGHTS}).`
      : `options.keepFloat (${s.keepFloat.join(', ')}) leaves none of the model's ${model.layers.length} Conv, Gemm or MatMul layers to quantize.`);
  }
  const map = new Map<typeof layers[number]['node'], LayerQuantizers>();
  const edges = edgeLayers(model.graph, layers.map((l) => l.node));
  layers.forEach((layer) => {
    const edge = edges.isEdge(layer.node);
    const wBits = edge ? s.firstLastLayerBits : s.weightBits;
    const aBits = edge ? s.firstLastLayerBits : s.activationBits;
    const actBits = aBits === 2 ? 4 : aBits;
    const columnSamples = layer.weightInput === 0;  // W·x: the input's columns are the samples
    const codeBits = reducedRangeBits(wBits, s.reduceRange);  // reduceRange: 8-bit weights take 7-bit levels
    // GDRQ reshapes the low-bit layers only: at 8 bits Scale-Clip would just throw information away,
    // so the 8-bit first and last layers get LSQ quantizers as in the LSQ recipe.
    if (s.method === 'lsq' || (edge && s.firstLastLayerBits === 8)) {
      const weight = new LsqQuantizer(`${layer.label}.weight`, wBits, 'weight', true, s.perChannel ? layer.outputAxis : undefined, s.stepInit, false, codeBits);
      weight.initialize({ data: layer.weight.value, dims: layer.weight.dims });
      map.set(layer.node, { weight, activation: new LsqQuantizer(`${layer.label}.input`, actBits, 'activation', undefined, undefined, s.stepInit, columnSamples) });
    } else {
      map.set(layer.node, {
        weight: new GdrqWeightQuantizer(`${layer.label}.weight`, wBits, layer.weight, layer.outputAxis, s.groups, s.scaleClipK, s.groupSteps, codeBits),
        activation: s.activationSteps === 'learned'
          ? new LsqQuantizer(`${layer.label}.input`, actBits, 'activation', undefined, undefined, 'lsq', columnSamples)
          : new RunningClipQuantizer(`${layer.label}.input`, actBits, s.activationClipK, 0.9),
      });
    }
  });
  model.setQuantizers(map);
}

/** Mean softmax cross-entropy of logits [N, classes]; writes dLoss/dLogits and returns the loss and the correct count. */
export function softmaxCrossEntropy(logits: Tensor, labels: ArrayLike<number>, dLogits: Float32Array): { loss: number; correct: number } {
  const [n, classes] = logits.dims;
  if (labels.length !== n) throw new TrainingError(`The logits have ${n} rows for ${labels.length} labels: a classifier gives one row per sample.`);
  let loss = 0, correct = 0;
  for (let b = 0; b < n; b++) {
    const row = logits.data.subarray(b * classes, (b + 1) * classes);
    let max = -Infinity, arg = 0;
    for (let c = 0; c < classes; c++) if (row[c] > max) { max = row[c]; arg = c; }
    let z = 0;
    for (let c = 0; c < classes; c++) z += Math.exp(row[c] - max);
    loss += Math.log(z) + max - row[labels[b]];
    if (arg === labels[b]) correct++;
    for (let c = 0; c < classes; c++) dLogits[b * classes + c] = (Math.exp(row[c] - max) / z - (c === labels[b] ? 1 : 0)) / n;
  }
  return { loss: loss / n, correct };
}

/**
 * Mean KL divergence from the teacher's probabilities to softmax(logits) over the rows of logits [..., classes];
 * writes dLoss/dLogits and counts the rows whose top-1 class agrees with the teacher's.
 */
export function distillationLoss(logits: Tensor, teacher: Float32Array, dLogits: Float32Array): { loss: number; correct: number; rows: number } {
  const classes = logits.dims[logits.dims.length - 1];
  const rows = logits.data.length / classes;
  let loss = 0, correct = 0;
  for (let r = 0; r < rows; r++) {
    const z = logits.data.subarray(r * classes, (r + 1) * classes), p = teacher.subarray(r * classes, (r + 1) * classes);
    let max = -Infinity, arg = 0, teacherArg = 0;
    for (let c = 0; c < classes; c++) {
      if (z[c] > max) { max = z[c]; arg = c; }
      if (p[c] > p[teacherArg]) teacherArg = c;
    }
    let sum = 0;
    for (let c = 0; c < classes; c++) sum += Math.exp(z[c] - max);
    const logZ = Math.log(sum) + max;
    for (let c = 0; c < classes; c++) {
      const logQ = z[c] - logZ;
      if (p[c] > 0) loss += p[c] * (Math.log(p[c]) - logQ);
      dLogits[r * classes + c] = (Math.exp(logQ) - p[c]) / rows;
    }
    if (arg === teacherArg) correct++;
  }
  return { loss: loss / rows, correct, rows };
}

/** The float model in onnxruntime: its softmax output for a batch, the targets of distillation. */
class Teacher {
  private constructor(private readonly session: OrtSession, private readonly model: TrainableModel) {}

  /** `bytes` move to the session's thread. */
  static async create(bytes: Uint8Array, model: TrainableModel): Promise<Teacher> {
    // The arena kept: one batch shape every training step, reused (openSession leaves it off for lowbit's few large runs).
    return new Teacher(await openSession(bytes, { enableCpuMemArena: true }, 'the input model (the teacher for distillation)',
      'Distillation runs the float model in onnxruntime-node: fix or re-export the model so that it loads there.', { giveBytes: true }), model);
  }

  async probabilities(inputs: { data: Float32Array; dims: number[] }, expectedLength: number): Promise<Float32Array> {
    const out = await runSession(this.session, { [this.model.inputName]: new (ort().Tensor)('float32', inputs.data, inputs.dims) }, [this.model.outputName],
      'the input model (the teacher for distillation)', 'Distillation runs the float model in onnxruntime-node: check that it runs there on inputs of this shape.');
    const p = Float32Array.from(out[this.model.outputName].data as Float32Array);
    if (p.length !== expectedLength) {
      throw new TrainingError(`Distillation compares the model's output '${this.model.outputName}' element by element, but onnxruntime gives ${p.length} values for it and the engine ${expectedLength}.`);
    }
    // Without a final Softmax the output is logits: turn each row into probabilities.
    if (!this.model.finalSoftmax) {
      const dims = out[this.model.outputName].dims;
      const classes = Number(dims[dims.length - 1]);
      for (let r = 0; r < p.length; r += classes) {
        const row = p.subarray(r, r + classes);
        const max = row.reduce((m, v) => Math.max(m, v), -Infinity);
        let sum = 0;
        for (let c = 0; c < classes; c++) sum += (row[c] = Math.exp(row[c] - max));
        for (let c = 0; c < classes; c++) row[c] /= sum;
      }
    }
    return p;
  }

  release(): Promise<void> {
    return this.session.release();
  }
}

/**
 * One update: SGD with momentum, or Adam (β₁ = 0.9, β₂ = 0.999, ε = 1e-8, bias-corrected at step t ≥ 1;
 * Adam suits fine-tuning, where gradient scales differ widely between weights, biases and quantizer steps).
 * Weight decay is an L2 term added to the gradient in both.
 */
function optimizerStep(params: Parameter[], optimizer: 'sgd' | 'adam', lr: number, momentum: number, weightDecay: number, t: number): void {
  const c1 = 1 - 0.9 ** t, c2 = 1 - 0.999 ** t;
  for (const p of params) {
    const decay = p.decay ? weightDecay : 0;
    if (optimizer === 'sgd') {
      for (let i = 0; i < p.value.length; i++) {
        p.velocity[i] = momentum * p.velocity[i] + p.grad[i] + decay * p.value[i];
        p.value[i] -= lr * p.velocity[i];
      }
    } else {
      const m = p.velocity, v = (p.secondMoment ??= new Float32Array(p.value.length));
      for (let i = 0; i < p.value.length; i++) {
        const g = p.grad[i] + decay * p.value[i];
        m[i] = 0.9 * m[i] + 0.1 * g;
        v[i] = 0.999 * v[i] + 0.001 * g * g;
        p.value[i] -= (lr * (m[i] / c1)) / (Math.sqrt(v[i] / c2) + 1e-8);
      }
    }
    if (p.min !== undefined) {
      // A step pushed below its floor restarts from the floor, without the momentum that pushed it there. (A NaN
      // step stays NaN: the check for non-finite parameters stops training on it.)
      for (let i = 0; i < p.value.length; i++) if (p.value[i] < p.min) { p.value[i] = p.min; p.velocity[i] = 0; }
    }
    p.grad.fill(0);
  }
}

/** 'max' step initialisation: activation ranges from the float forward pass over the first (up to) 64 inputs, as PTQ calibrates. */
function observeActivationRanges(model: TrainableModel, data: InputBatch, batchSize: number, kernels: FloatKernels): void {
  // The LSQ ones widen their ranges; GDRQ's running clips, which set their thresholds in training, pass values through.
  const observers = [...model.quantizers.values()].map((q) => q.activation).filter((a): a is LsqQuantizer | RunningClipQuantizer =>
    a instanceof LsqQuantizer || a instanceof RunningClipQuantizer);
  observers.forEach((o) => (o.observing = true));
  const n = Math.min(64, data.inputs.dims[0]);
  const order = Int32Array.from({ length: n }, (_, i) => i);
  for (let from = 0; from < n; from += batchSize) model.forward(sliceBatch(data, order, from, Math.min(n, from + batchSize)).inputs, false, kernels);
  observers.forEach((o) => (o.observing = false));
}

/**
 * Copies of every parameter (weights, biases, BN scales, LSQ steps) and state (BN running statistics, GDRQ running
 * clip thresholds), to return to after a non-finite step.
 */
class Snapshot {
  private readonly saved: Array<Float32Array | Float64Array>;
  constructor(private readonly arrays: Array<Float32Array | Float64Array>) {
    this.saved = arrays.map((a) => a.slice());
  }
  take(): void {
    this.arrays.forEach((a, i) => this.saved[i].set(a));
  }
  /** Adds arrays made after the snapshot was taken, with their values now. */
  extend(arrays: Array<Float32Array | Float64Array>): void {
    this.arrays.push(...arrays);
    this.saved.push(...arrays.map((a) => a.slice()));
  }
  restore(): void {
    this.arrays.forEach((a, i) => a.set(this.saved[i]));
  }
  /** Saves these arrays' values now (arrays of the snapshot). */
  refresh(arrays: Array<Float32Array | Float64Array>): void {
    for (const a of arrays) this.saved[this.arrays.indexOf(a)].set(a);
  }
}

/** The class count of logits computed for `samples` inputs, which must be [samples, classes]. */
function classesOf(model: TrainableModel, logits: Tensor, samples: number): number {
  if (logits.dims.length !== 2 || logits.dims[0] !== samples) {
    throw new TrainingError(`The model's output '${model.outputName}' is [${logits.dims.join(', ')}] for ${samples} input sample${samples === 1 ? '' : 's'}; ` +
      'fine-tuning a classifier needs logits [N, classes], one row per sample.');
  }
  return logits.dims[1];
}

function checkLabels(name: string, labels: ArrayLike<number>, classes: number): void {
  for (let i = 0; i < labels.length; i++) {
    if (!(labels[i] >= 0 && labels[i] < classes)) {
      throw invalidValue(`${name}[${i}]`, `a class index in [0, ${classes - 1}] (the model's output has ${classes} classes)`, labels[i]);
    }
  }
}

function sliceBatch(batch: InputBatch, order: Int32Array, from: number, to: number): InputBatch {
  const per = batch.inputs.data.length / batch.inputs.dims[0];
  const data = new Float32Array((to - from) * per);
  const labels = batch.labels ? new Int32Array(to - from) : undefined;
  for (let i = from; i < to; i++) {
    data.set(batch.inputs.data.subarray(order[i] * per, (order[i] + 1) * per), (i - from) * per);
    if (labels) labels[i - from] = batch.labels![order[i]];
  }
  return { inputs: { data, dims: [to - from, ...batch.inputs.dims.slice(1)] }, labels };
}

/** Accuracy of the model's forward pass in inference mode (quantizers included); the event loop turns between batches. */
export async function evaluateAccuracy(model: TrainableModel, data: LabelledBatch, kernels: FloatKernels, batchSize = 256, signal?: AbortSignal): Promise<number> {
  const n = data.inputs.dims[0];
  const order = Int32Array.from({ length: n }, (_, i) => i);
  let correct = 0;
  for (let from = 0; from < n; from += batchSize) {
    const b = sliceBatch(data, order, from, Math.min(n, from + batchSize));
    const tape = model.forward({ data: b.inputs.data, dims: b.inputs.dims }, false, kernels);
    const logits = model.output(tape);
    const classes = logits.dims[1];
    for (let i = 0; i < b.labels!.length; i++) {
      let arg = 0;
      for (let c = 1; c < classes; c++) if (logits.data[i * classes + c] > logits.data[i * classes + arg]) arg = c;
      if (arg === b.labels![i]) correct++;
    }
    await yieldToEventLoop();
    signal?.throwIfAborted();
  }
  return correct / n;
}

/** Share of output rows whose top-1 class agrees with the float model's (inference mode, quantizers included). */
async function evaluateAgreement(model: TrainableModel, data: InputBatch, teacher: Teacher, kernels: FloatKernels, batchSize = 64, signal?: AbortSignal): Promise<number> {
  const n = data.inputs.dims[0];
  const order = Int32Array.from({ length: n }, (_, i) => i);
  let correct = 0, rows = 0;
  for (let from = 0; from < n; from += batchSize) {
    const b = sliceBatch(data, order, from, Math.min(n, from + batchSize));
    const logits = model.output(model.forward(b.inputs, false, kernels));
    const r = distillationLoss(logits, await teacher.probabilities(b.inputs, logits.data.length), new Float32Array(logits.data.length));
    correct += r.correct;
    rows += r.rows;
    signal?.throwIfAborted();
  }
  return correct / rows;
}

/** The error for training data that can be read only once when several epochs are asked for. */
function readOnceError(data: object, epochs: number): RangeError {
  const stream = isStream(data);
  const kind = generatorKind(data) ?? (stream ? 'a stream' : 'an object handing out the same generator each time');
  const remedy = stream ? 'Collect its batches into an array, or pass epochs: 1.'
    : 'Pass an object that calls the generator function for each reading: { [Symbol.asyncIterator]: () => batches() }, or pass epochs: 1.';
  return new RangeError(`Expected batches that can be read once per epoch (options.epochs is ${epochs}: an array, or an object whose ` +
    `[Symbol.asyncIterator]() starts over each time) for data but received ${kind}, which can be read only once. ${remedy}`);
}

const yieldToEventLoop = () => new Promise<void>((resolve) => setImmediate(resolve));

function isBatchSource(data: unknown): data is AsyncIterable<InputBatch> | Iterable<InputBatch> {
  // A typed array is iterable too, but of numbers: it is the one set's inputs passed on their own.
  return !!data && typeof data === 'object' && !ArrayBuffer.isView(data) && (Symbol.asyncIterator in data || Symbol.iterator in data);
}

/**
 * Fine-tunes an ONNX classifier. `data` is one labelled set (shuffled into
 * mini-batches of `batchSize` every epoch) or an (async) iterable of batches
 * that restarts for every epoch.
 * @example
 * const { model, history } = await finetune('mnist-cnn.onnx', { inputs: { data, dims: [n, 1, 28, 28] }, labels },
 *   { method: 'lsq', weightBits: 4, activationBits: 4, epochs: 1 });
 */
export async function finetune(input: string | Uint8Array | ModelProto, data: TrainingData, options?: FinetuneOptions): Promise<FinetuneResult> {
  try {
    return await train(input, data, options);
  } catch (e) {
    // A layer too large for the batch, wherever it is met (a step, calibration, validation): a TrainingError naming it.
    if (e instanceof OpSizeError) throw Object.assign(new TrainingError(`${e.message}.`), { layer: e.node });
    throw e;
  }
}

async function train(input: string | Uint8Array | ModelProto, data: TrainingData, options?: FinetuneOptions): Promise<FinetuneResult> {
  const s = checkFinetuneOptions(options);
  const o = s.raw;
  o.signal?.throwIfAborted();
  const kernels = o.kernel === 'reference' ? referenceKernels : nativeKernels({ kernel: o.kernel, threads: o.threads });
  // The fake quantizers run the native LSQ kernels: a LOWBIT_KERNEL they cannot honour stops here, not at step 1.
  if (s.method !== 'float') checkKernel('quantize', undefined);
  // A caller's ModelProto is copied: the engine's model normalizes its graph (Constant forms, Identity weights).
  const proto = input instanceof Uint8Array || typeof input === 'string' ? await readModelAsync(input) : clone(ModelProtoSchema, input);
  if (o.outputPath !== undefined) checkNotModelFile('options.outputPath', o.outputPath, proto, false);
  const model = new TrainableModel(proto);
  if (model.params.size === 0) {
    // Training would run and change nothing.
    throw new TrainingError('The model has no weight the engine can train: it trains the float initializers that Conv, Gemm, MatMul, ' +
      `BatchNormalization, Add and Sub nodes read directly (or through an Identity); ${CONSTANT_WEIGHTS}, and fine-tune that model.`);
  }
  model.freezeBatchNorm = s.freezeBatchNorm;
  const needLabels = !s.distill;
  const inMemory = !isBatchSource(data) ? checkBatch('data', data, needLabels) : undefined;
  if (!inMemory && s.epochs > 1 && iterability(data) === 'once') throw readOnceError(data, s.epochs);  // not after a whole epoch
  const validation = o.validation === undefined ? undefined : checkBatch('options.validation', o.validation, needLabels);
  const checkShape = (name: string, b: InputBatch) => {
    const expected = model.checkInput(b.inputs.dims);
    if (expected) throw invalidValue(`${name}.inputs.dims`, `the model input '${model.inputName}' shape ${expected}`, b.inputs.dims);
  };
  if (inMemory) checkShape('data', inMemory);
  if (validation) checkShape('options.validation', validation);

  // A probe with the float model on one sample: the graph computes on these dims, and labels match its class count.
  let classes: number | undefined;
  let probed = false;
  const probe = (b: InputBatch, name: string) => {
    if (!probed) {
      probed = true;
      const one = sliceBatch(b, Int32Array.of(0), 0, 1);
      let output;
      try {
        // Float (no quantizers): theirs may not be initialised before the first training batch.
        output = model.output(model.forward({ data: one.inputs.data, dims: one.inputs.dims }, false, kernels, false));
      } catch (e) {
        // A valid model whose layer would need more memory than a step allocates, even for one sample (see finetune).
        if (e instanceof OpSizeError) throw e;
        // Shapes the graph itself gets wrong (a corrupted or inconsistent model), found before any training.
        if (!(e instanceof OpError)) throw e;
        throw new OnnxModelError(`The model does not compute on ${name}'s input dims [1, ${one.inputs.dims.slice(1).join(', ')}]: ${e.message}. ` +
          'Check that the model runs in onnxruntime on inputs of that shape.');
      }
      if (needLabels) classes = classesOf(model, output, 1);
    }
    if (needLabels) checkLabels(`${name}.labels`, b.labels!, classes!);
  };
  if (inMemory) probe(inMemory, 'data');
  if (validation) probe(validation, 'options.validation');
  // The float model as given, before quantizers change anything (the teacher's session opens just before training,
  // so that no error on the way leaves it open).
  const teacherBytes = s.distill ? await serializeModelAsync(proto) : undefined;
  buildQuantizers(model, s);
  const unexportable = exportBlocker(model);
  if (unexportable) throw new TrainingError(`${unexportable} (Found before training.)`);
  if (s.stepInit === 'max' && inMemory) observeActivationRanges(model, inMemory, s.batchSize, kernels);

  const params = () => (s.learnSteps ? model.allParameters() : [...model.params.values()]);
  const batchNorms = model.nodes.filter((n) => n.opType === 'BatchNormalization');
  // Restored with the parameters after a non-finite step: BN running statistics, GDRQ's running clip thresholds.
  const clipThresholds = [...model.quantizers.values()].flatMap((q) => (q.activation instanceof RunningClipQuantizer ? [q.activation.state] : []));
  const stats: Array<Float32Array | Float64Array> = [...batchNorms.flatMap((n) => n.input.slice(3, 5).map((i) => model.constants.get(i)!.data)), ...clipThresholds];
  // A training forward pass folds its batch statistics into these; an overflow there shows in no output.
  const brokenStatistics = () => batchNorms.find((n) => n.input.slice(3, 5).some((i) => !model.constants.get(i)!.data.every(Number.isFinite)));
  let previous: Snapshot | undefined, current: Snapshot | undefined;
  const stepsPerEpoch = inMemory ? batchCount(inMemory.inputs.dims[0], s.batchSize) : undefined;
  const totalSteps = stepsPerEpoch ? stepsPerEpoch * s.epochs : undefined;
  const random = seededRandom(s.seed);
  const history: EpochRecord[] = [];
  let globalStep = 0;
  let iterableSteps: number | undefined;

  const teacher = teacherBytes ? await Teacher.create(teacherBytes, model) : undefined;
  try {
    for (let epoch = 0; epoch < s.epochs; epoch++) {
      const t0 = performance.now();
      for (const q of model.quantizers.values()) (q.weight as { onEpochStart?: () => void } | undefined)?.onEpochStart?.();
      let lossSum = 0, correct = 0, judged = 0, seen = 0, step = 0;
      // Training stops on non-finite values, or on a batch an op refuses, with the model as restored (the last good weights).
      const stopped = (what: string, layer: string, kept = true) => {
        const error = new TrainingError(`Training stopped at epoch ${epoch + 1}, step ${step + 1}: ${what}`);
        error.step = globalStep + 1;
        error.layer = layer;
        if (kept) error.model = exportModel(model).bytes;
        return error;
      };
      let lr = s.learningRate;
      const batches = inMemory ? shuffled(inMemory, s.batchSize, random) : (data as AsyncIterable<InputBatch>);
      for await (const raw of abortable(batches, o.signal)) {
        const batch = inMemory ? raw : checkBatch(`data batch ${step}`, raw, needLabels);
        if (!inMemory) { checkShape(`data batch ${step}`, batch); probe(batch, `data batch ${step}`); }
        // An iterable's length shows once its first epoch has ended: cosine decay per step from then on.
        const progress = totalSteps ? globalStep / totalSteps : iterableSteps ? Math.min(1, globalStep / (iterableSteps * s.epochs)) : epoch / s.epochs;
        lr = s.schedule === 'constant' ? s.learningRate : 0.5 * s.learningRate * (1 + Math.cos(Math.PI * progress));
        let all = params();
        if (!current) { current = new Snapshot([...all.map((p) => p.value), ...stats]); previous = new Snapshot([...all.map((p) => p.value), ...stats]); }
        [previous, current] = [current, previous!];
        current.take();
        let tape;
        try {
          tape = model.forward({ data: batch.inputs.data, dims: batch.inputs.dims }, true, kernels);
        } catch (e) {
          // A batch an op cannot take (an iterable's last batch of one sample, for BatchNormalization): the steps
          // before it are kept.
          if (!(e instanceof OpError) || globalStep === 0) throw e;
          current.restore();  // running statistics the pass changed before the op refused
          throw stopped(`${e.message}. The error's model holds the weights trained before this batch.`, e.node);
        }
        if (globalStep === 0) {
          // LSQ activation steps start from the first batch, in this forward pass: now they are parameters to update and keep.
          const known = new Set(all);
          const created = params().filter((p) => !known.has(p));
          all = [...all, ...created];
          current.extend(created.map((p) => p.value));
          previous.extend(created.map((p) => p.value));
        }
        const logits = model.output(tape);
        const dLogits = new Float32Array(logits.data.length);
        const images = batch.inputs.dims[0];
        const r = teacher
          ? distillationLoss(logits, await teacher.probabilities(batch.inputs, logits.data.length), dLogits)
          : { ...softmaxCrossEntropy(logits, batch.labels!, dLogits), rows: images };
        // Fake quantizers turn NaN and ±Infinity into codes, so a finite loss alone does not prove finite values
        // (nor, in any model, finite running statistics).
        const masked = model.maskedNonFinite(tape) ?? brokenStatistics();
        if (!Number.isFinite(r.loss) || masked) {
          const statistics = brokenStatistics();
          const output = model.firstNonFiniteLayer(tape);
          const layer = output ?? (statistics ? nodeLabel(statistics) : 'the loss');
          const where = output ? `the output of ${output}` : statistics ? `the running statistics of ${layer}` : 'the loss';
          previous.restore();
          // (Fake quantizers turn Infinity into codes, and the native Relu and MaxPool drop NaN.)
          const loss = Number.isFinite(r.loss) ? 'the loss is finite, but' : `the loss is ${r.loss};`;
          // On the first batch no step ran yet: the model as given (its quantizers as they start) computes these values.
          if (globalStep === 0) {
            throw stopped(`${loss} values first became non-finite in ${where}, on the first batch, before any update: the model as given ` +
              `${s.method === 'float' ? '' : 'with its quantizers '}computes them, so the error holds no model. Check the model and this data in float first.`, layer, false);
          }
          throw stopped(`${loss} values first became non-finite in ${where}. The error's model holds the weights of the last step whose values were finite. Lower the learning rate.`, layer);
        }
        // The running clip thresholds the first forward pass set go with the weights it ran on (the snapshot before
        // this step, which a stop at step 2 or this step's update restores, was taken before them: clips of 0).
        if (globalStep === 0) current.refresh(clipThresholds);
        model.backward(tape, dLogits, kernels);
        optimizerStep(all, s.optimizer, lr, s.momentum, s.weightDecay, globalStep + 1);
        const broken = all.find((p) => !p.value.every(Number.isFinite));
        if (broken) {
          // This update overflowed (the last one too: no later forward pass would see it); the weights before it are good.
          current.restore();
          throw stopped(`its update made parameter '${broken.name}' non-finite. The error's model holds the weights before that update. Lower the learning rate.`, broken.name);
        }
        lossSum += r.loss * images;
        correct += r.correct;
        judged += r.rows;
        seen += images;
        step++;
        globalStep++;
        o.onStep?.({ epoch: epoch + 1, step, stepsPerEpoch, loss: lossSum / seen, accuracy: correct / judged });
        await yieldToEventLoop();
        o.signal?.throwIfAborted();
      }
      iterableSteps ??= inMemory ? undefined : step;
      if (seen === 0) {
        throw new TrainingError(epoch === 0
          ? `The training data yielded no batch. Give at least one batch { inputs${needLabels ? ', labels' : ''} }.`
          : `The training data yielded no batch in epoch ${epoch + 1}. An iterable must restart for every epoch (pass an object whose [Symbol.asyncIterator]() starts over, not a generator).`);
      }
      const record: EpochRecord = {
        epoch: epoch + 1, loss: lossSum / seen, accuracy: correct / judged, learningRate: lr, seconds: (performance.now() - t0) / 1000, images: seen,
      };
      if (validation) {
        record.validationAccuracy = teacher ? await evaluateAgreement(model, validation, teacher, kernels, 64, o.signal)
          : await evaluateAccuracy(model, validation as LabelledBatch, kernels, 256, o.signal);
      }
      history.push(record);
      o.onEpoch?.(record);
      await yieldToEventLoop();
    }
  } finally {
    await teacher?.release();
  }
  const { bytes, layers } = exportModel(model);
  o.signal?.throwIfAborted();
  if (o.outputPath !== undefined) await writeFileAtomicAsync(o.outputPath, bytes, o.signal);
  const forward = (inputs: { data: Float32Array; dims: number[] }) => {
    const b = checkBatch('inputs', { inputs }, false);
    checkShape('inputs', b);
    return model.output(model.forward({ data: b.inputs.data, dims: b.inputs.dims }, false, kernels), model.outputName).data;
  };
  return { model: bytes, history, layers, forward };
}

/** How many batches `shuffled` makes of n samples. */
function batchCount(n: number, batchSize: number): number {
  return n % batchSize === 1 && n > batchSize ? Math.floor(n / batchSize) : Math.ceil(n / batchSize);
}

function* shuffled(data: InputBatch, batchSize: number, random: () => number): Generator<InputBatch> {
  const n = data.inputs.dims[0];
  const order = Int32Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  // A last batch of one sample joins the one before (batchCount): one sample has no batch statistics for BatchNormalization.
  const batches = batchCount(n, batchSize);
  for (let b = 0; b < batches; b++) yield sliceBatch(data, order, b * batchSize, b === batches - 1 ? n : (b + 1) * batchSize);
}

