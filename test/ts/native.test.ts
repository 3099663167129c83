// Runs the C++ kernel test binary (test/native/) and turns each of its cases
// into a mocha test, so `npm test` reports native and TypeScript results together.
import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { loadBinding, NativeLoadError } from '../../ts/native';

const binary = path.resolve(__dirname, '..', '..', '..', 'build', 'Release', 'lowbit_native_tests');

describe('native kernel tests (build/Release/lowbit_native_tests)', () => {
  it('the test binary was built by npm install', () => {
    expect(fs.existsSync(binary), `${binary} is missing: run npm install (or npm run build:native)`).to.equal(true);
  });
  if (!fs.existsSync(binary)) return;
  const run = spawnSync(binary, [], { encoding: 'utf8', timeout: 300_000 });
  const lines = (run.stdout ?? '').split('\n');
  const cases = lines.filter((l) => /^(ok |FAIL |skipped: )/.test(l));

  it('ran to completion with a summary line and exit code 0 when nothing failed', () => {
    const summary = lines.find((l) => /^native: \d+ passed, \d+ failed/.test(l));
    expect(summary, `no summary line; stderr: ${run.stderr}; signal: ${run.signal}`).to.be.a('string');
    const failed = cases.filter((l) => l.startsWith('FAIL ')).length;
    expect(run.status).to.equal(failed === 0 ? 0 : 1);
    expect(cases.length).to.be.greaterThan(10);
  });

  for (const line of cases) {
    if (line.startsWith('skipped: ')) {
      // Pending, with the reason in the title ("skipped: <case>: no AVX-512 ...").
      it(line);
    } else if (line.startsWith('ok ')) {
      it(line.slice(3), () => undefined);
    } else {
      const [name, ...why] = line.slice(5).split(': ');
      it(name, () => expect.fail(why.join(': ')));
    }
  }
});

describe('instruction-set objects (build/CMakeFiles/lowbit_kernels.dir/cpp/src/x86, arm)', () => {
  // An inline function compiled into an AVX-512 object is a weak symbol the linker may hand to the baseline code
  // too (an illegal instruction on older CPUs): the kernels' objects must define none.
  const objects = ['x86', 'arm'].flatMap((dir) => {
    const folder = path.resolve(__dirname, '..', '..', '..', 'build', 'CMakeFiles', 'lowbit_kernels.dir', 'cpp', 'src', dir);
    return fs.existsSync(folder) ? fs.readdirSync(folder).filter((f) => f.endsWith('.o')).map((f) => path.join(folder, f)) : [];
  });
  const nm = spawnSync('nm', ['--version'], { encoding: 'utf8' });
  if (nm.error) {
    it('skipped: no nm (binutils) to list the objects\' symbols');
    return;
  }
  if (objects.length === 0 && fs.existsSync(binary)) {
    it('skipped: the kernels were built elsewhere (no build/CMakeFiles objects next to the test binary)');
    return;
  }
  it('were built (one per kernel file)', () => expect(objects.length).to.be.greaterThan(1));
  for (const object of objects) {
    it(`${path.basename(object)} defines no weak or unique symbols`, () => {
      const run = spawnSync('nm', ['--defined-only', '-C', object], { encoding: 'utf8' });
      expect(run.status, run.stderr).to.equal(0);
      const shared = run.stdout.split('\n').filter((l) => /^\S*\s+[WVu]\s/.test(l));
      expect(shared, 'weak definitions (inline functions or templates): make them static or use builtins').to.deep.equal([]);
    });
  }
});

describe('loading the addon (LOWBIT_NATIVE_PATH when set, else build/Release/lowbit.node)', () => {
  const built = path.resolve(__dirname, '..', '..', '..', 'build', 'Release', 'lowbit.node');
  const nativeModule = path.resolve(__dirname, '..', '..', 'ts', 'native.js');

  it('a file that loads but is not the addon, or lacks some of its functions, is passed over with the reason, not used', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-native-'));
    try {
      const json = path.join(dir, 'not-an-addon.json');
      fs.writeFileSync(json, '{"name": "x"}');
      const partial = path.join(dir, 'older.js');
      // The built addon without two functions, as one built before they were added.
      fs.writeFileSync(partial, `module.exports = { ...require(${JSON.stringify(built)}) };\n` +
        'delete module.exports.gptqRoundBlock;\ndelete module.exports.firstCodeOutside;\n');
      let error: unknown;
      try {
        loadBinding([json, partial, path.join(dir, 'missing.node')]);
      } catch (e) {
        error = e;
      }
      expect(error).to.be.instanceOf(NativeLoadError);
      const message = (error as Error).message;
      expect(message).to.include(`tried ${json}: it loads, but is not lowbit's addon (none of its functions)`);
      expect(message).to.include(`tried ${partial}: a lowbit addon built from other sources: it lacks firstCodeOutside, gptqRoundBlock`);
      expect(message).to.include(`tried ${path.join(dir, 'missing.node')}: no such file`);
      // The next file that is the addon is used.
      expect(loadBinding([json, built]).cpuInfo().arch).to.be.a('string');
    } finally {
      fs.rmSync(dir, { recursive: true });
    }
  });

  it('LOWBIT_NATIVE_PATH, when set, is the only file tried (relative to the working directory): no silent fallback to build/Release', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-native-'));
    try {
      // The built addon with one function changed, to tell it from build/Release's.
      fs.writeFileSync(path.join(dir, 'chosen.js'), `module.exports = { ...require(${JSON.stringify(built)}), cpuInfo: () => ({ arch: 'chosen' }) };\n`);
      const load = (chosen: string) => spawnSync(process.execPath, ['-e', `process.stdout.write(require(${JSON.stringify(nativeModule)}).native().cpuInfo().arch)`],
        { cwd: dir, env: { ...process.env, LOWBIT_NATIVE_PATH: chosen }, encoding: 'utf8' });
      const missing = load('missing.node');
      expect(missing.status).to.equal(1);
      expect(missing.stderr).to.include(`tried ${path.join(fs.realpathSync(dir), 'missing.node')} (LOWBIT_NATIVE_PATH): no such file`);
      expect(missing.stderr).to.include('point LOWBIT_NATIVE_PATH at a lowbit.node built for this platform, or unset it');
      expect(missing.stderr).to.not.include('build/Release');
      const relative = load('chosen.js');
      expect(relative.status, relative.stderr).to.equal(0);
      expect(relative.stdout).to.equal('chosen');
    } finally {
      fs.rmSync(dir, { recursive: true });
    }
  });
});
