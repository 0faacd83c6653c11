// The public attention API: checks every precondition with a message that says
// what to fix, fills in defaults (scale, positions, threads), and dispatches to
// the kernels built for the chosen instruction set.
#include "ringattn/attention.h"

#include <omp.h>

#include <cmath>
#include <vector>

#include "kernels/cpu/kernel_args.h"
#include "ringattn/error.h"

namespace ringattn {
namespace {

const cpu::KernelTable& table_for(Isa isa) {
  check(isa_supported(isa), "instruction set '", isa_name(isa), "' is not supported by this CPU");
  switch (isa) {
    case Isa::amx_bf16: return cpu::kernels_amx();
    case Isa::avx512_bf16: return cpu::kernels_avx512bf16();
    case Isa::avx512: return cpu::kernels_avx512();
    case Isa::avx2: return cpu::kernels_avx2();
    default: return cpu::kernels_generic();
  }
}

void check_rank(const TensorView& t, int rank, const char* name, const char* layout) {
  check(t.rank == rank, name, " must have rank ", rank, " ", layout, ", got shape ", t.shape_str());
  for (int i = 0; i < t.rank; ++i)
    check(t.shape[i] >= 1, name, " has shape ", t.shape_str(), ": every dimension of ", layout, " must be at least 1");
  check(!t.empty(), name, " is missing (no data)");
}

// A copy with a contiguous last dimension when the view's is strided (the kernels
// read rows of d elements).
struct RowContiguous {
  Tensor copy;
  TensorView view;
  explicit RowContiguous(const TensorView& t) : view(t) {
    if (t.strides[t.rank - 1] != 1) {
      copy = Tensor(t.dtype, t.rank, t.shape.data());
      copy_into(copy.view(), t);
      view = copy.view();
    }
  }
};

cpu::Bshd bshd(const TensorView& t) { return {t.data, t.dtype, t.strides[0], t.strides[1], t.strides[2]}; }
cpu::BshdOut bshd_out(const TensorView& t) { return {t.data, t.dtype, t.strides[0], t.strides[1], t.strides[2]}; }
cpu::Lse lse_of(const TensorView& t) { return {t.ptr<float>(), t.strides[0], t.strides[1], t.strides[2]}; }

// Everything the forward and backward share: shapes, scale, positions, threads.
struct Problem {
  cpu::AttnShape shape{};
  std::vector<int64_t> q_pos, k_pos;
  const cpu::KernelTable* kernels = nullptr;

  Problem(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& lse,
          const AttentionOptions& opt) {
    check_rank(q, 4, "q", "[B, Lq, H, d]");
    check_rank(k, 4, "k", "[B, Lk, Hkv, d]");
    check_rank(v, 4, "v", "[B, Lk, Hkv, d]");
    check_rank(lse, 3, "lse", "[B, H, Lq]");
    const int64_t B = q.dim(0), Lq = q.dim(1), H = q.dim(2), d = q.dim(3);
    const int64_t Lk = k.dim(1), Hkv = k.dim(2);
    check(B > 0 && Lq > 0 && H > 0 && d > 0, "q ", q.shape_str(), " has an empty dimension");
    check(Lk > 0 && Hkv > 0, "k ", k.shape_str(), " has an empty dimension");
    check(k.dim(0) == B && v.dim(0) == B, "batch sizes differ: q ", q.shape_str(), ", k ", k.shape_str(), ", v ",
          v.shape_str());
    check(k.dim(3) == d && v.dim(3) == d, "head dims differ: q ", q.shape_str(), ", k ", k.shape_str(), ", v ",
          v.shape_str(), " (q, k and v need the same d)");
    check(v.dim(1) == Lk && v.dim(2) == Hkv, "k ", k.shape_str(), " and v ", v.shape_str(), " must have the same shape");
    check(H % Hkv == 0, "query heads H=", H, " must be a multiple of key/value heads Hkv=", Hkv, " (GQA/MQA)");
    check(d <= 1024, "head dim d=", d, " is larger than the supported maximum 1024");
    check(q.dtype == k.dtype && q.dtype == v.dtype, "q, k and v must share a dtype, got ", dtype_name(q.dtype), ", ",
          dtype_name(k.dtype), ", ", dtype_name(v.dtype));
    check(lse.dtype == DType::f32, "lse must be fp32, got ", dtype_name(lse.dtype));
    check(lse.dim(0) == B && lse.dim(1) == H && lse.dim(2) == Lq, "lse must be [B, H, Lq] = [", B, ", ", H, ", ", Lq,
          "], got ", lse.shape_str());
    const float scale = std::isnan(opt.scale) ? 1.f / std::sqrt(static_cast<float>(d)) : opt.scale;
    check(std::isfinite(scale) && scale > 0.f, "scale must be positive and finite, got ", opt.scale);
    check(opt.q_pos.empty() || static_cast<int64_t>(opt.q_pos.size()) == Lq, "q_pos has ", opt.q_pos.size(),
          " entries but Lq = ", Lq);
    check(opt.k_pos.empty() || static_cast<int64_t>(opt.k_pos.size()) == Lk, "k_pos has ", opt.k_pos.size(),
          " entries but Lk = ", Lk);
    if (opt.q_pos.empty()) {
      q_pos.resize(Lq);
      for (int64_t i = 0; i < Lq; ++i) q_pos[i] = i + (Lk - Lq);  // bottom-right alignment
    } else {
      q_pos.assign(opt.q_pos.begin(), opt.q_pos.end());
    }
    if (opt.k_pos.empty()) {
      k_pos.resize(Lk);
      for (int64_t j = 0; j < Lk; ++j) k_pos[j] = j;
    } else {
      k_pos.assign(opt.k_pos.begin(), opt.k_pos.end());
    }
    check(opt.threads >= 0, "threads must be >= 0, got ", opt.threads);
    const int threads = opt.threads > 0 ? opt.threads : omp_get_max_threads();
    shape = {B, Lq, Lk, H, Hkv, d, scale, opt.causal, q_pos.data(), k_pos.data(), threads, opt.progress,
             opt.progress_ctx};
    kernels = &table_for(opt.isa ? *opt.isa : default_isa());
  }
};

void check_same_shape(const TensorView& t, const TensorView& like, const char* name, const char* like_name) {
  check(!t.empty(), name, " is missing");
  check(t.rank == like.rank && same_shape(t, like), name, " must have the shape of ", like_name, " ",
        like.shape_str(), ", got ", t.shape_str());
}

}  // namespace

void attention_forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                       const TensorView& lse, const AttentionOptions& opt) {
  Problem p(q, k, v, lse, opt);
  check_same_shape(o, q, "o", "q");
  check(o.strides[3] == 1, "o must have a contiguous last dimension, got strides of ", o.shape_str());
  RowContiguous qc(q), kc(k), vc(v);
  const cpu::FwdArgs args{p.shape, bshd(qc.view), bshd(kc.view), bshd(vc.view), bshd_out(o), lse_of(lse)};
  // Up to kDecodeRows query rows per GQA group (decoding) run the decode kernel,
  // which reads K/V once in place instead of packing them.
  const int64_t rows_per_group = q.dim(1) * (q.dim(2) / k.dim(2));
  (rows_per_group <= kDecodeRows ? p.kernels->decode : p.kernels->forward)(args);
}

void attention_backward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                        const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
                        const TensorView& dv, const AttentionOptions& opt) {
  Problem p(q, k, v, lse, opt);
  check_same_shape(o, q, "o", "q");
  check_same_shape(dout, q, "dout", "q");
  check_same_shape(dq, q, "dq", "q");
  check_same_shape(dk, k, "dk", "k");
  check_same_shape(dv, v, "dv", "v");
  for (const auto* t : {&dq, &dk, &dv})
    check(t->strides[3] == 1, "gradient outputs must have a contiguous last dimension");
  RowContiguous qc(q), kc(k), vc(v), oc(o), doc(dout);
  p.kernels->backward({p.shape, bshd(qc.view), bshd(kc.view), bshd(vc.view), bshd(oc.view), bshd(doc.view),
                       lse_of(lse), bshd_out(dq), bshd_out(dk), bshd_out(dv)});
}

// lse = m + log(e^{lse_acc-m} + e^{lse_part-m}),  o = e^{lse_acc-lse}·o_acc + e^{lse_part-lse}·o_part
void attention_merge(const TensorView& o_acc, const TensorView& lse_acc, const TensorView& o_part,
                     const TensorView& lse_part, int threads) {
  check_rank(o_acc, 4, "o_acc", "[B, Lq, H, d]");
  check_rank(lse_acc, 3, "lse_acc", "[B, H, Lq]");
  check_same_shape(o_part, o_acc, "o_part", "o_acc");
  check_same_shape(lse_part, lse_acc, "lse_part", "lse_acc");
  check(o_acc.dtype == DType::f32, "o_acc must be fp32 (merges accumulate in fp32)");
  check(lse_acc.dtype == DType::f32 && lse_part.dtype == DType::f32, "lse tensors must be fp32");
  const int64_t B = o_acc.dim(0), L = o_acc.dim(1), H = o_acc.dim(2), d = o_acc.dim(3);
  check(lse_acc.dim(0) == B && lse_acc.dim(1) == H && lse_acc.dim(2) == L, "lse_acc must be [B, H, Lq] = [", B, ", ",
        H, ", ", L, "], got ", lse_acc.shape_str());
  float* oa = o_acc.ptr<float>();
  float* la = lse_acc.ptr<float>();
  const float* lp = lse_part.ptr<float>();
  check(threads >= 0, "threads must be >= 0, got ", threads);
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads > 0 ? threads : omp_get_max_threads())
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < L; ++i)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t ia = b * lse_acc.strides[0] + h * lse_acc.strides[1] + i * lse_acc.strides[2];
        const int64_t ip = b * lse_part.strides[0] + h * lse_part.strides[1] + i * lse_part.strides[2];
        const float l1 = la[ia], l2 = lp[ip];
        const float m = std::fmax(l1, l2);
        if (m == -INFINITY) continue;  // neither side saw a key: o stays 0, lse -inf
        const float lse = m + std::log(std::exp(l1 - m) + std::exp(l2 - m));
        const float w1 = std::exp(l1 - lse), w2 = std::exp(l2 - lse);
        const int64_t oo = b * o_acc.strides[0] + i * o_acc.strides[1] + h * o_acc.strides[2];
        const int64_t op = b * o_part.strides[0] + i * o_part.strides[1] + h * o_part.strides[2];
        for (int64_t c = 0; c < d; ++c) {
          const float x1 = oa[oo + c * o_acc.strides[3]];
          const float x2 = load_as_f32(o_part.data, o_part.dtype, op + c * o_part.strides[3]);
          oa[oo + c * o_acc.strides[3]] = w1 * x1 + w2 * x2;
        }
        la[ia] = lse;
      }
}

double attention_forward_flops(int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t d, bool causal) {
  // Visible (query, key) pairs with bottom-right alignment: query i sees
  // min(Lk, i + Lk - Lq + 1) keys.
  double pairs = static_cast<double>(Lq) * static_cast<double>(Lk);
  if (causal) {
    pairs = 0;
    for (int64_t i = 0; i < Lq; ++i) {
      const int64_t n = i + Lk - Lq + 1;
      pairs += static_cast<double>(n < 0 ? 0 : (n > Lk ? Lk : n));
    }
  }
  return 4.0 * static_cast<double>(B * H * d) * pairs;
}

}  // namespace ringattn
