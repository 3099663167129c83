/**
 * The worker thread behind OrtHost (ort-session.ts): it holds onnxruntime-node sessions, so that loading models
 * and running them (both synchronous in onnxruntime-node) happen off the caller's event loop.
 *
 * Requests: { id, op: 'open', session, model, options } → { id, inputNames, outputNames } (the model's bytes are
 *           moved back, detached: onnxruntime keeps its own copy);
 *           { id, op: 'run', session, feeds, fetches? } → { id, outputs };  { id, op: 'release', session } → { id }.
 * A failure answers { id, error } with onnxruntime's message, or { id, error, transport: true } when a reply could
 * not be posted back. Requests are answered one at a time, in order. Tensors travel as { type, data, dims }.
 */
import { parentPort } from 'node:worker_threads';
import type * as Ort from 'onnxruntime-node';

import type { PlainTensor, SessionRequest } from './ort-session';

const port = parentPort!;
const sessions = new Map<number, Ort.InferenceSession>();

function held(id: number): Ort.InferenceSession {
  const session = sessions.get(id);
  if (!session) throw new Error(`session ${id} is not open`);
  return session;
}

async function answer(request: SessionRequest): Promise<{ reply: object; transfer: ArrayBuffer[] }> {
  const ort = require('onnxruntime-node') as typeof Ort;
  switch (request.op) {
    case 'open': {
      const session = await ort.InferenceSession.create(request.model as Uint8Array, request.options);
      sessions.set(request.session, session);
      // onnxruntime has parsed the bytes into its own memory: they go back to the caller's thread, which drops them,
      // rather than wait in this thread's heap for a collection that an idle thread may not run for a long time.
      // (Not when a session option lets onnxruntime keep using them: ORT-format models' use_ort_model_bytes_*.)
      const direct = JSON.stringify(request.options).includes('use_ort_model_bytes');
      const bytes = typeof request.model === 'string' || direct ? [] : [request.model.buffer as ArrayBuffer];
      return { reply: { inputNames: session.inputNames, outputNames: session.outputNames }, transfer: bytes };
    }
    case 'run': {
      const session = held(request.session);
      const feeds = Object.fromEntries(Object.entries(request.feeds).map(([name, t]) =>
        [name, new ort.Tensor(t.type as 'float32', t.data as Float32Array, t.dims)]));
      const results = request.fetches ? await session.run(feeds, request.fetches) : await session.run(feeds);
      const outputs: Record<string, PlainTensor> = {};
      const transfer: ArrayBuffer[] = [];
      for (const [name, t] of Object.entries(results)) {
        outputs[name] = { type: t.type, data: t.data as PlainTensor['data'], dims: t.dims };
        const data = t.data as ArrayBufferView;
        // An output that owns its whole buffer moves to the caller instead of being copied.
        if (ArrayBuffer.isView(data) && data.byteOffset === 0 && data.byteLength === data.buffer.byteLength &&
          data.buffer instanceof ArrayBuffer && !transfer.includes(data.buffer)) transfer.push(data.buffer);
      }
      return { reply: { outputs }, transfer };
    }
    case 'release': {
      const session = sessions.get(request.session);
      sessions.delete(request.session);
      await session?.release();
      return { reply: {}, transfer: [] };
    }
  }
}

/** Posts the reply: its buffers moved, else copied, else (outputs that cannot be cloned at all) an error reply. */
function reply(id: number, body: object, transfer: ArrayBuffer[]): void {
  try {
    port.postMessage({ id, ...body }, transfer);
  } catch {
    try {
      port.postMessage({ id, ...body });  // a buffer that cannot move (e.g. external memory) is copied
    } catch (e) {
      port.postMessage({ id, transport: true, error: `its outputs could not be passed back from the onnxruntime thread: ${(e as Error).message}` });
    }
  }
}

// A request that cannot be deserialized has no id to answer: ending the thread settles every pending request on the
// main thread (its 'exit' handler) instead of leaving one unanswered for good.
port.on('messageerror', () => process.exit(1));

// One request at a time, in order: a release never overtakes a run still in progress.
let queue: Promise<void> = Promise.resolve();
port.on('message', (request: SessionRequest) => {
  queue = queue.then(() => answer(request).then(({ reply: body, transfer }) => reply(request.id, body, transfer),
    (e: unknown) => port.postMessage({ id: request.id, error: e instanceof Error ? e.message : String(e) })));
});
