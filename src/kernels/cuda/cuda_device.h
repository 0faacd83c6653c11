// The CUDA Device (cuda.h) as the CUDA-side code sees it: its streams, and the
// error check every CUDA call goes through.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <memory>
#include <string>

#include "ringattn/device.h"

namespace ringattn::cuda {

// Throws Error "CUDA <what>: <error string>" unless e == cudaSuccess.
void check(cudaError_t e, const char* what);

class CudaDevice final : public Device {
 public:
  // cache: keep freed memory for reuse (see Pool). Only for a device whose memory
  // no other device's streams touch (not the ranks of run_device_local_group).
  explicit CudaDevice(int ordinal, bool cache = false);
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
  using Device::alloc;
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
  void layernorm_forward(int64_t N, int64_t C, const float* x, const float* gamma, const float* beta, float* y,
                         float* mean, float* rstd, float eps) override;
  void rmsnorm_forward(int64_t N, int64_t C, const float* x, const float* gamma, float* y, float* rstd,
                       float eps) override;
  void rmsnorm_backward(int64_t N, int64_t C, const float* x, const float* gamma, const float* rstd, const float* dy,
                        float* dx, float* dgamma) override;
  void swiglu_forward(int64_t N, int64_t F, const float* h, float* y) override;
  void swiglu_backward(int64_t N, int64_t F, const float* h, const float* dy, float* dh) override;
  void rope_forward(int64_t N, int64_t H, int64_t d, int64_t ld, float* x, const int64_t* pos,
                    const float* inv_freq) override;
  void rope_backward(int64_t N, int64_t H, int64_t d, int64_t ld, float* dx, const int64_t* pos,
                     const float* inv_freq) override;
  void layernorm_backward(int64_t N, int64_t C, const float* x, const float* gamma, const float* mean,
                          const float* rstd, const float* dy, float* dx, float* dgamma, float* dbeta) override;
  void gelu_forward(int64_t n, const float* x, float* y) override;
  void gelu_backward(int64_t n, const float* x, const float* dy, float* dx) override;
  void linear_forward(int64_t N, int64_t Cin, int64_t Cout, const float* x, const void* W, const float* b, float* y,
                      DType compute) override;
  void linear_backward(int64_t N, int64_t Cin, int64_t Cout, const float* x, const void* W, const float* dy, float* dx,
                       float* dW, float* db, DType compute) override;
  void add_bias(int64_t N, int64_t D, float* y, const float* b) override;
  double squared_error(int64_t n, const float* y, const float* t, float* dy, float scale) override;
  void adamw(int64_t n, float* w, const float* g, float* m, float* v, const AdamWStep& s) override;
  void synchronize(double timeout_seconds = 300) override;
  void release_cache();  // cached free blocks back to CUDA (see Pool)

 private:
  // C[M, N] (fp32, column-major, ldc) = op(A)·op(B) + beta·C by cuBLAS with fp32
  // accumulation, A and B of dtype ab (fp32 or bf16).
  void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const void* A, int64_t lda, const void* B,
            int64_t ldb, float beta, float* C, int64_t ldc, DType ab);
  struct Pool;
  int ordinal_;
  cudaDeviceProp props_{};
  cudaStream_t compute_ = nullptr, comm_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  std::shared_ptr<Pool> pool_;  // null: cudaMalloc / cudaFree every time
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
