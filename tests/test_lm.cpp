// Language models against Hugging Face transformers (fixtures of
// scripts/make_hf_fixtures.py: tiny random llama (GQA; tied head, explicit
// head_dim, llama3 RoPE scaling), qwen2 and gpt2 checkpoints with transformers'
// logits and greedy continuations): the checkpoint loads, the logits match within
// 1e-4 relative, greedy decoding gives the same tokens, and a checkpoint that
// does not fit its config is refused naming the tensor.
#include "ringattn/lm.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "ringattn/parallel.h"
#include "ringattn/safetensors.h"
#include "test_util.h"

namespace ringattn::testing {
namespace {

const std::string kHf = RINGATTN_TEST_FIXTURES "/hf/";

nlohmann::json reference(const std::string& name) {
  std::ifstream in(kHf + name + "/reference.json");
  return nlohmann::json::parse(in);
}

// The fixture's token ids [B, L], flattened.
struct Ids {
  std::vector<int64_t> flat;
  int64_t B = 0, L = 0;
};
Ids ids_of(const nlohmann::json& ref) {
  const auto rows = ref["ids"].get<std::vector<std::vector<int64_t>>>();
  Ids ids;
  for (const auto& r : rows) ids.flat.insert(ids.flat.end(), r.begin(), r.end());
  ids.B = static_cast<int64_t>(rows.size()), ids.L = static_cast<int64_t>(rows[0].size());
  return ids;
}

class HfModels : public ::testing::TestWithParam<const char*> {};

TEST_P(HfModels, LogitsEqualTransformers) {
  const std::string name = GetParam();
  const LanguageModel m = LanguageModel::load(kHf + name);
  const Ids ids = ids_of(reference(name));
  const Tensor logits = lm_logits(m, ids.flat, ids.B, ids.L);
  const SafetensorsFile want(kHf + name + "/reference.safetensors");
  const TensorView w = want.view("logits");
  ASSERT_EQ(w.shape_str(), logits.view().shape_str());
  double num = 0, den = 0;
  for (int64_t i = 0; i < w.numel(); ++i) {
    num = std::max(num, std::fabs(double(logits.ptr<float>()[i]) - w.ptr<float>()[i]));
    den = std::max(den, std::fabs(double(w.ptr<float>()[i])));
  }
  std::printf("%s: max |ours - transformers| / max |transformers| = %.2e\n", name.c_str(), num / den);
  EXPECT_LT(num / den, 1e-4) << name << ": max |ours - transformers| " << num << " of " << den;
}

TEST_P(HfModels, GreedyContinuationEqualsTransformers) {
  const std::string name = GetParam();
  const LanguageModel m = LanguageModel::load(kHf + name);
  const nlohmann::json ref = reference(name);
  std::vector<int64_t> seq = ref["prompt"].get<std::vector<int64_t>>();
  const auto want = ref["greedy"].get<std::vector<int64_t>>();
  EXPECT_EQ(lm_greedy_reference(m, seq, static_cast<int64_t>(want.size())), want) << name;
}

TEST_P(HfModels, LossAndGradientsEqualTransformersAutograd) {
  const std::string name = GetParam();
  const LanguageModel m = LanguageModel::load(kHf + name);
  const nlohmann::json ref = reference(name);
  const Ids ids = ids_of(ref);
  const LmLossGrads got = lm_loss_and_grads(m, ids.flat, ids.B, ids.L);
  EXPECT_NEAR(got.loss, ref["loss"].get<double>(), 1e-5 * ref["loss"].get<double>()) << name;
  const SafetensorsFile want(kHf + name + "/reference.safetensors");
  size_t compared = 0;
  double worst = 0;
  for (const SafetensorsEntry& e : want.entries()) {
    if (e.name.rfind("grad.", 0) != 0) continue;
    const std::string param = e.name.substr(5);
    ASSERT_TRUE(got.grads.count(param)) << name << ": no gradient for " << param;
    const TensorView w = want.view(e.name);
    const Tensor& mine = got.grads.at(param);
    ASSERT_EQ(mine.view().shape_str(), w.shape_str()) << param;
    double num = 0, den = 0;
    for (int64_t i = 0; i < w.numel(); ++i) {
      num = std::max(num, std::fabs(double(mine.ptr<float>()[i]) - w.ptr<float>()[i]));
      den = std::max(den, std::fabs(double(w.ptr<float>()[i])));
    }
    worst = std::max(worst, num / std::max(den, 1e-30));
    EXPECT_LT(num, 1e-4 * den + 1e-9) << name << ": gradient of " << param << " differs by " << num << " of " << den;
    ++compared;
  }
  EXPECT_EQ(compared, got.grads.size()) << name << ": every weight has a reference gradient";
  std::printf("%s: loss %.7f (transformers %.7f), %zu gradients, worst max-relative difference %.2e\n", name.c_str(),
              got.loss, ref["loss"].get<double>(), compared, worst);
}

// max |a − b| / max |b| over two fp32 tensors of one shape.
double max_rel(const TensorView& a, const TensorView& b) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < b.numel(); ++i) {
    num = std::max(num, std::fabs(double(a.ptr<float>()[i]) - b.ptr<float>()[i]));
    den = std::max(den, std::fabs(double(b.ptr<float>()[i])));
  }
  return num / std::max(den, 1e-30);
}

// The checkpoint as the parallel Model (one process): its tensors round-trip
// bit for bit, and logits, loss and every gradient equal transformers'.
TEST_P(HfModels, ModelEqualsTransformers) {
  const std::string name = GetParam();
  const LanguageModel lm = LanguageModel::load(kHf + name);
  const nlohmann::json ref = reference(name);
  const Ids ids = ids_of(ref);
  const RunContext run(nullptr, ParallelConfig{});
  Model m = lm_model(lm, DType::f32, run);
  for (const auto& [n, t] : lm_export(m, lm.config)) {
    ASSERT_EQ(t.view().shape_str(), lm.weight(n).view().shape_str()) << n;
    ASSERT_EQ(std::memcmp(t.ptr<float>(), lm.weight(n).ptr<float>(), t.bytes()), 0) << n << " round trip";
  }
  const SafetensorsFile want(kHf + name + "/reference.safetensors");
  const Tensor logits = lm_forward(m, run.model_parallel(), ids.flat, ids.B, ids.L);
  const double err = max_rel(logits, want.view("logits"));
  EXPECT_LT(err, 1e-4) << name;
  m.zero_grads();
  const double loss = lm_loss_backward(m, run.model_parallel(), ids.flat, ids.B, ids.L, ids.B * (ids.L - 1), nullptr);
  EXPECT_NEAR(loss, ref["loss"].get<double>(), 1e-5 * ref["loss"].get<double>()) << name;
  double worst = 0;
  size_t compared = 0;
  for (const auto& [n, g] : lm_export(m, lm.config, true)) {
    const double e = max_rel(g, want.view("grad." + n));
    EXPECT_LT(e, 1e-4) << name << ": gradient of " << n;
    worst = std::max(worst, e), ++compared;
  }
  EXPECT_EQ(compared, lm.weights.size());
  std::printf("%s as the Model: logits %.2e, loss %.7f (transformers %.7f), %zu gradients worst %.2e\n", name.c_str(),
              err, loss, ref["loss"].get<double>(), compared, worst);
}

// Decoding from the KV cache: greedy gives transformers' continuation, stops
// after an end-of-sequence token (kept), and seeded sampling repeats.
TEST_P(HfModels, GenerateFromTheCache) {
  const std::string name = GetParam();
  const LanguageModel lm = LanguageModel::load(kHf + name);
  const nlohmann::json ref = reference(name);
  const std::vector<int64_t> prompt = ref["prompt"].get<std::vector<int64_t>>();
  const auto want = ref["greedy"].get<std::vector<int64_t>>();
  const RunContext run(nullptr, ParallelConfig{});
  const Model m = lm_model(lm, DType::f32, run);
  const int64_t L = static_cast<int64_t>(prompt.size());
  LmGenerateOptions o;
  o.new_tokens = static_cast<int64_t>(want.size());
  EXPECT_EQ(lm_generate(m, run.model_parallel(), prompt, 1, L, o).at(0), want) << name;
  o.eos = want[2];
  const auto stopped = lm_generate(m, run.model_parallel(), prompt, 1, L, o).at(0);
  const auto first_eos = std::find(want.begin(), want.end(), o.eos);  // a repeated token may come earlier
  EXPECT_EQ(stopped, std::vector<int64_t>(want.begin(), first_eos + 1)) << name << ": ends at the eos token";
  o.eos = -1, o.sampling.greedy = false, o.sampling.temperature = 1.5f, o.sampling.top_k = 20, o.seed = 9;
  const auto a = lm_generate(m, run.model_parallel(), prompt, 1, L, o).at(0);
  EXPECT_EQ(a, lm_generate(m, run.model_parallel(), prompt, 1, L, o).at(0)) << "the same seed repeats";
  EXPECT_EQ(a.size(), want.size());
}

// Sliding-window checkpoints generating 4x their window and more: the cache's
// ring buffers wrap over and over, and the tokens stay those of recomputing the
// whole sequence at every step.
TEST(LmWindow, LongGenerationFromTheRingBufferEqualsRecomputation) {
  for (const char* name : {"mistral_window", "qwen2_window"}) {
    const LanguageModel lm = LanguageModel::load(kHf + name);
    const std::vector<int64_t> prompt = reference(name)["prompt"].get<std::vector<int64_t>>();
    const RunContext run(nullptr, ParallelConfig{});
    const Model m = lm_model(lm, DType::f32, run);
    LmGenerateOptions o;
    o.new_tokens = 24;
    const std::vector<int64_t> got =
        lm_generate(m, run.model_parallel(), prompt, 1, static_cast<int64_t>(prompt.size()), o).at(0);
    EXPECT_EQ(got, lm_greedy_reference(lm, prompt, o.new_tokens)) << name;
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfModels,
                         ::testing::Values("llama_gqa", "llama_tied_llama3", "qwen2", "gpt2", "mistral_window",
                                           "qwen2_window"));

using SaveLm = ScratchDir;

// save_lm writes config.json and model.safetensors that load back to the same
// architecture and bit-identical weights (transformers loading them is checked
// by the CTest hf_roundtrip: tests/hf_roundtrip.sh).
TEST_F(SaveLm, CheckpointRoundTrips) {
  for (const char* name : {"llama_gqa", "llama_tied_llama3", "qwen2", "gpt2", "mistral_window", "qwen2_window"}) {
    const LanguageModel lm = LanguageModel::load(kHf + name);
    const RunContext run(nullptr, ParallelConfig{});
    const Model m = lm_model(lm, DType::f32, run);
    const std::string out = path(name);
    save_lm(out, m, lm.config);
    const LanguageModel back = LanguageModel::load(out);
    const LmConfig &a = lm.config, &b = back.config;
    EXPECT_EQ(arch_name(a.arch), std::string(arch_name(b.arch))) << name;
    EXPECT_EQ(std::vector<int64_t>({a.vocab, a.d_model, a.layers, a.heads, a.kv_heads, a.head_dim, a.mlp_hidden,
                                    a.max_positions, a.bos_token, a.eos_token}),
              std::vector<int64_t>({b.vocab, b.d_model, b.layers, b.heads, b.kv_heads, b.head_dim, b.mlp_hidden,
                                    b.max_positions, b.bos_token, b.eos_token}))
        << name;
    EXPECT_EQ(a.sliding_window, b.sliding_window) << name;
    EXPECT_EQ(a.sliding_layers, b.sliding_layers) << name;
    EXPECT_EQ(a.norm_eps, b.norm_eps) << name;
    EXPECT_EQ(a.tie_embeddings, b.tie_embeddings) << name;
    EXPECT_EQ(a.qkv_bias, b.qkv_bias) << name;
    EXPECT_EQ(a.rope.type, b.rope.type) << name;
    EXPECT_EQ(a.rope.theta, b.rope.theta) << name;
    EXPECT_EQ(a.rope.factor, b.rope.factor) << name;
    EXPECT_EQ(a.rope.original_max_positions, b.rope.original_max_positions) << name;
    ASSERT_EQ(back.weights.size(), lm.weights.size()) << name;
    for (const auto& [n, t] : lm.weights)
      EXPECT_EQ(std::memcmp(t.ptr<float>(), back.weight(n).ptr<float>(), t.bytes()), 0) << name << ": " << n;
  }
}

using HfCheckpointErrors = ScratchDir;

TEST_F(HfCheckpointErrors, MissingOrMisShapedTensorsAreNamed) {
  const std::string src = kHf + "llama_gqa";
  std::filesystem::copy_file(src + "/config.json", path("config.json"));
  const Checkpoint ck(src);
  std::vector<std::pair<std::string, TensorView>> all;
  for (const std::string& n : ck.names()) all.push_back({n, ck.view(n)});
  // Without one tensor.
  std::vector<std::pair<std::string, TensorView>> fewer;
  for (const auto& t : all)
    if (t.first != "model.layers.1.mlp.up_proj.weight") fewer.push_back(t);
  save_safetensors(path("model.safetensors"), fewer);
  std::string msg = message_of([&] { (void)LanguageModel::load(dir()); });
  EXPECT_NE(msg.find("no tensor 'model.layers.1.mlp.up_proj.weight'"), std::string::npos) << msg;
  // One tensor of the wrong shape.
  std::vector<std::pair<std::string, TensorView>> wrong = all;
  for (auto& t : wrong)
    if (t.first == "model.norm.weight") t.second = t.second.slice(0, 0, t.second.dim(0) - 1);
  save_safetensors(path("model.safetensors"), wrong);
  msg = message_of([&] { (void)LanguageModel::load(dir()); });
  EXPECT_NE(msg.find("'model.norm.weight' is [47]"), std::string::npos) << msg;
  // A config the weights do not fit (more layers).
  save_safetensors(path("model.safetensors"), all);
  nlohmann::json cfg = nlohmann::json::parse(std::ifstream(src + "/config.json"));
  cfg["num_hidden_layers"] = 3;
  std::ofstream(path("config.json")) << cfg.dump();
  msg = message_of([&] { (void)LanguageModel::load(dir()); });
  EXPECT_NE(msg.find("model.layers.2."), std::string::npos) << msg;
}

}  // namespace
}  // namespace ringattn::testing
