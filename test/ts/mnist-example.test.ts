// The bundled example (assets/mnist-cnn.onnx, trained by experiments/train-mnist-cnn.ts):
// the one-command try-it and W8A8 accuracy.
import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { mnistAccuracy } from '../../experiments/ptq';
import { quantizeModel } from '../../ts/onnx/quantize-model';

const root = path.resolve(__dirname, '..', '..', '..');
const model = path.join(root, 'assets', 'mnist-cnn.onnx');

describe('bundled MNIST CNN example', () => {
  it('`lowbit quantize` without a model quantizes it to W8A8 and writes the result', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-cli-'));
    const r = spawnSync(process.execPath, [path.join(root, 'dist', 'ts', 'cli.js'), 'quantize'], { cwd: dir, encoding: 'utf8' });
    expect(r.status, r.stderr).to.equal(0);
    expect(r.stdout).to.match(/bundled example/);
    expect(r.stdout).to.match(/activation tensors quantized from 1 calibration batches/);
    expect(r.stdout).to.match(/wrote mnist-cnn\.q\.onnx/);
    expect(fs.existsSync(path.join(dir, 'mnist-cnn.q.onnx'))).to.equal(true);
    fs.rmSync(dir, { recursive: true });
  });

  it('W8A8 keeps the float accuracy on 2000 test images (within 0.3 points)', async () => {
    const float = await mnistAccuracy(new Uint8Array(fs.readFileSync(model)), 2000);
    expect(float).to.be.greaterThan(0.9);
    const { model: q } = await quantizeModel(model, {
      weights: { bits: 8 }, activations: { bits: 8 }, calibration: path.join(root, 'assets', 'mnist-calibration'),
    });
    expect(Math.abs((await mnistAccuracy(q, 2000)) - float)).to.be.at.most(0.003);
  });
});
