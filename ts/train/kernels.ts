/**
 * The float32 kernels the training engine spends its time in, behind one
 * interface with two implementations: `referenceKernels` (plain TypeScript,
 * the readable definition every test compares against) and `nativeKernels()`
 * (the addon: SGEMM with AVX-512/AVX2 FMA or scalar, im2col/col2im and the
 * BatchNormalization loops on the native thread pool).
 *
 * Layouts are row-major and NCHW. Every kernel writes all of its output
 * (no reliance on zeroed memory) unless it says "adds".
 */

import { checkKernel, cpuInfo } from '../cpu';
import { native } from '../native';
import { checkInteger } from '../validate';

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
}

// ---------------------------------------------------------------------------
// Implementations


function needLength(name: string, v: Float32Array, want: number, formula: string): void {
  if (v.length !== want) throw new RangeError(`${name}.length must be ${formula} = ${want} (got ${v.length})`);
}

function checkGeometry(x: Float32Array, batch: number, g: ConvGeometry, col: Float32Array, xName: string, colName: string): void {
  for (const key of ['channels', 'height', 'width', 'kernelH', 'kernelW', 'padTop', 'padLeft', 'outH', 'outW'] as const) {
    checkInteger(`geometry.${key}`, g[key], 0, 2 ** 31 - 1);
  }
  for (const key of ['strideH', 'strideW', 'dilationH', 'dilationW'] as const) checkInteger(`geometry.${key}`, g[key], 1, 2 ** 31 - 1);
  needLength(xName, x, batch * g.channels * g.height * g.width, 'batch * channels * height * width');
  needLength(colName, col, batch * g.channels * g.kernelH * g.kernelW * g.outH * g.outW,
    'batch * channels * kernelH * kernelW * outH * outW');
}

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
};

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
  };
}
