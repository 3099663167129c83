/**
 * Fake quantizers for quantization-aware training (ALGORITHMS.md §3, §4):
 *   LsqQuantizer      learned step sizes (per tensor or per channel), STE,
 *                     step gradient scaled by 1/√(N·Q_P), s₀ = 2⟨|v|⟩/√Q_P;
 *   GdrqWeightQuantizer   Scale-Clip at k·mean|W| (recomputed every step), then
 *                     one step per contiguous group of output channels, learned
 *                     with the LSQ gradient (or re-searched with the L1 loss
 *                     each epoch);
 *   RunningClipQuantizer  GDRQ activations: a running Scale-Clip threshold
 *                     T = EMA of k·mean|A|, step T/Q_P.
 * The rounding itself is the native LSQ kernel (round half to even, clip), the
 * same arithmetic as ONNX QuantizeLinear → DequantizeLinear.
 */
import { native, type NativeLayout } from '../native';
import { tensorLayout } from '../quant-params';
import { quantizeTensor } from '../quantize';
import { lsqLevels } from '../methods/lsq';
import { makeParameter, type FakeQuantizer, type Parameter } from './model';
import { sizeOf, type Tensor } from './tensor';

/** What export needs to write a quantizer as QuantizeLinear/DequantizeLinear. */
export interface QuantizerExport {
  bits: number;
  signed: boolean;
  /** One scale (per tensor) or one per channel along `axis`. */
  scale: Float32Array;
  axis?: number;
  /** GDRQ: contiguous channel groups sharing a scale. */
  groups?: number;
  /** Codes in the signed range of this many bits, stored in `bits` (reduceRange: 7-bit values in int8). */
  codeBits?: number;
  /** Values are clipped to ±clip before quantizing (GDRQ Scale-Clip of weights). */
  clip?: number;
  /** Unsigned codes with this zero point (asymmetric activations); default 0. */
  zeroPoint?: number;
}

export interface ExportableQuantizer extends FakeQuantizer {
  readonly bits: number;
  describe(): QuantizerExport;
  /** Called at the start of every epoch (GDRQ 'search' re-searches its group steps). */
  onEpochStart?(): void;
}

function lsqApply(v: Float32Array, layout: NativeLayout, steps: Float32Array, qn: number, qp: number): Float32Array {
  const out = new Float32Array(v.length);
  native().lsqForward(v, layout, steps, qn, qp, out, '', 0);
  return out;
}

function lsqGrad(v: Float32Array, dy: Float32Array, layout: NativeLayout, steps: Float32Array, qn: number, qp: number):
  { dx: Float32Array; dStep: Float64Array } {
  const dx = new Float32Array(v.length);
  const dStep = new Float64Array(steps.length);
  native().lsqBackward(v, dy, layout, steps, qn, qp, dx, dStep, '', 0);
  return { dx, dStep };
}

/** mean |v| (or, with max, the largest |v|) over `run` values at from, from + stride, … below `to` (default: all of v). */
function meanAbs(v: Float32Array, from = 0, to = v.length, stride = to - from, run = to - from, max = false): number {
  let s = 0, n = 0;
  for (let base = from; base < to; base += stride) {
    for (let i = 0; i < run; i++) {
      const a = Math.abs(v[base + i]);
      s = max ? Math.max(s, a) : s + a;
      n++;
    }
  }
  return max ? s : n ? s / n : 0;
}

/**
 * How LSQ steps start: the paper's 2⟨|v|⟩/√Q_P, or 'max': no clipping, the minmax PTQ point (better at 8 bits) —
 * weights max|w|/Q_P; activations [min, max] over 2^b − 1 steps (the range observed before training, else the
 * first batch's), with a zero point when min < 0
 * (integer range [−z, 2^b − 1 − z]: asymmetric, as QuantizeLinear with uint8 and zero point z).
 */
export type StepInit = 'lsq' | 'max';

const MIN_STEP = 1e-8;

/**
 * A first step within [MIN_STEP, float32 max]: a first batch with NaN or ±Infinity (or values near float32's limit)
 * must not give the kernels a step they refuse; finetune then stops on those values and names the layer.
 */
function initialStep(step: number): number {
  return Number.isNaN(step) ? MIN_STEP : Math.min(3.4028234663852886e38, Math.max(MIN_STEP, step));
}

/** LSQ for weights (signed) or activations (signedness from the first batch). */
export class LsqQuantizer implements ExportableQuantizer {
  readonly parameters: Parameter[] = [];
  private step?: Parameter;
  private signed: boolean;
  private qn = 0;
  private qp = 0;
  private zeroPoint?: number;
  /** While set (activations, 'max' init), forward passes values through and widens `observed` instead. */
  observing = false;
  private observed = { min: Infinity, max: -Infinity };

  /**
   * perChannelAxis: one step per channel along this axis (weights only).
   * signed: undefined = decide from the first batch (activations: unsigned when it has no negative value).
   * columnSamples: activations read as W·x — [.., K, N] holds one sample per column (features per sample: K).
   * codeBits: weights — the bits whose levels the codes take, fewer than the `bits` they are stored in with reduceRange
   * (7 in int8, for u8s8 kernels without VNNI).
   */
  constructor(readonly name: string, readonly bits: number, private readonly kind: 'weight' | 'activation',
    signed: boolean | undefined, private readonly perChannelAxis?: number, private readonly init: StepInit = 'lsq',
    private readonly columnSamples = false, private readonly codeBits = bits) {
    this.signed = signed ?? true;
    if (signed !== undefined) ({ qn: this.qn, qp: this.qp } = lsqLevels(this.codeBits, signed));
  }

  private layout(dims: number[]): NativeLayout {
    return this.perChannelAxis === undefined ? tensorLayout(dims, 'tensor', 0, 0).native : tensorLayout(dims, 'channel', this.perChannelAxis, 0).native;
  }

  /** Widens the observed range (activations) by these values. */
  private widen(v: Float32Array): void {
    for (let i = 0; i < v.length; i++) {
      if (v[i] < this.observed.min) this.observed.min = v[i];
      if (v[i] > this.observed.max) this.observed.max = v[i];
    }
  }

  /** s₀ from these values (weights: the pretrained weights; activations: the first batch), as `init` says. */
  initialize(x: Tensor): void {
    const max = this.init === 'max';
    let steps: Float32Array | undefined;
    if (this.kind === 'activation') {
      this.widen(x.data);
      const { min, max: high } = this.observed;
      this.signed = min < 0;
      if (max) {
        // Unsigned codes over [min(min, 0), max(max, 0)]: a zero point when the range has negative values.
        const levels = 2 ** this.bits - 1;
        const step = initialStep((Math.max(high, 0) - Math.min(min, 0)) / levels);
        this.zeroPoint = this.signed ? Math.min(levels, Math.round(-min / step)) : undefined;
        this.signed = false;
        this.qn = this.zeroPoint ?? 0;
        this.qp = levels - this.qn;
        steps = Float32Array.of(step);
      }
    }
    if (!steps) {
      ({ qn: this.qn, qp: this.qp } = lsqLevels(this.codeBits, this.signed));
      const init = (m: number) => initialStep(max ? m / this.qp : (2 * m) / Math.sqrt(this.qp));
      // mean (or max) |v| over `run` values every `stride` from `from`.
      const stat = (from: number, stride: number, run: number) => init(meanAbs(x.data, from, x.data.length, stride, run, max));
      if (this.perChannelAxis === undefined) steps = Float32Array.of(stat(0, x.data.length, x.data.length));
      else {
        const channels = x.dims[this.perChannelAxis];
        const inner = sizeOf(x.dims.slice(this.perChannelAxis + 1));
        steps = Float32Array.from({ length: channels }, (_, c) => stat(c * inner, channels * inner, inner));
      }
    }
    this.step = makeParameter(`${this.name}.step`, steps, [steps.length], false, MIN_STEP);
    this.parameters.splice(0, this.parameters.length, this.step);
  }

  get initialized(): boolean {
    return !!this.step;
  }

  forward(x: Tensor, training: boolean): { y: Tensor; saved?: unknown } {
    if (this.observing) {
      this.widen(x.data);
      return { y: x };
    }
    if (!this.step) {
      if (!training) throw new Error(`LSQ quantizer ${this.name} is used before its step was initialised (run a training batch first).`);
      this.initialize(x);
    }
    return { y: { data: lsqApply(x.data, this.layout(x.dims), this.step!.value, this.qn, this.qp), dims: x.dims } };
  }

  backward(x: Tensor, saved: unknown, dy: Float32Array): Float32Array {
    const { dx, dStep } = lsqGrad(x.data, dy, this.layout(x.dims), this.step!.value, this.qn, this.qp);
    // g = 1/√(N·Q_P): N = weights per step, or features per sample for activations (the batch first, or the columns
    // of a W·x input matrix).
    const count = this.kind === 'weight' ? x.data.length / dStep.length
      : this.columnSamples ? x.dims[Math.max(0, x.dims.length - 2)] : x.data.length / x.dims[0];
    // (With a zero point, an all-negative range leaves no positive levels: Q_N stands in for Q_P then.)
    const g = 1 / Math.sqrt(count * (this.qp > 0 ? this.qp : Math.max(this.qn, 1)));
    for (let i = 0; i < dStep.length; i++) this.step!.grad[i] += g * dStep[i];
    return dx;
  }

  describe(): QuantizerExport {
    return { bits: this.bits, signed: this.signed, scale: Float32Array.from(this.step!.value), axis: this.perChannelAxis, zeroPoint: this.zeroPoint,
      ...(this.codeBits !== this.bits ? { codeBits: this.codeBits } : {}) };
  }
}

/** Contiguous equal groups of output channels; falls back to fewer groups when `groups` does not divide the channels. */
export function groupsFor(channels: number, groups: number): number {
  let g = Math.min(groups, channels);
  while (channels % g !== 0) g--;
  return g;
}

/** GDRQ weights: Scale-Clip, then group-wise steps. */
export class GdrqWeightQuantizer implements ExportableQuantizer {
  readonly parameters: Parameter[] = [];
  private readonly steps: Parameter;
  private readonly qn: number;
  private readonly qp: number;
  readonly groups: number;
  private threshold = 0;

  constructor(readonly name: string, readonly bits: number, private readonly weight: Parameter, private readonly axis: number,
    groups: number, private readonly k: number, private readonly groupSteps: 'learned' | 'search', private readonly codeBits = bits) {
    ({ qn: this.qn, qp: this.qp } = lsqLevels(codeBits, true));
    this.groups = groupsFor(weight.dims[axis], groups);
    this.steps = makeParameter(`${name}.groupSteps`, new Float32Array(this.groups), [this.groups], false, MIN_STEP);
    this.search();
    if (groupSteps === 'learned') this.parameters.push(this.steps);
  }

  private clipped(w: Float32Array): Float32Array {
    this.threshold = this.k * meanAbs(w);
    const t = this.threshold;
    return w.map((v) => Math.min(t, Math.max(-t, v)));
  }

  /** Group steps minimising the L1 quantization loss of the clipped weights (the paper's QL, p = 1). */
  private search(): void {
    const q = quantizeTensor(this.clipped(this.weight.value), {
      shape: this.weight.dims, bits: this.codeBits, method: 'mse', norm: 1, granularity: 'group', groups: this.groups, axis: this.axis,
    });
    this.steps.value.set(q.scale.map((s) => Math.max(MIN_STEP, s)));
  }

  onEpochStart(): void {
    if (this.groupSteps === 'search') this.search();
  }

  private channelSteps(): Float32Array {
    const channels = this.weight.dims[this.axis];
    const per = channels / this.groups;
    return Float32Array.from({ length: channels }, (_, c) => this.steps.value[Math.floor(c / per)]);
  }

  forward(x: Tensor): { y: Tensor; saved?: unknown } {
    const clipped = this.clipped(x.data);
    const layout = tensorLayout(x.dims, 'channel', this.axis, 0).native;
    return { y: { data: lsqApply(clipped, layout, this.channelSteps(), this.qn, this.qp), dims: x.dims }, saved: clipped };
  }

  backward(x: Tensor, saved: unknown, dy: Float32Array): Float32Array {
    const clipped = saved as Float32Array;
    const layout = tensorLayout(x.dims, 'channel', this.axis, 0).native;
    const { dx, dStep } = lsqGrad(clipped, dy, layout, this.channelSteps(), this.qn, this.qp);
    // Scale-Clip passes the gradient of unclipped weights only (T is treated as a constant); |w| = T is not clipped
    // (as clamp's gradient; with T = 0, an all-zero weight, nothing would ever move it).
    const t = this.threshold;
    for (let i = 0; i < dx.length; i++) if (Math.abs(x.data[i]) > t) dx[i] = 0;
    if (this.groupSteps === 'learned') {
      const channels = this.weight.dims[this.axis];
      const per = channels / this.groups;
      const g = 1 / Math.sqrt((x.data.length / this.groups) * this.qp);
      for (let c = 0; c < channels; c++) this.steps.grad[Math.floor(c / per)] += g * dStep[c];
    }
    return dx;
  }

  describe(): QuantizerExport {
    return { bits: this.bits, signed: true, scale: this.channelSteps(), axis: this.axis, groups: this.groups, clip: this.k * meanAbs(this.weight.value),
      ...(this.codeBits !== this.bits ? { codeBits: this.codeBits } : {}) };
  }
}

/** GDRQ activations: a running Scale-Clip threshold (EMA of k·mean|A| over training batches), step = T/Q_P. */
export class RunningClipQuantizer implements ExportableQuantizer {
  readonly parameters: Parameter[] = [];
  /** The running threshold T (one value): state that training updates, kept with the parameters' snapshots. */
  readonly state = new Float64Array(1);
  private signed = false;
  private qn = 0;
  private qp = 0;

  /** Passes values through untouched (while the LSQ quantizers beside it observe ranges for their 'max' steps). */
  observing = false;

  constructor(readonly name: string, readonly bits: number, private readonly k: number, private readonly momentum: number) {}

  private step(): number {
    return Math.max(MIN_STEP, this.state[0] / this.qp);
  }

  forward(x: Tensor, training: boolean): { y: Tensor; saved?: unknown } {
    if (this.observing) return { y: x };
    if (training) {
      const target = this.k * meanAbs(x.data);
      if (this.state[0] === 0) {
        let min = Infinity;
        for (let i = 0; i < x.data.length; i++) if (x.data[i] < min) min = x.data[i];
        this.signed = min < 0;
        ({ qn: this.qn, qp: this.qp } = lsqLevels(this.bits, this.signed));
      }
      const next = this.state[0] === 0 ? target : this.momentum * this.state[0] + (1 - this.momentum) * target;
      // Non-finite inputs (or a step beyond float32) leave the threshold as it was: finetune stops on them and names
      // the layer, rather than the kernel refusing an infinite step.
      if (Number.isFinite(Math.fround(next / this.qp))) this.state[0] = next;
    } else if (this.state[0] === 0) {
      throw new Error(`Activation quantizer ${this.name} has no threshold yet (run a training batch first).`);
    }
    const layout = tensorLayout(x.dims, 'tensor', 0, 0).native;
    return { y: { data: lsqApply(x.data, layout, Float32Array.of(this.step()), this.qn, this.qp), dims: x.dims } };
  }

  backward(x: Tensor, saved: unknown, dy: Float32Array): Float32Array {
    const layout = tensorLayout(x.dims, 'tensor', 0, 0).native;
    return lsqGrad(x.data, dy, layout, Float32Array.of(this.step()), this.qn, this.qp).dx;
  }

  describe(): QuantizerExport {
    return { bits: this.bits, signed: this.signed, scale: Float32Array.of(this.step()) };
  }
}
