// Local fused attention (flash-attention with online softmax) on the CPU, on
// host memory, for the contract of ringattn/attention.h.
#pragma once
#include "ringattn/attention.h"
#include "ringattn/cpu/features.h"
#include "ringattn/tensor.h"

namespace ringattn {

// o, lse := attention(q, k, v). o may be any dtype; lse must be fp32. Up to
// kDecodeRows query rows per GQA group run the flash-decoding kernel.
void attention_forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                       const TensorView& lse, const AttentionOptions& opt = {});

// dq, dk, dv := gradients of attention given o, lse from attention_forward and
// dout = dL/do (FlashAttention-2 with recomputation; dk, dv are summed over the
// query heads of each GQA group). dq/dk/dv may be any dtype; accumulation is fp32.
void attention_backward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                        const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
                        const TensorView& dv, const AttentionOptions& opt = {});

// Exact merge of two partial results for the same queries (docs/design.md §4):
//   lse = m + log(e^{lse_acc-m} + e^{lse_part-m}),  o = e^{lse_acc-lse} o_acc + e^{lse_part-lse} o_part
// in place into (o_acc, lse_acc). o_acc: [B, Lq, H, d] fp32; o_part any dtype;
// both lse fp32 [B, H, Lq]. Safe when either side is -inf (a row that saw no key).
// threads: 0 for the OpenMP default.
void attention_merge(const TensorView& o_acc, const TensorView& lse_acc, const TensorView& o_part,
                     const TensorView& lse_part, int threads = 0);

// The unfused baseline: per (batch, head) S = scale·Q Kᵀ materialized [Lq, Lk] by
// oneDNN GEMM, masked row softmax, then O = P V by GEMM. Same contract as
// attention_forward (fp32 or bf16 inputs; bf16 rounds P to bf16 for the second
// GEMM). O(Lq·Lk) memory: a benchmark baseline, not for long sequences.
void attention_forward_unfused(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                               const TensorView& lse, const AttentionOptions& opt = {});

}  // namespace ringattn
