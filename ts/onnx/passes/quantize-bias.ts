/**
 * Bias to int32 for Conv and Gemm whose input activation and weights are both
 * quantized (per tensor / per output channel): b_q = round(b / (s_a · s_w[c]))
 * with a DequantizeLinear (scale s_a · s_w, axis 0) in front of the bias input,
 * the pattern onnxruntime fuses into integer convolutions and GEMMs.
 * A float16 layer's bias gets float16 scales s_a · s_w too, unless a product
 * falls below float16's normal range (often: small weights' scales times an
 * activation's); then one power-of-two float16 scale fine enough to hold its
 * float16 values to 2^-30 of the largest. Every float16 bias becomes int32: one
 * left float is quantized by onnxruntime itself (its bias quantization, from
 * optimisation level 'basic' up) with the float16 product, which gave wrong
 * convolutions on float16 models.
 */
import { TensorProto_DataType, type NodeProto, type TensorProto } from 'onnx-buf';

import { fromFloat16Bits, toFloat16Array, toFloat16Bits } from '../../float16';
import { dimsOf, floatData, isChannelVector, makeIntAttribute, makeTensor, weightValues, type Graph } from '../graph';
import { nodeLabel, type PassReport } from './pass';

export interface LayerScales {
  /** Activation scale of the layer's input. */
  activation: number;
  /** Weight scale per output channel (per-channel weights only). */
  weight: Float32Array;
  /** A float16 layer (its scales are float16 values). */
  float16?: boolean;
}

export function quantizeBiases(graph: Graph, scales: Map<string, LayerScales>, microsoftDomain = false): PassReport {
  const report: PassReport = { pass: 'quantize-bias', changed: [], skipped: [] };
  for (const node of [...graph.graph.node]) {
    if (node.opType !== 'Conv' && node.opType !== 'Gemm') continue;
    const label = nodeLabel(node);
    const s = scales.get(label);
    if (!s) continue;
    const b = node.input[2] ? graph.constant(node.input[2]) : undefined;
    if (s.float16) {
      // 1-D only (a [1, N] float16 bias stays float16, as the float16 tests pin down).
      const values = b && dimsOf(b).length === 1 && isChannelVector(b, s.weight.length) ? weightValues(b) : undefined;
      if (!values) {
        report.skipped.push({ node: label, reason: !node.input[2] ? 'no bias' : b ? 'the bias is not 1-D (one value per output channel)' : 'the bias is not a float constant' });
        continue;
      }
      if (!values.every(Number.isFinite)) {
        report.skipped.push({ node: label, reason: 'the bias holds NaN or an infinity' });
        continue;
      }
      const product = productScaleBias(values, s);
      replaceBias(graph, node, label, product ?? float16Bias(values), microsoftDomain);
      report.changed.push(`${label}: float16 bias -> int32 (${product ? 'scale s_a·s_w' : "power-of-two scale: s_a·s_w is below float16's normal range"})`);
      continue;
    }
    const data = b && floatData(b);
    if (!data) {
      report.skipped.push({ node: label, reason: node.input[2] ? 'the bias is not a float constant' : 'no bias' });
      continue;
    }
    if (data.length !== s.weight.length || !isChannelVector(b, s.weight.length)) {
      report.skipped.push({ node: label, reason: `the bias (shape [${dimsOf(b).join(', ')}]) does not have one value per output channel` });
      continue;
    }
    if (!data.every(Number.isFinite)) {
      // Math.round(NaN) stored in an Int32Array is 0: the bias would vanish without a word.
      report.skipped.push({ node: label, reason: 'the bias holds NaN or an infinity' });
      continue;
    }
    const scale = Float32Array.from(s.weight, (w) => Math.fround(s.activation * w));
    const q = new Int32Array(data.length);
    let overflow = false;
    for (let c = 0; c < data.length; c++) {
      const v = Math.round(data[c] / scale[c]);
      if (Math.abs(v) > 2 ** 31 - 1) overflow = true;
      q[c] = v;
    }
    if (overflow) {
      report.skipped.push({ node: label, reason: 'the bias does not fit in int32 at scale s_a·s_w' });
      continue;
    }
    replaceBias(graph, node, label, { values: q, scale: makeTensor('', TensorProto_DataType.FLOAT, [scale.length], new Uint8Array(scale.buffer)) }, microsoftDomain);
    report.changed.push(`${label}: bias -> int32`);
  }
  graph.sort();
  return report;
}

/**
 * A float16 bias as int32 values at the float16 scales s_a·s_w[c], the QDQ convention; undefined when a product falls
 * below float16's normal range (2^-14), where it would keep few significant bits, or a value would overflow int32.
 */
function productScaleBias(values: Float32Array, s: LayerScales): { values: Int32Array; scale: TensorProto } | undefined {
  if (s.weight.length !== values.length) return undefined;
  const scale = Float32Array.from(s.weight, (w) => fromFloat16Bits(toFloat16Bits(s.activation * w)));
  if (scale.some((x) => !(x >= 2 ** -14) || !Number.isFinite(x))) return undefined;
  const rounded = Array.from(values, (v, c) => Math.round(v / scale[c]));
  if (rounded.some((q) => Math.abs(q) > 2 ** 31 - 1)) return undefined;
  return { values: Int32Array.from(rounded), scale: makeTensor('', TensorProto_DataType.FLOAT16, [scale.length], new Uint8Array(toFloat16Array(scale).buffer)) };
}

/** A float16 bias as int32 values and one power-of-two float16 scale (2^-24 at least, float16's smallest step). */
function float16Bias(values: Float32Array): { values: Int32Array; scale: TensorProto } {
  const largest = values.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
  const exponent = Math.max(-24, (largest > 0 ? Math.ceil(Math.log2(largest)) : 0) - 30);
  const step = 2 ** exponent;
  return {
    values: Int32Array.from(values, (v) => Math.round(v / step)),
    scale: makeTensor('', TensorProto_DataType.FLOAT16, [], new Uint8Array(toFloat16Array([step]).buffer)),
  };
}

/**
 * Feeds the layer's bias input from DequantizeLinear(int32 values, scale) (axis 0 for a per-channel scale), onnxruntime's
 * com.microsoft one in a model kept below opset 13 (as its weights' and activations').
 */
function replaceBias(graph: Graph, node: NodeProto, label: string, bias: { values: Int32Array; scale: TensorProto }, microsoftDomain: boolean): void {
  const qName = graph.uniqueName(`${node.input[2]}_int32`);
  const sName = graph.uniqueName(`${node.input[2]}_scale`);
  const out = graph.uniqueName(`${node.input[2]}_dequantized`);
  graph.addInitializer(makeTensor(qName, TensorProto_DataType.INT32, [bias.values.length], new Uint8Array(bias.values.buffer)));
  bias.scale.name = sName;
  graph.addInitializer(bias.scale);
  const axis = bias.scale.dims.length > 0 ? [makeIntAttribute('axis', 0)] : [];
  graph.graph.node.push(graph.newNode('DequantizeLinear', [qName, sName], [out], `${label}_bias_dq`, axis, microsoftDomain ? 'com.microsoft' : ''));
  const previous = node.input[2];
  node.input[2] = out;
  graph.removeIfUnused(previous);
}
