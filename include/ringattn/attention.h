// Local fused attention (flash-attention with online softmax) on the CPU.
//
//   q: [B, Lq, H, d]   k, v: [B, Lk, Hkv, d]   (strided views; H % Hkv == 0)
//   o: [B, Lq, H, d]   lse: [B, H, Lq] fp32 (natural log)
//
// Causal masking is by global token position: query i sees key j iff
// k_pos[j] <= q_pos[i]. Without explicit positions, q_pos[i] = i + (Lk - Lq) and
// k_pos[j] = j (the bottom-right alignment of flash-attn >= 2.1). Rows that see no
// key give o = 0 and lse = -inf.
#pragma once
#include <cstdint>
#include <limits>
#include <span>

#include "ringattn/cpu.h"
#include "ringattn/tensor.h"

namespace ringattn {

struct AttentionOptions {
  float scale = std::numeric_limits<float>::quiet_NaN();  // NaN: 1/sqrt(d)
  bool causal = false;
  std::span<const int64_t> q_pos;  // length Lq, or empty for the default
  std::span<const int64_t> k_pos;  // length Lk, or empty for the default
  int threads = 0;                 // 0: the OpenMP default
  // Kernel path; empty means default_isa(). Tests use it to cross-check paths.
  const Isa* isa = nullptr;
  // Called by the calling thread between tiles (every millisecond or so) so the
  // caller can drive communication while the kernel computes, e.g. a ring's
  // Communicator::progress(). Kernels themselves never communicate.
  void (*progress)(void* ctx) = nullptr;
  void* progress_ctx = nullptr;
};

// o, lse := attention(q, k, v). o may be any dtype; lse must be fp32. With at most
// kDecodeRows query rows per GQA group (Lq·H/Hkv, e.g. decoding one token) a
// flash-decoding kernel runs instead of the tiled one: it reads each K/V row once,
// in place, in parallel over key chunks (memory-bound, like decoding itself).
inline constexpr int64_t kDecodeRows = 32;
void attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView& o, const TensorView& lse, const AttentionOptions& opt = {});

// dq, dk, dv := gradients of attention given o, lse from attention_forward and
// dout = dL/do (FlashAttention-2 with recomputation; dk, dv are summed over the
// query heads of each GQA group). dq/dk/dv may be any dtype; accumulation is fp32.
void attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                        const TensorView& o, const TensorView& lse, const TensorView& dout,
                        const TensorView& dq, const TensorView& dk, const TensorView& dv,
                        const AttentionOptions& opt = {});

// Exact merge of two partial results for the same queries (docs/design.md §4):
//   lse = m + log(e^{lse_acc-m} + e^{lse_part-m}),  o = e^{lse_acc-lse} o_acc + e^{lse_part-lse} o_part
// in place into (o_acc, lse_acc). o_acc: [B, Lq, H, d] fp32; o_part any dtype;
// both lse fp32 [B, H, Lq]. Safe when either side is -inf (a row that saw no key).
// threads: 0 for the OpenMP default.
void attention_merge(const TensorView& o_acc, const TensorView& lse_acc,
                     const TensorView& o_part, const TensorView& lse_part, int threads = 0);

// FLOPs of the forward pass by docs/design.md §9: 4·B·H·d · (visible query-key pairs).
double attention_forward_flops(int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t d, bool causal);

}  // namespace ringattn

namespace ringattn {

// The unfused baseline: per (batch, head) S = scale·Q Kᵀ materialized [Lq, Lk] by
// oneDNN GEMM, masked row softmax, then O = P V by GEMM. Same contract as
// attention_forward (fp32 or bf16 inputs; bf16 rounds P to bf16 for the second
// GEMM). O(Lq·Lk) memory: a benchmark baseline, not for long sequences.
void attention_forward_unfused(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                               const TensorView& lse, const AttentionOptions& opt = {});

}  // namespace ringattn
