/** Small timing helpers: warm up, then the median of repeated runs; one child process per case. */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as path from 'node:path';

export interface Timing {
  medianMs: number;
  minMs: number;
  runs: number;
}

export async function measure(fn: () => unknown | Promise<unknown>, runs: number, warmup = 1): Promise<Timing> {
  for (let i = 0; i < warmup; i++) await fn();
  const times: number[] = [];
  for (let i = 0; i < runs; i++) {
    const t0 = process.hrtime.bigint();
    await fn();
    times.push(Number(process.hrtime.bigint() - t0) / 1e6);
  }
  times.sort((a, b) => a - b);
  return { medianMs: times[Math.floor(times.length / 2)], minMs: times[0], runs };
}

/** The middle value (the mean of the middle two for an even count). */
export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

export function table(rows: Array<Record<string, string | number>>): string {
  const cols = [...new Set(rows.flatMap((r) => Object.keys(r)))];
  const cell = (v: string | number | undefined) => (v === undefined ? '' : typeof v !== 'number' ? v : Number.isInteger(v) ? String(v) : v.toFixed(v >= 100 ? 0 : 2));
  const widths = cols.map((c) => Math.max(c.length, ...rows.map((r) => String(cell(r[c])).length)));
  const line = (vals: string[]) => vals.map((v, i) => v.padEnd(widths[i])).join('  ');
  return [line(cols), line(widths.map((w) => '-'.repeat(w))), ...rows.map((r) => line(cols.map((c) => String(cell(r[c])))))].join('\n');
}

/** Runs one benchmark case in a fresh Node process (no shared JIT or GC state) and returns the JSON it prints last. */
export function inChildProcessJson<T>(job: object): T {
  const out = execFileSync(process.execPath, [path.join(__dirname, 'worker.js'), JSON.stringify(job)], {
    encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], maxBuffer: 1 << 20,
  });
  const line = out.trim().split('\n').pop()!;
  try {
    return JSON.parse(line) as T;
  } catch {
    throw new Error(`benchmark case ${JSON.stringify(job)} printed ${JSON.stringify(line)}`);
  }
}

/** A typed array's bytes, and their digest: equal digests, equal outputs. */
export function bytesOf(view: ArrayBufferView): Buffer {
  return Buffer.from(view.buffer, view.byteOffset, view.byteLength);
}

export function digestOf(view: ArrayBufferView): string {
  return createHash('sha256').update(bytesOf(view)).digest('hex');
}

/** Picks a run count so a case takes about `budgetMs` after one timed probe. */
export function runsFor(probeMs: number, budgetMs = 1500, min = 3, max = 25): number {
  return Math.max(min, Math.min(max, Math.floor(budgetMs / Math.max(probeMs, 1e-3))));
}
