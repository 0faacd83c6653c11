// The host as a Device: Tensors in host memory, the CPU kernels of attention.h,
// nothing queued (every call is complete when it returns).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ringattn/cpu/attention.h"
#include "ringattn/cpu/layers.h"
#include "ringattn/device.h"
#include "ringattn/error.h"

namespace ringattn {
namespace {

class CpuDevice final : public Device {
 public:
  std::string name() const override { return "cpu"; }
  bool is_host() const override { return true; }

  DeviceTensor alloc(DType dtype, std::span<const int64_t> shape) override {
    check(shape.size() <= static_cast<size_t>(kMaxRank), "tensors have at most ", kMaxRank, " dimensions");
    auto t = std::make_shared<Tensor>(dtype, static_cast<int>(shape.size()), shape.data());
    const TensorView view = t->view();
    return DeviceTensor(std::move(t), view);
  }
  DeviceTensor upload(const TensorView& host) override {
    DeviceTensor d = alloc(host.dtype, std::span<const int64_t>(host.shape.data(), host.rank));
    copy_into(d, host);
    return d;
  }
  void download(const TensorView& host_dst, const TensorView& src) override { copy_into(host_dst, src); }
  std::shared_ptr<const int64_t> upload_positions(std::span<const int64_t> host) override {
    auto v = std::make_shared<std::vector<int64_t>>(host.begin(), host.end());
    return std::shared_ptr<const int64_t>(v, v->data());
  }
  void copy(const TensorView& dst, const TensorView& src) override { copy_into(dst, src); }
  void fill(const TensorView& x, float value) override {
    if (x.is_contiguous() && x.dtype == DType::f32) {
      std::fill_n(x.ptr<float>(), x.numel(), value);
      return;
    }
    Tensor v(x.dtype, x.rank, x.shape.data());
    const int64_t n = v.numel();
    for (int64_t i = 0; i < n; ++i) store_from_f32(v.ptr<void>(), v.dtype(), i, value);
    copy_into(x, v);
  }
  void add(const TensorView& acc, const TensorView& x, int threads) override {
    check(acc.dtype == DType::f32 && acc.is_contiguous() && x.is_contiguous() && same_shape(acc, x),
          "add: acc must be contiguous fp32 and x contiguous of the same shape, got ", acc.shape_str(), " and ",
          x.shape_str());
    float* a = acc.ptr<float>();
    const int64_t n = acc.numel();
    if (x.dtype == DType::f32) {
      const float* b = x.ptr<float>();
#pragma omp parallel for simd schedule(static) num_threads(threads > 0 ? threads : omp_get_max_threads())
      for (int64_t i = 0; i < n; ++i) a[i] += b[i];
    } else {
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : omp_get_max_threads())
      for (int64_t i = 0; i < n; ++i) a[i] += load_as_f32(x.data, x.dtype, i);
    }
  }
  void attention_forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                         const TensorView& lse, const AttentionOptions& opt) override {
    ringattn::attention_forward(q, k, v, o, lse, opt);
  }
  void attention_backward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                          const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
                          const TensorView& dv, const AttentionOptions& opt) override {
    ringattn::attention_backward(q, k, v, o, lse, dout, dq, dk, dv, opt);
  }
  void attention_merge(const TensorView& o_acc, const TensorView& lse_acc, const TensorView& o_part,
                       const TensorView& lse_part, int threads) override {
    ringattn::attention_merge(o_acc, lse_acc, o_part, lse_part, threads);
  }
  void layernorm_forward(int64_t N, int64_t C, const float* x, const float* gamma, const float* beta, float* y,
                         float* mean, float* rstd, float eps) override {
    ringattn::layernorm_forward(N, C, x, gamma, beta, y, mean, rstd, eps);
  }
  void layernorm_backward(int64_t N, int64_t C, const float* x, const float* gamma, const float* mean,
                          const float* rstd, const float* dy, float* dx, float* dgamma, float* dbeta) override {
    ringattn::layernorm_backward(N, C, x, gamma, mean, rstd, dy, dx, dgamma, dbeta);
  }
  void rmsnorm_forward(int64_t N, int64_t C, const float* x, const float* gamma, float* y, float* rstd,
                       float eps) override {
    ringattn::rmsnorm_forward(N, C, x, gamma, y, rstd, eps);
  }
  void rmsnorm_backward(int64_t N, int64_t C, const float* x, const float* gamma, const float* rstd, const float* dy,
                        float* dx, float* dgamma) override {
    ringattn::rmsnorm_backward(N, C, x, gamma, rstd, dy, dx, dgamma);
  }
  void swiglu_forward(int64_t N, int64_t F, const float* h, float* y) override {
    ringattn::swiglu_rows_forward(N, F, h, y);
  }
  void swiglu_backward(int64_t N, int64_t F, const float* h, const float* dy, float* dh) override {
    ringattn::swiglu_rows_backward(N, F, h, dy, dh);
  }
  void rope_forward(int64_t N, int64_t H, int64_t d, int64_t ld, float* x, const int64_t* pos,
                    const float* inv_freq) override {
    ringattn::rope_forward(N, H, d, ld, x, pos, inv_freq);
  }
  void rope_backward(int64_t N, int64_t H, int64_t d, int64_t ld, float* dx, const int64_t* pos,
                     const float* inv_freq) override {
    ringattn::rope_backward(N, H, d, ld, dx, pos, inv_freq);
  }
  void gelu_forward(int64_t n, const float* x, float* y) override { ringattn::gelu_forward(n, x, y); }
  void gelu_backward(int64_t n, const float* x, const float* dy, float* dx) override {
    ringattn::gelu_backward(n, x, dy, dx);
  }
  void linear_forward(int64_t N, int64_t Cin, int64_t Cout, const float* x, const void* W, const float* b, float* y,
                      DType compute) override {
    ringattn::linear_forward(N, Cin, Cout, x, W, b, y, compute);
  }
  void linear_backward(int64_t N, int64_t Cin, int64_t Cout, const float* x, const void* W, const float* dy, float* dx,
                       float* dW, float* db, DType compute) override {
    ringattn::linear_backward(N, Cin, Cout, x, W, dy, dx, dW, db, compute);
  }
  void add_bias(int64_t N, int64_t D, float* y, const float* b) override {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t c = 0; c < D; ++c) y[i * D + c] += b[c];
  }
  double squared_error(int64_t n, const float* y, const float* t, float* dy, float scale) override {
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float e = y[i] - t[i];
      sum += static_cast<double>(e) * e;
      dy[i] = scale * e;
    }
    return sum;
  }
  void adamw(int64_t n, float* w, const float* g, float* m, float* v, const AdamWStep& s) override {
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      m[i] = s.beta1 * m[i] + (1.f - s.beta1) * g[i];
      v[i] = s.beta2 * v[i] + (1.f - s.beta2) * g[i] * g[i];
      w[i] -= s.lr * ((m[i] / s.c1) / (std::sqrt(v[i] / s.c2) + s.eps) + s.weight_decay * w[i]);
    }
  }
  void synchronize(double) override {}
};

}  // namespace

Device& cpu_device() {
  static CpuDevice dev;
  return dev;
}

}  // namespace ringattn
