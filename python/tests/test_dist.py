"""ring_attention over mpi4py (run under mpirun -np 2, 3, 4): every strategy and layout equals
one process (to fp32 rounding), forward and backward; bad input raises on every rank."""

import numpy as np
import pytest
from mpi4py import MPI

import ringattn
import ringattn.torch
import reference as ref

COMM = ringattn.Communicator(MPI.COMM_WORLD, timeout=60)
P = COMM.size
LAYOUTS = ["contiguous", "zigzag", "striped"]
MASKS = [dict(), dict(causal=True), dict(causal=True, window=(6, 0)), dict(window=(4, 9)),
         dict(causal=True, cu_seqlens=[0, 7, 7, 20, 31, 45])]


def strategies():
    out = [("ring", None), ("allgather", None)]
    if 4 % P == 0:  # H = 4, Hkv = 2 or 4 split over the ranks
        out.append(("ulysses", None))
    if P == 4:
        out.append(("hybrid", 2))
    return out


def inputs(B, L, H, Hkv, d, seed):
    rng = np.random.default_rng(seed)  # the same arrays on every rank
    return [rng.standard_normal(s).astype(np.float32) for s in ((B, L, H, d), (B, L, Hkv, d), (B, L, Hkv, d),
                                                                (B, L, H, d))]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("strategy,ulysses", strategies())
@pytest.mark.parametrize("m", MASKS)
def test_every_strategy_and_layout_equals_one_process(layout, strategy, ulysses, m):
    L = 45 if strategy == "ring" or strategy == "allgather" else 8 * P  # Ulysses needs even shards
    if "cu_seqlens" in m and L != 45:
        m = dict(m, cu_seqlens=[0, 5, 5, L // 2, L])
    Hkv = 4 if strategy == "ulysses" and P == 4 else 2
    q, k, v, dout = inputs(2, L, 4, Hkv, 16, seed=11)
    o, lse = ringattn.attention(q, k, v, return_lse=True, **m)
    dq, dk, dv = ringattn.attention_backward(dout, q, k, v, o, lse, **m)
    opts = dict(strategy=strategy, layout=layout, ulysses=ulysses, **m)
    qs, ks, vs, dos = (ringattn.shard(x, COMM, layout=layout) for x in (q, k, v, dout))
    os_, lses = ringattn.ring_attention(qs, ks, vs, COMM, return_lse=True, **opts)
    gs = ringattn.ring_attention_backward(dos, qs, ks, vs, os_, lses, COMM, **opts)
    np.testing.assert_allclose(ringattn.unshard(os_, COMM, layout=layout), o, atol=1e-6, rtol=0)
    np.testing.assert_allclose(ringattn.unshard(lses, COMM, layout=layout, dim=2), lse, atol=1e-6, rtol=0)
    for got, want in zip(gs, (dq, dk, dv)):  # fp32 rounding of sums in another order: relative to the largest
        np.testing.assert_allclose(ringattn.unshard(got, COMM, layout=layout), want,
                                   atol=1e-6 * max(1, np.abs(want).max()), rtol=0)
    # and the single process itself is right
    np.testing.assert_allclose(o, ref.forward(q, k, v, causal=m.get("causal", False), window=m.get("window"),
                                              cu_q=m.get("cu_seqlens"))[0], atol=2e-6, rtol=0)


def document_positions(cu, P, p, layout):
    """Rank p's shard under a document layout, written out here. A dealt document gives rank p its chunks p and
    2P-1-p of 2P; doc-zigzag deals every document, doc-balanced takes them longest first (by causal pairs) whole
    onto the least loaded rank while it stays within the mean and deals the rest, the dealt chunks first."""
    n = [b - a for a, b in zip(cu, cu[1:])]
    w = [x * (x + 1) // 2 for x in n]
    load, owner = [0] * P, [-1] * len(n)
    for i in sorted(range(len(n)), key=lambda i: (-w[i], i)) if layout == "doc-balanced" else []:
        r = min(range(P), key=lambda r: (load[r], r))
        if load[r] + w[i] * P <= sum(w):
            load[r] += w[i] * P
            owner[i] = r
        else:
            load = [x + w[i] for x in load]
    dealt = [cu[i] + j for i in range(len(n)) if owner[i] < 0 for c in (p, 2 * P - 1 - p)
             for j in range(c * n[i] // (2 * P), (c + 1) * n[i] // (2 * P))]
    return dealt + [j for i in range(len(n)) if owner[i] == p for j in range(cu[i], cu[i + 1])]


# doc-zigzag: documents of 1, 2, 13 and 29 tokens; doc-balanced: of 30, 9, 8, 2, 7 and 1 (the longest dealt, the
# others whole where they fit)
@pytest.mark.parametrize("layout,cu", [("doc-zigzag", [0, 1, 3, 16, 45]), ("doc-balanced", [0, 30, 39, 47, 49, 56, 57])])
@pytest.mark.parametrize("strategy,ulysses", [s for s in strategies() if s[0] != "ulysses"])
def test_document_layouts_deal_the_documents_and_equal_one_process(layout, cu, strategy, ulysses):
    L = cu[-1]
    assert ringattn.positions(L, COMM, layout=layout, cu_seqlens=cu).tolist() == \
        document_positions(cu, P, COMM.rank, layout)
    q, k, v, dout = inputs(2, L, 4, 2, 16, seed=12)
    m = dict(causal=True, cu_seqlens=cu)
    o, lse = ringattn.attention(q, k, v, return_lse=True, **m)
    opts = dict(strategy=strategy, layout=layout, ulysses=ulysses, **m)
    qs, ks, vs = (ringattn.shard(x, COMM, layout=layout, cu_seqlens=cu) for x in (q, k, v))
    os_ = ringattn.ring_attention(qs, ks, vs, COMM, **opts)
    np.testing.assert_allclose(ringattn.unshard(os_, COMM, layout=layout, cu_seqlens=cu), o, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=f"{layout} layout deals the documents"):  # on every rank, before any transfer
        ringattn.shard(q, COMM, layout=layout)
    with pytest.raises(ValueError, match=f"{layout} layout deals the documents"):
        ringattn.ring_attention(qs, ks, vs, COMM, strategy=strategy, layout=layout, causal=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_positions_shard_and_unshard(layout):
    L = 3 * P + 2
    pos = ringattn.positions(L, COMM, layout=layout)
    every = np.concatenate(MPI.COMM_WORLD.allgather(pos))
    assert sorted(every.tolist()) == list(range(L)) and np.all(np.diff(pos) > 0)
    x = np.arange(2 * L * 3, dtype=np.int64).reshape(2, L, 3)
    s = ringattn.shard(x, COMM, layout=layout)
    np.testing.assert_array_equal(s, x[:, pos])
    np.testing.assert_array_equal(ringattn.unshard(s, COMM, layout=layout), x)
    np.testing.assert_array_equal(ringattn.unshard(ringattn.shard(x, COMM, layout=layout, dim=-2), COMM,
                                                   layout=layout, dim=-2), x)


def test_a_sub_communicator_runs_its_own_ring():
    sub = ringattn.Communicator(MPI.COMM_WORLD.Split(COMM.rank % 2, COMM.rank))
    assert sub.size == (P + 1 - COMM.rank % 2) // 2
    q, k, v, _ = inputs(1, 17, 2, 1, 8, seed=12 + COMM.rank % 2)
    o = ringattn.ring_attention(*(ringattn.shard(x, sub) for x in (q, k, v)), sub, causal=True)
    np.testing.assert_allclose(ringattn.unshard(o, sub), ringattn.attention(q, k, v, causal=True), atol=2e-6, rtol=0)


def test_bad_input_raises_on_every_rank():
    q, k, v, _ = inputs(1, 4 * P, 4, 2, 16, seed=13)
    qs, ks, vs = (ringattn.shard(x, COMM) for x in (q, k, v))
    # one rank passes another head count: every rank raises (no rank is left waiting)
    bad = qs[:, :, :2] if COMM.rank == 0 else qs
    with pytest.raises(ValueError, match="differ"):
        ringattn.ring_attention(bad, ks, vs, COMM, causal=True)
    with pytest.raises(ValueError, match="layout"):
        ringattn.ring_attention(qs, ks, vs, COMM, layout="spiral")
    with pytest.raises(ValueError, match="strategy"):
        ringattn.ring_attention(qs, ks, vs, COMM, strategy="tree")
    with pytest.raises(ValueError, match="hybrid"):
        ringattn.ring_attention(qs, ks, vs, COMM, strategy="ring", ulysses=2)
    with pytest.raises(TypeError, match="ringattn.Communicator"):
        ringattn.ring_attention(qs, ks, vs, MPI.COMM_WORLD)
    with pytest.raises(TypeError, match="mpi4py communicator"):
        ringattn.Communicator("world")
    # the ring still works afterwards
    o = ringattn.ring_attention(qs, ks, vs, COMM, causal=True)
    np.testing.assert_allclose(ringattn.unshard(o, COMM), ringattn.attention(q, k, v, causal=True), atol=2e-6,
                               rtol=0)


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-6), ("bfloat16", 2e-2)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_autograd_through_the_ring_equals_one_process(dtype, tol, layout):
    import torch

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(14)
    L = 5 * P + 3 if layout != "zigzag" else 6 * P
    q, k, v, w = (torch.randn(s, generator=g).to(dt) for s in ((1, L, 4, 32), (1, L, 2, 32), (1, L, 2, 32),
                                                                (1, L, 4, 32)))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    o = ringattn.torch.attention(*full, causal=True)
    (o.float() * w.float()).sum().backward()
    shards = [ringattn.shard(t, COMM, layout=layout).detach().requires_grad_() for t in (q, k, v)]
    os_ = ringattn.ring_attention(*shards, COMM, layout=layout, causal=True)
    (os_.float() * ringattn.shard(w, COMM, layout=layout).float()).sum().backward()
    assert os_.dtype == dt
    assert (ringattn.unshard(os_.detach(), COMM, layout=layout).float() - o.detach().float()).abs().max() < tol
    for s, f in zip(shards, full):
        got = ringattn.unshard(s.grad, COMM, layout=layout).float()
        assert (got - f.grad.float()).abs().max() < tol * max(1.0, f.grad.float().abs().max().item())
