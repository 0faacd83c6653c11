#!/usr/bin/env python3
"""Checkpoints written by `ringattn train --save DIR` load in Hugging Face
transformers and give the logits ringattn gives.

Usage (a venv with torch and transformers from PyPI: ./test.sh's .venv;
tests/hf_roundtrip.sh runs it from CTest on every architecture):
    ringattn train --config CFG.json --data TEXT --tokenizer byte ... --save DIR
    .venv/bin/python scripts/check_hf_roundtrip.py DIR [DIR ...] [--ringattn build/release/ringattn]

For each DIR it draws token ids, runs `ringattn forward --model DIR` on them and
transformers' AutoModelForCausalLM.from_pretrained(DIR) on the same ids, and
exits 1 unless every max |ringattn - transformers| / max |transformers| < 1e-4.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers


def check(checkpoint, ringattn, seq):
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.eval()
    vocab = model.config.vocab_size
    ids = np.random.default_rng(0).integers(0, vocab, size=(2, seq), dtype=np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(os.path.join(tmp, "ids.npy"), ids)
        subprocess.run([ringattn, "forward", "--model", checkpoint, "--ids", os.path.join(tmp, "ids.npy"),
                        "--logits", os.path.join(tmp, "logits.npy")], check=True, stdout=subprocess.DEVNULL)
        ours = np.load(os.path.join(tmp, "logits.npy")).astype(np.float64)
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids)).logits.double().numpy()
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    ok = ours.shape == theirs.shape and err < 1e-4
    print(f"{checkpoint}: {type(model).__name__} loads it; max |ringattn - transformers| / max = {err:.2e}"
          f"{'' if ok else '  FAILED (limit 1e-4)'}")
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--ringattn", default=os.path.join(os.path.dirname(__file__), "..", "build", "release", "ringattn"))
    ap.add_argument("--seq", type=int, default=32)
    a = ap.parse_args()
    results = [check(c, a.ringattn, a.seq) for c in a.checkpoints]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
