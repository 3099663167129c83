/**
 * One message shape for every bad argument:
 * "Expected <what> for <name> but received <value>. <what to do>"
 * TypeError for a wrong type, RangeError for a wrong value.
 */

/** Short, safe description of any received value for error messages. */
export function describe(value: unknown): string {
  if (value === null) return 'null';
  if (value === undefined) return 'undefined';
  if (typeof value === 'number') return Number.isNaN(value) ? 'NaN' : `${value}`;
  if (typeof value === 'string') return JSON.stringify(value.length > 40 ? value.slice(0, 40) + '…' : value);
  if (typeof value === 'boolean' || typeof value === 'bigint') return `${value} (${typeof value})`;
  if (ArrayBuffer.isView(value)) {
    if (isDetached(value)) return `${value.constructor.name} on a detached buffer`;
    const len = (value as unknown as { length?: number }).length;
    return `${value.constructor.name}${len === undefined ? '' : ` of length ${len}`}`;
  }
  // A short list of plain values (dims, a shape) says more as itself.
  if (Array.isArray(value) && value.length <= 8 && value.every((v) => typeof v === 'number' || typeof v === 'string' || typeof v === 'boolean')) {
    return `[${value.map((v) => (typeof v === 'string' ? JSON.stringify(v) : String(v))).join(', ')}]`;
  }
  if (Array.isArray(value)) return `Array of length ${value.length}`;
  if (typeof value === 'function') return 'a function';
  const name = (value as object).constructor?.name;
  return name && name !== 'Object' ? withArticle(name) : 'an object';
}

/** 'a' or 'an' before a type or value name: an Int8Array, an int4 value, a Uint8Array, a uint4 value. */
export function withArticle(word: string): string {
  return `${/^[aeio]/i.test(word) ? 'an' : 'a'} ${word}`;
}

/** True when the typed array's buffer was transferred or detached. */
export function isDetached(view: ArrayBufferView): boolean {
  const buffer = view.buffer as ArrayBuffer & { detached?: boolean };
  if (typeof buffer.detached === 'boolean') return buffer.detached;
  // Node 20 lacks ArrayBuffer.prototype.detached; a detached buffer has no bytes and
  // its views report length 0 at offset 0, which a real zero-length buffer cannot
  // be told apart from, so probe: slicing a detached buffer throws.
  if (buffer.byteLength !== 0) return false;
  try {
    buffer.slice(0, 0);
    return false;
  } catch {
    return true;
  }
}

function message(name: string, expected: string, received: unknown, hint?: string): string {
  return `Expected ${expected} for ${name} but received ${describe(received)}.` + (hint ? ` ${hint}` : '');
}

export function invalidType(name: string, expected: string, received: unknown, hint?: string): TypeError {
  return new TypeError(message(name, expected, received, hint));
}

export function invalidValue(name: string, expected: string, received: unknown, hint?: string): RangeError {
  return new RangeError(message(name, expected, received, hint));
}
