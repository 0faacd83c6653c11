// The CUDA Device (cuda.h) as the CUDA-side code sees it: its streams, and the
// error check every CUDA call goes through.
#pragma once
#include <cuda_runtime.h>

#include <string>

#include "ringattn/device.h"

namespace ringattn::cuda {

// Throws Error "CUDA <what>: <error string>" unless e == cudaSuccess.
void check(cudaError_t e, const char* what);

class CudaDevice final : public Device {
 public:
  explicit CudaDevice(int ordinal);
  ~CudaDevice() override;
  CudaDevice(const CudaDevice&) = delete;
  CudaDevice& operator=(const CudaDevice&) = delete;

  int ordinal() const { return ordinal_; }
  cudaStream_t compute() const { return compute_; }  // kernels, in order
  cudaStream_t comm() const { return comm_; }        // this device's transfers
  const cudaDeviceProp& props() const { return props_; }
  void make_current() const;  // cudaSetDevice(ordinal) for the calling thread

  std::string name() const override;
  bool is_host() const override { return false; }
  DeviceTensor alloc(DType dtype, std::span<const int64_t> shape) override;
  DeviceTensor upload(const TensorView& host) override;
  void download(const TensorView& host_dst, const TensorView& src) override;
  std::shared_ptr<const int64_t> upload_positions(std::span<const int64_t> host) override;
  void copy(const TensorView& dst, const TensorView& src) override;
  void fill(const TensorView& x, float value) override;
  void add(const TensorView& acc, const TensorView& x, int threads) override;
  void attention_forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                         const TensorView& lse, const AttentionOptions& opt) override;
  void attention_backward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                          const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
                          const TensorView& dv, const AttentionOptions& opt) override;
  void attention_merge(const TensorView& o_acc, const TensorView& lse_acc, const TensorView& o_part,
                       const TensorView& lse_part, int threads) override;
  void synchronize(double timeout_seconds = 300) override;

 private:
  int ordinal_;
  cudaDeviceProp props_{};
  cudaStream_t compute_ = nullptr, comm_ = nullptr;
};

// The CudaDevice behind dev; throws Error naming dev when it is another kind.
CudaDevice& as_cuda(Device& dev);

// Host waits for `event` with a bound: polls cudaEventQuery, throws Error naming
// `what` after timeout_seconds.
void wait_event_bounded(cudaEvent_t event, double timeout_seconds, const char* what);

// A CUDA event without timing, destroyed with its last owner (CUDA releases it
// once a record still pending on a stream completes).
class Event {
 public:
  Event() { check(cudaEventCreateWithFlags(&e_, cudaEventDisableTiming), "cudaEventCreateWithFlags"); }
  ~Event() { cudaEventDestroy(e_); }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  cudaEvent_t get() const { return e_; }

 private:
  cudaEvent_t e_ = nullptr;
};

// True when p is device (or managed) memory; host memory, pinned or not, is not.
bool is_device_pointer(const void* p);

}  // namespace ringattn::cuda
