// Token-local transformer layers on the CPU, forward and backward, fp32.
// Activations are row-major [N, C] (N = tokens, C = features); each function
// begins with its shapes. Weight gradients are accumulated (+=) so that several
// micro-batches or shards can add into one buffer; activation gradients are
// overwritten.
#pragma once
#include <cstdint>

#include "ringattn/dtype.h"

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

}  // namespace ringattn
