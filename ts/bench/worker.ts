/** Child-process entry of the benchmarks: runs one case and prints its result as JSON. */
import { runGemmCase, type GemmCase } from './gemm';
import { runLargeModelCase, type LargeModelCase } from './large-model';
import { runQuantizeCase, type QuantizeCase } from './quantize';
import { runSgemmCase, type SgemmCase } from './sgemm';

type Job = { bench: 'quantize'; c: QuantizeCase; n: number; runs: number } | { bench: 'gemm'; c: GemmCase } |
  { bench: 'sgemm'; c: SgemmCase } | { bench: 'large-model'; c: LargeModelCase };

async function main(): Promise<void> {
  const job = JSON.parse(process.argv[2]) as Job;
  if (job.bench === 'large-model') {
    process.stdout.write(`${JSON.stringify(await runLargeModelCase(job.c))}\n`);
    return;
  }
  const result = job.bench === 'gemm' ? await runGemmCase(job.c) : job.bench === 'quantize' ? await runQuantizeCase(job.c, job.n, job.runs)
    : await runSgemmCase(job.c);
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

main().catch((e) => {
  console.error(e instanceof Error ? e.stack : e);
  process.exit(1);
});
