// The performance model (plan.h): hand-computed FLOPs, collective costs, bubbles
// and whole predictions on toy hardware; the causal fractions against a brute-force
// count over the real layouts; properties (more bandwidth is never slower, more SP
// ranks never need more memory per device); hardware files.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "ringattn/error.h"
#include "ringattn/plan.h"

namespace ringattn {
namespace {

ModelConfig tiny(bool causal) {
  ModelConfig m;
  m.layers = 2, m.d_model = 8, m.heads = 2, m.mlp_hidden = 32, m.causal = causal;
  return m;
}

TEST(PlanFlops, HandComputed) {
  Workload w;
  w.model = tiny(false), w.seq = 4, w.batch = 1;
  // per token per layer: 2·(D·C + D·D + 2·D·F) = 2·(8·24 + 64 + 512) = 1536
  EXPECT_DOUBLE_EQ(forward_flops_per_layer_per_token_gemm(w.model), 1536);
  // 2 layers × (4 tokens × 1536 + 4·B·H·L²·dh = 4·1·2·16·4 = 512)
  EXPECT_DOUBLE_EQ(forward_flops(w), 2 * (4 * 1536 + 512));
  w.model.causal = true;  // visible pairs L(L+1)/2 = 10 of 16
  EXPECT_DOUBLE_EQ(forward_flops(w), 2 * (4 * 1536 + 4 * 2 * 10 * 4));
}

TEST(PlanCosts, Collectives) {
  const LinkSpec l{1e-6, 1e9, true};
  EXPECT_DOUBLE_EQ(cost_send(l, 4e6), 1e-6 + 4e-3);
  EXPECT_DOUBLE_EQ(cost_all_reduce(l, 4, 4e6), 2 * 3 * 1e-6 + 2.0 * 3 / 4 * 4e-3);
  EXPECT_DOUBLE_EQ(cost_all_gather(l, 4, 4e6), 3e-6 + 3e-3);
  EXPECT_DOUBLE_EQ(cost_all_to_all(l, 8, 8e6), 7e-6 + 7e-3);
  EXPECT_DOUBLE_EQ(cost_reduce_scatter(l, 2, 2e6), 1e-6 + 1e-3);
  EXPECT_EQ(cost_all_reduce(l, 1, 4e6), 0);
}

TEST(PlanCosts, PipelineBubble) {
  EXPECT_DOUBLE_EQ(pipeline_bubble(2, 8), 1.0 / 9);
  EXPECT_DOUBLE_EQ(pipeline_bubble(4, 4), 3.0 / 7);
  EXPECT_DOUBLE_EQ(pipeline_bubble(1, 5), 0);
}

// The busiest rank's visible (query, key) pairs, counted over the real shards.
TEST(PlanCosts, CausalFractionMatchesTheLayouts) {
  for (Layout l : {Layout::contiguous, Layout::zigzag, Layout::striped})
    for (int P : {1, 2, 3, 4, 8})
      for (int64_t L : {int64_t{48}, int64_t{96}}) {
        if (L % (2 * P)) continue;
        double busiest = 0;
        for (int p = 0; p < P; ++p) {
          double pairs = 0;
          for (int64_t i : shard_positions(l, L, P, p)) pairs += static_cast<double>(i + 1);
          busiest = std::max(busiest, pairs);
        }
        const double expect = busiest / (static_cast<double>(L) / P * static_cast<double>(L));
        EXPECT_NEAR(busiest_fraction(l, P, L), expect, 1e-12) << layout_name(l) << " P=" << P << " L=" << L;
        // With a sliding window of W keys query i sees min(i + 1, W).
        for (int64_t W : {1, 2, 5, 17, 47, 200}) {
          double most = 0;
          for (int p = 0; p < P; ++p) {
            double pairs = 0;
            for (int64_t i : shard_positions(l, L, P, p)) pairs += static_cast<double>(std::min(i + 1, W));
            most = std::max(most, pairs);
          }
          EXPECT_NEAR(busiest_fraction(l, P, L, true, W), most / (static_cast<double>(L) / P * static_cast<double>(L)),
                      1e-12)
              << layout_name(l) << " P=" << P << " L=" << L << " W=" << W;
        }
      }
}

// The same with packed documents (lengths 1, 2, odd, longer than a shard, an
// empty one), any L (shards of unequal length), causal with and without a
// window, and full attention: a query sees its own document's keys, positions
// restarting in each.
TEST(PlanCosts, DocumentFractionMatchesTheLayouts) {
  for (Layout l : {Layout::contiguous, Layout::zigzag, Layout::striped, Layout::doc_zigzag, Layout::doc_balanced})
    for (int P : {1, 2, 3, 4, 8})
      for (int64_t L : {int64_t{61}, int64_t{96}, int64_t{250}}) {
        const std::vector<int32_t> cu = {
            0, 1, 3, 10, 10, static_cast<int32_t>(L / 2), static_cast<int32_t>(L - 2), static_cast<int32_t>(L)};
        for (bool causal : {true, false})
          for (int64_t W : {int64_t{0}, int64_t{1}, int64_t{5}, int64_t{40}}) {
            if (!causal && W > 0) continue;
            double most = 0;
            for (int p = 0; p < P; ++p) {
              double pairs = 0;
              for (int64_t i : shard_positions(l, L, P, p, cu)) {
                const int64_t d = std::upper_bound(cu.begin(), cu.end(), i) - cu.begin() - 1, s = cu[d], e = cu[d + 1];
                pairs += static_cast<double>(!causal ? e - s : W > 0 ? std::min(i - s + 1, W) : i - s + 1);
              }
              most = std::max(most, pairs);
            }
            EXPECT_NEAR(busiest_fraction(l, P, L, causal, W, cu),
                        most / (static_cast<double>(L) / P * static_cast<double>(L)), 1e-12)
                << layout_name(l) << " P=" << P << " L=" << L << (causal ? " causal" : "") << " W=" << W;
          }
      }
}

// Toy hardware: constant rates, free elementwise work, no per-op cost.
Hardware toy(double bandwidth = 1e30, bool overlap = true) {
  Hardware h;
  h.name = "toy";
  h.devices_per_node = 64;
  h.memory_bytes = 1e15, h.memory_bandwidth = 1e30, h.elementwise_bandwidth = 1e30, h.decode_bandwidth = 1e12;
  h.gemm["fp32"] = {{1, 1e9}};
  h.attention_forward["fp32"] = {{1, 5e8}};
  h.attention_backward["fp32"] = {{1, 2.5e8}};
  h.peak["fp32"] = 2e9;
  h.intra_node = h.inter_node = {0, bandwidth, overlap};
  return h;
}

// The forward bytes one device sends: one layer, one 64-wide head, 4096 tokens
// over RA+SP(4) in `layout`, the documents cu (empty: none), causal.
double ring_bytes(Layout layout, std::vector<int32_t> cu) {
  Workload w;
  w.model.layers = 1, w.model.d_model = 64, w.model.heads = 1, w.model.kv_heads = 1;
  w.seq = 4096, w.batch = 1, w.cu_seqlens = std::move(cu);
  Cluster cl;
  cl.world = 4;
  Candidate c;
  c.sp = 4, c.layout = layout;
  return predict(w, c, toy(), cl).forward_bytes_sent;
}
constexpr double kPerKey = 2 * 64 * 4;  // K and V of the 64-wide head, fp32

// The ring's bytes with packed documents on contiguous shards: only the keys of
// the document crossing a shard's end travel, as far as it reaches; documents
// that end at the shards' edges send nothing.
TEST(PlanCosts, RingCarriesOnlyDocumentsThatCrossShards) {
  const double full = ring_bytes(Layout::contiguous, {});
  const double none = ring_bytes(Layout::contiguous, {0, 1024, 2048, 3072, 4096});  // one document per shard
  // Short documents across each edge: the last 24, 48 and 72 keys of shards
  // 0, 1, 2 are seen by the next shard only.
  const double some = ring_bytes(Layout::contiguous, {0, 1000, 1100, 2000, 2100, 3000, 3100, 4096});
  // Full causal sends 3 hops of 1024 keys, the documents 1 hop of 72 (the most
  // any member sends).
  EXPECT_NEAR(full - none, 3 * 1024 * kPerKey, 1e-6);
  EXPECT_NEAR(some - none, 72 * kPerKey, 1e-6);
}

// doc-balanced: documents held whole send nothing; a dealt one's chunks (first in
// each shard) go the whole ring, with the whole documents between them when
// several are dealt.
TEST(PlanCosts, DocBalancedRingCarriesTheDealtDocumentsOnly) {
  const std::vector<int32_t> equal = {0, 1024, 2048, 3072, 4096};  // four equal documents: one whole per rank
  EXPECT_EQ(document_owners(equal, 4), (std::vector<int>{0, 1, 2, 3}));
  EXPECT_EQ(ring_bytes(Layout::doc_balanced, equal), 0);
  // One document of 2048 is more than a rank's share: dealt (chunks of 256, two
  // per rank, ahead of the whole documents before it in the sequence); the four
  // of 512 then go whole, one to each rank.
  const std::vector<int32_t> dealt = {0, 512, 1024, 1536, 2048, 4096};
  EXPECT_EQ(document_owners(dealt, 4), (std::vector<int>{0, 1, 2, 3, -1}));
  EXPECT_NEAR(ring_bytes(Layout::doc_balanced, dealt), 3 * 512 * kPerKey, 1e-6);
}

// A language model (llama: SwiGLU's three MLP matrices, an explicit head_dim,
// the embedding and the LM head) counted by hand.
TEST(PlanFlops, LanguageModelHandComputed) {
  Workload w;
  w.model = tiny(false), w.seq = 4, w.batch = 1;
  w.model.mlp = Mlp::swiglu, w.model.head_size = 6, w.model.vocab = 50;
  // per token per layer: 2·(D·C + A·D + D·2F + F·D), C = 3·2·6 = 36, A = 12:
  // 2·(8·36 + 12·8 + 8·64 + 32·8) = 2304
  EXPECT_DOUBLE_EQ(forward_flops_per_layer_per_token_gemm(w.model), 2304);
  // 2 layers × (4 tokens × 2304 + 4·1·2·16·6 = 768) + the head 2·4·8·50
  EXPECT_DOUBLE_EQ(forward_flops(w), 2 * (4 * 2304 + 768) + 2 * 4 * 8 * 50);
}

TEST(PlanPredict, SingleDeviceIsFlopsOverRates) {
  Workload w;
  w.model = tiny(false), w.seq = 64, w.batch = 2;
  const Hardware h = toy();
  Cluster cl;
  const Prediction p = predict(w, Candidate{}, h, cl);
  ASSERT_EQ(p.invalid, "");
  const double gemm = 64 * 2 * 1536.0, attn = 4 * 2 * 2 * 64 * 64 * 4.0;  // per layer
  EXPECT_NEAR(p.forward_s, 2 * (gemm / 1e9 + attn / 5e8), 1e-15);
  // backward: GEMMs twice, attention 2.5× the FLOPs at the backward rate
  EXPECT_NEAR(p.train_s, 2 * (3 * gemm / 1e9 + attn / 5e8 + 2.5 * attn / 2.5e8), 1e-15);
  EXPECT_NEAR(p.forward_mfu, forward_flops(w) / p.forward_s / 2e9, 1e-12);
  EXPECT_EQ(p.train_bytes_sent, 0);
}

// Decode reads the weights from the last-level cache while every rank's fit in it
// (cached_weight_bandwidth), else at decode_bandwidth like the KV cache.
TEST(PlanPredict, DecodeReadsCachedWeightsWhileTheyFit) {
  Workload w;
  w.model = tiny(false), w.seq = 64, w.batch = 2;
  Hardware h = toy();
  h.gemm["fp32"] = {{1, 1e18}};  // the weight reads, not the FLOPs, bound the step
  Cluster cl;
  const Prediction base = predict(w, Candidate{}, h, cl);
  // 2 layers of 4D + D·3D + 3D + D·D + 2D + D·F + F + F·D = 872 fp32 parameters (D 8, F 32)
  const double weights = 2 * 872 * 4.0;
  h.cached_weight_bandwidth = 4e12;
  h.llc_bytes = 1e9;
  const Prediction cached = predict(w, Candidate{}, h, cl);
  EXPECT_LT(cached.decode_step_s, base.decode_step_s);
  EXPECT_NEAR(base.decode_step_s - cached.decode_step_s, weights / 1e12 - weights / 4e12, weights * 1e-14)
      << "the weight reads move from 1e12 to 4e12 B/s";
  h.llc_bytes = 100;  // too small to hold them: read at decode_bandwidth again
  EXPECT_DOUBLE_EQ(predict(w, Candidate{}, h, cl).decode_step_s, base.decode_step_s);
}

TEST(PlanPredict, TensorParallelAddsItsAllReduces) {
  Workload w;
  w.model = tiny(false), w.seq = 64, w.batch = 2;
  const double beta = 1e8;
  const Hardware fast = toy(), slow = toy(beta);
  Cluster cl;
  cl.world = 2;
  Candidate c;
  c.tp = 2;
  const Prediction a = predict(w, c, fast, cl), b = predict(w, c, slow, cl);
  // 2 layers × 2 all-reduces of N·D fp32 in the forward: each 2(T−1)/T·n/β
  const double n = 2 * 64 * 8 * 4.0;
  EXPECT_NEAR(b.forward_s - a.forward_s, 2 * 2 * (n / beta), 1e-12);
  EXPECT_NEAR(b.forward_bytes_sent, 2 * 2 * n, 1e-6);
  EXPECT_EQ(b.comm_hidden_s, 0);  // TP all-reduces are on the critical path
}

TEST(PlanPredict, RingTransfersHideBehindAttention) {
  Workload w;
  w.model = tiny(false), w.seq = 256, w.batch = 1;
  Cluster cl;
  cl.world = 4;
  Candidate c;
  c.sp = 4;
  const Prediction fast = predict(w, c, toy(1e12), cl);
  EXPECT_GT(fast.comm_s, 0);
  // Every transfer is shorter than a stage, so all are hidden but the backward's
  // last hop home of dK/dV; per layer 3 K/V blocks of 4096 B (forward), 3 of K/V +
  // dK/dV (8192 B), 1 home hop (4096 B); the gradient all-reduce (1744 params) is exposed.
  EXPECT_NEAR(fast.comm_hidden_s, 2 * (3 * 4096 + 3 * 8192) / 1e12, 1e-20);
  EXPECT_NEAR(fast.comm_s, (2 * (3 * 4096 + 3 * 8192 + 4096) + 1.5 * 1744 * 4) / 1e12, 1e-20);
  const Prediction copy = predict(w, c, toy(1e12, false), cl);
  EXPECT_EQ(copy.comm_hidden_s, 0);  // a core that copies cannot compute meanwhile
  EXPECT_GT(copy.train_s, fast.train_s);
  // forward: (P−1) K/V blocks of 2·(L/P)·Hkv·dh fp32 per layer
  EXPECT_NEAR(fast.forward_bytes_sent, 2 * 3 * (2 * 64 * 2 * 4 * 4.0), 1e-6);
}

// A window W on contiguous shards of 64: each block travels 1 + (W − 2)/64 hops
// with its last W − 1 keys (what the ring sends), attention work and the KV cache
// shrink; other layouts are modelled on the whole ring.
TEST(PlanPredict, SlidingWindowShortensTheRingOnContiguousShards) {
  Workload w;
  w.model = tiny(true), w.seq = 256, w.batch = 1;
  Cluster cl;
  cl.world = 4;
  Candidate c;
  c.sp = 4, c.layout = Layout::contiguous;
  const double block = 2 * 64 * 2 * 4 * 4.0;  // K and V of one shard, fp32
  const Prediction full = predict(w, c, toy(1e12), cl);
  EXPECT_NEAR(full.forward_bytes_sent, 2 * 3 * block, 1e-6);  // 2 layers x 3 hops
  w.model.window = 9;
  const Prediction w9 = predict(w, c, toy(1e12), cl);
  EXPECT_NEAR(w9.forward_bytes_sent, 2 * 1 * block * 8 / 64, 1e-6);  // one hop of 8 keys
  EXPECT_LT(w9.forward_s, full.forward_s);
  EXPECT_LT(w9.kv_cache_bytes, full.kv_cache_bytes);
  w.model.window = 100;
  const Prediction w100 = predict(w, c, toy(1e12), cl);
  EXPECT_NEAR(w100.forward_bytes_sent, 2 * 2 * block, 1e-6);  // two hops of whole blocks
  c.layout = Layout::zigzag;
  EXPECT_NEAR(predict(w, c, toy(1e12), cl).forward_bytes_sent, 2 * 3 * block, 1e-6);
}

Workload paper_like() {
  Workload w;
  w.model.layers = 4, w.model.d_model = 2048, w.model.heads = 16, w.model.mlp_hidden = 8192;
  w.model.dtype = DType::bf16;
  w.seq = 16384, w.batch = 8;
  return w;
}

Hardware gpu_like() {
  Hardware h;
  h.name = "gpu-like";
  h.devices_per_node = 8;
  h.memory_bytes = 80e9, h.memory_bandwidth = 3e12, h.elementwise_bandwidth = 2.5e12, h.decode_bandwidth = 2.5e12;
  h.op_overhead_s = 5e-6;
  h.gemm["bf16"] = {{256, 3e14}, {4096, 7e14}};
  h.attention_forward["bf16"] = {{128, 3.5e14}};
  h.attention_backward["bf16"] = {{128, 3e14}};
  h.peak["bf16"] = 1e15;
  h.intra_node = {4e-6, 3.7e11, true};
  h.inter_node = {1e-5, 4.7e10, true};
  return h;
}

// The LM head and embedding: slower steps, more memory; under PP the busiest
// stage holds one vocabulary matrix, without PP both (one when tied).
TEST(PlanPredict, LanguageModelHeadCostsTimeAndMemory) {
  Workload body = paper_like();
  Workload lm = body;
  lm.model.vocab = 128256;
  const Hardware h = gpu_like();
  Cluster cl;
  cl.world = 16;
  for (const Candidate& c : {Candidate{1, 1, 16, 1}, Candidate{1, 2, 8, 1}, Candidate{1, 1, 2, 8}}) {
    const Prediction a = predict(body, c, h, cl), b = predict(lm, c, h, cl);
    ASSERT_EQ(a.invalid, "") << c.name();
    EXPECT_GT(b.forward_s, a.forward_s) << c.name();
    EXPECT_GT(b.train_s, a.train_s) << c.name();
    EXPECT_GT(b.decode_step_s, a.decode_step_s) << c.name();
    // fp32 master, grad, AdamW; bf16 copy. The embedding and head tables (the
    // rank's vocabulary rows under TP), and the final norm's gain.
    const double table = std::ceil(128256.0 / c.tp) * body.model.d_model, per_param = 16 + 2;
    EXPECT_NEAR(b.peak_train_bytes - a.peak_train_bytes, ((c.pp == 1 ? 2 : 1) * table + body.model.d_model) * per_param,
                1)
        << c.name();
  }
  lm.model.tied = true;
  const Prediction t = predict(lm, Candidate{1, 1, 16, 1}, h, cl), u = predict(body, Candidate{1, 1, 16, 1}, h, cl);
  EXPECT_NEAR(t.peak_train_bytes - u.peak_train_bytes, (128256.0 * body.model.d_model + body.model.d_model) * 18, 1);
}

TEST(PlanProperties, MoreBandwidthIsNeverSlower) {
  const Workload w = paper_like();
  const Hardware h = gpu_like();
  Hardware faster = h;
  faster.intra_node.bandwidth *= 4, faster.inter_node.bandwidth *= 4, faster.decode_bandwidth *= 4;
  faster.elementwise_bandwidth *= 4;
  Cluster cl;
  cl.world = 16;
  int checked = 0;
  for (const Prediction& p : plan(w, h, cl)) {
    const Prediction q = predict(w, p.c, faster, cl);
    EXPECT_LE(q.forward_s, p.forward_s * (1 + 1e-12)) << p.c.name();
    EXPECT_LE(q.train_s, p.train_s * (1 + 1e-12)) << p.c.name();
    EXPECT_LE(q.decode_step_s, p.decode_step_s * (1 + 1e-12)) << p.c.name();
    ++checked;
  }
  EXPECT_GT(checked, 30);
}

TEST(PlanProperties, MoreSequenceRanksNeverNeedMoreMemory) {
  const Workload w = paper_like();
  const Hardware h = gpu_like();
  for (Strategy s : {Strategy::ring, Strategy::ulysses, Strategy::allgather}) {
    double prev = 1e300;
    for (int P : {1, 2, 4, 8, 16}) {
      Candidate c;
      c.sp = P, c.strategy = s;
      Cluster cl;
      cl.world = P;
      const Prediction p = predict(w, c, h, cl);
      ASSERT_EQ(p.invalid, "") << strategy_name(s) << " P=" << P;
      EXPECT_LE(p.peak_train_bytes, prev) << strategy_name(s) << " P=" << P;
      prev = p.peak_train_bytes;
    }
  }
}

// Any length with a token per SP rank is a valid plan (shards differ by a token
// or two): one token more costs about 1/L more, never less; fewer tokens than
// ranks is refused, naming the rule.
TEST(PlanPredict, UnevenShardsArePlanned) {
  Workload w = paper_like();
  const Hardware h = gpu_like();
  Cluster cl;
  cl.world = 16;
  for (Layout l : {Layout::contiguous, Layout::zigzag, Layout::striped}) {
    Candidate c;
    c.sp = 16, c.layout = l;
    w.seq = 10000;
    const Prediction even = predict(w, c, h, cl);
    w.seq = 10001;
    const Prediction odd = predict(w, c, h, cl);
    ASSERT_EQ(odd.invalid, "") << layout_name(l);
    EXPECT_GE(odd.forward_s, even.forward_s) << layout_name(l);
    EXPECT_GE(odd.train_s, even.train_s) << layout_name(l);
    EXPECT_LE(odd.train_s, even.train_s * 1.002) << layout_name(l);
    EXPECT_GE(odd.peak_train_bytes, even.peak_train_bytes) << layout_name(l);
    w.seq = 15;
    EXPECT_NE(predict(w, c, h, cl).invalid.find("would hold no token"), std::string::npos) << layout_name(l);
  }
}

TEST(PlanEnumerate, EveryLayoutIsValidAndRanked) {
  const Workload w = paper_like();
  Cluster cl;
  cl.world = 16;
  const std::vector<Prediction> ps = plan(w, gpu_like(), cl);
  ASSERT_FALSE(ps.empty());
  bool saw_ring = false, saw_tpxpp = false, saw_hybrid = false;
  for (size_t i = 0; i < ps.size(); ++i) {
    const Candidate& c = ps[i].c;
    EXPECT_EQ(c.dp * c.pp * c.sp * c.tp, 16);
    EXPECT_EQ(ps[i].invalid, "");
    if (i > 0 && ps[i].fits_train == ps[i - 1].fits_train) {
      EXPECT_LE(ps[i].train_tokens_per_s, ps[i - 1].train_tokens_per_s);
    }
    saw_ring |= c.sp == 16 && c.strategy == Strategy::ring;
    saw_tpxpp |= c.tp == 8 && c.pp == 2;
    saw_hybrid |= c.strategy == Strategy::hybrid;
  }
  EXPECT_TRUE(saw_ring && saw_tpxpp && saw_hybrid);
  // 16 heads: Ulysses over 32 ranks is impossible, and says why.
  Cluster big;
  big.world = 32;
  Candidate u;
  u.sp = 32, u.strategy = Strategy::ulysses;
  EXPECT_NE(predict(w, u, gpu_like(), big).invalid.find("heads"), std::string::npos);
}

TEST(PlanHardware, JsonRoundTripAndErrors) {
  const Hardware h = gpu_like();
  const Hardware back = hardware_from_json(hardware_to_json(h), "test");
  EXPECT_EQ(back.name, h.name);
  EXPECT_DOUBLE_EQ(back.gemm_rate(DType::bf16, 1e5, 1e5, 1e5), 7e14);
  EXPECT_DOUBLE_EQ(back.gemm_rate(DType::bf16, 100, 1e5, 1e5), 3e14);  // clamped below
  // log-linear: 1024 is half-way between 256 and 4096
  EXPECT_NEAR(back.gemm_rate(DType::bf16, 1024, 1e5, 1e5), 5e14, 1e3);
  EXPECT_DOUBLE_EQ(back.intra_node.bandwidth, 3.7e11);
  auto fails = [](const std::string& text, const std::string& needle) {
    try {
      hardware_from_json(text, "x.json");
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      return;
    }
    ADD_FAILURE() << "accepted: " << text;
  };
  fails("{", "not valid JSON");
  fails(R"({"name": "a"})", "devices_per_node");
  fails(R"({"name": "a", "devicesPerNode": 8})", "unknown field 'devicesPerNode'");
  std::string text = hardware_to_json(h);
  text.replace(text.find("\"memory_bytes\": 80000000000.0"), 29, "\"memory_bytes\": -1");
  fails(text, "memory_bytes");
  EXPECT_THROW(back.attention_rate(DType::f32, false, 64), Error);  // no fp32 rate: says so
}

TEST(PlanHardware, BuiltInFilesLoad) {
  for (const std::string name : {"h100-sxm", "h200-sxm", "a100-sxm"}) {
    const Hardware h = load_hardware(name);
    EXPECT_EQ(h.devices_per_node, 8) << name;
    EXPECT_GT(h.attention_rate(DType::f16, false, 128), 1e14) << name;
    EXPECT_GT(h.peak_rate(DType::f16), h.gemm_rate(DType::f16, 8192, 8192, 8192)) << name;
    EXPECT_GT(h.sources.size(), 10u) << name;
  }
  EXPECT_THROW(load_hardware("no-such-gpu"), Error);
}

// `--hardware this-machine` is the calibration at this_machine_path(), and only
// for the CPU it measured: a missing one or one from another CPU says to calibrate.
TEST(PlanHardware, ThisMachineIsTheCalibrationOfThisCpu) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / cat("ringattn_xdg_", getpid());
  std::filesystem::remove_all(dir);
  const char* saved = std::getenv("XDG_CONFIG_HOME");
  const std::string saved_value = saved ? saved : "";
  setenv("XDG_CONFIG_HOME", dir.c_str(), 1);
  EXPECT_EQ(this_machine_path(), (dir / "ringattn/this-machine.json").string());
  auto says = [](const char* needle) {
    try {
      load_hardware("this-machine");
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  says("plan --calibrate");  // none yet
  Hardware h = load_hardware("h100-sxm");
  h.name = "this-machine";
  h.measured_cpu = this_cpu();
  std::filesystem::create_directories(dir / "ringattn");
  auto write = [&](const Hardware& x) { std::ofstream(this_machine_path()) << hardware_to_json(x); };
  write(h);
  EXPECT_EQ(load_hardware("this-machine").measured_cpu, this_cpu());
  h.measured_cpu = "Another CPU, 7 CPUs, kernel paths generic";
  write(h);
  says("describes another machine");
  h.measured_cpu.clear();  // an old calibration that does not record its CPU
  write(h);
  says("does not record");
  if (saved)
    setenv("XDG_CONFIG_HOME", saved_value.c_str(), 1);
  else
    unsetenv("XDG_CONFIG_HOME");
  std::filesystem::remove_all(dir);
}

TEST(PlanHardware, AttentionKernelSetsSwapIn) {
  Hardware h = load_hardware("h100-sxm");
  const double fa2 = h.attention_rate(DType::bf16, false, 128), causal = h.causal_efficiency;
  h.use_attention_kernels("ringattn");  // measured: 491 TFLOP/s forward, 163 backward at d = 128
  EXPECT_NEAR(h.attention_rate(DType::bf16, false, 128), 4.911e14, 1e11);
  EXPECT_NEAR(h.attention_rate(DType::bf16, true, 128), 1.625e14, 1e11);
  // linear in log(head dim) between the measured 64 and 128
  EXPECT_NEAR(h.attention_rate(DType::bf16, false, 96), 2.995e14 + std::log(1.5) / std::log(2.0) * 1.916e14, 1e11);
  EXPECT_DOUBLE_EQ(h.causal_efficiency, 0.98);
  EXPECT_NE(h.attention_rate(DType::bf16, false, 128), fa2);
  EXPECT_EQ(h.attention_kernels_used, "ringattn");
  EXPECT_THROW(h.use_attention_kernels("fa3"), Error);  // one choice: the file's causal efficiency is gone
  EXPECT_THROW(hardware_to_json(h), Error);             // would save ringattn's rates as the defaults
  // Written and read back with its sets.
  Hardware back = hardware_from_json(hardware_to_json(load_hardware("h100-sxm")), "test");
  back.use_attention_kernels("fa3");
  EXPECT_NEAR(back.attention_rate(DType::f16, false, 128), 6.48e14, 1e11);
  EXPECT_DOUBLE_EQ(back.causal_efficiency, causal);  // fa3 gives none: the file's stays
  try {
    load_hardware("h100-sxm").use_attention_kernels("fa9");
    ADD_FAILURE() << "an unknown set was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("fa3, ringattn"), std::string::npos) << e.what();
  }
  EXPECT_THROW(hardware_from_json(
                   R"({"name": "a", "devices_per_node": 1, "attention_kernels": {"x": {"forward": {}}}})", "x.json"),
               Error);
}

}  // namespace
}  // namespace ringattn

namespace ringattn {
namespace {

TEST(PlanValidation, RankAgreementCountsOnlyOrdersBeyondTheNoise) {
  EXPECT_EQ(median({}), 0);
  EXPECT_EQ(median({3, 1, 2}), 2);
  EXPECT_EQ(median({4, 1, 3, 2}), 2.5);
  // (predicted, measured): c is measured best; a and b are within 10 % of each other.
  const std::vector<std::pair<double, double>> pm = {{1.0, 100}, {2.0, 105}, {3.0, 200}};
  RankAgreement r = rank_agreement(pm);
  EXPECT_EQ(r.pairs, 2);  // (a, c) and (b, c); (a, b) is noise
  EXPECT_EQ(r.agree, 2);
  EXPECT_TRUE(r.best);
  r = rank_agreement({{3.0, 100}, {2.0, 105}, {1.0, 200}});  // the model orders every pair backwards
  EXPECT_EQ(r.pairs, 2);
  EXPECT_EQ(r.agree, 0);
  EXPECT_FALSE(r.best);
  EXPECT_EQ(rank_agreement({}).pairs, 0);
}

}  // namespace
}  // namespace ringattn
