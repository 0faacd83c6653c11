"""ringattn.torch: autograd against float64 torch autograd of the naive attention, equality with
torch's scaled_dot_product_attention (fp32, bf16), zero-copy, torch.compile, errors."""

import pytest
import torch
import torch.nn.functional as F

import ringattn
import ringattn.torch as rt
from ringattn import _ringattn
import reference as ref


def naive(q, k, v, causal=False, window=None, cu=None, scale=None):
    """Differentiable float64 attention [B, L, H, d] with the reference's mask."""
    H, d = q.shape[2], q.shape[3]
    K = k.repeat_interleave(H // k.shape[2], dim=2)
    V = v.repeat_interleave(H // v.shape[2], dim=2)
    m = torch.from_numpy(ref.mask(q.shape[1], k.shape[1], causal, window, cu))
    s = torch.einsum("bihd,bjhd->bhij", q, K) * (scale or d ** -0.5)
    p = torch.softmax(s.masked_fill(~m, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhij,bjhd->bihd", p, V)


def leaves(*shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("m", [dict(), dict(causal=True), dict(causal=True, window=(5, 0)), dict(window=(3, 4)),
                               dict(causal=True, cu_seqlens=[0, 9, 9, 30, 41])])
@pytest.mark.parametrize("shape", [(2, 41, 4, 2, 16), (1, 41, 3, 1, 64)])
def test_gradients_equal_float64_autograd(m, shape):
    B, L, H, Hkv, d = shape
    q, k, v = leaves((B, L, H, d), (B, L, Hkv, d), (B, L, Hkv, d))
    w = torch.randn(B, L, H, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    o = rt.attention(q, k, v, **m)
    (o.double() * w).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64 = naive(q64, k64, v64, m.get("causal", False), m.get("window"), m.get("cu_seqlens"))
    (o64 * w).sum().backward()
    assert (o.double() - o64).abs().max() < 2e-6
    for a, b in zip(got, (q64.grad, k64.grad, v64.grad)):
        assert (a.double() - b).abs().max() < 1e-5 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("causal", [False, True])
def test_equals_scaled_dot_product_attention(dtype, tol, causal):
    q, k, v = leaves((2, 64, 8, 32), (2, 64, 2, 32), (2, 64, 2, 32), dtype=dtype, seed=2)
    o = rt.attention(q, k, v, causal=causal)
    theirs = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                            is_causal=causal, enable_gqa=True).transpose(1, 2)
    assert o.dtype == dtype and o.shape == q.shape
    assert (o.float() - theirs.float()).abs().max() < tol
    g = torch.randn(o.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    mine = torch.autograd.grad(o, (q, k, v), g)
    ref_grads = torch.autograd.grad(theirs, (q, k, v), g)
    for a, b in zip(mine, ref_grads):
        assert (a.float() - b.float()).abs().max() < tol * 10 * max(1.0, b.float().abs().max().item())


def test_tensors_go_in_without_a_copy():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        qkv = torch.randn(1, 16, 3, 4, 32).to(dtype)
        q = qkv[:, :, 0]  # a strided view
        assert not q.is_contiguous()
        assert _ringattn.data_pointer(q) == q.data_ptr()
        assert _ringattn.data_pointer(q.transpose(1, 2)) == q.data_ptr()
    q, k, v = leaves((1, 16, 4, 32), (1, 16, 4, 32), (1, 16, 4, 32))
    o = rt.attention(q.transpose(1, 2).transpose(1, 2), k, v)  # views of leaves needing grad
    assert (o - rt.attention(q.detach().clone(), k.detach(), v.detach())).abs().max() == 0


def test_ringattn_attention_dispatches_torch_tensors():
    q, k, v = leaves((1, 12, 2, 16), (1, 12, 2, 16), (1, 12, 2, 16))
    o, lse = ringattn.attention(q, k, v, causal=True, return_lse=True)
    assert isinstance(o, torch.Tensor) and o.requires_grad and lse.dtype == torch.float32
    o.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_compiles_into_one_graph():
    q, k, v = leaves((1, 32, 4, 16), (1, 32, 2, 16), (1, 32, 2, 16))

    def f(q, k, v):
        return (rt.attention(q * 2, k, v, causal=True) ** 2).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    a = compiled(q, k, v)
    ga = torch.autograd.grad(a, (q, k, v))
    b = f(q, k, v)
    gb = torch.autograd.grad(b, (q, k, v))
    assert torch.allclose(a, b) and all(torch.allclose(x, y) for x, y in zip(ga, gb))
    assert torch.ops.ringattn.attention.default is not None


def test_bad_tensors_raise():
    q, k, v = leaves((1, 8, 4, 16), (1, 8, 2, 16), (1, 8, 2, 16))
    with pytest.raises(TypeError, match="q is float64"):
        rt.attention(q.double(), k, v)
    with pytest.raises(ValueError, match="head dims differ"):
        rt.attention(q, k[..., :8], v)
    with pytest.raises(TypeError, match="torch tensor"):
        rt.attention(q, k.detach().numpy(), v)
    with pytest.raises(ValueError, match="scale"):
        rt.attention(q, k, v, scale=0.0)
    with pytest.raises(TypeError, match="k is a meta tensor; .*host memory"):
        rt.attention(q, k.to("meta"), v)
