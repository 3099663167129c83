/** Per-layer weight statistics of an ONNX model, for `lowbit inspect`. */
import { allNodes, checkDefaultOpset, Graph, dimsOf, isFloat16Tensor, isFloatTensor, weightValues } from './graph';
import { readModelAsync, withDataRead } from './model-io';
import { foldBatchNormSteps } from './passes/fold-batchnorm';
import { foldScalarAffineSteps } from './passes/fold-scalar-affine';
import { nextTurn, nodeLabel, placeOf, runStepsAsync } from './passes/pass';
import { bypassConstantIdentities, constantAttributesAsTensors } from './passes/constant-identities';
import { densifySparseInitializers } from './passes/sparse-initializers';
import { embeddingTables } from './passes/quantize-gather';
import { recurrentLayers, WEIGHT_INPUTS } from './passes/quantize-recurrent';
import { foldWeightChains } from './passes/fold-weight-chains';
import { QUANTIZABLE, quantizedOperatorCounts, unquantizableReason } from './passes/quantize-weights';

/** The layers inspect lists: those quantizeModel quantizes, and ConvTranspose. */
const LISTED = new Set([...QUANTIZABLE, 'ConvTranspose']);

export interface LayerStats {
  node: string;
  op: string;
  shape: number[];
  min: number;
  max: number;
  std: number;
  /** Excess kurtosis: 0 for a Gaussian, 3 for a Laplace distribution. */
  kurtosis: number;
  /** 20-bin histogram over [min, max]. */
  histogram: number[];
  /** NaN and ±Infinity values (left out of the statistics above); quantizeModel refuses such weights. */
  nonFinite: number;
  quantized: boolean;
  reason?: string;
  /** LSTM, GRU and RNN: which of their weights the row describes (W, the inputs', or R, the recurrence's). */
  weight?: 'W' | 'R';
  /** The node whose subgraph (If branch, Loop or Scan body) holds the layer, and which of its subgraphs. */
  subgraph?: string;
  branch?: string;
}

export async function inspectModel(input: string | Uint8Array):
  Promise<{ opset: number; layers: LayerStats[]; quantizedOperators: Array<{ op: string; count: number }> }> {
  // Read without holding the event loop, and one layer's weights in memory at a time when they are external
  // (read when their layer comes; float16 ones converted); a turn of the event loop after each layer. Layers that
  // BatchNormalization or a scalar affine folds into, and weights fold-weight-chains computes, are read at the fold
  // (synchronously, as in quantizeModel) and held to the end.
  const graph = new Graph(await readModelAsync(input, { lazyTensors: true }));
  checkDefaultOpset(graph);  // what quantizeModel would refuse before any pass
  graph.validate();
  constantAttributesAsTensors(graph);
  densifySparseInitializers(graph);
  bypassConstantIdentities(graph);  // as quantizeModel does: layers reading a weight through an Identity are layers
  await foldWeightChains(graph);  // and through a Transpose, Reshape, Slice, Concat… of constants
  // The weights as quantizeModel quantizes them: BatchNormalization and scalar affines folded into their layers (a
  // channel with a tiny running variance widens there; a variance of 0 with epsilon 0 gives infinities).
  await runStepsAsync(foldBatchNormSteps(graph));
  await runStepsAsync(foldScalarAffineSteps(graph));
  const layers: LayerStats[] = [];
  // Conv/Gemm/MatMul layers, the main graph's, then those in subgraphs, as quantizeModel takes them (ConvTranspose too,
  // listed as not quantized); then the recurrent nodes', and the embedding tables', each kind in the same order.
  const layerNodes = allNodes(graph).filter((l) => LISTED.has(l.node.opType));
  const candidates = [
    // The quantizer's own reasons for leaving a layer float (W·x, weight rank, already quantized, …).
    ...layerNodes.map((c) => ({ ...c, weightInput: 1, optIn: false,
      skipped: c.node.opType === 'ConvTranspose' ? 'ConvTranspose weights are not quantized' : unquantizableReason(graph, c.node, c.scopes) })),
    // LSTM, GRU and RNN: their W and R, a row each.
    ...recurrentLayers(graph).flatMap((c) => WEIGHT_INPUTS.map(([weightInput, weight]) => ({ ...c, weightInput, optIn: false, skipped: c.reason, weight }))),
    // Embedding tables, often a large model's largest tensor: quantized only on request.
    ...embeddingTables(graph).map((c) => ({ ...c, weightInput: 0, optIn: c.reason === undefined,
      skipped: c.reason === undefined ? 'an embedding table: quantized with weights.gather (CLI --gather)' : `an embedding table, float even with weights.gather: ${c.reason}` })),
  ];
  for (const candidate of candidates) {
    const { node, scopes, owner, weightInput, skipped, optIn } = candidate;
    if (layers.length > 0) await nextTurn();
    const role = 'weight' in candidate ? (candidate.weight as 'W' | 'R') : undefined;  // W or R of a recurrent node
    const placeAndWeight = { ...(owner ? placeOf(owner, scopes) : {}), ...(role ? { weight: role } : {}) };
    const weight = node.input[weightInput] ? graph.constantIn(node.input[weightInput], scopes)?.tensor : undefined;
    // Only float weights have statistics here: others are not read from their file.
    const float = weight && (isFloatTensor(weight) || isFloat16Tensor(weight));
    const t = float ? await withDataRead(weight) : weight;
    const data = t && weightValues(t);
    if (!data || data.length === 0) {
      // A float weight with no values (a dimension of 0) is quantized as it is: nothing to describe.
      const empty = !!data && skipped === undefined;
      layers.push({ node: nodeLabel(node), op: node.opType, shape: weight ? dimsOf(weight) : [], min: NaN, max: NaN, std: NaN, kurtosis: NaN,
        histogram: [], nonFinite: 0, quantized: empty, ...(empty ? {} : { reason: skipped ?? 'weight is not a float constant' }), ...placeAndWeight });
      continue;
    }
    // Indexed loops over a view of the weights (no copies): a large model's layers are tens of MB each.
    let count = 0;
    let min = Infinity;
    let max = -Infinity;
    let sum = 0;
    for (let i = 0; i < data.length; i++) {
      const v = data[i];
      if (v - v !== 0) continue;  // NaN or ±Infinity
      count++;
      if (v < min) min = v;
      if (v > max) max = v;
      sum += v;
    }
    const nonFinite = data.length - count;
    const mean = sum / count;
    let m2 = 0;
    let m4 = 0;
    const histogram = new Array<number>(20).fill(0);
    const toBin = 20 / (max - min || 1);
    for (let i = 0; i < data.length; i++) {
      const v = data[i];
      if (v - v !== 0) continue;
      const d = (v - mean) ** 2;
      m2 += d;
      m4 += d * d;
      histogram[Math.min(19, Math.floor((v - min) * toBin))]++;
    }
    m2 /= count;
    m4 /= count;
    const bad = `${nonFinite} of its weights are NaN or ±Infinity: quantizeModel stops with an error`;
    // A table quantizeModel converts on request refuses non-finite values then too.
    const reason = nonFinite === 0 ? skipped : optIn ? `${bad} with weights.gather unless the table is kept float (keepFloat)`
      : skipped ?? `${bad} unless the layer is kept float (keepFloat)`;
    // No finite weight (or none at all): no statistics, NaN as for a layer without float weights.
    const none = count === 0;
    layers.push({
      node: nodeLabel(node), op: node.opType, shape: dimsOf(t!), min: none ? NaN : min, max: none ? NaN : max, std: none ? NaN : Math.sqrt(m2),
      kurtosis: none || m2 === 0 ? NaN : m4 / (m2 * m2) - 3,  // (undefined for a constant tensor)
      histogram, nonFinite, quantized: reason === undefined, ...(reason ? { reason } : {}), ...placeAndWeight,
    });
  }
  // A model quantized already (ConvInteger, QLinearConv, DequantizeLinear…) has few or no float layers: said so.
  return { opset: graph.opset, layers, quantizedOperators: quantizedOperatorCounts(graph) };
}

const BARS = ' ▁▂▃▄▅▆▇█';

/** A text sparkline of a histogram; a bin holding anything shows at least the lowest bar (a lone outlier stays visible). */
export function sparkline(counts: number[]): string {
  const top = Math.max(...counts, 1);
  return counts.map((c) => BARS[c > 0 ? Math.max(1, Math.round((c / top) * (BARS.length - 1))) : 0]).join('');
}
