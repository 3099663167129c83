/**
 * float32 SGEMM throughput (GFLOPS = 2·m·n·k / s) of every native kernel on
 * the shapes a small CNN's training step runs (ts/train/kernels.ts), one
 * process per case, and the ratio of the best kernel to the scalar reference;
 * each kernel's output is compared with the scalar kernel's (the bench stops if it is off).
 */
import { cpuInfo } from '../cpu';
import { nativeKernels, type SgemmArgs } from '../train/kernels';
import { inChildProcessJson, measure, runsFor, table } from './timing';

/** [transA, transB, m, n, k, what]. */
export const DEFAULT_SGEMM_SHAPES: Array<[boolean, boolean, number, number, number, string]> = [
  [false, false, 32, 784, 288, 'conv forward (32 out, 3×3×32, 28×28)'],
  [false, true, 32, 288, 784, 'conv dW'],
  [true, false, 288, 784, 32, 'conv dX (dcol)'],
  [false, false, 64, 3136, 576, 'conv forward (64 out, 3×3×64, 56×56)'],
  [false, true, 128, 128, 3136, 'FC forward Y = X·Wᵀ'],
  [true, false, 128, 3136, 128, 'FC dW = dYᵀ·X'],
  [false, false, 128, 3136, 128, 'FC dX = dY·W'],
];

export interface SgemmCase {
  transA: boolean;
  transB: boolean;
  m: number;
  n: number;
  k: number;
  kernel: string;
  threads: number;
}

function randomFloats(length: number, seed: number): Float32Array {
  let s = seed >>> 0;
  return Float32Array.from({ length }, () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 31 - 1;
  });
}

/** A case's median milliseconds and its output's largest difference from the scalar kernel's. */
export interface SgemmCaseResult {
  ms: number;
  maxError: number;
}

/** Runs one case in this process. */
export async function runSgemmCase(c: SgemmCase): Promise<SgemmCaseResult> {
  const kernels = nativeKernels({ kernel: c.kernel, threads: c.threads });
  const args: SgemmArgs = { transA: c.transA, transB: c.transB, m: c.m, n: c.n, k: c.k, a: randomFloats(c.m * c.k, 1),
    b: randomFloats(c.k * c.n, 2), c: new Float32Array(c.m * c.n), accumulate: false };
  const fn = () => kernels.sgemm(args);
  fn();
  const probe = await measure(fn, 1, 0);
  const ms = (await measure(fn, runsFor(probe.medianMs), 0)).medianMs;
  const reference = { ...args, c: new Float32Array(c.m * c.n) };
  nativeKernels({ kernel: 'scalar', threads: 1 }).sgemm(reference);
  let maxError = 0;
  for (let i = 0; i < reference.c.length; i++) maxError = Math.max(maxError, Math.abs(args.c[i] - reference.c[i]));
  return { ms, maxError };
}

/**
 * How far a kernel may differ from the scalar one: other summation orders move a sum of k products of values in
 * [-1, 1] by far less than 1e-5·k; a wrong result is off by about 1.
 */
function sgemmTolerance(k: number): number {
  return 1e-5 * k;
}

export interface SgemmBenchOptions {
  threads: number[];
  json: boolean;
  kernels?: string[];
}

export async function benchSgemm(opts: SgemmBenchOptions): Promise<void> {
  const kernels = opts.kernels ?? cpuInfo().sgemmKernels;
  const rows: Array<Record<string, string | number>> = [];
  const ratios: Array<Record<string, string | number>> = [];
  for (const [transA, transB, m, n, k, what] of DEFAULT_SGEMM_SHAPES) {
    const shape = `${transA ? 'T' : 'N'}${transB ? 'T' : 'N'} ${m}x${n}x${k}`;
    const flops = (2 * m * n * k) / 1e9;
    for (const threads of opts.threads) {
      const gflops: Record<string, number> = {};
      for (const kernel of kernels) {
        const { ms, maxError } = inChildProcessJson<SgemmCaseResult>({ bench: 'sgemm', c: { transA, transB, m, n, k, kernel, threads } });
        if (!(maxError <= sgemmTolerance(k))) throw new Error(`${shape} ${kernel} threads=${threads}: differs from the scalar kernel by up to ${maxError} (tolerance ${sgemmTolerance(k)})`);
        gflops[kernel] = flops / (ms / 1e3);
        rows.push({ shape, what, kernel, threads, 'median ms': ms, GFLOPS: gflops[kernel] });
        if (!opts.json) process.stderr.write(`  ${shape} ${kernel} threads=${threads}: ${gflops[kernel].toFixed(1)} GFLOPS\n`);
      }
      const row: Record<string, string | number> = { shape, threads };
      for (const kernel of kernels) if (kernel !== 'scalar' && gflops.scalar) row[`${kernel} / scalar`] = gflops[kernel] / gflops.scalar;
      ratios.push(row);
    }
  }
  if (opts.json) {
    process.stdout.write(JSON.stringify({ cpu: cpuInfo(), results: rows, ratios }, null, 2) + '\n');
  } else {
    process.stdout.write(table(rows) + '\n\n' + table(ratios) + '\n');
  }
}
