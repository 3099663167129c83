/**
 * IEEE 754 half precision (float16) as 16-bit patterns in a Uint16Array, the form ONNX stores and
 * onnxruntime-node exchanges them in: conversion of any number rounds once to nearest, ties to even.
 */
import { invalidType, invalidValue } from './errors';
import { checkAttached } from './validate';

const single = new Float32Array(1);
const singleBits = new Uint32Array(single.buffer);

/** The float16 bit pattern nearest to `value` (ties to even; overflow to ±Infinity; NaN stays NaN). */
export function toFloat16Bits(value: number): number {
  single[0] = value;
  const bits = float16OfSingle();
  if (single[0] === value || Number.isNaN(value)) return bits;
  // Not a float32: rounding it to float32 first can round twice (1 + 2^-11 + 2^-40 must not tie). The nearest
  // float16 is within one step of that result; overflow starts halfway past the largest finite value.
  const sign = value < 0 ? 0x8000 : 0;
  const magnitude = Math.abs(value);
  if (magnitude >= 65520) return sign | 0x7c00;
  let pick = Math.min(bits & 0x7fff, 0x7bff);
  let error = Math.abs(magnitude - fromFloat16Bits(pick));
  for (const candidate of [pick - 1, pick + 1]) {
    if (candidate < 0 || candidate > 0x7bff) continue;
    const e = Math.abs(magnitude - fromFloat16Bits(candidate));
    if (e < error || (e === error && (candidate & 1) === 0)) {
      pick = candidate;
      error = e;
    }
  }
  return sign | pick;
}

/** The float16 bit pattern nearest to the float32 in `single`. */
function float16OfSingle(): number {
  const x = singleBits[0];
  const sign = (x >>> 16) & 0x8000;
  const exponent = (x >>> 23) & 0xff;
  const mantissa = x & 0x7fffff;
  if (exponent === 0xff) return sign | 0x7c00 | (mantissa ? 0x200 : 0);
  const e = exponent - 112;  // the float16 exponent field (bias 15 instead of 127)
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    // Subnormal: the value in units of 2^-24.
    if (e < -10) return sign;
    const full = mantissa | 0x800000;
    const shift = 14 - e;
    let half = full >>> shift;
    const rest = full & ((1 << shift) - 1);
    const tie = 1 << (shift - 1);
    if (rest > tie || (rest === tie && (half & 1) === 1)) half++;
    return sign | half;
  }
  let half = (e << 10) | (mantissa >>> 13);
  const rest = mantissa & 0x1fff;
  // A carry out of the mantissa raises the exponent, up to Infinity: what rounding should do.
  if (rest > 0x1000 || (rest === 0x1000 && (half & 1) === 1)) half++;
  return sign | half;
}

/** The value of a float16 bit pattern. */
export function fromFloat16Bits(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const mantissa = bits & 0x3ff;
  if (exponent === 0) return sign * mantissa * 2 ** -24;
  if (exponent === 0x1f) return mantissa ? NaN : sign * Infinity;
  return sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
}

/** Values (an array or a typed array of numbers, float64 ones rounded once) as float16 bit patterns. */
export function toFloat16Array(values: ArrayLike<number>): Uint16Array<ArrayBuffer> {
  if (!(Array.isArray(values) || (ArrayBuffer.isView(values) && !(values instanceof DataView) && !(values instanceof BigInt64Array) && !(values instanceof BigUint64Array)))) {
    throw invalidType('values', 'an array or typed array of numbers', values);
  }
  const out = new Uint16Array(values.length);
  if (ArrayBuffer.isView(values)) {
    checkAttached('values', values);
    for (let i = 0; i < values.length; i++) out[i] = toFloat16Bits(values[i]);
    return out;
  }
  // A plain array's elements can be anything; a typed array's are numbers.
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (typeof v !== 'number') throw invalidValue(`values[${i}]`, 'a number', v, 'Convert the values with Number() first.');
    out[i] = toFloat16Bits(v);
  }
  return out;
}

let valuesOfBits: Float32Array | undefined;

/** The value of every float16 bit pattern, made on first use (256 KB). */
function float16Table(): Float32Array {
  if (!valuesOfBits) {
    valuesOfBits = new Float32Array(65536);
    for (let b = 0; b < 65536; b++) valuesOfBits[b] = fromFloat16Bits(b);
  }
  return valuesOfBits;
}

/** float16 bit patterns (a Uint16Array, as onnxruntime-node returns float16 tensors, or an array of them) as float32 values. */
export function fromFloat16Array(bits: ArrayLike<number>): Float32Array {
  if (!(bits instanceof Uint16Array || Array.isArray(bits))) throw invalidType('bits', 'a Uint16Array of float16 bit patterns', bits);
  const out = new Float32Array(bits.length);
  if (bits instanceof Uint16Array) {
    // Calibration batches and float16 weights come this way: every element is a bit pattern already, and a table of
    // all 65536 values turns each into one load.
    checkAttached('bits', bits);
    const table = float16Table();
    for (let i = 0; i < bits.length; i++) out[i] = table[bits[i]];
    return out;
  }
  for (let i = 0; i < bits.length; i++) {
    const b = bits[i];
    if (!Number.isInteger(b) || b < 0 || b > 0xffff) throw invalidValue(`bits[${i}]`, 'a float16 bit pattern (an integer in [0, 65535])', b);
    out[i] = fromFloat16Bits(b);
  }
  return out;
}
