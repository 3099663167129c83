// The lowbit command line on what an audit of it found: outputs that would overwrite an input or each other, errors
// in the flags' names, repeatable options, options that do nothing, the one-command example's banner, Ctrl-C during
// fine-tuning, bench arguments checked up front, long file names.
import { expect } from 'chai';
import { spawn, spawnSync } from 'node:child_process';
import * as crypto from 'node:crypto';
import { constants as bufferConstants } from 'node:buffer';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { benchGemm } from '../../ts/bench';
import { program } from '../../ts/cli';
import { readNpy, readNpyLabels } from '../../ts/onnx/calibrate';
import { readModel } from '../../ts/onnx/model-io';
import { loadMnist } from '../../ts/train/mnist';
import { finetune } from '../../ts/train/finetune';
import { writeNpy } from '../helpers/npy';
import { buildModel, overflowingMatMul } from '../helpers/onnx-builder';

const root = path.resolve(__dirname, '..', '..', '..');
const cli = path.join(root, 'dist', 'ts', 'cli.js');
const mnist = path.join(root, 'assets', 'mnist-cnn.onnx');

describe('lowbit CLI (audit)', () => {
  let dir: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-cli-'));
    fs.copyFileSync(mnist, path.join(dir, 'm.onnx'));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));
  const lowbit = (...args: string[]) => spawnSync(process.execPath, [cli, ...args], { cwd: dir, encoding: 'utf8', timeout: 120_000 });
  const md5 = (file: string) => crypto.createHash('md5').update(fs.readFileSync(path.join(dir, file))).digest('hex');
  const files = () => fs.readdirSync(dir).sort();

  it('inspect says when a model is quantized already, and prints no table when it has no layer', () => {
    const q = lowbit('quantize', 'm.onnx', '-o', 'q.onnx', '--no-evaluate');
    expect(q.status, q.stderr).to.equal(0);
    const r = lowbit('inspect', 'q.onnx');
    expect(r.status, r.stderr).to.equal(0);
    expect(r.stdout).to.match(/^opset 13, 3 Conv, ConvTranspose, Gemm, MatMul and Gather layers, 0 of them quantized by default\nquantized already: 3 DequantizeLinear \(lowbit quantizes float models\)\n\nlayer /);
    // A model without any layer: the header alone.
    fs.writeFileSync(path.join(dir, 'relu.onnx'), buildModel({ inputDims: [1, 4], output: 'y', initializers: {}, nodes: [{ op: 'Relu', inputs: ['input'], output: 'y' }] }));
    const none = lowbit('inspect', 'relu.onnx');
    expect(none.status, none.stderr).to.equal(0);
    expect(none.stdout).to.equal('opset 13, 0 Conv, ConvTranspose, Gemm, MatMul and Gather layers, 0 of them quantized by default\n');
  });

  it("opts out of onnxruntime's usage reports unless ORT_DISABLE_TELEMETRY is set (no device id, event cache or mat-debug log)", function () {
    // A user's shell: none of the variables by which onnxruntime leaves CI machines out, its own HOME and TMPDIR.
    const env: NodeJS.ProcessEnv = { ...process.env, HOME: path.join(dir, 'home'), TMPDIR: path.join(dir, 'tmp') };
    for (const name of ['ORT_DISABLE_TELEMETRY', 'ORT_RUNNING_UNIT_TESTS', 'CI', 'TF_BUILD', 'GITHUB_ACTIONS', 'GITLAB_CI', 'CIRCLECI', 'TRAVIS', 'JENKINS_URL',
      'CODEBUILD_BUILD_ID', 'BUILDKITE', 'TEAMCITY_VERSION', 'APPVEYOR', 'BITBUCKET_BUILD_NUMBER']) delete env[name];
    const reports = () => {
      const found = fs.readdirSync(env.TMPDIR!).filter((f) => f.startsWith('mat-debug-'));
      if (fs.existsSync(path.join(env.HOME!, '.cache', 'Microsoft'))) found.push('~/.cache/Microsoft');
      return found;
    };
    const fresh = () => {
      for (const d of [env.HOME!, env.TMPDIR!]) fs.rmSync(d, { recursive: true, force: true }), fs.mkdirSync(d);
    };
    // Without the opt-out, a session of this onnxruntime-node writes them (else there is nothing to check).
    fresh();
    const session = 'require(process.argv[1]).InferenceSession.create(process.argv[2]).then((s) => s.release())';
    const plain = spawnSync(process.execPath, ['-e', session, require.resolve('onnxruntime-node'), mnist], { cwd: dir, env, encoding: 'utf8' });
    expect(plain.status, plain.stderr).to.equal(0);
    if (reports().length === 0) {
      this.test!.title = 'skipped: this onnxruntime-node writes no usage-report files, so the opt-out has nothing to show';
      this.skip();
    }
    // The CLI runs the float and quantized models in onnxruntime: nothing written.
    fresh();
    const run = spawnSync(process.execPath, [cli, 'quantize', 'm.onnx'], { cwd: dir, env, encoding: 'utf8', timeout: 120_000 });
    expect(run.status, run.stderr).to.equal(0);
    expect(run.stdout).to.match(/^output logits: cosine [\d.]+ vs float/m);
    expect(reports()).to.deep.equal([]);
    // A user who keeps them (any value set) is left to onnxruntime.
    fresh();
    const kept = spawnSync(process.execPath, [cli, 'quantize', 'm.onnx'], { cwd: dir, env: { ...env, ORT_DISABLE_TELEMETRY: '0' }, encoding: 'utf8', timeout: 120_000 });
    expect(kept.status, kept.stderr).to.equal(0);
    expect(reports()).to.not.deep.equal([]);
  });

  it('--version prints the package version; a bad flag value gives its error and a one-line hint, not the whole help; --calib without --abits says what it does', () => {
    const version = lowbit('--version');
    expect(version.status).to.equal(0);
    expect(version.stdout.trim()).to.equal(JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')).version);
    const bad = lowbit('quantize', 'm.onnx', '--wbits', 'abc');
    expect(bad.status).to.equal(1);
    expect(bad.stderr).to.equal("error: option '--wbits <bits>' argument 'abc' is invalid. expected a number, got 'abc'\n(lowbit <command> --help lists its options)\n");
    const calib = lowbit('quantize', 'm.onnx', '--calib', path.join(root, 'assets', 'mnist-calibration'));
    expect(calib.status, calib.stderr).to.equal(0);
    expect(calib.stderr).to.include('note: --calib without --abits quantizes weights only; the calibration data serve the comparison with the float model. Pass --abits 8 to quantize activations too.');
    expect(calib.stdout).to.match(/\(\d+ calibration samples\)/);
    const unread = lowbit('quantize', 'm.onnx', '--calib', path.join(root, 'assets', 'mnist-calibration'), '--no-evaluate');
    expect(unread.stderr).to.include('note: --calib without --abits quantizes weights only; with --no-evaluate the calibration data are not read. Pass --abits 8 to quantize activations too.');
  });

  it('layer outputs that overflow only when quantized show output SQNR -Infinity (also in the JSON report) and one note naming the first; those that overflow in float too are left out, one note', () => {
    const { model, feeds } = overflowingMatMul(4);
    fs.writeFileSync(path.join(dir, 'overflow.onnx'), model);
    fs.mkdirSync(path.join(dir, 'calib', 'input'), { recursive: true });
    for (const [i, f] of feeds.entries()) writeNpy(path.join(dir, 'calib', 'input', `00${i}.npy`), '<f4', [1, 3], f.input.data);
    const r = lowbit('quantize', 'overflow.onnx', '--calib', 'calib', '--report', 'r.json');
    expect(r.status, r.stderr).to.equal(0);
    // The settings under which onnx.test checks that the second feed overflows only quantized.
    expect(r.stdout).to.match(/^mm +MatMul +3x1 +8 +channel on axis 1 +minmax +[\d.]+ +-Infinity *$/m);
    expect(r.stdout).to.match(/^next4 +MatMul +1x1 .* -Infinity *$/m);
    // One note each, naming the first three layers: the overflow reaches every later one.
    expect(r.stdout).to.include('note: output SQNR -Infinity for mm (1 feed), next1 (1 feed), next2 (1 feed) and 2 later layers: ' +
      'NaN or an infinity in the quantized output where the float one is finite\n' +
      "note: feeds left out of the output SQNR of mm (1 feed), next1 (1 feed), next2 (1 feed) and 2 later layers: the float model's output held NaN or an infinity\n");
    const layer = JSON.parse(fs.readFileSync(path.join(dir, 'r.json'), 'utf8')).layers[0];
    expect([layer.outputSqnrDb, layer.outputQuantizedNonFiniteFeeds, layer.outputNonFiniteFeeds]).to.deep.equal(['-Infinity', 1, 1]);
  });

  it('GPTQ from fewer calibration vectors than a layer has inputs gets a note (64 images for the 784 inputs of fc)', () => {
    // fc's 784 inputs are solved in two blocks of 392.
    const note = 'note: fc: GPTQ rounding from 64 calibration input vectors for blocks of 392 inputs; ' +
      'it may do worse than rounding to nearest on other data: calibrate on more\n';
    const caveat = 'note: the comparison below runs on the calibration data, which GPTQ fitted\n';
    const r = lowbit('quantize', 'm.onnx', '--calib', path.join(root, 'assets', 'mnist-calibration'), '--rounding', 'gptq');
    expect(r.status, r.stderr).to.equal(0);
    expect(r.stdout).to.include(note + caveat);
    const unevaluated = lowbit('quantize', 'm.onnx', '--calib', path.join(root, 'assets', 'mnist-calibration'), '--rounding', 'gptq', '--no-evaluate');
    expect(unevaluated.status, unevaluated.stderr).to.equal(0);
    expect(unevaluated.stdout).to.include(note);
    expect(unevaluated.stdout).to.not.include(caveat);
  });

  it('--sensitivity lists the layers by their loss when quantized alone, names the worst for --keep-float, and needs the evaluation', () => {
    const r = lowbit('quantize', 'm.onnx', '--wbits', '4', '--abits', '8', '--calib', path.join(root, 'assets', 'mnist-calibration'), '--sensitivity', '--report', 'r.json');
    expect(r.status, r.stderr).to.equal(0);
    const lines = r.stdout.split('\n');
    const title = lines.indexOf('layers by sensitivity (the model quantized at this layer alone, every other layer float)');
    expect(title, r.stdout).to.be.greaterThan(0);
    expect(lines[title + 1].split(/\s{2,}/).map((h) => h.trim())).to.deep.equal(['layer', 'op', 'shape', 'output cosine alone', '1 - cosine', 'top-1 agreement']);
    // conv2 is the only 4-bit layer (the first and last take 8 bits).
    const rows = lines.slice(title + 3, title + 6).map((l) => l.split(/\s+/));
    expect(rows.map((c) => c[0])).to.deep.equal(['conv2', ...rows.slice(1).map((c) => c[0])]);
    const report = JSON.parse(fs.readFileSync(path.join(dir, 'r.json'), 'utf8')) as { layers: Array<{ node: string; sensitivity: { cosine: number } }> };
    for (const c of rows) expect(c[3]).to.equal(report.layers.find((l) => l.node === c[0])!.sensitivity.cosine.toFixed(6));
    expect(r.stdout).to.include('note: --keep-float conv2 leaves the layer that loses most in float\n');
    expect(r.stderr).to.include('sensitivity');
    const unevaluated = lowbit('quantize', 'm.onnx', '--sensitivity', '--no-evaluate');
    expect(unevaluated.status).to.equal(1);
    expect(unevaluated.stderr).to.include("--sensitivity measures each layer on the evaluation's inputs: leave out --no-evaluate.");
  });

  it('--target-cosine keeps the layers that lose most in float until the cosine is reached and says so; its flags are checked', () => {
    const r = lowbit('quantize', 'm.onnx', '--wbits', '4', '--abits', '4', '--calib', path.join(root, 'assets', 'mnist-calibration'), '--target-cosine', '0.9999', '-o', 'q.onnx');
    expect(r.status, r.stderr).to.equal(0);
    expect(r.stdout).to.match(/\ntarget cosine 0\.9999 met with conv2 kept float \(0 float: 0\.99\d+, 1 float: 0\.9999\d+\)\n/);
    expect(r.stdout).to.include('skipped by quantize-weights: conv2: kept in float (keepFloat)');
    // The sensitivity table is the first run's, with the layer kept float in it.
    expect(r.stdout).to.match(/\nconv2 +Conv +16x8x3x3 +0\.99\d+ +\S+ +100\.0% +float *\n/);
    expect(r.stderr).to.include('below --target-cosine: quantizing again with the layer that loses most kept float (at most 1)');
    expect(readModel(path.join(dir, 'q.onnx')).graph!.node.find((n) => n.name === 'conv2')!.input[1]).to.equal('conv2.weight_bn_folded');  // float, not dequantized
    const checks: Array<[string[], string]> = [
      [['--target-cosine', '0.99', '--no-evaluate'], '--target-cosine is judged on the evaluation: leave out --no-evaluate.'],
      [['--max-float-layers', '2'], '--max-float-layers bounds the search of --target-cosine: pass --target-cosine with it.'],
      [['--target-cosine', '2', '--calib', path.join(root, 'assets', 'mnist-calibration')], 'for --target-cosine but received 2'],
    ];
    for (const [args, message] of checks) {
      const bad = lowbit('quantize', 'm.onnx', ...args);
      expect(bad.status, args.join(' ')).to.equal(1);
      expect(bad.stderr, args.join(' ')).to.include(message);
    }
  });

  it('refuses an output that is the input model, or a report that is the model or the output; nothing is written', () => {
    const before = md5('m.onnx');
    fs.mkdirSync(path.join(dir, 'sub'));
    for (const args of [['quantize', 'm.onnx', '-o', 'm.onnx'], ['quantize', 'm.onnx', '-o', './sub/../m.onnx'], ['finetune', 'm.onnx', '--data', 'mnist', '--limit', '32', '-o', 'm.onnx']]) {
      const r = lowbit(...args);
      expect(r.status, args.join(' ')).to.equal(1);
      expect(r.stderr).to.match(/^lowbit: Expected --output to name a file other than the (input )?model \(.*m\.onnx\), but it is the same file: writing it would destroy that one\. Choose another path\./);
    }
    fs.symlinkSync(path.join(dir, 'm.onnx'), path.join(dir, 'link.onnx'));
    fs.linkSync(path.join(dir, 'm.onnx'), path.join(dir, 'hard.onnx'));
    const hard = lowbit('quantize', 'm.onnx', '-o', 'hard.onnx', '--no-evaluate');
    expect(hard.stderr).to.contain('Expected --output to name a file other than the input model (m.onnx)');
    for (const [output, report, clash] of [['q.onnx', 'q.onnx', '--output'], ['q.onnx', 'm.onnx', 'the input model'], ['q.onnx', 'link.onnx', 'the input model'], ['q.onnx', 'q.onnx.data', "--output's data file"]]) {
      const r = lowbit('quantize', 'm.onnx', '-o', output, '--report', report, '--no-evaluate');
      expect(r.status, `${output} ${report}`).to.equal(1);
      expect(r.stderr).to.contain(`Expected --report to name a file other than ${clash}`);
    }
    expect(md5('m.onnx')).to.equal(before);
    expect(files()).to.deep.equal(['hard.onnx', 'link.onnx', 'm.onnx', 'sub']);
  });

  it('writes a report with a long name (the temporary name stays short) and says "wrote" only when both are written', () => {
    const report = `${'r'.repeat(240)}.json`;
    const r = lowbit('quantize', 'm.onnx', '-o', 'q.onnx', '--report', report, '--no-evaluate');
    expect(r.status, r.stderr).to.equal(0);
    expect(r.stdout.trim().split('\n').pop()).to.equal(`wrote q.onnx and ${report} (opset 13 -> 13)`);
    expect(JSON.parse(fs.readFileSync(path.join(dir, report), 'utf8')).layers).to.have.length(3);
    expect(files()).to.deep.equal(['m.onnx', 'q.onnx', report].sort());
  });

  it('names the flags in errors (quantize and finetune), checks finetune\'s options before loading data, and --amethod before --calib', () => {
    const cases: Array<[string[], RegExp]> = [
      [['quantize', 'm.onnx', '--amethod', 'dynamic', '--wbits', '4'], /Expected 8 with --amethod 'dynamic' .* for --wbits but received 4\./],
      [['quantize', 'm.onnx', '--granularity', 'tensor', '--bias-correction'], /'channel' with --bias-correction .* for --granularity/],
      [['quantize', 'm.onnx', '--amethod', 'dynamic', '--quantize-outputs'], /for --quantize-outputs but received true/],
      // Dynamic activations read no calibration data: GPTQ is what needs it.
      [['quantize', 'm.onnx', '--amethod', 'dynamic', '--rounding', 'gptq'], /^lowbit: --rounding gptq needs calibration data: pass --calib <folder>/m],
      [['quantize', 'm.onnx', '--keep-float', 'Conv,Gemm'], /the model would be unchanged\. .*Check --keep-float, which leaves 2 names in float\./],
      [['quantize', 'm.onnx', '--amethod', 'foo', '--abits', '8'], /Expected one of 'minmax', 'percentile', 'kl', 'aciq', 'mse', 'dynamic' for --amethod but received "foo"\. Leave it out for min\/max ranges\.$/m],
      [['quantize', 'm.onnx', '--amethod', 'minmx', '--abits', '8'], /for --amethod but received "minmx"\. Did you mean 'minmax'\?$/m],
      // A bit width none of the formats has is said before what it would need (calibration data).
      [['quantize', 'm.onnx', '--abits', '3'], /^lowbit: Expected 4, 8 or 16 for --abits but received 3\.$/m],
      [['quantize', 'm.onnx', '--method', 'percentile'], /^lowbit: Expected one of 'minmax', 'mse', 'aciq' for --method but received "percentile"\. 'percentile' ranges are for activations: --amethod\.$/m],
      [['finetune', 'm.onnx', '--data', 'no-such-folder', '--epochs', '1e9'], /for --epochs but received 1000000000\./],
      [['finetune', 'm.onnx', '--data', 'no-such-folder', '--wbits', '3'], /Expected one of 2, 4, 8 for --wbits but received 3\./],
      [['finetune', 'm.onnx', '--data', 'no-such-folder', '--batch-size', '0'], /for --batch-size but received 0\./],
      [['finetune', 'm.onnx', '--data', 'no-such-folder', '--optimizer', 'Adam'], /for --optimizer but received "Adam"\./],
      [['finetune', 'm.onnx', '--data', 'mnist', '--limit', '32', '--keep-float', 'Conv1', '-o', 'f.onnx'], /for --keep-float\[0\] but received "Conv1"\. Did you mean 'conv1'\?/],
      [['quantize', 'm.onnx', '--wbits', '4', '--bit-allocation', '7.5', '--reduce-range'], /a number in \[2, 7\] .* for --bit-allocation but received 7\.5/],
    ];
    for (const [args, message] of cases) {
      const r = lowbit(...args);
      expect(r.status, args.join(' ')).to.equal(1);
      expect(r.stderr, args.join(' ')).to.match(message);
      expect(r.stderr, args.join(' ')).not.to.contain('options.');
    }
    expect(files()).to.deep.equal(['m.onnx']);
  });

  it('collects repeated --keep-float and --threads, takes --first-last-bits, and notes options that do nothing', () => {
    const kept = lowbit('quantize', 'm.onnx', '-o', 'q.onnx', '--no-evaluate', '--keep-float', 'conv1', '--keep-float', 'fc');
    expect(kept.stdout).to.contain('skipped by quantize-weights: conv1: kept in float (keepFloat)');
    expect(kept.stdout).to.contain('skipped by quantize-weights: fc: kept in float (keepFloat)');
    const edges = lowbit('quantize', 'm.onnx', '-o', 'q.onnx', '--no-evaluate', '--wbits', '4', '--first-last-bits', '4');
    expect(edges.stdout.split('\n').filter((l) => /^(conv1|conv2|fc) /.test(l)).map((l) => l.split(/\s+/)[3])).to.deep.equal(['4', '4', '4']);
    const block = lowbit('quantize', 'm.onnx', '-o', 'q.onnx', '--no-evaluate', '--block-size', '64');
    expect(block.stderr).to.contain('lowbit: note: --block-size has no effect here (it sets the block size of --granularity block)');
    const float = lowbit('finetune', 'm.onnx', '--data', 'mnist', '--limit', '32', '--method', 'float', '--wbits', '2', '--groups', '7', '-o', 'f.onnx');
    expect(float.status, float.stderr).to.equal(0);
    expect(float.stderr).to.contain('lowbit: note: --wbits has no effect here (--method float trains without quantizers)');
    expect(float.stderr).to.contain('lowbit: note: --groups has no effect here (it applies to --method gdrq)');
    const noEight = lowbit('finetune', 'm.onnx', '--data', 'mnist', '--limit', '32', '--method', 'lsq', '--first-last-bits', '4', '--reduce-range', '-o', 'f.onnx');
    expect(noEight.status, noEight.stderr).to.equal(0);
    expect(noEight.stderr).to.contain('lowbit: note: --reduce-range has no effect here (it applies to 8-bit weights (--wbits 8 or --first-last-bits 8))');
    const keptFloat = lowbit('finetune', 'm.onnx', '--data', 'mnist', '--limit', '32', '--keep-float', 'conv1', '-o', 'k.onnx');
    expect(keptFloat.status, keptFloat.stderr).to.equal(0);
    const trained = readModel(path.join(dir, 'k.onnx')).graph!.node;
    const dequantizedInto = (name: string) => trained.find((n) => n.name === name)!.input.some((i) => trained.some((d) => d.opType === 'DequantizeLinear' && d.output[0] === i));
    expect([dequantizedInto('conv1'), dequantizedInto('conv2')], 'conv1 kept float, conv2 quantized').to.deep.equal([false, true]);
    const keptFloatNote = lowbit('finetune', 'm.onnx', '--data', 'mnist', '--limit', '32', '--method', 'float', '--keep-float', 'conv1', '-o', 'f.onnx');
    expect(keptFloatNote.stderr).to.contain('lowbit: note: --keep-float has no effect here (--method float trains without quantizers)');
    let threads: unknown, rounds: unknown;
    const cmd = program();
    cmd.commands.find((c) => c.name() === 'bench')!.commands.find((c) => c.name() === 'gemm')!.action((o: { threads?: number[]; rounds: number }) => {
      threads = o.threads;
      rounds = o.rounds;
    });
    cmd.parse(['node', 'lowbit', 'bench', 'gemm', '--threads', '1', '--threads', '4']);
    expect([threads, rounds]).to.deep.equal([[1, 4], 3]);
  });

  it('prints the message of an error, and its stack only with LOWBIT_DEBUG set', () => {
    const plain = lowbit('quantize', 'no-such.onnx');
    expect(plain.status).to.equal(1);
    expect(plain.stderr).to.match(/^lowbit: .*no-such\.onnx/m);
    expect(plain.stderr).to.not.match(/\n\s+at /);
    const debug = spawnSync(process.execPath, [cli, 'quantize', 'no-such.onnx'], { cwd: dir, encoding: 'utf8', env: { ...process.env, LOWBIT_DEBUG: '1' } });
    expect(debug.status).to.equal(1);
    expect(debug.stderr).to.match(/^lowbit: .*no-such\.onnx/m);
    expect(debug.stderr).to.match(/\n\s+at .*\.js:\d+/);
  });

  it('run through npm (npm run lowbit, npm start) takes relative paths from where the user typed (INIT_CWD), not the package root', () => {
    const npmEnv = { ...process.env, npm_lifecycle_event: 'lowbit', npm_package_name: 'lowbit', INIT_CWD: dir };
    const r = spawnSync(process.execPath, [cli, 'quantize', 'm.onnx', '-o', 'q.onnx', '--no-evaluate'], { cwd: root, encoding: 'utf8', env: npmEnv });
    expect(r.status, r.stderr).to.equal(0);
    expect(files()).to.deep.equal(['m.onnx', 'q.onnx']);
    expect(fs.existsSync(path.join(root, 'q.onnx'))).to.equal(false);
    // Another project's 'start' script that runs lowbit from a folder of its own stays there.
    fs.mkdirSync(path.join(dir, 'models'));
    fs.copyFileSync(mnist, path.join(dir, 'models', 'm.onnx'));
    const theirs = spawnSync(process.execPath, [cli, 'quantize', 'm.onnx', '-o', 'q.onnx', '--no-evaluate'],
      { cwd: path.join(dir, 'models'), encoding: 'utf8', env: { ...npmEnv, npm_lifecycle_event: 'start', npm_package_name: 'their-app' } });
    expect(theirs.status, theirs.stderr).to.equal(0);
    expect(fs.readdirSync(path.join(dir, 'models')).sort()).to.deep.equal(['m.onnx', 'q.onnx']);
  });

  it('describes the one-command example as it runs (other bits, other calibration data)', () => {
    const r = lowbit('quantize', '--wbits', '4', '--abits', '16', '--no-evaluate');
    expect(r.status, r.stderr).to.equal(0);
    expect(r.stdout.split('\n')[0]).to.match(/^No model given: quantizing the bundled example .*mnist-cnn\.onnx \(a small MNIST CNN\) to W4A16, calibrated on its 64 bundled images\.$/);
  });

  it('bench checks --kernel and --threads before starting', () => {
    const kernel = lowbit('bench', 'gemm', '--kernel', 'foo', '--shape', '16x16x16', '--threads', '1');
    expect(kernel.status).to.equal(1);
    expect(kernel.stderr).to.match(/^lowbit: Expected one of '\w+'/);
    expect(kernel.stderr).to.match(/for --kernel but received 'foo': those are the gemm kernels this CPU runs\. Leave --kernel out to measure them all\.\n$/);
    const threads = lowbit('bench', 'sgemm', '--threads', '100000');
    expect(threads.status).to.equal(1);
    expect(threads.stderr).to.contain("expected a thread count from 1 to 1024, 'all' or 'both', got '100000'");
  });

  it('bench gemm times every case once per round and takes each ratio from the rounds', async function () {
    this.timeout(60_000);
    const r = lowbit('bench', 'gemm', '--shape', '8x8x8', '--threads', '1', '--rounds', '3', '--kernel', 'portable', '--json');
    expect(r.status, r.stderr).to.equal(0);
    const { rows, ratios } = JSON.parse(r.stdout) as { rows: Array<Record<string, unknown>>; ratios: Array<Record<string, number>> };
    expect(rows.map((row) => row.implementation)).to.include.members(['lowbit portable u8s8', 'onnxruntime MatMulInteger u8s8']);
    for (const row of rows) {
      const times = row['ms per round'] as number[];
      expect(times, String(row.implementation)).to.have.length(3);
      expect(row['median ms']).to.equal([...times].sort((a, b) => a - b)[1]);
    }
    const perRound = (name: string) => rows.find((row) => row.implementation === name)!['ms per round'] as number[];
    const ours = perRound('lowbit portable u8s8'), theirs = perRound('onnxruntime MatMulInteger u8s8');
    const roundRatios = theirs.map((ms, round) => ms / ours[round]).sort((a, b) => a - b);
    expect(ratios[0]['portable u8s8 / ort u8s8']).to.equal(roundRatios[1]);
    // Called as a function, a round count the median cannot be taken over is refused before any work.
    for (const rounds of [0, 1.5]) {
      const refused = await benchGemm({ shapes: [[8, 8, 8]], threads: [1], rounds, json: true }).then(() => undefined, (e: Error) => e);
      expect(refused).to.be.instanceOf(RangeError);
      expect(refused!.message).to.match(new RegExp(`^Expected an integer in \\[1, 1000\\] for opts\\.rounds but received ${rounds}`));
    }
  });

  it('finetune stops on Ctrl-C with exit code 130, says so, and writes nothing', async function () {
    this.timeout(60_000);
    const child = spawn(process.execPath, [cli, 'finetune', 'm.onnx', '--data', 'mnist', '--limit', '2048', '--epochs', '1000', '-o', 'f.onnx'], { cwd: dir });
    let stderr = '';
    const exited = new Promise<number | null>((resolve) => child.on('exit', (c) => resolve(c)));
    try {
      // The bar's first line (on stderr; piped output gets one too) means training runs; an early exit fails the test.
      await Promise.race([
        new Promise<void>((resolve) => child.stderr.on('data', (d) => {
          stderr += d;
          if (stderr.includes('epoch 1')) resolve();
        })),
        exited.then((c) => { throw new Error(`finetune exited (${c}) before training started: ${stderr}`); }),
      ]);
      child.kill('SIGINT');
    } catch (e) {
      child.kill('SIGKILL');
      throw e;
    }
    const code = await exited;
    expect(code).to.equal(130);
    expect(stderr).to.contain('lowbit: SIGINT: stopping…');
    expect(stderr).to.contain('lowbit: interrupted (SIGINT): nothing was written');
    expect(files()).to.deep.equal(['m.onnx']);
  });

  it('finetune --data folders: labels that wrap, extra labels, bodies that do not fill the shape, scalars and bad headers are errors', () => {
    const set = loadMnist('train', 4);
    const folder = (name: string) => fs.mkdirSync(path.join(dir, name), { recursive: true });
    const inputs = (name: string, n = 4) => writeNpy(path.join(dir, name, 'inputs.npy'), '<f4', [n, 1, 28, 28], set.images.subarray(0, n * 784));
    const cases: Array<[string, () => void, RegExp]> = [
      ['wrap', () => writeNpy(path.join(dir, 'wrap', 'labels.npy'), '<i8', [4], BigInt64Array.of(1n, 4294967298n, 3n, 4n)),
        /labels\.npy: label 1 is 4294967298, not a class index \(int64 labels must fit in int32\)\./],
      ['extra', () => writeNpy(path.join(dir, 'extra', 'labels.npy'), '|u1', [5], Uint8Array.of(1, 2, 3, 4, 5)),
        /Expected one label per sample \(4, as in .*inputs\.npy\) in .*labels\.npy \(--data\) but it holds 5\./],
      ['short', () => writeNpy(path.join(dir, 'short', 'labels.npy'), '<i4', [4], new Uint8Array(18)), /labels\.npy: the data \(18 bytes\) do not match the shape \(4 of <i4\)\./],
    ];
    for (const [name, labels, message] of cases) {
      folder(name);
      inputs(name);
      labels();
      const r = lowbit('finetune', 'm.onnx', '--data', name, '-o', 'f.onnx');
      expect(r.status, name).to.equal(1);
      expect(r.stderr, name).to.match(message);
    }
    folder('scalar');
    writeNpy(path.join(dir, 'scalar', 'inputs.npy'), '<f4', [], Float32Array.of(1));
    writeNpy(path.join(dir, 'scalar', 'labels.npy'), '|u1', [1], Uint8Array.of(1));
    expect(lowbit('finetune', 'm.onnx', '--data', 'scalar', '-o', 'f.onnx').stderr).to.match(/Expected .*inputs\.npy \(--data\) to hold samples \[N, \.\.\.\] but it is a scalar\./);
    expect(fs.existsSync(path.join(dir, 'f.onnx'))).to.equal(false);
    // Headers: version 2 cut short, no magic byte, an unknown version; int64 labels that fit are read.
    const file = path.join(dir, 'x.npy');
    fs.writeFileSync(file, Buffer.from('\x93NUMPY\x02\x00\x10\x00\x00', 'latin1'));
    expect(() => readNpy(file)).to.throw(RangeError, /x\.npy: the \.npy header is truncated\./);
    fs.writeFileSync(file, Buffer.from('xNUMPY\x01\x00\x10\x00', 'latin1'));
    expect(() => readNpy(file)).to.throw(RangeError, /x\.npy is not a \.npy file/);
    fs.writeFileSync(file, Buffer.from('\x93NUMPY\x07\x00\x10\x00', 'latin1'));
    expect(() => readNpy(file)).to.throw(RangeError, /\.npy format version 7 is not one lowbit reads/);
    writeNpy(file, '<i8', [3], BigInt64Array.of(0n, 9n, 2147483647n));
    expect(Array.from(readNpyLabels(file))).to.deep.equal([0, 9, 2147483647]);
  });

  // (Node 20 holds at most 4 GiB in one array; later versions far more: the refusal is then not reachable.)
  if (bufferConstants.MAX_LENGTH >= 6_000_000 * 784 * 4) it(`skipped: refusing an .npy longer than Node's longest array: this Node holds ${bufferConstants.MAX_LENGTH} bytes in one`);
  it('finetune --limit reads only the samples it uses (a sparse 18.8 GB inputs.npy); reading all of it past the longest array is refused by name', function () {
    // Windows filesystems reserve the space of a file made longer; elsewhere the zeros take no disk.
    if (process.platform === 'win32') this.skip();
    const rows = 6_000_000, bytes = rows * 784 * 4;
    const set = loadMnist('train', 32);
    fs.mkdirSync(path.join(dir, 'big'));
    const inputs = path.join(dir, 'big', 'inputs.npy');
    writeNpy(inputs, '<f4', [rows, 1, 28, 28], set.images);
    fs.truncateSync(inputs, fs.statSync(inputs).size - set.images.byteLength + bytes);
    writeNpy(path.join(dir, 'big', 'labels.npy'), '|u1', [rows], Uint8Array.from({ length: rows }, (_, i) => (i < 32 ? set.labels[i] : 0)));
    const first = readNpy(inputs, 40);
    expect(first.dims).to.deep.equal([40, 1, 28, 28]);
    expect(first.storedRows).to.equal(rows);
    expect(Array.from(first.data.subarray(0, 32 * 784))).to.deep.equal(Array.from(set.images));
    if (bufferConstants.MAX_LENGTH < bytes) {
      expect(() => readNpy(inputs)).to.throw(RangeError, new RegExp(`inputs\\.npy: its data hold ${bytes} bytes, more than the ${bufferConstants.MAX_LENGTH} one array holds in this Node\\.js: split the data into several \\.npy files\\.$`));
      expect(() => readNpy(inputs, Infinity, 'read fewer')).to.throw(RangeError, /in this Node\.js: read fewer\.$/);
    }
    const r = lowbit('finetune', 'm.onnx', '--data', 'big', '--limit', '32', '--method', 'float', '--epochs', '1', '-o', 'f.onnx');
    expect(r.status, r.stderr).to.equal(0);
    expect(r.stdout).to.match(/wrote .*f\.onnx \(float\)/);
  });

  it('a .npy name that is a pipe or a folder is refused, not read (a pipe would block)', function () {
    fs.mkdirSync(path.join(dir, 'folder.npy'));
    expect(() => readNpy(path.join(dir, 'folder.npy'))).to.throw(RangeError, /folder\.npy is not a regular file \(a folder\)/);
    if (process.platform === 'win32' || spawnSync('mkfifo', [path.join(dir, 'pipe.npy')]).status !== 0) this.skip();  // no named pipes here
    expect(() => readNpy(path.join(dir, 'pipe.npy'))).to.throw(RangeError, /pipe\.npy is not a regular file \(a pipe or a device\)/);
  });

  it('finetune refuses a Float32Array as data (it is iterable, but not of batches), and names another realm\'s arrays', async () => {
    let caught: unknown;
    await finetune(mnist, new Float32Array(784) as never).catch((e) => (caught = e));
    expect((caught as Error).message).to.equal('Expected an object { inputs: { data, dims }, labels } for data but received Float32Array of length 784.');
    const foreign = require('node:vm').runInNewContext('new Float32Array(784)') as Float32Array;
    await finetune(mnist, { inputs: { data: foreign, dims: [1, 1, 28, 28] }, labels: Int32Array.of(1) }).catch((e) => (caught = e));
    expect((caught as Error).message).to.match(/for data\.inputs\.data .* another JavaScript realm/);
  });
});
