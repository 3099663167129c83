// quantizeTensor semantics: ONNX vectors, every kernel bit-exact against the
// scalar reference, layouts, range methods, threads, async.
import { expect } from 'chai';

import {
  cpuInfo, dequantize, integerRange, quantizationError, quantizeTensor, quantizeTensorAsync, type QuantizedTensor,
  type QuantizeOptions,
} from '../../ts';
import { reportMissingKernels } from '../helpers/kernels';
import { laplace, rng, trickyData } from '../helpers/random';

const kernels = cpuInfo().kernels.quantize;
const simdKernels = kernels.filter((k) => k !== 'scalar');

function expectSameValues(got: QuantizedTensor, want: QuantizedTensor, what: string): void {
  expect(got.values.length).to.equal(want.values.length);
  for (let i = 0; i < want.values.length; i++) {
    if (got.values[i] !== want.values[i]) {
      expect.fail(`${what}: first difference at ${i}: got ${got.values[i]}, want ${want.values[i]}`);
    }
  }
  expect(Array.from(got.scale)).to.deep.equal(Array.from(want.scale), `${what}: scales`);
  expect(Array.from(got.zeroPoint)).to.deep.equal(Array.from(want.zeroPoint), `${what}: zero points`);
}

describe('quantizeTensor: ONNX QuantizeLinear semantics', () => {
  const x = new Float32Array([-1.0, -0.3, 0.0, 0.25, 0.75, 1.25, 10.0]);

  it('T2: per-tensor vectors for int8, int4, uint4 and uint8 on every kernel', () => {
    const cases: Array<[Partial<QuantizeOptions>, number[]]> = [
      [{ bits: 8, signed: true, zeroPoint: 0 }, [-2, -1, 0, 0, 2, 2, 20]],
      [{ bits: 4, signed: true, zeroPoint: 0 }, [-2, -1, 0, 0, 2, 2, 7]],
      [{ bits: 4, signed: false, zeroPoint: 8, symmetric: false }, [6, 7, 8, 8, 10, 10, 15]],
      [{ bits: 8, signed: false, zeroPoint: 128, symmetric: false }, [126, 127, 128, 128, 130, 130, 148]],
    ];
    for (const kernel of kernels) {
      for (const [opts, want] of cases) {
        const q = quantizeTensor(x, { shape: [7], scale: 0.5, kernel, ...opts });
        expect(Array.from(q.values), `${kernel} ${JSON.stringify(opts)}`).to.deep.equal(want);
        expect(q.values).to.be.instanceOf(opts.signed ? Int8Array : Uint8Array);
      }
    }
  });

  it('T1: rounds half to even (not like Math.round)', () => {
    const ties = new Float32Array([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 2.4999, 2.5001]);
    for (const kernel of kernels) {
      const q = quantizeTensor(ties, { shape: [9], scale: 1, kernel });
      expect(Array.from(q.values), kernel).to.deep.equal([0, 2, 2, 4, 0, -2, -2, 2, 3]);
    }
  });

  it('saturates ±Infinity and huge values to the ends of the range', () => {
    const big = new Float32Array([Infinity, -Infinity, 3e38, -3e38, 0]);
    for (const kernel of kernels) {
      expect(Array.from(quantizeTensor(big, { shape: [5], scale: 1e-30, kernel }).values)).to.deep.equal([127, -128, 127, -128, 0]);
      expect(Array.from(quantizeTensor(big, { shape: [5], bits: 2, signed: false, scale: 1, kernel }).values)).to.deep.equal([3, 0, 3, 0, 0]);
    }
  });

  it('T4: blocked layout with a ragged last block matches ONNX block_size semantics', () => {
    // T4 dequantizes [[1,2,3,4],[-1,-2,-3,-4]] with block_size 2 along axis 1.
    const q: QuantizedTensor = {
      values: new Int8Array([1, 2, 3, 4, -1, -2, -3, -4]), scale: new Float32Array([0.5, 2.0, 1.0, 0.25]),
      zeroPoint: new Int32Array(4), shape: [2, 4], scaleShape: [2, 2], bits: 8, signed: true,
      granularity: 'block', axis: 1, blockSize: 2,
    };
    for (const kernel of kernels) {
      expect(Array.from(dequantize(q, { kernel }))).to.deep.equal([0.5, 1, 6, 8, -1, -2, -0.75, -1]);
    }
    // Ragged: 5 elements along the axis, block 2 -> 3 blocks, the last of 1 element.
    const x5 = new Float32Array([1, 2, 3, 4, 5, -1, -2, -3, -4, -50]);
    const b = quantizeTensor(x5, { shape: [2, 5], granularity: 'block', axis: 1, blockSize: 2 });
    expect(b.scaleShape).to.deep.equal([2, 3]);
    expect(Array.from(b.scale)).to.deep.equal([2 / 127, 4 / 127, 5 / 127, 2 / 127, 4 / 127, 50 / 127].map(Math.fround));
    expect(Array.from(b.values)).to.deep.equal([64, 127, 95, 127, 127, -64, -127, -95, -127, -127]);
  });
});

describe('quantizeTensor: every SIMD kernel equals the scalar reference', () => {
  reportMissingKernels('quantize', 'quantizeTensor');

  for (const kernel of simdKernels) {
    it(`${kernel}: every length 0..1024, ties, saturation, ±Inf, extreme scales, all bit widths`, () => {
      const scales = [0.5, 0.1, 1e-30, 1e30];
      for (let n = 0; n <= 1024; n++) {
        const scale = scales[n % scales.length];
        const bits = 2 + (n % 7);
        const signed = n % 2 === 0;
        const { qmin, qmax } = integerRange(bits, signed);
        const x = trickyData(n, scale, n);
        const zeroPoint = n % 3 === 0 ? qmin : n % 3 === 1 ? qmax : 0;
        const base = { shape: [n], bits, signed, scale, zeroPoint: signed ? 0 : zeroPoint, symmetric: false };
        expectSameValues(quantizeTensor(x, { ...base, kernel }), quantizeTensor(x, { ...base, kernel: 'scalar' }), `n=${n} bits=${bits} signed=${signed}`);
        if (signed && zeroPoint !== 0) {
          const zp = { ...base, zeroPoint };
          expectSameValues(quantizeTensor(x, { ...zp, kernel }), quantizeTensor(x, { ...zp, kernel: 'scalar' }), `n=${n} zp=${zeroPoint}`);
        }
        expect(qmin).to.be.lessThan(qmax);
      }
    });

    it(`${kernel}: minmax and mse parameters, per-channel and blocked layouts with ragged blocks`, () => {
      const shapes: Array<[number[], Partial<QuantizeOptions>]> = [
        [[7, 33], { granularity: 'channel', axis: 0 }],
        [[33, 7], { granularity: 'channel', axis: 1 }],
        [[3, 5, 11], { granularity: 'channel', axis: 1 }],
        [[3, 37], { granularity: 'block', axis: 1, blockSize: 8 }],
        [[37, 3], { granularity: 'block', axis: 0, blockSize: 16 }],
        [[2, 9, 5], { granularity: 'block', axis: -2, blockSize: 4 }],
        [[1001], {}],
      ];
      let seed = 1;
      for (const [shape, layout] of shapes) {
        for (const method of ['minmax', 'mse']) {
          for (const [bits, signed, symmetric] of [[8, true, true], [4, false, false], [2, true, false]] as const) {
            const n = shape.reduce((a, b) => a * b, 1);
            const x = laplace(n, seed++);
            const opts: QuantizeOptions = { shape, bits, signed, symmetric, method, ...layout };
            const want = quantizeTensor(x, { ...opts, kernel: 'scalar' });
            expectSameValues(quantizeTensor(x, { ...opts, kernel }), want, `${JSON.stringify(opts)}`);
            expect(Array.from(dequantize(want, { kernel }))).to.deep.equal(Array.from(dequantize(want, { kernel: 'scalar' })));
          }
        }
      }
    });
  }
});

describe('quantizeTensor: ranges, scales and zero points', () => {
  it('T14: asymmetric uint8 over [-1, 3] gives scale 4/255 and zero point 64; symmetric int8 gives max|x|/127', () => {
    const x = new Float32Array([-1, 0.5, 3]);
    const a = quantizeTensor(x, { shape: [3], signed: false, symmetric: false });
    expect(a.scale[0]).to.equal(Math.fround(4 / 255));
    expect(a.zeroPoint[0]).to.equal(64);
    const s = quantizeTensor(x, { shape: [3] });
    expect(s.scale[0]).to.equal(Math.fround(3 / 127));
    expect(s.zeroPoint[0]).to.equal(0);
    expect(Array.from(s.values)).to.deep.equal([-42, 21, 127]);
  });

  it('keeps zero exactly representable, and ignores ±Infinity when estimating ranges', () => {
    const x = new Float32Array([2, 3, 5, Infinity, -Infinity]);
    const q = quantizeTensor(x, { shape: [5], signed: false, symmetric: false });
    expect(q.zeroPoint[0]).to.equal(0);
    expect(q.scale[0]).to.equal(Math.fround(5 / 255));
    expect(Array.from(q.values)).to.deep.equal([102, 153, 255, 255, 0]);
    expect(dequantize(quantizeTensor(new Float32Array([0, -1, 4]), { shape: [3], symmetric: false }))[0]).to.equal(0);
  });

  for (const method of ['minmax', 'mse']) {
    it(`${method}: all-zero and constant groups get finite scales and exact values`, () => {
      const x = new Float32Array([0, 0, 0, 0, 2.5, 2.5, 2.5, 2.5, -7, -7, -7, -7]);
      for (const symmetric of [true, false]) {
        const q = quantizeTensor(x, { shape: [3, 4], granularity: 'channel', method, symmetric });
        for (const s of q.scale) expect(Number.isFinite(s) && s > 0).to.equal(true);
        expect(q.scale[0]).to.equal(1);
        const back = Array.from(dequantize(q));
        expect(back.slice(0, 4)).to.deep.equal([0, 0, 0, 0]);
        for (let i = 4; i < 12; i++) expect(back[i]).to.be.closeTo(x[i], q.scale[Math.floor(i / 4)] / 2);
      }
      const zeros = quantizeTensor(new Float32Array(10), { shape: [10], method });
      expect(Array.from(zeros.values)).to.deep.equal(new Array(10).fill(0));
    });
  }

  it('mse beats minmax on heavy-tailed data at 4 bits and is never worse', () => {
    const x = laplace(50_000, 11);
    const opts = { shape: [x.length], bits: 4 } as const;
    const e1 = quantizationError(x, quantizeTensor(x, { ...opts, method: 'minmax' }));
    const e2 = quantizationError(x, quantizeTensor(x, { ...opts, method: 'mse' }));
    expect(e2.mse).to.be.lessThan(e1.mse * 0.8);
    expect(e2.clippedFraction).to.be.greaterThan(0);
    const w = laplace(64 * 100, 12);
    const c1 = quantizeTensor(w, { shape: [64, 100], granularity: 'channel', bits: 4 });
    const c2 = quantizeTensor(w, { shape: [64, 100], granularity: 'channel', bits: 4, method: 'mse' });
    expect(quantizationError(w, c2).mse).to.be.lessThan(quantizationError(w, c1).mse);
  });

  it('zero-length input returns an empty result', () => {
    const q = quantizeTensor(new Float32Array(0), { shape: [0] });
    expect(q.values.length).to.equal(0);
    expect(q.scale.length).to.equal(1);
    expect(dequantize(q).length).to.equal(0);
    const c = quantizeTensor(new Float32Array(0), { shape: [0, 4], granularity: 'channel', axis: 1, method: 'mse' });
    expect(c.scale.length).to.equal(4);
    expect(quantizationError(new Float32Array(0), c)).to.deep.equal({ mse: 0, sqnrDb: Infinity, maxAbsError: 0, clippedFraction: 0 });
  });
});

describe('quantizeTensor: threads and async', () => {
  const x = laplace((1 << 20) + 3, 21);

  for (const method of ['minmax', 'mse']) {
    it(`${method}: identical results for 1 and 2 threads (per tensor, per channel, blocked)`, () => {
      const layouts: QuantizeOptions[] = [
        { shape: [x.length], method, bits: 4 },
        { shape: [1, x.length], granularity: 'channel', axis: 0, method },
        { shape: [x.length], granularity: 'block', axis: 0, blockSize: 64, method, symmetric: false, signed: false },
      ];
      for (const opts of layouts) {
        expectSameValues(quantizeTensor(x, { ...opts, threads: 2 }), quantizeTensor(x, { ...opts, threads: 1 }), JSON.stringify(opts));
      }
    });
  }

  it('quantizeTensorAsync gives the same result as quantizeTensor and does not block the event loop', async () => {
    // 16 M values for minmax: long enough (tens of ms) for the event loop to turn while the threads work.
    const large = Float32Array.from({ length: 1 << 24 }, (_, i) => Math.sin(i * 0.001) * 3);
    for (const [method, input] of [['minmax', large], ['mse', x]] as const) {
      const opts = { shape: [input.length], method, bits: 3 };
      let ticks = 0;
      const timer = setInterval(() => ticks++, 0);
      const pending = quantizeTensorAsync(input, opts);
      const got = await pending;
      clearInterval(timer);
      expectSameValues(got, quantizeTensor(input, opts), method);
      expect(ticks, `event loop ticks while ${method} ran`).to.be.greaterThan(0);
    }
    // The histogram methods (their NaN and min/max pass on a worker thread too) and ACIQ, per channel.
    const channels = Float32Array.from({ length: 32 * 500 }, (_, i) => Math.sin(i * 0.37) * (1 + (i % 500 === 7 ? 40 : 0)));
    for (const method of ['percentile', 'kl', 'aciq'] as const) {
      const opts = { shape: [32, 500], granularity: 'channel' as const, axis: 0, method, bits: 4 };
      expectSameValues(await quantizeTensorAsync(channels, opts), quantizeTensor(channels, opts), method);
    }
  });
});

describe('dequantize and quantizationError', () => {
  it('dequantize is (q - zeroPoint) · scale and the error is at most scale/2 inside the range', () => {
    const r = rng(3);
    const x = Float32Array.from({ length: 5000 }, () => r() * 10 - 3);
    for (const opts of [{ bits: 8 }, { bits: 4, symmetric: false }, { bits: 2, signed: false, symmetric: false }]) {
      const q = quantizeTensor(x, { shape: [50, 100], granularity: 'channel', axis: 1, ...opts });
      const back = dequantize(q);
      for (let i = 0; i < x.length; i++) {
        const c = i % 100;
        expect(back[i]).to.equal(Math.fround((q.values[i] - q.zeroPoint[c]) * q.scale[c]));
        expect(Math.abs(back[i] - x[i])).to.be.at.most(q.scale[c] / 2 + 1e-6);
      }
    }
  });

  it('reports mse, SQNR, max error and the clipped fraction', () => {
    const x = new Float32Array([0.1, -0.2, 1.0, Infinity]);
    const q = quantizeTensor(x, { shape: [4], scale: 0.25, bits: 2 }); // codes in [-2, 1]
    // dequantized: 0, -0.25, 0.25 (clipped), +Inf -> 0.25 (clipped)
    const e = quantizationError(x, q);
    const errs = [0.1, 0.05, 0.75].map((v) => Math.fround(v));
    const x32 = [0.1, -0.2, 1.0].map((v) => Math.fround(v));
    const sse = [Math.fround(0.1) - 0, Math.fround(-0.2) + 0.25, 0.75].reduce((a, b) => a + b * b, 0);
    expect(e.mse).to.be.closeTo(sse / 3, 1e-12);
    expect(e.maxAbsError).to.be.closeTo(errs[2], 1e-12);
    expect(e.sqnrDb).to.be.closeTo(10 * Math.log10(x32.reduce((a, b) => a + b * b, 0) / sse), 1e-9);
    expect(e.clippedFraction).to.equal(0.5);
  });
});
