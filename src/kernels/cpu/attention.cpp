// The public attention API: checks every precondition with a message that says
// what to fix, fills in defaults (scale, positions, threads), and dispatches to
// the kernels built for the chosen instruction set.
#include "ringattn/cpu/attention.h"

#include <omp.h>

#include <cmath>
#include <vector>

#include "kernels/cpu/kernel_args.h"
#include "ringattn/error.h"

namespace ringattn {

const cpu::KernelTable& cpu::kernels_for(Isa isa) {
  check(isa_supported(isa), "instruction set '", isa_name(isa), "' is not supported by this CPU");
  switch (isa) {
    case Isa::amx_bf16:
      return kernels_amx();
    case Isa::avx512_bf16:
      return kernels_avx512bf16();
    case Isa::avx512:
      return kernels_avx512();
    case Isa::avx2:
      return kernels_avx2();
    default:
      return kernels_generic();
  }
}

namespace {

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

  Problem(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o, const TensorView& lse,
          const AttentionOptions& opt) {
    const AttentionShape a = check_attention(q, k, v, o, lse, opt);
    const int64_t B = a.B, Lq = a.Lq, Lk = a.Lk, H = a.H, Hkv = a.Hkv, d = a.d;
    check(d <= 1024, "head dim d=", d, " is larger than the supported maximum 1024");
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
    const bool docs = !opt.q_doc.empty();
    shape = {B,
             Lq,
             Lk,
             H,
             Hkv,
             d,
             a.scale,
             a.window_left,
             a.window_right,
             q_pos.data(),
             k_pos.data(),
             docs ? opt.q_doc.data() : nullptr,
             docs ? opt.k_doc.data() : nullptr,
             threads,
             opt.progress,
             opt.progress_ctx};
    kernels = &cpu::kernels_for(opt.isa ? *opt.isa : default_isa());
  }
};

}  // namespace

void attention_forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                       const TensorView& lse, const AttentionOptions& opt) {
  Problem p(q, k, v, o, lse, opt);
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
  Problem p(q, k, v, o, lse, opt);
  check_attention_grads(q, k, dout, dq, dk, dv);
  for (const auto* t : {&dq, &dk, &dv})
    check(t->strides[3] == 1, "gradient outputs must have a contiguous last dimension");
  RowContiguous qc(q), kc(k), vc(v), oc(o), doc(dout);
  p.kernels->backward({p.shape, bshd(qc.view), bshd(kc.view), bshd(vc.view), bshd(oc.view), bshd(doc.view), lse_of(lse),
                       bshd_out(dq), bshd_out(dk), bshd_out(dv)});
}

// lse = m + log(e^{lse_acc-m} + e^{lse_part-m}),  o = e^{lse_acc-lse}·o_acc + e^{lse_part-lse}·o_part
void attention_merge(const TensorView& o_acc, const TensorView& lse_acc, const TensorView& o_part,
                     const TensorView& lse_part, int threads) {
  check_attention_merge(o_acc, lse_acc, o_part, lse_part);
  const int64_t B = o_acc.dim(0), L = o_acc.dim(1), H = o_acc.dim(2), d = o_acc.dim(3);
  float* oa = o_acc.ptr<float>();
  float* la = lse_acc.ptr<float>();
  const float* lp = lse_part.ptr<float>();
  check(threads >= 0, "threads must be >= 0, got ", threads);
  // fp32 rows with unit stride: the loop over c vectorizes
  const bool rows_f32 = o_part.dtype == DType::f32 && o_acc.strides[3] == 1 && o_part.strides[3] == 1;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads > 0 ? threads : omp_get_max_threads())
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < L; ++i)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t ia = b * lse_acc.strides[0] + h * lse_acc.strides[1] + i * lse_acc.strides[2];
        const int64_t ip = b * lse_part.strides[0] + h * lse_part.strides[1] + i * lse_part.strides[2];
        const float l1 = la[ia], l2 = lp[ip];
        if (l2 == -INFINITY) continue;  // the part saw no key: w1 = 1, w2 = 0, o_acc and lse_acc stay
        const float m = std::fmax(l1, l2);
        const float lse = m + std::log(std::exp(l1 - m) + std::exp(l2 - m));
        const float w1 = std::exp(l1 - lse), w2 = std::exp(l2 - lse);
        const int64_t oo = b * o_acc.strides[0] + i * o_acc.strides[1] + h * o_acc.strides[2];
        const int64_t op = b * o_part.strides[0] + i * o_part.strides[1] + h * o_part.strides[2];
        if (rows_f32) {
          float* x1 = oa + oo;
          const float* x2 = o_part.ptr<float>() + op;
          for (int64_t c = 0; c < d; ++c) x1[c] = w1 * x1[c] + w2 * x2[c];
        } else {
          for (int64_t c = 0; c < d; ++c) {
            const float x1 = oa[oo + c * o_acc.strides[3]];
            const float x2 = load_as_f32(o_part.data, o_part.dtype, op + c * o_part.strides[3]);
            oa[oo + c * o_acc.strides[3]] = w1 * x1 + w2 * x2;
          }
        }
        la[ia] = lse;
      }
}

}  // namespace ringattn
