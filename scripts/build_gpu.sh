#!/usr/bin/env bash
# Builds the CUDA path for one GPU architecture (default sm_90, H100/H200) into
# build/gpu: the `ringattn` command and the CUDA tests, to run on a GPU machine
# with scripts/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
cmake -S . -B build/gpu -DCMAKE_BUILD_TYPE=Release -DRINGATTN_CUDA=ON \
  -DRINGATTN_CUDA_ARCHITECTURES="${ARCH:-90a-real}" >/dev/null
cmake --build build/gpu -j "$(nproc)" --target ringattn ringattn_cuda_tests
