// Runs the C++ kernel test binary (test/native/) and turns each of its cases
// into a mocha test, so `npm test` reports native and TypeScript results together.
import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

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
