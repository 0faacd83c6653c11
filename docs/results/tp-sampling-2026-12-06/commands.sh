#!/bin/bash
# Decode time per output token with Llama 3's vocabulary (128256) on a tiny random
# llama (make_model.py), greedy and sampled (top-k 50, top-p 0.95, temperature 0.8),
# one process and TP = 2, binaries BEFORE and AFTER alternating, 3 rounds.
# usage: commands.sh BEFORE_BINARY AFTER_BINARY
set -euo pipefail
/usr/bin/python3 make_model.py /tmp/bigvocab
M=(mpirun --allow-run-as-root --oversubscribe --bind-to none)
S=(--top-k 50 --temperature 0.8 --top-p 0.95 --seed 3)
for r in 1 2 3; do
  for tp in 1 2; do
    for mode in greedy sampled; do
      for b in before after; do
        bin=$1; [ $b = after ] && bin=$2
        extra=(); [ $mode = sampled ] && extra=("${S[@]}")
        OMP_NUM_THREADS=1 "${M[@]}" -np $tp "$bin" generate --model /tmp/bigvocab --prompt-ids /tmp/bigvocab/prompt.npy \
          --new-tokens 32 --tp $tp --threads 1 "${extra[@]}" --json > ${b}_tp${tp}_${mode}_$r.json
      done
    done
  done
done
/usr/bin/python3 - <<'PY'
import glob, json, collections, statistics
d = collections.defaultdict(list); toks = {}
for f in sorted(glob.glob("*_tp*_*.json")):
    b, tp, mode, r = f[:-5].split("_")
    j = json.load(open(f)); d[(tp, mode, b)].append(round(j["tpot_median_ms"], 2)); toks[(tp, mode, b)] = j["new_tokens"][0]
for (tp, mode, b), v in sorted(d.items()):
    print(f"{tp} {mode:8s} {b:6s} ms/token {v} median {statistics.median(v)}")
for tp in ("tp1", "tp2"):
    for mode in ("greedy", "sampled"):
        print(tp, mode, "tokens equal before/after:", toks[(tp, mode, "before")] == toks[(tp, mode, "after")],
              "and to tp1:", toks[(tp, mode, "after")] == toks[("tp1", mode, "after")])
PY
