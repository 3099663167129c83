/**
 * Folds BatchNormalization into the Conv or Gemm that feeds it:
 *   W'[c] = W[c] · γ_c / √(var_c + ε),  b'[c] = (b[c] − μ_c) · γ_c / √(var_c + ε) + β_c
 * Not folded (reported): the producer's output also feeds other nodes or is a
 * graph output; weights or BN parameters are not constants; a Gemm with
 * transB = 0 whose output channels are not the weight's rows is handled by
 * scaling columns; MatMul and ConvTranspose are left alone (no bias input /
 * other channel layout).
 */
import { TensorProto_DataType } from 'onnx-buf';

import { dimsOf, floatAttribute, floatData, intAttribute, makeTensor, type Graph } from '../graph';
import { nodeLabel, type PassReport } from './pass';

export function foldBatchNorm(graph: Graph): PassReport {
  const report: PassReport = { pass: 'fold-batchnorm', changed: [], skipped: [] };
  for (const bn of [...graph.graph.node]) {
    if (bn.opType !== 'BatchNormalization') continue;
    const label = nodeLabel(bn);
    const skip = (reason: string) => report.skipped.push({ node: label, reason });
    const producer = graph.producer(bn.input[0]);
    if (!producer || (producer.opType !== 'Conv' && producer.opType !== 'Gemm')) {
      skip(`its input comes from ${producer ? producer.opType : 'a graph input'}, not Conv or Gemm`);
      continue;
    }
    if (graph.consumers(bn.input[0]).length !== 1 || graph.isGraphOutput(bn.input[0])) {
      skip(`the ${producer.opType} output is also used elsewhere`);
      continue;
    }
    if (bn.output.length > 1 && bn.output.slice(1).some((o) => o !== '')) {
      skip('it is in training mode (running statistics are outputs)');
      continue;
    }
    const params = [1, 2, 3, 4].map((i) => graph.constant(bn.input[i]));
    const w = graph.constant(producer.input[1]);
    const wData = w && floatData(w);
    const paramData = params.map((p) => p && floatData(p));
    if (!wData || paramData.some((p) => !p)) {
      skip('weights or BatchNormalization parameters are not float constants');
      continue;
    }
    const [gamma, beta, mean, variance] = paramData as Float32Array[];
    const eps = floatAttribute(bn, 'epsilon', 1e-5);
    const dims = dimsOf(w!);
    const transB = producer.opType === 'Gemm' ? intAttribute(producer, 'transB', 0) : 1;
    const channels = producer.opType === 'Conv' || transB === 1 ? dims[0] : dims[1];
    if (gamma.length !== channels) {
      skip(`BatchNormalization has ${gamma.length} channels but the weights have ${channels}`);
      continue;
    }
    if (producer.opType === 'Gemm' && (floatAttribute(producer, 'alpha', 1) !== 1 || floatAttribute(producer, 'beta', 1) !== 1)) {
      skip('Gemm alpha or beta is not 1');
      continue;
    }
    const scale = Float64Array.from(gamma, (g, c) => g / Math.sqrt(variance[c] + eps));
    const newW = new Float32Array(wData.length);
    if (producer.opType === 'Conv' || transB === 1) {
      const per = wData.length / channels;
      for (let c = 0; c < channels; c++) for (let i = 0; i < per; i++) newW[c * per + i] = wData[c * per + i] * scale[c];
    } else {
      for (let r = 0; r < dims[0]; r++) for (let c = 0; c < channels; c++) newW[r * channels + c] = wData[r * channels + c] * scale[c];
    }
    const oldBias = producer.input[2] ? graph.constant(producer.input[2]) : undefined;
    const oldBiasData = oldBias ? floatData(oldBias) : new Float32Array(channels);
    if (!oldBiasData || oldBiasData.length !== channels) {
      skip('the bias is not a float constant with one value per channel');
      continue;
    }
    const newB = Float32Array.from(oldBiasData, (b, c) => (b - mean[c]) * scale[c] + beta[c]);
    const wName = graph.uniqueName(`${producer.input[1]}_bn_folded`);
    const bName = graph.uniqueName(`${label}_folded_bias`);
    graph.addInitializer(makeTensor(wName, TensorProto_DataType.FLOAT, dims, new Uint8Array(newW.buffer)));
    graph.addInitializer(makeTensor(bName, TensorProto_DataType.FLOAT, [channels], new Uint8Array(newB.buffer)));
    const oldW = producer.input[1];
    const oldB = producer.input[2];
    producer.input[1] = wName;
    producer.input[2] = bName;
    producer.output[0] = bn.output[0];
    graph.graph.node.splice(graph.graph.node.indexOf(bn), 1);
    for (const name of [oldW, oldB, ...bn.input.slice(1)]) if (name) graph.removeIfUnused(name);
    report.changed.push(`${label} folded into ${nodeLabel(producer)}`);
  }
  return report;
}
