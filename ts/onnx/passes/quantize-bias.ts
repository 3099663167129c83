/**
 * Bias to int32 for Conv and Gemm whose input activation and weights are both
 * quantized (per tensor / per output channel): b_q = round(b / (s_a · s_w[c]))
 * with a DequantizeLinear (scale s_a · s_w, axis 0) in front of the bias input,
 * the pattern onnxruntime fuses into integer convolutions and GEMMs.
 */
import { TensorProto_DataType } from 'onnx-buf';

import { floatData, makeIntAttribute, makeNode, makeTensor, type Graph } from '../graph';
import { nodeLabel, type PassReport } from './pass';

export interface LayerScales {
  /** Activation scale of the layer's input. */
  activation: number;
  /** Weight scale per output channel (per-channel weights only). */
  weight: Float32Array;
}

export function quantizeBiases(graph: Graph, scales: Map<string, LayerScales>): PassReport {
  const report: PassReport = { pass: 'quantize-bias', changed: [], skipped: [] };
  for (const node of [...graph.graph.node]) {
    if (node.opType !== 'Conv' && node.opType !== 'Gemm') continue;
    const label = nodeLabel(node);
    const s = scales.get(label);
    if (!s) continue;
    const b = node.input[2] ? graph.constant(node.input[2]) : undefined;
    const data = b && floatData(b);
    if (!data) {
      report.skipped.push({ node: label, reason: node.input[2] ? 'the bias is not a float constant' : 'no bias' });
      continue;
    }
    if (data.length !== s.weight.length) {
      report.skipped.push({ node: label, reason: 'the bias does not have one value per output channel' });
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
    const qName = graph.uniqueName(`${node.input[2]}_int32`);
    const sName = graph.uniqueName(`${node.input[2]}_scale`);
    const out = graph.uniqueName(`${node.input[2]}_dequantized`);
    graph.addInitializer(makeTensor(qName, TensorProto_DataType.INT32, [q.length], new Uint8Array(q.buffer)));
    graph.addInitializer(makeTensor(sName, TensorProto_DataType.FLOAT, [scale.length], new Uint8Array(scale.buffer)));
    graph.graph.node.push(makeNode('DequantizeLinear', [qName, sName], [out], `${label}_bias_dq`, [makeIntAttribute('axis', 0)]));
    const previous = node.input[2];
    node.input[2] = out;
    graph.removeIfUnused(previous);
    report.changed.push(`${label}: bias -> int32`);
  }
  graph.sort();
  return report;
}
