#!/usr/bin/env python3
"""A float64 NumPy reference of a Hugging Face causal LM's logits at chosen
positions, written from the architectures' definitions (independent of the C++
model), and cheap for long sequences when the last layer is the only one: its
keys and values are computed for every position in chunks, its queries, MLP,
final norm and head only at the positions asked for. Earlier layers run whole
(causal attention in query chunks), so a many-layer model costs O(L^2).

  lm_reference.py MODEL_DIR IDS.npy POSITIONS.npy [--check LOGITS.npy] [--tol 1e-4] [--out REF.npy]

MODEL_DIR: config.json + model.safetensors (fp32/bf16/fp16; llama, mistral,
qwen2, gpt2). IDS: int [L] or [B, L]; POSITIONS: int [n]. --check compares
ringattn's logits [B, n, vocab] (`ringattn forward --positions`) and exits 1
when max |got - ref| / max |ref| exceeds --tol. Needs only numpy.
"""
import argparse
import json
import math
import struct
import sys

import numpy as np


def load_safetensors(path):
    """name -> float64 array (the format: 8-byte header length, JSON header, raw data)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, e in head.items():
        if name == "__metadata__":
            continue
        lo, hi = e["data_offsets"]
        raw = data[lo:hi]
        if e["dtype"] == "F32":
            a = np.frombuffer(raw, "<f4")
        elif e["dtype"] == "F16":
            a = np.frombuffer(raw, "<f2")
        elif e["dtype"] == "BF16":
            a = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise SystemExit(f"{path}: tensor {name} has dtype {e['dtype']} (want F32, F16 or BF16)")
        out[name.removeprefix("transformer.")] = a.astype(np.float64).reshape(e["shape"])
    return out


def inv_freq(cfg, hd):
    """RoPE frequencies as transformers computes them (default, linear, llama3)."""
    rp = cfg.get("rope_parameters") or {}
    sc = cfg.get("rope_scaling") or rp
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = sc.get("rope_type", sc.get("type", "default"))
    f = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    if kind == "default":
        return f
    if kind == "linear":
        return f / sc["factor"]
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / f
        g = np.where(wavelen > old / lo, f / factor, f)
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return np.where(medium, (1 - smooth) * g / factor + smooth * g, g)
    raise SystemExit(f"rope type {kind!r} is not in this reference (default, linear, llama3)")


def rope(x, pos, f):
    """x [n, H, hd] at positions pos [n]: x cos + rotate_half(x) sin."""
    a = pos[:, None].astype(np.float64) * f[None, :]
    cos, sin = np.cos(np.concatenate([a, a], 1))[:, None], np.sin(np.concatenate([a, a], 1))[:, None]
    h = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., h:], x[..., :h]], -1) * sin


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def attend(q, qpos, k, v, window):
    """Causal softmax attention of queries q [n, H, hd] at qpos over keys/values
    [m, Hkv, hd] at positions 0..m-1, key j seen by query i iff i - window < j <= i."""
    H, Hkv, hd = q.shape[1], k.shape[1], q.shape[2]
    out = np.empty_like(q)
    kpos = np.arange(k.shape[0])
    step = max(1, (1 << 24) // (H * k.shape[0]))
    for s in range(0, q.shape[0], step):
        qs, ps = q[s:s + step], qpos[s:s + step]
        mask = kpos[None, :] <= ps[:, None]
        if window:
            mask &= kpos[None, :] > ps[:, None] - window
        for h in range(H):
            sc = qs[:, h] @ k[:, h // (H // Hkv)].T / math.sqrt(hd)
            sc = np.where(mask, sc, -np.inf)
            p = np.exp(sc - sc.max(1, keepdims=True))
            out[s:s + step, h] = (p / p.sum(1, keepdims=True)) @ v[:, h // (H // Hkv)]
    return out


class Model:
    def __init__(self, d):
        self.cfg = c = json.load(open(d + "/config.json"))
        self.w = load_safetensors(d + "/model.safetensors")
        self.arch = c["model_type"]
        if self.arch not in ("llama", "mistral", "qwen2", "gpt2"):
            raise SystemExit(f"model_type {self.arch!r} is not in this reference")
        if self.arch == "gpt2":
            self.D, self.H, self.N = c["n_embd"], c["n_head"], c["n_layer"]
            self.Hkv, self.hd, self.eps = self.H, self.D // self.H, c["layer_norm_epsilon"]
        else:
            self.D, self.H, self.N = c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]
            self.Hkv = c.get("num_key_value_heads") or self.H
            self.hd = c.get("head_dim") or self.D // self.H
            self.eps = c["rms_norm_eps"]
            self.f = inv_freq(c, self.hd)
        W = c.get("sliding_window") if (self.arch == "mistral" or c.get("use_sliding_window")) else None
        types = c.get("layer_types") or [
            "sliding_attention" if W and (self.arch == "mistral" or i >= c.get("max_window_layers", 0))
            else "full_attention" for i in range(self.N)]
        self.window = [W if t == "sliding_attention" else None for t in types]

    def embed(self, ids, pos):
        if self.arch == "gpt2":
            return self.w["wte.weight"][ids] + self.w["wpe.weight"][pos]
        return self.w["model.embed_tokens.weight"][ids]

    def qkv(self, i, h, pos):
        """The layer's normed input's q, k, v [n, heads, hd] at positions pos (RoPE applied)."""
        w, n = self.w, h.shape[0]
        if self.arch == "gpt2":
            x = layer_norm(h, w[f"h.{i}.ln_1.weight"], w[f"h.{i}.ln_1.bias"], self.eps)
            qkv = x @ w[f"h.{i}.attn.c_attn.weight"] + w[f"h.{i}.attn.c_attn.bias"]
            return [t.reshape(n, self.H, self.hd) for t in np.split(qkv, 3, 1)]
        p = f"model.layers.{i}."
        x = rms_norm(h, w[p + "input_layernorm.weight"], self.eps)
        out = []
        for name, heads in (("q", self.H), ("k", self.Hkv), ("v", self.Hkv)):
            t = x @ w[p + f"self_attn.{name}_proj.weight"].T
            if p + f"self_attn.{name}_proj.bias" in w:
                t = t + w[p + f"self_attn.{name}_proj.bias"]
            t = t.reshape(n, heads, self.hd)
            out.append(rope(t, pos, self.f) if name != "v" else t)
        return out

    def finish(self, i, h, o):
        """The residual stream after layer i given its attention output o [n, H, hd]."""
        w, o = self.w, o.reshape(o.shape[0], -1)
        if self.arch == "gpt2":
            h = h + o @ w[f"h.{i}.attn.c_proj.weight"] + w[f"h.{i}.attn.c_proj.bias"]
            x = layer_norm(h, w[f"h.{i}.ln_2.weight"], w[f"h.{i}.ln_2.bias"], self.eps)
            a = x @ w[f"h.{i}.mlp.c_fc.weight"] + w[f"h.{i}.mlp.c_fc.bias"]
            a = 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))
            return h + a @ w[f"h.{i}.mlp.c_proj.weight"] + w[f"h.{i}.mlp.c_proj.bias"]
        p = f"model.layers.{i}."
        h = h + o @ w[p + "self_attn.o_proj.weight"].T
        x = rms_norm(h, w[p + "post_attention_layernorm.weight"], self.eps)
        g, u = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
        return h + (g / (1 + np.exp(-g)) * u) @ w[p + "mlp.down_proj.weight"].T

    def head(self, h):
        w = self.w
        if self.arch == "gpt2":
            return layer_norm(h, w["ln_f.weight"], w["ln_f.bias"], self.eps) @ w["wte.weight"].T
        table = w.get("lm_head.weight", w["model.embed_tokens.weight"])
        return rms_norm(h, w["model.norm.weight"], self.eps) @ table.T

    def logits_at(self, ids, at):
        """ids [L] of one row -> logits [len(at), vocab] at positions at."""
        m = int(at.max()) + 1  # nothing after the last position asked for matters
        pos = np.arange(m)
        h = self.embed(ids[:m], pos)
        for i in range(self.N - 1):
            q, k, v = self.qkv(i, h, pos)
            h = self.finish(i, h, attend(q, pos, k, v, self.window[i]))
        last = self.N - 1
        k, v = [], []
        for s in range(0, m, 65536):  # the last layer's keys and values, in chunks
            _, ks, vs = self.qkv(last, h[s:s + 65536], pos[s:s + 65536])
            k.append(ks), v.append(vs)
        k, v = np.concatenate(k), np.concatenate(v)
        q = self.qkv(last, h[at], at)[0]
        return self.head(self.finish(last, h[at], attend(q, at, k, v, self.window[last])))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("ids")
    ap.add_argument("positions")
    ap.add_argument("--check", help="ringattn's logits [B, n, vocab] to compare")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--out", help="write the reference logits here (.npy, float64)")
    a = ap.parse_args()
    model = Model(a.model)
    ids = np.load(a.ids).astype(np.int64)
    ids = ids[None] if ids.ndim == 1 else ids
    at = np.load(a.positions).astype(np.int64).reshape(-1)
    if at.min() < 0 or at.max() >= ids.shape[1]:
        raise SystemExit(f"positions must be in [0, {ids.shape[1]})")
    ref = np.stack([model.logits_at(row, at) for row in ids])
    if a.out:
        np.save(a.out, ref)
    if not a.check:
        return 0
    got = np.load(a.check).astype(np.float64)
    if got.shape != ref.shape:
        print(f"{a.check}: shape {got.shape}, the reference's {ref.shape}")
        return 1
    err = np.abs(got - ref).max() / np.abs(ref).max()
    rows = np.abs(got - ref).max(-1) / np.abs(ref).max(-1)
    worst = np.unravel_index(rows.argmax(), rows.shape)
    print(json.dumps({"positions": int(at.size), "rows": int(ids.shape[0]), "max_rel_error": err,
                      "worst_position": int(at[worst[1]]), "worst_position_rel_error": float(rows.max()),
                      "argmax_agree": int((got.argmax(-1) == ref.argmax(-1)).sum()), "tol": a.tol}))
    return 0 if err <= a.tol else 1


if __name__ == "__main__":
    sys.exit(main())
