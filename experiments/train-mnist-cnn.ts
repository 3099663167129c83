/**
 * Trains the bundled example model, a small CNN for MNIST, in plain
 * TypeScript (deterministic: seeded initialisation and sample order), and
 * writes it as ONNX (opset 13) to assets/mnist-cnn.onnx (one epoch over the
 * 60 000 training images, about 2 minutes on one core), plus 64 training
 * images as a calibration folder (assets/mnist-calibration/input/000.npy).
 *   input [N,1,28,28] → Conv 3×3 (8) → BatchNorm → ReLU → MaxPool 2
 *                     → Conv 3×3 (16) → BatchNorm → ReLU → MaxPool 2
 *                     → Flatten (784) → Gemm (10)
 * Run: npm run build:ts && node dist/experiments/train-mnist-cnn.js
 */
import { create, toBinary } from '@bufbuild/protobuf';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { AttributeProto_AttributeType, ModelProtoSchema, TensorProto_DataType } from 'onnx-buf';

import { writeNpy } from '../test/helpers/npy';
import { rng } from '../test/helpers/random';
import { loadMnist } from '../ts/train/mnist';

const EPS = 1e-5;
const TRAIN_IMAGES = 60_000;
const BATCH = 32;
const LEARNING_RATE = 0.05;
const MOMENTUM = 0.9;

interface Param { value: Float32Array; grad: Float32Array; velocity: Float32Array }
const param = (n: number, init: (i: number) => number): Param =>
  ({ value: Float32Array.from({ length: n }, (_, i) => init(i)), grad: new Float32Array(n), velocity: new Float32Array(n) });

const random = rng(42);
const he = (fanIn: number) => () => (random() * 2 - 1) * Math.sqrt(6 / fanIn);

class Conv3x3 {
  w: Param;
  b: Param;
  input!: Float32Array;
  constructor(readonly cin: number, readonly cout: number) {
    const init = he(cin * 9);
    this.w = param(cout * cin * 9, init);
    this.b = param(cout, () => 0);
  }
  forward(x: Float32Array, n: number, h: number, w: number): Float32Array {
    this.input = x;
    const { cin, cout } = this;
    const out = new Float32Array(n * cout * h * w);
    const W = this.w.value;
    for (let b = 0; b < n; b++) {
      for (let o = 0; o < cout; o++) {
        const ob = ((b * cout + o) * h) * w;
        out.fill(this.b.value[o], ob, ob + h * w);
        for (let c = 0; c < cin; c++) {
          const ib = ((b * cin + c) * h) * w;
          for (let ky = 0; ky < 3; ky++) {
            for (let kx = 0; kx < 3; kx++) {
              const k = W[((o * cin + c) * 3 + ky) * 3 + kx];
              for (let y = 0; y < h; y++) {
                const iy = y + ky - 1;
                if (iy < 0 || iy >= h) continue;
                const x0 = Math.max(0, 1 - kx), x1 = Math.min(w, w + 1 - kx);
                for (let xx = x0; xx < x1; xx++) out[ob + y * w + xx] += k * x[ib + iy * w + xx + kx - 1];
              }
            }
          }
        }
      }
    }
    return out;
  }
  backward(dy: Float32Array, n: number, h: number, w: number): Float32Array {
    const { cin, cout } = this;
    const x = this.input;
    const dx = new Float32Array(x.length);
    const W = this.w.value, dW = this.w.grad, dB = this.b.grad;
    for (let b = 0; b < n; b++) {
      for (let o = 0; o < cout; o++) {
        const ob = ((b * cout + o) * h) * w;
        let s = 0;
        for (let i = 0; i < h * w; i++) s += dy[ob + i];
        dB[o] += s;
        for (let c = 0; c < cin; c++) {
          const ib = ((b * cin + c) * h) * w;
          for (let ky = 0; ky < 3; ky++) {
            for (let kx = 0; kx < 3; kx++) {
              const widx = ((o * cin + c) * 3 + ky) * 3 + kx;
              const k = W[widx];
              let g = 0;
              for (let y = 0; y < h; y++) {
                const iy = y + ky - 1;
                if (iy < 0 || iy >= h) continue;
                const x0 = Math.max(0, 1 - kx), x1 = Math.min(w, w + 1 - kx);
                for (let xx = x0; xx < x1; xx++) {
                  const d = dy[ob + y * w + xx];
                  const xi = ib + iy * w + xx + kx - 1;
                  g += d * x[xi];
                  dx[xi] += d * k;
                }
              }
              dW[widx] += g;
            }
          }
        }
      }
    }
    return dx;
  }
}

class BatchNorm {
  gamma: Param;
  beta: Param;
  runningMean: Float32Array;
  runningVar: Float32Array;
  xhat!: Float32Array;
  invStd!: Float32Array;
  constructor(readonly channels: number) {
    this.gamma = param(channels, () => 1);
    this.beta = param(channels, () => 0);
    this.runningMean = new Float32Array(channels);
    this.runningVar = new Float32Array(channels).fill(1);
  }
  forward(x: Float32Array, n: number, hw: number): Float32Array {
    const C = this.channels, m = n * hw;
    const y = new Float32Array(x.length);
    this.xhat = new Float32Array(x.length);
    this.invStd = new Float32Array(C);
    for (let c = 0; c < C; c++) {
      let mean = 0;
      for (let b = 0; b < n; b++) for (let i = 0; i < hw; i++) mean += x[(b * C + c) * hw + i];
      mean /= m;
      let v = 0;
      for (let b = 0; b < n; b++) for (let i = 0; i < hw; i++) v += (x[(b * C + c) * hw + i] - mean) ** 2;
      v /= m;
      const inv = 1 / Math.sqrt(v + EPS);
      this.invStd[c] = inv;
      this.runningMean[c] = 0.9 * this.runningMean[c] + 0.1 * mean;
      this.runningVar[c] = 0.9 * this.runningVar[c] + 0.1 * (v * m) / (m - 1);
      for (let b = 0; b < n; b++) {
        for (let i = 0; i < hw; i++) {
          const j = (b * C + c) * hw + i;
          this.xhat[j] = (x[j] - mean) * inv;
          y[j] = this.gamma.value[c] * this.xhat[j] + this.beta.value[c];
        }
      }
    }
    return y;
  }
  backward(dy: Float32Array, n: number, hw: number): Float32Array {
    const C = this.channels, m = n * hw;
    const dx = new Float32Array(dy.length);
    for (let c = 0; c < C; c++) {
      let sumDy = 0, sumDyX = 0;
      for (let b = 0; b < n; b++) for (let i = 0; i < hw; i++) {
        const j = (b * C + c) * hw + i;
        sumDy += dy[j];
        sumDyX += dy[j] * this.xhat[j];
      }
      this.gamma.grad[c] += sumDyX;
      this.beta.grad[c] += sumDy;
      const g = this.gamma.value[c] * this.invStd[c] / m;
      for (let b = 0; b < n; b++) for (let i = 0; i < hw; i++) {
        const j = (b * C + c) * hw + i;
        dx[j] = g * (m * dy[j] - sumDy - this.xhat[j] * sumDyX);
      }
    }
    return dx;
  }
}

function relu(x: Float32Array): Float32Array {
  return x.map((v) => (v > 0 ? v : 0));
}

function maxPool(x: Float32Array, n: number, c: number, h: number, w: number): { y: Float32Array; arg: Int32Array } {
  const oh = h / 2, ow = w / 2;
  const y = new Float32Array(n * c * oh * ow);
  const arg = new Int32Array(y.length);
  for (let p = 0; p < n * c; p++) {
    for (let yy = 0; yy < oh; yy++) for (let xx = 0; xx < ow; xx++) {
      let best = -Infinity, bi = 0;
      for (let dy = 0; dy < 2; dy++) for (let dx = 0; dx < 2; dx++) {
        const i = (p * h + 2 * yy + dy) * w + 2 * xx + dx;
        if (x[i] > best) { best = x[i]; bi = i; }
      }
      const o = (p * oh + yy) * ow + xx;
      y[o] = best;
      arg[o] = bi;
    }
  }
  return { y, arg };
}

const conv1 = new Conv3x3(1, 8);
const bn1 = new BatchNorm(8);
const conv2 = new Conv3x3(8, 16);
const bn2 = new BatchNorm(16);
const fcW = param(10 * 784, he(784));
const fcB = param(10, () => 0);
const params = [conv1.w, conv1.b, bn1.gamma, bn1.beta, conv2.w, conv2.b, bn2.gamma, bn2.beta, fcW, fcB];

function step(x: Float32Array, labels: Uint8Array, n: number): number {
  // forward
  const c1 = conv1.forward(x, n, 28, 28);
  const b1 = bn1.forward(c1, n, 784);
  const r1 = relu(b1);
  const p1 = maxPool(r1, n, 8, 28, 28);
  const c2 = conv2.forward(p1.y, n, 14, 14);
  const b2 = bn2.forward(c2, n, 196);
  const r2 = relu(b2);
  const p2 = maxPool(r2, n, 16, 14, 14);
  const flat = p2.y;  // n × 784
  const logits = new Float32Array(n * 10);
  let loss = 0;
  const dLogits = new Float32Array(n * 10);
  for (let b = 0; b < n; b++) {
    for (let o = 0; o < 10; o++) {
      let s = fcB.value[o];
      for (let i = 0; i < 784; i++) s += fcW.value[o * 784 + i] * flat[b * 784 + i];
      logits[b * 10 + o] = s;
    }
    let max = -Infinity;
    for (let o = 0; o < 10; o++) max = Math.max(max, logits[b * 10 + o]);
    let z = 0;
    for (let o = 0; o < 10; o++) z += Math.exp(logits[b * 10 + o] - max);
    loss += -(logits[b * 10 + labels[b]] - max - Math.log(z));
    for (let o = 0; o < 10; o++) dLogits[b * 10 + o] = (Math.exp(logits[b * 10 + o] - max) / z - (o === labels[b] ? 1 : 0)) / n;
  }
  // backward
  const dFlat = new Float32Array(n * 784);
  for (let b = 0; b < n; b++) for (let o = 0; o < 10; o++) {
    const d = dLogits[b * 10 + o];
    fcB.grad[o] += d;
    for (let i = 0; i < 784; i++) {
      fcW.grad[o * 784 + i] += d * flat[b * 784 + i];
      dFlat[b * 784 + i] += d * fcW.value[o * 784 + i];
    }
  }
  const dR2 = new Float32Array(r2.length);
  p2.arg.forEach((src, i) => (dR2[src] += dFlat[i]));
  const dB2 = dR2.map((d, i) => (b2[i] > 0 ? d : 0));
  const dC2 = bn2.backward(dB2, n, 196);
  const dP1 = conv2.backward(dC2, n, 14, 14);
  const dR1 = new Float32Array(r1.length);
  p1.arg.forEach((src, i) => (dR1[src] += dP1[i]));
  const dB1 = dR1.map((d, i) => (b1[i] > 0 ? d : 0));
  const dC1 = bn1.backward(dB1, n, 784);
  conv1.backward(dC1, n, 28, 28);
  for (const p of params) {
    for (let i = 0; i < p.value.length; i++) {
      p.velocity[i] = MOMENTUM * p.velocity[i] - LEARNING_RATE * p.grad[i];
      p.value[i] += p.velocity[i];
      p.grad[i] = 0;
    }
  }
  return loss / n;
}

function tensor(name: string, dims: number[], data: Float32Array) {
  return { name, dataType: TensorProto_DataType.FLOAT, dims: dims.map(BigInt), rawData: new Uint8Array(data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength)) };
}

function exportOnnx(file: string): void {
  const ints = (name: string, values: number[]) => ({ name, type: AttributeProto_AttributeType.INTS, ints: values.map(BigInt) });
  const int = (name: string, v: number) => ({ name, type: AttributeProto_AttributeType.INT, i: BigInt(v) });
  const float = (name: string, v: number) => ({ name, type: AttributeProto_AttributeType.FLOAT, f: v });
  const conv = (name: string, x: string, y: string) => ({ opType: 'Conv', name, input: [x, `${name}.weight`, `${name}.bias`], output: [y], attribute: [ints('kernel_shape', [3, 3]), ints('pads', [1, 1, 1, 1])] });
  const bn = (name: string, x: string, y: string) => ({ opType: 'BatchNormalization', name, input: [x, `${name}.gamma`, `${name}.beta`, `${name}.mean`, `${name}.var`], output: [y], attribute: [float('epsilon', EPS)] });
  const pool = (name: string, x: string, y: string) => ({ opType: 'MaxPool', name, input: [x], output: [y], attribute: [ints('kernel_shape', [2, 2]), ints('strides', [2, 2])] });
  const shape = (dims: Array<number | string>) => ({ dim: dims.map((d) => (typeof d === 'number' ? { value: { case: 'dimValue', value: BigInt(d) } } : { value: { case: 'dimParam', value: d } })) });
  const model = create(ModelProtoSchema, {
    irVersion: 8n, producerName: 'lowbit experiments/train-mnist-cnn', opsetImport: [{ domain: '', version: 13n }],
    graph: {
      name: 'mnist_cnn',
      node: [
        conv('conv1', 'input', 'c1'), bn('bn1', 'c1', 'b1'), { opType: 'Relu', name: 'relu1', input: ['b1'], output: ['r1'] }, pool('pool1', 'r1', 'p1'),
        conv('conv2', 'p1', 'c2'), bn('bn2', 'c2', 'b2'), { opType: 'Relu', name: 'relu2', input: ['b2'], output: ['r2'] }, pool('pool2', 'r2', 'p2'),
        { opType: 'Flatten', name: 'flatten', input: ['p2'], output: ['flat'], attribute: [int('axis', 1)] },
        { opType: 'Gemm', name: 'fc', input: ['flat', 'fc.weight', 'fc.bias'], output: ['logits'], attribute: [int('transB', 1)] },
      ],
      initializer: [
        tensor('conv1.weight', [8, 1, 3, 3], conv1.w.value), tensor('conv1.bias', [8], conv1.b.value),
        tensor('bn1.gamma', [8], bn1.gamma.value), tensor('bn1.beta', [8], bn1.beta.value), tensor('bn1.mean', [8], bn1.runningMean), tensor('bn1.var', [8], bn1.runningVar),
        tensor('conv2.weight', [16, 8, 3, 3], conv2.w.value), tensor('conv2.bias', [16], conv2.b.value),
        tensor('bn2.gamma', [16], bn2.gamma.value), tensor('bn2.beta', [16], bn2.beta.value), tensor('bn2.mean', [16], bn2.runningMean), tensor('bn2.var', [16], bn2.runningVar),
        tensor('fc.weight', [10, 784], fcW.value), tensor('fc.bias', [10], fcB.value),
      ],
      input: [{ name: 'input', type: { value: { case: 'tensorType', value: { elemType: TensorProto_DataType.FLOAT, shape: shape(['N', 1, 28, 28]) } } } }],
      output: [{ name: 'logits', type: { value: { case: 'tensorType', value: { elemType: TensorProto_DataType.FLOAT, shape: shape(['N', 10]) } } } }],
    },
  } as never);
  fs.writeFileSync(file, toBinary(ModelProtoSchema, model));
}

function main(): void {
  const train = loadMnist('train', TRAIN_IMAGES);
  const order = Array.from({ length: train.count }, (_, i) => i);
  const shuffle = rng(7);
  for (let i = order.length - 1; i > 0; i--) {
    const j = Math.floor(shuffle() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  const t0 = Date.now();
  let running = 0;
  for (let s = 0; s + BATCH <= order.length; s += BATCH) {
    const x = new Float32Array(BATCH * 784);
    const y = new Uint8Array(BATCH);
    for (let b = 0; b < BATCH; b++) {
      x.set(train.images.subarray(order[s + b] * 784, (order[s + b] + 1) * 784), b * 784);
      y[b] = train.labels[order[s + b]];
    }
    const loss = step(x, y, BATCH);
    running = s === 0 ? loss : 0.98 * running + 0.02 * loss;
    if ((s / BATCH) % 100 === 0) console.log(`batch ${s / BATCH}: loss ${running.toFixed(4)} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
  }
  const root = path.resolve(__dirname, '..', '..');
  const out = path.join(root, 'assets', 'mnist-cnn.onnx');
  exportOnnx(out);
  const calib = path.join(root, 'assets', 'mnist-calibration', 'input');
  fs.mkdirSync(calib, { recursive: true });
  writeNpy(path.join(calib, '000.npy'), '<f4', [64, 1, 28, 28], train.images.slice(0, 64 * 784));
  console.log(`wrote ${out} and ${calib}/000.npy`);
}

main();
