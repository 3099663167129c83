/**
 * Dynamic activation quantization (`activations.method: 'dynamic'`), as onnxruntime's quantize_dynamic does
 * it: no calibration; each run computes the input's uint8 scale and zero point from its own min and max
 * (DynamicQuantizeLinear: range [min(x, 0), max(x, 0)] over 255 steps), multiplies the codes by the int8
 * weights exactly in int32 (MatMulInteger) and scales the product back to float (Cast, then Mul by
 * input scale × weight scales). onnxruntime fuses that pattern, with a bias Add after it, into
 * MatMulIntegerToFloat / DynamicQuantizeMatMul: int8 GEMM speed without calibrated ranges.
 *
 * Only MatMul and Gemm (transA 0, alpha and beta 1: MatMulInteger, then an Add of C) get it: onnxruntime's ConvInteger takes one
 * weight zero point per tensor and, in a probe on a 64-channel 3×3 conv, ran at float speed at best
 * (uint8 weights) and 3× slower with int8 weights (onnxruntime 1.30, one run each); convolutions want static
 * (calibrated) activations.
 */
import { TensorProto_DataType, type GraphProto, type NodeProto } from 'onnx-buf';

import { attribute, dimsOf, floatAttribute, intAttribute, makeIntAttribute, makeNode, namesRead, ownedTensor, transposes, type Graph } from '../graph';
import { nodeLabel, type PassReport, type Steps } from './pass';

const CONV_REASON = 'dynamic activations are for MatMul and Gemm (onnxruntime fuses them into MatMulIntegerToFloat) and LSTM (DynamicQuantizeLSTM); its ConvInteger ' +
  'is no faster than a float Conv: weights only here; calibrate for static activations';

/**
 * The int8 values ([K, N], as MatMulInteger takes them) and per-column (or per-tensor) scale of a layer's
 * weight DequantizeLinear, or why there are none. A Gemm with transB keeps [N, K] values quantized along N:
 * they are transposed (int8, once per tensor however many layers of the layer's graph share it).
 */
function integerWeights(graph: Graph, at: LayerPlace, transposed: Map<string, string>): { values: string; scale: string; dq: NodeProto } | string {
  const { node, scope, scopes } = at;
  const dq = graph.producer(node.input[1], scope);
  if (!dq || dq.opType !== 'DequantizeLinear') return 'its weights are not quantized by a DequantizeLinear';
  const values = graph.constantIn(dq.input[0], scopes)?.tensor;
  if (values?.dataType !== TensorProto_DataType.INT8) return 'its weights are not stored as int8 (MatMulInteger needs 8-bit weights)';
  if (attribute(dq, 'block_size')) return 'its weights are blocked (MatMulInteger takes one scale per column)';
  const scale = graph.constantIn(dq.input[1], scopes)?.tensor;
  const dims = dimsOf(values);
  // onnxruntime's DynamicQuantizeMatMul fusion (default optimisation level) dropped the bias Add after a 3-D weight.
  if (dims.length > 2) return `its weight is ${dims.length}-D (onnxruntime's fused dynamic MatMul miscomputes layers whose weight is not 2-D)`;
  const transB = transposes(node, 'transB');
  const axis = intAttribute(dq, 'axis', 1);
  const columnAxis = transB ? 0 : dims.length - 1;
  if (scale?.dataType !== TensorProto_DataType.FLOAT) return 'its weight scales are not float32';
  if (dimsOf(scale).length > 0 && (axis + dims.length) % dims.length !== columnAxis) return 'its weight scales are not per tensor or per column';
  const zeroPoint = dq.input[2] ? graph.constantIn(dq.input[2], scopes)?.tensor : undefined;
  if (dq.input[2] && !(zeroPoint && zeroPoint.rawData.every((b) => b === 0))) return 'its weights have a zero point';
  if (!transB) return { values: dq.input[0], scale: dq.input[1], dq };
  let name = transposed.get(dq.input[0]);
  if (!name) {
    const [n, k] = dims;
    const from = values.rawData;
    const to = new Uint8Array(from.length);
    for (let i = 0; i < n; i++) for (let j = 0; j < k; j++) to[j * n + i] = from[i * k + j];
    name = graph.uniqueName(`${dq.input[0]}_transposed`);
    graph.addInitializer(ownedTensor(name, TensorProto_DataType.INT8, [k, n], to), scope);
    transposed.set(dq.input[0], name);
  }
  return { values: name, scale: dq.input[1], dq };
}

/** Why a Gemm cannot become MatMulInteger + Add, or undefined. */
function gemmObstacle(node: NodeProto): string | undefined {
  if (transposes(node, 'transA')) return 'a Gemm with transA set';
  if (floatAttribute(node, 'alpha', 1) !== 1) return 'a Gemm whose alpha is not 1';
  if (node.input[2] && floatAttribute(node, 'beta', 1) !== 1) return 'a Gemm whose beta is not 1';
  return undefined;
}

/** A layer and the graph that holds it: the main graph, or a subgraph body (`scopes`: the bodies around it, innermost first). */
export interface LayerPlace { node: NodeProto; scope: GraphProto; scopes: GraphProto[] }

/**
 * Quantizes the inputs of the MatMul and Gemm layers dynamically (see the file comment), after their weights are
 * quantized, in the main graph and inside If/Loop/Scan bodies alike (no calibration is needed to see a body's
 * values). One DynamicQuantizeLinear per input tensor and graph, shared by the layers of that graph that read it,
 * placed before the first of them; each layer becomes MatMulInteger → Cast → Mul (→ Add of a Gemm's C) in place,
 * keeping its output name. `labels`: each layer's name in the report, taken before passes that rename outputs
 * (bias correction) changed what nodeLabel would say. Returns the layers it quantized. A layer at a time, for
 * runStepsAsync: a large model's weight transposes do not hold the event loop.
 */
export function* quantizeInputsDynamicallySteps(graph: Graph, layers: LayerPlace[], labels: Map<NodeProto, string>):
  Steps<{ report: PassReport; quantized: Set<NodeProto> }> {
  const report: PassReport = { pass: 'dynamic-activations', changed: [], skipped: [] };
  const quantized = new Set<NodeProto>();
  const codes = new Map<GraphProto, Map<string, [string, string, string]>>();
  const transposed = new Map<string, string>();
  // Weight DequantizeLinears the layers no longer read, per graph: removed at the end (with their values, which a
  // transposed copy may have replaced), looking at what each graph reads once.
  const replacedWeights = new Map<GraphProto, NodeProto[]>();
  for (const at of layers) {
    const { node, scope, scopes } = at;
    const label = labels.get(node) ?? nodeLabel(node);
    if (node.opType !== 'MatMul' && node.opType !== 'Gemm') {
      report.skipped.push({ node: label, reason: node.opType === 'Conv' ? CONV_REASON : `${node.opType}: dynamic activations need MatMul or Gemm` });
      continue;
    }
    const obstacle = node.opType === 'Gemm' ? gemmObstacle(node) : undefined;
    if (obstacle) {
      report.skipped.push({ node: label, reason: `${obstacle}: input left float (MatMulInteger computes x·W only)` });
      continue;
    }
    const x = node.input[0];
    if (graph.constantIn(x, scopes)) {
      report.skipped.push({ node: label, reason: 'its input is a constant' });
      continue;
    }
    yield;
    const weights = integerWeights(graph, at, transposed);
    if (typeof weights === 'string') {
      report.skipped.push({ node: label, reason: `${weights}: input left float` });
      continue;
    }
    const inScope = codes.get(scope) ?? new Map<string, [string, string, string]>();
    codes.set(scope, inScope);
    let xq = inScope.get(x);
    if (!xq) {
      xq = [graph.uniqueName(`${x}_quantized`), graph.uniqueName(`${x}_scale`), graph.uniqueName(`${x}_zero_point`)];
      inScope.set(x, xq);
      graph.insertBefore(scope, node, graph.newNode('DynamicQuantizeLinear', [x], xq, `${x}_dynamic_q`));
    }
    const output = node.output[0];
    const bias = node.opType === 'Gemm' ? node.input[2] : undefined;
    const product = graph.uniqueName(`${output}_int32`);
    const asFloat = graph.uniqueName(`${output}_float`);
    const scale = graph.uniqueName(`${label}_output_scale`);
    const scaled = bias ? graph.uniqueName(`${output}_unbiased`) : output;
    scope.node.splice(scope.node.indexOf(node), 1,
      graph.newNode('MatMulInteger', [xq[0], weights.values, xq[2]], [product], `${label}_integer`),
      graph.newNode('Cast', [product], [asFloat], `${label}_cast`, [makeIntAttribute('to', TensorProto_DataType.FLOAT)]),
      graph.newNode('Mul', [xq[1], weights.scale], [scale], `${label}_scales`),
      makeNode('Mul', [asFloat, scale], [scaled], bias ? graph.uniqueName(`${label}_scaled`) : label),
      ...(bias ? [makeNode('Add', [scaled, bias], [output], label)] : []));
    (replacedWeights.get(scope) ?? replacedWeights.set(scope, []).get(scope)!).push(weights.dq);
    quantized.add(node);
    report.changed.push(`${label}: uint8 input quantized per run (DynamicQuantizeLinear), MatMulInteger`);
  }
  for (const [scope, dqs] of replacedWeights) {
    const read = namesRead(scope);
    const unread = [...new Set(dqs)].filter((dq) => !read.has(dq.output[0]));
    for (const dq of unread) scope.node.splice(scope.node.indexOf(dq), 1);
    graph.removeAllUnused(unread.map((dq) => dq.input[0]), scope);
  }
  graph.sort();
  return { report, quantized };
}
