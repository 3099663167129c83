/**
 * Calibration: runs the float model in onnxruntime-node batch by batch with
 * the tensors to quantize exposed as extra outputs, and feeds each to a
 * streaming observer; nothing but the observers' fixed state is kept between
 * batches, so memory does not grow with the number of batches.
 */
import { create, toBinary } from '@bufbuild/protobuf';
import { constants as bufferConstants } from 'node:buffer';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  AttributeProto_AttributeType, AttributeProtoSchema, ModelProtoSchema, NodeProtoSchema, TensorProto_DataType, TensorProtoSchema, ValueInfoProtoSchema, type ModelProto, type NodeProto,
} from 'onnx-buf';

import { ort } from '../bench/ort-models';
import { AciqObserver, HistogramObserver, klLevels, MinMaxObserver, type Range } from '../calibration/observers';
import { invalidType, invalidValue, withArticle } from '../errors';
import { fromFloat16Array, fromFloat16Bits } from '../float16';
import { native } from '../native';
import { conversionHint } from '../validate';
import { attribute, Graph, makeNode } from './graph';
import {
  bytesLeftInFiles, cloneSharingData, ONE_BUFFER_LIMIT, OnnxModelError, serializeForSession, sessionFolderOption, storedBytes, subgraphsOf, writeModelWithExternalData,
} from './model-io';
import { copyOf, openSession, runSession, type OrtHost, type PlainTensor } from './ort-session';
import { abortable, pauser } from './passes/pass';

/**
 * One input's values: float32 inputs take a Float32Array, int64 ones a BigInt64Array (token ids), int32 ones an
 * Int32Array, float16 ones a Uint16Array of float16 bit patterns (see float16.ts), uint8 ones a Uint8Array (8-bit
 * images), int8 ones an Int8Array, bool ones a Uint8Array of 0 and 1. `type` is onnxruntime's name of the element
 * type (an onnxruntime Tensor has it; checkFeed sets it): a Uint8Array alone does not tell bool from uint8.
 */
export interface FeedTensor { data: Float32Array | BigInt64Array | Int32Array | Uint16Array | Uint8Array | Int8Array; dims: readonly number[]; type?: string }
export type Feed = Record<string, FeedTensor>;

interface FeedType { name: string; array: string; is: (d: unknown) => boolean }

/** The input element types a feed can carry (by onnxruntime's name), with the array each takes. */
const FEED_TYPES = new Map<number, FeedType>([
  [TensorProto_DataType.FLOAT, { name: 'float32', array: 'Float32Array', is: (d) => d instanceof Float32Array }],
  [TensorProto_DataType.INT64, { name: 'int64', array: 'BigInt64Array', is: (d) => d instanceof BigInt64Array }],
  [TensorProto_DataType.INT32, { name: 'int32', array: 'Int32Array', is: (d) => d instanceof Int32Array }],
  [TensorProto_DataType.FLOAT16, { name: 'float16', array: 'Uint16Array (float16 bit patterns)', is: (d) => d instanceof Uint16Array }],
  [TensorProto_DataType.UINT8, { name: 'uint8', array: 'Uint8Array', is: (d) => d instanceof Uint8Array }],
  [TensorProto_DataType.INT8, { name: 'int8', array: 'Int8Array', is: (d) => d instanceof Int8Array }],
  [TensorProto_DataType.BOOL, { name: 'bool', array: 'Uint8Array (0 or 1)', is: (d) => d instanceof Uint8Array }],
]);

/** How to turn feed data of another kind (an Array, another typed array, another realm's) into what `type` takes. */
function feedConversionHint(type: FeedType, data: unknown): string | undefined {
  const how = type.name === 'float16' ? "lowbit's toFloat16Array(Float32Array.from(values))" : type.name === 'int64' ? 'BigInt64Array.from(values, BigInt)'
    : type.name === 'bool' ? 'Uint8Array.from(values, Number)' : undefined;
  return conversionHint(data, type.array.split(' ')[0], how);
}

/** What a feed for this input must hold; an OnnxModelError for input types lowbit cannot feed. */
function feedType(name: string, elemType: number): FeedType {
  const type = FEED_TYPES.get(elemType);
  if (!type) {
    throw new OnnxModelError(`Input '${name}' has element type ${TensorProto_DataType[elemType] ?? elemType}; lowbit feeds float32, float16, int64, int32, ` +
      'uint8, int8 and bool inputs only. Weight-only quantization works without running the model: drop the activations and GPTQ options, ' +
      'and pass evaluationFeeds: [] (CLI --no-evaluate).');
  }
  return type;
}

/** @internal A feed's tensors as onnxruntime Tensors. */
export function ortTensors(feed: Record<string, FeedTensor>): Record<string, InstanceType<ReturnType<typeof ort>['Tensor']>> {
  return Object.fromEntries(Object.entries(feed).map(([k, v]) => [k, ortTensor(v)]));
}

/** @internal An onnxruntime tensor of a feed's values (its type follows the array; a Uint8Array's, `type`). */
export function ortTensor(v: FeedTensor): InstanceType<ReturnType<typeof ort>['Tensor']> {
  const O = ort();
  const dims = [...v.dims];
  if (v.data instanceof BigInt64Array) return new O.Tensor('int64', v.data, dims);
  if (v.data instanceof Int32Array) return new O.Tensor('int32', v.data, dims);
  if (v.data instanceof Uint16Array) return new O.Tensor('float16', v.data, dims);
  if (v.data instanceof Uint8Array) return new O.Tensor(v.type === 'bool' ? 'bool' : 'uint8', v.data, dims);
  if (v.data instanceof Int8Array) return new O.Tensor('int8', v.data, dims);
  return new O.Tensor('float32', v.data, dims);
}

/**
 * The model's inputs that need feeds (not initializers), with their element type and dims (-1 when symbolic;
 * undefined when the input declares no shape: any rank).
 */
export function modelInputs(model: ModelProto): Array<{ name: string; elemType: number; dims?: number[] }> {
  const initializers = new Set(model.graph!.initializer.map((t) => t.name));
  return model.graph!.input.filter((i) => !initializers.has(i.name)).map((input) => {
    const tensor = input.type?.value.case === 'tensorType' ? input.type.value.value : undefined;
    const dims = tensor?.shape?.dim.map((d) => (d.value.case === 'dimValue' ? Number(d.value.value) : -1));
    return { name: input.name, elemType: tensor?.elemType ?? 0, ...(dims ? { dims } : {}) };
  });
}

/**
 * Where a feed gives one named symbolic dimension two sizes (inputs declared [n, 4] and [n, 8] fed [2, 4] and [3, 8]),
 * a sentence saying so; the model may still run (onnxruntime does not insist), so this only explains a failure.
 */
function symbolicDimsDisagree(model: ModelProto, feed: Feed): string | undefined {
  const seen = new Map<string, { input: string; size: number }>();
  for (const input of model.graph!.input) {
    const given = feed[input.name]?.dims;
    const declared = input.type?.value.case === 'tensorType' ? input.type.value.value.shape?.dim : undefined;
    if (!given || !declared || declared.length !== given.length) continue;
    for (const [i, d] of declared.entries()) {
      if (d.value.case !== 'dimParam' || !d.value.value) continue;
      const first = seen.get(d.value.value);
      if (!first) {
        seen.set(d.value.value, { input: input.name, size: given[i] });
      } else if (first.size !== given[i]) {
        return `The feed gives the model's symbolic dimension '${d.value.value}' the size ${first.size} in input '${first.input}' and ${given[i]} in ` +
          `input '${input.name}', which the model declares equal: give both the same size. `;
      }
    }
  }
  return undefined;
}

/** How dims are written in errors: [1, ?, 48] (? symbolic). */
function shapeText(dims: number[]): string {
  return `[${dims.map((d) => (d < 0 ? '?' : d)).join(', ')}]`;
}

export type CalibrationData = Iterable<Feed> | AsyncIterable<Feed> | string;

/** The calibrated activation methods, in the order error messages list them. */
export const ACTIVATION_METHODS = ['minmax', 'percentile', 'kl', 'aciq', 'mse'] as const;
export type ActivationMethod = typeof ACTIVATION_METHODS[number];

/** One observer per tensor, behind one shape. */
export interface TensorObserver {
  observe(batch: Float32Array): void;
  /** The range for codes of `bits`, signed (then symmetric, zero point 0) or not (asymmetric). */
  range(bits: number, signed: boolean): Range;
}

export function makeObserver(method: ActivationMethod): TensorObserver {
  switch (method) {
    case 'minmax': {
      const o = new MinMaxObserver();
      return { observe: (b) => void o.observe(b), range: () => o.range() };
    }
    case 'percentile': {
      const o = new HistogramObserver();
      return { observe: (b) => void o.observe(b), range: () => o.percentileRange(99.99) };
    }
    case 'kl': {
      const o = new HistogramObserver();
      // Non-negative values fill 2^bits - 1 steps only in an unsigned (or asymmetric) quantizer; a signed symmetric one
      // has half of them above 0.
      return { observe: (b) => void o.observe(b), range: (bits, signed) => o.klRange(klLevels(bits, o.min >= 0 && !signed)) };
    }
    case 'aciq': {
      const o = new AciqObserver();
      // Signed activations are symmetric: one-sided ones then fill half the codes (as for 'kl').
      return { observe: (b) => void o.observe(b), range: (bits, signed) => o.range(bits, 'laplace', undefined, signed) };
    }
    case 'mse': {
      const o = new HistogramObserver();
      return { observe: (b) => void o.observe(b), range: (bits, signed) => o.mseRange(bits, { signed, symmetric: signed }) };
    }
  }
}

/** The longest typed array this Node.js makes (4 GiB in Node 20). */
const MAX_LENGTH = bufferConstants.MAX_LENGTH;

/** The typed array of each .npy dtype lowbit reads (float16 as bit patterns, bool as 0/1 bytes). */
const NPY_ARRAYS: Record<string, Float32ArrayConstructor | BigInt64ArrayConstructor | Int32ArrayConstructor | Uint16ArrayConstructor |
  Uint8ArrayConstructor | Int8ArrayConstructor> = {
  '<f4': Float32Array, '<i8': BigInt64Array, '<i4': Int32Array, '<f2': Uint16Array, '|u1': Uint8Array, '<u1': Uint8Array, '|b1': Uint8Array, '|i1': Int8Array,
};

interface NpyRaw {
  descr: string;
  dims: number[];
  storedRows: number;
  body: Uint8Array;
}

/** One read: up to `length` bytes at `position` of the file into `into` from `offset`; answered with the bytes read. */
interface NpyRead {
  into: Uint8Array;
  offset: number;
  length: number;
  position: number;
}

/** The reads that fill `into` from `position` of the file, in pieces of at most 1 GiB (0 bytes read: the file got shorter). */
function* fill(file: string, into: Uint8Array, position: number): Generator<NpyRead, void, number> {
  for (let done = 0; done < into.length;) {
    const n = yield { into, offset: done, length: Math.min(into.length - done, NPY_PIECE), position: position + done };
    if (n === 0) throw new RangeError(`${file} got shorter while it was read.`);
    done += n;
  }
}

/**
 * The header and data of a .npy file of `size` bytes, read into one aligned buffer in pieces (no whole-file copy;
 * readFileSync stops at 2 GiB): yields each read for readNpyRaw (synchronous) or readNpyRawAsync to do, which answer
 * with the bytes read. `firstRows`:
 * read only that many leading rows of the first axis (`dims` then says so; `storedRows` is the file's count). The
 * data of a dtype lowbit does not read are not read.
 */
function* npyReads(file: string, size: number, firstRows: number, tooLarge: string): Generator<NpyRead, NpyRaw, number> {
  const lead = new Uint8Array(Math.min(size, 12));
  yield* fill(file, lead, 0);
  const leadBytes = Buffer.from(lead.buffer);
  if (leadBytes.length < 10 || leadBytes[0] !== 0x93 || leadBytes.toString('latin1', 1, 6) !== 'NUMPY') {
    throw new RangeError(`${file} is not a .npy file (no \\x93NUMPY magic): write it with numpy.save.`);
  }
  const major = leadBytes[6];
  if (major < 1 || major > 3) throw new RangeError(`${file}: .npy format version ${major} is not one lowbit reads (1, 2 or 3).`);
  const start = major === 1 ? 10 : 12;
  if (leadBytes.length < start) throw new RangeError(`${file}: the .npy header is truncated.`);
  const headerLength = major === 1 ? leadBytes.readUInt16LE(8) : leadBytes.readUInt32LE(8);
  if (start + headerLength > size) throw new RangeError(`${file}: the .npy header is truncated.`);
  const headerBytes = new Uint8Array(headerLength);
  yield* fill(file, headerBytes, start);
  const header = Buffer.from(headerBytes.buffer).toString('latin1');
  if (/'fortran_order':\s*True/.test(header)) throw new RangeError(`${file}: Fortran-ordered arrays are not supported: save numpy.ascontiguousarray(x) instead.`);
  const descr = /'descr':\s*'([^']*)'/.exec(header)?.[1] ?? '';
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header);
  const dims = shape ? shape[1].split(',').map((v) => v.trim()).filter(Boolean).map(Number) : [];
  if (!shape || dims.some((d) => !Number.isSafeInteger(d) || d < 0)) throw new RangeError(`${file}: the .npy header is malformed or truncated (no valid 'shape').`);
  const storedRows = dims.length ? dims[0] : 1;
  const item = NPY_ARRAYS[descr]?.BYTES_PER_ELEMENT;
  if (item === undefined) return { descr, dims, storedRows, body: new Uint8Array(0) };
  const values = dims.reduce((a, b) => a * b, 1);
  const bodyBytes = size - start - headerLength;
  if (bodyBytes !== values * item) {
    throw new RangeError(`${file}: the data (${bodyBytes} bytes) do not match the shape (${dims.join('x') || 'a scalar'} of ${descr}).`);
  }
  const rows = dims.length ? Math.min(firstRows, storedRows) : 1;
  const readBytes = storedRows === 0 ? 0 : (bodyBytes / storedRows) * rows;
  if (readBytes > MAX_LENGTH) {
    throw new RangeError(`${file}: its ${rows < storedRows ? `first ${rows} rows hold` : 'data hold'} ${readBytes} bytes, more than the ${MAX_LENGTH} ` +
      `one array holds in this Node.js: ${tooLarge}.`);
  }
  const body = new Uint8Array(readBytes);
  yield* fill(file, body, start + headerLength);
  return { descr, dims: rows < storedRows ? [rows, ...dims.slice(1)] : dims, storedRows, body };
}

// Non-blocking: opening a pipe for reading would otherwise wait for a writer, for good.
const NPY_OPEN_FLAGS = fs.constants.O_RDONLY | (fs.constants.O_NONBLOCK ?? 0);
const NPY_PIECE = 1 << 30;
const NPY_TOO_LARGE = 'split the data into several .npy files';

function notRegularFile(file: string, stat: fs.Stats): RangeError {
  return new RangeError(`${file} is not a regular file (${stat.isDirectory() ? 'a folder' : 'a pipe or a device'}): save the array with numpy.save to a file.`);
}

/** npyReads done with synchronous reads. */
function readNpyRaw(file: string, firstRows = Infinity, tooLarge = NPY_TOO_LARGE): NpyRaw {
  const fd = fs.openSync(file, NPY_OPEN_FLAGS);
  try {
    const stat = fs.fstatSync(fd);
    if (!stat.isFile()) throw notRegularFile(file, stat);
    const reads = npyReads(file, stat.size, firstRows, tooLarge);
    let step = reads.next(0);
    while (!step.done) {
      const { into, offset, length, position } = step.value;
      step = reads.next(fs.readSync(fd, into, offset, length, position));
    }
    return step.value;
  } finally {
    fs.closeSync(fd);
  }
}

/** npyReads done with asynchronous reads: the event loop turns while a large batch is read. */
async function readNpyRawAsync(file: string, firstRows = Infinity, tooLarge = NPY_TOO_LARGE): Promise<NpyRaw> {
  const handle = await fs.promises.open(file, NPY_OPEN_FLAGS);
  try {
    const stat = await handle.stat();
    if (!stat.isFile()) throw notRegularFile(file, stat);
    const reads = npyReads(file, stat.size, firstRows, tooLarge);
    let step = reads.next(0);
    while (!step.done) {
      const { into, offset, length, position } = step.value;
      step = reads.next((await handle.read(into, offset, length, position)).bytesRead);
    }
    return step.value;
  } finally {
    await handle.close();
  }
}


/**
 * A .npy body as the typed array of its dtype (float32, int64, int32, float16 as bit patterns, uint8, int8, bool as
 * 0/1 bytes; undefined for others): a view, no copy.
 */
function npyValues({ descr, body }: { descr: string; body: Uint8Array }): FeedTensor['data'] | undefined {
  const Type = NPY_ARRAYS[descr];
  return Type && new Type(body.buffer as ArrayBuffer, 0, body.length / Type.BYTES_PER_ELEMENT);  // (readNpyRaw allocated it)
}

/** Reads a C-order .npy file of float32, int64, int32, float16, uint8, int8 or bool values (a model input's batch). */
export function readNpyFeed(file: string): FeedTensor {
  return npyFeed(file, readNpyRaw(file));
}

/** readNpyFeed without holding the event loop while the file is read. */
export async function readNpyFeedAsync(file: string): Promise<FeedTensor> {
  return npyFeed(file, await readNpyRawAsync(file));
}

function npyFeed(file: string, raw: NpyRaw): FeedTensor {
  const data = npyValues(raw);
  if (!data) {
    throw new RangeError(`${file}: model inputs must be little-endian float32, int64, int32 or float16 arrays, or uint8, int8 or bool ones ` +
      `('<f4', '<i8', '<i4', '<f2', '|u1', '|i1', '|b1'; this one is '${raw.descr}'): save x.astype(numpy.float32), or the input's type, instead.`);
  }
  return { data, dims: raw.dims };
}

/**
 * Reads a float32 C-order .npy file, or only its first `firstRows` rows (`dims` then counts those; `storedRows` is
 * the file's count).
 */
export function readNpy(file: string, firstRows = Infinity, tooLarge?: string): { data: Float32Array; dims: number[]; storedRows: number } {
  const raw = readNpyRaw(file, firstRows, tooLarge);
  if (raw.descr !== '<f4') throw new RangeError(`${file}: only little-endian float32 ('<f4') arrays are supported (this one is '${raw.descr}'): save x.astype(numpy.float32) instead.`);
  return { data: npyValues(raw) as Float32Array, dims: raw.dims, storedRows: raw.storedRows };
}

/** Reads a 1-D .npy array of class labels (uint8, int32 or int64; int64 values must fit in int32). */
export function readNpyLabels(file: string): Int32Array {
  const raw = readNpyRaw(file);
  const { descr, dims } = raw;
  if (!['|u1', '<u1', '<i4', '<i8'].includes(descr)) throw new RangeError(`${file}: labels must be a uint8, int32 or int64 array (this one is '${descr}').`);
  if (dims.length !== 1) throw new RangeError(`${file}: labels must be a 1-D array [N] (this one is ${dims.join('x') || 'a scalar'}).`);
  const values = npyValues(raw)!;
  if (!(values instanceof BigInt64Array)) return Int32Array.from(values as Int32Array | Uint8Array);
  const labels = new Int32Array(values.length);
  for (let i = 0; i < values.length; i++) {
    if (values[i] < -(2n ** 31n) || values[i] >= 2n ** 31n) throw new RangeError(`${file}: label ${i} is ${values[i]}, not a class index (int64 labels must fit in int32).`);
    labels[i] = Number(values[i]);
  }
  return labels;
}

/** Batches from a folder with one subfolder of .npy files per input (batch i = the i-th file of each, in naturalCompare order). */
export async function* npyFolderFeeds(folder: string): AsyncGenerator<Feed> {
  for await (const { feed } of npyFolderBatches(folder)) yield feed;
}

/**
 * The first `count` batches of calibration data, checked against the model's inputs (for evaluating a model whose
 * quantization reads no calibration data: weight-only). Reads no further than that.
 */
export async function firstFeeds(model: ModelProto, data: CalibrationData, count: number): Promise<Feed[]> {
  const feeds: Feed[] = [];
  const { iterable, filesOf } = batchesOf(data);
  for await (const raw of iterable as AsyncIterable<Feed>) {
    feeds.push(keptFeed(data, checkFeedFrom(model, raw, feeds.length, filesOf(raw))));
    if (feeds.length === count) break;
  }
  if (feeds.length === 0) throw invalidValue('options.calibration', 'at least one batch', 'an empty calibration set');
  return feeds;
}

/**
 * The calibration data as feeds, and for a folder's batches the files each came from (for errors).
 */
function batchesOf(data: CalibrationData): { iterable: Iterable<Feed> | AsyncIterable<Feed>; filesOf: (feed: unknown) => string[] | undefined } {
  if (typeof data !== 'string') return { iterable: data, filesOf: () => undefined };
  const sources = new WeakMap<object, string[]>();
  const batches = npyFolderBatches(data);
  return {
    iterable: (async function* () {
      for await (const b of batches) {
        sources.set(b.feed, b.files);
        yield b.feed;
      }
    })(),
    filesOf: (feed) => (typeof feed === 'object' && feed !== null ? sources.get(feed) : undefined),
  };
}

/** checkFeed, its errors naming the files the feed came from. */
function checkFeedFrom(model: ModelProto, raw: unknown, index: number, files: string[] | undefined): Feed {
  try {
    return checkFeed(model, raw, index);
  } catch (e) {
    (e as Error).message += fromFiles(files);
    throw e;
  }
}

/**
 * A copy of a checked feed's arrays, for feeds kept past their turn (evaluation): a loader may refill one buffer for
 * every batch it yields.
 */
function copyFeed(feed: Feed): Feed {
  return Object.fromEntries(Object.entries(feed).map(([name, v]) => [name, { ...v, data: copyOf(v.data), dims: [...v.dims] }])) as Feed;
}

/** A batch kept past its turn: copied when it comes from an iterable (a folder's are read afresh, an array's stay). */
function keptFeed(data: CalibrationData, feed: Feed): Feed {
  return typeof data !== 'string' && !Array.isArray(data) ? copyFeed(feed) : feed;
}

/** " (from a/0.npy, b/0.npy)" for a folder's batch, "" otherwise. */
function fromFiles(files: string[] | undefined): string {
  return files ? ` (from ${files.join(', ')})` : '';
}

/** Names in the order people number files: batch2 before batch10 (digit runs compared as numbers). */
function naturalCompare(a: string, b: string): number {
  const pa = a.match(/\d+|\D+/g) ?? [];
  const pb = b.match(/\d+|\D+/g) ?? [];
  for (let i = 0; i < Math.min(pa.length, pb.length); i++) {
    const [x, y] = [pa[i], pb[i]];
    if (x === y) continue;
    if (/^\d/.test(x) && /^\d/.test(y)) {
      const [nx, ny] = [BigInt(x), BigInt(y)];
      if (nx !== ny) return nx < ny ? -1 : 1;
      return x.length - y.length;  // 7 before 07
    }
    return x < y ? -1 : 1;
  }
  return pa.length - pb.length;
}

/**
 * npyFolderFeeds with the files each batch came from (for errors). Hidden entries (.ipynb_checkpoints, macOS's ._
 * files) are skipped; a .npy name that is not a readable regular file (a broken link, a pipe) is refused, not read.
 */
async function* npyFolderBatches(folder: string): AsyncGenerator<{ feed: Feed; files: string[] }> {
  const statOrUndefined = (p: string) => fs.statSync(p, { throwIfNoEntry: false });
  const inputs = fs.readdirSync(folder).filter((d) => !d.startsWith('.') && statOrUndefined(path.join(folder, d))?.isDirectory()).sort();
  if (inputs.length === 0) throw new RangeError(`${folder} has no subfolders; put each input's .npy batches in a folder named after the input.`);
  const files = inputs.map((i) => fs.readdirSync(path.join(folder, i)).filter((f) => {
    if (!f.toLowerCase().endsWith('.npy') || f.startsWith('.')) return false;
    const file = path.join(folder, i, f);
    const stat = statOrUndefined(file);
    if (stat?.isDirectory()) return false;
    if (!stat?.isFile()) {
      throw new RangeError(`${file} is ${stat ? 'not a regular file (a pipe or a device)' : 'a broken symbolic link'}: a calibration batch must be a .npy file. ` +
        'Remove it from the calibration folder or replace it with the file.');
    }
    return true;
  }).sort(naturalCompare));
  const empty = inputs.filter((_, i) => files[i].length === 0);
  if (empty.length > 0) {
    throw new RangeError(`${folder}: the subfolder${empty.length > 1 ? 's' : ''} ${empty.map((name) => `${name}/`).join(', ')} hold${empty.length > 1 ? '' : 's'} no .npy file: ` +
      'put one .npy batch per file in each input\'s subfolder.');
  }
  if (files.some((f) => f.length !== files[0].length)) {
    throw new RangeError(`${folder}: every input's subfolder must hold one .npy file per batch, as many as the others; found ` +
      `${inputs.map((name, i) => `${name}/ ${files[i].length}`).join(', ')}. Subfolders name the model's inputs.`);
  }
  for (let b = 0; b < files[0].length; b++) {
    const paths = inputs.map((name, i) => path.join(folder, name, files[i][b]));
    const tensors: FeedTensor[] = [];
    for (const file of paths) tensors.push(await readNpyFeedAsync(file));
    yield { feed: Object.fromEntries(inputs.map((name, i) => [name, tensors[i]])), files: paths };
  }
}

/**
 * A copy of the model with extra outputs (for calibration and per-layer comparisons), declared without a type:
 * onnxruntime takes each one's type from the graph (float32, or float16 in a float16 model).
 */
export function withOutputs(model: ModelProto, names: string[]): Uint8Array {
  return toBinary(ModelProtoSchema, copyWithOutputs(model, names).copy);
}

const BRANCH_VALUE = '\u0000branch:';

/**
 * How calibration names a value as a branch (`branch`: its attribute, then_branch or else_branch) of one of the main
 * graph's If nodes sees it — computed there, or read from the main graph —, observed only on the batches that run
 * that branch (sibling branches may reuse names: a merged decoder's two decoders do). `elemType`: its element type.
 */
export function branchValue(ifNode: NodeProto, branch: string, name: string, elemType: number): string {
  return BRANCH_VALUE + JSON.stringify([ifNode.output[0], branch, name, elemType]);
}

function isBranchValue(tensor: string): boolean {
  return tensor.startsWith(BRANCH_VALUE);
}

/** A tensor's name for messages (a branch value's own name). */
function tensorName(tensor: string): string {
  return isBranchValue(tensor) ? (JSON.parse(tensor.slice(BRANCH_VALUE.length)) as string[])[2] : tensor;
}

/**
 * The copy with extra outputs, and the output each value comes out as: its own name, or — for a value as a branch
 * of one of the main graph's If nodes sees it (named by branchValue) — another (see exposeFromBranches).
 */
function copyWithOutputs(model: ModelProto, names: string[]): { copy: ModelProto; outputOf: (name: string) => string } {
  const copy = cloneSharingData(model);
  const g = copy.graph!;
  const existing = new Set(g.output.map((o) => o.name));
  for (const name of names) {
    if (!isBranchValue(name) && !existing.has(name)) g.output.push(create(ValueInfoProtoSchema, { name }));
  }
  const fromBranches = names.filter(isBranchValue);
  const renamed = fromBranches.length > 0 ? exposeFromBranches(copy, fromBranches) : new Map<string, string>();
  return { copy, outputOf: (name) => renamed.get(name) ?? name };
}

/**
 * Makes values as branches of the main graph's If nodes see them observable (see branchValue): each becomes one
 * more output of its branch and of the If (under a new name: a branch's names may not be defined again outside it;
 * the returned map gives it), and the other branch outputs an empty tensor of the same type in its place (ONNX lets
 * If branches give outputs of different shapes); calibration skips empty values, so a value counts only on the
 * batches whose branch ran.
 */
function exposeFromBranches(copy: ModelProto, values: string[]): Map<string, string> {
  const graph = new Graph(copy);
  const renamed = new Map<string, string>();
  for (const value of values) {
    const [ifOutput, branch, name, type] = JSON.parse(value.slice(BRANCH_VALUE.length)) as [string, string, string, number];
    const owner = copy.graph!.node.find((n) => n.opType === 'If' && n.output[0] === ifOutput);
    const home = owner && attribute(owner, branch)?.g;
    if (!owner || !home) throw new Error(`lowbit bug: no If makes '${ifOutput}' with a ${branch}, so '${name}' cannot be observed there.`);
    // Through an Identity in the branch: a main-graph value the branch reads is then observed only when the branch
    // runs too, and a value that already is an output of the branch is not listed twice (onnxruntime 1.30 crashes
    // on a subgraph output listed twice).
    const inBranch = graph.uniqueName(`${name}_in_${branch}`);
    home.node.push(makeNode('Identity', [name], [inBranch], inBranch));
    for (const b of subgraphsOf(owner)) {
      let output = inBranch;
      if (b !== home) {
        output = graph.uniqueName(`${name}__absent`);
        const empty = create(TensorProtoSchema, { name: output, dataType: type, dims: [0n] });
        b.node.push(create(NodeProtoSchema, { opType: 'Constant', name: output, output: [output],
          attribute: [create(AttributeProtoSchema, { name: 'value', type: AttributeProto_AttributeType.TENSOR, t: empty })] }));
      }
      b.output.push(create(ValueInfoProtoSchema, { name: output, type: { value: { case: 'tensorType', value: { elemType: type } } } }));
    }
    const output = graph.uniqueName(`${name}_from_${owner.name || 'if'}`);
    owner.output.push(output);
    copy.graph!.output.push(create(ValueInfoProtoSchema, { name: output }));
    renamed.set(value, output);
  }
  return renamed;
}

/**
 * The model with extra outputs, as onnxruntime will load it: its bytes, with weights still unread in the model's
 * data files left there (serializeForSession; `folder` says where), or — when what remains is 2 GB or more, which
 * one buffer cannot hold — a temporary file with its weights in external data, which `dispose` removes.
 */
async function exposedModel(model: ModelProto, names: string[]):
  Promise<{ source: Uint8Array | string; folder?: string; check?: () => Promise<void>; dispose: () => void; outputOf: (name: string) => string }> {
  const { copy, outputOf } = copyWithOutputs(model, names);
  if (storedBytes(copy) - bytesLeftInFiles(copy) < ONE_BUFFER_LIMIT) {
    const { bytes, folder, check } = await serializeForSession(copy);
    return { source: bytes, folder, check, dispose: () => undefined, outputOf };
  }
  const folder = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-calibration-'));
  // Best effort: a folder that cannot be removed (held open elsewhere) must not replace the calibration's result or error.
  const dispose = () => {
    try {
      fs.rmSync(folder, { recursive: true, force: true, maxRetries: 3 });
    } catch {
      /* left in the temporary folder */
    }
  };
  try {
    const file = path.join(folder, 'model.onnx');
    await writeModelWithExternalData(copy, file);
    return { source: file, dispose, outputOf };
  } catch (e) {
    dispose();
    throw e;
  }
}

/**
 * @internal An onnxruntime session on the model with extra outputs (its weights read from the model's files, or from a
 * temporary copy only when what is not left there reaches 2 GB; see exposedModel); `close` releases it, then removes
 * any copy (onnxruntime may map the external data file).
 */
export async function openExposed(model: ModelProto, names: string[], options: Parameters<typeof openSession>[1], what: string, remedy: string,
  host?: OrtHost):
  Promise<{ session: Awaited<ReturnType<typeof openSession>>; close: () => Promise<void>; outputOf: (name: string) => string }> {
  const exposed = await exposedModel(model, names);
  let session: Awaited<ReturnType<typeof openSession>> | undefined;
  try {
    session = await openSession(exposed.source, { ...options, ...sessionFolderOption(exposed.folder) }, what, remedy, { host, giveBytes: true });  // the bytes were made for this session
    await exposed.check?.();  // the files the session read its weights from are still those the model was read with
  } catch (e) {
    await session?.release().catch(() => undefined);
    exposed.dispose();
    throw e;
  }
  const opened = session;
  const close = async () => {
    try {
      await opened.release();
    } finally {
      exposed.dispose();
    }
  };
  return { session: opened, close, outputOf: exposed.outputOf };
}

/**
 * Checks a feed against the model's inputs: names, element type (the arrays of FeedTensor), rank and static
 * dimensions, finite floats, bools 0 or 1. `what` names the feed in errors. Returns the feed to run: each entry
 * with its onnxruntime type name.
 */
export function checkFeed(model: ModelProto, feed: unknown, index: number, what = 'calibration'): Feed {
  if (typeof feed !== 'object' || feed === null) throw invalidType(`${what}[${index}]`, 'a feed object { inputName: { data, dims } }', feed);
  const inputs = modelInputs(model);
  const f = feed as Record<string, { data?: unknown; dims?: unknown }>;
  const checked: Feed = {};
  for (const { name, elemType, dims } of inputs) {
    const v = f[name];
    const type = feedType(name, elemType);
    const expected = `{ data: ${type.array}, dims: ${dims ? shapeText(dims) : '[...]'} }`;
    if (!v) throw invalidValue(`${what}[${index}]`, `a feed with input '${name}' ${expected}`, Object.keys(f).join(', ') || 'an empty feed');
    if (!type.is(v.data)) throw invalidType(`${what}[${index}].${name}.data`, `${withArticle(type.array)} (${type.name} input)`, v.data, feedConversionHint(type, v.data));
    const data = v.data as FeedTensor['data'];
    if (!Array.isArray(v.dims) || v.dims.some((d) => !Number.isSafeInteger(d) || d < 0) ||
      (dims && (v.dims.length !== dims.length || v.dims.some((d, i) => dims[i] >= 0 && d !== dims[i])))) {
      throw invalidValue(`${what}[${index}].${name}.dims`, dims ? `dims matching ${shapeText(dims)} (non-negative integers)` : 'dims of non-negative integers', v.dims);
    }
    if (data.length !== (v.dims as number[]).reduce((a, b) => a * b, 1)) {
      throw invalidValue(`${what}[${index}].${name}.data`, `${(v.dims as number[]).reduce((a, b) => a * b, 1)} values for dims [${v.dims.join(', ')}]`, data);
    }
    if (type.name === 'bool') {
      const bad = data.findIndex((x) => x !== 0 && x !== 1);
      if (bad >= 0) throw invalidValue(`${what}[${index}].${name}.data[${bad}]`, '0 or 1 (a bool input)', data[bad]);
    } else if (data instanceof Float32Array) {
      // Natively (findIndex with a callback is slow on big feeds); the count is 0 when there is a NaN, so NaN is caught too.
      const finite = native().finiteRange(data)[2];
      if (finite < data.length) {
        const bad = data.findIndex((x) => !Number.isFinite(x));
        throw invalidValue(`${what}[${index}].${name}.data[${bad}]`, 'a finite number', data[bad], 'Remove or replace NaN and infinite values in these feeds.');
      }
    } else if (data instanceof Uint16Array) {
      const bad = data.findIndex((h) => (h & 0x7c00) === 0x7c00);  // float16 NaN or ±Infinity: all exponent bits set
      if (bad >= 0) {
        throw invalidValue(`${what}[${index}].${name}.data[${bad}]`, 'the bit pattern of a finite float16 number', `0x${data[bad].toString(16)} (${fromFloat16Bits(data[bad])})`,
          'Remove or replace NaN and infinite values in these feeds.');
      }
    }
    // A new entry (the caller's object untouched) with onnxruntime's type name, which a Uint8Array alone does not tell.
    checked[name] = { data, dims: v.dims as number[], type: type.name };
  }
  const known = new Set(inputs.map((i) => i.name));
  for (const name of Object.keys(f)) {
    if (!known.has(name)) throw invalidValue(`${what}[${index}]`, `only the model's inputs (${[...known].join(', ')})`, name);
  }
  return checked;
}

/** An onnxruntime output's values as float32 (float16 ones converted: observers and comparisons take float32). */
export function floatValues(t: { type: string; data: unknown }): Float32Array {
  return t.type === 'float16' ? fromFloat16Array(t.data as Uint16Array) : t.data as Float32Array;
}

export interface CalibrationResult {
  observers: Map<string, TensorObserver>;
  batches: number;
  /** The first few feeds, kept for evaluating the quantized model. */
  sample: Feed[];
  /** The observed tensors that onnxruntime computes in float16 (a float16 model's). */
  float16: Set<string>;
  /** Per observed tensor, the batches it was observed on: all of them, but for a value inside an If branch those whose branch ran. */
  observedBatches: Map<string, number>;
}

/** @internal Runs the float model on the calibration data, observing `tensors` (quantizeModel's calibration stage). */
export async function calibrate(model: ModelProto, tensors: string[], data: CalibrationData, method: ActivationMethod,
  options: {
    keep?: number; onBatch?: (index: number) => void;
    /** The worker thread that runs the float model (default: one for this calibration). */
    host?: OrtHost;
    /** More observers of whole tensors with their dims (e.g. input Gram matrices for GPTQ rounding). */
    tensorObservers?: Array<{ tensor: string; observe(data: Float32Array, dims: readonly number[]): void | Iterable<void> }>;
    /** A second reading of the data: the batches the first gave (a stream read once gives none the second time). */
    expectBatches?: number;
    /** Stops with its reason after the onnxruntime run or the observer in progress. */
    signal?: AbortSignal;
    /**
     * When onnxruntime cannot run the model on a batch (`failure`): the error to report instead, after running the
     * input model as given on it (its own error when it fails there too: the data do not fit the model).
     */
    inputModelError?: (inputs: Record<string, PlainTensor>, what: string, hint: string, failure: OnnxModelError) => Promise<Error>;
  } = {}): Promise<CalibrationResult> {
  const observers = new Map(tensors.map((t) => [t, makeObserver(method)]));
  // The range observers and the caller's, fed alike.
  const all = [...tensors.map((t) => ({ tensor: t, observe: (data: Float32Array) => observers.get(t)!.observe(data) })), ...(options.tensorObservers ?? [])];
  const exposed = [...new Set(all.map((o) => o.tensor))];
  for (const input of modelInputs(model)) feedType(input.name, input.elemType);  // before loading anything
  const { session, close, outputOf } = await openExposed(model, exposed, { graphOptimizationLevel: 'disabled', intraOpNumThreads: 0 },
    'the float model for calibration', 'Check that the input model loads in onnxruntime-node; if it does, the opset conversion or ' +
    'BatchNormalization folding broke it: a lowbit bug, please report it with the model.', options.host);
  const sample: Feed[] = [];
  const float16 = new Set<string>();
  const observedBatches = new Map<string, number>();
  const { iterable, filesOf } = batchesOf(data);
  let batches = 0;
  const pause = pauser();
  let closed = false;
  try {
    for await (const raw of abortable(iterable, options.signal)) {
      const files = filesOf(raw);
      const feed = checkFeedFrom(model, raw, batches, files);
      const inputs = ortTensors(feed);
      // Nothing to observe (no layer whose inputs the observers take): the run still checks the feed in onnxruntime.
      const what = `calibration[${batches}]${fromFiles(files)}`;
      const hint = symbolicDimsDisagree(model, feed) ?? '';
      let fetched;
      try {
        fetched = await runSession(session, inputs, exposed.length > 0 ? exposed.map(outputOf) : undefined, `the float model on ${what}`,
          `${hint}Check that the input model runs in onnxruntime-node on this input; if it does, the opset conversion or folding broke it: a lowbit bug, please report it with the model.`);
      } catch (e) {
        if (!(e instanceof OnnxModelError) || !options.inputModelError) throw e;
        // Closed first: the input model's session would otherwise load beside this one (their memory adds up).
        closed = true;
        await close();
        options.signal?.throwIfAborted();
        throw await options.inputModelError(inputs, what, hint, e);
      }
      options.signal?.throwIfAborted();
      const outputs = Object.fromEntries(exposed.map((t) => [t, fetched[outputOf(t)]]));
      const values = new Map(exposed.map((t) => [t, floatValues(outputs[t])]));
      for (const t of exposed) if (outputs[t].type === 'float16') float16.add(t);
      // A value inside an If branch is empty on the batches that took the other branch, and any value may be empty on
      // a batch with a dimension of 0: nothing to observe there.
      const ran = new Set(exposed.filter((t) => values.get(t)!.length > 0));
      for (const t of ran) observedBatches.set(t, (observedBatches.get(t) ?? 0) + 1);
      for (const o of all) {
        if (!ran.has(o.tensor)) continue;
        try {
          // An observer in pieces (a Gram matrix) gets the event loop turned between them.
          const pieces = o.observe(values.get(o.tensor)!, outputs[o.tensor].dims);
          if (pieces) for (const _ of pieces) await pause();
        } catch (e) {
          // The feeds were checked finite, so NaN here is the model's own doing.
          if (values.get(o.tensor)!.some((v) => Number.isNaN(v))) {
            throw new OnnxModelError(`The float model computes NaN in its tensor '${tensorName(o.tensor)}' on calibration[${batches}], whose inputs are finite: ` +
              'the model itself is broken there (a NaN constant, a negative BatchNormalization variance, …), and quantizing cannot fix it. Check its outputs in onnxruntime.');
          }
          throw new RangeError(`While calibrating on calibration[${batches}], in the float model's tensor '${tensorName(o.tensor)}': ${(e as Error).message}`);
        }
        await pause();  // observers of large tensors (histograms, Gram matrices) take a while each
        options.signal?.throwIfAborted();
      }
      if (sample.length < (options.keep ?? 4)) sample.push(keptFeed(data, feed));
      options.onBatch?.(batches);
      batches++;
    }
  } finally {
    if (!closed) await close();
  }
  if (options.expectBatches !== undefined && batches !== options.expectBatches) {
    throw invalidValue('options.calibration', `the same ${options.expectBatches} batches on its second reading (lowbit reads it twice here)`, `${batches} batches`,
      'It gave fewer the second time, as data read once do (a stream of a kind lowbit did not recognise): pass an array of feeds or a folder of .npy files, ' +
      'or a generator (read once; the second pass is then skipped and reported).');
  }
  if (batches === 0) throw invalidValue('options.calibration', 'at least one batch', 'an empty calibration set');
  return { observers, batches, sample, float16, observedBatches };
}
