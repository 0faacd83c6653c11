#!/bin/bash
# Forward work items head by head (AFTER) against the order by cost alone
# (BEFORE): causal forward, H = 8, d = 128, one thread, L = 4096 and 8192, fp32
# and bf16, ROUNDS runs of one binary then of the other. Prints forward GFLOP/s
# per run (order.txt).
set -euo pipefail
ROUNDS=${ROUNDS:-3}
BEFORE=${BEFORE:?path of the binary before}
AFTER=${AFTER:?path of the binary after}
for L in 4096 8192; do
  for dt in fp32 bf16; do
    for b in before after; do
      bin=$BEFORE; [ $b = after ] && bin=$AFTER
      line="L=$L $dt $b:"
      for r in $(seq "$ROUNDS"); do
        g=$("$bin" attention --seq $L --heads 8 --dim 128 --causal --threads 1 --dtype $dt --json 2>/dev/null |
          /usr/bin/python3 -c "import json,sys; print(round(json.load(sys.stdin)['forward']['gflops'], 1))")
        line="$line $g"
      done
      echo "$line"
    done
  done
done
