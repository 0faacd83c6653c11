// Token-local transformer layers on the CPU, forward and backward, fp32.
// Activations are row-major [N, C] (N = tokens, C = features); each function
// begins with its shapes. Weight gradients are accumulated (+=) so that several
// micro-batches or shards can add into one buffer; activation gradients are
// overwritten.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "ringattn/dtype.h"
#include "ringattn/lm_config.h"

namespace ringattn {

// y = (x − mean) · rstd · gamma + beta over each row; saves mean, rstd [N].
void layernorm_forward(int64_t N, int64_t C, const float* x, const float* gamma, const float* beta, float* y,
                       float* mean, float* rstd, float eps = 1e-5f);
// dx = rstd · (dŷ − mean(dŷ) − x̂ · mean(dŷ ∘ x̂)) with dŷ = dy ∘ gamma;
// dgamma += Σ dy ∘ x̂, dbeta += Σ dy.
void layernorm_backward(int64_t N, int64_t C, const float* x, const float* gamma, const float* mean, const float* rstd,
                        const float* dy, float* dx, float* dgamma, float* dbeta);

// GELU, tanh form: y = x/2 · (1 + tanh(√(2/π) (x + 0.044715 x³))).
void gelu_forward(int64_t n, const float* x, float* y);
void gelu_backward(int64_t n, const float* x, const float* dy, float* dx);

// y[N, Cout] = x[N, Cin] · W[Cin, Cout] + b   (oneDNN GEMM). W is in the compute
// dtype: fp32, or bf16 for mixed precision (x is then rounded to bf16 and the
// products accumulate in fp32); x, b, y, dx, dW and db are fp32.
void linear_forward(int64_t N, int64_t Cin, int64_t Cout, const float* x, const void* W, const float* b, float* y,
                    DType compute = DType::f32);
// dx = dy · Wᵀ (skipped when dx is null); dW += xᵀ · dy; db += Σ_rows dy.
void linear_backward(int64_t N, int64_t Cin, int64_t Cout, const float* x, const void* W, const float* dy, float* dx,
                     float* dW, float* db, DType compute = DType::f32);

// ---- the language-model layers (llama, qwen2) ------------------------------------

// y = x · rstd · gamma over each row, rstd = 1 / √(mean(x²) + eps) (saved [N]).
void rmsnorm_forward(int64_t N, int64_t C, const float* x, const float* gamma, float* y, float* rstd, float eps);
// dx = rstd · (dŷ − x̂ · mean(dŷ ∘ x̂)) with x̂ = x · rstd, dŷ = dy ∘ gamma; dgamma += Σ dy ∘ x̂.
void rmsnorm_backward(int64_t N, int64_t C, const float* x, const float* gamma, const float* rstd, const float* dy,
                      float* dx, float* dgamma);

// SwiGLU: y = silu(g) ∘ u, silu(g) = g · σ(g)   (g, u, y: n elements).
void swiglu_forward(int64_t n, const float* g, const float* u, float* y);
// dg = dy ∘ u ∘ σ(g) · (1 + g · (1 − σ(g))),  du = dy ∘ silu(g).
void swiglu_backward(int64_t n, const float* g, const float* u, const float* dy, float* dg, float* du);

// RoPE's inverse frequencies, as Hugging Face computes them (design.md §11):
// inv_freq_i = theta^(−2i / head_dim), i < head_dim / 2, then per rope.type:
// "linear" divides by factor; "llama3" divides the low frequencies (wavelength
// above original_max_positions / low_freq_factor) by factor, keeps the high ones
// (below original_max_positions / high_freq_factor) and blends in between.
std::vector<float> rope_inv_freq(const RopeConfig& rope, int64_t head_dim);

// x: [N, H, d] (rows of N tokens, H heads; token t's row starts at x + t·ld,
// ld >= H·d) rotated in place by each token's *global* position pos[N] (HF's
// rotate_half pairing: element i with i + d/2), inv_freq: [d/2]:
//   a = fl(pos · inv_freq_i),  x_i' = x_i cos a − x_{i+d/2} sin a,  x_{i+d/2}' = x_{i+d/2} cos a + x_i sin a.
// The backward (inverse = transpose) rotates by −a.
void rope_forward(int64_t N, int64_t H, int64_t d, int64_t ld, float* x, const int64_t* pos, const float* inv_freq);
void rope_backward(int64_t N, int64_t H, int64_t d, int64_t ld, float* dx, const int64_t* pos, const float* inv_freq);

// SwiGLU on the rows of a fused gate|up projection: h [N, 2F] (gate columns
// 0..F−1, up columns F..2F−1) -> y [N, F] = silu(gate) ∘ up; the backward
// writes dh [N, 2F] from dy [N, F].
void swiglu_rows_forward(int64_t N, int64_t F, const float* h, float* y);
void swiglu_rows_backward(int64_t N, int64_t F, const float* h, const float* dy, float* dh);

// A vocabulary split over processes (the vocabulary-parallel LM head,
// Megatron's): this one holds logit columns / head rows [first, first + Vl) of
// a vocabulary of `vocab`, and reduce(x, n, max) combines n per-row statistics
// over all the shards, in place (their max when max is true, else their sum),
// the same on every shard. The default is the whole vocabulary on one process.
struct VocabShard {
  int64_t first = 0, vocab = 0;  // vocab 0: Vl, the shard is the vocabulary
  std::function<void(double* x, int64_t n, bool max)> reduce;
};

// Softmax and next-token cross-entropy of logit rows z [rows, Vl] (this shard's
// columns), in place: each row with label ≥ 0 (a vocabulary id) becomes
// scale · (softmax − onehot(label)), a row with −1 becomes 0; returns
// Σ −log softmax(z)[label] (unscaled), the whole rows' on every shard. The
// softmax is over the whole vocabulary: lse = M + ln Σ_shards Σ e^(z − M), M the
// rows' max over all shards. Labels are not checked.
double softmax_cross_entropy_rows(int64_t rows, int64_t Vl, float* z, const int64_t* labels, float scale,
                                  const VocabShard& shard = {});

// The LM head and next-token cross-entropy without the whole [N, V] logits:
// rows are taken `chunk` at a time, logits = h · Wᵀ (W: the head [Vl, D], this
// shard's rows), and for every row with label ≥ 0 (−1: no target)
//   loss += −log softmax(logits)[label],  dlogits = scale · (softmax − onehot(label)),
//   dh = dlogits · W (overwritten; rows without a label get 0),  dW += dlogitsᵀ · h.
// With a vocabulary shard dh is this shard's part (the sum over the shards is
// dL/dh) and the loss is the whole vocabulary's. Returns the summed loss
// (unscaled); dh and dW may be null (forward only).
double lm_head_cross_entropy(int64_t N, int64_t D, int64_t Vl, const float* h, const float* W, const int64_t* labels,
                             float scale, float* dh, float* dW, int64_t chunk = 256, const VocabShard& shard = {});

}  // namespace ringattn
