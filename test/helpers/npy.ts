/** Writing .npy files (NumPy format 1.0, C order) for calibration and training data in tests and experiments. */
import * as fs from 'node:fs';

/** Writes `values` (their bytes, little-endian) as a C-order .npy array of dtype `descr` ('<f4', '<f2', '<i8', '|u1'…). */
export function writeNpy(file: string, descr: string, dims: number[], values: ArrayBufferView): void {
  let header = `{'descr': '${descr}', 'fortran_order': False, 'shape': (${dims.join(', ')}${dims.length === 1 ? ',' : ''}), }`;
  header += ' '.repeat(64 - ((10 + header.length + 1) % 64)) + '\n';  // the data start 64-byte aligned
  const head = Buffer.alloc(10);
  head.write('\x93NUMPY', 0, 'latin1');
  head[6] = 1;
  head.writeUInt16LE(header.length, 8);
  fs.writeFileSync(file, Buffer.concat([head, Buffer.from(header, 'latin1'), Buffer.from(values.buffer, values.byteOffset, values.byteLength)]));
}
