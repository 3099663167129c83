// Mutated models (byte flips, truncation, and edits of the graph's nodes, tensors, attributes and declarations)
// through inspectModel, quantizeModel and finetune: each call either succeeds (a quantized model then ran in
// onnxruntime in the evaluation) or throws one of lowbit's typed errors with a message of its own, never a
// JavaScript internals error.
import { clone, fromBinary, toBinary } from '@bufbuild/protobuf';
import { expect } from 'chai';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ModelProtoSchema, type AttributeProto_AttributeType, type TensorProto } from 'onnx-buf';

import { finetune, inspectModel, quantizeModel } from '../../ts';

const assets = path.resolve(__dirname, '..', '..', '..', 'assets');
const base = fs.readFileSync(path.join(assets, 'mnist-cnn.onnx'));
const baseModel = fromBinary(ModelProtoSchema, base);

const OPS = ['Conv', 'Gemm', 'MatMul', 'Relu', 'Add', 'Mul', 'BatchNormalization', 'MaxPool', 'AveragePool', 'Reshape', 'Flatten',
  'Softmax', 'Identity', 'Clip', 'Transpose', 'Concat', 'Split', 'Pad', 'Resize', 'Gather', 'If', 'Loop', 'Constant', 'QuantizeLinear',
  'DequantizeLinear', 'ConvTranspose', 'GlobalAveragePool', 'Squeeze', 'Unsqueeze', 'NoSuchOp'];
const ODD_INTS = [-1, 0, 1, 2, 3, 7, -7, 1000, 2 ** 31 - 1, -(2 ** 31), 2 ** 40];

/** xorshift32 in [0, 1). */
function generator(seed: number): () => number {
  let s = (Math.imul(seed, 2654435761) >>> 0) || 1;
  return () => {
    s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0;
    return s / 4294967296;
  };
}

/** One mutated model: what was done and its bytes. */
function mutant(seed: number): { what: string; bytes: Uint8Array } {
  const random = generator(seed);
  const pick = <T>(items: T[]): T => items[Math.floor(random() * items.length)];
  const kind = Math.floor(random() * 16);
  if (kind === 0) {
    const bytes = Uint8Array.from(base);
    for (let i = 0, n = 1 + Math.floor(random() * 6); i < n; i++) bytes[Math.floor(random() * bytes.length)] = Math.floor(random() * 256);
    return { what: 'bytes changed', bytes };
  }
  if (kind === 1) return { what: 'truncated', bytes: base.subarray(0, Math.floor(random() * base.length)) };
  const m = clone(ModelProtoSchema, baseModel);
  const g = m.graph!;
  const values = [...g.input.map((v) => v.name), ...g.initializer.map((t) => t.name), ...g.node.flatMap((n) => n.output)];
  const done: string[] = [];
  for (let step = 0, steps = 1 + Math.floor(random() * 3); step < steps && g.node.length > 0; step++) {
    const node = pick(g.node);
    const tensor: TensorProto = pick(g.initializer);
    switch (Math.floor(random() * 14)) {
      case 0: node.opType = pick(OPS); done.push(`${node.name} made ${node.opType}`); break;
      case 1: node.input.splice(Math.floor(random() * node.input.length), 1); done.push(`an input of ${node.name} dropped`); break;
      case 2: node.input.push(random() < 0.3 ? '' : pick(values)); done.push(`an input added to ${node.name}`); break;
      case 3: node.output[0] = pick(values); done.push(`${node.name} writes ${node.output[0]}`); break;
      case 4: {
        const dims = tensor.dims.map(Number);
        const how = Math.floor(random() * 4);
        if (how === 0) dims.reverse(); else if (how === 1) dims.push(1); else if (how === 2) dims[Math.floor(random() * dims.length)] = pick([0, -1, 2, 1000]); else dims.pop();
        tensor.dims = dims.map(BigInt);
        done.push(`${tensor.name} dims [${dims}]`);
        break;
      }
      case 5: tensor.dataType = pick([0, 1, 2, 3, 5, 6, 7, 9, 10, 11, 16, 17, 21, 22, 100]); done.push(`${tensor.name} type ${tensor.dataType}`); break;
      case 6: tensor.rawData = tensor.rawData.subarray(0, Math.floor(random() * tensor.rawData.length)); done.push(`${tensor.name} data cut`); break;
      case 7: {
        const a = node.attribute.length ? pick(node.attribute) : undefined;
        if (!a) break;
        if (a.ints.length) a.ints = a.ints.map(() => BigInt(pick(ODD_INTS))); else a.i = BigInt(pick(ODD_INTS));
        a.f = pick([NaN, Infinity, -1, 0, 1e30]);
        done.push(`${node.name}.${a.name} values`);
        break;
      }
      case 8: {
        const a = node.attribute.length ? pick(node.attribute) : undefined;
        if (a) { a.type = pick([0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 99]) as AttributeProto_AttributeType; done.push(`${node.name}.${a.name} type ${a.type}`); }
        break;
      }
      case 9: g.node.splice(g.node.indexOf(node), 1); done.push(`${node.name} deleted`); break;
      case 10: {
        const v = pick([...g.input, ...g.output]);
        const t = v.type?.value.case === 'tensorType' ? v.type.value.value : undefined;
        if (t && random() < 0.5) t.elemType = pick([0, 2, 6, 10, 11, 99]); else t?.shape?.dim.splice(0, 1);
        done.push(`${v.name} declaration`);
        break;
      }
      case 11: m.opsetImport[0].version = BigInt(pick([1, 5, 6, 7, 9, 10, 11, 12, 13, 17, 19, 21, 22, 23, 30])); done.push(`opset ${m.opsetImport[0].version}`); break;
      case 12: {
        const a = g.node.indexOf(node), b = Math.floor(random() * g.node.length);
        [g.node[a], g.node[b]] = [g.node[b], g.node[a]];
        done.push(`nodes ${a} and ${b} swapped`);
        break;
      }
      default: {
        const f = new Float32Array(tensor.rawData.slice(0, tensor.rawData.byteLength & ~3).buffer);
        if (f.length) f[Math.floor(random() * f.length)] = pick([NaN, Infinity, 1e38, -1e38, 0]);
        tensor.rawData = new Uint8Array(f.buffer);
        done.push(`a value of ${tensor.name}`);
      }
    }
  }
  return { what: done.join('; '), bytes: toBinary(ModelProtoSchema, m) };
}

const TYPED = ['OnnxModelError', 'RangeError', 'TypeError', 'TrainingError'];
// What JavaScript says when code reads what is not there: never what lowbit should answer a bad model with.
const INTERNALS = new RegExp(['Cannot read prop', 'Cannot set prop', 'is not a function', 'is not iterable', "'undefined'", 'Invalid array length',
  'Maximum call stack', 'Invalid typed array length', 'Offset is outside', 'Cannot mix BigInt', 'Cannot convert a BigInt',
  'should be a multiple of', 'Array buffer allocation failed'].join('|'));

describe('mutated models', () => {
  it('300 mutants of the bundled CNN: each call succeeds or throws a typed error of lowbit\'s own', async function () {
    this.timeout(300_000);
    const calibration = path.join(assets, 'mnist-calibration');
    const images = { inputs: { data: Float32Array.from({ length: 16 * 784 }, (_, i) => (1 + Math.sin(i * 0.1)) / 2), dims: [16, 1, 28, 28] },
      labels: Int32Array.from({ length: 16 }, (_, i) => i % 10) };
    let succeeded = 0, refused = 0;
    for (let seed = 1; seed <= 300; seed++) {
      const { what, bytes } = mutant(seed);
      const calls: Array<[string, () => Promise<unknown>]> = [
        ['inspectModel', () => inspectModel(bytes)],
        ['quantizeModel W8', () => quantizeModel(bytes, { weights: { bits: 8 } })],
        ['quantizeModel W4A8', () => quantizeModel(bytes, { weights: { bits: 4, method: 'aciq' }, activations: { bits: 8 }, calibration })],
        ['finetune LSQ', () => finetune(bytes, images, { method: 'lsq', epochs: 1, batchSize: 8 })],
      ];
      for (const [call, run] of calls) {
        try {
          await run();
          succeeded++;
        } catch (e) {
          refused++;
          const context = `seed ${seed} (${what}), ${call}: ${(e as Error).name}: ${(e as Error).message}`;
          expect(TYPED, context).to.include((e as Error).name);
          expect((e as Error).message, context).to.not.match(INTERNALS);
        }
      }
    }
    // Both outcomes occur: the mutations neither all break the model nor all leave it valid.
    expect(succeeded, 'calls that succeeded').to.be.greaterThan(80);
    expect(refused, 'calls that were refused').to.be.greaterThan(400);
  });
});
