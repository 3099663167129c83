/** Dense float32 tensors of the training engine (row-major, NCHW) and shape helpers. */

export interface Tensor {
  data: Float32Array;
  dims: number[];
}

export function sizeOf(dims: readonly number[]): number {
  let n = 1;
  for (const d of dims) n *= d;
  return n;
}

export function zeros(dims: number[]): Tensor {
  return { data: new Float32Array(sizeOf(dims)), dims };
}

/** The numpy broadcast of two shapes, or undefined when they do not broadcast. */
export function broadcastDims(a: readonly number[], b: readonly number[]): number[] | undefined {
  const rank = Math.max(a.length, b.length);
  const out: number[] = [];
  for (let i = 0; i < rank; i++) {
    const x = a[a.length - rank + i] ?? 1;
    const y = b[b.length - rank + i] ?? 1;
    if (x !== y && x !== 1 && y !== 1) return undefined;
    out.push(Math.max(x, y));
  }
  return out;
}

/** For each element of `outDims`, the index of the element of a tensor of `dims` broadcast to it. */
export function broadcastIndex(dims: readonly number[], outDims: readonly number[]): Int32Array {
  const rank = outDims.length;
  const padded = [...new Array(rank - dims.length).fill(1), ...dims];
  const strides = new Array<number>(rank);
  let s = 1;
  for (let i = rank - 1; i >= 0; i--) {
    strides[i] = padded[i] === 1 ? 0 : s;
    s *= padded[i];
  }
  const total = sizeOf(outDims);
  const index = new Int32Array(total);
  const counter = new Array<number>(rank).fill(0);
  let offset = 0;
  for (let i = 0; i < total; i++) {
    index[i] = offset;
    for (let d = rank - 1; d >= 0; d--) {
      counter[d]++;
      offset += strides[d];
      if (counter[d] < outDims[d]) break;
      offset -= strides[d] * counter[d];
      counter[d] = 0;
    }
  }
  return index;
}

/** Sums a gradient of the broadcast shape back to the operand's shape. */
export function unbroadcast(grad: Float32Array, index: Int32Array, size: number): Float32Array {
  if (grad.length === size) return grad;
  const out = new Float32Array(size);
  for (let i = 0; i < grad.length; i++) out[index[i]] += grad[i];
  return out;
}

/** Index of the first non-finite value, or -1. */
export function firstNonFinite(x: Float32Array): number {
  for (let i = 0; i < x.length; i++) if (!Number.isFinite(x[i])) return i;
  return -1;
}
