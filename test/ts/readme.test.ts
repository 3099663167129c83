// The README example is examples/quickstart.js and prints what the README shows.
import { expect } from 'chai';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

const root = path.resolve(__dirname, '..', '..', '..');

describe('README', () => {
  const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8');
  const example = readme.split('## Example')[1];

  it('shows examples/quickstart.js verbatim and its exact output', () => {
    const code = /```js\n([\s\S]*?)```/.exec(example)![1];
    const shown = /prints\n\n```text\n([\s\S]*?)```/.exec(example)![1];
    expect(code).to.equal(fs.readFileSync(path.join(root, 'examples', 'quickstart.js'), 'utf8'));
    const printed = execFileSync(process.execPath, [path.join(root, 'examples', 'quickstart.js')], { encoding: 'utf8' });
    expect(printed).to.equal(shown);
  });

  it('documents every quantizeTensor option', () => {
    for (const option of ['shape', 'bits', 'signed', 'symmetric', 'granularity', 'axis', 'blockSize', 'method', 'scale', 'zeroPoint', 'kernel', 'threads', 'out']) {
      expect(readme, option).to.include(`| \`${option}\` |`);
    }
  });

  it('documents every finetune option', () => {
    const section = readme.split('### Fine-tuning')[1].split('### ')[0];
    for (const option of ['method', 'weightBits', 'activationBits', 'firstLastLayerBits', 'keepFloat', 'epochs', 'batchSize', 'learningRate',
      'learningRateSchedule', 'momentum', 'weightDecay', 'seed', 'perChannel', 'groups', 'scaleClipK', 'activationClipK', 'groupSteps', 'activationSteps', 'validation', 'threads',
      'kernel', 'onEpoch', 'onStep', 'outputPath']) {
      expect(section, option).to.include(`\`${option}\``);
    }
  });
});
