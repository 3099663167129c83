/**
 * Rewrites QDQ patterns that onnxruntime's graph optimisations (level 'extended', part of its
 * default 'all') fuse into kernels that cannot run them, so that a quantized model runs with
 * onnxruntime's default session options. Each rewrite computes exactly what the QDQ model
 * computed before (checked by the tests at every optimisation level). Found with
 * onnxruntime-node 1.30:
 *
 * - 4-bit activations: the QDQ fusions accept uint4/int4 inputs for QLinearConv and move
 *   Q/DQ pairs across MaxPool, neither of which takes 4-bit types ("invalid model"). The
 *   pair is stored in 8 bits with a Clip to the 4-bit range between Q and DQ:
 *   clip(saturate8(round(x/s) + z), qmin4, qmax4) = saturate4(round(x/s) + z), as z lies in range.
 *   onnxruntime then runs such a layer with its 8-bit kernels where the weights allow.
 * - 2-bit weights of a layer whose input is quantized: fused into QLinearConv or
 *   MatMulIntegerToFloat, which reject int2. Stored as int4 (the same values).
 * - Blocked weights of a MatMul whose input is quantized: fused into MatMulIntegerToFloat,
 *   which broadcasts the [blocks, N] scales wrongly and fails at run time. The weights are
 *   stored transposed, blocked along their last axis, and a Transpose restores them, so the
 *   MatMul no longer reads a DequantizeLinear directly.
 */
import { TensorProto_DataType, type NodeProto, type TensorProto } from 'onnx-buf';

import { packInt2, packInt4, unpackInt2, unpackInt4 } from '../../pack';
import { toFloat16Array } from '../../float16';
import { attribute, dimsOf, floatData, intAttribute, makeIntsAttribute, makeTensor, subgraphNodes, weightValues, type Graph } from '../graph';
import { nodeLabel, runSteps, type PassReport, type Steps } from './pass';

const FOUR_BIT = new Set([TensorProto_DataType.INT4, TensorProto_DataType.UINT4]);
const TWO_BIT = new Map([[TensorProto_DataType.INT2, TensorProto_DataType.INT4], [TensorProto_DataType.UINT2, TensorProto_DataType.UINT4]]);

/** One graph (the main graph or a subgraph body) as the rewrites see it; new nodes go right after `after`. */
interface Scope {
  nodes: NodeProto[];
  constant(name: string): TensorProto | undefined;
  producer(name: string): NodeProto | undefined;
  consumers(name: string): NodeProto[];
  addInitializer(t: TensorProto): void;
  insertAfter(after: NodeProto, node: NodeProto): void;
}

/** The main graph and every subgraph body (layers inside If branches get Q/DQ pairs too). */
function scopes(graph: Graph): Scope[] {
  const bodies = new Set(subgraphNodes(graph).map((l) => l.scopes[0]));
  return [graph.graph, ...bodies].map((g): Scope => ({
    // A body's own constants only: one of an enclosing graph may have other readers there, which its rewrite would change.
    nodes: g.node, constant: (n) => graph.constant(n, g), producer: (n) => graph.producer(n, g), consumers: (n) => graph.consumers(n, g),
    addInitializer: (t) => graph.addInitializer(t, g),
    // The main graph is sorted at the end; a body keeps its order.
    insertAfter: g === graph.graph ? (_, node) => g.node.push(node) : (after, node) => g.node.splice(g.node.indexOf(after) + 1, 0, node),
  }));
}

export function fitOnnxruntime(graph: Graph): PassReport {
  return runSteps(fitOnnxruntimeSteps(graph));
}

/** fitOnnxruntime a weight at a time, for runStepsAsync: a large model's transposes do not hold the event loop. */
export function* fitOnnxruntimeSteps(graph: Graph): Steps<PassReport> {
  const report: PassReport = { pass: 'fit-onnxruntime', changed: [], skipped: [] };
  for (const scope of scopes(graph)) {
    widenFourBitActivations(graph, scope, report);
    const dequantizedInput = (layer: NodeProto, weight: string) => layer.input.some((i) => i !== weight && scope.producer(i)?.opType === 'DequantizeLinear');
    for (const dq of [...scope.nodes]) {
      if (dq.opType !== 'DequantizeLinear' || dq.domain !== '') continue;
      const values = scope.constant(dq.input[0]);
      if (!values) continue;
      const layers = scope.consumers(dq.output[0]).filter((n) => dequantizedInput(n, dq.output[0]));
      if (layers.length === 0) continue;
      yield;
      if (TWO_BIT.has(values.dataType)) {
        widenTwoBitWeights(scope, dq, values);
        report.changed.push(`${dq.input[0]}: int2 weights stored as int4 (${layers.map(nodeLabel).join(', ')} has a quantized input)`);
      }
      if (intAttribute(dq, 'block_size', 0) > 0 && layers.some((n) => n.opType === 'MatMul')) {
        if (transposeBlockedWeights(graph, scope, dq, values)) {
          report.changed.push(`${dq.input[0]}: blocked weights stored transposed, then Transpose (${layers.map(nodeLabel).join(', ')} has a quantized input)`);
        } else {
          report.skipped.push({
            node: layers.map(nodeLabel).join(', '),
            reason: 'blocked weights that are not 2-D, or whose constants other nodes share: onnxruntime may fail to run this MatMul at its default optimisation level',
          });
        }
      }
    }
  }
  graph.sort();
  return report;
}

function widenFourBitActivations(graph: Graph, scope: Scope, report: PassReport): void {
  // All 4-bit Q nodes first: a zero point shared by several of them is retyped once.
  const fourBit = scope.nodes.filter((q) => q.opType === 'QuantizeLinear' && q.domain === '' && q.input.length >= 3 &&
    FOUR_BIT.has(scope.constant(q.input[2])?.dataType ?? TensorProto_DataType.UNDEFINED));
  for (const q of fourBit) {
    const zeroPoint = scope.constant(q.input[2])!;
    const signed = zeroPoint.dataType === TensorProto_DataType.INT4 || zeroPoint.dataType === TensorProto_DataType.INT8;
    const wide = signed ? TensorProto_DataType.INT8 : TensorProto_DataType.UINT8;
    if (FOUR_BIT.has(zeroPoint.dataType)) {
      const zp = signed ? unpackInt4(zeroPoint.rawData, 1)[0] : unpackInt4(zeroPoint.rawData, 1, false)[0];
      // Shared by the Q and its DQs: all now read and write 8-bit values.
      retype(zeroPoint, wide, Uint8Array.of(zp & 0xff));
    }
    const narrow = graph.uniqueName(`${q.output[0]}_4bit`);
    const bound = (suffix: string, v: number) => {
      const name = graph.uniqueName(`${q.output[0]}_${suffix}`);
      scope.addInitializer(makeTensor(name, wide, [], Uint8Array.of(v & 0xff)));
      return name;
    };
    const [lo, hi] = signed ? [-8, 7] : [0, 15];
    const clip = graph.newNode('Clip', [narrow, bound('min', lo), bound('max', hi)], [q.output[0]], `${q.name || q.output[0]}_clip`);
    q.output[0] = narrow;
    scope.insertAfter(q, clip);
    report.changed.push(`${q.input[0]}: 4-bit activation stored in 8 bits with a Clip to [${lo}, ${hi}]`);
  }
}

function retype(t: TensorProto, dataType: TensorProto_DataType, raw: Uint8Array): void {
  t.dataType = dataType;
  t.rawData = Uint8Array.from(raw);
  t.int32Data = [];
}

function widenTwoBitWeights(scope: Scope, dq: NodeProto, values: TensorProto): void {
  const signed = values.dataType === TensorProto_DataType.INT2;
  const asInt4 = (t: TensorProto) => {
    const n = dimsOf(t).reduce((a, b) => a * b, 1);
    retype(t, TWO_BIT.get(t.dataType)!, packInt4(signed ? unpackInt2(t.rawData, n) : unpackInt2(t.rawData, n, false)));
  };
  asInt4(values);
  const zeroPoint = dq.input[2] ? scope.constant(dq.input[2]) : undefined;
  if (zeroPoint && TWO_BIT.has(zeroPoint.dataType)) asInt4(zeroPoint);
}

/** Values [K, N] blocked along axis 0 become [N, K] blocked along axis 1, then a Transpose; false when not 2-D or shared. */
function transposeBlockedWeights(graph: Graph, scope: Scope, dq: NodeProto, values: TensorProto): boolean {
  const dims = dimsOf(values);
  const scale = scope.constant(dq.input[1]);
  if (dims.length !== 2 || !scale || intAttribute(dq, 'axis', 1) !== 0) return false;
  // Constants another node also reads would change under it.
  if (dq.input.slice(0, 3).some((name) => name && scope.consumers(name).some((n) => n !== dq))) return false;
  for (const name of dq.input.slice(0, 3)) {
    const t = name ? scope.constant(name) : undefined;
    if (t) transpose2d(t);
  }
  attribute(dq, 'axis')!.i = 1n;
  const transposed = graph.uniqueName(`${dq.output[0]}_transposed`);
  const restore = graph.newNode('Transpose', [transposed], [dq.output[0]], `${dq.name || dq.output[0]}_transpose`, [makeIntsAttribute('perm', [1, 0])]);
  dq.output[0] = transposed;
  scope.insertAfter(dq, restore);
  return true;
}

/** Transposes a 2-D constant of 8-, 4- or 2-bit integers, float32 or float16 in place. */
function transpose2d(t: TensorProto): void {
  const [rows, cols] = dimsOf(t);
  const n = rows * cols;
  const swap = <T extends Float32Array | Uint16Array | Int8Array | Uint8Array>(source: ArrayLike<number>, out: T): T => {
    for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = source[r * cols + c];
    return out;
  };
  const raw = Uint8Array.from(t.rawData);
  const signed = t.dataType === TensorProto_DataType.INT4 || t.dataType === TensorProto_DataType.INT2 || t.dataType === TensorProto_DataType.INT8;
  const values = (): Int8Array | Uint8Array => (signed ? new Int8Array(n) : new Uint8Array(n));
  let bytes: Uint8Array;
  if (t.dataType === TensorProto_DataType.FLOAT) bytes = new Uint8Array(swap(floatData(t)!, new Float32Array(n)).buffer);
  else if (t.dataType === TensorProto_DataType.FLOAT16) bytes = new Uint8Array(swap(toFloat16Array(weightValues(t)!), new Uint16Array(n)).buffer);
  else if (FOUR_BIT.has(t.dataType)) bytes = packInt4(swap(unpackInt4(raw, n, signed), values()));
  else if (TWO_BIT.has(t.dataType)) bytes = packInt2(swap(unpackInt2(raw, n, signed), values()));
  else bytes = new Uint8Array(swap(signed ? new Int8Array(raw.buffer) : raw, values()).buffer);
  t.dims = [BigInt(cols), BigInt(rows)];
  retype(t, t.dataType, bytes);
  t.floatData = [];
}
