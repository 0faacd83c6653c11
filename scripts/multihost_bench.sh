#!/usr/bin/env bash
# `ringattn compare` across 4 hosts on one machine (tests/multihost/netns.sh:
# network namespaces, Open MPI over TCP) with the links unlimited, then limited
# to 10 Gbit/s and 1 Gbit/s (tc tbf on every host's egress): how RA+SP, Ulysses,
# all-gather, TP and TP x PP degrade as the network slows. Needs root.
#   scripts/multihost_bench.sh [extra compare options]
# Writes build/multihost/compare_<rate>.json and prints one table.
set -euo pipefail
cd "$(dirname "$0")/.."
export RA_NET=${RA_NET:-79} OMP_NUM_THREADS=1
net=tests/multihost/netns.sh
$net check
trap '$net down' EXIT
mkdir -p build/multihost
for rate in none 10gbit 1gbit; do
  if [ "$rate" = none ]; then $net up 4; else $net up 4 "$rate"; fi
  echo "== links: $rate ==" >&2
  build/release/ringattn compare --ranks 4 --launcher "$($net launcher 4)" --seq 4096 --layers 2 --new-tokens 8 \
    --reps 2 "$@" --json-out "build/multihost/compare_$rate.json" >"build/multihost/compare_$rate.txt" \
    2>"build/multihost/compare_$rate.err"
done
/usr/bin/python3 - <<'PY'
import json
rates = ["none", "10gbit", "1gbit"]
runs = {r: {m["method"]: m for m in json.load(open(f"build/multihost/compare_{r}.json"))["methods"]} for r in rates}
print("| method | link | fwd tok/s | train tok/s | TPOT ms | fwd MiB/rank | train MiB/rank | train vs unlimited |")
print("|---|---|---|---|---|---|---|---|")
for name in runs["none"]:
    for r in rates:
        m = runs[r].get(name, {})
        if "failed" in m or "train_tokens_per_s" not in m:
            print(f"| {name} | {r} | {m.get('failed', m.get('skipped', 'not run'))[:60]} | | | | | |")
            continue
        base = runs["none"][name].get("train_tokens_per_s")
        ratio = m["train_tokens_per_s"] / base if base else float("nan")
        print(f"| {name} | {r} | {m['forward_tokens_per_s']:.0f} | {m['train_tokens_per_s']:.0f} | "
              f"{m['time_per_output_token_ms']:.2f} | {m['forward_bytes_per_rank']/2**20:.1f} | "
              f"{m['train_step_bytes_per_rank']/2**20:.1f} | {ratio:.2f} |")
PY
