// A decoder-only language model's architecture, read from a Hugging Face
// checkpoint's config.json: llama (RMSNorm, RoPE, SwiGLU, GQA, no biases; Llama
// 2/3, TinyLlama, SmolLM), mistral (llama with a sliding window on every layer, or
// none), qwen2 (llama with q/k/v biases; a sliding window on the layers from
// max_window_layers on when use_sliding_window) and gpt2 (pre-LayerNorm, learned
// positions, GELU-tanh MLP, biases).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ringattn {

enum class Arch { llama, mistral, qwen2, gpt2 };
const char* arch_name(Arch a);

// RoPE as Hugging Face computes it (llama, qwen2): inv_freq_i = theta^(−2i/head_dim),
// then per `type`: "default"; "linear" (inv_freq / factor); "llama3" (wavelengths
// beyond original_max_positions / low_freq_factor divided by factor, those below
// original_max_positions / high_freq_factor kept, a smooth blend between).
struct RopeConfig {
  double theta = 10000;
  std::string type = "default";
  double factor = 1, low_freq_factor = 1, high_freq_factor = 4;
  int64_t original_max_positions = 8192;
};

struct LmConfig {
  Arch arch = Arch::llama;
  int64_t vocab = 0, d_model = 0, layers = 0, heads = 0, kv_heads = 0, head_dim = 0, mlp_hidden = 0;
  int64_t max_positions = 0;  // llama/qwen2: what the model was trained for; gpt2: its position table
  double norm_eps = 1e-5;     // RMSNorm (llama, qwen2) or LayerNorm (gpt2) epsilon
  bool tie_embeddings = false;
  std::string hidden_act;  // "silu" (SwiGLU) or "gelu_tanh" (gpt2's gelu_new / gelu_pytorch_tanh)
  bool qkv_bias = false, o_bias = false, mlp_bias = false;
  RopeConfig rope;                         // llama, qwen2
  int64_t bos_token = -1, eos_token = -1;  // -1: none given (the first when config.json lists several)
  // Sliding window (mistral, qwen2): a query sees the `sliding_window` most recent
  // keys, itself included (transformers: kv > q − W), on the layers marked in
  // sliding_layers (config.json's layer_types). 0: none.
  int64_t sliding_window = 0;
  std::vector<bool> sliding_layers;  // [layers] when sliding_window > 0

  // The attention window's left side on `layer` (attention.h): W − 1, or −1.
  int64_t window_left(int64_t layer) const {
    return sliding_window > 0 && sliding_layers[static_cast<size_t>(layer)] ? sliding_window - 1 : -1;
  }
};

// Parses config.json text (`where` names it in messages). Both forms of RoPE
// settings are read: rope_theta + rope_scaling (most published checkpoints) and
// rope_parameters (transformers 5). Unknown model_type, a missing or mistyped
// field, an unsupported rope type, activation or option: Error naming the field.
LmConfig parse_lm_config(const std::string& json_text, const std::string& where = "config.json");
// Reads `dir/config.json` (or the file itself when given one).
LmConfig load_lm_config(const std::string& dir_or_file);
// config.json text for c in the architecture's Hugging Face fields (what
// transformers' from_pretrained reads back; parse_lm_config(text) == c).
std::string lm_config_json(const LmConfig& c);

}  // namespace ringattn
