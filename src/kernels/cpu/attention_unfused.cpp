// The unfused attention baseline: GEMM → softmax → GEMM with the score matrix
// materialized, on oneDNN (see attention.h).
#include <omp.h>

#include <cmath>
#include <vector>

#include "ringattn/cpu/attention.h"
#include "ringattn/cpu/gemm.h"
#include "ringattn/error.h"

namespace ringattn {

// q: [B, Lq, H, d]  k, v: [B, Lk, Hkv, d]  ->  o: [B, Lq, H, d], lse: [B, H, Lq]
void attention_forward_unfused(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                               const TensorView& lse, const AttentionOptions& opt) {
  const AttentionShape a = check_attention(q, k, v, o, lse, opt);
  const int64_t B = a.B, Lq = a.Lq, H = a.H, d = a.d, Lk = a.Lk, Hkv = a.Hkv;
  const DType dt = q.dtype;
  check((dt == DType::f32 || dt == DType::bf16) && k.dtype == dt && v.dtype == dt,
        "unfused attention takes fp32 or bf16 q, k, v of one dtype");
  check(q.strides[3] == 1 && k.strides[3] == 1 && v.strides[3] == 1, "unfused attention needs contiguous rows");
  const float scale = a.scale;
  auto qpos = [&](int64_t i) { return opt.q_pos.empty() ? i + Lk - Lq : opt.q_pos[i]; };
  auto kpos = [&](int64_t j) { return opt.k_pos.empty() ? j : opt.k_pos[j]; };
  auto visible = [&](int64_t i, int64_t j) {
    return (opt.q_doc.empty() || opt.q_doc[i] == opt.k_doc[j]) &&
           in_window(qpos(i), kpos(j), a.window_left, a.window_right);
  };
  const size_t es = dtype_size(dt);
  const int saved = omp_get_max_threads();
  if (opt.threads > 0) omp_set_num_threads(opt.threads);

  std::vector<float> S(static_cast<size_t>(Lq * Lk)), O(static_cast<size_t>(Lq * d));
  std::vector<uint16_t> P16(dt == DType::bf16 ? static_cast<size_t>(Lq * Lk) : 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / (H / Hkv);
      const char* qh = static_cast<const char*>(q.data) + (b * q.strides[0] + h * q.strides[2]) * es;
      const char* kh = static_cast<const char*>(k.data) + (b * k.strides[0] + hk * k.strides[2]) * es;
      const char* vh = static_cast<const char*>(v.data) + (b * v.strides[0] + hk * v.strides[2]) * es;
      // S = scale · Q Kᵀ   [Lq, Lk]
      gemm(false, true, Lq, Lk, d, scale, qh, q.strides[1], kh, k.strides[1], 0.f, S.data(), Lk, dt);
      // Row softmax with the mask; lse per row.
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < Lq; ++i) {
        float* s = S.data() + i * Lk;
        float m = -INFINITY;
        for (int64_t j = 0; j < Lk; ++j) {
          if (!visible(i, j)) s[j] = -INFINITY;
          m = std::fmax(m, s[j]);
        }
        float sum = 0.f;
        for (int64_t j = 0; j < Lk; ++j) {
          s[j] = m == -INFINITY ? 0.f : std::exp(s[j] - m);
          sum += s[j];
        }
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        for (int64_t j = 0; j < Lk; ++j) s[j] *= inv;
        if (dt == DType::bf16)
          for (int64_t j = 0; j < Lk; ++j) P16[i * Lk + j] = f32_to_bf16(s[j]);
        lse.ptr<float>()[b * lse.strides[0] + h * lse.strides[1] + i * lse.strides[2]] =
            sum > 0.f ? m + std::log(sum) : -INFINITY;
      }
      // O = P V   [Lq, d]
      const void* p = dt == DType::bf16 ? static_cast<const void*>(P16.data()) : S.data();
      gemm(false, false, Lq, d, Lk, 1.f, p, Lk, vh, v.strides[1], 0.f, O.data(), d, dt);
      for (int64_t i = 0; i < Lq; ++i)
        for (int64_t c = 0; c < d; ++c)
          store_from_f32(o.data, o.dtype, b * o.strides[0] + i * o.strides[1] + h * o.strides[2] + c * o.strides[3],
                         O[i * d + c]);
    }
  omp_set_num_threads(saved);
}

}  // namespace ringattn
