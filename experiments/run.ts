/** `npm run experiments -- <name> [--json]`. Names: clipping, ptq. */
import { clippingExperiment } from './clipping';
import { ptqExperiment } from './ptq';

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const json = args.includes('--json');
  const names = args.filter((a) => !a.startsWith('--'));
  for (const name of names.length ? names : ['clipping', 'ptq']) {
    if (name === 'clipping') clippingExperiment(json);
    else if (name === 'ptq') await ptqExperiment(json);
    else throw new Error(`Unknown experiment '${name}'. Known: clipping, ptq.`);
  }
}

main().catch((e) => {
  console.error(e instanceof Error ? e.message : e);
  process.exit(1);
});
