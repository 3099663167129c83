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

/** Row-major strides of a shape. */
export function stridesOf(dims: readonly number[]): number[] {
  const strides = new Array<number>(dims.length);
  let s = 1;
  for (let i = dims.length - 1; i >= 0; i--) {
    strides[i] = s;
    s *= dims[i];
  }
  return strides;
}

/**
 * For each element of a tensor of `outDims` (row-major), the offset base + Σ index[d]·strides[d]
 * into a source tensor: broadcasting (stride 0), transposing and slicing are all such views.
 */
export function viewIndex(outDims: readonly number[], strides: readonly number[], base = 0): Int32Array {
  const rank = outDims.length;
  const total = sizeOf(outDims);
  const index = new Int32Array(total);
  const counter = new Array<number>(rank).fill(0);
  let offset = base;
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

/** For each element of `outDims`, the index of the element of a tensor of `dims` broadcast to it. */
export function broadcastIndex(dims: readonly number[], outDims: readonly number[]): Int32Array {
  const padded = [...new Array(outDims.length - dims.length).fill(1), ...dims];
  const strides = stridesOf(padded).map((s, i) => (padded[i] === 1 ? 0 : s));
  return viewIndex(outDims, strides);
}

/**
 * When a tensor of `dims` broadcast to `outDims` reads element floor(i / inner) % mid
 * (its non-1 axes are contiguous), that [mid, inner]; otherwise undefined.
 */
function runPattern(dims: readonly number[], outDims: readonly number[]): { mid: number; inner: number } | undefined {
  const padded = [...new Array(outDims.length - dims.length).fill(1), ...dims];
  const used = padded.flatMap((d, i) => (d !== 1 ? [i] : []));
  if (used.length === 0) return { mid: 1, inner: sizeOf(outDims) };
  const first = used[0], last = used[used.length - 1];
  for (let i = first; i <= last; i++) if (padded[i] !== outDims[i]) return undefined;
  return { mid: sizeOf(outDims.slice(first, last + 1)), inner: sizeOf(outDims.slice(last + 1)) };
}

/** out[i] = x[index[i]]: the values of a view (broadcast, transposed, sliced) of x. */
export function gather(x: Float32Array, index: Int32Array): Float32Array {
  const out = new Float32Array(index.length);
  for (let i = 0; i < out.length; i++) out[i] = x[index[i]];
  return out;
}

/** The adjoint of gather: out (of `size`) sums grad[i] into out[index[i]], in element order. */
export function scatter(grad: Float32Array, index: Int32Array, size: number): Float32Array {
  const out = new Float32Array(size);
  for (let i = 0; i < grad.length; i++) out[index[i]] += grad[i];
  return out;
}

/** The values of a tensor of `dims` broadcast to `outDims` (the data itself when the shapes match). */
export function expandTo(data: Float32Array, dims: readonly number[], outDims: readonly number[]): Float32Array {
  const total = sizeOf(outDims);
  if (data.length === total) return data;
  const p = runPattern(dims, outDims);
  if (!p) return gather(data, broadcastIndex(dims, outDims));
  const out = new Float32Array(total);
  const block = p.mid * p.inner;
  for (let o = 0; o < total; o += block) {
    if (p.inner === 1) out.set(data, o);
    else for (let m = 0; m < p.mid; m++) out.fill(data[m], o + m * p.inner, o + (m + 1) * p.inner);
  }
  return out;
}

/** Sums a gradient of shape `outDims` back to a broadcast operand of `dims` (float32 sums in element order, as unbroadcast). */
export function reduceTo(grad: Float32Array, dims: readonly number[], outDims: readonly number[]): Float32Array {
  const size = sizeOf(dims);
  if (grad.length === size) return grad;
  const p = runPattern(dims, outDims);
  if (!p) return scatter(grad, broadcastIndex(dims, outDims), size);
  const out = new Float32Array(size);
  let i = 0;
  while (i < grad.length) {
    for (let m = 0; m < p.mid; m++) {
      for (const end = i + p.inner; i < end; i++) out[m] += grad[i];
    }
  }
  return out;
}

/** Sums a gradient of the broadcast shape back to the operand's shape. */
export function unbroadcast(grad: Float32Array, index: Int32Array, size: number): Float32Array {
  return grad.length === size ? grad : scatter(grad, index, size);
}

/** Index of the first non-finite value, or -1. */
export function firstNonFinite(x: Float32Array): number {
  for (let i = 0; i < x.length; i++) if (!Number.isFinite(x[i])) return i;
  return -1;
}
