#!/usr/bin/env bash
# `ringattn train --save` writes checkpoints Hugging Face transformers loads, with
# the logits ringattn gives: every architecture of the committed fixtures
# (tests/fixtures/hf: llama untied and tied, qwen2, gpt2, mistral and qwen2 with
# sliding windows), their configs with a byte vocabulary, trained two steps on
# the README from the seed, saved, then scripts/check_hf_roundtrip.py.
#   usage: hf_roundtrip.sh /path/to/ringattn /path/to/python-with-transformers
# Exit 0: pass; 1: failure; 77: skipped (no torch/transformers in that Python).
set -euo pipefail
BIN=${1:?usage: hf_roundtrip.sh /path/to/ringattn /path/to/python}
PY=${2:?usage: hf_roundtrip.sh /path/to/ringattn /path/to/python}
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if ! "$PY" -c 'import torch, transformers' 2>/dev/null; then
  echo "SKIP: $PY has no torch and transformers"
  exit 77
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ringattn_hf_roundtrip.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
checkpoints=()
for fx in "$SRC"/tests/fixtures/hf/*/; do
  name=$(basename "$fx")
  "$PY" -c 'import json, sys; c = json.load(open(sys.argv[1])); c["vocab_size"] = 256; json.dump(c, open(sys.argv[2], "w"))' \
    "$fx/config.json" "$WORK/$name.json"
  if ! "$BIN" train --config "$WORK/$name.json" --data "$SRC/README.md" --tokenizer byte --batch 2 --seq 32 --steps 2 \
    --lr 1e-3 --threads 1 --save "$WORK/$name" >"$WORK/train.out" 2>&1; then
    echo "FAIL: train --config $name --save: $(tail -3 "$WORK/train.out")"
    exit 1
  fi
  checkpoints+=("$WORK/$name")
done
[[ ${#checkpoints[@]} -ge 6 ]] || { echo "FAIL: only ${#checkpoints[@]} fixtures found"; exit 1; }
"$PY" "$SRC/scripts/check_hf_roundtrip.py" --ringattn "$BIN" "${checkpoints[@]}"
