/** A graph pass and what it reports: what it changed, and what it skipped and why. */
import type { GraphProto, NodeProto } from 'onnx-buf';

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

/** Whether keepFloat (`keep`) names the node: by name, by op type, or, unnamed, by its label ("MatMul(y)", as reports name it). */
export function keptFloat(keep: ReadonlySet<string>, node: { name: string; opType: string; output: string[] }): boolean {
  return keep.has(node.opType) || keep.has(nodeLabel(node));
}

/**
 * Where a node inside subgraphs sits, for reports: the main-graph node holding it (`owner`) and the attribute of
 * that node (then_branch, else_branch, body) whose subgraph holds it at any depth (`scopes`: innermost first).
 */
export function placeOf(owner: NodeProto, scopes: GraphProto[]): { subgraph: string; branch?: string } {
  const outermost = scopes[scopes.length - 1];
  const branch = owner.attribute.find((a) => a.g === outermost || a.graphs.includes(outermost))?.name;
  return { subgraph: nodeLabel(owner), ...(branch ? { branch } : {}) };
}

/**
 * A pass's work in steps (one per layer): the generator yields the label of each
 * step done and returns the result, so `runSteps` can finish it at once and
 * `runStepsAsync` can let the event loop run between steps. A long step may also
 * yield `undefined` part-way (a pause for the event loop, not a step) or a promise
 * to wait for (a file read, work on native threads; only steps made for runStepsAsync yield those).
 */
export type Steps<T> = Generator<string | undefined | Promise<void>, T, void>;

export function runSteps<T>(steps: Steps<T>): T {
  for (;;) {
    const r = steps.next();
    if (r.done) return r.value;
    if (r.value instanceof Promise) throw new Error('These steps wait for asynchronous work: run them with runStepsAsync.');
  }
}

/** Runs the steps, letting the event loop turn between them; `onStep` hears each step's label and how many are done. */
export async function runStepsAsync<T>(steps: Steps<T>, onStep?: (label: string, done: number) => void): Promise<T> {
  for (let done = 0; ;) {
    const r = steps.next();
    if (r.done) return r.value;
    if (r.value instanceof Promise) {
      await r.value;
      continue;
    }
    if (r.value !== undefined) onStep?.(r.value, ++done);
    await nextTurn();
  }
}

/**
 * The items of `source` in turn, but a wait for the next one of an async source ends as soon as `signal` aborts, with
 * its reason (a slow stream need not deliver first); the source is then told to stop (return(), not awaited: it may
 * hang as well). Otherwise as `for await` over the source itself.
 */
export async function* abortable<T>(source: Iterable<T> | AsyncIterable<T>, signal?: AbortSignal): AsyncGenerator<T, void, undefined> {
  if (!signal || !(Symbol.asyncIterator in source)) {
    yield* source;
    return;
  }
  signal.throwIfAborted();  // (a source never opened is not touched)
  const iterator = source[Symbol.asyncIterator]();
  let state = 'reading' as 'reading' | 'done' | 'aborted';
  try {
    for (;;) {
      // A fresh promise per wait, its listener removed once settled: one promise shared by every wait would hold each
      // batch it delivered (V8 keeps a pending promise's reactions), all of them until the loop ends. The listener
      // comes first: a source may abort from inside next().
      let r: IteratorResult<T>;
      try {
        signal.throwIfAborted();  // (also before asking the source for more)
        r = await new Promise<IteratorResult<T>>((resolve, reject) => {
          const onAbort = () => reject(signal.reason);
          signal.addEventListener('abort', onAbort, { once: true });
          const settle = () => signal.removeEventListener('abort', onAbort);
          Promise.resolve().then(() => iterator.next()).then((v) => { settle(); resolve(v); }, (e) => { settle(); reject(e); });
        });
      } catch (e) {
        state = signal.aborted ? 'aborted' : 'done';  // (a source that failed is not told to stop, as with for await)
        throw e;
      }
      if (r.done) {
        state = 'done';
        return;
      }
      yield r.value;
    }
  } finally {
    // Aborted (seen here or by the reader): told to stop, not waited for; a reader that stopped early otherwise
    // (break, an error) waits for the source to stop, as for await does.
    if (state === 'aborted' || (state === 'reading' && signal.aborted)) Promise.resolve().then(() => iterator.return?.()).catch(() => undefined);
    else if (state === 'reading') await iterator.return?.();
  }
}

/** Resolves on the event loop's next turn (after pending I/O and timers). */
export function nextTurn(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/**
 * A clock for pauses in long work: true once `ms` have passed since it last said true (or since it was made), so
 * that work in many short pieces lets the event loop turn about every `ms`, not after every piece.
 */
export function pauseClock(ms = 10): () => boolean {
  let since = performance.now();
  return () => {
    const now = performance.now();
    if (now - since < ms) return false;
    since = now;
    return true;
  };
}

/** `await pause()` turns the event loop when pauseClock(ms) says so, and costs only a microtask otherwise. */
export function pauser(ms = 10): () => Promise<void> {
  const due = pauseClock(ms);
  return async () => {
    if (due()) await nextTurn();
  };
}
