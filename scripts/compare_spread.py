#!/usr/bin/python3
"""Run-to-run spread of `ringattn compare` measurements: the noise floor a
performance model's validation error cannot get under.

Usage: scripts/compare_spread.py DIR1 DIR2 [DIR ...]
Each DIR holds compare_*.json files of the same commands (e.g. the run*/ folders
of docs/results/plan-*/). For every figure measured in two or more of them
(forward and training tokens/s, time per output token of each method, rank count
and sequence length) it prints the largest pairwise difference |b - a| / a, the
figures above 30 %, and the median and maximum per metric. Standard library only.
"""
import glob
import json
import os
import statistics
import sys

METRICS = ["forward_tokens_per_s", "train_tokens_per_s", "time_per_output_token_ms"]


def main(dirs):
    if len(dirs) < 2:
        sys.exit(__doc__)
    figures = {}
    for d in dirs:
        files = sorted(glob.glob(os.path.join(d, "compare_*.json")))
        if not files:
            sys.exit(f"{d}: no compare_*.json files")
        for f in files:
            with open(f) as fh:
                run = json.load(fh)
            for m in run["methods"]:
                for k in METRICS:
                    if m.get(k):  # a method may lack a figure (or measure 0)
                        figures.setdefault((run["ranks"], run["seq"], m["method"], k), {})[d] = m[k]
    spread = []
    for key, by_dir in figures.items():
        vals = list(by_dir.values())
        if len(vals) >= 2:
            spread.append((max(abs(b - a) / a for a in vals for b in vals), key, by_dir))
    if not spread:
        sys.exit("no figure was measured in two of the folders")
    spread.sort(reverse=True)
    print(f"{len(spread)} figures measured in 2+ runs; largest pairwise difference per figure:")
    print(f"  median {100 * statistics.median(s for s, _, _ in spread):.1f} %, "
          f"> 30 %: {sum(s > 0.30 for s, _, _ in spread)}, > 20 %: {sum(s > 0.20 for s, _, _ in spread)}")
    for k in METRICS:
        s = [x for x, key, _ in spread if key[3] == k]
        if not s:
            continue
        print(f"  {k}: median {100 * statistics.median(s):.1f} %, max {100 * max(s):.0f} %, "
              f"> 30 %: {sum(x > 0.30 for x in s)} of {len(s)}")
    print("above 30 %:")
    for s, (ranks, seq, method, k), by_dir in spread:
        if s <= 0.30:
            break
        vals = ", ".join(f"{os.path.basename(os.path.normpath(d))} {v:.4g}" for d, v in by_dir.items())
        print(f"  {100 * s:4.0f} %  {ranks} ranks, seq {seq}, {method}, {k}: {vals}")


if __name__ == "__main__":
    main(sys.argv[1:])
