"""A Hugging Face model patched with ringattn.hf (run under mpirun): each rank runs its shard of the
sequence; logits, loss and gradients equal the unpatched model on the whole sequence in one process."""

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

import ringattn
import ringattn.hf

COMM = ringattn.Communicator(MPI.COMM_WORLD, timeout=60)
COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
              num_hidden_layers=2, vocab_size=97, attention_dropout=0.0)
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON)),
    "qwen2_window": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=5,
                                                         max_window_layers=1)),
    "mistral_window": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=6)),
}


def model_pair(name):
    torch.manual_seed(0)
    ref = MODELS[name]()
    ref.set_attn_implementation("sdpa")
    torch.manual_seed(0)
    mine = MODELS[name]()
    mine.load_state_dict(ref.state_dict())
    return ref, mine


# The ring on every layout; all-gather; Ulysses (equal shards, the 2 kv heads split over the ranks:
# at 2 ranks only).
CASES = [(layout, "ring") for layout in ("zigzag", "contiguous", "striped")] + [("zigzag", "allgather")]
if 2 % COMM.size == 0:
    CASES.append(("zigzag", "ulysses"))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("layout,strategy", CASES)
def test_patched_model_equals_one_process(name, layout, strategy):
    ref, mine = model_pair(name)
    ringattn.hf.patch(mine, COMM, layout=layout, strategy=strategy)
    B, L = 2, 6 * COMM.size + 1 if layout != "zigzag" else 6 * COMM.size  # uneven shards where the layout allows
    ids = torch.randint(0, COMMON["vocab_size"], (B, L), generator=torch.Generator().manual_seed(1))
    out_ref = ref(input_ids=ids, labels=ids, use_cache=False)
    out_ref.loss.backward()

    local_ids, pos = ringattn.hf.inputs(ids, COMM, layout=layout)
    labels = ringattn.hf.labels(ids, COMM, layout=layout)
    logits = mine(input_ids=local_ids, position_ids=pos, use_cache=False).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / (B * (L - 1))
    loss.backward()
    total = COMM.all_reduce(loss.detach().clone())
    for p in mine.parameters():
        COMM.all_reduce(p.grad)

    full_logits = ringattn.unshard(logits.detach(), COMM, layout=layout)
    assert (full_logits - out_ref.logits).abs().max() < 1e-5
    assert abs(total.item() - out_ref.loss.item()) < 1e-5
    worst = max(((a.grad - b.grad).abs().max() / max(1.0, b.grad.abs().max())).item()
                for a, b in zip(mine.parameters(), ref.parameters()))
    assert worst < 1e-4


def test_wrong_positions_and_masks_are_refused():
    _, mine = model_pair("llama")
    ringattn.hf.patch(mine, COMM, layout="zigzag")
    ids = torch.randint(0, 97, (1, 4 * COMM.size), generator=torch.Generator().manual_seed(2))
    local_ids, pos = ringattn.hf.inputs(ids, COMM, layout="zigzag")
    with pytest.raises(ValueError, match="position_ids"):
        mine(input_ids=local_ids, use_cache=False)  # without the global positions
    with pytest.raises(ValueError, match="zigzag positions"):
        mine(input_ids=local_ids, position_ids=pos.flip(-1), use_cache=False)
    # an unpatched model selecting the implementation by name says what is missing
    _, other = model_pair("llama")
    other.set_attn_implementation("ringattn")
    with pytest.raises(RuntimeError, match="ringattn.hf.patch"):
        other(input_ids=local_ids, position_ids=pos, use_cache=False)
