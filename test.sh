#!/usr/bin/env bash
# One command on a fresh Debian 12 machine: install what is missing, build, run
# every test with CTest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/install_deps.sh
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc)"
ctest --preset release -j "$(nproc)" "$@"
