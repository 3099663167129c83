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
import { NodeProtoSchema, type GraphProto, type ModelProto, type NodeProto, type TensorProto } from 'onnx-buf';
import { Graph, hasSubgraphs, isOnnxDomain, subgraphReads } from './graph';
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

/** The measured layers, the one that loses most first. */
export function bySensitivity<T extends Pick<WeightLayerReport, 'sensitivity'>>(layers: T[]): Array<T & Required<Pick<WeightLayerReport, 'sensitivity'>>> {
  return layers.filter((l): l is T & Required<Pick<WeightLayerReport, 'sensitivity'>> => l.sensitivity !== undefined)
    .sort((a, b) => a.sensitivity.cosine - b.sensitivity.cosine);
}

/** A graph and the graphs around it (innermost first), with what each defines. */
class Scopes {
  readonly levels: Array<{ graph: GraphProto; producers: Map<string, NodeProto>; initializers: Map<string, TensorProto>; inputs: Set<string> }>;

  constructor(graphs: GraphProto[]) {
    this.levels = graphs.map((graph) => {
      const producers = new Map<string, NodeProto>();
      for (const n of graph.node) for (const o of n.output) if (o) producers.set(o, n);
      return { graph, producers, initializers: new Map(graph.initializer.map((t) => [t.name, t])), inputs: new Set(graph.input.map((i) => i.name)) };
    });
  }

  /** The innermost level defining `name`, and its producer or initializer (neither: an input). */
  find(name: string): { level: number; producer?: NodeProto; initializer?: TensorProto } | undefined {
    for (const [level, l] of this.levels.entries()) {
      const producer = l.producers.get(name);
      const initializer = l.initializers.get(name);
      if (producer || initializer || l.inputs.has(name)) return { level, producer, initializer };
    }
    return undefined;
  }
}

/** A subgraph's place: the node holding it (by label) and the attribute, from the main graph inwards. */
type SubgraphPath = Array<{ owner: string; branch: string }>;

/** The subgraphs a node's graph attribute holds (`graph`, or the `graphs` list). */
function graphsOf(node: NodeProto): Array<{ branch: string; graph: GraphProto }> {
  return node.attribute.flatMap((a) => [...(a.g ? [{ branch: a.name, graph: a.g }] : []), ...a.graphs.map((graph) => ({ branch: a.name, graph }))]);
}

/** The one subgraph `branch` of the one node labelled `owner` in `graph`; undefined when there is none or several. */
function subgraphAt(graph: GraphProto, owner: string, branch: string): GraphProto | undefined {
  const holders = graph.node.filter((n) => nodeLabel(n) === owner);
  const inner = holders.length === 1 ? graphsOf(holders[0]).filter((g) => g.branch === branch) : [];
  return inner.length === 1 ? inner[0].graph : undefined;
}

/**
 * Where the node computing `output` sits inside subgraph `branch` of main-graph node `owner`, at any depth: the path
 * of holding nodes and attributes from the main graph, or undefined when it is not there or in several places (sibling
 * subgraphs, such as an If's two branches, may reuse names; reports name a layer by its outermost subgraph only).
 */
function pathTo(model: ModelProto, owner: string, branch: string, output: string): SubgraphPath | undefined {
  const found: SubgraphPath[] = [];
  const search = (graph: GraphProto, path: SubgraphPath): void => {
    if (graph.node.some((n) => n.output.includes(output))) found.push(path);
    for (const n of graph.node) for (const sub of graphsOf(n)) search(sub.graph, [...path, { owner: nodeLabel(n), branch: sub.branch }]);
  };
  const start = subgraphAt(model.graph!, owner, branch);
  if (start) search(start, [{ owner, branch }]);
  return found.length === 1 ? found[0] : undefined;
}

/** The graphs along a path, innermost first, ending with the main graph; undefined when a step is missing or ambiguous. */
function scopesOf(model: ModelProto, path: SubgraphPath): GraphProto[] | undefined {
  const graphs = [model.graph!];
  for (const { owner, branch } of path) {
    const inner = subgraphAt(graphs[0], owner, branch);
    if (!inner) return undefined;
    graphs.unshift(inner);
  }
  return graphs;
}

/** Puts a subgraph's nodes in an order where each comes after the nodes computing its inputs; false on a cycle. */
function sortSubgraph(scope: GraphProto): boolean {
  const produced = new Set(scope.node.flatMap((n) => n.output).filter((o) => o));
  const ready = new Set<string>();
  const remaining = [...scope.node];
  const order: NodeProto[] = [];
  while (remaining.length > 0) {
    const i = remaining.findIndex((n) => [...n.input, ...subgraphReads(n)].every((x) => !produced.has(x) || ready.has(x)));
    if (i < 0) return false;
    const [n] = remaining.splice(i, 1);
    order.push(n);
    for (const o of n.output) ready.add(o);
  }
  scope.node.splice(0, scope.node.length, ...order);
  return true;
}

/**
 * @internal `base` (a clone; the data bytes are shared) with the nodes computing a layer replaced by `donor`'s, and with the
 * donor's nodes and constants feeding them that base lacks; base's constants nothing reads any more go. `outputs`:
 * the layer's output values (the donor nodes producing them are taken whatever they are); `label`: the layer's node
 * label (that node is taken too: a bias correction can put an Add after it under its output's name); `place`: for a
 * layer inside a subgraph of a main-graph node (at any depth), that node's label and the subgraph's attribute, as
 * reports give them. A string says why the layer cannot be moved.
 */
export function graftLayer(base: ModelProto, donor: ModelProto, outputs: string[], label: string, op: string,
  place?: { owner: string; branch: string }): ModelProto | string {
  const where = place ? `${place.branch} of ${place.owner}` : 'its main graph';
  const path = place ? pathTo(donor, place.owner, place.branch, outputs[0]) : [];
  if (!path) return `the quantized model computes '${outputs[0]}' nowhere, or in more than one place, in ${where} (at any depth)`;
  const donorGraphs = scopesOf(donor, path);
  const variant = cloneSharingData(base);
  const baseGraphs = scopesOf(variant, path);
  if (!donorGraphs || !baseGraphs) return `the float model has no single subgraph at ${path.map((p) => `${p.branch} of ${p.owner}`).join(', inside ')}`;
  const [donorScopes, baseScopes] = [new Scopes(donorGraphs), new Scopes(baseGraphs)];
  const taken = new Map<NodeProto, number>();  // donor node → its level
  for (const o of outputs) {
    const p = donorScopes.levels[0].producers.get(o);
    if (!p) return `the quantized model computes no value '${o}' in ${where}`;
    taken.set(p, 0);
  }
  const labelled = donorScopes.levels[0].graph.node.find((n) => nodeLabel(n) === label);
  if (labelled) taken.set(labelled, 0);
  // Walk back from the taken nodes' inputs to values base computes the same way (the float layers' outputs, the
  // model's inputs), taking the quantization nodes on the way and the constants base lacks.
  const copies = new Map<string, { tensor: TensorProto; level: number }>();
  const seen = new Set<string>();
  const pending = [...taken.keys()].flatMap((n) => n.input);
  // The layer's node itself, taken once: by its label, or else as the first node of its op type on the way
  // (unnamed, its output renamed by a bias correction).
  let layerNodeTaken = labelled !== undefined;
  while (pending.length > 0) {
    const name = pending.pop()!;
    if (name === '' || seen.has(name)) continue;
    seen.add(name);
    const d = donorScopes.find(name);
    if (d?.producer && taken.has(d.producer)) continue;
    const b = baseScopes.find(name);
    if (d?.initializer) {
      if (!b?.initializer || !sameStoredData(b.initializer, d.initializer)) copies.set(name, { tensor: d.initializer, level: d.level });
      continue;
    }
    if (b) continue;
    if (!d?.producer) return d ? `it reads the input '${name}', which the float model does not have` : `it reads '${name}', which nothing in the quantized model computes`;
    const p = d.producer;
    const layerNode: boolean = p.opType === op && !layerNodeTaken;
    if (hasSubgraphs(p) || !isOnnxDomain(p.domain) && p.domain !== 'com.microsoft' || !(QUANTIZATION_NODES.has(p.opType) || layerNode)) {
      return `its inputs in the quantized model pass through ${p.opType} '${nodeLabel(p)}', which is not part of quantizing it`;
    }
    layerNodeTaken ||= layerNode;
    taken.set(p, d.level);
    pending.push(...p.input);
  }
  // Base's nodes computing what the taken ones compute go, whole: one computing anything else too cannot.
  const takenOutputs = new Set([...taken.keys()].flatMap((n) => n.output).filter((o) => o));
  const replaced = new Map<NodeProto, number>();
  for (const [n, level] of taken) {
    for (const o of n.output.filter((x) => x)) {
      const b = baseScopes.levels[level].producers.get(o);
      if (b) replaced.set(b, level);
      else if (baseScopes.find(o)) return `the quantized model computes '${o}', which the float model defines otherwise`;
    }
  }
  for (const b of replaced.keys()) {
    const other = b.output.find((o) => o && !takenOutputs.has(o));
    if (other) return `the float model's node '${nodeLabel(b)}' also computes '${other}', which the quantized model's layer does not`;
  }
  const g = new Graph(variant);
  // The taken nodes' new values keep their names: the constants' copies must not take them.
  for (const o of takenOutputs) if (!baseScopes.find(o)) g.uniqueName(o);
  const renamed = new Map<string, string>();
  for (const [name, { tensor, level }] of copies) renamed.set(name, g.copyConstants([tensor], baseScopes.levels[level].graph)[0].name);
  const read = new Set([...replaced.keys()].flatMap((n) => n.input));
  for (const [level, { graph }] of baseScopes.levels.entries()) {
    const from = donorScopes.levels[level].graph.node.filter((n) => taken.get(n) === level);
    graph.node.splice(0, graph.node.length, ...graph.node.filter((n) => !replaced.has(n)), ...from.map((n) => {
      const copy = clone(NodeProtoSchema, n);
      copy.input = copy.input.map((i) => renamed.get(i) ?? i);
      return copy;
    }));
  }
  for (const o of donor.opsetImport) {
    if (!isOnnxDomain(o.domain) && !variant.opsetImport.some((v) => v.domain === o.domain)) variant.opsetImport.push({ ...o });
  }
  for (const { graph } of baseScopes.levels) g.removeAllUnused(read, graph);
  for (const { graph } of baseScopes.levels.slice(0, -1)) if (!sortSubgraph(graph)) return `the grafted nodes form a cycle in ${where}`;
  g.sort();
  return variant;
}

/**
 * @internal Each layer's sensitivity (in the main graph and in subgraphs: layer.sensitivity, or layer.sensitivitySkipped
 * saying why not), on the feeds,
 * against the prepared float model's outputs. One onnxruntime session per layer, at the default optimisation level
 * with one thread, as the evaluation.
 */
export async function measureSensitivity(prepared: ModelProto, quantized: ModelProto, layers: WeightLayerReport[], feedsList: Feed[], host: OrtHost,
  context: { bug: string; onLayer?: (done: number, total: number) => void; signal?: AbortSignal }): Promise<void> {
  if (layers.length === 0 || feedsList.length === 0) return;
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
  const floatSession = await openSession(await serializeModelAsync(base), options, 'the prepared float model', context.bug, { host });
  const floatOutputs = [];
  let names: readonly string[];
  try {
    names = floatSession.outputNames;
    for (const [index, tensors] of tensorsOf.entries()) {
      context.signal?.throwIfAborted();
      floatOutputs.push(await runSession(floatSession, tensors, undefined, `the prepared float model on evaluation feed ${index}`, context.bug));
    }
  } finally {
    await floatSession.release();
  }
  for (const [i, l] of layers.entries()) {
    context.signal?.throwIfAborted();
    const variant = graftLayer(base, quantized, [l.output], l.node, l.op, l.subgraph && l.branch ? { owner: l.subgraph, branch: l.branch } : undefined);
    if (typeof variant === 'string') {
      l.sensitivitySkipped = variant;
      continue;
    }
    const session = await openSession(await serializeModelAsync(variant), options, `the float model with only layer '${l.node}' quantized`, context.bug, { host });
    const comparison = new OutputComparison();
    try {
      for (const [index, tensors] of tensorsOf.entries()) {
        context.signal?.throwIfAborted();
        const q = await runSession(session, tensors, undefined, `the float model with only layer '${l.node}' quantized, on evaluation feed ${index}`, context.bug);
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
    context.onLayer?.(i + 1, layers.length);
  }
}
