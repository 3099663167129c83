import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';

import { cpuInfo } from '../../ts/cpu';
import { ActivationKind, ConvGeometry, FloatKernels, nativeKernels, referenceKernels, SgemmArgs } from '../../ts/train/kernels';

/** Deterministic uniform floats in [lo, hi). */
function randomFloats(length: number, seed: number, lo = -1, hi = 1): Float32Array {
  let s = seed >>> 0 || 1;
  const out = new Float32Array(length);
  for (let i = 0; i < length; i++) {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    out[i] = lo + ((hi - lo) * s) / 2 ** 32;
  }
  return out;
}

function geometry(channels: number, height: number, width: number, kernel: number, pad: number, stride: number,
  dilation: number): ConvGeometry {
  const span = dilation * (kernel - 1) + 1;
  const outH = Math.floor((height + 2 * pad - span) / stride) + 1;
  const outW = Math.floor((width + 2 * pad - span) / stride) + 1;
  return { channels, height, width, kernelH: kernel, kernelW: kernel, padTop: pad, padLeft: pad, strideH: stride,
    strideW: stride, dilationH: dilation, dilationW: dilation, outH, outW };
}

function sgemmCase(transA: boolean, transB: boolean, m: number, n: number, k: number, accumulate: boolean, seed: number): SgemmArgs {
  return { transA, transB, m, n, k, accumulate, a: randomFloats(m * k, seed), b: randomFloats(k * n, seed + 1),
    c: randomFloats(m * n, seed + 2) };
}

function runSgemm(kernels: FloatKernels, s: SgemmArgs): Float32Array {
  const c = s.c.slice();
  kernels.sgemm({ ...s, c });
  return c;
}

/** |got - want| <= 1e-5·(Σ|a b| + |c0|) + 1e-30 for every element. */
function expectSgemmClose(s: SgemmArgs, got: Float32Array, want: Float32Array, label: string): void {
  for (let i = 0; i < s.m; i++) {
    for (let j = 0; j < s.n; j++) {
      let mag = s.accumulate ? Math.abs(s.c[i * s.n + j]) : 0;
      for (let p = 0; p < s.k; p++) {
        const av = s.transA ? s.a[p * s.m + i] : s.a[i * s.k + p];
        const bv = s.transB ? s.b[j * s.k + p] : s.b[p * s.n + j];
        mag += Math.abs(av * bv);
      }
      const e = Math.abs(got[i * s.n + j] - want[i * s.n + j]);
      if (!(e <= 1e-5 * mag + 1e-30)) {
        expect.fail(`${label}: at (${i}, ${j}) want ${want[i * s.n + j]} got ${got[i * s.n + j]} (Σ|ab| = ${mag})`);
      }
    }
  }
}

/** Equal bit for bit, except that any NaN matches any NaN (payloads are unspecified). */
function expectSameFloats(got: Float32Array, want: Float32Array, label: string): void {
  expect(got.length, `${label}: length`).to.equal(want.length);
  const gb = new Uint32Array(got.buffer, got.byteOffset, got.length), wb = new Uint32Array(want.buffer, want.byteOffset, want.length);
  for (let i = 0; i < got.length; i++) {
    if (gb[i] !== wb[i] && !(Number.isNaN(got[i]) && Number.isNaN(want[i]))) {
      expect.fail(`${label}[${i}]: want ${Object.is(want[i], -0) ? '-0' : want[i]} got ${Object.is(got[i], -0) ? '-0' : got[i]}`);
    }
  }
}

/** Random floats with NaN, ±Infinity, ±0 and the activations' corners (±3, ±2.5, 6) mixed in. */
function activationInputs(length: number, seed: number): Float32Array {
  const specials = [NaN, Infinity, -Infinity, 0, -0, 3, -3, 6, -6, 2.5, -2.5, 1, 0.1, 0.7, 1e-40, -1e-40, 3.4e38, -3.4e38];
  const x = randomFloats(length, seed, -8, 8), pick = randomFloats(length, seed + 1, 0, 4 * specials.length);
  for (let i = 0; i < length; i++) if (pick[i] < specials.length) x[i] = specials[Math.floor(pick[i])];
  return x;
}

/** A pooling geometry the way ops.ts axisGeometry computes it (explicit pads, optional ceil_mode). */
function poolGeometry(channels: number, height: number, width: number, [kernelH, kernelW]: number[],
  [padTop, padLeft, padBottom, padRight]: number[], [strideH, strideW]: number[], [dilationH, dilationW]: number[],
  ceil: boolean): ConvGeometry {
  const out = (size: number, k: number, s: number, d: number, begin: number, end: number): number => {
    const span = size + begin + end - (d * (k - 1) + 1);
    let o = (ceil ? Math.ceil(span / s) : Math.floor(span / s)) + 1;
    if (ceil && (o - 1) * s >= size + begin) o--;
    return Math.max(0, o);
  };
  return { channels, height, width, kernelH, kernelW, padTop, padLeft, strideH, strideW, dilationH, dilationW,
    outH: out(height, kernelH, strideH, dilationH, padTop, padBottom), outW: out(width, kernelW, strideW, dilationW, padLeft, padRight) };
}

const sizes = [0, 1, 2, 3, 5, 7, 13, 17, 31, 33, 64, 65];
const missingReason: Record<string, string> = { avx512: 'no AVX-512F (with VL, DQ)', avx2: 'no AVX2 + FMA' };

describe('train kernels: native float32 SGEMM, im2col/col2im, BatchNormalization, activations and pooling vs the TypeScript reference', () => {
  const available = cpuInfo().sgemmKernels;

  it('cpuInfo lists the SGEMM kernels best first, ending with scalar, and the selected one', () => {
    expect(available[available.length - 1]).to.equal('scalar');
    expect(cpuInfo().kernels.sgemm).to.deep.equal(available);
    // (LOWBIT_KERNEL may force another usable one.)
    expect(cpuInfo().selectedSgemmKernel).to.be.oneOf(process.env.LOWBIT_KERNEL ? available : [available[0]]);
  });

  for (const name of ['avx512', 'avx2', 'scalar']) {
    const usable = available.includes(name);
    const title = (what: string): string => usable ? `sgemm ${name}: ${what}` : `sgemm ${name}: ${what} (skipped: ${missingReason[name]})`;

    it(title('matches the reference over odd sizes, all transposes, accumulate on/off'), function () {
      if (!usable) this.skip();
      const kernels = nativeKernels({ kernel: name });
      let seed = 1;
      for (let t = 0; t < 4; t++) {
        for (const accumulate of [false, true]) {
          for (let s = 0; s < sizes.length; s++) {
            const c = sgemmCase((t & 1) === 1, (t & 2) === 2, sizes[s], sizes[(s + 4) % sizes.length],
              sizes[(s + 7) % sizes.length], accumulate, seed += 3);
            expectSgemmClose(c, runSgemm(kernels, c), runSgemm(referenceKernels, c), `${name} ${JSON.stringify({ ...c, a: 0, b: 0, c: 0 })}`);
          }
        }
      }
    });

    it(title('training shapes (long K, fully connected transposes) and 1 vs 2 threads bit-identical'), function () {
      if (!usable) this.skip();
      const one = nativeKernels({ kernel: name, threads: 1 });
      const two = nativeKernels({ kernel: name, threads: 2 });
      const shapes: Array<[boolean, boolean, number, number, number]> = [
        [false, false, 16, 784, 72], // conv forward
        [false, true, 16, 72, 784], // conv dW
        [true, false, 72, 784, 16], // conv dX
        [false, true, 32, 10, 1000], // FC forward Y = X·Wᵀ
        [true, false, 10, 33, 32], // FC dW = dYᵀ·X
        [true, true, 7, 9, 1031],
      ];
      let seed = 100;
      for (const [ta, tb, m, n, k] of shapes) {
        for (const accumulate of [false, true]) {
          const c = sgemmCase(ta, tb, m, n, k, accumulate, seed += 3);
          const got1 = runSgemm(one, c);
          expectSgemmClose(c, got1, runSgemm(referenceKernels, c), `${name} ${ta} ${tb} ${m}x${n}x${k}`);
          expect(Buffer.from(runSgemm(two, c).buffer).equals(Buffer.from(got1.buffer)), `${m}x${n}x${k}: 2 threads differ`).to.equal(true);
        }
      }
    });
  }

  const geometries: Array<[number, ConvGeometry]> = [
    [2, geometry(3, 9, 8, 3, 1, 2, 2)], // stride 2, pad 1, dilation 2
    [3, geometry(4, 7, 7, 3, 1, 1, 1)],
    [1, geometry(2, 5, 6, 2, 0, 2, 1)],
    [2, { ...geometry(3, 10, 9, 3, 1, 2, 2), padLeft: 2, strideW: 3, outW: 4 }], // asymmetric
  ];
  for (const [batch, g] of geometries) {
    it(`im2col/col2im equal the reference exactly: batch ${batch}, ${JSON.stringify(g)}; 1 vs 2 threads identical`, () => {
      const xLen = batch * g.channels * g.height * g.width;
      const colLen = batch * g.channels * g.kernelH * g.kernelW * g.outH * g.outW;
      const x = randomFloats(xLen, 7), dcol = randomFloats(colLen, 8);
      for (const threads of [1, 2]) {
        const k = nativeKernels({ threads });
        const col = new Float32Array(colLen).fill(5), want = new Float32Array(colLen).fill(-5);
        k.im2col(x, batch, g, col);
        referenceKernels.im2col(x, batch, g, want);
        expect(col).to.deep.equal(want);
        const dx = new Float32Array(xLen).fill(5), wantDx = new Float32Array(xLen).fill(-5);
        k.col2im(dcol, batch, g, dx);
        referenceKernels.col2im(dcol, batch, g, wantDx);
        expect(dx).to.deep.equal(wantDx);
        // Adjointness: <im2col(x), dcol> = <x, col2im(dcol)>.
        let lhs = 0, rhs = 0, mag = 0;
        col.forEach((v, i) => { lhs += v * dcol[i]; mag += Math.abs(v * dcol[i]); });
        x.forEach((v, i) => { rhs += v * dx[i]; });
        expect(Math.abs(lhs - rhs)).to.be.at.most(1e-5 * mag + 1e-12);
      }
    });
  }

  for (const [batch, channels, spatial, offset] of [[4, 3, 49, 0], [8, 16, 196, 0], [2, 5, 30, 50], [1, 2, 1, 0]]) {
    it(`batchNorm forward/backward match the reference: batch ${batch}, channels ${channels}, spatial ${spatial}, offset ${offset}; 1 vs 2 threads identical`, () => {
      const total = batch * channels * spatial;
      const x = randomFloats(total, 11, offset - 2, offset + 2), dy = randomFloats(total, 12);
      const gamma = randomFloats(channels, 13, 0.5, 2), beta = randomFloats(channels, 14);
      const run = (k: FloatKernels): Float32Array[] => {
        const out = [total, channels, channels, channels, total, channels, channels].map((n) => new Float32Array(n).fill(9));
        const [y, mean, variance, invStd, dx, dGamma, dBeta] = out;
        k.batchNormForward(x, batch, channels, spatial, gamma, beta, 1e-5, y, mean, variance, invStd);
        k.batchNormBackward(x, dy, batch, channels, spatial, gamma, mean, invStd, dx, dGamma, dBeta);
        return out;
      };
      const want = run(referenceKernels);
      const got = run(nativeKernels({ threads: 1 }));
      const names = ['y', 'mean', 'variance', 'invStd', 'dx', 'dGamma', 'dBeta'];
      const floors = [1, 1e-6, 1e-6, 1e-6, 1, Math.sqrt(batch * spatial), Math.sqrt(batch * spatial)];
      for (let o = 0; o < names.length; o++) {
        for (let i = 0; i < want[o].length; i++) {
          const tol = (offset ? 1e-4 : 2e-5) * Math.max(Math.abs(want[o][i]), floors[o]);
          if (!(Math.abs(got[o][i] - want[o][i]) <= tol)) expect.fail(`${names[o]}[${i}]: want ${want[o][i]} got ${got[o][i]}`);
        }
      }
      const two = run(nativeKernels({ threads: 2 }));
      two.forEach((v, o) => expect(v, `${names[o]} with 2 threads`).to.deep.equal(got[o]));
    });
  }

  const activationCases: Array<[ActivationKind, number, number]> = [
    ['relu', 0, 0], ['hardSwish', 0, 0],
    ['clip', 0, 6], ['clip', -Infinity, Infinity], ['clip', -Infinity, 0], ['clip', -0, Infinity], ['clip', -1, -0],
    ['clip', 0.1, 0.7], // bounds that are not float32 values
    ['clip', 2, 1], ['clip', NaN, 1], ['clip', 0, NaN],
    ['hardSigmoid', Math.fround(0.2), 0.5], ['hardSigmoid', 1 / 6, 0.5], ['hardSigmoid', -0.3, 0.1],
  ];
  for (const [kind, alpha, beta] of activationCases) {
    it(`activation ${kind} (${alpha}, ${beta}): forward/backward equal the reference bit for bit (NaN, ±Infinity, ±0); 1 vs 2 threads identical`, () => {
      for (const n of [0, 1, 7, 33, 1000, 70001]) {
        const x = activationInputs(n, 21 + n), dy = activationInputs(n, 22 + n);
        const run = (k: FloatKernels): [Float32Array, Float32Array] => {
          const y = new Float32Array(n).fill(7), dx = new Float32Array(n).fill(7);
          k.activationForward(kind, x, y, alpha, beta);
          k.activationBackward(kind, x, dy, dx, alpha, beta);
          return [y, dx];
        };
        const [wantY, wantDx] = run(referenceKernels);
        for (const threads of [1, 2]) {
          const [y, dx] = run(nativeKernels({ threads }));
          expectSameFloats(y, wantY, `n ${n}, ${threads} threads: y`);
          expectSameFloats(dx, wantDx, `n ${n}, ${threads} threads: dx`);
        }
      }
    });
  }

  const pools: Array<[string, number, ConvGeometry]> = [
    ['2x2 stride 2', 2, poolGeometry(3, 8, 8, [2, 2], [0, 0, 0, 0], [2, 2], [1, 1], false)],
    ['3x3 stride 2 pad 1 ceil_mode', 2, poolGeometry(3, 7, 9, [3, 3], [1, 1, 1, 1], [2, 2], [1, 1], true)],
    ['2x2 stride 2 ceil_mode (windows past the edge)', 1, poolGeometry(2, 7, 7, [2, 2], [0, 0, 0, 0], [2, 2], [1, 1], true)],
    ['asymmetric pads and strides, dilation 2', 3, poolGeometry(2, 9, 8, [3, 2], [2, 1, 0, 2], [2, 3], [2, 1], false)],
    ['dilation 2 ceil_mode', 1, poolGeometry(2, 10, 11, [3, 3], [1, 2, 1, 1], [3, 2], [2, 2], true)],
    ['pads wider than the kernel (empty windows)', 2, poolGeometry(1, 3, 3, [2, 2], [3, 3, 3, 3], [1, 1], [1, 1], false)],
    ['MNIST-sized, threaded', 8, poolGeometry(16, 28, 28, [2, 2], [0, 0, 0, 0], [2, 2], [1, 1], false)],
  ];
  for (const [what, batch, g] of pools) {
    it(`maxPool/averagePool equal the reference bit for bit (ties, NaN, -Infinity; count_include_pad on/off): ${what}; 1 vs 2 threads identical`, () => {
      const xLen = batch * g.channels * g.height * g.width, yLen = batch * g.channels * g.outH * g.outW;
      // Small integers: many ties in every window; a few NaN and -Infinity.
      const x = randomFloats(xLen, 31, -2, 3).map(Math.floor), dy = randomFloats(yLen, 32);
      const special = randomFloats(xLen, 33, 0, 40);
      for (let i = 0; i < xLen; i++) if (special[i] < 1) x[i] = NaN; else if (special[i] < 2) x[i] = -Infinity;
      const smooth = randomFloats(xLen, 34, -3, 3);
      const run = (k: FloatKernels): Array<Float32Array | Int32Array> => {
        const y = new Float32Array(yLen).fill(5), arg = new Int32Array(yLen).fill(12345), dx = new Float32Array(xLen).fill(5);
        k.maxPoolForward(x, batch, g, y, arg);
        k.maxPoolBackward(dy, arg, dx);
        const out: Array<Float32Array | Int32Array> = [y, arg, dx];
        for (const countPad of [false, true]) {
          const ay = new Float32Array(yLen).fill(5), adx = new Float32Array(xLen).fill(5);
          k.averagePoolForward(smooth, batch, g, countPad, ay);
          k.averagePoolBackward(dy, batch, g, countPad, adx);
          out.push(ay, adx);
        }
        return out;
      };
      const names = ['max y', 'argmax', 'max dx', 'average y', 'average dx', 'average (count_include_pad) y', 'average (count_include_pad) dx'];
      const want = run(referenceKernels);
      for (const threads of [1, 2]) {
        const got = run(nativeKernels({ threads }));
        for (let o = 0; o < names.length; o++) {
          if (got[o] instanceof Int32Array) expect(got[o], `${threads} threads: ${names[o]}`).to.deep.equal(want[o]);
          else expectSameFloats(got[o] as Float32Array, want[o] as Float32Array, `${threads} threads: ${names[o]}`);
        }
      }
    });
  }

  const depthwise: Array<[string, number, ConvGeometry]> = [
    ...pools,
    ['5x5 pad 2 stride 1 (contiguous rows)', 2, poolGeometry(5, 7, 13, [5, 5], [2, 2, 2, 2], [1, 1], [1, 1], false)],
    ['3x3 stride (2, 1) pad 1', 3, poolGeometry(4, 9, 11, [3, 3], [1, 1, 1, 1], [2, 1], [1, 1], false)],
    ['1x3 kernel wider than the image', 1, poolGeometry(3, 1, 2, [1, 3], [0, 1, 0, 1], [1, 1], [1, 1], false)],
    ['recognizer-sized, threaded', 2, poolGeometry(48, 12, 40, [5, 5], [2, 2, 2, 2], [1, 1], [1, 1], false)],
  ];
  for (const [what, batch, g] of depthwise) {
    it(`depthwise conv forward/backward equal the reference bit for bit: ${what}; 1 vs 2 threads identical`, () => {
      const xLen = batch * g.channels * g.height * g.width, yLen = batch * g.channels * g.outH * g.outW;
      const x = randomFloats(xLen, 41, -3, 3), w = randomFloats(g.channels * g.kernelH * g.kernelW, 42), dy = randomFloats(yLen, 43);
      const run = (k: FloatKernels): Float32Array[] => {
        const y = new Float32Array(yLen).fill(5), dx = new Float32Array(xLen).fill(5), dw = new Float32Array(w.length).fill(5);
        k.depthwiseConvForward(x, w, batch, g, y);
        k.depthwiseConvBackwardInput(dy, w, batch, g, dx);
        k.depthwiseConvBackwardWeight(dy, x, batch, g, dw);
        return [y, dx, dw];
      };
      const want = run(referenceKernels);
      // The reference against im2col + a per-channel dot product (the general Conv path's definition).
      const col = new Float32Array(batch * g.channels * g.kernelH * g.kernelW * g.outH * g.outW);
      referenceKernels.im2col(x, batch, g, col);
      const taps = g.kernelH * g.kernelW, pixels = g.outH * g.outW;
      for (let p = 0; p < batch * g.channels; p++) {
        for (let i = 0; i < pixels; i++) {
          let s = 0;
          for (let t = 0; t < taps; t++) s += w[(p % g.channels) * taps + t] * col[(p * taps + t) * pixels + i];
          expect(Math.abs(want[0][p * pixels + i] - s), `y[${p * pixels + i}]`).to.be.below(1e-5);
        }
      }
      for (const threads of [1, 2]) {
        const got = run(nativeKernels({ threads }));
        ['y', 'dx', 'dw'].forEach((name, o) => expectSameFloats(got[o], want[o], `${threads} threads: ${name}`));
      }
    });
  }

  describe('bad arguments are clear errors, never out-of-bounds reads', () => {
    const k = nativeKernels();
    const g = geometry(2, 5, 5, 3, 1, 2, 2);

    it('sgemm: wrong a, b or c length is a RangeError naming the argument', () => {
      const ok = sgemmCase(false, true, 3, 4, 5, false, 1);
      expect(() => k.sgemm({ ...ok, a: new Float32Array(14) })).to.throw(RangeError, /a\.length must be m \* k = 15 \(got 14\)/);
      expect(() => k.sgemm({ ...ok, b: new Float32Array(21) })).to.throw(RangeError, /b\.length must be k \* n = 20/);
      expect(() => k.sgemm({ ...ok, c: new Float32Array(11) })).to.throw(RangeError, /c\.length must be m \* n = 12/);
      expect(() => k.sgemm({ ...ok, c: ok.a.subarray(0, 12) })).to.throw(RangeError, /c must not share memory with a/);
      expect(() => k.sgemm({ ...ok, a: new Float64Array(15) as unknown as Float32Array })).to.throw(TypeError, /a has the wrong element type/);
      expect(() => k.sgemm({ ...ok, m: -1 })).to.throw(RangeError, /m must be a non-negative integer/);
      expect(() => referenceKernels.sgemm({ ...ok, a: new Float32Array(14) })).to.throw(RangeError, /a\.length/);
    });

    it('im2col/col2im: wrong lengths and bad geometry are errors naming the argument', () => {
      const x = new Float32Array(2 * 2 * 5 * 5), col = new Float32Array(2 * 2 * 9 * g.outH * g.outW);
      expect(() => k.im2col(x.subarray(1), 2, g, col)).to.throw(RangeError, /x\.length must be batch \* channels \* height \* width = 100/);
      expect(() => k.im2col(x, 2, g, col.subarray(1))).to.throw(RangeError, /col\.length/);
      expect(() => k.col2im(col, 2, g, x.subarray(1))).to.throw(RangeError, /dx\.length/);
      expect(() => k.im2col(x, 2, { ...g, strideH: 0 }, col)).to.throw(RangeError, /geometry\.strideH/);
      expect(() => k.im2col(x, 2, { ...g, outW: undefined } as unknown as ConvGeometry, col)).to.throw(TypeError, /geometry\.outW must be a number/);
      expect(() => referenceKernels.im2col(x, 2, g, col.subarray(1))).to.throw(RangeError, /col\.length/);
    });

    it('batchNorm: wrong lengths are RangeErrors naming the argument', () => {
      const x = new Float32Array(2 * 3 * 4), c3 = () => new Float32Array(3);
      expect(() => k.batchNormForward(x, 2, 3, 4, new Float32Array(2), c3(), 1e-5, new Float32Array(24), c3(), c3(), c3()))
        .to.throw(RangeError, /gamma\.length must be channels = 3/);
      expect(() => k.batchNormForward(x, 2, 3, 4, c3(), c3(), 1e-5, new Float32Array(23), c3(), c3(), c3()))
        .to.throw(RangeError, /y\.length/);
      expect(() => k.batchNormBackward(x, new Float32Array(24), 2, 3, 4, c3(), c3(), c3(), new Float32Array(24), c3(), new Float32Array(4)))
        .to.throw(RangeError, /dBeta\.length/);
      expect(() => referenceKernels.batchNormBackward(x, new Float32Array(20), 2, 3, 4, c3(), c3(), c3(), new Float32Array(24), c3(), c3()))
        .to.throw(RangeError, /dy\.length/);
    });

    it('activations: wrong lengths, an unknown kind and a non-number bound are errors naming the argument', () => {
      const x = new Float32Array(10);
      for (const kernels of [k, referenceKernels]) {
        expect(() => kernels.activationForward('relu', x, new Float32Array(9), 0, 0)).to.throw(RangeError, /y\.length must be x\.length = 10 \(got 9\)/);
        expect(() => kernels.activationBackward('clip', x, new Float32Array(11), new Float32Array(10), 0, 6)).to.throw(RangeError, /dy\.length must be x\.length = 10/);
        expect(() => kernels.activationBackward('clip', x, new Float32Array(10), new Float32Array(9), 0, 6)).to.throw(RangeError, /dx\.length must be x\.length = 10/);
        expect(() => kernels.activationForward('gelu' as ActivationKind, x, new Float32Array(10), 0, 0)).to.throw(RangeError, /kind must be 'relu', 'clip', 'hardSigmoid' or 'hardSwish' \(got 'gelu'\)/);
      }
      expect(() => k.activationForward('relu', x, x, 0, 0)).to.throw(RangeError, /y must not share memory with x/);
      expect(() => k.activationForward('clip', x, new Float32Array(10), '0' as unknown as number, 6)).to.throw(TypeError, /alpha must be a number/);
    });

    it('pooling: wrong lengths, bad geometry and out-of-range argmax are errors naming the argument', () => {
      const pg = poolGeometry(2, 5, 5, [3, 3], [1, 1, 1, 1], [2, 2], [1, 1], true);
      const x = new Float32Array(2 * 2 * 25), yLen = 2 * 2 * pg.outH * pg.outW;
      for (const kernels of [k, referenceKernels]) {
        expect(() => kernels.maxPoolForward(x.subarray(1), 2, pg, new Float32Array(yLen), new Int32Array(yLen)))
          .to.throw(RangeError, /x\.length must be batch \* channels \* height \* width = 100 \(got 99\)/);
        expect(() => kernels.maxPoolForward(x, 2, pg, new Float32Array(yLen - 1), new Int32Array(yLen)))
          .to.throw(RangeError, new RegExp(`y\\.length must be batch \\* channels \\* outH \\* outW = ${yLen}`));
        expect(() => kernels.maxPoolForward(x, 2, pg, new Float32Array(yLen), new Int32Array(yLen + 1))).to.throw(RangeError, /argmax\.length/);
        expect(() => kernels.maxPoolBackward(new Float32Array(yLen), new Int32Array(yLen - 1), new Float32Array(100)))
          .to.throw(RangeError, /argmax\.length must be dy\.length/);
        const arg = new Int32Array(yLen);
        arg[3] = 100;
        const dx = new Float32Array(100).fill(4);
        expect(() => kernels.maxPoolBackward(new Float32Array(yLen), arg, dx)).to.throw(RangeError, /argmax\[3\] = 100 is outside \[-1, dx\.length = 100\)/);
        arg[3] = -2;
        expect(() => kernels.maxPoolBackward(new Float32Array(yLen), arg, dx)).to.throw(RangeError, /argmax\[3\] = -2/);
        expect(dx.every((v) => v === 4), 'a refused call wrote dx').to.equal(true);
        expect(() => kernels.averagePoolForward(x, 2, pg, false, new Float32Array(yLen + 1))).to.throw(RangeError, /y\.length/);
        expect(() => kernels.averagePoolBackward(new Float32Array(yLen - 1), 2, pg, true, new Float32Array(100))).to.throw(RangeError, /dy\.length/);
        expect(() => kernels.averagePoolBackward(new Float32Array(yLen), 2, pg, true, new Float32Array(101))).to.throw(RangeError, /dx\.length/);
        expect(() => kernels.averagePoolForward(x, 2, { ...pg, dilationW: 0 }, false, new Float32Array(yLen))).to.throw(RangeError, /geometry\.dilationW/);
      }
      expect(() => k.maxPoolForward(x, 2, pg, new Float32Array(yLen), new Float64Array(yLen) as unknown as Int32Array))
        .to.throw(TypeError, /argmax has the wrong element type/);
      const shared = new Float32Array(100 + yLen);
      expect(() => k.averagePoolForward(shared.subarray(0, 100), 2, pg, false, shared.subarray(99, 99 + yLen)))
        .to.throw(RangeError, /y must not share memory with x/);
      expect(() => k.averagePoolBackward(new Float32Array(yLen), 2, pg, 1 as unknown as boolean, new Float32Array(100)))
        .to.throw(TypeError, /countIncludePad must be a boolean/);
    });

    it('depthwise conv: wrong lengths and shared memory are errors naming the argument', () => {
      const g = poolGeometry(2, 5, 5, [3, 3], [1, 1, 1, 1], [1, 1], [1, 1], false);
      const x = new Float32Array(2 * 2 * 25), w = new Float32Array(18), y = new Float32Array(2 * 2 * 25);
      for (const kernels of [k, referenceKernels]) {
        expect(() => kernels.depthwiseConvForward(x.subarray(1), w, 2, g, y)).to.throw(RangeError, /x\.length must be batch \* channels \* height \* width = 100/);
        expect(() => kernels.depthwiseConvForward(x, w.subarray(1), 2, g, y)).to.throw(RangeError, /w\.length must be channels \* kernelH \* kernelW = 18/);
        expect(() => kernels.depthwiseConvBackwardInput(y.subarray(1), w, 2, g, x)).to.throw(RangeError, /dy\.length/);
        expect(() => kernels.depthwiseConvBackwardWeight(y, x, 2, g, w.subarray(2))).to.throw(RangeError, /dw\.length/);
      }
      const shared = new Float32Array(200);
      expect(() => k.depthwiseConvForward(shared.subarray(0, 100), w, 2, g, shared.subarray(50, 150))).to.throw(RangeError, /y must not share memory with x/);
    });

    it('nativeKernels: an unknown or unsupported kernel and bad thread counts are RangeErrors', () => {
      expect(() => nativeKernels({ kernel: 'bogus' })).to.throw(RangeError, /options\.kernel/);
      expect(() => nativeKernels({ threads: 0 })).to.throw(RangeError, /options\.threads/);
      expect(nativeKernels({ kernel: 'scalar' }).name).to.equal('native:scalar');
    });
  });

  it('LOWBIT_KERNEL=sgemm:<name> selects the SGEMM kernel; an unknown one is a clear error', () => {
    const cpu = path.resolve(__dirname, '..', '..', 'ts', 'cpu.js');
    const run = (value: string): Record<string, unknown> => {
      const r = spawnSync(process.execPath, ['-e', `const { cpuInfo } = require(${JSON.stringify(cpu)}); const i = cpuInfo();
        console.log(JSON.stringify({ s: i.selectedSgemmKernel, q: i.selected.quantize, e: i.kernelOverrideError }))`],
      { encoding: 'utf8', env: { ...process.env, LOWBIT_KERNEL: value } });
      expect(r.status, r.stderr).to.equal(0);
      return JSON.parse(r.stdout) as Record<string, unknown>;
    };
    expect(run('sgemm:scalar')).to.deep.equal({ s: 'scalar', q: cpuInfo().kernels.quantize[0], e: null });
    expect(run('scalar').s).to.equal('scalar');
    const missing = run('sgemm:neon');
    expect(missing.s).to.equal(null);
    expect(missing.e).to.match(/LOWBIT_KERNEL asks for sgemm kernel 'neon', which does not exist\. Use one of: .*scalar/);
  });
});
