#!/usr/bin/env bash
# One command on a fresh Debian 12 machine: install what is missing, build, and run
# the main job. Until the distributed comparison exists, the main job is the kernel
# benchmark (extra arguments go to `ringattn bench kernel`).
set -euo pipefail
cd "$(dirname "$0")"
scripts/install_deps.sh
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc)"
./build/release/ringattn info
./build/release/ringattn bench kernel "$@"
