#!/bin/bash
# Two ranks on two cores against one rank alone, the same command and shape:
# `attention --seq 8192 --heads 8 --dim 128 --causal --backward --threads 1`, one
# process, and under `mpirun -np 2` (ring, zigzag, one core each), ROUNDS rounds
# alternating, each with one repetition (--reps 1: every buffer fresh pages, as a
# one-shot run) and with the best of three (--reps 3: warm, as `bench kernel`).
# Prints GFLOP/s per rank and the two-rank / one-rank ratios: two_ranks.txt.
set -euo pipefail
ROUNDS=${ROUNDS:-4}
BIN=${BIN:-build/release/ringattn}
args="attention --seq 8192 --heads 8 --dim 128 --causal --backward --threads 1 --json"
get='import json,sys; d=json.load(sys.stdin); r=d.get("per_rank",[d]); print(" ".join("%.1f" % x[p]["gflops"] for p in ("forward","backward") for x in r))'
for round in $(seq "$ROUNDS"); do for reps in 1 3; do
  echo "one $reps $(OMP_NUM_THREADS=1 taskset -c 0 "$BIN" $args --reps $reps | /usr/bin/python3 -c "$get")"
  echo "two $reps $(OMP_NUM_THREADS=1 mpirun --allow-run-as-root --bind-to core --mca pml ob1 --mca btl self,vader -np 2 \
    "$BIN" $args --reps $reps --strategy ring --layout zigzag | /usr/bin/python3 -c "$get")"
done; done > two_ranks_runs.txt
/usr/bin/python3 - <<'PY' | tee two_ranks.txt
import collections, statistics as st
one, two = collections.defaultdict(list), collections.defaultdict(list)
for line in open("two_ranks_runs.txt"):
    w = line.split(); v = [float(x) for x in w[2:]]
    (one if w[0] == "one" else two)[int(w[1])].append(v)
for reps in (1, 3):
    print(f"--reps {reps}: one rank fwd/bwd GFLOP/s, two ranks (rank 0, rank 1) fwd / bwd, slowest rank / one rank")
    for o, t in zip(one[reps], two[reps]):
        f, b = min(t[0], t[1]), min(t[2], t[3])
        print(f"  one {o[0]:6.1f} {o[1]:6.1f}   two {t[0]:6.1f} {t[1]:6.1f} / {t[2]:6.1f} {t[3]:6.1f}   ratio fwd {f/o[0]:.2f} bwd {b/o[1]:.2f}")
PY
