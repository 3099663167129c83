/**
 * Forward and backward of the ONNX operators the training engine supports.
 * Heavy work (Conv via im2col + SGEMM or, one filter per channel, the depthwise
 * kernels; Gemm/MatMul, BatchNormalization, the activations and pooling) goes
 * through FloatKernels; the remaining element-wise and layout work (Add/Sub/Mul/Div,
 * Pow, Sqrt, Sigmoid, ReduceMean, Softmax, Transpose, Slice, Concat, bias adds)
 * stays here. Shape and Cast compute shapes and carry no gradient. Every backward
 * returns the gradient of each input that needs one (same shape as the input).
 */
import type { NodeProto } from 'onnx-buf';

import { attribute, floatAttribute, intAttribute, intsAttribute, transposes } from '../onnx/graph';
import { fromFloat16Array, toFloat16Array } from '../float16';
import { nodeLabel } from '../onnx/passes/pass';
import type { ActivationKind, ConvGeometry, FloatKernels } from './kernels';
import { broadcastDims, broadcastIndex, expandTo, gather, reduceTo, scatter, sizeOf, stridesOf, unbroadcast, viewIndex, type Tensor } from './tensor';

export interface OpContext {
  kernels: FloatKernels;
  training: boolean;
  opset: number;
  /** BatchNormalization normalises with (and keeps) its running statistics even in training. */
  frozenBatchNorm?: boolean;
  /** Div nodes of integer tensors (computed shapes), which truncate toward zero as onnxruntime's do. */
  integerDivisions?: ReadonlySet<NodeProto>;
  /** The samples in the batch (the model input's first dimension), for messages. */
  samples?: number;
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

/** The most float32 values one array of a training step holds (4 GiB): more is a geometry or batch-size mistake. */
const MAX_STEP_VALUES = 2 ** 30;

/** A step's array, refused by name when a layer's geometry or the batch would make it absurdly large. */
function stepArray(node: NodeProto, values: number, what: string, ctx: OpContext): Float32Array {
  if (values > MAX_STEP_VALUES) throw new OpSizeError(node, what, values, ctx.samples);
  return new Float32Array(values);
}

export class OpError extends Error {
  /** The node, named as nodeLabel names it. */
  readonly node: string;
  constructor(node: NodeProto, message: string) {
    super(`${node.opType} node '${node.name || node.output[0]}': ${message}`);
    this.name = 'OpError';
    this.node = nodeLabel(node);  // as TrainingError.layer names nodes elsewhere
  }
}

/** A layer whose output (or im2col buffer) for the batch would be larger than a training step allocates. */
export class OpSizeError extends OpError {
  constructor(node: NodeProto, what: string, values: number, samples: number | undefined) {
    const check = node.opType === 'Conv' || node.opType.endsWith('Pool') ? "check the layer's pads, strides and dilations" : 'check its input shapes';
    super(node, `its ${what} would hold ${values} values${samples === undefined ? '' : ` for a batch of ${samples}`}, more than a training step ` +
      `allocates at once (2^30 float32 values, 4 GiB): ${samples === undefined || samples > 1 ? 'lower batchSize, or ' : ''}${check}`);
    this.name = 'OpSizeError';
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
  if ((node.opType === 'MaxPool' || node.opType === 'AveragePool') && (Math.max(pads[0], pads[2]) >= kernelH || Math.max(pads[1], pads[3]) >= kernelW)) {
    // Windows wholly in the padding would have no value to take (onnxruntime refuses such a model too).
    throw new OpError(node, `pads [${pads.join(', ')}] must be smaller than the ${kernelH}×${kernelW} kernel`);
  }
  return { channels, height, width, kernelH, kernelW, padTop: h.padBegin, padLeft: w.padBegin, strideH, strideW,
    dilationH, dilationW, outH: h.out, outW: w.out };
}

const conv: OpImpl = {
  forward(node, [xIn, wIn, bIn], ctx) {
    const x = need(node, xIn, 'input X'), w = need(node, wIn, 'weight W');
    if (w.dims.length !== 4) throw new OpError(node, `only 2-D convolution is supported (weight [${w.dims.join(', ')}])`);
    const group = intAttribute(node, 'group', 1);
    const [outChannels, groupChannels, kernelH, kernelW] = w.dims;
    const kernelShape = intsAttribute(node, 'kernel_shape');
    if (kernelShape && (kernelShape.length !== 2 || kernelShape[0] !== kernelH || kernelShape[1] !== kernelW)) {
      throw new OpError(node, `attribute kernel_shape [${kernelShape.join(', ')}] disagrees with the weight's kernel [${kernelH}, ${kernelW}] (onnxruntime refuses it too)`);
    }
    const g = windowGeometry(node, x.dims, kernelH, kernelW);
    if (g.channels !== groupChannels * group || outChannels % group !== 0) {
      throw new OpError(node, `input has ${g.channels} channels; weight [${w.dims.join(', ')}] with group ${group} expects ${groupChannels * group}`);
    }
    const batch = x.dims[0];
    const rows = groupChannels * kernelH * kernelW;
    const pixels = g.outH * g.outW;
    const perGroupOut = outChannels / group;
    const y = stepArray(node, batch * outChannels * pixels, 'output', ctx);
    // One filter per channel: direct loops (im2col + per-channel SGEMM calls would cost many times more).
    let col: Float32Array | undefined;
    if (groupChannels === 1 && perGroupOut === 1) ctx.kernels.depthwiseConvForward(x.data, w.data, batch, g, y);
    else {
      col = stepArray(node, batch * g.channels * kernelH * kernelW * pixels, 'im2col buffer', ctx);
      ctx.kernels.im2col(x.data, batch, g, col);
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
    const { col, g, group } = saved as { col?: Float32Array; g: ConvGeometry; group: number };
    const [outChannels, , kernelH, kernelW] = w!.dims;
    const batch = x!.dims[0];
    const rows = (g.channels / group) * kernelH * kernelW;
    const pixels = g.outH * g.outW;
    const perGroupOut = outChannels / group;
    const grads: Array<Float32Array | undefined> = [];
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
    if (!col) { // depthwise
      if (needs[1]) ctx.kernels.depthwiseConvBackwardWeight(dy, x!.data, batch, g, grads[1] = new Float32Array(w!.data.length));
      if (needs[0]) ctx.kernels.depthwiseConvBackwardInput(dy, w!.data, batch, g, grads[0] = new Float32Array(x!.data.length));
      return grads;
    }
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
    const transA = transposes(node, 'transA'), transB = transposes(node, 'transB');
    const alpha = floatAttribute(node, 'alpha', 1), beta = floatAttribute(node, 'beta', 1);
    const [m, k] = transA ? [a.dims[1], a.dims[0]] : a.dims;
    const [kb, n] = transB ? [b.dims[1], b.dims[0]] : b.dims;
    if (k !== kb) throw new OpError(node, `A is [${a.dims}] and B is [${b.dims}] (transA ${+transA}, transB ${+transB}): inner sizes ${k} and ${kb} differ`);
    const y = stepArray(node, m * n, 'output', ctx);
    matmul2d(ctx.kernels, a.data, b.data, m, k, n, transA, transB, y);
    if (alpha !== 1) for (let i = 0; i < y.length; i++) y[i] *= alpha;
    let cIndex: Int32Array | undefined;
    if (cIn && beta !== 0) {
      // One-way: C takes the output's shape, never the other way round.
      const fits = cIn.dims.length <= 2 && cIn.dims.every((d, i) => d === 1 || d === [m, n][2 - cIn.dims.length + i]);
      if (!fits) throw new OpError(node, `C [${cIn.dims}] does not broadcast to [${m}, ${n}]`);
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
      const y = stepArray(node, m * n, 'output', ctx);
      matmul2d(ctx.kernels, a.data, b.data, m, k, n, false, false, y);
      return { y: { data: y, dims: [...lead, n] }, saved: { m, k, n, batches: 1 } };
    }
    if (a.dims.length !== b.dims.length || a.dims.slice(0, -2).some((d, i) => d !== b.dims[i])) {
      throw new OpError(node, `batched MatMul needs equal batch dimensions (A [${a.dims}], B [${b.dims}])`);
    }
    const m = a.dims[a.dims.length - 2];
    const batches = sizeOf(a.dims.slice(0, -2));
    const y = stepArray(node, batches * m * n, 'output', ctx);
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

function binary(kind: 'Add' | 'Sub' | 'Mul' | 'Div'): OpImpl {
  return {
    forward(node, [aIn, bIn], ctx) {
      const a = need(node, aIn, 'input A'), b = need(node, bIn, 'input B');
      const dims = broadcastDims(a.dims, b.dims);
      if (!dims) throw new OpError(node, `shapes [${a.dims}] and [${b.dims}] do not broadcast`);
      const A = expandTo(a.data, a.dims, dims), B = expandTo(b.data, b.dims, dims);
      const y = new Float32Array(A.length);
      if (kind === 'Add') for (let i = 0; i < y.length; i++) y[i] = A[i] + B[i];
      else if (kind === 'Sub') for (let i = 0; i < y.length; i++) y[i] = A[i] - B[i];
      else if (kind === 'Mul') for (let i = 0; i < y.length; i++) y[i] = A[i] * B[i];
      else if (ctx.integerDivisions?.has(node)) for (let i = 0; i < y.length; i++) y[i] = Math.trunc(A[i] / B[i]);
      else for (let i = 0; i < y.length; i++) y[i] = A[i] / B[i];
      return { y: { data: y, dims } };
    },
    backward(node, [a, b], y, saved, dy, needs) {
      const grads: Array<Float32Array | undefined> = [];
      const operand = (t: Tensor) => expandTo(t.data, t.dims, y.dims);
      let da: Float32Array | undefined, db: Float32Array | undefined;
      if (kind === 'Mul') {
        if (needs[0]) { const B = operand(b!); da = new Float32Array(dy.length); for (let i = 0; i < dy.length; i++) da[i] = dy[i] * B[i]; }
        if (needs[1]) { const A = operand(a!); db = new Float32Array(dy.length); for (let i = 0; i < dy.length; i++) db[i] = dy[i] * A[i]; }
      } else if (kind === 'Div') {
        // d(a/b)/da = 1/b; d(a/b)/db = -y/b.
        const B = operand(b!);
        if (needs[0]) { da = new Float32Array(dy.length); for (let i = 0; i < dy.length; i++) da[i] = dy[i] / B[i]; }
        if (needs[1]) { db = new Float32Array(dy.length); for (let i = 0; i < dy.length; i++) db[i] = -dy[i] * y.data[i] / B[i]; }
      } else {
        if (needs[0]) da = dy;
        if (needs[1]) db = kind === 'Sub' ? dy.map((d) => -d) : dy;
      }
      if (da) grads[0] = reduceTo(da, a!.dims, y.dims);
      if (db) grads[1] = reduceTo(db, b!.dims, y.dims);
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

function reshapeTo(dims: (node: NodeProto, x: Array<Tensor | undefined>, opset: number) => number[]): OpImpl {
  return {
    forward(node, x, ctx) {
      const input = need(node, x[0], 'input');
      const out = dims(node, x, ctx.opset);
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

/** Axes from an attribute (older opsets) or an input, normalised to [0, rank). */
function axesOf(node: NodeProto, x: Array<Tensor | undefined>, inputIndex: number, fromInput: boolean, rank: number): number[] | undefined {
  const raw = fromInput ? (x[inputIndex] ? Array.from(x[inputIndex]!.data) : undefined) : intsAttribute(node, 'axes');
  if (!raw) return undefined;
  return raw.map((a) => {
    const axis = a < 0 ? a + rank : a;
    if (!(axis >= 0 && axis < rank)) throw new OpError(node, `axis ${a} is out of range for rank ${rank}`);
    return axis;
  });
}

const squeeze = reshapeTo((node, x, opset) => {
  const dims = x[0]!.dims;
  const axes = axesOf(node, x, 1, opset >= 13, dims.length) ?? dims.flatMap((d, i) => (d === 1 ? [i] : []));
  for (const a of axes) if (dims[a] !== 1) throw new OpError(node, `cannot squeeze axis ${a} of size ${dims[a]}`);
  return dims.filter((_, i) => !axes.includes(i));
});

const unsqueeze = reshapeTo((node, x, opset) => {
  const dims = x[0]!.dims;
  const raw = opset >= 13 ? Array.from(x[1]?.data ?? []) : intsAttribute(node, 'axes') ?? [];
  const rank = dims.length + raw.length;
  const axes = raw.map((a) => (a < 0 ? a + rank : a));
  const out: number[] = [];
  for (let i = 0, k = 0; i < rank; i++) out.push(axes.includes(i) ? 1 : dims[k++]);
  return out;
});

/** An op whose output is a view of its input (y[i] = x[index[i]]); backward scatters dy through the same index. */
function viewOp(view: (node: NodeProto, x: Array<Tensor | undefined>, opset: number) => { dims: number[]; index: Int32Array }): OpImpl {
  return {
    forward(node, x, ctx) {
      const input = need(node, x[0], 'input');
      const { dims, index } = view(node, x, ctx.opset);
      return { y: { data: gather(input.data, index), dims }, saved: index };
    },
    backward(node, x, y, saved, dy) {
      return [scatter(dy, saved as Int32Array, x[0]!.data.length)];
    },
  };
}

const transpose = viewOp((node, [x]) => {
  const rank = x!.dims.length;
  const perm = intsAttribute(node, 'perm') ?? Array.from({ length: rank }, (_, i) => rank - 1 - i);
  if (perm.length !== rank || [...perm].sort().some((p, i) => p !== i)) throw new OpError(node, `perm [${perm}] is not a permutation of ${rank} axes`);
  const strides = stridesOf(x!.dims);
  const dims = perm.map((p) => x!.dims[p]);
  return { dims, index: viewIndex(dims, perm.map((p) => strides[p])) };
});

const slice = viewOp((node, x, opset) => {
  const dims = x[0]!.dims;
  const rank = dims.length;
  const list = (i: number, attr: string) => (opset >= 10 ? (x[i] ? Array.from(x[i]!.data) : undefined) : intsAttribute(node, attr));
  const starts = list(1, 'starts'), ends = list(2, 'ends');
  if (!starts || !ends || starts.length !== ends.length) throw new OpError(node, 'needs starts and ends of equal length');
  const axes = axesOf(node, x, 3, opset >= 10, rank) ?? starts.map((_, i) => i);
  const steps = (opset >= 10 && x[4] ? Array.from(x[4].data) : undefined) ?? starts.map(() => 1);
  const begin = new Array<number>(rank).fill(0), step = new Array<number>(rank).fill(1), out = [...dims];
  axes.forEach((a, i) => {
    const d = dims[a], st = steps[i];
    if (st === 0) throw new OpError(node, 'a step of 0');
    const clamp = (v: number, lo: number, hi: number) => Math.min(hi, Math.max(lo, v < 0 ? v + d : v));
    const b = st > 0 ? clamp(starts[i], 0, d) : clamp(starts[i], 0, d - 1);
    const e = st > 0 ? clamp(ends[i], 0, d) : clamp(ends[i], -1, d - 1);
    begin[a] = b;
    step[a] = st;
    out[a] = Math.max(0, Math.ceil((e - b) / st));
  });
  const strides = stridesOf(dims);
  return { dims: out, index: viewIndex(out, strides.map((s, a) => s * step[a]), begin.reduce((o, b, a) => o + b * strides[a], 0)) };
});

const concat: OpImpl = {
  forward(node, x) {
    const parts = x.map((t, i) => need(node, t, `input ${i}`));
    const rank = parts[0].dims.length;
    const axisAttr = intAttribute(node, 'axis', 0);
    const axis = axisAttr < 0 ? axisAttr + rank : axisAttr;
    const dims = [...parts[0].dims];
    dims[axis] = 0;
    for (const p of parts) {
      if (p.dims.length !== rank || p.dims.some((d, i) => i !== axis && d !== parts[0].dims[i])) {
        throw new OpError(node, `inputs [${parts.map((q) => `[${q.dims}]`).join(', ')}] differ outside axis ${axis}`);
      }
      dims[axis] += p.dims[axis];
    }
    const outer = sizeOf(dims.slice(0, axis));
    const y = new Float32Array(sizeOf(dims));
    const rows = parts.map((p) => sizeOf(p.dims.slice(axis)));
    const row = sizeOf(dims.slice(axis));
    for (let o = 0; o < outer; o++) {
      let at = o * row;
      parts.forEach((p, k) => {
        y.set(p.data.subarray(o * rows[k], (o + 1) * rows[k]), at);
        at += rows[k];
      });
    }
    return { y: { data: y, dims }, saved: { outer, rows, row } };
  },
  backward(node, x, y, saved, dy, needs) {
    const { outer, rows, row } = saved as { outer: number; rows: number[]; row: number };
    let offset = 0;
    return rows.map((r, k) => {
      const start = offset;
      offset += r;
      if (!needs[k]) return undefined;
      const dx = new Float32Array(outer * r);
      for (let o = 0; o < outer; o++) dx.set(dy.subarray(o * row + start, o * row + start + r), o * r);
      return dx;
    });
  },
};

const reduceMean: OpImpl = {
  forward(node, x, ctx) {
    const input = need(node, x[0], 'input');
    const rank = input.dims.length;
    const given = axesOf(node, x, 1, ctx.opset >= 18, rank);
    // No axes: every axis, or none (identity) with opset 18's noop_with_empty_axes.
    const noop = ctx.opset >= 18 && intAttribute(node, 'noop_with_empty_axes', 0) === 1;
    const axes = given && given.length > 0 ? given : noop ? [] : input.dims.map((_, i) => i);
    const kept = input.dims.map((d, i) => (axes.includes(i) ? 1 : d));
    const index = broadcastIndex(kept, input.dims);
    const count = input.data.length / sizeOf(kept);
    const sum = new Float64Array(sizeOf(kept));
    for (let i = 0; i < index.length; i++) sum[index[i]] += input.data[i];
    const keepDims = intAttribute(node, 'keepdims', 1) === 1;
    return { y: { data: Float32Array.from(sum, (v) => v / count), dims: keepDims ? kept : input.dims.filter((_, i) => !axes.includes(i)) }, saved: { index, count } };
  },
  backward(node, x, y, saved, dy) {
    const { index, count } = saved as { index: Int32Array; count: number };
    const dx = new Float32Array(index.length);
    for (let i = 0; i < dx.length; i++) dx[i] = dy[index[i]] / count;
    return [dx];
  },
};

/** An element-wise op with dy/dx from x and y. */
function elementwise(f: (x: number) => number, derivative: (x: number, y: number) => number): OpImpl {
  return {
    forward(node, [x]) {
      const input = need(node, x, 'input');
      return { y: { data: input.data.map(f), dims: input.dims } };
    },
    backward(node, [x], y, saved, dy) {
      return [dy.map((d, i) => d * derivative(x!.data[i], y.data[i]))];
    },
  };
}

const sqrt = elementwise(Math.sqrt, (x, y) => 0.5 / y);
const sigmoid = elementwise((x) => 1 / (1 + Math.exp(-x)), (x, y) => y * (1 - y));

const pow: OpImpl = {
  forward(node, [xIn, pIn]) {
    const x = need(node, xIn, 'input X'), p = need(node, pIn, 'exponent Y');
    if (p.data.length !== 1) throw new OpError(node, `only a scalar exponent is supported, got [${p.dims}]`);
    const e = p.data[0];
    return { y: { data: x.data.map((v) => v ** e), dims: x.dims }, saved: e };
  },
  backward(node, [x], y, saved, dy, needs) {
    if (needs[1]) throw new OpError(node, 'the exponent must be a constant');
    const e = saved as number;
    return [dy.map((d, i) => d * e * x!.data[i] ** (e - 1))];
  },
};

/** Shapes are computed, not trained: Shape and Cast carry no gradient into integer values. */
const shape: OpImpl = {
  forward(node, [x]) {
    const dims = need(node, x, 'input').dims;
    const rank = dims.length;
    const at = (v: number) => Math.min(rank, Math.max(0, v < 0 ? v + rank : v));
    const start = at(intAttribute(node, 'start', 0)), end = at(intAttribute(node, 'end', rank));
    const out = dims.slice(start, end);
    return { y: { data: Float32Array.from(out), dims: [out.length] } };
  },
  backward() { return []; },
};

const FLOAT_TYPES = new Set([1, 10, 11, 16]); // FLOAT, FLOAT16, DOUBLE, BFLOAT16

/** x rounded to bfloat16 (the top 16 bits of a float32), to nearest even as onnxruntime's Cast does; NaN stays NaN. */
function roundToBfloat16(x: Float32Array): Float32Array {
  const y = new Float32Array(x);
  const bits = new Uint32Array(y.buffer);
  for (let i = 0; i < bits.length; i++) {
    const b = bits[i];
    if ((b & 0x7f800000) === 0x7f800000) continue;  // ±Infinity and NaN as they are
    bits[i] = ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) << 16;
  }
  return y;
}

const cast: OpImpl = {
  forward(node, [x]) {
    const input = need(node, x, 'input');
    const to = intAttribute(node, 'to', 1);
    // The engine computes in float32: a cast to a narrower float rounds the values as it (gradients pass straight through).
    if (to === 10) return { y: { data: fromFloat16Array(toFloat16Array(input.data)), dims: input.dims } };
    if (to === 16) return { y: { data: roundToBfloat16(input.data), dims: input.dims } };
    if (FLOAT_TYPES.has(to)) return { y: input };
    if (to === 9) return { y: { data: input.data.map((v) => (v !== 0 ? 1 : 0)), dims: input.dims } };
    return { y: { data: input.data.map(Math.trunc), dims: input.dims } };
  },
  backward(node, x, y, saved, dy) {
    return FLOAT_TYPES.has(intAttribute(node, 'to', 1)) ? [dy] : [];
  },
};

/** Softmax over [outer, axis, inner] (opset < 13 flattens everything from `axis` on). */
export function softmaxLayout(node: NodeProto, dims: number[], opset: number): [number, number, number] {
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
    if (!ctx.training || ctx.frozenBatchNorm) {
      const invStd = new Float32Array(channels);
      for (let c = 0; c < channels; c++) {
        invStd[c] = 1 / Math.sqrt(variance!.data[c] + epsilon);
        const gain = scale!.data[c] / Math.sqrt(variance!.data[c] + epsilon);
        const shift = bias!.data[c] - mean!.data[c] * gain;
        for (let n = 0; n < batch; n++) {
          const base = (n * channels + c) * spatial;
          for (let i = 0; i < spatial; i++) y[base + i] = x.data[base + i] * gain + shift;
        }
      }
      return { y: { data: y, dims: x.dims }, saved: { frozen: true, batchMean: Float32Array.from(mean!.data), invStd, batch, channels, spatial } };
    }
    const count = batch * spatial;
    if (count === 1) {
      // The batch's variance is 0: the output is β and no gradient passes (PyTorch refuses this too).
      throw new OpError(node, 'a batch of 1 sample gives one value per channel, so no batch statistics: train with batches of 2 or more samples');
    }
    const batchMean = new Float32Array(channels), batchVar = new Float32Array(channels), invStd = new Float32Array(channels);
    ctx.kernels.batchNormForward(x.data, batch, channels, spatial, scale!.data, bias!.data, epsilon, y, batchMean, batchVar, invStd);
    // Running statistics (the inference model's mean and variance): unbiased variance, ONNX momentum.
    const momentum = floatAttribute(node, 'momentum', 0.9);
    const unbias = count / (count - 1);
    for (let c = 0; c < channels; c++) {
      mean!.data[c] = momentum * mean!.data[c] + (1 - momentum) * batchMean[c];
      variance!.data[c] = momentum * variance!.data[c] + (1 - momentum) * batchVar[c] * unbias;
    }
    return { y: { data: y, dims: x.dims }, saved: { batchMean, invStd, batch, channels, spatial } };
  },
  backward(node, [x, scale], y, saved, dy, needs, ctx) {
    if (!saved) throw new OpError(node, 'backward needs a training-mode forward pass');
    const s = saved as { frozen?: boolean; batchMean: Float32Array; invStd: Float32Array; batch: number; channels: number; spatial: number };
    const dx = new Float32Array(dy.length), dGamma = new Float32Array(s.channels), dBeta = new Float32Array(s.channels);
    if (s.frozen) {
      // y = γ·(x − μ)·invStd + β with μ, invStd constants: an affine map per channel.
      for (let c = 0; c < s.channels; c++) {
        const gain = scale!.data[c] * s.invStd[c];
        let sumDy = 0, sumDyHat = 0;
        for (let n = 0; n < s.batch; n++) {
          const base = (n * s.channels + c) * s.spatial;
          for (let i = base; i < base + s.spatial; i++) {
            dx[i] = dy[i] * gain;
            sumDy += dy[i];
            sumDyHat += dy[i] * (x!.data[i] - s.batchMean[c]) * s.invStd[c];
          }
        }
        dGamma[c] = sumDyHat;
        dBeta[c] = sumDy;
      }
      return [needs[0] ? dx : undefined, needs[1] ? dGamma : undefined, needs[2] ? dBeta : undefined];
    }
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
      const y = stepArray(node, batch * g.channels * g.outH * g.outW, 'output', ctx);
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
  ['Add', binary('Add')], ['Sub', binary('Sub')], ['Mul', binary('Mul')], ['Div', binary('Div')],
  ['Pow', pow], ['Sqrt', sqrt], ['Sigmoid', sigmoid], ['ReduceMean', reduceMean],
  ['Transpose', transpose], ['Concat', concat], ['Slice', slice], ['Squeeze', squeeze], ['Unsqueeze', unsqueeze],
  ['Shape', shape], ['Cast', cast],
  ['BatchNormalization', batchNormalization],
  ['Relu', relu], ['Clip', clip], ['HardSigmoid', hardSigmoid], ['HardSwish', hardSwish],
  ['MaxPool', pool('max')], ['AveragePool', pool('average')], ['GlobalAveragePool', globalAveragePool],
  ['Flatten', flatten], ['Reshape', reshape], ['Softmax', softmax], ['Identity', identity], ['Dropout', identity],
]);
