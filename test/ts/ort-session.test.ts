// onnxruntime sessions on worker threads (ts/onnx/ort-session.ts): same results as onnxruntime on the calling
// thread, the caller's buffers untouched, the event loop free while a model runs, typed errors, no hang.
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect } from 'chai';

import { matMulFloatModel, ort, ortVersionProblem } from '../../ts/bench/ort-models';
import { OnnxModelError } from '../../ts/onnx/model-io';
import { openSession, OrtHost, OrtSession, runSession } from '../../ts/onnx/ort-session';
import { rng } from '../helpers/random';

const random = (n: number, seed: number) => {
  const r = rng(seed);
  return Float32Array.from({ length: n }, () => r() - 0.5);
};

describe('onnxruntime sessions on a worker thread', () => {
  it("open without onnxruntime's CPU memory arena unless the caller's options ask for it, with its log quiet", async () => {
    const host = new OrtHost();
    const seen: Array<Record<string, unknown>> = [];
    const real = host.openSession.bind(host);
    host.openSession = (model, options, giveBytes) => (seen.push({ ...options }), real(model, options, giveBytes));
    try {
      const model = matMulFloatModel(2, 3, 4, random(12, 1));
      for (const options of [{}, { enableCpuMemArena: true }]) await (await openSession(model, options, 'the model', 'remedy', { host })).release();
    } finally {
      await host.close();
    }
    expect(seen).to.deep.equal([{ logSeverityLevel: 4, enableCpuMemArena: false }, { logSeverityLevel: 4, enableCpuMemArena: true }]);
  });

  it('give the same outputs as onnxruntime on the calling thread, from bytes (a Node Buffer too) or a file, and leave the caller\'s data alone', async () => {
    const [m, k, n] = [5, 33, 7];
    const model = matMulFloatModel(m, k, n, random(k * n, 1));
    const whole = random(3 * m * k, 2);
    const a = whole.subarray(m * k, 2 * m * k);  // a view into a larger buffer
    const O = ort();
    const want = (await (await O.InferenceSession.create(model)).run({ a: new O.Tensor('float32', a, [m, k]) })).y.data as Float32Array;

    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-ort-session-'));
    try {
      const file = path.join(dir, 'matmul.onnx');
      fs.writeFileSync(file, model);
      const buffer = fs.readFileSync(file);  // a Buffer: its slice() is a view, so copying it needs care
      for (const source of [model, buffer, file]) {
        const session = await OrtSession.open(source, {});
        try {
          expect(session.inputNames).to.deep.equal(['a']);
          expect(session.outputNames).to.deep.equal(['y']);
          const out = await session.run({ a: new O.Tensor('float32', a, [m, k]) });
          expect(out.y).to.be.instanceOf(O.Tensor);
          expect(out.y.dims).to.deep.equal([m, n]);
          expect([...(out.y.data as Float32Array)]).to.deep.equal([...want]);
        } finally {
          await session.release();
        }
      }
      expect(model.byteLength, 'model bytes still attached').to.be.greaterThan(0);
      expect(buffer.byteLength, 'Buffer still attached').to.equal(model.byteLength);
      expect(whole.byteLength, 'feed buffer still attached').to.equal(3 * m * k * 4);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('take model bytes in shared memory, and feeds of every element type onnxruntime returns', async () => {
    const model = matMulFloatModel(2, 3, 4, random(12, 10));
    const shared = new Uint8Array(new SharedArrayBuffer(model.byteLength));
    shared.set(model);
    const session = await OrtSession.open(shared, {});
    try {
      const out = await session.run({ a: { type: 'float32', data: random(6, 11), dims: [2, 3] } });
      expect(out.y.dims).to.deep.equal([2, 4]);
    } finally {
      await session.release();
    }
    expect(shared.byteLength, 'shared bytes untouched').to.equal(model.byteLength);
  });

  it('given bytes made for them (giveBytes), take their buffer instead of copying it', async () => {
    const model = matMulFloatModel(2, 3, 4, random(12, 3));
    const session = await OrtSession.open(model, {}, true);
    await session.release();
    expect(model.byteLength, 'the bytes moved to the worker').to.equal(0);
  });

  it('share one host thread, which close() ends with whatever is still open', async () => {
    const O = ort();
    const host = new OrtHost();
    await host.close();  // never started: nothing to do
    const other = new OrtHost();
    const [m, k, n] = [3, 4, 5];
    const [b1, b2] = [random(k * n, 7), random(k * n, 8)];
    const a = new O.Tensor('float32', random(m * k, 9), [m, k]);
    const first = await other.openSession(matMulFloatModel(m, k, n, b1), {});
    const second = await other.openSession(matMulFloatModel(m, k, n, b2), {});
    const want = async (b: Float32Array) => [...((await (await O.InferenceSession.create(matMulFloatModel(m, k, n, b))).run({ a })).y.data as Float32Array)];
    expect([...((await first.run({ a })).y.data as Float32Array)]).to.deep.equal(await want(b1));
    expect([...((await second.run({ a })).y.data as Float32Array)]).to.deep.equal(await want(b2));
    await first.release();
    await first.release();  // twice is harmless
    expect([...((await second.run({ a })).y.data as Float32Array)], 'the other session still runs').to.deep.equal(await want(b2));
    await second.release();
    const third = await other.openSession(matMulFloatModel(m, k, n, b2), {});
    expect([...((await third.run({ a })).y.data as Float32Array)], 'a session opened after others were released').to.deep.equal(await want(b2));
    await other.close();
    try {
      await third.run({ a });
      expect.fail('a session of a closed host ran');
    } catch (e) {
      expect((e as Error).message).to.match(/host was closed/);
    }
    await third.release();  // after close: nothing left to do
    try {
      await other.openSession(matMulFloatModel(m, k, n, b1), {});
      expect.fail('a closed host opened a session');
    } catch (e) {
      expect((e as Error).message).to.match(/host was closed/);
    }
  });

  it('leave the event loop turning while the model runs', async () => {
    // One MatMul of 192x1024 by 1024x1024 (0.2 G multiply-adds, single-threaded): run on the calling thread it holds
    // the loop for its whole duration, so no turn at all could happen while the run is pending.
    const [m, k, n] = [192, 1024, 1024];
    const session = await OrtSession.open(matMulFloatModel(m, k, n, random(k * n, 4)), { intraOpNumThreads: 1 });
    try {
      const a = new (ort().Tensor)('float32', random(m * k, 5), [m, k]);
      let done = false;
      let turns = 0;
      const spin = () => {
        if (done) return;
        turns++;
        setImmediate(spin);
      };
      setImmediate(spin);
      const runs = await (async () => {
        let count = 0;
        for (; count < 3; count++) await session.run({ a });
        return count;
      })();
      done = true;
      expect(runs).to.equal(3);
      expect(turns, 'event loop turns while three runs were pending').to.be.greaterThan(10);
    } finally {
      await session.release();
    }
  });

  it('report what onnxruntime refuses as an OnnxModelError, and refuse work after release', async () => {
    const bad = new Uint8Array([8, 7, 18, 3, 1, 2]);
    try {
      await openSession(bad, {}, 'the test model', 'Fix it.');
      expect.fail('a model onnxruntime cannot parse was opened');
    } catch (e) {
      expect(e).to.be.instanceOf(OnnxModelError);
      expect((e as Error).message).to.match(/^onnxruntime cannot load the test model: .+\. Fix it\.$/);
    }
    const session = await openSession(matMulFloatModel(2, 3, 4, random(12, 6)), {}, 'the test model', 'Fix it.');
    try {
      await runSession(session, { a: { type: 'float32', data: new Float32Array(5), dims: [1, 5] } }, undefined, 'the test model on feed 0', 'Check the feed.');
      expect.fail('a feed of the wrong shape ran');
    } catch (e) {
      expect(e).to.be.instanceOf(OnnxModelError);
      // The detail lines too: which indices got which size.
      expect((e as Error).message).to.match(/^onnxruntime could not run the test model on feed 0: .*invalid dimensions.*; index: 0 Got: 1 Expected: 2; index: 1 Got: 5 Expected: 3\. Check the feed\.$/);
    }
    await session.release();
    try {
      await session.run({ a: { type: 'float32', data: new Float32Array(6), dims: [2, 3] } });
      expect.fail('a released session ran');
    } catch (e) {
      expect((e as Error).message).to.match(/host was closed/);
    }
  });

  it('settle every pending request when the host closes, and keep transport errors apart from model errors', async () => {
    const O = ort();
    const [m, k, n] = [192, 1024, 1024];
    const host = new OrtHost();
    const session = await host.openSession(matMulFloatModel(m, k, n, random(k * n, 12)), { intraOpNumThreads: 1 });
    const pending = session.run({ a: new O.Tensor('float32', random(m * k, 13), [m, k]) });
    const closing = host.close();
    try {
      await pending;  // either it finished before the thread ended or it is rejected: never left hanging
    } catch (e) {
      expect((e as Error).message).to.match(/host was closed/);
    }
    await closing;
    try {
      await runSession(session, { a: new O.Tensor('float32', random(m * k, 13), [m, k]) }, undefined, 'the test model', 'Fix it.');
      expect.fail('a session of a closed host ran');
    } catch (e) {
      expect(e, 'a closed host is not the model\'s fault').not.to.be.instanceOf(OnnxModelError);
      expect((e as Error).message).to.equal('the onnxruntime host was closed (while running the test model)');
    }
    // A released session of a host that stays open: a clear error, and no thread started for it.
    const other = new OrtHost();
    const kept = await other.openSession(matMulFloatModel(2, 3, 4, random(12, 14)), {});
    const released = await other.openSession(matMulFloatModel(2, 3, 4, random(12, 15)), {});
    await released.release();
    try {
      await released.run({ a: { type: 'float32', data: new Float32Array(6), dims: [2, 3] } });
      expect.fail('a released session ran');
    } catch (e) {
      expect((e as Error).message).to.match(/was released/);
    }
    await kept.release();
    await other.close();
    expect((other as unknown as { worker?: unknown }).worker, 'no thread left').to.equal(undefined);
  });

  it('close without hanging when the thread has died, and refuse work after', async () => {
    const host = new OrtHost();
    const session = await host.openSession(matMulFloatModel(2, 3, 4, random(12, 16)), {});
    const worker = (host as unknown as { worker: { terminate(): Promise<number>; once(e: string, f: () => void): void } }).worker;
    const exited = new Promise<void>((resolve) => worker.once('exit', resolve));
    await worker.terminate();  // as if the thread had crashed
    await exited;
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<string>((resolve) => (timer = setTimeout(() => resolve('close() hung'), 10_000)));
    expect(await Promise.race([host.close().then(() => 'closed'), late])).to.equal('closed');
    clearTimeout(timer);
    try {
      await session.run({ a: { type: 'float32', data: new Float32Array(6), dims: [2, 3] } });
      expect.fail('a session of a dead thread ran');
    } catch (e) {
      expect((e as Error).message).to.match(/worker thread stopped/);
    }
  });

  it('need onnxruntime-node 1.30 or a later 1.x (older ones abort the process on worker threads), and say so', () => {
    for (const ok of ['1.30.0', '1.30.1', '1.31.0', '1.40.2-dev']) expect(ortVersionProblem(ok), ok).to.equal(undefined);
    for (const old of ['1.21.0', '1.29.9', '2.0.0', '0.9.0']) {
      expect(ortVersionProblem(old), old).to.match(new RegExp(`needs onnxruntime-node 1\\.30 or a later 1\\.x, but ${old.replace(/\./g, '\\.')} is installed: npm install onnxruntime-node@\\^1\\.30\\.0`));
    }
    expect(ortVersionProblem(require('onnxruntime-node/package.json').version), 'the installed one').to.equal(undefined);
  });

  it('without onnxruntime-node installed: a typed error that says what needs it and how to install it; weight-only runs go on unevaluated', () => {
    // A preload hides onnxruntime-node from require, as in a project that did not install the optional peer dependency.
    const hide = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-no-ort-')), 'hide-ort.js');
    fs.writeFileSync(hide, `const Module = require('module');
      const resolve = Module._resolveFilename;
      Module._resolveFilename = function (request, ...rest) {
        if (request === 'onnxruntime-node' || request.startsWith('onnxruntime-node/')) throw Object.assign(new Error("Cannot find module '" + request + "'"), { code: 'MODULE_NOT_FOUND' });
        return resolve.call(this, request, ...rest);
      };`);
    const root = path.join(__dirname, '../../..');
    const cli = path.join(root, 'dist', 'ts', 'cli.js');
    const cwd = path.dirname(hide);
    try {
      // The CLI's one-command example calibrates, so it needs onnxruntime: one clear line, exit code 1, no file.
      const tryIt = spawnSync(process.execPath, ['--require', hide, cli, 'quantize'], { cwd, encoding: 'utf8', timeout: 120_000 });
      expect(tryIt.status, tryIt.stderr).to.equal(1);
      expect(tryIt.stderr).to.match(/^lowbit: lowbit runs models \(calibration, evaluation, distillation, fine-tuning\) in onnxruntime-node, an optional peer dependency that is not installed/m);
      expect(tryIt.stderr).to.contain('npm install onnxruntime-node@^1.30.0');
      expect(tryIt.stderr).to.contain('Weight-only quantization');
      expect(fs.existsSync(path.join(cwd, 'mnist-cnn.q.onnx'))).to.equal(false);
      // The API: an OnnxruntimeMissingError (exported) from a calibrated call; a weight-only call writes its model.
      const script = `
        const { quantizeModel, OnnxruntimeMissingError } = require(${JSON.stringify(path.join(root, 'dist', 'ts', 'index.js'))});
        const model = ${JSON.stringify(path.join(root, 'assets', 'mnist-cnn.onnx'))};
        (async () => {
          const calibration = [{ input: { data: new Float32Array(784), dims: [1, 1, 28, 28] } }];
          const error = await quantizeModel(model, { weights: { bits: 8 }, activations: { bits: 8, method: 'minmax' }, calibration }).catch((e) => e);
          console.log(error instanceof OnnxruntimeMissingError, error.name);
          const { model: bytes, report } = await quantizeModel(model, { weights: { bits: 8 } });
          console.log(bytes.length > 0, report.layers.length, report.evaluationSkipped);
          // Feeds given to evaluate on ask for the evaluation: the error, not a silent skip.
          const asked = await quantizeModel(model, { weights: { bits: 8 }, evaluationFeeds: calibration }).catch((e) => e);
          console.log(asked instanceof OnnxruntimeMissingError, asked.notInstalled);
        })();`;
      const api = spawnSync(process.execPath, ['--require', hide, '-e', script], { cwd, encoding: 'utf8', timeout: 120_000 });
      expect(api.status, api.stderr).to.equal(0);
      expect(api.stdout.split('\n')).to.deep.equal(['true OnnxruntimeMissingError',
        'true 3 onnxruntime-node (an optional peer dependency) is not installed: install it to compare the quantized model with the float one',
        'true true', '']);
      // Installed (its package.json found) but failing to load: said so, not "not installed".
      fs.writeFileSync(hide, `const Module = require('module');
        const load = Module._load;
        Module._load = function (request, ...rest) {
          if (request === 'onnxruntime-node') throw new Error('libonnxruntime.so.1: cannot open shared object file');
          return load.call(this, request, ...rest);
        };`);
      const broken = spawnSync(process.execPath, ['--require', hide, '-e', script.replace("console.log(error instanceof OnnxruntimeMissingError, error.name);",
        "console.log(error instanceof OnnxruntimeMissingError, error.message);")], { cwd, encoding: 'utf8', timeout: 120_000 });
      expect(broken.status, broken.stderr).to.equal(0);
      const lines = broken.stdout.split('\n');
      expect(lines[0]).to.match(/^true onnxruntime-node 1\.\d+\.\d+ is installed but does not load \(libonnxruntime\.so\.1: cannot open shared object file\): reinstall it/);
      expect(lines[1]).to.match(/^true 3 onnxruntime-node cannot be used, so the quantized model was not compared with the float one: onnxruntime-node 1\.\d+\.\d+ is installed but does not load/);
      expect(lines[2]).to.equal('true false');
    } finally {
      fs.rmSync(cwd, { recursive: true, force: true });
    }
  });

  it('never keep the process alive when left open idle', () => {
    // A process that opens a session and forgets to release it must still exit on its own.
    const script = `
      const { OrtSession } = require(${JSON.stringify(path.join(__dirname, '../../ts/onnx/ort-session.js'))});
      const { matMulFloatModel } = require(${JSON.stringify(path.join(__dirname, '../../ts/bench/ort-models.js'))});
      OrtSession.open(matMulFloatModel(2, 3, 4, new Float32Array(12)), {}).then(async (s) => {
        const out = await s.run({ a: { type: 'float32', data: new Float32Array(6), dims: [2, 3] } });
        console.log('ran', out.y.dims.join('x'));
      });`;
    const stdout = execFileSync(process.execPath, ['-e', script], { timeout: 60_000, encoding: 'utf8' });
    expect(stdout.trim()).to.equal('ran 2x4');
  });
});
