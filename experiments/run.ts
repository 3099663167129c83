/** `npm run experiments -- <name> [--json]`. Names: clipping. */
import { clippingExperiment } from './clipping';

const args = process.argv.slice(2);
const json = args.includes('--json');
const names = args.filter((a) => !a.startsWith('--'));
for (const name of names.length ? names : ['clipping']) {
  if (name === 'clipping') clippingExperiment(json);
  else {
    console.error(`Unknown experiment '${name}'. Known: clipping.`);
    process.exit(1);
  }
}
