#!/bin/bash
# Each rank's own block alone on one core (a cluster gives every rank its own
# machine; on this 2-core VM two ranks at once slow each other): the document
# pieces rank p holds under contiguous and doc-balanced shards, packed as one
# sequence (alone_<layout>_<P>_<p>.npy), forward + backward, one thread, ROUNDS
# rounds alternating. Leaves out the pairs across ranks (contiguous: the
# documents crossing a shard edge; doc-balanced: the dealt ones). alone.txt.
set -euo pipefail
ROUNDS=${ROUNDS:-3}
R=../../../build/release/ringattn
/usr/bin/python3 - <<'PY'
import numpy as np
cu = np.load("docs.npy"); lens = [int(x) for x in np.diff(cu)]; L = int(cu[-1])
def owners(P):  # doc-balanced, written out as in commands.sh
    w = [n * (n + 1) // 2 for n in lens]; load = [0] * P; own = [-1] * len(lens)
    for i in sorted(range(len(lens)), key=lambda i: (-w[i], i)):
        r = min(range(P), key=lambda r: (load[r], r))
        if load[r] + w[i] * P <= sum(w): load[r] += w[i] * P; own[i] = r
        else: load = [x + w[i] for x in load]
    return own
def pieces(layout, P, p):
    if layout == "contiguous":
        a, b = p * L // P, (p + 1) * L // P
        return [min(b, cu[i + 1]) - max(a, cu[i]) for i in range(len(lens)) if min(b, cu[i + 1]) > max(a, cu[i])]
    own, out = owners(P), []
    for i, n in enumerate(lens):
        if own[i] == p: out.append(n)
        elif own[i] < 0: out += [(c + 1) * n // (2 * P) - c * n // (2 * P) for c in (p, 2 * P - 1 - p)]
    return [x for x in out if x > 0]
for P in (2, 4):
    for lay in ("contiguous", "doc-balanced"):
        for p in range(P):
            np.save(f"alone_{lay}_{P}_{p}.npy", np.concatenate([[0], np.cumsum(pieces(lay, P, p))]).astype(np.int32))
PY
: > alone_runs.txt
for r in $(seq "$ROUNDS"); do
  for P in 2 4; do for lay in contiguous doc-balanced; do for p in $(seq 0 $((P - 1))); do
    f=alone_${lay}_${P}_$p.npy
    n=$(/usr/bin/python3 -c "import numpy as np; print(int(np.load('$f')[-1]))")
    $R attention --seq "$n" --cu-seqlens "$f" --heads 2 --dim 64 --causal --backward --threads 1 --json |
      /usr/bin/python3 -c "import json,sys; d=json.load(sys.stdin); print('$lay $P $p', d['forward']['seconds'] + d['backward']['seconds'])" >> alone_runs.txt
  done; done; done
done
/usr/bin/python3 - <<'PY' | tee alone.txt
import collections, statistics
t = collections.defaultdict(list)
for line in open("alone_runs.txt"):
    lay, P, p, s = line.split(); t[(lay, int(P))].append((int(p), float(s)))
for (lay, P), v in t.items():
    per = [[s for q, s in v if q == p] for p in range(P)]
    print(f"P={P} {lay:12s} fwd+bwd s per rank, best {[round(min(x), 3) for x in per]} "
          f"median {[round(statistics.median(x), 3) for x in per]}  busiest best {max(min(x) for x in per):.3f}")
PY
