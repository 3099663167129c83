/**
 * Dynamic activation quantization (`activations.method: 'dynamic'`), as onnxruntime's quantize_dynamic does
 * it: no calibration; each run computes the input's uint8 scale and zero point from its own min and max
 * (DynamicQuantizeLinear: range [min(x, 0), max(x, 0)] over 255 steps), multiplies the codes by the int8
 * weights exactly in int32 (MatMulInteger) and scales the product back to float (Cast, then Mul by
 * input scale × weight scales). onnxruntime fuses that pattern, with a bias Add after it, into
 * MatMulIntegerToFloat / DynamicQuantizeMatMul: int8 GEMM speed without calibrated ranges.
 *
 * Only MatMul (and Gemm, rewritten as MatMul + Add first) gets it: onnxruntime's ConvInteger takes one
 * weight zero point per tensor and, in a probe on a 64-channel 3×3 conv, ran at float speed at best
 * (uint8 weights) and 3× slower with int8 weights (onnxruntime 1.30, one run each); convolutions want static
 * (calibrated) activations.
 */
import { TensorProto_DataType, type NodeProto } from 'onnx-buf';

import { attribute, dimsOf, floatAttribute, floatData, intAttribute, makeIntAttribute, makeNode, makeTensor, type Graph } from '../graph';
import { nodeLabel, type PassReport } from './pass';

const CONV_REASON = 'dynamic activations are for MatMul and Gemm (onnxruntime fuses them into MatMulIntegerToFloat); its ConvInteger ' +
  'is no faster than a float Conv: weights only here; calibrate for static activations';

/**
 * Rewrites Gemm layers as MatMul (+ Add of C) so they can take dynamic inputs: W is stored as [K, N]
 * (transposed when transB), the values unchanged. Only Gemm with transA = 0, alpha = 1 and beta = 1 (or
 * no C); others stay Gemm, weights-only, and are reported.
 */
export function gemmToMatMul(graph: Graph, gemms: NodeProto[]): PassReport {
  const report: PassReport = { pass: 'gemm-to-matmul', changed: [], skipped: [] };
  for (const node of gemms) {
    const label = nodeLabel(node);
    const why = intAttribute(node, 'transA', 0) !== 0 ? 'transA = 1'
      : floatAttribute(node, 'alpha', 1) !== 1 ? 'alpha is not 1'
        : node.input[2] && floatAttribute(node, 'beta', 1) !== 1 ? 'beta is not 1' : undefined;
    if (why) {
      report.skipped.push({ node: label, reason: `${why}: kept as Gemm, so its input stays float (dynamic activations need MatMul)` });
      continue;
    }
    if (intAttribute(node, 'transB', 0) === 1) {
      const source = graph.constant(node.input[1])!;
      const [n, k] = dimsOf(source);
      const w = floatData(source)!;
      const t = new Float32Array(w.length);
      for (let i = 0; i < n; i++) for (let j = 0; j < k; j++) t[j * n + i] = w[i * k + j];
      const name = graph.uniqueName(`${node.input[1]}_transposed`);
      graph.addInitializer(makeTensor(name, TensorProto_DataType.FLOAT, [k, n], new Uint8Array(t.buffer)));
      const old = node.input[1];
      node.input[1] = name;
      graph.removeIfUnused(old);
    }
    const output = node.output[0];
    const bias = node.input[2];
    node.opType = 'MatMul';
    node.attribute = [];
    node.input.splice(2);
    if (bias) {
      node.output[0] = graph.uniqueName(`${output}_matmul`);
      graph.graph.node.splice(graph.graph.node.indexOf(node) + 1, 0, makeNode('Add', [node.output[0], bias], [output], `${label}_bias`));
    }
    report.changed.push(`${label}: Gemm → MatMul${bias ? ' + Add' : ''}`);
  }
  return report;
}

/** The int8 values and scale of a weight DequantizeLinear that MatMulInteger can take, or why not. */
function integerWeights(graph: Graph, node: NodeProto): { values: string; scale: string } | string {
  const dq = graph.producer(node.input[1]);
  if (!dq || dq.opType !== 'DequantizeLinear' || dq.domain !== '') return 'its weights are not quantized by a DequantizeLinear';
  const values = graph.constant(dq.input[0]);
  if (values?.dataType !== TensorProto_DataType.INT8) return 'its weights are not stored as int8 (MatMulInteger needs 8-bit weights)';
  if (attribute(dq, 'block_size')) return 'its weights are blocked (MatMulInteger takes one scale per column)';
  const scale = graph.constant(dq.input[1]);
  const rank = dimsOf(values).length;
  const axis = intAttribute(dq, 'axis', 1);
  if (!scale || (dimsOf(scale).length > 0 && axis !== rank - 1 && axis !== -1)) return 'its weight scales are not per tensor or per column';
  const zeroPoint = dq.input[2] ? graph.constant(dq.input[2]) : undefined;
  if (dq.input[2] && !(zeroPoint && zeroPoint.rawData.every((b) => b === 0))) return 'its weights have a zero point';
  return { values: dq.input[0], scale: dq.input[1] };
}

/**
 * Quantizes the inputs of the MatMul layers dynamically (see the file comment). One DynamicQuantizeLinear per
 * input tensor, shared by the layers that read it; each MatMul becomes MatMulInteger → Cast → Mul, keeping its
 * output name. `layers`: the quantized layers (after weight quantization).
 */
export function quantizeInputsDynamically(graph: Graph, layers: NodeProto[]): { report: PassReport; quantized: Set<string> } {
  const report: PassReport = { pass: 'dynamic-activations', changed: [], skipped: [] };
  const quantized = new Set<string>();
  const codes = new Map<string, [string, string, string]>();
  for (const node of layers) {
    const label = nodeLabel(node);
    if (node.opType !== 'MatMul') {
      report.skipped.push({ node: label, reason: node.opType === 'Conv' ? CONV_REASON : `${node.opType}: dynamic activations need MatMul` });
      continue;
    }
    const x = node.input[0];
    if (graph.constant(x)) {
      report.skipped.push({ node: label, reason: 'its input is a constant' });
      continue;
    }
    const weights = integerWeights(graph, node);
    if (typeof weights === 'string') {
      report.skipped.push({ node: label, reason: `${weights}: input left float` });
      continue;
    }
    let xq = codes.get(x);
    if (!xq) {
      xq = [graph.uniqueName(`${x}_quantized`), graph.uniqueName(`${x}_scale`), graph.uniqueName(`${x}_zero_point`)];
      codes.set(x, xq);
      graph.graph.node.push(makeNode('DynamicQuantizeLinear', [x], xq, `${x}_dynamic_q`));
    }
    const output = node.output[0];
    const product = graph.uniqueName(`${output}_int32`);
    const asFloat = graph.uniqueName(`${output}_float`);
    const scale = graph.uniqueName(`${label}_output_scale`);
    const dq = graph.producer(node.input[1])!;
    graph.graph.node.splice(graph.graph.node.indexOf(node), 1,
      makeNode('MatMulInteger', [xq[0], weights.values, xq[2]], [product], `${label}_integer`),
      makeNode('Cast', [product], [asFloat], `${label}_cast`, [makeIntAttribute('to', TensorProto_DataType.FLOAT)]),
      makeNode('Mul', [xq[1], weights.scale], [scale], `${label}_scales`),
      makeNode('Mul', [asFloat, scale], [output], label));
    if (graph.consumers(dq.output[0]).length === 0) graph.graph.node.splice(graph.graph.node.indexOf(dq), 1);
    quantized.add(label);
    report.changed.push(`${label}: uint8 input quantized per run (DynamicQuantizeLinear), MatMulInteger`);
  }
  graph.sort();
  return { report, quantized };
}
