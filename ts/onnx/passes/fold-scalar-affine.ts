/**
 * Folds a scalar affine y = s·x + t (Mul by a one-element constant, then Add of
 * one, either alone) into the Conv next to it — PP-LCNetV3's "learnable affine
 * blocks" put one after almost every convolution and activation of the PP-OCRv4
 * recognizer:
 *   after a Conv:  W' = s·W, b' = s·b + t;
 *   before a Conv that pads nothing:  W' = s·W, b' = b + t·Σ W[o, ·]  (every
 *   input value moves by t, so each output by t times its weights' sum).
 * Equal to float rounding. Why: each is two more passes over a feature map and,
 * in a quantized model, float work between a DequantizeLinear and a
 * QuantizeLinear that onnxruntime cannot fuse away.
 * Not folded: a Conv that pads its input (the padding would read t, not 0), an
 * intermediate read elsewhere or a graph output, non-constant or non-float
 * weights.
 */
import { TensorProto_DataType, type NodeProto } from 'onnx-buf';

import { dimsOf, floatData, floatView, intsAttribute, ownedTensor, stringAttribute, type Graph, type ScalarOf } from '../graph';
import { nodeLabel, pauseClock, runSteps, type PassReport, type Steps } from './pass';

/** The scalar constant among a two-input node's inputs (Graph.scalar) and the other input; or undefined. */
function scalarOperand(scalarOf: ScalarOf, node: NodeProto): { value: number; other: string } | undefined {
  if (node.input.length !== 2) return undefined;
  for (const i of [1, 0]) {
    const value = scalarOf(node.input[i]);
    if (value !== undefined) return { value, other: node.input[1 - i] };
  }
  return undefined;
}

/** The affine starting at `first` (a Mul by s, optionally followed by an Add of t, or an Add of t alone). */
export function affineFrom(graph: Graph, first: NodeProto, scalarOf: ScalarOf = (name) => graph.scalar(name)):
  { input: string; s: number; t: number; nodes: NodeProto[] } | undefined {
  const op = scalarOperand(scalarOf, first);
  if (!op) return undefined;
  if (first.opType === 'Add') return { input: op.other, s: 1, t: op.value, nodes: [first] };
  if (first.opType !== 'Mul') return undefined;
  const reader = graph.onlyReader(first.output[0]);
  const add = reader?.opType === 'Add' ? reader : undefined;
  const shift = add && scalarOperand(scalarOf, add);
  if (add && shift && shift.other === first.output[0]) return { input: op.other, s: op.value, t: shift.value, nodes: [first, add] };
  return { input: op.other, s: op.value, t: 0, nodes: [first] };
}

function convWeights(graph: Graph, conv: NodeProto): { w: Float32Array; dims: number[]; b: Float32Array } | undefined {
  const wt = graph.constant(conv.input[1]);
  const w = wt && floatData(wt);  // a copy, scaled in place into the folded weights
  if (!w) return undefined;
  const dims = dimsOf(wt!);
  const bt = conv.input[2] ? graph.constant(conv.input[2]) : undefined;
  const b = conv.input[2] ? bt && floatView(bt) : new Float32Array(dims[0]);  // read only
  if (!b || b.length !== dims[0]) return undefined;
  return { w, dims, b };
}

function setConvWeights(graph: Graph, conv: NodeProto, w: Float32Array, dims: number[], b: Float32Array): void {
  const label = nodeLabel(conv);
  const wName = graph.uniqueName(`${conv.input[1]}_affine_folded`);
  const bName = graph.uniqueName(`${label}_affine_folded_bias`);
  graph.addInitializer(ownedTensor(wName, TensorProto_DataType.FLOAT, dims, new Uint8Array(w.buffer)));
  graph.addInitializer(ownedTensor(bName, TensorProto_DataType.FLOAT, [dims[0]], new Uint8Array(b.buffer)));
  const [oldW, oldB] = [conv.input[1], conv.input[2]];
  conv.input[1] = wName;
  conv.input[2] = bName;
  for (const name of [oldW, oldB]) if (name) graph.removeIfUnused(name);
}

function removeAffine(graph: Graph, nodes: NodeProto[]): void {
  const constants = nodes.flatMap((n) => n.input).filter((i) => graph.constant(i));
  for (const n of nodes) graph.graph.node.splice(graph.graph.node.indexOf(n), 1);
  for (const c of new Set(constants)) graph.removeIfUnused(c);
}

/** w·s in place, in a plain loop (Float32Array.from with a map function is far slower on megabytes of weights). */
function scaleInPlace(w: Float32Array, s: number): Float32Array {
  for (let i = 0; i < w.length; i++) w[i] *= s;
  return w;
}

const describe = (s: number, t: number) => `${Number(s.toPrecision(4))}·x${t === 0 ? '' : ` ${t < 0 ? '−' : '+'} ${Number(Math.abs(t).toPrecision(4))}`}`;

export interface ScalarAffineOptions {
  /**
   * Fold the shift t of an affine after a Conv into its bias (default true). With the Conv's output
   * quantized (activations.outputs) the shift stays an Add: folded, it would move the quantized range away
   * from zero, which an asymmetric range must still include, and cost resolution.
   */
  shiftAfterConv?: boolean;
}

export function foldScalarAffine(graph: Graph, options: ScalarAffineOptions = {}): PassReport {
  return runSteps(foldScalarAffineSteps(graph, options));
}

/**
 * foldScalarAffine in steps: pauses for the event loop (yields) before a node whenever `pause` says so, by default
 * every 10 ms (a large model's weights take a while).
 */
export function* foldScalarAffineSteps(graph: Graph, options: ScalarAffineOptions = {}, pause: () => boolean = pauseClock()): Steps<PassReport> {
  const report: PassReport = { pass: 'fold-scalar-affine', changed: [], skipped: [] };
  const shiftAfterConv = options.shiftAfterConv ?? true;
  const seen = new Set<NodeProto>();  // the Add of a Mul → Add is not looked at again on its own
  // Built once: the pass only adds constants under new names and removes unused ones.
  const scalarOf = graph.scalarLookup();
  for (const first of [...graph.graph.node]) {
    if (pause()) yield;
    // (The nodes this pass removes are all in seen: no scan of the node list per node.)
    if ((first.opType !== 'Mul' && first.opType !== 'Add') || seen.has(first)) continue;
    const affine = affineFrom(graph, first, scalarOf);
    if (!affine) continue;
    affine.nodes.forEach((n) => seen.add(n));
    const last = affine.nodes[affine.nodes.length - 1];
    const { s, t } = affine;
    // After a Conv: scale its filters and bias.
    const producer = graph.producer(affine.input);
    if (producer?.opType === 'Conv' && graph.onlyReader(affine.input) === first) {
      const conv = convWeights(graph, producer);
      const folded = shiftAfterConv || t === 0 ? affine.nodes : affine.nodes.filter((n) => n.opType === 'Mul');
      if (conv && folded.length > 0) {
        const shift = folded.length === affine.nodes.length ? t : 0;
        setConvWeights(graph, producer, scaleInPlace(conv.w, s), conv.dims, Float32Array.from(conv.b, (v) => v * s + shift));
        producer.output[0] = folded[folded.length - 1].output[0];
        removeAffine(graph, folded);
        report.changed.push(`${nodeLabel(producer)}: the affine after it (${describe(s, shift)}) folded into its weights and bias` +
          (shift !== t ? `; its shift ${Number(t.toPrecision(4))} stays an Add (the layer's output is quantized)` : ''));
        continue;
      }
    }
    // Before a Conv that pads nothing: scale its filters, shift its bias by t·ΣW.
    const next = graph.onlyReader(last.output[0]);
    if (next?.opType !== 'Conv' || next.input[0] !== last.output[0]) continue;
    const pads = intsAttribute(next, 'pads') ?? [];
    const autoPadding = !['NOTSET', 'VALID'].includes(stringAttribute(next, 'auto_pad', 'NOTSET'));
    if (pads.some((p) => p !== 0) || autoPadding) {
      if (t !== 0) {
        report.skipped.push({ node: nodeLabel(first), reason: `${nodeLabel(next)} pads its input, which would then read the shift ${Number(t.toPrecision(4))} instead of 0` });
        continue;
      }
    }
    const conv = convWeights(graph, next);
    if (!conv) continue;
    const per = conv.w.length / conv.dims[0];
    const bias = Float32Array.from(conv.b, (b, o) => {
      let sum = 0;
      for (let i = o * per; i < (o + 1) * per; i++) sum += conv.w[i];
      return b + t * sum;
    });
    setConvWeights(graph, next, scaleInPlace(conv.w, s), conv.dims, bias);  // after the sums above
    next.input[0] = affine.input;
    removeAffine(graph, affine.nodes);
    report.changed.push(`${nodeLabel(next)}: the affine before it (${describe(s, t)}) folded into its weights and bias`);
  }
  graph.sort();
  return report;
}
