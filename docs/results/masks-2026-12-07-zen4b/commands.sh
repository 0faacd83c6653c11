#!/bin/bash
# Packed documents at P = 2 against full causal, cold (--reps 1: every buffer's
# first touch inside the timed step, as before) and warm (--reps 3: the best of
# three steps, as a training loop's later steps run): L = 65536, H = 2, d = 64,
# causal, forward + backward, one thread per rank; the 35 documents of
# masks-2026-12-02b/commands.sh (log-normal mix, seed 1; docs.npy, written here).
# BIN: the ringattn binary. Prints the slowest rank's forward + backward seconds
# per run, then each case's time per visible pair against full causal's.
set -euo pipefail
ROUNDS=${ROUNDS:-3}
BIN=${BIN:?path of the ringattn binary}
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
run() {  # case layout reps [extra...]
  local case=$1 lay=$2 reps=$3
  shift 3
  "${M[@]}" "$BIN" "${A[@]}" --strategy ring --layout "$lay" --reps "$reps" "$@" | /usr/bin/python3 -c "
import json, sys
d = json.load(sys.stdin)
t = max(r['forward']['seconds'] + r['backward']['seconds'] for r in d['per_rank'])
print('$case $lay reps $reps', round(t, 3), 'pairs', d['visible_pairs'])"
}
{
  for r in $(seq "$ROUNDS"); do
    for lay in contiguous doc-balanced zigzag; do
      for reps in 1 3; do run docs $lay $reps --cu-seqlens docs.npy; done
    done
  done
  for r in 1 2; do run full zigzag 2; done
} | tee runs.txt
/usr/bin/python3 - <<'PY'
import collections, statistics
t = collections.defaultdict(list); pairs = {}
for line in open("runs.txt"):
    case, lay, _, reps, sec, _, p = line.split()
    t[(case, lay, int(reps))].append(float(sec)); pairs[case] = float(p)
full = min(t[("full", "zigzag", 2)]) / pairs["full"]
for (case, lay, reps), xs in t.items():
    if case == "full":
        print(f"full causal zigzag (reps 2) s {xs}")
        continue
    r = [x / pairs[case] / full for x in xs]
    print(f"docs {lay:12} reps {reps}  s {xs}  time/pair vs full: best {min(r):.2f} median {statistics.median(r):.2f}")
PY
