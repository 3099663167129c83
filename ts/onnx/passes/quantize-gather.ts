/**
 * Quantized embedding tables (opt-in, `weights.gather`): a Gather on axis 0 whose data is a 2-D float32 constant
 * becomes onnxruntime's com.microsoft GatherBlockQuantized, which dequantizes only the rows it gathers (a
 * DequantizeLinear before the Gather would dequantize the whole table on every run). The table is quantized like the
 * layers' weights (symmetric, zero point 0) along the embedding axis: in blocks (`granularity: 'block'`), per row
 * ('channel': one block as long as the row) or with one scale ('tensor', repeated per row). Stored as int4 for 2-
 * and 4-bit values (2-bit values in int4: the operator's CPU kernel takes 4 and 8 bits) and as uint8 with bits = 8
 * for 8-bit ones (value + 128: the operator's default zero point there).
 */
import { TensorProto_DataType, type NodeProto, type TensorProto } from 'onnx-buf';

import { packInt4 } from '../../pack';
import { quantizationError, type QuantizeOptions } from '../../quantize';
import { dimsOf, intAttribute, isFloat16Tensor, isFloatTensor, isOnnxDomain, makeIntAttribute, makeTensor, ownedTensor, subgraphNodes, weightValues, type Graph } from '../graph';
import { readLazyTensor } from '../model-io';
import { nodeLabel, type PassReport, type Steps } from './pass';
import { checkFiniteWeights, quantized, type WeightLayerReport } from './quantize-weights';

export interface GatherQuantization {
  bits: 2 | 4 | 8;
  granularity: 'channel' | 'block' | 'tensor';
  blockSize?: number;
  method: QuantizeOptions['method'];
  keepFloat?: string[];
}

/** Whether a node is a Gather this pass converts: axis 0 (rows) of a 2-D float32 constant, not kept in float. */
export function isQuantizableTable(graph: Graph, node: NodeProto, keepFloat: string[] = []): boolean {
  return whyNot(graph, node, new Set(keepFloat)) === undefined;
}

// Why a Gather of a constant is not converted (undefined: it is); '' when there is nothing worth reporting.
function whyNot(graph: Graph, node: NodeProto, keep: Set<string>): string | undefined {
  if (node.opType !== 'Gather' || !isOnnxDomain(node.domain)) return '';
  const table = graph.constant(node.input[0]);
  if (!table || !(isFloatTensor(table) || isFloat16Tensor(table))) return '';  // a computed tensor or integer constants (shapes, ids)
  if (keep.has(node.name) || keep.has('Gather')) return 'kept in float (keepFloat)';
  if (isFloat16Tensor(table)) return 'float16 tables are not quantized yet';
  const dims = dimsOf(table);
  if (dims.length !== 2) return `its table is ${dims.length}-D, not 2-D`;
  const axis = intAttribute(node, 'axis', 0);
  return axis === 0 || axis === -2 ? undefined : 'it gathers along the table\'s columns, not its rows';
}

export function* quantizeGathers(graph: Graph, options: GatherQuantization): Steps<{ report: PassReport; layers: WeightLayerReport[] }> {
  const report: PassReport = { pass: 'quantize-gather', changed: [], skipped: [] };
  const layers: WeightLayerReport[] = [];
  const keep = new Set(options.keepFloat ?? []);
  // A table several Gathers read (shared encoder/decoder embeddings) is quantized once.
  const converted = new Map<TensorProto, { base: string; inputs: [string, string]; attributes: Array<[string, number]>; layer: WeightLayerReport }>();
  for (const node of graph.topologicalOrder()) {
    const why = whyNot(graph, node, keep);
    const label = nodeLabel(node);
    if (why) report.skipped.push({ node: label, reason: why });
    if (why !== undefined) continue;
    const table = graph.constant(node.input[0])!;
    const base = node.input[0];
    const earlier = converted.get(table);
    if (earlier) {
      convert(graph, node, earlier.inputs, earlier.attributes);
      layers.push({ ...earlier.layer, node: label, output: node.output[0] });
      report.changed.push(`${label}: shares the quantized table of ${earlier.layer.node}`);
      yield label;
      continue;
    }
    const reading = readLazyTensor(table);
    if (reading) yield reading;
    const data = weightValues(table)!;
    checkFiniteWeights(node, base, data);
    const dims = dimsOf(table);
    const [rows, width] = dims;
    const requestedBlock = options.blockSize ?? 32;
    const blocked = options.granularity === 'block' && width >= requestedBlock;
    const q = yield* quantized(data, {
      shape: dims, bits: options.bits, method: options.method,
      ...(blocked ? { granularity: 'block' as const, axis: 1, blockSize: requestedBlock }
        : options.granularity === 'tensor' ? { granularity: 'tensor' as const } : { granularity: 'channel' as const, axis: 0 }),
    }, true);
    // One block per row unless blocked: the operator's block_size is a power of two of at least 16.
    const blockSize = blocked ? requestedBlock : Math.max(16, 2 ** Math.ceil(Math.log2(width)));
    const scales = q.granularity === 'tensor' ? new Float32Array(rows).fill(q.scale[0]) : q.scale;
    const valuesName = graph.uniqueName(`${base}_quantized`);
    const scaleName = graph.uniqueName(`${base}_scale`);
    const eightBit = options.bits === 8;
    graph.addInitializer(eightBit
      ? ownedTensor(valuesName, TensorProto_DataType.UINT8, dims, Uint8Array.from(q.values, (v) => v + 128))
      : ownedTensor(valuesName, TensorProto_DataType.INT4, dims, packInt4(q)));
    graph.addInitializer(makeTensor(scaleName, TensorProto_DataType.FLOAT, [rows, scales.length / rows], new Uint8Array(scales.buffer, scales.byteOffset, scales.byteLength)));
    const attributes: Array<[string, number]> = [['gather_axis', 0], ['quantize_axis', 1], ['block_size', blockSize], ...(eightBit ? [['bits', 8] as [string, number]] : [])];
    convert(graph, node, [valuesName, scaleName], attributes);
    const granularity = blocked ? `block ${blockSize} on axis 1` : options.granularity === 'tensor' ? 'tensor' : 'channel on axis 0';
    const layer: WeightLayerReport = {
      node: label, op: 'Gather', weight: base, shape: dims, bits: options.bits, granularity, method: options.method ?? 'minmax',
      weightSqnrDb: quantizationError(data, q).sqnrDb, output: node.output[0],
    };
    layers.push(layer);
    converted.set(table, { base, inputs: [valuesName, scaleName], attributes, layer });
    report.changed.push(`${label}: ${options.bits}-bit ${granularity} table, GatherBlockQuantized`);
    yield label;
  }
  for (const { base, layer } of converted.values()) {
    graph.removeIfUnused(base);
    const others = graph.consumers(base).map(nodeLabel);
    if (others.length > 0) report.skipped.push({ node: layer.node, reason: `the float table '${base}' stays too: ${others.join(', ')} read(s) it` });
  }
  // Gathers inside If/Loop/Scan bodies (merged decoders keep theirs there) are not converted yet: say so.
  for (const node of subgraphGathers(graph)) report.skipped.push({ node: nodeLabel(node), reason: 'inside a subgraph: tables there are not quantized yet' });
  return { report, layers };
}

// The Gather becomes GatherBlockQuantized over the quantized table (its indices stay).
function convert(graph: Graph, node: NodeProto, [values, scales]: [string, string], attributes: Array<[string, number]>): void {
  node.opType = 'GatherBlockQuantized';
  node.domain = 'com.microsoft';
  node.input = [values, node.input[1], scales];
  node.attribute = attributes.map(([name, value]) => makeIntAttribute(name, value));
  graph.importDomain('com.microsoft');
}

// Gathers of a float constant inside subgraph bodies.
function subgraphGathers(graph: Graph): NodeProto[] {
  return subgraphNodes(graph).filter(({ node, scopes }) => {
    const t = node.opType === 'Gather' ? graph.constantIn(node.input[0], scopes)?.tensor : undefined;
    return !!t && (isFloatTensor(t) || isFloat16Tensor(t));
  }).map((l) => l.node);
}
