// LanguageModel: a checkpoint's weights checked against its architecture, and the
// one-process forward to logits (design.md §11 for RMSNorm, RoPE, SwiGLU).
#include "ringattn/lm.h"

#include <cmath>

#include "ringattn/cpu/attention.h"
#include "ringattn/cpu/gemm.h"
#include "ringattn/cpu/layers.h"
#include "ringattn/error.h"
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

LanguageModel LanguageModel::load(const std::string& dir) {
  LanguageModel m;
  m.config = load_lm_config(dir);
  const Checkpoint ck(dir);
  for (const auto& [name, shape] : lm_tensor_shapes(m.config)) {
    check(ck.contains(name), dir, ": the ", arch_name(m.config.arch), " checkpoint has no tensor '", name, "' ",
          shape_text(shape));
    const SafetensorsEntry& e = ck.entry(name);
    check(e.shape == shape, dir, ": tensor '", name, "' is ", shape_text(e.shape), ", config.json implies ",
          shape_text(shape));
    const TensorView v = ck.view(name);
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

Tensor lm_logits(const LanguageModel& m, const std::vector<int64_t>& ids, int64_t B, int64_t L) {
  const LmConfig& c = m.config;
  check(B >= 1 && L >= 1 && static_cast<int64_t>(ids.size()) == B * L, "lm_logits: ", ids.size(), " ids for B=", B,
        " x L=", L);
  check(c.arch != Arch::gpt2 || L <= c.max_positions, "gpt2 has ", c.max_positions, " positions, the input ", L);
  for (int64_t id : ids) check(id >= 0 && id < c.vocab, "token id ", id, " is outside the vocabulary of ", c.vocab);
  const bool gpt2 = c.arch == Arch::gpt2;
  const int64_t N = B * L, D = c.d_model, H = c.heads, Hk = c.kv_heads, dh = c.head_dim, F = c.mlp_hidden;
  const int64_t A = H * dh, K = Hk * dh;
  const float eps = static_cast<float>(c.norm_eps);
  auto w = [&](const std::string& n) { return m.weight(n).ptr<float>(); };
  const float* embed = w(gpt2 ? "transformer.wte.weight" : "model.embed_tokens.weight");
  Tensor x(DType::f32, {N, D});
  for (int64_t t = 0; t < N; ++t)
    for (int64_t e = 0; e < D; ++e)
      x.ptr<float>()[t * D + e] = embed[ids[t] * D + e] + (gpt2 ? w("transformer.wpe.weight")[(t % L) * D + e] : 0.f);
  std::vector<int64_t> pos(N);
  for (int64_t t = 0; t < N; ++t) pos[t] = t % L;
  const std::vector<float> inv_freq = gpt2 ? std::vector<float>() : rope_inv_freq(c.rope, dh);
  Tensor a(DType::f32, {N, D}), q(DType::f32, {B, L, H, dh}), k(DType::f32, {B, L, Hk, dh}),
      v(DType::f32, {B, L, Hk, dh}), o(DType::f32, {B, L, H, dh}), lse(DType::f32, {B, H, L}), y(DType::f32, {N, D});
  std::vector<float> stat1(N), stat2(N), qkv(gpt2 ? N * 3 * D : 0), hid(N * F), gate(N * F);
  AttentionOptions causal;
  causal.causal = true;
  for (int64_t l = 0; l < c.layers; ++l) {
    const std::string p = gpt2 ? cat("transformer.h.", l, ".") : cat("model.layers.", l, ".");
    // attention block: a = norm(x); q, k, v; RoPE; causal GQA attention; x += o·Wo
    if (gpt2) {
      layernorm_forward(N, D, x.ptr<float>(), w(p + "ln_1.weight"), w(p + "ln_1.bias"), a.ptr<float>(), stat1.data(),
                        stat2.data(), eps);
      linear_forward(N, D, 3 * D, a.ptr<float>(), w(p + "attn.c_attn.weight"), w(p + "attn.c_attn.bias"), qkv.data());
      for (int64_t t = 0; t < N; ++t)
        for (int64_t e = 0; e < D; ++e) {
          q.ptr<float>()[t * D + e] = qkv[t * 3 * D + e];
          k.ptr<float>()[t * D + e] = qkv[t * 3 * D + D + e];
          v.ptr<float>()[t * D + e] = qkv[t * 3 * D + 2 * D + e];
        }
    } else {
      rmsnorm_forward(N, D, x.ptr<float>(), w(p + "input_layernorm.weight"), a.ptr<float>(), stat1.data(), eps);
      auto bias = [&](const std::string& n, bool has) { return has ? w(n) : nullptr; };
      linear_t(N, D, A, a.ptr<float>(), m.weight(p + "self_attn.q_proj.weight"),
               bias(p + "self_attn.q_proj.bias", c.qkv_bias), q.ptr<float>());
      linear_t(N, D, K, a.ptr<float>(), m.weight(p + "self_attn.k_proj.weight"),
               bias(p + "self_attn.k_proj.bias", c.qkv_bias), k.ptr<float>());
      linear_t(N, D, K, a.ptr<float>(), m.weight(p + "self_attn.v_proj.weight"),
               bias(p + "self_attn.v_proj.bias", c.qkv_bias), v.ptr<float>());
      rope_forward(N, H, dh, q.ptr<float>(), pos.data(), inv_freq);
      rope_forward(N, Hk, dh, k.ptr<float>(), pos.data(), inv_freq);
    }
    attention_forward(q, k, v, o, lse, causal);
    if (gpt2)
      linear_forward(N, D, D, o.ptr<float>(), w(p + "attn.c_proj.weight"), w(p + "attn.c_proj.bias"), y.ptr<float>());
    else
      linear_t(N, A, D, o.ptr<float>(), m.weight(p + "self_attn.o_proj.weight"),
               c.o_bias ? w(p + "self_attn.o_proj.bias") : nullptr, y.ptr<float>());
    for (int64_t i = 0; i < N * D; ++i) x.ptr<float>()[i] += y.ptr<float>()[i];
    // MLP block: x += mlp(norm(x))
    if (gpt2) {
      layernorm_forward(N, D, x.ptr<float>(), w(p + "ln_2.weight"), w(p + "ln_2.bias"), a.ptr<float>(), stat1.data(),
                        stat2.data(), eps);
      linear_forward(N, D, F, a.ptr<float>(), w(p + "mlp.c_fc.weight"), w(p + "mlp.c_fc.bias"), gate.data());
      gelu_forward(N * F, gate.data(), hid.data());
      linear_forward(N, F, D, hid.data(), w(p + "mlp.c_proj.weight"), w(p + "mlp.c_proj.bias"), y.ptr<float>());
    } else {
      rmsnorm_forward(N, D, x.ptr<float>(), w(p + "post_attention_layernorm.weight"), a.ptr<float>(), stat1.data(),
                      eps);
      std::vector<float> up(N * F);
      linear_t(N, D, F, a.ptr<float>(), m.weight(p + "mlp.gate_proj.weight"),
               c.mlp_bias ? w(p + "mlp.gate_proj.bias") : nullptr, gate.data());
      linear_t(N, D, F, a.ptr<float>(), m.weight(p + "mlp.up_proj.weight"),
               c.mlp_bias ? w(p + "mlp.up_proj.bias") : nullptr, up.data());
      swiglu_forward(N * F, gate.data(), up.data(), hid.data());
      linear_t(N, F, D, hid.data(), m.weight(p + "mlp.down_proj.weight"),
               c.mlp_bias ? w(p + "mlp.down_proj.bias") : nullptr, y.ptr<float>());
    }
    for (int64_t i = 0; i < N * D; ++i) x.ptr<float>()[i] += y.ptr<float>()[i];
  }
  if (gpt2)
    layernorm_forward(N, D, x.ptr<float>(), w("transformer.ln_f.weight"), w("transformer.ln_f.bias"), a.ptr<float>(),
                      stat1.data(), stat2.data(), eps);
  else
    rmsnorm_forward(N, D, x.ptr<float>(), w("model.norm.weight"), a.ptr<float>(), stat1.data(), eps);
  Tensor logits(DType::f32, {B, L, c.vocab});
  const Tensor& head = c.tie_embeddings ? m.weight(gpt2 ? "transformer.wte.weight" : "model.embed_tokens.weight")
                                        : m.weight("lm_head.weight");
  linear_t(N, D, c.vocab, a.ptr<float>(), head, nullptr, logits.ptr<float>());
  return logits;
}

}  // namespace ringattn
