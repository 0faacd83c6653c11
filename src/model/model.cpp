// The decoder-only transformer (see model.h): init, forward, hand-written
// backward and the MSE loss, on any Device, sequence, tensor and pipeline parallel.
#include "ringattn/model.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <utility>

#include "ringattn/cpu/layers.h"
#include "ringattn/error.h"
#include "ringattn/layout.h"

namespace ringattn {

void ModelConfig::validate() const {
  check(layers >= 1, "layers must be >= 1, got ", layers);
  check(d_model >= 1 && heads >= 1, "d_model and heads must be >= 1");
  check(head_size > 0 || d_model % heads == 0, "d_model=", d_model, " must be divisible by heads=", heads);
  check(head_size >= 0, "head_dim must be >= 1, got ", head_size);
  check(heads % kv() == 0, "heads=", heads, " must be a multiple of kv_heads=", kv());
  check(hidden() >= 1, "mlp_hidden must be >= 1");
  check(dtype == DType::f32 || dtype == DType::bf16, "the model computes in fp32 or bf16, not ", dtype_name(dtype));
  check(!rope || head_dim() % 2 == 0, "RoPE needs an even head dim, got ", head_dim());
  check(norm_eps > 0, "the norm epsilon must be > 0, got ", norm_eps);
  check(vocab >= 0 && positions >= 0, "vocab and positions must be >= 0");
  check(!tied || vocab > 0, "a tied LM head needs a vocabulary");
  check(window >= 0, "the sliding window must be >= 0 (0: none), got ", window);
  check(window == 0 || causal, "a sliding window needs a causal model");
  check(window_layers.empty() || static_cast<int64_t>(window_layers.size()) == layers,
        "window_layers needs one entry per layer (", layers, "), got ", window_layers.size());
}

ModelConfig model_config(const LmConfig& lm) {
  ModelConfig c;
  c.layers = lm.layers, c.d_model = lm.d_model, c.heads = lm.heads, c.kv_heads = lm.kv_heads;
  c.mlp_hidden = lm.mlp_hidden, c.head_size = lm.head_dim, c.causal = true;
  c.norm_eps = static_cast<float>(lm.norm_eps);
  c.vocab = lm.vocab, c.tied = lm.tie_embeddings;
  if (lm.arch == Arch::gpt2) {
    c.norm = Norm::layernorm, c.mlp = Mlp::gelu, c.qkv_bias = c.o_bias = c.mlp_bias = true;
    c.positions = lm.max_positions;
  } else {
    c.norm = Norm::rmsnorm, c.mlp = Mlp::swiglu;
    c.qkv_bias = lm.qkv_bias, c.o_bias = lm.o_bias, c.mlp_bias = lm.mlp_bias;
    c.rope = true, c.rope_config = lm.rope;
    c.window = lm.sliding_window, c.window_layers = lm.sliding_layers;
  }
  c.validate();
  return c;
}

void check_model_fits(const ModelConfig& c, const ParallelConfig& p) {
  c.validate();
  const int tp = p.tp, pp = p.pp;
  check(pp >= 1 && c.layers % pp == 0, "pipeline parallelism splits layers: layers=", c.layers,
        " must be divisible by pp=", pp);
  check(tp >= 1 && c.heads % tp == 0 && c.kv() % tp == 0, "tensor parallelism splits heads: heads=", c.heads,
        " and kv_heads=", c.kv(), " must both be divisible by tp=", tp);
  check(c.hidden() % tp == 0, "tensor parallelism splits the MLP: mlp_hidden=", c.hidden(),
        " must be divisible by tp=", tp);
  check(!c.is_lm() || c.vocab >= tp, "tensor parallelism splits the vocabulary: vocab=", c.vocab,
        " must be at least tp=", tp);
  const int U = p.strategy == Strategy::ulysses ? p.sp : p.strategy == Strategy::hybrid ? p.ulysses : 1;
  check(c.heads / tp % U == 0 && c.kv() / tp % U == 0, "--strategy ", strategy_name(p.strategy),
        " splits the heads over ", U, " SP ranks: heads=", c.heads, " and kv_heads=", c.kv(),
        tp > 1 ? cat(" (/ tp=", tp, ")") : std::string(), " must be divisible by ", U,
        "; use --strategy ring or allgather");
}

Model model_for(const ModelConfig& c, const RunContext& run, Model::Init init) {
  const Mesh& m = run.mesh();
  return Model(c, run.config().tp, m.tp_index(), run.config().pp, m.pp_index(), run.device(), init);
}

// Sizes of one layer's tensors (this rank's slice), in LayerParams order; 0 for
// what the architecture has not.
std::vector<int64_t> Model::layer_sizes() const {
  const ModelConfig& c = cfg_;
  const int64_t D = c.d_model, C = local_qkv_width(), A = local_heads() * c.head_dim(), F = local_hidden();
  const int64_t Fin = c.mlp == Mlp::swiglu ? 2 * F : F, nb = c.norm == Norm::layernorm ? D : 0;
  return {D, nb, D * C,   c.qkv_bias ? C : 0,   A * D, c.o_bias ? D : 0,
          D, nb, D * Fin, c.mlp_bias ? Fin : 0, F * D, c.mlp_bias ? D : 0};
}

// Sizes of the LmParams this stage holds (all 0 for the vector model).
std::vector<int64_t> Model::lm_sizes() const {
  const ModelConfig& c = cfg_;
  if (!c.is_lm()) return {0, 0, 0, 0, 0};
  const int64_t D = c.d_model, V = local_vocab();
  const bool first = first_stage(), last = last_stage();
  // A tied head under PP: the last stage keeps its own copy of the embedding.
  return {first ? V * D : 0, first ? c.positions * D : 0, last ? D : 0, last && c.norm == Norm::layernorm ? D : 0,
          last && !(c.tied && first) ? V * D : 0};
}

namespace {

// Column c of this TP rank's W_qkv slice -> column of the full W_qkv: the local
// q heads, then k heads, then v heads, each a contiguous run of the full layout.
int64_t qkv_column(const ModelConfig& c, int tp, int r, int64_t col) {
  const int64_t dh = c.head_dim(), hq = c.heads / tp * dh, hk = c.kv() / tp * dh;
  if (col < hq) return r * hq + col;
  if (col < hq + hk) return c.heads * dh + r * hk + (col - hq);
  return (c.heads + c.kv()) * dh + r * hk + (col - hq - hk);
}

// Column c of this TP rank's W_in slice -> column of the full W_in: the rank's
// run of the F columns (GELU), or of the gate columns then the up columns (SwiGLU).
int64_t mlp_column(const ModelConfig& c, int tp, int r, int64_t col) {
  const int64_t Fl = c.hidden() / tp;
  if (col < Fl) return r * Fl + col;
  return c.hidden() + r * Fl + (col - Fl);
}

}  // namespace

Model::Model(const ModelConfig& cfg, int tp, int tp_rank, int pp, int pp_stage, Device* device, Init init)
    : cfg_(cfg), tp_(tp), tp_rank_(tp_rank), dev_(&cpu_device()) {
  ParallelConfig split;
  split.pp = pp, split.sp = 1, split.tp = tp;
  check_model_fits(cfg_, split);
  check(pp_stage >= 0 && pp_stage < pp, "pipeline stage ", pp_stage, " of ", pp, " is out of range");
  check(tp_rank >= 0 && tp_rank < tp, "tensor-parallel rank ", tp_rank, " of ", tp, " is out of range");
  num_layers_ = static_cast<int>(cfg_.layers / pp);
  first_layer_ = pp_stage * num_layers_;
  if (device && !device->is_host()) {
    check(cfg_.dtype == DType::bf16, "a model on ", device->name(),
          " computes in bf16 (its attention kernels take bf16/fp16): use --dtype bf16");
    check(tp == 1 && pp == 1, "a model on ", device->name(), " runs sequence parallelism only, not tp=", tp,
          " x pp=", pp);
  }
  if (device && !device->is_host())
    check(!cfg_.is_lm(), "a language model on ", device->name(),
          " is not supported yet: its LM head and cross-entropy run on the CPU; use --device cpu");
  for (int64_t s : layer_sizes()) per_layer_ += s;
  int64_t total = per_layer_ * num_layers_;
  for (int64_t s : lm_sizes()) total += s;
  params_ = dev_->alloc(DType::f32, {total});
  dev_->fill(params_, 0.f);
  if (init == Init::seed && (tp > 1 || pp > 1))
    copy_slice_from(Model(cfg_), false);
  else if (init == Init::seed)
    init_full();
  if (cfg_.rope) {
    const std::vector<float> f = ringattn::rope_inv_freq(cfg_.rope_config, cfg_.head_dim());
    inv_freq_ = dev_->upload(TensorView(const_cast<float*>(f.data()), DType::f32, {static_cast<int64_t>(f.size())}));
  }
  if (device && device != dev_) {
    params_ = device->upload(params_);
    if (cfg_.rope) inv_freq_ = device->upload(inv_freq_);
    dev_ = device;
  }
}

// N(0, 0.02) weights (output projections scaled by 1/sqrt(2·layers), as GPT-2),
// norm gains 1, biases 0; drawn in a fixed order from the seed (layers, then the
// embedding, learned positions and untied head).
void Model::init_full() {
  std::mt19937_64 rng(cfg_.seed);
  std::normal_distribution<float> normal(0.f, 0.02f);
  const float out_scale = 1.f / std::sqrt(2.f * static_cast<float>(cfg_.layers));
  const int64_t D = cfg_.d_model, C = cfg_.qkv_width(), A = cfg_.heads * cfg_.head_dim();
  const int64_t Fin = (cfg_.mlp == Mlp::swiglu ? 2 : 1) * cfg_.hidden(), F = cfg_.hidden();
  for (int l = 0; l < cfg_.layers; ++l) {
    LayerParams p = layer(l);
    for (int64_t i = 0; i < D; ++i) p.ln1_g[i] = p.ln2_g[i] = 1.f;
    for (int64_t i = 0; i < D * C; ++i) p.w_qkv[i] = normal(rng);
    for (int64_t i = 0; i < A * D; ++i) p.w_o[i] = normal(rng) * out_scale;
    for (int64_t i = 0; i < D * Fin; ++i) p.w_in[i] = normal(rng);
    for (int64_t i = 0; i < F * D; ++i) p.w_out[i] = normal(rng) * out_scale;
  }
  if (!cfg_.is_lm()) return;
  const LmParams g = lm();
  const int64_t V = cfg_.vocab;
  for (int64_t i = 0; i < V * D; ++i) g.embed[i] = normal(rng);
  for (int64_t i = 0; i < cfg_.positions * D; ++i) g.pos_embed[i] = normal(rng) * 0.5f;
  for (int64_t i = 0; i < D; ++i) g.norm_g[i] = 1.f;
  if (!cfg_.tied)
    for (int64_t i = 0; i < V * D; ++i) g.head[i] = normal(rng);
}

int64_t Model::full_qkv_column(int64_t j) const { return qkv_column(cfg_, tp_, tp_rank_, j); }
int64_t Model::full_mlp_column(int64_t j) const { return mlp_column(cfg_, tp_, tp_rank_, j); }

void Model::copy_slice_from(const Model& full, bool grads) {
  shadow_stale_ = true;
  check(dev_->is_host() && full.device().is_host(), "copy_slice_from copies between host models");
  check(full.tp() == 1 && full.num_layers() == cfg_.layers, "copy_slice_from needs a full (tp = 1, pp = 1) model");
  const ModelConfig& c = cfg_;
  const int64_t D = c.d_model, Cf = c.qkv_width(), Cl = local_qkv_width(), dh = c.head_dim();
  const int64_t Al = local_heads() * dh, Ff = c.hidden(), Fl = local_hidden();
  for (int l = 0; l < num_layers_; ++l) {
    float* fb = const_cast<float*>(grads ? full.grads() : full.params());
    const LayerParams f = full.view(fb, first_layer_ + l);
    const LayerParams p = view(grads ? this->grads() : params_.ptr<float>(), l);
    auto replicated = [&](const float* from, float* to) {
      if (to) std::copy_n(from, D, to);
    };
    replicated(f.ln1_g, p.ln1_g), replicated(f.ln1_b, p.ln1_b), replicated(f.ln2_g, p.ln2_g);
    replicated(f.ln2_b, p.ln2_b), replicated(f.b_o, p.b_o), replicated(f.b_out, p.b_out);
    for (int64_t j = 0; j < Cl; ++j) {
      const int64_t jf = qkv_column(c, tp_, tp_rank_, j);
      if (p.b_qkv) p.b_qkv[j] = f.b_qkv[jf];
      for (int64_t i = 0; i < D; ++i) p.w_qkv[i * Cl + j] = f.w_qkv[i * Cf + jf];
    }
    std::copy_n(f.w_o + tp_rank_ * Al * D, Al * D, p.w_o);  // rows of the local heads
    const int64_t Fin_l = c.mlp == Mlp::swiglu ? 2 * Fl : Fl, Fin_f = c.mlp == Mlp::swiglu ? 2 * Ff : Ff;
    for (int64_t j = 0; j < Fin_l; ++j) {
      const int64_t jf = mlp_column(c, tp_, tp_rank_, j);
      if (p.b_in) p.b_in[j] = f.b_in[jf];
      for (int64_t i = 0; i < D; ++i) p.w_in[i * Fin_l + j] = f.w_in[i * Fin_f + jf];
    }
    std::copy_n(f.w_out + tp_rank_ * Fl * D, Fl * D, p.w_out);  // rows of the local MLP columns
  }
  if (!c.is_lm()) return;  // the embedding and head: rows of the local vocabulary; the rest replicated
  float* fb = const_cast<float*>(grads ? full.grads() : full.params());
  const LmParams f = full.lm_view(fb), p = lm_view(grads ? this->grads() : params_.ptr<float>());
  const std::vector<int64_t> n = lm_sizes();
  const int64_t v0 = vocab_first() * D;
  if (p.embed) std::copy_n(f.embed + v0, n[0], p.embed);
  if (p.pos_embed) std::copy_n(f.pos_embed, n[1], p.pos_embed);
  if (p.norm_g) std::copy_n(f.norm_g, n[2], p.norm_g);
  if (p.norm_b) std::copy_n(f.norm_b, n[3], p.norm_b);
  if (p.head && p.head != p.embed) std::copy_n(f.head + v0, n[4], p.head);  // a tied one: the embedding
}

namespace {

// Pointers to consecutive tensors of the given sizes from base (null for size 0).
std::vector<float*> carve(float* base, const std::vector<int64_t>& sizes) {
  std::vector<float*> ptrs;
  for (int64_t s : sizes) {
    ptrs.push_back(s > 0 ? base : nullptr);
    base += s;
  }
  return ptrs;
}

}  // namespace

LayerParams Model::view(float* base, int l) const {
  const std::vector<float*> p = carve(base + l * per_layer_, layer_sizes());
  return {p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11]};
}

LmParams Model::lm_view(float* base) const {
  const std::vector<float*> p = carve(base + num_layers_ * per_layer_, lm_sizes());
  return {p[0], p[1], p[2], p[3], cfg_.tied && first_stage() && last_stage() ? p[0] : p[4]};
}

LayerWeights Model::weights(int l) const {
  const LayerParams p = layer(l);
  if (cfg_.dtype == DType::f32) return {p.w_qkv, p.w_o, p.w_in, p.w_out};
  if (shadow_stale_) {
    if (shadow_.numel() != params_.numel()) shadow_ = dev_->alloc(DType::bf16, {params_.numel()});
    dev_->copy(shadow_, params_);
    shadow_stale_ = false;
  }
  auto at = [&](const float* w) { return static_cast<const void*>(shadow_.ptr<uint16_t>() + (w - params())); };
  return {at(p.w_qkv), at(p.w_o), at(p.w_in), at(p.w_out)};
}

std::vector<float> Model::host_params() const {
  std::vector<float> h(static_cast<size_t>(num_params()));
  dev_->download(TensorView(h.data(), DType::f32, {num_params()}), params_);
  return h;
}

std::vector<float> Model::host_grads() const {
  std::vector<float> h(static_cast<size_t>(num_params()));
  dev_->download(TensorView(h.data(), DType::f32, {num_params()}), grads_or_zeros());
  return h;
}

void Model::zero_grads() { dev_->fill(grads_or_zeros(), 0.f); }

const DeviceTensor& Model::grads_or_zeros() const {
  if (grads_.view().empty() || grads_.numel() != params_.numel()) {
    grads_ = dev_->alloc(DType::f32, {params_.numel()});
    dev_->fill(grads_, 0.f);
  }
  return grads_;
}

namespace {

// q, k, v of a fused qkv activation [B, Ll, (H + 2Hkv)·dh] (local heads) as
// [B, Ll, heads, dh] views.
TensorView qkv_part(const TensorView& qkv, const Model& m, int64_t B, int64_t Ll, int which) {
  const int64_t dh = m.config().head_dim(), C = m.local_qkv_width(), hq = m.local_heads(), hk = m.local_kv();
  const int64_t heads = which == 0 ? hq : hk;
  const int64_t off = which == 0 ? 0 : (which == 1 ? hq : hq + hk) * dh;
  const int64_t shape[4] = {B, Ll, heads, dh}, strides[4] = {Ll * C, C, dh, 1};
  return TensorView(qkv.ptr<char>() + off * static_cast<int64_t>(dtype_size(qkv.dtype)), qkv.dtype, 4, shape, strides);
}

// The options of the distributed attention on dev: par's, with the model's mask.
DistAttentionOptions dist_options(Device& dev, const ModelParallel& par, const ModelConfig& c, int64_t layer) {
  check(!par.attn.device || par.attn.device == &dev, "the sequence-parallel attention runs on ",
        par.attn.device ? par.attn.device->name() : "", " but the model is on ", dev.name());
  DistAttentionOptions opt = par.attn;
  opt.causal = c.causal;
  opt.window_left = c.window_left(layer);
  opt.device = dev.is_host() ? nullptr : &dev;
  return opt;
}

AttentionOptions local_options(const ModelParallel& par, const ModelConfig& c, int64_t layer) {
  AttentionOptions opt;
  opt.causal = c.causal;
  opt.window_left = c.window_left(layer);
  opt.threads = par.attn.threads;
  opt.isa = par.attn.isa;
  return opt;
}

}  // namespace

namespace {

// Runs attend(row, n, dist, local) once for all B rows (no documents) or once per
// row with that row's documents: rows [row, row + n), the distributed and the
// local options with their masks.
template <class F>
void by_documents(Device& dev, const ModelParallel& par, const ModelConfig& c, int64_t layer, int64_t B,
                  std::span<const std::vector<int32_t>> documents, F attend) {
  const DistAttentionOptions dist = par.sp ? dist_options(dev, par, c, layer) : DistAttentionOptions();
  const AttentionOptions local = local_options(par, c, layer);
  if (documents.empty()) return attend(0, B, dist, local);
  check(static_cast<int64_t>(documents.size()) == B, "packed documents: ", documents.size(), " rows of cu_seqlens for ",
        B, " rows");
  for (int64_t b = 0; b < B; ++b) {
    DistAttentionOptions d = dist;
    AttentionOptions o = local;
    const std::span<const int32_t> cu(documents[static_cast<size_t>(b)]);
    d.cu_seqlens = cu;
    Documents docs;
    if (!par.sp) {
      docs = ringattn::documents(cu, cu);
      docs.apply(o);
    }
    attend(b, 1, d, o);
  }
}

}  // namespace

void sequence_parallel_attention(Device& dev, const ModelParallel& par, const ModelConfig& c, int64_t layer,
                                 const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                                 const TensorView& lse, std::span<const std::vector<int32_t>> documents) {
  by_documents(dev, par, c, layer, q.dim(0), documents,
               [&](int64_t b, int64_t n, const DistAttentionOptions& dist, const AttentionOptions& local) {
                 const TensorView qb = q.slice(0, b, n), kb = k.slice(0, b, n), vb = v.slice(0, b, n),
                                  ob = o.slice(0, b, n), lb = lse.slice(0, b, n);
                 if (par.sp)
                   dist_attention_forward(*par.sp, qb, kb, vb, ob, lb, dist);
                 else
                   dev.attention_forward(qb, kb, vb, ob, lb, local);
               });
}

namespace {

void attention_bwd(Device& dev, const ModelParallel& par, const ModelConfig& c, int64_t layer, const TensorView& q,
                   const TensorView& k, const TensorView& v, const TensorView& o, const TensorView& lse,
                   const TensorView& dout, const TensorView& dq, const TensorView& dk, const TensorView& dv,
                   std::span<const std::vector<int32_t>> documents) {
  by_documents(dev, par, c, layer, q.dim(0), documents,
               [&](int64_t b, int64_t n, const DistAttentionOptions& dist, const AttentionOptions& local) {
                 const TensorView qb = q.slice(0, b, n), kb = k.slice(0, b, n), vb = v.slice(0, b, n),
                                  ob = o.slice(0, b, n), lb = lse.slice(0, b, n), gb = dout.slice(0, b, n),
                                  dqb = dq.slice(0, b, n), dkb = dk.slice(0, b, n), dvb = dv.slice(0, b, n);
                 if (par.sp)
                   dist_attention_backward(*par.sp, qb, kb, vb, ob, lb, gb, dqb, dkb, dvb, dist);
                 else
                   dev.attention_backward(qb, kb, vb, ob, lb, gb, dqb, dkb, dvb, local);
               });
}

// y[N, D] = x[N, K_local] · W[K_local, D], summed over the TP group, + b: a
// row-parallel linear (the bias is added once, after the sum).
void row_parallel_linear(Device& dev, const ModelParallel& par, int64_t N, int64_t K, int64_t D, const float* x,
                         const void* W, const float* b, float* y, DType compute) {
  dev.linear_forward(N, K, D, x, W, par.tp ? nullptr : b, y, compute);
  if (!par.tp) return;
  par.tp->all_reduce(y, N * D, ReduceOp::sum);
  if (b) dev.add_bias(N, D, y, b);
}

// An fp32 [B, Ll, D] activation as the [N, D] rows of the token-local layers.
TensorView flat(const DeviceTensor& t, int64_t N, int64_t D) { return TensorView(t.ptr<float>(), DType::f32, {N, D}); }

// The input gradient of a column-parallel linear is a partial sum over the TP group.
void reduce_input_grad(const ModelParallel& par, float* dx, int64_t n) {
  if (par.tp) par.tp->all_reduce(dx, n, ReduceOp::sum);
}

}  // namespace

Communicator* tp_group(const Model& m, const ModelParallel& par) {
  check((par.tp ? par.tp->size() : 1) == m.tp(), "the model is a slice for tp=", m.tp(), " but the TP group has ",
        par.tp ? par.tp->size() : 1, " ranks");
  return m.tp() > 1 ? par.tp : nullptr;
}

int64_t sp_sequence_length(const ModelParallel& par, int64_t Ll, const char* what) {
  const int P = par.sp ? par.sp->size() : 1;
  if (P == 1) return Ll;
  std::vector<int64_t> lens(static_cast<size_t>(P));
  par.sp->all_gather(&Ll, lens.data(), sizeof(int64_t));
  int64_t L = 0;
  for (int64_t n : lens) L += n;
  check_layout(par.attn.layout, L, P);
  for (int r = 0; r < P; ++r)
    check(lens[r] == shard_length(par.attn.layout, L, P, r), what, ": SP rank ", r, " holds ", lens[r],
          " tokens, but the ", layout_name(par.attn.layout), " layout of ", L, " tokens over ", P, " ranks gives it ",
          shard_length(par.attn.layout, L, P, r));
  return L;
}

std::vector<int64_t> local_positions(const ModelParallel& par, int64_t Ll) {
  if (!par.sp || par.sp->size() == 1) {  // one shard: every layout is the identity
    std::vector<int64_t> pos(static_cast<size_t>(Ll));
    for (int64_t i = 0; i < Ll; ++i) pos[i] = i;
    return pos;
  }
  const int64_t L = sp_sequence_length(par, Ll, "the model's input");
  return shard_positions(par.attn.layout, L, par.sp->size(), par.sp->rank());
}

void norm_forward(Device& dev, const ModelConfig& c, int64_t N, const float* x, const float* g, const float* b,
                  float* y, float* mean, float* rstd) {
  if (c.norm == Norm::rmsnorm)
    dev.rmsnorm_forward(N, c.d_model, x, g, y, rstd, c.norm_eps);
  else
    dev.layernorm_forward(N, c.d_model, x, g, b, y, mean, rstd, c.norm_eps);
}

void norm_backward(Device& dev, const ModelConfig& c, int64_t N, const float* x, const float* g, const float* mean,
                   const float* rstd, const float* dy, float* dx, float* dg, float* db) {
  if (c.norm == Norm::rmsnorm)
    dev.rmsnorm_backward(N, c.d_model, x, g, rstd, dy, dx, dg);
  else
    dev.layernorm_backward(N, c.d_model, x, g, mean, rstd, dy, dx, dg, db);
}

namespace {

// RoPE (forward or back) on the q and k columns of a fused fp32 qkv [N, C].
void rope_qk(const Model& m, int64_t N, float* qkv, const int64_t* pos, bool backward) {
  Device& dev = m.device();
  const int64_t dh = m.config().head_dim(), C = m.local_qkv_width(), hq = m.local_heads(), hk = m.local_kv();
  if (backward) {
    dev.rope_backward(N, hq, dh, C, qkv, pos, m.rope_inv_freq());
    dev.rope_backward(N, hk, dh, C, qkv + hq * dh, pos, m.rope_inv_freq());
  } else {
    dev.rope_forward(N, hq, dh, C, qkv, pos, m.rope_inv_freq());
    dev.rope_forward(N, hk, dh, C, qkv + hq * dh, pos, m.rope_inv_freq());
  }
}

}  // namespace

// x: [B, Ll, D] -> [B, Ll, D]
DeviceTensor model_forward(const Model& m, const TensorView& x, const ModelParallel& par, Activations& act,
                           const AttentionHook& attention, std::span<const int64_t> positions,
                           std::span<const std::vector<int32_t>> documents) {
  const ModelConfig& c = m.config();
  Device& dev = m.device();
  check(x.rank == 3 && x.dim(2) == c.d_model && x.dtype == DType::f32,
        "model input must be fp32 [B, L, d_model=", c.d_model, "], got ", x.shape_str());
  tp_group(m, par);
  const int64_t B = x.dim(0), Ll = x.dim(1), N = B * Ll, D = c.d_model, C = m.local_qkv_width(), F = m.local_hidden();
  const int64_t A = m.local_heads() * c.head_dim(), Fin = c.mlp == Mlp::swiglu ? 2 * F : F;
  act.B = B, act.Ll = Ll;
  act.pos.reset();
  check(documents.empty() || !attention, "packed documents are for training and scoring, not the KV cache");
  act.documents.assign(documents.begin(), documents.end());
  if (c.rope) {
    const std::vector<int64_t> local = positions.empty() ? local_positions(par, Ll) : std::vector<int64_t>();
    const std::span<const int64_t> pos = positions.empty() ? std::span<const int64_t>(local) : positions;
    const int64_t n = static_cast<int64_t>(pos.size());
    check(n == Ll || n == N, "RoPE: ", n, " positions for ", B, " x ", Ll, " tokens (", Ll, " or ", N, " expected)");
    std::vector<int64_t> rows(static_cast<size_t>(N));
    for (int64_t i = 0; i < N; ++i) rows[i] = n == N ? pos[i] : pos[i % Ll];
    act.pos = dev.upload_positions(rows);
  }
  act.layers.clear();
  act.layers.resize(static_cast<size_t>(m.num_layers()));
  DeviceTensor cur = dev.alloc(DType::f32, {B, Ll, D});
  dev.copy(cur, x);
  for (int l = 0; l < m.num_layers(); ++l) {
    const LayerParams p = m.layer(l);
    const LayerWeights w = m.weights(l);
    Activations::Layer& s = act.layers[l];
    s.x = std::move(cur);
    s.a = dev.alloc(DType::f32, {N, D}), s.mean1 = dev.alloc(DType::f32, {N}), s.rstd1 = dev.alloc(DType::f32, {N});
    norm_forward(dev, c, N, s.x.ptr<float>(), p.ln1_g, p.ln1_b, s.a.ptr<float>(), s.mean1.ptr<float>(),
                 s.rstd1.ptr<float>());
    s.qkv = dev.alloc(c.dtype, {N, C});  // bf16: the attention's inputs are rounded once, after RoPE
    DeviceTensor qkv32 = c.dtype == DType::f32 ? DeviceTensor() : dev.alloc(DType::f32, {N, C});
    float* qkv = c.dtype == DType::f32 ? s.qkv.ptr<float>() : qkv32.ptr<float>();
    dev.linear_forward(N, D, C, s.a.ptr<float>(), w.w_qkv, p.b_qkv, qkv, c.dtype);
    if (c.rope) rope_qk(m, N, qkv, act.pos.get(), false);
    if (c.dtype != DType::f32) dev.copy(s.qkv, qkv32);
    s.o = dev.alloc(DType::f32, {B, Ll, m.local_heads(), c.head_dim()});
    s.lse = dev.alloc(DType::f32, {B, m.local_heads(), Ll});
    const TensorView q = qkv_part(s.qkv, m, B, Ll, 0), k = qkv_part(s.qkv, m, B, Ll, 1),
                     v = qkv_part(s.qkv, m, B, Ll, 2);
    if (attention)
      attention(l, q, k, v, s.o, s.lse);
    else
      sequence_parallel_attention(dev, par, c, m.first_layer() + l, q, k, v, s.o, s.lse, act.documents);
    s.x1 = dev.alloc(DType::f32, {N, D});
    row_parallel_linear(dev, par, N, A, D, s.o.ptr<float>(), w.w_o, p.b_o, s.x1.ptr<float>(), c.dtype);
    dev.add(s.x1, flat(s.x, N, D));
    s.c = dev.alloc(DType::f32, {N, D}), s.mean2 = dev.alloc(DType::f32, {N}), s.rstd2 = dev.alloc(DType::f32, {N});
    norm_forward(dev, c, N, s.x1.ptr<float>(), p.ln2_g, p.ln2_b, s.c.ptr<float>(), s.mean2.ptr<float>(),
                 s.rstd2.ptr<float>());
    s.h = dev.alloc(DType::f32, {N, Fin}), s.g = dev.alloc(DType::f32, {N, F});
    dev.linear_forward(N, D, Fin, s.c.ptr<float>(), w.w_in, p.b_in, s.h.ptr<float>(), c.dtype);
    if (c.mlp == Mlp::swiglu)
      dev.swiglu_forward(N, F, s.h.ptr<float>(), s.g.ptr<float>());
    else
      dev.gelu_forward(N * F, s.h.ptr<float>(), s.g.ptr<float>());
    cur = dev.alloc(DType::f32, {B, Ll, D});
    row_parallel_linear(dev, par, N, F, D, s.g.ptr<float>(), w.w_out, p.b_out, cur.ptr<float>(), c.dtype);
    dev.add(flat(cur, N, D), s.x1);
    if (!act.keep) s = Activations::Layer();
  }
  return cur;
}

// dy: [B, Ll, D] -> dx: [B, Ll, D]; weight gradients accumulate into m.grads().
DeviceTensor model_backward(Model& m, const Activations& act, const TensorView& dy, const ModelParallel& par) {
  const ModelConfig& c = m.config();
  Device& dev = m.device();
  const int64_t B = act.B, Ll = act.Ll, N = B * Ll, D = c.d_model, C = m.local_qkv_width(), F = m.local_hidden();
  const int64_t A = m.local_heads() * c.head_dim(), Fin = c.mlp == Mlp::swiglu ? 2 * F : F;
  check(dy.rank == 3 && dy.dim(0) == B && dy.dim(1) == Ll && dy.dim(2) == D, "model gradient must be [", B, ", ", Ll,
        ", ", D, "], got ", dy.shape_str());
  DeviceTensor dcur = dev.alloc(DType::f32, {B, Ll, D});
  dev.copy(dcur, dy);
  const TensorView dcur_rows = flat(dcur, N, D);
  DeviceTensor dg = dev.alloc(DType::f32, {N, F}), dh = dev.alloc(DType::f32, {N, Fin}),
               dc = dev.alloc(DType::f32, {N, D}), dtmp = dev.alloc(DType::f32, {N, D}),
               dout = dev.alloc(DType::f32, {B, Ll, m.local_heads(), c.head_dim()}),
               dqkv = dev.alloc(DType::f32, {N, C}), da = dev.alloc(DType::f32, {N, D});
  for (int l = m.num_layers() - 1; l >= 0; --l) {
    const LayerParams p = std::as_const(m).layer(l);
    const LayerWeights w = m.weights(l);
    const LayerParams gp = m.layer_grads(l);
    const Activations::Layer& s = act.layers[l];
    // x2 = x1 + mlp(c)·W_out + b_out
    dev.linear_backward(N, F, D, s.g.ptr<float>(), w.w_out, dcur.ptr<float>(), dg.ptr<float>(), gp.w_out, gp.b_out,
                        c.dtype);
    if (c.mlp == Mlp::swiglu)
      dev.swiglu_backward(N, F, s.h.ptr<float>(), dg.ptr<float>(), dh.ptr<float>());
    else
      dev.gelu_backward(N * F, s.h.ptr<float>(), dg.ptr<float>(), dh.ptr<float>());
    dev.linear_backward(N, D, Fin, s.c.ptr<float>(), w.w_in, dh.ptr<float>(), dc.ptr<float>(), gp.w_in, gp.b_in,
                        c.dtype);
    reduce_input_grad(par, dc.ptr<float>(), N * D);
    norm_backward(dev, c, N, s.x1.ptr<float>(), p.ln2_g, s.mean2.ptr<float>(), s.rstd2.ptr<float>(), dc.ptr<float>(),
                  dtmp.ptr<float>(), gp.ln2_g, gp.ln2_b);
    dev.add(dcur_rows, dtmp);  // dL/dx1
    // x1 = x + o·W_o + b_o
    dev.linear_backward(N, A, D, s.o.ptr<float>(), w.w_o, dcur.ptr<float>(), dout.ptr<float>(), gp.w_o, gp.b_o,
                        c.dtype);
    attention_bwd(dev, par, c, m.first_layer() + l, qkv_part(s.qkv, m, B, Ll, 0), qkv_part(s.qkv, m, B, Ll, 1),
                  qkv_part(s.qkv, m, B, Ll, 2), s.o, s.lse, dout, qkv_part(dqkv, m, B, Ll, 0),
                  qkv_part(dqkv, m, B, Ll, 1), qkv_part(dqkv, m, B, Ll, 2), act.documents);
    if (c.rope) rope_qk(m, N, dqkv.ptr<float>(), act.pos.get(), true);
    dev.linear_backward(N, D, C, s.a.ptr<float>(), w.w_qkv, dqkv.ptr<float>(), da.ptr<float>(), gp.w_qkv, gp.b_qkv,
                        c.dtype);
    reduce_input_grad(par, da.ptr<float>(), N * D);
    norm_backward(dev, c, N, s.x.ptr<float>(), p.ln1_g, s.mean1.ptr<float>(), s.rstd1.ptr<float>(), da.ptr<float>(),
                  dtmp.ptr<float>(), gp.ln1_g, gp.ln1_b);
    dev.add(dcur_rows, dtmp);  // dL/dx
  }
  return dcur;
}

double mse_loss(const TensorView& y, const TensorView& target, const TensorView& dy, Communicator* comm,
                int64_t global_count, Device& dev) {
  check(same_shape(y, target) && same_shape(y, dy) && y.rank == target.rank, "loss: output ", y.shape_str(),
        " and target ", target.shape_str(), " differ");
  check(y.is_contiguous() && target.is_contiguous() && dy.is_contiguous() && y.dtype == DType::f32 &&
            target.dtype == DType::f32 && dy.dtype == DType::f32,
        "loss takes contiguous fp32 tensors");
  double sum = dev.squared_error(y.numel(), y.ptr<float>(), target.ptr<float>(), dy.ptr<float>(),
                                 2.f / static_cast<float>(global_count));
  if (comm) comm->all_reduce(&sum, 1, ReduceOp::sum);
  return sum / static_cast<double>(global_count);
}

}  // namespace ringattn
