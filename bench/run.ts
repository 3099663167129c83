/**
 * Benchmarks: `npm run bench -- <name> [--size N ...] [--runs R] [--json]`.
 * Names: quantize. Never part of `npm test`; quote results as ratios from one run.
 */
import { benchQuantize } from './quantize.bench';

async function main(argv: string[]): Promise<void> {
  const names = argv.filter((a) => !a.startsWith('--') && !/^\d+$/.test(a));
  const value = (flag: string) => {
    const i = argv.indexOf(flag);
    return i >= 0 ? argv[i + 1] : undefined;
  };
  const sizes = argv.flatMap((a, i) => (argv[i - 1] === '--size' ? [Number(a)] : []));
  const runs = Number(value("--runs") ?? 7);
  const json = argv.includes('--json');
  const known = ['quantize'];
  for (const name of names.length ? names : known) {
    if (name === 'quantize') {
      await benchQuantize({ sizes: sizes.length ? sizes : [16 * 2 ** 20, 64 * 2 ** 20], runs, json });
    } else {
      throw new Error(`Unknown benchmark '${name}'. Known: ${known.join(', ')}.`);
    }
  }
}

main(process.argv.slice(2)).catch((e) => {
  console.error(e instanceof Error ? e.message : e);
  process.exit(1);
});
