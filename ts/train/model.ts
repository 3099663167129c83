/**
 * A trainable view of an ONNX model: the graph IR in topological order, its
 * weights as parameters (Conv/Gemm/MatMul weights and biases, BatchNormalization
 * scale and bias, Add/Sub constant operands), other constants, and forward /
 * backward passes over it. Fake quantizers (LSQ, GDRQ) hook into the weight and
 * activation inputs of Conv, Gemm and MatMul.
 */
import { TensorProto_DataType, type ModelProto, type NodeProto, type TensorProto } from 'onnx-buf';

import { dimsOf, floatAttribute, floatData, Graph, intAttribute, makeNode, transposes } from '../onnx/graph';
import { nodeLabel } from '../onnx/passes/pass';
import { bypassConstantIdentities, constantAttributesAsTensors } from '../onnx/passes/constant-identities';
import type { FloatKernels } from './kernels';
import { OPS, softmaxLayout, type OpContext } from './ops';
import { firstNonFinite, sizeOf, type Tensor } from './tensor';

export interface Parameter {
  name: string;
  value: Float32Array;
  dims: number[];
  grad: Float32Array;
  /** SGD momentum, or Adam's first moment. */
  velocity: Float32Array;
  /** Adam's second moment (allocated by the first Adam step). */
  secondMoment?: Float32Array;
  /** Weight decay applies (Conv/Gemm/MatMul weights, not biases, BN parameters or steps). */
  decay: boolean;
  /** Lower bound kept after every update (quantizer steps must stay positive). */
  min?: number;
}

export function makeParameter(name: string, value: Float32Array, dims: number[], decay: boolean, min?: number): Parameter {
  return { name, value, dims, grad: new Float32Array(value.length), velocity: new Float32Array(value.length), decay, min };
}

/** A fake quantizer in the forward pass: its backward returns the input gradient and accumulates its own parameters' gradients. */
export interface FakeQuantizer {
  readonly parameters: Parameter[];
  forward(x: Tensor, training: boolean): { y: Tensor; saved?: unknown };
  backward(x: Tensor, saved: unknown, dy: Float32Array): Float32Array;
}

export interface LayerQuantizers {
  weight?: FakeQuantizer;
  activation?: FakeQuantizer;
}

/** A layer with quantizable weights: Conv, Gemm or MatMul with a parameter weight. */
export interface QuantizableLayer {
  node: NodeProto;
  label: string;
  weightInput: number;
  /** The input the activation quantizer takes: 0, but 1 for a MatMul whose constant weight comes first (W·x). */
  activationInput: number;
  weight: Parameter;
  /** Axis of the weight's output channels. */
  outputAxis: number;
}

export class TrainingError extends Error {
  /**
   * The last good model (ONNX bytes), when training stopped on a non-finite value or on a batch an operator refused
   * after the first step; undefined when the first batch's forward pass already gave one (no update had run).
   */
  model?: Uint8Array;
  step?: number;
  layer?: string;
  constructor(message: string) {
    super(message);
    this.name = 'TrainingError';
  }
}

interface Tape {
  values: Map<string, Tensor>;
  /** The (possibly fake-quantized) inputs each node saw, and what its forward saved. */
  records: Map<NodeProto, { inputs: Array<Tensor | undefined>; saved: unknown; quantSaved: unknown[] }>;
}

const INTEGER_TYPES = new Set([TensorProto_DataType.INT8, TensorProto_DataType.UINT8, TensorProto_DataType.INT16, TensorProto_DataType.UINT16,
  TensorProto_DataType.INT32, TensorProto_DataType.UINT32, TensorProto_DataType.INT64, TensorProto_DataType.UINT64]);

/** Ops that give their input's values in the same order under other dimensions. */
const RELABELLING = new Set(['Identity', 'Flatten', 'Reshape', 'Squeeze', 'Unsqueeze', 'Dropout']);

const PARAMETER_INPUTS: Record<string, number[]> = {
  Conv: [1, 2], Gemm: [1, 2], MatMul: [0, 1], BatchNormalization: [1, 2], Add: [0, 1], Sub: [0, 1],
};

function constantTensor(t: TensorProto): Tensor | undefined {
  const dims = dimsOf(t);
  const f = floatData(t);
  if (f) return { data: f, dims };
  if (t.dataType === TensorProto_DataType.INT64) {
    const values = t.rawData.length > 0 ? new BigInt64Array(Uint8Array.from(t.rawData).buffer) : BigInt64Array.from(t.int64Data);
    return { data: Float32Array.from(values, Number), dims };
  }
  if (t.dataType === TensorProto_DataType.BOOL) {  // (Dropout's training_mode)
    return { data: Float32Array.from(t.rawData.length > 0 ? t.rawData : t.int32Data, (v) => (v ? 1 : 0)), dims };
  }
  if (t.dataType === TensorProto_DataType.INT32) {
    const values = t.rawData.length > 0 ? new Int32Array(Uint8Array.from(t.rawData).buffer) : Int32Array.from(t.int32Data);
    return { data: Float32Array.from(values), dims };
  }
  return undefined;
}

/** The value of a constant scalar input, if it is one. */
function scalar(graph: Graph, name: string | undefined): number | undefined {
  const t = name ? graph.constant(name) : undefined;
  const v = t ? floatData(t) : undefined;
  return v && v.length === 1 ? v[0] : undefined;
}

/**
 * HardSwish written out as x · Clip(x + 3, 0, 6) / 6 (as exporters for opsets before 14 do; the product and the
 * division in either order) becomes one native HardSwish in the execution plan: four passes over the tensor,
 * and four backward, become one each. Only the plan changes; the graph, and so the export, keeps its nodes.
 */
function fuseHardSwish(graph: Graph, nodes: NodeProto[]): NodeProto[] {
  // The single consumer of a tensor that nothing else reads.
  const next = (name: string): NodeProto | undefined => {
    const consumers = graph.consumers(name);
    return consumers.length === 1 && !graph.isGraphOutput(name) ? consumers[0] : undefined;
  };
  const isSixth = (n: NodeProto | undefined, input: string) => !!n && n.input[0] === input &&
    ((n.opType === 'Div' && scalar(graph, n.input[1]) === 6) || (n.opType === 'Mul' && Math.abs((scalar(graph, n.input[1]) ?? 0) - 1 / 6) < 1e-7));
  const timesX = (n: NodeProto | undefined, input: string, x: string) => !!n && n.opType === 'Mul' &&
    ((n.input[0] === x && n.input[1] === input) || (n.input[1] === x && n.input[0] === input));
  const removed = new Set<NodeProto>();
  const replacement = new Map<NodeProto, NodeProto>();
  for (const clip of nodes) {
    if (clip.opType !== 'Clip') continue;
    const bounds = graph.opset >= 11 ? [scalar(graph, clip.input[1]), scalar(graph, clip.input[2])]
      : [floatAttribute(clip, 'min', NaN), floatAttribute(clip, 'max', NaN)];
    const add = graph.producer(clip.input[0]);
    if (bounds[0] !== 0 || bounds[1] !== 6 || add?.opType !== 'Add' || next(add.output[0]) !== clip) continue;
    const x = scalar(graph, add.input[1]) === 3 ? add.input[0] : scalar(graph, add.input[0]) === 3 ? add.input[1] : undefined;
    const second = next(clip.output[0]);
    const last = second ? next(second.output[0]) : undefined;
    if (!x || !second || !last) continue;
    const productFirst = timesX(second, clip.output[0], x) && isSixth(last, second.output[0]);
    const divisionFirst = isSixth(second, clip.output[0]) && timesX(last, second.output[0], x);
    if (!productFirst && !divisionFirst) continue;
    for (const n of [add, clip, second]) removed.add(n);
    replacement.set(last, makeNode('HardSwish', [x], [last.output[0]], `${last.name || last.output[0]} (HardSwish)`));
  }
  return nodes.flatMap((n) => (replacement.has(n) ? [replacement.get(n)!] : removed.has(n) ? [] : [n]));
}

export class TrainableModel {
  readonly graph: Graph;
  readonly nodes: NodeProto[];
  readonly inputName: string;
  readonly inputDims: Array<number | undefined>;
  readonly outputName: string;
  /** The tensor the loss reads as logits: the output, or the input of a final Softmax. */
  readonly logitsName: string;
  /** The Softmax that makes the output (through ops that only relabel dimensions), if there is one. */
  readonly finalSoftmax?: NodeProto;
  readonly params = new Map<string, Parameter>();
  readonly constants = new Map<string, Tensor>();
  readonly layers: QuantizableLayer[] = [];
  /** The layer of each of those nodes: looked up per node on every step. */
  private readonly layerOf = new Map<NodeProto, QuantizableLayer>();
  readonly quantizers = new Map<NodeProto, LayerQuantizers>();
  /** Training keeps BatchNormalization on its running statistics (fine-tuning with small or unrepresentative batches). */
  freezeBatchNorm = false;
  private readonly needsGrad = new Set<string>();
  /** Div nodes whose operands are integers (shape arithmetic): the engine computes in float32 and truncates them. */
  private readonly integerDivisions: ReadonlySet<NodeProto>;

  constructor(model: ModelProto) {
    this.graph = new Graph(model);
    // The structure the engine relies on, as quantizeModel checks it (a value defined twice reached the loss as undefined).
    this.graph.validate();
    constantAttributesAsTensors(this.graph);  // value_float(s)/value_int(s) Constants: read as tensors like the others
    bypassConstantIdentities(this.graph);  // weights read through an Identity (shared or renamed): trained as weights
    const unsupported = [...new Set(model.graph!.node.filter((n) => n.opType !== 'Constant' && (n.domain !== '' && n.domain !== 'ai.onnx' || !OPS.has(n.opType))).map((n) => n.opType))];
    if (unsupported.length > 0) {
      throw new TrainingError(`The model uses operators the training engine does not support: ${unsupported.join(', ')}. ` +
        `Supported: ${[...OPS.keys()].join(', ')}.`);
    }
    for (const n of model.graph!.node) {
      if (n.opType === 'BatchNormalization' && (intAttribute(n, 'training_mode', 0) !== 0 || n.output.slice(1).some(Boolean))) {
        throw new TrainingError(`BatchNormalization '${nodeLabel(n)}' is in training mode (training_mode = 1 or running-statistics outputs): ` +
          'onnxruntime runs such a model only in a training build, and the export would keep it so. Export the model in inference mode ' +
          '(PyTorch: model.eval() before torch.onnx.export); fine-tuning trains BatchNormalization itself.');
      }
      const dropoutTraining = n.opType === 'Dropout' && n.input[2] ? this.graph.constant(n.input[2]) : undefined;
      if (dropoutTraining && constantTensor(dropoutTraining)?.data.some(Boolean)) {
        throw new TrainingError(`Dropout '${nodeLabel(n)}' has training_mode true: onnxruntime drops units at random on every run of it, ` +
          'which fine-tuning does not do (it takes Dropout as the identity). Set training_mode to false or remove the input.');
      }
    }
    this.integerDivisions = new Set(model.graph!.node.filter((n) => n.opType === 'Div' && INTEGER_TYPES.has(this.graph.elemType(n.input[0]) ?? 0)));
    this.nodes = fuseHardSwish(this.graph, this.graph.topologicalOrder().filter((n) => n.opType !== 'Constant'));
    const initializers = new Set(model.graph!.initializer.map((t) => t.name));
    const inputs = model.graph!.input.filter((i) => !initializers.has(i.name));
    if (inputs.length !== 1) throw new TrainingError(`Fine-tuning needs a model with exactly one input; this one has ${inputs.length} (${inputs.map((i) => i.name).join(', ')}).`);
    this.inputName = inputs[0].name;
    const type = inputs[0].type?.value;
    this.inputDims = type?.case === 'tensorType'
      ? (type.value.shape?.dim ?? []).map((d) => (d.value.case === 'dimValue' ? Number(d.value.value) : undefined))
      : [];
    this.outputName = model.graph!.output[0]?.name;
    if (!this.outputName) throw new TrainingError('The model has no output.');
    if (!this.nodes.some((n) => n.output.includes(this.outputName))) {
      throw new TrainingError(`The model's output '${this.outputName}' is not computed by any of its operators (it is a constant or an input): ` +
        'fine-tuning trains a model whose output is computed from its input.');
    }
    // A final Softmax, also behind ops that only relabel dimensions (Flatten, Reshape… as converters write them):
    // the loss reads its input as logits, in the output's layout, since such ops keep the values' order.
    let last = this.nodes.find((n) => n.output[0] === this.outputName);
    // (Other readers may take only its shape: PyTorch's x.view(x.size(0), -1) reads Shape(x) too.)
    const relabelsOnly = (n: NodeProto) => !this.graph.isGraphOutput(n.input[0]) &&
      this.graph.consumers(n.input[0]).every((r) => r === n || r.opType === 'Shape' || r.opType === 'Size');
    while (last && RELABELLING.has(last.opType) && relabelsOnly(last)) last = this.graph.producer(last.input[0]);
    this.finalSoftmax = last?.opType === 'Softmax' ? last : undefined;
    this.logitsName = this.finalSoftmax ? this.finalSoftmax.input[0] : this.outputName;

    // BatchNormalization running statistics are updated in place: one whose mean or variance is a tensor other
    // inputs read too (exporters deduplicate equal tensors: fresh zeros and ones, a bias equal to a mean) gets its
    // own copy, or training would move the other reader's values with it.
    const readers = new Map<string, number>();
    for (const node of this.nodes) for (const name of node.input) if (name) readers.set(name, (readers.get(name) ?? 0) + 1);
    for (const bn of this.nodes.filter((n) => n.opType === 'BatchNormalization')) {
      for (const k of [3, 4]) {
        const name = bn.input[k];
        const t = name && (readers.get(name) ?? 0) > 1 ? this.graph.constant(name) : undefined;
        if (!t) continue;
        readers.set(name, readers.get(name)! - 1);
        bn.input[k] = this.graph.copyConstants([t], undefined, [name])[0].name;
      }
    }
    // Parameters and constants.
    for (const node of this.nodes) {
      node.input.forEach((name, i) => {
        if (!name || this.params.has(name) || this.constants.has(name)) return;
        const t = this.graph.constant(name);
        if (!t) return;
        const tensor = constantTensor(t);
        if (!tensor) throw new TrainingError(`${node.opType} node '${nodeLabel(node)}' reads constant '${name}' of an unsupported data type (${TensorProto_DataType[t.dataType]}).`);
        // A scalar Add/Sub operand is a hyper-parameter (a LayerNorm's epsilon, HardSwish's +3), not a bias.
        const scalarOperand = (node.opType === 'Add' || node.opType === 'Sub') && tensor.data.length === 1;
        const trainable = t.dataType === TensorProto_DataType.FLOAT && (PARAMETER_INPUTS[node.opType] ?? []).includes(i) && !scalarOperand;
        if (trainable) {
          const decay = (node.opType === 'Conv' || node.opType === 'Gemm' || node.opType === 'MatMul') && tensor.dims.length >= 2;
          this.params.set(name, makeParameter(name, Float32Array.from(tensor.data), tensor.dims, decay));
        } else {
          this.constants.set(name, { data: Float32Array.from(tensor.data), dims: tensor.dims });
        }
      });
    }
    for (const node of this.nodes) {
      const weightInput = node.opType === 'MatMul' ? [1, 0].find((i) => this.params.has(node.input[i])) : 1;
      if (!['Conv', 'Gemm', 'MatMul'].includes(node.opType) || weightInput === undefined) continue;
      const weight = this.params.get(node.input[weightInput]);
      if (!weight || weight.dims.length < 2) continue;
      const outputAxis = node.opType === 'Conv' ? 0 : node.opType === 'Gemm' ? (transposes(node, 'transB') ? 0 : 1) : weightInput === 1 ? weight.dims.length - 1 : 0;  // x·W: W's last axis ([K, N], or [1, K, N])
      const layer = { node, label: nodeLabel(node), weightInput, activationInput: weightInput === 0 ? 1 : 0, weight, outputAxis };
      this.layers.push(layer);
      this.layerOf.set(node, layer);
    }
    this.analyseGradients();
  }

  /** Which values need a gradient: parameters and everything computed from them, and inputs of learnable quantizers. */
  analyseGradients(): void {
    this.needsGrad.clear();
    for (const name of this.params.keys()) this.needsGrad.add(name);
    for (const node of this.nodes) {
      const q = this.quantizers.get(node);
      const learnsInput = !!q?.activation && q.activation.parameters.length > 0;
      if (learnsInput || node.input.some((i) => this.needsGrad.has(i))) node.output.forEach((o) => this.needsGrad.add(o));
    }
  }

  setQuantizers(quantizers: Map<NodeProto, LayerQuantizers>): void {
    this.quantizers.clear();
    for (const [k, v] of quantizers) this.quantizers.set(k, v);
    this.analyseGradients();
  }

  /** Every trainable parameter, quantizer steps included. */
  allParameters(): Parameter[] {
    const list = [...this.params.values()];
    for (const q of this.quantizers.values()) list.push(...(q.weight?.parameters ?? []), ...(q.activation?.parameters ?? []));
    return list;
  }

  private value(tape: Tape, name: string): Tensor | undefined {
    if (!name) return undefined;
    const p = this.params.get(name);
    if (p) return { data: p.value, dims: p.dims };
    return tape.values.get(name) ?? this.constants.get(name);
  }

  /** The values of every node on this input; `quantize: false` runs the float model, as if no quantizer were set. */
  forward(input: Tensor, training: boolean, kernels: FloatKernels, quantize = true): Tape {
    const tape: Tape = { values: new Map([[this.inputName, input]]), records: new Map() };
    const ctx: OpContext = { kernels, training, opset: this.graph.opset, frozenBatchNorm: this.freezeBatchNorm,
      integerDivisions: this.integerDivisions, samples: input.dims[0] };
    for (const node of this.nodes) {
      const inputs = node.input.map((name) => this.value(tape, name));
      const q = quantize ? this.quantizers.get(node) : undefined;
      const quantSaved: unknown[] = [];
      const layer = q ? this.layerOf.get(node) : undefined;
      const act = layer?.activationInput ?? 0;
      if (q?.activation && inputs[act]) {
        const r = q.activation.forward(inputs[act]!, training);
        inputs[act] = r.y;
        quantSaved[act] = r.saved;
      }
      if (q?.weight && layer && inputs[layer.weightInput]) {
        const r = q.weight.forward(inputs[layer.weightInput]!, training);
        inputs[layer.weightInput] = r.y;
        quantSaved[layer.weightInput] = r.saved;
      }
      const { y, saved } = OPS.get(node.opType)!.forward(node, inputs, ctx);
      tape.values.set(node.output[0], y);
      tape.records.set(node, { inputs, saved, quantSaved });
    }
    return tape;
  }

  /**
   * A value of the last forward pass; by default the logits, in the layout of the model's output (one row per
   * distribution of a final Softmax, which must then normalize over the output's last axis).
   */
  output(tape: Tape, name = this.logitsName): Tensor {
    const value = tape.values.get(name)!;
    if (name !== this.logitsName || !this.finalSoftmax) return value;
    const dims = tape.values.get(this.outputName)!.dims;
    const [, group, inner] = softmaxLayout(this.finalSoftmax, value.dims, this.graph.opset);
    if (inner !== 1 || group !== dims[dims.length - 1]) {
      throw new TrainingError(`The model's final Softmax '${nodeLabel(this.finalSoftmax)}' normalizes groups of ${group} values ` +
        `${inner === 1 ? '' : `${inner} apart `}over its input [${value.dims.join(', ')}], but the output '${this.outputName}' it makes is ` +
        `[${dims.join(', ')}]: fine-tuning reads the Softmax's input as logits, one row of the output per distribution. ${inner === 1
          ? 'The nodes after the Softmax regroup its rows: make the output one row per distribution'
          : 'Give the Softmax the axis of the classes, last'}, or remove the Softmax (fine-tuning adds its own).`);
    }
    return { data: value.data, dims };
  }

  /** The first node (topological order) whose output holds a non-finite value, if any. */
  /**
   * The first layer whose activation quantizer took a non-finite value (which it turned into a code, hiding it from
   * the loss), or undefined. Reads only those inputs: a scan of every value cost a third of a training step.
   */
  maskedNonFinite(tape: Tape): string | undefined {
    for (const [node, q] of this.quantizers) {
      if (!q.activation) continue;
      const act = this.layerOf.get(node)?.activationInput ?? 0;
      const v = this.value(tape, node.input[act]);
      if (v && firstNonFinite(v.data) >= 0) return nodeLabel(node);
    }
    return undefined;
  }

  firstNonFiniteLayer(tape: Tape): string | undefined {
    for (const node of this.nodes) {
      const v = tape.values.get(node.output[0]);
      if (v && firstNonFinite(v.data) >= 0) return nodeLabel(node);
    }
    return undefined;
  }

  /** Back-propagates dLoss/dLogits; parameter gradients are overwritten (quantizer steps accumulate into their grad). */
  backward(tape: Tape, dLogits: Float32Array, kernels: FloatKernels): void {
    const ctx: OpContext = { kernels, training: true, opset: this.graph.opset, frozenBatchNorm: this.freezeBatchNorm,
      integerDivisions: this.integerDivisions };
    const grads = new Map<string, Float32Array>([[this.logitsName, dLogits]]);
    // Gradients may alias each other (Identity, Reshape and Add pass dy through): sums go to fresh arrays.
    const add = (name: string, g: Float32Array) => {
      const prev = grads.get(name);
      if (!prev) {
        grads.set(name, g);
        return;
      }
      const sum = new Float32Array(prev.length);
      for (let i = 0; i < sum.length; i++) sum[i] = prev[i] + g[i];
      grads.set(name, sum);
    };
    const stop = this.nodes.findIndex((n) => n.output[0] === this.logitsName);
    for (let i = stop; i >= 0; i--) {
      const node = this.nodes[i];
      const dy = grads.get(node.output[0]);
      if (!dy) continue;
      const record = tape.records.get(node)!;
      const q = this.quantizers.get(node);
      const layer = q ? this.layerOf.get(node) : undefined;
      const act = layer?.activationInput ?? 0;
      const learnable = (k: number) => (k === act && !!q?.activation?.parameters.length) || (!!q?.weight?.parameters.length && layer?.weightInput === k);
      const needs = node.input.map((name, k) => !!name && (this.needsGrad.has(name) || learnable(k)));
      const dx = OPS.get(node.opType)!.backward(node, record.inputs, tape.values.get(node.output[0])!, record.saved, dy, needs, ctx);
      node.input.forEach((name, k) => {
        let g = dx[k];
        if (!g || !needs[k]) return;
        if (k in record.quantSaved) {
          const original = this.value(tape, name)!;
          const quantizer = k === act && q?.activation ? q.activation : q!.weight!;
          g = quantizer.backward(original, record.quantSaved[k], g);
        }
        if (this.needsGrad.has(name)) add(name, g);
      });
    }
    for (const p of this.params.values()) {
      const g = grads.get(p.name);
      if (g) p.grad.set(g);
      else p.grad.fill(0);
    }
  }

  /** Checks an input batch against the model's declared input shape (the batch dimension is free). */
  checkInput(dims: readonly number[]): string | undefined {
    if (this.inputDims.length === 0) return undefined;
    const expected = `[N, ${this.inputDims.slice(1).map((d) => d ?? '?').join(', ')}]`;
    if (dims.length !== this.inputDims.length) return expected;
    for (let i = 1; i < dims.length; i++) if (this.inputDims[i] !== undefined && this.inputDims[i] !== dims[i]) return expected;
    return undefined;
  }

  get parameterCount(): number {
    let n = 0;
    for (const p of this.params.values()) n += sizeOf(p.dims);
    return n;
  }
}
