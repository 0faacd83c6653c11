// The token-local layers on the GPU (layers.h's contracts): LayerNorm, RMSNorm,
// GELU, SwiGLU, RoPE, bias, the squared error of the loss and AdamW. Row-wise work takes one warp per
// row; sums over rows (dgamma, dbeta, db) are deterministic: per-chunk partial
// sums, then a fixed-order sum of the chunks. The linear layers are cuBLAS
// (cuda_device.cpp).
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "kernels/cuda/cuda_device.h"
#include "kernels/cuda/kernels.h"
#include "ringattn/error.h"

namespace ringattn::cuda {
namespace {

constexpr float kGeluC = 0.7978845608028654f;  // √(2/π)
constexpr int kRowsPerChunk = 64;              // rows per partial sum of a column

__device__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

unsigned blocks(int64_t threads, int per_block = 256) {
  return static_cast<unsigned>(std::min<int64_t>((threads + per_block - 1) / per_block, 1 << 20));
}

void launched(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw Error(cat("CUDA launching ", what, ": ", cudaGetErrorString(e)));
}

// x, y: [N, C]   gamma, beta: [C]   mean, rstd: [N]; a warp per row (grid-stride).
__global__ void layernorm_forward_kernel(int64_t N, int64_t C, const float* x, const float* gamma, const float* beta,
                                         float* y, float* mean, float* rstd, float eps) {
  const int lane = threadIdx.x % 32;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; i < N;
       i += int64_t(gridDim.x) * blockDim.x / 32) {
    const float* xi = x + i * C;
    float s = 0;
    for (int64_t c = lane; c < C; c += 32) s += xi[c];
    const float m = warp_sum(s) / float(C);
    float s2 = 0;
    for (int64_t c = lane; c < C; c += 32) s2 += (xi[c] - m) * (xi[c] - m);
    const float r = rsqrtf(warp_sum(s2) / float(C) + eps);
    for (int64_t c = lane; c < C; c += 32) y[i * C + c] = (xi[c] - m) * r * gamma[c] + beta[c];
    if (lane == 0) mean[i] = m, rstd[i] = r;
  }
}

// dx = rstd · (dŷ − mean(dŷ) − x̂ · mean(dŷ ∘ x̂)), dŷ = dy ∘ gamma; a warp per row (grid-stride).
__global__ void layernorm_dx_kernel(int64_t N, int64_t C, const float* x, const float* gamma, const float* mean,
                                    const float* rstd, const float* dy, float* dx) {
  const int lane = threadIdx.x % 32;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; i < N;
       i += int64_t(gridDim.x) * blockDim.x / 32) {
    const float* xi = x + i * C;
    const float* dyi = dy + i * C;
    float a = 0, b = 0;
    for (int64_t c = lane; c < C; c += 32) {
      const float dyh = dyi[c] * gamma[c];
      a += dyh;
      b += dyh * (xi[c] - mean[i]) * rstd[i];
    }
    const float ma = warp_sum(a) / float(C), mb = warp_sum(b) / float(C);
    for (int64_t c = lane; c < C; c += 32) {
      const float xh = (xi[c] - mean[i]) * rstd[i];
      dx[i * C + c] = rstd[i] * (dyi[c] * gamma[c] - ma - xh * mb);
    }
  }
}

// x, y: [N, C]   gamma: [C]   rstd: [N]; y = x · rstd · gamma, rstd = 1/√(mean(x²) + eps).
__global__ void rmsnorm_forward_kernel(int64_t N, int64_t C, const float* x, const float* gamma, float* y, float* rstd,
                                       float eps) {
  const int lane = threadIdx.x % 32;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; i < N;
       i += int64_t(gridDim.x) * blockDim.x / 32) {
    const float* xi = x + i * C;
    float s2 = 0;
    for (int64_t c = lane; c < C; c += 32) s2 += xi[c] * xi[c];
    const float r = rsqrtf(warp_sum(s2) / float(C) + eps);
    for (int64_t c = lane; c < C; c += 32) y[i * C + c] = xi[c] * r * gamma[c];
    if (lane == 0) rstd[i] = r;
  }
}

// dx = rstd · (dŷ − x̂ · mean(dŷ ∘ x̂)), x̂ = x · rstd, dŷ = dy ∘ gamma; a warp per row.
__global__ void rmsnorm_dx_kernel(int64_t N, int64_t C, const float* x, const float* gamma, const float* rstd,
                                  const float* dy, float* dx) {
  const int lane = threadIdx.x % 32;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; i < N;
       i += int64_t(gridDim.x) * blockDim.x / 32) {
    const float* xi = x + i * C;
    const float* dyi = dy + i * C;
    float b = 0;
    for (int64_t c = lane; c < C; c += 32) b += dyi[c] * gamma[c] * xi[c] * rstd[i];
    const float mb = warp_sum(b) / float(C);
    for (int64_t c = lane; c < C; c += 32) dx[i * C + c] = rstd[i] * (dyi[c] * gamma[c] - xi[c] * rstd[i] * mb);
  }
}

// h: [N, 2F] (gate | up)   y: [N, F] = silu(gate) ∘ up
__global__ void swiglu_forward_kernel(int64_t N, int64_t F, const float* h, float* y) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < N * F; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / F, j = e % F;
    const float g = h[i * 2 * F + j], u = h[i * 2 * F + F + j];
    y[e] = g / (1.f + expf(-g)) * u;
  }
}

// dgate = dy ∘ up ∘ σ(g)(1 + g(1 − σ(g))),  dup = dy ∘ silu(g)
__global__ void swiglu_backward_kernel(int64_t N, int64_t F, const float* h, const float* dy, float* dh) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < N * F; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / F, j = e % F;
    const float g = h[i * 2 * F + j], u = h[i * 2 * F + F + j], s = 1.f / (1.f + expf(-g));
    dh[i * 2 * F + j] = dy[e] * u * s * (1.f + g * (1.f - s));
    dh[i * 2 * F + F + j] = dy[e] * g * s;
  }
}

// One thread per (token, head, pair i): a = fl(pos · inv_freq_i), rotated by sign · a.
__global__ void rope_kernel(int64_t N, int64_t H, int64_t d, int64_t ld, float* x, const int64_t* pos,
                            const float* inv_freq, float sign) {
  const int64_t half = d / 2;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < N * H * half;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = e / (H * half), h = e / half % H, i = e % half;
    const float a = float(pos[t]) * inv_freq[i];
    const float c = float(cos(double(a))), s = sign * float(sin(double(a)));
    float* row = x + t * ld + h * d;
    const float x1 = row[i], x2 = row[i + half];
    row[i] = x1 * c - x2 * s;
    row[i + half] = x2 * c + x1 * s;
  }
}

// part[chunk, 2, C]: Σ over the chunk's rows of dy ∘ x̂ (first) and dy (second);
// x̂ = (x − mean) · rstd when x is given (LayerNorm; mean null: RMSNorm's
// x · rstd), else both are Σ dy (a bias).
__global__ void column_partials_kernel(int64_t N, int64_t C, const float* x, const float* mean, const float* rstd,
                                       const float* dy, float* part) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, chunk = blockIdx.y;
  if (c >= C) return;
  float sg = 0, sb = 0;
  const int64_t end = min(N, (chunk + 1) * kRowsPerChunk);
  for (int64_t i = chunk * kRowsPerChunk; i < end; ++i) {
    const float d = dy[i * C + c];
    sg += x ? d * (x[i * C + c] - (mean ? mean[i] : 0.f)) * rstd[i] : d;
    sb += d;
  }
  part[(chunk * 2) * C + c] = sg;
  part[(chunk * 2 + 1) * C + c] = sb;
}

// g[c] += Σ_chunks part[chunk, 0, c] (when g), b[c] += Σ_chunks part[chunk, 1, c] (when b).
__global__ void column_sums_kernel(int64_t C, int64_t chunks, const float* part, float* g, float* b) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double sg = 0, sb = 0;
  for (int64_t k = 0; k < chunks; ++k) sg += part[(k * 2) * C + c], sb += part[(k * 2 + 1) * C + c];
  if (g) g[c] += float(sg);
  if (b) b[c] += float(sb);
}

// Adds the column sums of dy (and of dy ∘ x̂ when x is given) into g and b.
void column_sums(int64_t N, int64_t C, const float* x, const float* mean, const float* rstd, const float* dy, float* g,
                 float* b, cudaStream_t stream) {
  const int64_t chunks = (N + kRowsPerChunk - 1) / kRowsPerChunk;
  ringattn::check(chunks <= 65535, "N=", N, " rows are more than the column sums handle (", 65535 * kRowsPerChunk, ")");
  float* part = nullptr;
  check(cudaMallocAsync(reinterpret_cast<void**>(&part), chunks * 2 * C * sizeof(float), stream),
        "allocating the column sums' partials");
  column_partials_kernel<<<dim3(blocks(C), static_cast<unsigned>(chunks)), 256, 0, stream>>>(N, C, x, mean, rstd, dy,
                                                                                             part);
  launched("the column partial sums");
  column_sums_kernel<<<blocks(C), 256, 0, stream>>>(C, chunks, part, g, b);
  launched("the column sums");
  cudaFreeAsync(part, stream);
}

__global__ void gelu_forward_kernel(int64_t n, const float* x, float* y) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float u = kGeluC * (x[i] + 0.044715f * x[i] * x[i] * x[i]);
    y[i] = 0.5f * x[i] * (1.f + tanhf(u));
  }
}

// dy/dx = ½(1 + tanh u) + ½ x (1 − tanh² u) · √(2/π)(1 + 3·0.044715 x²)
__global__ void gelu_backward_kernel(int64_t n, const float* x, const float* dy, float* dx) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float u = kGeluC * (x[i] + 0.044715f * x[i] * x[i] * x[i]);
    const float t = tanhf(u);
    const float du = kGeluC * (1.f + 3.f * 0.044715f * x[i] * x[i]);
    dx[i] = dy[i] * (0.5f * (1.f + t) + 0.5f * x[i] * (1.f - t * t) * du);
  }
}

// y: [N, D] += b: [D]
__global__ void add_bias_kernel(int64_t N, int64_t D, float* y, const float* b) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N * D; i += int64_t(gridDim.x) * blockDim.x)
    y[i] += b[i % D];
}

// part[block] = Σ (y − t)² over the block's elements (double); dy = scale·(y − t).
__global__ void squared_error_kernel(int64_t n, const float* y, const float* t, float* dy, float scale, double* part) {
  __shared__ double warp_part[8];
  double s = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float e = y[i] - t[i];
    s += double(e) * e;
    dy[i] = scale * e;
  }
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (threadIdx.x % 32 == 0) warp_part[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double b = 0;
    for (int w = 0; w < 8; ++w) b += warp_part[w];
    part[blockIdx.x] = b;
  }
}

__global__ void adamw_kernel(int64_t n, float* w, const float* g, float* m, float* v, Device::AdamWStep s) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    m[i] = s.beta1 * m[i] + (1.f - s.beta1) * g[i];
    v[i] = s.beta2 * v[i] + (1.f - s.beta2) * g[i] * g[i];
    w[i] -= s.lr * ((m[i] / s.c1) / (sqrtf(v[i] / s.c2) + s.eps) + s.weight_decay * w[i]);
  }
}

}  // namespace

void layernorm_forward(int64_t N, int64_t C, const float* x, const float* gamma, const float* beta, float* y,
                       float* mean, float* rstd, float eps, cudaStream_t stream) {
  if (N == 0) return;
  layernorm_forward_kernel<<<blocks(N * 32), 256, 0, stream>>>(N, C, x, gamma, beta, y, mean, rstd, eps);
  launched("the LayerNorm forward");
}

void layernorm_backward(int64_t N, int64_t C, const float* x, const float* gamma, const float* mean, const float* rstd,
                        const float* dy, float* dx, float* dgamma, float* dbeta, cudaStream_t stream) {
  if (N == 0) return;
  ringattn::check(N <= 65535 * int64_t(kRowsPerChunk), "LayerNorm backward: N=", N,
                  " rows are more than the column "
                  "sums handle (",
                  65535 * kRowsPerChunk, ")");
  layernorm_dx_kernel<<<blocks(N * 32), 256, 0, stream>>>(N, C, x, gamma, mean, rstd, dy, dx);
  launched("the LayerNorm backward");
  column_sums(N, C, x, mean, rstd, dy, dgamma, dbeta, stream);
}

void rmsnorm_forward(int64_t N, int64_t C, const float* x, const float* gamma, float* y, float* rstd, float eps,
                     cudaStream_t stream) {
  if (N == 0) return;
  rmsnorm_forward_kernel<<<blocks(N * 32), 256, 0, stream>>>(N, C, x, gamma, y, rstd, eps);
  launched("the RMSNorm forward");
}

void rmsnorm_backward(int64_t N, int64_t C, const float* x, const float* gamma, const float* rstd, const float* dy,
                      float* dx, float* dgamma, cudaStream_t stream) {
  if (N == 0) return;
  rmsnorm_dx_kernel<<<blocks(N * 32), 256, 0, stream>>>(N, C, x, gamma, rstd, dy, dx);
  launched("the RMSNorm backward");
  column_sums(N, C, x, nullptr, rstd, dy, dgamma, nullptr, stream);
}

void swiglu_forward(int64_t N, int64_t F, const float* h, float* y, cudaStream_t stream) {
  if (N * F == 0) return;
  swiglu_forward_kernel<<<blocks(N * F), 256, 0, stream>>>(N, F, h, y);
  launched("the SwiGLU forward");
}

void swiglu_backward(int64_t N, int64_t F, const float* h, const float* dy, float* dh, cudaStream_t stream) {
  if (N * F == 0) return;
  swiglu_backward_kernel<<<blocks(N * F), 256, 0, stream>>>(N, F, h, dy, dh);
  launched("the SwiGLU backward");
}

void rope(int64_t N, int64_t H, int64_t d, int64_t ld, float* x, const int64_t* pos, const float* inv_freq, float sign,
          cudaStream_t stream) {
  ringattn::check(d % 2 == 0 && ld >= H * d, "RoPE: head dim ", d, " must be even and the row stride ", ld,
                  " >= ", H * d);
  if (N * H == 0) return;
  rope_kernel<<<blocks(N * H * (d / 2)), 256, 0, stream>>>(N, H, d, ld, x, pos, inv_freq, sign);
  launched("RoPE");
}

void gelu_forward(int64_t n, const float* x, float* y, cudaStream_t stream) {
  if (n == 0) return;
  gelu_forward_kernel<<<blocks(n), 256, 0, stream>>>(n, x, y);
  launched("the GELU forward");
}

void gelu_backward(int64_t n, const float* x, const float* dy, float* dx, cudaStream_t stream) {
  if (n == 0) return;
  gelu_backward_kernel<<<blocks(n), 256, 0, stream>>>(n, x, dy, dx);
  launched("the GELU backward");
}

void add_bias(int64_t N, int64_t D, float* y, const float* b, cudaStream_t stream) {
  if (N * D == 0) return;
  add_bias_kernel<<<blocks(N * D), 256, 0, stream>>>(N, D, y, b);
  launched("the bias addition");
}

void bias_grad(int64_t N, int64_t D, const float* dy, float* db, cudaStream_t stream) {
  if (N * D == 0) return;
  column_sums(N, D, nullptr, nullptr, nullptr, dy, nullptr, db, stream);
}

double squared_error(int64_t n, const float* y, const float* t, float* dy, float scale, cudaStream_t stream) {
  if (n == 0) return 0;
  const unsigned grid = std::min<unsigned>(blocks(n), 1024);
  double* part = nullptr;
  check(cudaMallocAsync(reinterpret_cast<void**>(&part), grid * sizeof(double), stream),
        "allocating the loss's partial sums");
  squared_error_kernel<<<grid, 256, 0, stream>>>(n, y, t, dy, scale, part);
  launched("the squared error");
  std::vector<double> host(grid);
  check(cudaMemcpyAsync(host.data(), part, grid * sizeof(double), cudaMemcpyDeviceToHost, stream),
        "copying the loss to the host");
  cudaFreeAsync(part, stream);
  Event done;
  check(cudaEventRecord(done.get(), stream), "computing the loss");
  wait_event_bounded(done.get(), 300, "computing the loss");
  double s = 0;
  for (double p : host) s += p;
  return s;
}

void adamw(int64_t n, float* w, const float* g, float* m, float* v, const Device::AdamWStep& s, cudaStream_t stream) {
  if (n == 0) return;
  adamw_kernel<<<blocks(n), 256, 0, stream>>>(n, w, g, m, v, s);
  launched("the AdamW step");
}

}  // namespace ringattn::cuda
