// attention_merge: splitting the keys into chunks, attending to each chunk with its
// global positions and merging the partial (o, lse) in any order must reproduce
// the one-shot forward (this is what makes ring attention exact).
//
// Metric: normalized max error (test_util.h); fp32 bound 1e-5 (only fp32 rounding
// of the rescaling differs from the one-shot result).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "attn_case.h"
#include "reference.h"
#include "ringattn/cpu/attention.h"
#include "test_util.h"

namespace ringattn::testing {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Uneven cut of [0, n) into `parts` non-empty chunks, deterministic per seed.
std::vector<std::pair<int64_t, int64_t>> uneven_chunks(int64_t n, int parts, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int64_t> cuts;
  std::vector<int64_t> all(static_cast<size_t>(n - 1));
  std::iota(all.begin(), all.end(), 1);
  std::shuffle(all.begin(), all.end(), rng);
  cuts.assign(all.begin(), all.begin() + (parts - 1));
  std::sort(cuts.begin(), cuts.end());
  std::vector<std::pair<int64_t, int64_t>> out;
  int64_t s = 0;
  for (int64_t c : cuts) {
    out.emplace_back(s, c);
    s = c;
  }
  out.emplace_back(s, n);
  return out;
}

// A [B, L, H, d] view of rows [s, e) of t (no copy).
TensorView rows(const TensorView& t, int64_t s, int64_t e) {
  TensorView v = t;
  v.data = static_cast<unsigned char*>(t.data) + s * t.strides[1] * static_cast<int64_t>(dtype_size(t.dtype));
  v.shape[1] = e - s;
  return v;
}

struct MergeSetup {
  int64_t B = 2, Lq = 50, Lk = 137, H = 4, Hkv = 2, d = 32;
  bool causal = false;
};

// One-shot forward plus chunked forward + merge in a random order.
void check_chunked(const MergeSetup& m, int parts, uint32_t seed, DType part_dtype, bool striped,
                   bool init_from_identity) {
  AttnCase c;
  c.B = m.B, c.Lq = m.Lq, c.Lk = m.Lk, c.H = m.H, c.Hkv = m.Hkv, c.d = m.d, c.causal = m.causal;
  c.seed = seed;
  AttnData full = make_data(c);
  run_forward(c, full);

  // Global positions: bottom-right default of the one-shot problem.
  const std::vector<int64_t> q_pos = iota_pos(m.Lq, m.Lk - m.Lq);

  // Chunks: each is (k view, v view, k positions).
  struct Chunk {
    TestTensor kbuf, vbuf;  // only for striped (gathered copies)
    TensorView k, v;
    std::vector<int64_t> pos;
  };
  std::vector<Chunk> chunks(static_cast<size_t>(parts));
  if (!striped) {
    const auto cuts = uneven_chunks(m.Lk, parts, seed + 1);
    for (int p = 0; p < parts; ++p) {
      auto [s, e] = cuts[p];
      chunks[p].k = rows(full.k, s, e);
      chunks[p].v = rows(full.v, s, e);
      chunks[p].pos = iota_pos(e - s, s);
    }
  } else {
    // Token j belongs to chunk j mod parts (the striped layout).
    for (int p = 0; p < parts; ++p) {
      const int64_t n = (m.Lk - p + parts - 1) / parts;
      Chunk& ch = chunks[p];
      ch.kbuf = make_tensor(DType::f32, {m.B, n, m.Hkv, m.d});
      ch.vbuf = make_tensor(DType::f32, {m.B, n, m.Hkv, m.d});
      for (int64_t r = 0; r < n; ++r) {
        const int64_t j = p + r * parts;
        copy_elements(rows(ch.kbuf, r, r + 1), rows(full.k, j, j + 1));
        copy_elements(rows(ch.vbuf, r, r + 1), rows(full.v, j, j + 1));
        ch.pos.push_back(j);
      }
      ch.k = ch.kbuf.view;
      ch.v = ch.vbuf.view;
    }
  }

  std::vector<int> order(static_cast<size_t>(parts));
  std::iota(order.begin(), order.end(), 0);
  std::mt19937 rng(seed + 2);
  std::shuffle(order.begin(), order.end(), rng);

  TestTensor o_acc = make_tensor(DType::f32, {m.B, m.Lq, m.H, m.d});
  TestTensor lse_acc = make_tensor(DType::f32, {m.B, m.H, m.Lq});
  bool first = true;
  if (init_from_identity) {
    fill_value(o_acc, 0.f);
    fill_value(lse_acc, kNegInf);
  }
  for (int p : order) {
    AttentionOptions opt;
    opt.causal = m.causal;
    opt.q_pos = q_pos;
    opt.k_pos = chunks[p].pos;
    if (!init_from_identity && first) {
      attention_forward(full.q, chunks[p].k, chunks[p].v, o_acc, lse_acc, opt);
      first = false;
      continue;
    }
    TestTensor o_part = make_tensor(part_dtype, {m.B, m.Lq, m.H, m.d});
    TestTensor lse_part = make_tensor(DType::f32, {m.B, m.H, m.Lq});
    attention_forward(full.q, chunks[p].k, chunks[p].v, o_part, lse_part, opt);
    attention_merge(o_acc, lse_acc, o_part, lse_part);
  }

  const double tol = part_dtype == DType::f32 ? kTolF32 : kTolBf16;
  EXPECT_FALSE(any_nan(o_acc)) << "NaN in merged o";
  EXPECT_FALSE(any_nan(lse_acc)) << "NaN in merged lse";
  RA_EXPECT_CLOSE(o_acc.view, full.o.view, tol, "merged o vs one-shot");
  RA_EXPECT_CLOSE(lse_acc.view, full.lse.view, tol, "merged lse vs one-shot");
  const RefResult ref = reference_forward(full.q, full.k, full.v, c.options());
  RA_EXPECT_CLOSE(o_acc.view, ref.o, tol, "merged o vs reference");
  RA_EXPECT_CLOSE(lse_acc.view, ref.lse, tol, "merged lse vs reference");
}

TEST(MergeChunks, ContiguousUnevenChunksAnyOrder) {
  for (bool causal : {false, true})
    for (int parts = 1; parts <= 7; ++parts) {
      MergeSetup m;
      m.causal = causal;
      SCOPED_TRACE(cat(causal ? "causal" : "full", " parts=", parts));
      check_chunked(m, parts, 1000 + parts, DType::f32, false, true);
    }
}

TEST(MergeChunks, AccumulatorStartsFromFirstChunk) {
  for (bool causal : {false, true})
    for (int parts : {2, 3, 5}) {
      MergeSetup m;
      m.causal = causal;
      SCOPED_TRACE(cat(causal ? "causal" : "full", " parts=", parts));
      check_chunked(m, parts, 1100 + parts, DType::f32, false, false);
    }
}

TEST(MergeChunks, StripedChunksAnyOrder) {
  for (bool causal : {false, true})
    for (int parts : {2, 3, 4, 7}) {
      MergeSetup m;
      m.causal = causal;
      m.Lq = 64, m.Lk = 64;
      SCOPED_TRACE(cat(causal ? "causal" : "full", " parts=", parts));
      check_chunked(m, parts, 1200 + parts, DType::f32, true, true);
    }
}

TEST(MergeChunks, QueriesLongerThanKeys) {
  // Lq > Lk causal: some rows see no key at all (lse stays -inf, o stays 0).
  for (int parts : {1, 3, 6}) {
    MergeSetup m;
    m.causal = true;
    m.Lq = 90, m.Lk = 40, m.H = 2, m.Hkv = 1;
    SCOPED_TRACE(cat("parts=", parts));
    check_chunked(m, parts, 1300 + parts, DType::f32, false, true);
  }
}

TEST(MergeChunks, Bf16PartialOutputs) {
  for (bool causal : {false, true}) {
    MergeSetup m;
    m.causal = causal;
    check_chunked(m, 4, 1400, DType::bf16, false, true);
  }
}

// ---------------------------------------------------------------------------
// attention_merge against the formula in double, including -inf on either side.

void merge_unit(DType part_dtype, bool strided, uint32_t seed) {
  const int64_t B = 2, Lq = 19, H = 3, d = 24;
  TestTensor o_acc = strided ? make_tensor(DType::f32, {B, Lq, H, d}, {0, 1, 1, 4}, {0, 2, 0, 1})
                             : make_tensor(DType::f32, {B, Lq, H, d});
  TestTensor lse_acc =
      strided ? make_tensor(DType::f32, {B, H, Lq}, {1, 0, 3}, {0, 0, 2}) : make_tensor(DType::f32, {B, H, Lq});
  TestTensor o_part =
      strided ? make_tensor(part_dtype, {B, Lq, H, d}, {1, 0, 2, 8}) : make_tensor(part_dtype, {B, Lq, H, d});
  TestTensor lse_part =
      strided ? make_tensor(DType::f32, {B, H, Lq}, {0, 1, 1}, {1, 0, 0}) : make_tensor(DType::f32, {B, H, Lq});
  fill_uniform(o_acc, seed);
  fill_uniform(o_part, seed + 1);
  fill_uniform(lse_acc, seed + 2, -5.f, 20.f);
  fill_uniform(lse_part, seed + 3, -5.f, 20.f);
  // Rows with -inf: row i % 4 == 1: acc side; == 2: part side; == 3: both (o = 0 there,
  // as the forward gives for rows with no key).
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < Lq; ++i) {
        const int64_t li[3] = {b, h, i};
        const int kind = static_cast<int>(i % 4);
        if (kind == 1 || kind == 3) lse_acc.view.ptr<float>()[offset_of(lse_acc, li)] = kNegInf;
        if (kind == 2 || kind == 3) lse_part.view.ptr<float>()[offset_of(lse_part, li)] = kNegInf;
        if (kind == 3)
          for (int64_t x = 0; x < d; ++x) {
            const int64_t oi[4] = {b, i, h, x};
            store_from_f32(o_acc.view.data, DType::f32, offset_of(o_acc, oi), 0.f);
            store_from_f32(o_part.view.data, part_dtype, offset_of(o_part, oi), 0.f);
          }
      }
  // Expected, in double.
  const auto oa = to_double(o_acc), op = to_double(o_part), la = to_double(lse_acc), lp = to_double(lse_part);
  std::vector<double> o_exp(oa.size()), l_exp(la.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < Lq; ++i) {
        const int64_t li = (b * H + h) * Lq + i;
        const double a = la[li], p = lp[li];
        const double mx = std::max(a, p);
        double wa = 0, wp = 0, l = -std::numeric_limits<double>::infinity();
        if (!std::isinf(mx)) {
          l = mx + std::log(std::exp(a - mx) + std::exp(p - mx));
          wa = std::exp(a - l);
          wp = std::exp(p - l);
        }
        l_exp[li] = l;
        for (int64_t x = 0; x < d; ++x) {
          const int64_t oi = ((b * Lq + i) * H + h) * d + x;
          o_exp[oi] = wa * oa[oi] + wp * op[oi];
        }
      }
  attention_merge(o_acc, lse_acc, o_part, lse_part);
  EXPECT_FALSE(any_nan(o_acc));
  EXPECT_FALSE(any_nan(lse_acc));
  RA_EXPECT_CLOSE(o_acc.view, o_exp, 1e-6, "merged o");
  RA_EXPECT_CLOSE(lse_acc.view, l_exp, 1e-6, "merged lse");
  if (strided) {
    EXPECT_EQ(count_padding_changes(o_acc), 0) << "o_acc written outside its view";
    EXPECT_EQ(count_padding_changes(lse_acc), 0) << "lse_acc written outside its view";
  }
}

TEST(MergeUnit, MatchesFormulaWithNegInfOnEitherSide) { merge_unit(DType::f32, false, 1500); }
TEST(MergeUnit, StridedViews) { merge_unit(DType::f32, true, 1501); }
TEST(MergeUnit, Bf16Part) { merge_unit(DType::bf16, false, 1502); }
TEST(MergeUnit, Fp16PartStrided) { merge_unit(DType::f16, true, 1503); }

TEST(MergeUnit, FullyMaskedChunkLeavesResultUnchanged) {
  // A causal chunk whose keys are all after every query: lse_part = -inf
  // everywhere; merging it (on either side) gives the other result exactly.
  AttnCase c;
  c.B = 1, c.Lq = 30, c.Lk = 30, c.H = 2, c.Hkv = 1, c.d = 32, c.causal = true, c.seed = 1600;
  c.q_pos = iota_pos(c.Lq, 0);
  c.k_pos = iota_pos(c.Lk, 0);
  AttnData a = make_data(c);
  run_forward(c, a);

  AttnCase masked = c;
  masked.k_pos = iota_pos(c.Lk, 500);
  AttnData m = make_data(masked);
  run_forward(masked, m);
  for (double l : to_double(m.lse)) ASSERT_TRUE(std::isinf(l) && l < 0);

  // (finite acc) ⊕ (-inf part)
  TestTensor o1 = make_tensor(DType::f32, {1, 30, 2, 32}), l1 = make_tensor(DType::f32, {1, 2, 30});
  copy_elements(o1, a.o);
  copy_elements(l1, a.lse);
  attention_merge(o1, l1, m.o, m.lse);
  RA_EXPECT_CLOSE(o1.view, a.o.view, 1e-7, "o after merging a masked part");
  RA_EXPECT_CLOSE(l1.view, a.lse.view, 1e-7, "lse after merging a masked part");

  // (-inf acc) ⊕ (finite part)
  TestTensor o2 = make_tensor(DType::f32, {1, 30, 2, 32}), l2 = make_tensor(DType::f32, {1, 2, 30});
  copy_elements(o2, m.o);
  copy_elements(l2, m.lse);
  attention_merge(o2, l2, a.o, a.lse);
  RA_EXPECT_CLOSE(o2.view, a.o.view, 1e-7, "o after merging into a masked accumulator");
  RA_EXPECT_CLOSE(l2.view, a.lse.view, 1e-7, "lse after merging into a masked accumulator");

  // (-inf) ⊕ (-inf): stays o = 0, lse = -inf, no NaN.
  TestTensor o3 = make_tensor(DType::f32, {1, 30, 2, 32}), l3 = make_tensor(DType::f32, {1, 2, 30});
  copy_elements(o3, m.o);
  copy_elements(l3, m.lse);
  attention_merge(o3, l3, m.o, m.lse);
  for (double x : to_double(o3)) ASSERT_EQ(x, 0.0);
  for (double l : to_double(l3)) ASSERT_TRUE(std::isinf(l) && l < 0);
}

}  // namespace
}  // namespace ringattn::testing
