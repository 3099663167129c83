import { expect } from 'chai';

import { tfjsTrainThroughput } from '../../ts/bench/tfjs-train';

describe('TensorFlow.js training-throughput baseline (bench/tfjs-train)', function () {
  this.timeout(30000);

  it('trains the MNIST CNN on the pure-JavaScript cpu backend and reports finite, positive throughput', async () => {
    const r = await tfjsTrainThroughput({ batchSize: 8, steps: 2 });
    expect(r.backend).to.equal('cpu');
    expect(r.steps).to.equal(2);
    for (const v of [r.imagesPerSecond, r.seconds]) {
      expect(Number.isFinite(v)).to.equal(true);
      expect(v).to.be.greaterThan(0);
    }
    expect(r.imagesPerSecond).to.be.closeTo((8 * 2) / r.seconds, 1e-9 * r.imagesPerSecond);
    expect(Number.isFinite(r.finalLoss)).to.equal(true);
    expect(r.finalLoss).to.be.greaterThan(0);
  });

  it('leaves no tensors behind and keeps tfjs warnings on', async () => {
    const tf = require('@tensorflow/tfjs') as typeof import('@tensorflow/tfjs');
    const before = tf.memory().numTensors;
    await tfjsTrainThroughput({ batchSize: 2, steps: 1, warmupSteps: 0 });
    expect(tf.memory().numTensors).to.equal(before);
    expect(tf.env().getBool('PROD')).to.equal(false);
  });
});
