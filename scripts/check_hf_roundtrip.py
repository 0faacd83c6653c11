#!/usr/bin/env python3
"""A checkpoint written by `ringattn train --save DIR` loads in Hugging Face
transformers and gives the logits ringattn gives.

Usage (a venv with torch and transformers from PyPI, as for make_hf_fixtures.py):
    python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch transformers numpy
    ringattn train --config CFG.json --data TEXT --tokenizer byte ... --save DIR
    /tmp/hfvenv/bin/python scripts/check_hf_roundtrip.py DIR [--ringattn build/release/ringattn]

It draws token ids, runs `ringattn forward --model DIR` on them and
transformers' AutoModelForCausalLM.from_pretrained(DIR) on the same ids, and
exits 1 unless max |ringattn - transformers| / max |transformers| < 1e-4.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--ringattn", default=os.path.join(os.path.dirname(__file__), "..", "build", "release", "ringattn"))
    ap.add_argument("--seq", type=int, default=32)
    a = ap.parse_args()
    model = transformers.AutoModelForCausalLM.from_pretrained(a.checkpoint, torch_dtype=torch.float32)
    model.eval()
    vocab = model.config.vocab_size
    ids = np.random.default_rng(0).integers(0, vocab, size=(2, a.seq), dtype=np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(os.path.join(tmp, "ids.npy"), ids)
        subprocess.run([a.ringattn, "forward", "--model", a.checkpoint, "--ids", os.path.join(tmp, "ids.npy"),
                        "--logits", os.path.join(tmp, "logits.npy")], check=True, stdout=subprocess.DEVNULL)
        ours = np.load(os.path.join(tmp, "logits.npy")).astype(np.float64)
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids)).logits.double().numpy()
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"{a.checkpoint}: {type(model).__name__} loads it; max |ringattn - transformers| / max = {err:.2e}")
    sys.exit(0 if ours.shape == theirs.shape and err < 1e-4 else 1)


if __name__ == "__main__":
    main()
