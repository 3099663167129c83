/**
 * IEEE 754 half precision (float16) as 16-bit patterns in a Uint16Array, the form ONNX stores and
 * onnxruntime-node exchanges them in: conversion from float32 rounds to nearest, ties to even.
 */
import { invalidType } from './errors';

const single = new Float32Array(1);
const singleBits = new Uint32Array(single.buffer);

/** The float16 bit pattern nearest to `value` (ties to even; overflow to ±Infinity; NaN stays NaN). */
export function toFloat16Bits(value: number): number {
  single[0] = value;
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

/** float32 values (an array or a typed array of numbers) as float16 bit patterns. */
export function toFloat16Array(values: ArrayLike<number>): Uint16Array<ArrayBuffer> {
  if (!(Array.isArray(values) || (ArrayBuffer.isView(values) && !(values instanceof DataView) && !(values instanceof BigInt64Array) && !(values instanceof BigUint64Array)))) {
    throw invalidType('values', 'an array or typed array of numbers', values);
  }
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) out[i] = toFloat16Bits(values[i]);
  return out;
}

/** float16 bit patterns (a Uint16Array, as onnxruntime-node returns float16 tensors) as float32 values. */
export function fromFloat16Array(bits: ArrayLike<number>): Float32Array {
  if (!(bits instanceof Uint16Array || Array.isArray(bits))) throw invalidType('bits', 'a Uint16Array of float16 bit patterns', bits);
  const out = new Float32Array(bits.length);
  for (let i = 0; i < bits.length; i++) out[i] = fromFloat16Bits(bits[i]);
  return out;
}
