"""The same tokens packed and unpacked, one process, one thread: for each corpus row
of commands.sh (<corpus>.npy), causal attention forward + backward (H = 2, d = 64,
fp32) once as one packed call with cu_seqlens and once as one call per document
(each its own [1, n, H, d] sequence). Best of REPS (default 3). Run with the venv
that has the package: .venv/bin/python unpacked.py"""
import os
import time

import numpy as np

import ringattn

REPS = int(os.environ.get("REPS", "3"))
H, d = 2, 64


def fwd_bwd(q, k, v, dout, cu=None):
    o, lse = ringattn.attention(q, k, v, causal=True, cu_seqlens=cu, return_lse=True, threads=1)
    ringattn.attention_backward(dout, q, k, v, o, lse, causal=True, cu_seqlens=cu, threads=1)


def best(f):
    ts = []
    for _ in range(REPS):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts)


rng = np.random.default_rng(0)
for name in ("fortunes", "copyright", "python"):
    cu = np.load(f"{name}.npy")
    L = int(cu[-1])
    q, k, v, dout = (rng.standard_normal((1, L, H, d), dtype=np.float32) for _ in range(4))
    packed = best(lambda: fwd_bwd(q, k, v, dout, cu))
    parts = [(int(a), int(b)) for a, b in zip(cu[:-1], cu[1:])]
    unpacked = best(lambda: [fwd_bwd(*(np.ascontiguousarray(x[:, a:b]) for x in (q, k, v, dout))) for a, b in parts])
    n = np.diff(cu).astype(np.float64)
    pairs = float((n * (n + 1) / 2).sum())
    print(f"{name:9} {len(parts):4d} documents, {pairs:.3g} visible pairs: packed {packed:.3f} s, "
          f"unpacked {unpacked:.3f} s, packed / unpacked {packed / unpacked:.2f}")
