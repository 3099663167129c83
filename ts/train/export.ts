/**
 * Writes a trained model back to ONNX: parameters and BatchNormalization
 * running statistics into their tensors, and for quantization-aware training
 * a QDQ model with the learned scales — integer weights + DequantizeLinear,
 * QuantizeLinear → DequantizeLinear on each quantized layer's input. GDRQ's
 * group scales are folded into the following BatchNormalization where a Conv
 * feeds only a BN (the weights then dequantize with scale 1).
 */
import { TensorProto_DataType, type TensorProto } from 'onnx-buf';

import { Graph, makeIntAttribute, makeTensor } from '../onnx/graph';
import { readModel, serializeModel } from '../onnx/model-io';
import { fitOnnxruntime } from '../onnx/passes/fit-onnxruntime';
import { unconvertibleReason, upgradeOpset } from '../onnx/passes/upgrade-opset';
import { packInt2, packInt4 } from '../pack';
import { quantizeTensor } from '../quantize';
import type { TrainableModel } from './model';
import type { ExportableQuantizer, QuantizerExport } from './quantizers';
import { TrainingError } from './model';

function setFloat(t: TensorProto, values: Float32Array): void {
  t.dataType = TensorProto_DataType.FLOAT;
  t.floatData = [];
  t.rawData = new Uint8Array(Float32Array.from(values).buffer);
}

function floatTensor(name: string, dims: number[], values: Float32Array): TensorProto {
  return makeTensor(name, TensorProto_DataType.FLOAT, dims, new Uint8Array(Float32Array.from(values).buffer));
}

/** The integer codes of weights under an exported quantizer: round(clip(w)/s) saturated, as the engine's forward. */
export function weightCodes(w: Float32Array, dims: number[], q: QuantizerExport): Int8Array {
  const clip = q.clip;
  const clipped = clip === undefined ? w : Float32Array.from(w, (v) => Math.min(clip, Math.max(-clip, v)));
  return quantizeTensor(clipped, {
    shape: dims, bits: q.codeBits ?? q.bits, signed: true, scale: q.scale,
    ...(q.axis === undefined ? { granularity: 'tensor' as const } : { granularity: 'channel' as const, axis: q.axis }),
  }).values as Int8Array;
}

function codesTensor(name: string, dims: number[], codes: Int8Array, bits: number): TensorProto {
  if (bits === 8) return makeTensor(name, TensorProto_DataType.INT8, dims, new Uint8Array(codes.buffer));
  if (bits === 4) return makeTensor(name, TensorProto_DataType.INT4, dims, packInt4(codes));
  if (bits === 2) return makeTensor(name, TensorProto_DataType.INT2, dims, packInt2(codes));
  throw new TrainingError(`Weights of ${bits} bits have no ONNX storage type; use 2, 4 or 8.`);
}

function zeroPoint(name: string, bits: number, signed: boolean, value = 0): TensorProto {
  const type = bits === 8 ? (signed ? TensorProto_DataType.INT8 : TensorProto_DataType.UINT8) : signed ? TensorProto_DataType.INT4 : TensorProto_DataType.UINT4;
  if (bits !== 8 && bits !== 4) throw new TrainingError(`Activations of ${bits} bits have no ONNX QuantizeLinear type; use 4 or 8.`);
  return makeTensor(name, type, [], Uint8Array.of(value));
}

export interface ExportLayer {
  node: string;
  weightBits?: number;
  /** Weights whose codes take fewer bits than their storage (reduceRange: 7, in int8). */
  weightCodeBits?: number;
  activationBits?: number;
  weightScale?: number[];
  activationScale?: number;
  foldedIntoBatchNorm?: string;
}

/** The opset a QDQ export needs for these bits: 2-bit types arrived in 25, 4-bit ones in 21, per-axis QDQ in 13. */
function opsetForBits(bits: number[]): number {
  return bits.includes(2) ? 25 : bits.some((b) => b < 8) ? 21 : 13;
}

/**
 * Why the model with its quantizers could not be exported — its opset cannot be raised to what their bits need —,
 * asked before training so that no run ends in it.
 */
export function exportBlocker(model: TrainableModel): string | undefined {
  const bits = [...model.quantizers.values()].flatMap((q) => [(q.weight as ExportableQuantizer | undefined)?.bits ?? 8, (q.activation as ExportableQuantizer | undefined)?.bits ?? 8]);
  return bits.length === 0 ? undefined : opsetBlocker(model.graph, opsetForBits(bits));
}

/** Why the graph cannot be raised to opset `needed`, or undefined when it can (or is there already). */
function opsetBlocker(graph: Graph, needed: number): string | undefined {
  const why = graph.opset < needed ? unconvertibleReason(graph) : undefined;
  return why && `The quantized model needs opset ${needed}, and this model (opset ${graph.opset}) cannot be converted: ${why}.`;
}

/** Serialises the model with its current parameters (and, when quantizers are set, as a QDQ model). */
export function exportModel(model: TrainableModel): { bytes: Uint8Array; layers: ExportLayer[] } {
  const copy = readModel(serializeModel(model.graph.model));
  const graph = new Graph(copy);
  for (const p of model.params.values()) setFloat(graph.constant(p.name)!, p.value);
  for (const node of model.nodes) {
    if (node.opType !== 'BatchNormalization') continue;
    for (const name of node.input.slice(3, 5)) {
      const stats = model.constants.get(name);
      if (stats) setFloat(graph.constant(name)!, stats.data);
    }
  }
  const layers: ExportLayer[] = [];
  const quantized = model.layers.filter((l) => model.quantizers.has(l.node));
  if (quantized.length === 0) return { bytes: serializeModel(copy), layers };

  const exports = quantized.map((l) => {
    const q = model.quantizers.get(l.node)!;
    return { layer: l, weight: (q.weight as ExportableQuantizer | undefined)?.describe(), activation: (q.activation as ExportableQuantizer | undefined)?.describe() };
  });
  const bits = exports.flatMap((e) => [e.weight?.bits ?? 8, e.activation?.bits ?? 8]);
  const needed = opsetForBits(bits);
  const blocker = opsetBlocker(graph, needed);
  if (blocker) throw new TrainingError(blocker);
  if (graph.opset < needed) upgradeOpset(graph, needed);
  // Nodes of the copy, by output name (the copy has the same node order and names).
  const replaced: string[] = [];
  const byOutput = new Map(copy.graph!.node.map((n) => [n.output[0], n]));
  for (const { layer, weight, activation } of exports) {
    const node = byOutput.get(layer.node.output[0])!;
    const entry: ExportLayer = { node: layer.label };
    if (weight) {
      const w = layer.weight;
      const codes = weightCodes(w.value, w.dims, weight);
      const codesName = graph.uniqueName(`${w.name}_quantized`);
      const scaleName = graph.uniqueName(`${w.name}_scale`);
      const dequantized = graph.uniqueName(`${w.name}_dequantized`);
      let scale: Float32Array = weight.scale;
      let axis = weight.axis;
      const consumers = graph.consumers(node.output[0]);
      const bn = consumers.length === 1 && consumers[0].opType === 'BatchNormalization' && consumers[0].input[0] === node.output[0] &&
        !graph.isGraphOutput(node.output[0]) ? consumers[0] : undefined;
      if (weight.groups !== undefined && bn && node.opType === 'Conv') {
        // y = α_c·(W_q ⋆ x) + b_c feeding BN(γ, β, μ, σ²) equals (W_q ⋆ x + b_c/α_c) into BN(γ·α_c, β, μ/α_c, σ²).
        const alpha = weight.scale;
        const rescale = (name: string, f: (v: number, c: number) => number) => {
          const values = Float32Array.from(model.params.get(name)?.value ?? model.constants.get(name)!.data, f);
          const fresh = graph.uniqueName(`${name}_folded`);
          graph.addInitializer(floatTensor(fresh, [values.length], values));
          replaced.push(name);
          return fresh;
        };
        bn.input[1] = rescale(bn.input[1], (g, c) => g * alpha[c]);
        bn.input[3] = rescale(bn.input[3], (m, c) => m / alpha[c]);
        if (node.input[2]) node.input[2] = rescale(node.input[2], (b, c) => b / alpha[c]);
        scale = Float32Array.of(1);
        axis = undefined;
        entry.foldedIntoBatchNorm = bn.name || bn.output[0];
      }
      graph.addInitializer(codesTensor(codesName, w.dims, codes, weight.bits));
      graph.addInitializer(floatTensor(scaleName, scale.length === 1 ? [] : [scale.length], scale));
      const attrs = scale.length === 1 || axis === undefined ? [] : [makeIntAttribute('axis', axis)];
      copy.graph!.node.push(graph.newNode('DequantizeLinear', [codesName, scaleName], [dequantized], `${w.name}_dq`, attrs));
      node.input[layer.weightInput] = dequantized;
      entry.weightBits = weight.bits;
      if (weight.codeBits !== undefined) entry.weightCodeBits = weight.codeBits;
      entry.weightScale = Array.from(weight.scale);
    }
    if (activation) {
      const input = node.input[layer.activationInput];
      const scaleName = graph.uniqueName(`${input}_scale`);
      const zpName = graph.uniqueName(`${input}_zero_point`);
      const q = graph.uniqueName(`${input}_quantized`);
      const dq = graph.uniqueName(`${input}_dequantized`);
      graph.addInitializer(floatTensor(scaleName, [], activation.scale));
      graph.addInitializer(zeroPoint(zpName, activation.bits, activation.signed, activation.zeroPoint));
      copy.graph!.node.push(
        graph.newNode('QuantizeLinear', [input, scaleName, zpName], [q], `${input}_q_${layer.label}`),
        graph.newNode('DequantizeLinear', [q, scaleName, zpName], [dq], `${input}_dq_${layer.label}`));
      node.input[layer.activationInput] = dq;
      entry.activationBits = activation.bits;
      entry.activationScale = activation.scale[0];
    }
    layers.push(entry);
  }
  for (const name of [...exports.map((e) => e.layer.weight.name), ...replaced]) graph.removeIfUnused(name);
  fitOnnxruntime(graph);
  return { bytes: serializeModel(copy), layers };
}
