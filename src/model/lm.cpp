// LanguageModel: a checkpoint's weights checked against its architecture, and the
// one-process forward to logits (design.md §11 for RMSNorm, RoPE, SwiGLU).
#include "ringattn/lm.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <utility>

#include "ringattn/atomic_file.h"
#include "ringattn/cpu/attention.h"
#include "ringattn/cpu/gemm.h"
#include "ringattn/cpu/layers.h"
#include "ringattn/error.h"
#include "ringattn/inference.h"
#include "ringattn/layout.h"
#include "ringattn/parallel.h"
#include "ringattn/pipeline.h"
#include "ringattn/safetensors.h"

namespace ringattn {
namespace {

using Shapes = std::vector<std::pair<std::string, std::vector<int64_t>>>;

std::string shape_text(const std::vector<int64_t>& s) {
  std::string t = "[";
  for (size_t i = 0; i < s.size(); ++i) t += cat(i ? ", " : "", s[i]);
  return t + "]";
}

// y[N, out] = x[N, in] · Wᵀ + b for an nn.Linear weight W [out, in] (b may be null).
void linear_t(int64_t N, int64_t in, int64_t out, const float* x, const Tensor& W, const float* b, float* y) {
  gemm(false, true, N, out, in, 1.f, x, in, W.ptr<float>(), in, 0.f, y, out);
  if (b)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t o = 0; o < out; ++o) y[i * out + o] += b[o];
}

}  // namespace

Shapes lm_tensor_shapes(const LmConfig& c) {
  Shapes s;
  const int64_t D = c.d_model, F = c.mlp_hidden, V = c.vocab, A = c.heads * c.head_dim, K = c.kv_heads * c.head_dim;
  if (c.arch == Arch::gpt2) {
    s.push_back({"transformer.wte.weight", {V, D}});
    s.push_back({"transformer.wpe.weight", {c.max_positions, D}});
    for (int64_t l = 0; l < c.layers; ++l) {
      const std::string p = cat("transformer.h.", l, ".");
      s.push_back({p + "ln_1.weight", {D}}), s.push_back({p + "ln_1.bias", {D}});
      s.push_back({p + "attn.c_attn.weight", {D, 3 * D}}), s.push_back({p + "attn.c_attn.bias", {3 * D}});
      s.push_back({p + "attn.c_proj.weight", {D, D}}), s.push_back({p + "attn.c_proj.bias", {D}});
      s.push_back({p + "ln_2.weight", {D}}), s.push_back({p + "ln_2.bias", {D}});
      s.push_back({p + "mlp.c_fc.weight", {D, F}}), s.push_back({p + "mlp.c_fc.bias", {F}});
      s.push_back({p + "mlp.c_proj.weight", {F, D}}), s.push_back({p + "mlp.c_proj.bias", {D}});
    }
    s.push_back({"transformer.ln_f.weight", {D}}), s.push_back({"transformer.ln_f.bias", {D}});
  } else {
    s.push_back({"model.embed_tokens.weight", {V, D}});
    for (int64_t l = 0; l < c.layers; ++l) {
      const std::string p = cat("model.layers.", l, ".");
      s.push_back({p + "input_layernorm.weight", {D}});
      for (const auto& [n, rows] : {std::pair<const char*, int64_t>{"q_proj", A}, {"k_proj", K}, {"v_proj", K}}) {
        s.push_back({p + "self_attn." + n + ".weight", {rows, D}});
        if (c.qkv_bias) s.push_back({p + "self_attn." + n + ".bias", {rows}});
      }
      s.push_back({p + "self_attn.o_proj.weight", {D, A}});
      if (c.o_bias) s.push_back({p + "self_attn.o_proj.bias", {D}});
      s.push_back({p + "post_attention_layernorm.weight", {D}});
      s.push_back({p + "mlp.gate_proj.weight", {F, D}}), s.push_back({p + "mlp.up_proj.weight", {F, D}});
      s.push_back({p + "mlp.down_proj.weight", {D, F}});
      if (c.mlp_bias)
        s.push_back({p + "mlp.gate_proj.bias", {F}}), s.push_back({p + "mlp.up_proj.bias", {F}}),
            s.push_back({p + "mlp.down_proj.bias", {D}});
    }
    s.push_back({"model.norm.weight", {D}});
  }
  if (!c.tie_embeddings) s.push_back({"lm_head.weight", {V, D}});
  return s;
}

namespace {

// A checkpoint's tensor (memory-mapped, in its stored dtype), checked against
// the shape config.json implies.
TensorView checkpoint_tensor(const Checkpoint& ck, const std::string& dir, const LmConfig& c, const std::string& name) {
  std::vector<int64_t> shape;
  for (const auto& [n, s] : lm_tensor_shapes(c))
    if (n == name) shape = s;
  check(ck.contains(name), dir, ": the ", arch_name(c.arch), " checkpoint has no tensor '", name, "' ",
        shape_text(shape));
  const SafetensorsEntry& e = ck.entry(name);
  check(e.shape == shape, dir, ": tensor '", name, "' is ", shape_text(e.shape), ", config.json implies ",
        shape_text(shape));
  return ck.view(name);
}

}  // namespace

LanguageModel LanguageModel::load(const std::string& dir) {
  LanguageModel m;
  m.config = load_lm_config(dir);
  const Checkpoint ck(dir);
  for (const auto& [name, shape] : lm_tensor_shapes(m.config)) {
    const TensorView v = checkpoint_tensor(ck, dir, m.config, name);
    Tensor t(DType::f32, v.rank, v.shape.data());
    copy_into(t, v);
    m.weights.emplace(name, std::move(t));
  }
  return m;
}

const Tensor& LanguageModel::weight(const std::string& name) const {
  const auto it = weights.find(name);
  check(it != weights.end(), "the model has no weight '", name, "'");
  return it->second;
}

namespace {

// What the forward keeps for the backward (one layer).
struct LayerActs {
  std::vector<float> x, a1, mean1, rstd1, q, k, v, o, lse, xmid, a2, mean2, rstd2, gate, up, hid;
};

struct Forward {
  const LanguageModel& m;
  const LmConfig& c;
  const bool gpt2;
  int64_t B, L, N, D, H, Hk, dh, F, A, K;
  float eps;
  std::vector<int64_t> ids, pos;
  std::vector<float> inv_freq;
  std::vector<LayerActs> acts;
  std::vector<float> x_last, a_final, mean_f, rstd_f;  // the final norm's input, output, statistics

  Forward(const LanguageModel& model, const std::vector<int64_t>& token_ids, int64_t b, int64_t l)
      : m(model), c(model.config), gpt2(c.arch == Arch::gpt2), B(b), L(l), ids(token_ids) {
    check(B >= 1 && L >= 1 && static_cast<int64_t>(ids.size()) == B * L, "the language model: ", ids.size(),
          " ids for B=", B, " x L=", L);
    check(!gpt2 || L <= c.max_positions, "gpt2 has ", c.max_positions, " positions, the input ", L);
    for (int64_t id : ids) check(id >= 0 && id < c.vocab, "token id ", id, " is outside the vocabulary of ", c.vocab);
    N = B * L, D = c.d_model, H = c.heads, Hk = c.kv_heads, dh = c.head_dim, F = c.mlp_hidden;
    A = H * dh, K = Hk * dh, eps = static_cast<float>(c.norm_eps);
    pos.resize(N);
    for (int64_t t = 0; t < N; ++t) pos[t] = t % L;
    if (!gpt2) inv_freq = rope_inv_freq(c.rope, dh);
  }

  const float* w(const std::string& n) const { return m.weight(n).ptr<float>(); }
  const float* bias(const std::string& n, bool has) const { return has ? w(n) : nullptr; }
  std::string prefix(int64_t l) const { return gpt2 ? cat("transformer.h.", l, ".") : cat("model.layers.", l, "."); }
  const Tensor& head() const {
    return c.tie_embeddings ? m.weight(gpt2 ? "transformer.wte.weight" : "model.embed_tokens.weight")
                            : m.weight("lm_head.weight");
  }
  TensorView view4(std::vector<float>& x, int64_t heads) const {
    return TensorView(x.data(), DType::f32, {B, L, heads, dh});
  }

  void run() {
    const float* embed = w(gpt2 ? "transformer.wte.weight" : "model.embed_tokens.weight");
    std::vector<float> x(N * D), y(N * D), qkv;
    for (int64_t t = 0; t < N; ++t)
      for (int64_t e = 0; e < D; ++e)
        x[t * D + e] = embed[ids[t] * D + e] + (gpt2 ? w("transformer.wpe.weight")[pos[t] * D + e] : 0.f);
    acts.resize(static_cast<size_t>(c.layers));
    for (int64_t l = 0; l < c.layers; ++l) {
      AttentionOptions causal;
      causal.causal = true;
      causal.window_left = c.window_left(l);
      LayerActs& s = acts[static_cast<size_t>(l)];
      const std::string p = prefix(l);
      s.x = x, s.a1.resize(N * D), s.mean1.resize(N), s.rstd1.resize(N);
      s.q.resize(N * A), s.k.resize(N * K), s.v.resize(N * K), s.o.resize(N * A), s.lse.resize(B * H * L);
      if (gpt2) {
        layernorm_forward(N, D, x.data(), w(p + "ln_1.weight"), w(p + "ln_1.bias"), s.a1.data(), s.mean1.data(),
                          s.rstd1.data(), eps);
        qkv.resize(N * 3 * D);
        linear_forward(N, D, 3 * D, s.a1.data(), w(p + "attn.c_attn.weight"), w(p + "attn.c_attn.bias"), qkv.data());
        for (int64_t t = 0; t < N; ++t)
          for (int64_t e = 0; e < D; ++e)
            s.q[t * D + e] = qkv[t * 3 * D + e], s.k[t * D + e] = qkv[t * 3 * D + D + e],
                        s.v[t * D + e] = qkv[t * 3 * D + 2 * D + e];
      } else {
        rmsnorm_forward(N, D, x.data(), w(p + "input_layernorm.weight"), s.a1.data(), s.rstd1.data(), eps);
        linear_t(N, D, A, s.a1.data(), m.weight(p + "self_attn.q_proj.weight"),
                 bias(p + "self_attn.q_proj.bias", c.qkv_bias), s.q.data());
        linear_t(N, D, K, s.a1.data(), m.weight(p + "self_attn.k_proj.weight"),
                 bias(p + "self_attn.k_proj.bias", c.qkv_bias), s.k.data());
        linear_t(N, D, K, s.a1.data(), m.weight(p + "self_attn.v_proj.weight"),
                 bias(p + "self_attn.v_proj.bias", c.qkv_bias), s.v.data());
        rope_forward(N, H, dh, A, s.q.data(), pos.data(), inv_freq.data());
        rope_forward(N, Hk, dh, K, s.k.data(), pos.data(), inv_freq.data());
      }
      attention_forward(view4(s.q, H), view4(s.k, Hk), view4(s.v, Hk), view4(s.o, H),
                        TensorView(s.lse.data(), DType::f32, {B, H, L}), causal);
      if (gpt2)
        linear_forward(N, D, D, s.o.data(), w(p + "attn.c_proj.weight"), w(p + "attn.c_proj.bias"), y.data());
      else
        linear_t(N, A, D, s.o.data(), m.weight(p + "self_attn.o_proj.weight"),
                 bias(p + "self_attn.o_proj.bias", c.o_bias), y.data());
      for (int64_t i = 0; i < N * D; ++i) x[i] += y[i];
      s.xmid = x, s.a2.resize(N * D), s.mean2.resize(N), s.rstd2.resize(N), s.gate.resize(N * F), s.hid.resize(N * F);
      if (gpt2) {
        layernorm_forward(N, D, x.data(), w(p + "ln_2.weight"), w(p + "ln_2.bias"), s.a2.data(), s.mean2.data(),
                          s.rstd2.data(), eps);
        linear_forward(N, D, F, s.a2.data(), w(p + "mlp.c_fc.weight"), w(p + "mlp.c_fc.bias"), s.gate.data());
        gelu_forward(N * F, s.gate.data(), s.hid.data());
        linear_forward(N, F, D, s.hid.data(), w(p + "mlp.c_proj.weight"), w(p + "mlp.c_proj.bias"), y.data());
      } else {
        rmsnorm_forward(N, D, x.data(), w(p + "post_attention_layernorm.weight"), s.a2.data(), s.rstd2.data(), eps);
        s.up.resize(N * F);
        linear_t(N, D, F, s.a2.data(), m.weight(p + "mlp.gate_proj.weight"), bias(p + "mlp.gate_proj.bias", c.mlp_bias),
                 s.gate.data());
        linear_t(N, D, F, s.a2.data(), m.weight(p + "mlp.up_proj.weight"), bias(p + "mlp.up_proj.bias", c.mlp_bias),
                 s.up.data());
        swiglu_forward(N * F, s.gate.data(), s.up.data(), s.hid.data());
        linear_t(N, F, D, s.hid.data(), m.weight(p + "mlp.down_proj.weight"),
                 bias(p + "mlp.down_proj.bias", c.mlp_bias), y.data());
      }
      for (int64_t i = 0; i < N * D; ++i) x[i] += y[i];
    }
    x_last = x, a_final.resize(N * D), mean_f.resize(N), rstd_f.resize(N);
    if (gpt2)
      layernorm_forward(N, D, x.data(), w("transformer.ln_f.weight"), w("transformer.ln_f.bias"), a_final.data(),
                        mean_f.data(), rstd_f.data(), eps);
    else
      rmsnorm_forward(N, D, x.data(), w("model.norm.weight"), a_final.data(), rstd_f.data(), eps);
  }
};

// dx[N, in] = dy[N, out] · W[out, in];  dW[out, in] += dyᵀ · x;  db += Σ_rows dy.
void linear_t_backward(int64_t N, int64_t in, int64_t out, const float* x, const Tensor& W, const float* dy, float* dx,
                       float* dW, float* db) {
  if (dx) gemm(false, false, N, in, out, 1.f, dy, out, W.ptr<float>(), in, 0.f, dx, in);
  gemm(true, false, out, in, N, 1.f, dy, out, x, in, 1.f, dW, in);
  if (db)
    for (int64_t o = 0; o < out; ++o) {
      double s = 0;
      for (int64_t i = 0; i < N; ++i) s += dy[i * out + o];
      db[o] += static_cast<float>(s);
    }
}

}  // namespace

std::vector<int64_t> lm_greedy_reference(const LanguageModel& m, std::vector<int64_t> prompt, int64_t n) {
  std::vector<int64_t> out;
  for (int64_t s = 0; s < n; ++s) {
    const int64_t L = static_cast<int64_t>(prompt.size()), V = m.config.vocab;
    const Tensor logits = lm_logits(m, prompt, 1, L);
    const float* last = logits.ptr<float>() + (L - 1) * V;
    out.push_back(std::max_element(last, last + V) - last);
    prompt.push_back(out.back());
  }
  return out;
}

Tensor lm_logits(const LanguageModel& m, const std::vector<int64_t>& ids, int64_t B, int64_t L) {
  Forward f(m, ids, B, L);
  f.run();
  Tensor logits(DType::f32, {B, L, m.config.vocab});
  linear_t(f.N, f.D, m.config.vocab, f.a_final.data(), f.head(), nullptr, logits.ptr<float>());
  return logits;
}

LmLossGrads lm_loss_and_grads(const LanguageModel& m, const std::vector<int64_t>& ids, int64_t B, int64_t L) {
  Forward f(m, ids, B, L);
  f.run();
  const LmConfig& c = m.config;
  const int64_t N = f.N, D = f.D, H = f.H, Hk = f.Hk, F = f.F, A = f.A, K = f.K, V = c.vocab;
  const bool gpt2 = f.gpt2;
  // Next-token labels within each sequence (shifted before any split); the last token has none.
  std::vector<int64_t> labels(N, -1);
  for (int64_t t = 0; t < N; ++t)
    if (t % L + 1 < L) labels[t] = ids[t + 1];
  const int64_t targets = B * (L - 1);
  check(targets >= 1, "the loss needs sequences of at least 2 tokens");
  LmLossGrads out;
  for (const auto& [name, w] : m.weights) {
    Tensor z(DType::f32, w.rank(), w.view().shape.data());
    z.fill_zero();
    out.grads.emplace(name, std::move(z));
  }
  auto g = [&](const std::string& n) { return out.grads.at(n).ptr<float>(); };
  auto gb = [&](const std::string& n, bool has) { return has ? g(n) : nullptr; };
  const std::string head_name =
      c.tie_embeddings ? (gpt2 ? "transformer.wte.weight" : "model.embed_tokens.weight") : "lm_head.weight";
  std::vector<float> da(N * D), dx(N * D), tmp(N * D);
  out.loss = lm_head_cross_entropy(N, D, V, f.a_final.data(), f.head().ptr<float>(), labels.data(),
                                   1.f / static_cast<float>(targets), da.data(), g(head_name)) /
             static_cast<double>(targets);
  if (gpt2)
    layernorm_backward(N, D, f.x_last.data(), f.w("transformer.ln_f.weight"), f.mean_f.data(), f.rstd_f.data(),
                       da.data(), dx.data(), g("transformer.ln_f.weight"), g("transformer.ln_f.bias"));
  else
    rmsnorm_backward(N, D, f.x_last.data(), f.w("model.norm.weight"), f.rstd_f.data(), da.data(), dx.data(),
                     g("model.norm.weight"));
  std::vector<float> dhid(N * F), dgate(N * F), dup(N * F), dq(N * A), dk(N * K), dv(N * K), do_(N * A);
  for (int64_t l = c.layers - 1; l >= 0; --l) {
    const LayerActs& s = f.acts[static_cast<size_t>(l)];
    const std::string p = f.prefix(l);
    // MLP: x_out = x_mid + mlp(norm2(x_mid)); dx holds dL/dx_out.
    if (gpt2) {
      linear_backward(N, F, D, s.hid.data(), f.w(p + "mlp.c_proj.weight"), dx.data(), dhid.data(),
                      g(p + "mlp.c_proj.weight"), g(p + "mlp.c_proj.bias"));
      gelu_backward(N * F, s.gate.data(), dhid.data(), dgate.data());
      linear_backward(N, D, F, s.a2.data(), f.w(p + "mlp.c_fc.weight"), dgate.data(), da.data(),
                      g(p + "mlp.c_fc.weight"), g(p + "mlp.c_fc.bias"));
      layernorm_backward(N, D, s.xmid.data(), f.w(p + "ln_2.weight"), s.mean2.data(), s.rstd2.data(), da.data(),
                         tmp.data(), g(p + "ln_2.weight"), g(p + "ln_2.bias"));
    } else {
      linear_t_backward(N, F, D, s.hid.data(), m.weight(p + "mlp.down_proj.weight"), dx.data(), dhid.data(),
                        g(p + "mlp.down_proj.weight"), gb(p + "mlp.down_proj.bias", c.mlp_bias));
      swiglu_backward(N * F, s.gate.data(), s.up.data(), dhid.data(), dgate.data(), dup.data());
      linear_t_backward(N, D, F, s.a2.data(), m.weight(p + "mlp.gate_proj.weight"), dgate.data(), da.data(),
                        g(p + "mlp.gate_proj.weight"), gb(p + "mlp.gate_proj.bias", c.mlp_bias));
      linear_t_backward(N, D, F, s.a2.data(), m.weight(p + "mlp.up_proj.weight"), dup.data(), tmp.data(),
                        g(p + "mlp.up_proj.weight"), gb(p + "mlp.up_proj.bias", c.mlp_bias));
      for (int64_t i = 0; i < N * D; ++i) da[i] += tmp[i];
      rmsnorm_backward(N, D, s.xmid.data(), f.w(p + "post_attention_layernorm.weight"), s.rstd2.data(), da.data(),
                       tmp.data(), g(p + "post_attention_layernorm.weight"));
    }
    for (int64_t i = 0; i < N * D; ++i) dx[i] += tmp[i];  // dL/dx_mid
    // Attention: x_mid = x_in + attn(norm1(x_in)).
    if (gpt2)
      linear_backward(N, D, D, s.o.data(), f.w(p + "attn.c_proj.weight"), dx.data(), do_.data(),
                      g(p + "attn.c_proj.weight"), g(p + "attn.c_proj.bias"));
    else
      linear_t_backward(N, A, D, s.o.data(), m.weight(p + "self_attn.o_proj.weight"), dx.data(), do_.data(),
                        g(p + "self_attn.o_proj.weight"), gb(p + "self_attn.o_proj.bias", c.o_bias));
    AttentionOptions causal;
    causal.causal = true;
    causal.window_left = c.window_left(l);
    std::vector<float> q = s.q, k = s.k, v = s.v, o = s.o, lse = s.lse;
    attention_backward(f.view4(q, H), f.view4(k, Hk), f.view4(v, Hk), f.view4(o, H),
                       TensorView(lse.data(), DType::f32, {f.B, H, f.L}), f.view4(do_, H), f.view4(dq, H),
                       f.view4(dk, Hk), f.view4(dv, Hk), causal);
    if (gpt2) {
      std::vector<float> dqkv(N * 3 * D);
      for (int64_t t = 0; t < N; ++t)
        for (int64_t e = 0; e < D; ++e)
          dqkv[t * 3 * D + e] = dq[t * D + e], dqkv[t * 3 * D + D + e] = dk[t * D + e],
                           dqkv[t * 3 * D + 2 * D + e] = dv[t * D + e];
      linear_backward(N, D, 3 * D, s.a1.data(), f.w(p + "attn.c_attn.weight"), dqkv.data(), da.data(),
                      g(p + "attn.c_attn.weight"), g(p + "attn.c_attn.bias"));
      layernorm_backward(N, D, s.x.data(), f.w(p + "ln_1.weight"), s.mean1.data(), s.rstd1.data(), da.data(),
                         tmp.data(), g(p + "ln_1.weight"), g(p + "ln_1.bias"));
    } else {
      rope_backward(N, H, f.dh, A, dq.data(), f.pos.data(), f.inv_freq.data());
      rope_backward(N, Hk, f.dh, K, dk.data(), f.pos.data(), f.inv_freq.data());
      linear_t_backward(N, D, A, s.a1.data(), m.weight(p + "self_attn.q_proj.weight"), dq.data(), da.data(),
                        g(p + "self_attn.q_proj.weight"), gb(p + "self_attn.q_proj.bias", c.qkv_bias));
      linear_t_backward(N, D, K, s.a1.data(), m.weight(p + "self_attn.k_proj.weight"), dk.data(), tmp.data(),
                        g(p + "self_attn.k_proj.weight"), gb(p + "self_attn.k_proj.bias", c.qkv_bias));
      for (int64_t i = 0; i < N * D; ++i) da[i] += tmp[i];
      linear_t_backward(N, D, K, s.a1.data(), m.weight(p + "self_attn.v_proj.weight"), dv.data(), tmp.data(),
                        g(p + "self_attn.v_proj.weight"), gb(p + "self_attn.v_proj.bias", c.qkv_bias));
      for (int64_t i = 0; i < N * D; ++i) da[i] += tmp[i];
      rmsnorm_backward(N, D, s.x.data(), f.w(p + "input_layernorm.weight"), s.rstd1.data(), da.data(), tmp.data(),
                       g(p + "input_layernorm.weight"));
    }
    for (int64_t i = 0; i < N * D; ++i) dx[i] += tmp[i];  // dL/dx_in
  }
  // The embeddings (and gpt2's positions) take what reached the input.
  float* dE = g(gpt2 ? "transformer.wte.weight" : "model.embed_tokens.weight");
  for (int64_t t = 0; t < N; ++t)
    for (int64_t e = 0; e < D; ++e) {
      dE[f.ids[t] * D + e] += dx[t * D + e];
      if (gpt2) g("transformer.wpe.weight")[f.pos[t] * D + e] += dx[t * D + e];
    }
  return out;
}

}  // namespace ringattn

// ---- the language model as the parallel Model ----------------------------------------

namespace ringattn {
namespace {

// Where one checkpoint tensor lives in a Model (a full one or a TP/PP slice): a
// block of one of its row-major matrices, from column col0 of the full matrix.
// Hugging Face's nn.Linear weights are [out, in] (transpose: ours are [in, out]);
// gpt2's Conv1D weights, the embeddings and the LM head are stored as we keep
// them. row / col map the full matrix's rows / columns to this slice's (−1: held
// by another TP rank; empty: all, unchanged); ld is the slice's row length.
// canonical: the copy a gathered checkpoint takes (not a replicated tensor on a
// TP rank > 0, nor a tied head's copy on the last pipeline stage).
struct Slot {
  float* base;
  int64_t ld, col0;
  bool transpose;
  std::vector<int64_t> row, col;
  bool canonical = true;
};

// full index -> slice index for a run of n of the full's indices at lo .. lo + n − 1.
std::vector<int64_t> run_of(int64_t full, int64_t lo, int64_t n) {
  std::vector<int64_t> map(static_cast<size_t>(full), -1);
  for (int64_t i = 0; i < n; ++i) map[lo + i] = i;
  return map;
}

// The slots of every checkpoint tensor this model holds part of (by name; a tied
// head under PP is written twice: the first stage's embedding, the last stage's
// copy). Tensors of layers on other stages have none.
std::map<std::string, std::vector<Slot>> lm_slots(const Model& model, const LmConfig& c, bool grads) {
  Model& m = const_cast<Model&>(model);  // the slots are written by lm_import only
  check(model.device().is_host(), "checkpoint tensors map onto a host model");
  const int64_t D = c.d_model, A = c.heads * c.head_dim, K = c.kv_heads * c.head_dim, F = c.mlp_hidden;
  const int64_t C = A + 2 * K, Cl = m.local_qkv_width(), Al = m.local_heads() * c.head_dim, Fl = m.local_hidden();
  const int tp = m.tp(), r = m.tp_rank();
  const bool swiglu = c.arch != Arch::gpt2;
  std::vector<int64_t> qkv_col(static_cast<size_t>(C), -1), mlp_col(static_cast<size_t>(swiglu ? 2 * F : F), -1);
  for (int64_t j = 0; j < Cl; ++j) qkv_col[m.full_qkv_column(j)] = j;
  for (int64_t j = 0; j < (swiglu ? 2 * Fl : Fl); ++j) mlp_col[m.full_mlp_column(j)] = j;
  const std::vector<int64_t> o_row = tp > 1 ? run_of(A, r * Al, Al) : std::vector<int64_t>();
  const std::vector<int64_t> out_row = tp > 1 ? run_of(F, r * Fl, Fl) : std::vector<int64_t>();
  const std::vector<int64_t> vocab_row =
      tp > 1 ? run_of(c.vocab, m.vocab_first(), m.local_vocab()) : std::vector<int64_t>();
  const std::vector<int64_t> all;
  std::map<std::string, std::vector<Slot>> s;
  auto put = [&s, r](const std::string& name, Slot slot) {
    slot.canonical = slot.canonical && (r == 0 || !slot.row.empty() || !slot.col.empty());
    if (slot.base) s[name].push_back(std::move(slot));
  };
  auto vec = [](float* p, int64_t col0 = 0, const std::vector<int64_t>& col = {}) {
    return Slot{p, 0, col0, false, {}, col, true};
  };
  const std::vector<int64_t>& qc = tp > 1 ? qkv_col : all;
  const std::vector<int64_t>& mc = tp > 1 ? mlp_col : all;
  for (int l = 0; l < m.num_layers(); ++l) {
    const LayerParams p = grads ? m.layer_grads(l) : m.layer(l);
    const int64_t g = m.first_layer() + l;  // the checkpoint's layer index
    if (c.arch == Arch::gpt2) {
      const std::string h = cat("transformer.h.", g, ".");
      put(h + "ln_1.weight", vec(p.ln1_g)), put(h + "ln_1.bias", vec(p.ln1_b));
      put(h + "attn.c_attn.weight", {p.w_qkv, Cl, 0, false, {}, qc}), put(h + "attn.c_attn.bias", vec(p.b_qkv, 0, qc));
      put(h + "attn.c_proj.weight", {p.w_o, D, 0, false, o_row, {}}), put(h + "attn.c_proj.bias", vec(p.b_o));
      put(h + "ln_2.weight", vec(p.ln2_g)), put(h + "ln_2.bias", vec(p.ln2_b));
      put(h + "mlp.c_fc.weight", {p.w_in, Fl, 0, false, {}, mc}), put(h + "mlp.c_fc.bias", vec(p.b_in, 0, mc));
      put(h + "mlp.c_proj.weight", {p.w_out, D, 0, false, out_row, {}}), put(h + "mlp.c_proj.bias", vec(p.b_out));
      continue;
    }
    const std::string h = cat("model.layers.", g, ".");
    put(h + "input_layernorm.weight", vec(p.ln1_g));
    put(h + "post_attention_layernorm.weight", vec(p.ln2_g));
    const int64_t col[3] = {0, A, A + K};
    const char* qkv[3] = {"q_proj", "k_proj", "v_proj"};
    for (int i = 0; i < 3; ++i) {
      put(h + "self_attn." + qkv[i] + ".weight", {p.w_qkv, Cl, col[i], true, {}, qc});
      if (c.qkv_bias) put(h + "self_attn." + qkv[i] + ".bias", vec(p.b_qkv, col[i], qc));
    }
    put(h + "self_attn.o_proj.weight", {p.w_o, D, 0, true, o_row, {}});
    if (c.o_bias) put(h + "self_attn.o_proj.bias", vec(p.b_o));
    put(h + "mlp.gate_proj.weight", {p.w_in, 2 * Fl, 0, true, {}, mc});
    put(h + "mlp.up_proj.weight", {p.w_in, 2 * Fl, F, true, {}, mc});
    put(h + "mlp.down_proj.weight", {p.w_out, D, 0, true, out_row, {}});
    if (c.mlp_bias)
      put(h + "mlp.gate_proj.bias", vec(p.b_in, 0, mc)), put(h + "mlp.up_proj.bias", vec(p.b_in, F, mc)),
          put(h + "mlp.down_proj.bias", vec(p.b_out));
  }
  const LmParams g = grads ? m.lm_grads() : m.lm();
  const bool gpt2 = c.arch == Arch::gpt2;
  const std::string embed = gpt2 ? "transformer.wte.weight" : "model.embed_tokens.weight";
  put(embed, {g.embed, D, 0, false, vocab_row, {}});
  if (gpt2) put("transformer.wpe.weight", {g.pos_embed, D, 0, false, {}, {}});
  put(gpt2 ? "transformer.ln_f.weight" : "model.norm.weight", vec(g.norm_g));
  if (gpt2) put("transformer.ln_f.bias", vec(g.norm_b));
  if (g.head != g.embed)  // tied: the last stage's copy of the embedding
    put(c.tie_embeddings ? embed : "lm_head.weight", {g.head, D, 0, false, vocab_row, {}, !c.tie_embeddings});
  return s;
}

// Where element (r, k) of a checkpoint tensor of shape [rows, cols] (or [cols])
// is in the model, or null where this slice holds none of it.
float* at(const Slot& s, int64_t rows, int64_t r, int64_t k) {
  const int64_t i = rows == 1 || s.transpose ? (rows == 1 ? 0 : k) : r;
  const int64_t j = s.col0 + (rows == 1 || !s.transpose ? k : r);
  const int64_t il = s.row.empty() ? i : s.row[i], jl = s.col.empty() ? j : s.col[j];
  return il < 0 || jl < 0 ? nullptr : s.base + il * s.ld + jl;
}

// A checkpoint's tensors by name, in any of the dtypes a checkpoint stores.
using TensorSource = std::function<TensorView(const std::string& name)>;

void import_slice(Model& m, const LmConfig& c, const TensorSource& source, bool grads) {
  const std::map<std::string, std::vector<Slot>> slots = lm_slots(m, c, grads);
  for (const auto& [name, shape] : lm_tensor_shapes(c)) {
    const TensorView v = source(name);
    check(v.is_contiguous() && std::vector<int64_t>(v.shape.begin(), v.shape.begin() + v.rank) == shape, "tensor '",
          name, "' must be ", shape_text(shape), ", got ", v.shape_str());
    const auto it = slots.find(name);
    if (it == slots.end()) continue;  // another stage's
    const int64_t rows = shape.size() == 1 ? 1 : shape[0], cols = shape.back();
    for (const Slot& s : it->second)
      for (int64_t r = 0; r < rows; ++r) {
        if (rows > 1 && s.transpose && !s.col.empty() && s.col[s.col0 + r] < 0) continue;  // another rank's row
        for (int64_t k = 0; k < cols; ++k)
          if (float* d = at(s, rows, r, k)) *d = load_as_f32(v.data, v.dtype, r * cols + k);
      }
  }
}

}  // namespace

void lm_import(Model& full, const LmConfig& c, const std::map<std::string, Tensor>& tensors, bool grads) {
  check(full.tp() == 1 && full.num_layers() == c.layers, "lm_import fills a full (tp = 1, pp = 1) model");
  import_slice(
      full, c,
      [&](const std::string& name) {
        const auto it = tensors.find(name);
        check(it != tensors.end(), "no tensor '", name, "' to load");
        return it->second.view();
      },
      grads);
}

namespace {

// The whole checkpoint's tensors (parameters or gradients) from the slices of a
// run: lm_gather's, and lm_export's without a run.
std::map<std::string, Tensor> gather_tensors(const Model& m, const LmConfig& c, const RunContext* run, bool grads) {
  const Mesh* mesh = run && run->world() ? &run->mesh() : nullptr;
  check(mesh || (m.tp() == 1 && m.num_layers() == c.layers), "a slice of the model is gathered over its run");
  // The ranks of data-parallel replica 0 and SP rank 0 hold one whole model
  // between them: their TP groups sum, then the TP rank 0s' PP group.
  const bool holder = !mesh || (mesh->dp_index() == 0 && mesh->sp_index() == 0);
  std::map<std::string, Tensor> out;
  if (!holder) return out;
  const std::map<std::string, std::vector<Slot>> slots = lm_slots(m, c, grads);
  for (const auto& [name, shape] : lm_tensor_shapes(c)) {
    Tensor t(DType::f32, static_cast<int>(shape.size()), shape.data());
    const int64_t rows = shape.size() == 1 ? 1 : shape[0], cols = shape.back();
    float* dst = t.ptr<float>();
    std::fill_n(dst, t.numel(), 0.f);
    if (const auto it = slots.find(name); it != slots.end())
      for (const Slot& sl : it->second)
        if (sl.canonical)
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t k = 0; k < cols; ++k)
              if (const float* v = at(sl, rows, r, k)) dst[r * cols + k] = *v;
    // Each element is one rank's (the others add zeros): the sums are exact.
    if (mesh && mesh->tp > 1) mesh->tp_comm->all_reduce(dst, t.numel(), ReduceOp::sum);
    if (mesh && mesh->pp > 1 && mesh->tp_index() == 0) mesh->pp_comm->all_reduce(dst, t.numel(), ReduceOp::sum);
    if (!mesh || mesh->rank() == 0) out.emplace(name, std::move(t));
  }
  return out;
}

}  // namespace

std::map<std::string, Tensor> lm_export(const Model& full, const LmConfig& c, bool grads) {
  check(full.tp() == 1 && full.num_layers() == c.layers, "lm_export reads a full (tp = 1, pp = 1) model");
  return gather_tensors(full, c, nullptr, grads);
}

std::map<std::string, Tensor> lm_gather(const Model& m, const LmConfig& c, const RunContext* run) {
  return gather_tensors(m, c, run, false);
}

namespace {

// This rank's slice, created empty and filled from the tensors: no rank ever
// holds more of the model than its slice.
Model sliced_lm_model(const LmConfig& lc, const TensorSource& source, DType dtype, const RunContext& run) {
  ModelConfig cfg = model_config(lc);
  cfg.dtype = dtype;
  check_model_fits(cfg, run.config());
  Model m = model_for(cfg, run, Model::Init::zeros);
  import_slice(m, lc, source, false);
  return m;
}

}  // namespace

Model lm_model(const LanguageModel& lm, DType dtype, const RunContext& run) {
  return sliced_lm_model(
      lm.config, [&](const std::string& name) { return lm.weight(name).view(); }, dtype, run);
}

Model lm_model(const std::string& dir, DType dtype, const RunContext& run) {
  const LmConfig c = load_lm_config(dir);
  const Checkpoint ck(dir);
  return sliced_lm_model(
      c, [&](const std::string& name) { return checkpoint_tensor(ck, dir, c, name); }, dtype, run);
}

void save_lm(const std::string& dir, const Model& m, const LmConfig& c, const RunContext* run) {
  const std::map<std::string, Tensor> t = lm_gather(m, c, run);
  if (run && run->rank() != 0) return;
  std::filesystem::create_directories(dir);
  std::vector<std::pair<std::string, TensorView>> views;
  for (const auto& [name, tensor] : t) views.push_back({name, tensor.view()});
  save_safetensors(dir + "/model.safetensors", views);
  const std::string json = lm_config_json(c);
  write_file_atomically(dir + "/config.json",
                        [&](std::FILE* f) { return std::fwrite(json.data(), 1, json.size(), f) == json.size(); });
}

std::vector<int64_t> lm_local_ids(std::span<const int64_t> ids, int64_t B, int64_t L,
                                  std::span<const int64_t> positions) {
  check(static_cast<int64_t>(ids.size()) == B * L, "the language model: ", ids.size(), " ids for B=", B, " x L=", L);
  const int64_t Ll = static_cast<int64_t>(positions.size());
  std::vector<int64_t> local(static_cast<size_t>(B * Ll));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < Ll; ++j) local[b * Ll + j] = ids[b * L + positions[j]];
  return local;
}

std::vector<std::vector<int32_t>> lm_documents(std::span<const int64_t> ids, int64_t B, int64_t L, int64_t eos) {
  check(static_cast<int64_t>(ids.size()) == B * L, "the language model: ", ids.size(), " ids for B=", B, " x L=", L);
  check(L <= std::numeric_limits<int32_t>::max(), "packed documents: rows of ", L, " tokens do not fit int32 offsets");
  std::vector<std::vector<int32_t>> cu(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    cu[b].push_back(0);
    for (int64_t t = 0; t < L; ++t)
      if (ids[b * L + t] == eos || t + 1 == L) cu[b].push_back(static_cast<int32_t>(t + 1));
  }
  return cu;
}

namespace {

// Checks documents (empty, or one cu_seqlens per row over L) and returns, per
// row, whether each position starts a document.
std::vector<std::vector<bool>> document_starts(std::span<const std::vector<int32_t>> documents, int64_t B, int64_t L) {
  std::vector<std::vector<bool>> starts;
  if (documents.empty()) return starts;
  check(static_cast<int64_t>(documents.size()) == B, "packed documents: ", documents.size(), " rows of cu_seqlens for ",
        B, " rows");
  for (int64_t b = 0; b < B; ++b) {
    check_cu_seqlens(documents[static_cast<size_t>(b)], L, "cu_seqlens");
    std::vector<bool> row(static_cast<size_t>(L + 1), false);
    for (int32_t o : documents[static_cast<size_t>(b)]) row[static_cast<size_t>(o)] = true;
    starts.push_back(std::move(row));
  }
  return starts;
}

}  // namespace

int64_t lm_targets(int64_t B, int64_t L, std::span<const std::vector<int32_t>> documents) {
  if (documents.empty()) return B * (L - 1);
  document_starts(documents, B, L);
  int64_t n = 0;
  for (const std::vector<int32_t>& cu : documents)
    for (size_t i = 1; i < cu.size(); ++i) n += std::max(0, cu[i] - cu[i - 1] - 1);
  return n;
}

std::vector<int64_t> lm_document_positions(std::span<const int64_t> positions, int64_t B,
                                           std::span<const std::vector<int32_t>> documents) {
  check(static_cast<int64_t>(documents.size()) == B, "packed documents: ", documents.size(), " rows of cu_seqlens for ",
        B, " rows");
  const int64_t Ll = static_cast<int64_t>(positions.size());
  std::vector<int64_t> out(static_cast<size_t>(B * Ll));
  for (int64_t b = 0; b < B; ++b) {
    const std::vector<int32_t>& cu = documents[static_cast<size_t>(b)];
    for (int64_t j = 0; j < Ll; ++j) {  // the last offset <= the position starts its document
      const auto start = std::upper_bound(cu.begin(), cu.end(), positions[j]) - 1;
      out[b * Ll + j] = positions[j] - *start;
    }
  }
  return out;
}

std::vector<int64_t> lm_labels(std::span<const int64_t> ids, int64_t B, int64_t L, std::span<const int64_t> positions,
                               std::span<const std::vector<int32_t>> documents) {
  check(static_cast<int64_t>(ids.size()) == B * L, "the language model: ", ids.size(), " ids for B=", B, " x L=", L);
  const std::vector<std::vector<bool>> starts = document_starts(documents, B, L);
  const int64_t Ll = static_cast<int64_t>(positions.size());
  std::vector<int64_t> labels(static_cast<size_t>(B * Ll), -1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < Ll; ++j) {
      const int64_t next = positions[j] + 1;
      if (next < L && (starts.empty() || !starts[b][static_cast<size_t>(next)])) labels[b * Ll + j] = ids[b * L + next];
    }
  return labels;
}

// ids: [B, Ll]   positions: [Ll] or [B·Ll]   ->   x: [B, Ll, D]
DeviceTensor lm_embed(const Model& m, const ModelParallel& par, std::span<const int64_t> ids, int64_t B,
                      std::span<const int64_t> positions) {
  const ModelConfig& c = m.config();
  const LmParams p = m.lm();
  check(c.is_lm() && p.embed, "lm_embed: the model has no token embedding here (not a language model's first stage)");
  const int64_t N = static_cast<int64_t>(ids.size()), n = static_cast<int64_t>(positions.size()), D = c.d_model;
  check(B >= 1 && N % B == 0 && (n == N / B || n == N), "lm_embed: ", N, " ids and ", n, " positions for B=", B);
  const int64_t Ll = N / B, v0 = m.vocab_first(), Vl = m.local_vocab();
  for (int64_t id : ids) check(id >= 0 && id < c.vocab, "token id ", id, " is outside the vocabulary of ", c.vocab);
  for (int64_t pos : positions)
    check(!p.pos_embed || (pos >= 0 && pos < c.positions), "position ", pos, " is beyond the model's ", c.positions,
          " learned positions");
  Communicator* tp = tp_group(m, par);
  DeviceTensor x = m.device().alloc(DType::f32, {B, Ll, D});
  float* out = x.ptr<float>();
  // Each id's row from the rank holding it, zeros from the others: the sum is exact.
  for (int64_t t = 0; t < N; ++t) {
    const int64_t v = ids[t] - v0;
    if (v >= 0 && v < Vl)
      std::copy_n(p.embed + v * D, D, out + t * D);
    else
      std::fill_n(out + t * D, D, 0.f);
  }
  if (tp) tp->all_reduce(out, N * D, ReduceOp::sum);
  if (p.pos_embed)
    for (int64_t t = 0; t < N; ++t)
      for (int64_t e = 0; e < D; ++e) out[t * D + e] += p.pos_embed[positions[n == N ? t : t % Ll] * D + e];
  return x;
}

void lm_embed_backward(Model& m, std::span<const int64_t> ids, int64_t B, std::span<const int64_t> positions,
                       const TensorView& dx) {
  const LmParams g = m.lm_grads();
  const int64_t N = static_cast<int64_t>(ids.size()), n = static_cast<int64_t>(positions.size());
  const int64_t D = m.config().d_model, Ll = N / B, v0 = m.vocab_first(), Vl = m.local_vocab();
  check(g.embed && dx.numel() == N * D && dx.is_contiguous() && (n == Ll || n == N), "lm_embed_backward: dL/dx ",
        dx.shape_str(), " for ", N, " ids and ", n, " positions");
  const float* d = dx.ptr<float>();
  for (int64_t t = 0; t < N; ++t) {
    const int64_t v = ids[t] - v0;
    for (int64_t e = 0; e < D; ++e) {
      if (v >= 0 && v < Vl) g.embed[v * D + e] += d[t * D + e];
      if (g.pos_embed) g.pos_embed[positions[n == N ? t : t % Ll] * D + e] += d[t * D + e];
    }
  }
}

namespace {

// This rank's columns of the logits, [N, Vl] for the vocabulary rows
// vocab_first() .. + local_vocab() of the head (all of them without TP), in rows
// ld floats apart.
void lm_head_local_logits(const Model& m, const TensorView& y, float* out, int64_t ld) {
  const ModelConfig& c = m.config();
  const LmParams p = m.lm();
  check(c.is_lm() && p.head, "lm_head_logits: the model has no LM head here (not a language model's last stage)");
  const int64_t D = c.d_model, N = y.numel() / D;
  std::vector<float> a(static_cast<size_t>(N * D)), mean(static_cast<size_t>(N)), rstd(static_cast<size_t>(N));
  norm_forward(m.device(), c, N, y.ptr<float>(), p.norm_g, p.norm_b, a.data(), mean.data(), rstd.data());
  gemm(false, true, N, m.local_vocab(), D, 1.f, a.data(), D, p.head, D, 0.f, out, ld);
}

// The next token from one row of logits whose vocabulary is split over the TP
// group (this rank's part: ids v0 .. v0 + part.size()): each rank's candidates
// (one greedy, top_k, else all) travel, not the row; every rank merges them
// alike and draws the same pick. A NaN anywhere is an error on every rank.
int64_t sample_split(Communicator* tp, std::span<const float> part, int64_t v0, int64_t V, const SamplingOptions& o,
                     std::mt19937_64& rng) {
  if (!tp) return sample_token(part, o, rng);
  const int T = tp->size();
  const int64_t k = candidates_per_part(o, (V + T - 1) / T);  // per rank, padded to the widest part's
  const bool nan = has_nan(part);
  std::vector<TokenCandidate> mine(static_cast<size_t>(k + 1),
                                   TokenCandidate{-std::numeric_limits<float>::infinity(), -1});
  mine[0].id = nan;  // entry 0: the flag
  if (!nan) {
    const std::vector<TokenCandidate> c = sampling_candidates(part, v0, o);
    std::copy(c.begin(), c.end(), mine.begin() + 1);
  }
  std::vector<TokenCandidate> all(static_cast<size_t>(T * (k + 1)));
  tp->all_gather(mine.data(), all.data(), mine.size() * sizeof(TokenCandidate));
  std::vector<TokenCandidate> merged;
  for (int r = 0; r < T; ++r) {
    check(all[r * (k + 1)].id == 0, "the logits hold a NaN (vocabulary part of TP rank ", r,
          "): nothing can be sampled");
    for (int64_t i = 1; i <= k; ++i)
      if (all[r * (k + 1) + i].id >= 0) merged.push_back(all[r * (k + 1) + i]);
  }
  std::sort(merged.begin(), merged.end(), before);
  return sample_candidates(merged, o, rng);
}

}  // namespace

// y: [N, D]   ->   logits: [N, V]
Tensor lm_head_logits(const Model& m, const ModelParallel& par, const TensorView& y) {
  const int64_t N = y.numel() / m.config().d_model, V = m.config().vocab;
  Communicator* tp = tp_group(m, par);
  Tensor logits(DType::f32, {N, V});
  if (!tp) {
    lm_head_local_logits(m, y, logits.ptr<float>(), V);
    return logits;
  }
  // This rank's columns [N, Vl], padded to the widest rank's, gathered over the
  // TP group and laid side by side.
  const int T = tp->size();
  const int64_t Vw = (V + T - 1) / T;
  std::vector<float> mine(static_cast<size_t>(N * Vw), 0.f), all(static_cast<size_t>(T * N * Vw));
  lm_head_local_logits(m, y, mine.data(), Vw);
  tp->all_gather(mine.data(), all.data(), mine.size() * sizeof(float));
  for (int r = 0; r < T; ++r) {
    const int64_t first = vocab_row(V, T, r), n = vocab_row(V, T, r + 1) - first;
    for (int64_t i = 0; i < N; ++i) std::copy_n(all.data() + (r * N + i) * Vw, n, logits.ptr<float>() + i * V + first);
  }
  return logits;
}

// y: [N, D]   labels: [N]   dy: [N, D] or empty (the loss alone)
double lm_head_loss(Model& m, const ModelParallel& par, const TensorView& y, std::span<const int64_t> labels,
                    float scale, const TensorView& dy) {
  const ModelConfig& c = m.config();
  const LmParams p = std::as_const(m).lm();
  check(c.is_lm() && p.head, "lm_head_loss: the model has no LM head here (not a language model's last stage)");
  const int64_t D = c.d_model, N = static_cast<int64_t>(labels.size()), Vl = m.local_vocab();
  check(y.numel() == N * D && (dy.empty() || dy.numel() == N * D), "lm_head_loss: ", N, " labels for rows ",
        y.shape_str());
  for (int64_t t : labels) check(t >= -1 && t < c.vocab, "label ", t, " is outside the vocabulary of ", c.vocab);
  Communicator* tp = tp_group(m, par);
  VocabShard shard{m.vocab_first(), c.vocab, {}};
  if (tp)
    shard.reduce = [tp](double* x, int64_t n, bool max) { tp->all_reduce(x, n, max ? ReduceOp::max : ReduceOp::sum); };
  std::vector<float> a(static_cast<size_t>(N * D)), mean(static_cast<size_t>(N)), rstd(static_cast<size_t>(N));
  norm_forward(m.device(), c, N, y.ptr<float>(), p.norm_g, p.norm_b, a.data(), mean.data(), rstd.data());
  if (dy.empty())
    return lm_head_cross_entropy(N, D, Vl, a.data(), p.head, labels.data(), scale, nullptr, nullptr, 256, shard);
  const LmParams g = m.lm_grads();
  std::vector<float> da(static_cast<size_t>(N * D));
  const double loss =
      lm_head_cross_entropy(N, D, Vl, a.data(), p.head, labels.data(), scale, da.data(), g.head, 256, shard);
  if (tp) tp->all_reduce(da.data(), N * D, ReduceOp::sum);  // each rank's vocabulary's part of dL/da
  norm_backward(m.device(), c, N, y.ptr<float>(), p.norm_g, mean.data(), rstd.data(), da.data(), dy.ptr<float>(),
                g.norm_g, g.norm_b);
  return loss;
}

namespace {

// The global positions of this rank's tokens of a sequence of L: its shard of
// the SP layout, for any L of at least one token per rank (shards may differ by
// a token, or two in zigzag; every part of the model takes them).
std::vector<int64_t> sequence_shard(const ModelParallel& par, int64_t L) {
  const int P = par.sp ? par.sp->size() : 1;
  check_layout(par.attn.layout, L, P);
  return shard_positions(par.attn.layout, L, P, par.sp ? par.sp->rank() : 0);
}

}  // namespace

namespace {

// The whole batch, checked on every rank before any compute: each rank embeds
// only its own tokens, and a bad id found by one rank alone would leave the
// others waiting in the next collective.
void check_batch_ids(const ModelConfig& c, std::span<const int64_t> ids, int64_t L) {
  for (int64_t id : ids) check(id >= 0 && id < c.vocab, "token id ", id, " is outside the vocabulary of ", c.vocab);
  check(c.positions == 0 || L <= c.positions, "a sequence of ", L, " tokens passes the model's ", c.positions,
        " learned positions");
}

}  // namespace

namespace {

// This rank's view of a batch: the global positions of its tokens [Ll], their ids
// [B, Ll], and where RoPE / learned positions put them, [B·Ll] (each row the
// positions, or restarting in each document of packed rows).
struct LocalBatch {
  std::vector<int64_t> pos, ids, at;
  int64_t Ll = 0;
};
LocalBatch local_batch(const Model& m, const ModelParallel& par, std::span<const int64_t> ids, int64_t B, int64_t L,
                       std::span<const std::vector<int32_t>> documents) {
  check_batch_ids(m.config(), ids, L);
  LocalBatch lb;
  lb.pos = sequence_shard(par, L);
  lb.ids = lm_local_ids(ids, B, L, lb.pos);
  document_starts(documents, B, L);
  lb.Ll = static_cast<int64_t>(lb.pos.size());
  if (documents.empty())
    for (int64_t b = 0; b < B; ++b) lb.at.insert(lb.at.end(), lb.pos.begin(), lb.pos.end());
  else
    lb.at = lm_document_positions(lb.pos, B, documents);
  return lb;
}

// The pipeline's first end for micro-batches of Bm rows: the embedding of rows
// i·Bm .. (i + 1)·Bm − 1 and its backward (the caller sets the last end).
PipelineEnds lm_pipeline_ends(Model& m, const ModelParallel& par, const LocalBatch& lb, int64_t Bm,
                              std::span<const std::vector<int32_t>> documents) {
  auto rows = [&lb, Bm](const std::vector<int64_t>& v, int i) {
    return std::span<const int64_t>(v).subspan(static_cast<size_t>(i * Bm * lb.Ll), static_cast<size_t>(Bm * lb.Ll));
  };
  auto where = [&lb, rows](int i) { return rows(lb.at, i); };
  PipelineEnds ends;
  ends.input = [&m, &par, &lb, Bm, rows, where](int i) { return lm_embed(m, par, rows(lb.ids, i), Bm, where(i)); };
  ends.input_grad = [&m, &lb, Bm, rows, where](int i, const TensorView& dx) {
    lm_embed_backward(m, rows(lb.ids, i), Bm, where(i), dx);
  };
  ends.positions = lb.at, ends.documents = documents;  // the stages' RoPE positions of the shard
  return ends;
}

constexpr int kTiedTag = 1000;  // apart from the pipeline's micro-batch tags

// A tied head under PP is one parameter held twice: the first stage's embedding
// and the last stage's copy of it (Megatron's scheme). The gradient of this rank's
// copy, or null where there is none.
float* tied_copy_grad(Model& m, Communicator* pp) {
  if (!pp || pp->size() == 1 || !m.config().tied) return nullptr;
  return m.first_stage() ? m.lm_grads().embed : m.last_stage() ? m.lm_grads().head : nullptr;
}

// Each copy adds the other's gradient of this backward (what it gained since
// `before`), so both end equal and AdamW keeps the copies equal.
void sum_tied_grads(Model& m, Communicator& pp, float* g, const std::vector<float>& before) {
  const size_t n = before.size();
  std::vector<float> mine(n), theirs(n);
  for (size_t i = 0; i < n; ++i) mine[i] = g[i] - before[i];
  const int peer = m.first_stage() ? pp.size() - 1 : 0;
  Request r = pp.irecv(theirs.data(), n * sizeof(float), peer, kTiedTag);
  Request s = pp.isend(mine.data(), n * sizeof(float), peer, kTiedTag);
  pp.wait(r);
  pp.wait(s);
  for (size_t i = 0; i < n; ++i) g[i] += theirs[i];
}

}  // namespace

namespace {

// The forward of a batch to the last stage's output rows: `rows(b0, y)` sees
// y [Bm, Ll, D], rows b0 .. b0 + Bm − 1 of this rank's tokens (on the last stage
// only). With pp the pipeline's forwards, one row per micro-batch.
void lm_last_rows(const Model& m, const ModelParallel& par, const LocalBatch& lb, int64_t B,
                  std::span<const std::vector<int32_t>> documents, Communicator* pp,
                  const std::function<void(int64_t b0, const TensorView& y)>& rows) {
  check(pp || (m.first_stage() && m.last_stage()), "the model holds one pipeline stage: pass its PP group");
  if (pp) {
    // train = false: the pipeline only reads the model.
    Model& stage = const_cast<Model&>(m);
    PipelineEnds ends = lm_pipeline_ends(stage, par, lb, 1, documents);
    ends.loss = [&](int i, const TensorView& y, const TensorView&) {
      rows(i, y);
      return 0.0;
    };
    pipeline_run(stage, ends, par, *pp, static_cast<int>(B), 1, lb.Ll, false);
    return;
  }
  const DeviceTensor x = lm_embed(m, par, lb.ids, B, lb.at);
  Activations act;
  act.keep = false;
  const DeviceTensor y = model_forward(m, x, par, act, {}, lb.at, documents);
  rows(0, y);
}

}  // namespace

Tensor lm_forward(const Model& m, const ModelParallel& par, std::span<const int64_t> ids, int64_t B, int64_t L,
                  std::span<const std::vector<int32_t>> documents, Communicator* pp) {
  const LocalBatch lb = local_batch(m, par, ids, B, L, documents);
  const int64_t V = m.config().vocab;
  Tensor out(DType::f32, {B, lb.Ll, V});
  lm_last_rows(m, par, lb, B, documents, pp, [&](int64_t b0, const TensorView& y) {
    const Tensor logits = lm_head_logits(m, par, y);
    std::copy_n(logits.ptr<float>(), logits.numel(), out.ptr<float>() + b0 * lb.Ll * V);
  });
  if (pp) pp->broadcast(out.ptr<void>(), out.bytes(), pp->size() - 1);
  return out;
}

// at: [n] positions of a row   y: [Bm, Ll, D] rows of this rank's tokens   out: [B, n, V]
Tensor lm_logits_at(const Model& m, const ModelParallel& par, std::span<const int64_t> ids, int64_t B, int64_t L,
                    std::span<const int64_t> at, std::span<const std::vector<int32_t>> documents, Communicator* pp) {
  for (int64_t t : at) check(t >= 0 && t < L, "position ", t, " is outside the sequence of ", L, " tokens");
  const LocalBatch lb = local_batch(m, par, ids, B, L, documents);
  const int64_t V = m.config().vocab, D = m.config().d_model, n = static_cast<int64_t>(at.size());
  // (local index j, output index k) for every wanted position this rank holds.
  std::vector<std::pair<int64_t, int64_t>> wanted(static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) wanted[k] = {at[k], k};
  std::sort(wanted.begin(), wanted.end());
  std::vector<std::pair<int64_t, int64_t>> mine;
  for (int64_t j = 0; j < lb.Ll; ++j) {
    auto [lo, hi] = std::equal_range(wanted.begin(), wanted.end(), std::pair<int64_t, int64_t>{lb.pos[j], -1},
                                     [](const auto& a, const auto& b) { return a.first < b.first; });
    for (auto w = lo; w != hi; ++w) mine.push_back({j, w->second});
  }
  const int64_t r = static_cast<int64_t>(mine.size());
  Tensor out(DType::f32, {B, n, V});
  std::fill_n(out.ptr<float>(), out.numel(), 0.f);
  lm_last_rows(m, par, lb, B, documents, pp, [&](int64_t b0, const TensorView& y) {
    if (r == 0) return;
    const int64_t Bm = y.numel() / (lb.Ll * D);
    Tensor sel(DType::f32, {Bm * r, D});  // the wanted rows only: the head never sees the others
    for (int64_t b = 0; b < Bm; ++b)
      for (int64_t i = 0; i < r; ++i)
        std::copy_n(y.ptr<float>() + (b * lb.Ll + mine[i].first) * D, D, sel.ptr<float>() + (b * r + i) * D);
    const Tensor logits = lm_head_logits(m, par, sel.view());
    for (int64_t b = 0; b < Bm; ++b)
      for (int64_t i = 0; i < r; ++i)
        std::copy_n(logits.ptr<float>() + (b * r + i) * V, V, out.ptr<float>() + ((b0 + b) * n + mine[i].second) * V);
  });
  // Each position is one SP rank's: the others add zeros, exactly.
  if (par.sp && par.sp->size() > 1) par.sp->all_reduce(out.ptr<float>(), out.numel(), ReduceOp::sum);
  if (pp) pp->broadcast(out.ptr<void>(), out.bytes(), pp->size() - 1);
  return out;
}

namespace {

// The loss of lm_loss_backward, and with train its gradients.
double lm_loss_pass(Model& m, const ModelParallel& par, std::span<const int64_t> ids, int64_t B, int64_t L,
                    int64_t global_targets, Communicator* loss_group, Communicator* pp, int micro_batches,
                    std::span<const std::vector<int32_t>> documents, bool train) {
  check(global_targets >= 1, "the loss needs sequences of at least 2 tokens");
  const LocalBatch lb = local_batch(m, par, ids, B, L, documents);
  const std::vector<int64_t> labels = lm_labels(ids, B, L, lb.pos, documents);
  const float scale = 1.f / static_cast<float>(global_targets);
  double loss = 0;
  if (pp) {  // micro-batch i: rows i·Bm .. (i + 1)·Bm − 1 of this rank's tokens
    check(micro_batches >= 1 && B % micro_batches == 0, "the batch of ", B,
          " sequences must be divisible by the micro-batches ", micro_batches);
    const int64_t Bm = B / micro_batches, n = m.local_vocab() * m.config().d_model;
    float* tied = train ? tied_copy_grad(m, pp) : nullptr;
    const std::vector<float> before = tied ? std::vector<float>(tied, tied + n) : std::vector<float>();
    PipelineEnds ends = lm_pipeline_ends(m, par, lb, Bm, documents);
    ends.loss = [&](int i, const TensorView& y, const TensorView& dy) {
      const std::span<const int64_t> rows(labels.data() + i * Bm * lb.Ll, static_cast<size_t>(Bm * lb.Ll));
      return lm_head_loss(m, par, y, rows, scale, train ? dy : TensorView());
    };
    loss = pipeline_run(m, ends, par, *pp, micro_batches, Bm, lb.Ll, train);
    if (tied) sum_tied_grads(m, *pp, tied, before);
  } else {
    check(m.first_stage() && m.last_stage(), "the model holds one pipeline stage: pass its PP group");
    const DeviceTensor x = lm_embed(m, par, lb.ids, B, lb.at);
    Activations act;
    act.keep = train;
    const DeviceTensor y = model_forward(m, x, par, act, {}, lb.at, documents);
    if (!train) {
      loss = lm_head_loss(m, par, y, labels, scale, TensorView());
    } else {
      DeviceTensor dy = m.device().alloc(DType::f32, {B, lb.Ll, m.config().d_model});
      loss = lm_head_loss(m, par, y, labels, scale, dy);
      const DeviceTensor dx = model_backward(m, act, dy, par);
      lm_embed_backward(m, lb.ids, B, lb.at, dx);
    }
  }
  if (loss_group) loss_group->all_reduce(&loss, 1, ReduceOp::sum);
  if (pp) pp->all_reduce(&loss, 1, ReduceOp::sum);  // from the last stage to every stage
  return loss / static_cast<double>(global_targets);
}

}  // namespace

double lm_loss_backward(Model& m, const ModelParallel& par, std::span<const int64_t> ids, int64_t B, int64_t L,
                        int64_t global_targets, Communicator* loss_group, Communicator* pp, int micro_batches,
                        std::span<const std::vector<int32_t>> documents) {
  return lm_loss_pass(m, par, ids, B, L, global_targets, loss_group, pp, micro_batches, documents, true);
}

double lm_loss(const Model& m, const ModelParallel& par, std::span<const int64_t> ids, int64_t B, int64_t L,
               int64_t global_targets, Communicator* loss_group, Communicator* pp, int micro_batches,
               std::span<const std::vector<int32_t>> documents) {
  // train = false: the pass only reads the model.
  return lm_loss_pass(const_cast<Model&>(m), par, ids, B, L, global_targets, loss_group, pp, micro_batches, documents,
                      false);
}

std::vector<std::vector<int64_t>> lm_generate(const Model& m, const ModelParallel& par,
                                              const std::vector<std::vector<int64_t>>& prompts,
                                              const LmGenerateOptions& o, Communicator* pp) {
  const ModelConfig& c = m.config();
  check(pp || (m.first_stage() && m.last_stage()), "the model holds one pipeline stage: pass its PP group");
  check(o.new_tokens >= 0, "the number of new tokens must be >= 0, got ", o.new_tokens);
  check(!prompts.empty(), "generation needs at least one prompt");
  check_sampling(o.sampling);
  const int P = par.sp ? par.sp->size() : 1, p = par.sp ? par.sp->rank() : 0;
  const int64_t B = static_cast<int64_t>(prompts.size()), V = c.vocab;
  int64_t longest = 0;
  std::vector<int64_t> L0(static_cast<size_t>(B));  // prefilled; the rest of each prompt goes through decode steps
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = static_cast<int64_t>(prompts[b].size());
    check(L >= 1, "prompt ", b, " is empty");
    check_batch_ids(c, prompts[b], L);
    check(c.positions == 0 || L + o.new_tokens <= c.positions, "a prompt of ", L, " tokens and ", o.new_tokens,
          " new ones pass the model's ", c.positions, " learned positions");
    // The whole prompt when the layout gives every rank a token of it (any L >= P
    // but a short zigzag one), else the longest prefix that does (a multiple of
    // P always does).
    check(L >= P, "a prompt of ", L, " tokens is shorter than the ", P, " ranks the ", layout_name(par.attn.layout),
          " layout splits it over: use fewer ranks");
    auto splits = [&](int64_t n) {
      for (int r = 0; r < P; ++r)
        if (shard_length(par.attn.layout, n, P, r) == 0) return false;
      return true;
    };
    for (L0[b] = L; !splits(L0[b]);) --L0[b];
    longest = std::max(longest, L);
  }
  const int64_t capacity = KVCache::capacity_for(longest, o.new_tokens, P);
  KVCache cache(m, B, capacity, P, p);
  // The logits of each sequence's newest token: this rank's vocabulary columns
  // [B, Vl] (the TP group samples from its parts' candidates, never gathering rows).
  Communicator* tp = m.last_stage() ? tp_group(m, par) : nullptr;
  const int64_t Vl = m.last_stage() ? m.local_vocab() : V, v0 = tp ? m.vocab_first() : 0;
  std::vector<float> last(static_cast<size_t>(B * Vl), 0.f);
  // Under PP the first stage embeds and the others receive their input from the
  // stage before (x gives them only its shape); the last stage alone has logits,
  // samples, and sends its picks to every stage.
  DeviceTensor embedded;
  auto embed = [&](std::span<const int64_t> ids, int64_t n, std::span<const int64_t> at) {
    if (m.first_stage()) return (embedded = lm_embed(m, par, ids, n, at)).view();
    return TensorView(nullptr, DType::f32, {n, static_cast<int64_t>(ids.size()) / n, c.d_model});
  };

  // Prefill the first L0 tokens (uneven shards when the SP ranks do not divide
  // them), consecutive sequences of one L0 together; the rank holding position
  // L0 − 1 computes their logits.
  for (int64_t first = 0; first < B;) {
    int64_t n = 1;
    while (first + n < B && L0[first + n] == L0[first]) ++n;
    const int64_t Lp = L0[first];
    std::vector<int64_t> prefix(static_cast<size_t>(n * Lp));
    for (int64_t b = 0; b < n; ++b) std::copy_n(prompts[first + b].begin(), Lp, prefix.begin() + b * Lp);
    const std::vector<int64_t> pos = sequence_shard(par, Lp);
    const std::vector<int64_t> local = lm_local_ids(prefix, n, Lp, pos);
    const DeviceTensor y = prefill(m, cache, embed(local, n, pos), first, par, pp);
    std::vector<float> rows_logits(static_cast<size_t>(n * Vl), 0.f);
    const auto j = std::find(pos.begin(), pos.end(), Lp - 1);
    if (m.last_stage() && j != pos.end()) {
      const int64_t Ll = static_cast<int64_t>(pos.size()), D = c.d_model;
      Tensor rows(DType::f32, {n, D});
      for (int64_t b = 0; b < n; ++b)
        std::copy_n(y.ptr<float>() + (b * Ll + (j - pos.begin())) * D, D, rows.ptr<float>() + b * D);
      lm_head_local_logits(m, rows, rows_logits.data(), Vl);
    }
    if (par.sp && m.last_stage()) par.sp->all_reduce(rows_logits.data(), n * Vl, ReduceOp::sum);  // the owner's
    std::copy(rows_logits.begin(), rows_logits.end(), last.begin() + first * Vl);
    first += n;
  }

  if (o.on_prefilled) o.on_prefilled(cache);

  // One decode step: tokens [B] at positions [B] -> the logits of each.
  auto step = [&](const std::vector<int64_t>& tokens) {
    std::vector<int64_t> at(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) at[b] = cache.length(b);
    const DeviceTensor yb = decode_step(m, cache, embed(tokens, B, at), par, pp);
    if (m.last_stage()) lm_head_local_logits(m, yb, last.data(), Vl);
  };
  // Each step feeds every sequence its next prompt token while it has one, else
  // the token sampled from its newest logits (which it emits until it ends).
  std::mt19937_64 rng(o.seed);
  std::vector<std::vector<int64_t>> out(static_cast<size_t>(B));
  std::vector<bool> done(static_cast<size_t>(B), o.new_tokens == 0);
  while (true) {
    std::vector<int64_t> tokens(static_cast<size_t>(B)), shown(static_cast<size_t>(B), -1);
    std::vector<bool> from_prompt(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) {
      const int64_t t = cache.length(b);
      from_prompt[b] = t < static_cast<int64_t>(prompts[b].size());
      if (from_prompt[b])
        tokens[b] = prompts[b][t];
      else if (m.last_stage())
        tokens[b] = sample_split(tp, std::span<const float>(last.data() + b * Vl, static_cast<size_t>(Vl)), v0, V,
                                 o.sampling, rng);
    }
    if (pp) pp->broadcast(tokens.data(), tokens.size() * sizeof(int64_t), pp->size() - 1);
    bool reading = false, sampled = false;
    for (int64_t b = 0; b < B; ++b) {
      if (from_prompt[b]) {
        reading = true;
        continue;
      }
      if (done[b]) continue;
      out[b].push_back(tokens[b]), shown[b] = tokens[b], sampled = true;
      done[b] = tokens[b] == o.eos || static_cast<int64_t>(out[b].size()) == o.new_tokens;
    }
    if (sampled && o.on_token) o.on_token(shown);
    if (!reading && std::all_of(done.begin(), done.end(), [](bool d) { return d; })) break;
    step(tokens);
  }
  return out;
}

std::vector<std::vector<int64_t>> lm_generate(const Model& m, const ModelParallel& par, std::span<const int64_t> ids,
                                              int64_t B, int64_t L, const LmGenerateOptions& o, Communicator* pp) {
  check(B >= 1 && L >= 1 && static_cast<int64_t>(ids.size()) == B * L, "generation: ", ids.size(),
        " prompt ids for B=", B, " x L=", L);
  std::vector<std::vector<int64_t>> prompts;
  for (int64_t b = 0; b < B; ++b) prompts.emplace_back(ids.begin() + b * L, ids.begin() + (b + 1) * L);
  return lm_generate(m, par, prompts, o, pp);
}

}  // namespace ringattn
