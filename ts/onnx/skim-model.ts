/**
 * A model file's protobuf without the data of its large stored tensors, read in small pieces: each such tensor
 * becomes an external data reference to the model file itself (its name, the data's offset and length), so the
 * model parses and its tensors are read lazily as external data are (model-io's readModel with `lazyTensors`),
 * and the file is never in memory whole.
 *
 * It walks the protobuf wire format, entering only length-delimited fields at least as large as the threshold on
 * the way to a stored tensor: ModelProto.graph (7); GraphProto.node (1) and .initializer (5); NodeProto.attribute
 * (5); AttributeProto.g (6) and .graphs (11) of any node, and .t (5) of a Constant node's `value` (the tensors
 * model-io reads external data for); TensorProto.raw_data (9). Everything else is copied byte for byte. The walk
 * is a generator that asks its caller for bytes ({ offset, length }), so one walk serves synchronous and
 * asynchronous reads. Anything it does not expect (a wire type ONNX never uses, a field running past its message)
 * is a SkimError: the caller then reads the file whole, whose parse gives the proper error.
 */
import { create, toBinary } from '@bufbuild/protobuf';
import { StringStringEntryProtoSchema, TensorProto_DataLocation, TensorProtoSchema, type StringStringEntryProto } from 'onnx-buf';

export class SkimError extends Error {}

/** Bytes of the file the walk asks for. */
export interface ByteRange { offset: number; length: number }

type Walk<T> = Generator<ByteRange, T, Uint8Array>;

/** What skimModel gives: the skimmed protobuf as pieces, and the data offsets (in the file) it left there. */
export interface Skimmed {
  pieces: Uint8Array[];
  left: Set<number>;
  /**
   * Those of `left` whose tensor stored a data_location (DEFAULT) of its own: the reference replaces it, and the
   * reader puts it back (for the same bytes when the model is written again).
   */
  locationSet: Set<number>;
}

type Kind = 'model' | 'graph' | 'node' | 'attribute' | 'tensor';

/** A field as stored: its number and wire type, where it starts, and for a length-delimited one its data. */
interface Field { number: number; wire: number; start: number; dataStart: number; end: number }

/** A tensor's external_data entries: its data at `offset` of the file `location`, `length` bytes. */
export function externalDataEntries(location: string, offset: number, length: number): StringStringEntryProto[] {
  return [['location', location], ['offset', String(offset)], ['length', String(length)]].map(([key, value]) => create(StringStringEntryProtoSchema, { key, value }));
}

/** The last field that `which` accepts (protobuf's rule: of a non-repeated field stored several times, the last counts). */
function lastField(found: Field[], which: (f: Field) => boolean): Field | undefined {
  for (let i = found.length - 1; i >= 0; i--) if (which(found[i])) return found[i];
  return undefined;
}

/** Bytes read at a time while scanning field headers. */
const WINDOW = 1 << 14;

/** The tag and length of a length-delimited field (wire type 2); lengths here are below 2^31. */
export function fieldHeader(field: number, length: number): Uint8Array {
  const bytes: number[] = [];
  for (let v of [(field << 3) | 2, length]) {
    for (; v >= 0x80; v = Math.floor(v / 128)) bytes.push((v % 128) | 0x80);
    bytes.push(v);
  }
  return Uint8Array.from(bytes);
}

/**
 * The file of `size` bytes (named `location` in the references it writes) as pieces of a protobuf whose tensors with
 * raw data of `threshold` bytes or more refer to the file instead of holding the data.
 */
export function* skimModel(size: number, location: string, threshold: number): Walk<Skimmed> {
  const left = new Set<number>();
  const locationSet = new Set<number>();
  let window: Uint8Array = new Uint8Array(0);
  let windowAt = 0;

  /** Bytes [from, to) of the file: from the window when it holds them, else read. */
  function* bytes(from: number, to: number): Walk<Uint8Array> {
    if (to <= from) return new Uint8Array(0);
    if (from >= windowAt && to <= windowAt + window.length) return window.slice(from - windowAt, to - windowAt);
    return yield { offset: from, length: to - from };
  }

  /**
   * A varint at `pos` and the position after it. Up to 10 bytes (a negative int64); values above 2^53 come out
   * inexact, which only a wire-type-0 field's value can be, and those are skipped, not used.
   */
  function* varint(pos: number): Walk<[number, number]> {
    const windowEnd = windowAt + window.length;
    if (pos < windowAt || pos >= windowEnd || (pos + 10 > windowEnd && windowEnd < size)) {
      if (pos >= size) throw new SkimError(`a field runs past the end of the file at byte ${pos}`);
      window = yield { offset: pos, length: Math.min(WINDOW, size - pos) };
      windowAt = pos;
    }
    let value = 0;
    for (let shift = 1, at = pos; at < windowAt + window.length && at < pos + 10; shift *= 128, at++) {
      const b = window[at - windowAt];
      value += (b & 0x7f) * shift;
      if (b < 0x80) return [value, at + 1];
    }
    throw new SkimError(`no valid varint at byte ${pos}`);
  }

  /** The fields of the message stored in [start, end). */
  function* fields(start: number, end: number): Walk<Field[]> {
    const found: Field[] = [];
    for (let pos = start; pos < end;) {
      const [tag, afterTag] = yield* varint(pos);
      const field: Field = { number: Math.floor(tag / 8), wire: tag % 8, start: pos, dataStart: afterTag, end: afterTag };
      if (field.wire === 0) field.end = (yield* varint(afterTag))[1];
      else if (field.wire === 1) field.end = afterTag + 8;
      else if (field.wire === 5) field.end = afterTag + 4;
      else if (field.wire === 2) {
        const [length, dataStart] = yield* varint(afterTag);
        field.dataStart = dataStart;
        field.end = dataStart + length;
      } else throw new SkimError(`wire type ${field.wire} at byte ${pos}`);
      if (field.end > end || field.number === 0) throw new SkimError(`a field at byte ${pos} runs past its message`);
      found.push(field);
      pos = field.end;
    }
    return found;
  }

  /** The text of a string field. */
  function* text(found: Field[], number: number): Walk<string | undefined> {
    const f = lastField(found, (x) => x.number === number && x.wire === 2);
    return f ? new TextDecoder().decode(yield* bytes(f.dataStart, f.end)) : undefined;
  }

  /**
   * The message of this kind in [start, end) as pieces; `inConstant` for a Constant node's attributes. Fields of at
   * least `threshold` bytes on the way to a stored tensor are entered, a tensor's raw data left in the file.
   */
  function* message(kind: Kind, start: number, end: number, inConstant = false): Walk<Uint8Array[]> {
    const found = yield* fields(start, end);
    let holds: (f: Field) => Kind | 'data' | undefined;
    let constant = false;
    if (kind === 'model') holds = (f) => (f.number === 7 ? 'graph' : undefined);
    else if (kind === 'graph') holds = (f) => (f.number === 1 ? 'node' : f.number === 5 ? 'tensor' : undefined);
    else if (kind === 'node') {
      constant = (yield* text(found, 4)) === 'Constant';
      holds = (f) => (f.number === 5 ? 'attribute' : undefined);
    } else if (kind === 'attribute') {
      const value = inConstant && (yield* text(found, 1)) === 'value';
      holds = (f) => (f.number === 6 || f.number === 11 ? 'graph' : f.number === 5 && value ? 'tensor' : undefined);
    } else {
      // A tensor already marked as external keeps what it has; of several raw_data fields the last one counts.
      const locationField = lastField(found, (f) => f.number === 14 && f.wire === 0);
      const external = locationField !== undefined && (yield* varint(locationField.dataStart))[0] === TensorProto_DataLocation.EXTERNAL;
      const data = lastField(found, (f) => f.number === 9 && f.wire === 2);
      holds = (f) => (f === data && !external ? 'data' : undefined);
      if (locationField && data && !external && data.end - data.dataStart >= threshold) locationSet.add(data.dataStart);
    }
    const out: Uint8Array[] = [];
    let copiedTo = start;
    let leftHere: ByteRange | undefined;
    for (const f of found) {
      const inner = f.wire === 2 && f.end - f.dataStart >= threshold ? holds(f) : undefined;
      if (inner === undefined) continue;
      out.push(yield* bytes(copiedTo, f.start));
      copiedTo = f.end;
      if (inner === 'data') {
        leftHere = { offset: f.dataStart, length: f.end - f.dataStart };
        left.add(f.dataStart);
        continue;
      }
      const pieces = yield* message(inner, f.dataStart, f.end, constant);
      out.push(fieldHeader(f.number, pieces.reduce((a, p) => a + p.length, 0)), ...pieces);
    }
    out.push(yield* bytes(copiedTo, end));
    // Fields appended to a message merge into it: the data now wait at their place in this file.
    if (leftHere) {
      out.push(toBinary(TensorProtoSchema, create(TensorProtoSchema, {
        dataLocation: TensorProto_DataLocation.EXTERNAL,
        externalData: externalDataEntries(location, leftHere.offset, leftHere.length),
      })));
    }
    return out;
  }

  const pieces = yield* message('model', 0, size);
  return { pieces, left, locationSet };
}
