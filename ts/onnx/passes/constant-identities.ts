/**
 * Constants that exporters hand to layers through another node, which would make the layer's weight a computed
 * input and keep it float. bypassConstantIdentities removes Identity nodes whose input is a constant (an initializer
 * or a Constant node's value), written for parameters that are shared or renamed (tied embeddings, reused layers):
 * their readers (inside subgraphs too: names are unique across the model) read the constant instead. In the main
 * graph and in subgraph bodies; kept where the Identity's output is an output of its graph (a Transpose, Reshape…
 * of constants is passes/fold-weight-chains' business). constantAttributesAsTensors (run first)
 * rewrites Constants given as value_float(s)/value_int(s) as `value` tensors.
 */
import { create } from '@bufbuild/protobuf';
import { AttributeProto_AttributeType, AttributeProtoSchema, TensorProto_DataType, type GraphProto } from 'onnx-buf';

import { allNodes, isOnnxDomain, ownedTensor, subgraphsOf, type Graph } from '../graph';
import { nodeLabel, type PassReport } from './pass';

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
