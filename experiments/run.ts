/**
 * `npm run experiments -- <name> [--json] [--quick] [--seeds N] [--narrow] [--ptq-only] [--lines N] [--epochs E] [--lr R] [--optimizer o] [--fixed-steps]`.
 * Names: clipping, ptq, sensitivity, qat, ocr-qat (sensitivity, qat and ocr-qat run only when named).
 */
import { clippingExperiment } from './clipping';
import { ptqExperiment } from './ptq';
import { ocrQatExperiment } from './ocr-qat';
import { qatExperiment } from './qat';
import { sensitivityExperiment } from './sensitivity';
import { optOutOfOrtTelemetry } from '../ts/ort-telemetry';

const VALUE_FLAGS = ['--seeds', '--lines', '--epochs', '--lr', '--optimizer'];

function flagValue(args: string[], flag: string, fallback: string): string {
  const at = args.indexOf(flag);
  return at < 0 ? fallback : args[at + 1];
}

async function main(): Promise<void> {
  optOutOfOrtTelemetry();  // before any onnxruntime session (ts/ort-telemetry.ts)
  const args = process.argv.slice(2);
  const json = args.includes('--json');
  const names = args.filter((a, i) => !a.startsWith('--') && !VALUE_FLAGS.includes(args[i - 1]));
  for (const name of names.length ? names : ['clipping', 'ptq']) {
    if (name === 'clipping') clippingExperiment(json);
    else if (name === 'ptq') await ptqExperiment(json);
    else if (name === 'sensitivity') await sensitivityExperiment(json);
    else if (name === 'qat') await qatExperiment(json, args.includes('--quick'), Number(flagValue(args, '--seeds', '1')), args.includes('--narrow'), args.includes('--ptq-only'));
    else if (name === 'ocr-qat') {
      await ocrQatExperiment(json, {
        lines: Number(flagValue(args, '--lines', '512')), epochs: Number(flagValue(args, '--epochs', '1')),
        learningRate: Number(flagValue(args, '--lr', '1e-5')), optimizer: flagValue(args, '--optimizer', 'sgd') as 'sgd',
        fixedSteps: args.includes('--fixed-steps'),
      });
    } else throw new Error(`Unknown experiment '${name}'. Known: clipping, ptq, sensitivity, qat, ocr-qat.`);
  }
}

main().catch((e) => {
  console.error(e instanceof Error ? e.message : e);
  process.exit(1);
});
