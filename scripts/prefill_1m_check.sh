#!/usr/bin/env bash
# The exactness check of a long prefill: a llama of 1 layer, d_model 64 (byte
# vocabulary; the config in docs/results/lm-2026-12-02/prefill_1m_config.json,
# weights from one training step on the README) runs `ringattn forward` over L
# random token ids on RANKS ranks (RA+SP, zigzag, one thread each) keeping the
# logits of 64 positions only (both ends, every zigzag chunk boundary, random
# ones); scripts/lm_reference.py computes the same 64 rows in float64 (keys and
# values of every position in chunks, queries and head at the 64 only).
#   usage: scripts/prefill_1m_check.sh OUTDIR [RANKS=8] [L=1048576]
# OUTDIR gets forward.json, time.txt (/usr/bin/time -v of mpirun), check.json.
set -euo pipefail
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${RINGATTN:-$SRC/build/release/ringattn}
OUT=${1:?usage: prefill_1m_check.sh OUTDIR [RANKS] [L]}
P=${2:-8}
L=${3:-1048576}
PY=/usr/bin/python3
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/prefill_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cp "$SRC/docs/results/lm-2026-12-02/prefill_1m_config.json" "$WORK/config.json"
"$BIN" train --config "$WORK/config.json" --data "$SRC/README.md" --tokenizer byte --seq 256 --steps 1 \
  --save "$WORK/ck" --threads 2 >"$WORK/train.txt"
$PY - "$WORK" "$L" "$P" <<'PYEOF'
import sys
import numpy as np
work, L, P = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
np.save(work + "/ids.npy", rng.integers(0, 256, L, dtype=np.int64))
edges = [c * L // (2 * P) for c in range(1, 2 * P)]  # zigzag chunk boundaries
pos = {0, 1, L - 2, L - 1} | {e - 1 for e in edges} | set(edges)
pos |= set(rng.choice(L, 64 - len(pos), replace=False).tolist())
np.save(work + "/pos.npy", np.array(sorted(pos)[:64], dtype=np.int64))
PYEOF
/usr/bin/time -v -o "$OUT/time.txt" mpirun --allow-run-as-root --oversubscribe --bind-to none -np "$P" "$BIN" forward \
  --model "$WORK/ck" --ids "$WORK/ids.npy" --positions "$WORK/pos.npy" --logits "$WORK/logits.npy" --threads 1 \
  --layout zigzag --timeout none --json >"$OUT/forward.json"
$PY "$SRC/scripts/lm_reference.py" "$WORK/ck" "$WORK/ids.npy" "$WORK/pos.npy" --check "$WORK/logits.npy" \
  | tee "$OUT/check.json"
