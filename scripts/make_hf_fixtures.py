#!/usr/bin/env python3
"""Tiny random Hugging Face checkpoints and what transformers computes on them:
the reference for the language models of issue 19 (tests/fixtures/hf/<name>/).

For each architecture (odd sizes, GQA, tied and untied heads, an explicit head_dim,
llama3 RoPE scaling, sliding windows shorter than the sequence: mistral's on
every layer, qwen2's on the layers from max_window_layers on) it writes, with transformers' own save_pretrained:
  config.json, model.safetensors      the checkpoint (fp32; tied heads stored once)
and with the model in fp32 eval mode:
  reference.safetensors               logits [2, 19, vocab] of `ids`; grad.<parameter>:
                                      d(loss)/d(parameter) of the causal-LM loss on `ids`
                                      (labels = ids, shifted by the model, mean over tokens)
  reference.json                      ids, loss, a greedy continuation (prompt = ids[0][:8],
                                      10 new tokens), the library versions

Needs a venv with the PyPI packages torch, transformers, safetensors (not needed
by ./test.sh; the outputs, ~0.5 MB, are committed):
    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install torch transformers safetensors
    /tmp/hf/bin/python scripts/make_hf_fixtures.py
"""
import json
import os
import shutil

import torch
import transformers
from safetensors.torch import save_file
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "hf")
VOCAB, B, L, PROMPT, NEW = 101, 2, 19, 8, 10


def models():
    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                  max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    yield "llama_gqa", LlamaForCausalLM(LlamaConfig(num_attention_heads=6, num_key_value_heads=2,
                                                    tie_word_embeddings=False, **common))
    yield "llama_tied_llama3", LlamaForCausalLM(LlamaConfig(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}, **common))
    qwen = dict(common, intermediate_size=80)
    yield "qwen2", Qwen2ForCausalLM(Qwen2Config(num_attention_heads=6, num_key_value_heads=3, rope_theta=1e6,
                                                tie_word_embeddings=False, **qwen))
    yield "gpt2", GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64,
                                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                             eos_token_id=2))
    # Windows of 5 and 4 tokens against sequences of 19 and greedy runs of 18.
    yield "mistral_window", MistralForCausalLM(MistralConfig(num_attention_heads=4, num_key_value_heads=2,
                                                             sliding_window=5, tie_word_embeddings=False, **common))
    yield "qwen2_window", Qwen2ForCausalLM(Qwen2Config(num_attention_heads=6, num_key_value_heads=2, rope_theta=1e6,
                                                       use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                                       tie_word_embeddings=False, **qwen))


def main():
    torch.manual_seed(2026)
    for name, model in models():
        out = os.path.join(HERE, name)
        shutil.rmtree(out, ignore_errors=True)
        model = model.float().eval()
        # Random weights bigger than the default init, so every layer matters in the logits.
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.2)
        model.save_pretrained(out, safe_serialization=True)
        g = torch.Generator().manual_seed(7)
        ids = torch.randint(0, VOCAB, (B, L), generator=g)
        with torch.no_grad():
            logits = model(ids).logits.contiguous()
        greedy = model.generate(ids[:1, :PROMPT], do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW,
                                eos_token_id=None, pad_token_id=0)[0, PROMPT:].tolist()
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        tensors = {"logits": logits}
        for pname, p in model.named_parameters():
            tensors["grad." + pname] = p.grad.detach().contiguous()
        save_file(tensors, os.path.join(out, "reference.safetensors"))
        with open(os.path.join(out, "reference.json"), "w") as f:
            json.dump({"ids": ids.tolist(), "loss": loss.item(), "prompt": ids[0, :PROMPT].tolist(), "greedy": greedy,
                       "transformers": transformers.__version__, "torch": torch.__version__}, f, indent=1)
        size = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
        print(f"{name}: {size} bytes, loss {loss.item():.6f}, greedy {greedy}")


if __name__ == "__main__":
    main()
