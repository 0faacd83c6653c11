// Where tensors live and kernels run. The ring schedule (src/parallel) is written
// once over this interface and the Communicator (comm.h): the CPU device runs the
// CPU kernels on host memory in the calling thread; the CUDA device (cuda.h) runs
// the CUDA kernels on one GPU, queued in order on its compute stream, while its
// communicators move data on a second stream.
//
// Every TensorView handed to a Device method must point into that device's
// memory (alloc/upload), and AttentionOptions' q_pos/k_pos must too
// (upload_positions). Methods are asynchronous on devices with streams: results
// are visible to the host only after download() or synchronize().
#pragma once
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>

#include "ringattn/attention.h"
#include "ringattn/tensor.h"

namespace ringattn {

// Owning, contiguous storage on one device, with its view.
class DeviceTensor {
 public:
  DeviceTensor() = default;
  DeviceTensor(std::shared_ptr<void> storage, const TensorView& view) : storage_(std::move(storage)), view_(view) {}
  const TensorView& view() const { return view_; }
  operator const TensorView&() const { return view_; }
  int64_t dim(int i) const { return view_.shape[i]; }
  int64_t numel() const { return view_.numel(); }
  size_t bytes() const { return static_cast<size_t>(view_.numel()) * dtype_size(view_.dtype); }
  template <typename T>
  T* ptr() const {
    return view_.ptr<T>();
  }

 private:
  std::shared_ptr<void> storage_;
  TensorView view_;
};

class Device {
 public:
  virtual ~Device() = default;
  virtual std::string name() const = 0;  // "cpu", "cuda:0 NVIDIA H100 80GB HBM3"
  virtual bool is_host() const = 0;      // its memory is the host's (no copies needed)

  virtual DeviceTensor alloc(DType dtype, std::span<const int64_t> shape) = 0;
  DeviceTensor alloc(DType dtype, std::initializer_list<int64_t> shape) {
    return alloc(dtype, std::span<const int64_t>(shape.begin(), shape.size()));
  }
  // A contiguous device copy of a host tensor / a host copy of a device tensor
  // (both complete before returning).
  virtual DeviceTensor upload(const TensorView& host) = 0;
  virtual void download(const TensorView& host_dst, const TensorView& src) = 0;
  // Global token positions where this device's kernels read them (kept alive by
  // the returned pointer).
  virtual std::shared_ptr<const int64_t> upload_positions(std::span<const int64_t> host) = 0;

  // dst := src (same shape, any strides, dtype conversion).
  virtual void copy(const TensorView& dst, const TensorView& src) = 0;
  // Every element of x := value.
  virtual void fill(const TensorView& x, float value) = 0;
  // acc += x elementwise: acc fp32 contiguous, x any dtype of the same shape,
  // contiguous. threads: CPU threads (0: the OpenMP default); other devices ignore it.
  virtual void add(const TensorView& acc, const TensorView& x, int threads = 0) = 0;

  // The kernel contracts of attention.h on this device's memory.
  virtual void attention_forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                                 const TensorView& lse, const AttentionOptions& opt) = 0;
  virtual void attention_backward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                                  const TensorView& lse, const TensorView& dout, const TensorView& dq,
                                  const TensorView& dk, const TensorView& dv, const AttentionOptions& opt) = 0;
  virtual void attention_merge(const TensorView& o_acc, const TensorView& lse_acc, const TensorView& o_part,
                               const TensorView& lse_part, int threads) = 0;

  // The token-local layers of layers.h on this device's memory, same contracts
  // (row-major [N, C], fp32 activations, W in the compute dtype, weight
  // gradients accumulated, activation gradients overwritten; b, db, dx may be null).
  virtual void layernorm_forward(int64_t N, int64_t C, const float* x, const float* gamma, const float* beta, float* y,
                                 float* mean, float* rstd, float eps = 1e-5f) = 0;
  virtual void layernorm_backward(int64_t N, int64_t C, const float* x, const float* gamma, const float* mean,
                                  const float* rstd, const float* dy, float* dx, float* dgamma, float* dbeta) = 0;
  virtual void rmsnorm_forward(int64_t N, int64_t C, const float* x, const float* gamma, float* y, float* rstd,
                               float eps) = 0;
  virtual void rmsnorm_backward(int64_t N, int64_t C, const float* x, const float* gamma, const float* rstd,
                                const float* dy, float* dx, float* dgamma) = 0;
  // SwiGLU of a fused gate|up projection h [N, 2F] -> y [N, F]; dh [N, 2F].
  virtual void swiglu_forward(int64_t N, int64_t F, const float* h, float* y) = 0;
  virtual void swiglu_backward(int64_t N, int64_t F, const float* h, const float* dy, float* dh) = 0;
  // RoPE in place on x [N, H, d] with rows ld apart, by the global positions
  // pos [N] (upload_positions) and inv_freq [d/2] (this device's memory); the
  // backward rotates back.
  virtual void rope_forward(int64_t N, int64_t H, int64_t d, int64_t ld, float* x, const int64_t* pos,
                            const float* inv_freq) = 0;
  virtual void rope_backward(int64_t N, int64_t H, int64_t d, int64_t ld, float* dx, const int64_t* pos,
                             const float* inv_freq) = 0;
  virtual void gelu_forward(int64_t n, const float* x, float* y) = 0;
  virtual void gelu_backward(int64_t n, const float* x, const float* dy, float* dx) = 0;
  virtual void linear_forward(int64_t N, int64_t Cin, int64_t Cout, const float* x, const void* W, const float* b,
                              float* y, DType compute) = 0;
  virtual void linear_backward(int64_t N, int64_t Cin, int64_t Cout, const float* x, const void* W, const float* dy,
                               float* dx, float* dW, float* db, DType compute) = 0;
  // y[N, D] += b[D] on every row.
  virtual void add_bias(int64_t N, int64_t D, float* y, const float* b) = 0;
  // Σ (y − t)² over n elements (returned to the host, summed in double) and
  // dy = scale · (y − t).
  virtual double squared_error(int64_t n, const float* y, const float* t, float* dy, float scale) = 0;
  // One AdamW step over n parameters (model.h's AdamW: bias-corrected moments
  // m, v, decoupled weight decay); c1, c2 = 1 − β1^step, 1 − β2^step.
  struct AdamWStep {
    float lr, beta1, beta2, eps, weight_decay, c1, c2;
  };
  virtual void adamw(int64_t n, float* w, const float* g, float* m, float* v, const AdamWStep& s) = 0;

  // The host waits until everything queued on this device is done (bounded: a
  // device that does not finish within timeout_seconds throws Error).
  virtual void synchronize(double timeout_seconds = 300) = 0;
};

// The host: CPU kernels (attention.h) in the calling thread.
Device& cpu_device();

}  // namespace ringattn
