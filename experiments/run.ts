/** `npm run experiments -- <name> [--json] [--quick]`. Names: clipping, ptq, qat (qat runs only when named). */
import { clippingExperiment } from './clipping';
import { ptqExperiment } from './ptq';
import { qatExperiment } from './qat';

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const json = args.includes('--json');
  const names = args.filter((a) => !a.startsWith('--'));
  for (const name of names.length ? names : ['clipping', 'ptq']) {
    if (name === 'clipping') clippingExperiment(json);
    else if (name === 'ptq') await ptqExperiment(json);
    else if (name === 'qat') await qatExperiment(json, args.includes('--quick'));
    else throw new Error(`Unknown experiment '${name}'. Known: clipping, ptq, qat.`);
  }
}

main().catch((e) => {
  console.error(e instanceof Error ? e.message : e);
  process.exit(1);
});
