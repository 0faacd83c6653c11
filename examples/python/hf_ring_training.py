"""Training steps of a Hugging Face Llama/Qwen2/Mistral model with ring attention across MPI ranks.

    mpirun -np 2 .venv/bin/python examples/python/hf_ring_training.py [--model DIR] [--steps 3]

Every rank loads the same model (a checkpoint folder, default: the tiny random
Llama in tests/fixtures/hf/llama_gqa) and ringattn.hf.patch makes its attention
ringattn's ring over the ranks. The batch is split by sequence (zigzag layout):
each rank runs its tokens with their global positions, computes the loss of its
tokens' next-token labels, and the gradients are summed over the ranks before
each optimizer step. --check also runs the unpatched model on the whole sequence
in this process and prints how far the loss and gradients are from it.
"""

import argparse
import os

import torch
import torch.nn.functional as F
from mpi4py import MPI
from transformers import AutoModelForCausalLM

import ringattn
import ringattn.hf

here = os.path.dirname(os.path.abspath(__file__))
a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
a.add_argument("--model", default=os.path.join(here, "..", "..", "tests", "fixtures", "hf", "llama_gqa"))
a.add_argument("--seq", type=int, default=64)
a.add_argument("--batch", type=int, default=2)
a.add_argument("--steps", type=int, default=3)
a.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous", "striped"])
a.add_argument("--check", action="store_true")
args = a.parse_args()

comm = ringattn.Communicator(MPI.COMM_WORLD)
model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
if args.check:
    reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
ringattn.hf.patch(model, comm, layout=args.layout)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
vocab = model.config.vocab_size
targets = args.batch * (args.seq - 1)  # next-token targets of the whole batch

for step in range(args.steps):
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(step))
    local_ids, position_ids = ringattn.hf.inputs(ids, comm, layout=args.layout)
    labels = ringattn.hf.labels(ids, comm, layout=args.layout)
    logits = model(input_ids=local_ids, position_ids=position_ids, use_cache=False).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / targets
    opt.zero_grad()
    loss.backward()
    total = comm.all_reduce(loss.detach().clone()).item()
    for p in model.parameters():
        comm.all_reduce(p.grad)
    line = f"step {step}: loss {total:.6f}"
    if args.check:
        reference.zero_grad()
        ref_loss = reference(input_ids=ids, labels=ids, use_cache=False).loss
        ref_loss.backward()
        worst = max((p.grad - r.grad).abs().max().item() for p, r in zip(model.parameters(), reference.parameters()))
        line += f" (one process: {ref_loss.item():.6f}, largest gradient difference {worst:.2e})"
    opt.step()
    if args.check:  # the reference takes the same step from the same gradients
        with torch.no_grad():
            for p, r in zip(model.parameters(), reference.parameters()):
                r.copy_(p)
    if comm.rank == 0:
        print(line, flush=True)
