#!/usr/bin/env bash
# One command on a fresh Debian 12 machine: install what is missing, build, run
# every test with CTest. With RINGATTN_SANITIZE_TESTS=1 (CI sets it) it then
# builds the sanitize preset (AddressSanitizer + UBSan, CPU path) and runs the
# suite again there, less the tests that are slow under ASan or sanitize
# themselves (multi-host, fuzzing, 8 ranks, finite differences).
set -euo pipefail
cd "$(dirname "$0")"
scripts/install_deps.sh
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc)"
ctest --preset release -j "$(nproc)" "$@"
if [ "${RINGATTN_SANITIZE_TESTS:-0}" = 1 ]; then
  cmake --preset sanitize >/dev/null
  cmake --build --preset sanitize -j "$(nproc)"
  ctest --preset sanitize -j "$(nproc)" -E "multihost|^fuzz$|mpi_np8|ModelGrad" "$@"
fi
