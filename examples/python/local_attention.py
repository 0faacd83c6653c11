"""ringattn.torch.attention next to torch's scaled_dot_product_attention on CPU tensors.

    python examples/python/local_attention.py [--seq 2048] [--dtype bfloat16]

Same inputs, [B, L, H, d] for ringattn (flash-attn's layout) and [B, H, L, d]
for SDPA: prints the largest difference of the outputs and of the gradients,
and the time of each forward + backward.
"""

import argparse
import time

import torch
import torch.nn.functional as F

import ringattn.torch as rt

a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
a.add_argument("--seq", type=int, default=2048)
a.add_argument("--heads", type=int, default=8)
a.add_argument("--kv-heads", type=int, default=2)
a.add_argument("--dim", type=int, default=128)
a.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
args = a.parse_args()

dt = getattr(torch, args.dtype)
g = torch.Generator().manual_seed(0)
q = torch.randn(1, args.seq, args.heads, args.dim, generator=g).to(dt).requires_grad_()
k = torch.randn(1, args.seq, args.kv_heads, args.dim, generator=g).to(dt).requires_grad_()
v = torch.randn(1, args.seq, args.kv_heads, args.dim, generator=g).to(dt).requires_grad_()
dout = torch.randn(1, args.seq, args.heads, args.dim, generator=g).to(dt)


def run(fn):
    t = time.perf_counter()
    o = fn()
    grads = torch.autograd.grad(o, (q, k, v), dout)
    return o, grads, time.perf_counter() - t


def sdpa():
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                          enable_gqa=True).transpose(1, 2)


mine = run(lambda: rt.attention(q, k, v, causal=True))
theirs = run(sdpa)
print(f"L = {args.seq}, H = {args.heads} (kv {args.kv_heads}), d = {args.dim}, {args.dtype}, causal")
print(f"max |o - o_sdpa| = {(mine[0].float() - theirs[0].float()).abs().max():.3g}")
for n, x, y in zip("qkv", mine[1], theirs[1]):
    print(f"max |d{n} - d{n}_sdpa| = {(x.float() - y.float()).abs().max():.3g}")
print(f"forward + backward: ringattn {mine[2] * 1e3:.1f} ms, sdpa {theirs[2] * 1e3:.1f} ms")
