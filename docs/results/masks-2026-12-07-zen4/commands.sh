#!/bin/bash
# Packed documents at P = 2 against full causal, the binary before (BEFORE) and
# after (AFTER) this session's kernel and allocator changes: L = 65536, H = 2,
# d = 64, causal, forward + backward, one thread per rank; the 35 documents of
# masks-2026-12-02b/commands.sh (log-normal mix, seed 1; docs.npy, written here).
# The docs cases run ROUNDS times, the binaries alternating; full causal (zigzag)
# twice each. Prints the slowest rank's forward + backward seconds per run.
set -euo pipefail
ROUNDS=${ROUNDS:-3}
BEFORE=${BEFORE:?path of the binary before}
AFTER=${AFTER:?path of the binary after}
/usr/bin/python3 - <<'PY'
import numpy as np
rng = np.random.default_rng(1)
L, lens = 65536, []
while sum(lens) < L:
    lens.append(int(max(16, min(6000, rng.lognormal(7.3, 0.9)))))
lens[-1] -= sum(lens) - L
np.save("docs.npy", np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
PY
M=(mpirun --allow-run-as-root --bind-to none --mca pml ob1 --mca btl self,vader -np 2)
A=(attention --seq 65536 --heads 2 --dim 64 --causal --backward --threads 1 --json)
run() {  # name binary case layout [extra...]
  local name=$1 bin=$2 case=$3 lay=$4
  shift 4
  "${M[@]}" "$bin" "${A[@]}" --strategy ring --layout "$lay" "$@" | /usr/bin/python3 -c "
import json, sys
d = json.load(sys.stdin)
t = max(r['forward']['seconds'] + r['backward']['seconds'] for r in d['per_rank'])
print('$name $case $lay', round(t, 3), 'pairs', d['visible_pairs'])"
}
for r in $(seq "$ROUNDS"); do
  for lay in contiguous doc-balanced zigzag; do
    run before "$BEFORE" docs $lay --cu-seqlens docs.npy
    run after "$AFTER" docs $lay --cu-seqlens docs.npy
  done
done
for r in 1 2; do
  run before "$BEFORE" full zigzag
  run after "$AFTER" full zigzag
done
