/**
 * Folds BatchNormalization into the Conv, Gemm or MatMul that feeds it:
 *   W'[c] = W[c] · γ_c / √(var_c + ε),  b'[c] = (b[c] − μ_c) · γ_c / √(var_c + ε) + β_c
 * (a Gemm with transB = 0 has its output channels in the weight's columns.)
 * MatMul has no bias input: MatMul → BN becomes MatMul → Add(b'), and
 * MatMul → Add(constant b) → BN folds into that Add. BN normalises axis 1, so a
 * MatMul folds only when its output is 2-D ([N, C], channels last = axis 1);
 * for [N, T, C] outputs axis 1 is T and the scale would be per row, not per
 * weight column.
 * Float16 weights are folded in float32 and stored as float16 again (as a float16
 * export stores them).
 * Not folded (reported): the producer's output also feeds other nodes or is a
 * graph output; weights or BN parameters are not constants; a MatMul whose
 * output rank is not known to be 2; ConvTranspose (other channel layout); a
 * float16 weight or bias that would overflow float16 once folded, or a float16
 * channel whose folded weights would all fall below float16's normal range.
 */
import { TensorProto_DataType, type NodeProto, type TensorProto } from 'onnx-buf';

import { toFloat16Array } from '../../float16';
import { dimsOf, floatAttribute, intAttribute, isChannelVector, ownedTensor, transposes, weightValues, type Graph } from '../graph';
import { nodeLabel, pauseClock, runSteps, type PassReport, type Steps } from './pass';

export function foldBatchNorm(graph: Graph): PassReport {
  return runSteps(foldBatchNormSteps(graph));
}

/**
 * foldBatchNorm in steps: pauses for the event loop (yields) before a node whenever `pause` says so, by default every
 * 10 ms (a large model's weights take a while).
 */
export function* foldBatchNormSteps(graph: Graph, pause: () => boolean = pauseClock()): Steps<PassReport> {
  const report: PassReport = { pass: 'fold-batchnorm', changed: [], skipped: [] };
  for (const bn of [...graph.graph.node]) {
    if (pause()) yield;
    if (bn.opType !== 'BatchNormalization') continue;
    const label = nodeLabel(bn);
    const skip = (reason: string) => report.skipped.push({ node: label, reason });
    if (intAttribute(bn, 'training_mode', 0) === 1) {
      // (opset 14+) It normalizes with each batch's own statistics, which no constant scale reproduces.
      skip('it is in training mode (training_mode = 1: batch statistics)');
      continue;
    }
    const producer = graph.producer(bn.input[0]);
    if (producer?.opType === 'MatMul' || (producer?.opType === 'Add' && graph.producer(producer.input[0])?.opType === 'MatMul')) {
      const why = foldIntoMatMul(graph, bn, producer);
      if (why) skip(why);
      else report.changed.push(`${label} folded into ${nodeLabel(producer.opType === 'Add' ? graph.producer(producer.input[0])! : producer)}`);
      continue;
    }
    if (!producer || (producer.opType !== 'Conv' && producer.opType !== 'Gemm')) {
      skip(`its input comes from ${producer ? producer.opType : 'a graph input'}, not Conv, Gemm or MatMul`);
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
    const wData = w && weightValues(w);
    const paramData = params.map((p) => p && weightValues(p));
    if (!wData || paramData.some((p) => !p)) {
      skip('weights or BatchNormalization parameters are not float32 or float16 constants');
      continue;
    }
    const [gamma, beta, mean, variance] = paramData as Float32Array[];
    const eps = floatAttribute(bn, 'epsilon', 1e-5);
    const dims = dimsOf(w!);
    const channelsFirst = producer.opType === 'Conv' || transposes(producer, 'transB');
    const channels = channelsFirst ? dims[0] : dims[1];
    const lengths = [gamma, beta, mean, variance].map((p) => p.length);
    if (lengths.some((n) => n !== channels)) {
      // (A mismatch among the four themselves makes the model invalid: onnxruntime refuses it.)
      skip(`BatchNormalization's scale, bias, mean and variance hold ${lengths.join(', ')} values but the weights have ${channels} channels`);
      continue;
    }
    if (producer.opType === 'Gemm' && (floatAttribute(producer, 'alpha', 1) !== 1 || floatAttribute(producer, 'beta', 1) !== 1)) {
      skip('Gemm alpha or beta is not 1');
      continue;
    }
    const scale = Float64Array.from(gamma, (g, c) => g / Math.sqrt(variance[c] + eps));
    const newW = new Float32Array(wData.length);
    if (channelsFirst) {
      const per = wData.length / channels;  // values per output channel
      for (let c = 0; c < channels; c++) for (let i = 0; i < per; i++) newW[c * per + i] = wData[c * per + i] * scale[c];
    } else {
      for (let r = 0; r < dims[0]; r++) for (let c = 0; c < channels; c++) newW[r * channels + c] = wData[r * channels + c] * scale[c];
    }
    const oldBias = producer.input[2] ? graph.constant(producer.input[2]) : undefined;
    if (producer.input[2] && !oldBias) {
      // (Read as zeros, its values would be dropped from the folded bias.)
      skip(`the bias '${producer.input[2]}' is computed, not a constant: it cannot be folded into a new constant bias`);
      continue;
    }
    const oldBiasData = oldBias ? weightValues(oldBias) : new Float32Array(channels);
    if (!oldBiasData || oldBiasData.length !== channels || (oldBias && !isChannelVector(oldBias, channels))) {
      skip('the bias is not a float constant with one value per channel (shape [channels] or [1, channels])');
      continue;
    }
    const newB = Float32Array.from(oldBiasData, (b, c) => (b - mean[c]) * scale[c] + beta[c]);
    const per = wData.length / channels;
    const why = float16Trouble(w!, newW, newB, channels, (i) => (channelsFirst ? Math.floor(i / per) : i % channels));
    if (why) {
      skip(why);
      continue;
    }
    const wName = graph.uniqueName(`${producer.input[1]}_bn_folded`);
    const bName = graph.uniqueName(`${label}_folded_bias`);
    const folded = [tensorLike(w!, wName, dims, newW), tensorLike(w!, bName, [channels], newB)];
    folded.forEach((t) => graph.addInitializer(t));
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

/** A new tensor of `values` in the type of `like` (float32, or float16 rounded to nearest). */
function tensorLike(like: TensorProto, name: string, dims: number[], values: Float32Array): TensorProto {
  if (like.dataType !== TensorProto_DataType.FLOAT16) return ownedTensor(name, TensorProto_DataType.FLOAT, dims, new Uint8Array(values.buffer));
  return ownedTensor(name, TensorProto_DataType.FLOAT16, dims, new Uint8Array(toFloat16Array(values).buffer));
}

/**
 * Why folded weights and bias cannot be stored as float16 (the layer's type), or undefined: a value beyond
 * float16's range (65504) or not finite; or a channel whose largest folded weight falls below float16's normal
 * range (2^-14), where its weights would keep only a few significant bits.
 */
function float16Trouble(like: TensorProto, w: Float32Array, b: Float32Array, channels: number, channelOf: (i: number) => number): string | undefined {
  if (like.dataType !== TensorProto_DataType.FLOAT16) return undefined;
  const fits = (v: number) => Number.isFinite(v) && Math.abs(v) < 65520;  // 65520 and above round to Infinity
  if (!w.every(fits) || !b.every(fits)) return 'the folded weights or bias would overflow float16 (or are not finite)';
  const largest = new Float64Array(channels);
  w.forEach((v, i) => (largest[channelOf(i)] = Math.max(largest[channelOf(i)], Math.abs(v))));
  const tiny = largest.findIndex((m) => m > 0 && m < 2 ** -14);
  return tiny < 0 ? undefined : `channel ${tiny}'s folded weights fall below float16's normal range (they would keep few significant bits)`;
}

/** Rank of a value when the graph declares it or it comes from an op with a known output rank. */
function knownRank(graph: Graph, name: string): number | undefined {
  const info = [...graph.graph.valueInfo, ...graph.graph.input, ...graph.graph.output].find((v) => v.name === name);
  const type = info?.type?.value;
  if (type?.case === 'tensorType' && type.value.shape) return type.value.shape.dim.length;
  const producer = graph.producer(name);
  if (!producer) return undefined;
  if (producer.opType === 'Flatten' || producer.opType === 'Gemm') return 2;
  if (['Relu', 'Clip', 'Sigmoid', 'HardSigmoid', 'HardSwish', 'LeakyRelu', 'Tanh', 'Identity', 'Dropout', 'BatchNormalization'].includes(producer.opType)) {
    return knownRank(graph, producer.input[0]);
  }
  if (['Add', 'Sub', 'Mul', 'Div'].includes(producer.opType)) {
    // A per-channel constant operand (rank ≤ 1) does not change the other operand's rank.
    const constant = producer.input.findIndex((i) => { const t = graph.constant(i); return t && dimsOf(t).length <= 1; });
    return constant < 0 ? undefined : knownRank(graph, producer.input[1 - constant]);
  }
  if (producer.opType === 'MatMul') {
    const b = graph.constant(producer.input[1]);
    return b && dimsOf(b).length === 2 ? knownRank(graph, producer.input[0]) : undefined;
  }
  return undefined;
}

/** Folds BN into MatMul (→ Add) or MatMul → Add; returns why not, or undefined when folded. */
function foldIntoMatMul(graph: Graph, bn: NodeProto, producer: NodeProto): string | undefined {
  const matmul = producer.opType === 'MatMul' ? producer : graph.producer(producer.input[0])!;
  const add = producer.opType === 'Add' ? producer : undefined;
  const chain = add ? [matmul.output[0], add.output[0]] : [matmul.output[0]];
  if (chain.some((v) => graph.consumers(v).length !== 1 || graph.isGraphOutput(v))) return 'the MatMul output is also used elsewhere';
  if (bn.output.length > 1 && bn.output.slice(1).some((o) => o !== '')) return 'it is in training mode (running statistics are outputs)';
  const w = graph.constant(matmul.input[1]);
  const wData = w && weightValues(w);
  const params = [1, 2, 3, 4].map((i) => { const t = graph.constant(bn.input[i]); return t && weightValues(t); });
  if (!wData || params.some((p) => !p)) return 'weights or BatchNormalization parameters are not float32 or float16 constants';
  const dims = dimsOf(w!);
  if (dims.length !== 2) return `the MatMul weight is ${dims.length}-D, not 2-D`;
  const rank = knownRank(graph, matmul.input[0]);
  if (rank !== 2) {
    return rank === undefined ? 'the MatMul output rank is unknown (BN normalises axis 1, which must be the channel axis)'
      : `the MatMul output is ${rank}-D: BN's axis 1 is not the weight's output channels`;
  }
  const [gamma, beta, mean, variance] = params as Float32Array[];
  const channels = dims[1];
  if (gamma.length !== channels) return `BatchNormalization has ${gamma.length} channels but the weights have ${channels}`;
  let bias: Float32Array = new Float32Array(channels);
  if (add) {
    const b = graph.constant(add.input[1]);
    const bData = b && weightValues(b);
    if (!bData || bData.length !== channels || !isChannelVector(b, channels) || add.input[0] !== matmul.output[0]) {
      return 'the Add after MatMul is not a per-channel float constant bias (shape [channels] or [1, channels])';
    }
    bias = bData;
  }
  const eps = floatAttribute(bn, 'epsilon', 1e-5);
  const scale = Float64Array.from(gamma, (g, c) => g / Math.sqrt(variance[c] + eps));
  const newW = Float32Array.from(wData, (v, i) => v * scale[i % channels]);
  const newB = Float32Array.from(bias, (b, c) => (b - mean[c]) * scale[c] + beta[c]);
  const why = float16Trouble(w!, newW, newB, channels, (i) => i % channels);
  if (why) return why;
  const wName = graph.uniqueName(`${matmul.input[1]}_bn_folded`);
  const bName = graph.uniqueName(`${nodeLabel(bn)}_folded_bias`);
  const folded = [tensorLike(w!, wName, dims, newW), tensorLike(w!, bName, [channels], newB)];
  folded.forEach((t) => graph.addInitializer(t));
  const oldNames = [matmul.input[1], ...(add ? [add.input[1]] : []), ...bn.input.slice(1)];
  matmul.input[1] = wName;
  if (add) {
    add.input[1] = bName;
    add.output[0] = bn.output[0];
    graph.graph.node.splice(graph.graph.node.indexOf(bn), 1);
  } else {
    // The BN node becomes the bias Add, in place (keeps the node order valid).
    const index = graph.graph.node.indexOf(bn);
    graph.graph.node.splice(index, 1, graph.newNode('Add', [matmul.output[0], bName], [bn.output[0]], `${bn.name || bn.output[0]}_as_bias`));
  }
  for (const name of oldNames) if (name) graph.removeIfUnused(name);
  return undefined;
}
