/**
 * Inserts QuantizeLinear → DequantizeLinear (per tensor) on the activation
 * inputs of the quantized layers, with scales and zero points from the
 * calibrated ranges (the native paramsFromRanges, as for weights). Unsigned
 * activations are asymmetric (uint16/uint8/uint4 with a zero point); signed ones are
 * symmetric (int16/int8/int4, zero point 0). 4- and 16-bit types need opset 21.
 * A float16 tensor gets a float16 scale (opset 19), rounded up so the calibrated range stays inside the grid.
 */
import { TensorProto_DataType, type GraphProto, type NodeProto } from 'onnx-buf';

import { fromFloat16Bits, toFloat16Array, toFloat16Bits } from '../../float16';
import { native } from '../../native';
import { integerRange, tensorLayout } from '../../quant-params';
import { makeTensor, type Graph } from '../graph';
import { nodeLabel, type PassReport } from './pass';

export interface ActivationLayerReport {
  tensor: string;
  bits: number;
  signed: boolean;
  range: [number, number];
  scale: number;
  zeroPoint: number;
  /** A float16 tensor, whose scale is float16. */
  float16?: true;
  /** The node whose subgraph holds the quantizer, and which of its subgraphs (then_branch or else_branch). */
  subgraph?: string;
  branch?: string;
}

/** A tensor's calibrated range, the width of its integers, and whether it is float16. */
export interface ActivationRange { lo: number; hi: number; bits: number; float16?: boolean }

/** The smallest float16 value at least `scale` (and above zero): a wider grid never cuts the calibrated range. */
function float16ScaleAtLeast(scale: number): number {
  let bits = toFloat16Bits(scale);
  if (fromFloat16Bits(bits) < scale || bits === 0) bits++;
  if (!Number.isFinite(fromFloat16Bits(bits))) {
    throw new RangeError(`An activation scale of ${scale} does not fit in float16 (at most 65504): the calibrated range is too wide for a float16 model.`);
  }
  return fromFloat16Bits(bits);
}

function zeroPointTensor(name: string, bits: number, signed: boolean, zp: number) {
  if (bits === 16) {
    return makeTensor(name, signed ? TensorProto_DataType.INT16 : TensorProto_DataType.UINT16, [], Uint8Array.of(zp & 0xff, (zp >> 8) & 0xff));
  }
  if (bits === 8) {
    return makeTensor(name, signed ? TensorProto_DataType.INT8 : TensorProto_DataType.UINT8, [], Uint8Array.of(zp & 0xff));
  }
  return makeTensor(name, signed ? TensorProto_DataType.INT4 : TensorProto_DataType.UINT4, [], Uint8Array.of(zp & 0x0f));
}

/** The scale and zero point of an activation's QuantizeLinear for its calibrated range. */
export function activationParams(range: { lo: number; hi: number; bits: number }, signed: boolean):
  { scale: number; zeroPoint: number; qmin: number; qmax: number } {
  const { qmin, qmax } = integerRange(range.bits, signed);
  const scale = new Float32Array(1);
  const zp = new Int32Array(1);
  native().paramsFromRanges(Float32Array.of(range.lo), Float32Array.of(range.hi), qmin, qmax, signed, scale, zp);
  return { scale: scale[0], zeroPoint: zp[0], qmin, qmax };
}

/**
 * What QuantizeLinear then DequantizeLinear make of x (float32 division, round half to even, saturation),
 * computed by the native LSQ forward kernel: with an integer zero point z,
 * saturate(round(x / s) + z) − z = clamp(round(x / s), qmin − z, qmax − z), i.e. step s, Q_N = z − qmin,
 * Q_P = qmax − z; and (q − z)·s is one float32 product either way. Also for 16-bit codes.
 */
export function fakeQuantize(x: Float32Array, p: { scale: number; zeroPoint: number; qmin: number; qmax: number }): Float32Array {
  const out = new Float32Array(x.length);
  native().lsqForward(x, tensorLayout([x.length], 'tensor', 0, 0).native, Float32Array.of(p.scale), p.zeroPoint - p.qmin, p.qmax - p.zeroPoint,
    out, '', 0);
  return out;
}

/**
 * The layers whose float weights onnxruntime's WeightBiasQuantization quantizes itself (per tensor) when they read
 * a DequantizeLinear and their output goes to a QuantizeLinear (seen in onnxruntime 1.30 for Conv and Gemm; a
 * MatMul stays float there).
 */
const QUANTIZED_BY_ONNXRUNTIME = new Set(['Conv', 'ConvTranspose', 'Gemm']);

/** A layer left float (keepFloat, or not quantizable) that onnxruntime would quantize if it read a dequantized input. */
function mustReadFloat(graph: Graph, node: NodeProto, consumers: Set<string>, ranges: Map<string, ActivationRange>): boolean {
  if (!QUANTIZED_BY_ONNXRUNTIME.has(node.opType) || consumers.has(nodeLabel(node)) || !node.input[1] || !graph.constant(node.input[1])) return false;
  let output = node.output[0];
  const readers = graph.consumers(output);
  if (readers.length === 1 && (readers[0].opType === 'Relu' || readers[0].opType === 'Clip')) output = readers[0].output[0];
  return ranges.has(output);
}

/**
 * `consumers`: labels (nodeLabel) of the layers whose inputs get the QDQ pair; `ranges`: the range and width of each
 * tensor; `everyConsumer`: tensors that every consumer reads dequantized but layers that must read float
 * (mustReadFloat) — layer outputs, so that the producer's only consumer is the QuantizeLinear, as onnxruntime's QDQ
 * fusions require.
 */
export function quantizeActivations(graph: Graph, ranges: Map<string, ActivationRange>, consumers: Set<string>,
  signed: boolean, microsoftDomain: boolean, everyConsumer: Set<string> = new Set()): { report: PassReport; activations: ActivationLayerReport[] } {
  const report: PassReport = { pass: 'quantize-activations', changed: [], skipped: [] };
  const activations: ActivationLayerReport[] = [];
  // They read the float tensor (their input's producer then has two readers, and onnxruntime does not fuse it with
  // its output's QuantizeLinear: the cost of keeping them float).
  const keptFloat = new Set(graph.graph.node.filter((n) => mustReadFloat(graph, n, consumers, ranges)));
  for (const [tensor, range] of ranges) {
    const pair = quantizerPair(graph, tensor, range, signed, microsoftDomain, graph.graph);
    graph.graph.node.push(...pair.nodes);
    let rewired = 0;
    for (const node of graph.graph.node) {
      if (node === pair.nodes[0]) continue;
      if (keptFloat.has(node)) continue;
      if (everyConsumer.has(tensor)) {
        node.input.forEach((input, slot) => {
          if (input === tensor) node.input[slot] = pair.dequantized;
        });
        rewired += node.input.includes(pair.dequantized) ? 1 : 0;
      } else if (consumers.has(nodeLabel(node)) && node.input[0] === tensor) {
        node.input[0] = pair.dequantized;
        rewired++;
      }
    }
    if (rewired === 0) {
      // Only layers left float read it: a pair nothing reads would claim a quantized tensor.
      graph.graph.node = graph.graph.node.filter((n) => !pair.nodes.includes(n));
      for (const name of pair.nodes[0].input.slice(1)) graph.removeIfUnused(name);  // its scale and zero point
      report.skipped.push({ node: tensor, reason: 'only layers left float read it' });
      continue;
    }
    activations.push(pair.activation);
    report.changed.push(`${tensor}: ${describe(pair.activation)}, ${rewired} consumer(s)`);
  }
  graph.sort();
  return { report, activations };
}

/**
 * A layer inside an If branch (`scope`; `branch`: its attribute name) of the node `subgraph` whose input gets
 * quantized with `range` (none: it stays float).
 */
export interface BodyLayerInput { node: NodeProto; label: string; scope: GraphProto; subgraph: string; branch: string; range?: ActivationRange }

/**
 * quantizeActivations for layers inside If branches: a QuantizeLinear → DequantizeLinear pair per input tensor and
 * branch, in the branch before the first layer that reads it, its constants in the branch (onnxruntime does not
 * load subgraph Q/DQ that read an enclosing graph's initializers, see the weight pass).
 * Returns the layers whose inputs it quantized, with the tensor's report entry.
 */
export function quantizeBodyActivations(graph: Graph, layers: BodyLayerInput[], signed: boolean, microsoftDomain: boolean):
  { report: PassReport; activations: ActivationLayerReport[]; inputs: Map<NodeProto, ActivationLayerReport> } {
  const report: PassReport = { pass: 'quantize-activations (subgraphs)', changed: [], skipped: [] };
  const activations: ActivationLayerReport[] = [];
  const inputs = new Map<NodeProto, ActivationLayerReport>();
  const made = new Map<GraphProto, Map<string, ReturnType<typeof quantizerPair>>>();
  for (const { node, label, scope, subgraph, branch, range } of layers) {
    const tensor = node.input[0];
    if (!range) continue;
    const inScope = made.get(scope) ?? new Map<string, ReturnType<typeof quantizerPair>>();
    made.set(scope, inScope);
    let pair = inScope.get(tensor);
    if (!pair) {
      pair = quantizerPair(graph, tensor, range, signed, microsoftDomain, scope);
      graph.insertBefore(scope, node, ...pair.nodes);
      inScope.set(tensor, pair);
      activations.push({ ...pair.activation, subgraph, branch });
    }
    node.input[0] = pair.dequantized;
    inputs.set(node, pair.activation);
    report.changed.push(`${label} (in ${subgraph}): input ${tensor} ${describe(pair.activation)}`);
  }
  return { report, activations, inputs };
}

function describe(a: ActivationLayerReport): string {
  return `${a.bits}-bit ${a.signed ? 'int' : 'uint'}${a.float16 ? ' (float16 scale)' : ''}`;
}

/** QuantizeLinear → DequantizeLinear of a tensor for its range, their constants added to `scope`. */
function quantizerPair(graph: Graph, tensor: string, range: ActivationRange, signed: boolean, microsoftDomain: boolean, scope: GraphProto):
  { nodes: [NodeProto, NodeProto]; dequantized: string; activation: ActivationLayerReport } {
  const domain = microsoftDomain ? 'com.microsoft' : '';
  const bits = range.bits;
  const params = activationParams(range, signed);
  const scale = Float32Array.of(range.float16 ? float16ScaleAtLeast(params.scale) : params.scale);
  const zp = Int32Array.of(params.zeroPoint);
  const scaleName = graph.uniqueName(`${tensor}_scale`);
  const zpName = graph.uniqueName(`${tensor}_zero_point`);
  const quantized = graph.uniqueName(`${tensor}_quantized`);
  const dequantized = graph.uniqueName(`${tensor}_dequantized`);
  graph.addInitializer(range.float16
    ? makeTensor(scaleName, TensorProto_DataType.FLOAT16, [], new Uint8Array(toFloat16Array(scale).buffer))
    : makeTensor(scaleName, TensorProto_DataType.FLOAT, [], new Uint8Array(scale.buffer)), scope);
  graph.addInitializer(zeroPointTensor(zpName, bits, signed, zp[0]), scope);
  return {
    nodes: [graph.newNode('QuantizeLinear', [tensor, scaleName, zpName], [quantized], `${tensor}_q`, [], domain),
      graph.newNode('DequantizeLinear', [quantized, scaleName, zpName], [dequantized], `${tensor}_dq`, [], domain)],
    dequantized,
    activation: { tensor, bits, signed, range: [range.lo, range.hi], scale: scale[0], zeroPoint: zp[0], ...(range.float16 ? { float16: true as const } : {}) },
  };
}
