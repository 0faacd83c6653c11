// Naive double-precision reference of attention (forward and backward) with the
// exact semantics of include/ringattn/attention.h:
//
//   q: [B, Lq, H, d]   k, v: [B, Lk, Hkv, d]   o: [B, Lq, H, d]   lse: [B, H, Lq]
//   query head h uses key/value head h / (H / Hkv) (GQA/MQA);
//   query i sees key j iff q_doc[i] == k_doc[j] (when documents are given) and
//   q_pos[i] - window_left <= k_pos[j] <= q_pos[i] + window_right (-1: unbounded;
//   causal: window_right = 0); the default positions are q_pos[i] = i + (Lk - Lq),
//   k_pos[j] = j (bottom-right alignment);
//   a row that sees no key gives o = 0, lse = -inf and contributes no gradient.
//
// Inputs are read from TensorViews of any dtype and strides (so the reference sees
// exactly the rounded values the kernel sees) into contiguous double arrays; all
// math is in double. The core works on plain arrays so finite differences can
// perturb inputs directly.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "ringattn/cpu/attention.h"
#include "test_util.h"

namespace ringattn::testing {

struct RefProblem {
  int64_t B = 0, Lq = 0, Lk = 0, H = 0, Hkv = 0, d = 0;
  double scale = 0;
  int64_t left = -1, right = -1;      // the window, causal folded in
  std::vector<int64_t> q_pos, k_pos;  // always filled (defaults resolved)
  std::vector<int64_t> q_doc, k_doc;  // empty: one document
  std::vector<double> q, k, v;        // contiguous [B, L, heads, d]

  int64_t qi(int64_t b, int64_t l, int64_t h) const { return ((b * Lq + l) * H + h) * d; }
  int64_t ki(int64_t b, int64_t l, int64_t h) const { return ((b * Lk + l) * Hkv + h) * d; }
  int64_t li(int64_t b, int64_t h, int64_t l) const { return (b * H + h) * Lq + l; }
  bool visible(int64_t i, int64_t j) const {
    if (!q_doc.empty() && q_doc[i] != k_doc[j]) return false;
    if (right >= 0 && k_pos[j] > q_pos[i] + right) return false;
    return left < 0 || k_pos[j] >= q_pos[i] - left;
  }
};

struct RefResult {
  std::vector<double> o, lse;      // forward: [B, Lq, H, d], [B, H, Lq]
  std::vector<double> dq, dk, dv;  // backward (empty after a forward only)
};

// Resolves the options the way attention.h documents them.
inline RefProblem make_ref_problem(const TensorView& q, const TensorView& k, const TensorView& v,
                                   const AttentionOptions& opt = {}) {
  RefProblem p;
  p.B = q.shape[0];
  p.Lq = q.shape[1];
  p.H = q.shape[2];
  p.d = q.shape[3];
  p.Lk = k.shape[1];
  p.Hkv = k.shape[2];
  p.scale = std::isnan(opt.scale) ? 1.0 / std::sqrt(static_cast<double>(p.d)) : static_cast<double>(opt.scale);
  p.left = opt.window_left;
  p.right = opt.causal ? 0 : opt.window_right;
  p.q_doc.assign(opt.q_doc.begin(), opt.q_doc.end());
  p.k_doc.assign(opt.k_doc.begin(), opt.k_doc.end());
  if (opt.q_pos.empty()) {
    p.q_pos = iota_pos(p.Lq, p.Lk - p.Lq);
  } else {
    p.q_pos.assign(opt.q_pos.begin(), opt.q_pos.end());
  }
  if (opt.k_pos.empty()) {
    p.k_pos = iota_pos(p.Lk, 0);
  } else {
    p.k_pos.assign(opt.k_pos.begin(), opt.k_pos.end());
  }
  p.q = to_double(q);
  p.k = to_double(k);
  p.v = to_double(v);
  return p;
}

// Forward: o, lse in double.
inline RefResult ref_forward(const RefProblem& p) {
  RefResult r;
  r.o.assign(static_cast<size_t>(p.B * p.Lq * p.H * p.d), 0.0);
  r.lse.assign(static_cast<size_t>(p.B * p.H * p.Lq), -std::numeric_limits<double>::infinity());
  const int64_t group = p.H / p.Hkv;
  std::vector<double> s(static_cast<size_t>(p.Lk));
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.H; ++h) {
      const int64_t hk = h / group;
      for (int64_t i = 0; i < p.Lq; ++i) {
        const double* qr = &p.q[p.qi(b, i, h)];
        double m = -std::numeric_limits<double>::infinity();
        bool any = false;
        for (int64_t j = 0; j < p.Lk; ++j) {
          if (!p.visible(i, j)) continue;
          const double* kr = &p.k[p.ki(b, j, hk)];
          double dot = 0;
          for (int64_t c = 0; c < p.d; ++c) dot += qr[c] * kr[c];
          s[j] = p.scale * dot;
          m = std::max(m, s[j]);
          any = true;
        }
        if (!any) continue;  // o = 0, lse = -inf
        double l = 0;
        for (int64_t j = 0; j < p.Lk; ++j)
          if (p.visible(i, j)) l += std::exp(s[j] - m);
        const double lse = m + std::log(l);
        r.lse[p.li(b, h, i)] = lse;
        double* orow = &r.o[p.qi(b, i, h)];
        for (int64_t j = 0; j < p.Lk; ++j) {
          if (!p.visible(i, j)) continue;
          const double pj = std::exp(s[j] - lse);
          const double* vr = &p.v[p.ki(b, j, hk)];
          for (int64_t c = 0; c < p.d; ++c) orow[c] += pj * vr[c];
        }
      }
    }
  return r;
}

// Backward (FlashAttention-2 formulation, in double, from the reference's own o
// and lse): D = rowsum(dO ∘ O); p = exp(s − lse); dV += pᵀ dO; dp = dO vᵀ;
// ds = p ∘ (dp − D); dQ += scale · ds · k; dK += scale · dsᵀ · q.
// dout: contiguous [B, Lq, H, d].
inline RefResult ref_backward(const RefProblem& p, const std::vector<double>& dout) {
  RefResult r = ref_forward(p);
  r.dq.assign(p.q.size(), 0.0);
  r.dk.assign(p.k.size(), 0.0);
  r.dv.assign(p.v.size(), 0.0);
  const int64_t group = p.H / p.Hkv;
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.H; ++h) {
      const int64_t hk = h / group;
      for (int64_t i = 0; i < p.Lq; ++i) {
        const double lse = r.lse[p.li(b, h, i)];
        if (std::isinf(lse)) continue;  // no visible key: no contribution
        const double* qr = &p.q[p.qi(b, i, h)];
        const double* dor = &dout[p.qi(b, i, h)];
        const double* orow = &r.o[p.qi(b, i, h)];
        double D = 0;
        for (int64_t c = 0; c < p.d; ++c) D += dor[c] * orow[c];
        double* dqr = &r.dq[p.qi(b, i, h)];
        for (int64_t j = 0; j < p.Lk; ++j) {
          if (!p.visible(i, j)) continue;
          const double* kr = &p.k[p.ki(b, j, hk)];
          const double* vr = &p.v[p.ki(b, j, hk)];
          double dot = 0, dp = 0;
          for (int64_t c = 0; c < p.d; ++c) {
            dot += qr[c] * kr[c];
            dp += dor[c] * vr[c];
          }
          const double pj = std::exp(p.scale * dot - lse);
          const double ds = pj * (dp - D);
          double* dkr = &r.dk[p.ki(b, j, hk)];
          double* dvr = &r.dv[p.ki(b, j, hk)];
          for (int64_t c = 0; c < p.d; ++c) {
            dvr[c] += pj * dor[c];
            dqr[c] += p.scale * ds * kr[c];
            dkr[c] += p.scale * ds * qr[c];
          }
        }
      }
    }
  return r;
}

// Scalar loss whose gradient the backward computes: L = sum(o ∘ dout).
inline double ref_loss(const RefProblem& p, const std::vector<double>& dout) {
  const RefResult r = ref_forward(p);
  double L = 0;
  for (size_t i = 0; i < r.o.size(); ++i) L += r.o[i] * dout[i];
  return L;
}

// Convenience wrappers over views.
inline RefResult reference_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                                   const AttentionOptions& opt = {}) {
  return ref_forward(make_ref_problem(q, k, v, opt));
}
inline RefResult reference_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                                    const TensorView& dout, const AttentionOptions& opt = {}) {
  return ref_backward(make_ref_problem(q, k, v, opt), to_double(dout));
}

}  // namespace ringattn::testing
