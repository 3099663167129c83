// lowbit against onnxruntime-node's QuantizeLinear (opset 21) on the same data:
// the integer outputs must be identical.
import { expect } from 'chai';

import { cpuInfo, integerRange, quantizeTensor, type QuantizeOptions } from '../../ts';
import { fakeQuantize } from '../../ts/onnx/passes/quantize-activations';
import { quantizeLinearModel, runQuantizeLinear, session } from '../../ts/bench/ort-models';
import { reportMissingKernels } from '../helpers/kernels';
import { rng, trickyData } from '../helpers/random';

async function compare(x: Float32Array, opts: QuantizeOptions, ortAxis?: number, blockSize?: number): Promise<void> {
  const ref = quantizeTensor(x, { ...opts, kernel: 'scalar' });
  const zp = ref.signed ? Int8Array.from(ref.zeroPoint) : Uint8Array.from(ref.zeroPoint);
  const model = quantizeLinearModel({ shape: ref.shape, scale: ref.scale, zeroPoint: zp, scaleShape: ref.scaleShape, axis: ortAxis, blockSize });
  const want = await runQuantizeLinear(await session(model), x, ref.shape);
  for (const kernel of cpuInfo().kernels.quantize) {
    const got = quantizeTensor(x, { ...opts, kernel }).values;
    for (let i = 0; i < x.length; i++) {
      if (got[i] !== want[i]) expect.fail(`${kernel} ${JSON.stringify(opts)}: element ${i} (x=${x[i]}): lowbit ${got[i]}, onnxruntime ${want[i]}`);
    }
  }
}

describe('bit-exact with onnxruntime QuantizeLinear', () => {
  reportMissingKernels('quantize', 'QuantizeLinear');
  it('per tensor, int8 and uint8, explicit scales with ties and saturation', async () => {
    for (const [scale, signed, zeroPoint] of [[0.5, true, 0], [0.1, true, -17], [0.0078125, false, 128], [3, false, 0]] as const) {
      const x = trickyData(10_000, scale, 7).map((v) => (Number.isFinite(v) ? v : 0));
      await compare(x, { shape: [x.length], scale, zeroPoint, signed, symmetric: false });
    }
  });

  it('per tensor with minmax and mse parameters on random data', async () => {
    const r = rng(8);
    const x = Float32Array.from({ length: 65_537 }, () => (r() - 0.3) * 20);
    await compare(x, { shape: [x.length], signed: false, symmetric: false });
    await compare(x, { shape: [x.length], method: 'mse' });
  });

  it('per channel (ONNX axis) and blocked (ONNX block_size) layouts', async () => {
    const r = rng(9);
    const x = Float32Array.from({ length: 24 * 37 }, () => (r() - 0.5) * 8);
    await compare(x, { shape: [24, 37], granularity: 'channel', axis: 0 }, 0);
    await compare(x, { shape: [24, 37], granularity: 'channel', axis: 1, signed: false, symmetric: false }, 1);
    await compare(x, { shape: [24, 37], granularity: 'block', axis: 1, blockSize: 16 }, 1, 16);
    await compare(x, { shape: [24, 37], granularity: 'block', axis: 0, blockSize: 5, method: 'mse' }, 0, 5);
  });
});

describe('fakeQuantize (activation QuantizeLinear → DequantizeLinear, native) against onnxruntime', () => {
  it('equals QuantizeLinear then (q − z)·s bit for bit: uint8, int8, uint16 and int16, ties and saturation', async () => {
    const cases: Array<[number, number, boolean, 8 | 16]> = [[0.05, 128, false, 8], [0.1, 0, true, 8], [0.0078125, 3, false, 8], [1e-3, 30000, false, 16], [2e-4, 0, true, 16]];
    for (const [scale, zeroPoint, signed, bits] of cases) {
      const x = trickyData(20_000, scale, bits + zeroPoint).map((v) => (Number.isFinite(v) ? v : 0));
      const { qmin, qmax } = integerRange(bits, signed);
      const zp = bits === 8 ? (signed ? Int8Array.of(zeroPoint) : Uint8Array.of(zeroPoint)) : signed ? Int16Array.of(zeroPoint) : Uint16Array.of(zeroPoint);
      const q = await runQuantizeLinear(await session(quantizeLinearModel({ shape: [x.length], scale: Float32Array.of(scale), zeroPoint: zp, scaleShape: [] })), x, [x.length]);
      const s = Math.fround(scale);
      const got = fakeQuantize(x, { scale: s, zeroPoint, qmin, qmax });
      for (let i = 0; i < x.length; i++) {
        const want = Math.fround((q[i] - zeroPoint) * s);
        if (!Object.is(got[i], want) && !(got[i] === 0 && want === 0)) expect.fail(`${bits}-bit ${signed ? 'signed' : 'unsigned'} z=${zeroPoint}: x[${i}] = ${x[i]}: ${got[i]}, onnxruntime ${want}`);
      }
    }
  });
});
