/**
 * Rendered text lines for the PP-OCR experiments (the models' package ships no
 * images): words and numbers in DejaVu fonts (from the `dejavu-fonts-ttf`
 * package) drawn by `@napi-rs/canvas`, then prepared as PaddleOCR prepares a
 * crop: scaled to the model's height, aspect ratio kept, normalised to
 * (v/255 − 0.5)/0.5, the rest of the width padded with zeros.
 */
import { createCanvas, GlobalFonts } from '@napi-rs/canvas';

import { seededRandom } from '../../ts/random';

const FONTS = ['DejaVuSans', 'DejaVuSans-Bold', 'DejaVuSerif', 'DejaVuSansMono', 'DejaVuSansCondensed', 'DejaVuSerif-Italic'];

const WORDS = (
  'the of and to in is that for it as was with be by on not he this are or his from at which but have an they you were ' +
  'model quantize layer weight scale clip group step error signal noise image text line number page total price order ' +
  'invoice date name address phone email city street account amount balance receipt store market station north south ' +
  'January March April June October Monday Friday Paris London Berlin Tokyo Beijing Shanghai Node ONNX Linux Table'
).split(' ');

let fontsRegistered = false;
function registerFonts(): void {
  if (fontsRegistered) return;
  for (const font of FONTS) GlobalFonts.registerFromPath(require.resolve(`dejavu-fonts-ttf/ttf/${font}.ttf`), font);
  fontsRegistered = true;
}

/** A line of 2–6 words and numbers, chosen by `random`. */
export function randomLineText(random: () => number): string {
  const words: string[] = [];
  const count = 2 + Math.floor(random() * 5);
  for (let i = 0; i < count; i++) {
    if (random() < 0.2) words.push(String(Math.floor(random() * 100000) / (random() < 0.5 ? 100 : 1)));
    else words.push(WORDS[Math.floor(random() * WORDS.length)]);
  }
  return words.join(' ');
}

export interface TextLine {
  text: string;
  /** [1, 3, height, width] float32, PaddleOCR-normalised, zero-padded on the right. */
  data: Float32Array;
  dims: number[];
}

/**
 * Renders `text` dark on light and prepares it as a PaddleOCR crop of [1, 3, height, width];
 * words are dropped from the end until the line fits the width without squeezing.
 */
export function renderTextLine(text: string, height: number, width: number, random: () => number): TextLine {
  registerFonts();
  const font = FONTS[Math.floor(random() * FONTS.length)];
  const size = 24 + Math.floor(random() * 12);
  const measure = createCanvas(8, 8).getContext('2d');
  measure.font = `${size}px ${font}`;
  const margin = 4 + Math.floor(random() * 8);
  const drawnHeight = Math.ceil(size * 1.5);
  const widthOf = (t: string): number => Math.ceil(measure.measureText(t).width) + 2 * margin;
  while (text.includes(' ') && (height * widthOf(text)) / drawnHeight > width) text = text.slice(0, text.lastIndexOf(' '));
  const drawnWidth = widthOf(text);
  const canvas = createCanvas(drawnWidth, drawnHeight);
  const context = canvas.getContext('2d');
  const paper = 200 + Math.floor(random() * 56);
  const ink = Math.floor(random() * 80);
  context.fillStyle = `rgb(${paper},${paper},${paper - Math.floor(random() * 20)})`;
  context.fillRect(0, 0, drawnWidth, drawnHeight);
  context.fillStyle = `rgb(${ink},${ink},${ink})`;
  context.font = `${size}px ${font}`;
  context.textBaseline = 'middle';
  context.fillText(text, margin, drawnHeight / 2 + (random() - 0.5) * size * 0.15);

  // PaddleOCR's resize_norm_img: height fixed, width by aspect ratio up to the model's width.
  const scaledWidth = Math.min(width, Math.ceil((height * drawnWidth) / drawnHeight));
  const scaled = createCanvas(scaledWidth, height);
  scaled.getContext('2d').drawImage(canvas, 0, 0, scaledWidth, height);
  const rgba = scaled.getContext('2d').getImageData(0, 0, scaledWidth, height).data;
  const data = new Float32Array(3 * height * width);
  for (let c = 0; c < 3; c++) {
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < scaledWidth; x++) data[(c * height + y) * width + x] = (rgba[(y * scaledWidth + x) * 4 + c] / 255 - 0.5) / 0.5;
    }
  }
  return { text, data, dims: [1, 3, height, width] };
}

/** `count` rendered lines for a model input of `dims` = [1, 3, H, W]; deterministic for a seed. */
export function renderedTextLines(count: number, dims: number[], seed: number): TextLine[] {
  const random = seededRandom(seed);
  return Array.from({ length: count }, () => renderTextLine(randomLineText(random), dims[2], dims[3], random));
}

/** The same lines as feeds of the PP-OCR models' input `x`. */
export function renderedTextLineFeeds(count: number, dims: number[], seed: number): Array<Record<string, { data: Float32Array; dims: number[] }>> {
  return renderedTextLines(count, dims, seed).map((line) => ({ x: { data: line.data, dims: line.dims } }));
}
