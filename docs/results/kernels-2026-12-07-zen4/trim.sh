#!/bin/bash
# Forward products trimmed to the columns each 6-row block's runs cover (AFTER)
# against every column of a seen tile (BEFORE), alternately ROUNDS times, one
# thread, forward GFLOP/s on visible pairs: causal at L = 4096 (H = 8, d = 128,
# fp32 and bf16), full at L = 4096, and 35 packed documents at L = 65536 (H = 2,
# d = 64; the mix of masks-2026-12-02b, seed 1, written to docs.npy). trim.txt.
set -euo pipefail
ROUNDS=${ROUNDS:-5}
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
CASES=("causal fp32|--seq 4096 --heads 8 --dim 128 --causal"
       "causal bf16|--seq 4096 --heads 8 --dim 128 --causal --dtype bf16"
       "full fp32|--seq 4096 --heads 8 --dim 128"
       "documents fp32|--seq 65536 --heads 2 --dim 64 --causal --cu-seqlens docs.npy"
       "documents bf16|--seq 65536 --heads 2 --dim 64 --causal --cu-seqlens docs.npy --dtype bf16")
for r in $(seq "$ROUNDS"); do
  for c in "${CASES[@]}"; do
    for b in before after; do
      bin=$BEFORE; [ $b = after ] && bin=$AFTER
      # shellcheck disable=SC2086
      g=$("$bin" attention ${c#*|} --threads 1 --json | /usr/bin/python3 -c "import json,sys; print(round(json.load(sys.stdin)['forward']['gflops'], 1))")
      echo "${c%%|*}|$b|$g"
    done
  done
done > trim_runs.txt
/usr/bin/python3 - <<'PY' | tee trim.txt
import collections, statistics as st
d = collections.defaultdict(list)
for l in open("trim_runs.txt"):
    c, b, g = l.strip().split("|"); d[(c, b)].append(float(g))
for c in dict.fromkeys(k[0] for k in d):
    bb, aa = d[(c, "before")], d[(c, "after")]
    print(f"{c:15s} before best {max(bb):6.1f} median {st.median(bb):6.1f}   after best {max(aa):6.1f} median {st.median(aa):6.1f}")
PY
rm -f docs.npy
