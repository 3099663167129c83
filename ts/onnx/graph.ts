/**
 * A mutable view of an ONNX graph for the passes: constants (initializers and
 * Constant nodes), producer and consumer maps, topological order (with cycle
 * and dangling-input checks) and helpers to add tensors and nodes.
 */
import { clone, create } from '@bufbuild/protobuf';
import {
  AttributeProto_AttributeType, AttributeProtoSchema, NodeProtoSchema, TensorProto_DataType, TensorProtoSchema,
  type AttributeProto, type GraphProto, type ModelProto, type NodeProto, type TensorProto,
} from 'onnx-buf';

import { fromFloat16Array, toFloat16Bits } from '../float16';
import { OnnxModelError, rawLength, subgraphsOf } from './model-io';

export { subgraphsOf };

/** The end of messages about models onnxruntime would refuse as well. */
const INVALID_MODEL = 'the model is invalid (onnxruntime refuses it too); re-export it.';

/** How a pass finds a one-element constant's value: Graph.scalar, or a Graph.scalarLookup built once. */
export type ScalarOf = (name: string | undefined) => number | undefined;

/**
 * How many leading inputs an operator of the default domain must be given (named, not ''), at an opset, for the
 * operators lowbit's passes read or rewrite by position: at most what the spec requires (Resize-11/12's roi and
 * scales, and Gemm's C before opset 11, are left to onnxruntime); undefined for the others (onnxruntime checks them).
 */
function requiredInputs(opType: string, opset: number): number | undefined {
  switch (opType) {
    case 'BatchNormalization': return 5;
    case 'Where': case 'InstanceNormalization': return 3;
    case 'Conv': case 'ConvTranspose': case 'MatMul': case 'Gemm': case 'Add': case 'Sub': case 'Mul': case 'Div':
    case 'Gather': case 'PRelu': case 'QuantizeLinear': case 'DequantizeLinear': case 'Pow': case 'LayerNormalization':
      return 2;
    case 'Reshape': return opset >= 5 ? 2 : 1;
    case 'Upsample': return opset >= 9 ? 2 : 1;
    case 'Resize': return opset === 10 ? 2 : 1;
    case 'Slice': return opset >= 10 ? 3 : 1;
    case 'Pad': return opset >= 11 ? 2 : 1;
    case 'Unsqueeze': return opset >= 13 ? 2 : 1;
    case 'Clip': case 'Softmax': case 'LogSoftmax': case 'Hardmax': case 'Split': case 'Squeeze': case 'Dropout':
    case 'ReduceSum': case 'ReduceMean': case 'ReduceMax': case 'ReduceMin': case 'ReduceProd': case 'ReduceSumSquare':
    case 'ReduceL1': case 'ReduceL2': case 'ReduceLogSum': case 'ReduceLogSumExp': case 'Relu': case 'Identity':
    case 'Flatten': case 'Transpose': case 'Cast': case 'HardSigmoid': case 'HardSwish': case 'Sigmoid': case 'Tanh':
    case 'MaxPool': case 'AveragePool': case 'GlobalAveragePool': case 'GlobalMaxPool': case 'Concat': case 'Shape':
    case 'LeakyRelu': case 'Erf': case 'Gelu': case 'Sqrt':
      return 1;
    default: return undefined;
  }
}

/** The attributes that give a Constant its value (one of them). */
const CONSTANT_VALUES = new Set(['value', 'sparse_value', 'value_float', 'value_floats', 'value_int', 'value_ints', 'value_string', 'value_strings']);

/** Removes in place, in one pass, the items `keep` says no to (asked in order). */
function keepInPlace<T>(list: T[], keep: (item: T) => boolean): void {
  let kept = 0;
  for (const item of list) if (keep(item)) list[kept++] = item;
  list.length = kept;
}

/** The value of a one-element float constant of shape [] or [1], or undefined. */
function scalarValue(t: TensorProto | undefined): number | undefined {
  const data = t && t.dims.length <= 1 ? floatData(t) : undefined;
  return data && data.length === 1 ? data[0] : undefined;
}

export class Graph {
  readonly model: ModelProto;
  readonly graph: GraphProto;
  private names = new Set<string>();

  constructor(model: ModelProto) {
    this.model = model;
    this.graph = model.graph!;
    // Every name defined anywhere in the model, so that new names clash with none (a subgraph may not redefine an
    // enclosing scope's names, but sibling subgraphs, such as an If's two branches, may reuse each other's).
    addDefinedNames(this.graph, this.names);
    // Node names as well: passes name the nodes they insert with uniqueName too, and ONNX names a graph's nodes once.
    for (const n of [...this.graph.node, ...subgraphNodes(this).map((s) => s.node)]) if (n.name) this.names.add(n.name);
  }

  /** Opset of the default ONNX domain. */
  get opset(): number {
    const entry = this.model.opsetImport.find((o) => isOnnxDomain(o.domain));
    return entry ? Number(entry.version) : 0;
  }

  set opset(version: number) {
    const entry = this.model.opsetImport.find((o) => isOnnxDomain(o.domain));
    if (entry) entry.version = BigInt(version);
  }

  /** Declares an operator domain (version 1) the model's nodes will use, unless it is declared already. */
  importDomain(domain: string): void {
    if (!this.model.opsetImport.some((o) => o.domain === domain)) this.model.opsetImport.push({ ...this.model.opsetImport[0], domain, version: 1n });
  }

  /** The constant tensor behind a value name (initializer or Constant node output) of the main graph or of a subgraph `scope`. */
  constant(name: string, scope: GraphProto = this.graph): TensorProto | undefined {
    const init = scope.initializer.find((t) => t.name === name);
    if (init) return init;
    const node = this.producer(name, scope);
    if (node?.opType === 'Constant') return attribute(node, 'value')?.t;
    return undefined;
  }

  /**
   * The value of a one-element float constant of shape [] or [1] (which broadcasts without changing the
   * other operand's shape), or undefined.
   */
  scalar(name: string | undefined): number | undefined {
    return scalarValue(name ? this.constant(name) : undefined);
  }

  /**
   * Graph.scalar for the main graph through maps built once, for a pass that asks about many nodes (each call of
   * scalar scans every initializer and node). Exact while no constant it saw is replaced under the same name:
   * removing unused constants and adding new names (as passes do) change no answer it gives for the other names.
   */
  scalarLookup(): ScalarOf {
    const constantOf = this.constantLookup();
    return (name) => (name ? scalarValue(constantOf(name)) : undefined);
  }

  /** Graph.constant for the main graph through maps built once; exact as scalarLookup is. */
  constantLookup(): (name: string) => TensorProto | undefined {
    const initializers = new Map<string, TensorProto>();
    for (const t of this.graph.initializer) if (!initializers.has(t.name)) initializers.set(t.name, t);
    const producers = new Map<string, NodeProto>();
    for (const n of this.graph.node) for (const o of n.output) if (!producers.has(o)) producers.set(o, n);
    return (name) => {
      const node = producers.get(name);
      return initializers.get(name) ?? (node?.opType === 'Constant' ? attribute(node, 'value')?.t : undefined);
    };
  }

  /**
   * The element type of a value: declared (graph inputs and outputs, value_info), a constant's, or followed back
   * through its producers (most operators keep their first input's type; Cast, shape and comparison operators and
   * DequantizeLinear are known exceptions; an If, Loop or Scan output has its body's declared output type).
   * `scopes`: for a value inside subgraphs, those around it, innermost first (a name not found in one is looked
   * up in the next, then in the main graph). Undefined when it cannot be told.
   */
  elemType(name: string, scopes: GraphProto[] = []): number | undefined {
    let current = name;
    for (const g of [...scopes, this.graph]) {
      const known = new Map<string, number>();
      for (const v of [...g.input, ...g.valueInfo, ...g.output]) {
        if (v.type?.value.case === 'tensorType' && v.type.value.value.elemType) known.set(v.name, v.type.value.value.elemType);
      }
      for (const t of g.initializer) known.set(t.name, t.dataType);
      const producers = new Map<string, NodeProto>();
      for (const n of g.node) n.output.forEach((o) => producers.set(o, n));
      for (let steps = 0; steps <= g.node.length; steps++) {
        if (known.has(current)) return known.get(current);
        const p = producers.get(current);
        if (!p) break;  // defined further out
        if (p.opType === 'Constant' || p.opType === 'ConstantOfShape') return attribute(p, 'value')?.t?.dataType ?? TensorProto_DataType.FLOAT;
        if (p.opType === 'Cast') return intAttribute(p, 'to', 0) || undefined;
        if (['EyeLike', 'RandomNormalLike', 'RandomUniformLike', 'RandomNormal', 'RandomUniform'].includes(p.opType) && attribute(p, 'dtype')) {
          return intAttribute(p, 'dtype', 0) || undefined;
        }
        if (['Shape', 'Size', 'NonZero', 'ArgMax', 'ArgMin'].includes(p.opType)) return TensorProto_DataType.INT64;
        if (['Equal', 'Less', 'Greater', 'LessOrEqual', 'GreaterOrEqual', 'And', 'Or', 'Xor', 'Not', 'IsNaN', 'IsInf'].includes(p.opType)) return TensorProto_DataType.BOOL;
        const body = subgraphsOf(p)[0];
        if (body) {
          // If: output k is each branch's output k; Loop: its body's output k + 1 (after the condition); Scan: k.
          const declared = body.output[p.output.indexOf(current) + (p.opType === 'Loop' ? 1 : 0)]?.type;
          return declared?.value.case === 'tensorType' ? declared.value.value.elemType || undefined : undefined;
        }
        if (p.opType === 'DequantizeLinear' || p.opType === 'Where') current = p.input[1];
        else if (p.opType === 'OneHot') current = p.input[2];
        else current = p.input[0];
        if (!current) return undefined;
      }
    }
    return undefined;
  }

  /** The node of the main graph (or of a subgraph `scope`) that makes a value. */
  producer(name: string, scope: GraphProto = this.graph): NodeProto | undefined {
    return scope.node.find((n) => n.output.includes(name));
  }

  /**
   * The node that makes a value read inside subgraphs (`scopes`, innermost first; see constantIn) and the graph
   * holding it: the nearest one that defines the name, else the main graph's.
   */
  producerIn(name: string, scopes: GraphProto[]): { node: NodeProto; scope: GraphProto } | undefined {
    for (const scope of scopes) {
      const node = this.producer(name, scope);
      if (node) return { node, scope };
      if (scope.input.some((i) => i.name === name)) return undefined;  // a body input (a Loop's carried value)
    }
    const node = this.producer(name);
    return node ? { node, scope: this.graph } : undefined;
  }

  /** The nodes of the main graph (or of a subgraph `scope`) that read a value: as an input, or from inside their subgraphs (see subgraphReads). */
  consumers(name: string, scope: GraphProto = this.graph): NodeProto[] {
    return scope.node.filter((n) => readsValue(n, name));
  }

  /** A node to insert, named `baseName` made unique (see uniqueName), as passes name the nodes they add. */
  newNode(opType: string, inputs: string[], outputs: string[], baseName: string, attributes: AttributeProto[] = [], domain = ''): NodeProto {
    return makeNode(opType, inputs, outputs, this.uniqueName(baseName), attributes, domain);
  }

  /** Inserts nodes into a subgraph `scope` (or the main graph) right before `node`, keeping a body's order topological. */
  insertBefore(scope: GraphProto, node: NodeProto, ...nodes: NodeProto[]): void {
    scope.node.splice(scope.node.indexOf(node), 0, ...nodes);
  }

  isGraphOutput(name: string): boolean {
    return this.graph.output.some((o) => o.name === name);
  }

  /** The one node that reads a value, when exactly one does and it is no graph output (a pass may then change it). */
  onlyReader(name: string): NodeProto | undefined {
    const readers = this.consumers(name);
    return readers.length === 1 && !this.isGraphOutput(name) ? readers[0] : undefined;
  }

  /** A fresh value or node name based on `base` (clashing with no name of the model nor any name given before). */
  uniqueName(base: string): string {
    let name = base;
    for (let i = 1; this.names.has(name); i++) name = `${base}_${i}`;
    this.names.add(name);
    return name;
  }

  /** Adds an initializer to the main graph or to a subgraph `scope`. */
  addInitializer(tensor: TensorProto, scope: GraphProto = this.graph): void {
    scope.initializer.push(tensor);
    this.names.add(tensor.name);
  }

  /** Removes a constant (initializer or Constant node) of the main graph or of a subgraph `scope` when nothing in it reads it any more. */
  removeIfUnused(name: string, scope: GraphProto = this.graph): void {
    if (scope.node.some((n) => readsValue(n, name)) || scope.output.some((o) => o.name === name)) return;
    this.removeConstants(new Set([name]), scope);
  }

  /**
   * removeIfUnused for many constants of one graph, looking at what the graph reads once: a pass that replaces
   * many weights calls it at its end (each removeIfUnused walks every subgraph of the graph).
   */
  removeAllUnused(names: Iterable<string>, scope: GraphProto = this.graph): void {
    const read = namesRead(scope);
    const unused = new Set([...names].filter((name) => !read.has(name)));
    if (unused.size === 0) return;
    this.removeConstants(unused, scope);
  }

  /**
   * Removes constants by name, in one pass over each list (a search per name made thousands of layers quadratic):
   * per name its first initializer, then (main graph) its first graph input if an initializer went — models of IR
   * version < 4 list their initializers among the inputs, which would then need a feed —, and its first Constant node.
   */
  private removeConstants(names: ReadonlySet<string>, scope: GraphProto): void {
    const initializers = new Set<string>();
    keepInPlace(scope.initializer, (t) => !(names.has(t.name) && !initializers.has(t.name) && initializers.add(t.name)));
    if (scope === this.graph) {
      const inputs = new Set<string>();
      keepInPlace(scope.input, (v) => !(initializers.has(v.name) && !inputs.has(v.name) && inputs.add(v.name)));
    }
    const constants = new Set<string>();
    // (A Constant node has one output: the first named one is its value.)
    keepInPlace(scope.node, (n) => {
      const name = n.opType === 'Constant' ? n.output.find((o) => names.has(o) && !constants.has(o)) : undefined;
      if (name === undefined) return true;
      constants.add(name);
      return false;
    });
  }

  /**
   * Copies of constants (new names, the same values) added to a subgraph `scope` or the main graph, which cannot see
   * the originals. `baseNames`: what to name each copy after (default its tensor's name; a Constant node's tensor
   * is often unnamed).
   */
  copyConstants<T extends TensorProto[]>(tensors: T, scope: GraphProto = this.graph, baseNames?: string[]): T {
    return tensors.map((t, i) => {
      // Raw bytes stay shared (a weight copied into several bodies is written to external data once); values in a
      // typed field (float_data…) are copied with the rest.
      const name = this.uniqueName(baseNames?.[i] || t.name || 'constant');
      const copy = rawLength(t) > 0 ? ownedTensor(name, t.dataType, dimsOf(t), t.rawData) : Object.assign(clone(TensorProtoSchema, t), { name });
      this.addInitializer(copy, scope);
      return copy;
    }) as T;
  }

  /**
   * The constant tensor behind a value name and the subgraph that holds it (undefined: the main graph). `scopes`:
   * for a value read inside subgraphs, those around it, innermost first; the nearest one that defines the name wins.
   */
  constantIn(name: string, scopes: GraphProto[] = []): { tensor: TensorProto; home?: GraphProto } | undefined {
    for (const scope of scopes) {
      const init = scope.initializer.find((t) => t.name === name);
      if (init) return { tensor: init, home: scope };
      const producer = scope.node.find((p) => p.output.includes(name));
      if (producer) return producer.opType === 'Constant' && attribute(producer, 'value')?.t ? { tensor: attribute(producer, 'value')!.t!, home: scope } : undefined;
      if (scope.input.some((i) => i.name === name)) return undefined;  // a body input (a Loop's carried value)
    }
    const tensor = this.constant(name);
    return tensor ? { tensor } : undefined;
  }

  /**
   * Checks what ONNX requires of the graph's structure before any pass relies on it: every node has an op type,
   * main-graph node names are unique, Conv and ConvTranspose groups are 1 or more (a Conv's group divides its
   * constant weight's filters),
   * every value is defined once (graph input, initializer or node output; an initializer may also be listed as an
   * input), every graph output is defined, and there is no cycle or dangling input (topologicalOrder); in the main
   * graph and in bodies, the operators the passes read by position have their required inputs (requiredInputs) and
   * Constants a value. Bodies' values are onnxruntime's to check.
   */
  validate(): void {
    const opset = this.opset;
    for (const { node, scopes } of [...this.graph.node.map((node) => ({ node, scopes: [] as GraphProto[] })), ...subgraphNodes(this)]) {
      const what = `Node '${node.name || node.output[0] || '(unnamed)'}'${scopes.length ? ' (in a subgraph)' : ''}`;
      if (node.opType === '') throw new OnnxModelError(`${what} has no op_type: the model is invalid; re-export it.`);
      if (node.opType === 'Constant' && isOnnxDomain(node.domain) && !node.attribute.some((a) => CONSTANT_VALUES.has(a.name))) {
        throw new OnnxModelError(`${what} (Constant) has no value attribute (value, value_float, value_ints…): ${INVALID_MODEL}`);
      }
      // The passes read and rewrite these operators' inputs by position (a Softmax without its input became a
      // Flatten reading 'undefined').
      const required = isOnnxDomain(node.domain) ? requiredInputs(node.opType, opset) : undefined;
      if (required !== undefined) {
        const missing = Array.from({ length: required }, (_, i) => i).find((i) => !node.input[i]);
        if (missing !== undefined) {
          throw new OnnxModelError(`${what} (${node.opType}) has no input ${missing}, where ${node.opType} at opset ${opset} takes ` +
            `${required} required input${required > 1 ? 's' : ''} (it has ${node.input.length}: [${node.input.map((i) => `'${i}'`).join(', ')}]): ${INVALID_MODEL}`);
        }
      }
      // The passes divide channels by group; onnxruntime refuses such a node only when it runs it.
      if ((node.opType === 'Conv' || node.opType === 'ConvTranspose') && isOnnxDomain(node.domain)) {
        const group = intAttribute(node, 'group', 1);
        if (group < 1) throw new OnnxModelError(`${what} (${node.opType}): attribute 'group' is ${group}, where it must be 1 or more: ${INVALID_MODEL}`);
        const filters = node.opType === 'Conv' ? this.constantIn(node.input[1] ?? '', scopes)?.tensor.dims[0] : undefined;
        if (filters !== undefined && Number(filters) % group !== 0) {
          throw new OnnxModelError(`${what} (${node.opType}): its weight '${node.input[1]}' has ${filters} filters, which group ${group} does not divide: ${INVALID_MODEL}`);
        }
      }
    }
    // Passes and the report name layers by node name; onnxruntime refuses a graph with a name twice too.
    const named = new Set<string>();
    for (const n of this.graph.node) {
      if (n.name !== '' && named.has(n.name)) {
        throw new OnnxModelError(`Two nodes are named '${n.name}': ONNX names each node of a graph once (onnxruntime refuses the model too); rename one or re-export the model.`);
      }
      named.add(n.name);
    }
    const definedBy = new Map<string, string>();
    const define = (name: string, what: string, allowSame?: string) => {
      const earlier = definedBy.get(name);
      if (earlier !== undefined && earlier !== allowSame) {
        throw new OnnxModelError(`The value '${name}' is defined twice (${earlier}, and ${what}): ONNX defines each value once, so the model is invalid; re-export it.`);
      }
      definedBy.set(name, what);
    };
    for (const i of this.graph.input) define(i.name, `graph input '${i.name}'`);
    for (const t of this.graph.initializer) define(t.name, `initializer '${t.name}'`, `graph input '${t.name}'`);
    for (const t of this.graph.sparseInitializer) if (t.values) define(t.values.name, `sparse initializer '${t.values.name}'`, `graph input '${t.values.name}'`);
    for (const n of this.graph.node) for (const o of n.output) if (o !== '') define(o, `an output of node '${n.name || n.opType}'`);
    for (const o of this.graph.output) {
      if (!definedBy.has(o.name)) throw new OnnxModelError(`Graph output '${o.name}' is not produced by any node, input or initializer: the model is invalid; re-export it.`);
    }
    this.topologicalOrder();
  }

  /** Nodes in topological order; throws on a cycle or an input nobody produces. */
  topologicalOrder(): NodeProto[] {
    const available = new Set<string>(['']);
    for (const t of this.graph.initializer) available.add(t.name);
    for (const t of this.graph.sparseInitializer) if (t.values) available.add(t.values.name);
    for (const i of this.graph.input) available.add(i.name);
    const remaining = [...this.graph.node];
    const producers = new Map<string, NodeProto>();
    for (const n of remaining) n.output.forEach((o) => producers.set(o, n));
    const reads = new Map(remaining.map((n) => [n, [...n.input, ...subgraphReads(n)]]));
    for (const n of remaining) {
      for (const input of reads.get(n)!) {
        if (!available.has(input) && !producers.has(input)) {
          throw new OnnxModelError(`Node ${n.name || n.opType} reads '${input}', which no node, input or initializer provides (a dangling input).`);
        }
      }
    }
    // The order is that of sweeping the node list again and again, placing each node whose inputs are ready (so a
    // sorted list keeps its order): a node's sweep is the latest of its producers' — one later for a producer listed
    // after it. Worked out in one pass over the dependencies (Kahn's algorithm), then sorted by (sweep, position):
    // the sweeps themselves cost a pass over the list each, and a graph with its new nodes appended needs many.
    const position = new Map(remaining.map((n, i) => [n, i]));
    const producersOf = new Map(remaining.map((n) => [n, [...new Set(reads.get(n)!.filter((x) => !available.has(x)).map((x) => producers.get(x)!))]]));
    const readers = new Map<NodeProto, NodeProto[]>(remaining.map((n) => [n, []]));
    const waiting = new Map<NodeProto, number>();
    for (const n of remaining) {
      for (const p of producersOf.get(n)!) readers.get(p)!.push(n);
      waiting.set(n, producersOf.get(n)!.length);
    }
    const sweep = new Map<NodeProto, number>();
    const ready = remaining.filter((n) => waiting.get(n) === 0);
    while (ready.length > 0) {
      const n = ready.pop()!;
      let s = 0;
      for (const p of producersOf.get(n)!) s = Math.max(s, sweep.get(p)! + (position.get(p)! < position.get(n)! ? 0 : 1));
      sweep.set(n, s);
      for (const r of readers.get(n)!) {
        const left = waiting.get(r)! - 1;
        waiting.set(r, left);
        if (left === 0) ready.push(r);
      }
    }
    const cyclic = remaining.filter((n) => !sweep.has(n));
    if (cyclic.length > 0) {
      throw new OnnxModelError(`The graph has a cycle through ${cyclic.slice(0, 3).map((n) => n.name || n.opType).join(', ')}.`);
    }
    return remaining.sort((a, b) => sweep.get(a)! - sweep.get(b)! || position.get(a)! - position.get(b)!);
  }

  /** Puts the node list in topological order (passes insert nodes anywhere). */
  sort(): void {
    const order = this.topologicalOrder();
    order.forEach((n, i) => (this.graph.node[i] = n));  // in place, same length (no spread of every node as arguments)
  }
}

const NO_READS: readonly string[] = Object.freeze([]);

/**
 * Refuses a model whose default-domain opset lowbit cannot work with (none, several versions, below 7); the same
 * version listed twice ('' and 'ai.onnx') becomes one entry, so that a conversion updates the only one there is.
 */
export function checkDefaultOpset(graph: Graph): void {
  const model = graph.model;
  let defaultImports = model.opsetImport.filter((o) => isOnnxDomain(o.domain));
  if (defaultImports.length > 1 && defaultImports.every((o) => o.version === defaultImports[0].version)) {
    model.opsetImport = model.opsetImport.filter((o) => !isOnnxDomain(o.domain) || o === defaultImports[0]);
    defaultImports = [defaultImports[0]];
  }
  if (defaultImports.length !== 1 || graph.opset < 1) {
    // onnxruntime reads the last of two entries, lowbit's passes the first; a version below 1 names no opset.
    throw new OnnxModelError(`This model imports ${defaultImports.length === 0 ? 'no version' : defaultImports.length > 1
      ? `${defaultImports.length} versions (${defaultImports.map((o) => o.version).join(', ')})` : `version ${graph.opset}`} of the default ONNX domain ` +
      "in its opset_import, where a model imports one, 1 or later (onnxruntime reads the last of several, lowbit's passes would change the first): " +
      "fix the model's opset_import (or re-export it).");
  }
  if (graph.opset < 7) {
    // Add, Mul, Gemm… broadcast by attribute there, which the passes' inserted nodes do not do.
    throw new OnnxModelError(`This model's opset ${graph.opset} predates 7, which lowbit needs (onnxruntime itself guarantees only opset 7 and later): ` +
      're-export or convert the model to a newer opset first.');
  }
}

/** Whether a node holds subgraphs (If branches, Loop and Scan bodies). */
export function hasSubgraphs(node: NodeProto): boolean {
  return node.attribute.some((a) => a.g || a.graphs.length > 0);
}

/** The values a graph's nodes read (as inputs or from inside their subgraphs) and its outputs. */
export function namesRead(scope: GraphProto): Set<string> {
  const read = new Set(scope.output.map((o) => o.name));
  for (const n of scope.node) {
    for (const i of n.input) read.add(i);
    for (const r of subgraphReads(n)) read.add(r);
  }
  return read;
}

/** Whether a node reads a value: as an input, or from inside its subgraphs. */
export function readsValue(node: NodeProto, name: string): boolean {
  return node.input.includes(name) || subgraphReads(node).includes(name);
}

/** Whether an operator domain is the default ONNX one. */
export function isOnnxDomain(domain: string): boolean {
  return domain === '' || domain === 'ai.onnx';
}

/** Every node: the main graph's in topological order, then those inside subgraphs (see subgraphNodes). */
export function allNodes(graph: Graph): Array<{ node: NodeProto; scopes: GraphProto[]; owner?: NodeProto }> {
  return [...graph.topologicalOrder().map((node) => ({ node, scopes: [] as GraphProto[] })), ...subgraphNodes(graph)];
}

/**
 * The nodes inside subgraphs, each body's in order (a nested body's where its node stands), with the subgraphs
 * around each (innermost first: `scopes[0]` holds it) and the main-graph node whose subgraphs, at any depth, hold it.
 */
export function subgraphNodes(graph: Graph): Array<{ node: NodeProto; scopes: GraphProto[]; owner: NodeProto }> {
  const found: Array<{ node: NodeProto; scopes: GraphProto[]; owner: NodeProto }> = [];
  const walk = (scopes: GraphProto[], owner: NodeProto) => {
    for (const node of scopes[0].node) {
      found.push({ node, scopes, owner });
      for (const inner of subgraphsOf(node)) walk([inner, ...scopes], owner);
    }
  };
  for (const owner of graph.graph.node) for (const body of subgraphsOf(owner)) walk([body], owner);
  return found;
}

/**
 * Values of the enclosing scope that a node reads from inside its subgraphs (at any depth): names their nodes read
 * but the subgraphs do not define. ONNX lists them nowhere on the node, yet they are inputs of it: a pass must not
 * remove or rename them, and the node must come after their producers. Computed each time: passes edit bodies
 * (their layers' weights are quantized in place).
 */
export function subgraphReads(node: NodeProto): readonly string[] {
  if (!hasSubgraphs(node)) return NO_READS;  // most nodes: nothing to walk
  const reads = new Set<string>();
  for (const g of subgraphsOf(node)) {
    const local = addDefinedNames(g, new Set(['']), false);
    for (const n of g.node) for (const name of [...n.input, ...subgraphReads(n)]) if (!local.has(name)) reads.add(name);
    for (const o of g.output) if (!local.has(o.name)) reads.add(o.name);  // a body output naming an enclosing value
  }
  return [...reads];
}

// Adds the names a graph defines (inputs, initializers, sparse initializers, node outputs), and with `nested` those of its subgraphs.
function addDefinedNames(g: GraphProto, names: Set<string>, nested = true): Set<string> {
  for (const i of g.input) names.add(i.name);
  for (const t of g.initializer) names.add(t.name);
  for (const t of g.sparseInitializer) if (t.values) names.add(t.values.name);
  for (const n of g.node) {
    n.output.forEach((o) => names.add(o));
    if (nested) for (const sub of subgraphsOf(n)) addDefinedNames(sub, names);
  }
  return names;
}

export function attribute(node: NodeProto, name: string): AttributeProto | undefined {
  return node.attribute.find((a) => a.name === name);
}

/** An attribute, checked to have the type ONNX gives it (a mistyped one reads as 0 or empty, a wrong value). */
function typedAttribute(node: NodeProto, name: string, type: AttributeProto_AttributeType): AttributeProto | undefined {
  const a = attribute(node, name);
  if (a && a.type !== type && a.type !== AttributeProto_AttributeType.UNDEFINED) {
    throw new OnnxModelError(`Node '${node.name || node.opType}' (${node.opType}): attribute '${name}' is ${AttributeProto_AttributeType[a.type] ?? a.type}, ` +
      `where it is ${AttributeProto_AttributeType[type]}: ${INVALID_MODEL}`);
  }
  return a;
}

export function intAttribute(node: NodeProto, name: string, fallback: number): number {
  const a = typedAttribute(node, name, AttributeProto_AttributeType.INT);
  return a ? Number(a.i) : fallback;
}

export function intsAttribute(node: NodeProto, name: string): number[] | undefined {
  const a = typedAttribute(node, name, AttributeProto_AttributeType.INTS);
  return a ? a.ints.map(Number) : undefined;
}

/** An ints attribute's values as stored (int64: INT64_MAX, PyTorch's open end of a Slice, does not survive a Number). */
export function int64sAttribute(node: NodeProto, name: string): bigint[] | undefined {
  return typedAttribute(node, name, AttributeProto_AttributeType.INTS)?.ints.map(BigInt);
}

/** Gemm's transA / transB: any value but 0 transposes (as onnxruntime and the ONNX reference read it). */
export function transposes(node: NodeProto, name: 'transA' | 'transB'): boolean {
  return node.opType === 'Gemm' && intAttribute(node, name, 0) !== 0;
}

export function stringAttribute(node: NodeProto, name: string, fallback: string): string {
  const a = typedAttribute(node, name, AttributeProto_AttributeType.STRING);
  return a ? new TextDecoder().decode(a.s) : fallback;
}

export function floatAttribute(node: NodeProto, name: string, fallback: number): number {
  const a = typedAttribute(node, name, AttributeProto_AttributeType.FLOAT);
  return a ? a.f : fallback;
}

export function removeAttribute(node: NodeProto, name: string): void {
  const i = node.attribute.findIndex((a) => a.name === name);
  if (i >= 0) node.attribute.splice(i, 1);
}

export function makeIntAttribute(name: string, value: number): AttributeProto {
  return create(AttributeProtoSchema, { name, type: AttributeProto_AttributeType.INT, i: BigInt(value) });
}

export function makeIntsAttribute(name: string, values: number[]): AttributeProto {
  return create(AttributeProtoSchema, { name, type: AttributeProto_AttributeType.INTS, ints: values.map(BigInt) });
}

export function makeStringAttribute(name: string, value: string): AttributeProto {
  return create(AttributeProtoSchema, { name, type: AttributeProto_AttributeType.STRING, s: new TextEncoder().encode(value) });
}

export function makeNode(opType: string, inputs: string[], outputs: string[], name: string, attributes: AttributeProto[] = [], domain = ''): NodeProto {
  return create(NodeProtoSchema, { opType, input: inputs, output: outputs, name, attribute: attributes, domain });
}

export function makeTensor(name: string, dataType: TensorProto_DataType, dims: number[], raw: Uint8Array): TensorProto {
  return ownedTensor(name, dataType, dims, Uint8Array.from(raw));
}

/**
 * makeTensor without the copy, for bytes just computed that nothing will write into again (tensors' data are
 * never written in place): copying a large model's weights once more cost time and peak memory.
 */
export function ownedTensor(name: string, dataType: TensorProto_DataType, dims: number[], raw: Uint8Array): TensorProto {
  const own = raw.buffer instanceof ArrayBuffer ? (raw as Uint8Array<ArrayBuffer>) : Uint8Array.from(raw);  // never shared memory
  return create(TensorProtoSchema, { name, dataType, dims: dims.map(BigInt), rawData: own });
}

export function int64Tensor(name: string, values: ReadonlyArray<number | bigint>): TensorProto {
  return makeTensor(name, TensorProto_DataType.INT64, [values.length], new Uint8Array(BigInt64Array.from(values.map((v) => BigInt(v))).buffer));
}

export function floatTensor(name: string, values: number[]): TensorProto {
  return makeTensor(name, TensorProto_DataType.FLOAT, [values.length], new Uint8Array(Float32Array.from(values).buffer));
}

/** A one-value tensor of shape [] in float32, or in float16 or float64 when `type` says so (the type of what it meets). */
export function scalarOfType(name: string, value: number, type: number | undefined): TensorProto {
  if (type === TensorProto_DataType.FLOAT16) return makeTensor(name, type, [], new Uint8Array(Uint16Array.of(toFloat16Bits(value)).buffer));
  if (type === TensorProto_DataType.DOUBLE) return makeTensor(name, type, [], new Uint8Array(Float64Array.of(value).buffer));
  return floatScalarTensor(name, value);
}

export function floatScalarTensor(name: string, value: number): TensorProto {
  return makeTensor(name, TensorProto_DataType.FLOAT, [], new Uint8Array(Float32Array.of(value).buffer));
}

/**
 * The float32 contents of a tensor, or undefined when it is not float32. A tensor
 * whose data do not fill its dims exactly is a corrupted model (OnnxModelError).
 */
export function floatData(t: TensorProto): Float32Array | undefined {
  if (!isFloatTensor(t)) return undefined;
  const raw = t.rawData;  // once: a lazily read tensor reads its file on every access (model-io)
  if (raw.length === 0) return Float32Array.from(t.floatData);
  // A copy (the callers own what they get); Float32Array.set copies aligned data fastest.
  const out = new Float32Array(raw.length / 4);
  if (raw.byteOffset % 4 === 0) out.set(new Float32Array(raw.buffer, raw.byteOffset, out.length));
  else new Uint8Array(out.buffer).set(raw);
  return out;
}

/**
 * The float32 contents of a tensor as a view of its bytes when they are aligned (a copy otherwise), or undefined
 * when it is not float32. Read-only: it may share the model's memory (a large model's weights are not copied).
 */
export function floatView(t: TensorProto): Float32Array | undefined {
  if (!isFloatTensor(t)) return undefined;
  const raw = t.rawData;
  if (raw.length > 0 && raw.byteOffset % 4 === 0) return new Float32Array(raw.buffer, raw.byteOffset, raw.length / 4);
  return floatData(t);
}

/** Whether a tensor holds float32 data, without copying it; throws OnnxModelError when the data do not fill its dims. */
export function isFloatTensor(t: TensorProto): boolean {
  if (t.dataType !== TensorProto_DataType.FLOAT) return false;
  checkFillsDims(t, 'float32', 4, t.floatData.length);
  return true;
}

/** Whether a tensor holds float16 data (raw bytes, or the int32 field ONNX also allows), checking that they fill its dims. */
export function isFloat16Tensor(t: TensorProto): boolean {
  if (t.dataType !== TensorProto_DataType.FLOAT16) return false;
  checkFillsDims(t, 'float16', 2, t.int32Data.length);
  return true;
}

/** Throws OnnxModelError when a tensor's raw bytes (or, without them, its typed field's values) do not fill its dims. */
function checkFillsDims(t: TensorProto, type: string, bytesPerValue: number, fieldValues: number): void {
  if (t.dims.some((d) => d < 0n)) {
    throw new OnnxModelError(`Tensor '${t.name}' has dims [${dimsOf(t).join(', ')}]: a dimension below 0 is no size. The model file is corrupted or was written wrongly; re-export it.`);
  }
  const count = t.dims.reduce((a, d) => a * Number(d), 1);
  const bytes = rawLength(t);
  if ((bytes > 0 ? bytes / bytesPerValue : fieldValues) === count) return;
  const what = bytes > 0 ? `${bytes} bytes of raw data` : `${fieldValues} ${type} values`;
  throw new OnnxModelError(`Tensor '${t.name}' holds ${what}, but its dims [${dimsOf(t).join(', ')}] need ${count} ${type} values` +
    `${bytes > 0 ? ` (${count * bytesPerValue} bytes)` : ''}: the model file is corrupted or was written wrongly; re-export it.`);
}

/**
 * A weight's values as float32: a read-only view of float32 data (floatView), or float16 data converted;
 * undefined for other types.
 */
export function weightValues(t: TensorProto): Float32Array | undefined {
  if (!isFloat16Tensor(t)) return floatView(t);
  const raw = t.rawData;
  if (raw.length === 0) {
    // The int32 field holds one float16 bit pattern per value.
    const outside = t.int32Data.findIndex((v) => v < 0 || v > 0xffff);
    if (outside >= 0) {
      throw new OnnxModelError(`Tensor '${t.name}' (float16) holds ${t.int32Data[outside]} at index ${outside} of its int32_data, which is no float16 bit pattern ` +
        '(0 to 65535): the model file is corrupted or was written wrongly; re-export it.');
    }
    return fromFloat16Array(t.int32Data);
  }
  return fromFloat16Array(raw.byteOffset % 2 === 0 ? new Uint16Array(raw.buffer, raw.byteOffset, raw.length / 2) : new Uint16Array(Uint8Array.from(raw).buffer));
}

/**
 * Whether a constant holds one value per output channel the way a layer's output broadcasts it: shape [channels],
 * or [1, …, 1, channels]. A [M, 1] per-row bias has as many values when M = channels, but means something else.
 */
export function isChannelVector(t: TensorProto, channels: number): boolean {
  const dims = dimsOf(t);
  if (dims.length === 0) return channels === 1;  // a scalar is one value for the one channel
  return dims[dims.length - 1] === channels && dims.slice(0, -1).every((d) => d === 1);
}

export function dimsOf(t: TensorProto): number[] {
  return t.dims.map(Number);
}
