/**
 * Weights that exporters compute from constants with data-movement operators — PyTorch's LSTMCell/GRUCell export
 * reorders the gates of W and R with Slice, Concat and Unsqueeze; others Reshape, Squeeze or Transpose a stored
 * weight — are folded into a constant, so the layer's weight is one and gets quantized (otherwise it is a computed
 * input and stays float). Only chains that end in a layer's weight input (Conv/Gemm/MatMul input 1, LSTM/GRU/RNN
 * W and R) and consist of Identity, Unsqueeze, Squeeze, Reshape, Flatten, Transpose, Concat and Slice over float32 or
 * float16 constants and integer parameter constants; in the main graph and in subgraph bodies. The folded constant
 * goes into the graph of the weights it comes from; the chain's nodes and constants go once nothing else reads them.
 */
import { AttributeProto_AttributeType, TensorProto_DataType, type GraphProto, type NodeProto, type TensorProto } from 'onnx-buf';

import { allNodes, dimsOf, intAttribute, intsAttribute, isFloat16Tensor, isFloatTensor, isOnnxDomain, ownedTensor, type Graph } from '../graph';
import { withDataRead } from '../model-io';
import { keptFloat, nodeLabel, type PassReport } from './pass';
import { RECURRENT, WEIGHT_INPUTS } from './quantize-recurrent';
import { QUANTIZABLE } from './quantize-weights';

/** The operators folded: they move values, never compute new ones. */
const MOVES = new Set(['Identity', 'Unsqueeze', 'Squeeze', 'Reshape', 'Flatten', 'Transpose', 'Concat', 'Slice']);

/** Nodes of one chain at most: a weight's reordering takes a handful (Silero VAD v5: 3 Slices, a Concat, an Unsqueeze per weight). */
const MAX_CHAIN_NODES = 64;

interface Value {
  dims: number[];
  /** Elements as float32 bits or float16 bits: moved, never read as numbers. */
  data: Uint32Array | Uint16Array;
  dataType: TensorProto_DataType;
}

/** The weight inputs of a node: Conv/Gemm/MatMul's second, LSTM/GRU/RNN's W and R. */
function weightSlots(node: NodeProto): number[] {
  if (!isOnnxDomain(node.domain)) return [];
  if (QUANTIZABLE.has(node.opType)) return [1];
  return RECURRENT.has(node.opType) ? WEIGHT_INPUTS.map(([slot]) => slot) : [];
}

export async function foldWeightChains(graph: Graph, keepFloat: string[] = []): Promise<PassReport> {
  const report: PassReport = { pass: 'fold-weight-chains', changed: [], skipped: [] };
  const keep = new Set(keepFloat);
  // Per graph holding the reader, the folded constant of each value (two readers of one value share it).
  const folded = new Map<GraphProto, Map<string, string>>();
  const madeIn = new Map<GraphProto, TensorProto[]>();
  // What the folded chains read: their nodes (removed at the end once unread) and the constants they read, per graph
  // holding them (removed there once unread).
  const chainNodes = new Map<NodeProto, GraphProto>();
  const chainConstants = new Map<GraphProto, Set<string>>();
  // From IR 4 on, an initializer also listed as a graph input is a default a feed may replace: not folded.
  const inputs = new Set(graph.graph.input.map((i) => i.name));
  for (const { node, scopes } of allNodes(graph)) {
    if (keptFloat(keep, node)) continue;
    for (const slot of weightSlots(node)) {
      const name = node.input[slot];
      if (!name || graph.constantIn(name, scopes)) continue;
      const scope = scopes[0] ?? graph.graph;
      const known = folded.get(scope)?.get(name);
      if (known) {
        node.input[slot] = known;
        continue;
      }
      const chain: Chain = { nodes: new Map(), constants: [], inputs };
      const value = await evaluate(graph, name, scopes, chain);
      if (typeof value !== 'object') {
        if (value !== undefined) report.skipped.push({ node: nodeLabel(node), reason: `its weight '${name}' is computed from constants, not folded: ${value}` });
        continue;
      }
      // The folded constant goes where the weights it comes from are (the innermost such graph, which the reader
      // sees): a cell applied in two bodies, reordering the same weights in each, then gets one constant.
      const home = [...scopes, graph.graph].find((g) => chain.constants.some((c) => c.float && c.home === g))!;
      const bytes = new Uint8Array(value.data.buffer, value.data.byteOffset, value.data.byteLength);
      // One layer applied twice (a recurrent cell over two steps, each step's export reordering its weights anew)
      // computes equal values from the same constants: one folded constant serves both.
      const made = madeIn.get(home) ?? madeIn.set(home, []).get(home)!;
      let tensor = made.find((t) => t.dataType === value.dataType && sameDims(dimsOf(t), value.dims) && sameBytes(t.rawData, bytes));
      if (!tensor) {
        tensor = ownedTensor(graph.uniqueName(`${name}_folded`), value.dataType, value.dims, bytes);
        graph.addInitializer(tensor, home);
        made.push(tensor);
      }
      (folded.get(scope) ?? folded.set(scope, new Map()).get(scope)!).set(name, tensor.name);
      node.input[slot] = tensor.name;
      for (const [n, g] of chain.nodes) chainNodes.set(n, g);
      for (const c of chain.constants) (chainConstants.get(c.home) ?? chainConstants.set(c.home, new Set()).get(c.home)!).add(c.name);
      const ops = [...new Set([...chain.nodes.keys()].map((n) => n.opType))].join(', ');
      report.changed.push(`${nodeLabel(node)}: its weight '${name}' (${ops} of constants) folded into the constant '${tensor.name}' [${value.dims.join(', ')}]`);
    }
  }
  removeDeadNodes(graph, chainNodes);
  for (const [home, names] of chainConstants) graph.removeAllUnused(names, home);
  return report;
}

/** What a chain's evaluation saw: its nodes (with the graph holding each) and the constants it read (with theirs). */
interface Chain {
  nodes: Map<NodeProto, GraphProto>;
  constants: Array<{ name: string; home: GraphProto; float: boolean }>;
  /** The main graph's inputs: an initializer among them is a default a feed may replace. */
  inputs: Set<string>;
}

/**
 * A value computed from constants by MOVES alone; undefined where it is not computed from constants alone (an
 * activation: nothing to say); or why a chain of constants is not folded (a parameter computed at run time, a
 * graph input's default, shapes that do not fit…).
 */
async function evaluate(graph: Graph, name: string, scopes: GraphProto[], chain: Chain): Promise<Value | string | undefined> {
  const found = graph.constantIn(name, scopes);
  if (found) {
    const home = found.home ?? graph.graph;
    if (home === graph.graph && chain.inputs.has(name)) return `'${name}' is also a graph input (a default a feed may replace)`;
    const t = await withDataRead(found.tensor);
    const float = isFloatTensor(t) || isFloat16Tensor(t);
    if (!float) return undefined;  // integer data: shapes, indices
    chain.constants.push({ name, home, float });
    return floatBits(t);
  }
  const at = graph.producerIn(name, scopes);
  if (!at || !MOVES.has(at.node.opType) || !isOnnxDomain(at.node.domain) || at.node.output.length !== 1) return undefined;
  const producer = at.node;
  if (chain.nodes.size >= MAX_CHAIN_NODES) return `more than ${MAX_CHAIN_NODES} operators`;
  chain.nodes.set(producer, at.scope);
  const label = `${producer.opType} '${nodeLabel(producer)}'`;
  const ints = async (i: number): Promise<number[] | string> => {
    const param = producer.input[i];
    const v = param ? await integers(graph, param, scopes) : undefined;
    if (!v) return `${label} reads '${param}', which is not an integer constant`;
    const home = graph.constantIn(param, scopes)!.home ?? graph.graph;
    chain.constants.push({ name: param, home, float: false });
    return v;
  };
  if (producer.opType === 'Concat') {
    const parts: Value[] = [];
    for (const input of producer.input) {
      const v = await evaluate(graph, input, scopes, chain);
      if (!(v instanceof Object)) return v;
      parts.push(v);
    }
    const axis = attributeInts(producer, 'axis', true);
    return axis === undefined ? `${label} has no axis` : concat(parts, axis[0]) ?? `${label}: its inputs' shapes do not fit together`;
  }
  const x = producer.input[0] ? await evaluate(graph, producer.input[0], scopes, chain) : undefined;
  if (!(x instanceof Object)) return x;
  const opset = graph.opset;
  const misfit = `${label}: its parameters do not fit its input [${x.dims.join(', ')}]`;
  switch (producer.opType) {
    case 'Identity':
      return x;
    case 'Unsqueeze': {
      const axes = opset >= 13 ? await ints(1) : attributeInts(producer, 'axes') ?? `${label} has no axes`;
      return typeof axes === 'string' ? axes : unsqueeze(x, axes) ?? misfit;
    }
    case 'Squeeze': {
      const axes = opset >= 13 ? (producer.input[1] ? await ints(1) : []) : attributeInts(producer, 'axes') ?? [];
      return typeof axes === 'string' ? axes : squeeze(x, axes) ?? misfit;
    }
    case 'Reshape': {
      const shape = await ints(1);
      return typeof shape === 'string' ? shape : reshape(x, shape, intAttribute(producer, 'allowzero', 0) === 1) ?? misfit;
    }
    case 'Flatten': {
      const rank = x.dims.length;
      let axis = intAttribute(producer, 'axis', 1);
      if (axis < 0) axis += rank;
      if (axis < 0 || axis > rank) return misfit;
      return { ...x, dims: [size(x.dims.slice(0, axis)), size(x.dims.slice(axis))] };
    }
    case 'Transpose': {
      const perm = attributeInts(producer, 'perm') ?? x.dims.map((_, i) => x.dims.length - 1 - i);
      return transpose(x, perm) ?? misfit;
    }
    case 'Slice': {
      const params = opset >= 10
        ? [await ints(1), await ints(2), producer.input[3] ? await ints(3) : [], producer.input[4] ? await ints(4) : []]
        : [attributeInts(producer, 'starts') ?? `${label} has no starts`, attributeInts(producer, 'ends') ?? `${label} has no ends`, attributeInts(producer, 'axes') ?? [], []];
      const why = params.find((p): p is string => typeof p === 'string');
      if (why) return why;
      const [starts, ends, axes, steps] = params as number[][];
      return slice(x, starts, ends, axes, steps) ?? misfit;
    }
    default:
      return undefined;
  }
}

const sameDims = (a: number[], b: number[]) => a.length === b.length && a.every((d, i) => d === b[i]);

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** An ints attribute's values; `single`: an int attribute's, as a list of one. */
function attributeInts(node: NodeProto, name: string, single = false): number[] | undefined {
  if (single) {
    const a = node.attribute.find((x) => x.name === name && x.type === AttributeProto_AttributeType.INT);
    return a ? [Number(a.i)] : undefined;
  }
  return intsAttribute(node, name);
}

/** An int64 or int32 constant's values (a Slice's starts, a Reshape's shape), or undefined. */
async function integers(graph: Graph, name: string, scopes: GraphProto[]): Promise<number[] | undefined> {
  const found = graph.constantIn(name, scopes);
  if (!found) return undefined;
  const t = await withDataRead(found.tensor);
  const raw = t.rawData;
  if (t.dataType === TensorProto_DataType.INT64) {
    if (raw.length === 0) return t.int64Data.map(Number);
    const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
    return Array.from({ length: raw.length / 8 }, (_, i) => Number(view.getBigInt64(8 * i, true)));
  }
  if (t.dataType === TensorProto_DataType.INT32) {
    if (raw.length === 0) return [...t.int32Data];
    const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
    return Array.from({ length: raw.length / 4 }, (_, i) => view.getInt32(4 * i, true));
  }
  return undefined;
}

/** A float32 or float16 constant's elements as bits (copied: the folded value is lowbit's own). */
function floatBits(t: TensorProto): Value {
  const dims = dimsOf(t);
  const count = size(dims);
  const half = isFloat16Tensor(t);
  const raw = t.rawData;
  let data: Uint32Array | Uint16Array;
  if (raw.length > 0) {
    const copy = new Uint8Array(raw);  // (not raw.slice(): a Node Buffer's slice is a view of the whole file)
    data = half ? new Uint16Array(copy.buffer, 0, count) : new Uint32Array(copy.buffer, 0, count);
  } else {
    data = half ? Uint16Array.from(t.int32Data) : new Uint32Array(Float32Array.from(t.floatData).buffer);
  }
  return { dims, data, dataType: half ? TensorProto_DataType.FLOAT16 : TensorProto_DataType.FLOAT };
}

const size = (dims: number[]) => dims.reduce((a, b) => a * b, 1);
const strides = (dims: number[]) => dims.map((_, i) => size(dims.slice(i + 1)));
const normalize = (axis: number, rank: number) => (axis < 0 ? axis + rank : axis);

function unsqueeze(x: Value, axes: number[]): Value | undefined {
  const rank = x.dims.length + axes.length;
  const at = new Set(axes.map((a) => normalize(a, rank)));
  if (at.size !== axes.length || [...at].some((a) => a < 0 || a >= rank)) return undefined;
  const dims: number[] = [];
  for (let i = 0, j = 0; i < rank; i++) dims.push(at.has(i) ? 1 : x.dims[j++]);
  return { ...x, dims };
}

function squeeze(x: Value, axes: number[]): Value | undefined {
  const at = new Set(axes.map((a) => normalize(a, x.dims.length)));
  if (at.size !== axes.length || [...at].some((a) => a < 0 || a >= x.dims.length || x.dims[a] !== 1)) return undefined;
  return { ...x, dims: x.dims.filter((d, i) => (axes.length === 0 ? d !== 1 : !at.has(i))) };
}

function reshape(x: Value, shape: number[], allowZero: boolean): Value | undefined {
  const dims = shape.map((d, i) => (d === 0 && !allowZero ? x.dims[i] : d));
  if (dims.some((d) => d === undefined || d < -1) || dims.filter((d) => d === -1).length > 1) return undefined;
  const known = size(dims.filter((d) => d !== -1));
  const inferred = dims.includes(-1) ? (known === 0 ? NaN : x.data.length / known) : undefined;
  if (inferred !== undefined && !Number.isInteger(inferred)) return undefined;
  const out = dims.map((d) => (d === -1 ? inferred! : d));
  return size(out) === x.data.length ? { ...x, dims: out } : undefined;
}

function transpose(x: Value, perm: number[]): Value | undefined {
  const rank = x.dims.length;
  if (perm.length !== rank || new Set(perm).size !== rank || perm.some((p) => p < 0 || p >= rank)) return undefined;
  const dims = perm.map((p) => x.dims[p]);
  const inStrides = strides(x.dims);
  return strided(x, dims, 0, perm.map((p) => inStrides[p]));
}

/** A tensor of `dims` whose element at index i is x's element at base + Σ i[k]·steps[k]: a transposition or slice. */
function strided(x: Value, dims: number[], base: number, steps: number[]): Value {
  const data = new (x.data.constructor as Uint32ArrayConstructor)(size(dims));
  const index = new Array<number>(dims.length).fill(0);
  for (let o = 0; o < data.length; o++) {
    let from = base;
    for (let k = 0; k < dims.length; k++) from += index[k] * steps[k];
    data[o] = x.data[from];
    for (let k = dims.length - 1; k >= 0 && ++index[k] === dims[k]; k--) index[k] = 0;
  }
  return { ...x, dims, data };
}

function concat(parts: Value[], axis: number): Value | undefined {
  const rank = parts[0].dims.length;
  const a = normalize(axis, rank);
  if (a < 0 || a >= rank || parts.some((p) => p.dims.length !== rank || p.dataType !== parts[0].dataType || p.dims.some((d, i) => i !== a && d !== parts[0].dims[i]))) {
    return undefined;
  }
  const dims = parts[0].dims.map((d, i) => (i === a ? parts.reduce((s, p) => s + p.dims[a], 0) : d));
  const outer = size(dims.slice(0, a));
  const data = new (parts[0].data.constructor as Uint32ArrayConstructor)(size(dims));
  let at = 0;
  for (let o = 0; o < outer; o++) {
    for (const p of parts) {
      const run = size(p.dims.slice(a));
      data.set(p.data.subarray(o * run, (o + 1) * run), at);
      at += run;
    }
  }
  return { ...parts[0], dims, data };
}

/** ONNX Slice: negative starts and ends count from the end, then are clamped (to [0, d] with positive steps, [-1, d-1] with negative ones). */
function slice(x: Value, starts: number[], ends: number[], axes: number[], steps: number[]): Value | undefined {
  const rank = x.dims.length;
  const along = axes.length ? axes.map((a) => normalize(a, rank)) : starts.map((_, i) => i);
  if (starts.length !== ends.length || along.length !== starts.length || (steps.length && steps.length !== starts.length)) return undefined;
  if (along.some((a) => a < 0 || a >= rank) || new Set(along).size !== along.length) return undefined;
  const first = x.dims.map(() => 0);
  const step = x.dims.map(() => 1);
  const dims = [...x.dims];
  for (const [i, a] of along.entries()) {
    const d = x.dims[a];
    const s = steps.length ? steps[i] : 1;
    if (s === 0) return undefined;
    let start = starts[i] < 0 ? starts[i] + d : starts[i];
    let end = ends[i] < 0 ? ends[i] + d : ends[i];
    if (s > 0) {
      start = Math.min(Math.max(start, 0), d);
      end = Math.min(Math.max(end, 0), d);
    } else {
      start = Math.min(Math.max(start, 0), d - 1);
      end = Math.min(Math.max(end, -1), d - 1);
    }
    first[a] = start;
    step[a] = s;
    dims[a] = Math.max(0, Math.ceil((end - start) / s));
  }
  const inStrides = strides(x.dims);
  return strided(x, dims, first.reduce((sum, f, k) => sum + f * inStrides[k], 0), step.map((st, k) => st * inStrides[k]));
}

/** Removes the folded chains' nodes that nothing reads any more (their readers first), each from the graph holding it. */
function removeDeadNodes(graph: Graph, nodes: Map<NodeProto, GraphProto>): void {
  for (let changed = true; changed;) {
    changed = false;
    for (const [n, home] of nodes) {
      if (n.output.some((o) => home.output.some((v) => v.name === o) || graph.consumers(o, home).length > 0)) continue;
      home.node.splice(home.node.indexOf(n), 1);
      nodes.delete(n);
      changed = true;
    }
  }
}
