#!/usr/bin/env node
/**
 * The lowbit command line. `lowbit bench gemm|quantize [options]`, `lowbit info`.
 */
import { Command, InvalidArgumentError } from 'commander';

import { benchGemm, benchQuantize, DEFAULT_GEMM_SHAPES } from './bench';
import { cpuInfo } from './cpu';

function parseShape(value: string, previous: Array<[number, number, number]> = []): Array<[number, number, number]> {
  const m = /^(\d+)x(\d+)x(\d+)$/i.exec(value.trim());
  if (!m) throw new InvalidArgumentError(`expected MxKxN (e.g. 64x4096x4096), got '${value}'`);
  const dims = [Number(m[1]), Number(m[2]), Number(m[3])] as [number, number, number];
  if (dims.some((d) => d < 1)) throw new InvalidArgumentError(`dimensions must be >= 1, got '${value}'`);
  return [...previous, dims];
}

function parseThreads(value: string): number[] {
  if (value === 'both') return [1, cpuInfo().maxThreads];
  if (value === 'all') return [cpuInfo().maxThreads];
  const t = Number(value);
  if (!Number.isInteger(t) || t < 1) throw new InvalidArgumentError(`expected a thread count, 'all' or 'both', got '${value}'`);
  return [t];
}

function parseSize(value: string, previous: number[] = []): number[] {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) throw new InvalidArgumentError(`expected a positive integer, got '${value}'`);
  return [...previous, n];
}

export function program(): Command {
  const cli = new Command('lowbit').description('Low-bit quantization toolkit for Node.js').showHelpAfterError();
  cli.command('info').description('CPU features and the kernels lowbit uses').action(() => {
    console.log(JSON.stringify(cpuInfo(), null, 2));
  });
  const bench = cli.command('bench').description('throughput benchmarks (one process per case; compare ratios from one run)');
  bench.command('gemm')
    .description('int8/int4 GEMM GOPS per kernel path vs onnxruntime MatMulInteger, MatMul fp32 and MatMulNBits')
    .option('--shape <MxKxN>', 'a shape to measure (repeatable); default: the standard set', parseShape)
    .option('--threads <n|all|both>', 'thread counts', parseThreads, undefined)
    .option('--kernel <name...>', 'lowbit kernels to measure (default: all SIMD paths here)')
    .option('--json', 'machine-readable output')
    .action(async (o: { shape?: Array<[number, number, number]>; threads?: number[]; kernel?: string[]; json?: boolean }) => {
      await benchGemm({
        shapes: o.shape ?? DEFAULT_GEMM_SHAPES,
        threads: o.threads ?? [1, cpuInfo().maxThreads],
        kernels: o.kernel,
        json: !!o.json,
      });
    });
  bench.command('quantize')
    .description('per-tensor float32 -> int8 quantization GB/s vs plain TypeScript and onnxruntime QuantizeLinear')
    .option('--size <n>', 'element count (repeatable); default 16M and 64M', parseSize)
    .option('--runs <n>', 'timed runs per case', (v) => parseSize(v)[0], 7)
    .option('--json', 'machine-readable output')
    .action(async (o: { size?: number[]; runs: number; json?: boolean }) => {
      await benchQuantize({ sizes: o.size ?? [16 * 2 ** 20, 64 * 2 ** 20], runs: o.runs, json: !!o.json });
    });
  return cli;
}

if (require.main === module) {
  program().parseAsync(process.argv).catch((e: unknown) => {
    console.error(`lowbit: ${e instanceof Error ? e.message : String(e)}`);
    process.exit(1);
  });
}
