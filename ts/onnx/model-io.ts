/**
 * Reading and writing ONNX models with onnx-buf (the current ONNX schema,
 * byte-identical round trips). Writes are atomic: a temporary file in the same
 * folder, then a rename, so a failed write leaves no partial output.
 */
import { clearField, create, fromBinary, isFieldSet, toBinary } from '@bufbuild/protobuf';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { threadId } from 'node:worker_threads';
import {
  AttributeProtoSchema, GraphProtoSchema, ModelProtoSchema, NodeProtoSchema, TensorProto_DataLocation,
  TensorProto_DataType, TensorProtoSchema, type GraphProto, type ModelProto, type NodeProto, type TensorProto,
} from 'onnx-buf';

import { externalDataEntries, fieldHeader, skimModel, SkimError, type Skimmed } from './skim-model';
import { checkAttached } from '../validate';

/** A model file or buffer that cannot be used: the message says why and what to do. */
export class OnnxModelError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = 'OnnxModelError';
  }
}

const TWO_GB = 2 ** 31;

/** Where a lazily read tensor's bytes wait: its external data file, offset and length. */
interface ExternalSource {
  file: string;
  offset: number;
  length: number;
  /** The data file as the model was read (a lazily read tensor's file must still be that one when it reads). */
  identity: FileIdentity;
}

interface FileIdentity { dev: number; ino: number; size: number; mtimeMs: number }

function identityOf(stat: fs.Stats): FileIdentity {
  return { dev: stat.dev, ino: stat.ino, size: stat.size, mtimeMs: stat.mtimeMs };
}

function sameIdentity(a: FileIdentity, b: FileIdentity): boolean {
  return sameInode(a, b) && a.size === b.size && a.mtimeMs === b.mtimeMs;
}

function sameInode(a: { dev: number; ino: number }, b: { dev: number; ino: number }): boolean {
  return a.dev === b.dev && a.ino === b.ino;
}

/** Throws when a lazily read tensor's data file is no longer the file the model was read with (replaced or changed). */
function checkSameFile(name: string, source: ExternalSource, stat: fs.Stats): void {
  const was = source.identity;
  if (sameIdentity(was, identityOf(stat))) return;
  throw new OnnxModelError(`Tensor ${name}: its external data file ${source.file} changed since the model was read (${!sameInode(was, stat)
    ? 'another file is at its path' : `size ${was.size} -> ${stat.size} bytes, or written since`}), so its bytes at offset ${source.offset} may be another tensor's. ` +
    'Read the model again, and do not replace or rewrite its data file while it is in use.');
}

const EXTERNAL_SOURCE = Symbol('lowbit.externalSource');
/** On a tensor readLazyTensor read: its source and the bytes it read (see unloadTensor). */
const READ_FROM = Symbol('lowbit.readFrom');

/** Tensors at least this large are read when used, with `lazyTensors`; smaller ones at once. */
const LAZY_MIN_BYTES = 1 << 20;

export interface ReadModelOptions {
  /**
   * Read each large tensor (1 MiB or more) from its file when its data are used, every time, instead of holding
   * them all: a pass that quantizes weights one layer at a time then holds one layer's float weights, not the
   * model's. Tensors in external data files wait there; a model file read from a path is held like one with
   * external data: its large inline tensors wait in the model file and the file's bytes are not kept (unless the
   * skim gives up: the file is then read whole and its tensors view its bytes, as without the option). Reading
   * `rawData` of such a tensor reads the file; assigning it makes the tensor an ordinary one.
   */
  lazyTensors?: boolean;
}

/** Parses an ONNX model from a path or bytes; external data next to a model file is loaded (or read lazily). */
export function readModel(input: string | Uint8Array, options: ReadModelOptions = {}): ModelProto {
  if (typeof input !== 'string') {
    const model = parseModel(checkModelBytes(input));
    loadExternalData(model, undefined, false);  // refuses external data: there is no folder to find it in
    return model;
  }
  let stat: fs.Stats;
  try {
    stat = fs.statSync(input);
  } catch {
    throw modelFileMissing(input);
  }
  if (!stat.isFile()) throw notAModelFile(input);
  const skimmed = options.lazyTensors ? skimSync(input) : undefined;
  const fromSkim = parseSkimmed(skimmed, input);
  const model = fromSkim ?? parseModel(fileBytes(readWhole(input, () => fs.readFileSync(input), stat)), input);
  recordFilesRead(model, input, loadExternalData(model, path.dirname(input), options.lazyTensors ?? false));
  if (fromSkim) restoreSkimmedTensors(model, input, skimmed!);
  return model;
}

/**
 * readModel without holding the event loop while the file and its external data are read (a model of a few
 * hundred MB takes seconds); parsing itself is quick, since the tensors' bytes stay where the file was read.
 */
export async function readModelAsync(input: string | Uint8Array, options: ReadModelOptions = {}): Promise<ModelProto> {
  if (typeof input !== 'string') return readModel(input, options);
  let stat: fs.Stats;
  try {
    stat = await fs.promises.stat(input);
  } catch {
    throw modelFileMissing(input);
  }
  if (!stat.isFile()) throw notAModelFile(input);
  const skimmed = options.lazyTensors ? await skimAsync(input) : undefined;
  const fromSkim = parseSkimmed(skimmed, input);
  const model = fromSkim ?? parseModel(fileBytes(await readWhole(input, () => fs.promises.readFile(input), stat)), input);
  recordFilesRead(model, input, await loadExternalDataAsync(model, path.dirname(input), options.lazyTensors ?? false));
  if (fromSkim) restoreSkimmedTensors(model, input, skimmed!);
  return model;
}

type SkimmedFile = Omit<Skimmed, 'pieces'> & { bytes: Uint8Array; identity: FileIdentity };

/**
 * A model file skimmed (skim-model.ts): its protobuf with each large stored tensor an external data reference to
 * the file itself, and the file's identity while it was read. Undefined — the file is then read whole, and its
 * parse says what is wrong — when the walk met something it does not expect, when the file changed meanwhile, or
 * when the path, resolved as text (as the references will be, against its folder), names another file than the
 * one opened (a link followed by `..`).
 */
function skimSync(file: string): SkimmedFile | undefined {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch {
    return undefined;
  }
  try {
    const identity = identityOf(fs.fstatSync(fd));
    if (identity.size >= TWO_GB || !sameInode(identity, fs.statSync(path.resolve(file)))) return undefined;
    const walk = skimModel(identity.size, path.basename(file), LAZY_MIN_BYTES);
    let step = walk.next();
    while (!step.done) step = walk.next(readAt(fd, file, step.value.offset, step.value.length, 'model'));
    return skimmedFile(step.value, identity, identityOf(fs.fstatSync(fd)));
  } catch (e) {
    if (skimGaveUp(e)) return undefined;
    throw e;
  } finally {
    fs.closeSync(fd);
  }
}

/** skimSync with asynchronous reads. */
async function skimAsync(file: string): Promise<SkimmedFile | undefined> {
  let handle: fs.promises.FileHandle;
  try {
    handle = await fs.promises.open(file, 'r');
  } catch {
    return undefined;
  }
  try {
    const identity = identityOf(await handle.stat());
    if (identity.size >= TWO_GB || !sameInode(identity, await fs.promises.stat(path.resolve(file)))) return undefined;
    const walk = skimModel(identity.size, path.basename(file), LAZY_MIN_BYTES);
    let step = walk.next();
    while (!step.done) {
      const { offset, length } = step.value;
      step = walk.next(await readAtAsync(handle, { file, offset, length, identity }, 'model', new Uint8Array(length)));
    }
    return skimmedFile(step.value, identity, identityOf(await handle.stat()));
  } catch (e) {
    if (skimGaveUp(e)) return undefined;
    throw e;
  } finally {
    await handle.close();
  }
}

/** The skim's result in one buffer (its pieces dropped), or undefined when the file changed while it was skimmed. */
function skimmedFile({ pieces, left, locationSet }: Skimmed, identity: FileIdentity, after: FileIdentity): SkimmedFile | undefined {
  return sameIdentity(identity, after) ? { left, locationSet, bytes: joined(pieces), identity } : undefined;
}

/** Errors after which the file is read whole instead: the walk's surprises, a read past a shrunk end, a file system error. */
function skimGaveUp(e: unknown): boolean {
  return e instanceof SkimError || e instanceof OnnxModelError || (e instanceof Error && typeof (e as NodeJS.ErrnoException).code === 'string');
}

/** The skimmed model, parsed; undefined when it does not parse (the file read whole then gives the error, as without skimming). */
function parseSkimmed(skimmed: { bytes: Uint8Array } | undefined, file: string): ModelProto | undefined {
  if (!skimmed) return undefined;
  try {
    return parseModel(skimmed.bytes, file);
  } catch (e) {
    if (e instanceof OnnxModelError) return undefined;
    throw e;
  }
}

function joined(pieces: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(pieces.reduce((a, p) => a + p.length, 0));
  let at = 0;
  for (const p of pieces) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/**
 * The skimmed tensors as the file stores them (a data_location only where they had one), checked to wait in the
 * model file as it was skimmed (loadExternalData opened it again).
 */
function restoreSkimmedTensors(model: ModelProto, file: string, skimmed: SkimmedFile): void {
  const resolved = path.resolve(file);
  for (const t of storedTensors(model)) {
    const source = lazySource(t);
    if (source?.file !== resolved || !skimmed.left.has(source.offset)) continue;
    if (!sameIdentity(source.identity, skimmed.identity)) {
      throw new OnnxModelError(`${file} changed while it was being read. Read the model again, and do not replace or rewrite it while it is in use.`);
    }
    if (!skimmed.locationSet.has(source.offset)) clearField(t, TensorProtoSchema.field.dataLocation);
  }
}

function modelFileMissing(file: string): OnnxModelError {
  return new OnnxModelError(`Expected an ONNX model file for model but received "${file}", which does not exist.`);
}

function notAModelFile(file: string): OnnxModelError {
  return new OnnxModelError(`Expected an ONNX model file for model but received "${file}", which is not a file.`);
}

function checkModelBytes(input: unknown): Uint8Array {
  if (input instanceof Uint8Array) {
    checkAttached('model', input);  // a detached buffer reads as empty: say so rather than "not an ONNX model"
    return input;
  }
  throw new TypeError(`Expected a file path or a Uint8Array for model but received ${typeof input}.`);
}

/** A file's bytes as a plain Uint8Array over the same memory: copying a model of several hundred MB took seconds. */
function fileBytes(buffer: Buffer): Uint8Array {
  return new Uint8Array(buffer.buffer, buffer.byteOffset, buffer.byteLength);
}

/** Reads a model file whole: one over 2 GiB cannot be an ONNX protobuf (Node would refuse it without naming it). */
function readWhole<T>(file: string, read: () => T, stat: fs.Stats): T {
  if (stat.size >= 2 ** 31) {
    throw new OnnxModelError(`${file} is ${(stat.size / 2 ** 30).toFixed(1)} GiB: an ONNX model file stays under 2 GB (its large weights in external data). ` +
      'Is it the external data file? Pass the .onnx file next to it.');
  }
  return read();
}

/** The model in `bytes` (protobuf-es keeps its tensors' bytes as views of them), checked to be an ONNX model; `file` names it in errors. */
function parseModel(bytes: Uint8Array, file?: string): ModelProto {
  const what = file ? `${file} is` : 'This is';
  let model: ModelProto;
  try {
    model = fromBinary(ModelProtoSchema, bytes);
  } catch (e) {
    throw new OnnxModelError(`${what} not an ONNX model, or it is truncated or corrupted: the protobuf did not parse (${(e as Error).message}).`);
  }
  if (!model.graph || model.irVersion === 0n || model.opsetImport.length === 0) {
    throw new OnnxModelError(`${what} not an ONNX model: it has no graph, IR version or opset (is it another protobuf file?).`);
  }
  return model;
}

/** Reads `length` bytes at `offset` of an open file; `what` names the tensor in errors. */
function readAt(fd: number, file: string, offset: number, length: number, what: string, data: Uint8Array<ArrayBuffer> = new Uint8Array(length)): Uint8Array<ArrayBuffer> {
  for (let read = 0; read < length;) {
    const n = fs.readSync(fd, data, read, length - read, offset + read);
    if (n === 0) throw fileEnded(what, file);
    read += n;
  }
  return data;
}

/** A lazily read tensor's data file that is gone (readExternal, readExternalAsync). */
function fileGone(name: string, file: string): OnnxModelError {
  return new OnnxModelError(`Tensor ${name}: its external data file ${file} cannot be read any more (was it moved or deleted while the model was in use?).`);
}

/** A data file shorter than the tensor's data (readAt, readAtAsync). */
function fileEnded(name: string, file: string): OnnxModelError {
  return new OnnxModelError(`Tensor ${name}: ${file} ended while reading its data (was it changed while being read?).`);
}

/** A lazily read tensor's bytes, from its file, into `into` when given. */
function readExternal(name: string, source: ExternalSource, into?: Uint8Array<ArrayBuffer>): Uint8Array<ArrayBuffer> {
  let fd: number;
  try {
    fd = fs.openSync(source.file, 'r');
  } catch {
    throw fileGone(name, source.file);
  }
  try {
    checkSameFile(name, source, fs.fstatSync(fd));
    return readAt(fd, source.file, source.offset, source.length, name, into);
  } finally {
    fs.closeSync(fd);
  }
}

/** Makes `t.rawData` read its bytes from the file on every access, until something assigns it. */
function readLazily(t: TensorProto, source: ExternalSource): void {
  Object.defineProperty(t, EXTERNAL_SOURCE, { value: source, configurable: true, enumerable: false });
  Object.defineProperty(t, 'rawData', {
    configurable: true,
    enumerable: true,
    get: () => readExternal(t.name, source),
    set: (value: Uint8Array) => {
      delete (t as { [EXTERNAL_SOURCE]?: ExternalSource })[EXTERNAL_SOURCE];
      Object.defineProperty(t, 'rawData', { value, writable: true, enumerable: true, configurable: true });
    },
  });
}

/** Where a lazily read tensor's bytes wait; undefined for other tensors. */
function lazySource(t: TensorProto): ExternalSource | undefined {
  return (t as { [EXTERNAL_SOURCE]?: ExternalSource })[EXTERNAL_SOURCE];
}

/** A lazily read tensor's bytes, read asynchronously into a new array. */
function readSourceAsync(t: TensorProto, source: ExternalSource): Promise<Uint8Array<ArrayBuffer>> {
  return readExternalAsync(new Uint8Array(source.length), t.name, source);
}

/**
 * For a lazily read tensor, reads its bytes asynchronously and keeps them (it becomes an ordinary tensor, its data
 * freed with it); undefined for other tensors. What a pass uses next, read without holding the event loop.
 */
export function readLazyTensor(t: TensorProto): Promise<void> | undefined {
  const source = lazySource(t);
  if (!source) return undefined;
  return readSourceAsync(t, source).then((bytes) => {
    if (lazySource(t) !== source) return;  // something assigned its data meanwhile
    t.rawData = bytes;
    Object.defineProperty(t, READ_FROM, { value: { source, bytes }, configurable: true, enumerable: false });
  });
}

/**
 * Gives back the bytes readLazyTensor read for `t`, which then reads them from its file again when used (lazily, as
 * before); nothing happens to a tensor whose data were assigned since. For a pass done with a large weight that the
 * graph still holds until the pass ends: without it, every layer's float weights stayed in memory to the end.
 */
export function unloadTensor(t: TensorProto): void {
  const read = (t as { [READ_FROM]?: { source: ExternalSource; bytes: Uint8Array } })[READ_FROM];
  if (!read) return;
  delete (t as { [READ_FROM]?: unknown })[READ_FROM];
  if (t.rawData === read.bytes) readLazily(t, read.source);
}

/** A lazily read tensor's contents in a new tensor (read asynchronously; the tensor stays lazy); other tensors as they are. */
export async function withDataRead(t: TensorProto): Promise<TensorProto> {
  const source = lazySource(t);
  if (!source) return t;
  const rawData = await readSourceAsync(t, source);
  return create(TensorProtoSchema, { name: t.name, dataType: t.dataType, dims: t.dims, rawData });
}

/**
 * Whether two tensors hold the same values by construction: the same data bytes (shared, as cloneSharingData shares
 * them, or waiting at the same place in one file), or small ones equal byte for byte. Lazily read tensors are not read.
 */
export function sameStoredData(a: TensorProto, b: TensorProto): boolean {
  if (a.dataType !== b.dataType || a.dims.join() !== b.dims.join()) return false;
  const [sa, sb] = [lazySource(a), lazySource(b)];
  if (sa || sb) return sa === sb;
  const equal = (x: Uint8Array, y: Uint8Array) => x === y || (x.length <= PLACED_MIN_BYTES && x.length === y.length && x.every((v, i) => v === y[i]));
  if (a.rawData.length > 0 || b.rawData.length > 0) return equal(a.rawData, b.rawData);
  // Values in a typed field (float_data, int64_data…).
  return equal(toBinary(TensorProtoSchema, { ...a, name: '' }), toBinary(TensorProtoSchema, { ...b, name: '' }));
}

/** The byte length of a tensor's raw data, without reading it when it waits in its file. */
export function rawLength(t: TensorProto): number {
  return lazySource(t)?.length ?? t.rawData.length;
}

/** A tensor kept in an external file: the file (inside the model's folder) and its location entries. */
interface ExternalTensor {
  t: TensorProto;
  file: string;
  entry: Record<string, string>;
}

function externalTensors(model: ModelProto, folder: string | undefined): ExternalTensor[] {
  const found: ExternalTensor[] = [];
  for (const t of storedTensors(model)) {
    if (t.dataLocation !== TensorProto_DataLocation.EXTERNAL) continue;
    const entry = Object.fromEntries(t.externalData.map((e) => [e.key, e.value]));
    if (!folder) throw new OnnxModelError(`Tensor ${t.name} keeps its data in an external file (${entry.location}); pass the model as a file path so it can be found.`);
    if (!entry.location || entry.location === '.') {
      throw new OnnxModelError(`Tensor ${t.name} keeps its data externally but names no data file (location ${JSON.stringify(entry.location ?? null)}): ` +
        'the model file is corrupted or was written wrongly; re-export it.');
    }
    const file = path.resolve(folder, entry.location ?? '');
    const relative = path.relative(path.resolve(folder), file);
    if (relative === '' || relative.split(path.sep)[0] === '..' || path.isAbsolute(relative)) throw new OnnxModelError(`Tensor ${t.name} points outside the model's folder (${entry.location}).`);
    found.push({ t, file, entry });
  }
  return found;
}

function unreadableDataFile(t: TensorProto, file: string, why: string): OnnxModelError {
  return new OnnxModelError(`Tensor ${t.name}: its external data file ${file} cannot be read (${why}). Put the model's data file next to it, as it was written.`);
}

/**
 * Checks that a data file is a regular file before it is opened: opening a FIFO for reading waits for a writer
 * (for ever: not even process.exit ends the wait).
 */
function checkDataFile(t: TensorProto, file: string): void {
  const s = statOrUndefined(file);
  if (!s) throw unreadableDataFile(t, file, 'it does not exist');
  if (!s.isFile()) throw unreadableDataFile(t, file, s.isDirectory() ? 'it is a folder' : 'it is not a regular file');
}

function statOrUndefined(file: string): fs.Stats | undefined {
  try {
    return fs.statSync(file);
  } catch {
    return undefined;
  }
}

/** Where the tensor's bytes lie in its data file of `size` bytes (checked); the tensor is marked as holding them itself. */
function externalRange({ t, file, entry }: ExternalTensor, identity: FileIdentity): ExternalSource {
  const size = identity.size;
  // Decimal digits only, as onnxruntime reads them ('', ' 16', '0x10' and '1.6e1' are numbers to Number()).
  for (const key of ['offset', 'length'] as const) {
    if (entry[key] !== undefined && !/^[0-9]+$/.test(entry[key])) {
      throw new OnnxModelError(`Tensor ${t.name}: its external data ${key} is ${JSON.stringify(entry[key])}, not a byte count in decimal digits: ` +
        'the model file is corrupted or was written wrongly; re-export it.');
    }
  }
  const offset = Number(entry.offset ?? 0);
  const length = entry.length === undefined ? size - offset : Number(entry.length);
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > size) {
    throw new OnnxModelError(`Tensor ${t.name}: its external data (offset ${entry.offset ?? 0}, length ${entry.length ?? 'to the end'}) lies outside ` +
      `${file} (${size} bytes): the data file is truncated or belongs to another model.`);
  }
  t.dataLocation = TensorProto_DataLocation.DEFAULT;
  t.externalData = [];
  return { file, offset, length, identity };
}

/** Reads (or, lazily, finds) the model's external data; returns the data files. */
function loadExternalData(model: ModelProto, folder: string | undefined, lazy: boolean): string[] {
  // Each tensor reads its own bytes at its offset: reading the whole file per tensor made a model of n tensors
  // read its data file n times.
  const files = new Map<string, { fd: number; identity?: FileIdentity }>();
  try {
    for (const external of externalTensors(model, folder)) {
      const { t, file } = external;
      let opened = files.get(file);
      if (!opened) {
        checkDataFile(t, file);
        let fd: number;
        try {
          fd = fs.openSync(file, 'r');
        } catch (e) {
          throw unreadableDataFile(t, file, (e as NodeJS.ErrnoException).code ?? (e as Error).message);
        }
        files.set(file, opened = { fd });
        const stat = fs.fstatSync(fd);
        if (!stat.isFile()) throw unreadableDataFile(t, file, 'it is not a regular file');
        opened.identity = identityOf(stat);
      }
      const source = externalRange(external, opened.identity!);
      if (lazy && source.length >= LAZY_MIN_BYTES) readLazily(t, source);
      else t.rawData = readAt(opened.fd, file, source.offset, source.length, t.name);
    }
    return [...files.keys()];
  } finally {
    for (const { fd } of files.values()) {
      try {
        fs.closeSync(fd);
      } catch {
        // not to mask a read's error
      }
    }
  }
}

/** loadExternalData with asynchronous reads. */
async function loadExternalDataAsync(model: ModelProto, folder: string | undefined, lazy: boolean): Promise<string[]> {
  const files = new Map<string, { handle: fs.promises.FileHandle; identity?: FileIdentity }>();
  try {
    for (const external of externalTensors(model, folder)) {
      const { t, file } = external;
      let opened = files.get(file);
      if (!opened) {
        checkDataFile(t, file);
        let handle: fs.promises.FileHandle;
        try {
          handle = await fs.promises.open(file, 'r');
        } catch (e) {
          throw unreadableDataFile(t, file, (e as NodeJS.ErrnoException).code ?? (e as Error).message);
        }
        files.set(file, opened = { handle });
        const stat = await handle.stat();
        if (!stat.isFile()) throw unreadableDataFile(t, file, 'it is not a regular file');
        opened.identity = identityOf(stat);
      }
      const source = externalRange(external, opened.identity!);
      if (lazy && source.length >= LAZY_MIN_BYTES) readLazily(t, source);
      else t.rawData = await readAtAsync(opened.handle, source, t.name, new Uint8Array(source.length));
    }
    return [...files.keys()];
  } finally {
    for (const { handle } of files.values()) await handle.close().catch(() => undefined);  // not to mask a read's error
  }
}

/** Weight bytes above which a model cannot be one ONNX buffer (protobuf's 2 GB, less room for the graph). */
export const ONE_BUFFER_LIMIT = 2 ** 31 - 2 ** 26;

/** Bytes of the model's stored tensors (initializers and Constant values). */
export function storedBytes(model: ModelProto): number {
  return storedTensors(model).reduce((a, t) => a + rawLength(t) + 4 * t.floatData.length, 0);
}

/**
 * The model's stored tensors: initializers, then Constant nodes' values, in graph order; then those of the subgraphs
 * (If branches, Loop and Scan bodies, whose tensors may keep their data externally too), depth first.
 */
function storedTensors(model: ModelProto): TensorProto[] {
  return allGraphs(model).flatMap(graphTensors);
}

/** A graph's own stored tensors: its initializers, then its Constant nodes' values. */
function graphTensors(g: GraphProto): TensorProto[] {
  return [...g.initializer, ...g.node.filter((n) => n.opType === 'Constant').flatMap((n) => n.attribute.filter((a) => a.name === 'value' && a.t).map((a) => a.t!))];
}

/** The main graph and every subgraph in it (If branches, Loop and Scan bodies, nested), each before its subgraphs. */
function allGraphs(model: ModelProto): GraphProto[] {
  const found: GraphProto[] = [];
  const collect = (g: GraphProto) => {
    found.push(g);
    for (const n of g.node) subgraphsOf(n).forEach(collect);
  };
  collect(model.graph!);
  return found;
}

/** The subgraphs a node holds (If's branches, Loop's and Scan's bodies). */
export function subgraphsOf(node: NodeProto): GraphProto[] {
  return node.attribute.flatMap((a) => (a.g ? [a.g, ...a.graphs] : a.graphs));
}

/**
 * A deep copy of the model whose stored tensors (initializers, Constant values) share their data bytes with the
 * original's: a large model's weights are not copied, and a lazily read tensor stays lazy in both (it is not read).
 * Safe because lowbit's passes give a tensor new rawData, never write into it.
 */
export function cloneSharingData(model: ModelProto): ModelProto {
  // Only tensors with raw bytes: one whose values sit in a typed field (float_data, int32_data…) must keep raw_data
  // unset, which an assigned empty array is not (onnxruntime then reads 0 bytes of raw data).
  const tensors = storedTensors(model).filter((t) => rawLength(t) > 0);
  const sources = tensors.map(lazySource);
  const held = tensors.map((t, i) => (sources[i] ? undefined : t.rawData));
  const restore = (t: TensorProto, i: number) => (sources[i] ? readLazily(t, sources[i]!) : (t.rawData = held[i]!));
  for (const t of tensors) t.rawData = new Uint8Array(0);
  try {
    const copy = fromBinary(ModelProtoSchema, toBinary(ModelProtoSchema, model));
    const copies = storedTensors(copy);  // in the same order as the original's
    const index = new Map(storedTensors(model).map((t, i) => [t, i]));
    tensors.forEach((t, i) => restore(copies[index.get(t)!], i));
    return copy;
  } finally {
    tensors.forEach(restore);
  }
}

/** Initializers and Constant-node values with at least this many data bytes are copied into the output by lowbit rather than by protobuf-es. */
const PLACED_MIN_BYTES = 1 << 16;

/** A piece of a serialized model: encoded bytes, or a tensor's data to copy in (from memory or from its file). */
type Piece = Uint8Array | { data: Uint8Array } | { source: ExternalSource; name: string };

function pieceLength(p: Piece): number {
  return p instanceof Uint8Array ? p.length : 'data' in p ? p.data.length : p.source.length;
}

type SplitSchema = typeof ModelProtoSchema | typeof GraphProtoSchema | typeof NodeProtoSchema | typeof AttributeProtoSchema |
  typeof TensorProtoSchema;

/**
 * The encoding of `message`'s fields whose numbers `keep` accepts (and its unknown fields when `unknown`).
 * protobuf-es writes fields in number order, unknown fields last, so a message's encoding is the concatenation of
 * such parts around one field; reading the message's properties does not read a lazily read tensor's data.
 */
function encodeFields(schema: SplitSchema, message: object, keep: (field: number) => boolean, unknown: boolean): Uint8Array {
  const part = create(schema) as unknown as Record<string, unknown>;
  const source = message as Record<string, unknown>;
  for (const f of schema.fields) if (keep(f.number) && Object.prototype.hasOwnProperty.call(source, f.localName)) part[f.localName] = source[f.localName];
  if (unknown && source.$unknown) part.$unknown = source.$unknown;
  return toBinary(schema as typeof ModelProtoSchema, part as unknown as ModelProto);
}

/** Tensors whose data are a piece of their own. */
function placed(t: TensorProto | undefined): t is TensorProto {
  return t !== undefined && rawLength(t) >= PLACED_MIN_BYTES;
}

/** A length-delimited field holding `pieces`: its tag and length, then them. */
function fieldOf(field: number, pieces: Piece[]): Piece[] {
  return [fieldHeader(field, pieces.reduce((a, p) => a + pieceLength(p), 0)), ...pieces];
}

/** TensorProto.raw_data is field 9. */
function tensorPieces(t: TensorProto): Piece[] {
  if (!placed(t)) return [toBinary(TensorProtoSchema, t)];
  const source = lazySource(t);
  return [
    encodeFields(TensorProtoSchema, t, (n) => n < 9, false),
    fieldHeader(9, rawLength(t)),
    source ? { source, name: t.name } : { data: t.rawData },
    encodeFields(TensorProtoSchema, t, (n) => n > 9, true),
  ];
}

/** Nodes with a large tensor attribute (a Constant's value) are split around it. */
function holdsPlacedTensor(node: NodeProto): boolean {
  return node.attribute.some((a) => placed(a.t));
}

/** A node that holdsPlacedTensor: NodeProto.attribute is field 5, AttributeProto.t field 5. */
function nodePieces(node: NodeProto): Piece[] {
  const attributes = node.attribute.flatMap((a) => fieldOf(5, placed(a.t)
    ? [encodeFields(AttributeProtoSchema, a, (n) => n < 5, false), ...fieldOf(5, tensorPieces(a.t)), encodeFields(AttributeProtoSchema, a, (n) => n > 5, true)]
    : [toBinary(AttributeProtoSchema, a)]));
  return [encodeFields(NodeProtoSchema, node, (n) => n < 5, false), ...attributes, encodeFields(NodeProtoSchema, node, (n) => n > 5, true)];
}

/**
 * The model's encoding as pieces: exactly protobuf-es's bytes, but the data of each initializer or Constant-node
 * value of 64 KiB or more is a piece of its own, to be copied once, straight into place (protobuf-es grows its
 * buffer by doubling and shifts each nested message into place: it copied a 128 MiB model's weights several times;
 * the PP-OCR models keep their weights in Constant nodes).
 * Field numbers: ModelProto.graph 7, GraphProto.node 1 and initializer 5.
 */
function modelPieces(model: ModelProto): Piece[] {
  const graph = model.graph;
  if (!graph || !(graph.initializer.some(placed) || graph.node.some(holdsPlacedTensor))) return [toBinary(ModelProtoSchema, model)];
  // Runs of nodes without a placed value are encoded in one call each (a call per node costs on large graphs).
  const graphPieces: Piece[] = [];
  let run: NodeProto[] = [];
  const endRun = () => {
    if (run.length > 0) graphPieces.push(encodeFields(GraphProtoSchema, { node: run }, (n) => n === 1, false));
    run = [];
  };
  for (const n of graph.node) {
    if (!holdsPlacedTensor(n)) {
      run.push(n);
      continue;
    }
    endRun();
    graphPieces.push(...fieldOf(1, nodePieces(n)));
  }
  endRun();
  graphPieces.push(
    encodeFields(GraphProtoSchema, graph, (n) => n > 1 && n < 5, false),
    ...graph.initializer.flatMap((t) => fieldOf(5, tensorPieces(t))),
    encodeFields(GraphProtoSchema, graph, (n) => n > 5, true),
  );
  return [
    encodeFields(ModelProtoSchema, model, (n) => n < 7, false),
    ...fieldOf(7, graphPieces),
    encodeFields(ModelProtoSchema, model, (n) => n > 7, true),
  ];
}

/** One buffer for the pieces; protobuf cannot hold 2 GB or more. */
function allocateFor(pieces: Piece[]): Uint8Array {
  const total = pieces.reduce((a, p) => a + pieceLength(p), 0);
  if (total >= TWO_GB) {
    throw new OnnxModelError(`The model is ${(total / 2 ** 30).toFixed(2)} GB; ONNX protobuf files must stay under 2 GB. Keep large weights in external data.`);
  }
  return pieces.length === 1 && pieces[0] instanceof Uint8Array ? pieces[0] : new Uint8Array(total);
}

/** Serializes a model (protobuf-es's bytes, with fewer copies of large tensors); protobuf cannot hold 2 GB or more. */
export function serializeModel(model: ModelProto): Uint8Array {
  const pieces = modelPieces(model);
  const out = allocateFor(pieces);
  if (out === pieces[0]) return out;
  let pos = 0;
  for (const p of pieces) {
    if ('source' in p) readExternal(p.name, p.source, out.subarray(pos, pos + p.source.length) as Uint8Array<ArrayBuffer>);
    else out.set(p instanceof Uint8Array ? p : p.data, pos);
    pos += pieceLength(p);
  }
  return out;
}

/**
 * serializeModel without holding the event loop for the data: lazily read tensors are read asynchronously straight
 * into place, and the loop turns between large tensors. The same bytes.
 */
export async function serializeModelAsync(model: ModelProto): Promise<Uint8Array> {
  return joinPiecesAsync(await modelPiecesAsync(model));
}

/**
 * modelPieces, with the lazily read tensors of subgraphs read asynchronously first (protobuf-es encodes them with
 * their node, which would read them synchronously) and given back to their files once encoded. (Two of these at
 * once on one model would give tensors back under each other: the bytes stay right, some reads synchronous.)
 */
async function modelPiecesAsync(model: ModelProto): Promise<Piece[]> {
  const inSubgraphs = model.graph ? allGraphs(model).slice(1).flatMap(graphTensors).filter((t) => lazySource(t)) : [];
  try {
    for (const t of inSubgraphs) await readLazyTensor(t);
    return modelPieces(model);
  } finally {
    inSubgraphs.forEach(unloadTensor);
  }
}

/** The pieces in one buffer: lazily read tensors read asynchronously straight into place, the loop turning between large pieces. */
async function joinPiecesAsync(pieces: Piece[]): Promise<Uint8Array> {
  const out = allocateFor(pieces);
  if (out === pieces[0]) return out;
  let pos = 0;
  for (const p of pieces) {
    if (p instanceof Uint8Array) {
      out.set(p, pos);
      pos += p.length;
      continue;
    }
    if ('data' in p) {
      out.set(p.data, pos);
      pos += p.data.length;
    } else {
      pos += (await readExternalAsync(out.subarray(pos, pos + p.source.length), p.name, p.source)).length;
    }
    await new Promise(setImmediate);
  }
  return out;
}

/**
 * The model's bytes for an onnxruntime session, with the lazily read initializers of its graphs (subgraphs too)
 * left in their files: each is written as an external data reference (its file relative to `folder`, offset and
 * length) rather than read, and the session finds them under `folder` (onnxruntime's session option
 * `session.model_external_initializers_file_folder_path`; sessionFolderOption). So a calibration or evaluation
 * session on a large model reads its untouched weights from the model's own files: lowbit holds no serialized copy
 * of them and onnxruntime parses none. Files are named by their real paths (onnxruntime refuses a reference that
 * resolves, through a symbolic link, outside the folder: a model in a Hugging Face cache is such a link), and are
 * checked to be those the model was read with, before and — `check` — after the session opened them.
 * `folder` is undefined when nothing is left in a file (the bytes are then serializeModelAsync's). The model's
 * tensors are references while this runs: give it a model nothing else uses meanwhile (a copy made for the session).
 */
export async function serializeForSession(model: ModelProto): Promise<{ bytes: Uint8Array; folder?: string; check: () => Promise<void> }> {
  const found = waitingInitializers(model);
  if (found.length === 0) return { bytes: await serializeModelAsync(model), check: async () => undefined };
  const check = () => checkFiles(found);
  await check();
  const real = new Map<string, string>();
  for (const { t, source } of found) {
    if (real.has(source.file)) continue;
    try {
      real.set(source.file, await fs.promises.realpath(source.file));
    } catch {
      throw fileGone(t.name, source.file);
    }
  }
  // The deepest folder holding every file.
  const files = [...real.values()];
  let folder = path.dirname(files[0]);
  while (files.some((f) => path.relative(folder, f).split(path.sep)[0] === '..') && path.dirname(folder) !== folder) folder = path.dirname(folder);
  // Each tensor as a reference while the pieces are made, then as it was. (What else the pieces read, the
  // Constant values of subgraphs, are read asynchronously; nothing else uses this model meanwhile.)
  const hadLocation = found.map(({ t }) => isFieldSet(t, TensorProtoSchema.field.dataLocation));
  let pieces: Piece[];
  try {
    for (const { t, source } of found) {
      t.rawData = new Uint8Array(0);
      t.dataLocation = TensorProto_DataLocation.EXTERNAL;
      t.externalData = externalDataEntries(path.relative(folder, real.get(source.file)!).split(path.sep).join('/'), source.offset, source.length);
    }
    pieces = await modelPiecesAsync(model);
  } finally {
    found.forEach(({ t, source }, i) => {
      if (hadLocation[i]) t.dataLocation = TensorProto_DataLocation.DEFAULT;
      else clearField(t, TensorProtoSchema.field.dataLocation);
      t.externalData = [];
      readLazily(t, source);
    });
  }
  return { bytes: await joinPiecesAsync(pieces), folder, check };
}

/** Throws (as a read would) when a file that lazily read tensors wait in is gone or no longer the one the model was read with. */
async function checkFiles(waiting: Array<{ t: TensorProto; source: ExternalSource }>): Promise<void> {
  const checked = new Set<string>();
  for (const { t, source } of waiting) {
    if (checked.has(source.file)) continue;
    checked.add(source.file);
    let stat: fs.Stats;
    try {
      stat = await fs.promises.stat(source.file);
    } catch {
      throw fileGone(t.name, source.file);
    }
    checkSameFile(t.name, source, stat);
  }
}

/** The initializers of every graph that wait in their files (lazily read), with where. */
function waitingInitializers(model: ModelProto): Array<{ t: TensorProto; source: ExternalSource }> {
  return allGraphs(model).flatMap((g) => g.initializer).flatMap((t) => {
    const source = lazySource(t);
    return source ? [{ t, source }] : [];
  });
}

/** The bytes of stored tensors that serializeForSession leaves in their files. */
export function bytesLeftInFiles(model: ModelProto): number {
  return waitingInitializers(model).reduce((a, { source }) => a + source.length, 0);
}

/** The session options that tell onnxruntime where serializeForSession's references lie (none for no folder). */
export function sessionFolderOption(folder: string | undefined): { extra?: { session: Record<string, string> } } {
  return folder === undefined ? {} : { extra: { session: { model_external_initializers_file_folder_path: folder } } };
}

/** readAt, asynchronously: the source's bytes into `target` (its length is the source's). */
async function readAtAsync<T extends Uint8Array>(file: fs.promises.FileHandle, source: ExternalSource, name: string, target: T): Promise<T> {
  for (let read = 0; read < target.length;) {
    const { bytesRead } = await file.read(target, read, target.length - read, source.offset + read);
    if (bytesRead === 0) throw fileEnded(name, source.file);
    read += bytesRead;
  }
  return target;
}

/** readExternal, asynchronously, into `target` (its length is the source's). */
async function readExternalAsync<T extends Uint8Array>(target: T, name: string, source: ExternalSource): Promise<T> {
  let file: fs.promises.FileHandle;
  try {
    file = await fs.promises.open(source.file, 'r');
  } catch {
    throw fileGone(name, source.file);
  }
  try {
    checkSameFile(name, source, await file.stat());
    return await readAtAsync(file, source, name, target);
  } finally {
    await file.close();
  }
}

/**
 * Moves the data of large initializers and Constant values (>= `threshold` bytes) into one external
 * file named `dataFile` (a name next to the model file), handing each tensor's
 * bytes to `write` in file order (with zero padding before it); the model then
 * refers to it by location, offset and length. Each tensor's bytes are read once
 * (a lazily read tensor from its file) and dropped once written.
 */
async function moveDataOut(model: ModelProto, dataFile: string, threshold: number, write: (bytes: Uint8Array) => Promise<void>): Promise<void> {
  largeConstantsToInitializers(model, threshold);
  let offset = 0;
  // Where each byte array went: If branches that share a quantized weight hold one array (written once).
  const written = new Map<Uint8Array, number>();
  // The initializers of every graph: the main graph's, and those If/Loop/Scan bodies keep their layers' weights in.
  for (const t of allGraphs(model).flatMap((g) => g.initializer)) {
    floatDataToRaw(t, threshold);
    if (rawLength(t) < threshold) continue;
    const source = lazySource(t);
    const raw = source ? await readSourceAsync(t, source) : t.rawData;
    let at = written.get(raw);
    if (at === undefined) {
      const pad = (4096 - (offset % 4096)) % 4096;  // page-aligned, so readers can map it
      if (pad) await write(new Uint8Array(pad));
      offset += pad;
      await write(raw);
      at = offset;
      written.set(raw, at);
      offset += raw.length;
    }
    t.externalData = externalDataEntries(dataFile, at, raw.length);
    t.dataLocation = TensorProto_DataLocation.EXTERNAL;
    t.rawData = new Uint8Array(0);
  }
}

/**
 * Makes each top-level Constant node whose value has `threshold` bytes or more an initializer of the same name,
 * so that its data can go to the external file too (external data in a node attribute is not read by every
 * runtime; onnxruntime turns Constant nodes into initializers when it loads a model anyway). A Constant that is
 * also a graph output stays.
 */
function largeConstantsToInitializers(model: ModelProto, threshold: number): void {
  const graph = model.graph!;
  const outputs = new Set(graph.output.map((o) => o.name));
  graph.node = graph.node.filter((n) => {
    if (n.opType !== 'Constant' || (n.domain !== '' && n.domain !== 'ai.onnx') || outputs.has(n.output[0])) return true;
    const value = n.attribute.find((a) => a.name === 'value')?.t;
    if (!value || rawLength(value) + 4 * value.floatData.length < threshold) return true;
    value.name = n.output[0];
    graph.initializer.push(value);
    return false;
  });
}

/** Puts a large float32 tensor's float_data values in raw_data (little-endian, as ONNX stores it), which external data needs. */
function floatDataToRaw(t: TensorProto, threshold: number): void {
  if (t.dataType !== TensorProto_DataType.FLOAT || t.floatData.length === 0 || 4 * t.floatData.length < threshold) return;
  t.rawData = new Uint8Array(Float32Array.from(t.floatData).buffer);
  t.floatData = [];
}

/**
 * Writes the model to `file` with the data of its large initializers in `<file>.data` (streamed: one tensor in
 * memory at a time, written asynchronously; see moveDataOut) and returns the model file's bytes. Both files are
 * written to temporary files first and renamed only when both are complete: a failure leaves neither (and an
 * earlier pair as it was). Writes of this process to one path run one after another. `check`, when given, runs on
 * the written pair before the write ends (no other write of this process to the path meanwhile); if it throws, the
 * earlier pair is put back (or the new files removed) and its error is thrown.
 */
export async function writeModelWithExternalData(model: ModelProto, file: string, threshold = 1024, signal?: AbortSignal,
  check?: () => Promise<void>): Promise<Uint8Array> {
  checkExternalOutput('the output path', file);
  return oneWriteAtATime(file, () => writeBothFiles(model, file, threshold, signal, check));
}

/**
 * Refuses what an output with external data cannot be written to: a symbolic link (the model would go where it
 * points, its data file next to that, and a runtime opening the link looks for the data next to the link), or a
 * `<file>.data` that is a folder, a device or a pipe (checkOutputPath).
 */
export function checkExternalOutput(name: string, file: string): void {
  if (isSymbolicLink(file)) {
    throw new RangeError(`Expected a path that is not a symbolic link for ${name} but received "${file}", which is one: a model with external data is ` +
      'two files, found next to each other, which a link does not keep together. Give the real path.');
  }
  checkOutputPath(`${name}'s data file`, `${file}.data`, false);
}

/** The pending write of each output path (resolved), while there is one. */
const writesInProgress = new Map<string, Promise<unknown>>();

/** Runs `write` once the writes to `file` started before it have ended: interleaved renames of two writes could pair one's model with the other's data. */
function oneWriteAtATime<T>(file: string, write: () => Promise<T>): Promise<T> {
  const key = path.resolve(file);
  const run = (writesInProgress.get(key) ?? Promise.resolve()).then(write);
  const settled = run.catch(() => undefined);
  writesInProgress.set(key, settled);
  void settled.then(() => {
    if (writesInProgress.get(key) === settled) writesInProgress.delete(key);
  });
  return run;
}

async function writeBothFiles(model: ModelProto, file: string, threshold: number, signal?: AbortSignal,
  check?: () => Promise<void>): Promise<Uint8Array> {
  const dataFile = `${file}.data`;
  const [dataTemp, modelTemp] = [temporaryPath(dataFile), temporaryPath(file)];
  return withTemporaries([dataTemp, modelTemp], () => writeBothTemporaries(model, file, dataFile, dataTemp, modelTemp, threshold, signal, check));
}

async function writeBothTemporaries(model: ModelProto, file: string, dataFile: string, dataTemp: string, modelTemp: string, threshold: number,
  signal?: AbortSignal, check?: () => Promise<void>): Promise<Uint8Array> {
  // A data file already there is kept aside until the model file is in place: an old model next to a new data file
  // would read the wrong bytes. With a check, the model file already there is kept too (a hard link, else a copy)
  // until the check passes.
  const previousData = `${dataTemp}.previous`;
  const previousModel = `${modelTemp}.previous`;
  let failed = dataFile;
  let dataReplaced = false;
  let modelReplaced = false;
  let previousModelKept = false;
  let checking = false;
  let bytes: Uint8Array;
  try {
    const data = await fs.promises.open(dataTemp, 'wx');
    try {
      await moveDataOut(model, path.basename(dataFile), threshold, async (bytes) => {
        signal?.throwIfAborted();
        for (let done = 0; done < bytes.length;) done += (await data.write(bytes, done, bytes.length - done)).bytesWritten;
      });
    } finally {
      await data.close();
    }
    bytes = await serializeModelAsync(model);
    failed = file;
    await fs.promises.writeFile(modelTemp, bytes, { flag: 'wx', signal });
    signal?.throwIfAborted();
    failed = dataFile;
    if (fs.existsSync(dataFile)) await fs.promises.rename(dataFile, previousData);
    await fs.promises.rename(dataTemp, dataFile);
    dataReplaced = true;
    failed = file;
    if (check && fs.existsSync(file)) {
      await fs.promises.link(file, previousModel).catch(() => fs.promises.copyFile(file, previousModel));
      previousModelKept = true;
    }
    await fs.promises.rename(modelTemp, file);
    modelReplaced = true;
    if (check) {
      checking = true;
      await check();
    }
  } catch (e) {
    // Each clean-up step on its own, best effort: the write's (or the check's) error is the one to report.
    const attempt = (step: Promise<unknown>) => step.catch(() => undefined);
    for (const temp of [dataTemp, modelTemp]) await attempt(fs.promises.rm(temp, { force: true }));
    // The earlier files go back over the new ones in one rename each (if that fails, the kept copy stays: the only
    // one); a kept link or copy not needed (or cut short) goes.
    if (modelReplaced && previousModelKept) {
      await attempt(fs.promises.rename(previousModel, file));
    } else {
      if (modelReplaced) await attempt(fs.promises.rm(file, { force: true }));
      await attempt(fs.promises.rm(previousModel, { force: true }));
    }
    if (fs.existsSync(previousData)) await attempt(fs.promises.rename(previousData, dataFile));
    else if (dataReplaced) await attempt(fs.promises.rm(dataFile, { force: true }));
    if (checking || e instanceof OnnxModelError) throw e;
    if (signal?.aborted) throw signal.reason;
    throw writeError(failed, e);
  }
  // Both files are in place: the earlier ones only have to go (a failure to remove them is no failure of the write).
  for (const previous of [previousData, previousModel]) await fs.promises.rm(previous, { force: true }).catch(() => undefined);
  return bytes;
}

let temporaryCount = 0;
/** Temporary files of writes in progress in this thread: what removeTemporaryFiles removes on a forced exit. */
const temporaryFiles = new Set<string>();

/**
 * Removes the temporary files of the writes in progress, synchronously: for a process about to exit in the middle
 * of a write (the CLI's second Ctrl-C), which would otherwise leave them next to the output.
 */
export function removeTemporaryFiles(): void {
  for (const temp of temporaryFiles) {
    try {
      fs.rmSync(temp, { force: true });
    } catch {
      // best effort: the process is exiting
    }
  }
  temporaryFiles.clear();
}

/** Runs a write with its temporary files registered for removeTemporaryFiles until it ends. */
async function withTemporaries<T>(temps: string[], write: () => Promise<T>): Promise<T> {
  for (const t of temps) temporaryFiles.add(t);
  try {
    return await write();
  } finally {
    for (const t of temps) temporaryFiles.delete(t);
  }
}

/**
 * A name next to `file` that no other write of this process (or another) uses at the same time: the worker threads
 * of one process share its pid, each with its own count, so the thread is named too. A long name (file names stop
 * at 255 bytes) gets a short stem instead, so any name that can be written can be written atomically.
 */
function temporaryPath(file: string): string {
  const base = path.basename(file);
  const stem = Buffer.byteLength(base) > 200 ? 'lowbit' : base;
  return path.join(path.dirname(file), `.${stem}.${process.pid}.${threadId}.${Date.now()}.${temporaryCount++}.tmp`);
}

function writeError(file: string, e: unknown): Error {
  const code = (e as NodeJS.ErrnoException).code;
  const remedy = code === 'ENAMETOOLONG' ? 'Its name is too long for the file system: choose a shorter one.'
    : code === 'ENOSPC' || code === 'EDQUOT' ? 'The disk (or quota) is full: free space or write elsewhere.'
      : code === 'EISDIR' ? 'It is a folder: give a file path.'
        : 'Check that its folder exists and is writable.';
  return new Error(`Could not write ${file} (${code ?? (e as Error).message}): nothing was written. ${remedy}`);
}

/** Writes bytes to `file` atomically (temporary file, then rename); nothing partial is left on failure. */
export function writeFileAtomic(file: string, bytes: Uint8Array): void {
  const target = writeTarget(file);
  const temp = temporaryPath(target);
  try {
    fs.writeFileSync(temp, bytes, { flag: 'wx' });  // never another write's temporary file
    fs.renameSync(temp, target);
  } catch (e) {
    try {
      fs.rmSync(temp, { force: true });
    } catch {
      // the write's error is the one to report
    }
    throw writeError(file, e);
  }
}

/** writeFileAtomic without holding the event loop while the bytes are written (a large model takes a while). */
export async function writeFileAtomicAsync(file: string, bytes: Uint8Array, signal?: AbortSignal): Promise<void> {
  const target = writeTarget(file);
  const temp = temporaryPath(target);
  await withTemporaries([temp], async () => {
    try {
      await fs.promises.writeFile(temp, bytes, { flag: 'wx', signal });
      signal?.throwIfAborted();
      await fs.promises.rename(temp, target);
    } catch (e) {
      await fs.promises.rm(temp, { force: true }).catch(() => undefined);  // the write's error is the one to report
      if (signal?.aborted) throw signal.reason;
      throw writeError(file, e);
    }
  });
}

/**
 * Whether two paths name the same file: the same inode when both exist (symbolic and hard links), else the same
 * real folder and name — compared without case where the file system ignores it (macOS, Windows).
 */
export function samePath(a: string, b: string): boolean {
  try {
    return sameInode(fs.statSync(a), fs.statSync(b));
  } catch {
    // One of them does not exist yet.
  }
  const real = (p: string) => {
    const resolved = path.resolve(p);
    let folder: string;
    try {
      folder = fs.realpathSync.native(path.dirname(resolved));
    } catch {
      folder = path.dirname(resolved);
    }
    const full = path.join(folder, path.basename(resolved));
    return process.platform === 'darwin' || process.platform === 'win32' ? full.toLowerCase() : full;
  };
  return real(a) === real(b);
}

/**
 * Checks, before any long work, that `file` can be an output path: a string naming a regular file or nothing yet (not
 * a folder, a device or a pipe, which the atomic rename would replace), in an existing folder where a file can be
 * created, its name at most 255 bytes. `followLinks`: the write goes through a symbolic link to the file it names
 * (writeFileAtomic); false for a data file, which the external-data write renames over the link itself.
 */
export function checkOutputPath(name: string, file: unknown, followLinks = true): string {
  if (typeof file !== 'string' || file === '') throw new TypeError(`Expected a file path for ${name} but received ${JSON.stringify(file) ?? String(file)}.`);
  const folder = path.dirname(path.resolve(file));
  if (!statOrUndefined(folder)?.isDirectory()) {
    throw new RangeError(`Expected a file path in an existing folder for ${name} but received "${file}": ${folder} does not exist. Create it first.`);
  }
  // Through a link: what the write replaces (nothing yet, or a dangling link, replaced by the file).
  const stat = statOrUndefined(file);
  if (stat?.isDirectory()) throw new RangeError(`Expected a file path for ${name} but received "${file}", which is a folder.`);
  if (stat && !stat.isFile()) {
    const kind = stat.isCharacterDevice() || stat.isBlockDevice() ? 'a device' : stat.isFIFO() ? 'a named pipe' : 'not a regular file';
    throw new RangeError(`Expected a regular file path for ${name} but received "${file}", which is ${kind}: lowbit writes a temporary file and ` +
      'renames it over the path, which would replace it. Write to a file, then copy it there.');
  }
  if (Buffer.byteLength(path.basename(file)) > 255) {
    throw new RangeError(`Expected a file name of at most 255 bytes for ${name} but received "${path.basename(file)}" (${Buffer.byteLength(path.basename(file))} bytes). Choose a shorter one.`);
  }
  // The write makes a temporary file there at the end of the work (hours, for training): find out now that it can.
  const probe = temporaryPath(followLinks ? writeTarget(file) : file);  // where the write makes it
  try {
    fs.closeSync(fs.openSync(probe, 'wx'));
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code ?? 'an error';
    throw new RangeError(`Expected a file path in a folder lowbit can write to for ${name} but received "${file}": creating a file in ` +
      `${path.dirname(path.resolve(probe))} failed (${code}: ${(e as Error).message.replace(/^[A-Z]+: /, '')}). Choose another folder, or make this one writable.`);
  }
  try {
    fs.rmSync(probe, { force: true });
  } catch {
    // It could be made, so the folder is writable; a probe that cannot be removed is left (hidden, named .*.tmp).
  }
  return file;
}

/**
 * Refuses an output path that is one of the files the model was read from (its model file or an external data
 * file): writing it would destroy the input. `dataFileToo`: the output's `<path>.data` is checked as well.
 */
export function checkNotModelFile(name: string, file: string, model: ModelProto, dataFileToo: boolean): void {
  const inputs = filesReadFor(model);
  for (const [what, output] of [[name, file], ...(dataFileToo ? [[`${name}'s data file`, `${file}.data`]] : [])]) {
    const input = inputs.find((f) => samePath(output, f));
    if (input) {
      throw new RangeError(`Expected a path other than the input model's ${input === inputs[0] ? 'file' : 'external data file'} (${input}) for ${what} ` +
        `but received "${output}", which names that file: writing it would destroy the input. Choose another path.`);
    }
  }
}

const FILES_READ = Symbol('lowbit.filesRead');

/** The files a model was read from: its model file, then its external data files (none for bytes). */
function filesReadFor(model: ModelProto): string[] {
  return (model as { [FILES_READ]?: string[] })[FILES_READ] ?? [];
}

function recordFilesRead(model: ModelProto, file: string, dataFiles: string[]): void {
  Object.defineProperty(model, FILES_READ, { value: [path.resolve(file), ...dataFiles], enumerable: false });
}

/** Where a write to `file` goes: through a symbolic link to the file it names (renaming over the link would replace the link). */
function writeTarget(file: string): string {
  if (!isSymbolicLink(file)) return file;
  try {
    return fs.realpathSync(file);
  } catch {
    return file;  // a dangling link: written as named
  }
}

function isSymbolicLink(file: string): boolean {
  try {
    return fs.lstatSync(file).isSymbolicLink();
  } catch {
    return false;  // nothing there
  }
}
