/**
 * `npm run experiments -- qat [--quick] [--json] [--seeds N] [--narrow] [--ptq-only]`: quantization-aware training on MNIST
 * (`--ptq-only`: the float model and the PTQ rows, without QAT and the throughput comparison).
 * A small CNN (four Conv+BN+ReLU blocks, two max-pools, Gemm) is trained in
 * float by lowbit's engine; then, at W4A4 and W2A4 (first and last layer at 8
 * bits in every setting): PTQ minmax, PTQ ACIQ + bit allocation + bias
 * correction, LSQ QAT and GDRQ QAT, each evaluated in onnxruntime on the 10 000
 * MNIST test images. Also the float training throughput of the engine against
 * TensorFlow.js (pure-JavaScript CPU backend) on the same model and batch size.
 * `--seeds N` repeats each QAT row with N shuffling seeds (2, 3, …) from the same
 * float model and reports their mean, range and each accuracy: one run's
 * difference between LSQ and GDRQ can be smaller than the seed-to-seed spread.
 */
import { cpuInfo } from '../ts/cpu';
import { ort } from '../ts/bench/ort-models';
import { table } from '../ts/bench/timing';
import { tfjsTrainThroughput } from '../ts/bench/tfjs-train';
import { lowbitTrainThroughput } from '../ts/bench/train';
import { quantizeModel, type QuantizeModelOptions } from '../ts/onnx/quantize-model';
import { finetune, type FinetuneOptions, type LabelledBatch } from '../ts/train/finetune';
import { loadMnist } from '../ts/train/mnist';
import { cnn } from '../test/helpers/onnx-builder';
import { mnistAccuracy } from './ptq';

const BLOCKS = [
  { channels: 16, pool: false }, { channels: 16, pool: true }, { channels: 32, pool: false }, { channels: 32, pool: true },
];
/** `--narrow`: a quarter of the channels, where one epoch of LSQ at W2A4 no longer reaches float accuracy. */
const NARROW_BLOCKS = BLOCKS.map((b) => ({ ...b, channels: b.channels / 4 }));

function trainingSet(count: number): LabelledBatch {
  const set = loadMnist('train', count);
  return { inputs: { data: set.images, dims: [set.count, 1, 28, 28] }, labels: set.labels };
}

/** Calibration feeds for PTQ: 8 batches of 64 training images. */
function* calibrationFeeds(train: LabelledBatch): Generator<Record<string, { data: Float32Array; dims: number[] }>> {
  for (let b = 0; b < 8; b++) {
    yield { input: { data: train.inputs.data.subarray(b * 64 * 784, (b + 1) * 64 * 784), dims: [64, 1, 28, 28] } };
  }
}

const pct = (x: number) => `${(x * 100).toFixed(2)}%`;

export async function qatExperiment(json: boolean, quick: boolean, seeds = 1, narrow = false, ptqOnly = false): Promise<void> {
  const blocks = narrow ? NARROW_BLOCKS : BLOCKS;
  if (!Number.isInteger(seeds) || seeds < 1) throw new RangeError(`Expected a positive integer for --seeds but received ${seeds}.`);
  ort();
  const trainCount = quick ? 10_000 : 60_000;
  const train = trainingSet(trainCount);
  const log = (s: string) => { if (!json) process.stderr.write(`${s}\n`); };

  log(`float: training the CNN from scratch (${trainCount} images)…`);
  let t0 = performance.now();
  const floatEpochs = quick ? 1 : 2;
  const float = await finetune(cnn(1, blocks), train, { epochs: floatEpochs, batchSize: 64, learningRate: 0.02, seed: 1 });
  const floatSeconds = (performance.now() - t0) / 1000;
  const floatAccuracy = await mnistAccuracy(float.model);
  const rows: Array<Record<string, string | number>> = [{
    bits: 'float', method: `float training, ${floatEpochs} epochs`, accuracy: pct(floatAccuracy), 'vs float': '', seconds: Number(floatSeconds.toFixed(1)),
  }];

  const qatEpochs = 1;
  for (const [wbits, abits] of [[4, 4], [2, 4]] as const) {
    const ptq: Array<[string, Partial<QuantizeModelOptions>]> = [
      ['PTQ minmax', { weights: { bits: wbits }, activations: { bits: abits } }],
      ['PTQ ACIQ + bit allocation + bias correction', {
        weights: { bits: 4, method: 'aciq', bitAllocation: { averageBits: wbits }, biasCorrection: true },
        activations: { bits: abits, method: 'aciq', biasCorrection: true },
      }],
      ['PTQ minmax + GPTQ rounding', { weights: { bits: wbits, rounding: 'gptq' }, activations: { bits: abits } }],
      ['PTQ mse weights + GPTQ rounding, percentile activations', { weights: { bits: wbits, method: 'mse', rounding: 'gptq' }, activations: { bits: abits, method: 'percentile' } }],
    ];
    for (const [method, options] of ptq) {
      log(`W${wbits}A${abits} ${method}…`);
      t0 = performance.now();
      // An array: read twice where GPTQ takes its second pass on quantized inputs (a generator is read once).
      const { model } = await quantizeModel(float.model, { ...(options as QuantizeModelOptions), calibration: Array.from(calibrationFeeds(train)) });
      const seconds = (performance.now() - t0) / 1000;
      const accuracy = await mnistAccuracy(model);
      rows.push({ bits: `W${wbits}A${abits}`, method, accuracy: pct(accuracy), 'vs float': `${((accuracy - floatAccuracy) * 100).toFixed(2)} points`, seconds: Number(seconds.toFixed(1)) });
    }
    if (ptqOnly) continue;
    const qat: Array<[string, FinetuneOptions]> = [
      ['LSQ QAT (per-tensor steps)', { method: 'lsq' }],
      ['GDRQ QAT (Scale-Clip, 4 groups, learned group steps)', { method: 'gdrq', groups: 4 }],
      ['GDRQ weights, LSQ-learned activation steps (variant)', { method: 'gdrq', groups: 4, activationSteps: 'learned' }],
    ];
    for (const [method, options] of qat) {
      const accuracies: number[] = [];
      let seconds = 0;
      for (let seed = 2; seed < 2 + seeds; seed++) {
        log(`W${wbits}A${abits} ${method} (${qatEpochs} epochs, seed ${seed})…`);
        t0 = performance.now();
        const { model } = await finetune(float.model, train, {
          ...options, weightBits: wbits, activationBits: abits, epochs: qatEpochs, batchSize: 64, learningRate: 0.01, seed,
        });
        seconds += (performance.now() - t0) / 1000;
        accuracies.push(await mnistAccuracy(model));
      }
      const mean = accuracies.reduce((a, b) => a + b, 0) / seeds;
      const row: Record<string, string | number> = {
        bits: `W${wbits}A${abits}`, method: `${method}, ${qatEpochs} epoch${qatEpochs === 1 ? '' : 's'}`, accuracy: pct(mean),
        'vs float': `${((mean - floatAccuracy) * 100).toFixed(2)} points`, seconds: Number((seconds / seeds).toFixed(1)),
      };
      if (seeds > 1) {
        row.accuracy = `${pct(mean)} (mean of ${seeds})`;
        row['each seed'] = accuracies.map(pct).join(' ');
        row.range = `${((Math.max(...accuracies) - Math.min(...accuracies)) * 100).toFixed(2)} points`;
      }
      rows.push(row);
    }
  }

  if (ptqOnly) {
    if (json) console.log(JSON.stringify({ accuracy: rows }, null, 2));
    else console.log(`\nqat --ptq-only: MNIST, CNN with ${blocks.map((b) => b.channels).join('/')} channels; PTQ rows only\n\n${table(rows)}`);
    return;
  }
  log('throughput: lowbit engine vs TensorFlow.js (cpu backend), float training, batch 64…');
  // tfjs needs seconds per step: fewer timed steps for it (both after two warm-up steps).
  const batchSize = 64, steps = quick ? 10 : 30, tfjsSteps = quick ? 2 : 5;
  const lowbit = await lowbitTrainThroughput(batchSize, steps);  // all threads
  const lowbitOne = await lowbitTrainThroughput(batchSize, steps, 1);
  const tfjs = await tfjsTrainThroughput({ batchSize, steps: tfjsSteps });
  const threads = cpuInfo().maxThreads;
  const throughput = [
    { trainer: `lowbit finetune (native kernels), ${threads} threads`, 'images/s': Math.round(lowbit), ratio: '1.00' },
    { trainer: 'lowbit finetune (native kernels), 1 thread', 'images/s': Math.round(lowbitOne), ratio: (lowbitOne / lowbit).toFixed(2) },
    { trainer: `TensorFlow.js ${tfjs.backend} backend`, 'images/s': Math.round(tfjs.imagesPerSecond), ratio: (tfjs.imagesPerSecond / lowbit).toFixed(2) },
  ];
  if (json) {
    console.log(JSON.stringify({ accuracy: rows, throughput }, null, 2));
    return;
  }
  console.log(`\nqat: MNIST, CNN with ${blocks.length} Conv+BN+ReLU blocks (${blocks.map((b) => b.channels).join('/')} channels), accuracy on the 10 000 test images (onnxruntime on the exported models);` +
    ` first and last layer at 8 bits everywhere; PTQ calibrated on 512 training images\n`);
  console.log(table(rows));
  console.log(`\nqat: float training throughput, the bundled MNIST CNN architecture, batch ${batchSize} (lowbit ${steps} steps, tfjs ${tfjsSteps}), same process\n`);
  console.log(table(throughput));
  // The tfjs cpu backend runs on one thread: the 1-thread ratio is the like-for-like one.
  console.log(`lowbit / tfjs = ${(lowbit / tfjs.imagesPerSecond).toFixed(2)}× (${threads} threads), ${(lowbitOne / tfjs.imagesPerSecond).toFixed(2)}× (1 thread; tfjs's cpu backend uses one)`);
}
