// attention_forward against the double-precision reference (tests/reference.h) on
// many shapes, masks, positions, dtypes and layouts; determinism across threads.
//
// Metric: normalized max error, max|got − ref| / max(max|ref|, tiny), per tensor
// (see test_util.h). Bounds: fp32 1e-5, bf16 2e-2, fp16 2e-3; the reference always
// runs on the values actually stored (bf16/fp16-rounded inputs).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "attn_case.h"
#include "reference.h"
#include "ringattn/cpu/attention.h"
#include "test_util.h"

namespace ringattn::testing {
namespace {

// ---------------------------------------------------------------------------
// Shape sweep (parameterized)

std::vector<AttnCase> shape_cases() {
  std::vector<AttnCase> cs;
  auto add = [&](AttnCase c) { cs.push_back(std::move(c)); };
  for (bool causal : {false, true}) {
    // Sequence lengths (none a multiple of a typical tile except 1).
    for (int64_t L : {1, 7, 127}) {
      AttnCase c;
      c.B = 2, c.Lq = L, c.Lk = L, c.H = 2, c.Hkv = 1, c.d = 64, c.causal = causal, c.seed = 10 + L;
      add(c);
    }
    {
      AttnCase c;  // long, small heads
      c.B = 1, c.Lq = 1000, c.Lk = 1000, c.H = 2, c.Hkv = 1, c.d = 32, c.causal = causal, c.seed = 11;
      add(c);
    }
    // Head dims, including ones that are not multiples of the vector width.
    for (int64_t d : {1, 3, 24, 32, 40, 64, 80, 96, 128, 256}) {
      AttnCase c;
      c.B = 1, c.Lq = 77, c.Lk = 77, c.H = 2, c.Hkv = 2, c.d = d, c.causal = causal, c.seed = 20 + d;
      add(c);
    }
    // GQA / MQA ratios 1, 2, 4, 8.
    for (int64_t hkv : {8, 4, 2, 1}) {
      AttnCase c;
      c.B = 2, c.Lq = 65, c.Lk = 65, c.H = 8, c.Hkv = hkv, c.d = 32, c.causal = causal, c.seed = 30 + hkv;
      add(c);
    }
    // Lq != Lk (causal: bottom-right aligned, so Lq > Lk has rows that see nothing).
    for (auto [lq, lk] :
         std::vector<std::pair<int64_t, int64_t>>{{33, 100}, {100, 33}, {1, 130}, {130, 1}, {64, 200}, {250, 17}}) {
      AttnCase c;
      c.B = 1, c.Lq = lq, c.Lk = lk, c.H = 4, c.Hkv = 2, c.d = 64, c.causal = causal, c.seed = 40 + lq;
      add(c);
    }
    // One larger head dim at a longer length.
    {
      AttnCase c;
      c.B = 1, c.Lq = 300, c.Lk = 300, c.H = 1, c.Hkv = 1, c.d = 128, c.causal = causal, c.seed = 50;
      add(c);
    }
    // Peaky softmax (large logits): stresses the online max rescaling.
    {
      AttnCase c;
      c.B = 1, c.Lq = 150, c.Lk = 190, c.H = 2, c.Hkv = 1, c.d = 64, c.causal = causal, c.amp = 4.f, c.seed = 51;
      add(c);
    }
  }
  return cs;
}

class ForwardShapes : public ::testing::TestWithParam<AttnCase> {};

TEST_P(ForwardShapes, MatchesReferenceFp32) {
  const AttnCase& c = GetParam();
  AttnData a = make_data(c);
  run_forward(c, a);
  check_forward(c, a, kTolF32);
}

INSTANTIATE_TEST_SUITE_P(Sweep, ForwardShapes, ::testing::ValuesIn(shape_cases()),
                         [](const ::testing::TestParamInfo<AttnCase>& i) { return i.param.name(); });

// ---------------------------------------------------------------------------
// Reduced-precision storage

std::vector<AttnCase> dtype_cases() {
  std::vector<AttnCase> cs;
  for (DType dt : {DType::bf16, DType::f16})
    for (bool causal : {false, true})
      for (auto [lq, lk, d, hkv] : std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>>{{1, 1, 64, 2},
                                                                                               {97, 97, 64, 2},
                                                                                               {200, 200, 128, 1},
                                                                                               {50, 130, 80, 4},
                                                                                               {130, 50, 40, 1},
                                                                                               {300, 300, 32, 2}}) {
        AttnCase c;
        c.B = 2, c.Lq = lq, c.Lk = lk, c.H = 4, c.Hkv = hkv, c.d = d, c.causal = causal, c.in = dt, c.out = dt;
        c.seed = static_cast<uint32_t>(100 + lq + d);
        if (lq >= 200) c.B = 1;
        cs.push_back(c);
      }
  // Reduced-precision inputs with fp32 output and the other way round.
  {
    AttnCase c;
    c.Lq = c.Lk = 90, c.H = 2, c.Hkv = 1, c.d = 64, c.causal = true, c.in = DType::bf16, c.out = DType::f32;
    cs.push_back(c);
  }
  {
    AttnCase c;
    c.Lq = c.Lk = 90, c.H = 2, c.Hkv = 1, c.d = 64, c.causal = true, c.in = DType::f32, c.out = DType::bf16;
    cs.push_back(c);
  }
  return cs;
}

class ForwardDtypes : public ::testing::TestWithParam<AttnCase> {};

TEST_P(ForwardDtypes, MatchesReferenceOnRoundedInputs) {
  const AttnCase& c = GetParam();
  AttnData a = make_data(c);
  run_forward(c, a);
  // bf16 anywhere bounds the error by the bf16 tolerance; fp16 by fp16's.
  const double tol = (c.in == DType::bf16 || c.out == DType::bf16) ? kTolBf16
                     : (c.in == DType::f16 || c.out == DType::f16) ? kTolF16
                                                                   : kTolF32;
  check_forward(c, a, tol);
}

INSTANTIATE_TEST_SUITE_P(Sweep, ForwardDtypes, ::testing::ValuesIn(dtype_cases()),
                         [](const ::testing::TestParamInfo<AttnCase>& i) { return i.param.name(); });

// ---------------------------------------------------------------------------
// Global positions

TEST(ForwardPositions, StripedPositionsEveryThirdToken) {
  // Striped layout with P = 3: this rank's queries are tokens 3i+1, the key block
  // came from the rank holding tokens 3j+2. Query at position 1 sees no key.
  for (bool causal : {true, false}) {
    AttnCase c;
    c.B = 2, c.Lq = 70, c.Lk = 75, c.H = 4, c.Hkv = 2, c.d = 64, c.causal = causal, c.seed = 200;
    c.q_pos = iota_pos(c.Lq, 1, 3);
    c.k_pos = iota_pos(c.Lk, 2, 3);
    AttnData a = make_data(c);
    run_forward(c, a);
    const RefResult ref = check_forward(c, a, kTolF32);
    if (causal) {
      EXPECT_TRUE(std::isinf(ref.lse[0])) << "test setup: query at position 1 should see no key";
    }
  }
}

TEST(ForwardPositions, ShiftedSoEarlyRowsSeeNoKey) {
  // Queries at 100..179, keys at 150..229: the first 50 query rows see nothing.
  AttnCase c;
  c.B = 1, c.Lq = 80, c.Lk = 80, c.H = 2, c.Hkv = 1, c.d = 32, c.causal = true, c.seed = 201;
  c.q_pos = iota_pos(c.Lq, 100);
  c.k_pos = iota_pos(c.Lk, 150);
  AttnData a = make_data(c);
  run_forward(c, a);
  const RefResult ref = check_forward(c, a, kTolF32);
  int empty = 0;
  for (double l : ref.lse) empty += std::isinf(l);
  EXPECT_EQ(empty, 50 * 2);
}

TEST(ForwardPositions, AllRowsSeeNoKey) {
  // Every key is after every query (a fully masked block in a causal ring step).
  AttnCase c;
  c.B = 2, c.Lq = 40, c.Lk = 33, c.H = 2, c.Hkv = 2, c.d = 48, c.causal = true, c.seed = 202;
  c.q_pos = iota_pos(c.Lq, 0);
  c.k_pos = iota_pos(c.Lk, 1000);
  AttnData a = make_data(c);
  run_forward(c, a);
  check_forward(c, a, kTolF32);
}

TEST(ForwardPositions, ZigzagQueriesAgainstContiguousKeys) {
  // Zigzag, P = 4, chunk 16: rank 1 holds chunks 1 and 6 (positions 16..31, 96..111);
  // keys are the chunks of rank 2 (32..47, 80..95).
  AttnCase c;
  c.B = 1, c.Lq = 32, c.Lk = 32, c.H = 3, c.Hkv = 1, c.d = 64, c.causal = true, c.seed = 203;
  std::vector<int64_t> qp = iota_pos(16, 16), qp2 = iota_pos(16, 96);
  qp.insert(qp.end(), qp2.begin(), qp2.end());
  std::vector<int64_t> kp = iota_pos(16, 32), kp2 = iota_pos(16, 80);
  kp.insert(kp.end(), kp2.begin(), kp2.end());
  c.q_pos = qp;
  c.k_pos = kp;
  AttnData a = make_data(c);
  run_forward(c, a);
  check_forward(c, a, kTolF32);
}

TEST(ForwardPositions, QueriesAfterAllKeysEqualsNonCausal) {
  AttnCase c;
  c.B = 1, c.Lq = 50, c.Lk = 60, c.H = 2, c.Hkv = 2, c.d = 32, c.causal = true, c.seed = 204;
  c.q_pos = iota_pos(c.Lq, 500);
  c.k_pos = iota_pos(c.Lk, 0);
  AttnData a = make_data(c);
  run_forward(c, a);
  check_forward(c, a, kTolF32);

  AttnCase nc = c;
  nc.causal = false;
  nc.q_pos.reset();
  nc.k_pos.reset();
  AttnData b = make_data(nc);
  run_forward(nc, b);
  RA_EXPECT_CLOSE(a.o.view, b.o.view, kTolF32, "o vs non-causal");
  RA_EXPECT_CLOSE(a.lse.view, b.lse.view, kTolF32, "lse vs non-causal");
}

TEST(ForwardPositions, ExplicitDefaultPositionsMatchImplicit) {
  // Passing the documented defaults explicitly (bottom-right) changes nothing.
  for (auto [lq, lk] : std::vector<std::pair<int64_t, int64_t>>{{30, 90}, {90, 30}, {45, 45}}) {
    AttnCase c;
    c.B = 1, c.Lq = lq, c.Lk = lk, c.H = 2, c.Hkv = 1, c.d = 32, c.causal = true, c.seed = 205;
    AttnData a = make_data(c);
    run_forward(c, a);
    AttnCase e = c;
    e.q_pos = iota_pos(lq, lk - lq);
    e.k_pos = iota_pos(lk, 0);
    AttnData b = make_data(e);
    run_forward(e, b);
    RA_EXPECT_CLOSE(a.o.view, b.o.view, kTolF32, cat("o ", lq, "x", lk));
    RA_EXPECT_CLOSE(a.lse.view, b.lse.view, kTolF32, cat("lse ", lq, "x", lk));
    check_forward(c, a, kTolF32);
  }
}

TEST(ForwardPositions, NonCausalIgnoresPositions) {
  AttnCase c;
  c.B = 1, c.Lq = 40, c.Lk = 50, c.H = 2, c.Hkv = 1, c.d = 32, c.causal = false, c.seed = 206;
  c.q_pos = iota_pos(c.Lq, 0);
  c.k_pos = iota_pos(c.Lk, 10000);  // would mask everything if causal
  AttnData a = make_data(c);
  run_forward(c, a);
  check_forward(c, a, kTolF32);
  for (double l : reference_forward(a.q, a.k, a.v, c.options()).lse) ASSERT_FALSE(std::isinf(l));
}

// ---------------------------------------------------------------------------
// Layouts

TEST(ForwardLayout, StridedViewsEverywhere) {
  // Every operand (q, k, v, o, lse) is an interior view of a NaN-padded buffer:
  // reading outside a view poisons the result, writing outside is detected.
  for (bool causal : {false, true})
    for (DType dt : {DType::f32, DType::bf16}) {
      AttnCase c;
      c.B = 2, c.Lq = 45, c.Lk = 70, c.H = 4, c.Hkv = 2, c.d = 40, c.causal = causal, c.in = dt, c.out = dt;
      c.strided = true, c.seed = 300;
      AttnData a = make_data(c);
      run_forward(c, a);
      check_forward(c, a, tol_for(dt));
      expect_padding_untouched(c, a, false);
    }
}

TEST(ForwardLayout, PackedQkvSlices) {
  // q, k, v are slices of one packed [B, L, 3, H, d] buffer (a fused QKV projection).
  const int64_t B = 2, L = 53, H = 4, d = 32;
  TestTensor qkv = make_tensor(DType::f32, {B, L, 3, H, d});
  fill_uniform(qkv, 301);
  const std::vector<int64_t> shape{B, L, H, d}, st{L * 3 * H * d, 3 * H * d, d, 1};
  auto* base = static_cast<float*>(qkv.view.data);
  const TensorView q = make_view(base, DType::f32, shape, st);
  const TensorView k = make_view(base + H * d, DType::f32, shape, st);
  const TensorView v = make_view(base + 2 * H * d, DType::f32, shape, st);
  for (bool causal : {false, true}) {
    TestTensor o = make_tensor(DType::f32, shape), lse = make_tensor(DType::f32, {B, H, L});
    AttentionOptions opt;
    opt.causal = causal;
    attention_forward(q, k, v, o, lse, opt);
    const RefResult ref = reference_forward(q, k, v, opt);
    RA_EXPECT_CLOSE(o.view, ref.o, kTolF32, "o");
    RA_EXPECT_CLOSE(lse.view, ref.lse, kTolF32, "lse");
  }
}

TEST(ForwardLayout, HeadMajorMemoryViewedAsBshd) {
  // Memory laid out [B, H, L, d] (bhsd), viewed as [B, L, H, d] through strides.
  const int64_t B = 2, L = 61, H = 3, d = 64;
  TestTensor qm = make_tensor(DType::f32, {B, H, L, d}), km = make_tensor(DType::f32, {B, H, L, d}),
             vm = make_tensor(DType::f32, {B, H, L, d}), om = make_tensor(DType::f32, {B, H, L, d});
  fill_uniform(qm, 310), fill_uniform(km, 311), fill_uniform(vm, 312);
  const std::vector<int64_t> shape{B, L, H, d}, st{H * L * d, d, L * d, 1};
  const TensorView q = make_view(qm.view.data, DType::f32, shape, st);
  const TensorView k = make_view(km.view.data, DType::f32, shape, st);
  const TensorView v = make_view(vm.view.data, DType::f32, shape, st);
  const TensorView o = make_view(om.view.data, DType::f32, shape, st);
  // lse viewed as [B, H, L] over a [B, L, H] buffer.
  TestTensor lm = make_tensor(DType::f32, {B, L, H});
  const TensorView lse = make_view(lm.view.data, DType::f32, {B, H, L}, {L * H, 1, H});
  AttentionOptions opt;
  opt.causal = true;
  attention_forward(q, k, v, o, lse, opt);
  const RefResult ref = reference_forward(q, k, v, opt);
  RA_EXPECT_CLOSE(o, ref.o, kTolF32, "o");
  RA_EXPECT_CLOSE(lse, ref.lse, kTolF32, "lse");
}

// ---------------------------------------------------------------------------
// Options and exact cases

TEST(ForwardOptions, ExplicitScale) {
  for (float scale : {0.3f, 1.0f, 0.05f, 2.5f}) {
    AttnCase c;
    c.B = 1, c.Lq = 70, c.Lk = 70, c.H = 2, c.Hkv = 1, c.d = 64, c.causal = true, c.scale = scale, c.seed = 400;
    AttnData a = make_data(c);
    run_forward(c, a);
    SCOPED_TRACE(cat("scale ", scale));
    check_forward(c, a, kTolF32);
  }
}

TEST(ForwardOptions, DefaultScaleIsInverseSqrtD) {
  AttnCase c;
  c.B = 1, c.Lq = 30, c.Lk = 30, c.H = 2, c.Hkv = 2, c.d = 80, c.seed = 401;
  AttnData a = make_data(c);
  run_forward(c, a);
  AttnCase e = c;
  e.scale = static_cast<float>(1.0 / std::sqrt(80.0));
  AttnData b = make_data(e);
  run_forward(e, b);
  RA_EXPECT_CLOSE(a.o.view, b.o.view, 1e-6, "o");
  RA_EXPECT_CLOSE(a.lse.view, b.lse.view, 1e-6, "lse");
}

TEST(ForwardExact, SingleKeyGivesItsValue) {
  // One visible key: o = v exactly up to rounding, lse = score.
  AttnCase c;
  c.B = 2, c.Lq = 5, c.Lk = 1, c.H = 2, c.Hkv = 1, c.d = 16, c.seed = 402;
  AttnData a = make_data(c);
  run_forward(c, a);
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t i = 0; i < 5; ++i)
      for (int64_t h = 0; h < 2; ++h)
        for (int64_t x = 0; x < 16; ++x) {
          const int64_t oi[4] = {b, i, h, x}, vi[4] = {b, 0, 0, x};
          EXPECT_NEAR(load(a.o, offset_of(a.o, oi)), load(a.v, offset_of(a.v, vi)), 1e-6);
        }
  check_forward(c, a, kTolF32);
}

TEST(ForwardExact, ZeroQueriesAverageVisibleValues) {
  // q = 0: uniform weights, o = mean of visible v, lse = log(#visible).
  AttnCase c;
  c.B = 1, c.Lq = 20, c.Lk = 20, c.H = 1, c.Hkv = 1, c.d = 8, c.causal = true, c.seed = 403;
  AttnData a = make_data(c);
  fill_value(a.q, 0.f);
  run_forward(c, a);
  for (int64_t i = 0; i < 20; ++i) {
    const int64_t li[3] = {0, 0, i};
    EXPECT_NEAR(load(a.lse, offset_of(a.lse, li)), std::log(static_cast<double>(i + 1)), 1e-5);
    for (int64_t x = 0; x < 8; ++x) {
      double mean = 0;
      for (int64_t j = 0; j <= i; ++j) {
        const int64_t vi[4] = {0, j, 0, x};
        mean += load(a.v, offset_of(a.v, vi));
      }
      mean /= static_cast<double>(i + 1);
      const int64_t oi[4] = {0, i, 0, x};
      EXPECT_NEAR(load(a.o, offset_of(a.o, oi)), mean, 1e-5);
    }
  }
}

TEST(ForwardExact, LargeLogitsDoNotOverflow) {
  // Scores of several hundred: exp would overflow without max subtraction.
  AttnCase c;
  c.B = 1, c.Lq = 40, c.Lk = 70, c.H = 2, c.Hkv = 1, c.d = 64, c.causal = true, c.amp = 8.f, c.seed = 404;
  AttnData a = make_data(c);
  run_forward(c, a);
  check_forward(c, a, kTolF32);
}

// ---------------------------------------------------------------------------
// Determinism

TEST(ForwardDeterminism, ThreadsOneAndTwoBitwiseIdentical) {
  for (bool causal : {false, true}) {
    AttnCase c;
    c.B = 2, c.Lq = 300, c.Lk = 260, c.H = 4, c.Hkv = 2, c.d = 64, c.causal = causal, c.seed = 500;
    c.threads = 1;
    AttnData a = make_data(c);
    run_forward(c, a);
    AttnCase c2 = c;
    c2.threads = 2;
    AttnData b = make_data(c2);
    run_forward(c2, b);
    EXPECT_TRUE(bitwise_equal(a.o, b.o)) << "o differs between threads=1 and threads=2";
    EXPECT_TRUE(bitwise_equal(a.lse, b.lse)) << "lse differs between threads=1 and threads=2";
  }
}

TEST(ForwardDeterminism, RepeatedRunsBitwiseIdentical) {
  for (DType dt : {DType::f32, DType::bf16}) {
    AttnCase c;
    c.B = 2, c.Lq = 200, c.Lk = 200, c.H = 4, c.Hkv = 1, c.d = 96, c.causal = true, c.in = dt, c.out = dt;
    c.seed = 501;
    AttnData a = make_data(c), b = make_data(c);
    run_forward(c, a);
    run_forward(c, b);
    EXPECT_TRUE(bitwise_equal(a.o, b.o)) << dtype_name(dt);
    EXPECT_TRUE(bitwise_equal(a.lse, b.lse)) << dtype_name(dt);
  }
}

TEST(ForwardFlops, CountsVisiblePairs) {
  // 4·B·H·d per visible pair (docs/design.md §9).
  EXPECT_DOUBLE_EQ(attention_forward_flops(2, 3, 10, 20, 8, false), 4.0 * 2 * 3 * 8 * 10 * 20);
  // causal, square: L(L+1)/2 visible pairs
  EXPECT_DOUBLE_EQ(attention_forward_flops(1, 1, 4, 4, 2, true), 4.0 * 2 * 10);
  EXPECT_GT(attention_forward_flops(1, 1, 4, 4, 2, false), attention_forward_flops(1, 1, 4, 4, 2, true));
}

}  // namespace
}  // namespace ringattn::testing
