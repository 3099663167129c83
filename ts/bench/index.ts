/** Benchmarks behind `lowbit bench <name>` and `npm run bench -- <name>`. */
export { benchGemm, DEFAULT_GEMM_SHAPES, type GemmBenchOptions } from './gemm';
export { benchLargeModel } from './large-model';
export { benchModels, type ModelsBenchOptions } from './models';
export { benchQuantize, type QuantizeBenchOptions } from './quantize';
export { benchSgemm, DEFAULT_SGEMM_SHAPES, type SgemmBenchOptions } from './sgemm';
export { benchTrain, lowbitTrainThroughput, type TrainBenchOptions } from './train';
