#!/usr/bin/env bash
# Where the GPU model's time goes: Nsight Systems over `train --device cuda` and
# `generate --device cuda` (the build of scripts/build_gpu.sh), summarised per
# kernel and per CUDA API call. Run on the GPU machine; writes to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
BUILD=${BUILD:-build/gpu}
libdirs=$(pwd)/.devlibs
for lib in libnccl.so.2 libcublas.so.13 libcublasLt.so.13; do
  f=$(find / -xdev -name "$lib" -not -path '/proc/*' 2>/dev/null | head -1)
  [ -n "$f" ] && libdirs="$libdirs:$(dirname "$f")"
done
export LD_LIBRARY_PATH="$libdirs:${LD_LIBRARY_PATH:-}"
NSYS=$(command -v nsys || find / -xdev -name nsys -type f -perm -u+x -not -path '/proc/*' 2>/dev/null | head -1)
[ -n "$NSYS" ] || { echo "no nsys on this machine"; exit 1; }
model="--dtype bf16 --layers 4 --d-model 2048 --heads 16 --mlp 8192"
for run in train generate; do
  if [ $run = train ]; then args="train --device cuda $model --seq 16384 --steps 2 --lr 1e-4"
  else args="generate --device cuda $model --prompt-len 16384 --new-tokens 32"; fi
  rm -f "/tmp/$run.nsys-rep"
  timeout 240 "$NSYS" profile -t cuda -o "/tmp/$run" --force-overwrite true "$BUILD/ringattn" $args >"$OUT/$run.txt" 2>&1
  echo "$run exit $?"
  grep -E "tokens/s|per output" "$OUT/$run.txt"
  for r in cuda_gpu_kern_sum cuda_api_sum; do
    "$NSYS" stats -q -r $r -f csv "/tmp/$run.nsys-rep" 2>/dev/null >"$OUT/${run}_$r.csv"
    echo "== $run $r (top 14 by total time)"
    head -15 "$OUT/${run}_$r.csv" | cut -c1-220
  done
done
