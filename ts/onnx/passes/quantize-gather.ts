/**
 * Quantized embedding tables (opt-in, `weights.gather`): a Gather on axis 0 whose data is a 2-D float32 constant
 * becomes onnxruntime's com.microsoft GatherBlockQuantized, which dequantizes only the rows it gathers (a
 * DequantizeLinear before the Gather would dequantize the whole table on every run). The table is quantized like the
 * layers' weights (symmetric, zero point 0) along the embedding axis: in blocks (`granularity: 'block'`), per row
 * ('channel': one block as long as the row) or with one scale ('tensor', repeated per row). Stored as int4 for 2-
 * and 4-bit values (2-bit values in int4: the operator's CPU kernel takes 4 and 8 bits) and as uint8 with bits = 8
 * for 8-bit ones (value + 128: the operator's default zero point there).
 */
import { TensorProto_DataType } from 'onnx-buf';

import { packInt4 } from '../../pack';
import { quantizationError, quantizeTensor, type QuantizeOptions } from '../../quantize';
import { dimsOf, intAttribute, isFloatTensor, makeIntAttribute, makeTensor, ownedTensor, weightValues, type Graph } from '../graph';
import { readLazyTensor } from '../model-io';
import { nodeLabel, type PassReport, type Steps } from './pass';
import type { WeightLayerReport } from './quantize-weights';

export interface GatherQuantization {
  bits: 2 | 4 | 8;
  granularity: 'channel' | 'block' | 'tensor';
  blockSize?: number;
  method: QuantizeOptions['method'];
  keepFloat?: string[];
}

export function* quantizeGathers(graph: Graph, options: GatherQuantization): Steps<{ report: PassReport; layers: WeightLayerReport[] }> {
  const report: PassReport = { pass: 'quantize-gather', changed: [], skipped: [] };
  const layers: WeightLayerReport[] = [];
  const keep = new Set(options.keepFloat ?? []);
  for (const node of graph.topologicalOrder()) {
    if (node.opType !== 'Gather' || (node.domain !== '' && node.domain !== 'ai.onnx')) continue;
    const label = nodeLabel(node);
    const table = graph.constant(node.input[0]);
    if (!table) continue;  // gathering from a computed tensor (shapes, ids): nothing to quantize
    const dims = dimsOf(table);
    const why = keep.has(node.name) || keep.has('Gather') ? 'kept in float (keepFloat)'
      : !isFloatTensor(table) ? 'its table is not float32'
        : dims.length !== 2 ? `its table is ${dims.length}-D, not 2-D`
          : intAttribute(node, 'axis', 0) !== 0 ? 'it gathers along axis 1, not 0 (rows)' : undefined;
    if (why) {
      report.skipped.push({ node: label, reason: why });
      continue;
    }
    const reading = readLazyTensor(table);
    if (reading) yield reading;
    const data = weightValues(table)!;
    const [rows, width] = dims;
    const blocked = options.granularity === 'block' && width >= (options.blockSize ?? 32);
    const q = quantizeTensor(data, {
      shape: dims, bits: options.bits, method: options.method,
      ...(blocked ? { granularity: 'block' as const, axis: 1, blockSize: options.blockSize ?? 32 }
        : options.granularity === 'tensor' ? { granularity: 'tensor' as const } : { granularity: 'channel' as const, axis: 0 }),
    });
    // One block per row unless blocked: the operator's block_size is a power of two of at least 16.
    const blockSize = blocked ? options.blockSize ?? 32 : Math.max(16, 2 ** Math.ceil(Math.log2(width)));
    const scales = q.granularity === 'tensor' ? new Float32Array(rows).fill(q.scale[0]) : q.scale;
    const base = node.input[0];
    const valuesName = graph.uniqueName(`${base}_quantized`);
    const scaleName = graph.uniqueName(`${base}_scale`);
    const eightBit = options.bits === 8;
    graph.addInitializer(eightBit
      ? ownedTensor(valuesName, TensorProto_DataType.UINT8, dims, Uint8Array.from(q.values, (v) => v + 128))
      : ownedTensor(valuesName, TensorProto_DataType.INT4, dims, packInt4(q)));
    graph.addInitializer(makeTensor(scaleName, TensorProto_DataType.FLOAT, [rows, scales.length / rows], new Uint8Array(scales.buffer, scales.byteOffset, scales.byteLength)));
    node.opType = 'GatherBlockQuantized';
    node.domain = 'com.microsoft';
    node.input = [valuesName, node.input[1], scaleName];
    node.attribute = [makeIntAttribute('gather_axis', 0), makeIntAttribute('quantize_axis', 1), makeIntAttribute('block_size', blockSize),
      ...(eightBit ? [makeIntAttribute('bits', 8)] : [])];
    graph.removeIfUnused(base);
    graph.importDomain('com.microsoft');
    const granularity = blocked ? `block ${blockSize} on axis 1` : options.granularity === 'tensor' ? 'tensor' : 'channel on axis 0';
    layers.push({
      node: label, op: 'Gather', weight: base, shape: dims, bits: options.bits, granularity, method: options.method ?? 'minmax',
      weightSqnrDb: quantizationError(data, q).sqnrDb, output: node.output[0],
    });
    report.changed.push(`${label}: ${options.bits}-bit ${granularity} table, GatherBlockQuantized`);
    yield label;
  }
  return { report, layers };
}
