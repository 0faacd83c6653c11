#!/usr/bin/env python3
"""Error of the bf16 attention backward against the float64 reference, on each
kernel path of this CPU (RINGATTN_ISA): avx512 widens bf16 operands to fp32 for
every product; avx512_bf16 (and amx_bf16) multiplies bf16 operands with fp32
sums, P and dS rounded to bf16 first. The reference is exact on the same
bf16-rounded q, k, v, dout; the kernel's backward takes its own forward's o
(stored in bf16, so D = rowsum(dO ∘ O) carries that rounding on both paths) and
writes fp32 gradients, so their storage adds no rounding.

Metric per gradient: max|got - ref| / max|ref| (the tests' normalized error) and
the relative RMS ||got - ref|| / ||ref||.

    .venv/bin/python scripts/bf16_backward_accuracy.py [--isa avx512 avx512_bf16] [--json out.json]
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python", "tests"))
import reference  # noqa: E402
from ringattn import _core  # noqa: E402

CASES = [  # B, L, H, Hkv, d, causal
    (1, 512, 4, 4, 64, False),
    (1, 512, 4, 4, 64, True),
    (1, 2048, 2, 1, 128, False),
    (1, 2048, 2, 1, 128, True),
    (2, 1000, 4, 2, 80, True),
]


def run(isa, case, seed):
    B, L, H, Hkv, d, causal = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H, d, generator=g).bfloat16()
    k = torch.randn(B, L, Hkv, d, generator=g).bfloat16()
    v = torch.randn(B, L, Hkv, d, generator=g).bfloat16()
    dout = torch.randn(B, L, H, d, generator=g).bfloat16()
    os.environ["RINGATTN_ISA"] = isa
    o, lse = torch.empty_like(q), torch.empty(B, H, L)
    args = _core._mask_args(causal, None, None, None)
    _core._ringattn.attention_forward(q, k, v, o, lse, **args, threads=0)
    dq, dk, dv = torch.empty(q.shape), torch.empty(k.shape), torch.empty(v.shape)
    _core._ringattn.attention_backward(q, k, v, o, lse, dout, dq, dk, dv, **args, threads=0)
    f64 = lambda t: t.double().numpy()
    ref = reference.backward(f64(dout), f64(q), f64(k), f64(v), causal=causal)
    out = {}
    for name, got, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref):
        e = got.double().numpy() - r
        out[name] = (float(np.abs(e).max() / np.abs(r).max()), float(np.linalg.norm(e) / np.linalg.norm(r)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isa", nargs="+", default=["avx512", "avx512_bf16"])
    ap.add_argument("--json", help="write the numbers here too")
    a = ap.parse_args()
    rows = []
    print(f"{'B':>2} {'L':>5} {'H':>2} {'Hkv':>3} {'d':>4} {'causal':>6}  {'isa':<12}"
          + "".join(f" {n + ' max':>10} {n + ' rms':>10}" for n in ("dq", "dk", "dv")))
    for i, case in enumerate(CASES):
        for isa in a.isa:
            err = run(isa, case, 1000 + i)
            rows.append({"case": case, "isa": isa, "error": err})
            B, L, H, Hkv, d, causal = case
            print(f"{B:>2} {L:>5} {H:>2} {Hkv:>3} {d:>4} {str(causal):>6}  {isa:<12}"
                  + "".join(f" {err[n][0]:10.2e} {err[n][1]:10.2e}" for n in ("dq", "dk", "dv")))
    if a.json:
        with open(a.json + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(a.json + ".tmp", a.json)


if __name__ == "__main__":
    main()
