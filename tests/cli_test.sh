#!/usr/bin/env bash
# End-to-end smoke test of the `ringattn` command against a NumPy float64 reference.
#   usage: cli_test.sh /path/to/ringattn [local|mpi|all]
# local: the cases on one process; mpi: those under mpirun (CTest runs the two
# parts as separate tests, so only the second waits for the MPI lock); all (default).
# Exit 0: pass; 1: failure; 77: skipped (no /usr/bin/python3 with numpy).
set -u

BIN=${1:?usage: cli_test.sh /path/to/ringattn [local|mpi|all]}
PART=${2:-all}
PY=/usr/bin/python3
part() { [[ $PART == all || $PART == "$1" ]]; }
if [[ $PART != local && $PART != mpi && $PART != all ]]; then
  echo "FAIL: the part must be local, mpi or all, got '$PART'"
  exit 1
fi

if [[ ! -x $PY ]] || ! $PY -c 'import numpy' 2>/dev/null; then
  echo "SKIP: $PY with numpy is not available (Debian: apt-get install python3-numpy)"
  exit 77
fi
if [[ ! -x $BIN ]]; then
  echo "FAIL: $BIN is not an executable"
  exit 1
fi

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ringattn_cli.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK" || exit 1

failures=0
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}

# --- inputs and reference ----------------------------------------------------
cat >ref.py <<'EOF'
import json, sys
import numpy as np

def positions(Lq, Lk, cu):
    """Query/key positions and document ids: bottom-right aligned, restarting in
    each document of cu (flash-attn's cu_seqlens; None: one document)."""
    if cu is None:
        return np.arange(Lq) + (Lk - Lq), np.arange(Lk), np.zeros(Lq, int), np.zeros(Lk, int)
    qp, kp, qd, kd = [], [], [], []
    for n in range(len(cu) - 1):
        lq = lk = cu[n + 1] - cu[n]
        qp += list(np.arange(lq) + lk - lq); kp += list(np.arange(lk)); qd += [n] * lq; kd += [n] * lk
    return np.array(qp, int), np.array(kp, int), np.array(qd, int), np.array(kd, int)

def reference(q, k, v, causal, dout=None, scale=None, window=(-1, -1), cu=None):
    """Exact attention in float64 with the semantics of attention.h:
    GQA head h -> h // (H // Hkv); causal bottom-right (q_pos = i + Lk - Lq);
    a window (left, right; -1 unbounded) and packed documents (cu_seqlens);
    rows with no visible key: o = 0, lse = -inf, no gradient."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    B, Lq, H, d = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    g = H // Hkv
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    kk, vv = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bihd,bjhd->bhij", q, kk) * scale
    qp, kp, qd, kd = positions(Lq, Lk, cu)
    off = kp[None, :] - qp[:, None]
    left, right = window[0], 0 if causal else window[1]
    mask = qd[:, None] == kd[None, :]
    if right >= 0: mask &= off <= right
    if left >= 0: mask &= -off <= left
    s = np.where(mask[None, None], s, -np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = s.max(axis=-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        e = np.exp(s - m)
        l = e.sum(axis=-1, keepdims=True)
        lse = np.where(l > 0, m + np.log(np.where(l > 0, l, 1.0)), -np.inf)[..., 0]
        p = np.where(l > 0, e / np.where(l > 0, l, 1.0), 0.0)
    o = np.einsum("bhij,bjhd->bihd", p, vv)
    out = {"o": o, "lse": lse}
    if dout is not None:
        dout = dout.astype(np.float64)
        D = np.einsum("bihd,bihd->bhi", dout, o)
        dv = np.einsum("bhij,bihd->bjhd", p, dout)
        dp = np.einsum("bihd,bjhd->bhij", dout, vv)
        ds = p * (dp - D[..., None])
        dq = scale * np.einsum("bhij,bjhd->bihd", ds, kk)
        dk = scale * np.einsum("bhij,bihd->bjhd", ds, q)
        out["dq"] = dq
        out["dk"] = dk.reshape(B, Lk, Hkv, g, d).sum(axis=3)
        out["dv"] = dv.reshape(B, Lk, Hkv, g, d).sum(axis=3)
    return out

def make(prefix, B, Lq, Lk, H, Hkv, d, seed):
    rng = np.random.default_rng(seed)
    u = lambda *s: rng.uniform(-1, 1, size=s).astype(np.float32)
    np.save(prefix + "q.npy", u(B, Lq, H, d))
    np.save(prefix + "k.npy", u(B, Lk, Hkv, d))
    np.save(prefix + "v.npy", u(B, Lk, Hkv, d))
    np.save(prefix + "do.npy", u(B, Lq, H, d))

def err(got, ref):
    """Normalized max error max|got-ref| / max|ref| (-inf must match exactly)."""
    if got.shape != ref.shape:
        return float("inf"), "shape %s != %s" % (got.shape, ref.shape)
    if np.isnan(got).any():
        return float("inf"), "NaN in output"
    ninf = np.isneginf(ref)
    if not np.array_equal(ninf, np.isneginf(got)):
        return float("inf"), "-inf entries differ"
    fin = ~ninf
    scale = max(np.abs(ref[fin]).max() if fin.any() else 0.0, 1e-30)
    e = (np.abs(got[fin].astype(np.float64) - ref[fin]).max() if fin.any() else 0.0) / scale
    return e, ""

def check(prefix, causal, names, tol=1e-5, window=(-1, -1), cu=None):
    q, k, v, do = (np.load(prefix + n + ".npy") for n in ("q", "k", "v", "do"))
    ref = reference(q, k, v, causal, do if "dq" in names else None, window=window, cu=cu)
    ok = True
    for n in names:
        got = np.load(prefix + n + ".npy")
        if got.dtype != np.float32:
            print("FAIL: %s%s.npy has dtype %s, want float32" % (prefix, n, got.dtype))
            ok = False
            continue
        e, why = err(got, ref[n])
        status = "ok" if e <= tol else "FAIL"
        print("%s: %s%s normalized error %.3g %s" % (status, prefix, n, e, why))
        ok &= e <= tol
    return ok

if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        make(sys.argv[2], *map(int, sys.argv[3:10]))
    elif cmd == "check":
        prefix, causal, names = sys.argv[2], sys.argv[3] == "1", sys.argv[4].split(",")
        window = tuple(map(int, sys.argv[5].split(","))) if len(sys.argv) > 5 else (-1, -1)
        cu = list(np.load(sys.argv[6])) if len(sys.argv) > 6 else None
        sys.exit(0 if check(prefix, causal, names, window=window, cu=cu) else 1)
    elif cmd == "json":
        with open(sys.argv[2]) as f:
            json.load(f)
    elif cmd == "nan":
        q = np.load(sys.argv[2])
        q.flat[q.size // 2] = np.nan
        np.save(sys.argv[3], q)
    elif cmd == "badshape":
        k = np.load(sys.argv[2])
        np.save(sys.argv[3], k[..., : k.shape[-1] - 1])
EOF

# run_case PREFIX CAUSAL(0/1) B Lq Lk H Hkv d SEED (the backward run repeats each pass: --reps 2)
run_case() {
  local p=$1 causal=$2
  shift 2
  $PY ref.py make "$p" "$@" || { fail "could not create inputs $p"; return; }
  local cflag=()
  [[ $causal == 1 ]] && cflag=(--causal)
  if ! "$BIN" attention --q "${p}q.npy" --k "${p}k.npy" --v "${p}v.npy" --out "${p}o.npy" --lse "${p}lse.npy" \
      "${cflag[@]}" >"${p}fwd.log" 2>&1; then
    fail "forward $p (causal=$causal) exited non-zero:"; cat "${p}fwd.log"; return
  fi
  $PY ref.py check "$p" "$causal" o,lse || fail "forward $p (causal=$causal) differs from the reference"
  if ! "$BIN" attention --q "${p}q.npy" --k "${p}k.npy" --v "${p}v.npy" --out "${p}o.npy" --lse "${p}lse.npy" \
      "${cflag[@]}" --dout "${p}do.npy" --dq "${p}dq.npy" --dk "${p}dk.npy" --dv "${p}dv.npy" --reps 2 \
      >"${p}bwd.log" 2>&1; then
    fail "backward $p (causal=$causal) exited non-zero:"; cat "${p}bwd.log"; return
  fi
  $PY ref.py check "$p" "$causal" o,lse,dq,dk,dv || fail "backward $p (causal=$causal) differs from the reference"
}

# --- shared by both parts: reference scripts, a small LM config, expect_error ---
cat >hf.py <<'EOF'
import json, struct, sys
import numpy as np

def safetensors(path):  # the format: 8-byte header length, JSON header, raw little-endian data
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    head = json.loads(b[8:8 + n])
    data = b[8 + n:]
    out = {}
    for name, e in head.items():
        if name == "__metadata__":
            continue
        assert e["dtype"] == "F32"
        lo, hi = e["data_offsets"]
        out[name] = np.frombuffer(data[lo:hi], dtype="<f4").reshape(e["shape"])
    return out

cmd, fixture = sys.argv[1], sys.argv[2]
ref = json.load(open(fixture + "/reference.json"))
n = int(sys.argv[4]) if len(sys.argv) > 4 else None  # the first n tokens (causal: their logits are the same)
if cmd == "ids":
    np.save(sys.argv[3], np.array(ref["ids"], dtype=np.int64)[:, :n])
else:
    want = safetensors(fixture + "/reference.safetensors")["logits"].astype(np.float64)[:, :n]
    if len(sys.argv) > 5:  # forward --positions: the rows at these positions
        want = want[:, np.load(sys.argv[5])]
    got = np.load(sys.argv[3]).astype(np.float64)
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"{fixture.split('/')[-1]}: max |ringattn - transformers| / max = {err:.2e}")
    sys.exit(0 if got.shape == want.shape and err < 1e-4 else 1)
EOF

cat >greedy.py <<'EOF'
import json, sys
import numpy as np
ref = json.load(open(sys.argv[2] + "/reference.json"))
if sys.argv[1] == "prompt":
    np.save(sys.argv[3], np.array(ref["prompt"], dtype=np.int64))
else:
    got = np.load(sys.argv[3]).reshape(-1).tolist()
    print(f"{sys.argv[2].split('/')[-1]}: generated {got}, transformers {ref['greedy']}")
    sys.exit(0 if got == ref["greedy"] else 1)
EOF

# A byte-level llama from the seed (train, bench lm, the tokenizer cases).
cat >byte_llama.json <<'EOF'
{"model_type": "llama", "vocab_size": 256, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
 "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 512, "rope_theta": 10000}
EOF

# expect_error NAME CMD...
expect_error() {
  local name=$1
  shift
  "$@" >err.out 2>err.log
  local rc=$?
  if [[ $rc -eq 0 ]]; then
    fail "$name: exited 0"
  elif [[ $rc -ge 126 ]]; then
    fail "$name: crashed or did not run (exit $rc): $(cat err.log)"
  elif [[ ! -s err.log ]]; then
    fail "$name: exit $rc but nothing on stderr"
  else
    echo "ok: $name -> exit $rc: $(head -n 3 err.log)"
  fi
}

MPIRUN=(mpirun --allow-run-as-root --oversubscribe --bind-to none --mca pml ob1 --mca btl self,vader)

# ============================ one process ==============================
if part local; then
#          prefix causal B  Lq  Lk  H Hkv  d seed
run_case   a_     1      2  37  37  4  2   32  1
run_case   b_     0      1  20  45  4  1   64  2
run_case   c_     1      1  45  20  2  2   40  3   # Lq > Lk: bottom-right, 25 rows see no key
run_case   d_     1      1  16  50  8  4   16  4   # Lq < Lk

# --- help and info -------------------------------------------------------------
out=$("$BIN" --help 2>&1) || fail "ringattn --help exited non-zero"
[[ -n $out ]] || fail "ringattn --help printed nothing"
grep -q attention <<<"$out" || fail "ringattn --help does not mention the attention subcommand"
out=$("$BIN" attention --help 2>&1) || fail "ringattn attention --help exited non-zero"
grep -q -- "--q" <<<"$out" || fail "ringattn attention --help does not list --q"
if "$BIN" info --json >info.json 2>info.err; then
  $PY ref.py json info.json || fail "ringattn info --json is not valid JSON: $(head -c 500 info.json)"
else
  fail "ringattn info --json exited non-zero: $(cat info.err)"
fi

for sub in "train" "compare" "generate" "bench kernel" "bench layers"; do
  out=$("$BIN" $sub --help 2>&1) || fail "ringattn $sub --help exited non-zero"
  grep -q -- "--json" <<<"$out" || fail "ringattn $sub --help does not list --json"
done

# --- forward: a Hugging Face checkpoint's logits equal transformers' ------------------
for m in llama_gqa llama_tied_llama3 qwen2 gpt2 mistral_window qwen2_window; do
  fx=$SRC/tests/fixtures/hf/$m
  $PY hf.py ids "$fx" ids_$m.npy || { fail "could not write the ids of $m"; continue; }
  if "$BIN" forward --model "$fx" --ids ids_$m.npy --logits logits_$m.npy >forward_$m.out 2>&1; then
    $PY hf.py check "$fx" logits_$m.npy || fail "forward --model $m: logits differ from transformers'"
  else
    fail "ringattn forward --model $m exited non-zero: $(cat forward_$m.out)"
  fi
done

# A SentencePiece-style tokenizer.json (Llama 2's layout: byte fallback, Strip
# decoder): train one step on it, then generate streams the prompt and the new
# text exactly as --json reports the new text.
sed 's/"vocab_size": 256/"vocab_size": 600/' byte_llama.json >sp_llama.json
SPTOK="$SRC/tests/fixtures/tokenizers/llama2_style.json"
if "$BIN" train --config sp_llama.json --data "$SRC/README.md" --tokenizer "$SPTOK" --batch 1 --seq 32 --steps 1 \
  --threads 1 --save sp_ck >sp_train.out 2>&1; then
  gen_sp=(generate --model sp_ck --tokenizer "$SPTOK" --prompt "RA+SP über Ringe" --new-tokens 12 --threads 1)
  "$BIN" "${gen_sp[@]}" >gen_sp.out 2>&1 || fail "generate with a SentencePiece tokenizer: $(cat gen_sp.out)"
  "$BIN" "${gen_sp[@]}" --json >gen_sp.json 2>&1 || fail "generate --json with a SentencePiece tokenizer"
  $PY - gen_sp.out gen_sp.json <<'EOF' || fail "generate: the streamed text is not the prompt + the new text"
import json, sys
# the random model may stream bytes that are not UTF-8: compared without them
out = open(sys.argv[1], encoding="utf-8", errors="replace").read().replace("\ufffd", "")
j = json.load(open(sys.argv[2]))
assert len(j["new_tokens"][0]) == 12, j
sys.exit(0 if out.startswith("<s> RA+SP über Ringe" + j["text"].replace("\ufffd", "")) else 1)
EOF
else
  fail "train with a SentencePiece tokenizer.json exited non-zero: $(tail -3 sp_train.out)"
fi

"$BIN" bench lm --config byte_llama.json --seq 64 --new-tokens 3 --threads 1 --json >bench_lm.json 2>bench_lm.err &&
  $PY ref.py json bench_lm.json || fail "ringattn bench lm failed: $(tail -c 300 bench_lm.err)"
"$BIN" bench layers --tokens 64 --dim 256 --vocab 1000 --ce-rows 16 --reps 1 --json >bench_layers.json \
  2>bench_layers.err && $PY ref.py json bench_layers.json ||
  fail "ringattn bench layers failed: $(tail -c 300 bench_layers.err)"
"$BIN" forward --model "$SRC/tests/fixtures/hf/gpt2" --ids ids_gpt2.npy --json >forward.json 2>&1 &&
  $PY ref.py json forward.json || fail "ringattn forward --json is not valid JSON: $(head -c 300 forward.json)"


# --- generate on one rank (no mpirun): --check recomputes from scratch ----------
if "$BIN" generate --prompt-len 64,32 --new-tokens 12 --layers 2 --d-model 32 --heads 4 --kv-heads 2 \
  --check --json >gen.json 2>gen.err; then
  $PY ref.py json gen.json || fail "ringattn generate --json is not valid JSON: $(head -c 500 gen.json)"
  grep -q '"max_rel_error_vs_one_process"' gen.json || fail "generate --check --json has no error field"
else
  fail "ringattn generate --check exited non-zero: $(cat gen.err)"
fi

# --- errors: non-zero exit (not a crash) and a message on stderr ----------------
$PY ref.py badshape a_k.npy bad_k.npy
expect_error "wrong-shape k" "$BIN" attention --q a_q.npy --k bad_k.npy --v a_v.npy --out e.npy --lse el.npy
expect_error "missing file" "$BIN" attention --q no_such_file.npy --k a_k.npy --v a_v.npy --out e.npy --lse el.npy
$PY ref.py nan a_q.npy nan_q.npy
expect_error "NaN input" "$BIN" attention --q nan_q.npy --k a_k.npy --v a_v.npy --out e.npy --lse el.npy
printf 'not an npy file' >garbage.npy
expect_error "garbage file" "$BIN" attention --q garbage.npy --k a_k.npy --v a_v.npy --out e.npy --lse el.npy
expect_error "unknown subcommand" "$BIN" no-such-subcommand
expect_error "unknown option" "$BIN" attention --no-such-option
expect_error "KV cache too small" "$BIN" generate --prompt-len 64 --new-tokens 8 --capacity 66 --layers 1 --d-model 32 --heads 4
expect_error "prompt beyond the cache" "$BIN" generate --prompt-len 64 --new-tokens 1 --capacity 32 --layers 1 --d-model 32 --heads 4
expect_error "zero sequence length" "$BIN" attention --seq 0
expect_error "negative head dim" "$BIN" attention --dim -64
# Absurd sizes fail up front against the available memory, naming it (no allocation, no OOM kill).
expect_error "absurd sequence length" "$BIN" attention --seq 100000000000 --heads 8 --dim 128
grep -q "GiB available" err.log || fail "absurd sequence length: the error does not name the available memory: $(cat err.log)"
expect_error "absurd KV cache" "$BIN" generate --prompt-len 64 --capacity 1000000000000 --layers 1 --d-model 32 --heads 4
grep -q "GiB available" err.log || fail "absurd KV cache: the error does not name the available memory: $(cat err.log)"

# --- plan: the performance model over a built-in hardware file --------------------
paper=(--hardware h100-sxm --world 16 --layers 4 --d-model 8192 --heads 16 --mlp 32768 --seq 10000 --batch 1024 --dtype fp16)
if "$BIN" plan "${paper[@]}" --json >plan.json 2>plan.err; then
  $PY - plan.json <<'PYEOF' || fail "plan --json: $(cat plan.err)"
import json, sys
j = json.load(open(sys.argv[1]))
ls = j["layouts"]
assert len(ls) > 20, len(ls)
assert all(l["dp"] * l["pp"] * l["sp"] * l["tp"] == 16 for l in ls)
assert any(l["sp"] == 16 and l["strategy"] == "ring" for l in ls)
assert any(l["tp"] == 8 and l["pp"] == 2 for l in ls)
fit = [l["train_tokens_per_s"] for l in ls if l["fits_train"]]
assert fit == sorted(fit, reverse=True), "not ranked"
PYEOF
else
  fail "ringattn plan exited non-zero: $(cat plan.err)"
fi
"$BIN" plan "${paper[@]}" --mesh sp=16,layout=striped --mesh tp=8,pp=2 --claim 1.45e6 >plan.txt 2>&1 || fail "plan --mesh: $(cat plan.txt)"
# Packed documents: short ones make attention cheaper, and the busiest rank of
# zigzag (balanced for one document, not a mix) slower than striped.
$PY -c "import numpy as np; np.save('plan_cu.npy', np.array([0, 100, 6000, 6100, 10000], np.int32))"
"$BIN" plan "${paper[@]}" --mesh sp=16 --mesh sp=16,layout=striped --json >plan_one.json 2>plan.err ||
  fail "plan --mesh sp=16: $(cat plan.err)"
"$BIN" plan "${paper[@]}" --mesh sp=16 --mesh sp=16,layout=striped --cu-seqlens plan_cu.npy --json >plan_cu.json 2>plan.err ||
  fail "plan --cu-seqlens: $(cat plan.err)"
$PY - plan_one.json plan_cu.json <<'PYEOF' || fail "plan --cu-seqlens: documents do not change the prediction as they should"
import json, sys
one, cu = (json.load(open(f)) for f in sys.argv[1:])
assert one["documents"] == 1 and cu["documents"] == 4, (one["documents"], cu["documents"])
rate = lambda j, lay: next(l["train_tokens_per_s"] for l in j["layouts"] if l["sequence_layout"] == lay)
assert rate(cu, "zigzag") > rate(one, "zigzag"), "documents: no less attention work"
assert rate(cu, "striped") > rate(cu, "zigzag"), "documents: zigzag not the less balanced"
assert rate(one, "striped") == rate(one, "zigzag"), "one document: both balanced"
PYEOF
grep -q "RA+SP(16)" plan.txt && grep -q "TP(8) x PP(2)" plan.txt && grep -q "claim" plan.txt ||
  fail "plan --mesh --claim: missing rows: $(cat plan.txt)"
expect_error "plan: mesh of the wrong size" "$BIN" plan "${paper[@]}" --mesh sp=8
expect_error "plan: unknown mesh key" "$BIN" plan "${paper[@]}" --mesh sq=16
expect_error "plan: unknown hardware" "$BIN" plan --hardware no-such-gpu
grep -q "h100-sxm" err.log || fail "plan: unknown hardware: the error does not list the files: $(cat err.log)"
echo '{"name": "x", "devices_per_node": 0}' >bad_hw.json
expect_error "plan: bad hardware file" "$BIN" plan --hardware bad_hw.json

# The run-to-run spread of the committed validation runs (docs/benchmarks.md quotes it).
runs=$SRC/docs/results/plan-2026-11-26
$PY "$SRC/scripts/compare_spread.py" "$runs/run2" "$runs/run3" >spread.txt 2>&1 &&
  grep -q "108 figures measured in 2+ runs" spread.txt && grep -q "max 105 %" spread.txt ||
  fail "compare_spread.py: $(cat spread.txt)"
expect_error "compare_spread.py: one folder" "$PY" "$SRC/scripts/compare_spread.py" "$runs/run2"
fi

# ============================ under mpirun =============================
if part mpi; then
# --- packed documents and a sliding window: one process and under mpirun ---------
$PY -c "import numpy as np; np.save('cu.npy', np.array([0, 1, 3, 10, 41, 64], np.int32))"
$PY ref.py make w_ 1 64 64 4 4 32 5 || fail "could not create inputs w_"
for np_ in 1 2 3 4; do  # 64 tokens over 3 ranks: uneven shards (21-22 tokens)
  for strat in ring ulysses doc-zigzag doc-balanced; do  # doc-*: the ring on that layout
    run=("$BIN" attention)
    lay=zigzag s=$strat
    [[ $strat == doc-* ]] && lay=$strat s=ring
    [[ $np_ -gt 1 ]] && run=(mpirun --allow-run-as-root --oversubscribe --bind-to none --mca pml ob1 --mca btl self,vader -np "$np_" "$BIN" attention --strategy "$s" --layout "$lay" --threads 1)
    [[ $np_ -eq 1 && $strat != ring ]] && continue
    [[ $np_ -eq 3 && $strat == ulysses ]] && continue  # 4 heads do not split over 3 ranks
    if ! "${run[@]}" --q w_q.npy --k w_k.npy --v w_v.npy --dout w_do.npy --out w_o.npy --lse w_lse.npy \
        --dq w_dq.npy --dk w_dk.npy --dv w_dv.npy --causal --window 6,0 --cu-seqlens cu.npy --reps 2 >w.log 2>&1; then
      fail "attention --window 6,0 --cu-seqlens on $np_ rank(s) ($strat) exited non-zero: $(cat w.log)"
      continue
    fi
    $PY ref.py check w_ 1 o,lse,dq,dk,dv 6,0 cu.npy ||
      fail "attention --window 6,0 --cu-seqlens on $np_ rank(s) ($strat) differs from the reference"
  done
done

# Ranks started together divide the machine's CPUs unless OMP_NUM_THREADS chose.
threads_per_rank() {  # NP [VAR=VALUE...]: each rank's OpenMP threads (`info`), OMP_NUM_THREADS unset unless given
  rm -rf ranks_out
  env -u OMP_NUM_THREADS "${@:2}" mpirun --allow-run-as-root --oversubscribe --bind-to none --mca pml ob1 --mca btl self,vader \
    --output-filename ranks_out -np "$1" "$BIN" info --no-measure --json >/dev/null || return
  for f in ranks_out/1/rank.*/stdout; do
    $PY -c 'import json, sys; print(json.load(open(sys.argv[1]))["omp_threads"], end=" ")' "$f"
  done
}
ncpu=$(nproc --all) mine=$(env -u OMP_NUM_THREADS nproc)  # online CPUs; those this process may run on
for np_ in 2 4; do
  sharing=$(( (np_ * mine + ncpu - 1) / ncpu ))  # ranks per set of `mine` CPUs, spread evenly
  want=$(( mine / sharing > 1 ? mine / sharing : 1 ))
  got=$(threads_per_rank $np_)
  [[ $got == "$(printf "$want %.0s" $(seq $np_))" ]] ||
    fail "mpirun -np $np_ info: OpenMP threads per rank '$got', want $want each ($ncpu CPUs shared)"
  got=$(threads_per_rank $np_ OMP_NUM_THREADS=3)
  [[ $got == "$(printf "3 %.0s" $(seq $np_))" ]] || fail "mpirun -np $np_ info, OMP_NUM_THREADS=3: threads per rank '$got'"
done

# Under mpirun, the first 12 of the 19 tokens (12 splits over 2, 3 and 4 ranks in
# every layout): ring, all-gather, Ulysses, TP, PP (gpt2's tied head copied to
# the last stage) — rank 0 gathers and writes.
for m in llama_gqa gpt2 mistral_window; do
  fx=$SRC/tests/fixtures/hf/$m
  $PY hf.py ids "$fx" ids12_$m.npy 12 || { fail "could not write the ids of $m"; continue; }
  for run in "2 --strategy ring --layout zigzag" "3 --strategy ring --layout striped" \
    "4 --strategy ring --layout zigzag" \
    "2 --strategy allgather --layout contiguous" "2 --strategy ulysses" "2 --sp 1 --tp 2" "2 --pp 2" \
    "4 --pp 2 --sp 2 --layout zigzag" "4 --strategy hybrid --ulysses 2 --layout zigzag"; do
    read -r np opts <<<"$run"
    # shellcheck disable=SC2086
    if "${MPIRUN[@]}" -np "$np" "$BIN" forward --model "$fx" --ids ids12_$m.npy --logits l12_$m.npy --threads 1 $opts \
      >forward_mpi.out 2>&1; then
      $PY hf.py check "$fx" l12_$m.npy 12 || fail "mpirun -np $np forward --model $m $opts: logits differ"
    else
      fail "mpirun -np $np forward --model $m $opts exited non-zero: $(tail -5 forward_mpi.out)"
    fi
  done
done
# All 19 tokens (no rank count divides 19): uneven shards, the same logits.
for m in llama_gqa gpt2; do
  fx=$SRC/tests/fixtures/hf/$m
  $PY hf.py ids "$fx" ids_$m.npy || { fail "could not write the ids of $m"; continue; }
  for run in "3 --strategy ring --layout zigzag" "2 --strategy ulysses" "4 --pp 2 --sp 2 --layout striped" \
    "4 --strategy hybrid --ulysses 2 --layout contiguous"; do
    read -r np opts <<<"$run"
    # shellcheck disable=SC2086
    if "${MPIRUN[@]}" -np "$np" "$BIN" forward --model "$fx" --ids ids_$m.npy --logits l19_$m.npy --threads 1 $opts \
      >forward_mpi.out 2>&1; then
      $PY hf.py check "$fx" l19_$m.npy || fail "mpirun -np $np forward --model $m $opts (19 tokens): logits differ"
    else
      fail "mpirun -np $np forward --model $m $opts (19 tokens) exited non-zero: $(tail -5 forward_mpi.out)"
    fi
  done
done
# forward --positions: only the logits at chosen positions (any order, repeats),
# equal to transformers' rows and to scripts/lm_reference.py (float64 NumPy).
$PY -c 'import numpy as np, sys; np.save(sys.argv[1], np.array([11, 0, 5, 5, 6], dtype=np.int64))' pos.npy
for m in llama_gqa llama_tied_llama3 qwen2 gpt2 mistral_window qwen2_window; do
  fx=$SRC/tests/fixtures/hf/$m
  $PY hf.py ids "$fx" ids12_$m.npy 12 || { fail "could not write the ids of $m"; continue; }
  for run in "1" "3 --strategy ring --layout striped" "2 --strategy ulysses" "4 --pp 2 --sp 2 --layout zigzag"; do
    read -r np opts <<<"$run"
    [[ $np == 1 || $m == llama_gqa || $m == gpt2 ]] || continue
    # shellcheck disable=SC2086
    if "${MPIRUN[@]}" -np "$np" "$BIN" forward --model "$fx" --ids ids12_$m.npy --positions pos.npy --logits lp_$m.npy \
      --threads 1 $opts >forward_pos.out 2>&1; then
      $PY hf.py check "$fx" lp_$m.npy 12 pos.npy || fail "mpirun -np $np forward --positions --model $m $opts: logits differ"
      $PY "$SRC/scripts/lm_reference.py" "$fx" ids12_$m.npy pos.npy --check lp_$m.npy >lm_reference.out ||
        fail "forward --positions --model $m: scripts/lm_reference.py disagrees: $(cat lm_reference.out)"
    else
      fail "mpirun -np $np forward --positions --model $m $opts exited non-zero: $(tail -5 forward_pos.out)"
    fi
  done
done
# generate --model: greedy from the sequence-sharded KV cache is transformers'
# continuation, on one process and under mpirun (ring, Ulysses, TP, PP).
for m in llama_tied_llama3 gpt2 mistral_window; do
  fx=$SRC/tests/fixtures/hf/$m
  $PY greedy.py prompt "$fx" prompt_$m.npy
  for run in "1" "2 --strategy ring" "3 --strategy ring --layout striped" "2 --strategy ulysses" "2 --sp 1 --tp 2" \
    "2 --pp 2" "4 --pp 2 --sp 2 --layout striped" "4 --strategy hybrid --ulysses 2"; do
    read -r np opts <<<"$run"
    # shellcheck disable=SC2086
    if "${MPIRUN[@]}" -np "$np" "$BIN" generate --model "$fx" --prompt-ids prompt_$m.npy --new-tokens 10 --threads 1 \
      --ignore-eos --check --out-ids gen_$m.npy $opts >generate_lm.out 2>&1; then
      $PY greedy.py check "$fx" gen_$m.npy || fail "mpirun -np $np generate --model $m $opts: not transformers' tokens"
    else
      fail "mpirun -np $np generate --model $m $opts exited non-zero: $(tail -5 generate_lm.out)"
    fi
  done
done
# Prompts of different lengths (rows padded with -1) decode as one batch; --check
# recomputes each sequence alone.
$PY -c "import numpy as np; np.save('ragged.npy', np.array([[5, 9, 2, 7, 11, 3, 8], [4, 6, 1, -1, -1, -1, -1], [9, 9, 3, 5, 1, -1, -1]], dtype=np.int64))"
for np in 1 2 3; do
  "${MPIRUN[@]}" -np "$np" "$BIN" generate --model "$SRC/tests/fixtures/hf/llama_gqa" --prompt-ids ragged.npy \
    --new-tokens 6 --threads 1 --ignore-eos --check --layout striped --json >gen_ragged.json 2>gen_ragged.err ||
    fail "mpirun -np $np generate --prompt-ids (ragged) --check failed: $(tail -3 gen_ragged.err)"
  $PY - gen_ragged.json <<'EOF' || fail "generate ragged: $(head -c 300 gen_ragged.json)"
import json, sys
j = json.load(open(sys.argv[1]))
assert j["prompt_lengths"] == [7, 3, 5] and [len(t) for t in j["new_tokens"]] == [6, 6, 6], j
EOF
done
# The vector model at lengths no rank count divides (uneven shards): train's loss
# by step equals one process's, and generate --check recomputes each prompt alone.
vec=(--layers 2 --d-model 32 --heads 4 --kv-heads 2 --mlp 64 --batch 2 --seq 25 --steps 3 --threads 1 --json)
"$BIN" train "${vec[@]}" >train_vec1.json 2>train_vec.err || fail "train --seq 25 exited non-zero: $(tail -3 train_vec.err)"
for run in "3 --strategy ring --layout zigzag" "4 --strategy allgather --layout striped" "2 --strategy ulysses" \
  "4 --pp 2 --sp 2 --layout striped"; do
  read -r np opts <<<"$run"
  # shellcheck disable=SC2086
  if "${MPIRUN[@]}" -np "$np" "$BIN" train "${vec[@]}" $opts >train_vecp.json 2>train_vec.err; then
    $PY - train_vec1.json train_vecp.json <<'EOF' || fail "mpirun -np $np train --seq 25 $opts: the loss differs"
import json, sys
a, b = (json.load(open(f))["loss"] for f in sys.argv[1:])
assert len(a) == len(b) == 3 and all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b)), (a, b)
EOF
  else
    fail "mpirun -np $np train --seq 25 $opts exited non-zero: $(tail -3 train_vec.err)"
  fi
done
for opts in "3 --strategy ring" "4 --strategy hybrid --ulysses 2"; do
  read -r np opts <<<"$opts"
  # shellcheck disable=SC2086
  "${MPIRUN[@]}" -np "$np" "$BIN" generate --prompt-len 25,17 --new-tokens 5 --layers 2 --d-model 32 --heads 4 \
    --kv-heads 2 --threads 1 --check $opts >gen_vec.out 2>&1 ||
    fail "mpirun -np $np generate --prompt-len 25,17 --check $opts: $(tail -3 gen_vec.out)"
done
# compare --config: every method runs the language model whole (ids in, next-token
# loss out; the tied head copied to PP's last stage) on the same weights and ids,
# so every method's loss is the same number.
if "$BIN" compare --config "$SRC/tests/fixtures/hf/llama_tied_llama3" --seq 32 --batch 2 --ranks 2 --new-tokens 3 \
  --json >compare_lm.json 2>compare_lm.err; then
  $PY - compare_lm.json <<'EOF' || fail "compare --config: $(head -c 600 compare_lm.json)"
import json, math, sys
j = json.load(open(sys.argv[1]))
assert j["model"]["arch"] == "llama" and j["model"]["vocab"] == 101 and j["model"]["tied"], j["model"]
ms = j["methods"]
assert {m["id"] for m in ms} == {"ring", "ulysses", "allgather", "tp", "pp"}, [m["id"] for m in ms]
losses = [m["loss"] for m in ms]
assert all(math.isfinite(l) and 3 < l < 6 for l in losses), losses
assert max(losses) - min(losses) < 1e-5 * losses[0], losses
for m in ms:
    assert m["forward_tokens_per_s"] > 0 and m["train_tokens_per_s"] > 0 and m["time_per_output_token_ms"] > 0, m
    assert m["kv_cache_bytes_per_rank"] > 0, m
EOF
else
  fail "compare --config exited non-zero: $(tail -5 compare_lm.err)"
fi
# train --config: a byte-level llama from the seed on a text (this repository's
# README) under mpirun (SP 2, ring), held-out loss falling, --save a checkpoint
# that forward and generate load.
if "${MPIRUN[@]}" -np 2 "$BIN" train --config byte_llama.json --data "$SRC/README.md" --tokenizer byte --batch 2 \
  --seq 64 --steps 30 --eval-every 10 --lr 3e-3 --threads 1 --save byte_ck --log train_log.json >train_lm.out 2>&1; then
  $PY - train_log.json <<'EOF' || fail "train --config: the held-out loss did not fall: $(cat train_log.json)"
import json, sys
steps = json.load(open(sys.argv[1]))["steps"]
val = [s["val_loss"] for s in steps if "val_loss" in s]
print(f"train --config: held-out loss {val[0]:.3f} -> {val[-1]:.3f} (bits/byte {steps[-1]['val_bits_per_byte']:.3f})")
sys.exit(0 if len(val) == 3 and val[-1] < val[0] < 6 else 1)
EOF
  "$BIN" generate --model byte_ck --tokenizer byte --prompt "RA+SP" --new-tokens 8 --check >gen_byte.out 2>&1 ||
    fail "generate from the trained checkpoint failed: $(cat gen_byte.out)"
else
  fail "mpirun -np 2 train --config exited non-zero: $(tail -5 train_lm.out)"
fi
# train --save under TP and PP: the slices gathered to rank 0 write the same
# checkpoint, byte for byte, as one process (a learning rate of 1e-30 leaves the
# seed's weights as they are; a tied head, so the last stage's copy is skipped).
sed 's/"num_hidden_layers": 1/"num_hidden_layers": 2, "tie_word_embeddings": true/' byte_llama.json >byte_llama2.json
save_args=(train --config byte_llama2.json --data "$SRC/README.md" --tokenizer byte --batch 2 --seq 32 --steps 1
  --lr 1e-30 --threads 1)
"$BIN" "${save_args[@]}" --save ck_one >save_one.out 2>&1 || fail "train --save (one process): $(tail -3 save_one.out)"
for mesh in "--sp 1 --tp 2" "--sp 1 --pp 2"; do
  dir=ck_${mesh//[^a-z0-9]/}
  # shellcheck disable=SC2086
  if "${MPIRUN[@]}" -np 2 "$BIN" "${save_args[@]}" $mesh --save "$dir" >save_mesh.out 2>&1; then
    cmp -s ck_one/model.safetensors "$dir/model.safetensors" ||
      fail "train $mesh --save: the gathered checkpoint differs from one process's"
  else
    fail "mpirun -np 2 train $mesh --save exited non-zero: $(tail -3 save_mesh.out)"
  fi
done
# train --documents: the README's paragraphs (blank-line separated) as packed
# documents, each followed by the EOS id 256 (a vocabulary of 257 for bytes).
sed 's/"vocab_size": 256/"vocab_size": 257, "eos_token_id": 256/' byte_llama.json >byte_llama_eos.json
if "${MPIRUN[@]}" -np 2 "$BIN" train --config byte_llama_eos.json --data "$SRC/README.md" --tokenizer byte \
  --documents '' --batch 2 --seq 64 --steps 20 --eval-every 10 --lr 3e-3 --threads 1 --json >train_docs.json 2>&1; then
  $PY - train_docs.json "$(grep -c '^$' "$SRC/README.md")" <<'EOF' || fail "train --documents: $(head -c 400 train_docs.json)"
import json, sys
j = json.load(open(sys.argv[1]))
val = [s["val_loss"] for s in j["steps"] if "val_loss" in s]
print(f"train --documents: {j['documents']} documents, held-out loss {val[0]:.3f} -> {val[-1]:.3f}")
sys.exit(0 if j["documents"] == int(sys.argv[2]) + 1 and val[-1] < val[0] < 6 else 1)
EOF
else
  fail "mpirun -np 2 train --documents exited non-zero: $(tail -5 train_docs.json)"
fi

# A sliding window of 8 with prompts of 64 and 32 and 40 new tokens: the cache's
# ring buffers (8 + 8/P + 1 slots) wrap; --check recomputes with the window.
for np in 1 2 3; do
  "${MPIRUN[@]}" -np "$np" "$BIN" generate --prompt-len 60,30 --new-tokens 40 --layers 2 --d-model 32 --heads 4 \
    --kv-heads 2 --sliding-window 8 --layout contiguous --threads 1 --check --json >gen_w.json 2>gen_w.err ||
    fail "mpirun -np $np generate --sliding-window 8 --check failed: $(tail -5 gen_w.err)"
  $PY - gen_w.json "$np" <<'PYEOF' || fail "generate --sliding-window: the cache is not bounded by the window"
import json, sys
j = json.load(open(sys.argv[1]))
P = int(sys.argv[2])
assert j["model"]["sliding_window"] == 8, j["model"]
assert j["cache_capacity_per_rank"] == 8 + (7 + P) // P, j["cache_capacity_per_rank"]
PYEOF
done
fi


if [[ $failures -ne 0 ]]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "all CLI checks passed"
exit 0
