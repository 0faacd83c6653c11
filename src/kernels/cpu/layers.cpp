// Token-local layers (see layers.h): LayerNorm, GELU, linear. Row loops are
// OpenMP-parallel; GEMMs go through the one oneDNN wrapper.
#include "ringattn/cpu/layers.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ringattn/cpu/gemm.h"
#include "ringattn/error.h"

namespace ringattn {

// x, y: [N, C]   gamma, beta: [C]   mean, rstd: [N]
void layernorm_forward(int64_t N, int64_t C, const float* x, const float* gamma, const float* beta, float* y,
                       float* mean, float* rstd, float eps) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const float* xi = x + i * C;
    double s = 0, s2 = 0;
    for (int64_t c = 0; c < C; ++c) s += xi[c];
    const float m = static_cast<float>(s / C);
    for (int64_t c = 0; c < C; ++c) s2 += static_cast<double>(xi[c] - m) * (xi[c] - m);
    const float r = 1.f / std::sqrt(static_cast<float>(s2 / C) + eps);
    for (int64_t c = 0; c < C; ++c) y[i * C + c] = (xi[c] - m) * r * gamma[c] + beta[c];
    mean[i] = m;
    rstd[i] = r;
  }
}

// x, dy, dx: [N, C]   gamma, dgamma, dbeta: [C]   mean, rstd: [N]
void layernorm_backward(int64_t N, int64_t C, const float* x, const float* gamma, const float* mean, const float* rstd,
                        const float* dy, float* dx, float* dgamma, float* dbeta) {
  // Per-thread partial sums of dgamma, dbeta, added in thread order afterwards
  // (static schedule: the same rows per thread every run, so results repeat bitwise).
  const int T = omp_get_max_threads();
  std::vector<double> part(static_cast<size_t>(T) * 2 * C, 0.0);
#pragma omp parallel num_threads(T)
  {
    double* dg = part.data() + static_cast<size_t>(omp_get_thread_num()) * 2 * C;
    double* db = dg + C;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N; ++i) {
      const float* xi = x + i * C;
      const float* dyi = dy + i * C;
      double a = 0, b = 0;  // Σ dŷ, Σ dŷ ∘ x̂
      for (int64_t c = 0; c < C; ++c) {
        const float xh = (xi[c] - mean[i]) * rstd[i];
        const float dyh = dyi[c] * gamma[c];
        a += dyh;
        b += dyh * xh;
        dg[c] += dyi[c] * xh;
        db[c] += dyi[c];
      }
      const float ma = static_cast<float>(a / C), mb = static_cast<float>(b / C);
      for (int64_t c = 0; c < C; ++c) {
        const float xh = (xi[c] - mean[i]) * rstd[i];
        dx[i * C + c] = rstd[i] * (dyi[c] * gamma[c] - ma - xh * mb);
      }
    }
  }
  for (int t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c) {
      dgamma[c] += static_cast<float>(part[static_cast<size_t>(t) * 2 * C + c]);
      dbeta[c] += static_cast<float>(part[static_cast<size_t>(t) * 2 * C + C + c]);
    }
}

namespace {
constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2/pi)
}

// x, y: [n]
void gelu_forward(int64_t n, const float* x, float* y) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float u = kGeluC * (x[i] + 0.044715f * x[i] * x[i] * x[i]);
    y[i] = 0.5f * x[i] * (1.f + std::tanh(u));
  }
}

// dy/dx = ½(1 + tanh u) + ½ x (1 − tanh² u) · √(2/π)(1 + 3·0.044715 x²)
void gelu_backward(int64_t n, const float* x, const float* dy, float* dx) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float u = kGeluC * (x[i] + 0.044715f * x[i] * x[i] * x[i]);
    const float t = std::tanh(u);
    const float du = kGeluC * (1.f + 3.f * 0.044715f * x[i] * x[i]);
    dx[i] = dy[i] * (0.5f * (1.f + t) + 0.5f * x[i] * (1.f - t * t) * du);
  }
}

namespace {

// An activation operand of n elements in the compute dtype: x itself for fp32,
// else a bf16-rounded copy.
struct Operand {
  std::vector<uint16_t> rounded;
  const void* p;
  Operand(const float* x, int64_t n, DType compute) : p(x) {
    if (compute == DType::f32) return;
    rounded.resize(static_cast<size_t>(n));
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) rounded[static_cast<size_t>(i)] = f32_to_bf16(x[i]);
    p = rounded.data();
  }
};

}  // namespace

// x: [N, Cin]  W: [Cin, Cout]  b: [Cout]  ->  y: [N, Cout]
void linear_forward(int64_t N, int64_t Cin, int64_t Cout, const float* x, const void* W, const float* b, float* y,
                    DType compute) {
  check(compute == DType::f32 || compute == DType::bf16, "linear layers compute in fp32 or bf16");
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i)
    for (int64_t c = 0; c < Cout; ++c) y[i * Cout + c] = b ? b[c] : 0.f;
  const Operand xo(x, N * Cin, compute);
  gemm(false, false, N, Cout, Cin, 1.f, xo.p, Cin, W, Cout, 1.f, y, Cout, compute);
}

// dy: [N, Cout] -> dx: [N, Cin]; dW: [Cin, Cout] += xᵀ dy; db: [Cout] += Σ dy
void linear_backward(int64_t N, int64_t Cin, int64_t Cout, const float* x, const void* W, const float* dy, float* dx,
                     float* dW, float* db, DType compute) {
  check(compute == DType::f32 || compute == DType::bf16, "linear layers compute in fp32 or bf16");
  const Operand dyo(dy, N * Cout, compute);
  if (dx) gemm(false, true, N, Cin, Cout, 1.f, dyo.p, Cout, W, Cout, 0.f, dx, Cin, compute);
  const Operand xo(x, N * Cin, compute);
  gemm(true, false, Cin, Cout, N, 1.f, xo.p, Cin, dyo.p, Cout, 1.f, dW, Cout, compute);
  if (db) {
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < Cout; ++c) {
      double s = 0;
      for (int64_t i = 0; i < N; ++i) s += dy[i * Cout + c];
      db[c] += static_cast<float>(s);
    }
  }
}

// x, y: [N, C]   gamma: [C]   rstd: [N]
void rmsnorm_forward(int64_t N, int64_t C, const float* x, const float* gamma, float* y, float* rstd, float eps) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const float* xi = x + i * C;
    double s2 = 0;
    for (int64_t c = 0; c < C; ++c) s2 += static_cast<double>(xi[c]) * xi[c];
    const float r = 1.f / std::sqrt(static_cast<float>(s2 / C) + eps);
    for (int64_t c = 0; c < C; ++c) y[i * C + c] = xi[c] * r * gamma[c];
    rstd[i] = r;
  }
}

// x, dy, dx: [N, C]   gamma, dgamma: [C]   rstd: [N]
void rmsnorm_backward(int64_t N, int64_t C, const float* x, const float* gamma, const float* rstd, const float* dy,
                      float* dx, float* dgamma) {
  const int T = omp_get_max_threads();
  std::vector<double> part(static_cast<size_t>(T) * C, 0.0);  // per-thread dgamma, summed in thread order
#pragma omp parallel num_threads(T)
  {
    double* dg = part.data() + static_cast<size_t>(omp_get_thread_num()) * C;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N; ++i) {
      const float* xi = x + i * C;
      const float* dyi = dy + i * C;
      double b = 0;  // Σ dŷ ∘ x̂
      for (int64_t c = 0; c < C; ++c) {
        const float xh = xi[c] * rstd[i];
        b += static_cast<double>(dyi[c]) * gamma[c] * xh;
        dg[c] += static_cast<double>(dyi[c]) * xh;
      }
      const float mb = static_cast<float>(b / C);
      for (int64_t c = 0; c < C; ++c) dx[i * C + c] = rstd[i] * (dyi[c] * gamma[c] - xi[c] * rstd[i] * mb);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c) dgamma[c] += static_cast<float>(part[static_cast<size_t>(t) * C + c]);
}

// g, u, y: [n]
void swiglu_forward(int64_t n, const float* g, const float* u, float* y) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) y[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

// g, u, dy, dg, du: [n]
void swiglu_backward(int64_t n, const float* g, const float* u, const float* dy, float* dg, float* du) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float s = 1.f / (1.f + std::exp(-g[i]));
    dg[i] = dy[i] * u[i] * s * (1.f + g[i] * (1.f - s));
    du[i] = dy[i] * g[i] * s;
  }
}

std::vector<float> rope_inv_freq(const RopeConfig& r, int64_t d) {
  check(d >= 2 && d % 2 == 0, "RoPE needs an even head dim, got ", d);
  check(r.theta > 0 && r.factor > 0, "RoPE needs theta > 0 and factor > 0, got ", r.theta, " and ", r.factor);
  std::vector<float> f(static_cast<size_t>(d / 2));
  for (int64_t i = 0; i < d / 2; ++i)
    f[static_cast<size_t>(i)] = static_cast<float>(1.0 / std::pow(r.theta, static_cast<double>(2 * i) / d));
  if (r.type == "default") return f;
  if (r.type == "linear") {
    for (float& x : f) x = static_cast<float>(x / r.factor);
    return f;
  }
  check(r.type == "llama3", "RoPE type '", r.type, "' is not supported (default, linear, llama3)");
  const double old_len = static_cast<double>(r.original_max_positions);
  const double low_wavelen = old_len / r.low_freq_factor, high_wavelen = old_len / r.high_freq_factor;
  for (float& x : f) {
    const double wavelen = 2 * M_PI / x;
    if (wavelen > low_wavelen) {
      x = static_cast<float>(x / r.factor);  // low frequencies: scaled
    } else if (wavelen >= high_wavelen) {    // medium: blended between scaled and kept
      const double smooth = (old_len / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
      x = static_cast<float>((1 - smooth) * x / r.factor + smooth * x);
    }
  }
  return f;
}

namespace {

// Rotates pairs (i, i + d/2) of each head by sign · a, a = fl(pos · inv_freq_i).
void rope_rotate(int64_t N, int64_t H, int64_t d, int64_t ld, float* x, const int64_t* pos, const float* inv_freq,
                 float sign) {
  const int64_t half = d / 2;
  check(d % 2 == 0 && ld >= H * d, "RoPE: head dim ", d, " must be even and the row stride ", ld, " >= ", H * d);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N; ++t) {
    const float p = static_cast<float>(pos[t]);
    for (int64_t i = 0; i < half; ++i) {
      const float a = p * inv_freq[i];  // fp32, as Hugging Face multiplies
      const float c = static_cast<float>(std::cos(static_cast<double>(a)));
      const float s = sign * static_cast<float>(std::sin(static_cast<double>(a)));
      for (int64_t h = 0; h < H; ++h) {
        float* row = x + t * ld + h * d;
        const float x1 = row[i], x2 = row[i + half];
        row[i] = x1 * c - x2 * s;
        row[i + half] = x2 * c + x1 * s;
      }
    }
  }
}

}  // namespace

// x: [N, H, d] rows ld apart, in place   pos: [N]   inv_freq: [d / 2]
void rope_forward(int64_t N, int64_t H, int64_t d, int64_t ld, float* x, const int64_t* pos, const float* inv_freq) {
  rope_rotate(N, H, d, ld, x, pos, inv_freq, 1.f);
}

void rope_backward(int64_t N, int64_t H, int64_t d, int64_t ld, float* dx, const int64_t* pos, const float* inv_freq) {
  rope_rotate(N, H, d, ld, dx, pos, inv_freq, -1.f);
}

// h: [N, 2F] (gate | up)   y: [N, F]
void swiglu_rows_forward(int64_t N, int64_t F, const float* h, float* y) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < F; ++j) {
      const float g = h[i * 2 * F + j], u = h[i * 2 * F + F + j];
      y[i * F + j] = g / (1.f + std::exp(-g)) * u;
    }
}

// h: [N, 2F]   dy: [N, F]   dh: [N, 2F]
void swiglu_rows_backward(int64_t N, int64_t F, const float* h, const float* dy, float* dh) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < F; ++j) {
      const float g = h[i * 2 * F + j], u = h[i * 2 * F + F + j], s = 1.f / (1.f + std::exp(-g));
      dh[i * 2 * F + j] = dy[i * F + j] * u * s * (1.f + g * (1.f - s));
      dh[i * 2 * F + F + j] = dy[i * F + j] * g * s;
    }
}

// z: [rows, V] logits, in place -> scale · (softmax − onehot(label)); labels: [rows]
double softmax_cross_entropy_rows(int64_t rows, int64_t V, float* z, const int64_t* labels, float scale) {
  double loss = 0;
#pragma omp parallel for schedule(static) reduction(+ : loss)
  for (int64_t i = 0; i < rows; ++i) {
    float* zi = z + i * V;
    const int64_t y = labels[i];
    if (y < 0) {
      std::fill(zi, zi + V, 0.f);
      continue;
    }
    const float m = *std::max_element(zi, zi + V);
    double sum = 0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp(static_cast<double>(zi[v] - m));
    const double lse = m + std::log(sum);
    loss += lse - zi[y];
    for (int64_t v = 0; v < V; ++v) zi[v] = scale * static_cast<float>(std::exp(zi[v] - lse));
    zi[y] -= scale;
  }
  return loss;
}

// h: [N, D]   W: [V, D]   labels: [N]   dh: [N, D]   dW: [V, D]
double lm_head_cross_entropy(int64_t N, int64_t D, int64_t V, const float* h, const float* W, const int64_t* labels,
                             float scale, float* dh, float* dW, int64_t chunk) {
  check(chunk >= 1, "lm_head_cross_entropy: chunk must be >= 1");
  for (int64_t i = 0; i < N; ++i)
    check(labels[i] >= -1 && labels[i] < V, "label ", labels[i], " of row ", i, " is outside the vocabulary of ", V);
  std::vector<float> z(static_cast<size_t>(std::min(chunk, N) * V));  // one chunk of logits, then their gradients
  double loss = 0;
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t rows = std::min(chunk, N - r0);
    gemm(false, true, rows, V, D, 1.f, h + r0 * D, D, W, D, 0.f, z.data(), V);
    loss += softmax_cross_entropy_rows(rows, V, z.data(), labels + r0, scale);
    if (dh) gemm(false, false, rows, D, V, 1.f, z.data(), V, W, D, 0.f, dh + r0 * D, D);
    if (dW) gemm(true, false, V, D, rows, 1.f, z.data(), V, h + r0 * D, D, 1.f, dW, D);
  }
  return loss;
}

}  // namespace ringattn
