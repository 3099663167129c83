/**
 * Constants that exporters hand to layers through another node, which would make the layer's weight a computed
 * input and keep it float. bypassConstantIdentities removes Identity nodes whose input is a constant (an initializer
 * or a Constant node's value), written for parameters that are shared or renamed (tied embeddings, reused layers):
 * their readers (inside subgraphs too: names are unique across the model) read the constant instead. In the main
 * graph and in subgraph bodies; kept where the Identity's output is an output of its graph. foldConstantTransposes
 * (below) does the same for a Transpose of a constant, with a transposed copy. constantAttributesAsTensors (run first)
 * rewrites Constants given as value_float(s)/value_int(s) as `value` tensors.
 */
import { create } from '@bufbuild/protobuf';
import { AttributeProto_AttributeType, AttributeProtoSchema, TensorProto_DataType, type GraphProto } from 'onnx-buf';

import { allNodes, floatData, intsAttribute, isFloat16Tensor, isFloatTensor, isOnnxDomain, ownedTensor, subgraphsOf, type Graph } from '../graph';
import { withDataRead } from '../model-io';
import { transpose2d } from './fit-onnxruntime';
import { nodeLabel, type PassReport } from './pass';
import { QUANTIZABLE } from './quantize-weights';

/**
 * Constant nodes that give their value as value_float, value_floats, value_int or value_ints (opset 12 on) get the
 * same value as a `value` tensor, the one form the passes and the training engine read constants in (given so, a
 * Clip's bounds or a Squeeze's axes read as absent). In the main graph and in subgraph bodies.
 */
export function constantAttributesAsTensors(graph: Graph): PassReport {
  const report: PassReport = { pass: 'constant-attributes-as-tensors', changed: [], skipped: [] };
  for (const { node } of allNodes(graph)) {
    if (node.opType !== 'Constant' || !isOnnxDomain(node.domain) || node.attribute.length !== 1) continue;
    const [a] = node.attribute;
    const bytes = a.name === 'value_float' ? Float32Array.of(a.f) : a.name === 'value_floats' ? Float32Array.from(a.floats)
      : a.name === 'value_int' ? BigInt64Array.of(a.i) : a.name === 'value_ints' ? BigInt64Array.from(a.ints) : undefined;
    if (!bytes) continue;
    const type = bytes instanceof Float32Array ? TensorProto_DataType.FLOAT : TensorProto_DataType.INT64;
    const dims = a.name.endsWith('s') ? [bytes.length] : [];
    const t = ownedTensor(node.output[0], type, dims, new Uint8Array(bytes.buffer));
    node.attribute = [create(AttributeProtoSchema, { name: 'value', type: AttributeProto_AttributeType.TENSOR, t })];
    report.changed.push(`${nodeLabel(node)}: its ${a.name} given as a value tensor`);
  }
  return report;
}

export function bypassConstantIdentities(graph: Graph): PassReport {
  const report: PassReport = { pass: 'bypass-constant-identities', changed: [], skipped: [] };
  // The main graph's in topological order (a chain's first Identity first), then those inside bodies.
  for (const { node: identity, scopes } of allNodes(graph)) {
    if (identity.opType !== 'Identity' || !isOnnxDomain(identity.domain)) continue;
    const [source] = identity.input;
    const [out] = identity.output;
    if (!source || !graph.constantIn(source, scopes)) continue;
    const scope = scopes[0] ?? graph.graph;
    if (scope.output.some((o) => o.name === out)) {
      report.skipped.push({ node: nodeLabel(identity), reason: `its output '${out}' is an output of its graph` });
      continue;
    }
    const readers = graph.consumers(out, scope);
    for (const reader of readers) {
      reader.input.forEach((name, slot) => name === out && (reader.input[slot] = source));
      subgraphsOf(reader).forEach((body) => renameReads(body, out, source));
    }
    scope.node.splice(scope.node.indexOf(identity), 1);
    report.changed.push(`${nodeLabel(identity)}: its ${readers.length} reader(s) read the constant '${source}'`);
  }
  return report;
}

// Renames the reads of an enclosing graph's value in a subgraph, at any depth.
function renameReads(body: GraphProto, from: string, to: string): void {
  for (const n of body.node) {
    n.input.forEach((name, slot) => name === from && (n.input[slot] = to));
    subgraphsOf(n).forEach((inner) => renameReads(inner, from, to));
  }
  for (const o of body.output) if (o.name === from) o.name = to;
}

/**
 * Folds a Transpose of a 2-D float constant read only as layers' weights (a Conv/Gemm/MatMul's second input) into a
 * transposed copy of the constant: an output projection tied to the embedding table reads it so when a model was
 * exported without constant folding, and would otherwise stay float. Main graph only; the constant stays when
 * other nodes (the embedding's Gather) read it. Left as it is when a reader is in `keepFloat` or the constant is a
 * graph input's default.
 */
export async function foldConstantTransposes(graph: Graph, keepFloat: string[] = []): Promise<PassReport> {
  const report: PassReport = { pass: 'fold-constant-transposes', changed: [], skipped: [] };
  const keep = new Set(keepFloat);
  const inputs = new Set(graph.graph.input.map((i) => i.name));
  for (const transpose of [...graph.graph.node]) {
    if (transpose.opType !== 'Transpose' || !isOnnxDomain(transpose.domain)) continue;
    const [source] = transpose.input;
    const [out] = transpose.output;
    const constant = source ? graph.constant(source) : undefined;
    if (!constant || !(isFloatTensor(constant) || isFloat16Tensor(constant)) || constant.dims.length !== 2) continue;
    const perm = intsAttribute(transpose, 'perm');
    if (perm && (perm[0] !== 1 || perm[1] !== 0)) continue;
    const readers = graph.consumers(out).filter((n) => n !== transpose);
    const asWeights = readers.every((n) => QUANTIZABLE.has(n.opType) && n.input.indexOf(out) === 1 && n.input.lastIndexOf(out) === 1);
    if (readers.length === 0 || !asWeights || graph.isGraphOutput(out)) {
      if (readers.some((n) => QUANTIZABLE.has(n.opType))) {
        report.skipped.push({ node: nodeLabel(transpose), reason: 'its output is also read otherwise than as a layer weight, or is a graph output' });
      }
      continue;
    }
    // A float copy for a layer kept float would only store the table twice; a graph input's default a feed may replace.
    const kept = readers.find((n) => keep.has(n.name) || keep.has(n.opType));
    if (kept || inputs.has(source)) {
      report.skipped.push({ node: nodeLabel(transpose), reason: kept ? `${nodeLabel(kept)} is kept in float (keepFloat)` : `'${source}' is also a graph input (a default a feed may replace)` });
      continue;
    }
    const data = await withDataRead(constant);
    // Values may also sit in float_data (float32) or int32_data (float16 bit patterns). transpose2d writes new bytes,
    // so the model's own are only read.
    const raw = data.rawData.length > 0 ? data.rawData
      : isFloatTensor(data) ? new Uint8Array(floatData(data)!.buffer) : new Uint8Array(Uint16Array.from(data.int32Data).buffer);
    const folded = ownedTensor(graph.uniqueName(`${source}_transposed`), constant.dataType, constant.dims.map(Number), raw);
    transpose2d(folded);
    graph.addInitializer(folded);
    for (const n of readers) n.input[1] = folded.name;
    graph.graph.node.splice(graph.graph.node.indexOf(transpose), 1);
    graph.removeIfUnused(source);
    report.changed.push(`${nodeLabel(transpose)}: the Transpose of constant '${source}' folded into '${folded.name}' for ${readers.map(nodeLabel).join(', ')}`);
  }
  return report;
}
