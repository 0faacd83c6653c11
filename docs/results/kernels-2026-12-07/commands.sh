#!/bin/bash
# Masked scores without underflow: the binary before (BEFORE, e1c9df8) and after
# (AFTER), alternately ROUNDS times (the VM is noisy), one thread:
# 35 packed documents (docs.npy, the mix of masks-2026-12-06b) at L = 65536 and
# full causal at L = 16384 (H = 2, d = 64, forward + backward), fp32 and bf16.
# Writes runs.jsonl (one ringattn JSON per line with "binary" and "case" added)
# and summary.txt.
set -euo pipefail
ROUNDS=${ROUNDS:-5}
BEFORE=${BEFORE:?path of the binary before}
AFTER=${AFTER:?path of the binary after}
A=(attention --heads 2 --dim 64 --causal --backward --threads 1 --json)
: > runs.jsonl
for r in $(seq "$ROUNDS"); do
  for dt in fp32 bf16; do
    for c in docs full; do
      if [ $c = docs ]; then X=(--seq 65536 --cu-seqlens docs.npy); else X=(--seq 16384); fi
      for b in before after; do
        bin=$BEFORE; [ $b = after ] && bin=$AFTER
        "$bin" "${A[@]}" "${X[@]}" --dtype $dt |
          /usr/bin/python3 -c "import json,sys; d=json.load(sys.stdin); d['binary']='$b'; d['case']='$c'; print(json.dumps(d))" >> runs.jsonl
      done
    done
  done
done
/usr/bin/python3 - <<'PY' | tee summary.txt
import json, statistics as st
runs = [json.loads(l) for l in open("runs.jsonl")]
print("GFLOP/s on visible pairs, best (median) of", len(runs) // 8, "runs each")
print(f"{'dtype':5s} {'case':5s} {'binary':7s} {'forward':>16s} {'backward':>16s}")
for dt in ("fp32", "bf16"):
    for c in ("docs", "full"):
        for b in ("before", "after"):
            sel = [r for r in runs if r["dtype"] == dt and r["case"] == c and r["binary"] == b]
            f = [r["forward"]["gflops"] for r in sel]
            g = [r["backward"]["gflops"] for r in sel]
            print(f"{dt:5s} {c:5s} {b:7s} {max(f):7.1f} ({st.median(f):6.1f}) {max(g):7.1f} ({st.median(g):6.1f})")
PY
