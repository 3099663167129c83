/**
 * Reads the convolution weights of an ONNX model, wherever they live
 * (initializers or Constant nodes), as float32 arrays. For experiments; the
 * model pipeline has its own graph IR.
 */
import { fromBinary } from '@bufbuild/protobuf';
import { ModelProtoSchema, TensorProto_DataType, type TensorProto } from 'onnx-buf';

export interface NamedTensor {
  name: string;
  dims: number[];
  data: Float32Array;
}

function floats(t: TensorProto): Float32Array | undefined {
  if (t.dataType !== TensorProto_DataType.FLOAT) return undefined;
  if (t.rawData && t.rawData.length > 0) {
    const copy = new Uint8Array(t.rawData);  // aligned copy
    return new Float32Array(copy.buffer, 0, copy.length / 4);
  }
  return Float32Array.from(t.floatData);
}

export function convWeights(modelBytes: Uint8Array): NamedTensor[] {
  const model = fromBinary(ModelProtoSchema, modelBytes);
  const graph = model.graph!;
  const tensors = new Map<string, TensorProto>();
  for (const t of graph.initializer) tensors.set(t.name, t);
  for (const node of graph.node) {
    if (node.opType !== 'Constant') continue;
    const value = node.attribute.find((a) => a.name === 'value')?.t;
    if (value) tensors.set(node.output[0], value);
  }
  const out: NamedTensor[] = [];
  for (const node of graph.node) {
    if (node.opType !== 'Conv') continue;
    const t = tensors.get(node.input[1]);
    const data = t && floats(t);
    if (data) out.push({ name: node.name || node.input[1], dims: t!.dims.map(Number), data });
  }
  return out;
}
