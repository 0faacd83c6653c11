#!/usr/bin/env bash
# One command on a fresh Debian 12 machine: install what is missing (Debian
# packages; the venv .venv from PyPI), build, install the Python package into
# .venv (`pip install .`, as a user does), run every test with CTest. With RINGATTN_SANITIZE_TESTS=1 (CI sets it) it then
# builds the sanitize preset (AddressSanitizer + UBSan, CPU path) and runs the
# suite again there, less the tests that are slow under ASan or sanitize
# themselves (multi-host, fuzzing, 8 ranks, finite differences).
set -euo pipefail
cd "$(dirname "$0")"
scripts/install_deps.sh
scripts/install_python.sh .venv
cmake --preset release -DRINGATTN_PYTHON_TESTS="$PWD/.venv/bin/python" >/dev/null
cmake --build --preset release -j "$(nproc)"
CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" .venv/bin/python -m pip install -q --no-build-isolation --disable-pip-version-check .
ctest --preset release -j "$(nproc)" "$@"
if [ "${RINGATTN_SANITIZE_TESTS:-0}" = 1 ]; then
  cmake --preset sanitize >/dev/null
  cmake --build --preset sanitize -j "$(nproc)"
  ctest --preset sanitize -j "$(nproc)" -E "multihost|^fuzz$|mpi_np8|ModelGrad" "$@"
fi
