const { quantizeTensor, dequantize, quantizationError, packInt4 } = require('lowbit');

// A 4x8 weight matrix, quantized to int4 with one scale per row (axis 0).
const w = Float32Array.from({ length: 32 }, (_, i) => Math.sin(i) * (1 + (i % 8)) / 8);
const q = quantizeTensor(w, { shape: [4, 8], bits: 4, granularity: 'channel', axis: 0 });
console.log(q.values.slice(0, 8));          // Int8Array, one int4 value per element
console.log(q.scale);                       // one scale per row
console.log(packInt4(q).length, 'bytes');   // ONNX INT4 layout: two values per byte

const err = quantizationError(w, q);
console.log(`SQNR ${err.sqnrDb.toFixed(1)} dB, max error ${err.maxAbsError.toFixed(4)}`);
console.log(dequantize(q).slice(0, 4));

// Exactly ONNX QuantizeLinear: divide, round half to even, saturate.
const exact = quantizeTensor(new Float32Array([-1, -0.3, 0, 0.25, 0.75, 1.25, 10]), { shape: [7], scale: 0.5 });
console.log(exact.values);
