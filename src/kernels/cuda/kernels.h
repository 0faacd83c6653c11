// The CUDA kernels' host entry points (src/kernels/cuda/*.cu). Each checks its
// preconditions with an Error that says what to fix, then queues its kernels on
// `stream`. Views point to device memory; positions (opt.q_pos/k_pos) too.
#pragma once
#include <cuda_runtime.h>

#include "ringattn/attention.h"
#include "ringattn/device.h"
#include "ringattn/tensor.h"

namespace ringattn::cuda {

// q: [B, Lq, H, d]  k, v: [B, Lk, Hkv, d]  (bf16 or fp16, last dim contiguous, d in {64, 128})
// o: [B, Lq, H, d] fp32 or q's dtype   lse: [B, H, Lq] fp32
void flash_forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                   const TensorView& lse, const AttentionOptions& opt, cudaStream_t stream);

// Whether flash_forward runs the Hopper kernel (attention_sm90.cu): a compute
// capability 9.0 GPU, a build with sm_90a code, a driver with the TMA map encoder,
// and RINGATTN_CUDA_FORWARD not "portable". RINGATTN_CUDA_FORWARD: auto (default),
// portable, or sm90 (an error where the Hopper kernel cannot run); anything else
// is an error.
bool sm90_forward_available();

// FlashAttention-2 backward: dq, dk, dv (fp32 or q's dtype) from q, k, v, o, lse, dout.
void flash_backward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                    const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
                    const TensorView& dv, const AttentionOptions& opt, cudaStream_t stream);

// (o_acc, lse_acc) := exact LSE merge with (o_part, lse_part); o_acc fp32.
void merge(const TensorView& o_acc, const TensorView& lse_acc, const TensorView& o_part, const TensorView& lse_part,
           cudaStream_t stream);

// Elementwise: dst := src (any strides, dtype conversion); x := value; acc += x.
void copy(const TensorView& dst, const TensorView& src, cudaStream_t stream);
void fill(const TensorView& x, float value, cudaStream_t stream);
void add(const TensorView& acc, const TensorView& x, cudaStream_t stream);
// x := uniform in [lo, hi) from a counter-based hash of (seed, index): benchmark
// inputs without a host round trip.
void fill_uniform(const TensorView& x, uint64_t seed, float lo, float hi, cudaStream_t stream);

// The token-local layers (layers.cu), layers.h's contracts on device pointers.
void layernorm_forward(int64_t N, int64_t C, const float* x, const float* gamma, const float* beta, float* y,
                       float* mean, float* rstd, float eps, cudaStream_t stream);
void layernorm_backward(int64_t N, int64_t C, const float* x, const float* gamma, const float* mean, const float* rstd,
                        const float* dy, float* dx, float* dgamma, float* dbeta, cudaStream_t stream);
void rmsnorm_forward(int64_t N, int64_t C, const float* x, const float* gamma, float* y, float* rstd, float eps,
                     cudaStream_t stream);
void rmsnorm_backward(int64_t N, int64_t C, const float* x, const float* gamma, const float* rstd, const float* dy,
                      float* dx, float* dgamma, cudaStream_t stream);
void swiglu_forward(int64_t N, int64_t F, const float* h, float* y, cudaStream_t stream);
void swiglu_backward(int64_t N, int64_t F, const float* h, const float* dy, float* dh, cudaStream_t stream);
// x [N, H, d] rows ld apart rotated by sign · fl(pos · inv_freq_i) (pos, inv_freq in device memory).
void rope(int64_t N, int64_t H, int64_t d, int64_t ld, float* x, const int64_t* pos, const float* inv_freq, float sign,
          cudaStream_t stream);
void gelu_forward(int64_t n, const float* x, float* y, cudaStream_t stream);
void gelu_backward(int64_t n, const float* x, const float* dy, float* dx, cudaStream_t stream);
// y[N, D] += b[D];  db[D] += Σ_rows dy[N, D]
void add_bias(int64_t N, int64_t D, float* y, const float* b, cudaStream_t stream);
void bias_grad(int64_t N, int64_t D, const float* dy, float* db, cudaStream_t stream);
// Σ (y − t)² (waits for the stream), dy = scale·(y − t).
double squared_error(int64_t n, const float* y, const float* t, float* dy, float scale, cudaStream_t stream);
void adamw(int64_t n, float* w, const float* g, float* m, float* v, const Device::AdamWStep& s, cudaStream_t stream);

}  // namespace ringattn::cuda
