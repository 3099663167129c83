/**
 * GEMM throughput (GOPS = 2·m·k·n / s) of every lowbit kernel path against
 * onnxruntime-node's MatMulInteger (u8s8, s8s8), MatMul (fp32) and
 * MatMulNBits (4-bit weights), on the same shapes, one process per case and
 * round: the cases of a shape and thread count run in interleaved rounds, so a machine whose
 * speed drifts (shared hosts) slows every case of a round alike, and each
 * ratio is the median of its per-round ratios.
 * B is a constant in every case: packMatrix / packInt4Matrix for lowbit, an
 * initializer (pre-packed at session creation) for onnxruntime. Both write
 * into an output allocated once (a preallocated fetch for onnxruntime), and
 * the integer outputs of the same A and B are compared across implementations.
 */
import { cpuInfo } from '../cpu';
import { matmulInt4, matmulInt8, packInt4Matrix, packMatrix } from '../gemm';
import { quantizeTensor } from '../quantize';
import { checkInteger } from '../validate';
import { hasOrt, matMulFloatModel, matMulIntegerModel, matMulNBitsModel, ort, session } from './ort-models';
import { bytesOf, digestOf, inChildProcessJson, measure, median, runsFor, table } from './timing';

export const DEFAULT_GEMM_SHAPES: Array<[number, number, number]> = [
  [1, 4096, 4096], [16, 4096, 4096], [128, 1024, 1024], [256, 256, 256], [1024, 1024, 1024], [2048, 2048, 2048],
];

export interface GemmCase {
  /** lowbit-w4a8 takes uint8 activations; lowbit-w4a8-float quantizes float ones first, as MatMulNBits does. */
  impl: 'lowbit' | 'lowbit-w4a8' | 'lowbit-w4a8-float' | 'ort-u8s8' | 'ort-s8s8' | 'ort-fp32' | 'ort-nbits';
  kernel?: string;
  aSigned?: boolean;
  m: number;
  k: number;
  n: number;
  threads: number;
  /** Timed milliseconds to aim at (after setup and a probe run); default 1500. */
  budgetMs?: number;
}

const NBITS_BLOCK = 32;

function randomBytes(n: number, signed: boolean, seed: number): Int8Array | Uint8Array {
  const out = signed ? new Int8Array(n) : new Uint8Array(n);
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = (s >>> 24) - (signed ? 128 : 0);
  }
  return out;
}

function randomFloats(n: number, seed: number): Float32Array {
  const bytes = randomBytes(n, true, seed);
  return Float32Array.from(bytes, (v) => v / 128);
}

/** A case's median milliseconds and a digest of its output (equal digests: equal outputs). */
export interface GemmCaseResult {
  ms: number;
  outputDigest: string;
}

/** Runs one case in this process. */
export async function runGemmCase(c: GemmCase): Promise<GemmCaseResult> {
  const { m, k, n, threads } = c;
  let fn: () => unknown;
  let out: Int32Array | Float32Array;
  switch (c.impl) {
    case 'lowbit': {
      const a = randomBytes(m * k, c.aSigned ?? false, 1);
      const b = packMatrix(randomBytes(k * n, true, 2) as Int8Array, k, n);
      const o = (out = new Int32Array(m * n));
      fn = () => matmulInt8(a, b, m, k, n, { kernel: c.kernel, threads, out: o });
      break;
    }
    case 'lowbit-w4a8':
    case 'lowbit-w4a8-float': {
      const q = quantizeTensor(randomFloats(k * n, 2), { shape: [k, n], bits: 4, granularity: 'block', axis: 0, blockSize: NBITS_BLOCK });
      const b = packInt4Matrix(q);
      const o = (out = new Float32Array(m * n));
      if (c.impl === 'lowbit-w4a8') {
        const a = randomBytes(m * k, false, 1);
        fn = () => matmulInt4(a, b, m, k, n, { aScale: 0.01, aZeroPoint: 128, kernel: c.kernel, threads, out: o });
      } else {
        // Float activations: their range, uint8 quantization, then the int4 GEMM, all timed.
        const a = randomFloats(m * k, 1);
        const aq = new Uint8Array(m * k);
        fn = () => {
          const qa = quantizeTensor(a, { shape: [m, k], bits: 8, signed: false, threads, out: aq });
          return matmulInt4(aq, b, m, k, n, { aScale: qa.scale[0], aZeroPoint: qa.zeroPoint[0], kernel: c.kernel, threads, out: o });
        };
      }
      break;
    }
    default: {
      const O = ort();
      let model: Uint8Array;
      let feeds: Record<string, InstanceType<typeof O.Tensor>>;
      if (c.impl === 'ort-u8s8' || c.impl === 'ort-s8s8') {
        const signed = c.impl === 'ort-s8s8';
        model = matMulIntegerModel({ signed, m, k }, randomBytes(k * n, true, 2), n, 0, Int8Array.of(0));
        feeds = { a: new O.Tensor(signed ? 'int8' : 'uint8', randomBytes(m * k, signed, 1), [m, k]) };
        out = new Int32Array(m * n);
      } else if (c.impl === 'ort-fp32') {
        model = matMulFloatModel(m, k, n, randomFloats(k * n, 2));
        feeds = { a: new O.Tensor('float32', randomFloats(m * k, 1), [m, k]) };
        out = new Float32Array(m * n);
      } else {
        const blocks = Math.ceil(k / NBITS_BLOCK);
        const packed = randomBytes(n * blocks * (NBITS_BLOCK / 2), false, 2) as Uint8Array;
        const scales = Float32Array.from({ length: n * blocks }, () => 0.01);
        // accuracy_level 4: activations quantized to int8, the W4A8 path onnxruntime has.
        model = matMulNBitsModel(m, k, n, NBITS_BLOCK, packed, scales, 4);
        feeds = { a: new O.Tensor('float32', randomFloats(m * k, 1), [m, k]) };
        out = new Float32Array(m * n);
      }
      const s = await session(model, threads);
      // A preallocated fetch: onnxruntime writes into the same output every run, as lowbit does (it still returns
      // a copy of it, which every caller of onnxruntime-node gets).
      const fetches = { y: new O.Tensor(out instanceof Int32Array ? 'int32' : 'float32', out, [m, n]) };
      const returned = (await s.run(feeds, fetches)).y.data as Int32Array | Float32Array;
      if (!bytesOf(returned).equals(bytesOf(out))) {
        throw new Error(`onnxruntime did not write its result into the preallocated output (${c.impl})`);
      }
      fn = () => s.run(feeds, fetches);
    }
  }
  await fn();
  const outputDigest = digestOf(out);
  const probe = await measure(fn, 1, 0);
  return { ms: (await measure(fn, runsFor(probe.medianMs, c.budgetMs), 0)).medianMs, outputDigest };
}

export interface GemmBenchOptions {
  shapes: Array<[number, number, number]>;
  threads: number[];
  json: boolean;
  kernels?: string[];
  /** Interleaved rounds per shape (default 3): every case once per round, in reverse order every other round. */
  rounds?: number;
}


export async function benchGemm(opts: GemmBenchOptions): Promise<void> {
  const rounds = checkInteger('opts.rounds', opts.rounds ?? 3, 1, 1000);  // before any work: a median of no rounds would be NaN
  const info = cpuInfo();
  const kernels = opts.kernels ?? info.gemmKernels.filter((k) => k !== 'scalar' && k !== 'portable');
  const best = kernels[0];
  const ortAvailable = hasOrt();
  // Without VNNI onnxruntime's x86 u8s8 kernels add pairs of products in saturating int16 (vpmaddubsw), which these
  // full-range bytes can overflow: its outputs are compared with lowbit's only where it multiplies exactly.
  const ortExact = info.features.avx512vnni || info.features.avxvnni || info.features.neonDotprod;
  const rows: Array<Record<string, string | number | number[]>> = [];
  // Each case's median milliseconds per round, in round order.
  const perRound = new Map<string, number[]>();
  const key = (shape: string, impl: string, threads: number) => `${shape}|${impl}|${threads}`;
  for (const [m, k, n] of opts.shapes) {
    const shape = `${m}x${k}x${n}`;
    const ops = (2 * m * k * n) / 1e9;
    for (const threads of opts.threads) {
      const cases: Array<[string, GemmCase]> = [
        ...kernels.map((kernel): [string, GemmCase] => [`lowbit ${kernel} u8s8`, { impl: 'lowbit', kernel, m, k, n, threads }]),
        [`lowbit ${best} s8s8`, { impl: 'lowbit', kernel: best, aSigned: true, m, k, n, threads }],
        [`lowbit ${best} W4A8 (int4 weights)`, { impl: 'lowbit-w4a8', kernel: best, m, k, n, threads }],
        [`lowbit ${best} W4A8 from float activations`, { impl: 'lowbit-w4a8-float', kernel: best, m, k, n, threads }],
      ];
      if (ortAvailable) {
        cases.push(
          ['onnxruntime MatMulInteger u8s8', { impl: 'ort-u8s8', m, k, n, threads }],
          ['onnxruntime MatMulInteger s8s8', { impl: 'ort-s8s8', m, k, n, threads }],
          ['onnxruntime MatMul fp32', { impl: 'ort-fp32', m, k, n, threads }],
          ['onnxruntime MatMulNBits 4-bit', { impl: 'ort-nbits', m, k, n, threads }],
        );
      }
      // Output digest per A/B pair (u8s8 or s8s8): those cases compute the same integers. (The float cases' digests
      // are not compared: each W4A8 and fp32 case quantizes or rounds in its own way.)
      const digests = new Map<string, string>();
      const roundMs = new Map<string, number[]>(cases.map(([name]) => [name, []]));
      for (let round = 0; round < rounds; round++) {
        const order = round % 2 ? [...cases].reverse() : cases;
        for (const [name, c] of order) {
          const { ms, outputDigest } = inChildProcessJson<GemmCaseResult>({ bench: 'gemm', c: { ...c, budgetMs: 1500 / rounds } });
          const int8Pair = c.impl === 'lowbit' ? (c.aSigned ? 's8s8' : 'u8s8')
            : ortExact && c.impl === 'ort-u8s8' ? 'u8s8' : ortExact && c.impl === 'ort-s8s8' ? 's8s8' : undefined;
          if (int8Pair) {
            const first = digests.get(int8Pair);
            if (first === undefined) digests.set(int8Pair, outputDigest);
            else if (first !== outputDigest) throw new Error(`${shape} ${name} threads=${threads}: its int32 output differs from the first ${int8Pair} case's (same A and B)`);
          }
          roundMs.get(name)!.push(ms);
          if (!opts.json) process.stderr.write(`  round ${round + 1}/${rounds} ${shape} ${name} threads=${threads}: ${(ops / (ms / 1e3)).toFixed(1)} GOPS\n`);
        }
      }
      for (const [name] of cases) {
        const times = roundMs.get(name)!;
        const ms = median(times);
        perRound.set(key(shape, name, threads), times);
        rows.push({ shape, implementation: name, threads, 'median ms': ms, GOPS: ops / (ms / 1e3), 'ms per round': times });
      }
    }
  }
  const ratios: Array<Record<string, string | number>> = [];
  if (ortAvailable) {
    for (const [m, k, n] of opts.shapes) {
      const shape = `${m}x${k}x${n}`;
      for (const threads of opts.threads) {
        // lowbit's speed over the other's: the median over rounds of the ratio within each round.
        const ratio = (ours: string, theirs: string) => {
          const a = perRound.get(key(shape, ours, threads)), b = perRound.get(key(shape, theirs, threads));
          return a && b ? median(a.map((ms, r) => b[r] / ms)) : NaN;
        };
        const row: Record<string, string | number> = {
          shape, threads,
          [`${best} u8s8 / ort u8s8`]: ratio(`lowbit ${best} u8s8`, 'onnxruntime MatMulInteger u8s8'),
          [`${best} s8s8 / ort s8s8`]: ratio(`lowbit ${best} s8s8`, 'onnxruntime MatMulInteger s8s8'),
          [`${best} u8s8 / ort fp32`]: ratio(`lowbit ${best} u8s8`, 'onnxruntime MatMul fp32'),
          'W4A8 / ort u8s8': ratio(`lowbit ${best} W4A8 (int4 weights)`, 'onnxruntime MatMulInteger u8s8'),
          'W4A8 / ort MatMulNBits (both from float A)': ratio(`lowbit ${best} W4A8 from float activations`, 'onnxruntime MatMulNBits 4-bit'),
        };
        if (kernels.includes('avx512vnni') && best !== 'avx512vnni') {
          row['avx512vnni / ort u8s8'] = ratio('lowbit avx512vnni u8s8', 'onnxruntime MatMulInteger u8s8');
        }
        ratios.push(row);
      }
    }
  }
  if (opts.json) {
    console.log(JSON.stringify({ cpu: info, rows, ratios }, null, 2));
    return;
  }
  console.log(`gemm: GOPS = 2·m·k·n / median time (median of ${rounds} interleaved rounds, one process per case and round); kernels: ${kernels.join(', ')}\n`);
  console.log(table(rows.map(({ 'ms per round': times, ...row }) => {
    const [m, k, n] = String(row.shape).split('x').map(Number);
    return { ...row, 'GOPS per round': (times as number[]).map((ms) => ((2 * m * k * n) / 1e6 / ms).toFixed(1)).join(' ') };
  })));
  if (ratios.length) {
    console.log('\nratios (> 1: lowbit faster; the median over rounds of the ratio within each round)\n');
    console.log(table(ratios));
  } else {
    console.log('\nonnxruntime-node is not installed: no comparison rows (npm install onnxruntime-node).');
  }
}
