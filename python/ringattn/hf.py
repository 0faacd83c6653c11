"""ringattn as the attention of a Hugging Face ``transformers`` model.

``patch(model, comm, layout=...)`` registers the attention function "ringattn"
in transformers' ``AttentionInterface`` (the library's registry of attention
implementations; nothing inside the model is replaced) and selects it for the
model with ``set_attn_implementation``. Each rank then runs the model on its
shard of the sequence with the global ``position_ids`` of its tokens (``inputs``
gives both), and every attention layer runs ``ringattn.ring_attention`` across
the ranks, causal (and windowed where the layer has a sliding window) by global
position, forward and backward. Llama, Qwen2 and Mistral (any model whose
attention calls the registered function with ``position_ids``).

No mask is registered for "ringattn", so transformers builds none: the mask is
by position. Padding masks are refused; pack documents instead.
"""

import numpy as np
import torch
from transformers import AttentionInterface

from . import _core
from . import torch as rt

NAME = "ringattn"


class _Options:
    def __init__(self, comm, layout, strategy, ulysses, threads):
        self.comm, self.layout, self.strategy, self.ulysses, self.threads = comm, layout, strategy, ulysses, threads
        self.expected = {}  # local length -> this rank's positions (the layout's, checked once per length)

    def check_positions(self, position_ids, n_local):
        if n_local not in self.expected:
            c = _core._comm(self.comm)
            n = np.array([n_local], np.int64)
            L = int(_core._gather_bytes(c, n.view(np.uint8)).view(np.int64).sum())
            self.expected[n_local] = torch.from_numpy(_core.positions(L, self.comm, layout=self.layout))
        want = self.expected[n_local]
        if position_ids is None:
            raise ValueError("ringattn.hf: the model must get position_ids (the global positions of this rank's tokens:"
                             " ringattn.hf.inputs(ids, comm, layout=...))")
        got = position_ids.detach().cpu()
        if got.shape[-1] != want.shape[0] or not bool((got == want).all()):
            raise ValueError(f"ringattn.hf: position_ids {got.reshape(-1)[:8].tolist()}... are not this rank's "
                             f"{self.layout} positions {want[:8].tolist()}... (ringattn.hf.inputs gives them)")


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_ids=None,
               sliding_window=None, **kwargs):
    """query [B, H, L, d], key/value [B, Hkv, L, d] (after RoPE) -> ([B, L, H, d], None)."""
    opts = getattr(module, "_ringattn", None)
    if opts is None:
        raise RuntimeError(f"{type(module).__name__} uses attn_implementation '{NAME}' but its model was not "
                           "given a communicator: call ringattn.hf.patch(model, comm)")
    if attention_mask is not None:
        raise ValueError("ringattn.hf: attention masks (padding) are not supported; the mask is causal by position")
    if dropout:
        raise ValueError(f"ringattn.hf: attention dropout ({dropout}) is not supported; set attention_dropout=0")
    opts.check_positions(position_ids, query.shape[2])
    causal = bool(getattr(module, "is_causal", True))
    window = (int(sliding_window) - 1, 0 if causal else int(sliding_window) - 1) if sliding_window else None
    o = rt.ring_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), opts.comm,
                          strategy=opts.strategy, layout=opts.layout, causal=causal, scale=scaling, window=window,
                          ulysses=opts.ulysses, threads=opts.threads)
    return o, None


def patch(model, comm, *, layout="zigzag", strategy="ring", ulysses=None, threads=0):
    """Makes model's attention ringattn's sequence-parallel attention over comm; returns model."""
    _core._comm(comm)
    AttentionInterface.register(NAME, _attention)
    opts = _Options(comm, str(layout), str(strategy), ulysses, int(threads))
    n = 0
    for m in model.modules():
        if hasattr(m, "num_key_value_groups"):  # the attention layers of Llama, Qwen2, Mistral, ...
            m._ringattn = opts
            n += 1
    if n == 0:
        raise ValueError(f"ringattn.hf.patch: found no attention layers in {type(model).__name__}")
    model.set_attn_implementation(NAME)
    return model


def inputs(input_ids, comm, *, layout="zigzag"):
    """This rank's (input_ids, position_ids) of a full [B, L] batch, for model(input_ids=..., position_ids=...)."""
    pos = torch.from_numpy(_core.positions(input_ids.shape[1], comm, layout=layout))
    return input_ids[:, pos], pos[None].expand(input_ids.shape[0], -1)


def labels(input_ids, comm, *, layout="zigzag", ignore_index=-100):
    """This rank's next-token labels of a full [B, L] batch: the shift happens before sharding (the next
    token is usually on another rank); the last position gets ignore_index."""
    shifted = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], ignore_index)], dim=1)
    return shifted[:, torch.from_numpy(_core.positions(input_ids.shape[1], comm, layout=layout))]
