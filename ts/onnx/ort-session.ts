/**
 * onnxruntime-node sessions on a worker thread. onnxruntime-node loads models and runs them synchronously on the
 * calling thread; lowbit's calibration, evaluation and distillation run many batches through a session, so each
 * session lives on its own worker (ort-worker.ts) and the caller's event loop keeps turning meanwhile.
 */
import * as path from 'node:path';
import { Worker } from 'node:worker_threads';
import type * as Ort from 'onnxruntime-node';

import { ort } from '../bench/ort-models';
import { OnnxModelError } from './model-io';

/** A tensor as it crosses threads: onnxruntime's type name, its data, its dims. */
export interface PlainTensor {
  type: string;
  data: Float32Array | Uint16Array | Int32Array | BigInt64Array | Uint8Array | Int8Array | Int16Array | Float64Array | string[] | ArrayBufferView;
  dims: readonly number[];
}

export type SessionRequest = { id: number } & (
  | { op: 'open'; model: Uint8Array | string; options: Ort.InferenceSession.SessionOptions }
  | { op: 'run'; feeds: Record<string, PlainTensor>; fetches?: string[] }
  | { op: 'release' });

type Reply = { id: number; error?: string; inputNames?: string[]; outputNames?: string[]; outputs?: Record<string, PlainTensor> };

/** A copy of a typed array in a buffer of its own (a Node Buffer's `slice` would be a view, not a copy). */
function copyOf<T extends ArrayBufferView>(view: T): T {
  const bytes = view.buffer.slice(view.byteOffset, view.byteOffset + view.byteLength) as ArrayBuffer;
  const Type = (Buffer.isBuffer(view) ? Uint8Array : view.constructor) as new (b: ArrayBuffer) => T;
  return new Type(bytes);
}

/** Whether the view covers its whole (non-shared) buffer, which can then move to another thread as it is. */
function coversBuffer(view: ArrayBufferView): boolean {
  return view.byteOffset === 0 && view.byteLength === view.buffer.byteLength && view.buffer instanceof ArrayBuffer;
}

/** Typed-array data that covers its buffer exactly: posting a view into a larger buffer would copy the whole buffer. */
function ownData<T extends PlainTensor['data']>(data: T): T {
  return ArrayBuffer.isView(data) && !coversBuffer(data) ? copyOf(data) : data;
}

/** An onnxruntime-node session on its own worker thread; `release` ends both. */
export class OrtSession {
  private nextId = 0;
  private readonly pending = new Map<number, { resolve: (r: Reply) => void; reject: (e: Error) => void }>();
  private ended: Error | undefined;
  inputNames: readonly string[] = [];
  outputNames: readonly string[] = [];

  private constructor(private readonly worker: Worker) {
    worker.on('message', (reply: Reply) => {
      const p = this.pending.get(reply.id);
      if (!p) return;
      this.pending.delete(reply.id);
      if (this.pending.size === 0) worker.unref();
      if (reply.error !== undefined) p.reject(new Error(reply.error));
      else p.resolve(reply);
    });
    const fail = (e: Error) => {
      this.ended ??= e;
      for (const p of this.pending.values()) p.reject(e);
      this.pending.clear();
    };
    worker.on('error', fail);
    worker.on('exit', (code) => fail(new Error(`the onnxruntime worker thread stopped (exit code ${code})`)));
    worker.unref();  // an idle session never keeps the process alive
  }

  /**
   * Loads `model` (bytes or a file path) in a new worker. Bytes are copied to it unless `giveBytes` is true, in
   * which case their buffer moves there and the caller's view becomes empty (for copies made only for this session).
   */
  static async open(model: Uint8Array | string, options: Ort.InferenceSession.SessionOptions, giveBytes = false): Promise<OrtSession> {
    ort();  // onnxruntime-node missing: the clear error, before any thread starts
    const session = new OrtSession(new Worker(path.join(__dirname, 'ort-worker.js')));
    const owned = typeof model === 'string' || (giveBytes && coversBuffer(model)) ? model : copyOf(model);
    try {
      const reply = await session.request({ op: 'open', model: owned, options }, typeof owned === 'string' ? [] : [owned.buffer as ArrayBuffer]);
      session.inputNames = reply.inputNames!;
      session.outputNames = reply.outputNames!;
      return session;
    } catch (e) {
      await session.worker.terminate();
      throw e;
    }
  }

  /** Runs the model on `feeds` (onnxruntime Tensors or plain { type, data, dims }); returns onnxruntime Tensors. */
  async run(feeds: Record<string, PlainTensor>, fetches?: string[]): Promise<Record<string, Ort.Tensor>> {
    const plain = Object.fromEntries(Object.entries(feeds).map(([name, t]) => [name, { type: t.type, data: ownData(t.data), dims: [...t.dims] }]));
    const reply = await this.request({ op: 'run', feeds: plain, ...(fetches ? { fetches } : {}) }, []);
    const O = ort();
    return Object.fromEntries(Object.entries(reply.outputs!).map(([name, t]) =>
      [name, new O.Tensor(t.type as 'float32', t.data as Float32Array, t.dims as number[])]));
  }

  /** Releases the session and ends its worker. */
  async release(): Promise<void> {
    try {
      if (!this.ended) await this.request({ op: 'release' }, []);
    } finally {
      await this.worker.terminate();
    }
  }

  private request(body: DistributiveOmit<SessionRequest, 'id'>, transfer: ArrayBuffer[]): Promise<Reply> {
    if (this.ended) return Promise.reject(this.ended);
    const id = this.nextId++;
    return new Promise<Reply>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.ref();  // a pending answer keeps the process alive
      this.worker.postMessage({ id, ...body }, transfer);
    });
  }
}

type DistributiveOmit<T, K extends keyof T> = T extends unknown ? Omit<T, K> : never;

/**
 * An onnxruntime session on `model` (on its own worker thread); when onnxruntime rejects the model, an
 * OnnxModelError that says which model (`what`), onnxruntime's reason and what to do.
 */
export async function openSession(model: Uint8Array | string, options: Ort.InferenceSession.SessionOptions, what: string, remedy: string,
  giveBytes = false): Promise<OrtSession> {
  // onnxruntime's own log stays quiet (fatal only): its failures come back as errors that say what to do, and its
  // warnings (e.g. float16 nodes it cannot constant-fold) are nothing a user can act on.
  const quiet = { logSeverityLevel: 4 as const, ...options };
  ort();  // onnxruntime-node missing: its own error, not a model error
  try {
    return await OrtSession.open(model, quiet, giveBytes);
  } catch (e) {
    throw new OnnxModelError(`onnxruntime cannot load ${what}: ${(e as Error).message.split('\n')[0]}. ${remedy}`);
  }
}

/** session.run, with onnxruntime's failure as an OnnxModelError that names the model and the feed and says what to do. */
export async function runSession(session: OrtSession, feeds: Record<string, PlainTensor>, fetches: string[] | undefined,
  what: string, remedy: string): Promise<Record<string, Ort.Tensor>> {
  try {
    return await session.run(feeds, fetches);
  } catch (e) {
    throw new OnnxModelError(`onnxruntime could not run ${what}: ${(e as Error).message.split('\n')[0]}. ${remedy}`);
  }
}

/**
 * Opens two sessions at once (each loads on its own worker); when either fails, the other is closed and the
 * first failure is thrown.
 */
export async function openPair<T>(first: () => Promise<T>, second: () => Promise<T>, close: (opened: T) => Promise<void>): Promise<[T, T]> {
  const [a, b] = await Promise.allSettled([first(), second()]);
  if (a.status === 'fulfilled' && b.status === 'fulfilled') return [a.value, b.value];
  for (const r of [a, b]) if (r.status === 'fulfilled') await close(r.value).catch(() => undefined);
  throw (a.status === 'rejected' ? a.reason : (b as PromiseRejectedResult).reason) as Error;
}
