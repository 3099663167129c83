/**
 * Plain TypeScript implementations of lowbit's rules: the comparison rows of
 * the benchmarks (and what a user would write without lowbit).
 */

/** ONNX QuantizeLinear to int8, per tensor: saturate(roundHalfToEven(fround(x / scale)) + zeroPoint). */
export function quantizeLinearTs(x: Float32Array, scale: number, zeroPoint: number, out: Int8Array): void {
  const s = Math.fround(scale);
  for (let i = 0; i < x.length; i++) {
    const v = Math.fround(x[i] / s);
    let r = Math.round(v); // ties go up; move odd results of ties back to even
    if (r - v === 0.5 && r % 2 !== 0) r -= 1;
    r += zeroPoint;
    out[i] = r < -128 ? -128 : r > 127 ? 127 : r;
  }
}
