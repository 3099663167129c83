/**
 * Training throughput of the bundled MNIST CNN in TensorFlow.js (the
 * pure-JavaScript 'cpu' backend of `@tensorflow/tfjs`): the comparison row of
 * the training benchmark. tfjs is a devDependency used only here and loaded
 * on first use, so lowbit itself never loads it.
 *
 * The model is the one of lowbit's bundled MNIST CNN (NCHW in ONNX; NHWC here,
 * tfjs's native layout):
 *   28×28×1 → Conv2D 3×3, 8 filters, 'same', bias → BatchNorm (ε 1e-5, batch
 *   statistics) → ReLU → MaxPool 2×2/2 → Conv2D 3×3, 16 filters, 'same', bias
 *   → BatchNorm → ReLU → MaxPool 2×2/2 → Flatten (784) → Dense 10 (logits),
 * trained with softmax cross-entropy (mean over the batch) and SGD with
 * momentum 0.9, learning rate 0.01, on synthetic deterministic data.
 */
import type * as Tf from '@tensorflow/tfjs';

import { seededRandom } from '../random';

/** The shape of a classification model in a training benchmark (channels first, as in ONNX). */
export interface TrainBenchModel {
  input: [channels: number, height: number, width: number];
  classes: number;
}

/** The model `tfjsTrainThroughput` trains: lowbit's bundled MNIST CNN. */
export const MNIST_CNN: TrainBenchModel = { input: [1, 28, 28], classes: 10 };

export interface TfjsTrainOptions {
  batchSize: number;
  /** Timed training steps (forward + backward + update, one batch each). */
  steps: number;
  /** Untimed steps before timing; default 2. */
  warmupSteps?: number;
  /** Seed of the synthetic data and the weight initialisation; default 1. */
  seed?: number;
  /** tfjs's 'cpu' backend is single-threaded: there is no thread count to set. */
  threads?: never;
}

export interface TfjsTrainResult {
  imagesPerSecond: number;
  seconds: number;
  steps: number;
  backend: string;
  finalLoss: number;
}

const LEARNING_RATE = 0.01;
const MOMENTUM = 0.9;
const BN_EPSILON = 1e-5;
/** Distinct synthetic batches cycled through by the steps. */
const DATA_BATCHES = 4;

let tfModule: typeof Tf | undefined;

/** `@tensorflow/tfjs`, loaded on first use, with a clear error when absent. */
function tfjs(): typeof Tf {
  if (!tfModule) {
    try {
      tfModule = require('@tensorflow/tfjs') as typeof Tf;
    } catch (e) {
      throw new Error(
        'lowbit: the TensorFlow.js training benchmark needs the devDependency @tensorflow/tfjs '
        + `(npm install --save-dev @tensorflow/tfjs): ${(e as Error).message.split('\n')[0]}`,
      );
    }
  }
  return tfModule;
}

/** Selects tfjs's pure-JavaScript 'cpu' backend (never tfjs-node or WebGL). */
async function useCpuBackend(tf: typeof Tf): Promise<void> {
  if (tf.getBackend() !== 'cpu' && !(await tf.setBackend('cpu'))) {
    throw new Error('lowbit: could not select the TensorFlow.js \'cpu\' backend');
  }
  await tf.ready();
  // The cpu backend prints an "install tfjs-node" banner on its first tensor
  // write; PROD only silences tfjs's warnings, so turn it on for that one
  // write and restore it: no effect on what is computed.
  const prod = tf.env().getBool('PROD');
  tf.env().set('PROD', true);
  try {
    tf.dispose(tf.scalar(0));
  } finally {
    tf.env().set('PROD', prod);
  }
}


/** Standard normal samples (Box–Muller) from a seeded generator. */
function randomNormal(n: number, next: () => number): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i += 2) {
    const u = 1 - next(); // (0, 1]
    const r = Math.sqrt(-2 * Math.log(u));
    const theta = 2 * Math.PI * next();
    out[i] = r * Math.cos(theta);
    if (i + 1 < n) out[i + 1] = r * Math.sin(theta);
  }
  return out;
}

function buildModel(tf: typeof Tf, seed: number): { model: Tf.LayersModel; optimizer: Tf.Optimizer } {
  const [c, h, w] = MNIST_CNN.input;
  const init = (k: number) => tf.initializers.heNormal({ seed: seed * 16 + k });
  const conv = (filters: number, k: number, inputShape?: number[]) => tf.layers.conv2d({
    ...(inputShape ? { inputShape } : {}),
    filters, kernelSize: 3, strides: 1, padding: 'same', useBias: true, dataFormat: 'channelsLast',
    kernelInitializer: init(k), biasInitializer: 'zeros',
  });
  const model = tf.sequential({
    layers: [
      conv(8, 1, [h, w, c]),
      tf.layers.batchNormalization({ axis: -1, epsilon: BN_EPSILON }),
      tf.layers.reLU(),
      tf.layers.maxPooling2d({ poolSize: 2, strides: 2, padding: 'valid' }),
      conv(16, 2),
      tf.layers.batchNormalization({ axis: -1, epsilon: BN_EPSILON }),
      tf.layers.reLU(),
      tf.layers.maxPooling2d({ poolSize: 2, strides: 2, padding: 'valid' }),
      tf.layers.flatten(),
      tf.layers.dense({
        units: MNIST_CNN.classes, activation: 'linear', useBias: true,
        kernelInitializer: tf.initializers.glorotUniform({ seed: seed * 16 + 3 }), biasInitializer: 'zeros',
      }),
    ],
  });
  const optimizer = tf.train.momentum(LEARNING_RATE, MOMENTUM);
  model.compile({
    optimizer,
    // Mean softmax cross-entropy of the logits against one-hot labels.
    loss: (labels: Tf.Tensor, logits: Tf.Tensor) => tf.losses.softmaxCrossEntropy(labels, logits),
  });
  return { model, optimizer };
}

/**
 * Images per second of a full training step (forward, backward, SGD-momentum
 * update) of the MNIST CNN in TensorFlow.js's pure-JavaScript 'cpu' backend.
 * Every step reads its loss back (trainOnBatch awaits the loss data), so the
 * timed work is finished when the clock stops.
 */
export async function tfjsTrainThroughput(options: TfjsTrainOptions): Promise<TfjsTrainResult> {
  const { batchSize, steps } = options;
  const warmupSteps = options.warmupSteps ?? 2;
  const seed = options.seed ?? 1;
  if (!Number.isInteger(batchSize) || batchSize < 1) throw new RangeError(`lowbit: batchSize must be a positive integer, got ${batchSize}`);
  if (!Number.isInteger(steps) || steps < 1) throw new RangeError(`lowbit: steps must be a positive integer, got ${steps}`);
  if (!Number.isInteger(warmupSteps) || warmupSteps < 0) throw new RangeError(`lowbit: warmupSteps must be a non-negative integer, got ${warmupSteps}`);
  if (options.threads !== undefined) throw new TypeError('lowbit: the TensorFlow.js cpu backend has no thread count');

  const tf = tfjs();
  await useCpuBackend(tf);
  const backend = tf.getBackend();

  const [c, h, w] = MNIST_CNN.input;
  const classes = MNIST_CNN.classes;
  const next = seededRandom(seed);
  const batches: Array<{ x: Tf.Tensor4D; y: Tf.Tensor2D }> = [];
  const { model, optimizer } = buildModel(tf, seed);
  try {
    for (let b = 0; b < Math.min(DATA_BATCHES, warmupSteps + steps); b++) {
      const images = randomNormal(batchSize * h * w * c, next);
      const oneHot = new Float32Array(batchSize * classes);
      for (let i = 0; i < batchSize; i++) oneHot[i * classes + Math.floor(next() * classes)] = 1;
      batches.push({ x: tf.tensor4d(images, [batchSize, h, w, c]), y: tf.tensor2d(oneHot, [batchSize, classes]) });
    }

    const step = async (i: number): Promise<number> => {
      const { x, y } = batches[i % batches.length];
      const loss = await model.trainOnBatch(x, y);
      return Array.isArray(loss) ? loss[0] : loss;
    };

    for (let i = 0; i < warmupSteps; i++) await step(i);
    let finalLoss = NaN;
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < steps; i++) finalLoss = await step(warmupSteps + i);
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    return { imagesPerSecond: (batchSize * steps) / seconds, seconds, steps, backend, finalLoss };
  } finally {
    for (const { x, y } of batches) tf.dispose([x, y]);
    model.dispose();
    // A model disposes only optimizers it created itself. MomentumOptimizer's
    // dispose (tfjs 4.22) forgets the learning-rate scalar of its SGD base.
    const lr = (optimizer as unknown as { c?: Tf.Tensor }).c;
    optimizer.dispose();
    if (lr && !lr.isDisposed) lr.dispose();
  }
}
