/** A graph pass and what it reports: what it changed, and what it skipped and why. */
import type { Graph } from '../graph';

export interface PassReport {
  pass: string;
  changed: string[];
  skipped: Array<{ node: string; reason: string }>;
}

export interface Pass {
  readonly name: string;
  run(graph: Graph): PassReport;
}

export function nodeLabel(node: { name: string; opType: string; output: string[] }): string {
  return node.name || `${node.opType}(${node.output[0] ?? ''})`;
}
