#!/bin/bash
# bench kernel, the binary before (BEFORE) and after (AFTER), alternately ROUNDS
# times (the VM is noisy): B = 1, L = 4096, H = 8, d = 128, the default rows.
# Writes before_N.json / after_N.json and summary.txt (best and median of each
# row's GFLOP/s and its ratio to the peak measured in the same run).
set -euo pipefail
ROUNDS=${ROUNDS:-3}
BEFORE=${BEFORE:?path of the binary before}
AFTER=${AFTER:?path of the binary after}
for r in $(seq "$ROUNDS"); do
  "$BEFORE" bench kernel --no-unfused --json > "before_$r.json"
  "$AFTER" bench kernel --no-unfused --json > "after_$r.json"
done
/usr/bin/python3 - <<'PY' | tee summary.txt
import glob, json, statistics as st
def rows(tag):
    out = {}
    for f in sorted(glob.glob(f"{tag}_*.json")):
        j = json.load(open(f))
        for r in j["rows"]:
            if r.get("kernel") != "fused":
                continue
            key = (r["dtype"], "causal" if r["causal"] else "full", r["pass"], r["threads"])
            out.setdefault(key, []).append((r["gflops"], r["peak_ratio"]))
    return out
b, a = rows("before"), rows("after")
print(f"{'dtype':5s} {'mask':6s} {'pass':8s} thr  {'before best (median) of peak':>30s}  {'after best (median) of peak':>30s}")
for k in b:
    fb = lambda v: f"{max(x[0] for x in v):6.1f} ({st.median(x[0] for x in v):6.1f}) {max(x[1] for x in v):.2f}"
    print(f"{k[0]:5s} {k[1]:6s} {k[2]:8s} {k[3]:3d}  {fb(b[k]):>30s}  {fb(a[k]):>30s}")
PY
