// attention_backward against the double-precision reference gradients, the
// reference itself against finite differences (so it is validated independently
// of the kernel), and the kernel against finite differences of the reference loss
// L = sum(o ∘ dout).
//
// Metric: normalized max error max|got − ref| / max(max|ref|, tiny) per gradient
// (test_util.h). fp32 bound 1e-5. bf16 bound kTolBf16Bwd = 3e-2: the reference
// runs on the bf16-rounded q, k, v, dout, but the kernel's o is the bf16-rounded
// forward output (so D = rowsum(dO ∘ O) differs by ~2^-9 relative) and its GEMM
// operands (p, ds) may be rounded to bf16; ds = p ∘ (dp − D) amplifies relative
// errors where dp ≈ D.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "attn_case.h"
#include "reference.h"
#include "ringattn/cpu/attention.h"
#include "test_util.h"

namespace ringattn::testing {
namespace {

// Runs forward (to get o, lse as the kernel produces them) then backward.
void forward_backward(const AttnCase& c, AttnData& a) {
  run_forward(c, a);
  run_backward(c, a);
}

std::vector<AttnCase> backward_cases() {
  std::vector<AttnCase> cs;
  for (bool causal : {false, true}) {
    for (int64_t L : {1, 7, 127}) {
      AttnCase c;
      c.B = 2, c.Lq = L, c.Lk = L, c.H = 2, c.Hkv = 1, c.d = 64, c.causal = causal, c.seed = 600 + L;
      cs.push_back(c);
    }
    {
      AttnCase c;
      c.B = 1, c.Lq = 400, c.Lk = 400, c.H = 1, c.Hkv = 1, c.d = 32, c.causal = causal, c.seed = 601;
      cs.push_back(c);
    }
    for (int64_t d : {3, 24, 40, 80, 128, 256}) {
      AttnCase c;
      c.B = 1, c.Lq = 50, c.Lk = 50, c.H = 2, c.Hkv = 2, c.d = d, c.causal = causal, c.seed = 610 + d;
      cs.push_back(c);
    }
    for (int64_t hkv : {8, 4, 2, 1}) {
      AttnCase c;
      c.B = 2, c.Lq = 40, c.Lk = 40, c.H = 8, c.Hkv = hkv, c.d = 32, c.causal = causal, c.seed = 620 + hkv;
      cs.push_back(c);
    }
    for (auto [lq, lk] : std::vector<std::pair<int64_t, int64_t>>{{33, 100}, {100, 33}, {1, 50}, {50, 1}}) {
      AttnCase c;
      c.B = 1, c.Lq = lq, c.Lk = lk, c.H = 4, c.Hkv = 2, c.d = 64, c.causal = causal, c.seed = 630 + lq;
      cs.push_back(c);
    }
    {
      AttnCase c;  // peaky softmax
      c.B = 1, c.Lq = 90, c.Lk = 110, c.H = 2, c.Hkv = 1, c.d = 64, c.causal = causal, c.amp = 3.f, c.seed = 640;
      cs.push_back(c);
    }
    {
      AttnCase c;  // every operand a strided view in a NaN-padded buffer
      c.B = 2, c.Lq = 37, c.Lk = 59, c.H = 4, c.Hkv = 2, c.d = 40, c.causal = causal, c.strided = true;
      c.seed = 641;
      cs.push_back(c);
    }
  }
  return cs;
}

class BackwardShapes : public ::testing::TestWithParam<AttnCase> {};

TEST_P(BackwardShapes, MatchesReferenceFp32) {
  const AttnCase& c = GetParam();
  AttnData a = make_data(c, true);
  forward_backward(c, a);
  check_backward(c, a, kTolF32);
  expect_padding_untouched(c, a, true);
}

INSTANTIATE_TEST_SUITE_P(Sweep, BackwardShapes, ::testing::ValuesIn(backward_cases()),
                         [](const ::testing::TestParamInfo<AttnCase>& i) { return i.param.name(); });

// ---------------------------------------------------------------------------
// Positions: rows that see no key get no gradient; keys no query sees get dk = dv = 0.

TEST(BackwardPositions, StripedPositions) {
  for (bool causal : {true, false}) {
    AttnCase c;
    c.B = 2, c.Lq = 50, c.Lk = 45, c.H = 4, c.Hkv = 2, c.d = 64, c.causal = causal, c.seed = 650;
    c.q_pos = iota_pos(c.Lq, 1, 3);
    c.k_pos = iota_pos(c.Lk, 2, 3);
    AttnData a = make_data(c, true);
    forward_backward(c, a);
    check_backward(c, a, kTolF32);
  }
}

TEST(BackwardPositions, ShiftedRowsWithNoKeyAndKeysWithNoQuery) {
  // Queries 100..159, keys 130..209: query rows < 130 see nothing, keys > 159 are
  // seen by nobody.
  AttnCase c;
  c.B = 1, c.Lq = 60, c.Lk = 80, c.H = 2, c.Hkv = 1, c.d = 32, c.causal = true, c.seed = 651;
  c.q_pos = iota_pos(c.Lq, 100);
  c.k_pos = iota_pos(c.Lk, 130);
  AttnData a = make_data(c, true);
  forward_backward(c, a);
  check_backward(c, a, kTolF32);
  // Exact zeros where there is no contribution.
  for (int64_t i = 0; i < 30; ++i)
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t x = 0; x < 32; ++x) {
        const int64_t idx[4] = {0, i, h, x};
        ASSERT_EQ(load(a.dq, offset_of(a.dq, idx)), 0.f) << "dq row " << i;
      }
  for (int64_t j = 30; j < 80; ++j)
    for (int64_t x = 0; x < 32; ++x) {
      const int64_t idx[4] = {0, j, 0, x};
      ASSERT_EQ(load(a.dk, offset_of(a.dk, idx)), 0.f) << "dk row " << j;
      ASSERT_EQ(load(a.dv, offset_of(a.dv, idx)), 0.f) << "dv row " << j;
    }
}

TEST(BackwardPositions, FullyMaskedBlockGivesZeroGradients) {
  AttnCase c;
  c.B = 1, c.Lq = 20, c.Lk = 25, c.H = 2, c.Hkv = 2, c.d = 16, c.causal = true, c.seed = 652;
  c.q_pos = iota_pos(c.Lq, 0);
  c.k_pos = iota_pos(c.Lk, 100);
  AttnData a = make_data(c, true);
  forward_backward(c, a);
  for (const TestTensor* t : {&a.dq, &a.dk, &a.dv})
    for (double x : to_double(*t)) ASSERT_EQ(x, 0.0);
}

// ---------------------------------------------------------------------------
// Finite differences

// Central differences of ref_loss with respect to every element of one input.
std::vector<double> fd_grad(RefProblem p, std::vector<double> RefProblem::*which, const std::vector<double>& dout,
                            double eps) {
  std::vector<double>& x = p.*which;
  std::vector<double> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + eps;
    const double lp = ref_loss(p, dout);
    x[i] = x0 - eps;
    const double lm = ref_loss(p, dout);
    x[i] = x0;
    g[i] = (lp - lm) / (2 * eps);
  }
  return g;
}

struct TinyCase {
  int64_t Lq, Lk, H, Hkv, d;
  bool causal;
  std::vector<int64_t> q_pos, k_pos;  // empty: defaults
};

std::vector<TinyCase> tiny_cases() {
  return {
      {3, 4, 2, 1, 3, false, {}, {}},
      {3, 4, 2, 1, 3, true, {}, {}},
      {5, 3, 2, 2, 4, true, {}, {}},                        // Lq > Lk: the first two rows see nothing
      {4, 4, 4, 2, 2, true, {1, 4, 7, 10}, {2, 5, 8, 11}},  // striped: row 0 sees nothing
      {2, 6, 1, 1, 5, true, {7, 9}, {3, 4, 5, 6, 8, 9}},
  };
}

AttnCase to_attn_case(const TinyCase& t, uint32_t seed) {
  AttnCase c;
  c.B = 1, c.Lq = t.Lq, c.Lk = t.Lk, c.H = t.H, c.Hkv = t.Hkv, c.d = t.d, c.causal = t.causal;
  c.amp = 1.5f, c.seed = seed;
  if (!t.q_pos.empty()) c.q_pos = t.q_pos;
  if (!t.k_pos.empty()) c.k_pos = t.k_pos;
  return c;
}

TEST(FiniteDifferences, ReferenceGradientsMatchFiniteDifferences) {
  uint32_t seed = 700;
  for (const TinyCase& t : tiny_cases()) {
    const AttnCase c = to_attn_case(t, seed++);
    AttnData a = make_data(c, true);
    const RefProblem p = make_ref_problem(a.q, a.k, a.v, c.options());
    const std::vector<double> dout = to_double(a.dout);
    const RefResult r = ref_backward(p, dout);
    const double eps = 1e-5;  // double: truncation ~eps², cancellation ~1e-16/eps
    SCOPED_TRACE(c.name());
    RA_EXPECT_CLOSE(r.dq, fd_grad(p, &RefProblem::q, dout, eps), 1e-7, "reference dq vs FD");
    RA_EXPECT_CLOSE(r.dk, fd_grad(p, &RefProblem::k, dout, eps), 1e-7, "reference dk vs FD");
    RA_EXPECT_CLOSE(r.dv, fd_grad(p, &RefProblem::v, dout, eps), 1e-7, "reference dv vs FD");
  }
}

TEST(FiniteDifferences, ReferenceForwardMatchesSoftmaxDefinition) {
  // o_i = Σ_j softmax_j(scale q_i·k_j) v_j and lse_i = log Σ_j exp(scale q_i·k_j),
  // written out directly for one tiny non-causal problem.
  AttnCase c;
  c.B = 1, c.Lq = 2, c.Lk = 3, c.H = 1, c.Hkv = 1, c.d = 2, c.seed = 710;
  AttnData a = make_data(c);
  const RefProblem p = make_ref_problem(a.q, a.k, a.v, c.options());
  const RefResult r = ref_forward(p);
  for (int i = 0; i < 2; ++i) {
    double s[3], z = 0;
    for (int j = 0; j < 3; ++j) {
      s[j] = (p.q[i * 2] * p.k[j * 2] + p.q[i * 2 + 1] * p.k[j * 2 + 1]) / std::sqrt(2.0);
      z += std::exp(s[j]);
    }
    EXPECT_NEAR(r.lse[i], std::log(z), 1e-14);
    for (int x = 0; x < 2; ++x) {
      double o = 0;
      for (int j = 0; j < 3; ++j) o += std::exp(s[j]) / z * p.v[j * 2 + x];
      EXPECT_NEAR(r.o[i * 2 + x], o, 1e-14);
    }
  }
}

TEST(FiniteDifferences, KernelGradientsMatchFiniteDifferencesOfReferenceLoss) {
  uint32_t seed = 720;
  for (const TinyCase& t : tiny_cases()) {
    const AttnCase c = to_attn_case(t, seed++);
    AttnData a = make_data(c, true);
    forward_backward(c, a);
    const RefProblem p = make_ref_problem(a.q, a.k, a.v, c.options());
    const std::vector<double> dout = to_double(a.dout);
    const double eps = 1e-3;
    SCOPED_TRACE(c.name());
    RA_EXPECT_CLOSE(a.dq.view, fd_grad(p, &RefProblem::q, dout, eps), 1e-3, "kernel dq vs FD");
    RA_EXPECT_CLOSE(a.dk.view, fd_grad(p, &RefProblem::k, dout, eps), 1e-3, "kernel dk vs FD");
    RA_EXPECT_CLOSE(a.dv.view, fd_grad(p, &RefProblem::v, dout, eps), 1e-3, "kernel dv vs FD");
  }
}

// ---------------------------------------------------------------------------
// Reduced precision

std::vector<AttnCase> bf16_cases() {
  std::vector<AttnCase> cs;
  for (bool causal : {false, true})
    for (DType out : {DType::bf16, DType::f32}) {
      AttnCase c;
      c.B = 2, c.Lq = 77, c.Lk = 77, c.H = 4, c.Hkv = 2, c.d = 64, c.causal = causal, c.in = DType::bf16;
      c.out = out, c.seed = 800;
      cs.push_back(c);
      AttnCase e = c;
      e.B = 1, e.Lq = 40, e.Lk = 150, e.H = 2, e.Hkv = 1, e.d = 128, e.seed = 801;
      cs.push_back(e);
    }
  AttnCase f;
  f.B = 1, f.Lq = 60, f.Lk = 60, f.H = 2, f.Hkv = 1, f.d = 80, f.causal = true, f.in = f.out = DType::f16;
  f.seed = 802;
  cs.push_back(f);
  return cs;
}

class BackwardReduced : public ::testing::TestWithParam<AttnCase> {};

TEST_P(BackwardReduced, BoundedErrorVsReferenceOnRoundedInputs) {
  const AttnCase& c = GetParam();
  AttnData a = make_data(c, true);
  forward_backward(c, a);
  // fp16 inputs: same bound as bf16 (o and gradients may be stored in fp16 too).
  check_backward(c, a, kTolBf16Bwd);
}

INSTANTIATE_TEST_SUITE_P(Sweep, BackwardReduced, ::testing::ValuesIn(bf16_cases()),
                         [](const ::testing::TestParamInfo<AttnCase>& i) { return i.param.name(); });

// ---------------------------------------------------------------------------

TEST(BackwardDeterminism, RepeatedRunsBitwiseIdentical) {
  AttnCase c;
  c.B = 2, c.Lq = 150, c.Lk = 170, c.H = 4, c.Hkv = 2, c.d = 64, c.causal = true, c.threads = 2, c.seed = 900;
  AttnData a = make_data(c, true), b = make_data(c, true);
  forward_backward(c, a);
  forward_backward(c, b);
  EXPECT_TRUE(bitwise_equal(a.dq, b.dq));
  EXPECT_TRUE(bitwise_equal(a.dk, b.dk));
  EXPECT_TRUE(bitwise_equal(a.dv, b.dv));
}

TEST(BackwardOptions, ExplicitScale) {
  AttnCase c;
  c.B = 1, c.Lq = 45, c.Lk = 45, c.H = 2, c.Hkv = 1, c.d = 32, c.causal = true, c.scale = 0.37f, c.seed = 901;
  AttnData a = make_data(c, true);
  forward_backward(c, a);
  check_backward(c, a, kTolF32);
}

}  // namespace
}  // namespace ringattn::testing
