# A random llama checkpoint with Llama 3's vocabulary size (128256) and a tiny body
# (2 layers, hidden 128), so that the LM head dominates a decode step: written by
# hand as safetensors (8-byte header length, JSON header, raw fp32), numpy only.
import json, struct, sys
import numpy as np

out = sys.argv[1]
V, D, F, H, KV, Lyr = 128256, 128, 256, 4, 2, 2
hd = D // H
cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": D, "intermediate_size": F,
       "num_attention_heads": H, "num_key_value_heads": KV, "head_dim": hd, "num_hidden_layers": Lyr,
       "vocab_size": V, "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
       "rope_theta": 500000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
       "attention_bias": False, "mlp_bias": False}
rng = np.random.default_rng(0)
t = {"model.embed_tokens.weight": (V, D), "lm_head.weight": (V, D), "model.norm.weight": (D,)}
for i in range(Lyr):
    p = f"model.layers.{i}."
    t.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
              p + "self_attn.q_proj.weight": (H * hd, D), p + "self_attn.k_proj.weight": (KV * hd, D),
              p + "self_attn.v_proj.weight": (KV * hd, D), p + "self_attn.o_proj.weight": (D, H * hd),
              p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D), p + "mlp.down_proj.weight": (D, F)})
header, blobs, off = {}, [], 0
for name, shape in t.items():
    a = (np.ones(shape) if name.endswith("norm.weight") else rng.normal(0, 0.05, shape)).astype(np.float32)
    header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + a.nbytes]}
    blobs.append(a.tobytes()); off += a.nbytes
h = json.dumps(header).encode()
h += b" " * (-len(h) % 8)
import os
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(h))); f.write(h)
    for b in blobs: f.write(b)
json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=1)
np.save(os.path.join(out, "prompt.npy"), rng.integers(3, V, (1, 64)).astype(np.int64))
