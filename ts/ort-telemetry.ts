/**
 * onnxruntime-node 1.30 and later reports usage to Microsoft from Linux and macOS, as onnxruntime has from Windows:
 * at its first session a process keeps a device id and an event cache under ~/.cache/Microsoft and leaves a
 * `mat-debug-<pid>.log` in the temporary folder, unless ORT_DISABLE_TELEMETRY=1 is set by then (CI machines are
 * left out by onnxruntime itself). lowbit's own programs (the CLI, the benchmarks, the experiments and the tests)
 * set it when the user has not set it either way; the library leaves its caller's environment alone (README).
 */
export function optOutOfOrtTelemetry(env: NodeJS.ProcessEnv = process.env): void {
  env.ORT_DISABLE_TELEMETRY ??= '1';
}
