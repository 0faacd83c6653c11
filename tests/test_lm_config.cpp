// config.json of published checkpoints (TinyLlama, Llama 3.2 with llama3 RoPE
// scaling, Qwen2, GPT-2, the transformers 5 rope_parameters form) read into
// LmConfig, and every unsupported or malformed config refused by field name.
#include "ringattn/lm_config.h"

#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "ringattn/error.h"
#include "test_util.h"

namespace ringattn::testing {
namespace {

TEST(LmConfig, TinyLlama) {
  const LmConfig c = parse_lm_config(
      R"({"architectures":["LlamaForCausalLM"],"bos_token_id":1,"eos_token_id":2,"hidden_act":"silu",
          "hidden_size":2048,"initializer_range":0.02,"intermediate_size":5632,"max_position_embeddings":2048,
          "model_type":"llama","num_attention_heads":32,"num_hidden_layers":22,"num_key_value_heads":4,
          "pretraining_tp":1,"rms_norm_eps":1e-05,"rope_scaling":null,"tie_word_embeddings":false,
          "torch_dtype":"bfloat16","transformers_version":"4.35.0","use_cache":true,"vocab_size":32000})");
  EXPECT_EQ(c.arch, Arch::llama);
  EXPECT_EQ(c.vocab, 32000);
  EXPECT_EQ(c.d_model, 2048);
  EXPECT_EQ(c.layers, 22);
  EXPECT_EQ(c.heads, 32);
  EXPECT_EQ(c.kv_heads, 4);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.mlp_hidden, 5632);
  EXPECT_EQ(c.norm_eps, 1e-5);
  EXPECT_FALSE(c.tie_embeddings);
  EXPECT_FALSE(c.qkv_bias || c.o_bias || c.mlp_bias);
  EXPECT_EQ(c.rope.type, "default");
  EXPECT_EQ(c.rope.theta, 10000);
  EXPECT_EQ(c.bos_token, 1);
  EXPECT_EQ(c.eos_token, 2);
}

TEST(LmConfig, Llama3WithScaledRope) {
  const LmConfig c = parse_lm_config(
      R"({"architectures":["LlamaForCausalLM"],"attention_bias":false,"bos_token_id":128000,
          "eos_token_id":[128001,128008,128009],"head_dim":64,"hidden_act":"silu","hidden_size":2048,
          "intermediate_size":8192,"max_position_embeddings":131072,"mlp_bias":false,"model_type":"llama",
          "num_attention_heads":32,"num_hidden_layers":16,"num_key_value_heads":8,"rms_norm_eps":1e-05,
          "rope_scaling":{"factor":32.0,"high_freq_factor":4.0,"low_freq_factor":1.0,
                          "original_max_position_embeddings":8192,"rope_type":"llama3"},
          "rope_theta":500000.0,"tie_word_embeddings":true,"vocab_size":128256})");
  EXPECT_EQ(c.rope.type, "llama3");
  EXPECT_EQ(c.rope.theta, 500000);
  EXPECT_EQ(c.rope.factor, 32);
  EXPECT_EQ(c.rope.low_freq_factor, 1);
  EXPECT_EQ(c.rope.high_freq_factor, 4);
  EXPECT_EQ(c.rope.original_max_positions, 8192);
  EXPECT_TRUE(c.tie_embeddings);
  EXPECT_EQ(c.eos_token, 128001);  // the first of the list
  EXPECT_EQ(c.max_positions, 131072);
}

TEST(LmConfig, Transformers5RopeParameters) {
  const LmConfig c = parse_lm_config(
      R"({"model_type":"llama","vocab_size":100,"hidden_size":48,"intermediate_size":96,"num_hidden_layers":2,
          "num_attention_heads":6,"num_key_value_heads":2,"head_dim":16,
          "rope_parameters":{"rope_type":"linear","rope_theta":20000.0,"factor":2.0}})");
  EXPECT_EQ(c.rope.type, "linear");
  EXPECT_EQ(c.rope.theta, 20000);
  EXPECT_EQ(c.rope.factor, 2);
  EXPECT_EQ(c.head_dim, 16);  // explicit, not 48 / 6
}

TEST(LmConfig, Qwen2HasQkvBiases) {
  const LmConfig c = parse_lm_config(
      R"({"architectures":["Qwen2ForCausalLM"],"attention_dropout":0.0,"bos_token_id":151643,
          "eos_token_id":151643,"hidden_act":"silu","hidden_size":896,"intermediate_size":4864,
          "max_position_embeddings":131072,"max_window_layers":24,"model_type":"qwen2","num_attention_heads":14,
          "num_hidden_layers":24,"num_key_value_heads":2,"rms_norm_eps":1e-06,"rope_theta":1000000.0,
          "sliding_window":131072,"tie_word_embeddings":true,"use_sliding_window":false,"vocab_size":151936})");
  EXPECT_EQ(c.arch, Arch::qwen2);
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_FALSE(c.mlp_bias);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.rope.theta, 1e6);
  EXPECT_EQ(c.norm_eps, 1e-6);
}

TEST(LmConfig, Gpt2) {
  const LmConfig c = parse_lm_config(
      R"({"activation_function":"gelu_new","architectures":["GPT2LMHeadModel"],"attn_pdrop":0.1,
          "bos_token_id":50256,"embd_pdrop":0.1,"eos_token_id":50256,"initializer_range":0.02,
          "layer_norm_epsilon":1e-05,"model_type":"gpt2","n_ctx":1024,"n_embd":768,"n_head":12,"n_layer":12,
          "n_positions":1024,"resid_pdrop":0.1,"summary_activation":null,"vocab_size":50257})");
  EXPECT_EQ(c.arch, Arch::gpt2);
  EXPECT_EQ(c.d_model, 768);
  EXPECT_EQ(c.mlp_hidden, 3072);  // n_inner absent: 4 x n_embd
  EXPECT_EQ(c.max_positions, 1024);
  EXPECT_EQ(c.hidden_act, "gelu_tanh");
  EXPECT_TRUE(c.tie_embeddings && c.qkv_bias && c.o_bias && c.mlp_bias);
  EXPECT_EQ(c.head_dim, 64);
}

// Sliding windows as transformers reads them: mistral on every layer (null: none),
// qwen2 only with use_sliding_window, from max_window_layers on, or by layer_types.
TEST(LmConfig, SlidingWindows) {
  const std::string base = R"("vocab_size":100,"hidden_size":48,"intermediate_size":96,"num_hidden_layers":3,)"
                           R"("num_attention_heads":6)";
  LmConfig m = parse_lm_config(R"({"model_type":"mistral",)" + base + R"(,"sliding_window":16})");
  EXPECT_EQ(m.arch, Arch::mistral);
  EXPECT_EQ(m.sliding_window, 16);
  for (int l = 0; l < 3; ++l) EXPECT_EQ(m.window_left(l), 15);
  const LmConfig none = parse_lm_config(R"({"model_type":"mistral",)" + base + R"(,"sliding_window":null})");
  EXPECT_EQ(none.sliding_window, 0);
  EXPECT_EQ(none.window_left(0), -1);
  LmConfig q = parse_lm_config(R"({"model_type":"qwen2",)" + base + R"(,"sliding_window":16})");
  EXPECT_EQ(q.sliding_window, 0) << "qwen2 needs use_sliding_window";
  q = parse_lm_config(R"({"model_type":"qwen2",)" + base +
                      R"(,"use_sliding_window":true,"sliding_window":16,"max_window_layers":1})");
  EXPECT_EQ(q.window_left(0), -1);
  EXPECT_EQ(q.window_left(1), 15);
  EXPECT_EQ(q.window_left(2), 15);
  q = parse_lm_config(
      R"({"model_type":"qwen2",)" + base +
      R"(,"use_sliding_window":true,"sliding_window":4,"layer_types":["sliding_attention","full_attention","sliding_attention"]})");
  EXPECT_EQ(q.window_left(0), 3);
  EXPECT_EQ(q.window_left(1), -1);
  EXPECT_EQ(q.window_left(2), 3);
  // The writer round-trips both.
  for (const LmConfig& c : {m, none, q}) {
    const LmConfig back = parse_lm_config(lm_config_json(c));
    EXPECT_EQ(back.sliding_window, c.sliding_window);
    EXPECT_EQ(back.sliding_layers, c.sliding_layers);
    EXPECT_EQ(back.arch, c.arch);
  }
}

TEST(LmConfig, UnsupportedOrMalformedConfigsNameTheField) {
  const std::string base = R"("vocab_size":100,"hidden_size":48,"intermediate_size":96,"num_hidden_layers":2,)"
                           R"("num_attention_heads":6)";
  struct Case {
    std::string json;
    const char* needle;
  } cases[] = {
      {"{", "not valid JSON"},
      {R"({"hidden_size":48})", "missing 'model_type'"},
      {R"({"model_type":"mamba"})", "model_type 'mamba' is not supported"},
      {R"({"model_type":"llama","vocab_size":100})", "missing 'hidden_size'"},
      {R"({"model_type":"llama",)" + base + R"(,"num_key_value_heads":4})", "not a multiple of the 4"},
      {R"({"model_type":"llama",)" + base + R"(,"hidden_act":"gelu"})", "hidden_act 'gelu'"},
      {R"({"model_type":"llama",)" + base + R"(,"rope_scaling":{"rope_type":"yarn","factor":4}})",
       "type 'yarn' is not supported"},
      {R"({"model_type":"llama",)" + base + R"(,"rope_scaling":{"rope_type":"linear"}})", "needs 'factor'"},
      {R"({"model_type":"llama",)" + base + R"(,"rope_scaling":{"rope_type":"llama3","factor":8}})",
       "needs 'low_freq_factor'"},
      {R"({"model_type":"llama",)" + base + R"(,"rope_theta":-1})", "'rope_theta' must be a positive number"},
      {R"({"model_type":"llama",)" + base + R"(,"num_hidden_layers":0})", "'num_hidden_layers' must be"},
      {R"({"model_type":"llama",)" + base + R"(,"sliding_window":4096})", "llama has no sliding_window"},
      {R"({"model_type":"mistral",)" + base + R"(,"sliding_window":0})", "'sliding_window' must be"},
      {R"({"model_type":"qwen2",)" + base + R"(,"use_sliding_window":true,"sliding_window":8,"layer_types":["x"]})",
       "layer_types must list the 2 layers"},
      {R"({"model_type":"qwen2",)" + base +
           R"(,"use_sliding_window":true,"sliding_window":8,"layer_types":["full_attention","local"]})",
       "layer_types[1]"},
      {R"({"model_type":"llama","vocab_size":100,"hidden_size":50,"intermediate_size":96,"num_hidden_layers":2,)"
       R"("num_attention_heads":6})",
       "not divisible by the 6 heads"},
      {R"({"model_type":"gpt2","vocab_size":100,"n_embd":48,"n_layer":2,"n_head":6,"n_positions":64,)"
       R"("activation_function":"relu"})",
       "activation_function 'relu'"},
      {R"({"model_type":"gpt2","vocab_size":100,"n_embd":48,"n_layer":2,"n_head":6,"n_positions":64,)"
       R"("scale_attn_by_inverse_layer_idx":true})",
       "scale_attn_by_inverse_layer_idx"},
  };
  for (const Case& c : cases) {
    const std::string m = message_of([&] { (void)parse_lm_config(c.json, "x/config.json"); });
    EXPECT_NE(m.find(c.needle), std::string::npos) << c.json << "\n -> " << m;
    EXPECT_NE(m.find("x/config.json"), std::string::npos) << m;
  }
  EXPECT_NE(message_of([] { (void)load_lm_config("/nonexistent-dir"); }).find("cannot read"), std::string::npos);
}

}  // namespace
}  // namespace ringattn::testing
