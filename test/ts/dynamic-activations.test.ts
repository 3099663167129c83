// activations.method 'dynamic': MatMul (and Gemm) inputs quantized per run, as onnxruntime's quantize_dynamic does.
import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { create, fromBinary, toBinary } from '@bufbuild/protobuf';
import { AttributeProto_AttributeType, ModelProtoSchema, TensorProto_DataType, type GraphProto } from 'onnx-buf';

import { ort } from '../../ts/bench/ort-models';
import { floatData } from '../../ts/onnx/graph';
import { readModel } from '../../ts/onnx/model-io';
import { quantizeModel } from '../../ts/onnx/quantize-model';
import { roundHalfToEven } from '../../ts/quant-params';
import { buildModel, valueInfo as info } from '../helpers/onnx-builder';
import { rng } from '../helpers/random';

const root = path.resolve(__dirname, '..', '..', '..');
const f32 = Math.fround;

function values(n: number, seed: number, scale = 1): Float32Array {
  const r = rng(seed);
  return Float32Array.from({ length: n }, () => (r() * 2 - 1) * scale);
}

/** x [n, 24] → MatMul [24, 16] → Add bias: one layer, for the exact check. */
function oneMatMul(): Uint8Array {
  return buildModel({
    inputDims: ['n', 24],
    nodes: [{ op: 'MatMul', inputs: ['input', 'w'], output: 'y', name: 'fc' }, { op: 'Add', inputs: ['y', 'b'], output: 'out' }],
    initializers: { w: { dims: [24, 16], data: values(24 * 16, 1, 0.3) }, b: { dims: [16], data: values(16, 2) } },
    output: 'out',
  });
}

/** What DynamicQuantizeLinear → MatMulInteger → Cast → Mul → Add computes, from the ONNX definitions, in float32. */
function reference(x: Float32Array, rows: number, k: number, wq: Int8Array, ws: Float32Array, bias: Float32Array): Float32Array {
  let lo = 0;
  let hi = 0;
  for (const v of x) {
    lo = Math.min(lo, v);
    hi = Math.max(hi, v);
  }
  const scale = f32(f32(hi - lo) / 255);
  const zp = Math.min(255, Math.max(0, roundHalfToEven(f32(0 - f32(lo / scale)))));
  const q = Int32Array.from(x, (v) => Math.min(255, Math.max(0, roundHalfToEven(f32(v / scale)) + zp)));
  const n = ws.length;
  const y = new Float32Array(rows * n);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < n; c++) {
      let acc = 0;
      for (let i = 0; i < k; i++) acc += (q[r * k + i] - zp) * wq[i * n + c];
      y[r * n + c] = f32(f32(acc * f32(scale * ws[c])) + bias[c]);
    }
  }
  return y;
}

/** onnxruntime's optimized form of a model (graph optimizations 'extended'). */
async function optimizedGraph(model: Uint8Array): Promise<GraphProto> {
  const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-dyn-')), 'optimized.onnx');
  const session = await ort().InferenceSession.create(model, { graphOptimizationLevel: 'extended', optimizedModelFilePath: file });
  await session.release();
  const graph = fromBinary(ModelProtoSchema, fs.readFileSync(file)).graph!;
  fs.rmSync(path.dirname(file), { recursive: true });
  return graph;
}

async function optimizedOps(model: Uint8Array): Promise<string[]> {
  return (await optimizedGraph(model)).node.map((n) => n.opType);
}

describe("dynamic activations (activations.method 'dynamic')", function () {
  this.timeout(60000);

  it('needs no calibration; a MatMul becomes DynamicQuantizeLinear → MatMulInteger → Cast → Mul, equal to the ONNX definitions in float32, and onnxruntime fuses it', async () => {
    const { model, report } = await quantizeModel(oneMatMul(), { weights: { bits: 8 }, activations: { bits: 8, method: 'dynamic' } });
    const graph = readModel(model).graph!;
    expect(graph.node.map((n) => n.opType).sort()).to.deep.equal(['Add', 'Cast', 'DynamicQuantizeLinear', 'MatMulInteger', 'Mul', 'Mul']);
    expect(report.layers[0].input).to.deep.equal({ bits: 8, dynamic: true });
    expect(report.calibrationBatches).to.equal(undefined);
    expect(report.evaluation!.outputs[0].cosine).to.be.above(0.9999);
    const tensor = (name: string) => graph.initializer.find((t) => t.name === name)!;
    const integer = graph.node.find((n) => n.opType === 'MatMulInteger')!;
    const wq = tensor(integer.input[1]);
    expect(wq.dataType).to.equal(TensorProto_DataType.INT8);
    const scales = floatData(tensor(graph.node.find((n) => n.name === 'fc_scales')!.input[1]))!;
    expect(scales.length).to.equal(16);  // per column
    const rows = 5;
    const x = values(rows * 24, 3, 2.5).map((v, i) => (i % 7 === 0 ? v + 1 : v));  // asymmetric: a nonzero zero point
    const expected = reference(x, rows, 24, new Int8Array(wq.rawData.buffer, wq.rawData.byteOffset, wq.rawData.length), scales, values(16, 2));
    for (const level of ['basic', 'all'] as const) {
      const session = await ort().InferenceSession.create(model, { graphOptimizationLevel: level });
      const out = (await session.run({ input: new (ort().Tensor)('float32', x, [rows, 24]) })).out.data as Float32Array;
      await session.release();
      const largest = Math.max(...expected.map(Math.abs));
      // As written ('basic'): the same float32 operations; fused ('all'): onnxruntime's kernel may order the scaling differently.
      const tolerance = level === 'basic' ? 0 : 1e-6 * largest;
      expected.forEach((v, i) => expect(Math.abs(out[i] - v), `${level} [${i}]`).to.be.at.most(tolerance));
    }
    expect(await optimizedOps(model)).to.deep.equal(['DynamicQuantizeMatMul']);
  });

  it('shares one DynamicQuantizeLinear among the MatMuls that read a tensor, makes Gemm MatMulInteger + Add, leaves Conv inputs float and says why', async () => {
    const model = buildModel({
      inputDims: ['n', 1, 6, 6],
      nodes: [
        { op: 'Conv', inputs: ['input', 'cw', 'cb'], output: 'c', name: 'conv', attrs: { kernel_shape: [3, 3] } },
        { op: 'Flatten', inputs: ['c'], output: 'f' },
        { op: 'MatMul', inputs: ['f', 'w1'], output: 'a', name: 'left' },
        { op: 'MatMul', inputs: ['f', 'w2'], output: 'b', name: 'right' },
        { op: 'Add', inputs: ['a', 'b'], output: 'ab' },
        { op: 'Gemm', inputs: ['ab', 'gw', 'gb'], output: 'out', name: 'head', attrs: { transB: 1 } },
      ],
      initializers: {
        cw: { dims: [2, 1, 3, 3], data: values(18, 4) }, cb: { dims: [2], data: values(2, 5) },
        w1: { dims: [32, 12], data: values(32 * 12, 6) }, w2: { dims: [32, 12], data: values(32 * 12, 7) },
        gw: { dims: [5, 12], data: values(60, 8) }, gb: { dims: [5], data: values(5, 9) },
      },
      output: 'out',
    });
    const { model: q, report } = await quantizeModel(model, { weights: { bits: 8 }, activations: { bits: 8, method: 'dynamic' } });
    const ops = readModel(q).graph!.node.map((n) => n.opType);
    expect(ops.filter((o) => o === 'DynamicQuantizeLinear')).to.have.length(2);  // f (shared by left and right), ab
    expect(ops.filter((o) => o === 'MatMulInteger')).to.have.length(3);
    expect(ops).to.not.include('Gemm');
    expect(ops).to.not.include('MatMul');
    const pass = (name: string) => report.passes.find((p) => p.pass === name)!;
    expect(pass('dynamic-activations').changed).to.have.length(3);
    expect(pass('dynamic-activations').skipped).to.deep.equal([{ node: 'conv', reason: pass('dynamic-activations').skipped[0].reason }]);
    expect(pass('dynamic-activations').skipped[0].reason).to.match(/ConvInteger .*calibrate for static activations/);
    expect(report.layers.map((l) => [l.node, l.input])).to.deep.equal([
      ['conv', undefined], ['left', { bits: 8, dynamic: true }], ['right', { bits: 8, dynamic: true }], ['head', { bits: 8, dynamic: true }],
    ]);
    // The Gemm's [5, 12] int8 weights (transB) are stored transposed for MatMulInteger; the [5, 12] ones are gone.
    const graph = readModel(q).graph!;
    expect(graph.initializer.filter((t) => t.name.startsWith('gw')).map((t) => [t.name, t.dims.map(Number)]))
      .to.deep.equal([['gw_scale', [5]], ['gw_quantized_transposed', [12, 5]]]);
    expect(report.evaluation!.outputs[0].cosine).to.be.above(0.999);
    expect((await optimizedOps(q)).filter((o) => o === 'MatMulInteger')).to.deep.equal([]);  // all fused
  });

  it('keeps a Gemm it cannot rewrite (alpha ≠ 1) with float inputs and reports it; takes calibration for GPTQ rounding and data-driven bias correction', async () => {
    const model = buildModel({
      inputDims: ['n', 12],
      nodes: [{ op: 'Gemm', inputs: ['input', 'gw', 'gb'], output: 'out', name: 'scaled', attrs: { alpha: 0.5 } }],
      initializers: { gw: { dims: [12, 4], data: values(48, 10) }, gb: { dims: [4], data: values(4, 11) } },
      output: 'out',
    });
    const { model: q, report } = await quantizeModel(model, { weights: { bits: 8 }, activations: { bits: 8, method: 'dynamic' } });
    expect(report.passes.find((p) => p.pass === 'dynamic-activations')!.skipped).to.deep.equal([
      { node: 'scaled', reason: 'a Gemm whose alpha is not 1: input left float (MatMulInteger computes x·W only)' },
    ]);
    expect(readModel(q).graph!.node.map((n) => n.opType)).to.deep.equal(['DequantizeLinear', 'Gemm']);

    const calibration = [{ input: { data: values(8 * 24, 12, 3).map((v) => v + 1), dims: [8, 24] } }];
    const plain = await quantizeModel(oneMatMul(), { weights: { bits: 8 }, activations: { bits: 8, method: 'dynamic' } });
    const both = await quantizeModel(oneMatMul(), {
      weights: { bits: 8, rounding: 'gptq' }, activations: { bits: 8, method: 'dynamic', biasCorrection: true }, calibration,
    });
    expect(both.report.calibrationBatches).to.equal(1);
    expect(both.report.layers[0].input).to.deep.equal({ bits: 8, dynamic: true });
    expect(both.report.layers[0].method).to.match(/gptq rounding/);
    expect(both.report.passes.map((p) => p.pass)).to.include.members(['bias-correction', 'dynamic-activations']);
    // The correction goes into the bias that the Add after the MatMul adds (no second Add): b + Δ.
    expect(both.report.passes.find((p) => p.pass === 'bias-correction')!.changed[0]).to.match(/^fc: bias shifted by/);
    const addBias = (m: Uint8Array) => {
      const graph = readModel(m).graph!;
      const add = graph.node.filter((n) => n.opType === 'Add');
      expect(add).to.have.length(1);
      return graph.initializer.find((t) => t.name === add[0].input[1])!;
    };
    expect(addBias(plain.model).name).to.equal('b');
    expect(addBias(both.model).name).to.equal('fc_corrected_bias');
    expect(both.report.layers[0].output).to.equal('out');  // its layer SQNR is taken after the corrected bias
    const shift = floatData(addBias(both.model))!.map((v, i) => v - values(16, 2)[i]);
    expect(shift.some((v) => Math.abs(v) > 1e-7)).to.equal(true);
    // Without a bias Add after it, the MatMul gets one for the correction.
    const bare = buildModel({ inputDims: ['n', 24], nodes: [{ op: 'MatMul', inputs: ['input', 'w'], output: 'out', name: 'fc' }],
      initializers: { w: { dims: [24, 16], data: values(24 * 16, 1, 0.3) } }, output: 'out' });
    const added = await quantizeModel(bare, { weights: { bits: 8 }, activations: { bits: 8, method: 'dynamic', biasCorrection: true }, calibration });
    expect(readModel(added.model).graph!.node.map((n) => n.name)).to.include('fc_bias_correction_add');
  });

  it('keepFloat by op type keeps only that type; unnamed layers keep their report names through bias correction; Gemms sharing a weight share it', async () => {
    const model = buildModel({
      inputDims: ['n', 12],
      nodes: [
        { op: 'MatMul', inputs: ['input', 'w'], output: 'h', name: '' },  // unnamed: reported as MatMul(h)
        { op: 'Gemm', inputs: ['h', 'gw', 'gb'], output: 'g1', attrs: { transB: 1 }, name: '' },
        { op: 'Gemm', inputs: ['g1', 'gw'], output: 'out', attrs: { transB: 1 }, name: '' },
      ],
      initializers: { w: { dims: [12, 6], data: values(72, 13) }, gw: { dims: [6, 6], data: values(36, 14) }, gb: { dims: [6], data: values(6, 15) } },
      output: 'out',
    });
    const keep = await quantizeModel(model, { weights: { bits: 8 }, activations: { bits: 8, method: 'dynamic' }, keepFloat: ['MatMul'] });
    expect(keep.report.layers.map((l) => [l.node, l.input])).to.deep.equal([['Gemm(g1)', { bits: 8, dynamic: true }], ['Gemm(out)', { bits: 8, dynamic: true }]]);
    const int8 = readModel(keep.model).graph!.initializer.filter((t) => t.dataType === TensorProto_DataType.INT8).map((t) => t.name);
    expect(int8).to.deep.equal(['gw_quantized_transposed']);  // quantized once, transposed once
    const calibration = [{ input: { data: values(4 * 12, 16), dims: [4, 12] } }];
    const corrected = await quantizeModel(model, { weights: { bits: 8 }, activations: { bits: 8, method: 'dynamic', biasCorrection: true }, calibration });
    expect(corrected.report.layers.map((l) => [l.node, l.input])).to.deep.equal([
      ['MatMul(h)', { bits: 8, dynamic: true }], ['Gemm(g1)', { bits: 8, dynamic: true }], ['Gemm(out)', { bits: 8, dynamic: true }],
    ]);
    expect(corrected.report.passes.find((p) => p.pass === 'dynamic-activations')!.changed.map((c) => c.split(':')[0])).to.deep.equal(['MatMul(h)', 'Gemm(g1)', 'Gemm(out)']);
    expect(corrected.report.evaluation!.outputs[0].cosine).to.be.above(0.999);
  });

  it('quantizes MatMul and Gemm inputs inside If branches too (a merged decoder keeps its layers there): the same arithmetic as without the If', async () => {
    // x → MatMul(A) → h → If(flag): then MatMul(h, W) + MatMul(h, V) → Gemm(G, transB); else MatMul(h, W).
    const r = rng(21);
    const matrix = (name: string, dims: number[]) => ({ name, dataType: TensorProto_DataType.FLOAT, dims: dims.map(BigInt),
      rawData: new Uint8Array(Float32Array.from({ length: dims[0] * dims[1] }, () => (r() - 0.5) / 2).buffer) });
    const node = (opType: string, input: string[], y: string, attribute: unknown[] = []) => ({ opType, name: y, input, output: [y], attribute });
    const transB = { name: 'transB', type: AttributeProto_AttributeType.INT, i: 1n };
    const [A, W, V, G] = [matrix('A', [16, 24]), matrix('W', [24, 24]), matrix('V', [24, 24]), matrix('G', [8, 24])];
    const thenNodes = [node('MatMul', ['h', 'W'], 't1'), node('MatMul', ['h', 'V'], 't2'), node('Add', ['t1', 't2'], 't3'), node('Gemm', ['t3', 'G'], 'y_then', [transB])];
    const model = (withIf: boolean) => toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 17n }],
      graph: withIf ? {
        name: 'branches', input: [info('x', TensorProto_DataType.FLOAT, [3, 16]), info('flag', TensorProto_DataType.BOOL, [])], output: [info('y')],
        initializer: [A, W], node: [node('MatMul', ['x', 'A'], 'h'), { opType: 'If', name: 'if', input: ['flag'], output: ['y'], attribute: [
          { name: 'then_branch', type: AttributeProto_AttributeType.GRAPH, g: { name: 'then', initializer: [V, G], output: [info('y_then')], node: thenNodes } },
          { name: 'else_branch', type: AttributeProto_AttributeType.GRAPH, g: { name: 'else', output: [info('y_else')], node: [node('MatMul', ['h', 'W'], 'y_else')] } },
        ] }],
      } : {  // the then branch alone, in the main graph
        name: 'flat', input: [info('x', TensorProto_DataType.FLOAT, [3, 16])], output: [info('y_then')],
        initializer: [A, W, V, G], node: [node('MatMul', ['x', 'A'], 'h'), ...thenNodes],
      },
    } as never));
    const options = { weights: { bits: 8 as const }, activations: { bits: 8 as const, method: 'dynamic' as const } };
    const { model: q, report } = await quantizeModel(model(true), options);
    expect(report.layers.map((l) => [l.node, l.subgraph, l.input])).to.deep.equal([['h', undefined, { bits: 8, dynamic: true }],
      ['t1', 'if', { bits: 8, dynamic: true }], ['t2', 'if', { bits: 8, dynamic: true }], ['y_then', 'if', { bits: 8, dynamic: true }], ['y_else', 'if', { bits: 8, dynamic: true }]]);
    expect(report.passes.find((p) => p.pass === 'dynamic-activations')!.changed).to.have.length(5);
    const graph = readModel(q).graph!;
    const [then, otherwise] = graph.node.find((n) => n.opType === 'If')!.attribute.map((a) => a.g!);
    // h is quantized once per branch that reads it (shared by t1 and t2), before its first reader; no float weights or weight DQ remain.
    expect(then.node.map((n) => n.opType)).to.deep.equal(['DynamicQuantizeLinear', 'MatMulInteger', 'Cast', 'Mul', 'Mul', 'MatMulInteger', 'Cast', 'Mul', 'Mul',
      'Add', 'DynamicQuantizeLinear', 'MatMulInteger', 'Cast', 'Mul', 'Mul']);
    expect(otherwise.node.map((n) => n.opType)).to.deep.equal(['DynamicQuantizeLinear', 'MatMulInteger', 'Cast', 'Mul', 'Mul']);
    expect([...then.initializer, ...otherwise.initializer].every((t) => t.dataType === TensorProto_DataType.INT8 || /_scale(_\d+)?$/.test(t.name))).to.equal(true);
    expect(then.initializer.find((t) => t.name.startsWith('G_quantized'))!.dims.map(Number)).to.deep.equal([24, 8]);  // transposed for MatMulInteger
    // Unoptimized, the then branch computes exactly what the same layers quantized without the If compute.
    const flat = await quantizeModel(model(false), options);
    const x = values(3 * 16, 22, 2);
    const O = ort();
    const run = async (bytes: Uint8Array, feeds: Record<string, unknown>, output: string, level: 'disabled' | 'all' = 'disabled') => {
      const session = await O.InferenceSession.create(bytes, { graphOptimizationLevel: level });
      const out = (await session.run(feeds as never))[output].data as Float32Array;
      await session.release();
      return out;
    };
    const xt = new O.Tensor('float32', x, [3, 16]);
    const flag = (v: number) => new O.Tensor('bool', Uint8Array.of(v), []);
    const want = await run(flat.model, { x: xt }, 'y_then');
    expect(Array.from(await run(q, { x: xt, flag: flag(1) }, 'y'))).to.deep.equal(Array.from(want));
    // Optimized (onnxruntime fuses inside the branches too), both branches stay close to the float model.
    for (const v of [1, 0]) {
      const float = await run(model(true), { x: xt, flag: flag(v) }, 'y', 'all');
      const got = await run(q, { x: xt, flag: flag(v) }, 'y', 'all');
      const largest = Math.max(...float.map(Math.abs));
      float.forEach((f, i) => expect(Math.abs(got[i] - f), `flag ${v} [${i}]`).to.be.below(0.02 * largest));
    }
    // onnxruntime fuses inside the branches as in the main graph.
    const branches = (await optimizedGraph(q)).node.find((n) => n.opType === 'If')!.attribute.map((a) => a.g!.node.map((n) => n.opType));
    expect(branches.flat().filter((o) => o === 'DynamicQuantizeMatMul' || o === 'MatMulIntegerToFloat')).to.have.length(4);
    expect(branches.flat()).to.not.include('MatMulInteger');
  });

  it('measures branch layers whose output is their branch\'s output (onnxruntime crashed on the exposed model before)', async () => {
    // ids → Gather → e → If(flag): then MatMul(e, W) → Add → Relu → Flatten(axis 2) → Gemm(transB) = the branch's
    // output; else MatMul(e, W) = the branch's output. Exposing such an output by listing it twice made onnxruntime
    // 1.30 crash (segmentation fault) while running the model.
    const f = (name: string, dims: number[], seed: number) => ({ name, dataType: TensorProto_DataType.FLOAT, dims: dims.map(BigInt), rawData: new Uint8Array(values(dims.reduce((a, b) => a * b, 1), seed, 0.3).buffer) });
    const n = (opType: string, input: string[], y: string, attribute: unknown[] = []) => ({ opType, name: y, input, output: [y], attribute });
    const bytes = toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 17n }],
      graph: {
        name: 'merged', input: [info('ids', TensorProto_DataType.INT64, [1, 'seq']), info('flag', TensorProto_DataType.BOOL, [])], output: [info('y')],
        initializer: [f('table', [50, 32], 1), f('W', [32, 32], 2)],
        node: [n('Gather', ['table', 'ids'], 'e'), { opType: 'If', name: 'if', input: ['flag'], output: ['y'], attribute: [
          { name: 'then_branch', type: AttributeProto_AttributeType.GRAPH, g: { name: 'then', initializer: [f('b', [32], 3), f('G', [16, 32], 4)], output: [info('t4')],
            node: [n('MatMul', ['e', 'W'], 't1'), n('Add', ['t1', 'b'], 't2'), n('Relu', ['t2'], 't3'),
              n('Flatten', ['t3'], 't3_2d', [{ name: 'axis', type: AttributeProto_AttributeType.INT, i: 2n }]),
              n('Gemm', ['t3_2d', 'G'], 't4', [{ name: 'transB', type: AttributeProto_AttributeType.INT, i: 1n }])] } },
          { name: 'else_branch', type: AttributeProto_AttributeType.GRAPH, g: { name: 'else', output: [info('e1')], node: [n('MatMul', ['e', 'W'], 'e1')] } },
        ] }],
      },
    } as never));
    // Run in a child process: a crash there fails the test instead of ending mocha.
    const script = `const { quantizeModel } = require(${JSON.stringify(path.join(root, 'dist', 'ts', 'onnx', 'quantize-model.js'))});
      const bytes = Buffer.from(process.argv[1], 'base64');
      const feed = (flag) => ({ ids: { data: BigInt64Array.of(3n, 7n), dims: [1, 2] }, flag: { data: Uint8Array.of(flag), dims: [] } });
      (async () => {
        for (const activations of [false, { bits: 8, method: 'dynamic' }, { bits: 8 }]) {
          const { report } = await quantizeModel(bytes, { weights: { bits: 8 }, activations, ...(activations && !activations.method ? { calibration: [feed(1), feed(0)] } : {}),
            evaluationFeeds: [feed(1), feed(0)] });
          console.log(JSON.stringify(report.layers.map((l) => [l.node, l.branch, Number.isFinite(l.outputSqnrDb)])));
        }
      })();`;
    const r = spawnSync(process.execPath, ['-e', script, Buffer.from(bytes).toString('base64')], { encoding: 'utf8' });
    expect(r.status, r.stderr).to.equal(0);
    const expected = JSON.stringify([['t1', 'then_branch', true], ['t4', 'then_branch', true], ['e1', 'else_branch', true]]);
    expect(r.stdout.trim().split('\n')).to.deep.equal([expected, expected, expected]);
  });

  it('quantizes MatMul inputs inside a Loop body, on every iteration', async () => {
    // Loop (3 trips) carrying v: m = v·W (W from the main graph), v_next = tanh(m·B); m is also a scan output.
    const matrix = (name: string, seed: number) => ({ name, dataType: TensorProto_DataType.FLOAT, dims: [16n, 16n], rawData: new Uint8Array(values(256, seed, 0.5).buffer) });
    const node = (opType: string, input: string[], y: string) => ({ opType, name: y, input, output: [y] });
    const body = {
      name: 'body', input: [info('i', TensorProto_DataType.INT64, []), info('c', TensorProto_DataType.BOOL, []), info('v')],
      output: [info('c_out', TensorProto_DataType.BOOL, []), info('v_next'), info('m_out')], initializer: [matrix('B', 31)],
      node: [node('MatMul', ['v', 'W'], 'm'), node('MatMul', ['m', 'B'], 'mb'), node('Tanh', ['mb'], 'v_next'), node('Identity', ['c'], 'c_out'), node('Identity', ['m'], 'm_out')],
    };
    const bytes = toBinary(ModelProtoSchema, create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [{ domain: '', version: 17n }],
      graph: {
        name: 'loop', input: [info('x', TensorProto_DataType.FLOAT, [2, 16])], output: [info('y'), info('ms')],
        initializer: [matrix('W', 30), { name: 'trips', dataType: TensorProto_DataType.INT64, dims: [], rawData: new Uint8Array(BigInt64Array.of(3n).buffer) },
          { name: 'go', dataType: TensorProto_DataType.BOOL, dims: [], rawData: Uint8Array.of(1) }],
        node: [{ opType: 'Loop', name: 'loop', input: ['trips', 'go', 'x'], output: ['y', 'ms'], attribute: [{ name: 'body', type: AttributeProto_AttributeType.GRAPH, g: body }] }],
      },
    } as never));
    const { model, report } = await quantizeModel(bytes, { weights: { bits: 8 }, activations: { bits: 8, method: 'dynamic' } });
    expect(report.layers.map((l) => [l.node, l.subgraph, l.input])).to.deep.equal([['m', 'loop', { bits: 8, dynamic: true }], ['mb', 'loop', { bits: 8, dynamic: true }]]);
    const quantizedBody = readModel(model).graph!.node[0].attribute[0].g!;
    expect(quantizedBody.node.filter((n) => n.opType === 'DynamicQuantizeLinear')).to.have.length(2);
    expect(quantizedBody.node.map((n) => n.opType)).to.not.include('MatMul');
    for (const output of report.evaluation!.outputs) expect(output.cosine, output.name).to.be.above(0.999);
    // Calibrated activations cannot see a Loop body's values: its layers keep float inputs, reported.
    const calibration = [{ x: { data: values(32, 32), dims: [2, 16] } }];
    const calibrated = await quantizeModel(bytes, { weights: { bits: 8 }, activations: { bits: 8 }, calibration });
    expect(calibrated.report.layers.map((l) => l.input)).to.deep.equal([undefined, undefined]);
    expect(calibrated.report.passes.flatMap((p) => p.skipped)).to.deep.include({ node: 'mb',
      reason: 'inside a Loop body of loop, whose values calibration cannot observe (If branches of the main graph only): input left float' });
  });

  it('rejects what it cannot do, saying what to pass', async () => {
    const cases: Array<[object, RegExp]> = [
      [{ weights: { bits: 8 }, activations: { bits: 4, method: 'dynamic' } }, /Expected 8 with method 'dynamic' .* for options\.activations\.bits but received 4/],
      [{ weights: { bits: 8 }, activations: { bits: 8, method: 'dynamic', signed: true } }, /options\.activations\.signed/],
      [{ weights: { bits: 8 }, activations: { bits: 8, method: 'dynamic', outputs: true } }, /options\.activations\.outputs/],
      [{ weights: { bits: 4 }, activations: { bits: 8, method: 'dynamic' } }, /Expected 8 with options\.activations\.method 'dynamic' \(MatMulInteger .* for options\.weights\.bits but received 4/],
      [{ weights: { bits: 8, granularity: 'block' }, activations: { bits: 8, method: 'dynamic' } }, /'channel' or 'tensor' with .* for options\.weights\.granularity but received "block"/],
      [{ weights: { bits: 8 }, firstLastLayerBits: 4, activations: { bits: 8, method: 'dynamic' } }, /Expected 8 with options\.activations\.method 'dynamic' .* for options\.firstLastLayerBits but received 4/],
      [{ weights: { bits: 8 }, activations: { bits: 8, method: 'dynamic', biasCorrection: true } }, /calibration feeds .* for options\.calibration/],
      [{ weights: { bits: 8 }, activations: { bits: 8, method: 'dyn' } }, /one of 'minmax', 'percentile', 'kl', 'aciq', 'mse', 'dynamic' for options\.activations\.method but received "dyn"/],
    ];
    for (const [options, message] of cases) {
      let error: unknown;
      try {
        await quantizeModel(oneMatMul(), options as never);
      } catch (e) {
        error = e;
      }
      expect(error, JSON.stringify(options)).to.be.instanceOf(RangeError);
      expect((error as Error).message, JSON.stringify(options)).to.match(message);
    }
  });

  it('`lowbit quantize --amethod dynamic` needs no --calib', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-cli-'));
    const r = spawnSync(process.execPath, [path.join(root, 'dist', 'ts', 'cli.js'), 'quantize', path.join(root, 'assets', 'mnist-cnn.onnx'), '--amethod', 'dynamic'],
      { cwd: dir, encoding: 'utf8' });
    expect(r.status, r.stderr).to.equal(0);
    expect(r.stdout).to.match(/fc +Gemm .* 8 dynamic/);
    expect(r.stdout).to.match(/1 layer inputs quantized dynamically/);
    expect(r.stdout).to.match(/skipped by dynamic-activations: conv1: .*ConvInteger/);
    expect(fs.readdirSync(dir)).to.deep.equal(['mnist-cnn.q.onnx']);
    fs.rmSync(dir, { recursive: true });
  });
});
