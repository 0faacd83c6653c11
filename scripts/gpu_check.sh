#!/usr/bin/env bash
# The GPU check, run on a machine with an NVIDIA GPU from a build made elsewhere
# (scripts/build_gpu.sh): the CUDA tests, then `bench kernel --device cuda`, then
# the transformer on the GPU (`train` and `generate --device cuda`).
# Finds NCCL and cuBLAS wherever the machine has them (CUDA toolkit or the
# nvidia-* Python wheels) and the host libraries carried in .devlibs/: the
# Debian libraries the build links (oneDNN, Open MPI, OpenMP, ...) that a bare GPU
# machine lacks, copied there on the build machine before the tree is carried over:
#   mkdir -p .devlibs && ldd build/gpu/ringattn build/gpu/tests/ringattn_cuda_tests |
#     awk '$3 ~ /^\/usr\/lib/ {print $3}' | sort -u | xargs -r cp -L -t .devlibs
# Writes logs to $OUT (or ./gpu-out), packed into one gpu-logs.tgz at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
BUILD=${BUILD:-build/gpu}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
libdirs=$(pwd)/.devlibs
for lib in libnccl.so.2 libcublas.so.13 libcublasLt.so.13; do
  f=$(find / -xdev -name "$lib" -not -path '/proc/*' 2>/dev/null | head -1)
  [ -n "$f" ] && libdirs="$libdirs:$(dirname "$f")" && echo "found $f"
done
export LD_LIBRARY_PATH="$libdirs:${LD_LIBRARY_PATH:-}"
ldd "$BUILD/tests/ringattn_cuda_tests" | grep "not found" && echo "MISSING LIBRARIES"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# The Hopper forward must run on the warpgroup tensor-core path: HGMMA in its machine code.
if command -v cuobjdump >/dev/null; then
  cuobjdump --dump-sass "$BUILD/ringattn" 2>/dev/null |
    awk '/Function :/ {f=$3} /HGMMA/ {n[f]++} END {for (k in n) print n[k], "HGMMA in", k}' | tee "$OUT/hgmma.txt"
fi
# The wgmma building blocks, the kernels (the default forward: wgmma on Hopper),
# the kernels again with the portable forward, then the ring and NCCL (a hang
# there must not hide the kernels' results).
for part in ${TEST_PARTS:-wgmma:'CudaWgmma.*' kernels:'Shapes/*:CudaKernelRange.*:CudaMerge.*:CudaErrors.*' \
  model:'CudaLayers.*:CudaModel.*' portable:'Shapes/*' ring:'CudaRing.*:CudaNccl.*'}; do
  name=${part%%:*}
  fwd=auto
  [ "$name" = portable ] && fwd=portable
  RINGATTN_CUDA_FORWARD=$fwd timeout ${TEST_TIMEOUT:-180} stdbuf -oL -eL "$BUILD/tests/ringattn_cuda_tests" \
    --gtest_filter="${part#*:}" >"$OUT/tests_$name.log" 2>&1
  rc=$?
  echo "tests $name (forward $fwd) exit $rc"
  grep -E "^\[ (ring|model|decode)|FAILED|PASSED|SKIPPED|rror|Failure|err |expected" "$OUT/tests_$name.log" |
    head -40
  if [ $rc = 124 ]; then
    echo "a hang: the remaining parts would hang too"
    tail -5 "$OUT/tests_$name.log"
    exit 1
  fi
done
# Speed: the default forward at each head dim, then the portable one at d = 128.
for run in ${BENCH_RUNS-auto:128 auto:64 portable:128}; do  # BENCH_RUNS="": none
  fwd=${run%%:*} d=${run#*:}
  extra=""
  [ "$fwd" = portable ] && extra="--no-backward --ring-ranks 0"
  RINGATTN_CUDA_FORWARD=$fwd timeout ${BENCH_TIMEOUT:-180} "$BUILD/ringattn" bench kernel --device cuda \
    --seq ${BENCH_SEQ:-16384} --heads ${BENCH_HEADS:-16} --dim "$d" --reps 10 $extra >"$OUT/bench_${fwd}_d$d.txt" 2>&1
  echo "bench $fwd d=$d exit $?"
  grep -v "^measuring\|^timing" "$OUT/bench_${fwd}_d$d.txt"
done
if [ -n "${SANITIZE:-}" ] && command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    timeout ${SANITIZE_TIMEOUT:-120} compute-sanitizer --tool $tool --error-exitcode 9 \
      "$BUILD/tests/ringattn_cuda_tests" --gtest_filter="${SANITIZE_FILTER:-Shapes/*B2_Lq77*bf16_causal_ofp32:CudaMerge.*}" \
      >"$OUT/sanitize_$tool.log" 2>&1
    echo "compute-sanitizer $tool exit $?"
    grep -E "ERROR SUMMARY|Invalid|Race|PASSED|FAILED" "$OUT/sanitize_$tool.log" | head -8
  done
fi
# The transformer on the GPU (bf16, one rank): a training step and generation at
# a long sequence, then a small generation checked against the CPU model.
model="--dtype bf16 --layers 4 --d-model 2048 --heads 16 --mlp 8192"
if [ "${MODEL_RUNS:-1}" = 1 ]; then
  timeout ${MODEL_TIMEOUT:-240} "$BUILD/ringattn" train --device cuda $model --seq ${MODEL_SEQ:-16384} --steps 5 \
    --lr ${MODEL_LR:-1e-4} \
    >"$OUT/train.txt" 2>&1
  echo "train exit $?"
  cat "$OUT/train.txt"
  timeout ${MODEL_TIMEOUT:-240} "$BUILD/ringattn" generate --device cuda $model --prompt-len ${MODEL_SEQ:-16384} \
    --new-tokens 64 >"$OUT/generate.txt" 2>&1
  echo "generate exit $?"
  cat "$OUT/generate.txt"
  timeout 120 "$BUILD/ringattn" generate --device cuda --dtype bf16 --layers 2 --d-model 256 --heads 2 \
    --prompt-len 512 --new-tokens 8 --check >"$OUT/generate_check.txt" 2>&1
  echo "generate --check exit $?"
  tail -3 "$OUT/generate_check.txt"
fi
(cd "$OUT" && tar czf /tmp/gpu-logs.tgz --exclude gpu-logs.tgz . && rm -f ./*.txt ./*.log && mv /tmp/gpu-logs.tgz .)
