// The attention contract of ringattn/attention.h, checked once for every backend.
#include <cmath>

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
  return {B, Lq, Lk, H, Hkv, d, scale};
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

}  // namespace ringattn
