/**
 * Removes Identity nodes whose input is a constant (an initializer or a Constant node's value), which exporters write
 * for parameters that are shared or renamed (tied embeddings, reused layers): a layer reading such an Identity sees a
 * computed input, not a constant weight, and stays float. Their readers (inside subgraphs too: names are unique
 * across the model) read the constant instead. In the main graph and in subgraph bodies; kept where the Identity's
 * output is an output of its graph.
 */
import type { GraphProto } from 'onnx-buf';

import { allNodes, isOnnxDomain, subgraphsOf, type Graph } from '../graph';
import { nodeLabel, type PassReport } from './pass';

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
