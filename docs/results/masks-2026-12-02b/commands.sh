#!/bin/bash
# ring at L = 65536, H = 2, d = 64, causal, forward + backward, one thread per rank;
# run from this folder after building (build/release). docs.npy: 38 documents of a
# log-normal length mix (seed 1), written here first.
set -euo pipefail
R=../../../build/release/ringattn
M=(mpirun --allow-run-as-root --oversubscribe --bind-to none --mca btl self,vader)
A=(attention --strategy ring --seq 65536 --heads 2 --dim 64 --causal --backward --threads 1 --json)
/usr/bin/python3 - <<'PY'
import numpy as np
rng = np.random.default_rng(1)
L, lens = 65536, []
while sum(lens) < L:
    lens.append(int(max(16, min(6000, rng.lognormal(7.3, 0.9)))))
lens[-1] -= sum(lens) - L
np.save("docs.npy", np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
print(len(lens), "documents, median", int(np.median(lens)), "min", min(lens), "max", max(lens))
PY
for P in 2 4; do
  "${M[@]}" -np $P $R "${A[@]}" --layout zigzag > p${P}_zigzag.json
  "${M[@]}" -np $P $R "${A[@]}" --layout contiguous --window 4095,0 > p${P}_win.json
  "${M[@]}" -np $P $R "${A[@]}" --layout zigzag --cu-seqlens docs.npy > p${P}_zigzag_docs.json
  "${M[@]}" -np $P $R "${A[@]}" --layout contiguous --cu-seqlens docs.npy > p${P}_contig_docs.json
done
