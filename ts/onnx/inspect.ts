/** Per-layer weight statistics of an ONNX model, for `lowbit inspect`. */
import { Graph, dimsOf, floatData } from './graph';
import { readModel } from './model-io';
import { nodeLabel } from './passes/pass';

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
}

export function inspectModel(input: string | Uint8Array): { opset: number; layers: LayerStats[] } {
  const graph = new Graph(readModel(input));
  const layers: LayerStats[] = [];
  for (const node of graph.topologicalOrder()) {
    if (!['Conv', 'Gemm', 'MatMul', 'ConvTranspose'].includes(node.opType)) continue;
    const t = node.input[1] ? graph.constant(node.input[1]) : undefined;
    const data = t && floatData(t);
    if (!data || data.length === 0) {
      layers.push({ node: nodeLabel(node), op: node.opType, shape: [], min: NaN, max: NaN, std: NaN, kurtosis: NaN, histogram: [], nonFinite: 0,
        quantized: false, reason: 'weight is not a float constant' });
      continue;
    }
    const w = data.filter((v) => Number.isFinite(v));
    const nonFinite = data.length - w.length;
    let min = Infinity;
    let max = -Infinity;
    let sum = 0;
    for (const v of w) {
      min = Math.min(min, v);
      max = Math.max(max, v);
      sum += v;
    }
    const mean = sum / w.length;
    let m2 = 0;
    let m4 = 0;
    for (const v of w) {
      const d = (v - mean) ** 2;
      m2 += d;
      m4 += d * d;
    }
    m2 /= w.length;
    m4 /= w.length;
    const histogram = new Array<number>(20).fill(0);
    for (const v of w) histogram[Math.min(19, Math.floor(((v - min) / (max - min || 1)) * 20))]++;
    const reason = node.opType === 'ConvTranspose' ? 'ConvTranspose weights are not quantized'
      : nonFinite > 0 ? `${nonFinite} of its weights are NaN or ±Infinity: quantizeModel refuses them` : undefined;
    layers.push({
      node: nodeLabel(node), op: node.opType, shape: dimsOf(t!), min, max, std: Math.sqrt(m2), kurtosis: m2 > 0 ? m4 / (m2 * m2) - 3 : 0,
      histogram, nonFinite, quantized: reason === undefined, ...(reason ? { reason } : {}),
    });
  }
  return { opset: graph.opset, layers };
}

const BARS = ' ▁▂▃▄▅▆▇█';

/** A text sparkline of a histogram. */
export function sparkline(counts: number[]): string {
  const top = Math.max(...counts, 1);
  return counts.map((c) => BARS[Math.round((c / top) * (BARS.length - 1))]).join('');
}
