// The methods of the three papers: ALGORITHMS.md §6 test vectors T5–T13, bad input,
// the range methods through quantizeTensor, streaming observers, and GDRQ's observation.
import { expect } from 'chai';

import {
  aciqAlpha, aciqExpectedMse, aciqLaplaceConstant, aciqRange, ActivationScaleClip, AciqObserver, allocateBits, correctWeightBias, cpuInfo, dequantize,
  expectedOutputShift, foldScalesIntoBatchNorm, HistogramObserver, klLevels, lambertW0, lsqBackward, lsqGradScale, lsqInitStep,
  lsqQuantize, MinMaxObserver, quantizationError, quantizeTensor, quantizeTensorAsync, scaleClip, tensorStats,
} from '../../ts';
import { preserveRunSums } from '../../ts/methods/sum-preserving';
import { makeObserver } from '../../ts/onnx/calibrate';
import { gptqRound, gptqRoundSteps } from '../../ts/methods/gptq';
import { gramBlockRows, LayerInputMoments } from '../../ts/calibration/layer-input-moments';
import { runStepsAsync } from '../../ts/onnx/passes/pass';
import { nativeKernels, referenceKernels } from '../../ts/train/kernels';
import { makeIntAttribute, makeNode } from '../../ts/onnx/graph';
import { create } from '@bufbuild/protobuf';
import { AttributeProtoSchema, AttributeProto_AttributeType } from 'onnx-buf';
import { reportMissingKernels } from '../helpers/kernels';
import { laplace, rng } from '../helpers/random';
import { native } from '../../ts/native';
import { activationParams, fakeQuantize } from '../../ts/onnx/passes/quantize-activations';

function gaussian(n: number, seed: number): Float32Array {
  const r = rng(seed);
  return Float32Array.from({ length: n }, () => Math.sqrt(-2 * Math.log(1 - r())) * Math.cos(2 * Math.PI * r()));
}

describe('methods: bad input', () => {
  it('rejects bits outside the range, negative or NaN scale parameters and empty tensors', () => {
    expect(() => aciqAlpha(0, 'laplace', 1)).to.throw(RangeError, /for bits but received 0/);
    expect(() => aciqAlpha(9, 'gauss', 1)).to.throw(RangeError, /\[1, 8\] for bits but received 9/);
    expect(() => new HistogramObserver().observe(Float32Array.of(1)).mseRange(17)).to.throw(RangeError, /\[2, 16\] for bits but received 17/);
    expect(() => new HistogramObserver().observe(Float32Array.of(1)).mseRange(8, { candidates: 0 })).to.throw(RangeError, /\[1, 1000\] for options\.candidates but received 0/);
    expect(() => new HistogramObserver().observe(Float32Array.of(1)).mseRange(8, { candidates: 2.5 })).to.throw(RangeError, /options\.candidates/);
    expect(() => aciqAlpha(4, 'laplace', -1)).to.throw(RangeError, /for scaleParam but received -1/);
    expect(() => aciqAlpha(4, 'gauss', NaN)).to.throw(RangeError, /for scaleParam but received NaN/);
    expect(() => aciqAlpha(4, 'cauchy' as never, 1)).to.throw(RangeError, /prior/);
    expect(() => tensorStats(new Float32Array(0))).to.throw(RangeError, /at least one finite value/);
    expect(() => lsqQuantize(new Float32Array(2), 0.1, { bits: 9 })).to.throw(RangeError, /\[2, 8\] for options\.bits/);
    expect(() => lsqQuantize(new Float32Array(2), -0.1, { bits: 4 })).to.throw(RangeError, /for step but received -0\.1/);
    expect(() => lsqQuantize(new Float32Array(2), NaN, { bits: 4 })).to.throw(RangeError, /for step/);
    expect(() => lsqInitStep(new Float32Array(0), { bits: 4 })).to.throw(RangeError, /non-empty/);
    expect(() => scaleClip(new Float32Array(0))).to.throw(RangeError, /non-empty/);
    expect(() => quantizeTensor(new Float32Array(12), { shape: [6, 2], bits: 1, method: 'aciq' })).to.throw(RangeError, /options\.bits/);
  });
  it('groups must divide the channel count, with a suggestion', () => {
    expect(() => quantizeTensor(new Float32Array(10 * 3), { shape: [10, 3], granularity: 'group', groups: 4 }))
      .to.throw(RangeError, /divisor of the 10 channels along axis 0 for options\.groups but received 4\. Try 2 or 5\./);
    expect(() => scaleClip(new Float32Array(9), { shape: [9], groups: 2 })).to.throw(RangeError, /divisor of the 9 channels/);
  });
  it('averageBits must lie in [minBits, maxBits]', () => {
    expect(() => allocateBits([1, 2], 9)).to.throw(RangeError, /\[minBits, maxBits\] = \[2, 8\] for averageBits but received 9/);
    expect(() => allocateBits([1, 2], 3, { minBits: 4 })).to.throw(RangeError, /for averageBits but received 3/);
    expect(() => quantizeTensor(new Float32Array(8), { shape: [2, 4], granularity: 'channel', bitAllocation: { averageBits: 1 } }))
      .to.throw(RangeError, /options\.bitAllocation\.averageBits/);
    expect(() => quantizeTensor(new Float32Array(8), { shape: [2, 4], bitAllocation: { averageBits: 4 } }))
      .to.throw(RangeError, /'channel' with bitAllocation/);
  });
});

describe('ACIQ', () => {
  it('T5: Laplace constants are W0(3·4^M) and match the table to 1e-6', () => {
    const table = [1.86281686, 2.83068299, 3.89722946, 5.02864014, 6.20476633, 7.41312621, 8.64561998, 9.89675977];
    table.forEach((want, i) => expect(aciqAlpha(i + 1, 'laplace', 1)).to.be.closeTo(want, 1e-6));
    expect(lambertW0(48)).to.be.closeTo(2.83068299, 1e-8);
    expect(lambertW0(768)).to.be.closeTo(5.02864014, 1e-8);
    expect(aciqExpectedMse('laplace', aciqAlpha(4, 'laplace', 1), 1, 4)).to.be.closeTo(0.0460215, 1e-6);
  });
  it('T6: Gaussian constants solve the first-order condition and match the table to 1e-6', () => {
    const table = [1.23990529, 1.71063517, 2.15159269, 2.55913644, 2.93620067, 3.28691481, 3.61511437, 3.92403579];
    table.forEach((want, i) => expect(aciqAlpha(i + 1, 'gauss', 1)).to.be.closeTo(want, 1e-6));
    expect(aciqExpectedMse('gauss', aciqAlpha(4, 'gauss', 1), 1, 4)).to.be.closeTo(0.0104933, 1e-6);
  });
  it('one-sided tensors use the (M+1)-bit constant', () => {
    expect(aciqAlpha(3, 'laplace', 2, { oneSided: true })).to.be.closeTo(2 * 5.02864014, 1e-6);
  });
  it('T7: statistics b = mean|x - mean| and unbiased σ', () => {
    const s = tensorStats(new Float32Array([1, -1, 3, -3]));
    expect(s.laplaceB).to.equal(2);
    expect(s.sigma).to.be.closeTo(2.581988897, 1e-9);
    expect(aciqAlpha(4, 'laplace', s.laplaceB)).to.be.closeTo(10.05728028, 1e-6);
    expect(aciqAlpha(4, 'gauss', s.sigma)).to.be.closeTo(6.607661875, 1e-6);
  });
  it("quantizeTensor method 'aciq' clips heavy tails and beats minmax at 4 bits, per tensor and per channel", () => {
    const x = laplace(40_000, 3);
    const mm = quantizationError(x, quantizeTensor(x, { shape: [x.length], bits: 4 }));
    for (const prior of ['laplace', 'gauss', 'auto'] as const) {
      const e = quantizationError(x, quantizeTensor(x, { shape: [x.length], bits: 4, method: 'aciq', prior }));
      expect(e.mse, prior).to.be.lessThan(mm.mse);
    }
    const w = laplace(64 * 200, 4);
    const c1 = quantizationError(w, quantizeTensor(w, { shape: [64, 200], granularity: 'channel', bits: 4 }));
    const c2 = quantizationError(w, quantizeTensor(w, { shape: [64, 200], granularity: 'channel', bits: 4, method: 'aciq', prior: 'auto' }));
    expect(c2.mse).to.be.lessThan(c1.mse);
  });
  it('one-sided values on signed symmetric codes (half of them above 0) take the M-bit constant, on unsigned ones the (M+1)-bit one', () => {
    const x = laplace(40_000, 6).map(Math.abs);
    const s = tensorStats(x);
    const symmetricError = (hi: number, qmax: number) => {
      const step = hi / qmax;
      let sum = 0;
      for (const v of x) sum += (v - Math.min(qmax, Math.round(v / step)) * step) ** 2;
      return sum / x.length;
    };
    for (const bits of [2, 4, 8]) {
      const qmax = 2 ** (bits - 1) - 1;
      const signed = quantizeTensor(x, { shape: [x.length], bits, method: 'aciq' });
      const hi = s.mean + s.laplaceB * aciqLaplaceConstant(bits);
      expect(signed.scale[0], `bits ${bits}`).to.be.closeTo(hi / qmax, 1e-6 * hi);
      // (Measured: lower error than with the (M+1)-bit clip at 2 and 4 bits.)
      if (bits < 8) expect(symmetricError(hi, qmax), `bits ${bits}`).to.be.below(symmetricError(s.mean + s.laplaceB * aciqLaplaceConstant(bits + 1), qmax));
      const unsigned = quantizeTensor(x, { shape: [x.length], bits, signed: false, symmetric: false, method: 'aciq' });
      const full = s.mean + s.laplaceB * aciqLaplaceConstant(bits + 1);
      expect(unsigned.scale[0], `bits ${bits} unsigned`).to.be.closeTo(full / (2 ** bits - 1), 1e-6 * full);
    }
    // Unsigned symmetric codes (zero point 0) use all of them above 0: the (M+1)-bit constant.
    const unsignedSymmetric = quantizeTensor(x, { shape: [x.length], bits: 4, signed: false, symmetric: true, method: 'aciq' });
    expect(unsignedSymmetric.scale[0]).to.be.closeTo((s.mean + s.laplaceB * aciqLaplaceConstant(5)) / 15, 1e-6);
    const o = new AciqObserver();
    o.observe(x);
    expect(o.range(4, 'laplace', undefined, true).hi).to.be.closeTo(s.mean + s.laplaceB * aciqLaplaceConstant(4), 1e-4);
    expect(o.range(4).hi).to.be.closeTo(s.mean + s.laplaceB * aciqLaplaceConstant(5), 1e-4);
    // quantizeModel's 'aciq' activation observer: signed activations are symmetric.
    const observer = makeObserver('aciq');
    observer.observe(x);
    expect(observer.range(4, true).hi).to.be.closeTo(s.mean + s.laplaceB * aciqLaplaceConstant(4), 1e-4);
    expect(observer.range(4, false).hi).to.be.closeTo(s.mean + s.laplaceB * aciqLaplaceConstant(5), 1e-4);
  });

  it("prior 'auto' is never worse than minmax on measured MSE, even on uniform data at 8 bits", () => {
    const r = rng(5);
    for (const bits of [2, 3, 4, 8]) {
      const u = Float32Array.from({ length: 5000 }, () => r() * 2 - 1);
      const mm = quantizationError(u, quantizeTensor(u, { shape: [u.length], bits })).mse;
      const auto = quantizationError(u, quantizeTensor(u, { shape: [u.length], bits, method: 'aciq', prior: 'auto' })).mse;
      expect(auto, `bits ${bits}`).to.be.at.most(mm);
    }
  });

  it("prior 'auto' off the event loop (quantizeTensorAsync: the error passes on worker threads) chooses as the synchronous call", async () => {
    const r = rng(6);
    // Per channel: some channels uniform (minmax wins), some heavy-tailed (the ACIQ clip wins).
    const w = Float32Array.from({ length: 64 * 300 }, (_, i) => (Math.floor(i / 300) % 2 ? r() * 2 - 1 : Math.log(r() + 1e-9) * (r() < 0.5 ? 1 : -1)));
    let keptMinmax = false;
    for (const bits of [2, 4, 8] as const) {
      const how = { shape: [64, 300], granularity: 'channel' as const, axis: 0, bits, method: 'aciq' as const, prior: 'auto' as const };
      const sync = quantizeTensor(w, how);
      const async = await quantizeTensorAsync(w, how);
      expect(Array.from(async.scale), `bits ${bits}`).to.deep.equal(Array.from(sync.scale));
      expect(Buffer.from(async.values.buffer).equals(Buffer.from(sync.values.buffer)), `bits ${bits}`).to.equal(true);
      // Channels where 'auto' kept minmax's range (neither prior's clip): the comparison made a difference.
      const minmax = quantizeTensor(w, { ...how, method: 'minmax', prior: undefined });
      const [laplaceOnly, gaussOnly] = [quantizeTensor(w, { ...how, prior: 'laplace' }), quantizeTensor(w, { ...how, prior: 'gauss' })];
      keptMinmax ||= sync.scale.some((v, c) => v === minmax.scale[c] && v !== laplaceOnly.scale[c] && v !== gaussOnly.scale[c]);
    }
    expect(keptMinmax, "'auto' kept minmax on some channels").to.equal(true);
  });
});

describe('per-channel bit allocation', () => {
  it('T8: bins ∝ α^(2/3), rounded; the target is adjusted until the mean is right', () => {
    expect(Array.from(allocateBits([1, 8], 4))).to.deep.equal([3, 5]);
    const four = Array.from(allocateBits([1, 1, 1, 27], 4));
    expect(four.reduce((a, b) => a + b, 0) / 4).to.equal(4);
    expect(four[3]).to.be.greaterThan(four[0]);
  });
  it('quantizeTensor with bitAllocation gives each channel its own bits, with the mean on target', () => {
    const r = rng(9);
    const channels = 8;
    const w = Float32Array.from({ length: channels * 64 }, (_, i) => (r() - 0.5) * (1 + Math.floor(i / 64)) ** 2);
    const q = quantizeTensor(w, { shape: [channels, 64], granularity: 'channel', bitAllocation: { averageBits: 4 } });
    const bits = Array.from(q.channelBits!);
    expect(bits.reduce((a, b) => a + b, 0) / channels).to.be.closeTo(4, 0.13);
    expect(bits[channels - 1]).to.be.greaterThan(bits[0]);
    for (let c = 0; c < channels; c++) {
      for (let i = 0; i < 64; i++) {
        const v = q.values[c * 64 + i];
        expect(v).to.be.within(-(2 ** (bits[c] - 1)), 2 ** (bits[c] - 1) - 1);
      }
    }
    expect(quantizationError(w, q).sqnrDb).to.be.greaterThan(10);
  });
});

describe('bias correction', () => {
  const w = new Float32Array([0.30, -0.10, 0.25, 0.05, 0.12, -0.22]);
  const wq = new Float32Array([0.3, -0.1, 0.2, 0.0, 0.1, -0.2]);
  it('T9: the code order restores the channel mean and std; the paper formula as an option', () => {
    const code = correctWeightBias(w, wq, { shape: [1, 6] });
    [0.33468408, -0.09414378, 0.22747711, 0.01306318, 0.12027015, -0.20135075].forEach((v, i) => expect(code[i]).to.be.closeTo(v, 2e-7));
    const paper = correctWeightBias(w, wq, { shape: [1, 6], method: 'paper' });
    [0.33948872, -0.08933914, 0.23228176, 0.01786783, 0.12507479, -0.19654610].forEach((v, i) => expect(paper[i]).to.be.closeTo(v, 2e-7));
  });
  it('the data-driven output shift is E[W x] − E[Ŵ x̂] per output channel', () => {
    const shift = expectedOutputShift(new Float32Array([1, 2, 3, 4]), new Float32Array([1, 2, 3, 3.5]), [2, 2], [0.5, 2]);
    expect(Array.from(shift)).to.deep.equal([0, 1]);
  });
});

describe('sum-preserving rounding', () => {
  // Depthwise 3×3 filters whose taps nearly cancel, as in the PP-OCRv4 recognizer's first depthwise conv.
  const channels = 64;
  const r = rng(21);
  const w = new Float32Array(channels * 9);
  for (let c = 0; c < channels; c++) {
    let sum = 0;
    for (let k = 0; k < 8; k++) sum += (w[c * 9 + k] = (r() - 0.5) * (k < 2 ? 12 : 1));
    w[c * 9 + 8] = -sum + (r() - 0.5) * 0.02;
  }
  const runSumErrors = (q: ReturnType<typeof quantizeTensor>) => {
    const dq = dequantize(q);
    return Array.from({ length: channels }, (_, c) => {
      let e = 0;
      for (let k = 0; k < 9; k++) e += dq[c * 9 + k] - w[c * 9 + k];
      return Math.abs(e) / q.scale[c];
    });
  };

  it('keeps every filter\'s tap sum within half a step, moving no weight by a step or more', () => {
    for (const bits of [8, 4]) {
      const nearest = quantizeTensor(w, { shape: [channels, 1, 3, 3], bits, granularity: 'channel', axis: 0 });
      const preserved = preserveRunSums(nearest, w, 9);
      expect(Math.max(...runSumErrors(nearest)), `${bits}-bit round-to-nearest`).to.be.greaterThan(1.5);
      expect(Math.max(...runSumErrors(preserved)), `${bits}-bit sum-preserving`).to.be.at.most(0.5 + 1e-6);
      const dq = dequantize(preserved);
      const limit = 2 ** (bits - 1);
      for (let i = 0; i < w.length; i++) {
        expect(Math.abs(dq[i] - w[i]) / preserved.scale[Math.floor(i / 9)]).to.be.lessThan(1);
        expect(preserved.values[i]).to.be.within(-limit, limit - 1);
      }
      expect(Array.from(nearest.values)).to.not.deep.equal(Array.from(preserved.values));
    }
  });

  it('changes nothing where the sums already round right, and does not modify its input', () => {
    const exact = new Float32Array([1, -1, 0.5, -0.5, 0.25, -0.25]);
    const q = quantizeTensor(exact, { shape: [2, 3], bits: 8, granularity: 'channel', axis: 0 });
    const before = Array.from(q.values);
    expect(Array.from(preserveRunSums(q, exact, 3).values)).to.deep.equal(before);
    const nearest = quantizeTensor(w, { shape: [channels, 9], bits: 8, granularity: 'channel', axis: 0 });
    const copy = Array.from(nearest.values);
    preserveRunSums(nearest, w, 9);
    expect(Array.from(nearest.values)).to.deep.equal(copy);
    // A source with an infinity (its residual is infinite) is refused as NaN is: it would flip every tap of the run.
    expect(() => preserveRunSums(q, Float32Array.of(1, -1, 0.5, -0.5, Infinity, -0.25), 3)).to.throw(RangeError, /NaN or an infinity in elements 3\.\.5/);
  });

  it('makes up for clipped taps with the others, inside the integer range', () => {
    const clipped = quantizeTensor(w, { shape: [channels, 9], bits: 4, granularity: 'channel', axis: 0, method: 'mse' });
    const preserved = preserveRunSums(clipped, w, 9);
    expect(runSumErrors(preserved).reduce((a, b) => a + b, 0)).to.be.lessThan(runSumErrors(clipped).reduce((a, b) => a + b, 0));
    for (const v of preserved.values) expect(v).to.be.within(-8, 7);
  });
});

describe('GPTQ rounding', () => {
  // Inputs with correlated features (a few latent factors plus noise), as a layer's inputs are.
  const features = 24;
  const samples = 400;
  const outputs = 16;
  const r = rng(31);
  const latent = Array.from({ length: 4 }, () => Float64Array.from({ length: features }, () => r() * 2 - 1));
  const x = new Float32Array(samples * features);  // [samples, features]
  for (let s = 0; s < samples; s++) {
    const a = latent.map(() => r() * 2 - 1);
    for (let f = 0; f < features; f++) x[s * features + f] = latent.reduce((acc, l, i) => acc + a[i] * l[f], 0) + 0.05 * (r() - 0.5);
  }
  const w = Float32Array.from({ length: outputs * features }, () => r() * 2 - 1);  // [outputs, features], Gemm transB
  const gram = () => {
    const g = new LayerInputMoments({ kind: 'matrix', columns: features, transposed: false }, { gram: true });
    g.observe(x.subarray(0, 100 * features), [100, features]);
    g.observe(x.subarray(100 * features), [samples - 100, features]);
    return g;
  };
  const outputError = (wq: Float32Array) => {
    let e = 0;
    for (let s = 0; s < samples; s++) {
      for (let o = 0; o < outputs; o++) {
        let d = 0;
        for (let f = 0; f < features; f++) d += (wq[o * features + f] - w[o * features + f]) * x[s * features + f];
        e += d * d;
      }
    }
    return e;
  };
  const view = { rows: outputs, columns: features, rowStride: features, columnStride: 1, rowsPerGram: outputs };

  it('upperFactorOfInverse gives U with UᵀU = H⁻¹', () => {
    const n = 7;
    const a = Float64Array.from({ length: n * n }, () => r() - 0.5);
    const h = new Float64Array(n * n);
    for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) for (let k = 0; k < n; k++) h[i * n + j] += a[i * n + k] * a[j * n + k] + (i === j && k === 0 ? 0.1 : 0);
    const u = new Float64Array(n * n);
    expect(referenceKernels.upperFactorOfInverse(h, n, u)).to.equal(true);
    for (let i = 0; i < n; i++) for (let j = 0; j < i; j++) expect(u[i * n + j]).to.equal(0);
    // (UᵀU)·H = I
    for (let i = 0; i < n; i++) {
      for (let j = 0; j < n; j++) {
        let v = 0;
        for (let k = 0; k < n; k++) {
          let utu = 0;
          for (let m = 0; m < n; m++) utu += u[m * n + i] * u[m * n + k];
          v += utu * h[k * n + j];
        }
        expect(v).to.be.closeTo(i === j ? 1 : 0, 1e-8);
      }
    }
    expect(referenceKernels.upperFactorOfInverse(Float64Array.of(1, 2, 2, 1), 2, new Float64Array(4))).to.equal(false);
  });

  it('the native upperFactorOfInverse equals the TypeScript reference bit for bit (odd sizes up to 513), and refuses the same matrices', () => {
    const native = nativeKernels();
    for (const n of [0, 1, 2, 3, 4, 5, 7, 9, 31, 33, 64, 127, 480, 513]) {
      // X·Xᵀ + a small ridge: symmetric positive definite, as a damped Gram matrix is.
      const m = n + 5;
      const x = Float64Array.from({ length: n * m }, () => r() - 0.5);
      const h = new Float64Array(n * n);
      for (let i = 0; i < n; i++) {
        for (let j = 0; j <= i; j++) {
          let s = 0;
          for (let k = 0; k < m; k++) s += x[i * m + k] * x[j * m + k];
          h[i * n + j] = h[j * n + i] = s + (i === j ? 1e-3 : 0);
        }
      }
      const [want, got] = [new Float64Array(n * n), new Float64Array(n * n).fill(7)];
      expect(referenceKernels.upperFactorOfInverse(h, n, want), `n = ${n}: reference`).to.equal(true);
      expect(native.upperFactorOfInverse(h, n, got), `n = ${n}: native`).to.equal(true);
      expect(Buffer.from(got.buffer).equals(Buffer.from(want.buffer)), `n = ${n}: identical bits`).to.equal(true);
    }
    // Exact zeros (a block-diagonal H: the factor's zero entries are skipped), then the same with one block not
    // positive definite, which fails part-way (the factorization runs from the last row up).
    const blocks = (second: number) => {
      const n = 9;
      const h = new Float64Array(n * n);
      for (let i = 0; i < n; i++) h[i * n + i] = 2 + i;
      for (const [i, j, v] of [[0, 1, 0.5], [2, 3, -0.7], [6, 7, second]]) h[i * n + j] = h[j * n + i] = v;
      return h;
    };
    for (const [second, positive] of [[0.3, true], [9, false]] as const) {
      const h = blocks(second);
      const [want, got] = [new Float64Array(81), new Float64Array(81)];
      expect(referenceKernels.upperFactorOfInverse(h, 9, want), `block-diagonal, ${second}: reference`).to.equal(positive);
      expect(native.upperFactorOfInverse(h, 9, got), `block-diagonal, ${second}: native`).to.equal(positive);
      if (positive) expect(Buffer.from(got.buffer).equals(Buffer.from(want.buffer)), 'block-diagonal: identical bits').to.equal(true);
    }
    for (const h of [Float64Array.of(1, 2, 2, 1), Float64Array.of(1, 0, 0, 0), Float64Array.of(1, 0, 0, NaN), Float64Array.of(-1, 0, 0, 1)]) {
      expect(native.upperFactorOfInverse(h, 2, new Float64Array(4)), String(h)).to.equal(false);
      expect(referenceKernels.upperFactorOfInverse(h, 2, new Float64Array(4)), String(h)).to.equal(false);
    }
    // Wrong lengths, types and shared memory are errors, not reads past the end.
    expect(() => native.upperFactorOfInverse(new Float64Array(3), 2, new Float64Array(4))).to.throw(RangeError, /h\.length must be n \* n = 4 \(got 3\)/);
    expect(() => native.upperFactorOfInverse(new Float64Array(4), 2, new Float64Array(5))).to.throw(RangeError, /u\.length must be n \* n = 4/);
    expect(() => native.upperFactorOfInverse(new Float32Array(4) as never, 2, new Float64Array(4))).to.throw(TypeError, /h has the wrong element type/);
    const both = new Float64Array(4);
    expect(() => native.upperFactorOfInverse(both, 2, both)).to.throw(RangeError, /u must not share memory with h/);
    for (const kernels of [native, referenceKernels]) {
      expect(() => kernels.upperFactorOfInverse(new Float64Array(3), 2, new Float64Array(4)), kernels.name).to.throw(RangeError, /h\.length must be n \* n = 4 \(got 3\)/);
      expect(() => kernels.upperFactorOfInverse(new Float64Array(4), -2, new Float64Array(4)), kernels.name).to.throw(RangeError);
      expect(() => kernels.upperFactorOfInverse(both, 2, both), kernels.name).to.throw(RangeError, /u must not share memory with h/);
    }
  });

  it('the native gptqRoundBlock equals the TypeScript reference bit for bit (odd sizes, mixed ranges, skipped groups), and checks its arguments', () => {
    const native = nativeKernels();
    for (const [rows, n, b0, b1] of [[1, 1, 0, 1], [3, 5, 0, 5], [7, 33, 4, 29], [2, 64, 32, 64], [5, 70, 69, 70], [4, 9, 3, 3]]) {
      const x = Float64Array.from({ length: n * (n + 4) }, () => r() - 0.5);
      const h = new Float64Array(n * n);
      for (let i = 0; i < n; i++) {
        for (let j = 0; j < n; j++) {
          let s = 0;
          for (let k = 0; k < n + 4; k++) s += x[i * (n + 4) + k] * x[j * (n + 4) + k];
          h[i * n + j] = s + (i === j ? 1e-2 : 0);
        }
      }
      const u = new Float64Array(n * n);
      expect(native.upperFactorOfInverse(h, n, u)).to.equal(true);
      // Four groups: 4-bit signed, 8-bit unsigned with a zero point, 2-bit signed, and one without a scale (skipped).
      const params = {
        scale: Float32Array.of(0.02, 0.004, 0.15, 0), zeroPoint: Int32Array.of(0, 131, 0, 0),
        qmin: Int32Array.of(-8, 0, -2, -8), qmax: Int32Array.of(7, 255, 1, 7),
      };
      const width = b1 - b0;
      const group = Int32Array.from({ length: rows * width }, () => Math.floor(r() * 4));
      const w = Float32Array.from({ length: rows * n }, () => (r() - 0.5) * 0.6);
      const runs = [referenceKernels, native].map((kernels) => {
        const out = { w: w.slice(), values: new Int32Array(rows * width).fill(-99), errors: new Float32Array(rows * width).fill(5) };
        kernels.gptqRoundBlock(out.w, rows, n, u, b0, b1, group, params, out.values, out.errors);
        return out;
      });
      const label = `rows ${rows}, n ${n}, columns ${b0}..${b1}`;
      for (const key of ['w', 'values', 'errors'] as const) {
        expect(Buffer.from(runs[1][key].buffer).equals(Buffer.from(runs[0][key].buffer)), `${label}: ${key} identical`).to.equal(true);
      }
      group.forEach((g, i) => {
        if (g === 3) expect([runs[1].values[i], runs[1].errors[i]], `${label}: skipped element ${i}`).to.deep.equal([-99, 0]);
        else expect(runs[1].values[i], `${label}: element ${i} in range`).to.be.within(params.qmin[g], params.qmax[g]);
      });
      if (width > 1) expect(runs[1].w.some((v, i) => v !== w[i]), `${label}: later columns moved`).to.equal(true);
    }
    const args = (over: Record<string, unknown> = {}) => {
      const a = { w: new Float32Array(6), rows: 2, n: 3, u: Float64Array.of(1, 0, 0, 0, 1, 0, 0, 0, 1), b0: 0, b1: 3, group: new Int32Array(6),
        params: { scale: Float32Array.of(1), zeroPoint: Int32Array.of(0), qmin: Int32Array.of(-8), qmax: Int32Array.of(7) },
        values: new Int32Array(6), errors: new Float32Array(6), ...over };
      return [a.w, a.rows, a.n, a.u, a.b0, a.b1, a.group, a.params, a.values, a.errors] as Parameters<typeof native.gptqRoundBlock>;
    };
    for (const kernels of [native, referenceKernels]) {
      expect(() => kernels.gptqRoundBlock(...args()), kernels.name).not.to.throw();
      expect(() => kernels.gptqRoundBlock(...args({ group: Int32Array.of(0, 0, 1, 0, 0, 0) })), kernels.name).to.throw(RangeError, /group\[2\] must be in \[0, scale\.length\) \(got 1\)/);
      expect(() => kernels.gptqRoundBlock(...args({ group: Int32Array.of(0, 0, 0, 0, 0, -1) })), kernels.name).to.throw(RangeError, /group\[5\]/);
      expect(() => kernels.gptqRoundBlock(...args({ b1: 4 })), kernels.name).to.throw(RangeError, /b0 <= b1 <= n \(got b0 = 0, b1 = 4, n = 3\)/);
      expect(() => kernels.gptqRoundBlock(...args({ w: new Float32Array(5) })), kernels.name).to.throw(RangeError, /w\.length must be rows \* n = 6 \(got 5\)/);
      expect(() => kernels.gptqRoundBlock(...args({ errors: new Float32Array(4) })), kernels.name).to.throw(RangeError, /errors\.length must be rows \* \(b1 - b0\) = 6/);
      expect(() => kernels.gptqRoundBlock(...args({ params: { scale: Float32Array.of(1), zeroPoint: new Int32Array(2), qmin: Int32Array.of(-8), qmax: Int32Array.of(7) } })), kernels.name)
        .to.throw(RangeError, /zeroPoint\.length must be scale\.length = 1/);
    }
    const shared = new Float32Array(6);
    expect(() => native.gptqRoundBlock(...args({ w: shared, errors: shared }))).to.throw(RangeError, /errors must not share memory with w/);
    // group is the one array used as an index: no output may share its memory.
    const buffer = new ArrayBuffer(48);
    expect(() => native.gptqRoundBlock(...args({ w: new Float32Array(buffer, 0, 6), group: new Int32Array(buffer, 16, 6) }))).to.throw(RangeError, /w must not share memory with group/);
    expect(() => native.gptqRoundBlock(...args({ errors: new Float32Array(buffer, 0, 6), group: new Int32Array(buffer, 8, 6) }))).to.throw(RangeError, /errors must not share memory with group/);
    // NaN and infinite weights: the same integers (NaN stored as 0, ±Infinity clamped) and the same NaN positions.
    const odd = Float32Array.of(NaN, 0.3, Infinity, -Infinity, 0.2, 0.1);
    const oddRuns = [referenceKernels, native].map((kernels) => {
      const out = { w: odd.slice(), values: new Int32Array(6), errors: new Float32Array(6) };
      kernels.gptqRoundBlock(...args({ w: out.w, values: out.values, errors: out.errors, u: Float64Array.of(1, 0.5, 0, 0, 1, 0.5, 0, 0, 1) }));
      return out;
    });
    expect([...oddRuns[1].values]).to.deep.equal([...oddRuns[0].values]);
    expect([...oddRuns[1].values]).to.deep.equal([0, 0, 0, -8, 7, 0]);  // NaN spreads along row 0; row 1: -Inf, then +Inf (its error × U_01), then NaN (Inf × U_02 = 0)
    for (const key of ['w', 'errors'] as const) {
      oddRuns[0][key].forEach((v, i) => expect(Object.is(oddRuns[1][key][i], v), `${key}[${i}]: ${oddRuns[1][key][i]} vs ${v}`).to.equal(true));
    }
    expect(() => native.gptqRoundBlock(...args({ u: new Float32Array(9) }))).to.throw(TypeError, /u has the wrong element type/);
  });

  it('GPTQ over chunks of different sizes, one needing more damping, equals the chunks rounded one call each (working arrays reused)', () => {
    const full = gram().grams[0][0].matrix;
    const block = (first: number, size: number, spike = 0) => {
      const matrix = new Float64Array(size * size);
      let mean = 0;
      for (let i = 0; i < size; i++) mean += full[(first + i) * features + first + i] / size;
      for (let i = 0; i < size; i++) {
        for (let j = 0; j < size; j++) matrix[i * size + j] = full[(first + i) * features + first + j];
      }
      matrix[1] += spike * mean;
      matrix[size] += spike * mean;
      return { first, size, matrix, mean };
    };
    // The second chunk is made indefinite (a large symmetric pair off the diagonal): 1% damping does not make it
    // positive definite, so factorChunk retries with more.
    const [a, b] = [block(0, 17), block(17, 7, 5)];
    const damped = Float64Array.from(b.matrix, (v, i) => (i % 8 === 0 ? v + 0.01 * b.mean : v));
    expect(referenceKernels.upperFactorOfInverse(damped, 7, new Float64Array(49)), 'the second chunk with 1% damping').to.equal(false);
    const nearest = quantizeTensor(w, { shape: [outputs, features], bits: 4, granularity: 'channel', axis: 0 });
    const together = gptqRound(nearest, w, [[a, b]], view);
    const apart = gptqRound(gptqRound(nearest, w, [[a]], view), w, [[b]], view);
    expect(Array.from(together.values)).to.deep.equal(Array.from(apart.values));
    expect(together.values.filter((v, i) => v !== nearest.values[i]).length, 'integers changed by GPTQ').to.be.above(0);
    const tail = Array.from({ length: outputs }, (_, r) => Array.from(together.values.slice(r * features + 17, (r + 1) * features)));
    expect(tail.flat().some((v, i) => v !== nearest.values[Math.floor(i / 7) * features + 17 + (i % 7)]), 'the damped chunk re-rounded').to.equal(true);
  });

  it('LayerInputMoments sums x and x·xᵀ over the vectors a layer meets: matrix rows, and im2col columns per conv group', () => {
    const g = gram();
    expect(g.count).to.equal(samples);
    for (const i of [0, 11]) {
      let v = 0;
      for (let s = 0; s < samples; s++) v += x[s * features + i];
      expect(g.means()[0][i]).to.be.closeTo(v / samples, 1e-9);
    }
    for (const [i, j] of [[0, 0], [3, 17], [23, 5]]) {
      let v = 0;
      for (let s = 0; s < samples; s++) v += x[s * features + i] * x[s * features + j];
      expect(g.grams[0][0].matrix[i * features + j]).to.be.closeTo(v, 1e-3 * Math.abs(v) + 1e-3);
    }
    // Grouped conv, 2 groups of 2 channels, 3×3 kernel, padding 1, stride 2, on a [2, 4, 5, 6] input.
    const node = makeNode('Conv', ['x', 'w'], ['y'], 'conv', [makeIntAttribute('group', 2)]);
    const ints = (name: string, values: bigint[]) => create(AttributeProtoSchema, { name, type: AttributeProto_AttributeType.INTS, ints: values });
    node.attribute.push(ints('strides', [2n, 2n]), ints('pads', [1n, 1n, 1n, 1n]));
    const dims = [2, 4, 5, 6];
    const input = Float32Array.from({ length: 240 }, () => r() - 0.5);
    const conv = new LayerInputMoments({ kind: 'conv', node, weightDims: [6, 2, 3, 3] }, { gram: true, kernels: referenceKernels });
    conv.observe(input, dims);
    expect(conv.grams.length).to.equal(2);
    expect(conv.count).to.equal(2 * 3 * 3);
    const at = (b: number, c: number, y: number, xx: number) => (y < 0 || y >= 5 || xx < 0 || xx >= 6 ? 0 : input[((b * 4 + c) * 5 + y) * 6 + xx]);
    for (const group of [0, 1]) {
      const expected = new Float64Array(18 * 18);
      const expectedSums = new Float64Array(18);
      for (let b = 0; b < 2; b++) {
        for (let oy = 0; oy < 3; oy++) {
          for (let ox = 0; ox < 3; ox++) {
            const v = [];
            for (let c = 0; c < 2; c++) for (let ky = 0; ky < 3; ky++) for (let kx = 0; kx < 3; kx++) v.push(at(b, group * 2 + c, oy * 2 - 1 + ky, ox * 2 - 1 + kx));
            for (let i = 0; i < 18; i++) for (let j = 0; j < 18; j++) expected[i * 18 + j] += v[i] * v[j];
            v.forEach((x, i) => (expectedSums[i] += x));
          }
        }
      }
      for (let i = 0; i < 18 * 18; i++) expect(conv.grams[group][0].matrix[i]).to.be.closeTo(expected[i], 1e-5);
      // Means per im2col row: taps that read padding average in its zeros.
      conv.means()[group].forEach((m, i) => expect(m).to.be.closeTo(expectedSums[i] / 18, 1e-6));
    }
  });

  it('LayerInputMoments.observeSteps yields after each block of Gram rows (and conv group) and sums exactly what one SGEMM per block gives', () => {
    const r = rng(5);
    const [rows, cols] = [4000, 200];
    const data = Float32Array.from({ length: rows * cols }, () => r() - 0.5);
    const m = new LayerInputMoments({ kind: 'matrix', columns: cols, transposed: false }, { gram: true });
    let pieces = 0;
    for (const _ of m.observeSteps(data, [rows, cols])) pieces++;
    expect(gramBlockRows(cols, rows)).to.equal(167);  // 2^27 multiply-adds a piece
    expect(pieces).to.equal(2);
    // The whole block in one SGEMM, bit for bit (each element's sum is ordered by K alone).
    const x = new Float32Array(cols * rows);
    for (let i = 0; i < rows; i++) for (let c = 0; c < cols; c++) x[c * rows + i] = data[i * cols + c];
    const whole = new Float32Array(cols * cols);
    nativeKernels({ threads: 1 }).sgemm({ transA: false, transB: true, m: cols, n: cols, k: rows, a: x, b: x, c: whole, accumulate: true });
    expect(Buffer.from(m.grams[0][0].matrix.buffer).equals(Buffer.from(whole.buffer))).to.equal(true);
    // A grouped convolution: a piece per Gram block of 64 rows or fewer, and one after each group.
    const node = makeNode('Conv', ['x', 'w'], ['y'], 'c', [makeIntAttribute('group', 2)]);
    node.attribute.push(create(AttributeProtoSchema, { name: 'kernel_shape', type: AttributeProto_AttributeType.INTS, ints: [3n, 3n] }));
    const conv = new LayerInputMoments({ kind: 'conv', node, weightDims: [4, 10, 3, 3] }, { gram: true });
    let convPieces = 0;
    for (const _ of conv.observeSteps(Float32Array.from({ length: 20 * 36 }, () => r()), [1, 20, 6, 6])) convPieces++;
    expect(convPieces).to.equal(2 * (1 + 1));
    // A piece is at least one row, and at most the whole block.
    expect([gramBlockRows(512, 2 ** 30), gramBlockRows(9, 16)]).to.deep.equal([1, 9]);
  });

  it('gathers only the diagonal blocks of H over column chunks, and GPTQ over chunks still beats round-to-nearest', () => {
    const chunked = new LayerInputMoments({ kind: 'matrix', columns: features, transposed: false }, { gram: true, maxColumns: 10 });
    chunked.observe(x, [samples, features]);
    const full = gram().grams[0][0].matrix;
    expect(chunked.grams[0].map((b) => [b.first, b.size])).to.deep.equal([[0, 8], [8, 8], [16, 8]]);
    for (const { first, size, matrix } of chunked.grams[0]) {
      for (let i = 0; i < size; i++) {
        for (let j = 0; j < size; j++) expect(matrix[i * size + j]).to.be.closeTo(full[(first + i) * features + first + j], 1e-3 * Math.abs(full[(first + i) * features + first + j]) + 1e-3);
      }
    }
    // The same vectors stored transposed ([features, samples], Gemm with transA) give the same blocks.
    const xt = Float32Array.from({ length: x.length }, (_, i) => x[(i % samples) * features + Math.floor(i / samples)]);
    const transposed = new LayerInputMoments({ kind: 'matrix', columns: features, transposed: true }, { gram: true, maxColumns: 10 });
    transposed.observe(xt, [features, samples]);
    transposed.grams[0].forEach((b, c) => b.matrix.forEach((v, i) => expect(v).to.be.closeTo(chunked.grams[0][c].matrix[i], 1e-3 * Math.abs(v) + 1e-3)));
    const nearest = quantizeTensor(w, { shape: [outputs, features], bits: 4, granularity: 'channel', axis: 0 });
    const [a, b, c] = [nearest, gptqRound(nearest, w, chunked.grams, view), gptqRound(nearest, w, gram().grams, view)].map((q) => outputError(dequantize(q)));
    expect(b, `output error: nearest ${a}, chunks of 8 ${b}, whole ${c}`).to.be.lessThan(a);
    expect(c).to.be.at.most(b);
  });

  it('lowers the layer output error ‖(Ŵ − W)·X‖² well below round-to-nearest, same scales, inside the integer range', () => {
    for (const bits of [8, 4, 2]) {
      const nearest = quantizeTensor(w, { shape: [outputs, features], bits, granularity: 'channel', axis: 0 });
      const copy = Array.from(nearest.values);
      const rounded = gptqRound(nearest, w, gram().grams, view);
      expect(Array.from(nearest.values), 'input not modified').to.deep.equal(copy);
      expect(Array.from(rounded.scale)).to.deep.equal(Array.from(nearest.scale));
      const [a, b] = [nearest, rounded].map((q) => outputError(dequantize(q)));
      expect(b, `${bits}-bit: output error ${a} → ${b}`).to.be.lessThan(a / 2);
      const limit = 2 ** (bits - 1);
      for (const v of rounded.values) expect(v).to.be.within(-limit, limit - 1);
    }
  });

  it('lazy batch updates (blocks of columns through SGEMM) match column-by-column updates', () => {
    const nearest = quantizeTensor(w, { shape: [outputs, features], bits: 4, granularity: 'channel', axis: 0 });
    const h = gram().grams;
    const sequential = gptqRound(nearest, w, h, view, { block: features });
    for (const [block, kernels] of [[1, referenceKernels], [5, referenceKernels], [7, undefined]] as const) {
      const blocked = gptqRound(nearest, w, h, view, { block, kernels });
      const same = blocked.values.filter((v, i) => v === sequential.values[i]).length;
      expect(same, `block ${block}: ${same} of ${w.length} integers equal`).to.be.at.least(w.length - 2);
      expect(outputError(dequantize(blocked))).to.be.closeTo(outputError(dequantize(sequential)), 0.02 * outputError(dequantize(sequential)));
    }
  });

  it('pauses for the event loop on a wide layer (gptqRoundSteps) and gives the same integers as in one go', () => {
    const [rows, cols] = [256, 512];
    const r = rng(31);
    const wide = Float32Array.from({ length: rows * cols }, () => r() - 0.5);
    const inputs = Float32Array.from({ length: 600 * cols }, () => r() - 0.5);
    const moments = new LayerInputMoments({ kind: 'matrix', columns: cols, transposed: false }, { gram: true });
    moments.observe(inputs, [600, cols]);
    const wideView = { rows, columns: cols, rowStride: cols, columnStride: 1, rowsPerGram: rows };
    const nearest = quantizeTensor(wide, { shape: [rows, cols], bits: 4, granularity: 'channel', axis: 0 });
    const steps = gptqRoundSteps(nearest, wide, moments.grams, wideView);
    let pauses = 0;
    let r1 = steps.next();
    for (; !r1.done; r1 = steps.next()) pauses++;
    expect(Array.from(r1.value.values)).to.deep.equal(Array.from(gptqRound(nearest, wide, moments.grams, wideView).values));
    // The integers the implementation before gptqRoundSteps (commit 94ce229) gave on these inputs, as a hash and a
    // count of changed values: splitting it into pausable pieces changed no arithmetic.
    let hash = 0;
    for (const v of r1.value.values) hash = (Math.imul(hash, 31) + v + 8) | 0;
    expect([hash, r1.value.values.filter((v, i) => v !== nearest.values[i]).length]).to.deep.equal([1529765299, 29343]);
    // A 512-column factorization and 16 column blocks over 256 rows take well over 10 ms.
    expect(pauses, 'pauses').to.be.at.least(1);
  });

  it('runStepsAsync counts labelled steps only, not the pauses between them', async () => {
    function* steps(): Generator<string | undefined, number, void> {
      yield undefined;
      yield 'a';
      yield undefined;
      yield undefined;
      yield 'b';
      return 7;
    }
    const heard: Array<[string, number]> = [];
    expect(await runStepsAsync(steps(), (label, done) => heard.push([label, done]))).to.equal(7);
    expect(heard).to.deep.equal([['a', 1], ['b', 2]]);
  });

  it('is round-to-nearest when the inputs are uncorrelated (diagonal Gram matrix), and follows the weight layout', () => {
    const nearest = quantizeTensor(w, { shape: [outputs, features], bits: 4, granularity: 'channel', axis: 0 });
    const diagonal = new Float32Array(features * features);
    for (let i = 0; i < features; i++) diagonal[i * features + i] = 1 + i;
    expect(Array.from(gptqRound(nearest, w, [[{ first: 0, size: features, matrix: diagonal }]], view).values)).to.deep.equal(Array.from(nearest.values));
    // The same weights stored [features, outputs] (MatMul): the same integers, transposed.
    const t = Float32Array.from({ length: w.length }, (_, i) => w[(i % outputs) * features + Math.floor(i / outputs)]);
    const nearestT = quantizeTensor(t, { shape: [features, outputs], bits: 4, granularity: 'channel', axis: 1 });
    const a = gptqRound(nearest, w, gram().grams, view).values;
    const b = gptqRound(nearestT, t, gram().grams, { rows: outputs, columns: features, rowStride: 1, columnStride: outputs, rowsPerGram: outputs }).values;
    for (let i = 0; i < t.length; i++) expect(b[i]).to.equal(a[(i % outputs) * features + Math.floor(i / outputs)]);
  });
});

describe('calibration observers (streaming)', () => {
  it('keep a fixed state size however many batches they see, and merge', () => {
    const h = new HistogramObserver();
    const m = new MinMaxObserver();
    const a = new AciqObserver();
    for (let b = 0; b < 50; b++) {
      const batch = laplace(1000, b, 1 + b / 10);
      h.observe(batch);
      m.observe(batch);
      a.observe(batch);
    }
    expect(h.counts.length).to.equal(2048);
    expect(h.total).to.equal(50_000);
    const h2 = new HistogramObserver().observe(laplace(1000, 99, 50));
    const total = h.total + h2.total;
    h.merge(h2);
    expect(h.total).to.equal(total);
    expect(h.counts.reduce((x, y) => x + y, 0)).to.equal(total);
    expect(m.range().hi).to.be.greaterThan(0);
    const r = a.range(4, 'laplace');
    expect(r.hi).to.be.lessThan(m.range().hi);
  });
  it('ACIQ statistics pool batches: σ exactly, b at the pooled mean (batches of one value, batches with their own means)', () => {
    const all = laplace(1000, 7);
    const exact = tensorStats(all);
    const ofOne = new AciqObserver();
    for (const v of all) ofOne.observe(Float32Array.of(v));
    // Gaussian prior: σ and mean pooled exactly, so the range is the whole tensor's.
    const gauss = aciqRange(exact, 4, 'gauss', false);
    expect(ofOne.range(4, 'gauss', false).lo).to.be.closeTo(gauss.lo, 1e-9);
    expect(ofOne.range(4, 'gauss', false).hi).to.be.closeTo(gauss.hi, 1e-9);
    // Laplace prior: b approximated (was 0, the range collapsed onto the mean).
    const laplaceHi = (o: AciqObserver) => o.range(4, 'laplace', false).hi;
    const wholeHi = aciqRange(exact, 4, 'laplace', false).hi;
    expect(laplaceHi(ofOne)).to.be.closeTo(wholeHi, 0.02 * (wholeHi - exact.mean));
    // Two batches whose means are 10 apart: b ≈ 5 (averaging each batch's b gave ≈ 1).
    const apart = new AciqObserver().observe(all.map((v) => v - 5)).observe(all.map((v) => v + 5));
    const both = tensorStats(Float32Array.from([...all.map((v) => v - 5), ...all.map((v) => v + 5)]));
    const bothHi = aciqRange(both, 4, 'laplace', false).hi;
    expect(laplaceHi(apart)).to.be.closeTo(bothHi, 0.01 * (bothHi - both.mean));
    // Merging observers is observing both.
    const halves = new AciqObserver().observe(all.subarray(0, 300)).merge(new AciqObserver().observe(all.subarray(300)));
    expect(halves.range(4, 'gauss', false).hi).to.be.closeTo(gauss.hi, 1e-9);
  });
  it('percentile and KL ranges clip heavy tails; the moving-average min/max follows batches', () => {
    const h = new HistogramObserver().observe(laplace(100_000, 7));
    const p = h.percentileRange(99);
    expect(p.hi).to.be.closeTo(Math.log(100), 0.2);  // |Laplace(1)| 99th percentile = ln 100
    const kl = h.klRange();
    expect(kl.hi).to.be.lessThan(h.max).and.greaterThan(1);
    const mse4 = h.mseRange(4);
    expect(Math.max(-mse4.lo, mse4.hi)).to.be.lessThan(Math.max(-h.min, h.max)).and.greaterThan(1);
    expect(() => h.klRange(0)).to.throw(RangeError, /levels/);
    const ema = new MinMaxObserver({ movingAverage: 0.5 });
    ema.observe(Float32Array.of(0, 10)).observe(Float32Array.of(0, 20));
    expect(ema.range().hi).to.equal(15);
  });
});

describe('MSE ranges from a histogram', () => {
  // What quantizing x with the range costs, as QuantizeLinear then DequantizeLinear compute it.
  const realError = (x: Float32Array, range: { lo: number; hi: number }, bits: number, signed: boolean): number => {
    const y = fakeQuantize(x, activationParams({ ...range, bits }, signed));
    let e = 0;
    for (let i = 0; i < x.length; i++) e += (x[i] - y[i]) ** 2;
    return e / x.length;
  };
  const hardSwish = (v: number) => (v * Math.min(Math.max(v + 3, 0), 6)) / 6;
  const data: Array<[string, Float32Array]> = [
    ['Laplace', laplace(100_000, 21)],
    ['hard-swish of N(0, 2)', gaussian(100_000, 22).map((v) => hardSwish(2 * v))],
    ['ReLU of Laplace', laplace(100_000, 23).map((v) => Math.max(0, v))],
  ];

  it('the chosen range has (nearly) the least real error among the candidates, and less than min/max', () => {
    for (const [name, x] of data) {
      const h = new HistogramObserver().observe(x);
      for (const [bits, signed] of [[8, false], [8, true], [4, false], [4, true]] as const) {
        const chosen = h.mseRange(bits, { signed, symmetric: signed });
        // The real error of every candidate of a coarser grid: the expected-error model must pick as well.
        expect(h.mseRange(bits, { signed, symmetric: signed, candidates: 1 })).to.deep.equal({ lo: h.min, hi: h.max });
        let best = Infinity;
        const grid = 25;
        for (let a = 1; a <= grid; a++) {
          for (let b = 1; b <= grid; b++) {
            if (signed && a !== b) continue;
            const range = signed
              ? { lo: Math.max(h.min, (-Math.max(-h.min, h.max) * a) / grid), hi: Math.min(h.max, (Math.max(-h.min, h.max) * a) / grid) }
              : { lo: h.min < 0 ? (h.min * a) / grid : h.min, hi: (h.max * b) / grid };
            best = Math.min(best, realError(x, range, bits, signed));
          }
        }
        const error = realError(x, chosen, bits, signed);
        const label = `${name}, ${bits} bits, ${signed ? 'signed' : 'unsigned'}: chosen ${error}, best of the grid ${best}`;
        expect(error, label).to.be.at.most(best * 1.05);
        expect(error, label).to.be.lessThan(realError(x, { lo: h.min, hi: h.max }, bits, signed));
      }
    }
  });

  it('each side of zero keeps its own counts: a short negative tail is kept while the long positive one is clipped', () => {
    const h = new HistogramObserver().observe(data[1][1]);
    const { lo, hi } = h.mseRange(4, { signed: false, symmetric: false });
    expect(h.min).to.be.closeTo(-0.375, 0.01);
    // The lowest representable value (the zero point's distance from qmin, in steps).
    const p = activationParams({ lo, hi, bits: 4 }, false);
    const lowest = (p.qmin - p.zeroPoint) * p.scale;
    expect(lowest, `lowest ${lowest} (range ${lo}..${hi}) of ${h.min}`).to.be.at.most(0.9 * h.min);
    expect(hi, `hi ${hi} of ${h.max}`).to.be.lessThan(0.8 * h.max);
  });

  it('exact zeros cost nothing (0 is always representable): a ReLU output clips as its non-zero values do', () => {
    const nonZero = data[2][1].filter((v) => v > 0);
    const withZeros = new HistogramObserver().observe(data[2][1]);
    expect(withZeros.zeros).to.be.greaterThan(40_000);
    const alone = new HistogramObserver().observe(nonZero);
    expect(alone.zeros).to.equal(0);
    for (const bits of [4, 8]) {
      expect(withZeros.mseRange(bits, { signed: false, symmetric: false }).hi).to.equal(alone.mseRange(bits, { signed: false, symmetric: false }).hi);
    }
  });

  it('merging observers equals observing everything, bin by bin, also when one side saw only zeros', () => {
    const x = data[1][1];
    const small = x.subarray(0, 1000).map((v) => v / 64);
    const rest = x.subarray(1000);
    // Re-binning (the histogram grows after the small values) must give the bins of an observer that saw the
    // largest values first: power-of-two ranges nest exactly.
    const reference = new HistogramObserver().observe(rest).observe(small).observe(new Float32Array(7));
    const merged = new HistogramObserver().observe(small).merge(new HistogramObserver().observe(rest)).merge(new HistogramObserver().observe(new Float32Array(7)));
    const grown = new HistogramObserver().observe(small).observe(rest).observe(new Float32Array(7));
    expect(grown.limit).to.equal(reference.limit);
    for (const [name, h] of [['merged', merged], ['grown', grown]] as const) {
      expect([...h.counts], name).to.deep.equal([...reference.counts]);
      expect([...h.negativeCounts], name).to.deep.equal([...reference.negativeCounts]);
      expect([h.zeros, h.total, h.min, h.max], name).to.deep.equal([reference.zeros, reference.total, reference.min, reference.max]);
    }
    expect(reference.negativeCounts.reduce((a, b) => a + b, 0)).to.equal(x.filter((v) => v < 0).length);
    expect(reference.zeros).to.equal(7 + x.filter((v) => v === 0).length);
    const zeros = new HistogramObserver().observe(new Float32Array(5)).merge(new HistogramObserver().observe(new Float32Array(3)));
    expect([zeros.counts[0], zeros.zeros, zeros.total]).to.deep.equal([8, 8, 8]);
    expect(zeros.mseRange(8)).to.deep.equal({ lo: 0, hi: 0 });
  });

  it('one-sided data never get a range whose ends cross; 16 bits; symmetric follows signed by default', () => {
    const narrow = (lo: number, hi: number) => Float32Array.from({ length: 10_000 }, (_, i) => lo + ((hi - lo) * i) / 9999);
    for (const [name, x] of [['positive', narrow(15, 15.3)], ['negative', narrow(-7.2, -7)]] as const) {
      const h = new HistogramObserver().observe(x);
      for (const [bits, signed, symmetric] of [[4, false, false], [4, true, true], [4, false, true], [2, true, true], [16, false, false]] as const) {
        const range = h.mseRange(bits, { signed, symmetric });
        const label = `${name}, ${bits} bits, signed ${signed}, symmetric ${symmetric}: ${range.lo}..${range.hi}`;
        expect(range.lo, label).to.be.at.most(range.hi);
        if (signed === symmetric) expect(realError(x, range, bits, signed), label).to.be.at.most(realError(x, { lo: h.min, hi: h.max }, bits, signed));
      }
    }
    const h = new HistogramObserver().observe(data[0][1]);
    expect(h.mseRange(16, { signed: false })).to.deep.equal(h.mseRange(16, { signed: false, symmetric: false }));
    const wide = h.mseRange(16, { signed: false });
    expect(wide.hi - wide.lo, '16 bits keep (nearly) the whole range').to.be.greaterThan(0.9 * (h.max - h.min));
    expect(() => h.mseRange(8, { signed: 1 as never })).to.throw(TypeError, /a boolean for options\.signed/);
  });
});

describe('histogram observer: native batch statistics', () => {
  // The definition, in plain loops: what observe() must do to its fields.
  function plainHistogram(batches: Float32Array[], bins = 2048) {
    let min = Infinity, max = -Infinity, limit = 0, zeros = 0, total = 0;
    const counts = new Float64Array(bins), negativeCounts = new Float64Array(bins);
    for (const batch of batches) {
      const finite = [...batch].filter((v) => Number.isFinite(v));
      if (finite.length === 0) continue;
      for (const v of finite) { min = Math.min(min, v); max = Math.max(max, v); }
      const maxAbs = Math.max(Math.abs(min), Math.abs(max));
      // The limit: the smallest power of two strictly above every |x| (half-open bins).
      if (maxAbs >= limit && maxAbs > 0) {
        let grown = limit === 0 ? 2 ** Math.floor(Math.log2(maxAbs)) : limit;
        while (grown <= maxAbs) grown *= 2;
        if (limit > 0) {
          for (const c of [counts, negativeCounts]) {
            const old = Float64Array.from(c);
            c.fill(0);
            old.forEach((x, i) => { c[Math.floor(i / (grown / limit))] += x; });
          }
        }
        limit = grown;
      }
      for (const v of finite) {
        const b = Math.min(bins - 1, Math.floor(Math.abs(v) * (limit > 0 ? bins / limit : 0)));
        counts[b]++;
        if (v < 0) negativeCounts[b]++;
        else if (v === 0) zeros++;
      }
      total += finite.length;
    }
    return { min, max, limit, zeros, total, counts: [...counts], negativeCounts: [...negativeCounts] };
  }

  it('min, max, counts, negative counts and zeros equal the plain definition (±Infinity skipped, -0, growth, views)', () => {
    const rand = rng(41);
    const batches = [
      Float32Array.of(0, -0, 0, Infinity, -Infinity),
      Float32Array.from({ length: 5000 }, (_, i) => (i % 7 === 0 ? 0 : (rand() - 0.3) * 1e-3)),
      Float32Array.from({ length: 7001 }, (_, i) => (i % 11 === 0 ? -Infinity : (rand() - 0.6) * 37)),
      new Float32Array(Float32Array.from({ length: 300 }, () => (rand() - 0.5) * 3e5).buffer, 40, 200),  // a view with an offset
      Float32Array.of(2 ** -140, -(2 ** -149), 3.4e38),
    ];
    const h = new HistogramObserver();
    for (const b of batches) h.observe(b);
    const want = plainHistogram(batches);
    expect({ min: h.min, max: h.max, limit: h.limit, zeros: h.zeros, total: h.total, counts: [...h.counts], negativeCounts: [...h.negativeCounts] })
      .to.deep.equal(want);
    const m = new MinMaxObserver();
    for (const b of batches) m.observe(b);
    expect(m.range()).to.deep.equal({ lo: want.min, hi: want.max });
  });

  it('with a bin count that is not a power of two (|x|·bins/limit then needs more than float32), ±0 order, and bad arguments', () => {
    const rand = rng(43);
    const batches = [Float32Array.from({ length: 20_000 }, () => (rand() - 0.45) * 6), Float32Array.of(4, -4, 8, -8, 7.999999)];
    const h = new HistogramObserver({ bins: 384 });
    for (const b of batches) h.observe(b);
    const want = plainHistogram(batches, 384);
    expect({ min: h.min, max: h.max, limit: h.limit, zeros: h.zeros, total: h.total, counts: [...h.counts], negativeCounts: [...h.negativeCounts] })
      .to.deep.equal(want);
    // The first of +0 and -0 stays the minimum, as \`if (v < min)\` kept it.
    expect(Object.is(new MinMaxObserver().observe(Float32Array.of(0, -0)).range().lo, 0)).to.equal(true);
    expect(Object.is(new MinMaxObserver().observe(Float32Array.of(-0, 0)).range().lo, -0)).to.equal(true);
    const b = native();
    const counts = new Float64Array(4);
    expect(() => b.histogramAdd(Float32Array.of(1), NaN, counts, new Float64Array(4))).to.throw(RangeError, /binsPerUnit/);
    expect(() => b.histogramAdd(Float32Array.of(1), -1, counts, new Float64Array(4))).to.throw(RangeError, /binsPerUnit/);
    expect(() => b.histogramAdd(Float32Array.of(1), Infinity, counts, new Float64Array(4))).to.throw(RangeError, /binsPerUnit/);
    expect(() => b.histogramAdd(Float32Array.of(1), '1' as never, counts, new Float64Array(4))).to.throw(TypeError, /binsPerUnit must be a number/);
    expect(() => b.histogramAdd(Float32Array.of(1), 1, counts, new Float64Array(3))).to.throw(RangeError, /negativeCounts/);
    expect(() => b.histogramAdd(Float32Array.of(1), 1, new Float64Array(0), new Float64Array(0))).to.throw(RangeError, /counts must not be empty/);
    expect(() => b.finiteRange(new Float64Array(2) as never)).to.throw(TypeError);
  });

  it('a NaN is an error naming its index; nothing is counted from that batch', () => {
    const batch = Float32Array.of(1, 2, -3, NaN, 5, NaN);
    const h = new HistogramObserver().observe(Float32Array.of(1));
    expect(() => h.observe(batch)).to.throw(RangeError, /a number for batch\[3\] but received NaN.*Remove NaN values before calibration/);
    expect([h.total, h.counts.reduce((a, b) => a + b, 0)]).to.deep.equal([1, 1]);
    expect(() => new MinMaxObserver().observe(batch)).to.throw(RangeError, /batch\[3\]/);
    expect(() => new HistogramObserver().observe([1, 2] as never)).to.throw(TypeError, /Float32Array for batch/);
  });
});

describe('KL (entropy) ranges', () => {
  // A ReLU output: 60% exact zeros, the rest |N(0, 1)|.
  const relu = gaussian(200_000, 5).map((v, i) => (i % 5 < 3 ? 0 : Math.abs(v)));
  const observed = new HistogramObserver().observe(relu);

  it('the zero spike after a ReLU does not pull the clip towards 0', () => {
    for (const bits of [8, 4]) {
      const { lo, hi } = observed.klRange(klLevels(bits, true));
      expect(lo).to.equal(0);
      // |N(0, 1)|: 2.0 is its 95.4th percentile; a clip below it would saturate ≥ 4.6% of the non-zero values.
      expect(hi, `${bits} bits`).to.be.greaterThan(2).and.at.most(observed.max);
    }
  });

  it('fewer levels clip harder, and levels follow the bits and the sign', () => {
    const hi8 = observed.klRange(klLevels(8, true)).hi;
    const hi4 = observed.klRange(klLevels(4, true)).hi;
    expect(hi4).to.be.lessThan(hi8);
    expect([klLevels(8, false), klLevels(8, true), klLevels(4, true), klLevels(2, false)]).to.deep.equal([128, 255, 15, 2]);
    expect(() => klLevels(9, true)).to.throw(RangeError, /bits/);
  });

  it('matches the plain definition (P and Q built bin by bin for every candidate threshold)', () => {
    // The reference: TensorRT's search written out, one log per bin per candidate.
    const plainKlThreshold = (o: HistogramObserver, levels: number): number => {
      const h = Float64Array.from(o.counts);
      h[0] = h[1];
      const nb = o.bins;
      let best = Infinity;
      let bestI = nb;
      for (let i = Math.max(levels, nb / 16); i <= nb; i++) {
        const p = h.slice(0, i);
        for (let j = i; j < nb; j++) p[i - 1] += h[j];
        const q = new Float64Array(i);
        for (let g = 0; g < levels; g++) {
          const start = Math.floor(g * (i / levels));
          const stop = g === levels - 1 ? i : Math.floor((g + 1) * (i / levels));
          let m = 0;
          let nz = 0;
          for (let j = start; j < stop; j++) if (h[j] !== 0) (m += h[j]), nz++;
          for (let j = start; j < stop; j++) q[j] = h[j] !== 0 ? m / nz : 0;
        }
        const ps = p.reduce((a, b) => a + b, 0);
        const qs = q.reduce((a, b) => a + b, 0);
        if (ps === 0 || qs === 0) continue;
        let kl = 0;
        for (let j = 0; j < i; j++) if (p[j] > 0) kl += (p[j] / ps) * Math.log(p[j] / ps / Math.max(q[j] / qs, 1e-4 / i));
        if (kl < best) (best = kl), (bestI = i);
      }
      return (bestI * o.limit) / nb;
    };
    const random = rng(31);
    const cases: [string, Float32Array][] = [
      ['ReLU output', relu],
      ['Laplace', laplace(50_000, 3)],
      ['bimodal with empty bins', Float32Array.from({ length: 30_000 }, (_, i) => (i % 2 ? 3 : -0.5) + 0.01 * random())],
      ['few values', Float32Array.of(0, 0, 0, 1, 2, 2, 7.5, -3)],
      ['heavy tail', Float32Array.from({ length: 20_000 }, () => Math.tan(1.5 * random()))],
      ['values on a coarse grid (most bins empty)', Float32Array.from({ length: 5000 }, (_, i) => (i % 50) * 0.37 * (1 + (i % 7)))],
    ];
    for (const [name, values] of cases) {
      const o = new HistogramObserver().observe(values);
      for (const levels of [128, 255, 15, 3]) {
        const t = plainKlThreshold(o, levels);
        expect(o.klRange(levels), `${name}, ${levels} levels`).to.deep.equal({ lo: Math.max(o.min, -t), hi: Math.min(o.max, t) });
      }
    }
  });

  it("quantizeTensor's 'kl' method uses the levels of the requested bits", () => {
    const at = (bits: 4 | 8) => quantizeTensor(relu, { shape: [relu.length], bits, signed: false, method: 'kl' }).scale[0] * (2 ** bits - 1);
    expect(at(8)).to.be.closeTo(observed.klRange(255).hi, 1e-5 * observed.max);
    expect(at(4)).to.be.closeTo(observed.klRange(15).hi, 1e-5 * observed.max);
  });
});

describe('LSQ', () => {
  it('T10: forward values and gradients (signed 4-bit, s = 0.1 and the tie case)', () => {
    const cases: Array<[number, number, number, number, number]> = [
      [0.37, 0.1, 0.4, 0.3, 1], [0.149, 0.1, 0.1, -0.49, 1], [0.151, 0.1, 0.2, 0.49, 1],
      [-0.3125, 0.125, -0.25, 0.5, 1], [1.0, 0.1, 0.7, 7, 0], [-1.0, 0.1, -0.8, -8, 0],
    ];
    for (const [v, s, vhat, dstep, dv] of cases) {
      const x = Float32Array.of(v);
      expect(lsqQuantize(x, s, { bits: 4 })[0]).to.be.closeTo(vhat, 1e-6);
      const { gradInput, gradStep } = lsqBackward(x, s, Float32Array.of(1), { bits: 4, gradScale: 1 });
      expect(gradStep as number, `v=${v}`).to.be.closeTo(dstep, 1e-5);
      expect(gradInput[0]).to.equal(dv);
    }
    const u: Array<[number, number, number, number]> = [[0.49, 0, -0.49, 1], [0.51, 1, 0.49, 1], [2.5, 2, -0.5, 1], [3.7, 3, 3, 0]];
    for (const [v, vhat, dstep, dv] of u) {
      expect(lsqQuantize(Float32Array.of(v), 1, { bits: 2, signed: false })[0]).to.equal(vhat);
      const g = lsqBackward(Float32Array.of(v), 1, Float32Array.of(1), { bits: 2, signed: false, gradScale: 1 });
      expect(g.gradStep as number).to.be.closeTo(dstep, 1e-6);
      expect(g.gradInput[0]).to.equal(dv);
    }
  });
  it('T11: gradient scale and initial step', () => {
    expect(lsqGradScale(589_824, 4)).to.be.closeTo(4.9214124e-4, 1e-9);
    expect(lsqGradScale(589_824, 2)).to.be.closeTo(1.3020833e-3, 1e-9);
    expect(lsqInitStep(new Float32Array([0.1, -0.2, 0.3, -0.4]), { bits: 4 })).to.be.closeTo(0.18898224, 1e-7);
    expect(lsqInitStep(new Float32Array([0.1, -0.2, 0.3, -0.4]), { bits: 2 })).to.be.closeTo(0.5, 1e-7);
    expect(lsqInitStep(new Float32Array([0, 0.5, 1, 2.5]), { bits: 4, signed: false })).to.be.closeTo(0.51639778, 1e-7);
  });
  it('per-channel steps and every kernel agree bit for bit', () => {
    const v = laplace(3 * 1000, 11);
    const steps = Float32Array.of(0.1, 0.2, 0.3);
    const g = laplace(3 * 1000, 12);
    const want = lsqBackward(v, steps, g, { bits: 3, shape: [3, 1000], kernel: 'scalar' });
    // Every SIMD kernel this CPU runs (those it cannot are reported as skipped below).
    for (const kernel of cpuInfo().kernels.quantize.filter((k) => k !== 'scalar')) {
      const got = lsqBackward(v, steps, g, { bits: 3, shape: [3, 1000], kernel });
      expect(Array.from(got.gradStep as Float64Array), kernel).to.deep.equal(Array.from(want.gradStep as Float64Array));
      expect(Array.from(got.gradInput), kernel).to.deep.equal(Array.from(want.gradInput));
    }
    const f = lsqQuantize(v, steps, { bits: 3, shape: [3, 1000] });
    expect(f[1500] / 0.2).to.be.closeTo(Math.round(f[1500] / 0.2), 1e-5);
  });
  reportMissingKernels('quantize', 'LSQ');
});

describe('GDRQ', () => {
  it('T12: Scale-Clip with k = 2 and the 2-bit codes on a grid of step T', () => {
    const w = new Float32Array([0.1, -0.5, 0.2, 2.0, -0.3, 0.4]);
    const { clipped, thresholds } = scaleClip(w);
    expect(thresholds[0]).to.be.closeTo(1.1666667, 1e-6);
    expect(clipped[3]).to.be.closeTo(1.1666667, 1e-6);
    const q = quantizeTensor(clipped, { shape: [6], bits: 2, scale: thresholds[0] });
    expect(Array.from(q.values)).to.deep.equal([0, 0, 0, 1, 0, 0]);
    const groups = scaleClip(new Float32Array([1, -1, 4, 4]), { shape: [4], groups: 2 });
    expect(Array.from(groups.thresholds)).to.deep.equal([2, 8]);
  });
  it('T13: folding a group scale into batch normalization', () => {
    const { gain, shift } = foldScalesIntoBatchNorm({ gamma: [1.5], beta: [0.2], mean: [0.1], variance: [4], epsilon: 0 }, [0.05]);
    expect(gain[0]).to.be.closeTo(0.0375, 1e-12);
    expect(shift[0]).to.be.closeTo(0.125, 1e-12);
    expect(gain[0] * 7 + shift[0]).to.be.closeTo(0.3875, 1e-12);
  });
  it('the activation Scale-Clip keeps a running threshold with k = 3', () => {
    const clip = new ActivationScaleClip({ momentum: 0.5 });
    expect(clip.update(Float32Array.of(1, -1))).to.equal(3);
    expect(clip.update(Float32Array.of(2, -2))).to.equal(4.5);
    expect(Array.from(clip.apply(Float32Array.of(10, -1)))).to.deep.equal([4.5, -1]);
  });
  it("granularity 'group' gives each contiguous channel group its own clip (L1 search by default)", () => {
    const w = laplace(8 * 50, 21);
    for (let i = 200; i < 400; i++) w[i] *= 10;  // the second half of the channels is larger
    const q = quantizeTensor(w, { shape: [8, 50], granularity: 'group', groups: 2, bits: 4 });
    expect(q.scaleShape).to.deep.equal([2]);
    expect(q.scale[1]).to.be.greaterThan(5 * q.scale[0]);
    const back = dequantize(q);
    expect(back.length).to.equal(w.length);
  });
  it("the paper's observation: at 4 bits with L1 loss, Laplace > Gaussian > uniform in loss, optimal α the other way", () => {
    const n = 100_000;
    const r = rng(31);
    const samples = {
      laplace: laplace(n, 32),
      gauss: gaussian(n, 33),
      uniform: Float32Array.from({ length: n }, () => r() * 2 - 1),
    };
    const result: Record<string, { loss: number; alpha: number }> = {};
    for (const [name, raw] of Object.entries(samples)) {
      let max = 0;
      for (const v of raw) max = Math.max(max, Math.abs(v));
      const x = raw.map((v) => (v * 10) / max);  // span ±10 as in the paper's figure
      const q = quantizeTensor(x, { shape: [n], bits: 4, method: 'mse', norm: 1 });
      const back = dequantize(q);
      let num = 0;
      let den = 0;
      for (let i = 0; i < n; i++) {
        num += Math.abs(x[i] - back[i]);
        den += Math.abs(x[i]);
      }
      result[name] = { loss: num / den, alpha: q.scale[0] * 7 };
    }
    expect(result.laplace.loss).to.be.greaterThan(result.gauss.loss);
    expect(result.gauss.loss).to.be.greaterThan(result.uniform.loss);
    expect(result.laplace.alpha).to.be.lessThan(result.gauss.alpha);
    expect(result.gauss.alpha).to.be.lessThan(result.uniform.alpha);
  });
});
