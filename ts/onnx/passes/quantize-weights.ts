/**
 * Replaces the float weights of Conv, Gemm and MatMul with integer initializers
 * and a DequantizeLinear node (QDQ): int8 per channel, or int4/int2 per channel
 * or blocked along the input-channel (reduction) axis (opset 21 for int4, 25 for
 * int2). Symmetric signed values, zero point 0 (the zero-point input is left out).
 */
import { TensorProto_DataType, type GraphProto, type NodeProto, type TensorProto } from 'onnx-buf';

import { OnnxModelError, readLazyTensor, unloadTensor } from '../model-io';
import { allNodes, dimsOf, hasSubgraphs, intAttribute, isFloat16Tensor, isFloatTensor, makeIntAttribute, makeTensor, ownedTensor, subgraphNodes, subgraphReads, transposes, weightValues, type Graph } from '../graph';
import { fromFloat16Bits, toFloat16Array, toFloat16Bits } from '../../float16';
import { packInt2, packInt4 } from '../../pack';
import { scaleClip } from '../../methods/gdrq';
import { preserveRunSums } from '../../methods/sum-preserving';
import { gptqRoundSteps, type WeightMatrixView } from '../../methods/gptq';
import { NON_FINITE_INPUT, type LayerInput, type LayerInputMoments } from '../../calibration/layer-input-moments';
import { dequantize, EMPTY_TENSOR_MAX_CHANNELS, quantizationError, quantizeOffThread, quantizeTensor, type QuantizeOptions } from '../../quantize';
import { integerRange, type QuantizedTensor } from '../../quant-params';
import { closestName } from '../../validate';
import { keptFloat, nodeLabel, pauseClock, placeOf, runSteps, type PassReport, type Steps } from './pass';

export interface WeightQuantization {
  bits: 2 | 4 | 8;
  /** 'tensor': one scale per weight tensor (onnxruntime's quantizer default; the naive baseline). */
  granularity: 'channel' | 'block' | 'tensor';
  blockSize?: number;
  method: 'minmax' | 'mse' | 'aciq';
  /** Bits of the first and last quantized layers. */
  firstLastLayerBits?: number;
  /** Node names or op types to leave in float. */
  keepFloat?: string[];
  /** Embedding tables are quantized too (passes/quantize-gather): keepFloat may name their Gathers. */
  gather?: boolean;
  /**
   * The LSTM, GRU and RNN nodes, whose weights passes/quantize-recurrent quantizes after this pass (its
   * recurrentLayers, `reason` set for those it leaves float): keepFloat may name them, and subgraphs holding them are
   * said to be quantized.
   */
  recurrent?: Array<{ node: NodeProto; owner?: NodeProto; reason?: string }>;
  /** Use com.microsoft Q/DQ (old opsets onnxruntime still accepts; int8 only). */
  microsoftDomain?: boolean;
  /**
   * ACIQ per-channel bit allocation (per-channel granularity): channels get their
   * own bits with this mean; values are stored in the type of the largest width.
   */
  bitAllocation?: { averageBits: number };
  /**
   * GDRQ: split each layer's output channels into this many contiguous groups,
   * one clip per group (L1 search); the group scales are written per channel
   * (repeated), which is what folding them into the following BatchNormalization
   * yields. Layers whose channel count the groups do not divide stay per channel.
   */
  groups?: number;
  /** GDRQ Scale-Clip before quantizing: clip each group's weights at k·mean|W|. */
  scaleClipK?: number;
  /** Multiply each channel's scale by std(W)/std(Ŵ) (ACIQ's variance correction; per-channel weights only). */
  momentCorrection?: boolean;
  /**
   * 'sum-preserving': re-round so each Conv filter's taps over one input channel keep their sum (methods/sum-preserving.ts).
   * 'gptq': re-round against each layer's input Gram matrix from calibration (`moments`; methods/gptq.ts).
   */
  rounding?: 'nearest' | 'sum-preserving' | 'gptq';
  /** Per layer (inside If branches too), the moments of its calibration inputs with Gram matrices, for 'gptq' rounding. */
  moments?: Map<NodeProto, LayerInputMoments>;
  /** 8-bit layers take 7-bit values (stored as int8), as onnxruntime's reduce_range: no int16 saturation in u8×s8 kernels without VNNI. */
  reduceRange?: boolean;
  /** Keep each layer's (or these layers') float and dequantized weights in the result (for bias corrections). */
  keepValues?: boolean | Set<string>;
  /**
   * Steps for runStepsAsync, which waits for what they yield without holding the event loop: a weight whose data
   * wait in a file is read asynchronously (readLazyTensor), and a layer of ASYNC_MIN_VALUES weights or more is
   * quantized on native worker threads (quantizeOffThread).
   */
  async?: boolean;
  /** The weights may be views of the caller's model bytes: copied before native worker threads read them (async). */
  callerBytes?: boolean;
}

/**
 * Weights from which a layer is quantized off the event loop: such a layer takes milliseconds; below it, handing
 * each layer to a worker thread cost more than it held the loop (about 100 ms over the PP-OCRv4 recognizer's 47
 * small layers in npm run experiments -- ptq).
 */
const ASYNC_MIN_VALUES = 1 << 20;

/** The bits of a layer's weight values: reduceRange keeps 8-bit weights to 7-bit levels (onnxruntime's u8s8 kernels without VNNI). */
export function reducedRangeBits(bits: number, reduceRange: boolean): number {
  return reduceRange ? Math.min(bits, 7) : bits;
}

/** quantizeTensor, or quantizeOffThread yielded for runStepsAsync to wait for (the same values; the event loop stays free). */
export function* quantized(data: Float32Array, how: QuantizeOptions, async: boolean, callerBytes = false): Generator<Promise<void>, QuantizedTensor, void> {
  if (!async || data.length < ASYNC_MIN_VALUES) return quantizeTensor(data, how);
  let q: QuantizedTensor | undefined;
  // In place when the weights are lowbit's own (read from a file); a view of the caller's bytes is copied first: the
  // caller could transfer or shrink their buffer while the native threads read it.
  yield quantizeOffThread(data, how, callerBytes).then((r) => {
    q = r;
  });
  return q!;
}

/** The model's outputs with only one layer quantized, against the float model: mean cosine over its float outputs, top-1 agreement of the first output with one. */
export interface LayerSensitivity {
  cosine: number;
  top1Agreement?: number;
}

export interface WeightLayerReport {
  node: string;
  op: string;
  weight: string;
  shape: number[];
  bits: number;
  granularity: string;
  method: string;
  weightSqnrDb: number;
  /** Per-channel bits when bit allocation was used. */
  channelBits?: number[];
  /**
   * LSTM, GRU and RNN: their recurrence weights R (`weight`, `shape` and `granularity` are W's; R's may differ where
   * one is long enough for blocks and the other is not); `weightSqnrDb` is then that of W and R together
   * (passes/quantize-recurrent).
   */
  recurrentWeight?: { weight: string; shape: number[]; granularity: string; weightSqnrDb: number };
  /** GPTQ rounding saw fewer calibration input vectors than the inputs it solves together (a block of at most 512). */
  gptqUnderdetermined?: { inputVectors: number; blockInputs: number };
  /** The layer's output tensor (its bias Add's, when data-driven bias correction shifted that bias). */
  output: string;
  /**
   * SQNR of the layer's output in the quantized model against the float model on the evaluation inputs, both run at
   * onnxruntime's 'basic' level: the QDQ arithmetic as written, not the fused kernels the output cosine measures.
   */
  outputSqnrDb?: number;
  /**
   * With options.sensitivity: the model's outputs with only this layer quantized (its weights, and its inputs as
   * the quantized model quantizes them; every other layer float), against the prepared float model on the evaluation
   * feeds: mean cosine over the float outputs, top-1 agreement of the first output with one (see onnx/sensitivity).
   */
  sensitivity?: LayerSensitivity;
  /** Why the layer's sensitivity was not measured. */
  sensitivitySkipped?: string;
  /** Feeds left out of outputSqnrDb because the float model's layer output held NaN or an infinity. */
  outputNonFiniteFeeds?: number;
  /** Feeds on which only the quantized layer output held NaN or an infinity: outputSqnrDb is then -Infinity. */
  outputQuantizedNonFiniteFeeds?: number;
  /** The node whose subgraph (If branch, Loop or Scan body) holds the layer, and which of its subgraphs (then_branch, else_branch, body). */
  subgraph?: string;
  branch?: string;
  /**
   * With quantized activations: the layer input's bits and clip range (or `dynamic`: computed from each run's input),
   * and its output's when outputs are quantized.
   */
  input?: { bits: number; range: [number, number] } | { bits: 8; dynamic: true };
  outputActivation?: { bits: number; range: [number, number] };
}

/** What bias correction and int32 biases need of each quantized layer. */
export interface QuantizedWeights {
  node: string;
  shape: number[];
  outputAxis: number;
  /** Float (a read-only view of the model's bytes) and dequantized weights, with `keepValues` only. */
  original?: Float32Array;
  dequantized?: Float32Array;
  /** Weight scales per output channel (per-channel granularity only). */
  channelScales?: Float32Array;
  /** Set by data-driven bias correction when it moved into the bias Add after a MatMul: that Add's output. */
  biasAddOutput?: string;
}

export const QUANTIZABLE = new Set(['Conv', 'Gemm', 'MatMul']);

/** Operators of quantized models (onnxruntime's tools', lowbit's): layers that read integer weights or inputs. */
const QUANTIZED_OPERATORS = new Set(['ConvInteger', 'MatMulInteger', 'QLinearConv', 'QLinearMatMul', 'DynamicQuantizeLinear', 'MatMulNBits',
  'DequantizeLinear', 'GatherBlockQuantized', 'MatMulIntegerToFloat', 'DynamicQuantizeMatMul']);

/** How many nodes of each quantized operator the graph holds (subgraphs too), most first: none for a float model. */
export function quantizedOperatorCounts(graph: Graph): Array<{ op: string; count: number }> {
  const counts = new Map<string, number>();
  for (const { node } of allNodes(graph)) if (QUANTIZED_OPERATORS.has(node.opType)) counts.set(node.opType, (counts.get(node.opType) ?? 0) + 1);
  return [...counts].map(([op, count]) => ({ op, count })).sort((a, b) => b.count - a.count);
}

/** "119 ConvInteger, 119 DynamicQuantizeLinear": counts of operators, for messages. */
export function operatorCountList(counts: Array<{ op: string; count: number }>): string {
  return counts.map(({ op, count }) => `${count} ${op}`).join(', ');
}

// A MatMul weight may carry leading dimensions of 1 ([1, K, N], as some exporters write it): one [K, N] matrix.
function layout(opType: string, dims: number[], transB: boolean): { outputAxis: number; reductionAxis: number } | undefined {
  if (opType === 'Conv') return dims.length >= 3 ? { outputAxis: 0, reductionAxis: 1 } : undefined;
  if (opType === 'Gemm') return dims.length !== 2 ? undefined : transB ? { outputAxis: 0, reductionAxis: 1 } : { outputAxis: 1, reductionAxis: 0 };
  if (dims.length < 2 || dims.slice(0, -2).some((d) => d !== 1)) return undefined;
  return { outputAxis: dims.length - 1, reductionAxis: dims.length - 2 };
}

/** The stored values: q's int8 codes themselves (q is not changed after this), or freshly packed int4/int2. */
export function valuesTensor(name: string, q: QuantizedTensor): ReturnType<typeof makeTensor> {
  if (q.bits === 8) return ownedTensor(name, TensorProto_DataType.INT8, q.shape, new Uint8Array(q.values.buffer, q.values.byteOffset, q.values.length));
  if (q.bits === 4) return ownedTensor(name, TensorProto_DataType.INT4, q.shape, packInt4(q));
  return ownedTensor(name, TensorProto_DataType.INT2, q.shape, packInt2(q));
}

/**
 * The float16 value nearest a positive scale, kept positive and finite (DequantizeLinear needs scale > 0). With
 * `qmax` (the values are then quantized with the result), the next float16 up where the nearest would saturate the
 * top of the grid, `qmax` steps of the float32 scale: only below float16's normal range, where one float16 step can
 * be a large part of the scale (at 8 bits for max |w| under about 0.001), so the nearest value clipped the largest
 * weights by several steps. Normal-range scales never change for qmax < 1024: (qmax + 0.5)(1 − 2^-11) > qmax.
 */
function float16Scale(scale: number, qmax?: number): number {
  let bits = toFloat16Bits(scale);
  if (bits === 0 || (qmax !== undefined && fromFloat16Bits(bits) * (qmax + 0.5) < scale * qmax)) bits++;
  const s = fromFloat16Bits(bits);
  return Number.isFinite(s) ? s : 65504;
}

/**
 * Weights of a float16 layer get float16 scales: the values are re-quantized with the scales rounded to float16,
 * so they are what QuantizeLinear makes with the scales the model stores.
 */
export function withFloat16Scales(q: QuantizedTensor, source: Float32Array, label: string): QuantizedTensor {
  if (q.channelBits) {
    throw new OnnxModelError(`Layer '${label}' has float16 weights, whose scales are float16: bit allocation is not supported for them. Drop bitAllocation.`);
  }
  const { qmax } = integerRange(q.bits, q.signed);
  const scale = Float32Array.from(q.scale, (s) => float16Scale(s, qmax));
  if (scale.every((s, i) => s === q.scale[i])) return q;
  return quantizeTensor(source, {
    shape: q.shape, bits: q.bits, scale,
    ...(q.granularity === 'block' ? { granularity: 'block' as const, axis: q.axis, blockSize: q.blockSize }
      : q.granularity === 'tensor' ? { granularity: 'tensor' as const } : { granularity: 'channel' as const, axis: q.axis }),
  });
}

/** Per output channel, std(a) / std(b) (1 where b has no spread). */
function stdRatios(a: Float32Array, b: Float32Array, dims: number[], axis: number): Float64Array {
  const channels = dims[axis];
  const inner = dims.slice(axis + 1).reduce((x, y) => x * y, 1);
  const n = a.length / channels;
  const stats = Array.from({ length: channels }, () => ({ sa: 0, sb: 0, qa: 0, qb: 0 }));
  for (let i = 0; i < a.length; i++) {
    const st = stats[Math.floor(i / inner) % channels];
    st.sa += a[i];
    st.sb += b[i];
    st.qa += a[i] * a[i];
    st.qb += b[i] * b[i];
  }
  return Float64Array.from(stats, (st) => {
    const va = st.qa / n - (st.sa / n) ** 2;
    const vb = st.qb / n - (st.sb / n) ** 2;
    return vb > 0 && va > 0 ? Math.sqrt(va / vb) : 1;
  });
}

/** Throws an OnnxModelError naming the layer and tensor when its weights hold NaN or ±Infinity. */
export function checkFiniteWeights(node: NodeProto, tensor: string, data: Float32Array): void {
  for (const _ of checkFiniteWeightsSteps(node, tensor, data, () => false));
}

/** Values of a large layer's weights scanned or copied between checks of the pause clock (2^18: 1 MiB). */
const PIECE_VALUES = 1 << 18;

/** checkFiniteWeights in pieces, pausing (yielding) between them when `pause` says so. */
function* checkFiniteWeightsSteps(node: NodeProto, tensor: string, data: Float32Array, pause: () => boolean): Generator<undefined, void, void> {
  for (let from = 0; from < data.length; from += PIECE_VALUES) {
    const to = Math.min(data.length, from + PIECE_VALUES);
    // A plain loop (findIndex with a callback took ~10 ns per weight); v - v is NaN exactly for NaN and ±Infinity.
    for (let i = from; i < to; i++) if (data[i] - data[i] !== 0) throw nonFiniteWeights(node, tensor, data, i);
    if (pause()) yield;
  }
}

/**
 * weightValues with its bytes read once; a float32 tensor whose bytes are not 4-byte aligned (no view possible) is
 * copied a piece at a time, pausing (yielding) between pieces when `pause` says so: filling 16 MiB of fresh memory
 * took 50-100 ms here.
 */
function* weightValuesSteps(t: TensorProto, pause: () => boolean): Generator<undefined, Float32Array, void> {
  if (!isFloatTensor(t)) return weightValues(t)!;
  const raw = t.rawData;  // read once: a lazily read tensor reads its file on every access
  if (raw.length === 0) return Float32Array.from(t.floatData);
  if (raw.byteOffset % 4 === 0) return new Float32Array(raw.buffer, raw.byteOffset, raw.length / 4);
  const out = new Float32Array(raw.length / 4);
  const bytes = new Uint8Array(out.buffer);
  for (let at = 0; at < raw.length; at += 4 * PIECE_VALUES) {
    bytes.set(raw.subarray(at, at + 4 * PIECE_VALUES), at);
    if (pause()) yield;
  }
  return out;
}

function nonFiniteWeights(node: NodeProto, tensor: string, data: Float32Array, at: number): OnnxModelError {
  return new OnnxModelError(`${node.opType} '${nodeLabel(node)}': its weights '${tensor}' hold ${data[at]} at index ${at}; quantized weights must be finite. ` +
    `Fix the weights (or, if a BatchNormalization was folded into this layer, its scale and variance), or leave the layer '${node.name || node.opType}' in float (options.keepFloat).`);
}

/** The Conv/Gemm/MatMul nodes with constant float weights of a shape this pass handles, minus keepFloat, in order. */
export function quantizableLayers(graph: Graph, keepFloat: string[] = [], order = graph.topologicalOrder()): NodeProto[] {
  const keep = new Set(keepFloat);
  return order.filter((n) => !keptFloat(keep, n) && isQuantizable(graph, n));
}

function isQuantizable(graph: Graph, n: NodeProto, scopes: GraphProto[] = []): boolean {
  return QUANTIZABLE.has(n.opType) && unquantizableReason(graph, n, scopes) === undefined;
}

/** Whether a value is a DequantizeLinear's output, directly or through Transpose/Reshape/Identity (as fit-onnxruntime leaves blocked weights). */
export function fromDequantizeLinear(graph: Graph, name: string, scopes: GraphProto[]): boolean {
  for (let steps = 0; steps < 8; steps++) {
    const producer = graph.producerIn(name, scopes)?.node;
    if (producer?.opType === 'DequantizeLinear') return true;
    if (!producer || !['Transpose', 'Reshape', 'Identity'].includes(producer.opType)) return false;
    name = producer.input[0];
  }
  return false;
}

/** Why a Conv/Gemm/MatMul's weights cannot be quantized (undefined: they can). `scopes`: see Graph.constantIn. */
export function unquantizableReason(graph: Graph, n: NodeProto, scopes: GraphProto[] = []): string | undefined {
  const isFloat = (t: TensorProto | undefined) => !!t && (isFloatTensor(t) || isFloat16Tensor(t));
  const w = graph.constantIn(n.input[1], scopes)?.tensor;
  if (!isFloat(w)) {
    if (fromDequantizeLinear(graph, n.input[1], scopes)) return 'its weight is already quantized (it comes from a DequantizeLinear)';
    if (w) return `its weight is a ${TensorProto_DataType[w.dataType] ?? `type ${w.dataType}`} constant, not float32 or float16`;
    if (n.opType !== 'Conv' && isFloat(graph.constantIn(n.input[0], scopes)?.tensor)) {
      return 'its constant is the first input (W·x): lowbit quantizes constant second inputs (x·W), the form the QDQ fusions and MatMulNBits take';
    }
    // A tied output projection reads its embedding table through a Transpose (fold-weight-chains folds it, unless
    // the table is a graph input's default).
    const producer = graph.producerIn(n.input[1], scopes)?.node;
    if (producer?.opType === 'Transpose' && isFloat(graph.constantIn(producer.input[0], scopes)?.tensor)) {
      return `its weight is a Transpose of the constant '${producer.input[0]}' (a tied embedding?), computed when the model runs: ` +
        'lowbit quantizes constant weights only; store the transposed weight as an initializer to quantize it';
    }
    return 'its weight is not a float constant (a computed input)';
  }
  const dims = dimsOf(w!);
  const axes = layout(n.opType, dims, transposes(n, 'transB'));
  // (quantizeTensor refuses such a tensor: scales for billions of channels and nothing to quantize.)
  if (axes && dims.includes(0) && dims[axes.outputAxis] > EMPTY_TENSOR_MAX_CHANNELS) {
    return `its weight [${dims.join(', ')}] has no values but ${dims[axes.outputAxis]} output channels: nothing to quantize, and a scale per channel would take gigabytes`;
  }
  if (axes) return undefined;
  const handled = n.opType === 'Conv' ? 'at least 3-D' : n.opType === 'Gemm' ? '2-D' : '2-D, or with leading dimensions of 1 ([1, K, N])';
  return `weight shape [${dims.join(', ')}] is not a ${n.opType} weight this pass handles (${handled})`;
}

/** quantizableLayers' counterpart inside subgraphs. */
export function quantizableSubgraphLayers(graph: Graph, keepFloat: string[] = [], inBodies = subgraphLayers(graph)): SubgraphLayer[] {
  const keep = new Set(keepFloat);
  return inBodies.filter((l) => !keptFloat(keep, l.node) && isQuantizable(graph, l.node, l.scopes));
}

/** Ops whose output tells only their input's shape: a layer read only through them feeds nothing with its values. */
const SHAPE_ONLY = new Set(['Shape', 'Size']);

/**
 * The edge layers (firstLastLayerBits) by data flow: the first layers are those no other quantizable layer feeds (its
 * values reach them through no chain of nodes), the last those that feed none. A chain has one of each; a stem of
 * parallel branches or a model with several heads has more. Inside a subgraph, a body's first (last) layer is one
 * when no main-graph layer feeds its node (is fed by it); a node holding quantizable layers counts as a layer.
 */
export function edgeLayers(graph: Graph, quantizable: readonly NodeProto[], quantizableInBodies: readonly SubgraphLayer[] = [],
  mainOrder = graph.topologicalOrder()): { first: Set<NodeProto>; last: Set<NodeProto>; isEdge: (n: NodeProto) => boolean } {
  const layers = new Set([...quantizable, ...quantizableInBodies.map((l) => l.owner)]);
  const readsOf = new Map(mainOrder.map((n) => [n, [...n.input, ...subgraphReads(n)].filter((v) => v !== '')]));
  const reads = (n: NodeProto) => readsOf.get(n)!;
  // Forward: the values a layer's values reach; backward: the values that reach a layer's.
  const fed = new Set<NodeProto>();
  const downstream = new Set<string>();
  for (const n of mainOrder) {
    const reached = reads(n).some((v) => downstream.has(v));
    if (reached) fed.add(n);
    if ((reached || layers.has(n)) && !SHAPE_ONLY.has(n.opType)) for (const v of n.output) if (v) downstream.add(v);
  }
  const feeding = new Set<NodeProto>();
  const upstream = new Set<string>();
  for (let i = mainOrder.length - 1; i >= 0; i--) {
    const n = mainOrder[i];
    const reaches = !SHAPE_ONLY.has(n.opType) && n.output.some((v) => upstream.has(v));
    if (reaches) feeding.add(n);
    if (reaches || layers.has(n)) for (const v of reads(n)) upstream.add(v);
  }
  const first = new Set(quantizable.filter((n) => !fed.has(n)));
  const last = new Set(quantizable.filter((n) => !feeding.has(n)));
  for (const body of new Set(quantizableInBodies.map((l) => l.scopes[l.scopes.length - 1]))) {
    const held = quantizableInBodies.filter((l) => l.scopes[l.scopes.length - 1] === body);
    if (!fed.has(held[0].owner)) first.add(held[0].node);
    if (!feeding.has(held[0].owner)) last.add(held[held.length - 1].node);
  }
  return { first, last, isEdge: (n) => first.has(n) || last.has(n) };
}

/** A Conv/Gemm/MatMul inside a subgraph (see subgraphNodes). */
export type SubgraphLayer = ReturnType<typeof subgraphNodes>[number];

/** The Conv/Gemm/MatMul nodes inside subgraphs, each body's in order. */
export function subgraphLayers(graph: Graph): SubgraphLayer[] {
  return subgraphNodes(graph).filter((l) => QUANTIZABLE.has(l.node.opType));
}

/** What a layer's weights meet in its input, for gathering its input moments during calibration. */
export function layerInput(graph: Graph, node: NodeProto, scopes: GraphProto[] = []): LayerInput {
  const dims = dimsOf(graph.constantIn(node.input[1], scopes)!.tensor);
  if (node.opType === 'Conv') return { kind: 'conv', node, weightDims: dims };
  return { kind: 'matrix', columns: transposes(node, 'transB') ? dims[1] : dims[dims.length - 2], transposed: transposes(node, 'transA') };
}

/** The weight tensor as a [rows = outputs, columns = what one output meets] matrix (GPTQ, bias correction). */
export function matrixView(node: NodeProto, dims: number[], outputAxis: number): WeightMatrixView {
  if (node.opType === 'Conv') {
    const columns = dims.slice(1).reduce((a, b) => a * b, 1);
    return { rows: dims[0], columns, rowStride: columns, columnStride: 1, rowsPerGram: dims[0] / intAttribute(node, 'group', 1) };
  }
  if (outputAxis === 0) return { rows: dims[0], columns: dims[1], rowStride: dims[1], columnStride: 1, rowsPerGram: dims[0] };
  const [k, n] = dims.slice(-2);  // [.., K, N] with leading ones (see layout)
  return { rows: n, columns: k, rowStride: 1, columnStride: n, rowsPerGram: n };
}

export interface WeightQuantizationResult {
  report: PassReport;
  layers: WeightLayerReport[];
  weights: QuantizedWeights[];
  /** Each quantized layer's entry in `layers` (names can repeat across subgraphs: sibling If branches may reuse them). */
  layerOf: Map<NodeProto, WeightLayerReport>;
}

export function quantizeWeights(graph: Graph, options: WeightQuantization): WeightQuantizationResult {
  return runSteps(quantizeWeightsByLayer(graph, options));
}

/** quantizeWeights in steps: yields after each layer (see runStepsAsync). */
export function* quantizeWeightsByLayer(graph: Graph, options: WeightQuantization): Steps<WeightQuantizationResult> {
  const report: PassReport = { pass: 'quantize-weights', changed: [], skipped: [] };
  const layers: WeightLayerReport[] = [];
  const layerOf = new Map<NodeProto, WeightLayerReport>();
  const weights: QuantizedWeights[] = [];
  const keep = new Set(options.keepFloat ?? []);
  // Layers inside subgraphs get their weights quantized (the DequantizeLinear next to them, in their body); their
  // inputs are quantize-model's business (calibrated in the main graph's If branches, dynamic anywhere).
  const inBodies = subgraphLayers(graph);
  const quantizableInBodies = quantizableSubgraphLayers(graph, options.keepFloat, inBodies);
  const bodyOf = new Map(inBodies.map((l) => [l.node, l]));
  const recurrent = options.recurrent ?? [];
  const recurrentHeld = new Set(recurrent.filter((l) => l.owner && l.reason === undefined).map((l) => l.owner));
  for (const n of graph.graph.node) {
    if (!hasSubgraphs(n)) continue;
    const held = quantizableInBodies.some((l) => l.owner === n);
    const what = held && recurrentHeld.has(n) ? 'Conv, Gemm, MatMul and recurrent (LSTM, GRU, RNN) layers'
      : held ? 'Conv, Gemm and MatMul layers' : 'recurrent (LSTM, GRU, RNN) layers';
    report.skipped.push({ node: nodeLabel(n), reason: held || recurrentHeld.has(n)
      ? `${n.opType} has subgraphs: the weights of their ${what} are quantized, the rest stays in float`
      : `${n.opType} has subgraphs; they are left in float` });
  }
  const mainOrder = graph.topologicalOrder();
  const mainCandidates = mainOrder.filter((n) => QUANTIZABLE.has(n.opType));
  const candidates = [...mainCandidates, ...inBodies.map((l) => l.node)];
  // A keepFloat entry that keeps nothing is most likely misspelled: say so rather than quantize the layer silently.
  const tables = options.gather ? [...mainOrder, ...subgraphNodes(graph).map((l) => l.node)].filter((n) => n.opType === 'Gather') : [];
  const named = [...candidates, ...tables, ...recurrent.map((l) => l.node)];
  for (const entry of keep) {
    const only = new Set([entry]);
    if (named.some((n) => keptFloat(only, n))) continue;
    const close = closestName(entry, [...new Set(named.flatMap((n) => [nodeLabel(n), n.opType]))]);
    const kinds = `${recurrent.length ? 'Conv, Gemm, MatMul, LSTM, GRU or RNN' : 'Conv, Gemm or MatMul'} layer${options.gather ? ' or Gather' : ''}`;
    report.skipped.push({
      node: entry, reason: `keepFloat: no ${kinds} of this model has this name or op type${close ? ` (did you mean '${close}'?)` : ''}; it keeps nothing`,
    });
  }
  const quantizable = quantizableLayers(graph, options.keepFloat, mainCandidates);
  const { isEdge } = edgeLayers(graph, quantizable, quantizableInBodies, mainOrder);
  // Weights read by several layers (ALBERT-style shared layers) are quantized once and their DequantizeLinear shared
  // when the layers would quantize them alike (same layout and bits, no per-layer GPTQ rounding).
  const quantizedOnce = new Map<TensorProto, {
    how: string; dq: NodeProto; constants: TensorProto[]; scope: GraphProto; layer: WeightLayerReport; weights: QuantizedWeights;
  }>();
  // Float weights the layers no longer read, per graph that holds them: removed at the end, once unused (a
  // removal per layer would walk every subgraph of the main graph per layer).
  const replaced = new Map<GraphProto, string[]>();
  const release = (name: string, home: GraphProto) => (replaced.get(home) ?? replaced.set(home, []).get(home)!).push(name);
  // The DequantizeLinear goes next to the layer: in the main graph (sorted at the end), or in its body, in place.
  const place = (dq: NodeProto, node: NodeProto, scope: GraphProto) => {
    if (scope === graph.graph) scope.node.push(dq);
    else graph.insertBefore(scope, node, dq);
  };
  for (const node of candidates) {
    const label = nodeLabel(node);
    const inBody = bodyOf.get(node);
    const where = inBody ? placeOf(inBody.owner, inBody.scopes) : {};
    if (keptFloat(keep, node)) {
      report.skipped.push({ node: label, reason: 'kept in float (keepFloat)' });
      continue;
    }
    const unquantizable = unquantizableReason(graph, node, inBody?.scopes);
    if (unquantizable) {
      report.skipped.push({ node: label, reason: unquantizable });
      continue;
    }
    const found = graph.constantIn(node.input[1], inBody?.scopes)!;
    const w = found.tensor;
    // The float weight leaves the graph that holds it once unused. The quantized constants go into the layer's own
    // graph: onnxruntime 1.30 fails to load a model whose subgraph DequantizeLinear reads an enclosing graph's
    // initializer (its MatMulNBits fusion looks for the weight in the subgraph), so a weight shared by two branches
    // is stored in each.
    const home = found.home ?? graph.graph;
    const scope = inBody?.scopes[0] ?? graph.graph;
    const dims = dimsOf(w);
    const axes = layout(node.opType, dims, transposes(node, 'transB'))!;
    const edge = isEdge(node);
    const base = node.input[1];
    // What decides the quantized values besides the weights (the first and last layers' bits, no bit allocation there).
    const how = JSON.stringify([node.opType === 'Conv' ? 'conv' : 'matrix', axes, edge && options.firstLastLayerBits ? options.firstLastLayerBits : options.bits,
      !!options.bitAllocation && !edge]);
    const earlier = quantizedOnce.get(w);
    // GPTQ's input statistics: for main-graph layers and those in the main graph's If branches (see calibrate).
    const moments = options.rounding === 'gptq' ? options.moments?.get(node) : undefined;
    const ownRounding = (moments?.count ?? 0) > 0;
    if (earlier && earlier.how === how && !ownRounding) {
      if (earlier.scope === scope) {
        node.input[1] = earlier.dq.output[0];
      } else {
        // Another graph holds the first DequantizeLinear: one more here, with copies of its constants (sharing their bytes).
        const copies = graph.copyConstants(earlier.constants, scope);
        // Fresh attributes: a later pass (fit-onnxruntime) may change the first node's in place.
        const attributes = earlier.dq.attribute.map((a) => makeIntAttribute(a.name, Number(a.i)));
        const dq = graph.newNode('DequantizeLinear', copies.map((t) => t.name), [graph.uniqueName(`${base}_dequantized`)], `${label}_weight_dq`, attributes, earlier.dq.domain);
        place(dq, node, scope);
        node.input[1] = dq.output[0];
      }
      release(base, home);
      const shared = { ...earlier.layer, node: label, output: node.output[0], ...where };
      layers.push(shared);
      layerOf.set(node, shared);
      if (!inBody) weights.push({ ...earlier.weights, node: label });
      report.changed.push(`${label}: shares the quantized weights of ${earlier.layer.node}`);
      yield label;
      continue;
    }
    const reading = options.async ? readLazyTensor(w) : undefined;
    if (reading) yield reading;
    // Read-only: the passes below make new arrays. (A large layer is copied and scanned with pauses.)
    const pause = options.async ? pauseClock() : () => false;
    const data = yield* weightValuesSteps(w, pause);
    const half = w.dataType === TensorProto_DataType.FLOAT16;
    yield* checkFiniteWeightsSteps(node, w.name, data, pause);
    const bits = edge && options.firstLastLayerBits ? options.firstLastLayerBits : options.bits;
    // The width of the values: at most 7 bits (in int8 storage) with reduceRange.
    const widest = reducedRangeBits(8, !!options.reduceRange);
    const valueBits = reducedRangeBits(bits, !!options.reduceRange);
    const blocked = options.granularity === 'block' && dims[axes.reductionAxis] >= (options.blockSize ?? 32);
    const perTensor = options.granularity === 'tensor';
    const allocate = options.bitAllocation && !blocked && !perTensor && !edge && dims[axes.outputAxis] > 1;
    const grouped = !!options.groups && !blocked && !perTensor && !allocate && dims[axes.outputAxis] % options.groups === 0;
    if (options.groups && !grouped) {
      // (Per-tensor weights with groups are refused up front.)
      const why = blocked ? 'its weights are quantized in blocks' : allocate ? 'bit allocation gives its channels their bits'
        : `its ${dims[axes.outputAxis]} output channels do not divide into ${options.groups} groups; quantized per channel`;
      report.skipped.push({ node: label, reason: `groups: ${why}` });
    }
    // Both work on whole output channels, and blocks have scales of their own (a layer whose reduction axis is shorter
    // than a block is quantized per channel and takes them). Bit allocation leaves the first and last layers anyway.
    if (options.bitAllocation && blocked && !edge) report.skipped.push({ node: label, reason: 'bitAllocation: its weights are quantized in blocks (bit allocation gives whole output channels their widths)' });
    if (options.momentCorrection && blocked) report.skipped.push({ node: label, reason: 'biasCorrection: its weights are quantized in blocks (the correction rescales whole output channels)' });
    let source = data;
    if (options.scaleClipK !== undefined) {
      source = scaleClip(data, { k: options.scaleClipK, shape: dims, axis: axes.outputAxis, groups: grouped ? options.groups : 1 }).clipped;
    }
    // Only the weights themselves may be views of the caller's bytes (a Scale-Clip result is lowbit's own).
    const callerView = !!options.callerBytes && source === data;
    let q: QuantizedTensor;
    if (grouped) {
      const g = yield* quantized(source, { shape: dims, bits: valueBits, method: 'mse', norm: 1, granularity: 'group', groups: options.groups!, axis: axes.outputAxis },
        !!options.async, callerView);
      // One scale per channel (each group's, repeated): the DequantizeLinear form of folding group scales into BN.
      const channels = dims[axes.outputAxis];
      const per = channels / options.groups!;
      q = {
        ...g, granularity: 'channel', axis: axes.outputAxis, scaleShape: [channels], groups: undefined,
        scale: Float32Array.from({ length: channels }, (_, c) => g.scale[Math.floor(c / per)]),
        zeroPoint: Int32Array.from({ length: channels }, (_, c) => g.zeroPoint[Math.floor(c / per)]),
      };
      delete q.groups;
    } else {
      q = yield* quantized(source, {
        shape: dims, bits: allocate ? widest : valueBits, method: options.method,
        ...(blocked
          ? { granularity: 'block' as const, axis: axes.reductionAxis, blockSize: options.blockSize ?? 32 }
          : perTensor ? { granularity: 'tensor' as const } : { granularity: 'channel' as const, axis: axes.outputAxis }),
        ...(allocate ? { bitAllocation: { averageBits: options.bitAllocation!.averageBits, maxBits: widest } } : {}),
      }, !!options.async, callerView);
    }
    if (half) q = withFloat16Scales(q, source, label);
    const taps = node.opType === 'Conv' ? dims.slice(2).reduce((a, b) => a * b, 1) : 1;
    if (options.rounding === 'sum-preserving' && taps > 1) q = preserveRunSums(q, source, taps);
    const measured = !!moments && moments.count > 0;
    const finite = measured && moments!.finite;
    const gptq = measured && moments!.grams.length > 0 && finite;
    let underdetermined: WeightLayerReport['gptqUnderdetermined'];
    if (options.rounding === 'gptq') {
      if (gptq) {
        const view = matrixView(node, dims, axes.outputAxis);
        q = yield* gptqRoundSteps(q, source, moments!.grams, view);
        // GPTQ solves blocks of at most 512 inputs on their own; fewer input vectors than a block's inputs leave its
        // H rank-deficient, and the rounding then fits those vectors.
        const block = Math.max(...moments!.grams[0].map((b) => b.size));
        if (moments!.count < block) {
          underdetermined = { inputVectors: moments!.count, blockInputs: block };
          report.changed.push(`${label}: GPTQ rounding from ${moments!.count} calibration input vectors for ` +
            `${block === view.columns ? 'its' : 'blocks of'} ${block} inputs; it may do worse than rounding to nearest on other data: calibrate on more`);
        }
      } else report.skipped.push({ node: label, reason: `${measured && !finite ? NON_FINITE_INPUT
        : !inBody ? 'no input statistics for it (a constant input, a 3-D convolution or no calibration data)'
        : moments ? `its branch of ${nodeLabel(inBody.owner)} gave it no inputs on any calibration batch (the branch did not run)`
          : 'no input statistics for it (inside a Loop or Scan body or a nested subgraph, whose values calibration cannot observe; a constant input; or a 3-D convolution)'}: rounded to nearest, not GPTQ` });
    }
    if (q.bits < 8) q.bits = q.bits <= 2 ? 2 : q.bits <= 4 ? 4 : 8;  // the storage type (mixed channel bits, reduced range)
    if (options.momentCorrection && !blocked) {
      // ξ_c = std(W_c) / std(Ŵ_c): scaling channel c's scale (zero point 0) scales Ŵ_c's spread by ξ_c (and its mean too:
      // the scale is all the codes can change; the mean shift is the data-driven bias correction's).
      const ratios = stdRatios(source, dequantize(q), dims, axes.outputAxis);
      q.scale = Float32Array.from(q.scale, (s, c) => s * ratios[c]);
      if (half) q.scale = Float32Array.from(q.scale, (s) => float16Scale(s));  // what the model stores (the values stay: nothing to clip)
    }
    const valuesName = graph.uniqueName(`${base}_quantized`);
    const scaleName = graph.uniqueName(`${base}_scale`);
    const dqOut = graph.uniqueName(`${base}_dequantized`);
    const valuesConstant = valuesTensor(valuesName, q);
    graph.addInitializer(valuesConstant, scope);
    const scaleBytes = half ? new Uint8Array(toFloat16Array(q.scale).buffer) : new Uint8Array(q.scale.buffer.slice(0));
    // A float16 scale makes DequantizeLinear output float16, the type the layer's other input has.
    const scaleTensor = makeTensor(scaleName, half ? TensorProto_DataType.FLOAT16 : TensorProto_DataType.FLOAT, q.scaleShape, scaleBytes);
    graph.addInitializer(scaleTensor, scope);
    const attrs = perTensor ? [] : [makeIntAttribute('axis', q.axis!)];
    if (blocked) attrs.push(makeIntAttribute('block_size', q.blockSize!));
    const dq = graph.newNode('DequantizeLinear', [valuesName, scaleName], [dqOut], `${label}_weight_dq`, attrs, options.microsoftDomain ? 'com.microsoft' : '');
    place(dq, node, scope);
    node.input[1] = dqOut;
    release(base, home);
    if (pause()) yield;  // the error statistics of a large layer take a while too
    const layer: WeightLayerReport = {
      node: label, op: node.opType, weight: base, shape: dims, bits: q.channelBits ? q.bits : bits,
      granularity: blocked ? `block ${q.blockSize} on axis ${q.axis}` : grouped ? `${options.groups} groups on axis ${q.axis}`
        : perTensor ? 'tensor' : `channel on axis ${q.axis}`,
      method: `${grouped ? 'mse (L1)' : options.method}${gptq ? ', gptq rounding' : options.rounding === 'sum-preserving' && taps > 1 ? ', sum-preserving rounding' : ''}` +
        (valueBits !== bits ? ', reduced range (7-bit values)' : ''),
      weightSqnrDb: quantizationError(data, q).sqnrDb,
      ...(q.channelBits ? { channelBits: Array.from(q.channelBits) } : {}),
      ...(underdetermined ? { gptqUnderdetermined: underdetermined } : {}),
      output: node.output[0],
      ...where,
    };
    // What bias correction, int32 biases and shift compensation need: main-graph layers only.
    const kept = !inBody && (options.keepValues === true || (options.keepValues && options.keepValues.has(label)));
    const entry: QuantizedWeights = {
      node: label, shape: dims, outputAxis: axes.outputAxis, ...(kept ? { original: data, dequantized: dequantize(q) } : {}),
      ...(blocked ? {} : { channelScales: perTensor ? new Float32Array(dims[axes.outputAxis]).fill(q.scale[0]) : q.scale }),
    };
    if (!inBody) weights.push(entry);
    layers.push(layer);
    layerOf.set(node, layer);
    if (!gptq) quantizedOnce.set(w, { how, dq, constants: [valuesConstant, scaleTensor], scope, layer, weights: entry });
    report.changed.push(`${label}: ${bits}-bit ${layer.granularity}`);
    unloadTensor(w);  // a weight read from its file goes back there: the float model is not kept in memory to the end
    yield label;
  }
  for (const [home, names] of replaced) graph.removeAllUnused(names, home);
  graph.sort();
  return { report, layers, weights, layerOf };
}
