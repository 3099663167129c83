/**
 * The elements of each parameter group of a layout (see ts/quant-params.ts),
 * gathered into a contiguous array: the TypeScript twin of group_elements in
 * cpp/src/quantize.cc, for the methods that compute statistics per group.
 */
import type { NativeLayout } from '../native';

export function groupCount(layout: NativeLayout): number {
  if (layout.kind === 0) return 1;
  if (layout.kind === 1) return layout.axisLen;
  return layout.outer * Math.ceil(layout.axisLen / layout.blockSize) * layout.inner;
}

/**
 * Every group's index and values, in order; the values may be a view of data or a scratch copy, valid until the
 * next step (do not keep them). A generator, so that async callers can turn the event loop between groups.
 */
export function* groupValues(data: Float32Array, layout: NativeLayout): Generator<[number, Float32Array]> {
  const { kind, outer, axisLen, inner, blockSize } = layout;
  if (kind === 0) {
    yield [0, data];
    return;
  }
  if (kind === 1) {
    const scratch = new Float32Array(outer * inner);
    for (let d = 0; d < axisLen; d++) {
      if (outer === 1) {
        yield [d, data.subarray(d * inner, (d + 1) * inner)];
        continue;
      }
      for (let o = 0; o < outer; o++) scratch.set(data.subarray((o * axisLen + d) * inner, (o * axisLen + d + 1) * inner), o * inner);
      yield [d, scratch];
    }
    return;
  }
  const blocks = Math.ceil(axisLen / blockSize);
  const scratch = new Float32Array(Math.min(blockSize, axisLen));  // blockSize may exceed the axis (one short block)
  for (let o = 0; o < outer; o++) {
    for (let j = 0; j < blocks; j++) {
      const d0 = j * blockSize;
      const d1 = Math.min(axisLen, d0 + blockSize);
      for (let i = 0; i < inner; i++) {
        const g = (o * blocks + j) * inner + i;
        if (inner === 1) {
          yield [g, data.subarray(o * axisLen + d0, o * axisLen + d1)];
          continue;
        }
        for (let d = d0; d < d1; d++) scratch[d - d0] = data[(o * axisLen + d) * inner + i];
        yield [g, scratch.subarray(0, d1 - d0)];
      }
    }
  }
}
