/**
 * Special functions the methods need, in double precision: the principal
 * branch of Lambert W, erf/erfc, and a bracketing root finder.
 */

/** Principal branch W0(x) for x >= -1/e: the w with w·e^w = x (Halley iteration). */
import { invalidType } from '../errors';

export function lambertW0(x: number): number {
  if (typeof x !== 'number') throw invalidType('x', 'a number', x);
  if (!(x >= -1 / Math.E)) throw new RangeError(`Expected x >= -1/e for lambertW0 but received ${x}.`);
  if (x === 0) return 0;
  if (x === Infinity) return Infinity;
  // The branch point (−1/e, where Halley's step divides by 2w + 2 = 0) and tiny |x|, where W0(x) = x − x² + …
  if (x <= -1 / Math.E) return -1;
  if (Math.abs(x) < 1e-8) return x - x * x;
  // Start: log-based for large x, series near the branch point, x otherwise.
  let w = x > Math.E ? Math.log(x) - Math.log(Math.log(x)) : x > 0 ? Math.log1p(x) * 0.7 : -1 + Math.sqrt(2 * (1 + Math.E * x));
  for (let i = 0; i < 64; i++) {
    const ew = Math.exp(w);
    const f = w * ew - x;
    const next = w - f / (ew * (w + 1) - ((w + 2) * f) / (2 * w + 2));
    if (!Number.isFinite(next)) return w;  // at the branch point's doorstep: w is as close as doubles get
    if (Math.abs(next - w) <= 1e-15 * Math.abs(next)) return next;
    w = next;
  }
  return w;
}

/** erf(x) to about 1e-15: Maclaurin series for |x| < 3, continued-fraction erfc beyond. */
export function erf(x: number): number {
  if (Number.isNaN(x)) return NaN;
  if (Math.abs(x) >= 3) return Math.sign(x) * (1 - erfcTail(Math.abs(x)));
  let term = x;
  let sum = x;
  for (let n = 1; n < 200; n++) {
    term *= (-x * x) / n;
    const add = term / (2 * n + 1);
    sum += add;
    if (Math.abs(add) < 1e-17 * Math.abs(sum)) break;
  }
  return (2 / Math.sqrt(Math.PI)) * sum;
}

/** erfc(x) = 1 - erf(x), accurate in the tail. */
export function erfc(x: number): number {
  return x >= 3 ? erfcTail(x) : 1 - erf(x);
}

// Continued fraction for erfc(x), x >= 3 (Lentz's method).
function erfcTail(x: number): number {
  const tiny = 1e-300;
  let f = x;
  let c = x;
  let d = 0;
  for (let n = 1; n < 500; n++) {
    const a = n / 2;
    d = x + a * d;
    d = Math.abs(d) < tiny ? tiny : d;
    c = x + a / c;
    c = Math.abs(c) < tiny ? tiny : c;
    d = 1 / d;
    const delta = c * d;
    f *= delta;
    if (Math.abs(delta - 1) < 1e-16) break;
  }
  return Math.exp(-x * x) / (f * Math.sqrt(Math.PI));
}

/** A root of f in [lo, hi] where f(lo) and f(hi) differ in sign (bisection to machine precision). */
export function bisect(f: (x: number) => number, lo: number, hi: number): number {
  let flo = f(lo);
  for (let i = 0; i < 200; i++) {
    const mid = (lo + hi) / 2;
    if (mid === lo || mid === hi) return mid;
    const fm = f(mid);
    if (fm === 0) return mid;
    if (Math.sign(fm) === Math.sign(flo)) {
      lo = mid;
      flo = fm;
    } else {
      hi = mid;
    }
  }
  return (lo + hi) / 2;
}
