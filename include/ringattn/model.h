// The decoder-only transformer (docs/design.md §1, §11), fp32 or bf16 mixed
// precision, with hand-written backward and AdamW, on one process or parallel
// (RA+SP: every activation sharded by sequence, token-local layers on the local
// shard, attention by the ring, Ulysses or all-gather; TP; PP). The architecture
// is the config: pre-LayerNorm + GELU with biases (gpt2, and the vector model of
// the benchmarks), or RMSNorm + SwiGLU + RoPE (llama; qwen2 adds q/k/v biases).
//
//   per layer:  a = norm1(x);  [q k v] = a·W_qkv + b_qkv;  q, k = RoPE(q, k; global positions)
//               o = attention(q, k, v);  x1 = x + o·W_o + b_o;  c = norm2(x1)
//               x2 = x1 + mlp(c)·W_out + b_out,  mlp(c) = GELU(c·W_in + b_in) or SwiGLU(c·[W_gate | W_up])
//
// A language model (vocab > 0) adds the token embedding (and gpt2's learned
// positions) before the first layer and the final norm and LM head after the
// last (lm.h); the vector model takes and returns [B, L, d_model] activations.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "ringattn/comm.h"
#include "ringattn/device.h"
#include "ringattn/dist_attention.h"
#include "ringattn/lm_config.h"
#include "ringattn/parallel.h"
#include "ringattn/tensor.h"

namespace ringattn {

enum class Norm { layernorm, rmsnorm };
enum class Mlp { gelu, swiglu };

struct ModelConfig {
  int64_t layers = 4, d_model = 256, heads = 4, kv_heads = 0, mlp_hidden = 0;
  int64_t head_size = 0;  // 0: d_model / heads
  bool causal = true;
  uint64_t seed = 1;
  // Compute dtype: fp32, or bf16 mixed precision (GEMM operands and attention
  // q, k, v, KV cache in bf16; fp32 accumulation, activations between layers,
  // norms, MLP activations, gradients, master weights and AdamW in fp32).
  DType dtype = DType::f32;
  // The architecture (the defaults are the pre-LayerNorm GELU transformer).
  Norm norm = Norm::layernorm;
  Mlp mlp = Mlp::gelu;
  bool qkv_bias = true, o_bias = true, mlp_bias = true;
  float norm_eps = 1e-5f;
  bool rope = false;  // RoPE on q and k by the tokens' global positions
  RopeConfig rope_config;
  // A language model when vocab > 0: embedding [vocab, d_model], learned
  // positions [positions, d_model] when positions > 0 (gpt2), final norm, LM
  // head [vocab, d_model] (the embedding itself when tied).
  int64_t vocab = 0, positions = 0;
  bool tied = false;
  // Sliding-window attention (mistral, qwen2): on the layers marked in
  // window_layers ([layers], or empty for every layer), a query sees its `window`
  // most recent keys, itself included. 0: full attention everywhere. Needs causal.
  int64_t window = 0;
  std::vector<bool> window_layers;

  // The attention window's left side on global layer l (attention.h): window − 1, or −1.
  int64_t window_left(int64_t l) const {
    return window > 0 && (window_layers.empty() || window_layers[static_cast<size_t>(l)]) ? window - 1 : -1;
  }
  int64_t head_dim() const { return head_size > 0 ? head_size : d_model / heads; }
  int64_t kv() const { return kv_heads > 0 ? kv_heads : heads; }
  int64_t hidden() const { return mlp_hidden > 0 ? mlp_hidden : 4 * d_model; }
  int64_t qkv_width() const { return (heads + 2 * kv()) * head_dim(); }
  bool is_lm() const { return vocab > 0; }
  void validate() const;  // throws Error naming the bad field
};

// The architecture of a Hugging Face checkpoint's config.json as a ModelConfig
// (fp32; dtype and seed are the run's).
ModelConfig model_config(const LmConfig& lm);

// Checks that the model splits over the run's mesh: layers by pp; heads, kv
// heads and MLP columns by tp; heads by the Ulysses group (ulysses: the SP
// group; hybrid: its Ulysses degree). Throws Error naming the sizes.
void check_model_fits(const ModelConfig& c, const ParallelConfig& p);

// The first vocabulary row TP rank r of tp holds (r = tp: the vocabulary's end).
inline int64_t vocab_row(int64_t vocab, int tp, int r) { return r * vocab / tp; }

// One layer's parameters (or gradients): pointers into a flat fp32 array; null
// for what the architecture has not (norm biases under RMSNorm, the biases a
// config turns off). W_in is [D, F] (GELU) or [D, 2F] with the gate columns
// first, then the up columns (SwiGLU).
struct LayerParams {
  float *ln1_g, *ln1_b, *w_qkv, *b_qkv, *w_o, *b_o, *ln2_g, *ln2_b, *w_in, *b_in, *w_out, *b_out;
};

// A language model's parameters outside the layers (null where this rank holds
// none: the embedding lives on the first pipeline stage, the final norm and head
// on the last; head is the embedding when tied; under PP the last stage then
// holds a copy of it, kept equal by summing both copies' gradients, lm.h).
// Under TP the embedding and head are the rank's vocabulary rows [local_vocab, D].
struct LmParams {
  float *embed, *pos_embed, *norm_g, *norm_b, *head;
};

// The weight matrices the GEMMs read, in the model's compute dtype.
struct LayerWeights {
  const void *w_qkv, *w_o, *w_in, *w_out;
};

// Parameters and their gradients, each one flat fp32 array (one all-reduce, one
// optimizer loop). Initialised from config.seed: the same function on every rank
// and for every parallel layout.
//
// Tensor parallelism (Megatron): with tp > 1 the model holds rank tp_rank's
// slice: heads/tp query heads and kv_heads/tp key/value heads (columns of W_qkv,
// b_qkv; rows of W_o) and hidden/tp MLP columns (columns of W_in, b_in; rows of
// W_out), and a language model's vocabulary rows vocab_first() ..
// + local_vocab() − 1 of the embedding and head (the vocabulary-parallel
// embedding and head: the embedding sums over the TP group, the softmax's
// statistics and dL/dy of the head are reduced over it). Norms, learned
// positions and the biases b_o, b_out are replicated.
// Pipeline parallelism: with pp > 1 the model holds the layers of stage
// pp_stage only (layers/pp consecutive layers). Slices are cut from the full
// initialisation.
// Device: parameters, gradients, activations and every layer's work live on
// `device` (nullptr: the host). The initialisation is made on the host and
// copied there, so a model is the same on every device. A model on a GPU
// computes in bf16 (the CUDA attention kernels take bf16/fp16) and runs
// sequence parallelism only (TP and PP move activations through host memory).
class Model {
 public:
  // init: the parameters drawn from cfg.seed, or zeros (a model about to be
  // loaded: no full model is drawn to be cut).
  enum class Init { seed, zeros };
  explicit Model(const ModelConfig& cfg, int tp = 1, int tp_rank = 0, int pp = 1, int pp_stage = 0,
                 Device* device = nullptr, Init init = Init::seed);
  Model(const Model&) = delete;  // the storage may be a GPU's: no implicit copies
  Model& operator=(const Model&) = delete;
  Model(Model&&) = default;
  Model& operator=(Model&&) = default;
  const ModelConfig& config() const { return cfg_; }
  Device& device() const { return *dev_; }
  int tp() const { return tp_; }
  int tp_rank() const { return tp_rank_; }
  int num_layers() const { return num_layers_; }    // layers held here
  int first_layer() const { return first_layer_; }  // global index of layer 0 here
  int64_t local_heads() const { return cfg_.heads / tp_; }
  int64_t local_kv() const { return cfg_.kv() / tp_; }
  int64_t local_hidden() const { return cfg_.hidden() / tp_; }
  int64_t local_qkv_width() const { return (local_heads() + 2 * local_kv()) * cfg_.head_dim(); }
  // A language model's vocabulary rows of the embedding and head held here:
  // vocab_first() .. vocab_first() + local_vocab() − 1 (an even split of any
  // vocabulary size over tp).
  int64_t vocab_first() const { return vocab_row(cfg_.vocab, tp_, tp_rank_); }
  int64_t local_vocab() const { return vocab_row(cfg_.vocab, tp_, tp_rank_ + 1) - vocab_first(); }
  // The full model's column of this slice's column j of W_qkv / W_in.
  int64_t full_qkv_column(int64_t j) const;
  int64_t full_mlp_column(int64_t j) const;
  // Copies this rank's slice of `full` (a tp = 1, pp = 1 model of the same
  // config): parameters, or gradients when grads is true. Both on the host.
  void copy_slice_from(const Model& full, bool grads);
  int64_t num_params() const { return params_.numel(); }
  // Parameters and gradients in the device's memory (the host's for the CPU).
  // Non-const access may change the parameters: the bf16 working copy is
  // re-rounded before the next use.
  float* params() { return shadow_stale_ = true, params_.ptr<float>(); }
  const float* params() const { return params_.ptr<float>(); }
  // The gradients exist from the first use on (zeros): a model only run
  // forward never holds them.
  float* grads() { return grads_or_zeros().ptr<float>(); }
  const float* grads() const { return grads_or_zeros().ptr<float>(); }
  // Host copies of both, from any device.
  std::vector<float> host_params() const;
  std::vector<float> host_grads() const;
  LayerParams layer(int l) { return shadow_stale_ = true, view(params(), l); }
  LayerParams layer_grads(int l) { return view(grads(), l); }
  LayerParams layer(int l) const { return view(const_cast<float*>(params()), l); }
  // The embedding / final norm / head (language models), parameters or gradients.
  LmParams lm() { return shadow_stale_ = true, lm_view(params()); }
  LmParams lm() const { return lm_view(const_cast<float*>(params())); }
  LmParams lm_grads() { return lm_view(grads()); }
  bool first_stage() const { return first_layer_ == 0; }
  bool last_stage() const { return first_layer_ + num_layers_ == cfg_.layers; }
  // RoPE's inverse frequencies [head_dim / 2] on the model's device (rope only).
  const float* rope_inv_freq() const { return inv_freq_.ptr<float>(); }
  // Layer l's weights for the GEMMs: the fp32 parameters, or (bf16) their
  // bf16-rounded working copy, kept in step with the fp32 master parameters.
  LayerWeights weights(int l) const;
  void zero_grads();

 private:
  LayerParams view(float* base, int l) const;
  LmParams lm_view(float* base) const;
  void init_full();  // the tp = 1, pp = 1 initialisation from cfg_.seed, on the host
  std::vector<int64_t> layer_sizes() const;
  std::vector<int64_t> lm_sizes() const;  // LmParams order, this stage's
  ModelConfig cfg_;
  int tp_ = 1, tp_rank_ = 0, num_layers_ = 0, first_layer_ = 0;
  int64_t per_layer_ = 0;
  Device* dev_;
  const DeviceTensor& grads_or_zeros() const;
  DeviceTensor params_;          // fp32 [num_params] on dev_: the layers, then LmParams
  mutable DeviceTensor grads_;   // the same, allocated at the first use of the gradients
  DeviceTensor inv_freq_;        // fp32 [head_dim / 2] (rope)
  mutable DeviceTensor shadow_;  // bf16 copy of params_ (bf16 models)
  mutable bool shadow_stale_ = true;
};

// What the forward keeps for the backward, on the model's device. With keep =
// false (inference) each layer's tensors are freed as soon as the next layer has
// its input.
struct Activations {
  int64_t B = 0, Ll = 0;
  bool keep = true;
  std::shared_ptr<const int64_t> pos;           // [B·Ll] global positions (rope), on the model's device
  std::vector<std::vector<int32_t>> documents;  // model_forward's packed documents per row (empty: none)
  struct Layer {
    DeviceTensor x, a, mean1, rstd1, qkv, o, lse, x1, c, mean2, rstd2, h, g;
  };
  std::vector<Layer> layers;
};

// This rank's slice of the model for a run: its TP and PP indices, on the run's
// device.
Model model_for(const ModelConfig& c, const RunContext& run, Model::Init init = Model::Init::seed);

// The attention of layer `layer` (index among the layers held here) on this
// rank's tokens: q [B, Ll, heads, dh], k, v [B, Ll, kv_heads, dh] (local heads
// under TP) -> o [B, Ll, heads, dh], lse [B, heads, Ll]. Inference uses it to fill
// and read the KV cache; empty means the ModelParallel's attention.
using AttentionHook = std::function<void(int layer, const TensorView& q, const TensorView& k, const TensorView& v,
                                         const TensorView& o, const TensorView& lse)>;

// The config's norm (LayerNorm or RMSNorm; b, mean, db unused by RMSNorm) on
// rows [N, d_model] in dev's memory.
void norm_forward(Device& dev, const ModelConfig& c, int64_t N, const float* x, const float* g, const float* b,
                  float* y, float* mean, float* rstd);
void norm_backward(Device& dev, const ModelConfig& c, int64_t N, const float* x, const float* g, const float* mean,
                   const float* rstd, const float* dy, float* dx, float* dg, float* db);

// The TP group of par that m is a slice of (null when m holds every head and
// vocabulary row); Error when the group's size is not m's tp.
Communicator* tp_group(const Model& m, const ModelParallel& par);

// The sequence the SP group's shards make: every SP rank's Ll gathered (one
// all-gather) and summed, after checking that each is what par's layout gives
// its rank (else Error, on every rank, "<what>: SP rank r holds n tokens, but
// ..."); Ll on one process. Shards may differ by a token or two.
int64_t sp_sequence_length(const ModelParallel& par, int64_t Ll, const char* what);

// Global positions of this rank's Ll tokens: those of par's SP layout over
// sp_sequence_length, 0..Ll−1 on one process.
std::vector<int64_t> local_positions(const ModelParallel& par, int64_t Ll);

// x: [B, Ll, D] -> y: [B, Ll, D] (this rank's tokens), both on the model's device.
// positions: the tokens' global positions for RoPE, [Ll] shared by the rows or
// [B·Ll] per row (empty: local_positions); a decode step passes each sequence's
// length. documents: packed documents, one cu_seqlens [n_docs + 1] per row over
// the row's whole (global) length (dist_attention.h): attention never crosses
// one; empty: each row is one document. Packed rows usually pass positions that
// restart in each document too.
DeviceTensor model_forward(const Model& m, const TensorView& x, const ModelParallel& par, Activations& act,
                           const AttentionHook& attention = {}, std::span<const int64_t> positions = {},
                           std::span<const std::vector<int32_t>> documents = {});
// The attention of the forward without a hook: local, or distributed over par.sp,
// on `dev`, with the mask of global layer `layer` (causal, its window) and the
// rows' packed documents (as model_forward's; each row then attends on its own).
void sequence_parallel_attention(Device& dev, const ModelParallel& par, const ModelConfig& c, int64_t layer,
                                 const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                                 const TensorView& lse, std::span<const std::vector<int32_t>> documents = {});
// dy = dL/dy [B, Ll, D]: adds this rank's weight gradients into m.grads() (not
// reduced across ranks) and returns dL/dx (on the model's device).
DeviceTensor model_backward(Model& m, const Activations& act, const TensorView& dy, const ModelParallel& par);

// Mean squared error over the whole (global) batch: Σ (y − t)² / global_count,
// summed over comm when given. Writes dL/dy for the local elements into dy. The
// tensors are in dev's memory.
double mse_loss(const TensorView& y, const TensorView& target, const TensorView& dy, Communicator* comm,
                int64_t global_count, Device& dev = cpu_device());

}  // namespace ringattn
