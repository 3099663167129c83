/** Seeded random data for tests (mulberry32): failures reproduce from the printed seed. */
import { seededRandom as rng } from '../../ts/random';

export { rng };

/** Values that hit ties (k + 0.5)·scale, saturation, signed zeros, infinities and tiny numbers. */
export function trickyData(n: number, scale: number, seed: number): Float32Array {
  const r = rng(seed);
  const x = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const kind = Math.floor(r() * 10);
    const k = Math.floor(r() * 600) - 300;
    switch (kind) {
      case 0: x[i] = (k + 0.5) * scale; break;
      case 1: x[i] = k * scale; break;
      case 2: x[i] = r() < 0.5 ? Infinity : -Infinity; break;
      case 3: x[i] = r() < 0.5 ? 0 : -0; break;
      case 4: x[i] = (r() * 2 - 1) * 3e38; break;
      default: x[i] = (r() * 400 - 200) * scale;
    }
  }
  return x;
}

/** Laplace-distributed samples (heavy tails, where clipping pays). */
export function laplace(n: number, seed: number, b = 1): Float32Array {
  const r = rng(seed);
  const x = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const u = r() - 0.5;
    x[i] = -b * Math.sign(u) * Math.log(1 - 2 * Math.abs(u) + 1e-12);
  }
  return x;
}

/** `n` feeds { [input]: { data, dims } } of seeded standard-normal values (Box–Muller). */
export function normalFeeds(n: number, dims: number[], seed: number, input = 'x'): Array<Record<string, { data: Float32Array; dims: number[] }>> {
  const r = rng(seed);
  const len = dims.reduce((a, b) => a * b, 1);
  return Array.from({ length: n }, () => ({ [input]: { dims, data: Float32Array.from({ length: len }, () => gaussian(r)) } }));
}

/** A standard normal draw from a uniform source (Box–Muller). */
export function gaussian(r: () => number): number {
  return Math.sqrt(-2 * Math.log(1 - r())) * Math.cos(2 * Math.PI * r());
}
