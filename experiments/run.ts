/** `npm run experiments -- <name> [--json] [--quick] [--seeds N] [--narrow] [--ptq-only]`. Names: clipping, ptq, qat (qat runs only when named). */
import { clippingExperiment } from './clipping';
import { ptqExperiment } from './ptq';
import { qatExperiment } from './qat';

function seedsArgument(args: string[]): number {
  const at = args.indexOf('--seeds');
  return at < 0 ? 1 : Number(args[at + 1]);
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const json = args.includes('--json');
  const names = args.filter((a, i) => !a.startsWith('--') && args[i - 1] !== '--seeds');
  for (const name of names.length ? names : ['clipping', 'ptq']) {
    if (name === 'clipping') clippingExperiment(json);
    else if (name === 'ptq') await ptqExperiment(json);
    else if (name === 'qat') await qatExperiment(json, args.includes('--quick'), seedsArgument(args), args.includes('--narrow'), args.includes('--ptq-only'));
    else throw new Error(`Unknown experiment '${name}'. Known: clipping, ptq, qat.`);
  }
}

main().catch((e) => {
  console.error(e instanceof Error ? e.message : e);
  process.exit(1);
});
