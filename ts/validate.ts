/**
 * Argument checks for the public API, done once at the boundary so the native
 * layer only ever sees well-formed input. Each failure names the parameter,
 * what was expected, what was received and what to do.
 */
import { invalidType, invalidValue, isDetached } from './errors';

export function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v) && !ArrayBuffer.isView(v);
}

/**
 * An options object (or a hand-built QuantizedTensor) copied with each property read once, so that what the checks
 * see is what the native call gets: a getter or a Proxy could answer differently on a later read. Anything that is
 * not an object comes back as it is, for the caller's type check.
 */
export function readOnce<T>(v: T): T {
  if (!isPlainObject(v)) return v;
  const copy: Record<string, unknown> = {};
  for (const key in v) copy[key] = v[key];  // own and inherited enumerable (Object.create(defaults))
  // A class's getters live on its prototype, not enumerable: options too.
  for (let p = Object.getPrototypeOf(v); p && p !== Object.prototype; p = Object.getPrototypeOf(p)) {
    for (const [key, d] of Object.entries(Object.getOwnPropertyDescriptors(p))) {
      if (d.get && !(key in copy)) copy[key] = v[key];
    }
  }
  return copy as T;
}

/**
 * How to turn `v`, an array of another kind (an Array, another typed array) or another realm's `arrayName`, into an
 * `arrayName`; undefined for other values.
 */
export function conversionHint(v: unknown, arrayName: string, how = `${arrayName}.from(values)`): string | undefined {
  return otherRealm(v, arrayName) ?? (ArrayBuffer.isView(v) || Array.isArray(v) ? `Convert it with ${how}.` : undefined);
}

export function checkFloat32Array(name: string, v: unknown): Float32Array {
  if (!(v instanceof Float32Array)) throw invalidType(name, 'a Float32Array', v, conversionHint(v, 'Float32Array'));
  checkAttached(name, v);
  return v;
}

/**
 * A hint when `v` is a typed array of the expected kind made in another JavaScript realm (a vm context, some test
 * sandboxes), which instanceof does not recognise.
 */
export function otherRealm(v: unknown, expected: string): string | undefined {
  return ArrayBuffer.isView(v) && Object.prototype.toString.call(v) === `[object ${expected}]`
    ? `This ${expected} comes from another JavaScript realm (a vm context or test sandbox): copy it into this one with new ${expected}(array).`
    : undefined;
}

/** Whether two views share bytes of one buffer (empty views never do). */
export function overlaps(a: ArrayBufferView, b: ArrayBufferView): boolean {
  return a.buffer === b.buffer && a.byteOffset < b.byteOffset + b.byteLength && b.byteOffset < a.byteOffset + a.byteLength;
}

export function checkAttached(name: string, v: ArrayBufferView): void {
  if (isDetached(v))
    throw invalidType(name, 'a typed array with an attached buffer', v,
      'The buffer was transferred (postMessage, structuredClone) or detached; pass a copy that is still owned here.');
}

/**
 * An options argument: undefined means none given ({}); anything but a plain object is a TypeError; with `known`,
 * a key not in it is refused (checkKnownKeys).
 */
export function checkOptions<T extends object = Record<string, unknown>>(name: string, v: T | undefined, known?: readonly string[]): Partial<T> {
  if (v === undefined) return {};
  if (!isPlainObject(v)) throw invalidType(name, 'an options object (or nothing)', v);
  const copy = readOnce(v);  // a copy: later changes to the caller's object (or a getter's next answer) change nothing
  if (known) checkKnownKeys(name, copy as Record<string, unknown>, known);
  return copy;
}

export function checkInteger(name: string, v: unknown, min: number, max: number): number {
  if (typeof v !== 'number') throw invalidType(name, `an integer in [${min}, ${max}]`, v);
  if (!Number.isInteger(v) || v < min || v > max) throw invalidValue(name, `an integer in [${min}, ${max}]`, v);
  return v;
}

/** A number `ok` accepts: a TypeError for a non-number, a RangeError for a number it refuses. */
export function checkNumber(name: string, v: unknown, expected: string, ok: (n: number) => boolean): number {
  if (typeof v !== 'number') throw invalidType(name, expected, v);
  if (!ok(v)) throw invalidValue(name, expected, v);
  return v;
}

/** A keepFloat list: node names or op types, none empty (an empty name would match every unnamed layer). */
export function checkKeepFloat(name: string, v: unknown, expected: string): string[] | undefined {
  if (v === undefined) return undefined;
  if (!Array.isArray(v) || !v.every((k) => typeof k === 'string')) throw invalidType(name, expected, v);
  const empty = v.indexOf('');
  if (empty >= 0) throw invalidValue(`${name}[${empty}]`, 'a node name or op type', '', 'Remove the empty entry.');
  return v;
}

export function checkBoolean(name: string, v: unknown): boolean {
  if (typeof v !== 'boolean') throw invalidType(name, 'a boolean', v);
  return v;
}

/** A bit width among `choices` ("Expected 4, 8 or 16 for name …"). */
export function checkBitsChoice(name: string, v: unknown, choices: number[]): void {
  checkNumber(name, v, `${choices.slice(0, -1).join(', ')} or ${choices[choices.length - 1]}`, (n) => choices.includes(n));
}

/** One of `choices`; a value refused gets `hint(value)` when it gives one, else the closest choice. */
export function checkChoice<T extends string>(name: string, v: unknown, choices: readonly T[], hint?: (v: string) => string | undefined): T {
  const list = choices.map((c) => `'${c}'`).join(', ');
  if (typeof v !== 'string') throw invalidType(name, `one of ${list}`, v);
  if (!choices.includes(v as T)) {
    const close = closestName(v, choices);
    throw invalidValue(name, `one of ${list}`, v, hint?.(v) ?? (close ? `Did you mean '${close}'?` : undefined));
  }
  return v as T;
}

/** A shape: non-negative safe integers whose product is a safe integer. */
export function checkShape(name: string, v: unknown): number[] {
  if (!Array.isArray(v)) {
    throw invalidType(name, 'an array of non-negative integers (the tensor dimensions)', v,
      'Pass e.g. shape: [64, 3, 3, 3] for a conv weight, or [data.length] for a vector.');
  }
  let product = 1;
  v.forEach((d, i) => {
    checkInteger(`${name}[${i}]`, d, 0, Number.MAX_SAFE_INTEGER);
    product *= d;
    if (product > Number.MAX_SAFE_INTEGER) throw invalidValue(name, 'dimensions whose product is a safe integer', v);
  });
  return v.slice() as number[];
}

/**
 * The name a misspelling most likely meant: the same but for case, else the nearest by edit distance when that is
 * at most 2 and under a third of the name (so 'bit' finds 'bits', 'granularty' 'granularity', and 'x' nothing).
 */
export function closestName(v: string, names: readonly string[]): string | undefined {
  const same = names.find((n) => n.toLowerCase() === v.toLowerCase());
  if (same) return same;
  let best: string | undefined;
  let bestDistance = Infinity;
  for (const n of names) {
    const d = editDistance(v.toLowerCase(), n.toLowerCase());
    if (d < bestDistance) [best, bestDistance] = [n, d];
  }
  return best !== undefined && bestDistance <= 2 && bestDistance * 3 < Math.max(v.length, best.length) ? best : undefined;
}

/** Levenshtein distance (insertions, deletions, substitutions). */
function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const row = [i];
    for (let j = 1; j <= b.length; j++) row[j] = Math.min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    previous = row;
  }
  return previous[b.length];
}

/** Rejects keys not in `known`, suggesting the closest one. */
export function checkKnownKeys(name: string, options: Record<string, unknown>, known: readonly string[]): void {
  for (const key of Object.keys(options)) {
    if (known.includes(key) || options[key] === undefined) continue;
    const close = closestName(key, known);
    const hint = close ? `Did you mean '${close}'?` : `Known options: ${known.join(', ')}.`;
    throw invalidValue(`${name}.${key}`, 'a known option', key, hint);
  }
}

/**
 * Writes an async call's result into the caller's `options.out` once the work has ended (the native threads wrote
 * lowbit's own array): an `out` transferred or resized meanwhile is an error naming it.
 */
export function copyIntoOut<T extends Int8Array | Uint8Array | Int32Array>(out: T, values: ArrayLike<number>, call: string): T {
  if (isDetached(out) || out.length < values.length) {
    throw invalidType('options.out', `an array of at least ${values.length} elements still attached when the work ended`, out,
      `It was transferred or resized while ${call} ran: pass an array that stays in place, or none.`);
  }
  out.set(values);
  return out;
}

/**
 * Whether iterating `data` again starts over: 'restarts' for a folder path, an array, or an iterable handing out a
 * new iterator each time (an EventEmitter dataset too); 'once' for what can be read only once: a generator object, a
 * stream (a Node or web Readable, a readline interface: new iterators over data read once), or an iterable handing
 * out the same generator twice; 'unknown' otherwise — an object returning itself (it may reset its position) or
 * another iterator twice, or whose iterator method throws. Probing calls the iterator method (the async one first,
 * as `for await` does) twice and leaves the iterators unread (closing them could close what a dataset shares between
 * its iterators; an unstarted generator holds nothing). Callers that read again still check that the second reading
 * gives what the first did.
 */
export function iterability(data: unknown): 'restarts' | 'once' | 'unknown' {
  if (typeof data === 'string' || Array.isArray(data)) return 'restarts';
  if (typeof data !== 'object' || data === null) return 'unknown';
  const d = data as Partial<Iterable<unknown> & AsyncIterable<unknown>> & Record<string, unknown>;
  if (isStream(data) || isGenerator(data)) return 'once';
  const iterate = (typeof d[Symbol.asyncIterator] === 'function' ? d[Symbol.asyncIterator] : d[Symbol.iterator]) as ((this: unknown) => unknown) | undefined;
  if (typeof iterate !== 'function') return 'unknown';
  try {
    const first = iterate.call(d);
    if (first === data) return 'unknown';
    const second = iterate.call(d);
    if (first !== second) return 'restarts';
    return isGenerator(first) ? 'once' : 'unknown';
  } catch {
    return 'unknown';
  }
}

/** A Node or web Readable, or a readline interface: each hands out new iterators over data read once. */
export function isStream(data: object): boolean {
  const d = data as Record<string, unknown>;
  return (typeof d.pipe === 'function' && typeof d.on === 'function') || (typeof d.question === 'function' && typeof d.on === 'function') ||
    typeof d.getReader === 'function';
}

function isGenerator(v: unknown): boolean {
  return generatorKind(v) !== undefined;
}

/** 'a generator' or 'an async generator' for a generator object; undefined for anything else. */
export function generatorKind(v: unknown): 'a generator' | 'an async generator' | undefined {
  const tag = Object.prototype.toString.call(v);
  return tag === '[object Generator]' ? 'a generator' : tag === '[object AsyncGenerator]' ? 'an async generator' : undefined;
}
