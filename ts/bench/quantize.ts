/**
 * Per-tensor int8 quantization throughput (GB/s of float32 input): lowbit
 * against a plain TypeScript implementation of the same rule and against
 * onnxruntime-node's QuantizeLinear, on the same data in the same run.
 * Each case runs in its own process (no shared JIT or GC state). Results are
 * shown two ways: with a fresh output array per call (what the plain API and
 * session.run do) and with a reused output array (options.out / a
 * preallocated fetch), because on Linux first-touch page faults of a fresh
 * array can cost more than the quantization itself. The cases given the same
 * scale must give the same int8 values, or the bench stops.
 */
import { cpuInfo } from '../cpu';
import { quantizeTensor } from '../quantize';
import { quantizeLinearTs } from './baselines';
import { hasOrt, ort, quantizeLinearModel, session } from './ort-models';
import { digestOf, inChildProcessJson, measure, table } from './timing';

const SCALE = 100 / 127;

export interface QuantizeCase {
  name: string;
  threads: 'one' | 'all';
  output: 'fresh' | 'reused';
}

const CASES: QuantizeCase[] = [
  { name: 'lowbit (scale given)', threads: 'one', output: 'fresh' },
  { name: 'lowbit (scale given)', threads: 'one', output: 'reused' },
  { name: 'lowbit (scale given)', threads: 'all', output: 'reused' },
  { name: 'lowbit minmax (range + quantize)', threads: 'one', output: 'reused' },
  { name: 'lowbit scalar kernel', threads: 'one', output: 'reused' },
  { name: 'plain TypeScript', threads: 'one', output: 'reused' },
  { name: 'onnxruntime QuantizeLinear', threads: 'one', output: 'fresh' },
  { name: 'onnxruntime QuantizeLinear', threads: 'one', output: 'reused' },
];

function data(n: number): Float32Array {
  const x = new Float32Array(n);
  let s = 12345;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0;
    x[i] = (s / 4294967296 - 0.5) * 200;
  }
  return x;
}

/** A case's median milliseconds and a digest of its int8 output (the cases with SCALE must agree byte for byte). */
export interface QuantizeCaseResult {
  ms: number;
  outputDigest: string;
}

/** Runs one case in this process. */
export async function runQuantizeCase(c: QuantizeCase, n: number, runs: number): Promise<QuantizeCaseResult> {
  const x = data(n);
  const threads = c.threads === 'one' ? 1 : cpuInfo().maxThreads;
  const out = new Int8Array(n);
  const reuse = c.output === 'reused' ? { out } : {};
  let fn: () => Promise<ArrayBufferView> | ArrayBufferView;
  let release = async () => {};
  switch (c.name) {
    case 'lowbit (scale given)':
      fn = () => quantizeTensor(x, { shape: [n], scale: SCALE, threads, ...reuse }).values;
      break;
    case 'lowbit minmax (range + quantize)':
      fn = () => quantizeTensor(x, { shape: [n], threads, ...reuse }).values;
      break;
    case 'lowbit scalar kernel':
      fn = () => quantizeTensor(x, { shape: [n], scale: SCALE, threads, kernel: 'scalar', ...reuse }).values;
      break;
    case 'plain TypeScript':
      runs = Math.min(runs, 3);  // slow
      fn = () => { quantizeLinearTs(x, SCALE, 0, out); return out; };
      break;
    case 'onnxruntime QuantizeLinear': {
      const model = quantizeLinearModel({ shape: [n], scale: new Float32Array([SCALE]), zeroPoint: new Int8Array([0]), scaleShape: [] });
      const s = await session(model, threads);
      const feeds = { x: new (ort().Tensor)('float32', x, [n]) };
      const fetches = { y: new (ort().Tensor)('int8', out, [n]) };
      fn = async () => (await (c.output === 'reused' ? s.run(feeds, fetches) : s.run(feeds))).y.data as Int8Array;
      release = () => s.release();
      break;
    }
    default:
      throw new Error(`unknown case ${c.name}`);
  }
  try {
    const ms = (await measure(fn, runs)).medianMs;
    const values = await fn();
    const outputDigest = digestOf(values);
    return { ms, outputDigest };
  } finally {
    await release();
  }
}

export interface QuantizeBenchOptions {
  sizes: number[];
  runs: number;
  json: boolean;
}

export async function benchQuantize(opts: QuantizeBenchOptions): Promise<void> {
  const rows: Array<Record<string, string | number>> = [];
  const ratios: Array<Record<string, string | number>> = [];
  const kernel = cpuInfo().selected.quantize;
  for (const n of opts.sizes) {
    const gbps: Record<string, number> = {};
    let sameScaleDigest: string | undefined;
    for (const c of CASES) {
      if (c.name.startsWith('onnxruntime') && !hasOrt()) continue;
      const { ms, outputDigest } = inChildProcessJson<QuantizeCaseResult>({ bench: 'quantize', c, n, runs: opts.runs });
      // Every case with the given scale computes QuantizeLinear: the same int8 values, or the rates mean nothing.
      if (c.name !== 'lowbit minmax (range + quantize)') {
        if (sameScaleDigest === undefined) sameScaleDigest = outputDigest;
        else if (outputDigest !== sameScaleDigest) throw new Error(`${n} elements, ${c.name} (${c.threads} thread(s), ${c.output} output): its int8 output differs from the first case's`);
      }
      const rate = (n * 4) / 1e9 / (ms / 1e3);
      gbps[`${c.name}|${c.threads}|${c.output}`] = rate;
      rows.push({
        elements: `${n / 2 ** 20}M`, implementation: c.name, threads: c.threads === 'one' ? 1 : cpuInfo().maxThreads,
        output: c.output, 'median ms': ms, 'GB/s': rate,
      });
    }
    const g = (name: string, threads: string, output: string) => gbps[`${name}|${threads}|${output}`] ?? NaN;
    ratios.push({
      elements: `${n / 2 ** 20}M`,
      'vs onnxruntime, fresh output': g('lowbit (scale given)', 'one', 'fresh') / g('onnxruntime QuantizeLinear', 'one', 'fresh'),
      'vs onnxruntime, reused output': g('lowbit (scale given)', 'one', 'reused') / g('onnxruntime QuantizeLinear', 'one', 'reused'),
      'vs plain TypeScript': g('lowbit (scale given)', 'one', 'reused') / g('plain TypeScript', 'one', 'reused'),
    });
  }
  if (opts.json) {
    console.log(JSON.stringify({ cpu: cpuInfo(), rows, ratios }, null, 2));
    return;
  }
  console.log(`quantize: per-tensor float32 -> int8, GB/s of input, median of ${opts.runs} runs after a warm-up (plain TypeScript: of ${Math.min(opts.runs, 3)}, it is slow), one process per row; lowbit kernel: ${kernel}\n`);
  console.log(table(rows));
  console.log('\nlowbit single-threaded throughput ratios (targets: >= 2x onnxruntime, >= 10x plain TypeScript)\n');
  console.log(table(ratios));
}
