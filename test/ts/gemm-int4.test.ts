// W4A8: packInt4Matrix + matmulInt4.
import { expect } from 'chai';

import { cpuInfo, dequantize, matmulInt4, packInt4Matrix, quantizeTensor } from '../../ts';
import { reportMissingKernels } from '../helpers/kernels';
import { rng } from '../helpers/random';

function weights(k: number, n: number, seed: number): Float32Array {
  const r = rng(seed);
  return Float32Array.from({ length: k * n }, () => (r() - 0.5) * 2);
}

describe('matmulInt4: bad input', () => {
  const w = weights(64, 8, 1);
  it('packInt4Matrix accepts only 4-bit block quantization along k with a power-of-two block >= 16', () => {
    expect(() => packInt4Matrix(quantizeTensor(w, { shape: [64, 8], bits: 8, granularity: 'block', axis: 0, blockSize: 16 }))).to.throw(RangeError, /at most 4 for q\.bits/);
    expect(() => packInt4Matrix(quantizeTensor(w, { shape: [64, 8], bits: 4, granularity: 'channel', axis: 1 }))).to.throw(RangeError, /'block' along axis 0.*q\.granularity/);
    expect(() => packInt4Matrix(quantizeTensor(w, { shape: [64, 8], bits: 4, granularity: 'block', axis: 1, blockSize: 16 }))).to.throw(RangeError, /q\.granularity/);
    expect(() => packInt4Matrix(quantizeTensor(w, { shape: [64, 8], bits: 4, granularity: 'block', axis: 0, blockSize: 24 }))).to.throw(RangeError, /power of two >= 16 for q\.blockSize/);
    expect(() => packInt4Matrix(quantizeTensor(w, { shape: [512], bits: 4, granularity: 'block', axis: 0, blockSize: 16 }))).to.throw(RangeError, /\[k, n\] for q\.shape/);
    const q = quantizeTensor(w, { shape: [64, 8], bits: 4, granularity: 'block', axis: 0, blockSize: 16 });
    q.values[3] = 9;
    expect(() => packInt4Matrix(q)).to.throw(RangeError, /a 4-bit signed code in \[-8, 7\] for q\.values\[3\] but received 9/);
  });
  it('matmulInt4 checks a, b, the dimensions and the scale', () => {
    const b = packInt4Matrix(quantizeTensor(w, { shape: [64, 8], bits: 4, granularity: 'block', axis: 0, blockSize: 16 }));
    const a = new Int8Array(2 * 64);
    expect(() => matmulInt4(a, b, 2, 64, 8, {} as never)).to.throw(TypeError, /options\.aScale/);
    expect(() => matmulInt4(a, b, 2, 32, 8, { aScale: 1 })).to.throw(RangeError, /PackedInt4Matrix of k = 32, n = 8 for b/);
    expect(() => matmulInt4(a, {} as never, 2, 64, 8, { aScale: 1 })).to.throw(TypeError, /PackedInt4Matrix/);
    expect(() => matmulInt4(a.subarray(1), b, 2, 64, 8, { aScale: 1 })).to.throw(RangeError, /m·k = 128 elements for a/);
    expect(() => matmulInt4(a, b, 2, 64, 8, { aScale: 1, aZeroPoint: 200 })).to.throw(RangeError, /options\.aZeroPoint/);
  });
});

describe('matmulInt4: results', () => {
  // The dedicated W4A8 kernel runs with AVX-512 VNNI (and on AMX machines); other kernels take unpacked blocks.
  reportMissingKernels('gemm', 'matmulInt4 (dedicated W4A8)', ['avx512vnni']);
  const cases: Array<[number, number, number, number, boolean, boolean]> = [
    [1, 4096, 40, 32, true, false], [3, 48, 5, 16, false, true], [9, 100, 33, 32, true, true], [16, 256, 64, 128, false, false],
  ];
  it('every kernel gives the scalar reference bit for bit (int4/uint4, symmetric/asymmetric, ragged last block)', () => {
    let seed = 10;
    for (const [m, k, n, blockSize, signed, symmetric] of cases) {
      const q = quantizeTensor(weights(k, n, seed++), { shape: [k, n], bits: 4, signed, symmetric, granularity: 'block', axis: 0, blockSize });
      const b = packInt4Matrix(q);
      const r = rng(seed++);
      const a = Uint8Array.from({ length: m * k }, () => Math.floor(r() * 256));
      const want = matmulInt4(a, b, m, k, n, { aScale: 0.05, aZeroPoint: 128, kernel: 'scalar' });
      for (const kernel of cpuInfo().gemmKernels) {
        for (const threads of [1, 2]) {
          const got = matmulInt4(a, b, m, k, n, { aScale: 0.05, aZeroPoint: 128, kernel, threads });
          for (let i = 0; i < want.length; i++) {
            if (!Object.is(got[i], want[i])) expect.fail(`${kernel} ${m}x${k}x${n} block ${blockSize} threads ${threads}: index ${i}: ${got[i]} vs ${want[i]}`);
          }
        }
      }
    }
  });

  it('matches the float product of the dequantized operands', () => {
    const [m, k, n] = [4, 200, 24];
    const q = quantizeTensor(weights(k, n, 99), { shape: [k, n], bits: 4, granularity: 'block', axis: 0, blockSize: 32 });
    const wq = dequantize(q);
    const r = rng(5);
    const a = Int8Array.from({ length: m * k }, () => Math.floor(r() * 256) - 128);
    const y = matmulInt4(a, packInt4Matrix(q), m, k, n, { aScale: 0.01, aZeroPoint: -3 });
    for (let i = 0; i < m; i++) {
      for (let j = 0; j < n; j++) {
        let s = 0;
        for (let t = 0; t < k; t++) s += (a[i * k + t] + 3) * 0.01 * wq[t * n + j];
        expect(y[i * n + j]).to.be.closeTo(s, 1e-3 * (1 + Math.abs(s)));
      }
    }
  });
});
