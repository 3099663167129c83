import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';

import { cpuInfo, quantizeTensor } from '../../ts';

const entry = path.resolve(__dirname, '..', '..', 'ts', 'index.js');

function inChild(env: Record<string, string>, code: string): { stdout: string; stderr: string; status: number | null } {
  const r = spawnSync(process.execPath, ['-e', `const lowbit = require(${JSON.stringify(entry)}); ${code}`], {
    encoding: 'utf8', env: { ...process.env, ...env },
  });
  return { stdout: r.stdout, stderr: r.stderr, status: r.status };
}

describe('cpuInfo and kernel selection', () => {
  it('lists the detected features and usable kernels, best first, ending with scalar', () => {
    const info = cpuInfo();
    expect(info.arch).to.be.oneOf(['x86_64', 'aarch64', 'other']);
    const q = info.kernels.quantize;
    expect(q[q.length - 1]).to.equal('scalar');
    if (info.arch === 'x86_64') {
      expect(q.includes('avx2')).to.equal(info.features.avx2);
      expect(q.includes('avx512')).to.equal(info.features.avx512f && info.features.avx512bw && info.features.avx512vl && info.features.avx512dq);
    }
    expect(info.maxThreads).to.be.at.least(1);
    // Without LOWBIT_KERNEL (unset in a child, whatever this process has), the best kernel is selected.
    const unforced = spawnSync(process.execPath, ['-e', `console.log(JSON.stringify(require(${JSON.stringify(entry)}).cpuInfo().selected))`], {
      encoding: 'utf8', env: Object.fromEntries(Object.entries(process.env).filter(([k]) => k !== 'LOWBIT_KERNEL')),
    });
    expect(JSON.parse(unforced.stdout)).to.deep.equal({ quantize: q[0], gemm: info.kernels.gemm[0] });
  });

  it('LOWBIT_KERNEL forces a kernel for calls without options.kernel', () => {
    const r = inChild({ LOWBIT_KERNEL: 'scalar' }, 'console.log(JSON.stringify(lowbit.cpuInfo().selected))');
    expect(r.status, r.stderr).to.equal(0);
    expect(JSON.parse(r.stdout)).to.deep.equal({ quantize: 'scalar', gemm: 'scalar' });
    // Per operation: quantize forced to its second-best kernel (scalar where it is the only one), gemm left at its best.
    const q = cpuInfo().kernels.quantize;
    const forced = q[Math.min(1, q.length - 1)];
    const perOp = inChild({ LOWBIT_KERNEL: `quantize:${forced}` }, 'console.log(JSON.stringify(lowbit.cpuInfo().selected))');
    expect(perOp.status, perOp.stderr).to.equal(0);
    expect(JSON.parse(perOp.stdout)).to.deep.equal({ quantize: forced, gemm: cpuInfo().kernels.gemm[0] });
  });

  it('an unusable LOWBIT_KERNEL is a clear error on use, naming the variable and the choices', () => {
    const bogus = inChild({ LOWBIT_KERNEL: 'bogus' },
      'try { lowbit.quantizeTensor(new Float32Array(2), { shape: [2] }); } catch (e) { console.log(e.message); }');
    expect(bogus.stdout).to.match(/LOWBIT_KERNEL names 'bogus', which is no kernel of any operation/);
    const missing = cpuInfo().arch === 'x86_64' ? 'neon' : 'avx2';
    const r = inChild({ LOWBIT_KERNEL: `gemm:${missing}` },
      'try { lowbit.matmulInt8(new Int8Array(1), new Int8Array(1), 1, 1, 1); } catch (e) { console.log(e.message); }');
    expect(r.stdout).to.match(new RegExp(`LOWBIT_KERNEL asks for gemm kernel '${missing}', which this CPU \\(or build\\) does not support. Use one of: .*scalar`));
  });

  it("a LOWBIT_KERNEL one operation cannot honour stops only that operation's calls (a RangeError); empty or repeated entries are errors", () => {
    // A GEMM kernel name this CPU lacks that names no quantize kernel.
    const missing = cpuInfo().arch === 'x86_64' ? 'neon' : 'avx512vnni';
    const calls = `
      for (const [op, f] of [['quantize', () => lowbit.quantizeTensor(new Float32Array(2), { shape: [2] })], ['gemm', () => lowbit.matmulInt8(new Int8Array(1), new Int8Array(1), 1, 1, 1)]]) {
        try { f(); console.log(op, 'ran'); } catch (e) { console.log(op, e.name, e.message); }
      }`;
    for (const value of [`gemm:${missing}`, missing]) {
      const lines = inChild({ LOWBIT_KERNEL: value }, calls).stdout.trim().split('\n');
      expect(lines[0], value).to.equal('quantize ran');
      expect(lines[1], value).to.match(new RegExp(`^gemm RangeError LOWBIT_KERNEL asks for gemm kernel '${missing}'`));
    }
    const empty = inChild({ LOWBIT_KERNEL: 'quantize:' }, calls).stdout;
    expect(empty).to.contain("quantize RangeError LOWBIT_KERNEL has an entry 'quantize:' without a kernel name. Fix or unset LOWBIT_KERNEL.");
    const twice = inChild({ LOWBIT_KERNEL: 'quantize:avx2,quantize:scalar' }, calls).stdout;
    expect(twice).to.contain("quantize RangeError LOWBIT_KERNEL names the operation 'quantize' twice ('avx2' and 'scalar'). Fix or unset LOWBIT_KERNEL.");
    const trailing = inChild({ LOWBIT_KERNEL: 'gemm:scalar,' }, calls).stdout;
    expect(trailing).to.contain("gemm RangeError LOWBIT_KERNEL has an empty entry ('gemm:scalar,'). Fix or unset LOWBIT_KERNEL.");
    // finetune with quantizers checks the quantize kernel before loading anything.
    const finetune = inChild({ LOWBIT_KERNEL: 'quantize:nope' },
      `lowbit.finetune(${JSON.stringify(path.resolve(__dirname, '..', '..', '..', 'assets', 'mnist-cnn.onnx'))}, { inputs: { data: new Float32Array(784), dims: [1, 1, 28, 28] }, labels: Int32Array.of(1) }, { method: 'lsq' })
        .then(() => console.log('trained'), (e) => console.log(e.name, e.message))`).stdout;
    expect(finetune).to.match(/^RangeError LOWBIT_KERNEL asks for quantize kernel 'nope'/);
  });

  it('forcing a kernel the CPU lacks is a clear error', () => {
    const missing = ['avx512', 'avx2'].find((k) => !cpuInfo().kernels.quantize.includes(k));
    expect(() => quantizeTensor(new Float32Array(1), { shape: [1], kernel: missing ?? 'neon' })).to.throw(RangeError, /options\.kernel/);
  });
});
