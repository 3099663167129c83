/**
 * lowbit: low-bit quantization for Node.js.
 * The public API; everything else under ts/ is internal.
 */
export { cpuInfo, type CpuInfo } from './cpu';
export { fromFloat16Array, toFloat16Array } from './float16';
export { NativeLoadError } from './native';
export { packInt2, packInt4, unpackInt2, unpackInt4 } from './pack';
export { integerRange, type Granularity, type QuantizedTensor } from './quant-params';
export {
  dequantize, quantizationError, quantizeTensor, quantizeTensorAsync,
  type DequantizeOptions, type KernelOptions, type QuantizationError, type QuantizeOptions,
} from './quantize';
export { rangeMethodNames, registerRangeMethod, type RangeMethod, type RangeMethodOptions } from './methods/registry';
export {
  matmulInt4, matmulInt8, matmulInt8Async, packInt4Matrix, PackedInt4Matrix, type MatmulInt4Options, matmulInt8Requantized, matmulInt8ToFloat, packMatrix, PackedMatrix,
  type MatmulOptions, type MatmulRequantizedOptions, type MatmulToFloatOptions,
} from './gemm';
export {
  aciqAlpha, aciqExpectedMse, aciqGaussConstant, aciqLaplaceConstant, aciqRange, tensorStats,
  type AciqPrior, type TensorStats,
} from './methods/aciq';
export { allocateBits, type BitAllocationOptions } from './methods/bit-allocation';
export { correctWeightBias, expectedOutputShift, type WeightBiasCorrectionOptions } from './methods/bias-correction';
export {
  ActivationScaleClip, foldScalesIntoBatchNorm, scaleClip, type BatchNormParams, type ScaleClipOptions,
} from './methods/gdrq';
export { lsqBackward, lsqGradScale, lsqInitStep, lsqLevels, lsqQuantize, type LsqBackwardOptions, type LsqOptions } from './methods/lsq';
export { lambertW0 } from './methods/special';
export { AciqObserver, HistogramObserver, klLevels, MinMaxObserver, type Range } from './calibration/observers';
export { quantizeModel, type QuantizationReport, type QuantizeModelOptions } from './onnx/quantize-model';
export { inspectModel, type LayerStats } from './onnx/inspect';
export { OnnxModelError } from './onnx/model-io';
export { OnnxruntimeMissingError } from './bench/ort-models';
export {
  finetune, type EpochRecord, type FinetuneOptions, type FinetuneResult, type InputBatch, type LabelledBatch, type StepProgress, type TrainingData,
} from './train/finetune';
export { TrainingError } from './train/model';
