#!/usr/bin/env bash
# One command on a fresh Debian 12 machine: install what is missing, build, and run
# the main job: the paper's comparison on a language model (`ringattn compare
# --config examples/llama_compare.json`: RA+SP vs Ulysses, all-gather, TP, PP on
# the local ranks, ids in, next-token loss out) with its chart. Extra arguments go
# to `ringattn compare` (e.g. ./run.sh --seq 16384 --ranks 4).
set -euo pipefail
cd "$(dirname "$0")"
scripts/install_deps.sh
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc)"
./build/release/ringattn info --no-measure
echo "== ring attention on 2 local ranks, checked against one rank =="
mpirun --allow-run-as-root --oversubscribe --bind-to none --mca btl self,vader -np 2 \
  ./build/release/ringattn attention --strategy ring --layout zigzag --seq 4096 --heads 8 --dim 128 \
  --causal --backward --check --threads 1
echo "== long-context inference on 2 local ranks: prefill into a sequence-sharded KV cache, decode, checked =="
mpirun --allow-run-as-root --oversubscribe --bind-to none --mca btl self,vader -np 2 \
  ./build/release/ringattn generate --prompt-len 4096 --new-tokens 16 --check --threads 1
echo "== a Hugging Face checkpoint (tests/fixtures/hf/llama_gqa, tiny random llama) under RA+SP on 2 ranks: greedy from the sharded KV cache, checked =="
/usr/bin/python3 -c "import numpy, json; numpy.save('build/prompt.npy', numpy.array(json.load(open('tests/fixtures/hf/llama_gqa/reference.json'))['prompt'], dtype=numpy.int64))"
mpirun --allow-run-as-root --oversubscribe --bind-to none --mca btl self,vader -np 2 \
  ./build/release/ringattn generate --model tests/fixtures/hf/llama_gqa --prompt-ids build/prompt.npy \
  --new-tokens 10 --ignore-eos --check --threads 1
echo "== the comparison: a llama of 4 layers, d_model 256 (4 heads x 64, 2 kv heads), SwiGLU 688, vocabulary 32000, batch 2 x seq 8192 =="
./build/release/ringattn compare --config examples/llama_compare.json --seq 8192 --json-out build/compare.json "$@"
/usr/bin/python3 scripts/plot_compare.py build/compare.json build/compare.png >/dev/null
echo "chart written to $(pwd)/build/compare.png"
