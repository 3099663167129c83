// The tensor-level API on inputs an audit found mishandled: float16 conversion of float64 values, packing with a
// `signed` flag that disagrees with the codes, observers given detached batches or other observers, the methods'
// special cases (Lambert W at its branch point, strings and NaN in statistics, misspelt options), sum-preserving
// rounding's ties.
import { expect } from 'chai';

import {
  AciqObserver, aciqAlpha, aciqRange, foldScalesIntoBatchNorm, fromFloat16Array, HistogramObserver, lambertW0, lsqBackward, lsqQuantize,
  MinMaxObserver, packInt4, quantizeTensor, tensorStats, toFloat16Array, correctWeightBias, expectedOutputShift, lsqInitStep,
} from '../../ts';
import { allocateBits } from '../../ts/methods/bit-allocation';
import { ActivationScaleClip, scaleClip } from '../../ts/methods/gdrq';
import { preserveRunSums } from '../../ts/methods/sum-preserving';

/** A Float32Array whose buffer was transferred away. */
function detached(n: number): Float32Array {
  const a = new Float32Array(n);
  structuredClone(a.buffer, { transfer: [a.buffer] });
  return a;
}

describe('tensor API (audit)', () => {
  it('float16: a float64 value rounds once to the nearest float16, elements are checked, detached arrays refused', () => {
    // 1 + 2^-11 + 2^-40 lies just above the tie between 0x3c00 and 0x3c01; rounded to float32 first it was the tie.
    expect(Array.from(toFloat16Array([1 + 2 ** -11 + 2 ** -40, 65519.999, -65519.999, 65520, 2 ** -25, 2 ** -25 + 2 ** -60]))).to.deep.equal(
      [0x3c01, 0x7bff, 0xfbff, 0x7c00, 0x0000, 0x0001]);
    expect(Array.from(toFloat16Array(Float64Array.of(1 + 2 ** -11 + 2 ** -40)))).to.deep.equal([0x3c01]);
    expect(() => toFloat16Array(['1' as unknown as number])).to.throw(RangeError, /Expected a number for values\[0\] but received "1"/);
    expect(() => toFloat16Array([1, null as unknown as number])).to.throw(RangeError, /values\[1\]/);
    expect(() => fromFloat16Array([0x3c00, 65536 + 0x3c00])).to.throw(RangeError, /float16 bit pattern .* for bits\[1\] but received 80896/);
    expect(() => fromFloat16Array([1.5])).to.throw(RangeError, /bits\[0\]/);
    expect(() => toFloat16Array(detached(4))).to.throw(TypeError, /detached/);
    const bits = new Uint16Array(2);
    structuredClone(bits.buffer, { transfer: [bits.buffer] });
    expect(() => fromFloat16Array(bits)).to.throw(TypeError, /detached/);
  });

  it('packInt4 refuses a signed flag that disagrees with the codes, and bits that are not an integer', () => {
    expect(() => packInt4({ values: Uint8Array.of(15), bits: 4, signed: true } as never)).to.throw(RangeError, /Expected false \(its values are a Uint8Array\) for q\.signed but received true/);
    expect(() => packInt4({ values: Int8Array.of(1), bits: '8', signed: true } as never)).to.throw(RangeError, /for q\.bits but received "8"/);
    expect(Array.from(packInt4(quantizeTensor(Float32Array.of(-1, 1), { shape: [2], bits: 4 })))).to.have.length(1);
  });

  it('observers refuse detached batches, other kinds of observer, mismatched options, huge histograms', () => {
    for (const o of [new MinMaxObserver(), new HistogramObserver(), new AciqObserver()]) {
      expect(() => o.observe(detached(4)), o.constructor.name).to.throw(TypeError, /detached/);
    }
    const minmax = new MinMaxObserver().observe(Float32Array.of(1, 2));
    expect(() => minmax.merge({} as never)).to.throw(TypeError, /Expected a MinMaxObserver to merge for other but received an object/);
    expect(() => minmax.merge(new HistogramObserver() as never)).to.throw(TypeError, /a MinMaxObserver to merge/);
    expect(() => new AciqObserver().merge(new MinMaxObserver() as never)).to.throw(TypeError, /Expected an AciqObserver to merge for other/);
    expect(() => new HistogramObserver().merge(undefined as never)).to.throw(TypeError, /HistogramObserver to merge/);
    expect(() => new MinMaxObserver({ movingAverage: 0.1 }).merge(minmax)).to.throw(RangeError, /other\.options\.movingAverage/);
    expect(minmax.range()).to.deep.equal({ lo: 1, hi: 2 });
    expect(() => new HistogramObserver({ bins: 128e10 })).to.throw(RangeError, /a multiple of 128 from 128 to 2\^20 for options\.bins/);
    expect(() => new HistogramObserver().observe(Float32Array.of(1)).percentileRange('50' as never)).to.throw(RangeError, /for percentile/);
  });

  it('Lambert W0 at the branch point and at tiny arguments', () => {
    expect(lambertW0(-1 / Math.E)).to.equal(-1);
    expect(lambertW0(-1e-300)).to.equal(-1e-300);
    expect(lambertW0(1e-300)).to.equal(1e-300);
    const near = lambertW0(-0.3678794411714423);
    expect(near).to.be.within(-1, -0.99999);
    expect(aciqAlpha(4, 'laplace', 1)).to.be.closeTo(5.02864014, 1e-8);
  });

  it('statistics and folds refuse strings, NaN and overflow instead of returning them', () => {
    expect(() => foldScalesIntoBatchNorm({ gamma: [1], beta: [0], mean: [0], variance: ['4' as unknown as number], epsilon: 0 }, [1]))
      .to.throw(RangeError, /Expected a finite number for bn\.variance\[0\] but received "4"/);
    expect(() => foldScalesIntoBatchNorm({ gamma: [NaN], beta: [0], mean: [0], variance: [4] }, [1])).to.throw(RangeError, /bn\.gamma\[0\]/);
    expect(() => foldScalesIntoBatchNorm({ gamma: [1], beta: [0], mean: [0], variance: [4], epsilon: Infinity }, [1])).to.throw(RangeError, /bn\.epsilon/);
    expect(() => tensorStats(['1', 2] as unknown as number[])).to.throw(RangeError, /Expected a number for x\[0\] but received "1"/);
    expect(() => tensorStats(Float64Array.of(1.7e308, 1.7e308))).to.throw(RangeError, /sum stays finite/);
    const stats = tensorStats(Float32Array.of(-1, 0, 2));
    expect(() => aciqRange({ ...stats, mean: NaN }, 4, 'laplace', false)).to.throw(RangeError, /stats\.mean/);
    expect(() => aciqRange({ ...stats, laplaceB: NaN }, 4, 'laplace', false)).to.throw(RangeError, /stats\.laplaceB/);
    expect(() => aciqRange({ ...stats, min: 5, max: -5 }, 4, 'laplace', false)).to.throw(RangeError, /min <= mean <= max/);
    expect(() => aciqAlpha(4, 'laplace', 1, { oneSided: 'no' as never })).to.throw(TypeError, /options\.oneSided/);
    expect(() => aciqAlpha(4, 'laplace', 1, 5 as never)).to.throw(TypeError, /options/);
    expect(() => scaleClip(Float32Array.of(1), { shape: [] })).to.throw(RangeError, /at least one dimension/);
    const clip = new ActivationScaleClip();
    clip.update(Float32Array.of(1, 2));
    expect(() => clip.apply(Float32Array.of(1, NaN))).to.throw(RangeError, /batch\[1\]/);
  });

  it('bit allocation and Scale-Clip refuse misspelt options and absurd channel counts', () => {
    expect(() => allocateBits([1, 2], 4, { minbits: 3 } as never)).to.throw(/options\.minbits .* Did you mean 'minBits'/);
    expect(() => scaleClip(Float32Array.of(1, 2), { group: 2 } as never)).to.throw(/options\.group/);
    expect(() => allocateBits({ length: 2 ** 32 } as never, 4)).to.throw(RangeError, /at most 2\^28 channels for alphas/);
  });

  it('LSQ refuses misspelt options, a step that is 0 as a float32, NaN gradients and an empty tensor without gradScale', () => {
    expect(() => lsqQuantize(Float32Array.of(-1), 1, { bits: 4, singed: false } as never)).to.throw(/singed/);
    expect(() => lsqQuantize(Float32Array.of(1), 1e-50, { bits: 4 })).to.throw(RangeError, /a positive finite float32 number for step but received 1e-50/);
    expect(() => lsqBackward(Float32Array.of(1), 0.1, Float32Array.of(NaN), { bits: 4 })).to.throw(RangeError, /gradOut\[0\]/);
    expect(() => lsqBackward(new Float32Array(0), 0.1, new Float32Array(0), { bits: 4 })).to.throw(RangeError, /a non-empty Float32Array .* for v/);
    expect(lsqBackward(new Float32Array(0), 0.1, new Float32Array(0), { bits: 4, gradScale: 1 }).gradStep).to.equal(0);
  });

  it('observers, ACIQ, LSQ and bias correction refuse misspelt options, and bias correction NaN (second audit)', () => {
    expect(() => new MinMaxObserver({ movingAverge: 0.1 } as never)).to.throw(RangeError, /options\.movingAverge .*Did you mean 'movingAverage'\?/);
    expect(() => new HistogramObserver({ bin: 512 } as never)).to.throw(RangeError, /options\.bin .*Did you mean 'bins'\?/);
    expect(() => new HistogramObserver().observe(Float32Array.of(1, 2)).mseRange(8, { symetric: false } as never)).to.throw(RangeError, /options\.symetric .*Did you mean 'symmetric'\?/);
    expect(() => new ActivationScaleClip({ momentom: 0.9 } as never)).to.throw(RangeError, /options\.momentom .*Did you mean 'momentum'\?/);
    expect(() => aciqAlpha(4, 'laplace', 1, { onesided: true } as never)).to.throw(RangeError, /options\.onesided .*Did you mean 'oneSided'\?/);
    expect(() => lsqInitStep(Float32Array.of(1, 2), { bits: 4, signd: false } as never)).to.throw(RangeError, /options\.signd .*Did you mean 'signed'\?/);
    expect(() => lsqInitStep(Float32Array.of(1, 2), { bits: 4, signed: 'no' } as never)).to.throw(TypeError, /a boolean for options\.signed/);
    const w = Float32Array.of(1, 2, 3, 4);
    expect(() => correctWeightBias(w, w, { shape: [2, 2], axes: 1 } as never)).to.throw(RangeError, /options\.axes .*Did you mean 'axis'\?/);
    expect(() => correctWeightBias(w, Float32Array.of(1, NaN, 3, 4), { shape: [2, 2] })).to.throw(RangeError, /a finite number for quantized\[1\] but received NaN/);
    expect(() => expectedOutputShift(w, w, [2, 2], [0.5, NaN])).to.throw(RangeError, /a finite number for inputMean\[1\] but received NaN/);
    expect(() => expectedOutputShift(w, w, [2, 2], [0.5, '1' as never])).to.throw(TypeError, /inputMean\[1\] but received "1"/);
    expect(Array.from(expectedOutputShift(w, w, [2, 2], [0.5, 1]))).to.deep.equal([0, 0]);
  });

  it('sum-preserving rounding rounds a residual of half a step to even, whatever its sign', () => {
    for (const source of [Float32Array.of(0.25, 0.25), Float32Array.of(-0.25, -0.25), Float32Array.of(0.75, 0.75)]) {
      const q = quantizeTensor(source, { shape: [2], scale: 1 });
      const sum = Array.from(preserveRunSums(q, source, 2).values).reduce((a, b) => a + b, 0);
      expect(sum, Array.from(source).join()).to.equal(Math.abs(source[0]) === 0.25 ? 0 : 2);
    }
    expect(() => preserveRunSums(quantizeTensor(Float32Array.of(1, 2), { shape: [2], scale: 1 }), Float32Array.of(1), 2)).to.throw(RangeError);
  });
});
