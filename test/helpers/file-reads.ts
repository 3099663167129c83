// Counting what code reads from files: fs.readSync and FileHandle.read are patched (the module object itself; a
// namespace import only has getters onto it) until `stop`.
import * as fs from 'node:fs';

export interface FileReads {
  /** Bytes read so far, in all and synchronously. */
  bytes(): number;
  syncBytes(): number;
  stop(): void;
}

export async function countFileReads(): Promise<FileReads> {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const nodeFs: { readSync: typeof fs.readSync } = require('node:fs');
  const realSync = nodeFs.readSync;
  let bytes = 0;
  let syncBytes = 0;
  nodeFs.readSync = ((...args: Parameters<typeof fs.readSync>) => {
    const n = (realSync as (...a: unknown[]) => number)(...args);
    bytes += n;
    syncBytes += n;
    return n;
  }) as typeof fs.readSync;
  const probe = await fs.promises.open(__filename, 'r');
  const handles = Object.getPrototypeOf(probe) as { read: (...a: unknown[]) => Promise<{ bytesRead: number }> };
  await probe.close();
  const realRead = handles.read;
  handles.read = async function (this: unknown, ...a: unknown[]) {
    const r = await realRead.apply(this, a);
    bytes += r.bytesRead;
    return r;
  };
  return {
    bytes: () => bytes,
    syncBytes: () => syncBytes,
    stop: () => {
      nodeFs.readSync = realSync;
      handles.read = realRead;
    },
  };
}
