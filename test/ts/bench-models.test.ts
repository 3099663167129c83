// `npm run bench -- models` runs (one round; the figures themselves live in the README, from the bench).
import { expect } from 'chai';

import { modelLatencies } from '../../ts/bench/models';

describe('models bench (onnxruntime latency of float vs quantized models)', function () {
  this.timeout(120000);

  it('times every setting of the bundled CNN, the LSTM, the MatMul chain and the PP-OCR models, the float model first, then it after the float clean-up, quantized files smaller', async () => {
    const rows = await modelLatencies({ threads: 1, rounds: 1 });
    const models = [...new Set(rows.map((r) => r.model))];
    expect(models).to.deep.equal(['MNIST CNN (bundled)', 'LSTM 256, 32 steps, + MatMul', '4 MatMuls 2048x2048, batch 1', '4 MatMuls 2048x2048, batch 64', 'PP-OCR text-direction classifier', 'PP-OCRv4 recognizer']);
    for (const model of models) {
      const own = rows.filter((r) => r.model === model);
      expect(own.length).to.equal(10);
      expect(own[0].setting).to.equal('float');
      expect(own[0].speedVsFloat).to.equal(1);
      for (const r of own) {
        expect(r.ms).to.be.greaterThan(0);
        expect(Number.isFinite(r.speedVsFloat)).to.equal(true);
      }
      expect(own[1].setting).to.match(/^float, lowbit clean-up only/);
      expect(own[1].megabytes).to.be.at.most(own[0].megabytes);
      for (const r of own.slice(2)) expect(r.megabytes, r.setting).to.be.below(own[0].megabytes);
    }
  });
});
