"""The array-level API for numpy arrays (torch tensors go to ringattn.torch).

Shapes follow flash-attn's ``flash_attn_func``: q ``[B, Lq, H, d]``, k and v
``[B, Lk, Hkv, d]`` (H a multiple of Hkv), o like q, lse float32 ``[B, H, Lq]``.
Any strides the kernels take are used as they are: nothing is copied in.
"""

import atexit
import sys
import weakref

import numpy as np

from . import _ringattn

_INT32 = (-(2**31), 2**31 - 1)


def _is_torch(x):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _window(window):
    """(left, right) as flash-attn's window_size; -1 for an unbounded side."""
    if window is None:
        return -1, -1
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be a pair (left, right) of ints (-1: unbounded side), got {window!r}")
    left, right = window
    for side, name in ((left, "left"), (right, "right")):
        if isinstance(side, bool) or not isinstance(side, (int, np.integer)):
            raise TypeError(f"window {name} must be an int, got {side!r}")
    return int(left), int(right)


def _offsets(cu, name):
    """cu_seqlens as a list of ints (flash-attn's int32 offsets), or None."""
    if cu is None:
        return None
    if _is_torch(cu):
        cu = cu.detach().cpu().numpy()
    a = np.asarray(cu)
    if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
        raise TypeError(f"{name} must be a one-dimensional sequence of integer offsets, got {a.dtype} {a.shape}")
    if a.size and (a.min() < _INT32[0] or a.max() > _INT32[1]):
        raise ValueError(f"{name} has offsets outside int32: {int(a.min())} .. {int(a.max())}")
    return [int(x) for x in a]


def _scale(scale):
    if scale is None:
        return None
    s = float(scale)
    if not (np.isfinite(s) and s > 0):  # the library reads NaN as "the default": refuse it here
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return s


def _lse_shape(q):
    """[B, H, Lq] for a 4-dimensional q; otherwise a shape the contract check rejects with its message."""
    if q.ndim == 4:
        return (q.shape[0], q.shape[2], q.shape[1])
    return (0,)


def _numpy(x, name):
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    return x


def _mask_args(causal, scale, window, cu_seqlens, cu_seqlens_k=None):
    left, right = _window(window)
    return dict(
        causal=bool(causal),
        scale=_scale(scale),
        window_left=left,
        window_right=right,
        cu_seqlens_q=_offsets(cu_seqlens, "cu_seqlens"),
        cu_seqlens_k=_offsets(cu_seqlens_k, "cu_seqlens_k"),
    )


def attention(q, k, v, *, causal=False, scale=None, window=None, cu_seqlens=None, cu_seqlens_k=None,
              return_lse=False, threads=0):
    """Exact attention softmax(scale·q kᵀ + mask) v on this process.

    causal: query i sees keys up to i (bottom-right aligned when Lq != Lk).
    window: (left, right): query at position p sees keys p-left .. p+right (-1: unbounded).
    cu_seqlens: packed documents, offsets [0, ..., Lq] (flash-attn varlen); cu_seqlens_k
    for the keys when they differ. Returns o, or (o, lse) with return_lse.
    Torch tensors are computed by ringattn.torch.attention (with autograd).
    """
    if _is_torch(q):
        from . import torch as rt

        return rt.attention(q, k, v, causal=causal, scale=scale, window=window, cu_seqlens=cu_seqlens,
                            cu_seqlens_k=cu_seqlens_k, return_lse=return_lse, threads=threads)
    q, k, v = _numpy(q, "q"), _numpy(k, "k"), _numpy(v, "v")
    o = np.empty(q.shape, q.dtype)
    lse = np.empty(_lse_shape(q), np.float32)
    _ringattn.attention_forward(q, k, v, o, lse, **_mask_args(causal, scale, window, cu_seqlens, cu_seqlens_k),
                                threads=int(threads))
    return (o, lse) if return_lse else o


def attention_backward(dout, q, k, v, o, lse, *, causal=False, scale=None, window=None, cu_seqlens=None,
                       cu_seqlens_k=None, threads=0):
    """(dq, dk, dv) of attention() given its o and lse and dout = dLoss/do (the same mask options)."""
    q, k, v, o, lse, dout = (_numpy(x, n) for x, n in ((q, "q"), (k, "k"), (v, "v"), (o, "o"), (lse, "lse"),
                                                       (dout, "dout")))
    dq, dk, dv = np.empty(q.shape, q.dtype), np.empty(k.shape, k.dtype), np.empty(v.shape, v.dtype)
    _ringattn.attention_backward(q, k, v, o, lse, dout, dq, dk, dv,
                                 **_mask_args(causal, scale, window, cu_seqlens, cu_seqlens_k),
                                 threads=int(threads))
    return dq, dk, dv


class Communicator:
    """The ranks a sequence is split over: an MPI communicator from mpi4py.

    ``Communicator()`` is ``MPI.COMM_WORLD``; any intra-communicator works
    (``comm.Split(...)`` sub-communicators too). Collective: every rank of the
    communicator constructs it. Every wait is bounded by ``timeout`` seconds
    (``None``: no limit): a rank that stops answering makes the others raise
    instead of hanging.
    """

    def __init__(self, comm=None, *, timeout=300.0):
        if comm is None:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        if isinstance(comm, _ringattn.Communicator):
            self._c = comm
            return
        py2f = getattr(comm, "py2f", None)
        if py2f is None:
            raise TypeError(f"Communicator takes an mpi4py communicator (e.g. MPI.COMM_WORLD), got {type(comm).__name__}")
        self._c = _ringattn.Communicator.from_fortran_handle(int(py2f()), 0.0 if timeout is None else float(timeout))
        _track(self._c)

    rank = property(lambda self: self._c.rank, doc="this process's rank")
    size = property(lambda self: self._c.size, doc="the number of ranks")

    def barrier(self):
        self._c.barrier()

    def all_reduce(self, x):
        """Sums a contiguous float32/float64 numpy array or CPU tensor over the ranks, in place; returns x."""
        self._c.all_reduce_sum(x.detach() if _is_torch(x) else x)
        return x

    def split(self, color, key=0):
        """Sub-communicator of the ranks with the same color, ordered by key (collective)."""
        sub = self._c.split(int(color), int(key))
        _track(sub)
        return Communicator(sub)

    def stats(self):
        """Traffic and waiting since this communicator was made: bytes_sent, bytes_received, ..."""
        return self._c.stats()

    def close(self):
        self._c.close()

    def __repr__(self):
        return f"ringattn.Communicator(rank={self.rank}, size={self.size})"


_OPEN = weakref.WeakSet()


def _close_open():
    for c in list(_OPEN):
        c.close()


def _track(c):
    """Frees the MPI duplicates at exit, before mpi4py finalizes MPI: its atexit handler was
    registered when mpi4py was imported, before the first Communicator, so it runs after this one."""
    if not _OPEN:
        atexit.register(_close_open)
    _OPEN.add(c)


def _comm(comm):
    if isinstance(comm, Communicator):
        return comm._c
    raise TypeError(f"comm must be a ringattn.Communicator, got {type(comm).__name__} "
                    "(wrap an mpi4py communicator: ringattn.Communicator(MPI.COMM_WORLD))")


def _layout_docs(layout, cu_seqlens):
    """cu_seqlens as _offsets gives it; the document layouts (doc-zigzag, doc-balanced) need them."""
    cu = _offsets(cu_seqlens, "cu_seqlens")
    if str(layout) in ("doc-zigzag", "doc-balanced") and cu is None:
        raise ValueError(f"the {layout} layout deals the documents of cu_seqlens over the ranks: pass cu_seqlens=")
    return cu


def _dist_args(strategy, layout, causal, scale, window, cu_seqlens, ulysses, threads):
    left, right = _window(window)
    return dict(strategy=str(strategy), layout=str(layout), causal=bool(causal), scale=_scale(scale),
                window_left=left, window_right=right, cu_seqlens=_layout_docs(layout, cu_seqlens),
                threads=int(threads), ulysses=int(ulysses or 1))


def ring_attention(q, k, v, comm, *, strategy="ring", layout="zigzag", causal=False, scale=None, window=None,
                   cu_seqlens=None, ulysses=None, return_lse=False, threads=0):
    """Attention over a sequence split across the ranks of comm, on this rank's shard.

    Each rank passes its shard (``ringattn.shard(x, comm, layout=...)``) of q, k, v
    and gets its queries' rows of the attention over the whole sequence; the mask
    (causal, window, cu_seqlens over the whole sequence) is by global position.
    strategy: "ring" (RA+SP), "allgather", "ulysses" or "hybrid" (Ulysses groups
    of ``ulysses`` ranks, the ring across them). Torch tensors get autograd.
    """
    if _is_torch(q):
        from . import torch as rt

        return rt.ring_attention(q, k, v, comm, strategy=strategy, layout=layout, causal=causal, scale=scale,
                                 window=window, cu_seqlens=cu_seqlens, ulysses=ulysses, return_lse=return_lse,
                                 threads=threads)
    q, k, v = _numpy(q, "q"), _numpy(k, "k"), _numpy(v, "v")
    o = np.empty(q.shape, q.dtype)
    lse = np.empty(_lse_shape(q), np.float32)
    _ringattn.dist_forward(_comm(comm), q, k, v, o, lse,
                           **_dist_args(strategy, layout, causal, scale, window, cu_seqlens, ulysses, threads))
    return (o, lse) if return_lse else o


def ring_attention_backward(dout, q, k, v, o, lse, comm, *, strategy="ring", layout="zigzag", causal=False,
                            scale=None, window=None, cu_seqlens=None, ulysses=None, threads=0):
    """(dq, dk, dv) of this rank's shards, given ring_attention's o and lse (the same options)."""
    q, k, v, o, lse, dout = (_numpy(x, n) for x, n in ((q, "q"), (k, "k"), (v, "v"), (o, "o"), (lse, "lse"),
                                                       (dout, "dout")))
    dq, dk, dv = np.empty(q.shape, q.dtype), np.empty(k.shape, k.dtype), np.empty(v.shape, v.dtype)
    _ringattn.dist_backward(_comm(comm), q, k, v, o, lse, dout, dq, dk, dv,
                            **_dist_args(strategy, layout, causal, scale, window, cu_seqlens, ulysses, threads))
    return dq, dk, dv


def positions(L, comm, *, layout="zigzag", cu_seqlens=None):
    """This rank's global token positions for a sequence of L tokens, as int64, in shard order
    (ascending; doc-balanced: its dealt documents' tokens first, then its whole documents').

    cu_seqlens: the packed documents, which the doc-zigzag layout deals (zigzag inside each) and
    doc-balanced keeps whole where they fit (balanced by causal work)."""
    c = _comm(comm)
    cu = _layout_docs(layout, cu_seqlens)
    return np.asarray(_ringattn.shard_positions(str(layout), int(L), c.size, c.rank, cu), dtype=np.int64)


def _check_dim(x, dim):
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"dim {dim} is out of range for a tensor of {x.ndim} dimensions")
    return dim % x.ndim


def shard(x, comm, *, layout="zigzag", dim=1, cu_seqlens=None):
    """This rank's shard of the full tensor x along dim (a copy; torch: differentiable)."""
    dim = _check_dim(x, dim)
    pos = positions(x.shape[dim], comm, layout=layout, cu_seqlens=cu_seqlens)
    if _is_torch(x):
        import torch

        return x.index_select(dim, torch.from_numpy(pos).to(x.device))
    return np.take(_numpy(x, "x"), pos, axis=dim)


def _gather_bytes(c, flat):
    """Every rank's equal-sized uint8 buffer, as one [P, n] uint8 numpy array."""
    out = np.empty((c.size, flat.size), np.uint8)
    c.all_gather_bytes(flat, out.reshape(-1))
    return out


def unshard(x_shard, comm, *, layout="zigzag", dim=1, cu_seqlens=None):
    """The full tensor from every rank's shard along dim, on every rank (collective).

    The inverse of shard(); the full length is the sum of the shards'. Torch: the
    gradient of the result flows back to this rank's own positions (every rank
    computing the same function of the full tensor).
    """
    c = _comm(comm)
    dim = _check_dim(x_shard, dim)
    cu = _layout_docs(layout, cu_seqlens)
    n = np.array([x_shard.shape[dim]], np.int64)
    lengths = _gather_bytes(c, n.view(np.uint8)).view(np.int64).reshape(-1)
    L = int(lengths.sum())
    _ringattn.check_layout(str(layout), L, c.size, cu)
    for r in range(c.size):
        want = len(_ringattn.shard_positions(str(layout), L, c.size, r, cu))
        if lengths[r] != want:
            raise ValueError(f"rank {r} holds {int(lengths[r])} tokens along dim {dim}; the {layout} layout of "
                             f"{L} tokens over {c.size} ranks gives it {want}")
    if _is_torch(x_shard):
        from . import torch as rt

        return rt.unshard(x_shard, comm, layout=layout, dim=dim, length=L, cu_seqlens=cu)
    x = np.ascontiguousarray(_numpy(x_shard, "x_shard"))
    return _place(c, x, dim, L, layout, lengths, cu)


def _place(c, x, dim, L, layout, lengths, cu):
    """The all-gather of numpy shards padded to the longest, each written at its positions."""
    Lmax = int(lengths.max())
    shape = list(x.shape)
    shape[dim] = Lmax
    padded = np.zeros(shape, x.dtype)
    idx = [slice(None)] * x.ndim
    idx[dim] = slice(0, x.shape[dim])
    padded[tuple(idx)] = x
    blocks = _gather_bytes(c, padded.reshape(-1).view(np.uint8)).view(x.dtype).reshape([c.size] + shape)
    full_shape = list(x.shape)
    full_shape[dim] = L
    full = np.empty(full_shape, x.dtype)
    for r in range(c.size):
        pos = np.asarray(_ringattn.shard_positions(str(layout), L, c.size, r, cu), np.int64)
        src = [slice(None)] * x.ndim
        src[dim] = slice(0, len(pos))
        dst = [slice(None)] * x.ndim
        dst[dim] = pos
        full[tuple(dst)] = blocks[r][tuple(src)]
    return full
