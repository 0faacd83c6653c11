// config.json of Hugging Face llama / mistral / qwen2 / gpt2 checkpoints -> LmConfig.
#include "ringattn/lm_config.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "ringattn/error.h"

namespace ringattn {
namespace {

using nlohmann::json;

// The fields of one config.json, each read with a message naming it.
struct Fields {
  const json& j;
  const std::string& where;

  bool has(const char* k) const { return j.contains(k) && !j[k].is_null(); }
  int64_t count(const char* k) const {
    check(has(k), where, ": missing '", k, "'");
    check(j[k].is_number_integer() && j[k].get<int64_t>() >= 1, where, ": '", k, "' must be a whole number >= 1, got ",
          j[k].dump());
    return j[k].get<int64_t>();
  }
  int64_t count_or(const char* k, int64_t dflt) const { return has(k) ? count(k) : dflt; }
  double real(const json& v, const std::string& name) const {
    check(v.is_number() && v.get<double>() > 0, where, ": '", name, "' must be a positive number, got ", v.dump());
    return v.get<double>();
  }
  double real_or(const char* k, double dflt) const { return has(k) ? real(j[k], k) : dflt; }
  bool flag_or(const char* k, bool dflt) const {
    if (!has(k)) return dflt;
    check(j[k].is_boolean(), where, ": '", k, "' must be true or false, got ", j[k].dump());
    return j[k].get<bool>();
  }
  std::string text_or(const char* k, const std::string& dflt) const {
    if (!has(k)) return dflt;
    check(j[k].is_string(), where, ": '", k, "' must be a string, got ", j[k].dump());
    return j[k].get<std::string>();
  }
  // A token id, or the first of a list of them (eos_token_id may be a list).
  int64_t token_or_none(const char* k) const {
    if (!has(k)) return -1;
    const json& v = j[k].is_array() && !j[k].empty() ? j[k][0] : j[k];
    check(v.is_number_integer() && v.get<int64_t>() >= 0, where, ": '", k, "' must be a token id, got ", j[k].dump());
    return v.get<int64_t>();
  }
};

// rope_scaling (transformers 4) or rope_parameters (transformers 5: theta inside).
RopeConfig rope_of(const Fields& f) {
  RopeConfig r;
  r.theta = f.real_or("rope_theta", 10000);
  const char* key = f.has("rope_parameters") ? "rope_parameters" : f.has("rope_scaling") ? "rope_scaling" : nullptr;
  if (!key) return r;
  const json& p = f.j[key];
  check(p.is_object(), f.where, ": '", key, "' must be an object, got ", p.dump());
  const Fields s{p, f.where};
  if (s.has("rope_theta")) r.theta = s.real(p["rope_theta"], cat(key, ".rope_theta"));
  r.type = s.text_or("rope_type", s.text_or("type", "default"));
  check(r.type == "default" || r.type == "linear" || r.type == "llama3", f.where, ": ", key, " type '", r.type,
        "' is not supported (default, linear, llama3)");
  if (r.type == "default") return r;
  check(s.has("factor"), f.where, ": ", key, " of type ", r.type, " needs 'factor'");
  r.factor = s.real(p["factor"], cat(key, ".factor"));
  if (r.type == "llama3") {
    for (const char* k : {"low_freq_factor", "high_freq_factor", "original_max_position_embeddings"})
      check(s.has(k), f.where, ": ", key, " of type llama3 needs '", k, "'");
    r.low_freq_factor = s.real(p["low_freq_factor"], cat(key, ".low_freq_factor"));
    r.high_freq_factor = s.real(p["high_freq_factor"], cat(key, ".high_freq_factor"));
    check(r.high_freq_factor > r.low_freq_factor, f.where, ": ", key, " needs high_freq_factor > low_freq_factor");
    r.original_max_positions = s.count("original_max_position_embeddings");
  }
  return r;
}

// The sliding window as transformers reads it: mistral's sliding_window on every
// layer (null: none); qwen2's only with use_sliding_window, on the layers from
// max_window_layers on; an explicit layer_types list ("full_attention" /
// "sliding_attention") decides the layers when given.
void sliding_window_of(const Fields& f, LmConfig& c) {
  const bool on = c.arch == Arch::mistral || (c.arch == Arch::qwen2 && f.flag_or("use_sliding_window", false));
  check(c.arch != Arch::llama || !f.has("sliding_window"), f.where,
        ": llama has no sliding_window (model_type mistral or qwen2 does)");
  if (!on || !f.has("sliding_window")) return;
  c.sliding_window = f.count("sliding_window");
  c.sliding_layers.assign(static_cast<size_t>(c.layers), true);
  if (c.arch == Arch::qwen2) {
    const json& mw = f.has("max_window_layers") ? f.j["max_window_layers"] : json(28);
    check(mw.is_number_integer() && mw.get<int64_t>() >= 0, f.where,
          ": 'max_window_layers' must be a whole number >= 0, got ", mw.dump());
    const int64_t first = mw.get<int64_t>();
    for (int64_t l = 0; l < c.layers; ++l) c.sliding_layers[static_cast<size_t>(l)] = l >= first;
  }
  if (f.has("layer_types")) {
    const json& t = f.j["layer_types"];
    check(t.is_array() && static_cast<int64_t>(t.size()) == c.layers, f.where, ": layer_types must list the ", c.layers,
          " layers, got ", t.dump());
    for (int64_t l = 0; l < c.layers; ++l) {
      const json& x = t[static_cast<size_t>(l)];
      check(x == "full_attention" || x == "sliding_attention", f.where, ": layer_types[", l, "] is ", x.dump(),
            " (full_attention or sliding_attention)");
      c.sliding_layers[static_cast<size_t>(l)] = x == "sliding_attention";
    }
  }
}

}  // namespace

const char* arch_name(Arch a) {
  switch (a) {
    case Arch::llama:
      return "llama";
    case Arch::mistral:
      return "mistral";
    case Arch::qwen2:
      return "qwen2";
    case Arch::gpt2:
      return "gpt2";
  }
  return "?";
}

LmConfig parse_lm_config(const std::string& json_text, const std::string& where) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    throw Error(cat(where, ": not valid JSON: ", e.what()));
  }
  check(j.is_object(), where, ": must be a JSON object");
  const Fields f{j, where};
  check(f.has("model_type") && j["model_type"].is_string(), where, ": missing 'model_type'");
  const std::string type = j["model_type"].get<std::string>();
  LmConfig c;
  if (type == "gpt2") {
    c.arch = Arch::gpt2;
    c.vocab = f.count("vocab_size"), c.d_model = f.count("n_embd"), c.layers = f.count("n_layer");
    c.heads = f.count("n_head"), c.kv_heads = c.heads;
    c.mlp_hidden = f.count_or("n_inner", 4 * c.d_model);
    c.max_positions = f.count("n_positions");
    c.norm_eps = f.real_or("layer_norm_epsilon", 1e-5);
    c.tie_embeddings = f.flag_or("tie_word_embeddings", true);
    const std::string act = f.text_or("activation_function", "gelu_new");
    check(act == "gelu_new" || act == "gelu_pytorch_tanh", where, ": activation_function '", act,
          "' is not supported (gpt2: gelu_new, gelu_pytorch_tanh)");
    c.hidden_act = "gelu_tanh";
    c.qkv_bias = c.o_bias = c.mlp_bias = true;
    check(f.flag_or("scale_attn_weights", true), where, ": scale_attn_weights false is not supported");
    check(!f.flag_or("scale_attn_by_inverse_layer_idx", false), where,
          ": scale_attn_by_inverse_layer_idx is not supported");
    check(!f.flag_or("reorder_and_upcast_attn", false), where, ": reorder_and_upcast_attn is not supported");
  } else if (type == "llama" || type == "mistral" || type == "qwen2") {
    c.arch = type == "qwen2" ? Arch::qwen2 : type == "mistral" ? Arch::mistral : Arch::llama;
    c.vocab = f.count("vocab_size"), c.d_model = f.count("hidden_size"), c.layers = f.count("num_hidden_layers");
    c.heads = f.count("num_attention_heads"), c.kv_heads = f.count_or("num_key_value_heads", c.heads);
    c.mlp_hidden = f.count("intermediate_size");
    c.max_positions = f.count_or("max_position_embeddings", 2048);
    c.norm_eps = f.real_or("rms_norm_eps", 1e-6);
    c.tie_embeddings = f.flag_or("tie_word_embeddings", false);
    c.hidden_act = f.text_or("hidden_act", "silu");
    check(c.hidden_act == "silu", where, ": hidden_act '", c.hidden_act, "' is not supported (", type, ": silu)");
    if (c.arch == Arch::qwen2) {
      c.qkv_bias = true;  // Qwen2's q, k and v projections always have biases
    } else {
      c.qkv_bias = c.o_bias = f.flag_or("attention_bias", false);
      c.mlp_bias = f.flag_or("mlp_bias", false);
    }
    c.rope = rope_of(f);
    sliding_window_of(f, c);
  } else {
    throw Error(cat(where, ": model_type '", type, "' is not supported (llama, mistral, qwen2, gpt2)"));
  }
  c.head_dim = f.count_or("head_dim", c.d_model / c.heads);
  check(f.has("head_dim") || c.d_model % c.heads == 0, where, ": hidden size ", c.d_model, " is not divisible by the ",
        c.heads, " heads (and there is no 'head_dim')");
  check(c.heads % c.kv_heads == 0, where, ": ", c.heads, " attention heads are not a multiple of the ", c.kv_heads,
        " key/value heads");
  check(c.arch == Arch::gpt2 || c.head_dim % 2 == 0, where, ": RoPE needs an even head_dim, got ", c.head_dim);
  c.bos_token = f.token_or_none("bos_token_id");
  c.eos_token = f.token_or_none("eos_token_id");
  return c;
}

std::string lm_config_json(const LmConfig& c) {
  nlohmann::json j;
  j["model_type"] = arch_name(c.arch);
  j["vocab_size"] = c.vocab;
  j["tie_word_embeddings"] = c.tie_embeddings;
  if (c.bos_token >= 0) j["bos_token_id"] = c.bos_token;
  if (c.eos_token >= 0) j["eos_token_id"] = c.eos_token;
  j["torch_dtype"] = "float32";
  if (c.arch == Arch::gpt2) {
    j["architectures"] = {"GPT2LMHeadModel"};
    j["n_embd"] = c.d_model, j["n_layer"] = c.layers, j["n_head"] = c.heads, j["n_inner"] = c.mlp_hidden;
    j["n_positions"] = c.max_positions, j["layer_norm_epsilon"] = c.norm_eps;
    j["activation_function"] = "gelu_new";
    return j.dump(2) + "\n";
  }
  j["architectures"] = {c.arch == Arch::qwen2     ? "Qwen2ForCausalLM"
                        : c.arch == Arch::mistral ? "MistralForCausalLM"
                                                  : "LlamaForCausalLM"};
  j["hidden_size"] = c.d_model, j["num_hidden_layers"] = c.layers, j["num_attention_heads"] = c.heads;
  j["num_key_value_heads"] = c.kv_heads, j["head_dim"] = c.head_dim, j["intermediate_size"] = c.mlp_hidden;
  j["max_position_embeddings"] = c.max_positions, j["rms_norm_eps"] = c.norm_eps, j["hidden_act"] = "silu";
  if (c.arch == Arch::llama) j["attention_bias"] = c.qkv_bias, j["mlp_bias"] = c.mlp_bias;
  if (c.arch == Arch::mistral) j["sliding_window"] = c.sliding_window > 0 ? nlohmann::json(c.sliding_window) : nullptr;
  if (c.arch == Arch::qwen2) {
    j["use_sliding_window"] = c.sliding_window > 0;
    if (c.sliding_window > 0) {
      j["sliding_window"] = c.sliding_window;
      j["max_window_layers"] = c.layers;  // layer_types below decides
      j["layer_types"] = nlohmann::json::array();
      for (bool x : c.sliding_layers) j["layer_types"].push_back(x ? "sliding_attention" : "full_attention");
    }
  }
  j["rope_theta"] = c.rope.theta;
  if (c.rope.type == "linear")
    j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", c.rope.factor}};
  else if (c.rope.type == "llama3")
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", c.rope.factor},
                         {"low_freq_factor", c.rope.low_freq_factor},
                         {"high_freq_factor", c.rope.high_freq_factor},
                         {"original_max_position_embeddings", c.rope.original_max_positions}};
  return j.dump(2) + "\n";
}

LmConfig load_lm_config(const std::string& dir_or_file) {
  namespace fs = std::filesystem;
  const fs::path p = fs::is_directory(dir_or_file) ? fs::path(dir_or_file) / "config.json" : fs::path(dir_or_file);
  std::ifstream in(p);
  check(in.good(), p.string(), ": cannot read (a Hugging Face checkpoint folder holds config.json)");
  std::stringstream s;
  s << in.rdbuf();
  return parse_lm_config(s.str(), p.string());
}

}  // namespace ringattn
