// The transformer of model.h and its token-local layers (layers.h) on one process.
//
// Layers: forward values against a double-precision reference; backward against
// the exact double formulas (GELU, linear) and against central finite differences
// of a scalar loss L = Σ w ∘ y along a random direction u (every layer input);
// the contract that weight gradients accumulate (+=) while activation gradients
// are overwritten.
//
// Model: the full hand-written backward (parameter gradient and the returned input
// gradient) against central finite differences of L = Σ w ∘ model(x), along one
// random direction over all parameters, over the input, and over each parameter
// tensor of each layer on its own (Model::layer_grads); tiny configs, MHA and GQA,
// causal and not, parameters perturbed by N(0, 0.1) so LayerNorm gains and all
// biases are non-trivial. Plus ModelConfig::validate, mse_loss, AdamW and
// train_step (loss decreases; two runs are bitwise identical).
//
// Finite differences in fp32: the loss (summed in double) is evaluated at
// p + k·eps·u, k in {±1, ±2}, with the fourth-order central stencil, and compared
// with the analytic change g·(p_k − p) along the perturbations actually stored
// (fp32-rounded). The deviation is measured relative to max(|g·u|, ‖g‖‖u‖/√n)
// (the typical size of g·u for a random u: a direction that happens to be nearly
// orthogonal to g must not fail on fp32 noise, while a wrong gradient shows as
// |error|/‖g‖). The smallest deviation over eps in {3e-2, 1e-2, 3e-3} (truncation
// error grows with eps, fp32 noise shrinks with it) must be <= 3e-4. Observed: at
// most 3.5e-5 over every check (model groups), <= 6e-6 for the layers; a 3% error
// in the cubic coefficient of GELU's derivative raises it to ~7e-4.
// (RINGATTN_TEST_VERBOSE=1 prints every value.)
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "ringattn/cpu/layers.h"
#include "ringattn/error.h"
#include "ringattn/model.h"
#include "ringattn/pipeline.h"
#include "ringattn/tensor.h"
#include "test_util.h"

namespace ringattn::testing {
namespace {

constexpr double kFdTol = 3e-4;              // finite differences (see the top of the file)
constexpr double kRefTol = 1e-5;             // fp32 kernels vs double reference, normalized max error
const double kFdEps[] = {3e-2, 1e-2, 3e-3};  // step sizes tried (the best one counts)

bool verbose() { return std::getenv("RINGATTN_TEST_VERBOSE") != nullptr; }

std::vector<float> randn(size_t n, uint32_t seed, float sigma = 1.f, float mean = 0.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(mean, sigma);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

double dot(const float* a, const float* b, size_t n) {
  double s = 0;
  for (size_t i = 0; i < n; ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}
double dot(const std::vector<float>& a, const std::vector<float>& b) { return dot(a.data(), b.data(), a.size()); }

std::vector<double> as_double(const float* p, size_t n) { return std::vector<double>(p, p + n); }
std::vector<double> as_double(const std::vector<float>& v) { return as_double(v.data(), v.size()); }

struct FdResult {
  double err = std::numeric_limits<double>::infinity();  // best relative deviation over eps
  double analytic = 0, fd = 0, eps = 0;
};

// Central differences of loss() when the n floats at p move by ±eps·u; compared
// with grad·(p₊ − p₋) (the stored, rounded perturbation). Restores p.
FdResult fd_check(float* p, const std::vector<float>& u, const std::vector<float>& grad,
                  const std::function<double()>& loss) {
  const size_t n = u.size();
  const std::vector<float> p0(p, p + n);
  std::vector<float> q(n);
  // The error is measured relative to max(|g·u|, ‖g‖‖u‖/√n): the typical size of
  // g·u for a random u, so that a direction that happens to be nearly orthogonal to
  // g (a tiny g·u drowned in fp32 noise) does not fail the check, while a wrong
  // gradient still shows as |error| / ‖g‖.
  const double typical = std::sqrt(dot(grad, grad) * dot(u, u) / static_cast<double>(n));
  FdResult best;
  // L at p0 + k·eps·u (fp32-rounded), and the stored perturbation's analytic change.
  auto at = [&](double step, double& an) {
    for (size_t i = 0; i < n; ++i) q[i] = p0[i] + static_cast<float>(step) * u[i];
    an = 0;
    for (size_t i = 0; i < n; ++i) an += static_cast<double>(grad[i]) * (static_cast<double>(q[i]) - p0[i]);
    std::copy(q.begin(), q.end(), p);
    const double l = loss();
    std::copy(p0.begin(), p0.end(), p);
    return l;
  };
  for (double eps : kFdEps) {
    // Fourth-order central stencil: (−L(2h) + 8L(h) − 8L(−h) + L(−2h)) / 12.
    double a2, a1, m1, m2;
    const double l2 = at(2 * eps, a2), l1 = at(eps, a1), lm1 = at(-eps, m1), lm2 = at(-2 * eps, m2);
    const double fd = (-l2 + 8 * l1 - 8 * lm1 + lm2) / 12;
    const double an = (-a2 + 8 * a1 - 8 * m1 + m2) / 12;
    const double err = std::abs(fd - an) / std::max({std::abs(an), eps * typical, 1e-30});
    if (err < best.err) best = {err, an / eps, fd / eps, eps};
  }
  return best;
}

#define EXPECT_FD(res, what)                                                                                           \
  do {                                                                                                                 \
    const FdResult fd_r_ = (res);                                                                                      \
    EXPECT_LE(fd_r_.err, kFdTol) << (what) << ": analytic " << fd_r_.analytic << " vs finite difference " << fd_r_.fd  \
                                 << " (eps " << fd_r_.eps << ")";                                                      \
    if (verbose()) std::printf("[fd] %-40s rel err %.3g (eps %g)\n", std::string(what).c_str(), fd_r_.err, fd_r_.eps); \
  } while (0)

// ---- double references ---------------------------------------------------------------

double gelu_ref(double x) {
  const double c = std::sqrt(2.0 / M_PI);
  return 0.5 * x * (1.0 + std::tanh(c * (x + 0.044715 * x * x * x)));
}
double gelu_grad_ref(double x) {
  const double c = std::sqrt(2.0 / M_PI);
  const double t = std::tanh(c * (x + 0.044715 * x * x * x));
  return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x);
}

// =========================================================================================
// LayerNorm

struct LnCase {
  int64_t N = 7, C = 24;
  std::vector<float> x, g, b, w;
  LnCase() {
    x = randn(N * C, 11, 2.f, 0.5f);
    g = randn(C, 12, 0.3f, 1.f);
    b = randn(C, 13, 0.3f);
    w = randn(N * C, 14);
  }
  std::vector<float> forward() const {
    std::vector<float> y(N * C), mean(N), rstd(N);
    layernorm_forward(N, C, x.data(), g.data(), b.data(), y.data(), mean.data(), rstd.data());
    return y;
  }
  double loss() const { return dot(forward(), w); }
};

TEST(Layers, LayerNormForwardMatchesDouble) {
  LnCase c;
  std::vector<float> y(c.N * c.C), mean(c.N), rstd(c.N);
  layernorm_forward(c.N, c.C, c.x.data(), c.g.data(), c.b.data(), y.data(), mean.data(), rstd.data());
  std::vector<double> ry(c.N * c.C), rmean(c.N), rrstd(c.N);
  for (int64_t i = 0; i < c.N; ++i) {
    double m = 0, v = 0;
    for (int64_t j = 0; j < c.C; ++j) m += c.x[i * c.C + j];
    m /= c.C;
    for (int64_t j = 0; j < c.C; ++j) v += (c.x[i * c.C + j] - m) * (c.x[i * c.C + j] - m);
    const double r = 1.0 / std::sqrt(v / c.C + 1e-5);
    rmean[i] = m, rrstd[i] = r;
    for (int64_t j = 0; j < c.C; ++j) ry[i * c.C + j] = (c.x[i * c.C + j] - m) * r * c.g[j] + c.b[j];
  }
  EXPECT_LE(compare(as_double(y), ry).err, kRefTol) << compare(as_double(y), ry);
  EXPECT_LE(compare(as_double(mean), rmean).err, kRefTol) << compare(as_double(mean), rmean);
  EXPECT_LE(compare(as_double(rstd), rrstd).err, kRefTol) << compare(as_double(rstd), rrstd);
}

TEST(Layers, LayerNormBackwardMatchesFiniteDifferences) {
  LnCase c;
  std::vector<float> y(c.N * c.C), mean(c.N), rstd(c.N), dx(c.N * c.C), dg(c.C, 0.f), db(c.C, 0.f);
  layernorm_forward(c.N, c.C, c.x.data(), c.g.data(), c.b.data(), y.data(), mean.data(), rstd.data());
  layernorm_backward(c.N, c.C, c.x.data(), c.g.data(), mean.data(), rstd.data(), c.w.data(), dx.data(), dg.data(),
                     db.data());
  auto loss = [&] { return c.loss(); };
  EXPECT_FD(fd_check(c.x.data(), randn(c.x.size(), 21), dx, loss), "layernorm dx");
  EXPECT_FD(fd_check(c.g.data(), randn(c.g.size(), 22), dg, loss), "layernorm dgamma");
  EXPECT_FD(fd_check(c.b.data(), randn(c.b.size(), 23), db, loss), "layernorm dbeta");
}

TEST(Layers, LayerNormBackwardAccumulatesParamGradsAndOverwritesDx) {
  LnCase c;
  std::vector<float> y(c.N * c.C), mean(c.N), rstd(c.N);
  layernorm_forward(c.N, c.C, c.x.data(), c.g.data(), c.b.data(), y.data(), mean.data(), rstd.data());
  std::vector<float> dx0(c.N * c.C), dg0(c.C, 0.f), db0(c.C, 0.f);
  layernorm_backward(c.N, c.C, c.x.data(), c.g.data(), mean.data(), rstd.data(), c.w.data(), dx0.data(), dg0.data(),
                     db0.data());
  const std::vector<float> pre_g = randn(c.C, 31), pre_b = randn(c.C, 32);
  std::vector<float> dx(c.N * c.C, quiet_nan()), dg = pre_g, db = pre_b;
  layernorm_backward(c.N, c.C, c.x.data(), c.g.data(), mean.data(), rstd.data(), c.w.data(), dx.data(), dg.data(),
                     db.data());
  EXPECT_EQ(dx, dx0) << "dx must be overwritten";
  for (int64_t j = 0; j < c.C; ++j) {
    EXPECT_NEAR(dg[j], pre_g[j] + dg0[j], 1e-6 * (1 + std::abs(dg0[j]))) << "dgamma must accumulate, j=" << j;
    EXPECT_NEAR(db[j], pre_b[j] + db0[j], 1e-6 * (1 + std::abs(db0[j]))) << "dbeta must accumulate, j=" << j;
  }
}

// =========================================================================================
// GELU

TEST(Layers, GeluForwardBackwardMatchDouble) {
  std::vector<float> x = randn(200, 41, 2.5f);
  x.insert(x.end(), {0.f, -0.f, 1e-6f, -1e-6f, 8.f, -8.f, 30.f, -30.f});
  const int64_t n = static_cast<int64_t>(x.size());
  const std::vector<float> dy = randn(x.size(), 42);
  std::vector<float> y(n), dx(n);
  gelu_forward(n, x.data(), y.data());
  gelu_backward(n, x.data(), dy.data(), dx.data());
  std::vector<double> ry(n), rdx(n);
  for (int64_t i = 0; i < n; ++i) ry[i] = gelu_ref(x[i]), rdx[i] = dy[i] * gelu_grad_ref(x[i]);
  EXPECT_LE(compare(as_double(y), ry).err, kRefTol) << compare(as_double(y), ry);
  EXPECT_LE(compare(as_double(dx), rdx).err, kRefTol) << compare(as_double(dx), rdx);
  EXPECT_EQ(y[n - 8], 0.f);
  EXPECT_FLOAT_EQ(y[n - 2], 30.f);  // x for large x
  EXPECT_EQ(y[n - 1], -0.f);        // 0 for very negative x (no NaN from tanh)
  EXPECT_TRUE(all_finite(TensorView(y.data(), DType::f32, {n})));
  EXPECT_TRUE(all_finite(TensorView(dx.data(), DType::f32, {n})));
}

TEST(Layers, GeluBackwardMatchesFiniteDifferences) {
  std::vector<float> x = randn(64, 43, 1.5f);
  const std::vector<float> w = randn(64, 44);
  std::vector<float> dx(64);
  gelu_backward(64, x.data(), w.data(), dx.data());
  auto loss = [&] {
    std::vector<float> y(64);
    gelu_forward(64, x.data(), y.data());
    return dot(y, w);
  };
  EXPECT_FD(fd_check(x.data(), randn(64, 45), dx, loss), "gelu dx");
}

// =========================================================================================
// Linear

struct LinCase {
  int64_t N = 6, Cin = 10, Cout = 7;
  std::vector<float> x, W, b, w;
  LinCase() {
    x = randn(N * Cin, 51);
    W = randn(Cin * Cout, 52, 0.5f);
    b = randn(Cout, 53);
    w = randn(N * Cout, 54);
  }
  std::vector<float> forward(bool bias = true) const {
    std::vector<float> y(N * Cout, quiet_nan());
    linear_forward(N, Cin, Cout, x.data(), W.data(), bias ? b.data() : nullptr, y.data());
    return y;
  }
};

TEST(Layers, LinearForwardMatchesDouble) {
  LinCase c;
  for (bool bias : {true, false}) {
    const std::vector<float> y = c.forward(bias);
    std::vector<double> ref(c.N * c.Cout);
    for (int64_t i = 0; i < c.N; ++i)
      for (int64_t o = 0; o < c.Cout; ++o) {
        double s = bias ? c.b[o] : 0.0;
        for (int64_t k = 0; k < c.Cin; ++k) s += static_cast<double>(c.x[i * c.Cin + k]) * c.W[k * c.Cout + o];
        ref[i * c.Cout + o] = s;
      }
    EXPECT_LE(compare(as_double(y), ref).err, kRefTol)
        << (bias ? "with bias: " : "no bias: ") << compare(as_double(y), ref);
  }
}

TEST(Layers, LinearBackwardMatchesDoubleAndAccumulates) {
  LinCase c;
  std::vector<double> rdx(c.N * c.Cin, 0.0), rdW(c.Cin * c.Cout, 0.0), rdb(c.Cout, 0.0);
  for (int64_t i = 0; i < c.N; ++i)
    for (int64_t o = 0; o < c.Cout; ++o) {
      const double g = c.w[i * c.Cout + o];
      rdb[o] += g;
      for (int64_t k = 0; k < c.Cin; ++k) {
        rdx[i * c.Cin + k] += g * c.W[k * c.Cout + o];
        rdW[k * c.Cout + o] += static_cast<double>(c.x[i * c.Cin + k]) * g;
      }
    }
  // dW, db start from non-zero values (+=); dx starts as NaN (overwritten, beta = 0).
  const std::vector<float> pre_W = randn(c.Cin * c.Cout, 55), pre_b = randn(c.Cout, 56);
  std::vector<float> dx(c.N * c.Cin, quiet_nan()), dW = pre_W, db = pre_b;
  linear_backward(c.N, c.Cin, c.Cout, c.x.data(), c.W.data(), c.w.data(), dx.data(), dW.data(), db.data());
  std::vector<double> exp_dW(rdW), exp_db(rdb);
  for (size_t i = 0; i < exp_dW.size(); ++i) exp_dW[i] += pre_W[i];
  for (size_t i = 0; i < exp_db.size(); ++i) exp_db[i] += pre_b[i];
  EXPECT_LE(compare(as_double(dx), rdx).err, kRefTol) << "dx: " << compare(as_double(dx), rdx);
  EXPECT_LE(compare(as_double(dW), exp_dW).err, kRefTol) << "dW (+=): " << compare(as_double(dW), exp_dW);
  EXPECT_LE(compare(as_double(db), exp_db).err, kRefTol) << "db (+=): " << compare(as_double(db), exp_db);

  // dx = nullptr skips dx; db = nullptr skips db; dW still accumulates.
  std::vector<float> dW2(c.Cin * c.Cout, 0.f);
  linear_backward(c.N, c.Cin, c.Cout, c.x.data(), c.W.data(), c.w.data(), nullptr, dW2.data(), nullptr);
  EXPECT_LE(compare(as_double(dW2), rdW).err, kRefTol) << "dW without dx, db: " << compare(as_double(dW2), rdW);
}

TEST(Layers, LinearBackwardMatchesFiniteDifferences) {
  LinCase c;
  std::vector<float> dx(c.N * c.Cin), dW(c.Cin * c.Cout, 0.f), db(c.Cout, 0.f);
  linear_backward(c.N, c.Cin, c.Cout, c.x.data(), c.W.data(), c.w.data(), dx.data(), dW.data(), db.data());
  auto loss = [&] { return dot(c.forward(), c.w); };
  EXPECT_FD(fd_check(c.x.data(), randn(c.x.size(), 61), dx, loss), "linear dx");
  EXPECT_FD(fd_check(c.W.data(), randn(c.W.size(), 62), dW, loss), "linear dW");
  EXPECT_FD(fd_check(c.b.data(), randn(c.b.size(), 63), db, loss), "linear db");
}

// =========================================================================================
// Model

struct ModelCase {
  int64_t kv = 4;
  bool causal = true;
  bool llama = false;  // RMSNorm, SwiGLU, RoPE, q/k/v biases only (qwen2's layers)
};
std::ostream& operator<<(std::ostream& os, const ModelCase& c) {
  return os << "kv" << c.kv << (c.causal ? "_causal" : "_full") << (c.llama ? "_llama" : "");
}

ModelConfig tiny_config(const ModelCase& c) {
  ModelConfig cfg;
  cfg.layers = 2, cfg.d_model = 16, cfg.heads = 4, cfg.kv_heads = c.kv, cfg.mlp_hidden = 32, cfg.causal = c.causal;
  cfg.seed = 7;
  if (c.llama) {
    cfg.norm = Norm::rmsnorm, cfg.mlp = Mlp::swiglu, cfg.rope = true, cfg.o_bias = cfg.mlp_bias = false;
    cfg.rope_config.theta = 100;  // angles that turn visibly over 9 positions
  }
  return cfg;
}

// Adds N(0, sigma²) to every parameter (so LN gains/biases and all biases are non-trivial).
void perturb(Model& m, uint32_t seed, float sigma = 0.1f) {
  const std::vector<float> n = randn(static_cast<size_t>(m.num_params()), seed, sigma);
  for (int64_t i = 0; i < m.num_params(); ++i) m.params()[i] += n[i];
}

ModelParallel one_process() {
  ModelParallel sp;
  sp.attn.threads = 1;
  return sp;
}

// Names, sizes and pointers of one layer's tensors, in LayerParams order (size
// 0: the architecture has not that tensor).
struct Group {
  const char* name;
  int64_t size;
};
std::vector<Group> groups(const ModelConfig& c) {
  const int64_t D = c.d_model, C = c.qkv_width(), A = c.heads * c.head_dim(), F = c.hidden();
  const int64_t Fin = c.mlp == Mlp::swiglu ? 2 * F : F, nb = c.norm == Norm::layernorm ? D : 0;
  return {{"ln1_g", D},      {"ln1_b", nb},
          {"w_qkv", D * C},  {"b_qkv", c.qkv_bias ? C : 0},
          {"w_o", A * D},    {"b_o", c.o_bias ? D : 0},
          {"ln2_g", D},      {"ln2_b", nb},
          {"w_in", D * Fin}, {"b_in", c.mlp_bias ? Fin : 0},
          {"w_out", F * D},  {"b_out", c.mlp_bias ? D : 0}};
}
std::vector<float*> pointers(const LayerParams& p) {
  return {p.ln1_g, p.ln1_b, p.w_qkv, p.b_qkv, p.w_o, p.b_o, p.ln2_g, p.ln2_b, p.w_in, p.b_in, p.w_out, p.b_out};
}

class ModelGrad : public ::testing::TestWithParam<ModelCase> {};

TEST_P(ModelGrad, BackwardMatchesFiniteDifferences) {
  const ModelConfig cfg = tiny_config(GetParam());
  const int64_t B = 2, L = 9, D = cfg.d_model;
  Model m(cfg);
  perturb(m, 71);
  std::vector<float> x = randn(B * L * D, 72), w = randn(B * L * D, 73);
  const ModelParallel sp = one_process();
  TensorView xv(x.data(), DType::f32, {B, L, D}), wv(w.data(), DType::f32, {B, L, D});

  auto loss = [&] {
    Activations act;
    DeviceTensor y = model_forward(m, xv, sp, act);
    return dot(y.ptr<float>(), w.data(), w.size());
  };
  Activations act;
  DeviceTensor y = model_forward(m, xv, sp, act);
  ASSERT_TRUE(all_finite(y));
  m.zero_grads();
  DeviceTensor dx = model_backward(m, act, wv, sp);
  ASSERT_EQ(dx.dim(0), B);
  ASSERT_EQ(dx.dim(1), L);
  ASSERT_EQ(dx.dim(2), D);
  const std::vector<float> grads(m.grads(), m.grads() + m.num_params());
  const std::vector<float> gx(dx.ptr<float>(), dx.ptr<float>() + dx.numel());

  EXPECT_FD(fd_check(m.params(), randn(grads.size(), 74), grads, loss), cat(GetParam(), " all parameters"));
  EXPECT_FD(fd_check(x.data(), randn(x.size(), 75), gx, loss), cat(GetParam(), " input (model_backward's return)"));

  // Each parameter tensor of each layer on its own.
  uint32_t seed = 100;
  for (int l = 0; l < cfg.layers; ++l) {
    const std::vector<float*> P = pointers(m.layer(l)), G = pointers(m.layer_grads(l));
    const std::vector<Group> gs = groups(cfg);
    for (size_t k = 0; k < gs.size(); ++k) {
      ASSERT_EQ(P[k] == nullptr, gs[k].size == 0) << gs[k].name;
      if (gs[k].size == 0) continue;
      const std::vector<float> g(G[k], G[k] + gs[k].size);
      EXPECT_FD(fd_check(P[k], randn(gs[k].size, ++seed), g, loss), cat(GetParam(), " layer ", l, " ", gs[k].name));
    }
  }
}

TEST_P(ModelGrad, BackwardAccumulatesIntoGrads) {
  const ModelConfig cfg = tiny_config(GetParam());
  const int64_t B = 2, L = 9, D = cfg.d_model;
  Model m(cfg);
  perturb(m, 81);
  std::vector<float> x = randn(B * L * D, 82), w = randn(B * L * D, 83);
  const ModelParallel sp = one_process();
  TensorView xv(x.data(), DType::f32, {B, L, D}), wv(w.data(), DType::f32, {B, L, D});
  Activations act;
  model_forward(m, xv, sp, act);
  m.zero_grads();
  DeviceTensor dx1 = model_backward(m, act, wv, sp);
  const std::vector<float> g1(m.grads(), m.grads() + m.num_params());
  DeviceTensor dx2 = model_backward(m, act, wv, sp);
  EXPECT_TRUE(bitwise_equal(dx1, dx2)) << "the input gradient is returned, not accumulated";
  std::vector<double> twice(g1.size());
  for (size_t i = 0; i < g1.size(); ++i) twice[i] = 2.0 * g1[i];
  const ErrReport r = compare(as_double(m.grads(), g1.size()), twice);
  EXPECT_LE(r.err, 1e-6) << "a second backward adds to m.grads(): " << r;
  m.zero_grads();
  for (int64_t i = 0; i < m.num_params(); ++i) ASSERT_EQ(m.grads()[i], 0.f) << "zero_grads";
}

// Softmax over keys is invariant to adding q·b_k to every score of a row, so the
// key bias has zero gradient in exact arithmetic: only fp32 noise may remain (the
// reason AdamW's first step is ill-conditioned there; see test_model_sp.cpp).
TEST_P(ModelGrad, KeyBiasGradientVanishes) {
  const ModelConfig cfg = tiny_config(GetParam());
  if (cfg.rope) GTEST_SKIP() << "RoPE turns the key bias by the key's position: the scores' shift is not uniform";
  const int64_t B = 2, L = 9, D = cfg.d_model, dh = cfg.head_dim();
  Model m(cfg);
  perturb(m, 85);
  std::vector<float> x = randn(B * L * D, 86), w = randn(B * L * D, 87);
  const ModelParallel sp = one_process();
  Activations act;
  model_forward(m, TensorView(x.data(), DType::f32, {B, L, D}), sp, act);
  m.zero_grads();
  model_backward(m, act, TensorView(w.data(), DType::f32, {B, L, D}), sp);
  for (int l = 0; l < cfg.layers; ++l) {
    const float* g = m.layer_grads(l).b_qkv;
    double q = 0, k = 0, v = 0;
    for (int64_t i = 0; i < cfg.heads * dh; ++i) q = std::max(q, std::abs(static_cast<double>(g[i])));
    for (int64_t i = 0; i < cfg.kv() * dh; ++i) {
      k = std::max(k, std::abs(static_cast<double>(g[cfg.heads * dh + i])));
      v = std::max(v, std::abs(static_cast<double>(g[(cfg.heads + cfg.kv()) * dh + i])));
    }
    if (verbose()) std::printf("[b_qkv grad] layer %d: max |q| %.3g  |k| %.3g  |v| %.3g\n", l, q, k, v);
    EXPECT_LE(k, 1e-5 * std::max(q, v)) << "layer " << l << ": the key bias gradient should vanish";
    EXPECT_GT(q, 0);
    EXPECT_GT(v, 0);
  }
}

INSTANTIATE_TEST_SUITE_P(Tiny, ModelGrad,
                         ::testing::Values(ModelCase{4, true}, ModelCase{4, false}, ModelCase{2, true},
                                           ModelCase{2, false}, ModelCase{4, true, true}, ModelCase{2, false, true}),
                         [](const ::testing::TestParamInfo<ModelCase>& i) { return cat(i.param); });

TEST(Model, CausalOutputIgnoresLaterTokens) {
  ModelConfig cfg = tiny_config({2, true});
  const int64_t B = 1, L = 9, D = cfg.d_model;
  Model m(cfg);
  perturb(m, 91);
  std::vector<float> x = randn(B * L * D, 92);
  Activations act;
  DeviceTensor y1 = model_forward(m, TensorView(x.data(), DType::f32, {B, L, D}), one_process(), act);
  for (int64_t i = 5 * D; i < L * D; ++i) x[i] += 1.f;  // change tokens 5..8
  DeviceTensor y2 = model_forward(m, TensorView(x.data(), DType::f32, {B, L, D}), one_process(), act);
  EXPECT_TRUE(bitwise_equal(y1.view().slice(1, 0, 5), y2.view().slice(1, 0, 5)));
  EXPECT_FALSE(bitwise_equal(y1.view().slice(1, 5, 4), y2.view().slice(1, 5, 4)));
}

TEST(Model, InitIsDeterministicAndFollowsTheRecipe) {
  ModelConfig cfg = tiny_config({2, true});
  Model a(cfg), b(cfg);
  ASSERT_EQ(a.num_params(), b.num_params());
  const int64_t D = 16, C = (4 + 2 * 2) * 4, F = 32;
  EXPECT_EQ(a.num_params(), 2 * (4 * D + D * C + C + D * D + D + D * F + F + F * D + D));
  EXPECT_TRUE(std::equal(a.params(), a.params() + a.num_params(), b.params()));
  for (int l = 0; l < 2; ++l) {
    const LayerParams p = a.layer(l);
    for (int64_t i = 0; i < D; ++i) {
      EXPECT_EQ(p.ln1_g[i], 1.f);
      EXPECT_EQ(p.ln2_g[i], 1.f);
      EXPECT_EQ(p.ln1_b[i], 0.f);
      EXPECT_EQ(p.b_out[i], 0.f);
    }
  }
  cfg.seed = 8;
  Model c(cfg);
  EXPECT_FALSE(std::equal(a.params(), a.params() + a.num_params(), c.params()));
}

// =========================================================================================
// Config validation

void expect_config_error(const ModelConfig& cfg, std::initializer_list<const char*> needles, const std::string& what) {
  try {
    cfg.validate();
    ADD_FAILURE() << what << ": validate() accepted it";
  } catch (const Error& e) {
    EXPECT_TRUE(contains_any(e.what(), needles)) << what << ": unhelpful message: " << e.what();
  }
  EXPECT_THROW(Model{cfg}, Error) << what << ": the Model constructor must validate";
}

TEST(ModelConfig, Validate) {
  ModelConfig ok = tiny_config({2, true});
  EXPECT_NO_THROW(ok.validate());
  ModelConfig c = ok;
  c.d_model = 18;  // not divisible by 4 heads
  expect_config_error(c, {"d_model", "divisible"}, "d_model % heads != 0");
  c = ok;
  c.kv_heads = 3;  // 4 heads not a multiple of 3
  expect_config_error(c, {"kv_heads", "multiple"}, "heads % kv_heads != 0");
  c = ok;
  c.heads = 2, c.kv_heads = 4;  // more kv heads than heads
  expect_config_error(c, {"kv_heads", "multiple"}, "kv_heads > heads");
  c = ok;
  c.layers = 0;
  expect_config_error(c, {"layers"}, "layers = 0");
  c = ok;
  c.heads = 0;
  expect_config_error(c, {"heads"}, "heads = 0");
  // Defaults: kv_heads 0 means heads, mlp_hidden 0 means 4·d_model.
  c = ok;
  c.kv_heads = 0, c.mlp_hidden = 0;
  EXPECT_NO_THROW(c.validate());
  EXPECT_EQ(c.kv(), 4);
  EXPECT_EQ(c.hidden(), 64);
}

// =========================================================================================
// Loss, optimizer, training step

TEST(Model, MseLossMatchesDouble) {
  const int64_t n = 30;
  std::vector<float> y = randn(n, 101), t = randn(n, 102), dy(n, quiet_nan());
  TensorView yv(y.data(), DType::f32, {2, 3, 5}), tv(t.data(), DType::f32, {2, 3, 5}),
      dv(dy.data(), DType::f32, {2, 3, 5});
  // global_count larger than the local count: a shard of a bigger (global) batch.
  const int64_t global = 4 * n;
  const double loss = mse_loss(yv, tv, dv, nullptr, global);
  double ref = 0;
  std::vector<double> rdy(n);
  for (int64_t i = 0; i < n; ++i) {
    const double e = static_cast<double>(y[i]) - t[i];
    ref += e * e;
    rdy[i] = 2 * e / global;
  }
  ref /= global;
  EXPECT_NEAR(loss, ref, 1e-6 * ref);  // the kernel forms y − t in fp32
  EXPECT_LE(compare(as_double(dy), rdy).err, 1e-6) << compare(as_double(dy), rdy);
  Tensor wrong(DType::f32, {2, 3, 4});
  EXPECT_THROW(mse_loss(yv, wrong, dv, nullptr, global), Error);
}

TEST(Model, AdamWMatchesTheFormula) {
  ModelConfig cfg = tiny_config({2, true});
  cfg.layers = 1;
  Model m(cfg);
  perturb(m, 111);
  const int64_t n = m.num_params();
  AdamW opt;
  opt.lr = 1e-2f, opt.weight_decay = 0.1f;
  std::vector<double> w(m.params(), m.params() + n), mo(n, 0.0), vo(n, 0.0);
  for (int step = 1; step <= 3; ++step) {
    const std::vector<float> g = randn(n, 112 + step, 0.01f);
    std::copy(g.begin(), g.end(), m.grads());
    opt.update(m);
    EXPECT_EQ(opt.step, step);
    const double c1 = 1 - std::pow(0.9, step), c2 = 1 - std::pow(0.999, step);
    for (int64_t i = 0; i < n; ++i) {
      mo[i] = 0.9 * mo[i] + 0.1 * g[i];
      vo[i] = 0.999 * vo[i] + 0.001 * g[i] * static_cast<double>(g[i]);
      w[i] -= 1e-2 * ((mo[i] / c1) / (std::sqrt(vo[i] / c2) + 1e-8) + 0.1 * w[i]);
    }
    const ErrReport r = compare(as_double(m.params(), n), w);
    EXPECT_LE(r.err, 1e-6) << "step " << step << ": " << r;
  }
}

// Fixed random input and target; returns the losses of `steps` AdamW steps.
std::vector<double> train(Model& m, int steps) {
  const ModelConfig& cfg = m.config();
  const int64_t B = 2, L = 9, D = cfg.d_model;
  std::vector<float> x = randn(B * L * D, 121), t = randn(B * L * D, 122);
  TensorView xv(x.data(), DType::f32, {B, L, D}), tv(t.data(), DType::f32, {B, L, D});
  AdamW opt;
  opt.lr = 1e-2f;
  std::vector<double> losses;
  for (int s = 0; s < steps; ++s) losses.push_back(train_step(m, opt, xv, tv, one_process(), B * L * D, nullptr));
  return losses;
}

TEST(Model, TrainStepReducesTheLossAndRepeatsBitwise) {
  const ModelConfig cfg = tiny_config({2, true});
  Model a(cfg), b(cfg);
  const std::vector<double> la = train(a, 20), lb = train(b, 20);
  if (verbose()) std::printf("[train] loss %.5g -> %.5g over 20 steps\n", la.front(), la.back());
  for (double l : la) ASSERT_TRUE(std::isfinite(l));
  EXPECT_LT(la.back(), 0.7 * la.front()) << "loss " << la.front() << " -> " << la.back();
  int increases = 0;
  for (size_t i = 1; i < la.size(); ++i) increases += la[i] > la[i - 1];
  EXPECT_LE(increases, 2) << "the loss should fall nearly every step";
  EXPECT_EQ(la, lb) << "two identical runs must give the same losses";
  EXPECT_TRUE(std::equal(a.params(), a.params() + a.num_params(), b.params(), [](float p, float q) {
    return std::memcmp(&p, &q, sizeof p) == 0;
  })) << "two identical runs must give bitwise identical parameters";
}

// bf16 mixed precision: GEMM operands and attention inputs rounded to bf16, fp32
// accumulation and master weights. Stays near the fp32 model, trains, and its bf16
// working copy of the weights follows every parameter update.
TEST(ModelBf16, StaysNearFp32AndTrains) {
  ModelConfig cfg = tiny_config({2, true});
  cfg.d_model = 64, cfg.mlp_hidden = 128;
  const int64_t B = 2, L = 33, D = cfg.d_model;
  Model m32(cfg);
  cfg.dtype = DType::bf16;
  Model m16(cfg);
  perturb(m32, 131), perturb(m16, 131);
  std::vector<float> x = randn(B * L * D, 132);
  Activations a32, a16;
  const TensorView xv(x.data(), DType::f32, {B, L, D});
  const DeviceTensor y32 = model_forward(m32, xv, one_process(), a32), y16 = model_forward(m16, xv, one_process(), a16);
  double den = 0;
  for (int64_t i = 0; i < y32.numel(); ++i) den = std::max(den, std::fabs(static_cast<double>(y32.ptr<float>()[i])));
  const double err = max_abs_diff(y16, y32) / den;
  if (verbose()) std::printf("[bf16] forward vs fp32: %.3g\n", err);
  EXPECT_GT(err, 0.0) << "bf16 should round something";
  EXPECT_LE(err, 2e-2);
  Model t16(cfg);
  const std::vector<double> losses = train(t16, 20);
  EXPECT_LT(losses.back(), 0.7 * losses.front()) << "bf16 loss " << losses.front() << " -> " << losses.back();
}

TEST(ModelBf16, WorkingCopyFollowsParameterUpdates) {
  ModelConfig cfg = tiny_config({2, true});
  cfg.dtype = DType::bf16;
  const int64_t B = 1, L = 8, D = cfg.d_model;
  std::vector<float> x = randn(B * L * D, 141);
  const TensorView xv(x.data(), DType::f32, {B, L, D});
  Model a(cfg), b(cfg);
  Activations act;
  model_forward(a, xv, one_process(), act);  // rounds a's working copy
  perturb(a, 142), perturb(b, 142);          // then both change the same way
  const DeviceTensor ya = model_forward(a, xv, one_process(), act), yb = model_forward(b, xv, one_process(), act);
  EXPECT_TRUE(bitwise_equal(ya, yb)) << "a stale bf16 copy of the weights was used after the parameters changed";
}

}  // namespace
}  // namespace ringattn::testing
