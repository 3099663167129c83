/**
 * Makes sparse initializers (SparseTensorProto: NNZ values, their int64 indices — linear, [NNZ], or coordinates,
 * [NNZ, rank] — and the dense dims) ordinary dense initializers, in the main graph and in subgraph bodies, so that
 * the layers reading them have constant weights to quantize (QDQ weights are dense anyway). Every fixed-width
 * element type; a tensor that would reach 2 GB dense, or of a 4-bit or 2-bit type, stays sparse (reported as
 * skipped); malformed values, indices or dims are an OnnxModelError.
 */
import { TensorProto_DataType, type GraphProto, type SparseTensorProto, type TensorProto } from 'onnx-buf';

import { makeTensor, type Graph } from '../graph';
import { OnnxModelError, rawLength, subgraphsOf } from '../model-io';
import type { PassReport } from './pass';

/** Bytes per element of the types a dense initializer can hold in raw data (4-bit and 2-bit types excluded). */
const ELEMENT_BYTES = new Map<TensorProto_DataType, number>([
  [TensorProto_DataType.FLOAT, 4], [TensorProto_DataType.DOUBLE, 8], [TensorProto_DataType.FLOAT16, 2], [TensorProto_DataType.BFLOAT16, 2],
  [TensorProto_DataType.INT8, 1], [TensorProto_DataType.UINT8, 1], [TensorProto_DataType.BOOL, 1], [TensorProto_DataType.INT16, 2],
  [TensorProto_DataType.UINT16, 2], [TensorProto_DataType.INT32, 4], [TensorProto_DataType.UINT32, 4], [TensorProto_DataType.INT64, 8],
  [TensorProto_DataType.UINT64, 8],
]);

const DENSE_LIMIT = 2 ** 31;

export function densifySparseInitializers(graph: Graph): PassReport {
  const report: PassReport = { pass: 'densify-sparse-initializers', changed: [], skipped: [] };
  const visit = (g: GraphProto) => {
    g.sparseInitializer = g.sparseInitializer.filter((sparse) => {
      const name = sparse.values?.name ?? '';
      const dense = denseTensor(sparse);
      if (typeof dense === 'string') {
        report.skipped.push({ node: name, reason: dense });
        return true;
      }
      g.initializer.push(dense);
      report.changed.push(`${name}: ${Number(sparse.values!.dims[0] ?? 0)} stored values made a dense [${dense.dims.join(', ')}] initializer`);
      return false;
    });
    for (const n of g.node) subgraphsOf(n).forEach(visit);
  };
  visit(graph.graph);
  return report;
}

/** The dense tensor, or why it stays sparse. */
function denseTensor(sparse: SparseTensorProto): TensorProto | string {
  const values = sparse.values;
  const name = values?.name ?? '';
  if (!values || !sparse.indices) throw new OnnxModelError(`Sparse initializer '${name}' lacks its values or indices: the model file is corrupted; re-export it.`);
  const size = ELEMENT_BYTES.get(values.dataType);
  if (size === undefined) return `its element type ${TensorProto_DataType[values.dataType] ?? values.dataType} is not densified by lowbit`;
  const dims = sparse.dims.map(Number);
  const count = dims.reduce((a, d) => a * d, 1);
  if (dims.some((d) => !Number.isSafeInteger(d) || d < 0)) throw corrupted(name, `its dims [${dims.join(', ')}] are not sizes`);
  if (count * size >= DENSE_LIMIT) return `dense it would take ${count * size} bytes (2 GB or more)`;
  const stored = valueBytes(values, size);
  const nnz = stored.length / size;
  if (values.dims.length !== 1 || Number(values.dims[0]) !== nnz) throw corrupted(name, `its values hold ${nnz} elements for dims [${values.dims.join(', ')}]`);
  const positions = linearIndices(sparse.indices, dims, nnz, name);
  const out = new Uint8Array(count * size);
  for (let i = 0; i < nnz; i++) out.set(stored.subarray(i * size, (i + 1) * size), positions[i] * size);
  return makeTensor(name, values.dataType, dims, out);
}

function corrupted(name: string, what: string): OnnxModelError {
  return new OnnxModelError(`Sparse initializer '${name}': ${what}. The model file is corrupted; re-export it.`);
}

/** A tensor's elements as little-endian bytes, from raw data or its typed field. */
function valueBytes(t: TensorProto, size: number): Uint8Array {
  if (rawLength(t) > 0) return t.rawData;
  const out = new Uint8Array(size * fieldLength(t));
  const view = new DataView(out.buffer);
  switch (t.dataType) {
    case TensorProto_DataType.FLOAT: t.floatData.forEach((v, i) => view.setFloat32(4 * i, v, true)); break;
    case TensorProto_DataType.DOUBLE: t.doubleData.forEach((v, i) => view.setFloat64(8 * i, v, true)); break;
    case TensorProto_DataType.INT64: t.int64Data.forEach((v, i) => view.setBigInt64(8 * i, BigInt(v), true)); break;
    case TensorProto_DataType.UINT32: t.uint64Data.forEach((v, i) => view.setUint32(4 * i, Number(v), true)); break;
    case TensorProto_DataType.UINT64: t.uint64Data.forEach((v, i) => view.setBigUint64(8 * i, BigInt(v), true)); break;
    // int32_data holds the rest (float16 and bfloat16 as their bit patterns), one element per value.
    default: t.int32Data.forEach((v, i) => {
      for (let b = 0; b < size; b++) out[size * i + b] = (v >> (8 * b)) & 0xff;
    });
  }
  return out;
}

function fieldLength(t: TensorProto): number {
  switch (t.dataType) {
    case TensorProto_DataType.FLOAT: return t.floatData.length;
    case TensorProto_DataType.DOUBLE: return t.doubleData.length;
    case TensorProto_DataType.INT64: return t.int64Data.length;
    case TensorProto_DataType.UINT32: case TensorProto_DataType.UINT64: return t.uint64Data.length;
    default: return t.int32Data.length;
  }
}

/** Each stored value's position in the dense tensor, from linear indices [NNZ] or coordinates [NNZ, rank]. */
function linearIndices(indices: TensorProto, dims: number[], nnz: number, name: string): Float64Array {
  if (indices.dataType !== TensorProto_DataType.INT64) throw corrupted(name, `its indices are ${TensorProto_DataType[indices.dataType]}, not INT64`);
  const raw = valueBytes(indices, 8);
  const all = new BigInt64Array(raw.length / 8);
  new Uint8Array(all.buffer).set(raw);
  const shape = indices.dims.map(Number);
  const coordinates = shape.length === 2;
  if (!(shape.length === 1 && shape[0] === nnz) && !(coordinates && shape[0] === nnz && shape[1] === dims.length) || all.length !== nnz * (coordinates ? dims.length : 1)) {
    throw corrupted(name, `its indices have dims [${shape.join(', ')}] for ${nnz} values of a rank-${dims.length} tensor (expected [${nnz}] or [${nnz}, ${dims.length}])`);
  }
  const count = dims.reduce((a, d) => a * d, 1);
  const out = new Float64Array(nnz);
  for (let i = 0; i < nnz; i++) {
    let at = 0;
    if (coordinates) {
      for (let k = 0; k < dims.length; k++) {
        const c = Number(all[i * dims.length + k]);
        if (c < 0 || c >= dims[k]) throw corrupted(name, `value ${i} has coordinate ${c} on axis ${k}, outside its dims [${dims.join(', ')}]`);
        at = at * dims[k] + c;
      }
    } else {
      at = Number(all[i]);
    }
    if (!(at >= 0 && at < count)) throw corrupted(name, `value ${i} has index ${at}, outside its ${count} elements`);
    out[i] = at;
  }
  return out;
}
