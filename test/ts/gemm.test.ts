// Integer GEMM: bad calls, every kernel against the scalar reference, and
// onnxruntime's MatMulInteger / QLinearMatMul / MatMulIntegerToFloat.
import { expect } from 'chai';

import {
  cpuInfo, matmulInt8, matmulInt8Async, matmulInt8Requantized, matmulInt8ToFloat, packMatrix, PackedMatrix,
} from '../../ts';
import { DataType, matMulIntegerModel, ort, session, singleNodeModel } from '../../ts/bench/ort-models';
import { reportMissingKernels } from '../helpers/kernels';
import { rng } from '../helpers/random';

function bytes(n: number, signed: boolean, seed: number): Int8Array | Uint8Array {
  const r = rng(seed);
  const out = signed ? new Int8Array(n) : new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = Math.floor(r() * 256) - (signed ? 128 : 0);
  return out;
}

function firstDifference(got: ArrayLike<number>, want: ArrayLike<number>): string | undefined {
  if (got.length !== want.length) return `length ${got.length} vs ${want.length}`;
  for (let i = 0; i < want.length; i++) if (got[i] !== want[i]) return `index ${i}: got ${got[i]}, want ${want[i]}`;
  return undefined;
}

describe('matmulInt8: bad input', () => {
  const a = new Uint8Array(6);
  const b = new Int8Array(12);
  it('rejects wrong types and lengths, naming the parameter', () => {
    expect(() => matmulInt8([1] as never, b, 2, 3, 4)).to.throw(TypeError, /Int8Array or Uint8Array for a/);
    expect(() => matmulInt8(a, new Float32Array(12) as never, 2, 3, 4)).to.throw(TypeError, /for b but received Float32Array/);
    expect(() => matmulInt8(a, b, 3, 3, 4)).to.throw(RangeError, /m·k = 9 elements for a/);
    expect(() => matmulInt8(a, b, 2, 3, 5)).to.throw(RangeError, /k·n = 15 elements for b/);
  });
  it('rejects non-integer, negative and overflowing dimensions', () => {
    expect(() => matmulInt8(a, b, 2.5, 3, 4)).to.throw(RangeError, /for m but received 2.5/);
    expect(() => matmulInt8(a, b, 2, -3, 4)).to.throw(RangeError, /for k but received -3/);
    expect(() => matmulInt8(a, b, 2, 3, '4' as never)).to.throw(TypeError, /for n/);
    expect(() => matmulInt8(new Uint8Array(0), new Int8Array(0), 2 ** 30, 0, 2 ** 30)).to.throw(RangeError, /m·n < 2\^32 for m, k, n/);
    expect(() => matmulInt8(new Uint8Array(0), new Int8Array(0), 1, 2 ** 40, 2 ** 20)).to.throw(RangeError, /m·k·n < 2\^53/);
  });
  it('rejects an out array sharing memory with a or b (the scalar reference wrote C over A)', () => {
    const bytes = new Uint8Array(16).fill(1);
    const over = new Int32Array(bytes.buffer);
    for (const kernel of ['scalar', undefined]) {
      expect(() => matmulInt8(bytes.subarray(0, 4), Int8Array.of(1, 2, 3, 4), 2, 2, 2, { out: over, kernel })).to.throw(RangeError, /shares no memory with a or b for options\.out/);
    }
    expect(matmulInt8(Uint8Array.of(1, 1, 1, 1), Int8Array.of(1, 2, 3, 4), 2, 2, 2, { kernel: 'scalar' })).to.deep.equal(Int32Array.of(4, 6, 4, 6));
  });
  it('refuses scales whose product overflows float32 (C = 0 would give NaN, not the zero point)', () => {
    const a = Uint8Array.of(0, 0);
    const b = Int8Array.of(1, 1);
    expect(() => matmulInt8Requantized(a, b, 1, 2, 1, { aScale: 1, bScale: 1, yScale: 1e-45, yZeroPoint: 10, signed: false }))
      .to.throw(RangeError, /a scale large enough that aScale·bScale \/ yScale is a finite float32 for options\.yScale but received 1\.4012.*\. aScale is 1 and options\.bScale 1: use a larger output scale/);
    expect(() => matmulInt8Requantized(a, b, 1, 2, 1, { aScale: 1, bScale: Float32Array.of(1), yScale: 1e-45 }))
      .to.throw(RangeError, /for options\.yScale but received .*aScale is 1 and options\.bScale\[0\] 1: /);
    expect(() => matmulInt8Requantized(a, b, 1, 2, 1, { aScale: 1e20, bScale: 1e20, yScale: 1 }))
      .to.throw(RangeError, /aScale·bScale is a finite float32 for options\.bScale but received 100000002004087730000/);
    expect(() => matmulInt8ToFloat(a, b, 1, 2, 1, { aScale: 1e20, bScale: 1e20 })).to.throw(RangeError, /aScale·bScale is a finite float32/);
    expect(matmulInt8Requantized(a, b, 1, 2, 1, { aScale: 1, bScale: 1, yScale: 1e-30, yZeroPoint: 10, signed: false })).to.deep.equal(Uint8Array.of(10));
  });
  it('rejects zero points outside the element types', () => {
    expect(() => matmulInt8(a, b, 2, 3, 4, { aZeroPoint: 256 })).to.throw(RangeError, /\[0, 255\] for options\.aZeroPoint/);
    expect(() => matmulInt8(new Int8Array(6), b, 2, 3, 4, { aZeroPoint: 128 })).to.throw(RangeError, /\[-128, 127\] for options\.aZeroPoint/);
    expect(() => matmulInt8(a, b, 2, 3, 4, { bZeroPoint: -129 })).to.throw(RangeError, /options\.bZeroPoint/);
    expect(() => matmulInt8(a, b, 2, 3, 4, { bZeroPoint: new Int32Array([0, 0, 0, 200]) })).to.throw(RangeError, /options\.bZeroPoint\[3\]/);
    expect(() => matmulInt8(a, b, 2, 3, 4, { bZeroPoint: new Int32Array(3) })).to.throw(RangeError, /Int32Array of n = 4/);
  });
  it('rejects an out array that is too small and a PackedMatrix of other dimensions', () => {
    expect(() => matmulInt8(a, b, 2, 3, 4, { out: new Int32Array(7) })).to.throw(RangeError, /at least m·n = 8 elements for options\.out/);
    const packed = packMatrix(b, 4, 3);
    expect(() => matmulInt8(a, packed, 2, 3, 4)).to.throw(RangeError, /PackedMatrix of k = 3, n = 4 for b but received a PackedMatrix\. It was packed with k = 4, n = 3/);
    expect(() => matmulInt8(a, b, 2, 3, 4, { kernel: 'gpu' })).to.throw(RangeError, /options\.kernel/);
    expect(() => packMatrix(b, 5, 3)).to.throw(RangeError, /k·n = 15 elements for b/);
    expect(() => new (PackedMatrix as never as new () => unknown)()).to.throw(TypeError, /come from packMatrix/);
  });
  it('zero-sized dimensions give an empty or zero result', () => {
    expect(matmulInt8(new Uint8Array(0), new Int8Array(0), 0, 0, 0).length).to.equal(0);
    expect(Array.from(matmulInt8(new Uint8Array(0), new Int8Array(0), 2, 0, 3, { aZeroPoint: 5, bZeroPoint: 3 }))).to.deep.equal([0, 0, 0, 0, 0, 0]);
    expect(matmulInt8(new Uint8Array(0), new Int8Array(12), 0, 3, 4).length).to.equal(0);
  });
});

describe('matmulInt8: every kernel equals the scalar reference', () => {
  const shapes: Array<[number, number, number]> = [
    [1, 1, 1], [1, 300, 77], [3, 3, 3], [5, 5, 5], [9, 11, 13], [13, 17, 33], [2, 4097, 5], [64, 64, 64], [37, 130, 129],
  ];
  const kernels = cpuInfo().gemmKernels.filter((k) => k !== 'scalar');
  for (const kernel of kernels) {
    it(`${kernel}: odd shapes, int8/uint8 × int8/uint8, zero points at both ends, packed and unpacked B, 1 and 2 threads`, () => {
      let seed = 100;
      for (const [m, k, n] of shapes) {
        for (const aSigned of [false, true]) {
          for (const bSigned of [false, true]) {
            const a = bytes(m * k, aSigned, seed++);
            const b = bytes(k * n, bSigned, seed++);
            const packed = packMatrix(b, k, n);
            const zps: Array<[number, number | Int32Array]> = [
              [0, 0],
              [aSigned ? -128 : 0, bSigned ? 127 : 255],
              [aSigned ? 127 : 255, Int32Array.from({ length: n }, (_, j) => (j % 2 ? (bSigned ? -128 : 0) : bSigned ? 127 : 255))],
            ];
            for (const [aZeroPoint, bZeroPoint] of zps) {
              const want = matmulInt8(a, b, m, k, n, { aZeroPoint, bZeroPoint, kernel: 'scalar' });
              for (const threads of [1, 2]) {
                for (const B of [b, packed]) {
                  const got = matmulInt8(a, B, m, k, n, { aZeroPoint, bZeroPoint, kernel, threads });
                  const diff = firstDifference(got, want);
                  if (diff) expect.fail(`${kernel} ${m}x${k}x${n} a ${aSigned ? 's8' : 'u8'} b ${bSigned ? 's8' : 'u8'} zp ${aZeroPoint}/${bZeroPoint} threads ${threads} ${B === packed ? 'packed' : 'unpacked'}: ${diff}`);
                }
              }
            }
          }
        }
      }
    });
  }
  // Kernels built for x86 that this CPU cannot run are reported as skipped, with the reason.
  reportMissingKernels('gemm', 'matmulInt8');

  it('matmulInt8Async equals matmulInt8, writes into out, and leaves the event loop free', async () => {
    const [m, k, n] = [96, 512, 256];
    const a = bytes(m * k, false, 1);
    const b = packMatrix(bytes(k * n, true, 2), k, n);
    const out = new Int32Array(m * n + 5);
    const got = await matmulInt8Async(a, b, m, k, n, { aZeroPoint: 3, out });
    expect(got.buffer).to.equal(out.buffer);
    expect(got.length).to.equal(m * n);
    expect(firstDifference(got, matmulInt8(a, b, m, k, n, { aZeroPoint: 3 }))).to.equal(undefined);
  });
});

describe('matmulInt8 family against onnxruntime', () => {
  it('MatMulInteger u8×s8 and s8×s8 on random full-range data: identical int32 outputs', async () => {
    for (const [m, k, n, aSigned] of [[17, 300, 65, false], [64, 256, 96, true], [1, 1024, 100, false], [5, 3, 7, true]] as const) {
      const a = bytes(m * k, aSigned, m + k);
      const b = bytes(k * n, true, n) as Int8Array;
      const aZeroPoint = aSigned ? -7 : 131;
      const bZeroPoint = Int8Array.from({ length: n }, (_, j) => (j * 37) % 256 - 128);
      const s = await session(matMulIntegerModel({ signed: aSigned, m, k }, b, n, aZeroPoint, bZeroPoint));
      const want = (await s.run({ a: new (ort().Tensor)(aSigned ? 'int8' : 'uint8', a, [m, k]) })).y.data as Int32Array;
      for (const kernel of cpuInfo().gemmKernels) {
        const got = matmulInt8(a, packMatrix(b, k, n), m, k, n, { aZeroPoint, bZeroPoint: Int32Array.from(bZeroPoint), kernel });
        const diff = firstDifference(got, want);
        if (diff) expect.fail(`${kernel} ${m}x${k}x${n} ${aSigned ? 's8' : 'u8'}×s8: ${diff}`);
      }
    }
  });

  it('QLinearMatMul: identical requantized outputs (per-tensor and per-column B scales)', async () => {
    const [m, k, n] = [23, 70, 31];
    const a = bytes(m * k, false, 5) as Uint8Array;
    const b = bytes(k * n, true, 6) as Int8Array;
    for (const perColumn of [false, true]) {
      const bScale = perColumn ? Float32Array.from({ length: n }, (_, j) => 0.002 + j * 1e-4) : Float32Array.of(0.003);
      const model = singleNodeModel({
        opType: 'QLinearMatMul',
        opset: 21,
        inputs: [{ name: 'a', type: DataType.UINT8, dims: [m, k] }],
        initializers: [
          { name: 'as', type: DataType.FLOAT, dims: [], data: Float32Array.of(0.02) },
          { name: 'az', type: DataType.UINT8, dims: [], data: Uint8Array.of(120) },
          { name: 'b', type: DataType.INT8, dims: [k, n], data: b },
          { name: 'bs', type: DataType.FLOAT, dims: perColumn ? [n] : [], data: bScale },
          { name: 'bz', type: DataType.INT8, dims: perColumn ? [n] : [], data: new Int8Array(perColumn ? n : 1) },
          { name: 'ys', type: DataType.FLOAT, dims: [], data: Float32Array.of(0.05) },
          { name: 'yz', type: DataType.UINT8, dims: [], data: Uint8Array.of(128) },
        ],
        nodeInputs: ['a', 'as', 'az', 'b', 'bs', 'bz', 'ys', 'yz'],
        outputs: [{ name: 'y', type: DataType.UINT8, dims: [m, n] }],
      });
      const want = (await (await session(model)).run({ a: new (ort().Tensor)('uint8', a, [m, k]) })).y.data as Uint8Array;
      const got = matmulInt8Requantized(a, b, m, k, n, {
        aScale: 0.02, aZeroPoint: 120, bScale: perColumn ? bScale : bScale[0], yScale: 0.05, yZeroPoint: 128, signed: false,
      });
      const diff = firstDifference(got, want);
      if (diff) expect.fail(`QLinearMatMul perColumn=${perColumn}: ${diff}`);
    }
  });

  it('MatMulIntegerToFloat (com.microsoft): same floats within one ulp-scale tolerance', async () => {
    const [m, k, n] = [9, 40, 17];
    const a = bytes(m * k, false, 7) as Uint8Array;
    const b = bytes(k * n, true, 8) as Int8Array;
    const bScale = Float32Array.from({ length: n }, (_, j) => 0.01 + j * 1e-3);
    const bias = Float32Array.from({ length: n }, (_, j) => j - 8);
    const model = singleNodeModel({
      opType: 'MatMulIntegerToFloat',
      domain: 'com.microsoft',
      opset: 21,
      inputs: [{ name: 'a', type: DataType.UINT8, dims: [m, k] }],
      initializers: [
        { name: 'b', type: DataType.INT8, dims: [k, n], data: b },
        { name: 'as', type: DataType.FLOAT, dims: [], data: Float32Array.of(0.1) },
        { name: 'bs', type: DataType.FLOAT, dims: [n], data: bScale },
        { name: 'az', type: DataType.UINT8, dims: [], data: Uint8Array.of(3) },
        { name: 'bz', type: DataType.INT8, dims: [n], data: new Int8Array(n) },
        { name: 'bias', type: DataType.FLOAT, dims: [n], data: bias },
      ],
      nodeInputs: ['a', 'b', 'as', 'bs', 'az', 'bz', 'bias'],
      outputs: [{ name: 'y', type: DataType.FLOAT, dims: [m, n] }],
    });
    const want = (await (await session(model)).run({ a: new (ort().Tensor)('uint8', a, [m, k]) })).y.data as Float32Array;
    const got = matmulInt8ToFloat(a, b, m, k, n, { aScale: 0.1, aZeroPoint: 3, bScale, bias });
    const c = matmulInt8(a, b, m, k, n, { aZeroPoint: 3 });
    for (let i = 0; i < want.length; i++) {
      const j = i % n;
      expect(got[i]).to.equal(Math.fround(Math.fround(c[i] * Math.fround(Math.fround(0.1) * bScale[j])) + bias[j]));
      expect(got[i]).to.be.closeTo(want[i], Math.abs(want[i]) * 1e-6 + 1e-6);
    }
  });
});

describe('matmulInt8Requantized and matmulInt8ToFloat semantics', () => {
  it('rounds half to even, saturates, and relu clamps at the zero point', () => {
    // C = [1, 3, 5, -5, 1000]; multiplier 0.5 -> [0.5, 1.5, 2.5, -2.5, 500]
    const a = Int8Array.of(1);
    const b = Int8Array.of(1, 3, 5, -5, 100);
    const y = matmulInt8Requantized(a, b, 1, 1, 5, { aScale: 1, bScale: 0.5, yScale: 1, bZeroPoint: 0 });
    expect(Array.from(y)).to.deep.equal([0, 2, 2, -2, 50]);
    const big = matmulInt8Requantized(Int8Array.of(10), b, 1, 1, 5, { aScale: 1, bScale: 1, yScale: 1 });
    expect(Array.from(big)).to.deep.equal([10, 30, 50, -50, 127]);
    const relu = matmulInt8Requantized(a, b, 1, 1, 5, { aScale: 1, bScale: 1, yScale: 1, yZeroPoint: 10, relu: true });
    expect(Array.from(relu)).to.deep.equal([11, 13, 15, 10, 110]);
    expect(() => matmulInt8Requantized(a, b, 1, 1, 5, { aScale: 1, bScale: 1, yScale: 0 })).to.throw(RangeError, /options\.yScale/);
    expect(() => matmulInt8ToFloat(a, b, 1, 1, 5, { aScale: 1, bScale: new Float32Array(2) })).to.throw(TypeError, /Float32Array of n = 5 for options\.bScale/);
  });
});
