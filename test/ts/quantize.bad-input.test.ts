// Bad calls first: every rejected input gets a TypeError/RangeError naming the parameter.
import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import { runInNewContext } from 'node:vm';

import {
  ActivationScaleClip, aciqExpectedMse, aciqRange, allocateBits, dequantize, foldScalesIntoBatchNorm, HistogramObserver, integerRange, lambertW0, lsqLevels,
  matmulInt4, matmulInt8, matmulInt8Async, matmulInt8Requantized, matmulInt8ToFloat, MinMaxObserver, packInt4Matrix, quantizationError, quantizeTensor,
  quantizeTensorAsync, rangeMethodNames, registerRangeMethod, scaleClip, tensorStats, type QuantizeOptions,
} from '../../ts';
import { native } from '../../ts/native';

function expectError(fn: () => unknown, type: ErrorConstructor, pattern: RegExp): void {
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  expect(caught, `expected ${type.name} matching ${pattern}`).to.be.instanceOf(type);
  expect((caught as Error).message).to.match(pattern);
}

const x4 = new Float32Array([1, 2, 3, 4]);

describe('quantizeTensor: bad input', () => {
  it('rejects data that is not a Float32Array, naming data and how to convert', () => {
    expectError(() => quantizeTensor([1, 2] as never, { shape: [2] }), TypeError, /for data but received \[1, 2\].*Float32Array\.from/);
    expectError(() => quantizeTensor(new Float64Array(2) as never, { shape: [2] }), TypeError, /Float32Array for data but received Float64Array/);
    expectError(() => quantizeTensor(null as never, { shape: [2] }), TypeError, /for data but received null/);
  });

  it('rejects missing options, a missing shape and a shape that does not match data.length', () => {
    expectError(() => quantizeTensor(x4, undefined as never), TypeError, /for options but received undefined/);
    expectError(() => quantizeTensor(x4, {} as never), TypeError, /for options\.shape but received undefined/);
    expectError(() => quantizeTensor(x4, { shape: [3] }), RangeError, /data\.length = 4 for options\.shape/);
    expectError(() => quantizeTensor(x4, { shape: [2, -2] }), RangeError, /options\.shape\[1\]/);
    expectError(() => quantizeTensor(x4, { shape: [2, 2.5] }), RangeError, /options\.shape\[1\]/);
    expectError(() => quantizeTensor(x4, { shape: [2 ** 30, 2 ** 30, 2 ** 30] }), RangeError, /safe integer for options\.shape/);
  });

  it('rejects bits outside 2..8 and non-integer bits', () => {
    for (const bits of [1, 9, 0, 2.5, -8]) {
      expectError(() => quantizeTensor(x4, { shape: [4], bits }), RangeError, /integer in \[2, 8\] for options\.bits/);
    }
    expectError(() => quantizeTensor(x4, { shape: [4], bits: '8' as never }), TypeError, /options\.bits but received "8"/);
  });

  it('rejects a bad granularity, axis or blockSize, with a hint', () => {
    expectError(() => quantizeTensor(x4, { shape: [4], granularity: 'Channel' as never }), RangeError, /options\.granularity.*Did you mean 'channel'/);
    expectError(() => quantizeTensor(x4, { shape: [2, 2], granularity: 'channel', axis: 2 }), RangeError, /options\.axis but received 2/);
    expectError(() => quantizeTensor(x4, { shape: [2, 2], granularity: 'channel', axis: -3 }), RangeError, /options\.axis/);
    expectError(() => quantizeTensor(x4, { shape: [4], axis: 0 }), RangeError, /options\.axis.*granularity 'channel', 'block' or 'group'/);
    expectError(() => quantizeTensor(x4, { shape: [4], granularity: 'block', blockSize: 0 }), RangeError, /options\.blockSize but received 0/);
    expectError(() => quantizeTensor(x4, { shape: [4], granularity: 'channel', blockSize: 2 }), RangeError, /options\.blockSize/);
    expectError(() => quantizeTensor(new Float32Array(1), { shape: [], granularity: 'channel' }), RangeError, /at least one dimension/);
  });

  it('refuses a tensor with no values but billions of channels (its parameters alone would exhaust memory)', () => {
    for (const channels of [2 ** 31, 2 ** 40]) {
      expectError(() => quantizeTensor(new Float32Array(0), { shape: [0, channels], granularity: 'channel', axis: 1 }), RangeError,
        /at most 16777216 channels \(or groups\) along axis 1 for a tensor with no values for options\.shape/);
    }
    expect(quantizeTensor(new Float32Array(0), { shape: [0, 64], granularity: 'channel', axis: 1 }).scale).to.have.length(64);
  });

  it('refuses a range-method option the chosen built-in method would ignore, or any with an explicit scale (audit)', () => {
    expectError(() => quantizeTensor(x4, { shape: [4], percentile: 50 }), RangeError,
      /no percentile with method 'minmax' \(only 'percentile' reads it\) for options\.percentile but received 50\. Set options\.method to 'percentile'/);
    expectError(() => quantizeTensor(x4, { shape: [4], method: 'mse', prior: 'gauss' }), RangeError, /no prior with method 'mse' \(only 'aciq' reads it\)/);
    expectError(() => quantizeTensor(x4, { shape: [4], method: 'aciq', norm: 1 }), RangeError, /no norm with method 'aciq' \(only 'mse' reads it\)/);
    expectError(() => quantizeTensor(x4, { shape: [4], method: 'kl', oneSided: true }), RangeError, /options\.oneSided/);
    expectError(() => quantizeTensor(x4, { shape: [4], scale: 0.1, percentile: 99 }), RangeError, /no percentile with an explicit scale for options\.percentile/);
    // The methods that read them still take them.
    expect(quantizeTensor(x4, { shape: [4], method: 'percentile', percentile: 50 }).scale[0]).to.be.greaterThan(0);
    expect(quantizeTensor(x4, { shape: [4], method: 'mse', norm: 1 }).scale[0]).to.be.greaterThan(0);
  });

  it('rejects misspelled options with the right name', () => {
    expectError(() => quantizeTensor(x4, { shape: [4], granularity: 'block', blocksize: 2 } as never), RangeError, /options\.blocksize.*Did you mean 'blockSize'/);
    expectError(() => quantizeTensor(x4, { shape: [4], bitz: 4 } as never), RangeError, /options\.bitz but received "bitz"\. Did you mean 'bits'\?/);
    expectError(() => quantizeTensor(x4, { shape: [4], zzz: 4 } as never), RangeError, /options\.zzz.*Known options/);
  });

  it('names the first NaN in the data', () => {
    const x = new Float32Array(100_000).fill(1);
    x[77_777] = NaN;
    x[88_888] = NaN;
    expectError(() => quantizeTensor(x, { shape: [x.length] }), RangeError, /data\[77777\] but received NaN/);
    expectError(() => quantizeTensor(x, { shape: [x.length], method: 'mse' }), RangeError, /data\[77777\]/);
    expectError(() => quantizeTensor(x, { shape: [x.length], scale: 0.1 }), RangeError, /data\[77777\]/);
  });

  it('rejects non-positive, non-finite and float32-underflowing scales', () => {
    for (const scale of [0, -1, NaN, Infinity, 1e-50, 1e39]) {
      expectError(() => quantizeTensor(x4, { shape: [4], scale }), RangeError, /positive finite float32 number for options\.scale\[0\]/);
    }
    expectError(() => quantizeTensor(x4, { shape: [2, 2], granularity: 'channel', scale: [1] }), RangeError, /2 values \(scale shape \[2\]\) for options\.scale/);
    expectError(() => quantizeTensor(x4, { shape: [4], scale: 'x' as never }), TypeError, /options\.scale/);
  });

  it('rejects zero points outside the integer range, or without a scale', () => {
    expectError(() => quantizeTensor(x4, { shape: [4], bits: 4, scale: 1, zeroPoint: 8 }), RangeError, /integer in \[-8, 7\] for options\.zeroPoint\[0\]/);
    expectError(() => quantizeTensor(x4, { shape: [4], signed: false, scale: 1, zeroPoint: -1 }), RangeError, /\[0, 255\] for options\.zeroPoint\[0\]/);
    expectError(() => quantizeTensor(x4, { shape: [4], zeroPoint: 1 }), RangeError, /options\.zeroPoint.*Pass scale too/);
    expectError(() => quantizeTensor(x4, { shape: [4], scale: 1, zeroPoint: 3, symmetric: true }), RangeError, /options\.symmetric/);
  });

  it('rejects unknown methods (listing the known ones) and method together with scale', () => {
    expectError(() => quantizeTensor(x4, { shape: [4], method: 'magic' }), RangeError, /one of 'minmax', 'mse'.*options\.method but received "magic"/);
    expectError(() => quantizeTensor(x4, { shape: [4], method: 3 as never }), TypeError, /options\.method/);
    expectError(() => quantizeTensor(x4, { shape: [4], method: 'mse', scale: 1 }), RangeError, /no method with an explicit scale/);
  });

  it('rejects unknown or unsupported kernels and bad thread counts', () => {
    expectError(() => quantizeTensor(x4, { shape: [4], kernel: 'cuda' }), RangeError, /options\.kernel but received "cuda"/);
    expectError(() => quantizeTensor(x4, { shape: [4], threads: 0 }), RangeError, /options\.threads/);
    expectError(() => quantizeTensor(x4, { shape: [4], threads: 1.5 }), RangeError, /options\.threads/);
  });

  it('rejects a detached buffer', () => {
    const x = new Float32Array(8);
    structuredClone(x.buffer, { transfer: [x.buffer] });
    expectError(() => quantizeTensor(x, { shape: [8] }), TypeError, /data.*detached/);
  });

  it('quantizeTensorAsync rejects (not throws) on bad input', async () => {
    const p = quantizeTensorAsync(x4, { shape: [5] } as QuantizeOptions);
    expect(p).to.be.instanceOf(Promise);
    let caught: unknown;
    await p.catch((e) => (caught = e));
    expect(caught).to.be.instanceOf(RangeError);
    const nan = new Float32Array([1, NaN]);
    await quantizeTensorAsync(nan, { shape: [2] }).then(() => expect.fail('resolved'), (e) => expect((e as Error).message).to.match(/data\[1\]/));
  });
});

describe('dequantize / quantizationError: bad input', () => {
  const good = () => quantizeTensor(new Float32Array([0, 1, 2, 3]), { shape: [2, 2], granularity: 'channel', axis: 1 });

  it('rejects things that are not quantized tensors', () => {
    expectError(() => dequantize(null as never), TypeError, /QuantizedTensor.*for q but received null/);
    expectError(() => dequantize({ ...good(), values: new Uint8Array(4) }), TypeError, /Int8Array \(signed is true\) for q\.values/);
    expectError(() => dequantize({ ...good(), shape: [3] }), RangeError, /q\.shape/);
    expectError(() => dequantize({ ...good(), scale: new Float32Array(1) }), TypeError, /Float32Array of 2 scales for q\.scale/);
    expectError(() => dequantize({ ...good(), scale: new Float32Array([1, 0]) }), RangeError, /q\.scale\[1\]/);
    expectError(() => dequantize({ ...good(), zeroPoint: new Int32Array([0, 200]) }), RangeError, /q\.zeroPoint\[1\]/);
    expectError(() => dequantize({ ...good(), axis: 5 }), RangeError, /q\.axis/);
    expectError(() => dequantize(good(), { kernel: 'nope' }), RangeError, /options\.kernel/);
  });

  it('refuses codes their bits cannot hold, naming the first one (channel widths with bit allocation)', () => {
    const q4 = quantizeTensor(Float32Array.from({ length: 37 }, (_, i) => i - 18), { shape: [37], bits: 4 });
    expect(dequantize(q4)).to.have.length(37);
    const values = q4.values.slice();
    values[29] = 100;
    values[33] = -9;
    expectError(() => dequantize({ ...q4, values }), RangeError, /a 4-bit signed code in \[-8, 7\] for q\.values\[29\] but received 100\. Its width is q\.bits: build values with quantizeTensor/);
    expectError(() => quantizationError(new Float32Array(37), { ...q4, values }), RangeError, /q\.values\[29\]/);
    values[29] = 7;
    expectError(() => dequantize({ ...q4, values }), RangeError, /for q\.values\[33\] but received -9/);
    const u2 = quantizeTensor(new Float32Array([0, 1, 2, 3]), { shape: [4], bits: 2, signed: false });
    expectError(() => dequantize({ ...u2, values: Uint8Array.of(0, 4, 1, 2) }), RangeError, /a 2-bit unsigned code in \[0, 3\] for q\.values\[1\] but received 4/);
    expect(Array.from(dequantize({ ...u2, bits: 8 }))).to.deep.equal(Array.from(dequantize(u2)));
    // Bit allocation: channel 1 of a [3, 2] tensor (axis 1) has 2 bits, so 2 fits channel 0 (4 bits) but not channel 1.
    const allocated = { ...quantizeTensor(new Float32Array(6), { shape: [3, 2], granularity: 'channel', axis: 1, bits: 4 }), channelBits: Uint8Array.of(4, 2) };
    expect(dequantize({ ...allocated, values: Int8Array.of(0, 0, 2, 1, 7, -2) })).to.have.length(6);
    expectError(() => dequantize({ ...allocated, values: Int8Array.of(0, 0, 2, 2, 7, -2) }), RangeError, /a 2-bit signed code in \[-2, 1\] for q\.values\[3\] but received 2\. Its width is q\.channelBits\[1\]/);
  });

  it('quantizationError checks the original against the quantized tensor', () => {
    expectError(() => quantizationError(new Float32Array(3), good()), RangeError, /length 4.*for original/);
    expectError(() => quantizationError([0, 1, 2, 3] as never, good()), TypeError, /for original/);
  });
});

describe('out arrays: bad input and reuse', () => {
  it('rejects an out array of the wrong type or length, or overlapping the input', () => {
    const x = new Float32Array(8);
    expectError(() => quantizeTensor(x, { shape: [8], out: new Uint8Array(8) }), TypeError, /Int8Array of length 8 for options\.out/);
    expectError(() => quantizeTensor(x, { shape: [8], out: new Int8Array(7) }), TypeError, /options\.out/);
    expectError(() => quantizeTensor(x, { shape: [8], out: new Int8Array(x.buffer, 4, 8) }), RangeError, /does not share memory.*options\.out/);
    const q = quantizeTensor(x, { shape: [8] });
    expectError(() => dequantize(q, { out: new Float32Array(3) }), TypeError, /Float32Array of length 8 for options\.out/);
  });

  it('writes into the given arrays and returns them', () => {
    const x = new Float32Array([0.5, -1, 2]);
    const out = new Int8Array(3);
    const q = quantizeTensor(x, { shape: [3], scale: 0.5, out });
    expect(q.values).to.equal(out);
    expect(Array.from(out)).to.deep.equal([1, -2, 4]);
    const f = new Float32Array(3);
    expect(dequantize(q, { out: f })).to.equal(f);
    expect(Array.from(f)).to.deep.equal([0.5, -1, 2]);
  });
});

describe('shared memory', () => {
  it('accepts typed arrays over a SharedArrayBuffer (and gives the same result as over an ArrayBuffer)', async () => {
    const shared = new Float32Array(new SharedArrayBuffer(4 * 1000));
    for (let i = 0; i < shared.length; i++) shared[i] = Math.sin(i) * 3;
    const plain = Float32Array.from(shared);
    const a = quantizeTensor(shared, { shape: [1000], bits: 4, method: 'mse' });
    const b = quantizeTensor(plain, { shape: [1000], bits: 4, method: 'mse' });
    expect(Array.from(a.values)).to.deep.equal(Array.from(b.values));
    const c = await quantizeTensorAsync(shared, { shape: [1000] });
    expect(Array.from(c.values)).to.deep.equal(Array.from(quantizeTensor(plain, { shape: [1000] }).values));
    const sa = new Int8Array(new SharedArrayBuffer(6)).fill(3);
    const sb = new Int8Array(new SharedArrayBuffer(6)).fill(-2);
    expect(Array.from(matmulInt8(sa, sb, 2, 3, 2))).to.deep.equal([-18, -18, -18, -18]);
  });
});

describe('async calls while the caller moves its buffers', () => {
  // Each case in its own process: before the inputs were copied, the native threads read freed memory (a crash).
  const run = (code: string): { status: number | null; stdout: string; stderr: string } => {
    const index = require.resolve('../../ts');
    const r = spawnSync(process.execPath, ['--expose-gc', '-e', `const L = require(${JSON.stringify(index)});\n${code}`], { encoding: 'utf8' });
    return { status: r.status, stdout: r.stdout, stderr: r.stderr };
  };

  it('quantizeTensorAsync gives the result of the data as they were when the call started (transferred, or resized to 0)', () => {
    for (const move of [
      'let moved = structuredClone(x.buffer, { transfer: [x.buffer] }); moved = null; for (let i = 0; i < 5; i++) gc();',
      'x.buffer.resize(0);',
    ]) {
      const r = run(`const n = 1 << 22;
        const x = new Float32Array(new ArrayBuffer(n * 4, { maxByteLength: n * 4 }));
        for (let i = 0; i < n; i++) x[i] = Math.sin(i) * 3;
        const expected = L.quantizeTensor(x, { shape: [n], method: 'mse' });
        const p = L.quantizeTensorAsync(x, { shape: [n], method: 'mse' });
        ${move}
        p.then((q) => console.log(q.scale[0] === expected.scale[0] && q.values.every((v, i) => v === expected.values[i]) ? 'same' : 'different'));`);
      expect(r.status, r.stderr).to.equal(0);
      expect(r.stdout.trim()).to.equal('same');
    }
  });

  it('matmulInt8Async computes on its copies of a and b; an out array moved meanwhile is an error naming options.out', () => {
    const r = run(`const m = 256, k = 4096, n = 4096;  // B of 16 MB: freed memory of that size is unmapped
      const a = new Uint8Array(m * k).fill(3), b = new Int8Array(k * n).fill(-2);
      const p = L.matmulInt8Async(a, b, m, k, n);
      let moved = structuredClone(b.buffer, { transfer: [b.buffer] }); moved = null; for (let i = 0; i < 3; i++) gc();
      p.then((c) => console.log(c.every((v) => v === k * 3 * -2) ? 'right' : 'wrong'));
      const out = new Int32Array(m * n);
      const q = L.matmulInt8Async(new Uint8Array(m * k), new Int8Array(k * n), m, k, n, { out });
      structuredClone(out.buffer, { transfer: [out.buffer] });
      q.then(() => console.log('resolved'), (e) => console.log(e.message));`);
    expect(r.status, r.stderr).to.equal(0);
    expect(r.stdout).to.match(/^right$/m);
    expect(r.stdout).to.match(/still attached when the work ended for options\.out .*transferred or resized while matmulInt8Async ran/);
  });
});

describe('matmulInt8Async and Node Buffers', () => {
  it('copies a and b given as Buffers (whose slice() is a view): writing into them after the call leaves the result alone', async () => {
    // (The write comes before the worker thread reads the inputs: with views, 20 of 20 such calls went wrong here.)
    const [m, k, n] = [64, 512, 64];
    for (let i = 0; i < 5; i++) {
      const a = Buffer.alloc(m * k, 3);
      const b = Buffer.alloc(k * n, 2);
      const p = matmulInt8Async(a, b, m, k, n);
      a.fill(5);
      b.fill(7);
      expect((await p).every((v) => v === k * 3 * 2)).to.equal(true);
    }
  });
});

describe('quantizationError on bit-allocated tensors and NaN', () => {
  it('counts clipped values against each channel\'s own width, and refuses NaN in original', () => {
    const data = Float32Array.from({ length: 4 * 64 }, (_, i) => Math.sin(i * 1.7) * (1 + (i % 4)) * (i % 13 === 0 ? 6 : 1));
    const q = quantizeTensor(data, { shape: [64, 4], granularity: 'channel', axis: 1, method: 'mse', bitAllocation: { averageBits: 3 } });
    expect(new Set(q.channelBits)).to.have.length.above(1);
    // Reference: per element, round(x / scale_c) + zp_c outside channel c's range.
    let clipped = 0;
    data.forEach((x, i) => {
      const c = i % 4;
      const { qmin, qmax } = integerRange(q.channelBits![c], q.signed);
      const r = x / q.scale[c];
      const rounded = Math.abs(r % 1) === 0.5 ? 2 * Math.round(r / 2) : Math.round(r);
      if (rounded + q.zeroPoint[c] < qmin || rounded + q.zeroPoint[c] > qmax) clipped++;
    });
    expect(clipped).to.be.above(0);
    expect(quantizationError(data, q).clippedFraction).to.equal(clipped / data.length);
    const withNaN = data.slice();
    withNaN[7] = NaN;
    expectError(() => quantizationError(withNaN, q), RangeError, /for original\[7\] but received NaN/);
    expectError(() => quantizationError(data, { ...q, channelBits: Uint8Array.of(2, 3) }), RangeError, /Uint8Array of 4 widths in \[2, 4\].* for q\.channelBits/);
  });

  it('a typed array from another realm is named as such', () => {
    const foreign = runInNewContext('new Float32Array([1, 2, 3])');
    expectError(() => quantizeTensor(foreign, { shape: [3] }), TypeError, /comes from another JavaScript realm .* new Float32Array\(array\)/);
    expectError(() => matmulInt8(runInNewContext('new Uint8Array(1)'), new Int8Array(1), 1, 1, 1), TypeError, /comes from another JavaScript realm/);
  });
});

describe('method helpers and observers: malformed arguments', () => {
  const detached = () => {
    const x = new Float32Array(4);
    structuredClone(x.buffer, { transfer: [x.buffer] });
    return x;
  };
  const w = Float32Array.of(0.5, -1, 2, 0.25);
  // Each was a JavaScript internals error (or a silent NaN) before it was checked (found by an API fuzz probe).
  it('name the parameter for wrong types, null options and detached arrays', () => {
    expectError(() => integerRange(Symbol('b') as never, true), TypeError, /an integer in \[1, 32\] for bits but received a Symbol/);
    expectError(() => integerRange(3.5, true), RangeError, /for bits but received 3\.5/);
    expectError(() => integerRange(8, 'yes' as never), TypeError, /a boolean for signed/);
    expectError(() => lsqLevels(4n as never, true), TypeError, /for bits but received 4 \(bigint\)/);
    expectError(() => lambertW0('1' as never), TypeError, /a number for x but received "1"/);
    expectError(() => aciqExpectedMse('laplace', -1, 1, 4), RangeError, /for alpha but received -1/);
    expectError(() => aciqExpectedMse('cauchy' as never, 1, 1, 4), RangeError, /'laplace', 'gauss' for prior/);
    expectError(() => aciqRange(undefined as never, 4, 'auto', false), TypeError, /numbers tensorStats\(\) returns for stats but received undefined/);
    expectError(() => aciqRange(tensorStats(w), 4, 'auto', 'no' as never), TypeError, /a boolean for oneSided/);
    expectError(() => tensorStats(null as never), TypeError, /an array or typed array of numbers for x but received null/);
    expectError(() => tensorStats(detached()), TypeError, /x.*detached/);
    expectError(() => new MinMaxObserver(null as never), TypeError, /an options object \(or nothing\) for options but received null/);
    expectError(() => new HistogramObserver(null as never), TypeError, /for options but received null/);
    expectError(() => new ActivationScaleClip(null as never), TypeError, /for options but received null/);
    expectError(() => allocateBits([1, 2], 4, null as never), TypeError, /for options but received null/);
    expectError(() => scaleClip(w, null as never), TypeError, /for options but received null/);
    expectError(() => foldScalesIntoBatchNorm({ gamma: [1], beta: [0], mean: [0], variance: [1] }, undefined as never), TypeError, /for channelScale but received undefined/);
    const h = new HistogramObserver();
    h.observe(w);
    expectError(() => h.mseRange(4, null as never), TypeError, /for options but received null/);
    expectError(() => quantizeTensor(w, { shape: [4], scale: detached() }), TypeError, /options\.scale.*detached/);
  });
  it('still accept what they accepted: no options, an options object, arrays and typed arrays', () => {
    expect(integerRange(4, true)).to.deep.equal({ qmin: -8, qmax: 7 });
    expect(lsqLevels(2, false)).to.deep.equal({ qn: 0, qp: 3 });
    expect(tensorStats([1, 2, 3]).mean).to.equal(2);
    expect(aciqExpectedMse('gauss', 2, 1, 4)).to.be.greaterThan(0);
    expect(new MinMaxObserver().observe(w).range()).to.be.an('object');
    expect(allocateBits([1, 2], 4).length).to.equal(2);
    expect(scaleClip(w).clipped.length).to.equal(4);
  });
});

describe('misspelled options and registered range methods (second audit)', () => {
  it('a misspelled option or choice gets the nearest known name (edit distance up to 2), not only a case-only match', () => {
    const data = new Float32Array(8).fill(0.5);
    const shape = [8];
    for (const [options, message] of [
      [{ shape, bit: 8 }, "Expected a known option for options.bit but received \"bit\". Did you mean 'bits'?"],
      [{ shape, granularty: 'channel' }, "Expected a known option for options.granularty but received \"granularty\". Did you mean 'granularity'?"],
      [{ shape, method: 'minmx' }, "Did you mean 'minmax'?"],
    ] as const) {
      expect(() => quantizeTensor(data, options as never), JSON.stringify(options)).to.throw(RangeError, message);
    }
    // Nothing near: the known names are listed instead.
    expect(() => quantizeTensor(data, { shape, xyz: 1 } as never)).to.throw(RangeError, /received "xyz"\. Known options: shape, bits/);
  });

  it("type names take 'an' where they start with a vowel sound (an Int8Array, an int4 value, a Uint8Array)", () => {
    expectError(() => quantizeTensor(x4, { shape: [4], out: new Float32Array(4) } as never), TypeError, /^Expected an Int8Array of length 4 for options\.out/);
    expectError(() => quantizeTensor(x4, { shape: [4], signed: false, out: new Float32Array(4) } as never), TypeError, /^Expected a Uint8Array of length 4 for options\.out/);
  });

  it('bit allocation over zero channels returns the empty result (sync and async), as other zero-size tensors get', async () => {
    for (const q of [quantizeTensor(new Float32Array(0), { shape: [0, 16], granularity: 'channel', bitAllocation: { averageBits: 4 } }),
      await quantizeTensorAsync(new Float32Array(0), { shape: [0, 16], granularity: 'channel', bitAllocation: { averageBits: 4 } })]) {
      expect([q.values.length, q.scale.length, q.channelBits!.length, q.granularity]).to.deep.equal([0, 0, 0, 'channel']);
      expect(dequantize(q)).to.deep.equal(new Float32Array(0));
    }
  });

  it('registerRangeMethod checks what it is given and will not replace a built-in method; a registered one is used', () => {
    expect(() => registerRangeMethod({} as never)).to.throw(TypeError, 'Expected a non-empty string for method.name but received undefined.');
    const fixed = {
      name: 'audit-fixed', description: 'always [-1, 1]',
      ranges: (r: { groups: number }) => ({ lo: new Float32Array(r.groups).fill(-1), hi: new Float32Array(r.groups).fill(1), nanIndex: -1 }),
      rangesAsync: async (r: { groups: number }) => fixed.ranges(r),
    };
    expect(() => registerRangeMethod({ ...fixed, name: 'minmax' })).to.throw(RangeError, /for method\.name but received "minmax"\. Register it under a name of its own\./);
    expect(() => registerRangeMethod({ ...fixed, rangesAsync: undefined } as never)).to.throw(TypeError, /method\.rangesAsync/);
    expect(rangeMethodNames()).to.not.include('audit-fixed');
    // Registering changes the process's registry: done in a child, which reports what it got.
    const script = `const l = require(${JSON.stringify(require.resolve('../../ts'))});
      const fixed = { name: 'audit-fixed', description: '', ranges: (r) => ({ lo: new Float32Array(r.groups).fill(-1), hi: new Float32Array(r.groups).fill(1), nanIndex: -1 }) };
      fixed.rangesAsync = async (r) => fixed.ranges(r);
      l.registerRangeMethod(fixed);
      const q = l.quantizeTensor(Float32Array.of(0.25, -3), { shape: [2], bits: 8, method: 'audit-fixed', granularity: 'tensor' });
      const m = l.quantizeTensor(Float32Array.of(0.25, -3), { shape: [2], bits: 8, granularity: 'tensor' });
      console.log(JSON.stringify({ names: l.rangeMethodNames(), scale: q.scale[0], values: Array.from(q.values), minmaxScale: m.scale[0] }));`;
    const child = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8' });
    expect(child.status, child.stderr).to.equal(0);
    const got = JSON.parse(child.stdout) as { names: string[]; scale: number; values: number[]; minmaxScale: number };
    expect(got.names).to.include('audit-fixed');
    // Symmetric by default: the registered range [-1, 1] gives scale 1/127, and -3 saturates; minmax is untouched (max |x| 3).
    expect(got.scale).to.be.closeTo(1 / 127, 1e-8);
    expect(got.values).to.deep.equal([32, -128]);
    expect(got.minmaxScale).to.be.closeTo(3 / 127, 1e-8);
  });
});

describe('objects whose properties answer differently on each read (getters, proxies): read once', () => {
  /** A copy of `fields` whose properties are getters counting their reads; `flip` answers `later` from the second read on. */
  function counted<T extends object>(fields: T, flip: Partial<T> = {}) {
    const reads: Record<string, number> = {};
    const o = {} as T;
    for (const [key, value] of Object.entries(fields)) {
      reads[key] = 0;
      Object.defineProperty(o, key, {
        enumerable: true,
        get: () => (++reads[key] > 1 && key in flip ? (flip as Record<string, unknown>)[key] : value),
      });
    }
    return { o, reads };
  }
  const once = (reads: Record<string, number>) => expect(Object.values(reads).every((n) => n === 1), JSON.stringify(reads)).to.equal(true);

  it('quantizeTensor, dequantize and a hand-built QuantizedTensor use the values they checked', () => {
    const x = Float32Array.of(-1, -0.5, 0.25, 1);
    const { o, reads } = counted({ shape: [4], bits: 8, scale: 1 / 127 }, { scale: NaN } as never);
    const q = quantizeTensor(x, o);
    once(reads);
    expect(Array.from(q.values)).to.deep.equal([-127, -64, 32, 127]);
    // signed read as true, then false: the codes would be taken as unsigned (-127 → 129).
    const hand = counted({ ...q }, { signed: false } as never);
    expect(Array.from(dequantize(hand.o))).to.deep.equal(Array.from(dequantize(q)));
    once(hand.reads);
    // Below the TypeScript checks, the addon refuses codes of the other signedness too.
    expect(() => native().dequantize(new Uint8Array(4), true, new Float32Array(4), { scale: Float32Array.of(1), zeroPoint: new Int32Array(1), qmin: -128, qmax: 127,
      layout: { kind: 0, outer: 1, axisLen: 1, inner: 4, blockSize: 0 } }, '', 0)).to.throw(TypeError, 'q must be an Int8Array (signed codes)');
    // So do the other calls that take codes with their signedness.
    expect(() => native().firstCodeOutside(new Int8Array(4), false, 0, 15)).to.throw(TypeError, 'q must be a Uint8Array (unsigned codes)');
    expect(() => native().packInt4(new Uint8Array(4), true, new Uint8Array(2))).to.throw(TypeError, 'values must be an Int8Array (signed codes)');
    expect(() => native().errorStats(new Float32Array(4), new Uint8Array(4), true, { scale: Float32Array.of(1), zeroPoint: new Int32Array(1), qmin: -128,
      qmax: 127, layout: { kind: 0, outer: 1, axisLen: 1, inner: 4, blockSize: 0 } })).to.throw(TypeError, 'q must be an Int8Array (signed codes)');
  });

  it("the addon's GEMM output calls refuse lengths whose product wraps, codes outside 8 bits and int4 blocks the kernels cannot pair", () => {
    // m·n = 2^64 wraps to 0 in size_t: without the overflow check every length passed and y was written out of bounds.
    expect(() => native().int32ToFloat(new Int32Array(0), 2 ** 32, 2 ** 32, 1, Float32Array.of(1), false, null, new Float32Array(0)))
      .to.throw(RangeError, 'int32ToFloat: bad lengths');
    expect(() => native().requantizeInt32(new Int32Array(0), 2 ** 32, 2 ** 32, 1, Float32Array.of(1), false, 1, 0, 0, 255, false, new Uint8Array(0)))
      .to.throw(RangeError, 'requantizeInt32: bad lengths');
    expect(() => native().requantizeInt32(new Int32Array(1), 1, 1, 1, Float32Array.of(1), false, 1, -(2 ** 31), -(2 ** 31), 2 ** 31 - 1, false, new Uint8Array(1)))
      .to.throw(RangeError, 'requantizeInt32: bad range');
    // [-128, 255] fits no one 8-bit type (as params refuse it).
    expect(() => native().requantizeInt32(new Int32Array(1), 1, 1, 1, Float32Array.of(1), false, 1, 0, -128, 255, false, new Uint8Array(1)))
      .to.throw(RangeError, 'requantizeInt32: bad range');
    // A block of 4 or 12 starts every other block at an odd 4-value group: the kernels read pairs of groups.
    for (const blockSize of [4, 12]) {
      expect(() => native().packInt4Matrix(new Int8Array(16 * 8), 16, 8, blockSize, new Float32Array(Math.ceil(16 / blockSize) * 8).fill(1),
        new Int32Array(Math.ceil(16 / blockSize) * 8), 1)).to.throw(RangeError, 'blockSize must be a positive multiple of 8');
    }
  });

  it("the addon reads option objects before taking arrays' memory: a getter that detaches an array is caught, never a use after free", () => {
    const layout = { kind: 0, outer: 1, axisLen: 1, inner: 4096, blockSize: 0 };
    const detaching = (victim: { buffer: ArrayBufferLike }) => ({ get kind() { structuredClone(victim.buffer, { transfer: [victim.buffer as ArrayBuffer] }); return 0; },
      outer: 1, axisLen: 1, inner: 4096, blockSize: 0 }) as never;
    const params = (l: never) => ({ scale: Float32Array.of(1), zeroPoint: new Int32Array(1), qmin: -128, qmax: 127, layout: l });
    let x = new Float32Array(4096);
    expect(() => native().quantize(x, new Int8Array(4096), params(detaching(x)), '', 1)).to.throw(RangeError, /^lowbit native: x has 0 elements/);
    x = new Float32Array(4096);
    expect(() => native().groupRanges(x, detaching(x), new Float32Array(1), new Float32Array(1), '', 1)).to.throw(RangeError, /^lowbit native: x has 0 elements/);
    const out = new Int8Array(4096);
    expect(() => native().quantize(new Float32Array(4096), out, params(detaching(out)), '', 1)).to.throw(RangeError, /^lowbit native: out has 0 elements/);
    expect(() => native().quantize(new Float32Array(4096), new Int8Array(4096), params(layout as never), '', 1)).to.not.throw();
  });

  it("the addon's integer GEMM refuses zero points outside 8-bit codes (the offset arithmetic overflowed int32)", () => {
    const call = (aZeroPoint: number, bZeroPoint: number) => native().matmulInt8(new Uint8Array(4), new Int8Array(4), 2, 2, 2, aZeroPoint, Int32Array.of(bZeroPoint), false, new Int32Array(4), '', 1);
    expect(() => call(2 ** 31 - 1, 0)).to.throw(RangeError, 'zero points must be in [-128, 255]');
    expect(() => call(0, -(2 ** 31))).to.throw(RangeError, 'zero points must be in [-128, 255]');
    expect(() => call(255, -128)).to.not.throw();
  });

  it('the GEMM calls read each option once: the out they checked is the out they write (async: never the caller\'s array on the worker threads)', async () => {
    const a = Uint8Array.from({ length: 8 * 16 }, (_, i) => i % 7);
    const b = Int8Array.from({ length: 16 * 4 }, (_, i) => (i % 5) - 2);
    const expected = matmulInt8(a, b, 8, 16, 4);
    const mine = new Int32Array(32);
    const sync = counted({ out: mine, aZeroPoint: 3 }, { out: new Int32Array(32), aZeroPoint: 300 } as never);
    matmulInt8(a, b, 8, 16, 4, sync.o);
    once(sync.reads);
    expect(Array.from(mine)).to.deep.equal(Array.from(matmulInt8(a, b, 8, 16, 4, { aZeroPoint: 3 })));
    const later = new Int32Array(32);
    const async = counted({ out: later }, { out: undefined } as never);
    const result = await matmulInt8Async(a, b, 8, 16, 4, async.o);
    once(async.reads);
    expect(result).to.equal(later);
    expect(Array.from(later)).to.deep.equal(Array.from(expected));
    const toFloat = counted({ aScale: 0.5, bScale: 0.25 }, { aScale: NaN } as never);
    expect(Array.from(matmulInt8ToFloat(a, b, 8, 16, 4, toFloat.o))).to.deep.equal(Array.from(expected, (c) => c * 0.125));
    once(toFloat.reads);
    const requantized = counted({ aScale: 0.5, bScale: 0.25, yScale: 1, signed: true }, { yScale: 0, signed: false } as never);
    matmulInt8Requantized(a, b, 8, 16, 4, requantized.o);
    once(requantized.reads);
    const w = quantizeTensor(Float32Array.from({ length: 16 * 4 }, (_, i) => Math.sin(i)), { shape: [16, 4], bits: 4, granularity: 'block', axis: 0, blockSize: 16 });
    const handQ = counted({ ...w }, { scale: new Float32Array(w.scale.length).fill(NaN) } as never);
    const packed = packInt4Matrix(handQ.o);
    once(handQ.reads);
    const int4 = counted({ aScale: 0.5 }, { aScale: NaN } as never);
    expect(matmulInt4(a, packed, 8, 16, 4, int4.o).every(Number.isFinite)).to.equal(true);
    once(int4.reads);
  });
});

describe('small audit items (third audit)', () => {
  it("a BigInt scale, a string movingAverage and a block longer than the axis get lowbit's errors or results, not the engine's", () => {
    expectError(() => quantizeTensor(x4, { shape: [4], scale: [1n] as never }), TypeError, /^Expected a positive finite float32 number for options\.scale\[0\] but received 1 \(bigint\)\.$/);
    expectError(() => new MinMaxObserver({ movingAverage: '0.5' as never }), TypeError, /^Expected a number in \(0, 1\] for options\.movingAverage but received "0\.5"/);
    const options = { movingAverage: 0.5 };
    const observer = new MinMaxObserver(options).observe(Float32Array.of(0, 1));
    options.movingAverage = NaN;  // the observer keeps its own copy
    expect(observer.observe(Float32Array.of(0, 3)).range()).to.deep.equal({ lo: 0, hi: 2 });
    // One short block: a scratch of the axis' length, not of 2^40 floats (V8's bare allocation error before).
    const q = quantizeTensor(Float32Array.of(1, 2, 3, 4, 5, 6), { shape: [2, 3], granularity: 'block', axis: 0, blockSize: 2 ** 40, method: 'percentile' });
    expect(Array.from(q.scale)).to.have.length(3);
  });
});

describe("'kl' and 'percentile' per group (TypeScript histograms) off the main thread", () => {
  it('quantizeTensorAsync turns the event loop between groups and gives the synchronous result', async () => {
    // 1 024 blocks of 32: each a 2048-bin histogram and a KL search in TypeScript (7.6 s for 32 768 blocks, measured).
    const x = Float32Array.from({ length: 128 * 256 }, (_, i) => Math.sin(i * 0.37));
    const options = { shape: [128, 256], bits: 4 as const, granularity: 'block' as const, axis: 1, blockSize: 32, method: 'kl' };
    let ticks = 0, done = false;
    const tick = () => { ticks++; if (!done) setImmediate(tick); };
    setImmediate(tick);
    // The turns taken while the ranges were computed: counted when the quantization itself (native, threaded) starts.
    const binding = native();
    const quantizeAsync = binding.quantizeAsync;
    let ticksBeforeQuantizing = -1;
    binding.quantizeAsync = (...args: Parameters<typeof quantizeAsync>) => {
      ticksBeforeQuantizing = ticks;
      return quantizeAsync.apply(binding, args);
    };
    let q;
    try {
      q = await quantizeTensorAsync(x, options);
    } finally {
      binding.quantizeAsync = quantizeAsync;
      done = true;
    }
    expect(ticksBeforeQuantizing).to.be.at.least(3);
    expect(Array.from(q.scale)).to.deep.equal(Array.from(quantizeTensor(x, options).scale));
  });
});

describe('read once, and still read like property access (review of the read-once change)', () => {
  it('options inherited from a prototype (Object.create(defaults)) or given by a class getter are read, not dropped', () => {
    const a = Uint8Array.from({ length: 8 }, (_, i) => i);
    const b = Int8Array.from({ length: 8 }, (_, i) => i - 4);
    class Options { get aZeroPoint() { return 3; } }
    const expected = Array.from(matmulInt8(a, b, 2, 4, 2, { aZeroPoint: 3 }));
    expect(expected).to.not.deep.equal(Array.from(matmulInt8(a, b, 2, 4, 2)));
    expect(Array.from(matmulInt8(a, b, 2, 4, 2, Object.create({ aZeroPoint: 3 })))).to.deep.equal(expected);
    expect(Array.from(matmulInt8(a, b, 2, 4, 2, new Options() as never))).to.deep.equal(expected);
  });

  it("ACIQ one-sided over values all below 0 gives the range [0, 0] (scale 1), as before the ranges were checked", () => {
    const q = quantizeTensor(Float32Array.of(-1, -2, -3, -0.5), { shape: [4], method: 'aciq', oneSided: true, signed: false } as never);
    expect([q.scale[0], q.zeroPoint[0], ...q.values]).to.deep.equal([1, 0, 0, 0, 0, 0]);
  });
});

describe('registered range methods: what they return is checked', () => {
  it('infinite or NaN bounds, lo > hi and wrong lengths name the method (they became a scale of 1 silently)', () => {
    // Registering changes the process's registry: done in a child, which reports the errors it got.
    const script = `const l = require(${JSON.stringify(require.resolve('../../ts'))});
      const method = (name, make) => ({ name, description: '', ranges: (r) => make(r.groups), rangesAsync: async (r) => make(r.groups) });
      l.registerRangeMethod(method('naive', (g) => ({ lo: new Float32Array(g), hi: new Float32Array(g).fill(Infinity), nanIndex: -1 })));
      l.registerRangeMethod(method('upside-down', (g) => ({ lo: new Float32Array(g).fill(1), hi: new Float32Array(g), nanIndex: -1 })));
      l.registerRangeMethod(method('short', () => ({ lo: new Float32Array(1), hi: new Float32Array(1), nanIndex: -1 })));
      const errors = [];
      for (const m of ['naive', 'upside-down', 'short']) {
        try { l.quantizeTensor(Float32Array.of(0.001, 0.002), { shape: [2], method: m, granularity: 'channel', axis: 0 }); } catch (e) { errors.push(e.constructor.name + ': ' + e.message); }
      }
      l.quantizeTensorAsync(Float32Array.of(0.001, 0.002), { shape: [2], method: 'naive' }).catch((e) => { errors.push(e.message); console.log(JSON.stringify(errors)); });`;
    const child = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8' });
    expect(child.status, child.stderr).to.equal(0);
    const errors = JSON.parse(child.stdout) as string[];
    expect(errors[0]).to.equal('RangeError: Expected finite bounds with lo <= hi (or [Infinity, -Infinity] for a group without finite values) for group 0\'s range returned by range method \'naive\' but received "[0, Infinity]". ' +
      'Fix the method: leave infinite values out of its ranges, as the built-in methods do.');
    expect(errors[1]).to.match(/^RangeError: Expected finite bounds with lo <= hi .* for group 0's range returned by range method 'upside-down' but received "\[1, 0\]"/);
    expect(errors[2]).to.match(/^TypeError: Expected a Float32Array of 2 values \(one per group\) for lo returned by range method 'short' but received Float32Array/);
    expect(errors[3]).to.match(/^Expected finite bounds with lo <= hi .* for group 0's range returned by range method 'naive'/);
  });
});
