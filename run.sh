#!/usr/bin/env bash
# One command on a fresh Debian 12 machine: install what is missing, build, and run
# the main job. Until the transformer comparison exists, the main job is a checked
# ring-attention run on 2 local ranks and the kernel benchmark (extra arguments go
# to `ringattn bench kernel`).
set -euo pipefail
cd "$(dirname "$0")"
scripts/install_deps.sh
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc)"
./build/release/ringattn info
echo "== ring attention on 2 local ranks, checked against one rank =="
mpirun --allow-run-as-root --oversubscribe --bind-to none --mca btl self,vader -np 2 \
  ./build/release/ringattn attention --strategy ring --layout zigzag --seq 4096 --heads 8 --dim 128 \
  --causal --backward --check --threads 1
echo "== kernel benchmark =="
./build/release/ringattn bench kernel "$@"
