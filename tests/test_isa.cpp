// Every kernel path (Isa) this machine can run, forward and backward, fp32 and
// bf16, against the reference and against the generic path. Paths this CPU cannot
// run are skipped (and reported as skipped).
//
// Metric: normalized max error (test_util.h). Paths differ from each other only in
// fp32 summation order / vector width (fp32: ≤ 1e-5) or in where they round to bf16
// (bf16: within the bf16 bounds).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "attn_case.h"
#include "reference.h"
#include "ringattn/attention.h"
#include "ringattn/cpu/features.h"
#include "ringattn/cpu/gemm.h"
#include "ringattn/cpu/layers.h"
#include "ringattn/error.h"
#include "test_util.h"

namespace ringattn::testing {
namespace {

// C = 0.5·op(A)·op(B) + beta·C through gemm against double: A, B, C strided
// (lda, ldb, ldc past their rows), bf16 operands rounded first and the reference
// on the rounded values.
void check_gemm(int64_t M, int64_t N, int64_t K, bool ta, bool tb, DType t, float beta, std::mt19937_64& rng) {
  std::normal_distribution<float> nd;
  auto randv = [&](int64_t n) {
    std::vector<float> v(static_cast<size_t>(n));
    for (float& x : v) x = nd(rng);
    return v;
  };
  const int64_t lda = (ta ? M : K) + 2, ldb = (tb ? K : N) + 3, ldc = N + 1;
  std::vector<float> a = randv((ta ? K : M) * lda), b = randv((tb ? N : K) * ldb), c = randv(M * ldc);
  const std::vector<float> c0 = c;
  std::vector<uint16_t> a16(a.size()), b16(b.size());
  if (t == DType::bf16) {
    for (size_t i = 0; i < a.size(); ++i) a16[i] = f32_to_bf16(a[i]), a[i] = bf16_to_f32(a16[i]);
    for (size_t i = 0; i < b.size(); ++i) b16[i] = f32_to_bf16(b[i]), b[i] = bf16_to_f32(b16[i]);
  }
  const void* A = t == DType::bf16 ? static_cast<const void*>(a16.data()) : a.data();
  const void* B = t == DType::bf16 ? static_cast<const void*>(b16.data()) : b.data();
  gemm(ta, tb, M, N, K, 0.5f, A, lda, B, ldb, beta, c.data(), ldc, t);
  std::vector<double> got, want;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < N; ++j) {
      double sum = 0;
      for (int64_t k = 0; k < K; ++k)
        sum += double(a[ta ? k * lda + m : m * lda + k]) * b[tb ? j * ldb + k : k * ldb + j];
      want.push_back(0.5 * sum + double(beta) * c0[m * ldc + j]);
      got.push_back(c[m * ldc + j]);
    }
  EXPECT_LE(compare(got, want).err, 1e-6 * std::sqrt(double(K)))
      << "gemm M=" << M << " K=" << K << " N=" << N << (ta ? " A^T" : "") << (tb ? " B^T " : " ") << dtype_name(t)
      << " " << compare(got, want);
}

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

// The token-local layers' vector loops of this path (chosen by RINGATTN_ISA, as
// layers.cpp dispatches) against double references, on lengths with vector tails.
TEST_P(IsaPaths, LayersMatchDouble) {
  struct ScopedIsa {
    explicit ScopedIsa(Isa i) { setenv("RINGATTN_ISA", isa_name(i), 1); }
    ~ScopedIsa() { unsetenv("RINGATTN_ISA"); }
  } scoped(GetParam());
  std::mt19937_64 rng(7);
  std::normal_distribution<float> nd;
  auto randv = [&](int64_t n, float sd = 1.f, float mean = 0.f) {
    std::vector<float> v(static_cast<size_t>(n));
    for (float& x : v) x = mean + sd * nd(rng);
    return v;
  };
  auto d = [](const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); };
  const double tol = 2e-6;
  const int64_t N = 5, C = 77, n = N * C;
  std::vector<float> x = randv(n, 3.f), dy = randv(n), gamma = randv(C, 0.5f, 1.f), beta = randv(C);
  x[0] = 40.f, x[1] = -40.f, x[2] = 0.f, x[3] = -0.f;  // the tails of σ and tanh
  std::vector<float> y(n), dx(n), mean(N), rstd(N);
  {  // GELU (tanh form) and its derivative
    std::vector<double> ry(n), rdx(n);
    for (int64_t i = 0; i < n; ++i) {
      const double v = x[i], u = 0.7978845608028654 * (v + 0.044715 * v * v * v), t = std::tanh(u);
      ry[i] = 0.5 * v * (1 + t);
      rdx[i] = dy[i] * (0.5 * (1 + t) + 0.5 * v * (1 - t * t) * 0.7978845608028654 * (1 + 3 * 0.044715 * v * v));
    }
    gelu_forward(n, x.data(), y.data());
    gelu_backward(n, x.data(), dy.data(), dx.data());
    EXPECT_LE(compare(d(y), ry).err, tol) << "gelu " << compare(d(y), ry);
    EXPECT_LE(compare(d(dx), rdx).err, tol) << "gelu backward " << compare(d(dx), rdx);
  }
  {  // SwiGLU
    const std::vector<float> u = randv(n);
    std::vector<float> dg(n), du(n);
    std::vector<double> ry(n), rdg(n), rdu(n);
    for (int64_t i = 0; i < n; ++i) {
      const double g = x[i], s = 1 / (1 + std::exp(-g));
      ry[i] = g * s * u[i], rdg[i] = dy[i] * u[i] * s * (1 + g * (1 - s)), rdu[i] = dy[i] * g * s;
    }
    swiglu_forward(n, x.data(), u.data(), y.data());
    swiglu_backward(n, x.data(), u.data(), dy.data(), dg.data(), du.data());
    EXPECT_LE(compare(d(y), ry).err, tol) << "swiglu " << compare(d(y), ry);
    EXPECT_LE(compare(d(dg), rdg).err, tol) << "swiglu dg " << compare(d(dg), rdg);
    EXPECT_LE(compare(d(du), rdu).err, tol) << "swiglu du " << compare(d(du), rdu);
  }
  for (bool centered : {true, false}) {  // LayerNorm and RMSNorm, forward and backward
    std::vector<float> dgamma(C, 0.f), dbeta(C, 0.f);
    std::vector<double> ry(n), rdx(n), rdg(C, 0.0), rdb(C, 0.0);
    for (int64_t i = 0; i < N; ++i) {
      double m = 0, v = 0, a = 0, b = 0;
      if (centered)
        for (int64_t c = 0; c < C; ++c) m += x[i * C + c] / double(C);
      for (int64_t c = 0; c < C; ++c) v += (x[i * C + c] - m) * (x[i * C + c] - m) / double(C);
      const double r = 1 / std::sqrt(v + 1e-5);
      for (int64_t c = 0; c < C; ++c) {
        const double xh = (x[i * C + c] - m) * r, dyh = double(dy[i * C + c]) * gamma[c];
        ry[i * C + c] = xh * gamma[c] + (centered ? beta[c] : 0.0);
        a += dyh / double(C), b += dyh * xh / double(C);
        rdg[c] += dy[i * C + c] * xh, rdb[c] += dy[i * C + c];
      }
      for (int64_t c = 0; c < C; ++c)
        rdx[i * C + c] = r * (double(dy[i * C + c]) * gamma[c] - (centered ? a : 0.0) - (x[i * C + c] - m) * r * b);
    }
    if (centered) {
      layernorm_forward(N, C, x.data(), gamma.data(), beta.data(), y.data(), mean.data(), rstd.data(), 1e-5f);
      layernorm_backward(N, C, x.data(), gamma.data(), mean.data(), rstd.data(), dy.data(), dx.data(), dgamma.data(),
                         dbeta.data());
      EXPECT_LE(compare(d(dbeta), rdb).err, tol) << "layernorm dbeta " << compare(d(dbeta), rdb);
    } else {
      rmsnorm_forward(N, C, x.data(), gamma.data(), y.data(), rstd.data(), 1e-5f);
      rmsnorm_backward(N, C, x.data(), gamma.data(), rstd.data(), dy.data(), dx.data(), dgamma.data());
    }
    SCOPED_TRACE(centered ? "layernorm" : "rmsnorm");
    EXPECT_LE(compare(d(y), ry).err, tol) << compare(d(y), ry);
    EXPECT_LE(compare(d(dx), rdx).err, 1e-5) << compare(d(dx), rdx);
    EXPECT_LE(compare(d(dgamma), rdg).err, tol) << compare(d(dgamma), rdg);
  }
  {  // RoPE: 3 heads of 20 (a tail of 10 pairs), rows 70 apart, positions up to 10^6
    const int64_t T = 4, H = 3, hd = 20, ld = 70;
    std::vector<float> q = randv(T * ld);
    const std::vector<int64_t> pos{0, 1, 4097, 1000003};
    const std::vector<float> inv = rope_inv_freq(RopeConfig{}, hd);
    std::vector<double> want(q.begin(), q.end());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < hd / 2; ++i) {
          const double a = static_cast<float>(static_cast<float>(pos[t]) * inv[i]);
          const double x1 = q[t * ld + h * hd + i], x2 = q[t * ld + h * hd + i + hd / 2];
          want[t * ld + h * hd + i] = x1 * std::cos(a) - x2 * std::sin(a);
          want[t * ld + h * hd + i + hd / 2] = x2 * std::cos(a) + x1 * std::sin(a);
        }
    const std::vector<float> q0 = q;
    rope_forward(T, H, hd, ld, q.data(), pos.data(), inv.data());
    EXPECT_LE(compare(d(q), want).err, tol) << "rope " << compare(d(q), want);
    rope_backward(T, H, hd, ld, q.data(), pos.data(), inv.data());
    EXPECT_LE(compare(d(q), d(q0)).err, tol) << "rope backward undoes it";
  }
  {  // softmax + cross-entropy, a row of -1 and a vocabulary with a tail
    const int64_t R = 3, V = 1001;
    std::vector<float> z = randv(R * V, 4.f);
    const std::vector<int64_t> labels{5, -1, 1000};
    std::vector<double> want(R * V, 0.0);
    double want_loss = 0;
    for (int64_t i = 0; i < R; ++i) {
      if (labels[i] < 0) continue;
      double m = -1e300, s = 0;
      for (int64_t v = 0; v < V; ++v) m = std::max(m, double(z[i * V + v]));
      for (int64_t v = 0; v < V; ++v) s += std::exp(z[i * V + v] - m);
      const double lse = m + std::log(s);
      want_loss += lse - z[i * V + labels[i]];
      for (int64_t v = 0; v < V; ++v) want[i * V + v] = 0.5 * std::exp(z[i * V + v] - lse);
      want[i * V + labels[i]] -= 0.5;
    }
    const double loss = softmax_cross_entropy_rows(R, V, z.data(), labels.data(), 0.5f);
    EXPECT_NEAR(loss, want_loss, 1e-6 * want_loss);
    EXPECT_LE(compare(d(z), want).err, tol) << "cross-entropy " << compare(d(z), want);
  }
  // Up to four rows through gemm (the vector GEMV): op(A) and op(B) plain and
  // transposed, strided, fp32 and bf16, alpha/beta, sizes with vector tails,
  // small (one thread) and large (rows of B split over the threads, partial sums
  // added).
  for (const auto& [K, N] : std::vector<std::pair<int64_t, int64_t>>{{37, 50}, {300, 333}, {1029, 77}})
    for (const int64_t M : {1, 2, 3, 4})
      for (const bool trans : {false, true})
        for (const DType t : {DType::f32, DType::bf16}) {
          const bool ta = trans && M != 2, tb = trans;  // M = 2: B transposed alone
          check_gemm(M, N, K, ta, tb, t, 2.f, rng);
        }
}

// The GEMM past the GEMV's rows (oneDNN's matmul, or bf16 widened to fp32 where
// oneDNN has no bf16 matmul on this CPU) against double: op(A), op(B) plain and
// transposed, strided, alpha/beta, fp32 and bf16, sizes off every block.
TEST(Gemm, MatchesDoubleForEveryOperandLayout) {
  std::mt19937_64 rng(11);
  for (const auto& [M, N, K] : std::vector<std::array<int64_t, 3>>{{5, 7, 3}, {37, 50, 129}, {130, 33, 64}})
    for (const bool ta : {false, true})
      for (const bool tb : {false, true})
        for (const DType t : {DType::f32, DType::bf16}) check_gemm(M, N, K, ta, tb, t, -1.5f, rng);
  EXPECT_NE(gemm_impl_name(64, DType::bf16), "");
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

// Ranks on one machine divide its CPUs: unbound ranks share them all, ranks the
// launcher bound to distinct cores or sockets share only their own set.
TEST(Threads, RanksOnOneMachineDivideItsCpus) {
  EXPECT_EQ(threads_sharing_cpus(16, 16, 1), 16);
  EXPECT_EQ(threads_sharing_cpus(16, 16, 4), 4);  // unbound: 4 ranks share 16 CPUs
  EXPECT_EQ(threads_sharing_cpus(16, 16, 3), 5);  // 16 / 3, rounded down
  EXPECT_EQ(threads_sharing_cpus(2, 2, 8), 1);    // more ranks than CPUs: one thread each
  EXPECT_EQ(threads_sharing_cpus(1, 16, 2), 1);   // bound to a core each
  EXPECT_EQ(threads_sharing_cpus(8, 16, 2), 8);   // bound to a socket each
  EXPECT_EQ(threads_sharing_cpus(8, 16, 4), 4);   // two ranks per socket
  EXPECT_EQ(threads_sharing_cpus(8, 16, 3), 4);   // a socket holds two of the three
  EXPECT_THROW(threads_sharing_cpus(0, 16, 2), Error);
  EXPECT_THROW(threads_sharing_cpus(4, 2, 2), Error);
  EXPECT_THROW(threads_sharing_cpus(4, 4, 0), Error);
}

TEST(Threads, LauncherLocalRanksReadsTheLauncherAndRejectsGarbage) {
  const char* saved = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
  const std::string keep = saved ? saved : "";
  setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "3", 1);
  EXPECT_EQ(launcher_local_ranks(), 3);
  setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "3x", 1);
  EXPECT_THROW(launcher_local_ranks(), Error);
  setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "0", 1);
  EXPECT_THROW(launcher_local_ranks(), Error);
  if (saved)
    setenv("OMPI_COMM_WORLD_LOCAL_SIZE", keep.c_str(), 1);
  else
    unsetenv("OMPI_COMM_WORLD_LOCAL_SIZE");
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
