#!/usr/bin/env bash
# npm run test:arm: cross-compiles the kernels and their native tests for
# aarch64 (NEON and NEON dot-product paths) and runs them under qemu-aarch64.
# Installs nothing: without the cross tools it says so and exits 0 (skipped).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || missing+=("aarch64-linux-gnu-g++ (Debian g++-aarch64-linux-gnu)")
command -v qemu-aarch64 >/dev/null 2>&1 || missing+=("qemu-aarch64 (Debian qemu-user)")
if [ ${#missing[@]} -gt 0 ]; then
  echo "skipped: arm tests: missing ${missing[*]}; install with: apt-get install -y g++-aarch64-linux-gnu qemu-user"
  exit 0
fi

build=build-arm
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_TOOLCHAIN_FILE="$PWD/cmake/aarch64-linux-gnu.cmake" >/dev/null
cmake --build "$build" --target lowbit_native_tests -j 2
# qemu's default CPU ("max") has the dot-product extension, so both NEON paths run.
qemu-aarch64 -L /usr/aarch64-linux-gnu "$build/Release/lowbit_native_tests"
# A Cortex-A72 has none: the detection says so and the dispatcher falls back to plain NEON.
echo "--- again on a CPU without the dot-product extension (qemu -cpu cortex-a72)"
qemu-aarch64 -cpu cortex-a72 -L /usr/aarch64-linux-gnu "$build/Release/lowbit_native_tests"
