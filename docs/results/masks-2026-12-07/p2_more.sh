#!/bin/bash
# P = 2 only, more rounds (the ranks have a core each there; at P = 4 four ranks
# share the two cores, so a rank's compute time counts the others' turns):
# the documents on contiguous, doc-zigzag and doc-balanced shards and Ulysses,
# alternating, ROUNDS times. Writes p2m_<layout>_<round>.json.
set -euo pipefail
ROUNDS=${ROUNDS:-6}
R=../../../build/release/ringattn
M=(mpirun --allow-run-as-root --oversubscribe --bind-to none --mca btl self,vader -np 2)
A=(attention --seq 65536 --heads 2 --dim 64 --causal --backward --threads 1 --json --cu-seqlens docs.npy)
for r in $(seq "$ROUNDS"); do
  for L in contiguous doc-zigzag doc-balanced; do
    "${M[@]}" $R "${A[@]}" --strategy ring --layout $L > p2m_${L}_$r.json
  done
  "${M[@]}" $R "${A[@]}" --strategy ulysses --layout zigzag > p2m_ulysses_$r.json
done
/usr/bin/python3 - <<'PY' | tee p2_more.txt
import glob, json, statistics
for lay in ("contiguous", "doc-zigzag", "doc-balanced", "ulysses"):
    t, comp = [], []
    for f in sorted(glob.glob(f"p2m_{lay}_*.json")):
        pr = json.load(open(f))["per_rank"]
        t.append(max(r["forward"]["seconds"] + r["backward"]["seconds"] for r in pr))
        comp.append([r["forward"]["compute_seconds"] + r["backward"]["compute_seconds"] for r in pr])
    busiest = [max(c) for c in comp]
    print(f"{lay:13s} fwd+bwd s best {min(t):.3f} median {statistics.median(t):.3f}   "
          f"busiest rank's compute s best {min(busiest):.3f} median {statistics.median(busiest):.3f}   "
          f"ranks' compute (median) {[round(statistics.median(c[i] for c in comp), 3) for i in range(2)]}")
PY
