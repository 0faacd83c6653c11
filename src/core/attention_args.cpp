// The attention contract of ringattn/attention.h, checked once for every backend.
#include <algorithm>
#include <cmath>
#include <utility>

#include "ringattn/attention.h"
#include "ringattn/error.h"

namespace ringattn {
namespace {

void check_rank(const TensorView& t, int rank, const char* name, const char* layout) {
  check(t.rank == rank, name, " must have rank ", rank, " ", layout, ", got shape ", t.shape_str());
  for (int i = 0; i < t.rank; ++i)
    check(t.shape[i] >= 1, name, " has shape ", t.shape_str(), ": every dimension of ", layout, " must be at least 1");
  check(!t.empty(), name, " is missing (no data)");
}

void check_like(const TensorView& t, const TensorView& like, const char* name, const char* like_name) {
  check(!t.empty(), name, " is missing");
  check(t.rank == like.rank && same_shape(t, like), name, " must have the shape of ", like_name, " ", like.shape_str(),
        ", got ", t.shape_str());
}

}  // namespace

AttentionShape check_attention(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                               const TensorView& lse, const AttentionOptions& opt) {
  check_rank(q, 4, "q", "[B, Lq, H, d]");
  check_rank(k, 4, "k", "[B, Lk, Hkv, d]");
  check_rank(v, 4, "v", "[B, Lk, Hkv, d]");
  check_rank(lse, 3, "lse", "[B, H, Lq]");
  const int64_t B = q.dim(0), Lq = q.dim(1), H = q.dim(2), d = q.dim(3);
  const int64_t Lk = k.dim(1), Hkv = k.dim(2);
  check(k.dim(0) == B && v.dim(0) == B, "batch sizes differ: q ", q.shape_str(), ", k ", k.shape_str(), ", v ",
        v.shape_str());
  check(k.dim(3) == d && v.dim(3) == d, "head dims differ: q ", q.shape_str(), ", k ", k.shape_str(), ", v ",
        v.shape_str(), " (q, k and v need the same d)");
  check(v.dim(1) == Lk && v.dim(2) == Hkv, "k ", k.shape_str(), " and v ", v.shape_str(), " must have the same shape");
  check(H % Hkv == 0, "query heads H=", H, " must be a multiple of key/value heads Hkv=", Hkv, " (GQA/MQA)");
  check(q.dtype == k.dtype && q.dtype == v.dtype, "q, k and v must share a dtype, got ", dtype_name(q.dtype), ", ",
        dtype_name(k.dtype), ", ", dtype_name(v.dtype));
  check_like(o, q, "o", "q");
  check(lse.dtype == DType::f32, "lse must be fp32, got ", dtype_name(lse.dtype));
  check(lse.dim(0) == B && lse.dim(1) == H && lse.dim(2) == Lq, "lse must be [B, H, Lq] = [", B, ", ", H, ", ", Lq,
        "], got ", lse.shape_str());
  const float scale = std::isnan(opt.scale) ? 1.f / std::sqrt(static_cast<float>(d)) : opt.scale;
  check(std::isfinite(scale) && scale > 0.f, "scale must be positive and finite, got ", opt.scale);
  check(opt.q_pos.empty() || static_cast<int64_t>(opt.q_pos.size()) == Lq, "q_pos has ", opt.q_pos.size(),
        " entries but Lq = ", Lq);
  check(opt.k_pos.empty() || static_cast<int64_t>(opt.k_pos.size()) == Lk, "k_pos has ", opt.k_pos.size(),
        " entries but Lk = ", Lk);
  check(opt.q_doc.empty() == opt.k_doc.empty(), "documents need both q_doc and k_doc (or neither), got ",
        opt.q_doc.size(), " and ", opt.k_doc.size(), " entries");
  check(opt.q_doc.empty() || static_cast<int64_t>(opt.q_doc.size()) == Lq, "q_doc has ", opt.q_doc.size(),
        " entries but Lq = ", Lq);
  check(opt.k_doc.empty() || static_cast<int64_t>(opt.k_doc.size()) == Lk, "k_doc has ", opt.k_doc.size(),
        " entries but Lk = ", Lk);
  check(opt.window_left >= -1 && opt.window_right >= -1, "a window side must be >= 0, or -1 for unbounded, got ",
        opt.window_left, ",", opt.window_right);
  check(!opt.causal || opt.window_right <= 0,
        "causal attention sees no key to the right, but window_right = ", opt.window_right,
        " (drop causal, or the right side of the window)");
  return {B, Lq, Lk, H, Hkv, d, scale, opt.window_left, opt.causal ? 0 : opt.window_right};
}

void check_attention_grads(const TensorView& q, const TensorView& k, const TensorView& dout, const TensorView& dq,
                           const TensorView& dk, const TensorView& dv) {
  check_like(dout, q, "dout", "q");
  check_like(dq, q, "dq", "q");
  check_like(dk, k, "dk", "k");
  check_like(dv, k, "dv", "k");
}

void check_attention_merge(const TensorView& o_acc, const TensorView& lse_acc, const TensorView& o_part,
                           const TensorView& lse_part) {
  check_rank(o_acc, 4, "o_acc", "[B, Lq, H, d]");
  check_rank(lse_acc, 3, "lse_acc", "[B, H, Lq]");
  check_like(o_part, o_acc, "o_part", "o_acc");
  check_like(lse_part, lse_acc, "lse_part", "lse_acc");
  check(o_acc.dtype == DType::f32, "o_acc must be fp32 (merges accumulate in fp32)");
  check(lse_acc.dtype == DType::f32 && lse_part.dtype == DType::f32, "lse tensors must be fp32");
  const int64_t B = o_acc.dim(0), L = o_acc.dim(1), H = o_acc.dim(2);
  check(lse_acc.dim(0) == B && lse_acc.dim(1) == H && lse_acc.dim(2) == L, "lse_acc must be [B, H, Lq] = [", B, ", ", H,
        ", ", L, "], got ", lse_acc.shape_str());
}

void check_cu_seqlens(std::span<const int32_t> cu, int64_t L, const char* name) {
  check(cu.size() >= 2, name, " needs at least 2 entries (0 and the length ", L, "), got ", cu.size());
  check(cu[0] == 0, name, "[0] must be 0, got ", cu[0]);
  for (size_t n = 1; n < cu.size(); ++n)
    check(cu[n] >= cu[n - 1], name, " must not decrease: ", name, "[", n, "] = ", cu[n], " < ", name, "[", n - 1,
          "] = ", cu[n - 1]);
  check(cu.back() == L, name, " must end at the sequence length ", L, ", got ", name, "[", cu.size() - 1,
        "] = ", cu.back());
}

void Documents::apply(AttentionOptions& opt) const {
  opt.q_pos = q_pos, opt.k_pos = k_pos, opt.q_doc = q_doc, opt.k_doc = k_doc;
}

Documents documents(std::span<const int32_t> cu_q, std::span<const int32_t> cu_k) {
  check(cu_q.size() == cu_k.size(), "cu_seqlens_q has ", cu_q.size(), " entries and cu_seqlens_k ", cu_k.size(),
        ": both must list the same documents");
  check(!cu_q.empty(), "cu_seqlens is empty: it needs at least [0, length]");
  check_cu_seqlens(cu_q, cu_q.back(), "cu_seqlens_q");
  check_cu_seqlens(cu_k, cu_k.back(), "cu_seqlens_k");
  Documents d;
  for (size_t n = 0; n + 1 < cu_q.size(); ++n) {
    const int64_t lq = cu_q[n + 1] - cu_q[n], lk = cu_k[n + 1] - cu_k[n];
    for (int64_t i = 0; i < lq; ++i) d.q_pos.push_back(i + lk - lq), d.q_doc.push_back(static_cast<int64_t>(n));
    for (int64_t j = 0; j < lk; ++j) d.k_pos.push_back(j), d.k_doc.push_back(static_cast<int64_t>(n));
  }
  return d;
}

double attention_visible_pairs(int64_t Lq, int64_t Lk, const AttentionOptions& opt) {
  const int64_t left = opt.window_left, right = opt.causal ? 0 : opt.window_right;
  auto qpos = [&](int64_t i) { return opt.q_pos.empty() ? i + Lk - Lq : opt.q_pos[i]; };
  auto qdoc = [&](int64_t i) { return opt.q_doc.empty() ? int64_t{0} : opt.q_doc[i]; };
  // Keys as (document, position), sorted: a query's visible keys are one range.
  std::vector<std::pair<int64_t, int64_t>> keys(static_cast<size_t>(Lk));
  for (int64_t j = 0; j < Lk; ++j)
    keys[j] = {opt.k_doc.empty() ? 0 : opt.k_doc[j], opt.k_pos.empty() ? j : opt.k_pos[j]};
  std::sort(keys.begin(), keys.end());
  constexpr int64_t kMin = std::numeric_limits<int64_t>::min(), kMax = std::numeric_limits<int64_t>::max();
  double pairs = 0;
  for (int64_t i = 0; i < Lq; ++i) {
    const int64_t qp = qpos(i);
    const auto lo = std::lower_bound(keys.begin(), keys.end(), std::pair{qdoc(i), left < 0 ? kMin : qp - left});
    const auto hi = std::upper_bound(keys.begin(), keys.end(), std::pair{qdoc(i), right < 0 ? kMax : qp + right});
    pairs += static_cast<double>(hi > lo ? hi - lo : 0);
  }
  return pairs;
}

double attention_forward_flops(int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t d, const AttentionOptions& opt) {
  return 4.0 * static_cast<double>(B * H * d) * attention_visible_pairs(Lq, Lk, opt);
}

double attention_forward_flops(int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t d, bool causal) {
  AttentionOptions opt;
  opt.causal = causal;
  return attention_forward_flops(B, H, Lq, Lk, d, opt);
}

}  // namespace ringattn
