// Every kernel path (Isa) this machine can run, forward and backward, fp32 and
// bf16, against the reference and against the generic path. Paths this CPU cannot
// run are skipped (and reported as skipped).
//
// Metric: normalized max error (test_util.h). Paths differ from each other only in
// fp32 summation order / vector width (fp32: ≤ 1e-5) or in where they round to bf16
// (bf16: within the bf16 bounds).
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "attn_case.h"
#include "reference.h"
#include "ringattn/attention.h"
#include "ringattn/cpu/features.h"
#include "ringattn/error.h"
#include "test_util.h"

namespace ringattn::testing {
namespace {

// Stable storage for the Isa values AttentionOptions::isa points to.
const Isa* isa_ptr(Isa i) {
  const auto& v = all_isas();
  return &*std::find(v.begin(), v.end(), i);
}

std::vector<AttnCase> isa_cases(DType dt) {
  std::vector<AttnCase> cs;
  for (bool causal : {false, true}) {
    AttnCase c;
    c.B = 2, c.Lq = 67, c.Lk = 67, c.H = 4, c.Hkv = 2, c.d = 64, c.causal = causal, c.in = dt, c.out = dt;
    c.seed = 2000;
    cs.push_back(c);
    AttnCase e = c;  // Lq != Lk, odd head dim, MQA
    e.B = 1, e.Lq = 30, e.Lk = 95, e.H = 4, e.Hkv = 1, e.d = 40, e.seed = 2001;
    cs.push_back(e);
    AttnCase f = c;  // big head dim, strided
    f.B = 1, f.Lq = 50, f.Lk = 41, f.H = 2, f.Hkv = 2, f.d = 128, f.strided = true, f.seed = 2002;
    cs.push_back(f);
  }
  AttnCase g;  // striped positions with empty rows
  g.B = 1, g.Lq = 40, g.Lk = 40, g.H = 2, g.Hkv = 1, g.d = 32, g.causal = true, g.in = g.out = dt, g.seed = 2003;
  g.q_pos = iota_pos(40, 1, 4);
  g.k_pos = iota_pos(40, 3, 4);
  cs.push_back(g);
  return cs;
}

class IsaPaths : public ::testing::TestWithParam<Isa> {
 protected:
  void SetUp() override {
    if (!isa_supported(GetParam())) GTEST_SKIP() << isa_name(GetParam()) << " is not supported on this CPU";
  }
};

TEST_P(IsaPaths, ListedAsSupported) {
  const auto s = supported_isas();
  EXPECT_NE(std::find(s.begin(), s.end(), GetParam()), s.end());
}

TEST_P(IsaPaths, ForwardFp32AndBf16MatchReference) {
  for (DType dt : {DType::f32, DType::bf16})
    for (AttnCase c : isa_cases(dt)) {
      c.isa = isa_ptr(GetParam());
      SCOPED_TRACE(c.name());
      AttnData a = make_data(c);
      run_forward(c, a);
      check_forward(c, a, tol_for(dt));
      expect_padding_untouched(c, a, false);
    }
}

TEST_P(IsaPaths, BackwardFp32AndBf16MatchReference) {
  for (DType dt : {DType::f32, DType::bf16})
    for (AttnCase c : isa_cases(dt)) {
      c.isa = isa_ptr(GetParam());
      SCOPED_TRACE(c.name());
      AttnData a = make_data(c, true);
      run_forward(c, a);
      run_backward(c, a);
      check_backward(c, a, dt == DType::f32 ? kTolF32 : kTolBf16Bwd);
      expect_padding_untouched(c, a, true);
    }
}

TEST_P(IsaPaths, AgreesWithGenericPath) {
  if (GetParam() == Isa::generic) GTEST_SKIP() << "generic is the baseline";
  ASSERT_TRUE(isa_supported(Isa::generic));
  for (DType dt : {DType::f32, DType::bf16})
    for (AttnCase c : isa_cases(dt)) {
      SCOPED_TRACE(c.name());
      AttnCase g = c;
      g.isa = isa_ptr(Isa::generic);
      c.isa = isa_ptr(GetParam());
      AttnData a = make_data(c, true), b = make_data(g, true);
      run_forward(c, a);
      run_backward(c, a);
      run_forward(g, b);
      run_backward(g, b);
      const double tf = dt == DType::f32 ? kTolF32 : kTolBf16;
      const double tb = dt == DType::f32 ? kTolF32 : kTolBf16Bwd;
      RA_EXPECT_CLOSE(a.o.view, b.o.view, tf, "o vs generic");
      RA_EXPECT_CLOSE(a.lse.view, b.lse.view, tf, "lse vs generic");
      RA_EXPECT_CLOSE(a.dq.view, b.dq.view, tb, "dq vs generic");
      RA_EXPECT_CLOSE(a.dk.view, b.dk.view, tb, "dk vs generic");
      RA_EXPECT_CLOSE(a.dv.view, b.dv.view, tb, "dv vs generic");
    }
}

// Scores of 1e9 to 1e30 (q, k entries up to 1e15 at d = 32): the softmax is
// (nearly) one-hot and fp32 represents it, so o, lse must match the reference, on
// the tiled kernel and on the decode kernel (one query row: split keys). A fused
// s·c − m once left the row max's rounding error in the exponent (Inf in o, NaN
// in lse). The backward must stay finite; where it recomputes the scores exactly
// as its forward did (fp32: the same GEMM) dv = pᵀ·dO must be exact. Past
// |s·scale| ~ 2^24 a score that rounds differently moves p by a whole power of e
// (the lse cannot say which), so a decode-kernel forward (per-row dot products)
// or a bf16 one (bf16 dot-product instructions) is not paired with dv here.
TEST_P(IsaPaths, HugeScoresStayExact) {
  for (DType dt : {DType::f32, DType::bf16})
    for (float amp : {3e4f, 1e10f, 1e15f})
      for (bool causal : {false, true})
        for (int64_t lq : {int64_t{37}, int64_t{1}}) {
          AttnCase c;
          c.B = 1, c.Lq = lq, c.Lk = lq == 1 ? 300 : 37, c.H = 2, c.Hkv = 1, c.d = 32, c.causal = causal;
          c.in = c.out = dt, c.amp = amp, c.seed = 2100, c.isa = isa_ptr(GetParam());
          SCOPED_TRACE(cat(c.name(), " amp ", amp));
          AttnData a = make_data(c, true);
          run_forward(c, a);
          check_forward(c, a, tol_for(dt));
          run_backward(c, a);
          EXPECT_FALSE(any_nonfinite(a.dq)) << "dq not finite";
          EXPECT_FALSE(any_nonfinite(a.dk)) << "dk not finite";
          EXPECT_FALSE(any_nonfinite(a.dv)) << "dv not finite";
          if (lq == 1 || dt != DType::f32) continue;
          const RefResult ref = reference_backward(a.q, a.k, a.v, a.dout, c.options());
          RA_EXPECT_CLOSE(a.dv.view, ref.dv, kTolF32, "dv");
        }
}

TEST_P(IsaPaths, NameRoundTrips) { EXPECT_EQ(parse_isa(isa_name(GetParam())), GetParam()); }

INSTANTIATE_TEST_SUITE_P(All, IsaPaths, ::testing::ValuesIn(all_isas()),
                         [](const ::testing::TestParamInfo<Isa>& i) { return std::string(isa_name(i.param)); });

TEST(Isa, SupportedListIsConsistent) {
  const auto s = supported_isas();
  ASSERT_FALSE(s.empty());
  EXPECT_NE(std::find(s.begin(), s.end(), Isa::generic), s.end()) << "generic must always be available";
  for (Isa i : s) EXPECT_TRUE(isa_supported(i)) << isa_name(i);
  for (Isa i : all_isas())
    if (isa_supported(i)) {
      EXPECT_NE(std::find(s.begin(), s.end(), i), s.end()) << isa_name(i);
    }
  EXPECT_TRUE(isa_supported(default_isa()));
}

TEST(Isa, NamesRoundTripForAllPaths) {
  for (Isa i : all_isas()) {
    const std::string n = isa_name(i);
    EXPECT_FALSE(n.empty());
    EXPECT_EQ(parse_isa(n), i) << n;
  }
}

TEST(Isa, ParseRejectsGarbageWithError) {
  for (const char* bad : {"", "garbage", "avx3", "AVX-1024", "sse"}) {
    try {
      (void)parse_isa(bad);
      ADD_FAILURE() << "parse_isa(\"" << bad << "\") did not throw";
    } catch (const Error& e) {
      // The message lists the valid names.
      EXPECT_TRUE(contains_any(e.what(), {isa_name(Isa::avx2)})) << e.what();
    }
  }
}

TEST(Isa, CpuFeaturesAreSane) {
  const CpuFeatures& f = cpu_features();
  EXPECT_GE(f.logical_cpus, 1);
  if (isa_supported(Isa::avx2)) {
    EXPECT_TRUE(f.avx2 && f.fma);
  }
  if (isa_supported(Isa::avx512)) {
    EXPECT_TRUE(f.avx512f && f.os_avx512);
  }
  if (isa_supported(Isa::avx512_bf16)) {
    EXPECT_TRUE(f.avx512_bf16);
  }
}

TEST(Isa, UnsupportedPathIsAnErrorNotAFallback) {
  for (Isa i : all_isas()) {
    if (isa_supported(i)) continue;
    AttnCase c;
    c.isa = isa_ptr(i);
    AttnData a = make_data(c);
    EXPECT_THROW(run_forward(c, a), Error) << isa_name(i);
    return;
  }
  GTEST_SKIP() << "every path is supported on this CPU";
}

}  // namespace
}  // namespace ringattn::testing
