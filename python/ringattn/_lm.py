"""Hugging Face checkpoints run by ringattn's C++ model (no torch needed)."""

import os

import numpy as np

from . import _core, _ringattn


def _load_tokenizer(path, tokenizer):
    if tokenizer is None or tokenizer is False:
        return None
    if tokenizer != "auto":
        return tokenizer  # anything with encode(text).ids / decode(ids), e.g. a tokenizers.Tokenizer
    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    return Tokenizer.from_file(file)


class LM:
    """A decoder-only checkpoint folder (config.json + model.safetensors of Llama, Qwen2, Mistral or GPT-2)
    as ringattn's model: on this process, or sequence parallel over a Communicator (every rank loads it;
    each computes its tokens of the layout, attention by ``strategy`` across the ranks).

    Text goes through the folder's tokenizer.json with Hugging Face ``tokenizers`` when it is installed.
    """

    def __init__(self, impl, comm, layout, tokenizer):
        self._impl, self._comm, self._layout, self.tokenizer = impl, comm, layout, tokenizer
        raw = impl.config
        self.config = {k: (v if k == "arch" else int(v)) for k, v in raw.items()}

    @classmethod
    def from_pretrained(cls, path, comm=None, *, strategy="ring", layout="zigzag", dtype="float32", threads=0,
                        tokenizer="auto"):
        path = os.fspath(path)
        c = _core._comm(comm) if comm is not None else None
        impl = _ringattn.LanguageModel.load(path, c, str(strategy), str(layout), str(dtype), int(threads))
        return cls(impl, comm, str(layout), _load_tokenizer(path, tokenizer))

    def _ids(self, ids):
        if _core._is_torch(ids):
            ids = ids.detach().cpu().numpy()
        a = np.asarray(ids)
        if a.ndim == 1:
            a = a[None]
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"ids must be integer token ids [B, L] (or [L]), got {a.dtype} {a.shape}")
        return np.ascontiguousarray(a, dtype=np.int64)

    def positions(self, L):
        """This rank's global token positions for sequences of L tokens."""
        if self._comm is None:
            return np.arange(L, dtype=np.int64)
        return _core.positions(L, self._comm, layout=self._layout)

    def forward(self, ids, *, gather=False):
        """Logits (float32) of token ids [B, L], the whole batch on every rank: this rank's tokens
        [B, Ll, vocab] (at self.positions(L); any L of at least a token per rank), or with gather=True all of them [B, L, vocab] on every rank."""
        logits = self._impl.forward(self._ids(ids))
        if gather and self._comm is not None:
            logits = _core.unshard(logits, self._comm, layout=self._layout)
        if _core._is_torch(ids):
            import torch

            return torch.from_numpy(logits)
        return logits

    __call__ = forward

    def _prompts(self, prompts):
        """A list of token-id lists, and whether the prompts were text."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer: the checkpoint has no tokenizer.json (or the "
                                 "tokenizers package is missing); pass token ids or tokenizer=")
            return [list(self.tokenizer.encode(p).ids) for p in prompts], True
        if _core._is_torch(prompts) or isinstance(prompts, np.ndarray):
            return [list(map(int, row)) for row in self._ids(prompts)], False
        if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, (int, np.integer)) for t in prompts):
            return [[int(t) for t in prompts]], False
        if isinstance(prompts, (list, tuple)) and prompts:
            return [[int(t) for t in p] for p in prompts], False
        raise TypeError("prompts must be text, a list of texts, token ids, a list of id lists or an array [B, L]")

    def generate(self, prompts, max_new_tokens=16, *, temperature=None, top_k=0, top_p=1.0, seed=0,
                 ignore_eos=False):
        """New tokens after each prompt (greedy without temperature; top_k / top_p sampling with it,
        seeded: every rank draws the same). Prompts may differ in length. Returns a list of id lists,
        or of texts when the prompts were text. A sequence stops after its EOS unless ignore_eos."""
        ids, text = self._prompts(prompts)
        out = self._impl.generate(ids, int(max_new_tokens), None if temperature is None else float(temperature),
                                  int(top_k), float(top_p), int(seed), bool(ignore_eos))
        return [self.tokenizer.decode(o) for o in out] if text else out

    def __repr__(self):
        c = self.config
        where = "this process" if self._comm is None else f"{self._comm.size} ranks ({self._layout})"
        return f"ringattn.LM({c['arch']}, {c['layers']} layers, d_model {c['d_model']}, on {where})"
