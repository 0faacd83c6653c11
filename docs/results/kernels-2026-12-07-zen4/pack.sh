#!/bin/bash
# The kernels' operand packs rearranged in registers (AFTER) against the scalar
# widen-round-scatter loops (BEFORE): ROUNDS alternating `bench kernel` runs
# (L = 4096, H = 8, d = 128), each one-thread row's ratio to the peak of its run,
# then the median and best of each row (NO_BACKWARD=1: forward rows only). Also checks that both binaries give
# bit-identical outputs and gradients (bf16 and fp32, odd shapes).
set -euo pipefail
ROUNDS=${ROUNDS:-5}
BEFORE=${BEFORE:?path of the binary before}
AFTER=${AFTER:?path of the binary after}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for b in before after; do
  bin=$BEFORE; [ $b = after ] && bin=$AFTER
  for m in "" --causal; do
    for dt in bf16 fp32; do
      # shellcheck disable=SC2086
      "$bin" attention --seq 1000 --heads 4 --kv-heads 2 --dim 80 --dtype $dt $m --backward --out "$out/o_$b$dt$m.npy" \
        --lse "$out/l_$b$dt$m.npy" --dq "$out/dq_$b$dt$m.npy" --dk "$out/dk_$b$dt$m.npy" --dv "$out/dv_$b$dt$m.npy" \
        --json > /dev/null
    done
  done
done
for f in o l dq dk dv; do for dt in bf16 fp32; do for m in "" --causal; do
  cmp "$out/${f}_before$dt$m.npy" "$out/${f}_after$dt$m.npy"
done; done; done
echo "outputs and gradients bit-identical"
for r in $(seq "$ROUNDS"); do
  for b in before after; do
    bin=$BEFORE; [ $b = after ] && bin=$AFTER
    # shellcheck disable=SC2046
    "$bin" bench kernel --no-unfused $([ "${NO_BACKWARD:-0}" = 1 ] && echo --no-backward) --json > "$out/$b-$r.json" 2> /dev/null
  done
done
/usr/bin/python3 - "$out" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
rows = {}
for b in ("before", "after"):
    for r in range(1, rounds + 1):
        for x in json.load(open(f"{out}/{b}-{r}.json"))["rows"]:
            if x["threads"] == 1:
                key = (x["dtype"], "causal" if x["causal"] else "full", x["pass"])
                rows.setdefault(key, {}).setdefault(b, []).append(x["peak_ratio"])
print("dtype mask   pass      before: runs | median best          after: runs | median best")
for k, v in rows.items():
    cell = lambda xs: " ".join(f"{x:.3f}" for x in xs) + f" | {statistics.median(xs):.3f} {max(xs):.3f}"
    print(f"{k[0]}  {k[1]:6} {k[2]:8}  {cell(v['before'])}    {cell(v['after'])}")
PY
