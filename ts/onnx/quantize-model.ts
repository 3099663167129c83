/**
 * quantizeModel: ONNX post-training quantization (QDQ). Converts the opset,
 * folds BatchNormalization, quantizes weights (per channel or blocked, 8/4/2
 * bits) and, with calibration data, the activation inputs of the quantized
 * layers (per tensor, 8/4 bits), then compares the result with the float model
 * in onnxruntime-node.
 */
import * as fs from 'node:fs';
import { TensorProto_DataType, type ModelProto, type NodeProto } from 'onnx-buf';

import { invalidType, invalidValue } from '../errors';
import { toFloat16Array } from '../float16';
import { ortProblem } from '../bench/ort-models';
import { openPair, openSession, OrtHost, runSession, type OrtSession, type PlainTensor } from './ort-session';
import { checkBitsChoice, checkChoice, checkKeepFloat, checkKnownKeys, checkNumber, isPlainObject, iterability } from '../validate';
import { allNodes, attribute, checkDefaultOpset, Graph, weightValues } from './graph';
import {
  bytesLeftInFiles, checkExternalOutput, checkNotModelFile, checkOutputPath, cloneSharingData, ONE_BUFFER_LIMIT, OnnxModelError, readModelAsync, serializeModelAsync, storedBytes, withDataRead, writeFileAtomicAsync, writeModelWithExternalData,
} from './model-io';
import { ACTIVATION_METHODS, branchValue, calibrate, checkFeed, firstFeeds, floatValues, openExposed, modelInputs, ortTensors, type ActivationMethod, type CalibrationData, type CalibrationResult, type Feed } from './calibrate';
import { LayerInputMoments } from '../calibration/layer-input-moments';
import { correctBiasesByLayer } from './passes/bias-correction';
import { ChannelRangeObserver, type Range } from '../calibration/observers';
import { compensateShifts, depthwiseLayers, equalizeDepthwiseInputs } from './passes/equalize-depthwise';
import { bypassConstantIdentities, constantAttributesAsTensors } from './passes/constant-identities';
import { densifySparseInitializers } from './passes/sparse-initializers';
import { quantizableTableCount, quantizeGathers } from './passes/quantize-gather';
import { KEPT_FLOAT, recurrentLayers, quantizeRecurrent } from './passes/quantize-recurrent';
import { foldWeightChains } from './passes/fold-weight-chains';
import { foldBatchNormSteps } from './passes/fold-batchnorm';
import { foldScalarAffineSteps } from './passes/fold-scalar-affine';
import { fuseHardSwish, hasHardSwishPattern } from './passes/fuse-hardswish';
import { quantizeBiases, type LayerScales } from './passes/quantize-bias';
import { keptFloat, nodeLabel, placeOf } from './passes/pass';
import { feedBatch, meanCosine, OutputComparison, type OutputComparisonResult } from './compare-outputs';
import { bySensitivity, measureSensitivity } from './sensitivity';
import { fitOnnxruntimeSteps } from './passes/fit-onnxruntime';
import { placeOutputQuantizers } from './passes/output-placement';
import { quantizeInputsDynamicallySteps } from './passes/dynamic-activations';
import { activationParams, fakeQuantize, quantizeActivations, quantizeBodyActivations, type ActivationLayerReport, type ActivationRange } from './passes/quantize-activations';
import { nextTurn, pauser, runStepsAsync, type PassReport } from './passes/pass';
import { checkFiniteWeights, edgeLayers, layerInput, QUANTIZABLE, quantizableLayers, operatorCountList, quantizableSubgraphLayers, quantizedOperatorCounts, quantizeWeightsByLayer, reducedRangeBits, unquantizableReason, type LayerSensitivity, type WeightLayerReport } from './passes/quantize-weights';
import { unconvertibleReason, upgradeOpset } from './passes/upgrade-opset';

export interface QuantizeModelOptions {
  /**
   * The weights of Conv, Gemm and MatMul layers, and the W and R of LSTM, GRU and RNN nodes (weight-only: the
   * recurrence runs in float, except LSTMs with activations.method 'dynamic', which become DynamicQuantizeLSTM;
   * bits, granularity and method apply to them, the other options do not).
   */
  weights: {
    bits: 2 | 4 | 8;
    /** 'channel' (default), 'block' (blockSize along the reduction axis), or 'tensor' (one scale a tensor: onnxruntime's default, the naive baseline). */
    granularity?: 'channel' | 'block' | 'tensor';
    blockSize?: number;
    method?: 'minmax' | 'mse' | 'aciq';
    /** ACIQ per-channel bit allocation with this mean (per-channel granularity; first/last layers excluded). */
    bitAllocation?: { averageBits: number };
    /**
     * ACIQ weight bias correction without data: per output channel, the scale is
     * multiplied by ξ = std(W) / std(Ŵ) so the quantized weights' spread matches
     * the float weights' (the channel-mean part needs data: use
     * `activations.biasCorrection`). Per-channel weights only.
     */
    biasCorrection?: boolean;
    /** GDRQ: contiguous output-channel groups per layer, one clip each (L1 search). */
    groups?: number;
    /** GDRQ Scale-Clip before quantizing: clip at k·mean|W| (per group with `groups`). */
    scaleClip?: number;
    /**
     * 'nearest' (default): round half to even, as QuantizeLinear. 'sum-preserving':
     * then re-round the fewest weights so each scale group keeps its sum (the
     * layer's response to flat input); see methods/sum-preserving.ts. 'gptq': re-round
     * each layer against the Gram matrix of its calibration inputs so its output
     * error, not its weights' error, is small (needs `calibration`); see methods/gptq.ts.
     */
    rounding?: 'nearest' | 'sum-preserving' | 'gptq';
    /**
     * 8-bit weights in the 7-bit range [−64, 63], stored as int8 (onnxruntime's quantizer calls it
     * reduce_range). x86 CPUs without VNNI multiply uint8 activations by int8 weights with vpmaddubsw,
     * which adds two products into a saturating int16: 2·255·64 still fits, 2·255·127 does not.
     */
    reduceRange?: boolean;
    /**
     * Also quantize embedding tables: each Gather (axis 0) of a 2-D float32 constant becomes onnxruntime's
     * com.microsoft GatherBlockQuantized, with the weights' bits, granularity and method (see passes/quantize-gather).
     * Default false.
     */
    gather?: boolean;
  };
  /**
   * `false` (default): weights only. Otherwise per-tensor activation quantization from calibration data, or with
   * method 'dynamic' from each run's own input (no calibration; MatMul, Gemm and LSTM only; see passes/dynamic-activations
   * and passes/quantize-recurrent).
   */
  activations?: false | {
    /** 16: uint16/int16 activations (opset 21), for layers too sensitive for 8 bits (not with 'kl'); 'dynamic' is 8 only. */
    bits: 4 | 8 | 16;
    signed?: boolean;
    method?: ActivationMethod | 'dynamic';
    /** Data-driven bias correction: E[W·x] − E[Ŵ·x] per output channel, from the calibration data, added to the bias. */
    biasCorrection?: boolean;
    /**
     * Also quantize the quantized layers' outputs (every consumer then reads the dequantized value): the
     * placement onnxruntime fuses into QLinearConv / QLinearMatMul, so the model runs with integer kernels,
     * at the cost of one more rounding per layer. Default false: only layer inputs are quantized, and
     * onnxruntime runs the layers in float on dequantized values.
     */
    outputs?: boolean;
    /**
     * Depthwise input equalization (default false; 4- and 8-bit activations): each depthwise convolution's input
     * channels are shifted and stretched (up to 4×) onto the tensor's calibrated range, and its filters and bias
     * changed to match (the float output is unchanged; see passes/equalize-depthwise), so narrow channels do
     * not share a few levels of a range set by wide ones. One more pass over the calibration data; in the
     * model, a Pad before each padded depthwise convolution whose input is shifted, and a Mul and an Add where
     * the input does not come from a scalar affine.
     */
    equalizeDepthwise?: boolean;
  };
  /** Feeds ({ inputName: { data: Float32Array, dims } }), an (async) iterable of them, or a folder of .npy files per input. */
  calibration?: CalibrationData;
  /** Node names or op types to leave in float (an unnamed node by its label, `MatMul(y)`, as reports name it). */
  keepFloat?: string[];
  /** Bits of the first and last quantized layers by data flow (see edgeLayers; their weights, at 8 also their input activations). Default 8. */
  firstLastLayerBits?: number;
  /**
   * Feeds to compare float and quantized outputs on; default: the first calibration batches, or two made-up inputs
   * (normal values for float inputs, ones for integer ones). An empty array skips the evaluation (no onnxruntime
   * sessions: for large models, or when timing).
   */
  evaluationFeeds?: Feed[];
  /**
   * Also measure each layer's sensitivity (layers[i].sensitivity; layers in the main graph and in subgraphs at any
   * depth): the model's outputs on the evaluation
   * feeds with only that layer quantized, every other float; the layers whose loss is largest are the ones to keep
   * in float (keepFloat). One onnxruntime session per layer. Default false.
   */
  sensitivity?: boolean;
  /**
   * Keep the layers that lose most in float until the output cosine on the evaluation feeds reaches `cosine`: the
   * model is quantized once with `sensitivity`, then again with its k most sensitive layers added to
   * keepFloat, k = 1, 2, … up to `maxFloatLayers` (default a quarter of the measured layers, at least 1; never all of
   * them), stopping at
   * the first that reaches it; the result is that run's model, or the run with the highest cosine when none does
   * (report.accuracyTarget says which). Needs evaluation feeds or calibration data (whose first batches are the
   * evaluation), calibration data that can be read again (an array or a folder), and a model under 2 GB. The feeds
   * that choose the layers also judge the result: pass others to check it.
   */
  accuracyTarget?: { cosine: number; maxFloatLayers?: number };
  /** Write the quantized model here (atomically). */
  outputPath?: string;
  /**
   * Keep large initializers in `<outputPath>.data` next to the model (needs
   * `outputPath`). Default: only when the model would reach 2 GB.
   */
  externalData?: boolean;
  /**
   * Hears each stage's name as it starts ('read', 'calibrate', 'quantize-weights', 'evaluate', …) and progress
   * within the long ones: 'calibrate batch <i>', 'quantize-weights <i>/<n>', 'bias-correction <i>/<n>', 'sensitivity <i>/<n>'
   * (layers), 'accuracy-target <k>/<n>' (a try with k layers kept float).
   */
  onProgress?: (stage: string) => void;
  /**
   * Stops the work when aborted: checked at every stage and progress step (calibration batch, layer), between
   * evaluation feeds and while the output is written; the promise rejects with the signal's reason and no output file is left.
   */
  signal?: AbortSignal;
}

export interface QuantizationReport {
  opset: { from: number; to: number; microsoftDomainFallback?: string };
  passes: PassReport[];
  layers: WeightLayerReport[];
  activations: ActivationLayerReport[];
  calibrationBatches?: number;
  /**
   * The float outputs of the quantized model against the float model's, both run at onnxruntime's default
   * optimisation level (fused integer kernels, which depend on the CPU): mean cosine per sample (each row along the
   * batch axis; an output without one, per feed), SQNR over all values (`sqnrDb`) and top-1 agreement over the last axis; `samples` counts the rows.
   */
  evaluation?: {
    samples: number;
    /**
     * `reshapedFeeds`: feeds on which a data-dependent output size (NonZero, Compress, NMS) differed, left out of its
     * cosine; `nonFiniteFeeds`: feeds on which the float model's output held NaN or an infinity, left out whole;
     * `quantizedNonFiniteFeeds`: feeds on which only the quantized model's output did: each sample holding such a
     * value counts as cosine 0, and each last-axis row holding one as a top-1 disagreement (broken, not near).
     */
    outputs: OutputComparisonResult['outputs'];
    /** Float outputs compared on no feed, and why; integer outputs (no cosine), with how many values match. */
    uncompared?: OutputComparisonResult['uncompared'];
    /**
     * With no evaluationFeeds and no calibration data: the dims of the inputs lowbit made up (symbolic dimensions
     * set to 1, which can make an image model's input a single pixel): a check that the model runs more than a
     * measure of its accuracy.
     */
    madeUpInputs?: Record<string, number[]>;
  };
  /**
   * Why there is no evaluation although none was turned off: no inputs could be made for the model, it is too large,
   * the float model fails on the inputs lowbit made up, or onnxruntime-node is not installed, too old or failing to load.
   */
  evaluationSkipped?: string;
  /** With options.sensitivity: why no layer's sensitivity was measured (no evaluation, a model of 2 GB or more). */
  sensitivitySkipped?: string;
  /**
   * With options.accuracyTarget: the target, whether this model meets it, the layers kept in float for it (beyond
   * options.keepFloat), and each run's mean output cosine by how many layers it kept in float (0: the first run).
   * timingsMs['accuracy-target'] is the whole call, every try included (the other stages are the chosen try's).
   */
  accuracyTarget?: {
    cosine: number; met: boolean; keptFloat: string[]; tried: Array<{ floatLayers: number; cosine: number }>;
    /** The first run's measured layers, the one that loses most first: the order layers were kept float in. */
    ranking: Array<{ node: string; op: string; shape: number[]; sensitivity: LayerSensitivity; subgraph?: string; branch?: string }>;
    /** How many layers the search could keep float (maxFloatLayers, or its default, capped below the measured layers). */
    limit: number;
  };
  timingsMs: Record<string, number>;
}

/** The activation widths quantizeModel takes (16: W8A16 at opset 21). */
export const ACTIVATION_BITS = [4, 8, 16] as const;

function checkPositiveNumber(name: string, v: unknown, expected: string, integer = false): void {
  checkNumber(name, v, expected, (n) => n > 0 && Number.isFinite(n) && (!integer || Number.isInteger(n)));
}

function checkAccuracyTarget(options: Record<string, unknown>): void {
  const t = options.accuracyTarget;
  if (!isPlainObject(t)) throw invalidType('options.accuracyTarget', 'an object { cosine, maxFloatLayers? }', t);
  checkKnownKeys('options.accuracyTarget', t, ['cosine', 'maxFloatLayers']);
  checkNumber('options.accuracyTarget.cosine', t.cosine, 'a number in (0, 1] (the mean output cosine to reach)', (n) => n > 0 && n <= 1);
  if (t.maxFloatLayers !== undefined) checkPositiveNumber('options.accuracyTarget.maxFloatLayers', t.maxFloatLayers, 'a positive integer', true);
  checkEvaluated(options, 'options.accuracyTarget', 'is judged on them');
  if (options.evaluationFeeds === undefined && options.calibration === undefined) {
    throw invalidValue('options.evaluationFeeds', 'feeds to judge options.accuracyTarget on (or calibration data, whose first batches are used)', undefined,
      'Pass evaluationFeeds or calibration: without them the evaluation runs on made-up inputs, which show that the model runs, not how close it stays.');
  }
  if (options.calibration !== undefined && iterability(options.calibration) !== 'restarts') {
    throw invalidValue('options.calibration', 'calibration data that can be read again with options.accuracyTarget (an array or a folder): the model is quantized once per try',
      options.calibration, 'Collect the feeds into an array.');
  }
  if (options.externalData) {
    throw invalidValue('options.externalData', 'not set with options.accuracyTarget (it keeps each try in memory: models under 2 GB)', options.externalData,
      'Leave externalData out, or accuracyTarget: quantize with keepFloat (see layers[i].sensitivity) instead.');
  }
}

/** Refuses evaluationFeeds [] (no evaluation) with an option (`name`) that needs the evaluation. */
function checkEvaluated(options: Record<string, unknown>, name: string, how: string): void {
  if (Array.isArray(options.evaluationFeeds) && options.evaluationFeeds.length === 0) {
    throw invalidValue('options.evaluationFeeds', `feeds to evaluate on (${name} ${how}; an empty array skips the evaluation)`, options.evaluationFeeds,
      `Pass evaluation feeds, or leave evaluationFeeds out (the first calibration batches are used), or leave ${name} out.`);
  }
}

function checkOptions(options: unknown): QuantizeModelOptions {
  if (!isPlainObject(options)) throw invalidType('options', 'an options object with weights', options);
  checkKnownKeys('options', options, ['weights', 'activations', 'keepFloat', 'firstLastLayerBits', 'evaluationFeeds', 'outputPath', 'onProgress', 'calibration', 'externalData', 'signal', 'sensitivity', 'accuracyTarget']);
  if (options.sensitivity !== undefined && typeof options.sensitivity !== 'boolean') throw invalidType('options.sensitivity', 'a boolean', options.sensitivity);
  if (options.sensitivity) checkEvaluated(options, 'options.sensitivity', 'measures on them');
  if (options.signal !== undefined && !(options.signal instanceof AbortSignal)) throw invalidType('options.signal', 'an AbortSignal (AbortController.signal)', options.signal);
  if (options.outputPath !== undefined) checkOutputPath('options.outputPath', options.outputPath);
  if (options.evaluationFeeds !== undefined && !Array.isArray(options.evaluationFeeds)) {
    throw invalidType('options.evaluationFeeds', 'an array of feeds { inputName: { data, dims } } (or [] to skip the evaluation)', options.evaluationFeeds);
  }
  if (options.externalData !== undefined && typeof options.externalData !== 'boolean') throw invalidType('options.externalData', 'a boolean', options.externalData);
  if (options.externalData && typeof options.outputPath !== 'string') {
    throw invalidValue('options.outputPath', 'a file path when externalData is set (the data file goes next to it)', options.outputPath);
  }
  if (options.externalData) checkExternalOutput('options.outputPath', options.outputPath as string);
  const w = options.weights;
  if (!isPlainObject(w)) throw invalidType('options.weights', 'an object { bits, granularity?, blockSize?, method? }', w);
  checkKnownKeys('options.weights', w, ['bits', 'granularity', 'blockSize', 'method', 'bitAllocation', 'biasCorrection', 'groups', 'scaleClip', 'rounding', 'reduceRange', 'gather']);
  if (w.reduceRange !== undefined && typeof w.reduceRange !== 'boolean') throw invalidType('options.weights.reduceRange', 'a boolean', w.reduceRange);
  if (w.gather !== undefined && typeof w.gather !== 'boolean') throw invalidType('options.weights.gather', 'a boolean', w.gather);
  if (w.rounding !== undefined) checkChoice('options.weights.rounding', w.rounding, ['nearest', 'sum-preserving', 'gptq']);
  if (w.rounding === 'gptq' && options.calibration === undefined) {
    throw invalidValue('options.calibration', "calibration feeds (or a folder of .npy files) for weights.rounding 'gptq'", undefined);
  }
  if (w.groups !== undefined) checkPositiveNumber('options.weights.groups', w.groups, 'a positive integer', true);
  if (w.scaleClip !== undefined) checkPositiveNumber('options.weights.scaleClip', w.scaleClip, 'a positive finite number (k)');
  if (w.bitAllocation !== undefined) {
    const b = w.bitAllocation;
    // Each channel's width is chosen in [2, 8] (7 with reduceRange), replacing bits for the layers it allocates.
    const widest = reducedRangeBits(8, !!w.reduceRange);
    const averageBits = `a number in [2, ${widest}] (the mean bits per weight${w.reduceRange ? '; reduceRange keeps weights within 7 bits' : ''})`;
    if (!isPlainObject(b)) throw invalidType('options.weights.bitAllocation', `{ averageBits } with averageBits ${averageBits}`, b);
    checkKnownKeys('options.weights.bitAllocation', b, ['averageBits']);
    checkNumber('options.weights.bitAllocation.averageBits', b.averageBits, averageBits, (n) => n >= 2 && n <= widest);
  }

  checkBitsChoice('options.weights.bits', w.bits, [2, 4, 8]);
  if (w.granularity !== undefined) checkChoice('options.weights.granularity', w.granularity, ['channel', 'block', 'tensor']);
  if (w.blockSize !== undefined && w.granularity !== 'block') {
    throw invalidValue('options.weights.blockSize', "no block size unless granularity is 'block'", w.blockSize, "Set options.weights.granularity to 'block', or leave blockSize out.");
  }
  if (w.granularity === 'tensor') {
    const perChannelOption = (['bitAllocation', 'groups', 'biasCorrection'] as const).find((key) => w[key] !== undefined && w[key] !== false);
    if (perChannelOption) throw invalidValue('options.weights.granularity', `'channel' with options.weights.${perChannelOption} (it works per output channel)`, w.granularity);
  }
  if (w.method !== undefined) {
    checkChoice('options.weights.method', w.method, ['minmax', 'mse', 'aciq'],
      (m) => ((ACTIVATION_METHODS as readonly string[]).includes(m) ? `'${m}' ranges are for activations: options.activations.method.` : undefined));
  }
  if (w.blockSize !== undefined) checkNumber('options.weights.blockSize', w.blockSize, 'a power of two >= 16', (n) => Number.isInteger(n) && n >= 16 && (n & (n - 1)) === 0);
  if (w.biasCorrection !== undefined && typeof w.biasCorrection !== 'boolean') throw invalidType('options.weights.biasCorrection', 'a boolean', w.biasCorrection);
  checkKeepFloat('options.keepFloat', options.keepFloat, "an array of node names or op types (e.g. ['Gemm'])");
  if (options.firstLastLayerBits !== undefined) checkBitsChoice('options.firstLastLayerBits', options.firstLastLayerBits, [2, 4, 8]);
  if (options.onProgress !== undefined && typeof options.onProgress !== 'function') throw invalidType('options.onProgress', 'a function', options.onProgress);
  const a = options.activations;
  if (a !== undefined && a !== false) {
    if (!isPlainObject(a)) throw invalidType('options.activations', 'false or { bits: 4 | 8 | 16, signed?, method? }', a);
    checkKnownKeys('options.activations', a, ['bits', 'signed', 'method', 'biasCorrection', 'outputs', 'equalizeDepthwise']);
    checkBitsChoice('options.activations.bits', a.bits, [...ACTIVATION_BITS]);
    if (a.bits === 16 && (a.method === 'kl' || a.method === 'aciq')) {
      throw invalidValue('options.activations.method', "'minmax', 'percentile' or 'mse' with 16-bit activations (KL and ACIQ's clipping work up to 8 bits)", a.method);
    }
    for (const key of ['signed', 'biasCorrection', 'outputs', 'equalizeDepthwise'] as const) {
      if (a[key] !== undefined && typeof a[key] !== 'boolean') throw invalidType(`options.activations.${key}`, 'a boolean', a[key]);
    }
    if (a.method !== undefined) checkChoice('options.activations.method', a.method, [...ACTIVATION_METHODS, 'dynamic']);
    if (a.equalizeDepthwise && (a.method === 'dynamic' || a.bits === 16)) {
      throw invalidValue('options.activations.equalizeDepthwise', `false with ${a.method === 'dynamic' ? "method 'dynamic' (it works on calibrated ranges)" : '16-bit activations (they need no equalization)'}`, a.equalizeDepthwise);
    }
    if (a.method === 'dynamic') {
      // DynamicQuantizeLinear makes uint8 codes, which MatMulInteger multiplies by int8 weights.
      if (a.bits !== 8) throw invalidValue('options.activations.bits', "8 with method 'dynamic' (DynamicQuantizeLinear makes uint8)", a.bits);
      if (a.signed) throw invalidValue('options.activations.signed', "false with method 'dynamic' (DynamicQuantizeLinear makes uint8)", a.signed);
      if (a.outputs) throw invalidValue('options.activations.outputs', "false with method 'dynamic' (the layers output float; there are no ranges to quantize them with)", a.outputs);
      // MatMulInteger multiplies int8 weights with one scale per column.
      const why = "with options.activations.method 'dynamic' (MatMulInteger multiplies int8 weights, one scale per column)";
      if (w.bits !== 8) throw invalidValue('options.weights.bits', `8 ${why}`, w.bits);
      if (w.granularity === 'block') throw invalidValue('options.weights.granularity', `'channel' or 'tensor' ${why}`, w.granularity);
      if ((options.firstLastLayerBits ?? 8) !== 8) throw invalidValue('options.firstLastLayerBits', `8 ${why}`, options.firstLastLayerBits);
      if (a.biasCorrection && options.calibration === undefined) {
        throw invalidValue('options.calibration', 'calibration feeds (or a folder of .npy files) for activations.biasCorrection', undefined);
      }
    } else if (options.calibration === undefined) {
      throw invalidValue('options.calibration', 'calibration feeds (or a folder of .npy files) to quantize activations', undefined);
    }
  }
  const c = options.calibration;
  if (c !== undefined) {
    if (typeof c === 'string') {
      if (!fs.existsSync(c) || !fs.statSync(c).isDirectory()) {
        throw invalidValue('options.calibration', 'a folder with one subfolder of .npy batches per model input', c,
          `${fs.existsSync(c) ? 'It is not a folder' : 'It does not exist'}; or pass the feeds themselves (an array or iterable of { inputName: { data, dims } }).`);
      }
    } else {
      const expected = 'a folder path, or an array, iterable or async iterable of feeds { inputName: { data, dims } }';
      if (typeof c !== 'object' || c === null || (typeof (c as Iterable<unknown>)[Symbol.iterator] !== 'function' && typeof (c as AsyncIterable<unknown>)[Symbol.asyncIterator] !== 'function')) {
        throw invalidType('options.calibration', expected, c);
      }
      // Iterable, but of numbers: one input's values rather than feeds (caught here, before the model is read).
      if (ArrayBuffer.isView(c)) throw invalidType('options.calibration', expected, c, 'Wrap the values as feeds: [{ inputName: { data, dims } }].');
    }
  }
  if (options.accuracyTarget !== undefined) checkAccuracyTarget(options);
  return options as unknown as QuantizeModelOptions;
}

/** The most values lowbit makes up for one input of the evaluation (64 MB of float32). */
const MADE_UP_VALUES = 2 ** 24;

/**
 * One input per model input for comparing float and quantized outputs when no data were given: standard normal
 * values for float inputs, ones for integer inputs (a valid token id, mask or type id for nearly every model;
 * random ids could fall outside a vocabulary) and true for bool ones, symbolic dims as 1. A string says why there is none.
 */
export async function randomFeeds(model: ModelProto, seed: number): Promise<Feed | string> {
  const feeds: Feed = {};
  let s = seed >>> 0;
  const next = () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return (s + 0.5) / 4294967296;
  };
  // Up to 2^24 values an input: made in pieces, turning the event loop every 10 ms.
  const pause = pauser();
  const normal = async <T extends Float32Array | Uint16Array>(values: T): Promise<T> => {
    const piece = new Float32Array(Math.min(values.length, 1 << 16));
    for (let start = 0; start < values.length; start += piece.length) {
      await pause();
      const part = piece.subarray(0, Math.min(piece.length, values.length - start));
      for (let i = 0; i < part.length; i++) part[i] = Math.sqrt(-2 * Math.log(next())) * Math.cos(2 * Math.PI * next());
      values.set(values instanceof Uint16Array ? toFloat16Array(part) : part, start);
    }
    return values;
  };
  for (const input of modelInputs(model)) {
    if (!input.dims) return `input '${input.name}' declares no shape, so lowbit cannot make inputs for it; pass evaluationFeeds`;
    const dims = input.dims.map((d) => (d < 0 ? 1 : d));
    const n = dims.reduce((a, b) => a * b, 1);
    if (n === 0) return `input '${input.name}' has a dimension of 0 (dims [${dims.join(', ')}]): made-up inputs would hold no values; pass evaluationFeeds`;
    if (n > MADE_UP_VALUES) {
      return `input '${input.name}' has dims [${dims.join(', ')}], ${n} values, more than lowbit makes up for one input (${MADE_UP_VALUES}); pass evaluationFeeds`;
    }
    if (input.elemType === TensorProto_DataType.FLOAT) {
      feeds[input.name] = { dims, data: await normal(new Float32Array(n)) };
    } else if (input.elemType === TensorProto_DataType.INT64) {
      feeds[input.name] = { dims, data: new BigInt64Array(n).fill(1n) };
    } else if (input.elemType === TensorProto_DataType.INT32) {
      feeds[input.name] = { dims, data: new Int32Array(n).fill(1) };
    } else if (input.elemType === TensorProto_DataType.FLOAT16) {
      feeds[input.name] = { dims, data: await normal(new Uint16Array(n)) };
    } else if (input.elemType === TensorProto_DataType.UINT8 || input.elemType === TensorProto_DataType.BOOL) {
      feeds[input.name] = { dims, data: new Uint8Array(n).fill(1), type: input.elemType === TensorProto_DataType.BOOL ? 'bool' : 'uint8' };
    } else if (input.elemType === TensorProto_DataType.INT8) {
      feeds[input.name] = { dims, data: new Int8Array(n).fill(1) };
    } else {
      return `input '${input.name}' has element type ${TensorProto_DataType[input.elemType] ?? input.elemType}, for which lowbit makes no inputs; pass evaluationFeeds`;
    }
  }
  return feeds;
}

/** What to do when onnxruntime rejects a model lowbit made from one it loads. */
const LOWBIT_BUG = 'The input model loads, so this is a lowbit bug: please report it with the model and options; ' +
  'leaving the node onnxruntime names in float (keepFloat) works around it.';

/**
 * A layer's output inside a branch of one of the main graph's If nodes as calibration names it (see branchValue),
 * or undefined for one elsewhere in a subgraph (Loop and Scan bodies, nested subgraphs), which cannot be observed.
 */
function branchOutput(graph: Graph, l: WeightLayerReport, ifOutput?: string): string | undefined {
  // The If by its first output (unique) when known, else by its name (when only one If has it).
  const owners = graph.graph.node.filter((n) => n.opType === 'If' && (ifOutput !== undefined ? n.output[0] === ifOutput : nodeLabel(n) === l.subgraph));
  const body = owners.length === 1 && owners[0].output.length > 0 && l.branch ? attribute(owners[0], l.branch)?.g : undefined;
  const node = body && graph.producer(l.output, body);
  // Its output has its weight's (or table's) element type.
  const weight = node && graph.constantIn(node.input[node.opType === 'Gather' ? 0 : 1], [body!])?.tensor;
  return weight ? branchValue(owners[0], l.branch!, l.output, weight.dataType) : undefined;
}

/**
 * Per-layer output SQNR: the prepared float model and the quantized one, layer outputs exposed (those in the main
 * graph's If branches on the feeds that run their branch).
 */
async function layerSqnr(preparedFloat: ModelProto, quantized: ModelProto, layers: WeightLayerReport[], feedsList: Feed[], host: OrtHost,
  ifOutputs: Map<WeightLayerReport, string>, signal?: AbortSignal): Promise<void> {
  const floatGraph = layers.some((l) => l.subgraph) ? new Graph(preparedFloat) : undefined;
  const compared = layers.map((l) => ({ l, name: l.subgraph ? branchOutput(floatGraph!, l, ifOutputs.get(l)) : l.output }))
    .filter((c): c is { l: WeightLayerReport; name: string } => c.name !== undefined);
  layers = compared.map((c) => c.l);
  if (feedsList.length === 0 || layers.length === 0) return;
  const names = compared.map((c) => c.name);
  // 'basic': the QDQ arithmetic of each layer as written, comparable layer by layer (exposing an output also stops
  // the fusions that quantize it); onnxruntime's fused kernels are covered by the output comparison (compareOutputs).
  const options = { graphOptimizationLevel: 'basic' as const, intraOpNumThreads: 1 };
  // Weights no pass changed are read by onnxruntime from the model's files; a temporary copy with external data
  // only when what is not left there reaches 2 GB (openExposed, as for calibration).
  const [f, q] = await openPair(() => openExposed(preparedFloat, names, options, 'the float model with its layer outputs exposed', LOWBIT_BUG, host),
    () => openExposed(quantized, names, options, 'the quantized model with its layer outputs exposed', LOWBIT_BUG, host), (s) => s.close());
  const power = new Float64Array(names.length);
  const noise = new Float64Array(names.length);
  const floatNonFinite = new Int32Array(names.length);
  const quantNonFinite = new Int32Array(names.length);
  const pause = pauser();
  try {
    for (const [index, feeds] of feedsList.entries()) {
      signal?.throwIfAborted();
      const tensors = ortTensors(feeds);
      const fo = await runSession(f.session, tensors, names.map(f.outputOf), `the float model with its layer outputs exposed on feed ${index}`, LOWBIT_BUG)
        .catch(asFloatModelFailure);
      signal?.throwIfAborted();
      const qo = await runSession(q.session, tensors, names.map(q.outputOf), `the quantized model with its layer outputs exposed on feed ${index}`, LOWBIT_BUG);
      for (const [i, name] of names.entries()) {
        const a = floatValues(fo[f.outputOf(name)]);
        const b = floatValues(qo[q.outputOf(name)]);
        // An empty branch value: its branch did not run. (When the two models take different branches, an If whose
        // condition depends on quantized values, the feed does not count for the layer.)
        if (a.length === 0 || a.length !== b.length) continue;
        // One pass: float32 values squared in float64 stay finite, so a non-finite sum means a non-finite value.
        let p = 0, e = 0;
        for (let j = 0; j < a.length; j++) {
          p += a[j] * a[j];
          e += (a[j] - b[j]) ** 2;
        }
        await pause();  // a large model's layer outputs take a while each
        // As in compareOutputs: a float output already NaN or infinite has no SQNR, the feed does not count; a
        // quantized one that is (the float one is not) is an unbounded error, -Infinity dB.
        if (!Number.isFinite(p)) {
          floatNonFinite[i]++;
          continue;
        }
        compared[i].l.outputSqnrDb = 0;  // compared at least once
        if (!Number.isFinite(e)) quantNonFinite[i]++;
        power[i] += p;
        noise[i] += Number.isFinite(e) ? e : Infinity;
      }
    }
  } finally {
    try {
      await f.close();
    } finally {
      await q.close();
    }
  }
  for (const [i, l] of layers.entries()) {
    if (floatNonFinite[i] > 0) l.outputNonFiniteFeeds = floatNonFinite[i];
    if (quantNonFinite[i] > 0) l.outputQuantizedNonFiniteFeeds = quantNonFinite[i];
    if (l.outputSqnrDb === undefined) continue;  // a branch no feed ran, or every feed's float output was non-finite
    l.outputSqnrDb = noise[i] === 0 ? Infinity : noise[i] === Infinity ? -Infinity : 10 * Math.log10(power[i] / noise[i]);
  }
}

/**
 * Depthwise input equalization (passes/equalize-depthwise) before the main calibration, from a first pass that
 * takes the depthwise inputs' per-channel ranges; undefined when the model has no depthwise layer.
 */
async function equalizeDepthwise(graph: Graph, targets: NodeProto[], opts: QuantizeModelOptions, host: OrtHost, rereadable: boolean,
  inputModelError: ReturnType<typeof inputModelErrorOn>):
  Promise<{ report: PassReport; shifts: Map<string, Float64Array>; calibrationMs?: number; batches?: number } | undefined> {
  const layers = depthwiseLayers(graph, targets);
  if (layers.length === 0) return undefined;
  const w = opts.weights;
  // Scaling a filter is absorbed only by scales of its own; bit allocation, GDRQ groups and Scale-Clip compare channels.
  const why = (w.granularity ?? 'channel') === 'tensor' ? 'weights.granularity is \'tensor\' (one scale would take every stretched filter)'
    : w.bitAllocation ? 'weights.bitAllocation compares the channels\' ranges'
      : w.groups !== undefined || w.scaleClip !== undefined ? 'GDRQ groups and Scale-Clip compare the channels\' ranges'
        : !rereadable ? 'the calibration data can be read only once, or may not start over (a generator, a stream, an object whose iterator is itself); pass an array or a folder for it'
          : undefined;
  if (why) return { report: { pass: 'equalize-depthwise', changed: [], skipped: layers.map((n) => ({ node: nodeLabel(n), reason: why })) }, shifts: new Map() };
  const observers = new Map(layers.map((n) => [n, new ChannelRangeObserver()]));
  opts.onProgress?.('calibrate (depthwise input channels)');
  const t0 = performance.now();
  const { batches } = await calibrate(cloneSharingData(graph.model), [], opts.calibration!, 'minmax', {
    onBatch: (i) => opts.onProgress?.(`calibrate batch ${i + 1}`), host, signal: opts.signal, inputModelError,
    tensorObservers: layers.map((n) => ({ tensor: n.input[0], observe: (data: Float32Array, dims: readonly number[]) => observers.get(n)!.observe(data, dims) })),
  });
  const calibrationMs = performance.now() - t0;
  return { ...equalizeDepthwiseInputs(graph, layers, observers), calibrationMs, batches };
}

/**
 * The float model in onnxruntime for the comparison. Given as a path, it is skimmed, and when it has weights of
 * 1 MiB or more onnxruntime reads them from the model's own files (openExposed, serializeForSession), rather than
 * parsing a model file with its weights inline whole.
 */
async function openFloatModel(model: string | Uint8Array, options: Parameters<typeof openSession>[1], host?: OrtHost): Promise<ClosableSession> {
  const remedy = 'lowbit evaluates models in onnxruntime-node: fix or re-export the model so that it loads there.';
  if (typeof model === 'string') {
    const read = await readModelAsync(model, { lazyTensors: true });
    if (bytesLeftInFiles(read) > 0) return openExposed(read, [], options, 'the input model', remedy, host);
  }
  return closable(await openSession(model, options, 'the input model', remedy, { host }));
}

type ClosableSession = { session: OrtSession; close: () => Promise<void> };

/**
 * @internal For calibrate's inputModelError: runs the input model as given on a batch the prepared model failed on
 * (`failure`). Its own error when it fails too (the batch or the model is at fault; `failure` is its cause); else
 * `failure`, saying that the model as given runs the batch (a conversion's doing) or could not be opened to tell.
 */
export function inputModelErrorOn(input: string | Uint8Array, host: OrtHost) {
  return async (inputs: Record<string, PlainTensor>, what: string, hint: string, failure: OnnxModelError): Promise<Error> => {
    // The failure's message with what the run of the input model showed.
    const noted = (note: string) => new OnnxModelError(`${failure.message} (${note})`, { cause: failure });
    const messageOf = (e: unknown) => (e instanceof Error ? e.message : String(e));
    let opened: ClosableSession;
    try {
      opened = await openFloatModel(input, { graphOptimizationLevel: 'disabled', intraOpNumThreads: 0 }, host);
    } catch (e) {
      return noted(`lowbit could not open the input model as given to run this batch on it: ${messageOf(e)}`);
    }
    const given = feedDims(inputs);
    try {
      await runSession(opened.session, inputs, undefined, `the input model on ${what} (${given})`,
        `${hint}The model as given fails on this batch as well (not a conversion's doing): check the model, and that the batch has the sizes it computes on.`);
    } catch (e) {
      if (e instanceof OnnxModelError) return new OnnxModelError(e.message, { cause: failure });
      return noted(`lowbit could not run the input model as given on this batch to tell: ${messageOf(e)}`);
    } finally {
      await opened.close().catch(() => undefined);
    }
    return noted("lowbit ran the input model as given on this batch, and it runs: this is the conversion's doing.");
  };
}

/** "a: [2, 4], b: [3, 4]": a feed's inputs and their dims, for messages. */
function feedDims(feed: Record<string, { dims: readonly number[] }>): string {
  return Object.entries(feed).map(([name, t]) => `${name}: [${t.dims.join(', ')}]`).join(', ');
}

function closable(session: OrtSession): ClosableSession {
  return { session, close: () => session.release() };
}

/** " It looks quantized already (119 ConvInteger, …)…" when the graph holds quantized operators, else "". */
function quantizedAlready(graph: Graph): string {
  const counts = quantizedOperatorCounts(graph);
  if (counts.length === 0) return '';
  return ` It looks quantized already (${operatorCountList(counts)}): lowbit quantizes float models; give it the float model this one was made from.`;
}

/**
 * The float model fails on an evaluation feed (as given, or as prepared for the layer comparison): the feed's doing or
 * the model's, not the quantization's. `reason` is onnxruntime's.
 */
class FloatModelFailure extends OnnxModelError {
  /** onnxruntime's reason: the first line of the failure's cause. */
  readonly reason: string;

  constructor(failure: OnnxModelError) {
    super(failure.message, { cause: failure.cause });
    this.reason = failure.cause instanceof Error ? failure.cause.message.split('\n')[0].trim().replace(/\.$/, '') : failure.message;
  }
}

/** For a float model's runSession: its model error as a FloatModelFailure, anything else as it is. */
function asFloatModelFailure(e: unknown): never {
  throw e instanceof OnnxModelError ? new FloatModelFailure(e) : e;
}

/**
 * @internal Mean per-sample output cosine, SQNR and top-1 agreement (over the last axis) of two models in onnxruntime, at its default
 * optimisation level, on these feeds. A feed holds as many samples as its first input's first dimension (1 for a
 * scalar input); an output whose first dimension is that batch is compared sample by sample, any other as one sample
 * per feed. A sample whose quantized values hold NaN or an infinity (the float ones do not) scores 0.
 */
export async function compareOutputs(floatModel: string | Uint8Array, quantBytes: Uint8Array | string, feedsList: Feed[], host?: OrtHost,
  signal?: AbortSignal) {
  // onnxruntime's default optimisation level, as users run the model: its fused integer kernels (chosen for this
  // CPU) compute the quantized model, so a fusion that miscomputes shows here. One thread: the same figures on every
  // run on one machine.
  const options = { intraOpNumThreads: 1 };
  const [float, quant] = await openPair(() => openFloatModel(floatModel, options, host),
    async () => closable(await openSession(quantBytes, options, 'the quantized model', LOWBIT_BUG, { host })), (opened) => opened.close());
  const [floatSession, quantSession] = [float.session, quant.session];
  const comparison = new OutputComparison();
  try {
    for (const [index, feeds] of feedsList.entries()) {
      signal?.throwIfAborted();
      const tensors = ortTensors(feeds);
      const f = await runSession(floatSession, tensors, undefined, `the input model on evaluation feed ${index}`,
        'The float model itself fails there: check the model (and that feed) in onnxruntime-node, where lowbit evaluates models.')
        .catch(asFloatModelFailure);
      signal?.throwIfAborted();
      const q = await runSession(quantSession, tensors, undefined, `the quantized model on evaluation feed ${index}`, LOWBIT_BUG);
      comparison.add(index, feedBatch(feeds), floatSession.outputNames, f, q);
      await nextTurn();
    }
  } finally {
    try {
      await float.close();
    } finally {
      await quant.close();
    }
  }
  return comparison.result();
}

/**
 * Quantizes the weights of an ONNX model (QDQ) and reports per layer.
 * @example
 * const { model, report } = await quantizeModel('model.onnx', { weights: { bits: 4, granularity: 'block' } });
 */
export async function quantizeModel(input: string | Uint8Array, options: QuantizeModelOptions):
  Promise<{ model: Uint8Array; report: QuantizationReport }> {
  const checked = checkOptions(options);
  const { signal, onProgress } = checked;
  signal?.throwIfAborted();
  // Every stage and progress step is a point to stop at.
  const opts: QuantizeModelOptions = signal ? { ...checked, onProgress: (stage) => { signal.throwIfAborted(); onProgress?.(stage); } } : checked;
  // One worker thread runs every onnxruntime session of this call (calibration, evaluation), started when first needed.
  const host = new OrtHost();
  try {
    return await (opts.accuracyTarget ? quantizeToTarget(input, opts, host) : quantizeModelWith(input, opts, host));
  } finally {
    await host.close();
  }
}

/** options.accuracyTarget: quantizeModelWith, then again with the most sensitive layers kept float until the target is met. */
async function quantizeToTarget(input: string | Uint8Array, opts: QuantizeModelOptions, host: OrtHost): Promise<{ model: Uint8Array; report: QuantizationReport }> {
  const t0 = performance.now();
  const target = opts.accuracyTarget!;
  // Each try checks the output path as a run would, but only the chosen model is written, at the end.
  const tryOptions: QuantizeModelOptions = { ...opts, accuracyTarget: undefined };
  const score = (r: QuantizationReport): number => {
    const cosine = r.evaluation ? meanCosine(r.evaluation) : undefined;
    if (cosine === undefined) {
      throw new OnnxModelError('options.accuracyTarget is judged on the mean cosine of the float outputs, and none could be compared: ' +
        `${r.evaluationSkipped ?? r.evaluation?.uncompared?.map((o) => `${o.name}: ${o.reason}`).join('; ') ?? 'no evaluation'}. ` +
        'Give evaluationFeeds on which the model computes float outputs, or quantize with keepFloat instead.');
    }
    return cosine;
  };
  const first = await quantizeModelWith(input, { ...tryOptions, sensitivity: true }, host, true);
  const ranking = bySensitivity(first.report.layers).map((l) => ({
    node: l.node, op: l.op, shape: l.shape, sensitivity: l.sensitivity, ...(l.subgraph ? { subgraph: l.subgraph, branch: l.branch } : {}),
  }));
  const limit = Math.min(target.maxFloatLayers ?? Math.max(1, Math.floor(ranking.length / 4)), Math.max(ranking.length - 1, 0));
  const tried = [{ floatLayers: 0, cosine: score(first.report) }];
  let chosen = { run: first, kept: 0, cosine: tried[0].cosine };
  for (let k = 1; chosen.cosine < target.cosine && k <= limit; k++) {
    opts.onProgress?.(`accuracy-target ${k}/${limit}`);
    const keepFloat = [...(opts.keepFloat ?? []), ...ranking.slice(0, k).map((l) => l.node)];
    const run = await quantizeModelWith(input, { ...tryOptions, sensitivity: false, keepFloat }, host, true);
    const cosine = score(run.report);
    tried.push({ floatLayers: k, cosine });
    if (cosine > chosen.cosine || cosine >= target.cosine) chosen = { run, kept: k, cosine };
  }
  const { model, report } = chosen.run;
  if (chosen.run !== first) {
    // What the first run measured, on the chosen run's layers (those it kept float are in accuracyTarget.ranking).
    const key = (l: WeightLayerReport) => `${l.subgraph ?? ''}\u0000${l.branch ?? ''}\u0000${l.node}`;
    const measured = new Map(first.report.layers.map((l) => [key(l), l]));
    for (const l of report.layers) {
      const m = measured.get(key(l));
      if (m?.sensitivity) l.sensitivity = m.sensitivity;
      if (m?.sensitivitySkipped) l.sensitivitySkipped = m.sensitivitySkipped;
    }
    if (first.report.sensitivitySkipped) report.sensitivitySkipped = first.report.sensitivitySkipped;
  }
  report.accuracyTarget = { cosine: target.cosine, met: chosen.cosine >= target.cosine, keptFloat: ranking.slice(0, chosen.kept).map((l) => l.node), tried, ranking, limit };
  if (opts.outputPath) {
    const w0 = performance.now();
    await writeFileAtomicAsync(opts.outputPath, model, opts.signal);
    report.timingsMs.write = performance.now() - w0;
  }
  report.timingsMs['accuracy-target'] = performance.now() - t0;
  return { model, report };
}

async function quantizeModelWith(input: string | Uint8Array, opts: QuantizeModelOptions, host: OrtHost, targetTry = false):
  Promise<{ model: Uint8Array; report: QuantizationReport }> {
  const timings: Record<string, number> = {};
  // Every stage starts on a new event-loop turn, and the per-layer passes let it turn between layers:
  // quantizing a large model holds the event loop for one layer's work at most (onnxruntime works on the host's thread).
  // An evaluation run inside another stage (the comparison inside the write) counts as the evaluation's time.
  let evaluationMs = 0;
  const time = async <T>(stage: string, fn: () => T | Promise<T>): Promise<T> => {
    opts.onProgress?.(stage);
    await nextTurn();
    const [t0, evaluatedBefore] = [performance.now(), evaluationMs];
    const r = await fn();
    timings[stage] = performance.now() - t0 - (evaluationMs - evaluatedBefore);
    return r;
  };
  // The weights may be views of the caller's bytes (quantized off the event loop from a copy).
  const callerBytes = typeof input !== 'string';
  // Large tensors (in external data, or in the model file, which is skimmed) stay in their file until a pass uses
  // them: quantizing weights only, without an evaluation, then holds one layer's float weights at a time rather
  // than the whole float model.
  const model = await time('read', () => readModelAsync(input, { lazyTensors: true }));
  if (opts.outputPath !== undefined) checkNotModelFile('options.outputPath', opts.outputPath, model, opts.externalData !== false);
  const evaluationFeeds = opts.evaluationFeeds?.map((feed, i) => checkFeed(model, feed, i, 'options.evaluationFeeds'));
  // Feeds given to evaluate on ask for the evaluation: an unusable onnxruntime-node is the error now, before any work.
  const ortMissingForFeeds = evaluationFeeds?.length ? ortProblem() : undefined;
  if (ortMissingForFeeds) throw ortMissingForFeeds;
  const graph = new Graph(model);
  checkDefaultOpset(graph);
  await time('validate', () => graph.validate());
  const passes: PassReport[] = [];
  // From IR 4 on, an initializer also listed as a graph input is a default that a feed may replace.
  const initializerNames = new Set([...model.graph!.initializer.map((t) => t.name), ...model.graph!.sparseInitializer.map((t) => t.values?.name ?? '')]);
  const overridable = model.irVersion >= 4n ? model.graph!.input.filter((i) => initializerNames.has(i.name)).map((i) => i.name) : [];
  // First: Constants given as value_float(s)/value_int(s), weights stored sparse, read through an Identity, or
  // computed from constants by data movement (fold-weight-chains), are a layer's weights for every decision below.
  passes.push(await time('constant-attributes-as-tensors', () => constantAttributesAsTensors(graph)));
  passes.push(await time('densify-sparse-initializers', () => densifySparseInitializers(graph)));
  passes.push(await time('bypass-constant-identities', () => bypassConstantIdentities(graph)));
  passes.push(await time('fold-weight-chains', () => foldWeightChains(graph, opts.keepFloat)));
  const bits = opts.weights.bits;
  // int4 and blocked DequantizeLinear arrived in opset 21, int2 in 25; per-channel needs 13.
  const blockedWeights = opts.weights.granularity === 'block';
  // Float16 weights get float16 scales (DequantizeLinear then outputs float16), which arrived in opset 19.
  const halfWeights = [...quantizableLayers(graph, opts.keepFloat).map((node) => ({ node, scopes: [] })), ...quantizableSubgraphLayers(graph, opts.keepFloat)]
    .filter((l) => graph.constantIn(l.node.input[1], l.scopes)!.tensor.dataType === TensorProto_DataType.FLOAT16).map((l) => l.node);
  // Float16 layers take calibrated activations (float16 scales) but not what rewrites their float tensors from
  // calibration statistics, nor the dynamic-quantization operators, which are float32 only.
  const requested = opts.activations || undefined;
  const halfUnsupported = [
    [opts.weights.rounding === 'gptq', "weights.rounding 'gptq'"], [requested?.method === 'dynamic', "activations.method 'dynamic'"],
    [requested?.biasCorrection, 'activations.biasCorrection'], [requested?.equalizeDepthwise, 'activations.equalizeDepthwise'],
  ].find(([used]) => used)?.[1];
  if (halfWeights.length > 0 && halfUnsupported) {
    throw new OnnxModelError(`Layer '${nodeLabel(halfWeights[0])}' has float16 weights: ${halfUnsupported} works on float32 layers only. ` +
      'Drop that option (float16 models take weights and calibrated activations), or convert the model to float32.');
  }
  // Why the model cannot be converted to a newer opset (undefined: it can), walked once: the conversion below
  // happens only when it can, and then nothing is left that could not be.
  const unconvertible = unconvertibleReason(graph);
  const activationBits = opts.activations && opts.activations.method !== 'dynamic' ? opts.activations.bits : 8;
  if (activationBits !== 8 && graph.opset < 21 && unconvertible) {
    throw new OnnxModelError(`${activationBits}-bit activations need opset 21, and this model (opset ${graph.opset}) cannot be converted: ${unconvertible}. ` +
      'Use 8-bit activations (options.activations.bits 8), or convert the model to opset 21 first.');
  }
  // LSTM, GRU and RNN weights (passes/quantize-recurrent) take the weights' bits; float16 ones float16 scales too.
  const recurrent = recurrentLayers(graph, opts.keepFloat);
  const halfRecurrent = recurrent.some((l) => l.reason === undefined && graph.constantIn(l.node.input[1], l.scopes)!.tensor.dataType === TensorProto_DataType.FLOAT16);
  const forWeights = Math.max(bits === 2 ? 25 : bits === 4 || blockedWeights || (opts.firstLastLayerBits ?? 8) < 8 ? 21 : 13,
    halfWeights.length > 0 || halfRecurrent ? 19 : 0);
  // HardSwish (fused below) arrived in opset 14; a model that cannot be converted keeps its pattern rather than
  // falling back to com.microsoft Q/DQ for it.
  const needed = hasHardSwishPattern(graph) && !unconvertible ? Math.max(forWeights, 14) : forWeights;
  const from = graph.opset;
  let microsoftDomainFallback: string | undefined;
  if (from < needed) {
    if (unconvertible) {
      const edgeBits = opts.firstLastLayerBits ?? 8;
      if (bits !== 8 || blockedWeights || halfWeights.length > 0 || halfRecurrent || edgeBits < 8) {
        const what = halfWeights.length > 0 || halfRecurrent ? 'float16 weights (float16 scales)' : blockedWeights ? 'blocked weights'
          : bits !== 8 ? `${bits}-bit weights` : `firstLastLayerBits ${edgeBits}`;
        throw new OnnxModelError(`${what} need opset ${needed}, and this model (opset ${from}) cannot be converted: ${unconvertible}.`);
      }
      microsoftDomainFallback = `opset ${from} kept (${unconvertible}); weights use com.microsoft DequantizeLinear`;
      graph.importDomain('com.microsoft');
    } else {
      passes.push(await time('upgrade-opset', () => upgradeOpset(graph, needed)));
    }
  }
  // Bit allocation may store a layer in int4 or int2 (opset 21 or 25): refused before any work where that is out of reach.
  const allocation = opts.weights.bitAllocation;
  if (allocation && allocation.averageBits < 8 && graph.opset < 21 && unconvertible) {
    throw new OnnxModelError(`weights.bitAllocation (averageBits ${allocation.averageBits}) can leave layers with 4- or 2-bit weights, which need opset 21 or 25, ` +
      `and this model (opset ${graph.opset}) cannot be converted: ${unconvertible}. Drop bitAllocation or set averageBits to 8.`);
  }
  passes.push(await time('fuse-hardswish', () => fuseHardSwish(graph)));
  passes.push(await time('fold-batchnorm', () => runStepsAsync(foldBatchNormSteps(graph))));
  passes.push(await time('fold-scalar-affine', () => runStepsAsync(foldScalarAffineSteps(graph, { shiftAfterConv: !(opts.activations && opts.activations.outputs) }))));
  // Dynamic activations replace calibrated ranges for MatMul layers; static ones come from calibration.
  const dynamic = !!opts.activations && opts.activations.method === 'dynamic';
  const staticActivations = opts.activations && !dynamic ? opts.activations as typeof opts.activations & { method?: ActivationMethod } : undefined;
  if (dynamic && microsoftDomainFallback) {
    throw new OnnxModelError(`Dynamic activations need opset 13 (per-channel int8 weights), and this model cannot be converted (${microsoftDomainFallback}).`);
  }
  // The float model after conversion and folding: what calibration runs.
  const dataBiasCorrection = !!(opts.activations && opts.activations.biasCorrection);
  const gptq = opts.weights.rounding === 'gptq';
  // onnxruntime-node takes lowbit's models as one buffer: a float model of 2 GB or more (external data) is compared
  // from its file, and calibrated and compared layer by layer from temporary copies with external data (see
  // calibrate's exposedModel).
  const calibrating = !!(staticActivations || gptq || dataBiasCorrection);
  // Whether a second reading of the calibration data (equalization's, GPTQ's on quantized inputs) reads the same: probed once.
  const rereadable = calibrating && iterability(opts.calibration) === 'restarts';
  // For a calibration batch the prepared model fails on (equalization's pass and the main one).
  const inputModelError = inputModelErrorOn(input, host);
  const targets = quantizableLayers(graph, opts.keepFloat);
  // Inside subgraphs: weights, and inputs (calibrated ones in the main graph's If branches, dynamic ones anywhere).
  const bodyTargets = quantizableSubgraphLayers(graph, opts.keepFloat);
  const bodyTargetCount = bodyTargets.length;
  const tableCount = opts.weights.gather ? quantizableTableCount(graph, opts.keepFloat) : 0;
  const recurrentCount = recurrent.filter((l) => l.reason === undefined).length;
  if (targets.length + bodyTargetCount + tableCount + recurrentCount === 0) {
    // Say why the layers there cannot be quantized (keepFloat aside).
    const keep = new Set(opts.keepFloat ?? []);
    const reasons = [...allNodes(graph).filter(({ node }) => QUANTIZABLE.has(node.opType) && !keptFloat(keep, node))
      .map(({ node, scopes }) => `${node.opType} '${nodeLabel(node)}': ${unquantizableReason(graph, node, scopes)}`),
    ...recurrent.filter((l) => l.reason !== KEPT_FLOAT).map((l) => `${l.node.opType} '${nodeLabel(l.node)}': ${l.reason}`)];
    const kinds = recurrent.length ? 'Conv, Gemm, MatMul, LSTM, GRU or RNN layer' : 'Conv, Gemm or MatMul layer';
    throw new OnnxModelError(`No ${kinds} with constant float weights${opts.weights.gather ? ' and no embedding table' : ''} was found to quantize; ` +
      `the model would be unchanged.${reasons.length ? ` ${reasons.slice(0, 3).join('; ')}${reasons.length > 3 ? `; and ${reasons.length - 3} more` : ''}.` : ''}` +
      quantizedAlready(graph) +
      (opts.keepFloat?.length ? ` Check options.keepFloat, which leaves ${opts.keepFloat.length === 1 ? 'one name' : `${opts.keepFloat.length} names`} in float.` : ''));
  }
  // Before calibration, which would otherwise fail later on the values they produce (without calibration the
  // weight pass checks each layer as it quantizes it).
  if (calibrating) {
    for (const n of targets) {
      // Read from their file (asynchronously) when large, scanned, not kept: the weight pass reads them again.
      checkFiniteWeights(n, n.input[1], weightValues(await withDataRead(graph.constant(n.input[1])!))!);
      await nextTurn();
    }
  }
  // Depthwise inputs whose shift the rounded filters must be compensated for after the weight pass.
  let shifts = new Map<string, Float64Array>();
  let equalizationBatches: number | undefined;  // what the main calibration must read again
  if (staticActivations && staticActivations.bits <= 8 && staticActivations.equalizeDepthwise) {
    const equalized = await time('equalize-depthwise', () => equalizeDepthwise(graph, targets, opts, host, rereadable, inputModelError));
    // Its pass over the calibration data counts as calibration.
    if (equalized?.calibrationMs) {
      timings['equalize-depthwise'] -= equalized.calibrationMs;
      timings.calibrate = equalized.calibrationMs;
    }
    // A model without depthwise convolutions: the option did nothing, which the report says.
    passes.push(equalized?.report ?? { pass: 'equalize-depthwise', changed: [], skipped: [{ node: '(model)', reason: 'it has no depthwise convolution to equalize (outside keepFloat)' }] });
    equalizationBatches = equalized?.batches;
    if (equalized && !gptq && !dataBiasCorrection) shifts = equalized.shifts;
  }
  // The float model for calibration and the layer SQNR (the clone shares the weights' bytes; lazily read ones stay lazy).
  // Calibration runs it before the weights are quantized: GPTQ rounding needs its input statistics.
  let prepared: ModelProto | undefined = !calibrating && evaluationFeeds?.length === 0 ? undefined : cloneSharingData(graph.model);
  const inputs = new Map(targets.map((n) => [nodeLabel(n), n.input[0]]));
  // The layers' names in the report, before bias correction renames unnamed layers' outputs.
  const labels = new Map(targets.map((n) => [n, nodeLabel(n)]));
  const constantOf = graph.constantLookup();
  const layerInputs = targets.map((n) => n.input[0]).filter((t) => t && !constantOf(t));
  // With `outputs`, the layers' outputs too (not the model's outputs, which stay float).
  // after a Relu/Clip where there is one, and shared through data-movement ops (see output-placement).
  const placement = staticActivations && staticActivations.outputs ? placeOutputQuantizers(graph, targets, staticActivations.signed ?? false, opts.weights.granularity === 'tensor') : undefined;
  if (placement) passes.push(placement.report);
  const layerOutputs = placement ? placement.calibrated : [];
  // Layers inside the branches of the main graph's If nodes get calibrated inputs and GPTQ statistics too:
  // calibration brings branch values out through the If (see calibrate's exposeFromBranches). Loop and Scan bodies,
  // and nested subgraphs, stay float.
  const bodyInputLayers = bodyTargets.filter((l) => !graph.constantIn(l.node.input[0], l.scopes));
  // (The If's branch attribute holding the layer; none in an invalid If, which then stays unobserved.)
  const branchOf = (l: typeof bodyTargets[number]) => placeOf(l.owner, l.scopes).branch;
  const observableBodyLayers = bodyInputLayers.filter((l) => l.scopes.length === 1 && l.owner.opType === 'If' && l.owner.output.length > 0 && branchOf(l));
  const branchLayers = staticActivations ? observableBodyLayers : [];
  const bodyActivationReport: PassReport = { pass: 'quantize-activations (subgraphs)', changed: [], skipped: [] };
  for (const l of staticActivations ? bodyInputLayers.filter((x) => !branchLayers.includes(x)) : []) {
    bodyActivationReport.skipped.push({ node: nodeLabel(l.node), reason: `inside ${l.scopes.length > 1 ? 'a nested subgraph' : `a ${l.owner.opType} body`} of ` +
      `${nodeLabel(l.owner)}, whose values calibration cannot observe (If branches of the main graph only): input left float` });
  }
  if (staticActivations?.outputs) {
    for (const owner of new Set(branchLayers.map((l) => l.owner))) {
      bodyActivationReport.skipped.push({ node: nodeLabel(owner), reason: 'outputs: the outputs of layers inside subgraphs stay float (their inputs are quantized)' });
    }
  }
  // What calibration observes for a branch layer's input: the value as its branch sees it (see branchValue), of the
  // layer's weight type (a float Conv/Gemm/MatMul's inputs share one).
  const observedInput = new Map(observableBodyLayers.map((l) =>
    [l.node, branchValue(l.owner, branchOf(l)!, l.node.input[0], graph.constantIn(l.node.input[1], l.scopes)!.tensor.dataType)]));
  const branchTensors = [...new Set(branchLayers.map((l) => observedInput.get(l.node)!))];
  const tensors = staticActivations ? [...new Set([...layerInputs, ...layerOutputs])] : [];
  // The layers whose input statistics calibration can gather, with what their weights meet: GPTQ's also in the
  // main graph's If branches; data-driven bias correction's in the main graph only.
  const withData = targets.filter((n) => !constantOf(n.input[0])).map((n) => ({ n, input: layerInput(graph, n) }))
    .filter(({ input }) => LayerInputMoments.supports(input));
  const branchWithData = observableBodyLayers.map((l) => ({ n: l.node, input: layerInput(graph, l.node, l.scopes) }))
    .filter(({ input }) => LayerInputMoments.supports(input));
  // Per layer, the moments of its inputs: Gram matrices for GPTQ, means (of float inputs) for data-driven bias correction.
  // (Their zeroed Gram blocks take a while to allocate for a large model: the event loop turns in between.)
  const pause = pauser();
  const gptqMoments = new Map<NodeProto, LayerInputMoments>();
  for (const { n, input } of gptq ? [...withData, ...branchWithData] : []) {
    gptqMoments.set(n, new LayerInputMoments(input, { gram: true }));
    await pause();
  }
  const biasMoments = new Map(dataBiasCorrection ? withData.map(({ n, input }) => [nodeLabel(n), new LayerInputMoments(input)]) : []);
  await nextTurn();
  let result: CalibrationResult | undefined;
  let sample: Feed[] | undefined;
  let calibrationBatches: number | undefined;
  // Tensors quantized for every consumer: the layer outputs, and what shares their parameters.
  const everyConsumer = new Set(layerOutputs);
  const ranges = new Map<string, ActivationRange>();
  const branchRanges = new Map<string, ActivationRange>();
  // Calibration observers feeding layers' input moments (`quantizeInputs`: the inputs as the quantized model will see them).
  const observe = (moments: Array<[NodeProto, LayerInputMoments]>, quantizeInputs: boolean) => moments.map(([n, m]) => {
    const tensor = observedInput.get(n) ?? n.input[0];
    const range = quantizeInputs ? branchRanges.get(tensor) ?? ranges.get(tensor) : undefined;  // branch values' names never clash with main ones
    const params = range && activationParams(range, opts.activations ? opts.activations.signed ?? false : false);
    return { tensor, observe: (data: Float32Array, dims: readonly number[]) => m.observeSteps(params ? fakeQuantize(data, params) : data, dims) };
  });
  const biasObservers = withData.filter(({ n }) => biasMoments.has(nodeLabel(n))).map(({ n }): [NodeProto, LayerInputMoments] => [n, biasMoments.get(nodeLabel(n))!]);
  // GPTQ with quantized activations takes a second pass over the calibration data, so its Gram matrices see the
  // inputs as the quantized model will (clipped and rounded); data that can be read only once get one pass on float inputs.
  const secondPass = gptq && !!staticActivations && rereadable;
  if (calibrating) {
    opts.onProgress?.('calibrate');
    const t0 = performance.now();
    result = await calibrate(prepared!, [...new Set([...tensors, ...branchTensors])], opts.calibration!, staticActivations?.method ?? 'minmax', {
      onBatch: (i) => opts.onProgress?.(`calibrate batch ${i + 1}`), host, signal: opts.signal, inputModelError,
      tensorObservers: [...observe(biasObservers, false), ...(secondPass ? [] : observe([...gptqMoments], false))], expectBatches: equalizationBatches,
    });
    calibrationBatches = result.batches;
    sample = result.sample;
    if (staticActivations) {
      // The activation ranges. The first and last layers' inputs take their 8 bits too (as their weights do): the
      // model input and the classifier's features, which ACIQ's authors also keep at 8 bits; with `outputs`, the last
      // layers' outputs (the logits) as well. Those inside subgraphs: their branches' values, below.
      const edges = edgeLayers(graph, targets, bodyTargets);
      const edgeTensors = new Set(targets.filter(edges.isEdge).map((n) => n.input[0]));
      for (const n of targets) if (edges.last.has(n)) edgeTensors.add(placement?.quantizedOutput.get(nodeLabel(n)) ?? n.output[0]);
      const edgeBits = (opts.firstLastLayerBits ?? 8) === 8 ? Math.max(8, staticActivations.bits) : staticActivations.bits;
      const calibrated = result;
      const rangeOf = async (t: string, bits: number): Promise<ActivationRange> => {
        if (!calibrated.observedBatches.get(t)) {
          throw invalidValue('options.calibration', `batches on which the model computes values for tensor '${t}' (a layer input)`,
            `${calibrated.batches} batches on which it is empty`, 'A batch with a dimension of 0 gives nothing to calibrate on: give batches with data.');
        }
        let range: Range;
        try {
          range = calibrated.observers.get(t)!.range(bits, staticActivations.signed ?? false);
        } catch (e) {
          if (!(e instanceof RangeError)) throw e;  // (a lowbit bug, not the data)
          throw new RangeError(`Calibrating the float model's tensor '${t}' (a layer input): ${(e as Error).message} The observers take finite ` +
            'values only (the quantized model saturates infinities): keep the layers reading it in float (options.keepFloat), or check the model.', { cause: e });
        }
        await nextTurn();  // a KL or ACIQ search per tensor
        return { ...range, bits, ...(calibrated.float16.has(t) ? { float16: true } : {}) };
      };
      for (const t of tensors) ranges.set(t, await rangeOf(t, edgeTensors.has(t) ? edgeBits : staticActivations.bits));
      // Branch layers' inputs: each value as its branch sees it (also one the main graph computes) gets its own range,
      // the edge layers' at their bits; none for a branch no calibration batch ran.
      const readersOf = new Map(branchTensors.map((t) => [t, [] as typeof branchLayers]));
      for (const l of branchLayers) readersOf.get(observedInput.get(l.node)!)!.push(l);
      for (const [t, readers] of readersOf) {
        if (!result.observedBatches.get(t)) {
          for (const l of readers) bodyActivationReport.skipped.push({ node: nodeLabel(l.node), reason: `its branch of ${nodeLabel(l.owner)} gave it no values on any calibration batch (the branch did not run): input left float` });
          continue;
        }
        branchRanges.set(t, await rangeOf(t, readers.some((l) => edges.isEdge(l.node)) ? edgeBits : staticActivations.bits));
      }
      for (const { tensor, source } of placement?.shared ?? []) {
        const from = ranges.get(source);
        // A last layer's input keeps its own (wider) 8 bits rather than a narrower source's.
        if (!from || (edgeTensors.has(tensor) && from.bits < edgeBits)) continue;
        ranges.set(tensor, from);
        everyConsumer.add(tensor);
      }
    }
    if (secondPass) {
      opts.onProgress?.('calibrate (GPTQ inputs)');
      await calibrate(prepared!, [], opts.calibration!, 'minmax', {
        onBatch: (i) => opts.onProgress?.(`calibrate batch ${i + 1}`), host, signal: opts.signal, tensorObservers: observe([...gptqMoments], true), expectBatches: calibrationBatches,
      });
    }
    timings.calibrate = (timings.calibrate ?? 0) + performance.now() - t0;
    if (gptq) {
      passes.push(secondPass
        ? { pass: 'gptq-inputs', changed: ['Gram matrices from a second calibration pass, inputs quantized as the model will quantize them'], skipped: [] }
        : { pass: 'gptq-inputs', changed: [`Gram matrices from ${staticActivations ? 'float' : 'the'} calibration inputs`],
          skipped: staticActivations ? [{ node: 'all layers', reason: 'the calibration data can be read only once, or may not start over (a generator, a stream, an object whose iterator is itself): no second pass on quantized inputs; pass an array or a folder for it' }] : [] });
    }
  }
  // Calibration data that quantizing does not read (weight-only, round to nearest) still make the evaluation's inputs.
  if (!calibrating && opts.calibration !== undefined && evaluationFeeds === undefined) sample = await firstFeeds(model, opts.calibration, 4);
  // Without an evaluation nothing needs the float model any more: dropping it lets each layer's float weights be
  // freed once the layer is quantized (a large model's peak memory then stays near its quantized size).
  if (evaluationFeeds?.length === 0) prepared = undefined;
  const { report: weightReport, layers, weights, layerOf } = await time('quantize-weights', () => runStepsAsync(quantizeWeightsByLayer(graph, {
    bits, granularity: opts.weights.granularity ?? 'channel', blockSize: opts.weights.blockSize,
    method: opts.weights.method ?? 'minmax', firstLastLayerBits: opts.firstLastLayerBits ?? 8,
    keepFloat: opts.keepFloat, gather: !!opts.weights.gather, recurrent, microsoftDomain: microsoftDomainFallback !== undefined, bitAllocation: opts.weights.bitAllocation,
    groups: opts.weights.groups, scaleClipK: opts.weights.scaleClip, momentCorrection: !!opts.weights.biasCorrection,
    rounding: opts.weights.rounding, moments: gptqMoments, reduceRange: !!opts.weights.reduceRange,
    keepValues: dataBiasCorrection || new Set(shifts.keys()), async: true, callerBytes,
  }), (_, done) => opts.onProgress?.(`quantize-weights ${done}/${targets.length + bodyTargetCount}`)));
  passes.push(weightReport);
  if (shifts.size > 0) passes.push(compensateShifts(graph, weights, shifts));
  // Bit allocation can leave a layer's widest channel at 4 or 2 bits (also when weights.bits is 8): int4 storage
  // needs opset 21, int2 25.
  const narrowest = layers.reduce((a, l) => (l.bits < a.bits ? l : a), layers[0]);
  const storageOpset = narrowest && narrowest.bits <= 2 ? 25 : narrowest && narrowest.bits <= 4 ? 21 : 0;
  if (graph.opset < storageOpset) {
    const why = microsoftDomainFallback ?? unconvertibleReason(graph);
    if (why) {
      const cause = narrowest.channelBits ? 'Bit allocation left' : 'firstLastLayerBits left';
      const remedy = narrowest.channelBits ? 'Raise weights.bitAllocation.averageBits or drop it.' : 'Raise firstLastLayerBits.';
      throw new OnnxModelError(`${cause} layer '${narrowest.node}' with ${narrowest.bits}-bit weights, which need opset ${storageOpset}, and this model ` +
        `(opset ${graph.opset}) cannot be converted: ${why}. ${remedy}`);
    }
    passes.push(upgradeOpset(graph, storageOpset));
  }
  if (opts.weights.gather) {
    // After the opset is settled: 4- and 2-bit tables come with 4- and 2-bit weights, which raised it to 21 or 25.
    const gathered = await time('quantize-gather', () => runStepsAsync(quantizeGathers(graph, {
      bits, granularity: opts.weights.granularity ?? 'channel', blockSize: opts.weights.blockSize, method: opts.weights.method ?? 'minmax', keepFloat: opts.keepFloat,
      callerBytes,
    })));
    passes.push(gathered.report);
    layers.push(...gathered.layers);
  }
  if (recurrent.length > 0) {
    const quantizedRecurrent = await time('quantize-recurrent', () => runStepsAsync(quantizeRecurrent(graph, {
      bits, granularity: opts.weights.granularity ?? 'channel', blockSize: opts.weights.blockSize, method: opts.weights.method ?? 'minmax',
      keepFloat: opts.keepFloat, microsoftDomain: microsoftDomainFallback !== undefined, callerBytes, dynamic,
    })));
    // What applies to Conv, Gemm and MatMul layers only, said for each recurrent one.
    const w = opts.weights;
    const notApplied = [
      ...(w.bitAllocation ? ['weights.bitAllocation'] : []), ...(w.groups ? ['weights.groups'] : []), ...(w.scaleClip !== undefined ? ['weights.scaleClip'] : []),
      ...(w.biasCorrection ? ['weights.biasCorrection'] : []), ...(w.rounding && w.rounding !== 'nearest' ? [`weights.rounding '${w.rounding}'`] : []),
      ...(w.reduceRange ? ['weights.reduceRange'] : []),
    ];
    for (const l of quantizedRecurrent.layers) {
      if (notApplied.length) quantizedRecurrent.report.skipped.push({ node: l.node, reason: `${notApplied.join(', ')}: for Conv, Gemm and MatMul layers; its W and R take weights.bits, granularity and method alone` });
      // (With dynamic activations the pass says which stay weight-only and why.)
      if (opts.activations && !dynamic) quantizedRecurrent.report.skipped.push({ node: l.node, reason: 'its inputs and states stay float (activations are quantized for Conv, Gemm and MatMul)' });
    }
    passes.push(quantizedRecurrent.report);
    layers.push(...quantizedRecurrent.layers);
  }
  let activations: ActivationLayerReport[] = [];
  if (result) {
    const a = staticActivations || { bits: 8 as const, method: 'minmax' as const };
    // (A model that cannot be converted was refused for these bits before any work.)
    if (staticActivations && a.bits !== 8 && graph.opset < 21) passes.push(upgradeOpset(graph, 21));
    if (dataBiasCorrection) {
      const corrected = await time('bias-correction', () => runStepsAsync(correctBiasesByLayer(graph, weights, biasMoments),
        (_, done) => opts.onProgress?.(`bias-correction ${done}/${weights.length}`)));
      for (const l of layers) {
        if (l.subgraph) corrected.skipped.push({ node: l.node, reason: `it is inside ${l.branch ? `${l.branch} of ` : ''}${l.subgraph}: data-driven bias correction takes main-graph layers only` });
      }
      passes.push(corrected);
      // A MatMul whose correction went into the bias Add after it is compared (layer SQNR) after that Add.
      const moved = new Map(weights.filter((w) => w.biasAddOutput).map((w) => [w.node, w.biasAddOutput!]));
      for (const l of layers) if (!l.subgraph) l.output = moved.get(l.node) ?? l.output;
    }
    if (staticActivations) {
      const act = await time('quantize-activations', () => quantizeActivations(graph, ranges, new Set(targets.map((n) => nodeLabel(n))),
        a.signed ?? false, microsoftDomainFallback !== undefined, everyConsumer));
      passes.push(act.report);
      activations = act.activations;
      const byTensor = new Map(activations.map((x) => [x.tensor, { bits: x.bits, range: x.range }]));
      for (const l of layers.filter((x) => !x.subgraph)) {  // a body node may share a main-graph layer's name
        const input = byTensor.get(inputs.get(l.node)!);
        const output = byTensor.get(placement?.quantizedOutput.get(l.node) ?? l.output);
        if (input) l.input = input;
        if (output) l.outputActivation = output;
      }
      if (branchLayers.length > 0) {
        const inBranches = quantizeBodyActivations(graph, branchLayers.map((l) => ({
          node: l.node, label: nodeLabel(l.node), scope: l.scopes[0], subgraph: nodeLabel(l.owner),
          branch: branchOf(l)!, range: branchRanges.get(observedInput.get(l.node)!),
        })), a.signed ?? false, microsoftDomainFallback !== undefined);
        bodyActivationReport.changed.push(...inBranches.report.changed);
        activations.push(...inBranches.activations);
        for (const [node, input] of inBranches.inputs) {
          const entry = layerOf.get(node);
          if (entry) entry.input = { bits: input.bits, range: input.range };
        }
      }
      if (bodyActivationReport.changed.length + bodyActivationReport.skipped.length > 0) passes.push(bodyActivationReport);
      // Int32 biases where both the input activation and the weights are quantized per channel (float16 layers: all).
      const scales = new Map<string, LayerScales>();
      for (const w of weights) {
        const input = inputs.get(w.node);
        const act = activations.find((x) => x.tensor === input);
        if (act?.float16) scales.set(w.node, { activation: act.scale, weight: w.channelScales ?? new Float32Array(0), float16: true });
        else if (act && w.channelScales) scales.set(w.node, { activation: act.scale, weight: w.channelScales });
      }
      passes.push(await time('quantize-bias', () => quantizeBiases(graph, scales, microsoftDomainFallback !== undefined)));
      passes.push(await time('fit-onnxruntime', () => runStepsAsync(fitOnnxruntimeSteps(graph))));
    }
  }
  if (dynamic) {
    const places = [...targets.map((node) => ({ node, scope: graph.graph, scopes: [] })),
      ...bodyTargets.map((l) => ({ node: l.node, scope: l.scopes[0], scopes: l.scopes }))];
    const dyn = await time('dynamic-activations', () => runStepsAsync(quantizeInputsDynamicallySteps(graph, places, labels)));
    passes.push(dyn.report);
    for (const node of dyn.quantized) {
      const entry = layerOf.get(node);
      if (entry) entry.input = { bits: 8, dynamic: true };
    }
  }
  const inputsLeft = new Set(model.graph!.input.map((i) => i.name));
  const quantizedWeights = new Set(layers.flatMap((l) => [l.weight, ...(l.recurrentWeight ? [l.recurrentWeight.weight] : [])]));
  const overridden = overridable.flatMap((name) => (!inputsLeft.has(name)
    ? [`${name}: a graph input with a default (a feed could replace it), quantized or folded into a layer, so no longer an input`]
    : quantizedWeights.has(name)
      ? [`${name}: a graph input with a default (a feed could replace it), quantized for some of the layers that read it; it stays an input for the others (left float), so a feed for it now reaches only those`]
      : []));
  if (overridden.length > 0) passes.push({ pass: 'overridable-initializers', changed: overridden, skipped: [] });
  const fitsOneFile = storedBytes(model) < ONE_BUFFER_LIMIT;
  if (!fitsOneFile && targetTry) {
    throw new OnnxModelError('The quantized model is 2 GB or more: options.accuracyTarget keeps each try in memory, which works for models under 2 GB. ' +
      'Quantize with keepFloat instead (layers[i].sensitivity shows which layers lose most).');
  }
  if (!fitsOneFile && (opts.outputPath === undefined || opts.externalData === false)) {
    throw new OnnxModelError('The quantized model is 2 GB or more, which one ONNX buffer cannot hold: pass outputPath (without externalData: false), ' +
      'and it is written with its weights in <outputPath>.data.');
  }
  const external = opts.outputPath !== undefined && (opts.externalData === true || (opts.externalData === undefined && !fitsOneFile));
  // Chosen here for a model of 2 GB or more: checked before the evaluation's work (externalData: true was checked up front).
  if (external && opts.externalData === undefined) checkExternalOutput('options.outputPath', opts.outputPath!);
  const report: QuantizationReport = {
    opset: { from, to: graph.opset, ...(microsoftDomainFallback ? { microsoftDomainFallback } : {}) }, passes, layers, activations,
    ...(calibrationBatches !== undefined ? { calibrationBatches } : {}), timingsMs: timings,
  };
  const random = evaluationFeeds || sample ? [] : [await randomFeeds(model, 1), await randomFeeds(model, 2)];
  const noRandomFeeds = random.find((f): f is string => typeof f === 'string');
  if (noRandomFeeds) report.evaluationSkipped = noRandomFeeds;
  const feeds = evaluationFeeds ?? sample ?? (noRandomFeeds ? [] : random as Feed[]);
  const madeUp = !evaluationFeeds && !sample && !noRandomFeeds;
  // What lowbit guessed in them: a size for a symbolic dimension, a value (1) for an integer or bool input.
  const madeUpFor = madeUp ? modelInputs(model) : [];
  const guesses = [
    ...(madeUpFor.some((i) => i.dims?.some((d) => d < 0)) ? ['symbolic dimensions set to 1'] : []),
    ...(madeUpFor.some((i) => i.elemType !== TensorProto_DataType.FLOAT && i.elemType !== TensorProto_DataType.FLOAT16) ? ['integer and bool inputs set to 1'] : []),
  ];
  const noteMadeUp = (r: QuantizationReport) => {
    if (madeUp && r.evaluation) r.evaluation.madeUpInputs = Object.fromEntries(Object.entries(feeds[0]).map(([name, t]) => [name, [...t.dims]]));
  };
  // Where lowbit guessed (a sample of one, a sample rate of 1), the model may not compute on its inputs: then the
  // comparison is skipped, said why, rather than the quantization failing. A float model that fails on inputs of
  // its own declared shapes and types fails the call, as on feeds the caller gave.
  const unlessMadeUpFails = async (compare: () => Promise<void>) => {
    try {
      await compare();
    } catch (e) {
      if (!(guesses.length > 0 && e instanceof FloatModelFailure)) throw e;
      delete report.evaluation;
      for (const l of layers) {
        delete l.outputSqnrDb;
        delete l.outputNonFiniteFeeds;
        delete l.outputQuantizedNonFiniteFeeds;
      }
      report.evaluationSkipped = `the float model fails on the inputs lowbit made up (${feedDims(feeds[0])}; ${guesses.join(', ')}): ${e.reason}; ` +
        'pass evaluationFeeds or calibration data (--calib) the model computes on to compare';
    }
  };
  const ortMissing = feeds.length > 0 ? ortProblem() : undefined;
  const evaluating = feeds.length > 0 && !ortMissing;
  if (ortMissing) {
    report.evaluationSkipped = ortMissing.notInstalled
      ? 'onnxruntime-node (an optional peer dependency) is not installed: install it to compare the quantized model with the float one'
      : `onnxruntime-node cannot be used, so the quantized model was not compared with the float one: ${ortMissing.message}`;
  }
  // The self-contained model is what gets evaluated and returned; with external data and no evaluation it is never
  // needed whole (the data are written tensor by tensor).
  const bytes = fitsOneFile && (evaluating || !external) ? await time('serialize', () => serializeModelAsync(model)) : new Uint8Array(0);
  const evaluationTime = async (fn: () => Promise<void>) => {
    const t0 = performance.now();
    await fn();
    evaluationMs += performance.now() - t0;
    timings.evaluate = evaluationMs;
  };
  if (evaluating) {
    opts.onProgress?.('evaluate');
    // The float model as given: from its path, skimmed, its weights read by onnxruntime from its own files
    // (openFloatModel), or its bytes. A quantized model of 2 GB or more is compared layer by layer here, before the
    // write moves its data out, and as a whole from its written files below.
    await evaluationTime(() => unlessMadeUpFails(async () => {
      if (fitsOneFile) report.evaluation = await compareOutputs(input, bytes, feeds, host, opts.signal);
      if (prepared) {
        await layerSqnr(prepared, model, layers, feeds, host, new Map(bodyTargets.flatMap((l) => {
          const entry = layerOf.get(l.node);
          return entry ? [[entry, l.owner.output[0]] as [WeightLayerReport, string]] : [];
        })), opts.signal);
      }
    }));
  }
  if (opts.sensitivity) {
    // (A model of 2 GB or more is compared later, from its written files.)
    if (!fitsOneFile) report.sensitivitySkipped = 'the quantized model is 2 GB or more: a model per layer would take too long';
    else if (!report.evaluation) report.sensitivitySkipped = `there was no evaluation${report.evaluationSkipped ? ` (${report.evaluationSkipped})` : ''}`;
    else {
      await time('sensitivity', () => measureSensitivity(prepared!, model, layers, feeds, host,
        { bug: LOWBIT_BUG, onLayer: (done, total) => opts.onProgress?.(`sensitivity ${done}/${total}`), signal: opts.signal }));
    }
  }
  if (external) {
    // The whole model of 2 GB or more is compared from its written files before the write ends: if that fails, the
    // files that were at the output path before are put back (or none is left).
    const compareWritten = evaluating && !fitsOneFile && !report.evaluationSkipped
      ? () => evaluationTime(() => unlessMadeUpFails(async () => void (report.evaluation = await compareOutputs(input, opts.outputPath!, feeds, host, opts.signal))))
      : undefined;
    const modelBytes = await time('write', () => writeModelWithExternalData(model, opts.outputPath!, undefined, opts.signal, compareWritten));
    noteMadeUp(report);
    return { model: modelBytes, report };
  }
  if (opts.outputPath && !targetTry) await time('write', () => writeFileAtomicAsync(opts.outputPath!, bytes, opts.signal));
  noteMadeUp(report);
  return { model: bytes, report };
}
