/**
 * Forward and backward of the ONNX operators the training engine supports.
 * Heavy work (Conv via im2col + SGEMM, Gemm/MatMul, BatchNormalization, the
 * activations and pooling) goes through FloatKernels; the remaining element-wise
 * work (Add/Sub/Mul, Softmax, bias adds) stays here. Every backward returns
 * the gradient of each input that needs one (same shape as the input).
 */
import type { NodeProto } from 'onnx-buf';

import { attribute, floatAttribute, intAttribute, intsAttribute } from '../onnx/graph';
import type { ActivationKind, ConvGeometry, FloatKernels } from './kernels';
import { broadcastDims, broadcastIndex, sizeOf, unbroadcast, type Tensor } from './tensor';

export interface OpContext {
  kernels: FloatKernels;
  training: boolean;
  opset: number;
}

export interface ForwardResult {
  y: Tensor;
  saved?: unknown;
}

export interface OpImpl {
  forward(node: NodeProto, x: Array<Tensor | undefined>, ctx: OpContext): ForwardResult;
  /** needs[i]: whether input i wants a gradient. */
  backward(node: NodeProto, x: Array<Tensor | undefined>, y: Tensor, saved: unknown, dy: Float32Array, needs: boolean[],
    ctx: OpContext): Array<Float32Array | undefined>;
}

export class OpError extends Error {
  constructor(node: NodeProto, message: string) {
    super(`${node.opType} node '${node.name || node.output[0]}': ${message}`);
    this.name = 'OpError';
  }
}

function need(node: NodeProto, x: Tensor | undefined, what: string): Tensor {
  if (!x) throw new OpError(node, `missing ${what}`);
  return x;
}

function spatial2d(node: NodeProto, name: string, fallback: number): [number, number] {
  const v = intsAttribute(node, name);
  if (!v) return [fallback, fallback];
  if (v.length !== 2) throw new OpError(node, `only 2-D spatial ops are supported (${name} = [${v.join(', ')}])`);
  return [v[0], v[1]];
}

/** Output size and leading/trailing padding of one spatial axis, with auto_pad and ceil_mode. */
function axisGeometry(node: NodeProto, size: number, kernel: number, stride: number, dilation: number, padBegin: number,
  padEnd: number, ceil: boolean): { out: number; padBegin: number } {
  const autoPad = attribute(node, 'auto_pad')?.s;
  const mode = autoPad ? new TextDecoder().decode(autoPad) : 'NOTSET';
  const extent = dilation * (kernel - 1) + 1;
  if (mode === 'SAME_UPPER' || mode === 'SAME_LOWER') {
    const out = Math.ceil(size / stride);
    const total = Math.max(0, (out - 1) * stride + extent - size);
    return { out, padBegin: mode === 'SAME_UPPER' ? Math.floor(total / 2) : Math.ceil(total / 2) };
  }
  if (mode === 'VALID') return { out: Math.floor((size - extent) / stride) + 1, padBegin: 0 };
  const span = size + padBegin + padEnd - extent;
  let out = (ceil ? Math.ceil(span / stride) : Math.floor(span / stride)) + 1;
  // ceil_mode: a window may not start in the trailing padding.
  if (ceil && (out - 1) * stride >= size + padBegin) out--;
  return { out, padBegin };
}

/** The im2col geometry of a Conv or pooling node over an NCHW input of these dims. */
export function windowGeometry(node: NodeProto, dims: readonly number[], kernelH: number, kernelW: number): ConvGeometry {
  if (dims.length !== 4) throw new OpError(node, `expects a 4-D NCHW input, got [${dims.join(', ')}]`);
  const [, channels, height, width] = dims;
  const [strideH, strideW] = spatial2d(node, 'strides', 1);
  const [dilationH, dilationW] = spatial2d(node, 'dilations', 1);
  const pads = intsAttribute(node, 'pads') ?? [0, 0, 0, 0];
  if (pads.length !== 4) throw new OpError(node, `only 2-D spatial ops are supported (pads = [${pads.join(', ')}])`);
  const ceil = intAttribute(node, 'ceil_mode', 0) === 1;
  const h = axisGeometry(node, height, kernelH, strideH, dilationH, pads[0], pads[2], ceil);
  const w = axisGeometry(node, width, kernelW, strideW, dilationW, pads[1], pads[3], ceil);
  if (h.out <= 0 || w.out <= 0) throw new OpError(node, `the window does not fit the ${height}×${width} input`);
  return { channels, height, width, kernelH, kernelW, padTop: h.padBegin, padLeft: w.padBegin, strideH, strideW,
    dilationH, dilationW, outH: h.out, outW: w.out };
}

const conv: OpImpl = {
  forward(node, [xIn, wIn, bIn], ctx) {
    const x = need(node, xIn, 'input X'), w = need(node, wIn, 'weight W');
    if (w.dims.length !== 4) throw new OpError(node, `only 2-D convolution is supported (weight [${w.dims.join(', ')}])`);
    const group = intAttribute(node, 'group', 1);
    const [outChannels, groupChannels, kernelH, kernelW] = w.dims;
    const g = windowGeometry(node, x.dims, kernelH, kernelW);
    if (g.channels !== groupChannels * group || outChannels % group !== 0) {
      throw new OpError(node, `input has ${g.channels} channels; weight [${w.dims.join(', ')}] with group ${group} expects ${groupChannels * group}`);
    }
    const batch = x.dims[0];
    const rows = groupChannels * kernelH * kernelW;
    const pixels = g.outH * g.outW;
    const perGroupOut = outChannels / group;
    const col = new Float32Array(batch * g.channels * kernelH * kernelW * pixels);
    ctx.kernels.im2col(x.data, batch, g, col);
    const y = new Float32Array(batch * outChannels * pixels);
    for (let n = 0; n < batch; n++) {
      for (let k = 0; k < group; k++) {
        ctx.kernels.sgemm({
          transA: false, transB: false, m: perGroupOut, n: pixels, k: rows,
          a: w.data.subarray(k * perGroupOut * rows, (k + 1) * perGroupOut * rows),
          b: col.subarray((n * group + k) * rows * pixels, (n * group + k + 1) * rows * pixels),
          c: y.subarray((n * outChannels + k * perGroupOut) * pixels, (n * outChannels + (k + 1) * perGroupOut) * pixels),
          accumulate: false,
        });
      }
    }
    if (bIn) {
      for (let n = 0; n < batch; n++) {
        for (let o = 0; o < outChannels; o++) {
          const b = bIn.data[o];
          const base = (n * outChannels + o) * pixels;
          for (let i = 0; i < pixels; i++) y[base + i] += b;
        }
      }
    }
    return { y: { data: y, dims: [batch, outChannels, g.outH, g.outW] }, saved: { col, g, group } };
  },
  backward(node, [x, w, b], y, saved, dy, needs, ctx) {
    const { col, g, group } = saved as { col: Float32Array; g: ConvGeometry; group: number };
    const [outChannels, , kernelH, kernelW] = w!.dims;
    const batch = x!.dims[0];
    const rows = (g.channels / group) * kernelH * kernelW;
    const pixels = g.outH * g.outW;
    const perGroupOut = outChannels / group;
    const grads: Array<Float32Array | undefined> = [];
    if (needs[1]) {
      const dw = new Float32Array(w!.data.length);
      for (let n = 0; n < batch; n++) {
        for (let k = 0; k < group; k++) {
          ctx.kernels.sgemm({
            transA: false, transB: true, m: perGroupOut, n: rows, k: pixels,
            a: dy.subarray((n * outChannels + k * perGroupOut) * pixels, (n * outChannels + (k + 1) * perGroupOut) * pixels),
            b: col.subarray((n * group + k) * rows * pixels, (n * group + k + 1) * rows * pixels),
            c: dw.subarray(k * perGroupOut * rows, (k + 1) * perGroupOut * rows),
            accumulate: n > 0,
          });
        }
      }
      grads[1] = dw;
    }
    if (needs[2] && b) {
      const db = new Float64Array(outChannels);
      for (let n = 0; n < batch; n++) {
        for (let o = 0; o < outChannels; o++) {
          const base = (n * outChannels + o) * pixels;
          let s = 0;
          for (let i = 0; i < pixels; i++) s += dy[base + i];
          db[o] += s;
        }
      }
      grads[2] = Float32Array.from(db);
    }
    if (needs[0]) {
      const dcol = new Float32Array(col.length);
      for (let n = 0; n < batch; n++) {
        for (let k = 0; k < group; k++) {
          ctx.kernels.sgemm({
            transA: true, transB: false, m: rows, n: pixels, k: perGroupOut,
            a: w!.data.subarray(k * perGroupOut * rows, (k + 1) * perGroupOut * rows),
            b: dy.subarray((n * outChannels + k * perGroupOut) * pixels, (n * outChannels + (k + 1) * perGroupOut) * pixels),
            c: dcol.subarray((n * group + k) * rows * pixels, (n * group + k + 1) * rows * pixels),
            accumulate: false,
          });
        }
      }
      const dx = new Float32Array(x!.data.length);
      ctx.kernels.col2im(dcol, batch, g, dx);
      grads[0] = dx;
    }
    return grads;
  },
};

/** Y = op(A)·op(B) with the gradients of both operands, for row-major 2-D A and B. */
function matmul2d(kernels: FloatKernels, a: Float32Array, b: Float32Array, m: number, k: number, n: number, transA: boolean,
  transB: boolean, y: Float32Array): void {
  kernels.sgemm({ transA, transB, m, n, k, a, b, c: y, accumulate: false });
}

function matmul2dBackward(kernels: FloatKernels, a: Float32Array, b: Float32Array, dy: Float32Array, m: number, k: number,
  n: number, transA: boolean, transB: boolean, needA: boolean, needB: boolean, da: Float32Array, db: Float32Array,
  accumulate: boolean): void {
  if (needA) {
    // dÂ = dY·B̂ᵀ; stored as Â (transA: A = Âᵀ, so dA = B̂·dYᵀ).
    if (!transA) kernels.sgemm({ transA: false, transB: !transB, m, n: k, k: n, a: dy, b, c: da, accumulate });
    else kernels.sgemm({ transA: transB, transB: true, m: k, n: m, k: n, a: b, b: dy, c: da, accumulate });
  }
  if (needB) {
    // dB̂ = Âᵀ·dY; stored as B̂ (transB: dB = dYᵀ·Â).
    if (!transB) kernels.sgemm({ transA: !transA, transB: false, m: k, n, k: m, a, b: dy, c: db, accumulate });
    else kernels.sgemm({ transA: true, transB: transA, m: n, n: k, k: m, a: dy, b: a, c: db, accumulate });
  }
}

const gemm: OpImpl = {
  forward(node, [aIn, bIn, cIn], ctx) {
    const a = need(node, aIn, 'input A'), b = need(node, bIn, 'input B');
    if (a.dims.length !== 2 || b.dims.length !== 2) throw new OpError(node, `expects 2-D A and B, got [${a.dims}] and [${b.dims}]`);
    const transA = intAttribute(node, 'transA', 0) === 1, transB = intAttribute(node, 'transB', 0) === 1;
    const alpha = floatAttribute(node, 'alpha', 1), beta = floatAttribute(node, 'beta', 1);
    const [m, k] = transA ? [a.dims[1], a.dims[0]] : a.dims;
    const [kb, n] = transB ? [b.dims[1], b.dims[0]] : b.dims;
    if (k !== kb) throw new OpError(node, `A is [${a.dims}] and B is [${b.dims}] (transA ${+transA}, transB ${+transB}): inner sizes ${k} and ${kb} differ`);
    const y = new Float32Array(m * n);
    matmul2d(ctx.kernels, a.data, b.data, m, k, n, transA, transB, y);
    if (alpha !== 1) for (let i = 0; i < y.length; i++) y[i] *= alpha;
    let cIndex: Int32Array | undefined;
    if (cIn && beta !== 0) {
      if (!broadcastDims(cIn.dims, [m, n])) throw new OpError(node, `C [${cIn.dims}] does not broadcast to [${m}, ${n}]`);
      cIndex = broadcastIndex(cIn.dims, [m, n]);
      for (let i = 0; i < y.length; i++) y[i] += beta * cIn.data[cIndex[i]];
    }
    return { y: { data: y, dims: [m, n] }, saved: { m, k, n, transA, transB, alpha, beta, cIndex } };
  },
  backward(node, [a, b, c], y, saved, dy, needs, ctx) {
    const s = saved as { m: number; k: number; n: number; transA: boolean; transB: boolean; alpha: number; beta: number; cIndex?: Int32Array };
    const g = s.alpha === 1 ? dy : dy.map((v) => v * s.alpha);
    const da = needs[0] ? new Float32Array(a!.data.length) : new Float32Array(0);
    const db = needs[1] ? new Float32Array(b!.data.length) : new Float32Array(0);
    matmul2dBackward(ctx.kernels, a!.data, b!.data, g, s.m, s.k, s.n, s.transA, s.transB, needs[0], needs[1], da, db, false);
    const grads: Array<Float32Array | undefined> = [needs[0] ? da : undefined, needs[1] ? db : undefined];
    if (needs[2] && c && s.cIndex) {
      const dc = unbroadcast(dy, s.cIndex, c.data.length);
      grads[2] = s.beta === 1 ? dc : dc.map((v) => v * s.beta);
    }
    return grads;
  },
};

const matMul: OpImpl = {
  forward(node, [aIn, bIn], ctx) {
    const a = need(node, aIn, 'input A'), b = need(node, bIn, 'input B');
    if (a.dims.length < 2 || b.dims.length < 2) throw new OpError(node, `expects inputs of rank ≥ 2, got [${a.dims}] and [${b.dims}]`);
    const k = a.dims[a.dims.length - 1];
    const [kb, n] = b.dims.slice(-2);
    if (k !== kb) throw new OpError(node, `A is [${a.dims}] and B is [${b.dims}]: inner sizes ${k} and ${kb} differ`);
    const lead = a.dims.slice(0, -1);
    if (b.dims.length === 2) {
      // Every leading dimension of A folds into M.
      const m = sizeOf(lead);
      const y = new Float32Array(m * n);
      matmul2d(ctx.kernels, a.data, b.data, m, k, n, false, false, y);
      return { y: { data: y, dims: [...lead, n] }, saved: { m, k, n, batches: 1 } };
    }
    if (a.dims.length !== b.dims.length || a.dims.slice(0, -2).some((d, i) => d !== b.dims[i])) {
      throw new OpError(node, `batched MatMul needs equal batch dimensions (A [${a.dims}], B [${b.dims}])`);
    }
    const m = a.dims[a.dims.length - 2];
    const batches = sizeOf(a.dims.slice(0, -2));
    const y = new Float32Array(batches * m * n);
    for (let i = 0; i < batches; i++) {
      matmul2d(ctx.kernels, a.data.subarray(i * m * k, (i + 1) * m * k), b.data.subarray(i * k * n, (i + 1) * k * n), m, k, n,
        false, false, y.subarray(i * m * n, (i + 1) * m * n));
    }
    return { y: { data: y, dims: [...lead, n] }, saved: { m, k, n, batches } };
  },
  backward(node, [a, b], y, saved, dy, needs, ctx) {
    const { m, k, n, batches } = saved as { m: number; k: number; n: number; batches: number };
    const da = needs[0] ? new Float32Array(a!.data.length) : new Float32Array(0);
    const db = needs[1] ? new Float32Array(b!.data.length) : new Float32Array(0);
    for (let i = 0; i < batches; i++) {
      const sa = a!.data.subarray(i * m * k, (i + 1) * m * k), sb = b!.data.subarray(i * k * n, (i + 1) * k * n);
      matmul2dBackward(ctx.kernels, sa, sb, dy.subarray(i * m * n, (i + 1) * m * n), m, k, n, false, false, needs[0], needs[1],
        needs[0] ? da.subarray(i * m * k, (i + 1) * m * k) : da, needs[1] ? db.subarray(i * k * n, (i + 1) * k * n) : db, false);
    }
    return [needs[0] ? da : undefined, needs[1] ? db : undefined];
  },
};

function binary(kind: 'Add' | 'Sub' | 'Mul'): OpImpl {
  return {
    forward(node, [aIn, bIn]) {
      const a = need(node, aIn, 'input A'), b = need(node, bIn, 'input B');
      const dims = broadcastDims(a.dims, b.dims);
      if (!dims) throw new OpError(node, `shapes [${a.dims}] and [${b.dims}] do not broadcast`);
      const ia = broadcastIndex(a.dims, dims), ib = broadcastIndex(b.dims, dims);
      const y = new Float32Array(sizeOf(dims));
      const A = a.data, B = b.data;
      if (kind === 'Add') for (let i = 0; i < y.length; i++) y[i] = A[ia[i]] + B[ib[i]];
      else if (kind === 'Sub') for (let i = 0; i < y.length; i++) y[i] = A[ia[i]] - B[ib[i]];
      else for (let i = 0; i < y.length; i++) y[i] = A[ia[i]] * B[ib[i]];
      return { y: { data: y, dims }, saved: { ia, ib } };
    },
    backward(node, [a, b], y, saved, dy, needs) {
      const { ia, ib } = saved as { ia: Int32Array; ib: Int32Array };
      const grads: Array<Float32Array | undefined> = [];
      if (kind === 'Mul') {
        if (needs[0]) grads[0] = unbroadcast(dy.map((d, i) => d * b!.data[ib[i]]), ia, a!.data.length);
        if (needs[1]) grads[1] = unbroadcast(dy.map((d, i) => d * a!.data[ia[i]]), ib, b!.data.length);
      } else {
        if (needs[0]) grads[0] = unbroadcast(dy, ia, a!.data.length);
        if (needs[1]) grads[1] = unbroadcast(kind === 'Sub' ? dy.map((d) => -d) : dy, ib, b!.data.length);
      }
      return grads;
    },
  };
}

/** y = f(x) element-wise on FloatKernels, with dy/dx from x; params gives the kernel's [alpha, beta]. */
function activation(kind: ActivationKind,
  params: (node: NodeProto, x: Array<Tensor | undefined>, opset: number) => [number, number] = () => [0, 0]): OpImpl {
  return {
    forward(node, x, ctx) {
      const input = need(node, x[0], 'input X');
      const p = params(node, x, ctx.opset);
      const y = new Float32Array(input.data.length);
      ctx.kernels.activationForward(kind, input.data, y, p[0], p[1]);
      return { y: { data: y, dims: input.dims }, saved: p };
    },
    backward(node, x, y, saved, dy, needs, ctx) {
      const p = saved as [number, number];
      const dx = new Float32Array(dy.length);
      ctx.kernels.activationBackward(kind, x[0]!.data, dy, dx, p[0], p[1]);
      return [dx];
    },
  };
}

const clipBounds = (node: NodeProto, x: Array<Tensor | undefined>, opset: number): [number, number] => opset >= 11
  ? [x[1]?.data[0] ?? -Infinity, x[2]?.data[0] ?? Infinity]
  : [floatAttribute(node, 'min', -Infinity), floatAttribute(node, 'max', Infinity)];

const relu = activation('relu');
const clip = activation('clip', clipBounds);
const hardSigmoid = activation('hardSigmoid', (node) => [floatAttribute(node, 'alpha', 0.2), floatAttribute(node, 'beta', 0.5)]);
const hardSwish = activation('hardSwish');

const identity: OpImpl = {
  forward(node, [x]) { return { y: need(node, x, 'input') }; },
  backward(node, x, y, saved, dy) { return [dy]; },
};

function reshapeTo(dims: (node: NodeProto, x: Array<Tensor | undefined>) => number[]): OpImpl {
  return {
    forward(node, x) {
      const input = need(node, x[0], 'input');
      const out = dims(node, x);
      if (sizeOf(out) !== input.data.length) throw new OpError(node, `cannot reshape [${input.dims}] to [${out}]`);
      return { y: { data: input.data, dims: out } };
    },
    backward(node, x, y, saved, dy) { return [dy]; },
  };
}

const flatten = reshapeTo((node, [x]) => {
  const axis = intAttribute(node, 'axis', 1);
  const a = axis < 0 ? axis + x!.dims.length : axis;
  return [sizeOf(x!.dims.slice(0, a)), sizeOf(x!.dims.slice(a))];
});

const reshape = reshapeTo((node, [x, shape]) => {
  if (!shape) throw new OpError(node, 'the target shape must be a constant (initializer or Constant node)');
  const allowZero = intAttribute(node, 'allowzero', 0) === 1;
  const out = Array.from(shape.data, (d, i) => (d === 0 && !allowZero ? x!.dims[i] : d));
  const known = out.reduce((a, d) => (d === -1 ? a : a * d), 1);
  return out.map((d) => (d === -1 ? x!.data.length / known : d));
});

/** Softmax over [outer, axis, inner] (opset < 13 flattens everything from `axis` on). */
function softmaxLayout(node: NodeProto, dims: number[], opset: number): [number, number, number] {
  const rank = dims.length;
  let axis = intAttribute(node, 'axis', opset >= 13 ? -1 : 1);
  if (axis < 0) axis += rank;
  if (opset < 13) return [sizeOf(dims.slice(0, axis)), sizeOf(dims.slice(axis)), 1];
  return [sizeOf(dims.slice(0, axis)), dims[axis], sizeOf(dims.slice(axis + 1))];
}

const softmax: OpImpl = {
  forward(node, [xIn], ctx) {
    const x = need(node, xIn, 'input');
    const [outer, len, inner] = softmaxLayout(node, x.dims, ctx.opset);
    const y = new Float32Array(x.data.length);
    for (let o = 0; o < outer; o++) {
      for (let i = 0; i < inner; i++) {
        const base = o * len * inner + i;
        let max = -Infinity;
        for (let j = 0; j < len; j++) max = Math.max(max, x.data[base + j * inner]);
        let sum = 0;
        for (let j = 0; j < len; j++) sum += (y[base + j * inner] = Math.exp(x.data[base + j * inner] - max));
        for (let j = 0; j < len; j++) y[base + j * inner] /= sum;
      }
    }
    return { y: { data: y, dims: x.dims } };
  },
  backward(node, x, y, saved, dy, needs, ctx) {
    const [outer, len, inner] = softmaxLayout(node, y.dims, ctx.opset);
    const dx = new Float32Array(dy.length);
    for (let o = 0; o < outer; o++) {
      for (let i = 0; i < inner; i++) {
        const base = o * len * inner + i;
        let dot = 0;
        for (let j = 0; j < len; j++) dot += dy[base + j * inner] * y.data[base + j * inner];
        for (let j = 0; j < len; j++) dx[base + j * inner] = y.data[base + j * inner] * (dy[base + j * inner] - dot);
      }
    }
    return [dx];
  },
};

const batchNormalization: OpImpl = {
  forward(node, [xIn, scale, bias, mean, variance], ctx) {
    const x = need(node, xIn, 'input X');
    const epsilon = floatAttribute(node, 'epsilon', 1e-5);
    const channels = x.dims[1];
    const batch = x.dims[0];
    const spatial = sizeOf(x.dims.slice(2));
    for (const [t, what] of [[scale, 'scale'], [bias, 'B'], [mean, 'input_mean'], [variance, 'input_var']] as const) {
      if (!t || t.data.length !== channels) throw new OpError(node, `${what} must have ${channels} values (one per channel)`);
    }
    const y = new Float32Array(x.data.length);
    if (!ctx.training) {
      for (let c = 0; c < channels; c++) {
        const gain = scale!.data[c] / Math.sqrt(variance!.data[c] + epsilon);
        const shift = bias!.data[c] - mean!.data[c] * gain;
        for (let n = 0; n < batch; n++) {
          const base = (n * channels + c) * spatial;
          for (let i = 0; i < spatial; i++) y[base + i] = x.data[base + i] * gain + shift;
        }
      }
      return { y: { data: y, dims: x.dims } };
    }
    const batchMean = new Float32Array(channels), batchVar = new Float32Array(channels), invStd = new Float32Array(channels);
    ctx.kernels.batchNormForward(x.data, batch, channels, spatial, scale!.data, bias!.data, epsilon, y, batchMean, batchVar, invStd);
    // Running statistics (the inference model's mean and variance): unbiased variance, ONNX momentum.
    const momentum = floatAttribute(node, 'momentum', 0.9);
    const count = batch * spatial;
    const unbias = count > 1 ? count / (count - 1) : 1;
    for (let c = 0; c < channels; c++) {
      mean!.data[c] = momentum * mean!.data[c] + (1 - momentum) * batchMean[c];
      variance!.data[c] = momentum * variance!.data[c] + (1 - momentum) * batchVar[c] * unbias;
    }
    return { y: { data: y, dims: x.dims }, saved: { batchMean, invStd, batch, channels, spatial } };
  },
  backward(node, [x, scale], y, saved, dy, needs, ctx) {
    if (!saved) throw new OpError(node, 'backward needs a training-mode forward pass');
    const s = saved as { batchMean: Float32Array; invStd: Float32Array; batch: number; channels: number; spatial: number };
    const dx = new Float32Array(dy.length), dGamma = new Float32Array(s.channels), dBeta = new Float32Array(s.channels);
    ctx.kernels.batchNormBackward(x!.data, dy, s.batch, s.channels, s.spatial, scale!.data, s.batchMean, s.invStd, dx, dGamma, dBeta);
    return [needs[0] ? dx : undefined, needs[1] ? dGamma : undefined, needs[2] ? dBeta : undefined];
  },
};

/** Whether the far-edge padding equals the near-edge padding on both axes. */
function symmetricPadding(node: NodeProto, g: ConvGeometry, kernelH: number, kernelW: number): boolean {
  const autoPad = attribute(node, 'auto_pad')?.s;
  const mode = autoPad ? new TextDecoder().decode(autoPad) : 'NOTSET';
  if (mode === 'SAME_UPPER' || mode === 'SAME_LOWER') {
    const total = (size: number, out: number, stride: number, extent: number) => Math.max(0, (out - 1) * stride + extent - size);
    return total(g.height, g.outH, g.strideH, g.dilationH * (kernelH - 1) + 1) % 2 === 0 &&
      total(g.width, g.outW, g.strideW, g.dilationW * (kernelW - 1) + 1) % 2 === 0;
  }
  const pads = intsAttribute(node, 'pads') ?? [0, 0, 0, 0];
  return pads[0] === pads[2] && pads[1] === pads[3];
}

function pool(kind: 'max' | 'average'): OpImpl {
  return {
    forward(node, [xIn], ctx) {
      const x = need(node, xIn, 'input X');
      const [kernelH, kernelW] = spatial2d(node, 'kernel_shape', 0);
      if (!kernelH || !kernelW) throw new OpError(node, 'kernel_shape is required');
      const g = windowGeometry(node, x.dims, kernelH, kernelW);
      const batch = x.dims[0];
      const y = new Float32Array(batch * g.channels * g.outH * g.outW);
      const countPad = intAttribute(node, 'count_include_pad', 0) === 1;
      if (countPad && kind === 'average' && !symmetricPadding(node, g, kernelH, kernelW)) {
        // The kernels count padding positions up to padTop/padLeft past the far edge.
        throw new OpError(node, 'count_include_pad = 1 with asymmetric padding is not supported');
      }
      let arg: Int32Array | undefined;
      if (kind === 'max') {
        arg = new Int32Array(y.length);
        ctx.kernels.maxPoolForward(x.data, batch, g, y, arg);
      } else {
        ctx.kernels.averagePoolForward(x.data, batch, g, countPad, y);
      }
      return { y: { data: y, dims: [batch, g.channels, g.outH, g.outW] }, saved: { g, arg, countPad } };
    },
    backward(node, [x], y, saved, dy, needs, ctx) {
      const { g, arg, countPad } = saved as { g: ConvGeometry; arg?: Int32Array; countPad: boolean };
      const dx = new Float32Array(x!.data.length);
      if (arg) ctx.kernels.maxPoolBackward(dy, arg, dx);
      else ctx.kernels.averagePoolBackward(dy, x!.dims[0], g, countPad, dx);
      return [dx];
    },
  };
}

const globalAveragePool: OpImpl = {
  forward(node, [xIn]) {
    const x = need(node, xIn, 'input X');
    if (x.dims.length < 3) throw new OpError(node, `expects an N×C×spatial input, got [${x.dims}]`);
    const planes = x.dims[0] * x.dims[1];
    const spatial = sizeOf(x.dims.slice(2));
    const y = new Float32Array(planes);
    for (let p = 0; p < planes; p++) {
      let s = 0;
      for (let i = 0; i < spatial; i++) s += x.data[p * spatial + i];
      y[p] = s / spatial;
    }
    return { y: { data: y, dims: [x.dims[0], x.dims[1], ...x.dims.slice(2).map(() => 1)] } };
  },
  backward(node, [x], y, saved, dy) {
    const spatial = x!.data.length / dy.length;
    const dx = new Float32Array(x!.data.length);
    for (let p = 0; p < dy.length; p++) dx.fill(dy[p] / spatial, p * spatial, (p + 1) * spatial);
    return [dx];
  },
};

/** The operators fine-tuning supports. Dropout is the identity: fine-tuning does not drop units. */
export const OPS: ReadonlyMap<string, OpImpl> = new Map<string, OpImpl>([
  ['Conv', conv], ['Gemm', gemm], ['MatMul', matMul],
  ['Add', binary('Add')], ['Sub', binary('Sub')], ['Mul', binary('Mul')],
  ['BatchNormalization', batchNormalization],
  ['Relu', relu], ['Clip', clip], ['HardSigmoid', hardSigmoid], ['HardSwish', hardSwish],
  ['MaxPool', pool('max')], ['AveragePool', pool('average')], ['GlobalAveragePool', globalAveragePool],
  ['Flatten', flatten], ['Reshape', reshape], ['Softmax', softmax], ['Identity', identity], ['Dropout', identity],
]);
