#!/usr/bin/env bash
# Bad input and faults against the `ringattn` command (docs/reliability.md): each
# case must end with a non-zero exit (2 for a bad option, 1 for a failed run), a
# message naming the problem on stderr, no crash, no hang (every case runs under
# `timeout`), nothing lost; outputs go where the path points and never replace it.
#   usage: cli_faults_test.sh /path/to/ringattn
# Exit 0: pass; 1: failure; 77: skipped (no /usr/bin/python3 with numpy).
set -u

BIN=$(realpath "${1:?usage: cli_faults_test.sh /path/to/ringattn}")
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=/usr/bin/python3
if [[ ! -x $PY ]] || ! $PY -c 'import numpy' 2>/dev/null; then
  echo "SKIP: $PY with numpy is not available (Debian: apt-get install python3-numpy)"
  exit 77
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ringattn_faults.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK" || exit 1
MPIRUN=(mpirun --allow-run-as-root --oversubscribe --bind-to none --mca pml ob1 --mca btl self,vader)
LIMIT=60  # seconds any one case may take: more is a hang

failures=0 cases=0
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}

# expect_error NAME WANT_RC NEEDLE CMD...: exit WANT_RC (any non-zero: "nz"), stderr contains NEEDLE.
expect_error() {
  local name=$1 want=$2 needle=$3
  shift 3
  cases=$((cases + 1))
  timeout "$LIMIT" "$@" >err.out 2>err.log
  local rc=$?
  if [[ $rc -eq 124 ]]; then
    fail "$name: still running after $LIMIT s (a hang)"
  elif [[ $rc -eq 0 ]]; then
    fail "$name: exited 0"
  elif [[ $rc -ge 126 ]]; then
    fail "$name: crashed (exit $rc): $(head -c 600 err.log)"
  elif [[ $want != nz && $rc -ne $want ]]; then
    fail "$name: exit $rc, want $want: $(head -c 600 err.log)"
  elif ! grep -q -F -- "$needle" err.log; then
    fail "$name: exit $rc but stderr does not say '$needle': $(head -c 600 err.log)"
  else
    echo "ok: $name -> exit $rc: $(grep -m1 -F -- "$needle" err.log | cut -c1-160)"
  fi
}

# expect_ok NAME CMD...: exit 0 within the limit.
expect_ok() {
  local name=$1
  shift
  cases=$((cases + 1))
  if ! timeout "$LIMIT" "$@" >ok.out 2>ok.log; then
    fail "$name: failed: $(head -c 600 ok.log)"
    return 1
  fi
  echo "ok: $name"
}

$PY - <<'EOF'
import numpy as np
r = np.random.default_rng(7)
for n, s in [("q", (1, 32, 2, 16)), ("k", (1, 32, 2, 16)), ("v", (1, 32, 2, 16))]:
    np.save(n + ".npy", r.uniform(-1, 1, s).astype(np.float32))
np.save("zero.npy", np.zeros((1, 0, 2, 16), np.float32))
EOF
IN=(--q q.npy --k k.npy --v v.npy)

# --- 1. output paths: the target is written, never replaced; refused before compute ----
for isa in $("$BIN" info --json --no-measure | $PY -c 'import json,sys; print(" ".join(json.load(sys.stdin)["kernel_paths"]))'); do
  printf 'old' >"real_$isa.npy"
  chmod 600 "real_$isa.npy"
  ln -s "real_$isa.npy" "link_$isa.npy"
  expect_ok "--out through a symlink ($isa)" "$BIN" attention "${IN[@]}" --isa "$isa" --out "link_$isa.npy" || continue
  [[ -L link_$isa.npy ]] || fail "--out link_$isa.npy: the symlink was replaced by a regular file"
  $PY -c "import numpy as np; assert np.load('real_$isa.npy').shape == (1, 32, 2, 16)" ||
    fail "--out link_$isa.npy: the link's target does not hold the result"
  [[ $(stat -c %a "real_$isa.npy") == 600 ]] || fail "--out: mode 600 became $(stat -c %a "real_$isa.npy")"
done
mkfifo pipe
timeout "$LIMIT" cat pipe >pipe.bytes 2>/dev/null </dev/null &
expect_ok "--out a FIFO" "$BIN" attention "${IN[@]}" --out pipe
sleep 0.5
[[ -p pipe ]] || fail "--out pipe: the FIFO was replaced by a regular file"
[[ $(wc -c <pipe.bytes) -gt 0 ]] || fail "--out pipe: nothing came through the FIFO"
# The system's own /dev/null and /dev/stdout are never the targets here: a
# regression would replace them (as root it once did). A character device of the
# test's own (as root) and a link to this process's fd 1, as /dev/stdout is, stand in.
if mknod null c 1 3 2>/dev/null; then
  expect_ok "--out and --lse to a character device" "$BIN" attention "${IN[@]}" --out null --lse null
  [[ -c null ]] || fail "--out null: the character device was replaced by a regular file"
fi
ln -s /proc/self/fd/1 stdout_link
"$BIN" attention "${IN[@]}" --out stdout_link >stdout.npy 2>/dev/null || fail "--out to a link to fd 1 failed"
[[ -L stdout_link ]] || fail "--out stdout_link: the link was replaced by a regular file"
$PY -c "import numpy as np; assert np.load('stdout.npy').shape == (1, 32, 2, 16)" || fail "--out to fd 1: not the result"
# --- packed documents and windows: named errors, before any compute, on every rank ----
$PY -c "
import numpy as np
np.save('cu_dec.npy', np.array([0, 20, 10, 32], np.int32)); np.save('cu_end.npy', np.array([0, 8, 30], np.int64))
np.save('cu_2d.npy', np.array([[0, 32]], np.int32)); np.save('cu_first.npy', np.array([2, 32], np.int32))
np.save('cu_f32.npy', np.array([0, 32], np.float32))"
expect_error "--window without a comma" 1 "LEFT,RIGHT" "$BIN" attention "${IN[@]}" --window 7
expect_error "--window -2,0" 1 "LEFT,RIGHT" "$BIN" attention "${IN[@]}" --window -2,0
expect_error "--window 4,2 with --causal" 1 "causal" "$BIN" attention "${IN[@]}" --causal --window 4,2
expect_error "--cu-seqlens decreasing" 1 "must not decrease" "$BIN" attention "${IN[@]}" --cu-seqlens cu_dec.npy
expect_error "--cu-seqlens ending early" 1 "must end at the sequence length 32" "$BIN" attention "${IN[@]}" --cu-seqlens cu_end.npy
expect_error "--cu-seqlens not starting at 0" 1 "[0] must be 0" "$BIN" attention "${IN[@]}" --cu-seqlens cu_first.npy
expect_error "--cu-seqlens two-dimensional" 1 "one-dimensional" "$BIN" attention "${IN[@]}" --cu-seqlens cu_2d.npy
expect_error "--cu-seqlens float32" 1 "cu_f32.npy" "$BIN" attention "${IN[@]}" --cu-seqlens cu_f32.npy
expect_error "--cu-seqlens missing" 1 "nofile.npy" "$BIN" attention "${IN[@]}" --cu-seqlens nofile.npy
expect_error "--cu-seqlens-q without -k" 1 "go together" "$BIN" attention "${IN[@]}" --cu-seqlens-q cu_end.npy
expect_error "mpirun: --cu-seqlens decreasing, every rank" 1 "must not decrease" "${MPIRUN[@]}" -np 2 "$BIN" attention "${IN[@]}" --threads 1 --cu-seqlens cu_dec.npy
expect_error "mpirun: --cu-seqlens missing on rank 0" 1 "nofile.npy" "${MPIRUN[@]}" -np 2 "$BIN" attention --seq 32 --heads 2 --dim 16 --threads 1 --cu-seqlens nofile.npy
expect_error "mpirun: --cu-seqlens-q" 1 "self-attention" "${MPIRUN[@]}" -np 2 "$BIN" attention "${IN[@]}" --threads 1 --cu-seqlens-q cu_end.npy --cu-seqlens-k cu_end.npy
expect_error "--out X --lse X" 1 "same file" "$BIN" attention "${IN[@]}" --out o.npy --lse o.npy
expect_error "--out equal to the input --q" 1 "is the input --q" "$BIN" attention "${IN[@]}" --out q.npy
ln -s k.npy k_alias.npy
expect_error "--dq through a link to the input --k" 1 "is the input --k" "$BIN" attention "${IN[@]}" --dout q.npy --dq k_alias.npy
expect_error "--out a directory" 1 "is a directory" "$BIN" attention "${IN[@]}" --out .
expect_error "--out in a missing directory" 1 "does not exist" "$BIN" attention "${IN[@]}" --out nodir/o.npy
$PY -c "import numpy as np; assert np.load('q.npy').shape == (1, 32, 2, 16)" || fail "the input q.npy was damaged"

# --- 9. late failures: outputs are checked before computing ---------------------
start=$SECONDS
expect_error "--out nodir before a long compute" 1 "does not exist" "$BIN" attention --seq 16384 --heads 8 --dim 128 --out nodir/o.npy
((SECONDS - start < 5)) || fail "--out nodir/o.npy was refused only after $((SECONDS - start)) s (computed first)"
expect_error "plan --sliding-window --non-causal" 1 "needs causal attention" \
  "$BIN" plan --hardware h100-sxm --sliding-window 64 --non-causal
expect_error "plan --calibrate --out nodir/x.json" 1 "does not exist" "$BIN" plan --calibrate --out nodir/x.json
$PY -c "import numpy as np; np.save('cu_short.npy', np.array([0, 10, 100], np.int32))"
expect_error "plan --cu-seqlens not ending at --seq" 1 "cu-seqlens" "$BIN" plan --hardware h100-sxm --seq 1000 --cu-seqlens cu_short.npy
expect_error "compare --json-out nodir/x.json" 1 "does not exist" "$BIN" compare --json-out nodir/x.json
expect_error "plan --sweep --png nodir/x.png" 1 "does not exist" "$BIN" plan --hardware h100-sxm --sweep 1024 --png nodir/x.png

# --- 2. plan --validate on a comparison whose methods all failed ---------------------
cat >allfailed.json <<'EOF'
{"model": {"layers": 2, "d_model": 64, "heads": 4, "kv_heads": 4, "mlp_hidden": 256, "causal": true},
 "dtype": "fp32", "seq": 1024, "batch": 2, "ranks": 2,
 "methods": [{"method": "RA+SP (ring, zigzag)", "pp": 1, "sp": 2, "tp": 1, "failed": "killed"},
             {"method": "TP", "pp": 1, "sp": 1, "tp": 2, "failed": "killed"}]}
EOF
expect_error "plan --validate, every method failed" 1 "no measured method" "$BIN" plan --hardware h100-sxm --validate allfailed.json

# --- 3. thread counts -------------------------------------------------------------
expect_error "attention --threads 100000" 2 "more than 16 x" "$BIN" attention --seq 256 --threads 100000
expect_error "attention --threads 0" 2 "at least 1" "$BIN" attention --seq 256 --threads 0
expect_error "OMP_NUM_THREADS=100000" 2 "OMP_NUM_THREADS" env OMP_NUM_THREADS=100000 "$BIN" attention --seq 256
expect_error "OMP_NUM_THREADS=abc" 2 "OMP_NUM_THREADS" env OMP_NUM_THREADS=abc "$BIN" info --no-measure
for sub in "bench kernel" "train" "generate" "compare" "plan"; do
  expect_error "$sub --threads 100000" 2 "more than 16 x" "$BIN" $sub --threads 100000
done

# --- 4. timeouts: never "wait forever" by accident ----------------------------------
for v in -1 0 nan inf abc; do
  expect_error "attention --timeout $v" 2 "positive number of seconds" "$BIN" attention --seq 256 --timeout "$v"
done
for sub in train generate compare; do
  expect_error "$sub --timeout -1" 2 "positive number of seconds" "$BIN" $sub --timeout -1
done
expect_ok "attention --timeout none" "$BIN" attention --seq 64 --timeout none
if command -v mpirun >/dev/null; then
  expect_error "RINGATTN_TIMEOUT=-3 under mpirun" 1 "RINGATTN_TIMEOUT must be a positive" \
    env RINGATTN_TIMEOUT=-3 "${MPIRUN[@]}" -np 2 "$BIN" attention --seq 256 --strategy ring
  expect_error "RINGATTN_TIMEOUT=nan under mpirun" 1 "RINGATTN_TIMEOUT must be a positive" \
    env RINGATTN_TIMEOUT=nan "${MPIRUN[@]}" -np 2 "$BIN" attention --seq 256 --strategy ring
fi

# --- 5. a wrong or empty result exits non-zero ---------------------------------------
expect_error "compare: every method failed" 1 "methods failed" \
  "$BIN" compare --seq 64 --layers 1 --d-model 32 --heads 2 --launcher /bin/false --only ring
expect_error "train --lr 1e30 (diverges)" 1 "training diverged" \
  "$BIN" train --lr 1e30 --seq 128 --steps 2 --layers 1 --d-model 32 --heads 2
# train --save is checked before the first step: a file in the way, or the
# checkpoint trained from (its files would be replaced).
printf '%s\n' '{"model_type": "llama", "vocab_size": 256, "hidden_size": 16, "num_hidden_layers": 1,' \
  '"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32, "max_position_embeddings": 64}' \
  >tiny_llama.json
lm_train=(train --data "$SRC/README.md" --tokenizer byte --seq 16 --steps 1 --threads 1)
"$BIN" "${lm_train[@]}" --config tiny_llama.json --save ck_in >/dev/null 2>&1 || fail "train --config --save failed"
echo x >save_is_a_file
expect_error "train --save onto a file" 1 "cannot make the folder" \
  "$BIN" "${lm_train[@]}" --config tiny_llama.json --save save_is_a_file
cp ck_in/model.safetensors ck_before.safetensors
expect_error "train --save into the --model folder" 1 "is the input --model" \
  "$BIN" "${lm_train[@]}" --model ck_in --save ck_in
cmp -s ck_in/model.safetensors ck_before.safetensors || fail "train --save into the --model folder changed it"
# 7 ranks: 4 layers, 4 heads and a batch of 2 split no way over them, and 4 tokens give
# some of 7 SP ranks none (uneven shards take any length of at least one token each).
expect_error "plan --world 7 --seq 4 (no layout runs)" 1 "no parallel layout" "$BIN" plan --hardware h100-sxm --world 7 --seq 4
expect_error "plan --mesh that cannot run" 1 "cannot run" \
  "$BIN" plan --hardware h100-sxm --world 2 --heads 3 --d-model 96 --kv-heads 3 --mesh tp=2
if command -v mpirun >/dev/null; then
  expect_error "attention --check, ranks with different --seed (MPMD)" 1 "differs across ranks" \
    "${MPIRUN[@]}" -np 1 "$BIN" attention --seq 256 --strategy ring --check --seed 1 : \
    -np 1 "$BIN" attention --seq 256 --strategy ring --check --seed 2
  expect_error "ranks that differ only in --backward (MPMD)" 1 "differs across ranks" \
    "${MPIRUN[@]}" -np 1 "$BIN" attention --seq 256 --strategy ring --backward : \
    -np 1 "$BIN" attention --seq 256 --strategy ring
  expect_error "--out nodir under mpirun (every rank says so)" 1 "does not exist" \
    "${MPIRUN[@]}" -np 2 "$BIN" attention --seq 256 --strategy ring --out nodir/o.npy
  [[ $(grep -c "does not exist" err.log) -ge 2 ]] || fail "--out nodir under mpirun: not every rank reported it"
fi

# --- 7. invalid values are refused, never replaced by a default ------------------------
expect_error "--scale nan" 2 "positive, finite" "$BIN" attention --seq 64 --scale nan
expect_error "--scale inf" 2 "positive, finite" "$BIN" attention --seq 64 --scale inf
expect_error "--scale -1" 2 "positive, finite" "$BIN" attention --seq 64 --scale -1
expect_error "--kv-heads 0" 2 "at least 1" "$BIN" attention --seq 64 --kv-heads 0
expect_error "--kv-seq 0" 2 "at least 1" "$BIN" attention --seq 64 --kv-seq 0
expect_error "attention --seq -5" 2 "at least 1" "$BIN" attention --seq -5
expect_error "generate --capacity 0" 2 "at least 1" "$BIN" generate --capacity 0
expect_error "generate --capacity -5" 2 "at least 1" "$BIN" generate --capacity -5
expect_error "compare --ranks 0" 2 "at least 1" "$BIN" compare --ranks 0
expect_error "compare --config with --layers" 2 "excludes" "$BIN" compare --config "$SRC/tests/fixtures/hf/gpt2" --layers 2
expect_error "compare --config: not a config" 1 "config.json" "$BIN" compare --config "$WORK"
expect_error "compare --ranks -2" 2 "at least 1" "$BIN" compare --ranks -2
expect_error "plan --claim nan" 2 "positive, finite" "$BIN" plan --claim nan
expect_error "plan --nodes 0" 2 "at least 1" "$BIN" plan --nodes 0
expect_error "plan --png without --sweep" 2 "requires --sweep" "$BIN" plan --png x.png
expect_error "train --lr nan" 2 "positive, finite" "$BIN" train --lr nan
expect_error "train --lr -1" 2 "positive, finite" "$BIN" train --lr -1
expect_error "train --steps 0" 2 "at least 1" "$BIN" train --steps 0
expect_error "train --layers 0" 2 "at least 1" "$BIN" train --layers 0
expect_error "bench kernel --reps 0" 2 "at least 1" "$BIN" bench kernel --reps 0
expect_error "bench kernel --dim 0" 2 "at least 1" "$BIN" bench kernel --dim 0

# --- beyond the list: every subcommand's options once more --------------------------
mkdir adir
expect_error "--q a directory" 1 "not a regular file" "$BIN" attention --q adir --k k.npy --v v.npy
expect_error "plan --validate a directory" 1 "not a readable file" "$BIN" plan --hardware h100-sxm --validate adir
expect_error "plan --hardware a directory" 1 "adir" "$BIN" plan --hardware adir
expect_error "--seq 1e20 (beyond 64 bits, once saturated)" 2 "too large" "$BIN" plan --seq 100000000000000000000
expect_error "plan --seq 1e18 (too large to model)" 1 "too large to model" "$BIN" plan --hardware h100-sxm --seq 1000000000000000000
expect_error "train --seed -1 (once wrapped around)" 2 "whole number >= 0" "$BIN" train --seed -1
expect_error "attention --seed 1e30 digits" 2 "does not fit in 64 bits" "$BIN" attention --seed 99999999999999999999999
expect_error "generate --prompt-len 64,0" 2 "at least 1" "$BIN" generate --prompt-len 64,0
expect_error "generate --new-tokens 0" 2 "at least 1" "$BIN" generate --new-tokens 0
start=$SECONDS
expect_error "bench kernel --seq 1e11 (refused before the peaks)" 1 "needs at least" "$BIN" bench kernel --seq 100000000000
((SECONDS - start < 3)) || fail "bench kernel --seq 1e11 was refused only after $((SECONDS - start)) s"

# --- 8. messages that name the problem ----------------------------------------------------
expect_error "a .npy with a zero-sized dimension" 1 "must be at least 1" "$BIN" attention --q zero.npy --k k.npy --v v.npy
expect_error "train --batch 0" 2 "--batch: must be at least 1" "$BIN" train --batch 0
expect_error "forward with float ids" 1 "not supported here" \
  "$BIN" forward --model "$SRC/tests/fixtures/hf/gpt2" --ids zero.npy
expect_error "forward without --model" 2 "--model is required" "$BIN" forward --ids zero.npy
# The language-model commands: every bad combination named before any compute.
GPT2=$SRC/tests/fixtures/hf/gpt2
$PY -c "import numpy as np; np.save('ids.npy', np.arange(12, dtype=np.int64)); np.save('bad_ids.npy', np.array([3, 500]))"
expect_error "forward: a token id beyond the vocabulary" 1 "outside the vocabulary" \
  "$BIN" forward --model "$GPT2" --ids bad_ids.npy
expect_error "forward: not a checkpoint folder" 1 "config.json" "$BIN" forward --model "$WORK" --ids ids.npy
expect_error "forward --pp 2 on one rank" 1 "must equal the 1 ranks" "$BIN" forward --model "$GPT2" --ids ids.npy --pp 2
$PY -c "import numpy as np; np.save('pos_out.npy', np.array([3, 12])); np.save('pos_2d.npy', np.zeros((2, 2), np.int64))"
expect_error "forward --positions beyond the sequence" 1 "position 12 is outside the sequence of 12 tokens" \
  "$BIN" forward --model "$GPT2" --ids ids.npy --positions pos_out.npy
expect_error "forward --positions of shape [2, 2]" 1 "positions must be a non-empty [n] array" \
  "$BIN" forward --model "$GPT2" --ids ids.npy --positions pos_2d.npy
expect_error "forward --positions is --logits" 1 "--positions" \
  "$BIN" forward --model "$GPT2" --ids ids.npy --positions pos_out.npy --logits pos_out.npy
if command -v mpirun >/dev/null; then
  expect_error "mpirun: forward --positions beyond the sequence (every rank)" 1 "outside the sequence" \
    "${MPIRUN[@]}" -np 2 "$BIN" forward --model "$GPT2" --ids ids.npy --positions pos_out.npy --threads 1
  [[ $(grep -c "outside the sequence" err.log) -ge 2 ]] || fail "forward --positions under mpirun: not every rank said so"
fi
# train --documents: an EOS token is needed, and one no document contains.
cat >no_eos.json <<'EOF'
{"model_type": "llama", "vocab_size": 257, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
 "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 512}
EOF
sed 's/"vocab_size": 257/"vocab_size": 257, "eos_token_id": 32/' no_eos.json >eos_space.json
expect_error "train --documents without an EOS id" 1 "has no eos_token_id" \
  "$BIN" train --config no_eos.json --data "$SRC/README.md" --tokenizer byte --documents '' --seq 64
expect_error "train --documents whose EOS is a byte of the text" 1 "encodes to the end-of-sequence id 32" \
  "$BIN" train --config eos_space.json --data "$SRC/README.md" --tokenizer byte --documents '' --seq 64
expect_error "train --documents without --config" 2 "--documents requires" "$BIN" train --documents %
$PY -c "import numpy as np; np.save('holes.npy', np.array([[3, -1, 4]], dtype=np.int64)); np.save('blank.npy', np.array([[3, 4], [-1, -1]], dtype=np.int64))"
expect_error "generate --prompt-ids with an id after -1" 1 "after its -1 padding" \
  "$BIN" generate --model "$GPT2" --prompt-ids holes.npy
expect_error "generate --prompt-ids with an empty row" 1 "prompt 1 is empty" \
  "$BIN" generate --model "$GPT2" --prompt-ids blank.npy
expect_error "generate --model with two prompts" 1 "exactly one of --prompt" \
  "$BIN" generate --model "$GPT2" --prompt-ids ids.npy --prompt "hello"
expect_error "generate --model --layers (a vector-model option)" 2 "--layers excludes --model" \
  "$BIN" generate --model "$GPT2" --prompt-ids ids.npy --layers 2
expect_error "generate --prompt without --model" 2 "--prompt requires --model" "$BIN" generate --prompt "hello"
expect_error "generate --model: text without a tokenizer" 1 "needs a tokenizer" \
  "$BIN" generate --model "$GPT2" --prompt "hello"
expect_error "generate --model --greedy --top-k" 2 "excludes" \
  "$BIN" generate --model "$GPT2" --prompt-ids ids.npy --greedy --top-k 5
expect_error "generate --model --top-p 0" 1 "--top-p must be in (0, 1]" "$BIN" generate --model "$GPT2" --prompt-ids ids.npy --top-p 0
expect_error "generate --model: past gpt2's positions" 1 "learned positions" \
  "$BIN" generate --model "$GPT2" --prompt-ids ids.npy --new-tokens 100
expect_error "train --data without a model" 1 "--data trains a language model" "$BIN" train --data ids.npy
expect_error "train --model --config" 2 "excludes" "$BIN" train --model "$GPT2" --config x.json --data x
expect_error "train --model: the byte tokenizer beyond gpt2's 101 tokens" 1 "the tokenizer has 256 tokens" \
  "$BIN" train --model "$GPT2" --data "$SRC/README.md" --tokenizer byte --seq 16 --batch 1 --steps 1
echo '{"model_type": "llama", "vocab_size": 256, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
  "intermediate_size": 32}' >byte_llama.json
expect_error "train --config: a missing text" 1 "cannot read the training text" \
  "$BIN" train --config byte_llama.json --data missing.txt --tokenizer byte --seq 16 --batch 1 --steps 1
expect_error "train --config: a text too short for --seq" 1 "too few for --seq" \
  "$BIN" train --config byte_llama.json --data byte_llama.json --tokenizer byte --seq 512 --batch 1 --steps 1
if command -v mpirun >/dev/null; then
  expect_error "generate: Ulysses prefill with heads not divisible by P" 1 "--strategy ring" \
    "${MPIRUN[@]}" -np 2 "$BIN" generate --prompt-len 64 --new-tokens 2 --layers 1 --d-model 48 --heads 3 \
    --strategy ulysses
  expect_error "train: --ulysses without --strategy hybrid" 1 "--strategy hybrid" \
    "${MPIRUN[@]}" -np 2 "$BIN" train --seq 64 --layers 1 --d-model 32 --heads 2 --ulysses 2
  expect_error "generate: a mesh that does not match the ranks" 1 "must equal the 2 ranks" \
    "${MPIRUN[@]}" -np 2 "$BIN" generate --prompt-len 64 --new-tokens 2 --layers 1 --d-model 32 --heads 2 --sp 2 --tp 2
fi

echo "$cases cases, $failures failed"
[[ $failures -eq 0 ]]
