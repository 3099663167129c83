/**
 * Fuses hard-swish written out as elementwise ops — y = x · Clip(x + 3, 0, 6) / 6,
 * as Paddle2ONNX (and exporters for opsets before 14) write it — into one
 * HardSwish node (opset 14). Why: onnxruntime runs the four ops as four passes
 * over memory with three intermediate tensors, and none of them has an integer
 * kernel, so in a quantized model they stay float between a DequantizeLinear and
 * a QuantizeLinear; on the PP-OCRv4 recognizer they took longer than all its
 * quantized convolutions (onnxruntime profile, one thread). HardSwish computes
 * x · max(0, min(1, x/6 + 1/2)): the same function, equal to float32 rounding.
 *
 * Matched: Add(x, 3) → Clip(min 0, max 6) → Mul(x, ·) → Div(·, 6) (or Mul by 1/6),
 * either operand order for Add and Mul, Clip bounds as attributes (opset < 11) or
 * constant inputs, each intermediate read only by the next op and not a graph output.
 */
import type { NodeProto } from 'onnx-buf';

import { floatAttribute, type Graph, type ScalarOf } from '../graph';
import { nodeLabel, type PassReport } from './pass';

/** The other input of a two-input node when one of them is the constant `value`. */
function otherThanConstant(scalarOf: ScalarOf, node: NodeProto, value: number): string | undefined {
  if (node.input.length !== 2) return undefined;
  if (scalarOf(node.input[1]) === value) return node.input[0];
  if (scalarOf(node.input[0]) === value) return node.input[1];
  return undefined;
}

function clipBounds(scalarOf: ScalarOf, clip: NodeProto): [number | undefined, number | undefined] {
  if (clip.input.length > 1) return [scalarOf(clip.input[1]), scalarOf(clip.input[2])];
  return [floatAttribute(clip, 'min', -3.4028234663852886e38), floatAttribute(clip, 'max', 3.4028234663852886e38)];
}

/** The Add, Clip, Mul (and the divide) computing hard-swish of `x` ending at `last`, or undefined. */
function match(graph: Graph, scalarOf: ScalarOf, last: NodeProto): { x: string; nodes: NodeProto[] } | undefined {
  const byDivide = last.opType === 'Div' && scalarOf(last.input[1]) === 6;
  const byProduct = last.opType === 'Mul' && otherThanConstant(scalarOf, last, Math.fround(1 / 6)) !== undefined;
  if (!byDivide && !byProduct) return undefined;
  const product = graph.producer(byDivide ? last.input[0] : otherThanConstant(scalarOf, last, Math.fround(1 / 6))!);
  if (product?.opType !== 'Mul' || product.input.length !== 2) return undefined;
  for (const [x, gate] of [[product.input[0], product.input[1]], [product.input[1], product.input[0]]]) {
    const clip = graph.producer(gate);
    if (clip?.opType !== 'Clip') continue;
    const [lo, hi] = clipBounds(scalarOf, clip);
    if (lo !== 0 || hi !== 6) continue;
    const add = graph.producer(clip.input[0]);
    if (add?.opType !== 'Add' || otherThanConstant(scalarOf, add, 3) !== x) continue;
    const nodes = [add, clip, product, last];
    const privateOutputs = nodes.slice(0, 3).every((n, i) => graph.consumers(n.output[0]).length === 1 &&
      graph.consumers(n.output[0])[0] === nodes[i + 1] && !graph.isGraphOutput(n.output[0]));
    if (privateOutputs) return { x, nodes };
  }
  return undefined;
}

function patterns(graph: Graph): Array<{ last: NodeProto; m: { x: string; nodes: NodeProto[] } | undefined }> {
  const scalarOf = graph.scalarLookup();  // read only: exact for the whole scan
  return graph.graph.node.map((n) => ({ last: n, m: match(graph, scalarOf, n) })).filter(({ m }) => m);
}

/** Whether the graph has hard-swish written out as elementwise ops (then quantizeModel converts to opset 14 or later). */
export function hasHardSwishPattern(graph: Graph): boolean {
  return patterns(graph).length > 0;
}

export function fuseHardSwish(graph: Graph): PassReport {
  const report: PassReport = { pass: 'fuse-hardswish', changed: [], skipped: [] };
  const found = patterns(graph);
  if (found.length === 0) return report;
  if (graph.opset < 14) {
    report.skipped.push({ node: `${found.length} hard-swish patterns`, reason: `HardSwish needs opset 14 and the model has opset ${graph.opset}` });
    return report;
  }
  for (const { last, m } of found) {
    const { x, nodes } = m!;
    const constants = nodes.flatMap((n) => n.input).filter((i) => graph.constant(i));
    for (const n of nodes) graph.graph.node.splice(graph.graph.node.indexOf(n), 1);
    graph.graph.node.push(graph.newNode('HardSwish', [x], [last.output[0]], `${nodeLabel(last)}_hardswish`));
    for (const c of new Set(constants)) graph.removeIfUnused(c);
    report.changed.push(`${nodeLabel(last)}: Add → Clip → Mul → ${last.opType} fused into HardSwish`);
  }
  graph.sort();
  return report;
}
