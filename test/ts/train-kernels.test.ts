import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';

import { cpuInfo } from '../../ts/cpu';
import { ConvGeometry, FloatKernels, nativeKernels, referenceKernels, SgemmArgs } from '../../ts/train/kernels';

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

const sizes = [0, 1, 2, 3, 5, 7, 13, 17, 31, 33, 64, 65];
const missingReason: Record<string, string> = { avx512: 'no AVX-512F (with VL, DQ)', avx2: 'no AVX2 + FMA' };

describe('train kernels: native float32 SGEMM, im2col/col2im and BatchNormalization vs the TypeScript reference', () => {
  const available = cpuInfo().sgemmKernels;

  it('cpuInfo lists the SGEMM kernels best first, ending with scalar, and the selected one', () => {
    expect(available[available.length - 1]).to.equal('scalar');
    expect(cpuInfo().kernels.sgemm).to.deep.equal(available);
    if (!process.env.LOWBIT_KERNEL) expect(cpuInfo().selectedSgemmKernel).to.equal(available[0]);
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
