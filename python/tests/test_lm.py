"""ringattn.LM on the committed Hugging Face checkpoints (tests/fixtures/hf): logits equal transformers'
own, greedy decoding equals the recorded Hugging Face tokens; under mpirun the same on every layout."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from mpi4py import MPI
from transformers import AutoModelForCausalLM

import ringattn

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "hf")
NAMES = sorted(os.listdir(FIXTURES))
P = MPI.COMM_WORLD.Get_size()
COMM = ringattn.Communicator(MPI.COMM_WORLD, timeout=60) if P > 1 else None


def reference(name):
    with open(os.path.join(FIXTURES, name, "reference.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layout", ["zigzag", "contiguous", "striped"] if P > 1 else ["contiguous"])
def test_logits_equal_transformers(name, layout):
    path = os.path.join(FIXTURES, name)
    lm = ringattn.LM.from_pretrained(path, COMM, layout=layout)
    ids = np.array(reference(name)["ids"], np.int64)
    # all 19 tokens: no rank count divides them (uneven shards)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids), use_cache=False).logits.numpy()
    mine = lm.forward(ids)
    assert mine.shape == (ids.shape[0], len(lm.positions(ids.shape[1])), lm.config["vocab"])
    np.testing.assert_allclose(mine, theirs[:, lm.positions(ids.shape[1])], atol=2e-5, rtol=0)
    np.testing.assert_allclose(lm.forward(ids, gather=True), theirs, atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens_equal_hugging_face(name):
    ref = reference(name)
    lm = ringattn.LM.from_pretrained(os.path.join(FIXTURES, name), COMM)
    out = lm.generate(ref["prompt"], len(ref["greedy"]), ignore_eos=True)
    assert out == [ref["greedy"]]
    # prompts of different lengths decode together, each as if alone
    short = ref["prompt"][: P + 1]  # the shortest prompt the layout takes is P tokens
    both = lm.generate([ref["prompt"], short], 4, ignore_eos=True)
    assert both[0] == ref["greedy"][:4] and both[1] == lm.generate(short, 4, ignore_eos=True)[0]


def test_bad_input_raises():
    name = NAMES[0]
    lm = ringattn.LM.from_pretrained(os.path.join(FIXTURES, name), COMM)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        lm.generate([[1] * 8 + [lm.config["vocab"]]], 2)
    with pytest.raises(ValueError, match="tokenizer"):
        lm.generate("hello", 2)
    with pytest.raises(ValueError, match="temperature"):
        lm.generate([[1, 2]], 2, temperature=-1.0)
    with pytest.raises(TypeError, match="token ids"):
        lm.forward(np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="config.json|No such|not found|cannot"):
        ringattn.LM.from_pretrained(os.path.join(FIXTURES, "no_such_model"), COMM)


def test_text_through_the_checkpoints_tokenizer(tmp_path):
    """A tokenizer.json in the checkpoint folder is picked up: text in, text out, the same tokens as ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    name = "llama_gqa"
    with open(os.path.join(FIXTURES, name, "config.json")) as f:
        vocab = {f"w{i}": i for i in range(json.load(f)["vocab_size"])}  # one word per id
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / name
    shutil.copytree(os.path.join(FIXTURES, name), folder)
    tok.save(str(folder / "tokenizer.json"))
    lm = ringattn.LM.from_pretrained(str(folder), COMM)
    text = "w5 w17 w3 w99 w42 w8 w61 w23"
    ids = tok.encode(text).ids
    assert ids == [5, 17, 3, 99, 42, 8, 61, 23]
    want = lm.generate([ids], 6, ignore_eos=True)[0]
    got = lm.generate(text, 6, ignore_eos=True)
    assert got == [tok.decode(want)] and got[0].split() == [f"w{i}" for i in want]
