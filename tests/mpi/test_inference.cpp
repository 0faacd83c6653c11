// Prefill + decode with a KV cache (RA+SP sharded by sequence, TP, PP, SP × TP)
// equals one process that recomputes the whole sequence from scratch.
//
// Two sequences of different prompt lengths are prefilled, then decoded for 60
// steps with given (teacher-forced) inputs. The reference runs the full model over
// prompt + decode inputs of each sequence on one process: with a causal model the
// output at position t is what the decode step for t must produce. Errors are
// max|diff| / max|ref| over every output, reduced over ranks so all agree.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "ringattn/comm.h"
#include "ringattn/error.h"
#include "ringattn/inference.h"
#include "ringattn/layout.h"
#include "ringattn/model.h"
#include "ringattn/parallel.h"

namespace ringattn {
namespace {

constexpr int kSteps = 60;

class Inference : public ::testing::Test {
 protected:
  void SetUp() override { saved_ = omp_get_max_threads(), omp_set_num_threads(1); }
  void TearDown() override { omp_set_num_threads(saved_); }
  int saved_ = 1;
};

struct Errors {
  double prefill = 0, decode = 0;
};

double rel(const TensorView& got, const TensorView& ref) {
  double den = 0;
  for (int64_t i = 0; i < ref.numel(); ++i) den = std::max(den, static_cast<double>(std::fabs(ref.ptr<float>()[i])));
  return max_abs_diff(got, ref) / den;
}

// Runs prefill + kSteps decode steps on a dp = 1 mesh (sp, tp, pp) and compares
// every output with the one-process reference. `repeat` receives the decode
// outputs so a second run can be compared bitwise.
Errors run_inference(Communicator& world, const ModelConfig& c, int sp, int tp, int pp, Layout layout,
                     const std::vector<int64_t>& prompts, std::vector<float>* outputs = nullptr) {
  const int64_t B = static_cast<int64_t>(prompts.size()), D = c.d_model;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<Tensor> seq;  // per sequence: prompt, then the decode inputs
  for (int64_t L : prompts) {
    seq.emplace_back(DType::f32, std::initializer_list<int64_t>{1, L + kSteps, D});
    for (int64_t i = 0; i < seq.back().numel(); ++i) seq.back().ptr<float>()[i] = nd(rng);
  }
  // One process, from scratch.
  Model full(c);
  std::vector<DeviceTensor> ref;
  for (const Tensor& s : seq) {
    Activations act;
    ref.push_back(model_forward(full, s, ModelParallel{}, act));
  }
  // The mesh, set up the way the commands do it.
  ParallelConfig pc;
  pc.pp = pp, pc.sp = sp, pc.tp = tp, pc.layout = layout, pc.threads = 1;
  RunContext run(&world, pc);
  const Mesh& mesh = run.mesh();
  Model part = model_for(c, run);
  const ModelParallel& spc = run.model_parallel();
  Communicator* ppc = pp > 1 ? mesh.pp_comm.get() : nullptr;
  const int64_t longest = *std::max_element(prompts.begin(), prompts.end());
  KVCache cache(part, B, longest / sp + (kSteps + sp - 1) / sp, sp, mesh.sp_index());
  int full_layer = -1;  // a layer of full attention here, if any
  for (int l = 0; l < part.num_layers(); ++l) {
    const int64_t w = c.window_left(part.first_layer() + l);
    if (w < 0 && full_layer < 0) full_layer = l;
    if (w >= 0) {
      EXPECT_EQ(cache.capacity(l), std::min(cache.capacity(), KVCache::window_slots(w, sp)));
    }
  }
  Errors e;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = prompts[static_cast<size_t>(b)], Ll = L / sp;
    Tensor x(DType::f32, {1, Ll, D}), want(DType::f32, {1, Ll, D});
    shard(seq[b].view().slice(1, 0, L), x, layout, sp, mesh.sp_index());
    shard(ref[b].view().slice(1, 0, L), want, layout, sp, mesh.sp_index());
    DeviceTensor y = prefill(part, cache, x, b, spc, ppc);
    if (!y.view().empty()) e.prefill = std::max(e.prefill, rel(y, want));
  }
  for (int j = 0; j < kSteps; ++j) {
    Tensor x(DType::f32, {B, 1, D}), want(DType::f32, {B, 1, D});
    for (int64_t b = 0; b < B; ++b) {
      const int64_t t = prompts[static_cast<size_t>(b)] + j;
      copy_into(x.view().slice(0, b, 1), seq[b].view().slice(1, t, 1));
      copy_into(want.view().slice(0, b, 1), ref[b].view().slice(1, t, 1));
    }
    DeviceTensor y = decode_step(part, cache, x, spc, ppc);
    e.decode = std::max(e.decode, rel(y, want));
    if (outputs) outputs->insert(outputs->end(), y.ptr<float>(), y.ptr<float>() + y.numel());
  }
  for (int64_t b = 0; b < B; ++b) EXPECT_EQ(cache.length(b), prompts[static_cast<size_t>(b)] + kSteps);
  // Shards of full attention stay balanced: every rank's entries within one of each other.
  for (int64_t b = 0; b < B && full_layer >= 0; ++b)
    for (int r = 0; r < sp; ++r)
      EXPECT_LE(std::abs(cache.held(full_layer, b, r) - cache.held(full_layer, b, 0)), 1) << "sequence " << b;
  // A sliding-window layer holds exactly what its window still sees here, and more
  // only in slots not reused yet.
  for (int l = 0; l < part.num_layers(); ++l) {
    const int64_t w = c.window_left(part.first_layer() + l);
    if (w < 0) continue;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t t = cache.length(b);  // the next query
      int64_t visible = 0;
      for (int64_t q : cache.positions(l, b)) visible += q >= t - w;
      int64_t want = 0;  // this rank's positions in [t − w, t − 1]
      const int64_t L = prompts[static_cast<size_t>(b)];
      const std::vector<int64_t> mine = shard_positions(layout, L, sp, mesh.sp_index());
      for (int64_t q = std::max<int64_t>(0, t - w); q < t; ++q)
        want += q < L ? std::count(mine.begin(), mine.end(), q) : q % sp == mesh.sp_index();
      EXPECT_EQ(visible, want) << "layer " << l << ", sequence " << b;
      EXPECT_LE(cache.held(l, b, mesh.sp_index()), cache.capacity(l));
    }
  }
  double errs[2] = {e.prefill, e.decode};
  world.all_reduce(errs, 2, ReduceOp::max);
  if (world.rank() == 0)
    std::printf("  sp %d tp %d pp %d %s: prefill error %.2e, decode error %.2e (%d steps)\n", sp, tp, pp,
                layout_name(layout), errs[0], errs[1], kSteps);
  return {errs[0], errs[1]};
}

ModelConfig small_gqa() {
  ModelConfig c;
  c.layers = 2, c.d_model = 32, c.heads = 4, c.kv_heads = 2, c.mlp_hidden = 64, c.seed = 3;
  return c;
}

TEST_F(Inference, SequenceShardedCacheEqualsRecomputationForEveryLayout) {
  auto world = mpi_world(120);
  const int P = world->size();
  for (Layout layout : {Layout::contiguous, Layout::zigzag, Layout::striped}) {
    SCOPED_TRACE(layout_name(layout));
    const Errors e = run_inference(*world, small_gqa(), P, 1, 1, layout, {48, 96});
    EXPECT_LE(e.prefill, 1e-5);
    EXPECT_LE(e.decode, 1e-5);
  }
}

// Sliding windows (7 tokens) on every layer, or on the second only: the prompts
// (48, 96) and the 60 decode steps are far longer, so the ring buffers wrap many
// times; the outputs still equal recomputing everything with the window.
ModelConfig windowed(std::vector<bool> layers) {
  ModelConfig c = small_gqa();
  c.window = 7, c.window_layers = std::move(layers);
  return c;
}

TEST_F(Inference, SlidingWindowCacheEqualsRecomputationForEveryLayout) {
  auto world = mpi_world(120);
  const int P = world->size();
  for (const std::vector<bool>& layers : {std::vector<bool>{true, true}, std::vector<bool>{false, true}})
    for (Layout layout : {Layout::contiguous, Layout::zigzag, Layout::striped}) {
      SCOPED_TRACE(std::string(layout_name(layout)) + (layers[0] ? ", every layer" : ", layer 1"));
      const Errors e = run_inference(*world, windowed(layers), P, 1, 1, layout, {48, 96});
      EXPECT_LE(e.prefill, 1e-5);
      EXPECT_LE(e.decode, 1e-5);
    }
}

TEST_F(Inference, SlidingWindowCacheUnderTensorAndPipelineParallelism) {
  auto world = mpi_world(120);
  const int P = world->size();
  ModelConfig c = windowed({});
  c.layers = 24;  // pp | 24 for P <= 8; windows on every other layer
  for (int l = 0; l < c.layers; ++l) c.window_layers.push_back(l % 2 == 1);
  const Errors pe = run_inference(*world, c, 1, 1, P, Layout::contiguous, {33, 20});
  EXPECT_LE(pe.prefill, 1e-5);
  EXPECT_LE(pe.decode, 1e-5);
  if (P % 2 == 0) {  // SP x TP: tp = 2 divides the 2 kv heads
    const Errors te = run_inference(*world, windowed({true, false}), P / 2, 2, 1, Layout::zigzag, {48, 96});
    EXPECT_LE(te.prefill, 1e-5);
    EXPECT_LE(te.decode, 1e-5);
  }
}

TEST_F(Inference, TensorParallelDecodeEqualsRecomputation) {
  auto world = mpi_world(120);
  ModelConfig c;
  c.layers = 2, c.d_model = 96, c.heads = 48, c.kv_heads = 24, c.mlp_hidden = 96, c.seed = 4;  // tp | 24 for P <= 8
  const Errors e = run_inference(*world, c, 1, world->size(), 1, Layout::contiguous, {40, 17});
  EXPECT_LE(e.prefill, 1e-5);
  EXPECT_LE(e.decode, 1e-5);
}

TEST_F(Inference, PipelineDecodeEqualsRecomputation) {
  auto world = mpi_world(120);
  ModelConfig c = small_gqa();
  c.layers = 24;  // pp | 24 for P <= 8
  const Errors e = run_inference(*world, c, 1, 1, world->size(), Layout::contiguous, {33, 20});
  EXPECT_LE(e.prefill, 1e-5);
  EXPECT_LE(e.decode, 1e-5);
}

TEST_F(Inference, SequenceTimesTensorParallelDecodeEqualsRecomputation) {
  auto world = mpi_world(120);
  const int P = world->size();
  if (P % 2) GTEST_SKIP() << "SP x TP with tp = 2 needs an even number of ranks";
  const Errors e = run_inference(*world, small_gqa(), P / 2, 2, 1, Layout::zigzag, {48, 96});
  EXPECT_LE(e.prefill, 1e-5);
  EXPECT_LE(e.decode, 1e-5);
}

TEST_F(Inference, RepeatedRunsAreBitwiseIdentical) {
  auto world = mpi_world(120);
  std::vector<float> a, b;
  run_inference(*world, small_gqa(), world->size(), 1, 1, Layout::zigzag, {48}, &a);
  run_inference(*world, small_gqa(), world->size(), 1, 1, Layout::zigzag, {48}, &b);
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
}

TEST_F(Inference, FullCacheAndBadPrefillsThrowOnEveryRank) {
  auto world = mpi_world(60);
  const int P = world->size();
  const ModelConfig c = small_gqa();
  Model m(c);
  ModelParallel spc;
  spc.sp = P > 1 ? world.get() : nullptr;
  spc.attn.layout = Layout::striped;
  const int64_t Ll = 4, D = c.d_model;
  KVCache cache(m, 1, Ll + 2, P, world->rank());  // room for 2 decoded tokens per rank
  Tensor x(DType::f32, {1, Ll, D}), t(DType::f32, {1, 1, D});
  for (int64_t i = 0; i < x.numel(); ++i) x.ptr<float>()[i] = 0.01f * static_cast<float>(i % 17);
  for (int64_t i = 0; i < t.numel(); ++i) t.ptr<float>()[i] = 0.1f;
  EXPECT_THROW(decode_step(m, cache, t, spc), Error);  // nothing prefilled yet
  prefill(m, cache, x, 0, spc);
  EXPECT_THROW(prefill(m, cache, x, 0, spc), Error);  // sequence 0 is not empty
  KVCache other(m, 1, Ll + 2, P, world->rank());
  Tensor big(DType::f32, {1, Ll + 3, D});
  EXPECT_THROW(prefill(m, other, big, 0, spc), Error);  // beyond the capacity
  EXPECT_THROW(prefill(m, other, x, 1, spc), Error);    // no sequence 1
  if (P > 1) {  // 4P + 1 tokens: striped gives the extra one to rank 0, not to rank 1
    Tensor x5(DType::f32, {1, Ll + 1, D});
    for (int64_t i = 0; i < x5.numel(); ++i) x5.ptr<float>()[i] = 0.01f * static_cast<float>(i % 13);
    EXPECT_THROW(prefill(m, other, world->rank() == 1 ? x5 : x, 0, spc), Error);
    EXPECT_NO_THROW(prefill(m, other, world->rank() == 0 ? x5 : x, 0, spc));
    EXPECT_EQ(other.length(0), 4 * P + 1);
  }
  for (int j = 0; j < 2 * P; ++j) decode_step(m, cache, t, spc);
  try {
    decode_step(m, cache, t, spc);
    ADD_FAILURE() << "a decode step beyond the capacity did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("KV cache is full"), std::string::npos) << e.what();
  }
  EXPECT_EQ(cache.length(0), Ll * P + 2 * P);  // the failed step wrote nothing
}

// With a window on every layer the cache never fills: it decodes far past the
// capacity a full cache would need. Given fewer slots than the window needs, it
// fails on every rank when a token's owner has no slot out of the window.
TEST_F(Inference, WindowedCacheReusesSlotsAndFailsWhenTheWindowDoesNotFit) {
  auto world = mpi_world(60);
  const int P = world->size();
  ModelConfig c = small_gqa();
  c.window = 4, c.window_layers = {true, true};
  Model m(c);
  ModelParallel spc;
  spc.sp = P > 1 ? world.get() : nullptr;
  spc.attn.layout = Layout::striped;
  const int64_t Ll = 4, D = c.d_model;
  Tensor x(DType::f32, {1, Ll, D}), t(DType::f32, {1, 1, D});
  for (int64_t i = 0; i < x.numel(); ++i) x.ptr<float>()[i] = 0.01f * static_cast<float>(i % 17);
  for (int64_t i = 0; i < t.numel(); ++i) t.ptr<float>()[i] = 0.1f;
  KVCache cache(m, 1, Ll + 2, P, world->rank());
  EXPECT_EQ(cache.capacity(0), std::min<int64_t>(Ll + 2, KVCache::window_slots(3, P)));
  prefill(m, cache, x, 0, spc);
  std::vector<DeviceTensor> ys;
  for (int j = 0; j < 10 * P; ++j) ys.push_back(decode_step(m, cache, t, spc));  // 5x what Ll + 2 slots hold
  EXPECT_EQ(cache.length(0), Ll * P + 10 * P);

  // Exactly the slots the window needs: a query and the 3 keys before it, of
  // which a rank holds ceil(4 / P) (striped prompt, then t mod P). That many
  // give the same outputs; one fewer fails on every rank, at the prefill or at
  // the first decoded token whose owner's slots are all still in the window.
  const int64_t need = (4 + P - 1) / P;
  KVCache exact(m, 1, need, P, world->rank());
  prefill(m, exact, x, 0, spc);
  for (int j = 0; j < 10 * P; ++j)
    EXPECT_LE(max_abs_diff(decode_step(m, exact, t, spc).view(), ys[static_cast<size_t>(j)].view()), 1e-6)
        << "step " << j;
  if (need == 1) return;
  KVCache tight(m, 1, need - 1, P, world->rank());
  try {
    prefill(m, tight, x, 0, spc);
    for (int j = 0; j < 10 * P; ++j) decode_step(m, tight, t, spc);
    ADD_FAILURE() << "decoding into a cache smaller than the window did not throw";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_TRUE(what.find("within the window of 4") != std::string::npos ||
                what.find("more than the KV cache's capacity") != std::string::npos)
        << what;
  }
}

}  // namespace
}  // namespace ringattn
