// Packed documents and sliding windows (attention.h's mask) through the CPU
// kernels — forward, backward, decode, the unfused baseline, every ISA path —
// against the double-precision reference; the visible-pair count; the checks of
// cu_seqlens and windows; and that tiles no query can see are never read.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfenv>
#include <cmath>
#include <vector>

#include "attn_case.h"
#include "reference.h"
#include "ringattn/cpu/attention.h"
#include "ringattn/error.h"
#include "test_util.h"

namespace ringattn::testing {
namespace {

// Documents of lengths 1, 2, odd, one longer than a key tile (64) and a query
// tile (96), and an empty one.
const std::vector<int32_t> kDocs = {0, 1, 3, 10, 160, 160, 161, 200};

std::vector<AttnCase> mask_cases() {
  std::vector<AttnCase> cs;
  uint32_t seed = 900;
  auto add = [&](AttnCase c) {
    c.seed = seed++;
    cs.push_back(c);
  };
  for (bool causal : {false, true}) {
    AttnCase c;
    c.B = 2, c.Lq = c.Lk = 200, c.H = 4, c.Hkv = 2, c.d = 40, c.causal = causal;
    // Windows 0, 1, smaller than a tile, larger than the sequence, and two-sided ones.
    for (auto [l, r] : std::vector<std::pair<int64_t, int64_t>>{{0, 0}, {1, 0}, {5, -1}, {37, 3}, {1000, -1}}) {
      AttnCase w = c;
      w.window_left = l, w.window_right = causal ? (r > 0 ? 0 : r) : r;
      add(w);
    }
    if (!causal) {
      AttnCase w = c;
      w.window_left = -1, w.window_right = 2;  // unbounded to the left only
      add(w);
    }
    // Documents, alone and with a window.
    AttnCase d = c;
    d.cu_q = kDocs;
    add(d);
    d.window_left = 4, d.window_right = causal ? -1 : 4;
    add(d);
    // Lq != Lk (bottom-right aligned), with a window and with documents of unequal q/k lengths.
    AttnCase x = c;
    x.Lq = 70, x.Lk = 260, x.window_left = 50, x.window_right = causal ? -1 : 10;
    add(x);
    AttnCase y = c;
    y.Lq = 90, y.Lk = 230, y.cu_q = std::vector<int32_t>{0, 1, 1, 40, 90},
    y.cu_k = std::vector<int32_t>{0, 3, 70, 200, 230};
    add(y);
  }
  return cs;
}

class Masks : public ::testing::TestWithParam<AttnCase> {};

TEST_P(Masks, ForwardMatchesReference) {
  const AttnCase& c = GetParam();
  AttnData a = make_data(c);
  run_forward(c, a);
  const RefResult ref = check_forward(c, a, kTolF32);
  expect_empty_rows_exact(c, a, ref);
}

TEST_P(Masks, BackwardMatchesReference) {
  const AttnCase& c = GetParam();
  AttnData a = make_data(c, true);
  run_forward(c, a);
  run_backward(c, a);
  // A window of one key (each query sees itself) gives dq = dk = 0 exactly, and the
  // kernel leaves fp32 rounding noise of dO·v − dO·o: normalized by max|dv|.
  const bool self_only = c.window_left == 0 && (c.causal || c.window_right == 0);
  check_backward(c, a, kTolF32, self_only ? 1.0 : 1e-2);
}

TEST_P(Masks, UnfusedBaselineMatchesReference) {
  const AttnCase& c = GetParam();
  AttnData a = make_data(c);
  attention_forward_unfused(a.q, a.k, a.v, a.o, a.lse, c.options());
  check_forward(c, a, kTolF32);
}

TEST_P(Masks, VisiblePairsCountedExactly) {
  const AttnCase& c = GetParam();
  AttnData a = make_data(c);
  const RefProblem p = make_ref_problem(a.q, a.k, a.v, c.options());
  double pairs = 0;
  for (int64_t i = 0; i < c.Lq; ++i)
    for (int64_t j = 0; j < c.Lk; ++j) pairs += p.visible(i, j);
  EXPECT_EQ(attention_visible_pairs(c.Lq, c.Lk, c.options()), pairs);
}

INSTANTIATE_TEST_SUITE_P(Sweep, Masks, ::testing::ValuesIn(mask_cases()),
                         [](const ::testing::TestParamInfo<AttnCase>& i) { return i.param.name(); });

// The decode path (a few query rows against a long cache): a window that has
// evicted most of the cache, documents, GQA.
TEST(MaskDecode, WindowAndDocumentsMatchReference) {
  uint32_t seed = 950;
  for (int64_t Lk : {255, 700, 2311})
    for (auto [lq, h, hkv] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{{1, 4, 4}, {3, 8, 2}}) {
      AttnCase c;
      c.B = 2, c.Lq = lq, c.Lk = Lk, c.H = h, c.Hkv = hkv, c.d = 64, c.causal = true, c.seed = seed++;
      for (int64_t w : {0, 1, 100, 300}) {
        c.window_left = w;
        SCOPED_TRACE(c.name());
        AttnData a = make_data(c);
        run_forward(c, a);
        check_forward(c, a, kTolF32);
      }
      c.window_left = -1;
      c.cu_q = std::vector<int32_t>{0, 0, static_cast<int32_t>(lq)};
      c.cu_k = std::vector<int32_t>{0, static_cast<int32_t>(Lk / 2), static_cast<int32_t>(Lk)};
      SCOPED_TRACE(c.name());
      AttnData a = make_data(c);
      run_forward(c, a);
      check_forward(c, a, kTolF32);
    }
}

// Short documents with a window, and a long sequence whose query tiles see runs of
// more than 8 key tiles (the forward's softmax steps over groups of key tiles),
// broken by documents and ending in a partial tile.
TEST(MaskIsa, EveryPathMatchesReference) {
  for (Isa isa : supported_isas())
    for (DType dt : {DType::f32, DType::bf16})
      for (int64_t L : {int64_t{200}, int64_t{1250}}) {
        AttnCase c;
        c.B = 1, c.Lq = c.Lk = L, c.H = 4, c.Hkv = 1, c.d = 64, c.causal = true, c.in = c.out = dt;
        if (L == 200) {
          c.cu_q = kDocs, c.window_left = 20;
        } else {
          c.H = 2, c.causal = false, c.window_left = 700, c.window_right = 100;
          c.cu_q = std::vector<int32_t>{0, 3, 640, 1250};
        }
        const auto& all = all_isas();
        c.isa = &*std::find(all.begin(), all.end(), isa);
        SCOPED_TRACE(cat(isa_name(isa), " ", c.name()));
        AttnData a = make_data(c, true);
        run_forward(c, a);
        check_forward(c, a, tol_for(dt));
        run_backward(c, a);
        check_backward(c, a, dt == DType::f32 ? kTolF32 : kTolBf16Bwd);
      }
}

// Keys of a document without queries are visible to nobody: whole tiles of them
// (here 256 keys from 768 on: 4 tiles of 64, one decode chunk of 256) are NaN and
// the kernels must never read them, on every path. (A tile is skipped from its
// ranges of positions and documents, so the query tiles here hold one document
// each: 384 = 4 tiles of 96; the keys are 12 tiles seen, 4 skipped, 12 seen.)
TEST(MaskSkipping, TilesNoQuerySeesAreNeverRead) {
  for (Isa isa : supported_isas())
    for (DType dt : {DType::f32, DType::bf16})
      for (int64_t Lq : {int64_t{2}, int64_t{384}}) {  // the decode path and the tiled kernels
        AttnCase c;
        c.B = 1, c.Lq = Lq, c.Lk = 1792, c.H = 2, c.Hkv = 1, c.d = 32, c.causal = true, c.in = c.out = dt;
        const int32_t lq = static_cast<int32_t>(Lq);
        c.cu_q = std::vector<int32_t>{0, lq / 2, lq / 2, lq};
        c.cu_k = std::vector<int32_t>{0, 768, 1024, 1792};
        const auto& all = all_isas();
        c.isa = &*std::find(all.begin(), all.end(), isa);
        SCOPED_TRACE(cat(isa_name(isa), " ", c.name()));
        AttnData a = make_data(c, true);
        for (TestTensor* t : {&a.k, &a.v})
          for (int64_t j = 768; j < 1024; ++j)
            for (int64_t h = 0; h < c.Hkv; ++h)
              for (int64_t x = 0; x < c.d; ++x) {
                const int64_t idx[4] = {0, j, h, x};
                store_from_f32(t->view.data, t->view.dtype, offset_of(t->view, idx), quiet_nan());
              }
        run_forward(c, a);
        EXPECT_FALSE(any_nan(a.o));
        if (Lq > 2) {
          run_backward(c, a);
          EXPECT_FALSE(any_nan(a.dq));
        }
      }
}

// A masked score is −inf and its probability exactly 0, reached without an
// underflow: x86 cores serve an underflow to 0 or to a subnormal with a
// microcode assist costing ~100 cycles, and a tile of a packed batch masks
// hundreds of scores. The kernels run on this thread (one thread), so the FP
// status flags they leave tell whether any operation underflowed.
TEST(MaskedScores, GiveZeroWithoutUnderflow) {
  for (Isa isa : supported_isas())
    for (DType dt : {DType::f32, DType::bf16})
      for (int64_t Lq : {int64_t{2}, int64_t{400}}) {  // the decode path and the tiled kernels
        AttnCase c;
        c.B = 1, c.Lq = Lq, c.Lk = 400, c.H = 2, c.Hkv = 1, c.d = 64, c.causal = true, c.in = c.out = dt;
        c.cu_k = std::vector<int32_t>{0, 7, 150, 151, 330, 400};
        c.cu_q = Lq == 2 ? std::vector<int32_t>{0, 0, 0, 0, 1, 2} : c.cu_k;
        c.threads = 1;
        const auto& all = all_isas();
        c.isa = &*std::find(all.begin(), all.end(), isa);
        SCOPED_TRACE(cat(isa_name(isa), " ", c.name()));
        AttnData a = make_data(c, true);
        std::feclearexcept(FE_ALL_EXCEPT);
        run_forward(c, a);
        EXPECT_FALSE(std::fetestexcept(FE_UNDERFLOW)) << "forward";
        check_forward(c, a, tol_for(dt));
        if (Lq > 2) {
          std::feclearexcept(FE_ALL_EXCEPT);
          run_backward(c, a);
          EXPECT_FALSE(std::fetestexcept(FE_UNDERFLOW)) << "backward";
          check_backward(c, a, dt == DType::f32 ? kTolF32 : kTolBf16Bwd);
        }
      }
}

TEST(MaskErrors, BadCuSeqlensAndWindowsAreNamed) {
  auto message = [](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const std::vector<int32_t> ok = {0, 3, 8};
  EXPECT_NE(message([&] {
              documents(std::vector<int32_t>{1, 3, 8}, ok);
            }).find("cu_seqlens_q[0] must be 0"),
            std::string::npos);
  EXPECT_NE(message([&] {
              documents(ok, std::vector<int32_t>{0, 5, 4});
            }).find("must not decrease"),
            std::string::npos);
  EXPECT_NE(message([&] { documents(ok, std::vector<int32_t>{0, 8}); }).find("same documents"), std::string::npos);
  EXPECT_NE(message([&] { check_cu_seqlens(ok, 9, "cu_seqlens"); }).find("must end at the sequence length 9"),
            std::string::npos);

  AttnCase c;
  c.Lq = c.Lk = 8;
  AttnData a = make_data(c);
  AttentionOptions opt;
  opt.window_left = -2;
  EXPECT_NE(message([&] { attention_forward(a.q, a.k, a.v, a.o, a.lse, opt); }).find("window side"), std::string::npos);
  opt = {};
  opt.causal = true, opt.window_right = 3;
  EXPECT_NE(message([&] { attention_forward(a.q, a.k, a.v, a.o, a.lse, opt); }).find("causal"), std::string::npos);
  opt = {};
  const Documents d = documents(std::vector<int32_t>{0, 3, 9}, std::vector<int32_t>{0, 3, 9});
  d.apply(opt);  // 9 tokens for a length of 8
  EXPECT_NE(message([&] { attention_forward(a.q, a.k, a.v, a.o, a.lse, opt); }).find("but Lq = 8"), std::string::npos);
}

}  // namespace
}  // namespace ringattn::testing
