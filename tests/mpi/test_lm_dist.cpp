// Hugging Face checkpoints (the fixtures of scripts/make_hf_fixtures.py: llama
// with GQA, llama with a tied head and llama3 RoPE, qwen2, gpt2) as the parallel
// Model under every layout that fits the rank count: ring (contiguous, zigzag,
// striped), all-gather, Ulysses, Ulysses x ring, TP, SP x TP, DP x SP. Each
// rank's logits, the loss and every gradient (summed over the replicas) must
// equal the one-process reference (lm_logits / lm_loss_and_grads, themselves
// equal to transformers' in tests/test_lm.cpp) — RoPE by global positions and the
// labels shifted before the split are what these catch.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "ringattn/comm.h"
#include "ringattn/lm.h"
#include "ringattn/memory.h"
#include "ringattn/parallel.h"
#include "ringattn/safetensors.h"
#include "test_util.h"

namespace ringattn::testing {
namespace {

const std::string kHf = RINGATTN_TEST_FIXTURES "/hf/";

double max_rel(const float* got, const float* want, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    num = std::max(num, std::fabs(double(got[i]) - want[i]));
    den = std::max(den, std::fabs(double(want[i])));
  }
  return num / std::max(den, 1e-30);
}

// The parallel layouts to try at P ranks (those the model does not fit are left
// out by check_model_fits).
std::vector<ParallelConfig> layouts(int P) {
  std::vector<ParallelConfig> v;
  auto sp = [&](Strategy s, Layout l) {
    ParallelConfig c;
    c.sp = P, c.strategy = s, c.layout = l, c.threads = 1;
    v.push_back(c);
  };
  sp(Strategy::ring, Layout::zigzag);
  if (P == 1) return v;
  sp(Strategy::ulysses, Layout::zigzag);
  if (P > 4) return v;  // 8 ranks share 2 cores: the ring and Ulysses at the largest P, the rest below
  sp(Strategy::ring, Layout::contiguous);
  sp(Strategy::ring, Layout::striped);
  sp(Strategy::allgather, Layout::zigzag);
  ParallelConfig tp;
  tp.sp = 1, tp.tp = P, tp.threads = 1;
  v.push_back(tp);
  if (P % 2 == 0) {
    ParallelConfig c;
    c.dp = 2, c.sp = P / 2, c.threads = 1;
    v.push_back(c);
    c.dp = 1, c.sp = P / 2, c.tp = 2;
    if (P > 2) v.push_back(c);  // at P = 2 that is the tp = P layout above
    c.sp = P / 2, c.tp = 1, c.pp = 2;
    v.push_back(c);
  }
  if (P == 4) {
    ParallelConfig c;
    c.sp = 4, c.strategy = Strategy::hybrid, c.ulysses = 2, c.threads = 1;
    v.push_back(c);
    ParallelConfig tp_pp;  // the vocabulary split, and a tied head's copy on the last stage
    tp_pp.sp = 1, tp_pp.tp = 2, tp_pp.pp = 2, tp_pp.threads = 1;
    v.push_back(tp_pp);
  }
  return v;
}

bool fits(const ModelConfig& mc, const ParallelConfig& pc, int P) {
  try {
    check_model_fits(mc, pc.for_ranks(P));
    return true;
  } catch (const Error&) {
    return false;
  }
}

std::string label(const ParallelConfig& c) {
  return cat("dp=", c.dp, " pp=", c.pp, " sp=", c.sp, " tp=", c.tp, " ", c.strategy_label(), " ",
             layout_name(c.layout));
}

// Every layout of P ranks that the model fits, on the batch ids [B, L] (packed
// by docs when given): each rank's logits, the loss (with and without the
// backward) and every gradient
// (summed over the replicas) against the one-process reference's logits
// [B, L, vocab], loss and gradients (want_full's).
void expect_every_layout(Communicator& world, const std::string& what, const LanguageModel& lm,
                         const std::vector<int64_t>& ids, int64_t B, int64_t L,
                         const std::vector<std::vector<int32_t>>& docs, const Tensor& want_logits, double want_loss,
                         const Model& want_full) {
  const int P = world.size();
  const int64_t V = lm.config.vocab, targets = lm_targets(B, L, docs);
  const ModelConfig mc = model_config(lm.config);
  int ran = 0;
  for (const ParallelConfig& pc : layouts(P)) {
    if (!fits(mc, pc, P)) continue;  // heads or MLP columns do not split this way
    ++ran;
    const RunContext run(&world, pc);
    const ModelParallel& par = run.model_parallel();
    const Mesh& mesh = run.mesh();
    const int64_t Bl = B / pc.dp, row0 = mesh.dp_index() * Bl;
    const std::vector<int64_t> my_ids(ids.begin() + row0 * L, ids.begin() + (row0 + Bl) * L);
    const std::vector<std::vector<int32_t>> my_docs =
        docs.empty() ? docs : std::vector<std::vector<int32_t>>(docs.begin() + row0, docs.begin() + row0 + Bl);
    Model m = lm_model(lm, DType::f32, run);

    // Logits (under PP: the pipeline's forwards, the last stage's logits on
    // every stage): this rank's rows against the reference's at the same (row,
    // position).
    Communicator* pp = pc.pp > 1 ? mesh.pp_comm.get() : nullptr;
    double err[3] = {0, 0, 0};
    {
      const Tensor logits = lm_forward(m, par, my_ids, Bl, L, my_docs, pp);
      const int64_t Ll = logits.dim(1);
      const std::vector<int64_t> pos =
          shard_positions(par.attn.layout, L, par.sp ? par.sp->size() : 1, par.sp ? par.sp->rank() : 0);
      ASSERT_EQ(static_cast<int64_t>(pos.size()), Ll);
      Tensor ref(DType::f32, {Bl, Ll, V});
      for (int64_t b = 0; b < Bl; ++b)
        for (int64_t j = 0; j < Ll; ++j)
          std::copy_n(want_logits.ptr<float>() + ((row0 + b) * L + pos[j]) * V, V, ref.ptr<float>() + (b * Ll + j) * V);
      err[0] = max_rel(logits.ptr<float>(), ref.ptr<float>(), ref.numel());
    }
    {  // lm_logits_at: a few positions (any order, a repeat), every row, on every rank
      const std::vector<int64_t> at = {L - 1, 0, L / 2, L / 2, 1};
      const int64_t n = static_cast<int64_t>(at.size());
      const Tensor got = lm_logits_at(m, par, my_ids, Bl, L, at, my_docs, pp);
      Tensor ref(DType::f32, {Bl, n, V});
      for (int64_t b = 0; b < Bl; ++b)
        for (int64_t k = 0; k < n; ++k)
          std::copy_n(want_logits.ptr<float>() + ((row0 + b) * L + at[k]) * V, V, ref.ptr<float>() + (b * n + k) * V);
      err[2] = max_rel(got.ptr<float>(), ref.ptr<float>(), ref.numel());
    }

    // Loss and gradients (under PP: 1F1B over one micro-batch per sequence),
    // summed over the replicas, against the reference's slice.
    const double eval_loss = lm_loss(m, par, my_ids, Bl, L, targets, run.replicas(), pp, static_cast<int>(Bl), my_docs);
    m.zero_grads();
    const double loss =
        lm_loss_backward(m, par, my_ids, Bl, L, targets, run.replicas(), pp, static_cast<int>(Bl), my_docs);
    if (Communicator* r = run.replicas()) r->all_reduce(m.grads(), m.num_params(), ReduceOp::sum);
    Model want_slice = model_for(mc, run);
    want_slice.copy_slice_from(want_full, true);
    ASSERT_EQ(want_slice.num_params(), m.num_params());
    err[1] = max_rel(m.grads(), want_slice.grads(), m.num_params());
    world.all_reduce(err, 3, ReduceOp::max);
    const std::string at = cat(what, " at P=", P, " ", label(pc));
    EXPECT_LT(err[0], 1e-4) << at << ": logits";
    EXPECT_LT(err[2], 1e-4) << at << ": lm_logits_at";
    EXPECT_NEAR(loss, want_loss, 1e-5 * want_loss) << at << ": loss";
    EXPECT_EQ(eval_loss, loss) << at << ": the loss without the backward";
    EXPECT_LT(err[1], 1e-4) << at << ": gradients";
    if (world.rank() == 0)
      std::printf("[lm dist] %s: logits %.2e (at positions %.2e), loss %.7f (one process %.7f), gradients %.2e\n",
                  at.c_str(), err[0], err[2], loss, want_loss, err[1]);
  }
  EXPECT_GE(ran, 1) << what << ": no layout fits at P=" << P;
}

class LmDistributed : public ::testing::TestWithParam<const char*> {};

TEST_P(LmDistributed, EveryLayoutEqualsOneProcess) {
  auto world = mpi_world(60);
  const int P = world->size();
  const std::string name = GetParam();
  const LanguageModel lm = LanguageModel::load(kHf + name);
  const LmConfig& c = lm.config;
  const int64_t B = 2, L = 24 % (2 * P) == 0 ? 24 : 48, V = c.vocab;
  std::mt19937_64 rng(5);  // the same ids on every rank
  std::vector<int64_t> ids(static_cast<size_t>(B * L));
  for (int64_t& id : ids) id = static_cast<int64_t>(rng() % static_cast<uint64_t>(V));
  const Tensor want_logits = lm_logits(lm, ids, B, L);
  const LmLossGrads want = lm_loss_and_grads(lm, ids, B, L);
  Model want_full(model_config(c));
  lm_import(want_full, c, want.grads, true);
  expect_every_layout(*world, name, lm, ids, B, L, {}, want_logits, want.loss, want_full);
}

// No divisibility rule: a length no rank count divides (25) splits into uneven
// shards (contiguous and striped differ by a token, zigzag's chunks by one), and
// every layout still equals one process.
TEST_P(LmDistributed, UnevenShardsEqualOneProcess) {
  auto world = mpi_world(60);
  const std::string name = GetParam();
  const LanguageModel lm = LanguageModel::load(kHf + name);
  const int64_t B = 2, L = 25;
  std::mt19937_64 rng(7);
  std::vector<int64_t> ids(static_cast<size_t>(B * L));
  for (int64_t& id : ids) id = static_cast<int64_t>(rng() % static_cast<uint64_t>(lm.config.vocab));
  const LmLossGrads want = lm_loss_and_grads(lm, ids, B, L);
  Model want_full(model_config(lm.config));
  lm_import(want_full, lm.config, want.grads, true);
  expect_every_layout(*world, name + " L=25", lm, ids, B, L, {}, lm_logits(lm, ids, B, L), want.loss, want_full);
}

// Packed rows: documents (lengths 1 — just its end-of-sequence token — 2, odd,
// longer than a shard; the last one of row 1 ends at the row's end without one)
// joined in two rows. Every layout's logits, loss and gradients equal the
// one-process reference run on each document alone: the logits position by
// position, the loss and gradients as the target-weighted sums over documents.
TEST_P(LmDistributed, PackedDocumentsEqualEachDocumentAlone) {
  auto world = mpi_world(60);
  const int P = world->size();
  const std::string name = GetParam();
  const LanguageModel lm = LanguageModel::load(kHf + name);
  const LmConfig& c = lm.config;
  const int64_t scale = 24 % (2 * P) == 0 ? 1 : 2, B = 2, L = 24 * scale, V = c.vocab, eos = V - 1;
  const std::vector<std::vector<int64_t>> lengths = {{1, 2, 9 * scale + 3 * (scale - 1), 12 * scale},
                                                     {7 * scale, 17 * scale}};
  std::mt19937_64 rng(11);
  std::vector<int64_t> ids;
  for (int64_t b = 0; b < B; ++b)
    for (size_t d = 0; d < lengths[b].size(); ++d)
      for (int64_t t = 0; t < lengths[b][d]; ++t) {
        const bool end = t + 1 == lengths[b][d] && !(b == 1 && d + 1 == lengths[b].size());
        ids.push_back(end ? eos : static_cast<int64_t>(rng() % static_cast<uint64_t>(V - 1)));
      }
  ASSERT_EQ(static_cast<int64_t>(ids.size()), B * L);
  const std::vector<std::vector<int32_t>> docs = lm_documents(ids, B, L, eos);
  for (int64_t b = 0; b < B; ++b) ASSERT_EQ(docs[b].size(), lengths[b].size() + 1);

  // The reference: each document alone.
  const int64_t targets = lm_targets(B, L, docs);
  Tensor want_logits(DType::f32, {B, L, V});
  double want_loss = 0;
  std::map<std::string, Tensor> want_grads;
  for (int64_t b = 0; b < B; ++b)
    for (size_t d = 0; d + 1 < docs[b].size(); ++d) {
      const int64_t a = docs[b][d], n = docs[b][d + 1] - a;
      const std::vector<int64_t> doc(ids.begin() + b * L + a, ids.begin() + b * L + a + n);
      const Tensor lg = lm_logits(lm, doc, 1, n);
      std::copy_n(lg.ptr<float>(), n * V, want_logits.ptr<float>() + (b * L + a) * V);
      if (n < 2) continue;
      const LmLossGrads r = lm_loss_and_grads(lm, doc, 1, n);
      const double w = static_cast<double>(n - 1) / static_cast<double>(targets);
      want_loss += r.loss * w;
      for (const auto& [key, g] : r.grads) {
        auto it = want_grads.find(key);
        if (it == want_grads.end()) {
          it = want_grads.emplace(key, Tensor(DType::f32, g.rank(), g.view().shape.data())).first;
          it->second.fill_zero();
        }
        float* acc = it->second.ptr<float>();
        for (int64_t i = 0; i < g.numel(); ++i) acc[i] += static_cast<float>(w * g.ptr<float>()[i]);
      }
    }
  Model want_full(model_config(c));
  lm_import(want_full, c, want_grads, true);
  expect_every_layout(*world, name + " packed", lm, ids, B, L, docs, want_logits, want_loss, want_full);
}

// Greedy decoding with the KV cache sharded over the SP group (or the heads over
// TP) gives transformers' continuation token for token. The 8-token prompt
// splits whole at some P and leaves a remainder for the decode steps at others.
TEST_P(LmDistributed, GreedyContinuationEqualsTransformers) {
  auto world = mpi_world(60);
  const int P = world->size();
  const std::string name = GetParam();
  const LanguageModel lm = LanguageModel::load(kHf + name);
  const nlohmann::json ref = nlohmann::json::parse(std::ifstream(kHf + name + "/reference.json"));
  const std::vector<int64_t> prompt = ref["prompt"].get<std::vector<int64_t>>();
  const std::vector<int64_t> want = ref["greedy"].get<std::vector<int64_t>>();
  const ModelConfig mc = model_config(lm.config);
  std::vector<ParallelConfig> pcs;
  for (Strategy s : {Strategy::ring, Strategy::ulysses}) {
    ParallelConfig c;
    c.sp = P, c.strategy = s, c.threads = 1;
    c.layout = 2 * P <= static_cast<int>(prompt.size()) ? Layout::zigzag : Layout::striped;
    pcs.push_back(c);
  }
  if (P > 1) {
    ParallelConfig c;
    c.sp = 1, c.tp = P, c.threads = 1;
    pcs.push_back(c);
  }
  if (P % 2 == 0) {  // two pipeline stages, each an SP group of P / 2 (a tied head copied to the last stage)
    ParallelConfig c;
    c.pp = 2, c.sp = P / 2, c.layout = Layout::zigzag, c.threads = 1;
    pcs.push_back(c);
  }
  int ran = 0;
  for (const ParallelConfig& pc : pcs) {
    if (!fits(mc, pc, P)) continue;  // heads or MLP columns do not split this way
    ++ran;
    const RunContext run(world.get(), pc);
    Communicator* pp = pc.pp > 1 ? run.mesh().pp_comm.get() : nullptr;
    const Model m = lm_model(lm, DType::f32, run);
    LmGenerateOptions o;
    o.new_tokens = static_cast<int64_t>(want.size());
    int steps = 0;
    o.on_token = [&](std::span<const int64_t> t) {
      ASSERT_EQ(t.size(), 1u);
      EXPECT_EQ(t[0], want[static_cast<size_t>(steps)]) << "streamed token " << steps;
      ++steps;
    };
    const auto got = lm_generate(m, run.model_parallel(), prompt, 1, static_cast<int64_t>(prompt.size()), o, pp);
    EXPECT_EQ(got.at(0), want) << name << " at P=" << P << " " << label(pc);
    EXPECT_EQ(steps, static_cast<int>(want.size()));
  }
  EXPECT_GE(ran, 1) << name << ": no layout fits at P=" << P;
}

// Sampled decoding (temperature, top-k, top-p, seeded) with the vocabulary split
// over a TP group picks the tokens one process picks: the TP ranks exchange their
// parts' candidates (top_k of them, or all for top-p alone), never the rows.
TEST_P(LmDistributed, SampledContinuationUnderTpEqualsOneProcess) {
  auto world = mpi_world(60);
  const int P = world->size();
  if (P == 1) GTEST_SKIP() << "needs a TP group";
  const std::string name = GetParam();
  const LanguageModel lm = LanguageModel::load(kHf + name);
  const nlohmann::json ref = nlohmann::json::parse(std::ifstream(kHf + name + "/reference.json"));
  const std::vector<int64_t> prompt = ref["prompt"].get<std::vector<int64_t>>();
  const ModelConfig mc = model_config(lm.config);
  std::vector<ParallelConfig> pcs;
  ParallelConfig tp;
  tp.sp = 1, tp.tp = P, tp.threads = 1;
  pcs.push_back(tp);
  if (P % 2 == 0) {  // TP within each of two pipeline stages
    ParallelConfig c;
    c.sp = 1, c.tp = P / 2, c.pp = 2, c.threads = 1;
    if (P > 2) pcs.push_back(c);
  }
  int ran = 0;
  for (const auto& [top_k, top_p] : std::vector<std::pair<int64_t, float>>{{5, 1.f}, {0, 0.9f}, {3, 0.8f}}) {
    LmGenerateOptions o;
    o.new_tokens = 8, o.seed = 17;
    o.sampling.greedy = false, o.sampling.temperature = 1.3f, o.sampling.top_k = top_k, o.sampling.top_p = top_p;
    std::vector<std::vector<int64_t>> want;
    {
      ParallelConfig one;
      one.threads = 1;
      const RunContext solo(nullptr, one);
      const Model m = lm_model(lm, DType::f32, solo);
      want = lm_generate(m, solo.model_parallel(), prompt, 1, static_cast<int64_t>(prompt.size()), o, nullptr);
    }
    for (const ParallelConfig& pc : pcs) {
      if (!fits(mc, pc, P)) continue;
      ++ran;
      const RunContext run(world.get(), pc);
      const Model m = lm_model(lm, DType::f32, run);
      Communicator* pp = pc.pp > 1 ? run.mesh().pp_comm.get() : nullptr;
      EXPECT_EQ(lm_generate(m, run.model_parallel(), prompt, 1, static_cast<int64_t>(prompt.size()), o, pp), want)
          << name << " at P=" << P << " " << label(pc) << " top_k " << top_k << " top_p " << top_p;
    }
  }
  if (ran == 0) GTEST_SKIP() << name << ": no TP layout fits at P=" << P;
}

// Prompts of different lengths decode as one batch: lengths 2P + 3, P, P + 1, P
// prefill 2P, then P, P, P tokens (the last three together) and read the rest
// in decode steps while the others already emit; every sequence's greedy
// tokens equal recomputing that sequence alone at every step.
TEST_P(LmDistributed, PromptsOfDifferentLengthsDecodeTogether) {
  auto world = mpi_world(60);
  const int P = world->size();
  const std::string name = GetParam();
  const LanguageModel lm = LanguageModel::load(kHf + name);
  const int64_t V = lm.config.vocab, new_tokens = 6;
  std::mt19937_64 rng(21);
  std::vector<std::vector<int64_t>> prompts;
  for (int64_t n : {2 * P + 3, P, P + 1, P}) {
    prompts.emplace_back();
    for (int64_t i = 0; i < n; ++i) prompts.back().push_back(static_cast<int64_t>(rng() % static_cast<uint64_t>(V)));
  }
  std::vector<std::vector<int64_t>> want;
  for (const auto& p : prompts) want.push_back(lm_greedy_reference(lm, p, new_tokens));
  const ModelConfig mc = model_config(lm.config);
  std::vector<ParallelConfig> pcs;
  for (Strategy s : {Strategy::ring, Strategy::ulysses}) {
    ParallelConfig pc;
    pc.sp = P, pc.strategy = s, pc.layout = Layout::zigzag, pc.threads = 1;
    pcs.push_back(pc);
  }
  if (P % 2 == 0) {  // two pipeline stages of P / 2 SP ranks
    ParallelConfig pc;
    pc.pp = 2, pc.sp = P / 2, pc.layout = Layout::zigzag, pc.threads = 1;
    pcs.push_back(pc);
  }
  int ran = 0;
  for (const ParallelConfig& pc : pcs) {
    if (!fits(mc, pc, P)) continue;  // heads or MLP columns do not split this way
    ++ran;
    const RunContext run(world.get(), pc);
    const Model m = lm_model(lm, DType::f32, run);
    LmGenerateOptions o;
    o.new_tokens = new_tokens;
    EXPECT_EQ(lm_generate(m, run.model_parallel(), prompts, o, pc.pp > 1 ? run.mesh().pp_comm.get() : nullptr), want)
        << name << " at P=" << P << " " << label(pc);
  }
  EXPECT_GE(ran, 1) << name << ": no layout fits at P=" << P;
}

// lm_model(dir) creates each rank's TP/PP slice empty and fills it from the
// memory-mapped checkpoint: the parameters equal the slice cut from the whole
// model (copy_slice_from), and no more memory than the slice's parameters is
// ever held (no gradients until a backward asks for them) — before, every rank
// built the whole model (and a fp32 copy of every tensor) first. The same from a bf16 copy of the checkpoint
// (widened element by element while slicing).
TEST_P(LmDistributed, EachRankLoadsOnlyItsSlice) {
  auto world = mpi_world(60);
  const int P = world->size();
  const std::string name = GetParam();
  const LanguageModel lm = LanguageModel::load(kHf + name);
  const ModelConfig mc = model_config(lm.config);
  // The same tensors rounded to bf16, in a checkpoint folder of this rank's own.
  const std::filesystem::path bf16_dir =
      std::filesystem::temp_directory_path() / cat("ringattn_slice_", ::getpid(), "_", world->rank());
  std::filesystem::create_directories(bf16_dir);
  std::filesystem::copy_file(kHf + name + "/config.json", bf16_dir / "config.json",
                             std::filesystem::copy_options::overwrite_existing);
  std::map<std::string, Tensor> rounded;  // fp32 tensors holding the bf16 values
  {
    std::vector<Tensor> bf16;
    std::vector<std::pair<std::string, TensorView>> views;
    for (const auto& [n, t] : lm.weights) {
      bf16.emplace_back(DType::bf16, t.rank(), t.view().shape.data());
      copy_into(bf16.back(), t);
      views.push_back({n, bf16.back().view()});
      Tensor back(DType::f32, t.rank(), t.view().shape.data());
      copy_into(back, bf16.back());
      rounded.emplace(n, std::move(back));
    }
    save_safetensors((bf16_dir / "model.safetensors").string(), views);
  }
  int ran = 0;
  for (ParallelConfig pc : layouts(P)) {
    if (!fits(mc, pc, P)) continue;
    ++ran;
    const RunContext run(world.get(), pc);
    for (const bool half : {false, true}) {
      const std::map<std::string, Tensor>& weights = half ? rounded : lm.weights;
      const std::string dir = half ? bf16_dir.string() : kHf + name;
      const int64_t before = memory_stats().current_bytes;
      reset_peak_memory();
      const Model m = lm_model(dir, DType::f32, run);
      const int64_t held = memory_stats().peak_bytes - before, slice = m.num_params() * 4;
      Model full(mc);
      lm_import(full, lm.config, weights);
      Model want = model_for(mc, run);
      want.copy_slice_from(full, false);
      const std::string at = cat(name, half ? " (bf16 checkpoint)" : "", " at P=", P, " ", label(pc));
      ASSERT_EQ(want.num_params(), m.num_params()) << at;
      EXPECT_TRUE(std::equal(m.params(), m.params() + m.num_params(), want.params())) << at << ": parameters";
      EXPECT_LE(held, slice + 4096) << at << ": loading held " << held << " bytes for a slice of " << slice;
      // The slices gathered back (save_lm's input): the checkpoint, exactly, on rank 0.
      const std::map<std::string, Tensor> back = lm_gather(m, lm.config, &run);
      if (world->rank() != 0) {
        EXPECT_TRUE(back.empty()) << at;
        continue;
      }
      ASSERT_EQ(back.size(), weights.size()) << at;
      for (const auto& [n, t] : weights) {
        const Tensor& g = back.at(n);
        EXPECT_TRUE(g.numel() == t.numel() && std::equal(t.ptr<float>(), t.ptr<float>() + t.numel(), g.ptr<float>()))
            << at << ": gathered " << n;
      }
    }
  }
  std::filesystem::remove_all(bf16_dir);
  EXPECT_GE(ran, 1) << name << ": no layout fits at P=" << P;
}

// A token id outside the vocabulary at the last position (held by one rank in
// every layout) fails on every rank before any compute, in the forward, the loss
// and generation: no rank is left waiting in a collective.
TEST(LmDistributedErrors, BadTokenIdFailsOnEveryRank) {
  auto world = mpi_world(60);
  const int P = world->size();
  const LanguageModel lm = LanguageModel::load(kHf + "llama_gqa");
  ParallelConfig pc;
  pc.sp = P, pc.threads = 1;
  const RunContext run(world.get(), pc);
  Model m = lm_model(lm, DType::f32, run);
  const int64_t L = 4 * P;
  std::vector<int64_t> ids(static_cast<size_t>(L), 1);
  ids.back() = lm.config.vocab;
  const std::string want = cat("token id ", lm.config.vocab, " is outside the vocabulary");
  auto fails = [&](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what()).find(want) != std::string::npos;
    }
    return false;
  };
  const ModelParallel& par = run.model_parallel();
  EXPECT_TRUE(fails([&] { lm_forward(m, par, ids, 1, L); }));
  EXPECT_TRUE(fails([&] { lm_loss_backward(m, par, ids, 1, L, L - 1, nullptr); }));
  EXPECT_TRUE(fails([&] { lm_generate(m, par, {ids}, LmGenerateOptions{}); }));
  world->barrier();  // every rank got here: none is stuck
}

INSTANTIATE_TEST_SUITE_P(Fixtures, LmDistributed,
                         ::testing::Values("llama_gqa", "llama_tied_llama3", "qwen2", "gpt2", "mistral_window",
                                           "qwen2_window"));

}  // namespace
}  // namespace ringattn::testing
