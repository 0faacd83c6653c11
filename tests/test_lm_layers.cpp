// The language-model layers on the CPU against double precision: RMSNorm and
// SwiGLU forward, their backward against finite differences of the double
// forward; RoPE's inverse frequencies (default, linear, llama3) by the Hugging
// Face formulas, its rotation against the formula, its relative-position
// property (what makes global positions under every layout matter) and its
// backward as the exact inverse.
#include <gtest/gtest.h>

#include <barrier>
#include <cmath>
#include <functional>
#include <random>
#include <thread>
#include <vector>

#include "ringattn/cpu/layers.h"
#include "test_util.h"

namespace ringattn::testing {
namespace {

std::vector<float> normal(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.f, 1.f);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// max |a − b| / max |b|
double rel(const std::vector<float>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i)
    num = std::max(num, std::fabs(a[i] - b[i])), den = std::max(den, std::fabs(b[i]));
  return num / den;
}

// d/dx_i Σ dy ∘ f(x), by central differences of the double forward f.
std::vector<double> numeric_grad(const std::vector<float>& x, const std::vector<float>& dy,
                                 const std::function<std::vector<double>(const std::vector<double>&)>& f) {
  std::vector<double> xd(x.begin(), x.end()), g(x.size());
  const double h = 1e-5;
  for (size_t i = 0; i < x.size(); ++i) {
    const double keep = xd[i];
    xd[i] = keep + h;
    const std::vector<double> up = f(xd);
    xd[i] = keep - h;
    const std::vector<double> down = f(xd);
    xd[i] = keep;
    double s = 0;
    for (size_t k = 0; k < up.size(); ++k) s += dy[k] * (up[k] - down[k]);
    g[i] = s / (2 * h);
  }
  return g;
}

std::vector<double> rmsnorm_ref(const std::vector<double>& x, const std::vector<float>& gamma, int64_t N, int64_t C,
                                double eps) {
  std::vector<double> y(x.size());
  for (int64_t i = 0; i < N; ++i) {
    double s2 = 0;
    for (int64_t c = 0; c < C; ++c) s2 += x[i * C + c] * x[i * C + c];
    const double r = 1 / std::sqrt(s2 / C + eps);
    for (int64_t c = 0; c < C; ++c) y[i * C + c] = x[i * C + c] * r * gamma[c];
  }
  return y;
}

TEST(LmLayers, RmsNormForwardAndBackward) {
  const int64_t N = 7, C = 37;
  const float eps = 1e-6f;
  const std::vector<float> x = normal(N * C, 1), gamma = normal(C, 2), dy = normal(N * C, 3);
  std::vector<float> y(N * C), rstd(N), dx(N * C), dgamma(C, 0.5f);
  rmsnorm_forward(N, C, x.data(), gamma.data(), y.data(), rstd.data(), eps);
  EXPECT_LT(rel(y, rmsnorm_ref({x.begin(), x.end()}, gamma, N, C, eps)), 1e-6);
  rmsnorm_backward(N, C, x.data(), gamma.data(), rstd.data(), dy.data(), dx.data(), dgamma.data());
  EXPECT_LT(
      rel(dx, numeric_grad(x, dy, [&](const std::vector<double>& xd) { return rmsnorm_ref(xd, gamma, N, C, eps); })),
      1e-4);
  // dgamma accumulates: 0.5 + Σ_rows dy ∘ x̂
  std::vector<double> want(C, 0.5);
  for (int64_t i = 0; i < N; ++i) {
    double s2 = 0;
    for (int64_t c = 0; c < C; ++c) s2 += double(x[i * C + c]) * x[i * C + c];
    for (int64_t c = 0; c < C; ++c) want[c] += dy[i * C + c] * x[i * C + c] / std::sqrt(s2 / C + eps);
  }
  EXPECT_LT(rel(dgamma, want), 1e-5);
}

TEST(LmLayers, SwiGluForwardAndBackward) {
  const int64_t n = 301;
  std::vector<float> g = normal(n, 4), u = normal(n, 5), dy = normal(n, 6);
  for (size_t i = 0; i < 5; ++i) g[i] = std::array<float, 5>{-30.f, -8.f, 0.f, 8.f, 30.f}[i];  // the tails
  std::vector<float> y(n), dg(n), du(n);
  swiglu_forward(n, g.data(), u.data(), y.data());
  auto ref = [&](const std::vector<double>& gd, const std::vector<double>& ud) {
    std::vector<double> out(n);
    for (int64_t i = 0; i < n; ++i) out[i] = gd[i] / (1 + std::exp(-gd[i])) * ud[i];
    return out;
  };
  const std::vector<double> gd(g.begin(), g.end()), ud(u.begin(), u.end());
  EXPECT_LT(rel(y, ref(gd, ud)), 1e-6);
  swiglu_backward(n, g.data(), u.data(), dy.data(), dg.data(), du.data());
  EXPECT_LT(rel(dg, numeric_grad(g, dy, [&](const std::vector<double>& x) { return ref(x, ud); })), 1e-5);
  EXPECT_LT(rel(du, numeric_grad(u, dy, [&](const std::vector<double>& x) { return ref(gd, x); })), 1e-5);
}

TEST(LmLayers, RopeInverseFrequenciesFollowHuggingFace) {
  RopeConfig r;  // default, theta 10000
  const std::vector<float> f = rope_inv_freq(r, 64);
  ASSERT_EQ(f.size(), 32u);
  EXPECT_FLOAT_EQ(f[0], 1.f);
  EXPECT_FLOAT_EQ(f[1], static_cast<float>(std::pow(10000.0, -2.0 / 64)));
  EXPECT_FLOAT_EQ(f[31], static_cast<float>(std::pow(10000.0, -62.0 / 64)));
  r.type = "linear", r.factor = 4;
  EXPECT_FLOAT_EQ(rope_inv_freq(r, 64)[5], f[5] / 4);
  // llama3 (Llama 3.1/3.2: theta 500000, factor 32, low 1, high 4, original 8192):
  // wavelengths below 8192/4 = 2048 kept, above 8192/1 divided by 32, blended between.
  RopeConfig l3;
  l3.theta = 500000, l3.type = "llama3", l3.factor = 32, l3.low_freq_factor = 1, l3.high_freq_factor = 4;
  l3.original_max_positions = 8192;
  RopeConfig plain;
  plain.theta = 500000;
  const std::vector<float> base = rope_inv_freq(plain, 128), scaled = rope_inv_freq(l3, 128);
  int kept = 0, divided = 0, blended = 0;
  for (size_t i = 0; i < base.size(); ++i) {
    const double wavelen = 2 * M_PI / base[i];
    if (wavelen < 2048) {
      EXPECT_EQ(scaled[i], base[i]) << i;
      ++kept;
    } else if (wavelen > 8192) {
      EXPECT_FLOAT_EQ(scaled[i], base[i] / 32) << i;
      ++divided;
    } else {
      const double s = (8192 / wavelen - 1) / (4 - 1);
      EXPECT_FLOAT_EQ(scaled[i], static_cast<float>((1 - s) * base[i] / 32 + s * base[i])) << i;
      ++blended;
    }
  }
  EXPECT_GT(kept, 0);
  EXPECT_GT(divided, 0);
  EXPECT_GT(blended, 0);
  EXPECT_THROW(rope_inv_freq(plain, 63), Error);
}

TEST(LmLayers, RopeRotatesByGlobalPosition) {
  const int64_t N = 5, H = 3, d = 16;
  const std::vector<int64_t> pos = {0, 1, 7, 1000, 123457};  // any positions: a shard's tokens
  const std::vector<float> inv = rope_inv_freq(RopeConfig{}, d), x0 = normal(N * H * d, 7);
  std::vector<float> x = x0;
  rope_forward(N, H, d, H * d, x.data(), pos.data(), inv.data());
  std::vector<double> want(x.size());
  for (int64_t t = 0; t < N; ++t)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < d / 2; ++i) {
        const double a = static_cast<float>(pos[t]) * inv[i];  // fp32 product, as in Hugging Face
        const size_t k = static_cast<size_t>((t * H + h) * d + i), k2 = k + d / 2;
        want[k] = x0[k] * std::cos(a) - x0[k2] * std::sin(a);
        want[k2] = x0[k2] * std::cos(a) + x0[k] * std::sin(a);
      }
  EXPECT_LT(rel(x, want), 1e-6);
  rope_backward(N, H, d, H * d, x.data(), pos.data(), inv.data());  // the transpose of a rotation is its inverse
  EXPECT_LT(rel(x, std::vector<double>(x0.begin(), x0.end())), 1e-6);
}

TEST(LmLayers, RopeScoresDependOnlyOnRelativePosition) {
  const int64_t d = 64;
  const std::vector<float> inv = rope_inv_freq(RopeConfig{}, d);
  const std::vector<float> q0 = normal(d, 8), k0 = normal(d, 9);
  auto score = [&](int64_t m, int64_t n) {
    std::vector<float> q = q0, k = k0;
    rope_forward(1, 1, d, d, q.data(), &m, inv.data());
    rope_forward(1, 1, d, d, k.data(), &n, inv.data());
    double s = 0;
    for (int64_t i = 0; i < d; ++i) s += double(q[i]) * k[i];
    return s;
  };
  for (int64_t shift : {1, 37, 1000})
    for (auto [m, n] : {std::pair<int64_t, int64_t>{5, 3}, {40, 40}, {100, 7}})
      EXPECT_NEAR(score(m + shift, n + shift), score(m, n), 2e-3 * (1 + std::fabs(score(m, n))))
          << "m " << m << " n " << n << " shift " << shift;
}

TEST(LmLayers, ChunkedHeadCrossEntropyEqualsTheWholeSoftmax) {
  const int64_t N = 23, D = 16, V = 37;
  const std::vector<float> h = normal(N * D, 10), W = normal(V * D, 11);
  std::vector<int64_t> labels(N);
  for (int64_t i = 0; i < N; ++i) labels[i] = i % 5 == 4 ? -1 : (i * 7) % V;  // every 5th row has no target
  // Double reference: the whole [N, V] logits.
  double want_loss = 0;
  std::vector<double> want_dh(N * D, 0.0), want_dW(V * D, 0.0);
  for (int64_t i = 0; i < N; ++i) {
    if (labels[i] < 0) continue;
    std::vector<double> z(V);
    double mx = -1e300, sum = 0;
    for (int64_t v = 0; v < V; ++v) {
      for (int64_t e = 0; e < D; ++e) z[v] += double(h[i * D + e]) * W[v * D + e];
      mx = std::max(mx, z[v]);
    }
    for (int64_t v = 0; v < V; ++v) sum += std::exp(z[v] - mx);
    want_loss += mx + std::log(sum) - z[labels[i]];
    for (int64_t v = 0; v < V; ++v) {
      const double dz = (std::exp(z[v] - mx) / sum - (v == labels[i])) * 0.5;
      for (int64_t e = 0; e < D; ++e) want_dh[i * D + e] += dz * W[v * D + e], want_dW[v * D + e] += dz * h[i * D + e];
    }
  }
  for (int64_t chunk : {int64_t{1}, int64_t{7}, N, int64_t{1000}}) {
    std::vector<float> dh(N * D, 9.f), dW(V * D, 0.f);
    const double loss =
        lm_head_cross_entropy(N, D, V, h.data(), W.data(), labels.data(), 0.5f, dh.data(), dW.data(), chunk);
    EXPECT_NEAR(loss, want_loss, 1e-5 * want_loss) << "chunk " << chunk;
    EXPECT_LT(rel(dh, want_dh), 1e-5) << "chunk " << chunk;  // rows without a target: 0, not the 9 before
    EXPECT_LT(rel(dW, want_dW), 1e-5) << "chunk " << chunk;
  }

  // The vocabulary split in three uneven shards (the vocabulary-parallel head),
  // each on its own thread, the statistics combined through shared slots: every
  // shard returns the whole loss, the shards' dh sum to dL/dh, and each shard's
  // dW is its rows of the whole one.
  constexpr int S = 3;
  // 11, 12 and 14 rows: shapes of their own, since two threads must not run one
  // cached oneDNN primitive at once (its scratchpad is the primitive's)
  const int64_t first[S + 1] = {0, 11, 23, V};
  std::barrier sync(S);
  std::vector<double> slot[S];
  double loss[S];
  std::vector<float> dh[S], dW[S];
  std::vector<std::thread> shards;
  for (int r = 0; r < S; ++r)
    shards.emplace_back([&, r] {
      const int64_t Vl = first[r + 1] - first[r];
      VocabShard shard{first[r], V, [&, r](double* x, int64_t n, bool max) {
                         slot[r].assign(x, x + n);
                         sync.arrive_and_wait();
                         for (int o = 0; o < S; ++o)
                           if (o != r)
                             for (int64_t i = 0; i < n; ++i)
                               x[i] = max ? std::max(x[i], slot[o][i]) : x[i] + slot[o][i];
                         sync.arrive_and_wait();
                       }};
      dh[r].assign(N * D, 0.f), dW[r].assign(Vl * D, 0.f);
      loss[r] = lm_head_cross_entropy(N, D, Vl, h.data(), W.data() + first[r] * D, labels.data(), 0.5f, dh[r].data(),
                                      dW[r].data(), 7, shard);
    });
  for (std::thread& t : shards) t.join();
  std::vector<float> dh_sum(N * D, 0.f), dW_all;
  for (int r = 0; r < S; ++r) {
    EXPECT_NEAR(loss[r], want_loss, 1e-5 * want_loss) << "shard " << r;
    for (int64_t i = 0; i < N * D; ++i) dh_sum[i] += dh[r][i];
    dW_all.insert(dW_all.end(), dW[r].begin(), dW[r].end());
  }
  EXPECT_LT(rel(dh_sum, want_dh), 1e-5);
  EXPECT_LT(rel(dW_all, want_dW), 1e-5);

  labels[3] = V;
  EXPECT_THROW(lm_head_cross_entropy(N, D, V, h.data(), W.data(), labels.data(), 1.f, nullptr, nullptr), Error);
}

}  // namespace
}  // namespace ringattn::testing
