// Loaded by mocha before the tests (.mocharc.json): the test run, and the CLI and workers it starts, opt out of
// onnxruntime's usage reports as lowbit's other programs do (ts/ort-telemetry.ts).
require('../dist/ts/ort-telemetry').optOutOfOrtTelemetry();
