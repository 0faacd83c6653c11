#!/bin/bash
# bench lm (the llama of docs/results/lm-2026-12-02/bench_config.json, 8192-token
# prefill, 16 new tokens, one process), the binary before (BEFORE) and after
# (AFTER) alternately: ROUNDS rounds in bf16, then ROUNDS in fp32. Writes
# {before,after}_{bf16,fp32}_N.txt and prints each prefill / decode line.
set -euo pipefail
ROUNDS=${ROUNDS:-3}
BEFORE=${BEFORE:?path of the binary before}
AFTER=${AFTER:?path of the binary after}
CFG=$(dirname "$0")/../lm-2026-12-02/bench_config.json
for dt in bf16 fp32; do
  for r in $(seq "$ROUNDS"); do
    for b in before after; do
      bin=$BEFORE; [ $b = after ] && bin=$AFTER
      "$bin" bench lm --config "$CFG" --seq 8192 --new-tokens 16 --dtype $dt > "${b}_${dt}_$r.txt" 2>/dev/null
      echo "$b $dt $r: $(grep -E '^(prefill|decode)' "${b}_${dt}_$r.txt" | tr -s ' ' | tr '\n' ' ')"
    done
  done
done
