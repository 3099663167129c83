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
 * `runStepsAsync` can let the event loop run between steps. A long step may also
 * yield `undefined` part-way: a pause for the event loop, not a step.
 */
export type Steps<T> = Generator<string | undefined, T, void>;

export function runSteps<T>(steps: Steps<T>): T {
  for (;;) {
    const r = steps.next();
    if (r.done) return r.value;
  }
}

/** Runs the steps, letting the event loop turn between them; `onStep` hears each step's label and how many are done. */
export async function runStepsAsync<T>(steps: Steps<T>, onStep?: (label: string, done: number) => void): Promise<T> {
  for (let done = 0; ;) {
    const r = steps.next();
    if (r.done) return r.value;
    if (r.value !== undefined) onStep?.(r.value, ++done);
    await nextTurn();
  }
}

/** Resolves on the event loop's next turn (after pending I/O and timers). */
export function nextTurn(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/**
 * A pause for loops of many short pieces of work: `await pause()` lets the event loop turn once `ms` have passed
 * since the last turn, and costs only a microtask otherwise (a turn per piece cost more than the pieces).
 */
export function pauser(ms = 10): () => Promise<void> {
  let resumed = performance.now();
  return async () => {
    if (performance.now() - resumed < ms) return;
    await nextTurn();
    resumed = performance.now();
  };
}
