#!/bin/bash
# Packed documents of real corpora at P = 2 against full causal: one row of
# L = 65536 byte-level tokens from three corpora on Debian 12, their documents
# shuffled (seed 0, as a training loader does) and packed in that order, each
# document's bytes and an EOS (as `train --documents` packs them), the row cut at L:
#   fortunes   Debian's `fortunes` package (installed if missing): the fortunes
#              between '%' lines of its cookie files, sorted by file
#   copyright  /usr/share/doc/*/copyright of the installed packages, sorted by path
#   python     /usr/lib/python3.11/*.py, the standard library's modules, sorted
# `attention --seq 65536 --heads 2 --dim 64 --causal --backward`, ring, one thread
# per rank, layouts contiguous, doc-balanced and zigzag, cold (--reps 1) and warm
# (--reps 3), ROUNDS rounds; full causal zigzag for the time per visible pair.
# BIN: the ringattn binary. Writes <corpus>.npy (cu_seqlens), runs.txt, summary.txt.
set -euo pipefail
ROUNDS=${ROUNDS:-2}
BIN=${BIN:?path of the ringattn binary}
[ -d /usr/share/games/fortunes ] || apt-get install -y -q fortunes >/dev/null
/usr/bin/python3 - <<'PY' | tee corpora.txt
import glob
import numpy as np
L = 65536
cookies = sorted(f for f in glob.glob("/usr/share/games/fortunes/*") if not f.endswith((".dat", ".u8")))
fortunes = [d for f in cookies for d in open(f, "rb").read().split(b"\n%\n")]
corpora = {
    "fortunes": [len(d) for d in fortunes if d.strip()],
    "copyright": [len(open(f, "rb").read()) for f in sorted(glob.glob("/usr/share/doc/*/copyright"))],
    "python": [len(open(f, "rb").read()) for f in sorted(glob.glob("/usr/lib/python3.11/*.py"))],
}
for name, sizes in corpora.items():
    lens, total = [], 0
    for s in np.random.default_rng(0).permutation(sizes).tolist():  # each document and its EOS, until the row is full (the last one cut)
        n = min(s + 1, L - total)
        lens.append(n)
        total += n
        if total == L:
            break
    assert total == L, (name, total)
    np.save(f"{name}.npy", np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
    print(f"{name}: {len(lens)} documents in the row, median {int(np.median(lens))} tokens, "
          f"min {min(lens)}, max {max(lens)}")
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
    for c in fortunes copyright python; do
      for lay in contiguous doc-balanced zigzag; do
        for reps in 1 3; do run "$c" $lay $reps --cu-seqlens "$c.npy"; done
      done
    done
  done
  for r in 1 2; do run full zigzag 2; done
} | tee runs.txt
/usr/bin/python3 - <<'PY' | tee summary.txt
import collections
t = collections.defaultdict(list); pairs = {}
for line in open("runs.txt"):
    case, lay, _, reps, sec, _, p = line.split()
    t[(case, lay, int(reps))].append(float(sec)); pairs[case] = float(p)
full = min(t[("full", "zigzag", 2)]) / pairs["full"]
print(f"full causal zigzag: {pairs['full']:.3g} visible pairs, best {min(t[('full', 'zigzag', 2)]):.3f} s")
for (case, lay, reps), xs in sorted(t.items()):
    if case == "full":
        continue
    r = [x / pairs[case] / full for x in xs]
    print(f"{case:9} {lay:12} reps {reps}  pair ratio {pairs[case] / pairs['full']:.4f}  s {xs}  "
          f"time/pair vs full: best {min(r):.2f} worst {max(r):.2f}")
PY
