#!/bin/bash
# The bf16 forward's p from a degree-4 2^x (AFTER) against degree 7 (BEFORE):
# ROUNDS alternating runs of the bf16 forward, full and causal, L = 4096, H = 8,
# d = 128, one thread (GFLOP/s), then the accuracy of both (exp2_accuracy.py).
set -euo pipefail
ROUNDS=${ROUNDS:-4}
BEFORE=${BEFORE:?path of the binary before}
AFTER=${AFTER:?path of the binary after}
for mask in "" --causal; do
  for b in before after; do echo -n "bf16 ${mask:-full} $b:" > "/tmp/exp2_$b${mask}"; done
  for r in $(seq "$ROUNDS"); do
    for b in before after; do
      bin=$BEFORE; [ $b = after ] && bin=$AFTER
      # shellcheck disable=SC2086
      g=$("$bin" attention --seq 4096 --heads 8 --dim 128 --dtype bf16 --threads 1 $mask --json |
        /usr/bin/python3 -c "import json,sys; print(round(json.load(sys.stdin)['forward']['gflops'], 1))")
      echo -n " $g" >> "/tmp/exp2_$b${mask}"
    done
  done
  for b in before after; do cat "/tmp/exp2_$b${mask}"; echo; done
done
/usr/bin/python3 "$(dirname "$0")/exp2_accuracy.py" "$BEFORE" "$AFTER"
