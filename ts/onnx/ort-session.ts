/**
 * onnxruntime-node sessions on a worker thread. onnxruntime-node loads models and runs them synchronously on the
 * calling thread; lowbit's calibration, evaluation and distillation run many batches through a session, so each
 * session lives on a worker thread (ort-worker.ts; an OrtHost) and the caller's event loop keeps turning meanwhile.
 */
import * as path from 'node:path';
import { Worker } from 'node:worker_threads';
import type * as Ort from 'onnxruntime-node';

import { ort } from '../bench/ort-models';
import { OnnxModelError } from './model-io';
import { nextTurn } from './passes/pass';

/** A tensor as it crosses threads: onnxruntime's type name, its data, its dims. */
export interface PlainTensor {
  type: string;
  data: ArrayBufferView | string[];
  dims: readonly number[];
}

export type SessionRequest = { id: number; session: number } & (
  | { op: 'open'; model: Uint8Array | string; options: Ort.InferenceSession.SessionOptions }
  | { op: 'run'; feeds: Record<string, PlainTensor>; fetches?: string[] }
  | { op: 'release' });

type Reply = { id: number; error?: string; transport?: boolean; inputNames?: string[]; outputNames?: string[]; outputs?: Record<string, PlainTensor> };

/** A copy of a typed array in a new ArrayBuffer of its own (a Node Buffer's `slice` is a view; a shared buffer's is shared). */
export function copyOf<T extends ArrayBufferView>(view: T): T {
  const bytes = new Uint8Array(view.byteLength);
  bytes.set(new Uint8Array(view.buffer, view.byteOffset, view.byteLength));
  const Type = (Buffer.isBuffer(view) ? Uint8Array : view.constructor) as new (b: ArrayBuffer) => T;
  return new Type(bytes.buffer);
}

/** Bytes copied per event-loop turn when a model is copied for its session (16 MiB of fresh memory took ~100 ms to fill here). */
const COPY_PIECE = 4 << 20;

/** A copy of model bytes in an ArrayBuffer of their own, made in pieces so that a large model does not hold the event loop. */
async function copyInPieces(bytes: Uint8Array): Promise<Uint8Array> {
  const out = new Uint8Array(bytes.byteLength);
  for (let at = 0; at < bytes.byteLength; at += COPY_PIECE) {
    if (at > 0) await nextTurn();
    out.set(bytes.subarray(at, at + COPY_PIECE), at);
  }
  return out;
}

/** Whether the view covers its whole (non-shared) buffer, which can then move to another thread as it is. */
function coversBuffer(view: ArrayBufferView): boolean {
  return view.byteOffset === 0 && view.byteLength === view.buffer.byteLength && view.buffer instanceof ArrayBuffer;
}

/** An error onnxruntime gave on the worker thread (not one of passing messages to it). */
class OnnxruntimeFailure extends Error {}

/**
 * A worker thread that holds onnxruntime sessions, started when a session first opens; `close` releases what is
 * still open and ends it. quantizeModel uses one host for all its sessions (the thread's code stays warmed up from
 * calibration to evaluation); a session opened on its own gets a host of its own.
 */
export class OrtHost {
  private worker: Worker | undefined;
  private nextId = 0;
  private readonly pending = new Map<number, { resolve: (r: Reply) => void; reject: (e: Error) => void }>();
  private readonly open = new Set<number>();
  private ended: Error | undefined;

  /**
   * Loads `model` (bytes or a file path) as a new session. Bytes are copied to the worker unless `giveBytes` is
   * true, in which case their buffer moves there and the caller's view becomes empty (for bytes made only for this).
   */
  async openSession(model: Uint8Array | string, options: Ort.InferenceSession.SessionOptions, giveBytes = false): Promise<OrtSession> {
    ort();  // onnxruntime-node missing (or too old): the clear error, before any thread starts
    const owned = typeof model === 'string' || (giveBytes && coversBuffer(model)) ? model : await copyInPieces(model);
    const session = this.nextId++;
    let reply: Reply;
    try {
      reply = await this.request({ op: 'open', session, model: owned, options }, typeof owned === 'string' ? [] : [owned.buffer as ArrayBuffer]);
    } catch (e) {
      if (this.open.size === 0 && this.pending.size === 0) await this.stop();  // nothing left for the thread
      throw e;
    }
    if (this.ended) throw this.ended;  // closed while it loaded: close() ends the thread, and the session with it
    this.open.add(session);
    return new OrtSession(this, session, reply.inputNames!, reply.outputNames!);
  }

  /** Releases every session still open and ends the thread; the host cannot be used after. */
  async close(): Promise<void> {
    const open = [...this.open];
    this.open.clear();
    const alive = this.worker !== undefined && this.ended === undefined;  // a thread that died answers nothing
    this.ended ??= new Error('the onnxruntime host was closed');
    // Best effort: the thread ends below either way, and a failed release must not replace the caller's result or error.
    if (alive) for (const session of open) await this.send({ op: 'release', session }, []).catch(() => undefined);
    await this.stop();
  }

  /** @internal OrtSession.run */
  async run(session: number, feeds: Record<string, PlainTensor>, fetches: string[] | undefined, transfer: ArrayBuffer[]): Promise<Reply> {
    if (!this.open.has(session)) throw this.ended ?? new Error(`onnxruntime session ${session} was released`);
    return this.request({ op: 'run', session, feeds, ...(fetches ? { fetches } : {}) }, transfer);
  }

  /** @internal OrtSession.release */
  async release(session: number): Promise<void> {
    if (!this.open.delete(session) || this.ended) return;
    await this.request({ op: 'release', session }, []);
  }

  private async stop(): Promise<void> {
    const worker = this.worker;
    this.worker = undefined;
    this.settleAll(this.ended ?? new Error('the onnxruntime thread was stopped'));
    await worker?.terminate();
  }

  private settleAll(e: Error): void {
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }

  private started(): Worker {
    if (this.worker) return this.worker;
    const worker = new Worker(path.join(__dirname, 'ort-worker.js'));
    worker.on('message', (reply: Reply) => {
      const p = this.pending.get(reply.id);
      if (!p) return;
      this.pending.delete(reply.id);
      if (this.pending.size === 0) worker.unref();
      if (reply.error !== undefined) p.reject(reply.transport ? new Error(reply.error) : new OnnxruntimeFailure(reply.error));
      else p.resolve(reply);
    });
    const fail = (e: Error) => {
      if (this.worker !== worker) return;  // stopped on purpose
      this.ended ??= e;
      this.settleAll(e);
      worker.unref();  // nothing more will come from it
    };
    worker.on('error', fail);
    worker.on('messageerror', fail);
    worker.on('exit', (code) => fail(new Error(`the onnxruntime worker thread stopped (exit code ${code})`)));
    worker.unref();  // an idle host never keeps the process alive
    return (this.worker = worker);
  }

  private request(body: DistributiveOmit<SessionRequest, 'id'>, transfer: ArrayBuffer[]): Promise<Reply> {
    if (this.ended) return Promise.reject(this.ended);
    return this.send(body, transfer);
  }

  /** Posts a request (also while closing) and waits for its reply. */
  private send(body: DistributiveOmit<SessionRequest, 'id'>, transfer: ArrayBuffer[]): Promise<Reply> {
    if (this.ended && !this.worker) return Promise.reject(this.ended);  // never a new thread for a closed host
    const worker = this.started();
    const id = this.nextId++;
    return new Promise<Reply>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      worker.ref();  // a pending answer keeps the process alive
      try {
        worker.postMessage({ id, ...body }, transfer);
      } catch (e) {
        this.pending.delete(id);
        if (this.pending.size === 0) worker.unref();
        reject(e);
      }
    });
  }
}

/** An onnxruntime-node session held by an OrtHost's worker thread. */
export class OrtSession {
  /** @internal OrtHost.openSession makes sessions. */
  constructor(private readonly host: OrtHost, private readonly id: number, readonly inputNames: readonly string[],
    readonly outputNames: readonly string[], private readonly ownsHost = false) {}

  /** A session on a host of its own, which `release` closes. */
  static async open(model: Uint8Array | string, options: Ort.InferenceSession.SessionOptions, giveBytes = false): Promise<OrtSession> {
    const host = new OrtHost();
    try {
      const s = await host.openSession(model, options, giveBytes);
      return new OrtSession(host, s.id, s.inputNames, s.outputNames, true);
    } catch (e) {
      await host.close();
      throw e;
    }
  }

  /** Runs the model on `feeds` (onnxruntime Tensors or plain { type, data, dims }); returns onnxruntime Tensors. */
  async run(feeds: Record<string, PlainTensor>, fetches?: string[]): Promise<Record<string, Ort.Tensor>> {
    // A view into a larger buffer would be posted with its whole buffer: such data go as copies of their own range,
    // which then move rather than being copied again.
    const transfer: ArrayBuffer[] = [];
    const plain = Object.fromEntries(Object.entries(feeds).map(([name, t]) => {
      let data = t.data;
      if (ArrayBuffer.isView(data) && !coversBuffer(data)) {
        data = copyOf(data);
        transfer.push(data.buffer as ArrayBuffer);
      }
      return [name, { type: t.type, data, dims: [...t.dims] }];
    }));
    const reply = await this.host.run(this.id, plain, fetches, transfer);
    const O = ort();
    return Object.fromEntries(Object.entries(reply.outputs!).map(([name, t]) =>
      [name, new O.Tensor(t.type as 'float32', t.data as Float32Array, t.dims as number[])]));
  }

  /** Releases the session (and its host when it has one of its own). */
  async release(): Promise<void> {
    try {
      await this.host.release(this.id);
    } finally {
      if (this.ownsHost) await this.host.close();
    }
  }
}

type DistributiveOmit<T, K extends keyof T> = T extends unknown ? Omit<T, K> : never;

/**
 * An onnxruntime session on `model`, on `where.host` or on a worker of its own; when onnxruntime rejects the model, an
 * OnnxModelError that says which model (`what`), onnxruntime's reason and what to do.
 */
export async function openSession(model: Uint8Array | string, options: Ort.InferenceSession.SessionOptions, what: string, remedy: string,
  where: { host?: OrtHost; giveBytes?: boolean } = {}): Promise<OrtSession> {
  // onnxruntime's own log stays quiet (fatal only): its failures come back as errors that say what to do, and its
  // warnings (e.g. float16 nodes it cannot constant-fold) are nothing a user can act on. No CPU memory arena: lowbit's
  // sessions run a few large batches, two sessions at once when comparing, and an arena keeps each one's largest run
  // allocated for the session's life (an image model at 1024x1024 peaked at 6.25 GB with it, 2.70 GB without). Callers that run many like batches
  // (distillation's teacher) ask for it back.
  const quiet = { logSeverityLevel: 4 as const, enableCpuMemArena: false, ...options };
  ort();  // onnxruntime-node missing: its own error, not a model error
  try {
    return await (where.host ? where.host.openSession(model, quiet, where.giveBytes) : OrtSession.open(model, quiet, where.giveBytes));
  } catch (e) {
    if (!(e instanceof OnnxruntimeFailure)) throw e;  // not the model's doing (a closed host, a stopped thread)
    throw new OnnxModelError(`onnxruntime cannot load ${what}: ${reasonOf(e)}. ${remedy}`);
  }
}

/** session.run, with onnxruntime's failure as an OnnxModelError that names the model and the feed and says what to do. */
export async function runSession(session: OrtSession, feeds: Record<string, PlainTensor>, fetches: string[] | undefined,
  what: string, remedy: string): Promise<Record<string, Ort.Tensor>> {
  try {
    return await session.run(feeds, fetches);
  } catch (e) {
    // Not onnxruntime's error (a worker thread that stopped, a closed host, a feed that cannot be posted): said with
    // what was running, in an error of its own (the host gives every pending request the same one).
    if (!(e instanceof OnnxruntimeFailure)) throw new Error(`${(e as Error).message} (while running ${what})`, { cause: e });
    throw new OnnxModelError(`onnxruntime could not run ${what}: ${reasonOf(e)}. ${remedy}`, { cause: e });
  }
}

/**
 * onnxruntime's message on one line, with the detail lines that follow its first (which indices of which input got
 * which size) but not its closing advice, which the caller's remedy replaces.
 */
function reasonOf(e: Error): string {
  const lines = e.message.split('\n').map((l) => l.trim().replace(/\.$/, '')).filter((l) => l && !/^Please fix/.test(l));
  return lines.slice(0, 6).join('; ') + (lines.length > 6 ? '; …' : '');
}

/**
 * Opens two sessions one after the other (together, their transient loading memory would add up); when the
 * second fails, the first is closed.
 */
export async function openPair<T>(first: () => Promise<T>, second: () => Promise<T>, close: (opened: T) => Promise<void>): Promise<[T, T]> {
  const a = await first();
  try {
    return [a, await second()];
  } catch (e) {
    await close(a).catch(() => undefined);
    throw e;
  }
}
