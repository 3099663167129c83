/**
 * The float32 kernels the training engine spends its time in, behind one
 * interface with two implementations: `referenceKernels` (plain TypeScript,
 * the readable definition every test compares against) and `nativeKernels()`
 * (the addon: SGEMM with AVX-512/AVX2 FMA or scalar, im2col/col2im, the
 * BatchNormalization loops, activations and pooling on the native thread pool).
 * Apart from SGEMM and BatchNormalization (which sum in other orders), native
 * results equal the reference bit for bit (NaN payloads aside).
 *
 * Layouts are row-major and NCHW. Every kernel writes all of its output
 * (no reliance on zeroed memory) unless it says "adds".
 */

import { checkKernel, cpuInfo } from '../cpu';
import { native } from '../native';
import { checkInteger, overlaps } from '../validate';
import { roundHalfToEven } from '../quant-params';

export interface SgemmArgs {
  transA: boolean;
  transB: boolean;
  m: number;
  n: number;
  k: number;
  /** op(A) is [m, k]: A is [m, k] (lda = k) or, transposed, [k, m] (lda = m). */
  a: Float32Array;
  /** op(B) is [k, n]: B is [k, n] (ldb = n) or, transposed, [n, k] (ldb = k). */
  b: Float32Array;
  /** [m, n]. */
  c: Float32Array;
  /** C = op(A)·op(B) + (accumulate ? C : 0). */
  accumulate: boolean;
}

export interface ConvGeometry {
  channels: number;
  height: number;
  width: number;
  kernelH: number;
  kernelW: number;
  padTop: number;
  padLeft: number;
  strideH: number;
  strideW: number;
  dilationH: number;
  dilationW: number;
  outH: number;
  outW: number;
}

/**
 * Element-wise activations. alpha/beta: clip's min and max (may be ±Infinity),
 * hardSigmoid's slope and offset; relu and hardSwish ignore them.
 */
export type ActivationKind = 'relu' | 'clip' | 'hardSigmoid' | 'hardSwish';

export interface FloatKernels {
  readonly name: string;
  sgemm(args: SgemmArgs): void;
  /**
   * x: [batch, channels, height, width] → col: [batch, channels·kernelH·kernelW, outH·outW]
   * (row index (c·kernelH + ky)·kernelW + kx); padding reads as 0.
   */
  im2col(x: Float32Array, batch: number, g: ConvGeometry, col: Float32Array): void;
  /** The adjoint of im2col: dx [batch, channels, height, width] is overwritten with the sum of col's entries. */
  col2im(col: Float32Array, batch: number, g: ConvGeometry, dx: Float32Array): void;
  /**
   * Training-mode BatchNormalization over x [batch, channels, spatial]: per channel the
   * batch mean and biased variance; y = gamma·(x - mean)·invStd + beta; mean/invStd
   * ([channels]) are written for the backward pass and the running statistics.
   * variance ([channels]) receives the biased batch variance.
   */
  batchNormForward(x: Float32Array, batch: number, channels: number, spatial: number, gamma: Float32Array,
    beta: Float32Array, epsilon: number, y: Float32Array, mean: Float32Array, variance: Float32Array,
    invStd: Float32Array): void;
  /**
   * Backward of batchNormForward: dx is overwritten; dGamma and dBeta are overwritten
   * with Σ dy·x̂ and Σ dy per channel (x̂ = (x - mean)·invStd).
   */
  batchNormBackward(x: Float32Array, dy: Float32Array, batch: number, channels: number, spatial: number,
    gamma: Float32Array, mean: Float32Array, invStd: Float32Array, dx: Float32Array, dGamma: Float32Array,
    dBeta: Float32Array): void;
  /**
   * y = f(x) element-wise, computed in float64 and rounded to float32 (JavaScript number semantics, so Math.min/max's
   * NaN and ±0 rules): relu x > 0 ? x : 0; clip min(beta, max(alpha, x)); hardSigmoid max(0, min(1, alpha·x + beta));
   * hardSwish x·max(0, min(1, x/6 + 1/2)).
   */
  activationForward(kind: ActivationKind, x: Float32Array, y: Float32Array, alpha: number, beta: number): void;
  /**
   * dx = dy·f'(x): relu x > 0; clip alpha < x < beta; hardSigmoid alpha where 0 < alpha·x + beta < 1;
   * hardSwish 0 (x ≤ -3), 1 (x ≥ 3), else x/3 + 1/2. The product is taken everywhere (NaN dy stays NaN).
   */
  activationBackward(kind: ActivationKind, x: Float32Array, dy: Float32Array, dx: Float32Array, alpha: number,
    beta: number): void;
  /**
   * Windows as im2col's (positions outside the image are skipped; outH/outW may let windows run past the
   * bottom/right edge, as ceil_mode does). x: [batch, channels, height, width] → y: [batch, channels, outH, outW],
   * argmax: the index into x of the first maximum in (ky, kx) scan order (the first in-image value is taken even
   * when NaN; a NaN is never replaced); a window with no in-image position gives -Infinity and -1.
   */
  maxPoolForward(x: Float32Array, batch: number, g: ConvGeometry, y: Float32Array, argmax: Int32Array): void;
  /** dx is overwritten: zero, then dx[argmax[i]] += dy[i] in order i (argmax -1 skipped; others must be < dx.length). */
  maxPoolBackward(dy: Float32Array, argmax: Int32Array, dx: Float32Array): void;
  /**
   * y = (window sum) / divisor: the number of in-image positions, or with countIncludePad the positions above row
   * height + padTop and left of column width + padLeft (explicit padding counts; windows running past it do not).
   */
  averagePoolForward(x: Float32Array, batch: number, g: ConvGeometry, countIncludePad: boolean, y: Float32Array): void;
  /** dx is overwritten: each window adds dy/divisor to its in-image positions, in (image, channel, oy, ox, ky, kx) order. */
  averagePoolBackward(dy: Float32Array, batch: number, g: ConvGeometry, countIncludePad: boolean, dx: Float32Array): void;
  /**
   * Depthwise convolution (one filter per channel; w [channels, kernelH·kernelW]), windows as im2col's:
   * y = Σ w·x over in-image taps, summed in float32 in (ky, kx) order from 0.
   */
  depthwiseConvForward(x: Float32Array, w: Float32Array, batch: number, g: ConvGeometry, y: Float32Array): void;
  /** dx is overwritten: for each tap in (ky, kx) order, then (oy, ox), dx += w·dy in float32. */
  depthwiseConvBackwardInput(dy: Float32Array, w: Float32Array, batch: number, g: ConvGeometry, dx: Float32Array): void;
  /** dw is overwritten: per channel and tap, Σ dy·x over (image, oy, ox) in that order, in float64. */
  depthwiseConvBackwardWeight(dy: Float32Array, x: Float32Array, batch: number, g: ConvGeometry, dw: Float32Array): void;
  /**
   * GPTQ's factorization (methods/gptq.ts): U with H⁻¹ = UᵀU (upper triangular, zero below the diagonal) for a
   * symmetric positive definite h [n, n] (row-major), written to u; false (u unspecified) when h is not positive
   * definite. H = V·Vᵀ with V upper (Cholesky from the last row up), then U = V⁻¹; every dot product sums four
   * partial sums, ((s0 + s1) + s2) + s3. Bit-identical across kernels: GPTQ's integers depend on every bit of U.
   */
  upperFactorOfInverse(h: Float64Array, n: number, u: Float64Array): boolean;
  /**
   * GPTQ's rounding of columns [b0, b1) of a chunk (methods/gptq.ts), row by row: w [rows, n] (columns in rounding
   * order, changed in place), u the factor above. For row r and column a, with g = group[r·width + a − b0] (width =
   * b1 − b0) and parameters s = scale[g] (not > 0: the element is left alone, its error 0), z, qmin, qmax:
   * q = clamp(roundHalfToEven(w/s) + z, qmin, qmax), e = (w − (q − z)·s) / U_aa, then w_c −= e·U_ac for the later
   * columns c < b1 of the block; all in float64, w stored as float32. Writes q to values and e (float32) to errors
   * ([rows, width]); a NaN q (NaN weights or factor) is stored as 0. Bit-identical across kernels (NaN payloads aside).
   */
  gptqRoundBlock(w: Float32Array, rows: number, n: number, u: Float64Array, b0: number, b1: number, group: Int32Array,
    params: GptqGroupParams, values: Int32Array, errors: Float32Array): void;
}

/** Per parameter group of a quantized tensor: its scale, zero point and integer range (gptqRoundBlock). */
export interface GptqGroupParams {
  scale: Float32Array;
  zeroPoint: Int32Array;
  qmin: Int32Array;
  qmax: Int32Array;
}

// ---------------------------------------------------------------------------
// Implementations


function needLength(name: string, v: Float32Array | Int32Array | Float64Array, want: number, formula: string): void {
  if (v.length !== want) throw new RangeError(`${name}.length must be ${formula} = ${want} (got ${v.length})`);
}

function checkGeometry(x: Float32Array, batch: number, g: ConvGeometry, col: Float32Array, xName: string, colName: string): void {
  checkWindowGeometry(g);
  needLength(xName, x, batch * g.channels * g.height * g.width, 'batch * channels * height * width');
  needLength(colName, col, batch * g.channels * g.kernelH * g.kernelW * g.outH * g.outW,
    'batch * channels * kernelH * kernelW * outH * outW');
}

function checkWindowGeometry(g: ConvGeometry): void {
  for (const key of ['channels', 'height', 'width', 'kernelH', 'kernelW', 'padTop', 'padLeft', 'outH', 'outW'] as const) {
    checkInteger(`geometry.${key}`, g[key], 0, 2 ** 31 - 1);
  }
  for (const key of ['strideH', 'strideW', 'dilationH', 'dilationW'] as const) checkInteger(`geometry.${key}`, g[key], 1, 2 ** 31 - 1);
}

function checkPoolLengths(batch: number, g: ConvGeometry, image: Float32Array, pooled: Float32Array | Int32Array,
  imageName: string, pooledName: string): void {
  checkWindowGeometry(g);
  needLength(imageName, image, batch * g.channels * g.height * g.width, 'batch * channels * height * width');
  needLength(pooledName, pooled, batch * g.channels * g.outH * g.outW, 'batch * channels * outH * outW');
}

const ACTIVATIONS: readonly ActivationKind[] = ['relu', 'clip', 'hardSigmoid', 'hardSwish'];

function checkActivation(kind: ActivationKind): void {
  if (!ACTIVATIONS.includes(kind)) throw new RangeError(`kind must be 'relu', 'clip', 'hardSigmoid' or 'hardSwish' (got '${String(kind)}')`);
}

/** f(v) and f'(v) of each activation in float64, exactly as the ONNX ops define them. */
const activationFns: Record<ActivationKind, [(v: number, alpha: number, beta: number) => number,
  (v: number, alpha: number, beta: number) => number]> = {
  relu: [(v) => (v > 0 ? v : 0), (v) => (v > 0 ? 1 : 0)],
  clip: [(v, lo, hi) => Math.min(hi, Math.max(lo, v)), (v, lo, hi) => (v > lo && v < hi ? 1 : 0)],
  hardSigmoid: [
    (v, alpha, beta) => Math.max(0, Math.min(1, alpha * v + beta)),
    (v, alpha, beta) => { const t = alpha * v + beta; return t > 0 && t < 1 ? alpha : 0; }],
  hardSwish: [(v) => v * Math.max(0, Math.min(1, v / 6 + 0.5)), (v) => (v <= -3 ? 0 : v >= 3 ? 1 : v / 3 + 0.5)],
};

/**
 * Calls fn(colIndex, xIndex) for every entry of the im2col matrix, in row-major
 * col order; xIndex is -1 where the window reads padding.
 */
function forEachWindowEntry(batch: number, g: ConvGeometry, fn: (colIndex: number, xIndex: number) => void): void {
  let colIndex = 0;
  for (let n = 0; n < batch; n++) {
    for (let c = 0; c < g.channels; c++) {
      const plane = (n * g.channels + c) * g.height * g.width;
      for (let ky = 0; ky < g.kernelH; ky++) {
        for (let kx = 0; kx < g.kernelW; kx++) {
          for (let oy = 0; oy < g.outH; oy++) {
            const iy = oy * g.strideH - g.padTop + ky * g.dilationH;
            for (let ox = 0; ox < g.outW; ox++) {
              const ix = ox * g.strideW - g.padLeft + kx * g.dilationW;
              const inside = iy >= 0 && iy < g.height && ix >= 0 && ix < g.width;
              fn(colIndex++, inside ? plane + iy * g.width + ix : -1);
            }
          }
        }
      }
    }
  }
}

/** The definition: plain loops, sums in float64, checked lengths. Slow; for tests and tiny models. */
export const referenceKernels: FloatKernels = {
  name: 'reference',

  sgemm({ transA, transB, m, n, k, a, b, c, accumulate }: SgemmArgs): void {
    needLength('a', a, m * k, 'm * k');
    needLength('b', b, k * n, 'k * n');
    needLength('c', c, m * n, 'm * n');
    for (let i = 0; i < m; i++) {
      for (let j = 0; j < n; j++) {
        let sum = 0;
        for (let p = 0; p < k; p++) {
          const av = transA ? a[p * m + i] : a[i * k + p];
          const bv = transB ? b[j * k + p] : b[p * n + j];
          sum += av * bv;
        }
        c[i * n + j] = accumulate ? c[i * n + j] + sum : sum;
      }
    }
  },

  im2col(x, batch, g, col) {
    checkGeometry(x, batch, g, col, 'x', 'col');
    forEachWindowEntry(batch, g, (ci, xi) => {
      col[ci] = xi < 0 ? 0 : x[xi];
    });
  },

  col2im(col, batch, g, dx) {
    checkGeometry(dx, batch, g, col, 'dx', 'col');
    dx.fill(0);
    forEachWindowEntry(batch, g, (ci, xi) => {
      if (xi >= 0) dx[xi] += col[ci];
    });
  },

  batchNormForward(x, batch, channels, spatial, gamma, beta, epsilon, y, mean, variance, invStd) {
    for (const [name, v] of [['x', x], ['y', y]] as const) needLength(name, v, batch * channels * spatial, 'batch * channels * spatial');
    for (const [name, v] of [['gamma', gamma], ['beta', beta], ['mean', mean], ['variance', variance], ['invStd', invStd]] as const) {
      needLength(name, v, channels, 'channels');
    }
    const count = batch * spatial;
    for (let c = 0; c < channels; c++) {
      let sum = 0;
      for (let n = 0; n < batch; n++) for (let s = 0; s < spatial; s++) sum += x[(n * channels + c) * spatial + s];
      const mu = count ? sum / count : 0;
      let squares = 0;
      for (let n = 0; n < batch; n++) for (let s = 0; s < spatial; s++) squares += (x[(n * channels + c) * spatial + s] - mu) ** 2;
      const v = count ? squares / count : 0;
      mean[c] = mu;
      variance[c] = v;
      invStd[c] = 1 / Math.sqrt(v + epsilon);
      for (let n = 0; n < batch; n++) {
        for (let s = 0; s < spatial; s++) {
          const i = (n * channels + c) * spatial + s;
          y[i] = gamma[c] * (x[i] - mean[c]) * invStd[c] + beta[c];
        }
      }
    }
  },

  batchNormBackward(x, dy, batch, channels, spatial, gamma, mean, invStd, dx, dGamma, dBeta) {
    for (const [name, v] of [['x', x], ['dy', dy], ['dx', dx]] as const) needLength(name, v, batch * channels * spatial, 'batch * channels * spatial');
    for (const [name, v] of [['gamma', gamma], ['mean', mean], ['invStd', invStd], ['dGamma', dGamma], ['dBeta', dBeta]] as const) {
      needLength(name, v, channels, 'channels');
    }
    const count = batch * spatial;
    for (let c = 0; c < channels; c++) {
      const xHat = (i: number): number => (x[i] - mean[c]) * invStd[c];
      let sumDy = 0, sumDyXHat = 0;
      for (let n = 0; n < batch; n++) {
        for (let s = 0; s < spatial; s++) {
          const i = (n * channels + c) * spatial + s;
          sumDy += dy[i];
          sumDyXHat += dy[i] * xHat(i);
        }
      }
      dGamma[c] = sumDyXHat;
      dBeta[c] = sumDy;
      for (let n = 0; n < batch; n++) {
        for (let s = 0; s < spatial; s++) {
          const i = (n * channels + c) * spatial + s;
          dx[i] = (gamma[c] * invStd[c] / count) * (count * dy[i] - sumDy - xHat(i) * sumDyXHat);
        }
      }
    }
  },

  activationForward(kind, x, y, alpha, beta) {
    checkActivation(kind);
    needLength('y', y, x.length, 'x.length');
    const f = activationFns[kind][0];
    for (let i = 0; i < y.length; i++) y[i] = f(x[i], alpha, beta);
  },

  activationBackward(kind, x, dy, dx, alpha, beta) {
    checkActivation(kind);
    needLength('dy', dy, x.length, 'x.length');
    needLength('dx', dx, x.length, 'x.length');
    const df = activationFns[kind][1];
    for (let i = 0; i < dx.length; i++) dx[i] = dy[i] * df(x[i], alpha, beta);
  },

  maxPoolForward(x, batch, g, y, argmax) {
    checkPoolLengths(batch, g, x, y, 'x', 'y');
    checkPoolLengths(batch, g, x, argmax, 'x', 'argmax');
    poolForward(x, batch, g, false, y, argmax);
  },

  maxPoolBackward(dy, argmax, dx) {
    needLength('argmax', argmax, dy.length, 'dy.length');
    const bad = argmax.findIndex((a) => a < -1 || a >= dx.length);
    if (bad >= 0) throw new RangeError(`argmax[${bad}] = ${argmax[bad]} is outside [-1, dx.length = ${dx.length})`);
    dx.fill(0);
    for (let i = 0; i < dy.length; i++) if (argmax[i] >= 0) dx[argmax[i]] += dy[i];
  },

  averagePoolForward(x, batch, g, countIncludePad, y) {
    checkPoolLengths(batch, g, x, y, 'x', 'y');
    poolForward(x, batch, g, countIncludePad, y, undefined);
  },

  averagePoolBackward(dy, batch, g, countIncludePad, dx) {
    checkPoolLengths(batch, g, dx, dy, 'dx', 'dy');
    const counts = new Float64Array(g.outH * g.outW);
    for (let oy = 0; oy < g.outH; oy++) {
      for (let ox = 0; ox < g.outW; ox++) {
        let count = 0, padded = 0;
        forEachTap(g, oy, ox, (at) => { if (at >= 0) count++; else if (at === PADDING) padded++; });
        counts[oy * g.outW + ox] = countIncludePad ? count + padded : count;
      }
    }
    dx.fill(0);
    const outSize = g.outH * g.outW;
    const planes = batch * g.channels;
    for (let p = 0; p < planes; p++) {
      const xBase = p * g.height * g.width;
      for (let oy = 0; oy < g.outH; oy++) {
        for (let ox = 0; ox < g.outW; ox++) {
          const d = dy[p * outSize + oy * g.outW + ox] / counts[oy * g.outW + ox];
          forEachTap(g, oy, ox, (at) => { if (at >= 0) dx[xBase + at] += d; });
        }
      }
    }
  },

  depthwiseConvForward(x, w, batch, g, y) {
    checkDepthwise(batch, g, x, w, y, 'x', 'y');
    y.fill(0);
    forEachDepthwiseTap(batch, g, (xi, wi, yi) => { y[yi] = Math.fround(y[yi] + Math.fround(w[wi] * x[xi])); });
  },

  depthwiseConvBackwardInput(dy, w, batch, g, dx) {
    checkDepthwise(batch, g, dx, w, dy, 'dx', 'dy');
    dx.fill(0);
    forEachDepthwiseTap(batch, g, (xi, wi, yi) => { dx[xi] = Math.fround(dx[xi] + Math.fround(w[wi] * dy[yi])); });
  },

  depthwiseConvBackwardWeight(dy, x, batch, g, dw) {
    checkDepthwise(batch, g, x, dw, dy, 'x', 'dy', 'dw');
    const sums = new Float64Array(dw.length);
    forEachDepthwiseTap(batch, g, (xi, wi, yi) => { sums[wi] += dy[yi] * x[xi]; }, true);
    dw.set(sums);
  },

  upperFactorOfInverse(h, n, u) {
    if (!Number.isSafeInteger(n) || n < 0) throw new RangeError(`n must be a non-negative integer (got ${n})`);
    needLength('h', h, n * n, 'n * n');
    needLength('u', u, n * n, 'n * n');
    if (overlaps(h, u)) throw new RangeError('u must not share memory with h');
    const v = new Float64Array(n * n);
    for (let j = n - 1; j >= 0; j--) {
      const rowJ = j * n;
      const s = h[rowJ + j] - dotFrom(v, rowJ, v, rowJ, j + 1, n);
      if (!(s > 0)) return false;
      const vjj = Math.sqrt(s);
      v[rowJ + j] = vjj;
      for (let i = 0; i < j; i++) v[i * n + j] = (h[i * n + j] - dotFrom(v, i * n, v, rowJ, j + 1, n)) / vjj;
    }
    // U = V⁻¹, row by row from the bottom: U_ii = 1/V_ii, U_ij = −(Σ_{i<k≤j} V_ik·U_kj) / V_ii.
    u.fill(0);
    for (let i = n - 1; i >= 0; i--) {
      const rowI = i * n;
      const vii = v[rowI + i];
      u[rowI + i] = 1 / vii;
      for (let k = i + 1; k < n; k++) {
        const vik = v[rowI + k];
        if (vik !== 0) axpyFrom(-vik, u, k * n, u, rowI, k, n);
      }
      for (let j = i + 1; j < n; j++) u[rowI + j] /= vii;
    }
    return true;
  },

  gptqRoundBlock(w, rows, n, u, b0, b1, group, params, values, errors) {
    for (const [name, v] of [['rows', rows], ['n', n], ['b0', b0], ['b1', b1]] as const) {
      if (!Number.isSafeInteger(v) || v < 0) throw new RangeError(`${name} must be a non-negative integer (got ${v})`);
    }
    if (b0 > b1 || b1 > n) throw new RangeError(`columns must satisfy b0 <= b1 <= n (got b0 = ${b0}, b1 = ${b1}, n = ${n})`);
    const width = b1 - b0;
    needLength('w', w, rows * n, 'rows * n');
    needLength('u', u, n * n, 'n * n');
    for (const [name, v] of [['group', group], ['values', values], ['errors', errors]] as const) needLength(name, v, rows * width, 'rows * (b1 - b0)');
    const { scale, zeroPoint, qmin, qmax } = params;
    for (const [name, v] of [['zeroPoint', zeroPoint], ['qmin', qmin], ['qmax', qmax]] as const) needLength(name, v, scale.length, 'scale.length');
    group.forEach((g, i) => {
      if (!(g >= 0 && g < scale.length)) throw new RangeError(`group[${i}] must be in [0, scale.length) (got ${g})`);
    });
    for (let r = 0; r < rows; r++) {
      for (let a = b0; a < b1; a++) {
        const at = r * width + (a - b0);
        const g = group[at];
        const s = scale[g];
        if (!(s > 0)) {
          errors[at] = 0;
          continue;
        }
        const z = zeroPoint[g];
        const wa = w[r * n + a];
        const q = Math.min(qmax[g], Math.max(qmin[g], roundHalfToEven(wa / s) + z));
        values[at] = q;
        const e = (wa - (q - z) * s) / u[a * n + a];
        errors[at] = e;
        for (let c = a + 1; c < b1; c++) w[r * n + c] -= e * u[a * n + c];
      }
    }
  },
};

/** Σ_{k=from}^{to−1} a[ai+k]·b[bi+k], four partial sums (upperFactorOfInverse's order). */
function dotFrom(a: Float64Array, ai: number, b: Float64Array, bi: number, from: number, to: number): number {
  let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  let k = from;
  for (; k + 3 < to; k += 4) {
    s0 += a[ai + k] * b[bi + k];
    s1 += a[ai + k + 1] * b[bi + k + 1];
    s2 += a[ai + k + 2] * b[bi + k + 2];
    s3 += a[ai + k + 3] * b[bi + k + 3];
  }
  for (; k < to; k++) s0 += a[ai + k] * b[bi + k];
  return s0 + s1 + s2 + s3;
}

/** y[yi+k] += alpha·x[xi+k] for k in [from, to). */
function axpyFrom(alpha: number, x: Float64Array, xi: number, y: Float64Array, yi: number, from: number, to: number): void {
  let k = from;
  for (; k + 3 < to; k += 4) {
    y[yi + k] += alpha * x[xi + k];
    y[yi + k + 1] += alpha * x[xi + k + 1];
    y[yi + k + 2] += alpha * x[xi + k + 2];
    y[yi + k + 3] += alpha * x[xi + k + 3];
  }
  for (; k < to; k++) y[yi + k] += alpha * x[xi + k];
}

function checkDepthwise(batch: number, g: ConvGeometry, image: Float32Array, w: Float32Array, out: Float32Array,
  imageName: string, outName: string, wName = 'w'): void {
  checkPoolLengths(batch, g, image, out, imageName, outName);
  needLength(wName, w, g.channels * g.kernelH * g.kernelW, 'channels * kernelH * kernelW');
}

/**
 * Calls fn(xIndex, wIndex, yIndex) for every in-image tap of a depthwise convolution: per (image, channel)
 * plane, taps in (ky, kx) order, then outputs in (oy, ox) order — or, byChannel, per channel and tap over
 * (image, oy, ox), the order of the weight gradient's sums.
 */
function forEachDepthwiseTap(batch: number, g: ConvGeometry, fn: (xi: number, wi: number, yi: number) => void, byChannel = false): void {
  const taps = g.kernelH * g.kernelW;
  const visit = (n: number, c: number, ky: number, kx: number) => {
    const plane = n * g.channels + c;
    for (let oy = 0; oy < g.outH; oy++) {
      const iy = oy * g.strideH - g.padTop + ky * g.dilationH;
      if (iy < 0 || iy >= g.height) continue;
      for (let ox = 0; ox < g.outW; ox++) {
        const ix = ox * g.strideW - g.padLeft + kx * g.dilationW;
        if (ix < 0 || ix >= g.width) continue;
        fn((plane * g.height + iy) * g.width + ix, c * taps + ky * g.kernelW + kx, (plane * g.outH + oy) * g.outW + ox);
      }
    }
  };
  for (let a = 0; a < (byChannel ? g.channels : batch * g.channels); a++) {
    for (let ky = 0; ky < g.kernelH; ky++) {
      for (let kx = 0; kx < g.kernelW; kx++) {
        if (byChannel) for (let n = 0; n < batch; n++) visit(n, a, ky, kx);
        else visit(Math.floor(a / g.channels), a % g.channels, ky, kx);
      }
    }
  }
}

const PADDING = -1, PAST_PADDING = -2;

/**
 * Calls fn for window (oy, ox)'s taps in (ky, kx) order with the tap's index in its image plane, or PADDING for a
 * position in the explicit padding (count_include_pad counts it), or PAST_PADDING where a ceil_mode window runs
 * past it.
 */
function forEachTap(g: ConvGeometry, oy: number, ox: number, fn: (at: number) => void): void {
  for (let ky = 0; ky < g.kernelH; ky++) {
    const iy = oy * g.strideH - g.padTop + ky * g.dilationH;
    for (let kx = 0; kx < g.kernelW; kx++) {
      const ix = ox * g.strideW - g.padLeft + kx * g.dilationW;
      if (iy < 0 || iy >= g.height || ix < 0 || ix >= g.width) {
        fn(iy < g.height + g.padTop && ix < g.width + g.padLeft ? PADDING : PAST_PADDING);
      } else {
        fn(iy * g.width + ix);
      }
    }
  }
}

/** Max (argmax given) or average pooling forward: one scan of each window. */
function poolForward(x: Float32Array, batch: number, g: ConvGeometry, countPad: boolean, y: Float32Array,
  arg: Int32Array | undefined): void {
  const planes = batch * g.channels;
  const outSize = g.outH * g.outW;
  for (let p = 0; p < planes; p++) {
    const xBase = p * g.height * g.width;
    for (let oy = 0; oy < g.outH; oy++) {
      for (let ox = 0; ox < g.outW; ox++) {
        let best = -Infinity, bestAt = -1, sum = 0, count = 0, padded = 0;
        forEachTap(g, oy, ox, (tap) => {
          if (tap < 0) {
            if (tap === PADDING) padded++;
            return;
          }
          const at = xBase + tap;
          const v = x[at];
          if (v > best || bestAt < 0) { best = v; bestAt = at; }
          sum += v;
          count++;
        });
        const o = p * outSize + oy * g.outW + ox;
        if (arg) { y[o] = best; arg[o] = bestAt; } else y[o] = sum / (countPad ? count + padded : count);
      }
    }
  }
}

export interface NativeKernelOptions {
  /** SGEMM kernel: one of cpuInfo().sgemmKernels ('avx512', 'avx2', 'scalar'). Default: LOWBIT_KERNEL or the best. */
  kernel?: string;
  /** Threads of the native pool per call. Default: all. */
  threads?: number;
}

/**
 * The addon's kernels. Lengths are checked exactly by the addon (RangeError
 * naming the argument); outputs must not share memory with inputs.
 */
export function nativeKernels(options: NativeKernelOptions = {}): FloatKernels {
  const kernel = checkKernel('sgemm', options.kernel);
  const threads = options.threads === undefined ? 0 : checkInteger('options.threads', options.threads, 1, 1024);
  const b = native();
  return {
    name: `native:${kernel || cpuInfo().selectedSgemmKernel}`,
    sgemm: (s) => b.sgemm(s.transA, s.transB, s.m, s.n, s.k, s.a, s.b, s.c, s.accumulate, kernel, threads),
    im2col: (x, batch, g, col) => b.im2col(x, batch, g, col, threads),
    col2im: (col, batch, g, dx) => b.col2im(col, batch, g, dx, threads),
    batchNormForward: (x, batch, channels, spatial, gamma, beta, epsilon, y, mean, variance, invStd) =>
      b.batchNormForward(x, batch, channels, spatial, gamma, beta, epsilon, y, mean, variance, invStd, threads),
    batchNormBackward: (x, dy, batch, channels, spatial, gamma, mean, invStd, dx, dGamma, dBeta) =>
      b.batchNormBackward(x, dy, batch, channels, spatial, gamma, mean, invStd, dx, dGamma, dBeta, threads),
    activationForward: (kind, x, y, alpha, beta) => b.activationForward(kind, x, y, alpha, beta, threads),
    activationBackward: (kind, x, dy, dx, alpha, beta) => b.activationBackward(kind, x, dy, dx, alpha, beta, threads),
    maxPoolForward: (x, batch, g, y, argmax) => b.maxPoolForward(x, batch, g, y, argmax, threads),
    maxPoolBackward: (dy, argmax, dx) => b.maxPoolBackward(dy, argmax, dx),
    averagePoolForward: (x, batch, g, countIncludePad, y) => b.averagePoolForward(x, batch, g, countIncludePad, y, threads),
    averagePoolBackward: (dy, batch, g, countIncludePad, dx) => b.averagePoolBackward(dy, batch, g, countIncludePad, dx, threads),
    depthwiseConvForward: (x, w, batch, g, y) => b.depthwiseConvForward(x, w, batch, g, y, threads),
    depthwiseConvBackwardInput: (dy, w, batch, g, dx) => b.depthwiseConvBackwardInput(dy, w, batch, g, dx, threads),
    depthwiseConvBackwardWeight: (dy, x, batch, g, dw) => b.depthwiseConvBackwardWeight(dy, x, batch, g, dw, threads),
    upperFactorOfInverse: (h, n, u) => b.upperFactorOfInverse(h, n, u),
    gptqRoundBlock: (w, rows, n, u, b0, b1, group, p, values, errors) =>
      b.gptqRoundBlock(w, rows, n, u, b0, b1, group, p.scale, p.zeroPoint, p.qmin, p.qmax, values, errors),
  };
}
