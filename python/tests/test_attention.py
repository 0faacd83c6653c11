"""Local attention on numpy arrays against the float64 reference; bad input raises."""

import numpy as np
import pytest

import ringattn
from ringattn import _ringattn
import reference as ref

# (B, Lq, Lk, H, Hkv, d): one token, odd lengths, GQA, Lq != Lk, d = 128.
SHAPES = [(1, 1, 1, 1, 1, 8), (2, 37, 37, 4, 2, 16), (1, 13, 29, 6, 3, 40), (1, 29, 13, 2, 1, 24),
          (1, 70, 70, 2, 2, 128)]
MASKS = [dict(), dict(causal=True), dict(window=(5, 0)), dict(window=(3, 2)), dict(causal=True, window=(7, -1))]


def inputs(B, Lq, Lk, H, Hkv, d, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Lq, H, d)).astype(dtype)
    k = rng.standard_normal((B, Lk, Hkv, d)).astype(dtype)
    v = rng.standard_normal((B, Lk, Hkv, d)).astype(dtype)
    dout = rng.standard_normal((B, Lq, H, d)).astype(dtype)
    return q, k, v, dout


def ref_args(m):
    return dict(causal=m.get("causal", False), window=m.get("window"))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", MASKS)
def test_forward_and_backward_equal_the_float64_reference(shape, m):
    q, k, v, dout = inputs(*shape)
    o, lse = ringattn.attention(q, k, v, return_lse=True, **m)
    ro, rlse = ref.forward(q, k, v, **ref_args(m))
    assert o.dtype == np.float32 and o.shape == q.shape and lse.shape == (shape[0], shape[3], shape[1])
    np.testing.assert_allclose(o, ro, atol=2e-6, rtol=0)
    seen = np.isfinite(rlse)
    np.testing.assert_allclose(lse[seen], rlse[seen], atol=2e-6, rtol=1e-6)
    assert np.all(np.isneginf(lse[~seen])) and np.all(o.transpose(0, 2, 1, 3)[~seen] == 0)
    dq, dk, dv = ringattn.attention_backward(dout, q, k, v, o, lse, **m)
    for got, want in zip((dq, dk, dv), ref.backward(dout, q, k, v, **ref_args(m))):
        np.testing.assert_allclose(got, want, atol=1e-5 * max(1, np.abs(want).max()), rtol=0)


def test_packed_documents_equal_each_document_alone():
    cu = [0, 5, 5, 17, 37, 38]  # an empty document and a one-token one
    q, k, v, dout = inputs(2, 38, 38, 4, 2, 16, seed=3)
    o, lse = ringattn.attention(q, k, v, causal=True, cu_seqlens=cu, return_lse=True)
    dq, dk, dv = ringattn.attention_backward(dout, q, k, v, o, lse, causal=True, cu_seqlens=np.array(cu, np.int32))
    for a, b in zip(cu[:-1], cu[1:]):
        if a == b:
            continue
        ro, _ = ref.forward(q[:, a:b], k[:, a:b], v[:, a:b], causal=True)
        np.testing.assert_allclose(o[:, a:b], ro, atol=2e-6, rtol=0)
        for got, want in zip((dq, dk, dv), ref.backward(dout[:, a:b], q[:, a:b], k[:, a:b], v[:, a:b], causal=True)):
            np.testing.assert_allclose(got[:, a:b], want, atol=1e-5 * max(1, np.abs(want).max()), rtol=0)


def test_documents_with_different_query_and_key_offsets():
    cu_q, cu_k = [0, 3, 10], [0, 8, 20]
    q, k, v, _ = inputs(1, 10, 20, 2, 1, 16, seed=4)
    o = ringattn.attention(q, k, v, causal=True, cu_seqlens=cu_q, cu_seqlens_k=cu_k)
    ro, _ = ref.forward(q, k, v, causal=True, cu_q=cu_q, cu_k=cu_k)
    np.testing.assert_allclose(o, ro, atol=2e-6, rtol=0)


def test_explicit_scale():
    q, k, v, dout = inputs(1, 19, 19, 2, 2, 32, seed=5)
    o = ringattn.attention(q, k, v, scale=0.37, causal=True)
    np.testing.assert_allclose(o, ref.forward(q, k, v, causal=True, scale=0.37)[0], atol=2e-6, rtol=0)


def test_strided_views_are_used_without_a_copy():
    # q, k, v as views into one packed [B, L, 3, H, d] projection, and a reversed-head view.
    rng = np.random.default_rng(6)
    qkv = rng.standard_normal((2, 23, 3, 4, 32)).astype(np.float32)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.flags.c_contiguous
    for a in (q, k, v, q[:, :, ::-1]):
        assert _ringattn.data_pointer(a) == a.__array_interface__["data"][0]
    o = ringattn.attention(q, k, v, causal=True)
    np.testing.assert_allclose(o, ref.forward(q, k, v, causal=True)[0], atol=2e-6, rtol=0)
    o2 = ringattn.attention(q[:, :, ::-1], k[:, :, ::-1], v[:, :, ::-1])
    np.testing.assert_allclose(o2, ref.forward(q[:, :, ::-1], k[:, :, ::-1], v[:, :, ::-1])[0], atol=2e-6, rtol=0)


def test_float16_inputs():
    q, k, v, _ = inputs(1, 33, 33, 4, 2, 64, seed=7, dtype=np.float16)
    o = ringattn.attention(q, k, v, causal=True)
    assert o.dtype == np.float16
    np.testing.assert_allclose(o.astype(np.float64), ref.forward(q, k, v, causal=True)[0], atol=2e-3, rtol=0)


def test_read_only_inputs():
    q, k, v, _ = inputs(1, 9, 9, 2, 1, 16)
    for a in (q, k, v):
        a.setflags(write=False)
    np.testing.assert_allclose(ringattn.attention(q, k, v), ref.forward(q, k, v)[0], atol=2e-6, rtol=0)


def test_threads_give_the_same_result():
    q, k, v, _ = inputs(2, 64, 64, 4, 4, 32, seed=8)
    a, b = ringattn.attention(q, k, v, causal=True, threads=1), ringattn.attention(q, k, v, causal=True, threads=2)
    np.testing.assert_array_equal(a, b)


def test_bad_input_raises_the_library_message():
    q, k, v, dout = inputs(1, 8, 8, 4, 2, 16)
    with pytest.raises(TypeError, match="q is float64; ringattn takes float32, bfloat16 or float16"):
        ringattn.attention(q.astype(np.float64), k, v)
    with pytest.raises(TypeError, match="k is int32"):
        ringattn.attention(q, k.astype(np.int32), v)
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        ringattn.attention(q.tolist(), k, v)
    with pytest.raises(ValueError, match="head dims differ"):
        ringattn.attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match="divisible|multiple|Hkv"):
        ringattn.attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match=r"\[B, Lq, H, d\]|rank|dimensions"):
        ringattn.attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="dtype|same"):
        ringattn.attention(q, k.astype(np.float16), v)
    with pytest.raises(ValueError, match="causal"):
        ringattn.attention(q, k, v, causal=True, window=(2, 3))
    with pytest.raises(TypeError, match="window must be a pair"):
        ringattn.attention(q, k, v, window=4)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ringattn.attention(q, k, v, cu_seqlens=[0, 3, 7])  # does not end at L = 8
    with pytest.raises(ValueError, match="cu_seqlens"):
        ringattn.attention(q, k, v, cu_seqlens=[0, 5, 3, 8])
    with pytest.raises(ValueError, match="scale"):
        ringattn.attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="scale"):
        ringattn.attention(q, k, v, scale=-1.0)
    o, lse = ringattn.attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError):
        ringattn.attention_backward(dout[:, :4], q, k, v, o, lse)
