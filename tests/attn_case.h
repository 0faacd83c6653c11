// One attention problem for the tests: shapes, options, random inputs (optionally
// strided views inside NaN-padded buffers), outputs pre-filled with NaN so that
// every element the kernel should write is checked, and the comparison with the
// double-precision reference.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "reference.h"
#include "ringattn/cpu/attention.h"
#include "ringattn/cpu/features.h"
#include "test_util.h"

namespace ringattn::testing {

struct AttnCase {
  int64_t B = 1, Lq = 16, Lk = 16, H = 2, Hkv = 2, d = 32;
  bool causal = false;
  DType in = DType::f32;   // q, k, v (and dout) storage
  DType out = DType::f32;  // o (and dq, dk, dv) storage
  int64_t window_left = -1, window_right = -1;
  std::optional<std::vector<int64_t>> q_pos, k_pos;
  // Packed documents (flash-attn's cu_seqlens); they set the positions, so they
  // exclude q_pos/k_pos.
  std::optional<std::vector<int32_t>> cu_q, cu_k;
  mutable std::shared_ptr<const Documents> docs;  // built from cu_q, cu_k on first use
  float scale = std::numeric_limits<float>::quiet_NaN();
  float amp = 1.f;  // inputs are U(-amp, amp); larger amp gives peakier softmax
  uint32_t seed = 1;
  bool strided = false;  // views inside larger buffers (non-contiguous)
  int threads = 0;
  const Isa* isa = nullptr;

  std::string name() const {
    std::string s = cat("B", B, "_Lq", Lq, "_Lk", Lk, "_H", H, "_Hkv", Hkv, "_d", d, causal ? "_causal" : "_full", "_",
                        dtype_name(in));
    if (out != in) s += cat("_out", dtype_name(out));
    if (q_pos || k_pos) s += "_pos";
    auto side = [](int64_t w) { return w < 0 ? std::string("inf") : std::to_string(w); };
    if (window_left >= 0 || window_right >= 0) s += cat("_win", side(window_left), "_", side(window_right));
    if (cu_q) s += cat("_docs", cu_q->size() - 1);
    if (strided) s += "_strided";
    return s;
  }

  AttentionOptions options() const {
    AttentionOptions o;
    o.scale = scale;
    o.causal = causal;
    o.window_left = window_left, o.window_right = window_right;
    if (q_pos) o.q_pos = std::span<const int64_t>(*q_pos);
    if (k_pos) o.k_pos = std::span<const int64_t>(*k_pos);
    if (cu_q) {
      if (!docs) docs = std::make_shared<const Documents>(documents(*cu_q, cu_k ? *cu_k : *cu_q));
      docs->apply(o);
    }
    o.threads = threads;
    o.isa = isa;
    return o;
  }
};

inline std::ostream& operator<<(std::ostream& os, const AttnCase& c) { return os << c.name(); }

struct AttnData {
  TestTensor q, k, v, o, lse;
  TestTensor dout, dq, dk, dv;
};

// Allocates a [B, L, H, d] tensor; strided: inside a buffer padded in L, H and d
// (so every stride differs from the contiguous one).
inline TestTensor make_bshd(DType dt, int64_t B, int64_t L, int64_t H, int64_t d, bool strided) {
  if (!strided) return make_tensor(dt, {B, L, H, d});
  return make_tensor(dt, {B, L, H, d}, {1, 2, 1, 3}, {0, 1, 1, 2});
}
inline TestTensor make_bhl(int64_t B, int64_t H, int64_t L, bool strided) {
  if (!strided) return make_tensor(DType::f32, {B, H, L});
  return make_tensor(DType::f32, {B, H, L}, {1, 1, 5}, {0, 1, 3});
}

inline AttnData make_data(const AttnCase& c, bool backward = false) {
  AttnData a;
  a.q = make_bshd(c.in, c.B, c.Lq, c.H, c.d, c.strided);
  a.k = make_bshd(c.in, c.B, c.Lk, c.Hkv, c.d, c.strided);
  a.v = make_bshd(c.in, c.B, c.Lk, c.Hkv, c.d, c.strided);
  a.o = make_bshd(c.out, c.B, c.Lq, c.H, c.d, c.strided);
  a.lse = make_bhl(c.B, c.H, c.Lq, c.strided);
  fill_uniform(a.q, c.seed * 7919u + 1, -c.amp, c.amp);
  fill_uniform(a.k, c.seed * 7919u + 2, -c.amp, c.amp);
  fill_uniform(a.v, c.seed * 7919u + 3);
  fill_value(a.o, quiet_nan());  // the kernel must write every element
  fill_value(a.lse, quiet_nan());
  if (backward) {
    a.dout = make_bshd(c.in, c.B, c.Lq, c.H, c.d, c.strided);
    fill_uniform(a.dout, c.seed * 7919u + 4);
    a.dq = make_bshd(c.out, c.B, c.Lq, c.H, c.d, c.strided);
    a.dk = make_bshd(c.out, c.B, c.Lk, c.Hkv, c.d, c.strided);
    a.dv = make_bshd(c.out, c.B, c.Lk, c.Hkv, c.d, c.strided);
    // Outputs are assigned (":="), not accumulated into: start from garbage.
    fill_value(a.dq, 1234.5f);
    fill_value(a.dk, -777.f);
    fill_value(a.dv, 42.f);
  }
  return a;
}

inline void run_forward(const AttnCase& c, AttnData& a) { attention_forward(a.q, a.k, a.v, a.o, a.lse, c.options()); }
inline void run_backward(const AttnCase& c, AttnData& a) {
  attention_backward(a.q, a.k, a.v, a.o, a.lse, a.dout, a.dq, a.dk, a.dv, c.options());
}

// Checks that nothing outside the output views was written.
inline void expect_padding_untouched(const AttnCase& c, const AttnData& a, bool backward) {
  if (!c.strided) return;
  EXPECT_EQ(count_padding_changes(a.o), 0) << "o written outside its view";
  EXPECT_EQ(count_padding_changes(a.lse), 0) << "lse written outside its view";
  if (backward) {
    EXPECT_EQ(count_padding_changes(a.dq), 0) << "dq written outside its view";
    EXPECT_EQ(count_padding_changes(a.dk), 0) << "dk written outside its view";
    EXPECT_EQ(count_padding_changes(a.dv), 0) << "dv written outside its view";
  }
}

// Rows the reference says see no key must give exactly o = 0 and lse = -inf.
inline void expect_empty_rows_exact(const AttnCase& c, const AttnData& a, const RefResult& ref) {
  const TensorView& o = a.o;
  const TensorView& lse = a.lse;
  int64_t bad = 0, empty = 0;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t i = 0; i < c.Lq; ++i) {
        if (!std::isinf(ref.lse[(b * c.H + h) * c.Lq + i])) continue;
        ++empty;
        const int64_t li[3] = {b, h, i};
        const float l = load(lse, offset_of(lse, li));
        if (!(std::isinf(l) && l < 0)) ++bad;
        for (int64_t x = 0; x < c.d; ++x) {
          const int64_t oi[4] = {b, i, h, x};
          if (load(o, offset_of(o, oi)) != 0.f) {
            ++bad;
            break;
          }
        }
      }
  EXPECT_EQ(bad, 0) << "of " << empty << " rows with no visible key, " << bad
                    << " did not give exactly o = 0, lse = -inf";
}

// Forward vs reference: o and lse within tol (normalized), no NaN anywhere.
inline RefResult check_forward(const AttnCase& c, AttnData& a, double tol) {
  const RefResult ref = reference_forward(a.q, a.k, a.v, c.options());
  EXPECT_FALSE(any_nan(a.o)) << "NaN in o";
  EXPECT_FALSE(any_nan(a.lse)) << "NaN in lse";
  RA_EXPECT_CLOSE(a.o.view, ref.o, tol, "o");
  RA_EXPECT_CLOSE(a.lse.view, ref.lse, tol, "lse");
  expect_empty_rows_exact(c, a, ref);
  return ref;
}

// Largest |x|.
inline double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v)
    if (std::isfinite(x)) m = std::max(m, std::abs(x));
  return m;
}

// Backward vs reference gradients (reference from the same rounded q, k, v, dout).
// dq and dk can vanish in exact arithmetic (one visible key per row: p = 1 and
// dp − D = dO·v − dO·o = 0), leaving only rounding noise in the kernel; their
// normalizing magnitude is floored at 1% of max|dv| (dv = pᵀ dO never cancels),
// which only matters when dq or dk is that degenerate. A caller whose every row is
// (a window of 0 keys to the left: each query sees itself) passes a larger floor.
inline void check_backward(const AttnCase& c, AttnData& a, double tol, double floor_of_dv = 1e-2) {
  const RefResult ref = reference_backward(a.q, a.k, a.v, a.dout, c.options());
  EXPECT_FALSE(any_nan(a.dq)) << "NaN in dq";
  EXPECT_FALSE(any_nan(a.dk)) << "NaN in dk";
  EXPECT_FALSE(any_nan(a.dv)) << "NaN in dv";
  const double floor = std::max(floor_of_dv * max_abs(ref.dv), 1e-30);
  RA_EXPECT_CLOSE_FLOOR(a.dq.view, ref.dq, tol, floor, "dq");
  RA_EXPECT_CLOSE_FLOOR(a.dk.view, ref.dk, tol, floor, "dk");
  RA_EXPECT_CLOSE(a.dv.view, ref.dv, tol, "dv");
}

}  // namespace ringattn::testing
