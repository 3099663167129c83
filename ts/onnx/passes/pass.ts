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

/**
 * A pass's work in steps (one per layer): the generator yields the label of each
 * step done and returns the result, so `runSteps` can finish it at once and
 * `runStepsAsync` can let the event loop run between steps.
 */
export type Steps<T> = Generator<string, T, void>;

export function runSteps<T>(steps: Steps<T>): T {
  for (;;) {
    const r = steps.next();
    if (r.done) return r.value;
  }
}

export async function runStepsAsync<T>(steps: Steps<T>): Promise<T> {
  for (;;) {
    const r = steps.next();
    if (r.done) return r.value;
    await nextTurn();
  }
}

/** Resolves on the event loop's next turn (after pending I/O and timers). */
export function nextTurn(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}
