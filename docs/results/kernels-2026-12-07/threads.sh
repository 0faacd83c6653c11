#!/bin/bash
# Large kernel buffers zeroed by the kernel's threads instead of the caller's one:
# BEFORE and AFTER binaries alternately, ROUNDS rounds, at 1 and 2 threads,
# `attention --seq 4096 --heads 8 --dim 128 --backward` (fp32); each run is one
# call, so its buffers are fresh pages. Prints best (median) GFLOP/s: threads.txt.
set -euo pipefail
ROUNDS=${ROUNDS:-5}
BEFORE=${BEFORE:?path of the binary before}
AFTER=${AFTER:?path of the binary after}
for r in $(seq "$ROUNDS"); do for t in 1 2; do for b in before after; do
  bin=$BEFORE; [ $b = after ] && bin=$AFTER
  "$bin" attention --seq 4096 --heads 8 --dim 128 --backward --threads $t --json |
    /usr/bin/python3 -c "import json,sys; d=json.load(sys.stdin); print('$b', $t, d['forward']['gflops'], d['backward']['gflops'])"
done; done; done > threads_runs.txt
/usr/bin/python3 - <<'PY' | tee threads.txt
import collections, statistics as st
r = collections.defaultdict(list)
for line in open("threads_runs.txt"):
    b, t, f, g = line.split(); r[(b, int(t))].append((float(f), float(g)))
for (b, t), v in sorted(r.items()):
    f, g = [x[0] for x in v], [x[1] for x in v]
    print(f"{b:6s} {t} thr  forward {max(f):6.1f} ({st.median(f):6.1f})  backward {max(g):6.1f} ({st.median(g):6.1f})")
for b in ("before", "after"):
    print(b, "2-thread speed-up by medians: forward",
          round(st.median(x[0] for x in r[(b, 2)]) / st.median(x[0] for x in r[(b, 1)]), 2), "backward",
          round(st.median(x[1] for x in r[(b, 2)]) / st.median(x[1] for x in r[(b, 1)]), 2))
PY
