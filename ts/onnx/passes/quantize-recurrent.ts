/**
 * Quantized recurrent weights: the input weights W and recurrence weights R of LSTM, GRU and RNN nodes (inside
 * subgraph bodies too) become integer constants read through a DequantizeLinear, as the Conv/Gemm/MatMul weights
 * do (weight-only: the recurrence itself runs in float; what shrinks is the model and the weights' memory).
 * W is [directions, gates·hidden, inputs] and R [directions, gates·hidden, hidden]: one scale per gate row (axis 1,
 * shared by the two directions of a bidirectional layer), or blocks along the row (axis 2), or one scale a tensor;
 * symmetric, zero point 0. B, the initial states and peepholes stay float. With dynamic activations, float32 LSTMs
 * with layout 0 become com.microsoft DynamicQuantizeLSTM instead: int8 weights per direction and gate row (or per
 * direction), stored transposed, inputs and states quantized on every step.
 */
import { TensorProto_DataType, type GraphProto, type NodeProto, type TensorProto } from 'onnx-buf';

import { toFloat16Array } from '../../float16';
import { quantizationError } from '../../quantize';
import type { QuantizedTensor } from '../../quant-params';
import { allNodes, dimsOf, intAttribute, isFloat16Tensor, isFloatTensor, isOnnxDomain, makeIntAttribute, makeTensor, ownedTensor, weightValues, type Graph } from '../graph';
import { readLazyTensor, unloadTensor } from '../model-io';
import { keptFloat, nodeLabel, placeOf, type PassReport, type Steps } from './pass';
import type { WeightFormat } from './quantize-gather';
import { checkFiniteWeights, fromDequantizeLinear, quantized, valuesTensor, withFloat16Scales, type WeightLayerReport } from './quantize-weights';

export const RECURRENT = new Set(['LSTM', 'GRU', 'RNN']);

/** recurrentLayers' reason for a node named in keepFloat. */
export const KEPT_FLOAT = 'kept in float (keepFloat)';

/** The weight inputs of a recurrent node, by position. */
export const WEIGHT_INPUTS = [[1, 'W'], [2, 'R']] as const;

export interface RecurrentQuantization extends WeightFormat {
  /** Use com.microsoft DequantizeLinear (old opsets onnxruntime still accepts; int8 only). */
  microsoftDomain?: boolean;
  /**
   * Dynamic activations (`activations.method: 'dynamic'`): 8-bit float32 LSTMs become onnxruntime's com.microsoft
   * DynamicQuantizeLSTM (int8 weights, inputs and states quantized on every step), as its quantize_dynamic makes
   * them; GRU and RNN, and LSTMs it does not take, keep the DequantizeLinear form.
   */
  dynamic?: boolean;
}

type Candidate = ReturnType<typeof allNodes>[number];

/** The LSTM, GRU and RNN nodes (the main graph's in order, then those in bodies) and why each would stay float (undefined: it would not). */
export function recurrentLayers(graph: Graph, keepFloat: string[] = []): Array<Candidate & { reason?: string }> {
  const keep = new Set(keepFloat);
  return allNodes(graph).filter(({ node }) => RECURRENT.has(node.opType) && isOnnxDomain(node.domain))
    .map((c) => ({ ...c, reason: keptFloat(keep, c.node) ? KEPT_FLOAT : whyNot(graph, c.node, c.scopes) }));
}

function whyNot(graph: Graph, node: NodeProto, scopes: GraphProto[]): string | undefined {
  if (node.output.every((o) => o === '')) return 'it has no outputs';
  for (const [index, role] of WEIGHT_INPUTS) {
    const t = node.input[index] ? graph.constantIn(node.input[index], scopes)?.tensor : undefined;
    if (!t && fromDequantizeLinear(graph, node.input[index], scopes)) return `its ${role} is already quantized (it comes from a DequantizeLinear)`;
    if (!t) return `its ${role} is computed when the model runs (not from constants that lowbit folds: see the fold-weight-chains pass); store it as an initializer to quantize it`;
    if (!(isFloatTensor(t) || isFloat16Tensor(t))) return `its ${role} is a ${TensorProto_DataType[t.dataType] ?? `type ${t.dataType}`} constant, not float32 or float16`;
    const dims = dimsOf(t);
    if (dims.length !== 3) return `its ${role} is ${dims.length}-D, not [directions, gates·hidden, ${role === 'W' ? 'inputs' : 'hidden'}]`;
    if (dims.includes(0)) return `its ${role} [${dims.join(', ')}] holds no values`;
  }
  return undefined;
}

/** What quantizing one float weight left: how its readers read it now (`use`), and its error. */
interface QuantizedWeight<Use> {
  use: Use;
  granularity: string;
  signal: number;
  noise: number;
}

/** One weight of one node, as quantized (or found quantized already, for a weight several nodes read). */
type WeightPart<Use> = QuantizedWeight<Use> & { name: string; dims: number[] };

/**
 * W and R of a node, each quantized once (by `quantize`, on its float values) however many nodes read it: the
 * constants it makes go beside the float weight, in the graph holding it, which is released once unused.
 */
function* nodeWeights<Use>(graph: Graph, node: NodeProto, scopes: GraphProto[], done: Map<TensorProto, QuantizedWeight<Use>>,
  released: Map<GraphProto, Set<string>>,
  quantize: (data: Float32Array, t: TensorProto, name: string, home: GraphProto) => Steps<Omit<QuantizedWeight<Use>, 'signal'>>): Steps<[WeightPart<Use>, WeightPart<Use>]> {
  const parts: Array<WeightPart<Use>> = [];
  for (const [index] of WEIGHT_INPUTS) {
    const name = node.input[index];
    const found = graph.constantIn(name, scopes)!;
    const t = found.tensor;
    const home = found.home ?? graph.graph;
    let entry = done.get(t);
    if (!entry) {
      const reading = readLazyTensor(t);
      if (reading) yield reading;
      const data = weightValues(t)!;
      checkFiniteWeights(node, name, data);
      let signal = 0;
      for (let i = 0; i < data.length; i++) signal += data[i] * data[i];
      entry = { ...(yield* quantize(data, t, name, home)), signal };
      done.set(t, entry);
      unloadTensor(t);  // a weight read from its file goes back there
    }
    (released.get(home) ?? released.set(home, new Set()).get(home)!).add(name);
    parts.push({ ...entry, name, dims: dimsOf(t) });
  }
  return parts as [WeightPart<Use>, WeightPart<Use>];
}

const sqnrDb = (signal: number, noise: number) => (noise === 0 ? Infinity : 10 * Math.log10(signal / noise));

/** The layer's report: W's name, shape and granularity, R's in recurrentWeight, the SQNR of both together. */
function layerReport(node: NodeProto, scopes: GraphProto[], owner: NodeProto | undefined, options: RecurrentQuantization,
  [w, r]: [WeightPart<unknown>, WeightPart<unknown>]): WeightLayerReport {
  return {
    node: nodeLabel(node), op: node.opType, weight: w.name, shape: w.dims, bits: options.bits, granularity: w.granularity, method: options.method ?? 'minmax',
    weightSqnrDb: sqnrDb(w.signal + r.signal, w.noise + r.noise),
    recurrentWeight: { weight: r.name, shape: r.dims, granularity: r.granularity, weightSqnrDb: sqnrDb(r.signal, r.noise) },
    // Y, or Y_h where Y is left out (an optional output may be '').
    output: node.output.find((o) => o !== '')!,
    ...(owner ? placeOf(owner, scopes) : {}),
  };
}

export function* quantizeRecurrent(graph: Graph, options: RecurrentQuantization): Steps<{ report: PassReport; layers: WeightLayerReport[] }> {
  const report: PassReport = { pass: 'quantize-recurrent', changed: [], skipped: [] };
  const layers: WeightLayerReport[] = [];
  // A weight several nodes read (one cell applied in two bodies, or in both branches of an If) is quantized once,
  // and its constants (and DequantizeLinear) go next to it, in the graph holding it: the readers inside bodies read
  // them from there. (Layers' weights get theirs in their own graph, for onnxruntime's fusions; the recurrent ops have none.)
  const dequantizedByTensor = new Map<TensorProto, QuantizedWeight<string>>();
  const dynamicByTensor = new Map<TensorProto, QuantizedWeight<DynamicConstants>>();
  const released = new Map<GraphProto, Set<string>>();
  for (const { node, scopes, owner, reason } of recurrentLayers(graph, options.keepFloat)) {
    const label = nodeLabel(node);
    if (reason) {
      report.skipped.push({ node: label, reason });
      continue;
    }
    const notDynamic = options.dynamic ? whyNotDynamic(graph, node, scopes) : undefined;
    if (options.dynamic && notDynamic === undefined) {
      const parts = yield* nodeWeights(graph, node, scopes, dynamicByTensor, released, (data, t, name, home) => dynamicLstmWeight(graph, data, t, name, home, options));
      layers.push({ ...layerReport(node, scopes, owner, options, parts), input: { bits: 8, dynamic: true } });
      toDynamicLstm(graph, node, parts.map((p) => p.use) as [DynamicConstants, DynamicConstants]);
      report.changed.push(`${label}: DynamicQuantizeLSTM (int8 W and R, ${parts[0].granularity}; inputs and states quantized on every step)`);
      yield label;
      continue;
    }
    if (notDynamic) report.skipped.push({ node: label, reason: `dynamic activations: ${notDynamic}; weights only (DequantizeLinear)` });
    const parts = yield* nodeWeights(graph, node, scopes, dequantizedByTensor, released, (data, t, name, home) => dequantizedWeight(graph, data, t, name, home, options, label));
    WEIGHT_INPUTS.forEach(([index], i) => (node.input[index] = parts[i].use));
    layers.push(layerReport(node, scopes, owner, options, parts));
    report.changed.push(`${label}: ${options.bits}-bit W (${parts[0].granularity}) and R (${parts[1].granularity})`);
    yield label;
  }
  for (const [home, names] of released) graph.removeAllUnused(names, home);
  graph.sort();
  return { report, layers };
}

/** A weight's integer values and scale, read through a DequantizeLinear placed in `home`; `use`: its output. */
function* dequantizedWeight(graph: Graph, data: Float32Array, t: TensorProto, name: string, home: GraphProto, options: RecurrentQuantization,
  label: string): Steps<Omit<QuantizedWeight<string>, 'signal'>> {
  const dims = dimsOf(t);
  const blockSize = options.blockSize ?? 32;
  const blocked = options.granularity === 'block' && dims[2] >= blockSize;
  let q: QuantizedTensor = yield* quantized(data, {
    shape: dims, bits: options.bits, method: options.method,
    ...(blocked ? { granularity: 'block' as const, axis: 2, blockSize }
      : options.granularity === 'tensor' ? { granularity: 'tensor' as const } : { granularity: 'channel' as const, axis: 1 }),
  }, true, !!options.callerBytes);
  const half = isFloat16Tensor(t);
  // A float16 weight gets float16 scales: DequantizeLinear then gives float16, the type of the node's other inputs.
  if (half) q = withFloat16Scales(q, data, label);
  const values = valuesTensor(graph.uniqueName(`${name}_quantized`), q);
  const scaleBytes = half ? new Uint8Array(toFloat16Array(q.scale).buffer) : new Uint8Array(q.scale.buffer.slice(0));
  const scale = makeTensor(graph.uniqueName(`${name}_scale`), half ? TensorProto_DataType.FLOAT16 : TensorProto_DataType.FLOAT, q.scaleShape, scaleBytes);
  graph.addInitializer(values, home);
  graph.addInitializer(scale, home);
  const attributes = q.granularity === 'tensor' ? [] : [makeIntAttribute('axis', q.axis!), ...(blocked ? [makeIntAttribute('block_size', blockSize)] : [])];
  const dq = graph.newNode('DequantizeLinear', [values.name, scale.name], [graph.uniqueName(`${name}_dequantized`)], `${name}_dq`,
    attributes, options.microsoftDomain ? 'com.microsoft' : '');
  // It reads constants only: first in a body, anywhere in the main graph (sorted at the end).
  if (home === graph.graph) home.node.push(dq);
  else home.node.unshift(dq);
  return {
    use: dq.output[0], noise: quantizationError(data, q).mse * data.length,
    granularity: q.granularity === 'tensor' ? 'tensor' : blocked ? `block ${blockSize} on axis 2` : 'channel on axis 1',
  };
}

/** A weight's DynamicQuantizeLSTM constants: values [directions, K, 4·hidden], scale and zero point. */
type DynamicConstants = [string, string, string];

/**
 * Why an LSTM stays in the DequantizeLinear form with dynamic activations (undefined: it becomes DynamicQuantizeLSTM).
 * (quantizeModel refuses dynamic activations with other than 8-bit weights per channel or tensor, or at an old opset.)
 */
function whyNotDynamic(graph: Graph, node: NodeProto, scopes: GraphProto[]): string | undefined {
  if (node.opType !== 'LSTM') return `onnxruntime has no dynamically quantized ${node.opType}`;
  if (intAttribute(node, 'layout', 0) !== 0) return 'its layout is 1 (batch first), which DynamicQuantizeLSTM does not take';
  const w = graph.constantIn(node.input[1], scopes)!.tensor;
  if (isFloat16Tensor(w)) return 'its weights are float16 (DynamicQuantizeLSTM is float32)';
  return undefined;
}

/**
 * A weight as DynamicQuantizeLSTM takes it: quantized per direction and gate row (or per direction), stored transposed
 * ([directions, inputs, 4·hidden]), with int8 zero points of 0, in `home`.
 */
function* dynamicLstmWeight(graph: Graph, data: Float32Array, t: TensorProto, name: string, home: GraphProto,
  options: RecurrentQuantization): Steps<Omit<QuantizedWeight<DynamicConstants>, 'signal'>> {
  const [directions, rows, k] = dimsOf(t);
  const perTensor = options.granularity === 'tensor';
  // Rows of one direction are contiguous: per direction and row is one channel of a [directions·rows, k] matrix,
  // per direction one channel of a [directions, rows·k] one.
  const q = yield* quantized(data, {
    shape: perTensor ? [directions, rows * k] : [directions * rows, k], bits: 8, method: options.method, granularity: 'channel', axis: 0,
  }, true, !!options.callerBytes);
  const transposed = new Int8Array(data.length);
  for (let d = 0; d < directions; d++) {
    for (let r = 0; r < rows; r++) for (let c = 0; c < k; c++) transposed[(d * k + c) * rows + r] = q.values[(d * rows + r) * k + c];
  }
  const scaleDims = perTensor ? [directions] : [directions, rows];
  const values = ownedTensor(graph.uniqueName(`${name}_quantized`), TensorProto_DataType.INT8, [directions, k, rows], new Uint8Array(transposed.buffer));
  const scale = makeTensor(graph.uniqueName(`${name}_scale`), TensorProto_DataType.FLOAT, scaleDims, new Uint8Array(q.scale.buffer.slice(0)));
  const zeroPoint = ownedTensor(graph.uniqueName(`${name}_zero_point`), TensorProto_DataType.INT8, scaleDims, new Uint8Array(q.scale.length));
  for (const c of [values, scale, zeroPoint]) graph.addInitializer(c, home);
  return {
    use: [values.name, scale.name, zeroPoint.name], noise: quantizationError(data, q).mse * data.length,
    granularity: perTensor ? 'tensor per direction' : 'channel on axis 1 per direction',
  };
}

/** The LSTM becomes a DynamicQuantizeLSTM in place, on W's and R's constants; its other inputs and attributes kept. */
function toDynamicLstm(graph: Graph, node: NodeProto, [w, r]: [DynamicConstants, DynamicConstants]): void {
  const optional = Array.from({ length: 5 }, (_, i) => node.input[3 + i] ?? '');  // B, sequence_lens, initial_h, initial_c, P
  node.input = [node.input[0], w[0], r[0], ...optional, w[1], w[2], r[1], r[2]];
  node.opType = 'DynamicQuantizeLSTM';
  node.domain = 'com.microsoft';
  node.attribute = node.attribute.filter((a) => a.name !== 'layout');
  graph.importDomain('com.microsoft');
}
