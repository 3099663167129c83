/**
 * Quantized recurrent weights: the input weights W and recurrence weights R of LSTM, GRU and RNN nodes (inside
 * subgraph bodies too) become integer constants read through a DequantizeLinear, as the Conv/Gemm/MatMul weights
 * do (weight-only: the recurrence itself runs in float; what shrinks is the model and the weights' memory).
 * W is [directions, gates·hidden, inputs] and R [directions, gates·hidden, hidden]: one scale per gate row (axis 1,
 * shared by the two directions of a bidirectional layer), or blocks along the row (axis 2), or one scale a tensor;
 * symmetric, zero point 0. B, the initial states and peepholes stay float.
 */
import { TensorProto_DataType, type GraphProto, type NodeProto, type TensorProto } from 'onnx-buf';

import { toFloat16Array } from '../../float16';
import { quantizationError, type QuantizeOptions } from '../../quantize';
import type { QuantizedTensor } from '../../quant-params';
import { allNodes, dimsOf, isFloat16Tensor, isFloatTensor, isOnnxDomain, makeIntAttribute, makeTensor, weightValues, type Graph } from '../graph';
import { readLazyTensor, unloadTensor } from '../model-io';
import { nodeLabel, placeOf, type PassReport, type Steps } from './pass';
import { checkFiniteWeights, quantized, valuesTensor, withFloat16Scales, type WeightLayerReport } from './quantize-weights';

export const RECURRENT = new Set(['LSTM', 'GRU', 'RNN']);

/** The weight inputs of a recurrent node, by position. */
const WEIGHT_INPUTS = [[1, 'W'], [2, 'R']] as const;

export interface RecurrentQuantization {
  bits: 2 | 4 | 8;
  granularity: 'channel' | 'block' | 'tensor';
  blockSize?: number;
  method: QuantizeOptions['method'];
  keepFloat?: string[];
  /** Use com.microsoft DequantizeLinear (old opsets onnxruntime still accepts; int8 only). */
  microsoftDomain?: boolean;
  /** The weights may be views of the caller's model bytes: copied before native worker threads read them. */
  callerBytes?: boolean;
}

type Candidate = ReturnType<typeof allNodes>[number];

/** The LSTM, GRU and RNN nodes (the main graph's in order, then those in bodies) and why each would stay float (undefined: it would not). */
export function recurrentLayers(graph: Graph, keepFloat: string[] = []): Array<Candidate & { reason?: string }> {
  const keep = new Set(keepFloat);
  return allNodes(graph).filter(({ node }) => RECURRENT.has(node.opType) && isOnnxDomain(node.domain))
    .map((c) => ({ ...c, reason: keep.has(c.node.name) || keep.has(c.node.opType) ? 'kept in float (keepFloat)' : whyNot(graph, c.node, c.scopes) }));
}

/** How many recurrent nodes this pass would quantize. */
export function quantizableRecurrentCount(graph: Graph, keepFloat: string[] = []): number {
  return recurrentLayers(graph, keepFloat).filter((c) => c.reason === undefined).length;
}

function whyNot(graph: Graph, node: NodeProto, scopes: GraphProto[]): string | undefined {
  if (node.output.every((o) => o === '')) return 'it has no outputs';
  for (const [index, role] of WEIGHT_INPUTS) {
    const t = node.input[index] ? graph.constantIn(node.input[index], scopes)?.tensor : undefined;
    if (!t || !(isFloatTensor(t) || isFloat16Tensor(t))) return `its ${role} is not a float constant (a computed input, or an integer one)`;
    const dims = dimsOf(t);
    if (dims.length !== 3) return `its ${role} is ${dims.length}-D, not [directions, gates·hidden, ${role === 'W' ? 'inputs' : 'hidden'}]`;
    if (dims.includes(0)) return `its ${role} [${dims.join(', ')}] holds no values`;
  }
  return undefined;
}

export function* quantizeRecurrent(graph: Graph, options: RecurrentQuantization): Steps<{ report: PassReport; layers: WeightLayerReport[] }> {
  const report: PassReport = { pass: 'quantize-recurrent', changed: [], skipped: [] };
  const layers: WeightLayerReport[] = [];
  // A weight several nodes read (one cell applied in two bodies, or in both branches of an If) is quantized once,
  // and its DequantizeLinear goes next to it, in the graph holding it: the readers inside bodies read its output
  // from there. (Layers' weights get theirs in their own graph, for onnxruntime's fusions; the recurrent ops have none.)
  const done = new Map<TensorProto, { output: string; granularity: string; signal: number; noise: number }>();
  const released = new Map<GraphProto, Set<string>>();
  for (const { node, scopes, owner, reason } of recurrentLayers(graph, options.keepFloat)) {
    const label = nodeLabel(node);
    if (reason) {
      report.skipped.push({ node: label, reason });
      continue;
    }
    const parts: Array<{ role: string; name: string; dims: number[]; signal: number; noise: number }> = [];
    let granularity = '';
    for (const [index, role] of WEIGHT_INPUTS) {
      const name = node.input[index];
      const found = graph.constantIn(name, scopes)!;
      const t = found.tensor;
      const home = found.home ?? graph.graph;
      const dims = dimsOf(t);
      let entry = done.get(t);
      if (!entry) {
        const reading = readLazyTensor(t);
        if (reading) yield reading;
        const data = weightValues(t)!;
        checkFiniteWeights(node, name, data);
        const blockSize = options.blockSize ?? 32;
        const blocked = options.granularity === 'block' && dims[2] >= blockSize;
        let q: QuantizedTensor = yield* quantized(data, {
          shape: dims, bits: options.bits, method: options.method,
          ...(blocked ? { granularity: 'block' as const, axis: 2, blockSize }
            : options.granularity === 'tensor' ? { granularity: 'tensor' as const } : { granularity: 'channel' as const, axis: 1 }),
        }, true, !!options.callerBytes);
        const half = isFloat16Tensor(t);
        // A float16 weight gets float16 scales: DequantizeLinear then gives float16, the type of the node's other inputs.
        if (half) q = withFloat16Scales(q, data, label);
        const values = valuesTensor(graph.uniqueName(`${name}_quantized`), q);
        const scaleBytes = half ? new Uint8Array(toFloat16Array(q.scale).buffer) : new Uint8Array(q.scale.buffer.slice(0));
        const scale = makeTensor(graph.uniqueName(`${name}_scale`), half ? TensorProto_DataType.FLOAT16 : TensorProto_DataType.FLOAT, q.scaleShape, scaleBytes);
        graph.addInitializer(values, home);
        graph.addInitializer(scale, home);
        const attributes = q.granularity === 'tensor' ? [] : [makeIntAttribute('axis', q.axis!), ...(blocked ? [makeIntAttribute('block_size', blockSize)] : [])];
        const dq = graph.newNode('DequantizeLinear', [values.name, scale.name], [graph.uniqueName(`${name}_dequantized`)], `${name}_dq`,
          attributes, options.microsoftDomain ? 'com.microsoft' : '');
        // It reads constants only: first in a body, anywhere in the main graph (sorted at the end).
        if (home === graph.graph) home.node.push(dq);
        else home.node.unshift(dq);
        let signal = 0;
        for (let i = 0; i < data.length; i++) signal += data[i] * data[i];
        entry = {
          output: dq.output[0], signal, noise: quantizationError(data, q).mse * data.length,
          granularity: q.granularity === 'tensor' ? 'tensor' : blocked ? `block ${blockSize} on axis 2` : 'channel on axis 1',
        };
        done.set(t, entry);
        unloadTensor(t);  // a weight read from its file goes back there
      }
      granularity = entry.granularity;
      node.input[index] = entry.output;
      (released.get(home) ?? released.set(home, new Set()).get(home)!).add(name);
      parts.push({ role, name, dims, signal: entry.signal, noise: entry.noise });
    }
    const [w, r] = parts;
    const sqnr = (signal: number, noise: number) => (noise === 0 ? Infinity : 10 * Math.log10(signal / noise));
    layers.push({
      node: label, op: node.opType, weight: w.name, shape: w.dims, bits: options.bits, granularity, method: options.method ?? 'minmax',
      weightSqnrDb: sqnr(w.signal + r.signal, w.noise + r.noise),
      recurrentWeight: { weight: r.name, shape: r.dims, weightSqnrDb: sqnr(r.signal, r.noise) },
      // Y, or Y_h where Y is left out (an optional output may be '').
      output: node.output.find((o) => o !== '')!,
      ...(owner ? placeOf(owner, scopes) : {}),
    });
    report.changed.push(`${label}: ${options.bits}-bit ${granularity} W and R`);
    yield label;
  }
  for (const [home, names] of released) graph.removeAllUnused(names, home);
  graph.sort();
  return { report, layers };
}
