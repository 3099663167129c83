/**
 * Data-driven bias correction (Banner et al.): for each quantized layer, adds
 * E[W·x] − E[Ŵ·x] = Σ_k (W − Ŵ)[c, k] · E[x_k] to the bias of output channel c,
 * with E[x] the mean of the vectors the layer's weights meet during
 * calibration — for Conv, each im2col column, so a tap that reads padding
 * counts the zeros it reads (with a channel mean, a 5×5 kernel over a 3-row
 * feature map would be corrected as if all 25 taps saw data). The input's own
 * quantization is ignored. Conv and Gemm get a new bias initializer; so does a
 * MatMul followed by an Add of a constant [n] bias (its only reader); another
 * MatMul gets an Add after it.
 */
import { TensorProto_DataType, type NodeProto } from 'onnx-buf';

import { NON_FINITE_INPUT, type LayerInputMoments } from '../../calibration/layer-input-moments';
import { floatAttribute, floatData, isChannelVector, makeTensor, type Graph } from '../graph';
import { nodeLabel, runSteps, type PassReport, type Steps } from './pass';
import { matrixView, type QuantizedWeights } from './quantize-weights';

/** The Add that adds a constant bias of `n` float values to `value`, its only reader, or undefined. */
function constantBiasAdd(graph: Graph, value: string, n: number): { node: NodeProto; slot: number } | undefined {
  const add = graph.onlyReader(value);
  if (add?.opType !== 'Add') return undefined;
  const slot = add.input[0] === value ? 1 : 0;
  const bias = graph.constant(add.input[slot]);
  const data = bias && floatData(bias);
  // Shape [n] only: it broadcasts over the last axis as the per-channel shift does and adds no dimension (onnxruntime's
  // fused MatMul + bias drops the leading 1 of a [1, n] bias on a 1-D product).
  if (!data || data.length !== n || bias.dims.length !== 1) return undefined;
  return { node: add, slot };
}

export function correctBiases(graph: Graph, weights: QuantizedWeights[], moments: Map<string, LayerInputMoments>): PassReport {
  return runSteps(correctBiasesByLayer(graph, weights, moments));
}

/** correctBiases in steps: yields after each layer (see runStepsAsync). */
export function* correctBiasesByLayer(graph: Graph, weights: QuantizedWeights[], moments: Map<string, LayerInputMoments>): Steps<PassReport> {
  const report: PassReport = { pass: 'bias-correction', changed: [], skipped: [] };
  const byLabel = new Map(graph.graph.node.map((n) => [nodeLabel(n), n]));
  for (const w of weights) {
    const node = byLabel.get(w.node);
    const m = moments.get(w.node);
    if (!node || !m || m.count === 0) {
      report.skipped.push({ node: w.node, reason: 'no calibrated input mean' });
      continue;
    }
    if (!m.finite) {
      report.skipped.push({ node: w.node, reason: `${NON_FINITE_INPUT}: no data-driven bias correction` });
      continue;
    }
    if (!w.original || !w.dequantized) throw new Error(`bias correction of ${w.node}: quantizeWeights ran without keepValues`);
    const { original, dequantized } = w;
    const view = matrixView(node, w.shape, w.outputAxis);
    const means = m.means();
    const out = view.rows;
    const shift = new Float64Array(out);
    for (let o = 0; o < out; o++) {
      const mean = means[Math.floor(o / view.rowsPerGram)];
      let s = 0;
      for (let k = 0; k < view.columns; k++) {
        const idx = o * view.rowStride + k * view.columnStride;
        s += (original[idx] - dequantized[idx]) * mean[k];
      }
      shift[o] = s;
    }
    const biasAdd = node.opType === 'MatMul' ? constantBiasAdd(graph, node.output[0], out) : undefined;
    if (biasAdd) {
      const name = graph.uniqueName(`${w.node}_corrected_bias`);
      const old = floatData(graph.constant(biasAdd.node.input[biasAdd.slot])!)!;
      graph.addInitializer(makeTensor(name, TensorProto_DataType.FLOAT, [out], new Uint8Array(Float32Array.from(old, (b, c) => b + shift[c]).buffer)));
      w.biasAddOutput = biasAdd.node.output[0];  // where the layer's corrected output now is
      const previous = biasAdd.node.input[biasAdd.slot];
      biasAdd.node.input[biasAdd.slot] = name;
      graph.removeIfUnused(previous);
    } else if (node.opType === 'Conv' || (node.opType === 'Gemm' && floatAttribute(node, 'beta', 1) !== 0)) {
      // Gemm computes alpha·A·B + beta·C: the shift of A·B enters C as alpha/beta of it.
      const gain = node.opType === 'Gemm' ? floatAttribute(node, 'alpha', 1) / floatAttribute(node, 'beta', 1) : 1;
      for (let c = 0; c < out; c++) shift[c] *= gain;
      const old = node.input[2] ? graph.constant(node.input[2]) : undefined;
      const oldData = old ? floatData(old) : new Float32Array(out);
      if (!oldData || oldData.length !== out || (old && !isChannelVector(old, out))) {
        report.skipped.push({ node: w.node, reason: 'its bias is not a float constant with one value per output channel (shape [channels] or [1, channels])' });
        continue;
      }
      const name = graph.uniqueName(`${w.node}_corrected_bias`);
      graph.addInitializer(makeTensor(name, TensorProto_DataType.FLOAT, [out], new Uint8Array(Float32Array.from(oldData, (b, c) => b + shift[c]).buffer)));
      const previous = node.input[2];
      node.input[2] = name;
      if (previous) graph.removeIfUnused(previous);
    } else {
      // (A MatMul without a constant bias Add, or a Gemm that ignores C: beta = 0.)
      if (node.opType === 'Gemm') for (let c = 0; c < out; c++) shift[c] *= floatAttribute(node, 'alpha', 1);
      const name = graph.uniqueName(`${w.node}_bias_correction`);
      const raw = graph.uniqueName(`${node.output[0]}_uncorrected`);
      graph.addInitializer(makeTensor(name, TensorProto_DataType.FLOAT, [out], new Uint8Array(Float32Array.from(shift).buffer)));
      graph.graph.node.push(graph.newNode('Add', [raw, name], [node.output[0]], `${w.node}_bias_correction_add`));
      node.output[0] = raw;
    }
    let norm = 0;
    for (const v of shift) norm += v * v;
    report.changed.push(`${w.node}: bias shifted by ‖Δb‖ = ${Math.sqrt(norm).toExponential(2)}`);
    yield w.node;
  }
  graph.sort();
  return report;
}
