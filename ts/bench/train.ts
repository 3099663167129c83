/**
 * `lowbit bench train`: float training throughput (forward, backward, SGD with
 * momentum) of the bundled MNIST CNN in lowbit's engine against TensorFlow.js's
 * pure-JavaScript 'cpu' backend, same model, batch size and synthetic data
 * shape, in the same process; images per second and the ratio.
 */
import * as path from 'node:path';

import { seededRandom } from '../random';
import { finetune } from '../train/finetune';
import { table } from './timing';
import { tfjsTrainThroughput } from './tfjs-train';

export interface TrainBenchOptions {
  batchSize: number;
  /** Timed lowbit steps and tfjs steps (tfjs needs seconds per step); both after two warm-up steps. */
  steps: number;
  tfjsSteps: number;
  /** lowbit thread counts to measure (tfjs's cpu backend is single-threaded). */
  threads: number[];
  json: boolean;
}

/** Images per second of lowbit's float training step on the bundled MNIST CNN, random normal images. */
export async function lowbitTrainThroughput(batchSize: number, steps: number, threads?: number, seed = 1): Promise<number> {
  const model = path.resolve(__dirname, '..', '..', '..', 'assets', 'mnist-cnn.onnx');
  const next = seededRandom(seed);
  const images = (steps + 2) * batchSize;
  const data = Float32Array.from({ length: images * 784 }, () => Math.sqrt(-2 * Math.log(1 - next())) * Math.cos(2 * Math.PI * next()));
  const labels = Int32Array.from({ length: images }, (_, i) => i % 10);
  const batch = (from: number, count: number) => ({
    inputs: { data: data.subarray(from * 784, (from + count) * 784), dims: [count, 1, 28, 28] }, labels: labels.subarray(from, from + count),
  });
  await finetune(model, batch(0, 2 * batchSize), { batchSize, threads });
  let seconds = 0;
  await finetune(model, batch(2 * batchSize, steps * batchSize), { batchSize, threads, onEpoch: (e) => { seconds = e.seconds; } });
  return (steps * batchSize) / seconds;
}

export async function benchTrain(o: TrainBenchOptions): Promise<{ lowbit: Array<{ threads: number; imagesPerSecond: number }>; tfjs: number }> {
  const lowbit: Array<{ threads: number; imagesPerSecond: number }> = [];
  for (const threads of o.threads) lowbit.push({ threads, imagesPerSecond: await lowbitTrainThroughput(o.batchSize, o.steps, threads) });
  const tfjs = (await tfjsTrainThroughput({ batchSize: o.batchSize, steps: o.tfjsSteps })).imagesPerSecond;
  if (o.json) {
    console.log(JSON.stringify({ batchSize: o.batchSize, lowbit, tfjsImagesPerSecond: tfjs }));
  } else {
    console.log(`float training of the bundled MNIST CNN, batch ${o.batchSize} (lowbit ${o.steps} steps, tfjs ${o.tfjsSteps}), same process\n`);
    console.log(table([
      ...lowbit.map((l) => ({ trainer: `lowbit finetune, ${l.threads} thread${l.threads > 1 ? 's' : ''}`, 'images/s': Math.round(l.imagesPerSecond), 'vs tfjs': `${(l.imagesPerSecond / tfjs).toFixed(1)}×` })),
      { trainer: 'TensorFlow.js 4.22 cpu backend (1 thread)', 'images/s': Number(tfjs.toFixed(1)), 'vs tfjs': '1.0×' },
    ]));
  }
  return { lowbit, tfjs };
}
