#!/usr/bin/env python3
"""Writes tests/fixtures/hf_numpy.safetensors with Hugging Face's own safetensors
library (an independent writer for the reader's test, tests/test_safetensors.cpp).

Needs a venv with the PyPI packages safetensors and numpy (not needed by ./test.sh;
the small output is committed):
    python3 -m venv /tmp/st && /tmp/st/bin/pip install safetensors numpy
    /tmp/st/bin/python scripts/make_safetensors_fixture.py

Every value is a formula of its index, which the test recomputes: tensor t holds
element i = (i % 23) * 0.25 - 2 + k_t, k_t its position in the list below.
"""
import os

import numpy as np
from safetensors.numpy import save_file


def values(shape, k, dtype):
    n = int(np.prod(shape)) if len(shape) else 1
    i = np.arange(n)
    return ((i % 23) * 0.25 - 2 + k).astype(dtype).reshape(shape)


def main():
    out = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf_numpy.safetensors")
    tensors = {
        "model.embed_tokens.weight": values((7, 5), 0, np.float32),
        "model.layers.0.self_attn.q_proj.bias": values((3,), 1, np.float16),  # 6 bytes: what follows is unaligned
        "model.layers.0.mlp.up_proj.weight": values((2, 3, 4), 2, np.float32),
        "lm_head.weight": values((1, 9), 3, np.float16),
        "scalar": values((), 4, np.float32),
    }
    save_file(tensors, out, metadata={"format": "np", "written_by": "scripts/make_safetensors_fixture.py"})
    print(out, os.path.getsize(out), "bytes")


if __name__ == "__main__":
    main()
