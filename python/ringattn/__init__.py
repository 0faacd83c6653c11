"""ringattn: exact attention over sequences split across processes.

Ring Attention with sequence parallelism (RA+SP) from ringattn's C++ library:
local fused attention on numpy arrays and torch tensors (``attention``), the
same over a sequence sharded across MPI ranks (``ring_attention`` with a
``Communicator`` from mpi4py), and the shard helpers (``shard``, ``unshard``,
``positions``), Hugging Face checkpoints run by the C++ model (``LM``).
``ringattn.torch`` has the autograd functions and
``ringattn.hf`` the Hugging Face attention implementation.
"""

from ._ringattn import __version__
from ._core import (
    Communicator,
    attention,
    attention_backward,
    positions,
    ring_attention,
    ring_attention_backward,
    shard,
    unshard,
)
from ._lm import LM

__all__ = [
    "Communicator",
    "LM",
    "attention",
    "attention_backward",
    "positions",
    "ring_attention",
    "ring_attention_backward",
    "shard",
    "unshard",
    "__version__",
]
