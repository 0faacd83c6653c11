// Attention's contract, the same on every device (the CPU kernels in
// ringattn/cpu/attention.h, the CUDA kernels behind a Device, the distributed
// strategies in dist_attention.h):
//
//   q: [B, Lq, H, d]   k, v: [B, Lk, Hkv, d]   (strided views; H % Hkv == 0)
//   o: [B, Lq, H, d]   lse: [B, H, Lq] fp32 (natural log)
//
// Masks are by token position and document. Query i sees key j iff
//   q_doc[i] == k_doc[j]                                      (same document)
//   and q_pos[i] - window_left <= k_pos[j] <= q_pos[i] + window_right
// with -1 for an unbounded side; causal is window_right = 0 (flash-attn's
// window_size). Without explicit positions, q_pos[i] = i + (Lk - Lq) and
// k_pos[j] = j (the bottom-right alignment of flash-attn >= 2.1); without
// documents every token is in one. Packed documents come from cu_seqlens by
// documents() below. Rows that see no key give o = 0 and lse = -inf.
#pragma once
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "ringattn/tensor.h"

namespace ringattn {

enum class Isa;  // ringattn/cpu/features.h

struct AttentionOptions {
  float scale = std::numeric_limits<float>::quiet_NaN();  // NaN: 1/sqrt(d)
  bool causal = false;
  int64_t window_left = -1, window_right = -1;  // -1: unbounded; causal needs window_right <= 0
  std::span<const int64_t> q_pos;               // length Lq, or empty for the default
  std::span<const int64_t> k_pos;               // length Lk, or empty for the default
  std::span<const int64_t> q_doc;               // length Lq and k_doc length Lk, or both empty
  std::span<const int64_t> k_doc;
  int threads = 0;  // 0: the OpenMP default
  // Kernel path; empty means default_isa(). Tests use it to cross-check paths.
  const Isa* isa = nullptr;
  // Called by the calling thread between tiles (every millisecond or so) so the
  // caller can drive communication while the kernel computes, e.g. a ring's
  // Communicator::progress(). Kernels themselves never communicate.
  void (*progress)(void* ctx) = nullptr;
  void* progress_ctx = nullptr;
};

// With at most kDecodeRows query rows per GQA group (Lq·H/Hkv, e.g. decoding one
// token) a flash-decoding kernel runs instead of the tiled one: it reads each K/V
// row once, in place, in parallel over key chunks (memory-bound, like decoding).
inline constexpr int64_t kDecodeRows = 32;

// The sizes of one attention call, its scale (opt.scale, or 1/sqrt(d)) and its
// window with causal folded in (right = 0).
struct AttentionShape {
  int64_t B, Lq, Lk, H, Hkv, d;
  float scale;
  int64_t window_left, window_right;
};

// Whether a key at position kp may be seen from a query at qp under a window
// (-1: unbounded side); documents are compared separately.
inline bool in_window(int64_t qp, int64_t kp, int64_t left, int64_t right) {
  return (right < 0 || kp - qp <= right) && (left < 0 || qp - kp <= left);
}

// Packed variable-length documents, flash-attn's varlen convention:
// cu_seqlens_q = [0, ..., Lq] and cu_seqlens_k = [0, ..., Lk], one entry more
// than there are documents, never decreasing (an empty document is allowed);
// document n holds queries [cu_q[n], cu_q[n+1]) and keys [cu_k[n], cu_k[n+1]).
// Positions restart at 0 in each document, the queries bottom-right aligned to
// the keys when the two lengths differ. Point an AttentionOptions at them with
// apply(). Throws Error naming the offending entry.
struct Documents {
  std::vector<int64_t> q_pos, k_pos, q_doc, k_doc;
  void apply(AttentionOptions& opt) const;
};
Documents documents(std::span<const int32_t> cu_seqlens_q, std::span<const int32_t> cu_seqlens_k);
// Checks one cu_seqlens array against the length it must cover ("cu_seqlens_q", Lq).
void check_cu_seqlens(std::span<const int32_t> cu, int64_t L, const char* name);

// The contract above, checked once for every backend: ranks and sizes, one dtype
// for q, k and v, H % Hkv, o of q's shape, lse fp32 [B, H, Lq], positions of Lq
// and Lk entries, a positive finite scale. Throws Error naming the tensor and what
// to fix. Each backend then checks only its own limits (head dims, dtypes,
// alignment).
AttentionShape check_attention(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                               const TensorView& lse, const AttentionOptions& opt);
// The backward's extra tensors: dout and dq of q's shape, dk and dv of k's.
void check_attention_grads(const TensorView& q, const TensorView& k, const TensorView& dout, const TensorView& dq,
                           const TensorView& dk, const TensorView& dv);
// The exact merge of two partial results (o_acc, lse_acc) ⊕ (o_part, lse_part):
// o_acc fp32 [B, Lq, H, d], o_part of its shape, both lse fp32 [B, H, Lq].
void check_attention_merge(const TensorView& o_acc, const TensorView& lse_acc, const TensorView& o_part,
                           const TensorView& lse_part);

// Query-key pairs the mask of opt leaves visible (per batch and head), counted
// exactly in O((Lq + Lk) log Lk).
double attention_visible_pairs(int64_t Lq, int64_t Lk, const AttentionOptions& opt);
// FLOPs of the forward pass by docs/design.md §9: 4·B·H·d · (visible query-key pairs).
double attention_forward_flops(int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t d, const AttentionOptions& opt);
double attention_forward_flops(int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t d, bool causal);

}  // namespace ringattn
