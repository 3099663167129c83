/**
 * ONNX sub-byte layouts: INT4/UINT4 hold two values per byte and INT2/UINT2
 * four, element 0 in the lowest bits; an incomplete last byte is zero-padded.
 */
import { invalidType, invalidValue, withArticle } from './errors';
import { native } from './native';
import type { QuantizedTensor } from './quant-params';
import { checkAttached, checkBoolean, checkInteger, isPlainObject } from './validate';

type Values = Int8Array | Uint8Array;

function valuesOf(name: string, q: unknown, bits: 2 | 4): { values: Values; signed: boolean } {
  if (q instanceof Int8Array || q instanceof Uint8Array) {
    checkAttached(name, q);
    return { values: q, signed: q instanceof Int8Array };
  }
  if (isPlainObject(q) && (q.values instanceof Int8Array || q.values instanceof Uint8Array)) {
    const t = q as unknown as QuantizedTensor;
    if (t.bits !== undefined && (!Number.isInteger(t.bits) || t.bits < 1 || t.bits > bits)) {
      throw invalidValue(`${name}.bits`, `an integer from 1 to ${bits}`, t.bits, `Quantize with bits: ${bits} before packing.`);
    }
    checkAttached(`${name}.values`, t.values);
    const signed = t.values instanceof Int8Array;
    // The codes' type and the tensor's own flag must agree: packing uint4 codes as int4 changes what they mean.
    if (t.signed !== undefined && t.signed !== signed) {
      throw invalidValue(`${name}.signed`, `${signed} (its values are ${withArticle(t.values.constructor.name)})`, t.signed,
        'Pass the QuantizedTensor that quantizeTensor returned, unchanged.');
    }
    return { values: t.values, signed };
  }
  throw invalidType(name, 'a QuantizedTensor or an Int8Array/Uint8Array of values', q);
}

function pack(name: string, q: unknown, bits: 2 | 4): Uint8Array {
  const { values, signed } = valuesOf(name, q, bits);
  const perByte = 8 / bits;
  const out = new Uint8Array(Math.ceil(values.length / perByte));
  const bad = bits === 4 ? native().packInt4(values, signed, out) : native().packInt2(values, signed, out);
  if (bad >= 0) {
    const lo = signed ? -(2 ** (bits - 1)) : 0;
    const hi = signed ? 2 ** (bits - 1) - 1 : 2 ** bits - 1;
    throw invalidValue(`${name}[${bad}]`, withArticle(`${signed ? '' : 'u'}int${bits} value in [${lo}, ${hi}]`), values[bad],
      `Quantize with bits: ${bits} (or fewer) before packing.`);
  }
  return out;
}

function unpack(packed: unknown, length: unknown, signed: unknown, bits: 2 | 4): Values {
  if (!(packed instanceof Uint8Array)) throw invalidType('packed', 'a Uint8Array', packed);
  checkAttached('packed', packed);
  const perByte = 8 / bits;
  const n = length === undefined ? packed.length * perByte : checkInteger('length', length, 0, packed.length * perByte);
  if (Math.ceil(n / perByte) !== packed.length) {
    throw invalidValue('length', `a length that needs exactly ${packed.length} bytes (${packed.length * perByte - perByte + 1}..${packed.length * perByte})`, n);
  }
  const isSigned = signed === undefined ? true : checkBoolean('signed', signed);
  const out = isSigned ? new Int8Array(n) : new Uint8Array(n);
  if (bits === 4) native().unpackInt4(packed, n, isSigned, out);
  else native().unpackInt2(packed, n, isSigned, out);
  return out;
}

/**
 * Packs 4-bit values two per byte (ONNX INT4/UINT4: element 0 in the low nibble).
 * Signedness follows the array type (Int8Array → INT4, Uint8Array → UINT4).
 * @example
 * packInt4(new Int8Array([1, -2, 3]))  // Uint8Array [0xE1, 0x03]
 */
export function packInt4(q: QuantizedTensor | Int8Array | Uint8Array): Uint8Array {
  return pack('q', q, 4);
}

/**
 * Unpacks ONNX INT4/UINT4 bytes. `length` defaults to two values per byte.
 * @example
 * unpackInt4(new Uint8Array([0xE1, 0x03]), 3)  // Int8Array [1, -2, 3]
 */
export function unpackInt4(packed: Uint8Array, length?: number, signed?: true): Int8Array;
export function unpackInt4(packed: Uint8Array, length: number | undefined, signed: false): Uint8Array;
export function unpackInt4(packed: Uint8Array, length?: number, signed?: boolean): Int8Array | Uint8Array;
export function unpackInt4(packed: Uint8Array, length?: number, signed?: boolean): Int8Array | Uint8Array {
  return unpack(packed, length, signed, 4);
}

/**
 * Packs 2-bit values four per byte (ONNX INT2/UINT2: lowest bits first).
 * @example
 * packInt2(new Int8Array([-2, 1, 0, -1]))  // Uint8Array [0xC6]
 */
export function packInt2(q: QuantizedTensor | Int8Array | Uint8Array): Uint8Array {
  return pack('q', q, 2);
}

/** Unpacks ONNX INT2/UINT2 bytes. `length` defaults to four values per byte. */
export function unpackInt2(packed: Uint8Array, length?: number, signed?: true): Int8Array;
export function unpackInt2(packed: Uint8Array, length: number | undefined, signed: false): Uint8Array;
export function unpackInt2(packed: Uint8Array, length?: number, signed?: boolean): Int8Array | Uint8Array;
export function unpackInt2(packed: Uint8Array, length?: number, signed?: boolean): Int8Array | Uint8Array {
  return unpack(packed, length, signed, 2);
}
