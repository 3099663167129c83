/**
 * QuantParams: the seam between range/scale decisions (TypeScript) and the
 * kernels (C++), mirrored by cpp/include/lowbit/quant_params.h.
 *
 * A tensor of shape [D0, …, Dn] with quantization axis a is viewed as
 * [outer, axisLen, inner] = [D0·…·D(a-1), Da, D(a+1)·…·Dn]. Its parameters
 * (scale and zero point) form one group per
 *  - 'tensor':  the whole tensor (scale shape []),
 *  - 'channel': index along the axis (scale shape [Da], ONNX per-axis),
 *  - 'block':   run of blockSize elements along the axis (scale shape = tensor
 *               shape with ceil(Da / blockSize) on the axis, ONNX blocked),
 *  - 'group':   run of Da / groups contiguous channels along the axis (GDRQ's
 *               group-based quantization; scale shape [groups]). Natively this
 *               is 'channel' over [outer, groups, Da / groups · inner].
 * Quantize: q = saturate(roundHalfToEven(x / scale) + zeroPoint)
 * Dequantize: x = (q - zeroPoint) · scale
 */
import type { NativeLayout, NativeParams } from './native';
import { checkBoolean, checkInteger } from './validate';

export type Granularity = 'tensor' | 'channel' | 'block' | 'group';


/** A quantized tensor: one integer per element plus the parameters that map it back to floats. */
export interface QuantizedTensor {
  /** One integer per element: Int8Array when signed, Uint8Array when not (also for bits < 8). */
  values: Int8Array | Uint8Array;
  /** One scale per group, row-major in `scaleShape`. */
  scale: Float32Array;
  /** One zero point per group (0 for symmetric quantization). */
  zeroPoint: Int32Array;
  shape: number[];
  /** Shape of `scale` and `zeroPoint` as ONNX QuantizeLinear expects it ([] for per-tensor). */
  scaleShape: number[];
  bits: number;
  signed: boolean;
  granularity: Granularity;
  /** The channel or blocked axis (non-negative); absent for 'tensor'. */
  axis?: number;
  /** Block length along `axis`; only for 'block'. */
  blockSize?: number;
  /** Number of channel groups along `axis`; only for 'group'. */
  groups?: number;
  /** Bits of each channel when bit allocation was used ('channel' only); `bits` is then their maximum. */
  channelBits?: Uint8Array;
}

/** Integer range of a `bits`-wide integer. */
export function integerRange(bits: number, signed: boolean): { qmin: number; qmax: number } {
  checkInteger('bits', bits, 1, 32);
  checkBoolean('signed', signed);
  return signed ? { qmin: -(2 ** (bits - 1)), qmax: 2 ** (bits - 1) - 1 } : { qmin: 0, qmax: 2 ** bits - 1 };
}

/** The scale index (into `q.scale`) of every element of `q`. */
export function scaleIndices(q: Pick<QuantizedTensor, 'values' | 'shape' | 'granularity' | 'axis' | 'blockSize' | 'groups'>): Int32Array {
  const count = q.values.length;
  const index = new Int32Array(count);
  if (q.granularity === 'tensor') return index;
  const axis = q.axis!;
  const axisLen = q.shape[axis];
  const inner = q.shape.slice(axis + 1).reduce((a, b) => a * b, 1);
  const blocks = q.granularity === 'block' ? Math.ceil(axisLen / q.blockSize!) : 0;
  for (let e = 0; e < count; e++) {
    const along = Math.floor(e / inner) % axisLen;
    if (q.granularity === 'channel') index[e] = along;
    else if (q.granularity === 'group') index[e] = Math.floor(along / (axisLen / q.groups!));
    else index[e] = (Math.floor(e / (axisLen * inner)) * blocks + Math.floor(along / q.blockSize!)) * inner + (e % inner);
  }
  return index;
}

/** Round half to even, as QuantizeLinear rounds. */
export function roundHalfToEven(x: number): number {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 ? 2 * Math.round(x / 2) : r;
}

export interface TensorLayout {
  native: NativeLayout;
  groups: number;
  scaleShape: number[];
}

/** The layout of a (validated) shape for a granularity; axis is non-negative; `blockSize` is the group count for 'group'. */
export function tensorLayout(shape: readonly number[], granularity: Granularity, axis: number, blockSize: number): TensorLayout {
  const count = shape.reduce((a, b) => a * b, 1);
  if (granularity === 'tensor') {
    return { native: { kind: 0, outer: 1, axisLen: 1, inner: count, blockSize: 0 }, groups: 1, scaleShape: [] };
  }
  const outer = shape.slice(0, axis).reduce((a, b) => a * b, 1);
  const inner = shape.slice(axis + 1).reduce((a, b) => a * b, 1);
  const axisLen = shape[axis];
  if (granularity === 'channel') {
    return { native: { kind: 1, outer, axisLen, inner, blockSize: 0 }, groups: axisLen, scaleShape: [axisLen] };
  }
  if (granularity === 'group') {
    const groups = blockSize;
    return { native: { kind: 1, outer, axisLen: groups, inner: (axisLen / groups) * inner, blockSize: 0 }, groups, scaleShape: [groups] };
  }
  const blocks = Math.ceil(axisLen / blockSize);
  const scaleShape = shape.slice();
  scaleShape[axis] = blocks;
  return {
    native: { kind: 2, outer, axisLen, inner, blockSize },
    groups: outer * blocks * inner,
    scaleShape,
  };
}

/** The native view of a quantized tensor's parameters. */
export function nativeParams(q: Pick<QuantizedTensor, 'scale' | 'zeroPoint' | 'bits' | 'signed'>, layout: TensorLayout): NativeParams {
  const { qmin, qmax } = integerRange(q.bits, q.signed);
  return { scale: q.scale, zeroPoint: q.zeroPoint, qmin, qmax, layout: layout.native };
}
