// Depthwise input equalization: channels shifted and stretched onto the tensor's range, the float output unchanged.
import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { ort } from '../../ts/bench/ort-models';
import { withOutputs } from '../../ts/onnx/calibrate';
import { Graph, floatData, makeTensor } from '../../ts/onnx/graph';
import { readModel, serializeModel } from '../../ts/onnx/model-io';
import {
  compensateShifts, depthwiseLayers, equalization, equalizeDepthwiseInputs, MAX_STRETCH,
} from '../../ts/onnx/passes/equalize-depthwise';
import { ChannelRangeObserver } from '../../ts/calibration/observers';
import { quantizableLayers } from '../../ts/onnx/passes/quantize-weights';
import { quantizeModel } from '../../ts/onnx/quantize-model';
import { create } from '@bufbuild/protobuf';
import { TensorProto_DataType, ValueInfoProtoSchema } from 'onnx-buf';
import { buildModel, heInit } from '../helpers/onnx-builder';
import { normalFeeds } from '../helpers/random';

type Feed = Record<string, { data: Float32Array; dims: number[] }>;

async function outputs(bytes: Uint8Array, feeds: Feed[], names?: string[]): Promise<Array<Record<string, { data: Float32Array; dims: readonly number[] }>>> {
  const O = ort();
  const session = await O.InferenceSession.create(bytes, { graphOptimizationLevel: 'disabled' });
  const out = [];
  for (const f of feeds) {
    const r = await session.run({ input: new O.Tensor('float32', f.input.data, f.input.dims) }, names ?? session.outputNames);
    out.push(Object.fromEntries(Object.entries(r).map(([k, v]) => [k, { data: v.data as Float32Array, dims: v.dims }])));
  }
  await session.release();
  return out;
}

/** max |a − b| / max |a| of the output 'y'. */
async function relativeGap(a: Uint8Array, b: Uint8Array, feeds: Feed[]): Promise<number> {
  const [x, y] = [await outputs(a, feeds), await outputs(b, feeds)];
  let gap = 0;
  let top = 0;
  x.forEach((o, i) => o.y.data.forEach((v, j) => { gap = Math.max(gap, Math.abs(v - y[i].y.data[j])); top = Math.max(top, Math.abs(v)); }));
  return gap / top;
}

/** Per-channel ranges of tensors, as quantizeModel's first calibration pass takes them. */
async function channelRanges(model: Uint8Array, layers: ReturnType<typeof depthwiseLayers>, feeds: Feed[]): Promise<Map<(typeof layers)[number], ChannelRangeObserver>> {
  const observers = new Map(layers.map((n) => [n, new ChannelRangeObserver()]));
  const exposed = withOutputs(readModel(model), layers.map((n) => n.input[0]));
  for (const o of await outputs(exposed, feeds, layers.map((n) => n.input[0]))) {
    for (const n of layers) observers.get(n)!.observe(o[n.input[0]].data, o[n.input[0]].dims);
  }
  return observers;
}

/** Channel c of a 3×3 conv's output scaled by `gains[c]`: inputs of very different ranges for what follows. */
function gainedFilters(gains: number[], inChannels: number, seed: number): Float32Array {
  const w = heInit(gains.length * inChannels * 9, inChannels * 9, seed);
  const per = inChannels * 9;
  return w.map((v, i) => v * gains[Math.floor(i / per)]);
}

const GAINS = [1, 0.05, 0.2, 3];

/** conv1 → `activation` nodes → depthwise conv2 (pads 1, bias) → y; with `deeper`, then Relu → 1×1 conv3 → y. */
function model(activation: Array<{ op: string; inputs: string[]; output: string }>, last: string,
  extra: Record<string, { dims: number[]; data: number[] | Float32Array }> = {}, deeper = false): Uint8Array {
  return buildModel({
    inputDims: [1, 3, 9, 9], output: 'y', opset: 14,
    nodes: [
      { op: 'Conv', inputs: ['input', 'w1', 'b1'], output: 'c1', name: 'conv1', attrs: { pads: [1, 1, 1, 1] } },
      ...activation,
      { op: 'Conv', inputs: [last, 'w2', 'b2'], output: deeper ? 'd' : 'y', name: 'dw', attrs: { pads: [1, 1, 1, 1], group: 4 } },
      ...(deeper ? [{ op: 'Relu', inputs: ['d'], output: 'r' }, { op: 'Conv', inputs: ['r', 'w3'], output: 'y', name: 'conv3' }] : []),
    ],
    initializers: {
      w1: { dims: [4, 3, 3, 3], data: gainedFilters(GAINS, 3, 1) }, b1: { dims: [4], data: [0.1, -0.02, 0.05, 0.3] },
      w2: { dims: [4, 1, 3, 3], data: heInit(36, 9, 2) }, b2: { dims: [4], data: [0.2, -0.1, 0, 0.4] },
      ...(deeper ? { w3: { dims: [2, 4, 1, 1], data: heInit(8, 4, 3) } } : {}),
      ...extra,
    },
  });
}

const HARDSWISH_AFFINE = [
  { op: 'HardSwish', inputs: ['c1'], output: 'h' }, { op: 'Mul', inputs: ['h', 'a'], output: 'm' }, { op: 'Add', inputs: ['m', 'b'], output: 'x' },
];
const AFFINE_CONSTANTS = { a: { dims: [], data: [1.3] }, b: { dims: [1], data: [-0.2] } };

describe('equalize-depthwise', () => {
  it('maps each channel onto the tensor range, keeping 0 when asked, stretching at most MAX_STRETCH times', () => {
    const lo = Float64Array.of(-1, 0.5, -0.1, 2, 0.001);
    const hi = Float64Array.of(3, 1.5, 0.1, 2, 0.002);
    const { s, u } = equalization(lo, hi, false);
    // Tensor range [-1, 3]: channel 0 is it; channel 1 (span 1) stretched 4×; channel 2 (span 0.2) only MAX_STRETCH×.
    expect(Array.from(s.slice(0, 3))).to.deep.equal([1, 0.25, 1 / MAX_STRETCH]);
    expect(s[3]).to.equal(1);  // a constant channel stays
    expect(u[3]).to.equal(0);
    for (const c of [0, 1, 2, 4]) {
      expect(lo[c] / s[c] - u[c]).to.be.closeTo(-1, 1e-12);  // the low end goes to LO
      expect(hi[c] / s[c] - u[c]).to.be.at.most(3 + 1e-12);
    }
    expect(hi[1] / s[1] - u[1]).to.be.closeTo(3, 1e-12);
    // With 0 kept (a padded convolution), channel 1's range is [0, 1.5] and 0 maps into the range.
    const z = equalization(lo, hi, true);
    expect(z.s[1]).to.be.closeTo(1.5 / 4, 1e-12);
    for (let c = 0; c < 5; c++) expect(-z.u[c]).to.be.within(-1 - 1e-12, 3 + 1e-12);
    expect(MAX_STRETCH).to.equal(4);
  });

  it('the channel ranges take finite values only (an infinity made the stretch NaN); NaN is refused', () => {
    const observer = new ChannelRangeObserver();
    observer.observe(Float32Array.of(1, Infinity, -2, 4, -Infinity, 0.5), [1, 2, 3]);
    expect([[...observer.lo!], [...observer.hi!]]).to.deep.equal([[-2, 0.5], [1, 4]]);
    const { s } = equalization(observer.lo!, observer.hi!, true);
    expect([...s].every(Number.isFinite)).to.equal(true);
    expect(() => observer.observe(Float32Array.of(1, 2, NaN, 4, 5, 6), [1, 2, 3])).to.throw(RangeError, /a number for batch\[2\] but received NaN/);
  });

  it('after HardSwish and a scalar affine: pads first with −b/a and makes the affine per channel; the output is unchanged', async () => {
    const bytes = model(HARDSWISH_AFFINE, 'x', AFFINE_CONSTANTS);
    const m = readModel(bytes);
    const graph = new Graph(m);
    const layers = depthwiseLayers(graph, quantizableLayers(graph, undefined));
    expect(layers.map((n) => n.name)).to.deep.equal(['dw']);
    const feeds = normalFeeds(4, [1, 3, 9, 9], 3, 'input');
    const ranges = await channelRanges(bytes, layers, feeds);
    const { report, shifts } = equalizeDepthwiseInputs(graph, layers, ranges);
    expect(report.changed).to.have.length(1);
    expect(report.changed[0]).to.match(/^dw: \d of 4 input channels stretched \(up to [\d.]+×\) and shifted, in an inserted Pad, mul2 and add3$/);
    expect(m.graph!.node.map((n) => n.opType)).to.deep.equal(['Conv', 'HardSwish', 'Pad', 'Mul', 'Add', 'Conv']);
    const pad = m.graph!.node[2];
    expect(floatData(graph.constant(pad.input[2])!)![0]).to.be.closeTo(0.2 / 1.3, 1e-6);
    expect(m.graph!.node[5].attribute.some((a) => a.name === 'pads')).to.equal(false);
    expect(shifts.get('dw')).to.have.length(4);
    const after = serializeModel(m);
    expect(await relativeGap(bytes, after, feeds)).to.be.lessThan(1e-5);
    expect(await relativeGap(bytes, after, normalFeeds(3, [1, 3, 9, 9], 9, 'input'))).to.be.lessThan(1e-5);
    // What the quantizer will see: every channel (with the padding's 0) stretched to the tensor's range, at most 4×.
    const input = m.graph!.node[5].input[0];
    const seen = (await outputs(withOutputs(m, [input]), feeds, [input])).map((o) => o[input]);
    const lo = new Float64Array(4).fill(Infinity);
    const hi = new Float64Array(4).fill(-Infinity);
    for (const t of seen) {
      const inner = t.data.length / 4;
      t.data.forEach((v, i) => { const c = Math.floor(i / inner); lo[c] = Math.min(lo[c], v); hi[c] = Math.max(hi[c], v); });
    }
    const dw = layers[0];
    const before = ranges.get(dw)!;
    const spanOf = (l: number, h: number) => Math.max(h, 0) - Math.min(l, 0);
    const full = Math.max(...Array.from(before.hi!, (h) => Math.max(h, 0))) - Math.min(...Array.from(before.lo!, (l) => Math.min(l, 0)));
    for (let c = 0; c < 4; c++) {
      expect(hi[c] - lo[c]).to.be.closeTo(Math.min(full, MAX_STRETCH * spanOf(before.lo![c], before.hi![c])), 1e-4 * full);
    }
    expect(Math.min(...Array.from(before.lo!, (l, c) => spanOf(l, before.hi![c])))).to.be.lessThan(full / 10);  // one narrow channel at least
  });

  it('after a Relu: no shift, the stretch goes into the producing Conv (no new node); after Tanh: an inserted Pad, Mul and Add', async () => {
    const feeds = normalFeeds(4, [1, 3, 9, 9], 4, 'input');
    const relu = model([{ op: 'Relu', inputs: ['c1'], output: 'x' }], 'x');
    const m = readModel(relu);
    const graph = new Graph(m);
    const layers = depthwiseLayers(graph, quantizableLayers(graph, undefined));
    const { report, shifts } = equalizeDepthwiseInputs(graph, layers, await channelRanges(relu, layers, feeds));
    expect(report.changed[0]).to.match(/^dw: \d of 4 input channels stretched \(up to [\d.]+×\), in conv1$/);
    expect(shifts.size).to.equal(0);
    expect(m.graph!.node.map((n) => n.opType)).to.deep.equal(['Conv', 'Relu', 'Conv']);
    expect(await relativeGap(relu, serializeModel(m), feeds)).to.be.lessThan(1e-5);

    const tanh = model([{ op: 'Tanh', inputs: ['c1'], output: 'x' }], 'x');
    const t = readModel(tanh);
    const tg = new Graph(t);
    const tl = depthwiseLayers(tg, quantizableLayers(tg, undefined));
    const tr = equalizeDepthwiseInputs(tg, tl, await channelRanges(tanh, tl, feeds));
    expect(tr.report.changed[0]).to.match(/shifted, in an inserted Pad, Mul and Add$/);
    expect(t.graph!.node.map((n) => n.opType)).to.deep.equal(['Conv', 'Tanh', 'Pad', 'Mul', 'Add', 'Conv']);
    expect(await relativeGap(tanh, serializeModel(t), feeds)).to.be.lessThan(1e-5);
  });

  it('compensateShifts takes (W − Ŵ)·u off each shifted layer\'s bias', () => {
    const bytes = model(HARDSWISH_AFFINE, 'x', AFFINE_CONSTANTS);
    const m = readModel(bytes);
    const graph = new Graph(m);
    const dw = m.graph!.node.find((n) => n.name === 'dw')!;
    const original = floatData(graph.constant(dw.input[1])!)!;
    const dequantized = original.map((v, i) => v + (i % 9 === 0 ? 0.01 : 0));  // each filter's first tap off by 0.01
    const u = Float64Array.of(1, 2, -1, 0.5);
    const before = floatData(graph.constant(dw.input[2])!)!;
    const report = compensateShifts(graph, [{ node: 'dw', shape: [4, 1, 3, 3], outputAxis: 0, original, dequantized }], new Map([['dw', u]]));
    expect(report.changed).to.deep.equal(['dw: bias compensated for the rounded filters\' response to the shift']);
    const after = floatData(graph.constant(dw.input[2])!)!;
    after.forEach((b, o) => expect(b).to.be.closeTo(before[o] + 0.01 * u[o], 1e-6));
  });

  it('in quantizeModel: the depthwise layer\'s output SQNR rises, onnxruntime runs it fused; skipped where it cannot help', async () => {
    const bytes = model(HARDSWISH_AFFINE, 'x', AFFINE_CONSTANTS);
    const calibration = normalFeeds(8, [1, 3, 9, 9], 5, 'input');
    const evaluationFeeds = normalFeeds(8, [1, 3, 9, 9], 6, 'input');
    const plain = await quantizeModel(bytes, { weights: { bits: 8 }, activations: { bits: 8 }, calibration, evaluationFeeds });
    const equalized = await quantizeModel(bytes, { weights: { bits: 8 }, activations: { bits: 8, equalizeDepthwise: true }, calibration, evaluationFeeds });
    const sqnr = (r: typeof plain) => r.report.layers.find((l) => l.node === 'dw')!.outputSqnrDb!;
    expect(sqnr(equalized)).to.be.greaterThan(sqnr(plain));
    // The narrow channels gain most: the worst channel's SQNR rises by more than 6 dB.
    const float = await outputs(bytes, evaluationFeeds);
    const worstChannel = async (q: Uint8Array) => {
      const signal = new Float64Array(4);
      const noise = new Float64Array(4);
      (await outputs(q, evaluationFeeds)).forEach((o, i) => o.y.data.forEach((v, j) => {
        const c = Math.floor(j / (o.y.data.length / 4));
        signal[c] += float[i].y.data[j] ** 2;
        noise[c] += (v - float[i].y.data[j]) ** 2;
      }));
      return Math.min(...Array.from(signal, (sg, c) => 10 * Math.log10(sg / noise[c])));
    };
    expect(await worstChannel(equalized.model)).to.be.greaterThan(await worstChannel(plain.model) + 6);
    expect(equalized.report.evaluation!.outputs[0].cosine).to.be.greaterThan(plain.report.evaluation!.outputs[0].cosine);
    expect(equalized.report.passes.map((p) => p.pass)).to.include.members(['equalize-depthwise', 'equalize-depthwise-shift']);
    expect(plain.report.passes.map((p) => p.pass)).not.to.include('equalize-depthwise');
    // With layer outputs quantized too, onnxruntime fuses the depthwise layer (not the last) into a QLinearConv.
    const deeper = model(HARDSWISH_AFFINE, 'x', AFFINE_CONSTANTS, true);
    const fused = await quantizeModel(deeper, { weights: { bits: 8 }, activations: { bits: 8, outputs: true, equalizeDepthwise: true }, calibration, evaluationFeeds });
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-eq-'));
    const optimized = path.join(dir, 'optimized.onnx');
    const O = ort();
    await (await O.InferenceSession.create(fused.model, { graphOptimizationLevel: 'extended', optimizedModelFilePath: optimized })).release();
    const qlinear = readModel(optimized).graph!.node.filter((n) => n.opType === 'QLinearConv').map((n) => n.name.replace(/_token_\d+$/, ''));
    expect(qlinear).to.deep.equal(['conv1', 'dw']);
    fs.rmSync(dir, { recursive: true, force: true });
    // GPTQ sees the shifted inputs itself: no compensation pass.
    const gptq = await quantizeModel(bytes, { weights: { bits: 8, rounding: 'gptq' }, activations: { bits: 8, equalizeDepthwise: true }, calibration, evaluationFeeds });
    expect(gptq.report.passes.map((p) => p.pass)).to.include('equalize-depthwise').and.not.include('equalize-depthwise-shift');
    // One scale per tensor would take the stretched filters too; a generator cannot be read twice.
    const tensor = await quantizeModel(bytes, { weights: { bits: 8, granularity: 'tensor' }, activations: { bits: 8, equalizeDepthwise: true }, calibration, evaluationFeeds: [] });
    expect(tensor.report.passes.find((p) => p.pass === 'equalize-depthwise')!.skipped).to.deep.equal([
      { node: 'dw', reason: "weights.granularity is 'tensor' (one scale would take every stretched filter)" }]);
    const once = await quantizeModel(bytes, { weights: { bits: 8 }, activations: { bits: 8, equalizeDepthwise: true }, calibration: (function* () { yield* calibration; })(), evaluationFeeds: [] });
    expect(once.report.passes.find((p) => p.pass === 'equalize-depthwise')!.skipped[0].reason).to.match(/can be read only once/);
  });

  it('rejects a non-boolean, dynamic or 16-bit activations; the CLI flag needs --abits', async () => {
    const bytes = model(HARDSWISH_AFFINE, 'x', AFFINE_CONSTANTS);
    const calibration = normalFeeds(2, [1, 3, 9, 9], 5, 'input');
    for (const [activations, message] of [
      [{ bits: 8, equalizeDepthwise: 'yes' }, /options\.activations\.equalizeDepthwise/],
      [{ bits: 8, method: 'dynamic', equalizeDepthwise: true }, /false with method 'dynamic'/],
      [{ bits: 16, equalizeDepthwise: true }, /false with 16-bit activations/],
    ] as const) {
      let error: Error | undefined;
      try {
        await quantizeModel(bytes, { weights: { bits: 8 }, activations: activations as never, calibration });
      } catch (e) {
        error = e as Error;
      }
      expect(error?.message).to.match(message);
    }
    const cli = path.resolve(__dirname, '..', '..', 'ts', 'cli.js');
    const bad = spawnSync(process.execPath, [cli, 'quantize', path.resolve(__dirname, '..', '..', '..', 'assets', 'mnist-cnn.onnx'), '--equalize-depthwise'], { encoding: 'utf8', cwd: os.tmpdir() });
    expect(bad.status).to.not.equal(0);
    expect(bad.stderr).to.match(/--equalize-depthwise prepares activations for quantization: pass --abits 8/);
  });

  it('leaves a model without a depthwise layer alone (a conv whose groups read two channels each is not one)', async () => {
    const m = readModel(model([{ op: 'Relu', inputs: ['c1'], output: 'x' }], 'x'));
    const dw = m.graph!.node.find((n) => n.name === 'dw')!;
    dw.attribute = dw.attribute.map((a) => (a.name === 'group' ? { ...a, i: 2n } : a));
    new Graph(m).addInitializer(makeTensor('w2b', TensorProto_DataType.FLOAT, [4, 2, 3, 3], new Uint8Array(heInit(72, 18, 4).buffer)));
    dw.input[1] = 'w2b';
    const graph = new Graph(m);
    graph.removeIfUnused('w2');
    expect(depthwiseLayers(graph, quantizableLayers(graph, undefined))).to.deep.equal([]);
    const { report } = await quantizeModel(serializeModel(m), {
      weights: { bits: 8 }, activations: { bits: 8, equalizeDepthwise: true }, calibration: normalFeeds(2, [1, 3, 9, 9], 5, 'input'), evaluationFeeds: [],
    });
    // It changes nothing, and the report says the option did nothing.
    expect(report.passes.find((p) => p.pass === 'equalize-depthwise')).to.deep.equal({
      pass: 'equalize-depthwise', changed: [], skipped: [{ node: '(model)', reason: 'it has no depthwise convolution to equalize (outside keepFloat)' }] });
  });

  it('Conv1d with a channel multiplier, no bias, asymmetric pads, strides and dilations: output unchanged', async () => {
    const bytes = buildModel({
      inputDims: [1, 3, 20], output: 'y', opset: 14,
      nodes: [
        { op: 'Conv', inputs: ['input', 'w1', 'b1'], output: 'c1', name: 'conv1', attrs: { pads: [1, 1] } },
        { op: 'Tanh', inputs: ['c1'], output: 'x' },
        { op: 'Conv', inputs: ['x', 'w2'], output: 'y', name: 'dw', attrs: { pads: [2, 1], group: 4, strides: [2], dilations: [2] } },
      ],
      initializers: {
        w1: { dims: [4, 3, 3], data: heInit(36, 9, 1).map((v, i) => v * [1, 0.05, 0.2, 3][Math.floor(i / 9)]) }, b1: { dims: [4], data: [0.1, -0.02, 0.05, 0.3] },
        w2: { dims: [8, 1, 3], data: heInit(24, 3, 2) },
      },
    });
    const feeds = normalFeeds(4, [1, 3, 20], 4, 'input');
    const m = readModel(bytes);
    const graph = new Graph(m);
    const layers = depthwiseLayers(graph, quantizableLayers(graph, undefined));
    const { report, shifts } = equalizeDepthwiseInputs(graph, layers, await channelRanges(bytes, layers, feeds));
    expect(report.changed[0]).to.match(/shifted, in an inserted Pad, Mul and Add$/);
    expect(shifts.get('dw')).to.have.length(4);
    expect(await relativeGap(bytes, serializeModel(m), feeds)).to.be.lessThan(1e-5);
  });

  it('skips a computed bias, and a padded shift in a model kept below opset 11; drops shapes recorded for the padded affine', async () => {
    const feeds = normalFeeds(3, [1, 3, 9, 9], 4, 'input');
    // The bias comes out of an Identity: not a constant the pass could change.
    const computed = model([...HARDSWISH_AFFINE, { op: 'Identity', inputs: ['b2'], output: 'b2i' }], 'x', AFFINE_CONSTANTS);
    const c = readModel(computed);
    c.graph!.node.find((n) => n.name === 'dw')!.input[2] = 'b2i';
    const cg = new Graph(c);
    cg.sort();
    const cl = depthwiseLayers(cg, quantizableLayers(cg, undefined));
    const cr = equalizeDepthwiseInputs(cg, cl, await channelRanges(serializeModel(c), cl, feeds));
    expect(cr.report.skipped).to.deep.equal([{ node: 'dw', reason: 'its bias is not a float constant with one value per output channel' }]);
    // Opset 10: Pad takes its pads as an attribute, so no Pad with a value input can go in.
    const old = buildModel({
      inputDims: [1, 3, 9, 9], output: 'y', opset: 10,
      nodes: [
        { op: 'Conv', inputs: ['input', 'w1', 'b1'], output: 'c1', name: 'conv1', attrs: { pads: [1, 1, 1, 1] } },
        { op: 'Tanh', inputs: ['c1'], output: 'x' },
        { op: 'Conv', inputs: ['x', 'w2', 'b2'], output: 'y', name: 'dw', attrs: { pads: [1, 1, 1, 1], group: 4 } },
      ],
      initializers: {
        w1: { dims: [4, 3, 3, 3], data: gainedFilters(GAINS, 3, 1) }, b1: { dims: [4], data: [0.1, -0.02, 0.05, 0.3] },
        w2: { dims: [4, 1, 3, 3], data: heInit(36, 9, 2) }, b2: { dims: [4], data: [0.2, -0.1, 0, 0.4] },
      },
    });
    const o = readModel(old);
    const og = new Graph(o);
    const ol = depthwiseLayers(og, quantizableLayers(og, undefined));
    const or = equalizeDepthwiseInputs(og, ol, await channelRanges(old, ol, feeds));
    expect(or.report.skipped).to.deep.equal([{ node: 'dw', reason: 'it pads, and its shifted input would need a Pad with a value input (opset 11; the model stays at 10)' }]);
    expect(serializeModel(o)).to.deep.equal(old);
    // Shapes an exporter recorded for the affine's values (which the Pad before it enlarges) are dropped; others stay.
    const bytes = model(HARDSWISH_AFFINE, 'x', AFFINE_CONSTANTS);
    const m = readModel(bytes);
    const typed = (name: string) => create(ValueInfoProtoSchema, {
      name, type: { value: { case: 'tensorType', value: { elemType: 1, shape: { dim: [1, 4, 9, 9].map((d) => ({ value: { case: 'dimValue', value: BigInt(d) } })) } } } },
    } as never);
    m.graph!.valueInfo.push(typed('m'), typed('x'), typed('h'));
    const g = new Graph(m);
    const layers = depthwiseLayers(g, quantizableLayers(g, undefined));
    equalizeDepthwiseInputs(g, layers, await channelRanges(bytes, layers, feeds));
    expect(m.graph!.valueInfo.map((v) => v.name)).to.deep.equal(['h']);
    expect(await relativeGap(bytes, serializeModel(m), feeds)).to.be.lessThan(1e-5);
  });
});
