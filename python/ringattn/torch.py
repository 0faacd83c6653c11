"""ringattn for PyTorch: attention as autograd functions on CPU tensors.

``attention`` is a ``torch.library`` custom op (``torch.ops.ringattn.attention``
and its backward) inside ``torch.compile`` graphs, so they call it without a
graph break, and an autograd function of the same kernels in eager code;
``ring_attention`` is an autograd function over a ringattn.Communicator. Tensors
go to the C++ kernels through DLPack without a copy: float32, bfloat16 and
float16, ``[B, L, H, d]`` like flash-attn's ``flash_attn_func``.
"""

from functools import partial
from typing import List, Optional, Tuple

import numpy as np
import torch

from . import _core, _ringattn

__all__ = ["attention", "ring_attention", "unshard"]


def _alloc_like(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _lse_like(q):
    return torch.empty(_core._lse_shape(q), dtype=torch.float32, device=q.device)


@torch.library.custom_op("ringattn::attention", mutates_args=(), device_types="cpu")
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: Optional[float],
               window_left: int, window_right: int, cu_seqlens_q: Optional[List[int]],
               cu_seqlens_k: Optional[List[int]], threads: int) -> Tuple[torch.Tensor, torch.Tensor]:
    o, lse = _alloc_like(q), _lse_like(q)
    _ringattn.attention_forward(q.detach(), k.detach(), v.detach(), o, lse, causal=causal, scale=scale,
                                window_left=window_left, window_right=window_right, cu_seqlens_q=cu_seqlens_q,
                                cu_seqlens_k=cu_seqlens_k, threads=threads)
    return o, lse


@_attention.register_fake
def _(q, k, v, causal, scale, window_left, window_right, cu_seqlens_q, cu_seqlens_k, threads):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(_core._lse_shape(q),
                                                                                dtype=torch.float32)


@torch.library.custom_op("ringattn::attention_backward", mutates_args=(), device_types="cpu")
def _attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                        lse: torch.Tensor, causal: bool, scale: Optional[float], window_left: int, window_right: int,
                        cu_seqlens_q: Optional[List[int]], cu_seqlens_k: Optional[List[int]],
                        threads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _alloc_like(q), _alloc_like(k), _alloc_like(v)
    _ringattn.attention_backward(q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), dout.detach(), dq, dk,
                                 dv, causal=causal, scale=scale, window_left=window_left, window_right=window_right,
                                 cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, threads=threads)
    return dq, dk, dv


@_attention_backward.register_fake
def _(dout, q, k, v, o, lse, causal, scale, window_left, window_right, cu_seqlens_q, cu_seqlens_k, threads):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


_OPTIONS = ("causal", "scale", "window_left", "window_right", "cu_seqlens_q", "cu_seqlens_k", "threads")


def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.options = dict(zip(_OPTIONS, inputs[3:]))
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _attention_backward(dout, q, k, v, o, lse, **ctx.options)
    return (dq, dk, dv) + (None,) * len(_OPTIONS)


_attention.register_autograd(_backward, setup_context=_setup_context)


def _check_tensors(names, tensors):
    for n, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{n} must be a torch tensor, got {type(t).__name__}")
        if t.device.type != "cpu":  # before DLPack, which fails on some devices (meta) with a C++ trace
            raise TypeError(f"{n} is a {t.device.type} tensor; the Python package computes on host memory "
                            "(move it with .cpu())")


class _KernelAttention(torch.autograd.Function):
    """o, lse = forward(q, k, v, o, lse) with autograd by backward(q, k, v, o, lse, dout, dq, dk, dv):
    the extension's local or distributed pair, bound to their options. Eager code runs this rather
    than the ops above: the dispatcher costs about 12 us of a 40 us call on tiny tensors."""

    @staticmethod
    def forward(ctx, q, k, v, kernels):
        forward, ctx.backward_kernel = kernels
        o, lse = _alloc_like(q), _lse_like(q)
        forward(q.detach(), k.detach(), v.detach(), o, lse)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _alloc_like(q), _alloc_like(k), _alloc_like(v)
        ctx.backward_kernel(q.detach(), k.detach(), v.detach(), o, lse, dout.detach(), dq, dk, dv)
        return dq, dk, dv, None


def attention(q, k, v, *, causal=False, scale=None, window=None, cu_seqlens=None, cu_seqlens_k=None,
              return_lse=False, threads=0):
    """Exact attention on CPU tensors q [B, Lq, H, d], k, v [B, Lk, Hkv, d], with autograd.

    The options are ringattn.attention's (causal, scale, window=(left, right),
    cu_seqlens for packed documents). Returns o [B, Lq, H, d] in q's dtype, and
    lse float32 [B, H, Lq] with return_lse (not differentiable).
    """
    _check_tensors("qkv", (q, k, v))
    m = _core._mask_args(causal, scale, window, cu_seqlens, cu_seqlens_k)
    m["threads"] = int(threads)
    if torch.compiler.is_compiling():
        o, lse = _attention(q, k, v, *(m[n] for n in _OPTIONS))
    else:
        kernels = (partial(_ringattn.attention_forward, **m), partial(_ringattn.attention_backward, **m))
        o, lse = _KernelAttention.apply(q, k, v, kernels)
    return (o, lse) if return_lse else o


def ring_attention(q, k, v, comm, *, strategy="ring", layout="zigzag", causal=False, scale=None, window=None,
                   cu_seqlens=None, ulysses=None, return_lse=False, threads=0):
    """ringattn.ring_attention on this rank's CPU tensor shards, with autograd (the backward is collective)."""
    _check_tensors("qkv", (q, k, v))
    args = _core._dist_args(strategy, layout, causal, scale, window, cu_seqlens, ulysses, threads)
    c = _core._comm(comm)
    kernels = (partial(_ringattn.dist_forward, c, **args), partial(_ringattn.dist_backward, c, **args))
    o, lse = _KernelAttention.apply(q, k, v, kernels)
    return (o, lse) if return_lse else o


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_numpy_bits(x):
    """A numpy array with x's bytes (bf16 has no numpy dtype: its bits go as int16)."""
    x = x.detach().cpu().contiguous()
    size = x.element_size()
    if size not in _INT_OF_SIZE:
        raise TypeError(f"unshard cannot move {x.dtype} tensors")
    return x.view(_INT_OF_SIZE[size]).numpy()


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, layout, dim, L, lengths, cu):
        full = _core._place(comm, _as_numpy_bits(x), dim, L, layout, lengths, cu)
        ctx.comm, ctx.layout, ctx.dim, ctx.L, ctx.cu = comm, layout, dim, L, cu
        return torch.from_numpy(full).view(x.dtype).to(x.device)

    @staticmethod
    def backward(ctx, grad):
        pos = np.asarray(_ringattn.shard_positions(ctx.layout, ctx.L, ctx.comm.size, ctx.comm.rank, ctx.cu), np.int64)
        return grad.index_select(ctx.dim, torch.from_numpy(pos).to(grad.device)), None, None, None, None, None, None


def unshard(x_shard, comm, *, layout="zigzag", dim=1, length=None, cu_seqlens=None):
    """ringattn.unshard for torch tensors (differentiable: see there)."""
    if length is None:
        return _core.unshard(x_shard, comm, layout=layout, dim=dim, cu_seqlens=cu_seqlens)
    c = _core._comm(comm)
    cu = _core._layout_docs(layout, cu_seqlens)
    lengths = np.array([len(_ringattn.shard_positions(str(layout), int(length), c.size, r, cu)) for r in range(c.size)])
    return _Unshard.apply(x_shard, c, str(layout), dim, int(length), lengths, cu)
