"""Naive float64 attention (forward and backward) by the mask rule of ringattn/attention.h:
query i sees key j iff same document and q_pos[i] - left <= k_pos[j] <= q_pos[i] + right
(-1: unbounded side; causal: right = 0), positions bottom-right aligned (q_pos[i] = i + Lk - Lq)
or restarting in each document of cu_seqlens."""

import numpy as np


def positions_and_docs(Lq, Lk, cu_q=None, cu_k=None):
    if cu_q is None:
        return np.arange(Lq) + (Lk - Lq), np.arange(Lk), np.zeros(Lq, int), np.zeros(Lk, int)
    cu_k = cu_q if cu_k is None else cu_k
    qp, kp, qd, kd = [], [], [], []
    for n in range(len(cu_q) - 1):
        lq, lk = cu_q[n + 1] - cu_q[n], cu_k[n + 1] - cu_k[n]
        qp += list(np.arange(lq) + (lk - lq))
        kp += list(range(lk))
        qd += [n] * lq
        kd += [n] * lk
    return np.array(qp), np.array(kp), np.array(qd), np.array(kd)


def mask(Lq, Lk, causal=False, window=None, cu_q=None, cu_k=None):
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    qp, kp, qd, kd = positions_and_docs(Lq, Lk, cu_q, cu_k)
    d = kp[None, :] - qp[:, None]
    m = qd[:, None] == kd[None, :]
    if right >= 0:
        m &= d <= right
    if left >= 0:
        m &= -d <= left
    return m


def _expand(k, H):
    return np.repeat(k.astype(np.float64), H // k.shape[2], axis=2)


def _probabilities(q, k, causal, scale, window, cu_q, cu_k):
    """P [B, H, Lq, Lk] (masked softmax rows, 0 where a row sees no key) and the row max and sum."""
    B, Lq, H, d = q.shape
    scale = 1 / np.sqrt(d) if scale is None else scale
    s = np.einsum("bihd,bjhd->bhij", q.astype(np.float64), _expand(k, H)) * scale
    s = np.where(mask(Lq, k.shape[1], causal, window, cu_q, cu_k), s, -np.inf)
    mx = np.max(s, axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0)
    p = np.exp(s - mx)
    z = p.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(z > 0, p / z, 0), mx[..., 0], z[..., 0], scale


def forward(q, k, v, causal=False, scale=None, window=None, cu_q=None, cu_k=None):
    """o [B, Lq, H, d] and lse [B, H, Lq] in float64; rows that see no key: o = 0, lse = -inf."""
    p, mx, z, _ = _probabilities(q, k, causal, scale, window, cu_q, cu_k)
    with np.errstate(divide="ignore"):
        lse = np.where(z > 0, np.log(z) + mx, -np.inf)
    return np.einsum("bhij,bjhd->bihd", p, _expand(v, q.shape[2])), lse


def backward(dout, q, k, v, causal=False, scale=None, window=None, cu_q=None, cu_k=None):
    """dq, dk, dv in float64 (dk, dv summed over each GQA group's query heads)."""
    B, Lq, H, d = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    p, _, _, scale = _probabilities(q, k, causal, scale, window, cu_q, cu_k)
    K, V = _expand(k, H), _expand(v, H)
    Q, dO = q.astype(np.float64), dout.astype(np.float64)
    dV = np.einsum("bhij,bihd->bjhd", p, dO)
    dP = np.einsum("bihd,bjhd->bhij", dO, V)
    dS = p * (dP - np.sum(dP * p, axis=-1, keepdims=True))
    dQ = np.einsum("bhij,bjhd->bihd", dS, K) * scale
    dK = np.einsum("bhij,bihd->bjhd", dS, Q) * scale
    g = H // Hkv
    fold = lambda x: x.reshape(B, Lk, Hkv, g, d).sum(3)
    return dQ, fold(dK), fold(dV)
