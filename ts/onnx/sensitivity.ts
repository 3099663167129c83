/**
 * Per-layer sensitivity: how close the model's outputs stay to the float model's when only one layer is quantized
 * (its weights, and its inputs as the quantized model quantizes them) and every other layer is float. The layer
 * output SQNR of the report accumulates the error of every layer before it; this isolates each layer's own share of
 * the output error, which is what deciding which layers to keep in float needs.
 *
 * The one-layer model is the prepared float model (after opset conversion and the folds) with the layer's node taken
 * from the quantized model, together with the nodes and constants feeding it that the float model lacks (graftLayer).
 */
import { clone } from '@bufbuild/protobuf';
import { NodeProtoSchema, type ModelProto, type NodeProto, type TensorProto } from 'onnx-buf';
import { Graph, hasSubgraphs, isOnnxDomain } from './graph';
import { cloneSharingData, sameStoredData, serializeModelAsync } from './model-io';
import { nodeLabel, nextTurn } from './passes/pass';
import { upgradeOpset } from './passes/upgrade-opset';
import type { WeightLayerReport } from './passes/quantize-weights';
import { feedBatch, meanCosine, OutputComparison } from './compare-outputs';
import { ortTensors, type Feed } from './calibrate';
import { openSession, runSession, type OrtHost } from './ort-session';

/**
 * Nodes a graft brings along with a layer: how the quantized model quantizes its inputs and weights (Q/DQ pairs,
 * dynamic quantization, the casts and scale products around an integer product, the Clip that narrows a range, the
 * Transpose of a stored weight, a bias correction's Add). Anything else on the way (another layer, a subgraph) means
 * the two models differ by more than this layer: it is not measured.
 */
const QUANTIZATION_NODES = new Set(['QuantizeLinear', 'DequantizeLinear', 'DynamicQuantizeLinear', 'MatMulInteger', 'ConvInteger', 'Cast', 'Mul', 'Add',
  'Clip', 'Transpose', 'Reshape', 'Identity', 'Constant']);

/** The model's outputs with only this layer quantized, against the float model: mean cosine over its float outputs, top-1 agreement of the first output with one. */
export interface LayerSensitivity {
  cosine: number;
  top1Agreement?: number;
}

/** The measured layers, the one that loses most first. */
export function bySensitivity<T extends Pick<WeightLayerReport, 'sensitivity'>>(layers: T[]): Array<T & Required<Pick<WeightLayerReport, 'sensitivity'>>> {
  return layers.filter((l): l is T & Required<Pick<WeightLayerReport, 'sensitivity'>> => l.sensitivity !== undefined)
    .sort((a, b) => a.sensitivity.cosine - b.sensitivity.cosine);
}

/**
 * `base` (a clone; the data bytes are shared) with the nodes computing a layer replaced by `donor`'s, and with the
 * donor's nodes and constants feeding them that base lacks; base's constants nothing reads any more go. `outputs`:
 * the layer's output values (the donor nodes producing them are taken whatever they are); `label`: the layer's node
 * label (that node is taken too: a bias correction can put an Add after it under its output's name). A string says
 * why the layer cannot be moved.
 */
export function graftLayer(base: ModelProto, donor: ModelProto, outputs: string[], label: string, op: string): ModelProto | string {
  const donorGraph = donor.graph!;
  const producers = new Map<string, NodeProto>();
  for (const n of donorGraph.node) for (const o of n.output) if (o) producers.set(o, n);
  const taken = new Set<NodeProto>();
  for (const o of outputs) {
    const p = producers.get(o);
    if (!p) return `the quantized model computes no value '${o}' in its main graph`;
    taken.add(p);
  }
  const labelled = donorGraph.node.find((n) => nodeLabel(n) === label);
  if (labelled) taken.add(labelled);
  const variant = cloneSharingData(base);
  const graph = variant.graph!;
  const baseProducers = new Map<string, NodeProto>();
  for (const n of graph.node) for (const o of n.output) if (o) baseProducers.set(o, n);
  const baseInitializers = new Map(graph.initializer.map((t) => [t.name, t]));
  const baseValues = new Set([...graph.input.map((i) => i.name), ...baseInitializers.keys(), ...baseProducers.keys()]);
  const donorInitializers = new Map(donorGraph.initializer.map((t) => [t.name, t]));
  const donorInputs = new Set(donorGraph.input.map((i) => i.name));
  // Walk back from the taken nodes' inputs to values base computes the same way (the float layers' outputs, the
  // model's inputs), taking the quantization nodes on the way and the constants base lacks.
  const copies = new Map<string, TensorProto>();
  const seen = new Set<string>();
  const pending = [...taken].flatMap((n) => n.input);
  // The layer's node itself when its label did not find it: unnamed, its output renamed by a bias correction.
  let ownOp = labelled !== undefined;
  while (pending.length > 0) {
    const name = pending.pop()!;
    if (name === '' || seen.has(name)) continue;
    seen.add(name);
    const p = producers.get(name);
    if (p && taken.has(p)) continue;
    const t = donorInitializers.get(name);
    if (t) {
      const same = baseInitializers.get(name);
      if (!same || !sameStoredData(same, t)) copies.set(name, t);
      continue;
    }
    if (baseValues.has(name)) continue;
    if (!p) return donorInputs.has(name) ? `it reads the model input '${name}', which the float model does not have` : `it reads '${name}', which nothing in the quantized model's main graph computes`;
    const own: boolean = p.opType === op && !ownOp;
    if (hasSubgraphs(p) || !isOnnxDomain(p.domain) && p.domain !== 'com.microsoft' || !(QUANTIZATION_NODES.has(p.opType) || own)) {
      return `its inputs in the quantized model pass through ${p.opType} '${nodeLabel(p)}', which is not part of quantizing it`;
    }
    ownOp ||= own;
    taken.add(p);
    pending.push(...p.input);
  }
  // Base's nodes computing what the taken ones compute go, whole: one computing anything else too cannot.
  const takenOutputs = new Set([...taken].flatMap((n) => n.output).filter((o) => o));
  const replaced = new Set<NodeProto>();
  for (const o of takenOutputs) {
    const b = baseProducers.get(o);
    if (b) replaced.add(b);
    else if (baseValues.has(o)) return `the quantized model computes '${o}', which is a constant or input of the float model`;
  }
  for (const b of replaced) {
    const other = b.output.find((o) => o && !takenOutputs.has(o));
    if (other) return `the float model's node '${nodeLabel(b)}' also computes '${other}', which the quantized model's layer does not`;
  }
  const g = new Graph(variant);
  // The taken nodes' new values keep their names: the constants' copies must not take them.
  for (const o of takenOutputs) if (!baseValues.has(o)) g.uniqueName(o);
  const renamed = new Map<string, string>();
  for (const [name, t] of copies) renamed.set(name, g.copyConstants([t])[0].name);
  const read = new Set(graph.node.filter((n) => replaced.has(n)).flatMap((n) => n.input));
  graph.node.splice(0, graph.node.length, ...graph.node.filter((n) => !replaced.has(n)),
    ...donorGraph.node.filter((n) => taken.has(n)).map((n) => {
      const copy = clone(NodeProtoSchema, n);
      copy.input = copy.input.map((i) => renamed.get(i) ?? i);
      return copy;
    }));
  for (const o of donor.opsetImport) {
    if (!isOnnxDomain(o.domain) && !variant.opsetImport.some((v) => v.domain === o.domain)) variant.opsetImport.push({ ...o });
  }
  g.removeAllUnused(read);
  g.sort();
  return variant;
}

/**
 * Each main-graph layer's sensitivity (layer.sensitivity, or layer.sensitivitySkipped saying why not), on the feeds,
 * against the prepared float model's outputs. One onnxruntime session per layer, at the default optimisation level
 * with one thread, as the evaluation.
 */
export async function measureSensitivity(prepared: ModelProto, quantized: ModelProto, layers: WeightLayerReport[], feedsList: Feed[], host: OrtHost,
  what: { bug: string; onLayer?: (done: number, total: number) => void; signal?: AbortSignal }): Promise<void> {
  const measured = layers.filter((l) => {
    if (l.subgraph) l.sensitivitySkipped = `inside ${l.branch ? `${l.branch} of ` : ''}${l.subgraph}: main-graph layers only`;
    return !l.subgraph;
  });
  if (measured.length === 0 || feedsList.length === 0) return;
  // Float nodes at the quantized model's opset, which it reached after the float model was prepared (storage of
  // 4- and 2-bit weights, 16-bit activations).
  let base = prepared;
  const opset = new Graph(quantized).opset;
  if (new Graph(prepared).opset < opset) {
    base = cloneSharingData(prepared);
    upgradeOpset(new Graph(base), opset);
  }
  const options = { intraOpNumThreads: 1 };
  const tensorsOf = feedsList.map(ortTensors);
  const floatSession = await openSession(await serializeModelAsync(base), options, 'the prepared float model', what.bug, { host });
  const floatOutputs = [];
  let names: readonly string[];
  try {
    names = floatSession.outputNames;
    for (const [index, tensors] of tensorsOf.entries()) {
      what.signal?.throwIfAborted();
      floatOutputs.push(await runSession(floatSession, tensors, undefined, `the prepared float model on evaluation feed ${index}`, what.bug));
    }
  } finally {
    await floatSession.release();
  }
  for (const [i, l] of measured.entries()) {
    what.signal?.throwIfAborted();
    const variant = graftLayer(base, quantized, [l.output], l.node, l.op);
    if (typeof variant === 'string') {
      l.sensitivitySkipped = variant;
      continue;
    }
    const session = await openSession(await serializeModelAsync(variant), options, `the float model with only layer '${l.node}' quantized`, what.bug, { host });
    const comparison = new OutputComparison();
    try {
      for (const [index, tensors] of tensorsOf.entries()) {
        what.signal?.throwIfAborted();
        const q = await runSession(session, tensors, undefined, `the float model with only layer '${l.node}' quantized, on evaluation feed ${index}`, what.bug);
        comparison.add(index, feedBatch(feedsList[index]), names, floatOutputs[index], q);
        await nextTurn();
      }
    } finally {
      await session.release();
    }
    const result = comparison.result();
    const ranked = result.outputs.find((o) => o.top1Agreement !== undefined);
    const cosine = meanCosine(result);
    if (cosine === undefined) l.sensitivitySkipped = 'no float output could be compared';
    else l.sensitivity = { cosine, ...(ranked ? { top1Agreement: ranked.top1Agreement } : {}) };
    what.onLayer?.(i + 1, measured.length);
  }
}
