/**
 * Quantized embedding tables (opt-in, `weights.gather`): a Gather (inside subgraph bodies too) on axis 0 whose data is a 2-D float32
 * or float16 constant (float16 scales for a float16 table: the operator returns the scales' type)
 * becomes onnxruntime's com.microsoft GatherBlockQuantized, which dequantizes only the rows it gathers (a
 * DequantizeLinear before the Gather would dequantize the whole table on every run). The table is quantized like the
 * layers' weights (symmetric, zero point 0) along the embedding axis: in blocks (`granularity: 'block'`), per row
 * ('channel': one block as long as the row) or with one scale ('tensor', repeated per row). Stored as int4 for 2-
 * and 4-bit values (2-bit values in int4: the operator's CPU kernel takes 4 and 8 bits) and as uint8 with bits = 8
 * for 8-bit ones (value + 128: the operator's default zero point there).
 */
import { TensorProto_DataType, type GraphProto, type NodeProto, type TensorProto } from 'onnx-buf';

import { toFloat16Array } from '../../float16';
import { packInt4 } from '../../pack';
import { quantizationError, type QuantizeOptions } from '../../quantize';
import { allNodes, dimsOf, intAttribute, isFloat16Tensor, isFloatTensor, isOnnxDomain, makeIntAttribute, makeTensor, ownedTensor, weightValues, type Graph } from '../graph';
import { readLazyTensor } from '../model-io';
import { keptFloat, nodeLabel, placeOf, type PassReport, type Steps } from './pass';
import { checkFiniteWeights, quantized, withFloat16Scales, type WeightLayerReport } from './quantize-weights';

/**
 * How the passes that quantize tensors beside the layers' weights (embedding tables, recurrent weights) take the
 * weights' options: bits, granularity, block size and method; and the names kept float.
 */
export interface WeightFormat {
  bits: 2 | 4 | 8;
  granularity: 'channel' | 'block' | 'tensor';
  blockSize?: number;
  method: QuantizeOptions['method'];
  keepFloat?: string[];
  /** The tensors may be views of the caller's model bytes: copied before native worker threads read them. */
  callerBytes?: boolean;
}

export type GatherQuantization = WeightFormat;

/** How many Gathers (inside subgraph bodies too) this pass would convert. */
export function quantizableTableCount(graph: Graph, keepFloat: string[] = []): number {
  const keep = new Set(keepFloat);
  return candidates(graph).filter(({ node, scopes }) => whyNot(graph, node, scopes, keep) === undefined).length;
}

// The Gathers, the main graph's in topological order, then those inside bodies (with the subgraphs around them).
function candidates(graph: Graph): ReturnType<typeof allNodes> {
  return allNodes(graph).filter(({ node }) => node.opType === 'Gather');
}

/**
 * The Gathers of float constant tables (embeddings) and why each would stay float with `weights.gather` (undefined:
 * it would be converted), for `lowbit inspect`.
 */
export function embeddingTables(graph: Graph): Array<ReturnType<typeof allNodes>[number] & { reason?: string }> {
  return candidates(graph).map((c) => ({ ...c, reason: whyNot(graph, c.node, c.scopes, new Set()) }))
    .filter((c) => c.reason !== '');
}

// Why a Gather of a constant is not converted (undefined: it is); '' when there is nothing worth reporting.
function whyNot(graph: Graph, node: NodeProto, scopes: GraphProto[], keep: Set<string>): string | undefined {
  if (!isOnnxDomain(node.domain)) return '';
  const table = graph.constantIn(node.input[0], scopes)?.tensor;
  if (!table || !(isFloatTensor(table) || isFloat16Tensor(table))) return '';  // a computed tensor or integer constants (shapes, ids)
  if (keptFloat(keep, node)) return 'kept in float (keepFloat)';
  const dims = dimsOf(table);
  if (dims.length !== 2) return `its table is ${dims.length}-D, not 2-D`;
  const axis = intAttribute(node, 'axis', 0);
  return axis === 0 || axis === -2 ? undefined : 'it gathers along the table\'s columns, not its rows';
}

export function* quantizeGathers(graph: Graph, options: GatherQuantization): Steps<{ report: PassReport; layers: WeightLayerReport[] }> {
  const report: PassReport = { pass: 'quantize-gather', changed: [], skipped: [] };
  const layers: WeightLayerReport[] = [];
  const keep = new Set(options.keepFloat ?? []);
  // A table several Gathers read (shared encoder/decoder embeddings, both branches of a merged decoder) is quantized
  // once; its constants go into each Gather's own graph (copies sharing the bytes where the graphs differ), as the
  // weight pass does for layers inside subgraphs.
  const converted = new Map<TensorProto, {
    base: string; home: GraphProto; scope: GraphProto; constants: [TensorProto, TensorProto]; attributes: Array<[string, number]>; layer: WeightLayerReport;
  }>();
  for (const { node, scopes, owner } of candidates(graph)) {
    const why = whyNot(graph, node, scopes, keep);
    const label = nodeLabel(node);
    if (why) report.skipped.push({ node: label, reason: why });
    if (why !== undefined) continue;
    const found = graph.constantIn(node.input[0], scopes)!;
    const table = found.tensor;
    const home = found.home ?? graph.graph;
    const scope = scopes[0] ?? graph.graph;
    const where = owner ? placeOf(owner, scopes) : {};
    const base = node.input[0];
    const earlier = converted.get(table);
    if (earlier) {
      const constants = earlier.scope === scope ? earlier.constants : graph.copyConstants(earlier.constants, scope);
      convert(graph, node, constants, earlier.attributes);
      layers.push({ ...earlier.layer, node: label, output: node.output[0], ...where });
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
    let q = yield* quantized(data, {
      shape: dims, bits: options.bits, method: options.method,
      ...(blocked ? { granularity: 'block' as const, axis: 1, blockSize: requestedBlock }
        : options.granularity === 'tensor' ? { granularity: 'tensor' as const } : { granularity: 'channel' as const, axis: 0 }),
    }, true, !!options.callerBytes);
    // A float16 table gathers float16 rows: float16 scales (the operator's output type is theirs), values rounded against them.
    const half = isFloat16Tensor(table);
    if (half) q = withFloat16Scales(q, data, label);
    // One block per row unless blocked: the operator's block_size is a power of two of at least 16.
    const blockSize = blocked ? requestedBlock : Math.max(16, 2 ** Math.ceil(Math.log2(width)));
    const scales = q.granularity === 'tensor' ? new Float32Array(rows).fill(q.scale[0]) : q.scale;
    const eightBit = options.bits === 8;
    const values = eightBit
      ? ownedTensor(graph.uniqueName(`${base}_quantized`), TensorProto_DataType.UINT8, dims, Uint8Array.from(q.values, (v) => v + 128))
      : ownedTensor(graph.uniqueName(`${base}_quantized`), TensorProto_DataType.INT4, dims, packInt4(q));
    const scaleBytes = half ? new Uint8Array(toFloat16Array(scales).buffer) : new Uint8Array(scales.buffer, scales.byteOffset, scales.byteLength);
    const scale = makeTensor(graph.uniqueName(`${base}_scale`), half ? TensorProto_DataType.FLOAT16 : TensorProto_DataType.FLOAT, [rows, scales.length / rows], scaleBytes);
    graph.addInitializer(values, scope);
    graph.addInitializer(scale, scope);
    const attributes: Array<[string, number]> = [['gather_axis', 0], ['quantize_axis', 1], ['block_size', blockSize], ...(eightBit ? [['bits', 8] as [string, number]] : [])];
    convert(graph, node, [values, scale], attributes);
    const granularity = blocked ? `block ${blockSize} on axis 1` : options.granularity === 'tensor' ? 'tensor' : 'channel on axis 0';
    const layer: WeightLayerReport = {
      node: label, op: 'Gather', weight: base, shape: dims, bits: options.bits, granularity, method: options.method ?? 'minmax',
      weightSqnrDb: quantizationError(data, q).sqnrDb, output: node.output[0], ...where,
    };
    layers.push(layer);
    converted.set(table, { base, home, scope, constants: [values, scale], attributes, layer });
    report.changed.push(`${label}: ${options.bits}-bit ${granularity} table, GatherBlockQuantized`);
    yield label;
  }
  for (const { base, home, layer } of converted.values()) {
    graph.removeIfUnused(base, home);
    const others = graph.consumers(base, home).map(nodeLabel);
    if (others.length > 0) report.skipped.push({ node: layer.node, reason: `the float table '${base}' stays too: ${others.join(', ')} read(s) it` });
  }
  if (layers.length === 0 && report.skipped.length === 0) report.skipped.push({ node: '(model)', reason: 'it has no Gather of a float table (an embedding) to quantize' });
  return { report, layers };
}

// The Gather becomes GatherBlockQuantized over the quantized table (its indices stay).
function convert(graph: Graph, node: NodeProto, [values, scales]: [TensorProto, TensorProto], attributes: Array<[string, number]>): void {
  node.opType = 'GatherBlockQuantized';
  node.domain = 'com.microsoft';
  node.input = [values.name, node.input[1], scales.name];
  node.attribute = attributes.map(([name, value]) => makeIntAttribute(name, value));
  graph.importDomain('com.microsoft');
}
