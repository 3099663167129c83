import { expect } from 'chai';

import { packInt2, packInt4, quantizeTensor, unpackInt2, unpackInt4 } from '../../ts';
import { rng } from '../helpers/random';

describe('packInt4 / unpackInt4 (ONNX INT4/UINT4 layout)', () => {
  it('bad calls: wrong types, values out of range, lengths that do not fit', () => {
    expect(() => packInt4([1, 2] as never)).to.throw(TypeError, /for q but received \[1, 2\]/);
    expect(() => packInt4(new Int8Array([1, 8]))).to.throw(RangeError, /int4 value in \[-8, 7\] for q\[1\] but received 8/);
    expect(() => packInt4(new Uint8Array([16]))).to.throw(RangeError, /uint4 value in \[0, 15\] for q\[0\]/);
    expect(() => packInt4(quantizeTensor(new Float32Array([1]), { shape: [1] }))).to.throw(RangeError, /Expected an integer from 1 to 4 for q\.bits but received 8\. Quantize with bits: 4/);
    expect(() => unpackInt4(new Int8Array(2) as never)).to.throw(TypeError, /Uint8Array for packed/);
    expect(() => unpackInt4(new Uint8Array(2), 5)).to.throw(RangeError, /for length but received 5/);
    expect(() => unpackInt4(new Uint8Array(2), 2)).to.throw(RangeError, /exactly 2 bytes/);
  });

  it('T3: element 0 in the low nibble, odd lengths padded', () => {
    expect(Array.from(packInt4(new Int8Array([1, -2, 3])))).to.deep.equal([0xe1, 0x03]);
    expect(Array.from(packInt4(new Int8Array([-8, 7])))).to.deep.equal([0x78]);
    expect(Array.from(packInt4(new Uint8Array([15, 0, 5])))).to.deep.equal([0x0f, 0x05]);
    expect(Array.from(unpackInt4(new Uint8Array([0xe1, 0x03]), 3))).to.deep.equal([1, -2, 3]);
    expect(Array.from(unpackInt4(new Uint8Array([0x0f, 0x05]), 3, false))).to.deep.equal([15, 0, 5]);
    expect(packInt4(new Int8Array(0)).length).to.equal(0);
  });

  it('round-trips a quantized 4-bit tensor of every length up to 257', () => {
    const r = rng(9);
    for (let n = 0; n <= 257; n++) {
      for (const signed of [true, false]) {
        const q = quantizeTensor(Float32Array.from({ length: n }, () => r() * 2 - 1), { shape: [n], bits: 4, signed, symmetric: signed });
        const back = unpackInt4(packInt4(q), n, signed);
        expect(Array.from(back)).to.deep.equal(Array.from(q.values));
        expect(back).to.be.instanceOf(signed ? Int8Array : Uint8Array);
      }
    }
  });
});

describe('packInt2 / unpackInt2 (ONNX INT2/UINT2 layout)', () => {
  it('four values per byte, lowest bits first', () => {
    expect(Array.from(packInt2(new Int8Array([-2, 1, 0, -1, 1])))).to.deep.equal([0xc6, 0x01]);
    expect(Array.from(packInt2(new Uint8Array([3, 0, 2, 1])))).to.deep.equal([0x63]);
    expect(Array.from(unpackInt2(new Uint8Array([0xc6, 0x01]), 5))).to.deep.equal([-2, 1, 0, -1, 1]);
    expect(() => packInt2(new Int8Array([2]))).to.throw(RangeError, /int2 value in \[-2, 1\] for q\[0\]/);
    expect(() => packInt2(quantizeTensor(new Float32Array([1]), { shape: [1], bits: 4 }))).to.throw(RangeError, /an integer from 1 to 2 for q\.bits but received 4/);
  });

  it('round-trips a quantized 2-bit tensor', () => {
    const r = rng(10);
    for (let n = 0; n <= 130; n++) {
      const q = quantizeTensor(Float32Array.from({ length: n }, () => r() - 0.5), { shape: [n], bits: 2, signed: false, symmetric: false });
      expect(Array.from(unpackInt2(packInt2(q), n, false))).to.deep.equal(Array.from(q.values));
    }
  });
});
