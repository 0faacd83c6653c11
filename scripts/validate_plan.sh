#!/bin/bash
# Validates the performance model on this machine (docs/benchmarks.md, "The
# performance model"): calibrates this machine (~/.config/ringattn/this-machine.json), measures every
# `compare` method at three sequence lengths on 2 ranks (batch 2) and on 4 ranks
# (batch 4, time-sharing the 2 cores), prints predicted vs measured, then
# calibrates again into OUT/after.json and prints the summary against that too
# (how much the machine drifted while the runs took place).
# With REPEATS=n every configuration is measured n times (the rounds one after
# the other, so drift of the machine spreads over all of them) and each figure is
# compared by its median over the rounds (`plan --validate` merges repeated runs).
# Run it on a quiet machine (no builds): ~20 minutes per round on 2 cores.
# Usage: [REPEATS=n] scripts/validate_plan.sh [build/release/ringattn] [out-dir]
set -euo pipefail
bin=${1:-build/release/ringattn}
out=${2:-build/plan-validation}
repeats=${REPEATS:-1}
mkdir -p "$out"
"$bin" plan --calibrate >/dev/null
for round in $(seq 1 "$repeats"); do
  for ranks in 2 4; do
    batch=$ranks
    for seq in 2048 4096 8192; do
      echo "compare: round $round/$repeats, $ranks ranks, seq $seq" >&2
      suffix=""
      [ "$repeats" -gt 1 ] && suffix="_r$round"
      "$bin" compare --ranks "$ranks" --batch "$batch" --seq "$seq" \
        --json-out "$out/compare_p${ranks}_l${seq}${suffix}.json" >/dev/null
    done
  done
done
"$bin" plan --calibrate --out "$out/after.json" >/dev/null
"$bin" plan --validate "$out"/compare_p*.json | tee "$out/validate.txt"
echo "--- against the calibration taken after the runs ($out/after.json):"
"$bin" plan --hardware "$out/after.json" --validate "$out"/compare_p*.json | tail -n 11 | tee "$out/validate_after.txt"
