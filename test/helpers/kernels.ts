/** The kernels a test loops over, and a "skipped" line for each one this CPU cannot run (never a silent pass). */
import { cpuInfo } from '../../ts';

/** The x86 kernels of each operation and what they need. */
const NEEDS = {
  quantize: { avx512: 'AVX-512 (F, BW, VL, DQ)', avx2: 'AVX2' },
  gemm: { amx: 'AMX (verified by the self-test)', avx512vnni: 'AVX-512 VNNI', avxvnni: 'AVX-VNNI', avx2: 'AVX2' },
} as const;

/** Kernels a compiler may leave out (CMakeLists.txt checks its flags), with the CPU features that would run them. */
const OPTIONAL_BUILDS: Record<string, string[]> = { avxvnni: ['avx2', 'avxvnni'], amx: ['amxInt8', 'amxPermitted'] };  // (amxVerified needs the kernel built)

/**
 * Registers a pending test "skipped: <what> <kernel> kernel: no <ISA> on this CPU" for each x86 kernel of
 * `operation` (or just `only`) this CPU lacks; call it inside the describe whose tests loop over the usable kernels.
 */
export function reportMissingKernels(operation: keyof typeof NEEDS, what: string, only?: string[]): void {
  if (cpuInfo().arch !== 'x86_64') return;
  const needs: Record<string, string> = NEEDS[operation];
  for (const kernel of Object.keys(needs).filter((k) => (!only || only.includes(k)) && !cpuInfo().kernels[operation].includes(k))) {
    const cpuHasIt = OPTIONAL_BUILDS[kernel]?.every((f) => cpuInfo().features[f]);
    const orFailed = kernel === 'amx' ? ', or its self-test failed here' : '';
    it(cpuHasIt ? `skipped: ${what} ${kernel} kernel: not built (the compiler lacked its flags; see npm install's warnings)${orFailed}`
      : `skipped: ${what} ${kernel} kernel: no ${needs[kernel]} on this CPU`);
  }
}
