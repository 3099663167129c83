/**
 * Where the layers' outputs are quantized with `activations.outputs`, placed so that
 * onnxruntime can run the chain on integers:
 * - after a Relu or Clip that is a layer output's only consumer, instead of before it. With
 *   unsigned activations the quantizer then clamps at zero itself (zero point 0), onnxruntime
 *   removes the Relu/Clip and fuses DequantizeLinear → Conv → QuantizeLinear into QLinearConv;
 *   and none of the 8-bit codes is spent on negative values that the Relu would discard.
 * - after a data-movement op (MaxPool, Reshape, Flatten, Transpose, Squeeze, Unsqueeze) whose
 *   input is quantized for every consumer: its output reuses the input's scale and zero point,
 *   so the pair costs nothing (the op picks or moves codes; re-quantizing them is exact) and
 *   onnxruntime drops it and runs the op on the 8-bit codes.
 * This only plans (which tensors, with whose parameters); quantize-activations inserts the nodes.
 */
import type { NodeProto } from 'onnx-buf';

import type { Graph } from '../graph';
import { nodeLabel, type PassReport } from './pass';

/** Ops that select or move values without computing new ones, for which onnxruntime drops a DQ → op → Q with equal parameters. */
const MOVES_CODES = new Set(['MaxPool', 'Reshape', 'Flatten', 'Transpose', 'Squeeze', 'Unsqueeze']);

export interface OutputPlacement {
  /** Per quantized layer (label), the tensor its output is quantized at. */
  quantizedOutput: Map<string, string>;
  /** Tensors to quantize for every consumer, from calibration. */
  calibrated: string[];
  /** Tensors to quantize for every consumer with the parameters of another (output → input of a MOVES_CODES op), in graph order. */
  shared: Array<{ tensor: string; source: string }>;
  report: PassReport;
}

/**
 * `targets`: the quantized layers in topological order; `signed`: signed (symmetric) activations, whose zero point
 * is not the type's minimum, so onnxruntime would not remove the Relu and quantizing after it would lose the fusion;
 * `tensorScales`: weights get one scale each (granularity 'tensor'), which QLinearMatMul takes at any weight rank.
 */
export function placeOutputQuantizers(graph: Graph, targets: NodeProto[], signed: boolean, tensorScales = false): OutputPlacement {
  const report: PassReport = { pass: 'output-placement', changed: [], skipped: [] };
  const quantizedOutput = new Map<string, string>();
  for (const n of targets) {
    const out = n.output[0];
    if (graph.isGraphOutput(out)) continue;
    const rank = n.opType === 'MatMul' && !tensorScales ? weightRank(graph, n) : 2;
    if (rank > 2) {
      report.skipped.push({ node: nodeLabel(n), reason: `its weight is ${rank}-D: onnxruntime fuses a quantized MatMul output into QLinearMatMul, ` +
        'which fails at its default optimisation level on per-column or blocked scales of a weight that is not 2-D; its output stays float' });
      continue;
    }
    const consumers = graph.consumers(out);
    const clamp = consumers.length === 1 && (consumers[0].opType === 'Relu' || consumers[0].opType === 'Clip') ? consumers[0] : undefined;
    const at = clamp && !signed && !graph.isGraphOutput(clamp.output[0]) ? clamp.output[0] : out;
    if (!readDirectly(graph, at)) {
      // A quantizer nothing would read (subgraphs stay in float) would be dead weight.
      report.skipped.push({ node: nodeLabel(n), reason: graph.consumers(at).length > 0 ? `output '${at}' is read only inside subgraphs, which stay in float` : `nothing reads output '${at}'` });
      continue;
    }
    if (at !== out) {
      quantizedOutput.set(nodeLabel(n), at);
      report.changed.push(`${nodeLabel(n)}: output quantized after its ${clamp!.opType} '${nodeLabel(clamp!)}'`);
    } else {
      quantizedOutput.set(nodeLabel(n), out);
      if (clamp) report.skipped.push({ node: nodeLabel(n), reason: `output quantized before its ${clamp.opType}: ${signed ? 'signed activations (zero point not the minimum, onnxruntime keeps the clamp)' : 'the clamp\'s output is a model output'}` });
    }
  }
  const calibrated = [...new Set(quantizedOutput.values())];
  const everyConsumer = new Set(calibrated);
  const shared: OutputPlacement['shared'] = [];
  for (const node of graph.topologicalOrder()) {
    if (!MOVES_CODES.has(node.opType) || !everyConsumer.has(node.input[0]) || node.output.length !== 1) continue;
    const out = node.output[0];
    if (graph.isGraphOutput(out) || everyConsumer.has(out) || !readDirectly(graph, out)) continue;
    shared.push({ tensor: out, source: node.input[0] });
    everyConsumer.add(out);
    report.changed.push(`${nodeLabel(node)}: output shares its input's quantization (onnxruntime runs it on the codes)`);
  }
  return { quantizedOutput, calibrated, shared, report };
}

/** Rank of a MatMul's constant weight (2 when it is not constant; placement comes before the weight pass). */
function weightRank(graph: Graph, n: NodeProto): number {
  return graph.constant(n.input[1])?.dims.length ?? 2;
}

/** Whether a node reads the value as one of its inputs (not only from inside its subgraphs). */
function readDirectly(graph: Graph, name: string): boolean {
  return graph.graph.node.some((n) => n.input.includes(name));
}
