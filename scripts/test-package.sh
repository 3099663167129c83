#!/usr/bin/env bash
# npm run test:package: what a user of the published package gets. Packs lowbit (npm pack), installs the tarball
# with onnxruntime-node into an empty project in a temporary folder (the install script builds the addon there),
# and runs from it: the README's example (CommonJS), an ES module import, the one-command "try it"
# (npx lowbit quantize), lowbit inspect, and TypeScript type checks of a consumer file under the module settings
# users have. Exits non-zero on any failure; the temporary folder is removed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$(mktemp -d "${TMPDIR:-/tmp}/lowbit-package.XXXXXX")
trap 'rm -rf "$work"' EXIT

npm pack --silent --pack-destination "$work" >/dev/null
tarball=$(ls "$work"/lowbit-*.tgz)
ort_version=$(node -p "require('./package.json').devDependencies['onnxruntime-node']")

cd "$work"
mkdir consumer
cd consumer
# onnxruntime-node's install script fetches CUDA binaries from nuget.org (offline here); its CPU build is in the
# package. npm 11 skips it by allowScripts, older npm by the environment variable, as the README tells users.
echo '{ "name": "lowbit-consumer", "version": "1.0.0", "private": true, "allowScripts": { "onnxruntime-node": false } }' > package.json
ONNXRUNTIME_NODE_INSTALL=skip npm install --no-audit --no-fund --loglevel=error "$tarball" "onnxruntime-node@$ort_version" >/dev/null
test -f node_modules/lowbit/build/Release/lowbit.node || { echo "test:package: the install script did not build the addon"; exit 1; }

check() {  # check <what> <command…>: runs it, keeps its output in $out, fails loudly with it
  what=$1
  shift
  if ! out=$("$@" 2>&1); then
    echo "test:package: $what failed:"
    echo "$out"
    exit 1
  fi
}
expect() {  # expect <what> <pattern>: $out must match
  grep -qE -- "$2" <<<"$out" || { echo "test:package: $1: output does not match /$2/:"; echo "$out"; exit 1; }
}

# Source maps ship with their sources inside (ts/ is not in the package): a stack trace or debugger can show them.
check "source maps carry their sources" node -e '
const fs = require("fs"), path = require("path");
const dir = "node_modules/lowbit/dist/ts";
const maps = fs.readdirSync(dir, { recursive: true }).filter((f) => f.endsWith(".js.map"));
if (maps.length === 0) throw new Error("no source maps under " + dir);
for (const f of maps) {
  const map = JSON.parse(fs.readFileSync(path.join(dir, f), "utf8"));
  if (!map.sourcesContent || map.sourcesContent.some((s) => typeof s !== "string" || s.length === 0))
    throw new Error(f + " has no sourcesContent and its source " + map.sources + " is not in the package");
}'

cp "$root/examples/quickstart.js" .
check "the README example (require)" node quickstart.js
expect "the README example" "bytes"

cat > esm.mjs <<'EOF'
import { quantizeTensor } from 'lowbit';
const q = quantizeTensor(new Float32Array([-1, 0.25, 0.75, 10]), { shape: [4], scale: 0.5 });
console.log(Array.from(q.values).join(' '));
EOF
check "an ES module import" node esm.mjs
expect "an ES module import" "^-2 0 2 20$"

check "npx lowbit quantize (the bundled example)" npx --no-install lowbit quantize
expect "npx lowbit quantize" "cosine 0\.99"
test -s mnist-cnn.q.onnx || { echo "test:package: npx lowbit quantize wrote no mnist-cnn.q.onnx"; exit 1; }

check "npx lowbit inspect" npx --no-install lowbit inspect mnist-cnn.q.onnx
expect "npx lowbit inspect" "conv1"

cat > consumer.ts <<'EOF'
import { quantizeTensor, quantizeModel, type QuantizeModelOptions } from 'lowbit';
const q = quantizeTensor(new Float32Array([1, 2]), { shape: [2], bits: 8 });
const options: QuantizeModelOptions = { weights: { bits: 4, granularity: 'block' } };
void quantizeModel('model.onnx', options).then((r) => r.report.layers.length);
const values: Int8Array | Uint8Array = q.values;
export { values };
EOF
tsc="$root/node_modules/.bin/tsc"
common=(--noEmit --strict --target es2022 --types node --typeRoots "$root/node_modules/@types" consumer.ts)
check "TypeScript, module node20" "$tsc" "${common[@]}" --module node20 --moduleResolution node16
check "TypeScript, module nodenext" "$tsc" "${common[@]}" --module nodenext --moduleResolution nodenext
check "TypeScript, bundler resolution" "$tsc" "${common[@]}" --module esnext --moduleResolution bundler
# module node16 models Node 16, which cannot require() an ES module (onnx-buf is one): it needs skipLibCheck.
check "TypeScript, module node16 with skipLibCheck" "$tsc" "${common[@]}" --module node16 --moduleResolution node16 --skipLibCheck
# onnxruntime-node is an optional peer: lowbit's declarations must type-check without it (skipLibCheck off).
mv node_modules/onnxruntime-node ../onnxruntime-node-aside
check "TypeScript without onnxruntime-node installed" "$tsc" "${common[@]}" --module node20 --moduleResolution node16
mv ../onnxruntime-node-aside node_modules/onnxruntime-node
# A wrong type must still be caught (the declarations are read, not replaced by any).
echo 'const wrong: string = quantizeTensor(new Float32Array(1), { shape: [1] }).values; void wrong;' >> consumer.ts
if "$tsc" "${common[@]}" --module node20 --moduleResolution node16 >/dev/null 2>&1; then
  echo "test:package: a type error in the consumer went unnoticed: lowbit's declarations are not read"
  exit 1
fi

echo "test:package: passed (packed, installed with onnxruntime-node $ort_version, source maps, example, ESM import, npx lowbit quantize and inspect, TypeScript checks with and without onnxruntime-node)"
