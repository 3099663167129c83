/**
 * Converts a model's default-domain opset up to `target` for the operators
 * whose attributes became inputs or whose semantics changed on the way:
 * Clip (11), Slice (10), Pad (11), Dropout (10: an unread mask output dropped; 12), Squeeze/Unsqueeze/Split/
 * ReduceSum (13), Softmax/LogSoftmax/Hardmax (13: the 2-D coercion becomes
 * Flatten + op + Reshape), the other Reduce ops (18), Split's num_outputs (18),
 * Upsample and Resize-10 (Resize-11 with an empty roi, 'asymmetric'
 * coordinates and, for nearest, 'floor' rounding — 'ceil' for a Resize-10 that downsamples —: their old behaviour),
 * Resize-11's 'tf_half_pixel_for_nn' (13: 'half_pixel' with the nearest_mode
 * that picks the same pixels; refused for the modes where none does).
 * Operators known to be unchanged in meaning are kept as they are, and so are
 * If, Loop (from opset 11) and Scan (from 9), whose bodies (which share the
 * model's opset) are converted the same way, their new constants kept inside
 * the body; anything else makes the conversion refuse, and the caller falls
 * back to com.microsoft Q/DQ.
 */
import type { GraphProto, NodeProto, TensorProto } from 'onnx-buf';

import {
  attribute, floatAttribute, floatScalarTensor, floatTensor, scalarOfType, int64Tensor, intAttribute, int64sAttribute, makeIntAttribute,
  isOnnxDomain, makeStringAttribute, namesRead, removeAttribute, stringAttribute, subgraphsOf, floatData, type Graph,
} from '../graph';
import { nodeLabel, type PassReport } from './pass';

// Operators whose meaning at any opset from 7 on equals their meaning at 25 with default attributes.
const UNCHANGED = new Set([
  'Abs', 'Add', 'And', 'ArgMax', 'ArgMin', 'AveragePool', 'BatchNormalization', 'Cast', 'Ceil', 'Concat', 'Constant',
  'ConstantOfShape', 'Conv', 'ConvTranspose', 'Cos', 'DepthToSpace', 'DequantizeLinear', 'Div', 'Elu', 'Equal', 'Erf', 'Exp',
  'Expand', 'Flatten', 'Floor', 'Gather', 'GatherElements', 'Gemm', 'GlobalAveragePool', 'GlobalMaxPool', 'Greater',
  'HardSigmoid', 'HardSwish', 'Identity', 'InstanceNormalization', 'LayerNormalization', 'LeakyRelu', 'Less', 'Log',
  'LRN', 'MatMul', 'Max', 'MaxPool', 'Mean', 'Min', 'Mul', 'Neg', 'Not', 'Or', 'PRelu', 'Pow', 'QuantizeLinear',
  'Range', 'Reciprocal', 'Relu', 'Reshape', 'Selu', 'Shape', 'Sigmoid', 'Sign', 'Sin', 'Size', 'Softplus', 'Softsign',
  'SpaceToDepth', 'Sqrt', 'Sub', 'Sum', 'Tan', 'Tanh', 'Tile', 'Transpose', 'Where', 'Xor', 'Gelu', 'Einsum',
  // Introduced after opset 7 and unchanged since, with default attributes (common in exported transformers).
  'GreaterOrEqual', 'LessOrEqual', 'Trilu', 'CumSum', 'Mod', 'IsNaN', 'IsInf', 'ScatterND', 'ScatterElements', 'GatherND',
  'NonZero', 'OneHot', 'Round', 'CastLike', 'Mish', 'Celu', 'ThresholdedRelu', 'Shrink', 'Asin', 'Acos', 'Atan', 'Sinh',
  'Cosh', 'Asinh', 'Acosh', 'Atanh', 'Compress', 'EyeLike', 'LpNormalization', 'BitShift', 'Det', 'ReverseSequence',
  'Unique', 'NonMaxSuppression', 'MatMulInteger', 'ConvInteger', 'DynamicQuantizeLinear', 'BitwiseAnd', 'BitwiseOr',
  'BitwiseXor', 'BitwiseNot',
  // Recurrent layers: 14 added `layout` (default 0, the layout of 7) and 22 bfloat16 (speech models: Silero VAD).
  'LSTM', 'GRU', 'RNN',
]);
const REDUCE_18 = new Set(['ReduceMean', 'ReduceMax', 'ReduceMin', 'ReduceProd', 'ReduceSumSquare', 'ReduceL1', 'ReduceL2', 'ReduceLogSum', 'ReduceLogSumExp']);

// Control flow: unchanged in meaning from this opset on (later versions only admit more types), bodies converted.
const CONTROL_FLOW_SINCE = new Map([['If', 1], ['Loop', 11], ['Scan', 9]]);

/** Why the model cannot be converted (or undefined when it can). */
export function unconvertibleReason(graph: Graph): string | undefined {
  // Before 7, Add, Mul, Gemm… broadcast only with a `broadcast` attribute and an `axis`, and other attributes
  // (BatchNormalization's is_test, spatial) differ: what UNCHANGED says holds from 7 on.
  if (graph.opset < 7) return `the model's opset ${graph.opset} predates 7, from which lowbit converts (older broadcasting rules and attributes)`;
  return unconvertibleIn(graph, graph.graph);
}

function unconvertibleIn(graph: Graph, scope: GraphProto): string | undefined {
  const opset = graph.opset;
  for (const n of scope.node) {
    if (!isOnnxDomain(n.domain)) continue;
    for (const body of subgraphsOf(n)) {
      const why = unconvertibleIn(graph, body);
      if (why) return `${why}, inside ${n.opType} (${nodeLabel(n)})`;
    }
    if (n.opType === 'BatchNormalization' && n.output.filter((o) => o !== '').length > 1) {
      return `BatchNormalization (${nodeLabel(n)}) with training outputs (running statistics; from opset 14 they need training_mode) is not converted here`;
    }
    if (n.opType === 'BatchNormalization' && opset < 9 && intAttribute(n, 'spatial', 1) === 0) {
      return `BatchNormalization (${nodeLabel(n)}) with spatial = 0 (per-element statistics, dropped at opset 9) is not converted here`;
    }
    if (n.opType === 'Dropout' && opset < 10 && n.output[1] && namesRead(scope).has(n.output[1])) {
      return `Dropout (${nodeLabel(n)}) whose mask output is used (the mask became bool at opset 10) is not converted here`;
    }
    if (UNCHANGED.has(n.opType) || REDUCE_18.has(n.opType)) continue;
    if (['Clip', 'Slice', 'Pad', 'Dropout', 'Squeeze', 'Unsqueeze', 'Split', 'ReduceSum', 'Softmax', 'LogSoftmax', 'Hardmax'].includes(n.opType)) continue;
    if (n.opType === 'Resize' && opset >= 11 && opset < 13 && usesTfHalfPixel(n) && !halfPixelNearestMode(n)) {
      return `Resize (${nodeLabel(n)}) with coordinate_transformation_mode 'tf_half_pixel_for_nn' (dropped at opset 13) and mode ` +
        `'${stringAttribute(n, 'mode', 'nearest')}', nearest_mode '${stringAttribute(n, 'nearest_mode', 'round_prefer_floor')}' has no equivalent at opset 13 ` +
        "(only nearest with 'round_prefer_floor' or 'floor' is converted)";
    }
    if (n.opType === 'Resize' && opset === 10 && stringAttribute(n, 'mode', 'nearest') === 'nearest' && !resize10NearestMode(graph, n, scope)) {
      return `Resize-10 (${nodeLabel(n)}) in mode 'nearest' whose scales are not constants all >= 1 or all <= 1 (empty, mixed or computed): opset 10 rounds ` +
        'down where it upsamples and up where it downsamples, which no single nearest_mode of opset 11 on does';
    }
    if (n.opType === 'Resize' || n.opType === 'Upsample') continue;
    if (opset >= (CONTROL_FLOW_SINCE.get(n.opType) ?? Infinity)) continue;
    return `${n.opType} (${nodeLabel(n)}) changed between opset ${opset} and the target and is not converted here`;
  }
  return undefined;
}

/**
 * The nearest_mode with which an opset-11+ Resize ('asymmetric') picks the pixels a Resize-10 in mode 'nearest'
 * picks: onnxruntime's opset 10 (and ONNX's resize_downsample_nearest test) rounds the source coordinate down where a
 * dimension upsamples and up where it downsamples, so constant scales all >= 1 give 'floor', all <= 1 'ceil';
 * undefined for mixed or non-constant scales.
 */
function resize10NearestMode(graph: Graph, n: NodeProto, scope: GraphProto): 'floor' | 'ceil' | undefined {
  const t = n.input[1] ? graph.constant(n.input[1], scope) ?? graph.constant(n.input[1]) : undefined;
  const scales = t && floatData(t);
  if (!scales || scales.length === 0) return undefined;
  if (scales.every((s) => s >= 1)) return 'floor';
  if (scales.every((s) => s <= 1)) return 'ceil';
  return undefined;
}

/**
 * Resize-11's 'tf_half_pixel_for_nn' maps x to (x + 0.5) / scale; 'half_pixel' to that minus 0.5, so rounding
 * (x + 0.5) / scale is rounding the half_pixel coordinate shifted by half: round_prefer_floor(c) = ceil(c − 0.5) and
 * floor(c) = round_prefer_ceil(c − 0.5). The nearest_mode that does this with 'half_pixel', or undefined when none
 * does (linear and cubic modes, nearest with 'ceil' or 'round_prefer_ceil').
 */
function halfPixelNearestMode(n: NodeProto): string | undefined {
  if (stringAttribute(n, 'mode', 'nearest') !== 'nearest') return undefined;
  return new Map([['round_prefer_floor', 'ceil'], ['floor', 'round_prefer_ceil']]).get(stringAttribute(n, 'nearest_mode', 'round_prefer_floor'));
}

function usesTfHalfPixel(n: NodeProto): boolean {
  return stringAttribute(n, 'coordinate_transformation_mode', 'half_pixel') === 'tf_half_pixel_for_nn';
}

/** The lowest IR version of the ONNX releases with this opset (onnx/docs/Versioning.md). */
function irVersionFor(opset: number): number {
  const table: Array<[number, number]> = [[25, 13], [24, 12], [23, 11], [21, 10], [19, 9], [15, 8], [12, 7], [11, 6], [10, 5], [9, 4]];
  return table.find(([from]) => opset >= from)?.[1] ?? 3;
}

export function upgradeOpset(graph: Graph, target: number): PassReport {
  const report: PassReport = { pass: `upgrade-opset ${graph.opset} -> ${target}`, changed: [], skipped: [] };
  if (graph.opset >= target) return report;
  const why = unconvertibleReason(graph);
  if (why) throw new Error(why);
  upgradeNodes(graph, target, report);
  graph.opset = target;
  // The IR version of the ONNX release that brought the opset (INT4 needs 10, for one): strict checkers refuse less.
  const ir = BigInt(irVersionFor(target));
  if (graph.model.irVersion < ir) {
    report.changed.push(`IR version ${graph.model.irVersion} -> ${ir}`);
    if (graph.model.irVersion < 4n) {
      // IR 3 listed every initializer among the graph inputs; from IR 4 that makes them overridable inputs, which
      // onnxruntime does not fold or fuse (the weights' DequantizeLinear would stay a run-time op).
      const initializers = new Set(graph.graph.initializer.map((t) => t.name));
      graph.graph.input = graph.graph.input.filter((i) => !initializers.has(i.name));
    }
    graph.model.irVersion = ir;
  }
  graph.sort();
  return report;
}

// Converts the nodes of one graph (`scopes`: none for the main graph; for a subgraph body, it and the bodies around
// it, innermost first) and, first, their bodies.
function upgradeNodes(graph: Graph, target: number, report: PassReport, scopes: GraphProto[] = []): void {
  const from = graph.opset;
  const scope = scopes[0] ?? graph.graph;
  const constInput = (base: string, make: (name: string) => TensorProto) => {
    const name = graph.uniqueName(base);
    graph.addInitializer(make(name), scope);
    return name;
  };
  for (const n of [...scope.node]) {
    if (!isOnnxDomain(n.domain)) continue;
    for (const body of subgraphsOf(n)) upgradeNodes(graph, target, report, [body, ...scopes]);
    const label = nodeLabel(n);
    const moveInts = (attr: string, inputIndex: number) => {
      const values = int64sAttribute(n, attr);
      if (values === undefined) return false;
      while (n.input.length < inputIndex) n.input.push('');
      n.input[inputIndex] = constInput(`${label}_${attr}`, (name) => int64Tensor(name, values));
      removeAttribute(n, attr);
      return true;
    };
    switch (n.opType) {
      case 'Clip':
        if (from < 11) {
          const min = floatAttribute(n, 'min', -3.4028234663852886e38);
          const max = floatAttribute(n, 'max', 3.4028234663852886e38);
          // The bounds take the type of the clipped tensor (float16 in a float16 model).
          const type = graph.elemType(n.input[0], scopes);
          n.input[1] = constInput(`${label}_min`, (name) => scalarOfType(name, min, type));
          n.input[2] = constInput(`${label}_max`, (name) => scalarOfType(name, max, type));
          removeAttribute(n, 'min');
          removeAttribute(n, 'max');
          report.changed.push(`${label}: Clip min/max attributes -> inputs`);
        }
        break;
      case 'Slice':
        if (from < 10) {
          const starts = int64sAttribute(n, 'starts') ?? [];
          const ends = int64sAttribute(n, 'ends') ?? [];
          n.input[1] = constInput(`${label}_starts`, (name) => int64Tensor(name, starts));
          n.input[2] = constInput(`${label}_ends`, (name) => int64Tensor(name, ends));
          removeAttribute(n, 'starts');
          removeAttribute(n, 'ends');
          moveInts('axes', 3);
          report.changed.push(`${label}: Slice attributes -> inputs`);
        }
        break;
      case 'Pad':
        if (from < 11) {
          moveInts('pads', 1);
          const value = floatAttribute(n, 'value', 0);
          n.input[2] = constInput(`${label}_value`, (name) => scalarOfType(name, value, graph.elemType(n.input[0], scopes)));
          removeAttribute(n, 'value');
          report.changed.push(`${label}: Pad attributes -> inputs`);
        }
        break;
      case 'BatchNormalization':
        // spatial (opset 7, 8) is 1 here (unconvertibleIn refuses 0): the only meaning it kept at opset 9.
        if (from < 9 && attribute(n, 'spatial')) {
          removeAttribute(n, 'spatial');
          report.changed.push(`${label}: BatchNormalization spatial = 1 attribute dropped`);
        }
        break;
      case 'Dropout':
        if (from < 10 && n.output[1]) {
          // Unread (unconvertibleReason refuses a read one): dropped with its declared float type, which onnxruntime
          // would refuse beside the bool mask of opset 10 on.
          const mask = n.output[1];
          n.output.length = 1;
          scope.valueInfo = scope.valueInfo.filter((v) => v.name !== mask);
          report.changed.push(`${label}: Dropout's unread mask output dropped (float before opset 10, bool after)`);
        }
        if (from < 12 && attribute(n, 'ratio')) {
          const ratio = floatAttribute(n, 'ratio', 0.5);
          n.input[1] = constInput(`${label}_ratio`, (name) => floatScalarTensor(name, ratio));
          removeAttribute(n, 'ratio');
          report.changed.push(`${label}: Dropout ratio -> input`);
        }
        break;
      case 'Squeeze':
      case 'Unsqueeze':
      case 'ReduceSum':
        if (from < 13 && moveInts('axes', 1)) report.changed.push(`${label}: ${n.opType} axes -> input`);
        break;
      case 'Split':
        if (from < 13 && moveInts('split', 1)) report.changed.push(`${label}: Split split -> input`);
        if (target >= 18 && !n.input[1]) {
          n.input.length = 1;  // an empty name omits the input too, but onnxruntime refuses it beside num_outputs
          n.attribute.push(makeIntAttribute('num_outputs', n.output.length));
          report.changed.push(`${label}: Split num_outputs`);
        }
        break;
      case 'Softmax':
      case 'LogSoftmax':
      case 'Hardmax':
        if (from < 13) {
          // Old semantics: coerce to 2-D at `axis`, apply over the second dimension.
          const axis = intAttribute(n, 'axis', 1);
          const x = n.input[0];
          const y = n.output[0];
          const flat = graph.uniqueName(`${label}_flat`);
          const shape = graph.uniqueName(`${label}_shape`);
          const z = graph.uniqueName(`${label}_2d`);
          removeAttribute(n, 'axis');
          n.attribute.push(makeIntAttribute('axis', -1));
          n.input[0] = flat;
          n.output[0] = z;
          // In place, so a subgraph body (which nothing sorts) stays in order.
          const at = scope.node.indexOf(n);
          // allowzero (opset 14 on): a 0 in the shape is a size, not "copy the 2-D input's dimension" (a zero-size x).
          scope.node.splice(at + 1, 0, graph.newNode('Reshape', [z, shape], [y], `${label}_reshape_back`,
            target >= 14 ? [makeIntAttribute('allowzero', 1)] : []));
          scope.node.splice(at, 0,
            graph.newNode('Flatten', [x], [flat], `${label}_flatten`, [makeIntAttribute('axis', axis)]),
            graph.newNode('Shape', [x], [shape], `${label}_shape_of_input`));
          report.changed.push(`${label}: ${n.opType} 2-D coercion -> Flatten, ${n.opType}(axis=-1), Reshape`);
        }
        break;
      case 'Upsample':
      case 'Resize':
        if (n.opType === 'Upsample' || from < 11) {
          if (n.opType === 'Upsample' && n.input.length < 2) {
            const scales = attribute(n, 'scales')?.floats ?? [];
            n.input[1] = constInput(`${label}_scales`, (name) => floatTensor(name, scales));
            removeAttribute(n, 'scales');
          }
          // Upsample only upsamples (scales >= 1): 'floor'; Resize-10 by its scales (unconvertibleIn refused the rest).
          const nearestMode = stringAttribute(n, 'mode', 'nearest') !== 'nearest' ? undefined
            : n.opType === 'Upsample' ? 'floor' : resize10NearestMode(graph, n, scope)!;
          n.input = [n.input[0], '', n.input[1]];
          n.opType = 'Resize';
          n.attribute.push(makeStringAttribute('coordinate_transformation_mode', 'asymmetric'));
          if (nearestMode) n.attribute.push(makeStringAttribute('nearest_mode', nearestMode));
          report.changed.push(`${label}: ${from < 10 ? 'Upsample' : 'Resize-10'} -> Resize (asymmetric${nearestMode ? `, ${nearestMode}` : ''})`);
        } else if (from < 13 && target >= 13 && usesTfHalfPixel(n)) {
          const nearestMode = halfPixelNearestMode(n)!;
          removeAttribute(n, 'coordinate_transformation_mode');
          removeAttribute(n, 'nearest_mode');
          n.attribute.push(makeStringAttribute('coordinate_transformation_mode', 'half_pixel'), makeStringAttribute('nearest_mode', nearestMode));
          report.changed.push(`${label}: Resize 'tf_half_pixel_for_nn' -> 'half_pixel' with nearest_mode '${nearestMode}' (same pixels)`);
        }
        break;
      default:
        if (REDUCE_18.has(n.opType) && target >= 18 && moveInts('axes', 1)) report.changed.push(`${label}: ${n.opType} axes -> input`);
    }
  }
}
