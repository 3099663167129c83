/**
 * Depthwise input equalization. The input channels of a depthwise convolution span very different ranges
 * (in the PP-OCRv4 recognizer, per-channel maxima an order of magnitude apart on one input; after HardSwish
 * every channel also dips to −0.375 whatever its maximum), and one per-tensor 8-bit scale then leaves narrow
 * channels a handful of levels. Each depthwise filter reads one channel, so the channel can be moved and
 * stretched onto the tensor's whole calibrated range [LO, HI] before it is quantized,
 *     x'_c = x_c / s_c − u_c,
 * and the layer made to compute what it did: filters W'_c = s_c·W_c, bias b' = b + Σ_taps W·s·u. Per-channel
 * (or blocked) weight scales absorb s_c exactly; the activation quantizer then sees every channel over the
 * whole range, as a per-channel activation quantizer would, while the tensor keeps one scale and zero
 * point (what QLinearConv and other integer kernels take).
 *
 * Where the convolution pads, x' is padded explicitly first (a Pad node, and the convolution pads no more),
 * so the padding still reads x = 0; each channel's range then includes 0. Without a shift (u = 0) the
 * 1/s goes into the producer where the values on the way are read only there — a Mul or Add by a constant,
 * Relu, Conv, BatchNormalization — and otherwise into a Mul.
 *
 * After the weights are quantized, the shift meets the rounded filters: Ŵ'·(x/s − u) + b' differs from
 * Ŵ'·x/s + b by (W' − Ŵ')·u, a constant per output channel that `compensateShifts` takes off again (GPTQ
 * rounding, which sees the shifted inputs, and data-driven bias correction, which sees their mean, already
 * account for it).
 */
import { TensorProto_DataType, type NodeProto } from 'onnx-buf';

import { dimsOf, floatData, intAttribute, intsAttribute, makeTensor, stringAttribute, type Graph } from '../graph';
import { affineFrom } from './fold-scalar-affine';
import { nodeLabel, type PassReport } from './pass';
import type { QuantizedWeights } from './quantize-weights';

/**
 * A channel is stretched at most this much. The narrower a channel's calibrated range, the likelier new inputs
 * leave it (a rarely active channel, few calibration samples) and are clipped: on the PP-OCRv4 recognizer with 8
 * calibration samples, probes with caps of 16× and 1024× gained more on normal inputs but lost on text lines,
 * where 4× gained in the settings tried.
 */
export const MAX_STRETCH = 4;

/**
 * Per channel, the factor s in [1/MAX_STRETCH, 1] and shift u that put [lo, hi] (with 0, when `keepZero`)
 * onto the tensor's range: x' = x/s − u maps lo to LO and hi to HI. A constant channel stays as it is.
 */
export function equalization(lo: Float64Array, hi: Float64Array, keepZero: boolean): { s: Float64Array; u: Float64Array } {
  const low = keepZero ? lo.map((v) => Math.min(v, 0)) : lo;
  const high = keepZero ? hi.map((v) => Math.max(v, 0)) : hi;
  let LO = Infinity;
  let HI = -Infinity;
  for (let c = 0; c < lo.length; c++) {
    LO = Math.min(LO, low[c]);
    HI = Math.max(HI, high[c]);
  }
  const s = new Float64Array(lo.length).fill(1);
  const u = new Float64Array(lo.length);
  for (let c = 0; c < lo.length; c++) {
    if (!(high[c] > low[c])) continue;
    s[c] = Math.max((high[c] - low[c]) / (HI - LO), 1 / MAX_STRETCH);
    u[c] = low[c] / s[c] - LO;
  }
  return { s, u };
}

/** The depthwise convolutions (one filter group per input channel, float32 filters) among the layers, with a computed input. */
export function depthwiseLayers(graph: Graph, layers: NodeProto[]): NodeProto[] {
  return layers.filter((n) => {
    if (n.opType !== 'Conv' || graph.constant(n.input[0])) return false;
    const w = graph.constant(n.input[1]);
    if (!w || w.dataType !== TensorProto_DataType.FLOAT) return false;
    const dims = dimsOf(w);
    const group = intAttribute(n, 'group', 1);
    // 1-D and 2-D convolutions: the layer-input statistics of GPTQ and data-driven bias correction cover those.
    return (dims.length === 3 || dims.length === 4) && dims[1] === 1 && group > 1 && dims[0] % group === 0;
  });
}

/** [1, C, 1, …]: one value per channel, broadcasting over an NC… tensor of rank `rank`. */
function channelDims(channels: number, rank: number): number[] {
  return [1, channels, ...new Array(Math.max(rank - 2, 0)).fill(1)];
}

/** `values` as a [1, C, 1, …] float32 initializer. */
function channelTensor(graph: Graph, base: string, values: Float64Array, rank: number): string {
  const name = graph.uniqueName(base);
  graph.addInitializer(makeTensor(name, TensorProto_DataType.FLOAT, channelDims(values.length, rank), new Uint8Array(Float32Array.from(values).buffer)));
  return name;
}

/**
 * The constant float32 operand of a two-input Mul/Add on a tensor of rank `rank` that is one value or one per
 * channel (shape [], [1], [C, 1, …] or [1, C, 1, …]), and its index; undefined otherwise.
 */
function channelConstant(graph: Graph, node: NodeProto, channels: number, rank: number): { index: number; values: Float32Array } | undefined {
  if (node.input.length !== 2) return undefined;
  for (const index of [1, 0]) {
    const t = graph.constant(node.input[index]);
    if (!t || graph.constant(node.input[1 - index])) continue;
    const data = floatData(t);
    if (!data) return undefined;
    const dims = dimsOf(t);
    if (data.length === 1 && dims.length <= 1) return { index, values: data };
    const axis = dims.length - (rank - 1);  // where the channel axis lands when broadcast
    const perChannel = data.length === channels && (axis === 0 || (axis === 1 && dims[0] === 1)) && dims[axis] === channels;
    return perChannel ? { index, values: data } : undefined;
  }
  return undefined;
}

/** Replaces a node's constant input by `values` (a new initializer), dropping the old one when unused. */
function replaceConstant(graph: Graph, node: NodeProto, index: number, values: Float32Array, dims: number[]): void {
  const old = node.input[index];
  node.input[index] = graph.uniqueName(`${old || `${nodeLabel(node)}_bias`}_equalized`);
  graph.addInitializer(makeTensor(node.input[index], TensorProto_DataType.FLOAT, dims, new Uint8Array(values.buffer)));
  if (old) graph.removeIfUnused(old);
}

/**
 * Divides the values `value` (read only by `reader`) by s per channel inside their producer chain, when every
 * step is linear per channel; returns where, or undefined (then nothing was changed).
 */
function divideAtProducer(graph: Graph, value: string, reader: NodeProto, s: Float64Array, rank: number): string | undefined {
  if (graph.onlyReader(value) !== reader) return undefined;
  const p = graph.producer(value);
  if (!p || p.output.length !== 1) return undefined;
  switch (p.opType) {
    case 'Relu':
      return divideAtProducer(graph, p.input[0], p, s, rank);
    case 'Mul':
    case 'Add': {
      const c = channelConstant(graph, p, s.length, rank);
      if (!c) return undefined;
      // An Add's constant is divided too, and so must be what it is added to.
      const before = p.opType === 'Add' ? divideAtProducer(graph, p.input[1 - c.index], p, s, rank) : undefined;
      if (p.opType === 'Add' && !before) return undefined;
      const divided = Float32Array.from(s, (v, ch) => c.values[c.values.length === 1 ? 0 : ch] / v);
      replaceConstant(graph, p, c.index, divided, channelDims(s.length, rank));
      return before ? `${before} and ${nodeLabel(p)}` : nodeLabel(p);
    }
    case 'Conv':
    case 'BatchNormalization': {
      // Conv: the filters and bias of each output channel; BatchNormalization: its scale and shift.
      const wt = graph.constant(p.input[1]);
      const w = wt && floatData(wt);
      const bt = p.input[2] ? graph.constant(p.input[2]) : undefined;
      const bias = p.input[2] ? bt && floatData(bt) : new Float32Array(s.length);
      if (!w || !bias || bias.length !== s.length || dimsOf(wt!)[0] !== s.length) return undefined;
      const per = w.length / s.length;
      for (let o = 0; o < s.length; o++) {
        for (let i = o * per; i < (o + 1) * per; i++) w[i] /= s[o];
        bias[o] /= s[o];
      }
      replaceConstant(graph, p, 1, w, dimsOf(wt!));
      if (p.input.length < 3) p.input.push('');
      replaceConstant(graph, p, 2, bias, [s.length]);
      return nodeLabel(p);
    }
    default:
      return undefined;
  }
}

/**
 * When the input is y = a·h + b (a Mul and an Add by scalars, each read only by the next), makes them per-channel,
 * a/s and b/s − u, so the shift and stretch cost no operation; with `padFirst`, h is padded with −b/a (which the
 * affine maps to the padding's 0). Returns where, or undefined (nothing changed).
 */
function intoScalarAffine(graph: Graph, conv: NodeProto, s: Float64Array, u: Float64Array, rank: number,
  padFirst?: (value: string, fill: number) => string): string | undefined {
  const add = graph.producer(conv.input[0]);
  if (add?.opType !== 'Add' || graph.onlyReader(conv.input[0]) !== conv) return undefined;
  const mul = add.input.map((i) => graph.producer(i)).find((p) => p?.opType === 'Mul');
  const affine = mul && affineFrom(graph, mul);
  if (!mul || affine?.nodes[1] !== add || affine.s === 0 || graph.constant(affine.input)) return undefined;
  const [a, b] = [affine.s, affine.t];
  const aIndex = 1 - mul.input.indexOf(affine.input);
  const bIndex = 1 - add.input.indexOf(mul.output[0]);
  const channels = channelDims(s.length, rank);
  if (padFirst) {
    mul.input[1 - aIndex] = padFirst(mul.input[1 - aIndex], -b / a);
    // The affine's values grow by the padding: shapes recorded for them would now contradict them.
    graph.graph.valueInfo = graph.graph.valueInfo.filter((v) => v.name !== mul.output[0] && v.name !== add.output[0]);
  }
  replaceConstant(graph, mul, aIndex, Float32Array.from(s, (v) => a / v), channels);
  replaceConstant(graph, add, bIndex, Float32Array.from(s, (v, c) => b / v - u[c]), channels);
  return `${padFirst ? 'an inserted Pad, ' : ''}${nodeLabel(mul)} and ${nodeLabel(add)}`;
}

/**
 * Equalizes the inputs of these depthwise convolutions from their calibrated per-channel ranges. Returns the
 * report and, per layer whose input was shifted, the shift u (for `compensateShifts`).
 */
export function equalizeDepthwiseInputs(graph: Graph, layers: NodeProto[], ranges: Map<NodeProto, { lo?: Float64Array; hi?: Float64Array }>):
  { report: PassReport; shifts: Map<string, Float64Array> } {
  // Pad takes its pads and value as inputs from opset 11 (a model kept at an older opset gets no Pad).
  const canPad = graph.opset >= 11;
  const report: PassReport = { pass: 'equalize-depthwise', changed: [], skipped: [] };
  const shifts = new Map<string, Float64Array>();
  for (const conv of layers) {
    const label = nodeLabel(conv);
    const range = ranges.get(conv);
    const group = intAttribute(conv, 'group', 1);
    if (!range?.lo || !range.hi || range.lo.length !== group) {
      report.skipped.push({ node: label, reason: `its input's ${group} channels were not calibrated` });
      continue;
    }
    const pads = intsAttribute(conv, 'pads') ?? [];
    if (!['NOTSET', 'VALID'].includes(stringAttribute(conv, 'auto_pad', 'NOTSET'))) {
      report.skipped.push({ node: label, reason: 'it pads by auto_pad (explicit pads are needed to pad before the shift)' });
      continue;
    }
    const wt = graph.constant(conv.input[1])!;
    const dims = dimsOf(wt);
    if (pads.length !== 0 && pads.length !== 2 * (dims.length - 2)) {
      report.skipped.push({ node: label, reason: `its pads [${pads.join(', ')}] do not give a begin and an end per spatial axis` });
      continue;
    }
    const padded = pads.some((p) => p !== 0);
    const { s, u } = equalization(range.lo, range.hi, padded);
    const stretched = s.filter((v) => v < 1).length;
    const shifted = u.some((v) => v !== 0);
    if (stretched === 0 && !shifted) {
      report.skipped.push({ node: label, reason: 'every input channel already spans the whole range' });
      continue;
    }
    if (padded && shifted && !canPad) {
      report.skipped.push({ node: label, reason: `it pads, and its shifted input would need a Pad with a value input (opset 11; the model stays at ${graph.opset})` });
      continue;
    }
    // Filters W·s; bias b + Σ_taps W·s·u (the shifted input reads u less).
    const w = floatData(wt)!;
    const bt = conv.input[2] ? graph.constant(conv.input[2]) : undefined;
    const bias = conv.input[2] ? bt && floatData(bt) : new Float32Array(dims[0]);
    if (!bias || bias.length !== dims[0]) {
      report.skipped.push({ node: label, reason: 'its bias is not a float constant with one value per output channel' });
      continue;
    }
    const perOutput = w.length / dims[0];
    const outputsPerChannel = dims[0] / group;
    for (let o = 0; o < dims[0]; o++) {
      const c = Math.floor(o / outputsPerChannel);
      let sum = 0;
      for (let i = o * perOutput; i < (o + 1) * perOutput; i++) {
        w[i] *= s[c];
        sum += w[i];
      }
      bias[o] += sum * u[c];
    }
    replaceConstant(graph, conv, 1, w, dims);
    if (shifted) {
      if (conv.input.length < 3) conv.input.push('');
      replaceConstant(graph, conv, 2, bias, [dims[0]]);
      shifts.set(label, u);
    }
    const rank = dims.length;
    let where = shifted ? undefined : divideAtProducer(graph, conv.input[0], conv, s, rank);
    // Pads `value` as the convolution would (with `fill`), which then pads no more.
    const padFirst = (value: string, fill: number): string => {
      const half = pads.length / 2;
      const padsName = graph.uniqueName(`${label}_pads`);
      const all = [0, 0, ...pads.slice(0, half), 0, 0, ...pads.slice(half)];
      graph.addInitializer(makeTensor(padsName, TensorProto_DataType.INT64, [all.length], new Uint8Array(BigInt64Array.from(all.map(BigInt)).buffer)));
      const fillName = graph.uniqueName(`${label}_pad_value`);
      graph.addInitializer(makeTensor(fillName, TensorProto_DataType.FLOAT, [], new Uint8Array(Float32Array.of(fill).buffer)));
      const out = graph.uniqueName(`${value}_padded`);
      graph.graph.node.splice(graph.graph.node.indexOf(conv), 0, graph.newNode('Pad', [value, padsName, fillName], [out], `${label}_pad`));
      conv.attribute = conv.attribute.filter((a) => a.name !== 'pads');
      return out;
    };
    if (!where && shifted) where = intoScalarAffine(graph, conv, s, u, rank, padded ? padFirst : undefined);
    if (!where) {
      const at = () => graph.graph.node.indexOf(conv);
      let x = conv.input[0];
      if (padded && shifted) x = padFirst(x, 0);
      const divided = graph.uniqueName(`${x}_equalized`);
      graph.graph.node.splice(at(), 0, graph.newNode('Mul', [x, channelTensor(graph, `${label}_input_stretch`, s.map((v) => 1 / v), rank)], [divided],
        `${label}_stretch`));
      x = divided;
      if (shifted) {
        const moved = graph.uniqueName(`${x}_shifted`);
        graph.graph.node.splice(at(), 0, graph.newNode('Add', [x, channelTensor(graph, `${label}_input_shift`, u.map((v) => -v), rank)], [moved],
          `${label}_shift`));
        x = moved;
      }
      conv.input[0] = x;
      where = `${padded && shifted ? 'an inserted Pad, ' : 'an inserted '}Mul${shifted ? ' and Add' : ''}`;
    }
    const most = 1 / Math.min(...s);
    const what = [stretched > 0 ? `${stretched} of ${group} input channels stretched (up to ${Number(most.toPrecision(3))}×)` : '',
      shifted ? `${stretched > 0 ? '' : 'input channels '}shifted` : ''].filter((x) => x).join(' and ');
    report.changed.push(`${label}: ${what}, in ${where}`);
  }
  graph.sort();
  return { report, shifts };
}

/**
 * After weight quantization: takes (W' − Ŵ')·u off the bias of each shifted layer, the constant its rounded
 * filters would otherwise take from the shift. Needs the layers' float and dequantized weights.
 */
export function compensateShifts(graph: Graph, weights: QuantizedWeights[], shifts: Map<string, Float64Array>): PassReport {
  const report: PassReport = { pass: 'equalize-depthwise-shift', changed: [], skipped: [] };
  for (const w of weights) {
    const u = shifts.get(w.node);
    if (!u) continue;
    const node = graph.graph.node.find((n) => nodeLabel(n) === w.node)!;
    if (!w.original || !w.dequantized) throw new Error(`shift compensation of ${w.node}: quantizeWeights ran without keepValues`);
    const bias = floatData(graph.constant(node.input[2])!)!;
    const perOutput = w.original.length / bias.length;
    const outputsPerChannel = bias.length / u.length;
    for (let o = 0; o < bias.length; o++) {
      let error = 0;
      for (let i = o * perOutput; i < (o + 1) * perOutput; i++) error += w.original[i] - w.dequantized[i];
      bias[o] -= error * u[Math.floor(o / outputsPerChannel)];
    }
    replaceConstant(graph, node, 2, bias, [bias.length]);
    report.changed.push(`${w.node}: bias compensated for the rounded filters' response to the shift`);
  }
  return report;
}
