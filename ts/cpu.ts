/** CPU features and kernel choices, for diagnostics, tests and benchmarks. */
import { invalidValue } from './errors';
import { native } from './native';

export interface CpuInfo {
  /** 'x86_64', 'aarch64' or 'other'. */
  arch: string;
  /** Instruction sets usable here (CPU support and OS support both checked). */
  features: Record<string, boolean>;
  /** Per operation, the kernels usable on this CPU, best first. */
  kernels: { quantize: string[]; gemm: string[]; sgemm: string[] };
  /** The GEMM kernels usable on this CPU, best first (same as kernels.gemm). */
  gemmKernels: string[];
  /** The float32 SGEMM kernels (training engine) usable on this CPU, best first (same as kernels.sgemm). */
  sgemmKernels: string[];
  /** The SGEMM kernel a call gets without an explicit kernel (null when LOWBIT_KERNEL is unusable). */
  selectedSgemmKernel: string | null;
  /** Per operation, the kernel a call gets without `options.kernel` (null when LOWBIT_KERNEL is unusable). */
  selected: { quantize: string | null; gemm: string | null };
  /** Value of LOWBIT_KERNEL when the addon loaded, if set. */
  kernelOverride: string | null;
  /** Why LOWBIT_KERNEL cannot be honoured, if it cannot (the first operation's reason). */
  kernelOverrideError: string | null;
  /** Per operation, why LOWBIT_KERNEL cannot be honoured for it (absent where it can). */
  kernelOverrideErrors: { quantize?: string; gemm?: string; sgemm?: string };
  /** Threads the native pool uses by default (all cores). */
  maxThreads: number;
}

let cached: CpuInfo | undefined;

/**
 * Detected CPU features and the kernel chosen for each operation.
 * @example
 * cpuInfo().kernels.quantize  // e.g. ['avx512', 'avx2', 'scalar']
 */
export function cpuInfo(): CpuInfo {
  if (!cached) {
    const raw = native().cpuInfo();
    cached = {
      arch: raw.arch,
      features: { ...raw.features },
      kernels: { quantize: raw.quantizeKernels.slice(), gemm: raw.gemmKernels.slice(), sgemm: raw.sgemmKernels.slice() },
      gemmKernels: raw.gemmKernels.slice(),
      sgemmKernels: raw.sgemmKernels.slice(),
      selectedSgemmKernel: raw.selectedSgemmKernel,
      selected: { quantize: raw.selectedQuantizeKernel, gemm: raw.selectedGemmKernel },
      kernelOverride: raw.kernelOverride,
      kernelOverrideError: raw.kernelOverrideError,
      kernelOverrideErrors: { ...raw.kernelOverrideErrors },
      maxThreads: raw.maxThreads,
    };
  }
  return {
    ...cached,
    features: { ...cached.features },
    kernels: { quantize: cached.kernels.quantize.slice(), gemm: cached.kernels.gemm.slice(), sgemm: cached.kernels.sgemm.slice() },
    gemmKernels: cached.gemmKernels.slice(),
    sgemmKernels: cached.sgemmKernels.slice(),
    selected: { ...cached.selected },
    kernelOverrideErrors: { ...cached.kernelOverrideErrors },
  };
}

/** Checks `options.kernel` for an operation: '' (automatic) or a kernel usable here. */
export function checkKernel(operation: 'quantize' | 'gemm' | 'sgemm', kernel: unknown): string {
  if (kernel === undefined) {
    // Only this operation's own problem with LOWBIT_KERNEL stops it ('gemm:neon' on x86 leaves quantizing alone).
    const problem = cpuInfo().kernelOverrideErrors[operation];
    if (problem) throw new RangeError(problem);
    return '';
  }
  const usable = cpuInfo().kernels[operation];
  if (typeof kernel !== 'string' || !usable.includes(kernel)) {
    const known = operation !== 'gemm'
      ? ['avx512', 'avx2', 'scalar']
      : ['amx', 'avx512vnni', 'avxvnni', 'avx2', 'portable', 'neondot', 'neon', 'scalar'];
    const why = typeof kernel === 'string' && known.includes(kernel)
      ? `This CPU does not support '${kernel}'.`
      : 'Leave it unset to use the best one.';
    throw invalidValue('options.kernel', `one of ${usable.map((k) => `'${k}'`).join(', ')}`, kernel, why);
  }
  return kernel;
}
