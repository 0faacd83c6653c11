#!/usr/bin/env bash
# A byte-level llama trained from scratch with RA+SP on a real text: Debian's
# `fortunes` package (the fortune-mod cookie files, about 2.5 MB of English),
# under mpirun on 2 ranks (the ring, zigzag layout), the last 5 % held out.
# Writes OUT/ (default docs/results/fortunes): train_log.json, loss.png, the
# checkpoint (not committed), and a sample from it.
# Usage: scripts/train_fortunes.sh [OUT] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/results/fortunes} steps=${2:-800}
bin=build/release/ringattn
[ -d /usr/share/games/fortunes ] || apt-get install -y -q fortunes >/dev/null
mkdir -p "$out"
corpus=$(mktemp /tmp/fortunes.XXXXXX.txt)
trap 'rm -f "$corpus"' EXIT
# The cookie files in name order (not the .dat indexes or the .u8 links).
find /usr/share/games/fortunes -maxdepth 1 -type f ! -name '*.dat' | sort | xargs cat >"$corpus"
cat >"$out/config.json" <<'JSON'
{"model_type": "llama", "vocab_size": 256, "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
 "num_key_value_heads": 2, "intermediate_size": 384, "max_position_embeddings": 1024, "rope_theta": 10000,
 "rms_norm_eps": 1e-5}
JSON
mpirun --allow-run-as-root --oversubscribe --bind-to none --mca pml ob1 --mca btl self,vader -np 2 \
  "$bin" train --config "$out/config.json" --data "$corpus" --tokenizer byte --batch 8 --seq 256 \
  --steps "$steps" --eval-every 50 --eval-windows 64 --lr 2e-3 --threads 1 --strategy ring --layout zigzag \
  --log "$out/train_log.json" --save /tmp/fortunes_ck | tee "$out/train.txt"
/usr/bin/python3 scripts/plot_training.py "$out/train_log.json" "$out/loss.png"
"$bin" generate --model /tmp/fortunes_ck --tokenizer byte --prompt "The " --new-tokens 300 --temperature 0.8 \
  --top-k 40 --seed 1 | tee "$out/sample.txt"
