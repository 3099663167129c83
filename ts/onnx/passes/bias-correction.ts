/**
 * Data-driven bias correction (Banner et al.): for each quantized layer, adds
 * E[W·x] − E[Ŵ·x] = Σ_k (W − Ŵ)[c, k] · E[x_k] to the bias of output channel c,
 * with E[x] the per-channel mean of the layer's input measured during
 * calibration (padding and the input's own quantization are ignored). Conv and
 * Gemm get a new bias initializer; MatMul gets an Add after it.
 */
import { TensorProto_DataType } from 'onnx-buf';

import { floatData, intAttribute, makeNode, makeTensor, type Graph } from '../graph';
import { nodeLabel, type PassReport } from './pass';
import type { QuantizedWeights } from './quantize-weights';

export function correctBiases(graph: Graph, weights: QuantizedWeights[], inputs: Map<string, string>,
  means: Map<string, Float64Array>): PassReport {
  const report: PassReport = { pass: 'bias-correction', changed: [], skipped: [] };
  const byLabel = new Map(graph.graph.node.map((n) => [nodeLabel(n), n]));
  for (const w of weights) {
    const node = byLabel.get(w.node);
    const mean = means.get(inputs.get(w.node) ?? '');
    if (!node || !mean) {
      report.skipped.push({ node: w.node, reason: 'no calibrated input mean' });
      continue;
    }
    const dims = w.shape;
    const out = dims[w.outputAxis];
    const shift = new Float64Array(out);
    if (node.opType === 'Conv') {
      const group = intAttribute(node, 'group', 1);
      const perGroupIn = dims[1];
      const perGroupOut = out / group;
      const spatial = dims.slice(2).reduce((a, b) => a * b, 1);
      if (mean.length !== perGroupIn * group) {
        report.skipped.push({ node: w.node, reason: `input mean has ${mean.length} channels, expected ${perGroupIn * group}` });
        continue;
      }
      for (let o = 0; o < out; o++) {
        const g = Math.floor(o / perGroupOut);
        let s = 0;
        for (let i = 0; i < perGroupIn; i++) {
          for (let t = 0; t < spatial; t++) {
            const idx = (o * perGroupIn + i) * spatial + t;
            s += (w.original[idx] - w.dequantized[idx]) * mean[g * perGroupIn + i];
          }
        }
        shift[o] = s;
      }
    } else {
      const k = dims[1 - w.outputAxis];
      if (mean.length !== k) {
        report.skipped.push({ node: w.node, reason: `input mean has ${mean.length} channels, expected ${k}` });
        continue;
      }
      for (let o = 0; o < out; o++) {
        let s = 0;
        for (let i = 0; i < k; i++) {
          const idx = w.outputAxis === 0 ? o * k + i : i * out + o;
          s += (w.original[idx] - w.dequantized[idx]) * mean[i];
        }
        shift[o] = s;
      }
    }
    if (node.opType === 'Conv' || node.opType === 'Gemm') {
      const old = node.input[2] ? graph.constant(node.input[2]) : undefined;
      const oldData = old ? floatData(old) : new Float32Array(out);
      if (!oldData || oldData.length !== out) {
        report.skipped.push({ node: w.node, reason: 'its bias is not a float constant with one value per output channel' });
        continue;
      }
      const name = graph.uniqueName(`${w.node}_corrected_bias`);
      graph.addInitializer(makeTensor(name, TensorProto_DataType.FLOAT, [out], new Uint8Array(Float32Array.from(oldData, (b, c) => b + shift[c]).buffer)));
      const previous = node.input[2];
      node.input[2] = name;
      if (previous) graph.removeIfUnused(previous);
    } else {
      const name = graph.uniqueName(`${w.node}_bias_correction`);
      const raw = graph.uniqueName(`${node.output[0]}_uncorrected`);
      graph.addInitializer(makeTensor(name, TensorProto_DataType.FLOAT, [out], new Uint8Array(Float32Array.from(shift).buffer)));
      graph.graph.node.push(makeNode('Add', [raw, name], [node.output[0]], `${w.node}_bias_correction_add`));
      node.output[0] = raw;
    }
    let norm = 0;
    for (const v of shift) norm += v * v;
    report.changed.push(`${w.node}: bias shifted by ‖Δb‖ = ${Math.sqrt(norm).toExponential(2)}`);
  }
  graph.sort();
  return report;
}
