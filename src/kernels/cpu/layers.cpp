// Token-local layers (see layers.h): the norms, GELU, SwiGLU, RoPE, linear and the
// cross-entropy. Rows and blocks are OpenMP-parallel here; their vector loops come
// from the kernel path's LayerTable (layers_impl.inc); GEMMs go through the one
// oneDNN wrapper.
#include "ringattn/cpu/layers.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/kernel_args.h"
#include "ringattn/cpu/features.h"
#include "ringattn/cpu/gemm.h"
#include "ringattn/error.h"

namespace ringattn {
namespace {

// The vector loops of this CPU's kernel path (RINGATTN_ISA chooses another).
const cpu::LayerTable& vec() { return *cpu::kernels_for(default_isa()).layers; }

// Elementwise loops run in blocks of this many elements per OpenMP item.
constexpr int64_t kBlock = 16384;
// Row sums of weight gradients (dgamma, dbeta) are added in fp32 for this many
// rows, then into a double per thread: fp32 speed, and the error of a double sum.
constexpr int64_t kRowsPerPartial = 64;

// dgamma (and dbeta) of a norm's backward: each thread sums its rows (a static
// schedule: the same rows every run) as above; the threads' sums are added in
// thread order, so results repeat bitwise.
void norm_backward(int64_t N, int64_t C, const float* x, const float* gamma, const float* mean, const float* rstd,
                   const float* dy, float* dx, float* dgamma, float* dbeta, bool centered) {
  const cpu::LayerTable& L = vec();
  const int T = omp_get_max_threads();
  const int64_t cols = dbeta ? 2 * C : C;
  std::vector<double> part(static_cast<size_t>(T * cols), 0.0);
#pragma omp parallel num_threads(T)
  {
    double* total = part.data() + static_cast<size_t>(omp_get_thread_num() * cols);
    std::vector<float> block(static_cast<size_t>(cols), 0.f);
    int64_t rows = 0;
    auto flush = [&] {
      for (int64_t c = 0; c < cols; ++c) total[c] += block[static_cast<size_t>(c)];
      std::fill(block.begin(), block.end(), 0.f);
    };
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N; ++i) {
      L.norm_row_backward(C, x + i * C, gamma, mean ? mean[i] : 0.f, rstd[i], centered, dy + i * C, dx + i * C,
                          block.data(), dbeta ? block.data() + C : nullptr);
      if (++rows % kRowsPerPartial == 0) flush();
    }
    flush();
  }
  for (int t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c) {
      dgamma[c] += static_cast<float>(part[static_cast<size_t>(t * cols + c)]);
      if (dbeta) dbeta[c] += static_cast<float>(part[static_cast<size_t>(t * cols + C + c)]);
    }
}

}  // namespace

// x, y: [N, C]   gamma, beta: [C]   mean, rstd: [N]
void layernorm_forward(int64_t N, int64_t C, const float* x, const float* gamma, const float* beta, float* y,
                       float* mean, float* rstd, float eps) {
  const cpu::LayerTable& L = vec();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) L.norm_row(C, x + i * C, gamma, beta, eps, true, y + i * C, mean + i, rstd + i);
}

// x, dy, dx: [N, C]   gamma, dgamma, dbeta: [C]   mean, rstd: [N]
void layernorm_backward(int64_t N, int64_t C, const float* x, const float* gamma, const float* mean, const float* rstd,
                        const float* dy, float* dx, float* dgamma, float* dbeta) {
  norm_backward(N, C, x, gamma, mean, rstd, dy, dx, dgamma, dbeta, true);
}

// x, y: [n]
void gelu_forward(int64_t n, const float* x, float* y) {
  const cpu::LayerTable& L = vec();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; i += kBlock) L.gelu(std::min(kBlock, n - i), x + i, y + i);
}

// dy/dx = ½(1 + tanh u) + ½ x (1 − tanh² u) · √(2/π)(1 + 3·0.044715 x²)
void gelu_backward(int64_t n, const float* x, const float* dy, float* dx) {
  const cpu::LayerTable& L = vec();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; i += kBlock) L.gelu_backward(std::min(kBlock, n - i), x + i, dy + i, dx + i);
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
  const cpu::LayerTable& L = vec();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    float mean;
    L.norm_row(C, x + i * C, gamma, nullptr, eps, false, y + i * C, &mean, rstd + i);
  }
}

// x, dy, dx: [N, C]   gamma, dgamma: [C]   rstd: [N]
void rmsnorm_backward(int64_t N, int64_t C, const float* x, const float* gamma, const float* rstd, const float* dy,
                      float* dx, float* dgamma) {
  norm_backward(N, C, x, gamma, nullptr, rstd, dy, dx, dgamma, nullptr, false);
}

// g, u, y: [n]
void swiglu_forward(int64_t n, const float* g, const float* u, float* y) {
  const cpu::LayerTable& L = vec();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; i += kBlock) L.swiglu(std::min(kBlock, n - i), g + i, u + i, y + i);
}

// g, u, dy, dg, du: [n]
void swiglu_backward(int64_t n, const float* g, const float* u, const float* dy, float* dg, float* du) {
  const cpu::LayerTable& L = vec();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; i += kBlock)
    L.swiglu_backward(std::min(kBlock, n - i), g + i, u + i, dy + i, dg + i, du + i);
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

// Rotates pairs (i, i + d/2) of each head by sign · a, a = fl(pos · inv_freq_i);
// cos a and sin a in double, rounded to fp32, once per token for all heads.
void rope_rotate(int64_t N, int64_t H, int64_t d, int64_t ld, float* x, const int64_t* pos, const float* inv_freq,
                 float sign) {
  const int64_t half = d / 2;
  check(d % 2 == 0 && ld >= H * d, "RoPE: head dim ", d, " must be even and the row stride ", ld, " >= ", H * d);
  const cpu::LayerTable& L = vec();
#pragma omp parallel
  {
    std::vector<float> cs(static_cast<size_t>(d));
    float* c = cs.data();
    float* s = c + half;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < N; ++t) {
      const float p = static_cast<float>(pos[t]);
      for (int64_t i = 0; i < half; ++i) {
        const float a = p * inv_freq[i];  // fp32, as Hugging Face multiplies
        double sn, cn;
        sincos(static_cast<double>(a), &sn, &cn);
        c[i] = static_cast<float>(cn);
        s[i] = sign * static_cast<float>(sn);
      }
      L.rope_row(H, d, x + t * ld, c, s);
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
  const cpu::LayerTable& L = vec();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) L.swiglu(F, h + i * 2 * F, h + i * 2 * F + F, y + i * F);
}

// h: [N, 2F]   dy: [N, F]   dh: [N, 2F]
void swiglu_rows_backward(int64_t N, int64_t F, const float* h, const float* dy, float* dh) {
  const cpu::LayerTable& L = vec();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i)
    L.swiglu_backward(F, h + i * 2 * F, h + i * 2 * F + F, dy + i * F, dh + i * 2 * F, dh + i * 2 * F + F);
}

// z: [rows, Vl] logits of vocabulary ids first .. first + Vl − 1, in place -> scale · (softmax − onehot(label))
// labels: [rows]
double softmax_cross_entropy_rows(int64_t rows, int64_t Vl, float* z, const int64_t* labels, float scale,
                                  const VocabShard& shard) {
  const cpu::LayerTable& L = vec();
  auto mine = [&](int64_t i) { return labels[i] >= shard.first && labels[i] < shard.first + Vl; };
  // lse of row i from its max m and Σ e^(z − m) over the vocabulary: the row's
  // loss, and z becomes its gradient.
  auto finish = [&](int64_t i, double m, double sum, double target) {
    float* zi = z + i * Vl;
    if (labels[i] < 0) {
      std::fill(zi, zi + Vl, 0.f);
      return 0.0;
    }
    const double lse = m + std::log(sum);
    L.exp_scale_row(Vl, zi, static_cast<float>(lse), scale);
    if (mine(i)) zi[labels[i] - shard.first] -= scale;
    return lse - target;
  };
  double loss = 0;
  if (!shard.reduce) {  // each row's three steps together, while it is in cache
#pragma omp parallel for schedule(static) reduction(+ : loss)
    for (int64_t i = 0; i < rows; ++i) {
      const float* zi = z + i * Vl;
      const float m = L.row_max(Vl, zi);
      const double target = mine(i) ? zi[labels[i] - shard.first] : 0.0;
      loss += finish(i, m, L.exp_sum_row(Vl, zi, m), target);
    }
    return loss;
  }
  // Over shards: every row's max, combined; then its exp-sum and target logit
  // (from the shard holding the label; 0 elsewhere), combined.
  std::vector<double> m(static_cast<size_t>(rows)), st(static_cast<size_t>(2 * rows));
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) m[i] = L.row_max(Vl, z + i * Vl);
  shard.reduce(m.data(), rows, true);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    const float* zi = z + i * Vl;
    st[2 * i] = L.exp_sum_row(Vl, zi, static_cast<float>(m[i]));
    st[2 * i + 1] = mine(i) ? zi[labels[i] - shard.first] : 0.0;
  }
  shard.reduce(st.data(), 2 * rows, false);
#pragma omp parallel for schedule(static) reduction(+ : loss)
  for (int64_t i = 0; i < rows; ++i) loss += finish(i, m[i], st[2 * i], st[2 * i + 1]);
  return loss;
}

// h: [N, D]   W: [Vl, D]   labels: [N]   dh: [N, D]   dW: [Vl, D]
double lm_head_cross_entropy(int64_t N, int64_t D, int64_t Vl, const float* h, const float* W, const int64_t* labels,
                             float scale, float* dh, float* dW, int64_t chunk, const VocabShard& shard) {
  check(chunk >= 1, "lm_head_cross_entropy: chunk must be >= 1");
  const int64_t V = shard.vocab > 0 ? shard.vocab : Vl;
  check(Vl >= 1 && shard.first >= 0 && shard.first + Vl <= V, "lm_head_cross_entropy: rows ", shard.first, "..",
        shard.first + Vl - 1, " of the head are not in a vocabulary of ", V);
  for (int64_t i = 0; i < N; ++i)
    check(labels[i] >= -1 && labels[i] < V, "label ", labels[i], " of row ", i, " is outside the vocabulary of ", V);
  std::vector<float> z(static_cast<size_t>(std::min(chunk, N) * Vl));  // one chunk of logits, then their gradients
  double loss = 0;
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t rows = std::min(chunk, N - r0);
    gemm(false, true, rows, Vl, D, 1.f, h + r0 * D, D, W, D, 0.f, z.data(), Vl);
    loss += softmax_cross_entropy_rows(rows, Vl, z.data(), labels + r0, scale, shard);
    if (dh) gemm(false, false, rows, D, Vl, 1.f, z.data(), Vl, W, D, 0.f, dh + r0 * D, D);
    if (dW) gemm(true, false, Vl, D, rows, 1.f, z.data(), Vl, h + r0 * D, D, 1.f, dW, D);
  }
  return loss;
}

}  // namespace ringattn
