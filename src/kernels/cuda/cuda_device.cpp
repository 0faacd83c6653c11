// The CUDA Device: memory by cudaMalloc, kernels queued on the compute stream,
// host copies synchronous, waits bounded.
#include "kernels/cuda/cuda_device.h"

#include <chrono>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "kernels/cuda/cublas_loader.h"
#include "kernels/cuda/kernels.h"
#include "ringattn/cuda.h"
#include "ringattn/error.h"

namespace ringattn {
namespace cuda {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(cat("CUDA ", what, ": ", cudaGetErrorString(e)));
}

void wait_event_bounded(cudaEvent_t event, double timeout_seconds, const char* what) {
  const auto start = std::chrono::steady_clock::now();
  for (int polls = 0;; ++polls) {
    const cudaError_t e = cudaEventQuery(event);
    if (e == cudaSuccess) return;
    if (e != cudaErrorNotReady) check(e, what);
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (waited > timeout_seconds)
      throw Error(cat("CUDA ", what, ": the GPU did not finish within ", timeout_seconds, " s"));
    if (polls > 1000) std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

bool is_device_pointer(const void* p) {
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    cudaGetLastError();  // older runtimes report plain host pointers as an error: clear it
    return false;
  }
  return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

// Freed blocks kept for reuse, by size: cudaFree synchronizes the whole device,
// which would stall the host after every layer's temporaries. A freed block
// remembers where its device's two streams were (events); whoever takes it again
// makes the compute stream wait for those points, and anything the
// communication stream does with it is queued after the compute stream's work
// (the communicators' rule), so no stream reuses memory still in use. Blocks are
// given back to CUDA when an allocation fails and when the device is destroyed.
struct CudaDevice::Pool {
  // Blocks come in sizes that repeat as lengths grow: powers of two up to 1 MiB,
  // then multiples of 2 MiB (at most twice the request, or 2 MiB more).
  static size_t bucket(size_t bytes) {
    if (bytes > (size_t(1) << 20)) return (bytes + (size_t(2) << 20) - 1) & ~((size_t(2) << 20) - 1);
    size_t b = 512;
    while (b < bytes) b <<= 1;
    return b;
  }
  struct Block {
    void* p;
    cudaEvent_t compute_done, comm_done;
  };
  std::mutex mu;
  int ordinal = 0;
  cudaStream_t compute = nullptr, comm = nullptr;
  bool open = true;
  std::unordered_map<size_t, std::vector<Block>> free;

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu);
    auto it = free.find(bytes);
    if (it == free.end() || it->second.empty()) return nullptr;
    const Block b = it->second.back();
    it->second.pop_back();
    cudaStreamWaitEvent(compute, b.compute_done, 0);
    cudaStreamWaitEvent(compute, b.comm_done, 0);
    cudaEventDestroy(b.compute_done);
    cudaEventDestroy(b.comm_done);
    return b.p;
  }
  void give(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mu);
    cudaSetDevice(ordinal);
    Block b{p, nullptr, nullptr};
    if (!open || cudaEventCreateWithFlags(&b.compute_done, cudaEventDisableTiming) != cudaSuccess ||
        cudaEventCreateWithFlags(&b.comm_done, cudaEventDisableTiming) != cudaSuccess) {
      cudaFree(p);  // synchronizes the device
      return;
    }
    cudaEventRecord(b.compute_done, compute);
    cudaEventRecord(b.comm_done, comm);
    free[bytes].push_back(b);
  }
  // Every cached block back to CUDA (cudaFree waits for the device); close: later
  // frees go straight to CUDA (the device is going).
  void release(bool close = false) {
    std::lock_guard<std::mutex> lock(mu);
    open = open && !close;
    cudaSetDevice(ordinal);
    for (auto& [size, blocks] : free)
      for (const Block& b : blocks) {
        cudaFree(b.p);
        cudaEventDestroy(b.compute_done);
        cudaEventDestroy(b.comm_done);
      }
    free.clear();
  }
};

CudaDevice::CudaDevice(int ordinal, bool cache) : ordinal_(ordinal) {
  const Cublas& blas = cublas();  // loaded before anything here needs freeing
  int n = 0;
  check(cudaGetDeviceCount(&n), "counting GPUs");
  ringattn::check(ordinal >= 0 && ordinal < n, "GPU ", ordinal, " does not exist: this process sees ", n, " GPU(s)");
  make_current();
  check(cudaGetDeviceProperties(&props_, ordinal), "reading the GPU's properties");
  check(cudaStreamCreateWithFlags(&compute_, cudaStreamNonBlocking), "creating the compute stream");
  check(cudaStreamCreateWithFlags(&comm_, cudaStreamNonBlocking), "creating the communication stream");
  if (blas.create(&blas_) != CUBLAS_STATUS_SUCCESS || blas.set_stream(blas_, compute_) != CUBLAS_STATUS_SUCCESS) {
    if (blas_) blas.destroy(blas_);
    cudaStreamDestroy(comm_);
    cudaStreamDestroy(compute_);
    throw Error(cat("cuBLAS could not be initialised on GPU ", ordinal));
  }
  if (cache) {
    pool_ = std::make_shared<Pool>();
    pool_->ordinal = ordinal, pool_->compute = compute_, pool_->comm = comm_;
  }
}

CudaDevice::~CudaDevice() {
  cudaSetDevice(ordinal_);
  cudaStreamSynchronize(comm_);
  cudaStreamSynchronize(compute_);
  if (pool_) pool_->release(/*close=*/true);  // blocks still held are freed directly when they go
  cublas().destroy(blas_);
  cudaStreamDestroy(comm_);
  cudaStreamDestroy(compute_);
}

void CudaDevice::make_current() const { check(cudaSetDevice(ordinal_), "selecting the GPU"); }

std::string CudaDevice::name() const { return cat("cuda:", ordinal_, " ", props_.name); }

DeviceTensor CudaDevice::alloc(DType dtype, std::span<const int64_t> shape) {
  ringattn::check(shape.size() <= static_cast<size_t>(kMaxRank), "tensors have at most ", kMaxRank, " dimensions");
  int64_t n = 1;
  for (int64_t s : shape) {
    ringattn::check(s >= 0, "negative dimension in a device allocation");
    n *= s;
  }
  make_current();
  void* p = nullptr;
  const size_t need = static_cast<size_t>(n) * dtype_size(dtype);
  const size_t bytes = pool_ && need ? Pool::bucket(need) : need;
  if (bytes && pool_) p = pool_->take(bytes);
  if (bytes && !p) {
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess && pool_) {  // give the cached blocks back, then try once more
      cudaGetLastError();
      pool_->release();
      e = cudaMalloc(&p, bytes);
    }
    if (e != cudaSuccess) {
      cudaGetLastError();  // clear the sticky-free allocation error
      throw Error(cat("CUDA out of memory allocating ", bytes, " bytes on ", name(), ": ", cudaGetErrorString(e)));
    }
  }
  const int ord = ordinal_;
  std::shared_ptr<void> storage(p, [ord, pool = pool_, bytes](void* q) {
    if (!q) return;
    if (pool) return pool->give(q, bytes);
    cudaSetDevice(ord);
    cudaFree(q);
  });
  int64_t dims[kMaxRank];
  for (size_t i = 0; i < shape.size(); ++i) dims[i] = shape[i];
  int64_t strides[kMaxRank];
  int64_t st = 1;
  for (int i = static_cast<int>(shape.size()) - 1; i >= 0; --i) strides[i] = st, st *= dims[i];
  return DeviceTensor(std::move(storage), TensorView(p, dtype, static_cast<int>(shape.size()), dims, strides));
}

DeviceTensor CudaDevice::upload(const TensorView& host) {
  Tensor contiguous(host.dtype, host.rank, host.shape.data());
  copy_into(contiguous.view(), host);
  DeviceTensor d = alloc(host.dtype, std::span<const int64_t>(host.shape.data(), host.rank));
  make_current();
  check(cudaMemcpyAsync(d.view().data, contiguous.ptr<void>(), d.bytes(), cudaMemcpyHostToDevice, compute_),
        "copying to the GPU");
  synchronize();  // bounded: the compute stream may wait on a peer's transfer
  return d;
}

void CudaDevice::download(const TensorView& host_dst, const TensorView& src) {
  ringattn::check(host_dst.rank == src.rank && same_shape(host_dst, src), "download: shapes differ, ",
                  host_dst.shape_str(), " vs ", src.shape_str());
  make_current();
  DeviceTensor packed;
  const TensorView* from = &src;
  if (!src.is_contiguous()) {
    packed = alloc(src.dtype, std::span<const int64_t>(src.shape.data(), src.rank));
    cuda::copy(packed, src, compute_);
    from = &packed.view();
  }
  Tensor host(src.dtype, src.rank, src.shape.data());
  check(cudaMemcpyAsync(host.ptr<void>(), from->data, host.bytes(), cudaMemcpyDeviceToHost, compute_),
        "copying from the GPU");
  synchronize();
  copy_into(host_dst, host.view());
}

std::shared_ptr<const int64_t> CudaDevice::upload_positions(std::span<const int64_t> host) {
  if (host.empty()) return nullptr;
  // 8-byte positions in a block of 2·n fp32 slots (the device's allocator, so no
  // cudaMalloc/cudaFree per call); the copy is queued on the compute stream.
  const DeviceTensor d = alloc(DType::f32, {2 * static_cast<int64_t>(host.size())});
  check(cudaMemcpyAsync(d.ptr<void>(), host.data(), host.size_bytes(), cudaMemcpyHostToDevice, compute_),
        "copying positions to the GPU");
  auto* p = reinterpret_cast<const int64_t*>(d.ptr<void>());
  return std::shared_ptr<const int64_t>(std::make_shared<DeviceTensor>(d), p);
}

void CudaDevice::copy(const TensorView& dst, const TensorView& src) {
  make_current();
  cuda::copy(dst, src, compute_);
}
void CudaDevice::fill(const TensorView& x, float value) {
  make_current();
  cuda::fill(x, value, compute_);
}
void CudaDevice::add(const TensorView& acc, const TensorView& x, int) {
  make_current();
  cuda::add(acc, x, compute_);
}
void CudaDevice::attention_forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                                   const TensorView& lse, const AttentionOptions& opt) {
  make_current();
  flash_forward(q, k, v, o, lse, opt, compute_);
}
void CudaDevice::attention_backward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                                    const TensorView& lse, const TensorView& dout, const TensorView& dq,
                                    const TensorView& dk, const TensorView& dv, const AttentionOptions& opt) {
  make_current();
  if (dout.dtype == q.dtype) return flash_backward(q, k, v, o, lse, dout, dq, dk, dv, opt, compute_);
  // The kernel reads dout in q's dtype (the CPU kernels take any dtype).
  DeviceTensor d = alloc(q.dtype, std::span<const int64_t>(dout.shape.data(), dout.rank));
  cuda::copy(d, dout, compute_);
  flash_backward(q, k, v, o, lse, d, dq, dk, dv, opt, compute_);
}
void CudaDevice::attention_merge(const TensorView& o_acc, const TensorView& lse_acc, const TensorView& o_part,
                                 const TensorView& lse_part, int) {
  make_current();
  merge(o_acc, lse_acc, o_part, lse_part, compute_);
}

void CudaDevice::layernorm_forward(int64_t N, int64_t C, const float* x, const float* gamma, const float* beta,
                                   float* y, float* mean, float* rstd, float eps) {
  make_current();
  cuda::layernorm_forward(N, C, x, gamma, beta, y, mean, rstd, eps, compute_);
}
void CudaDevice::rmsnorm_forward(int64_t N, int64_t C, const float* x, const float* gamma, float* y, float* rstd,
                                 float eps) {
  make_current();
  cuda::rmsnorm_forward(N, C, x, gamma, y, rstd, eps, compute_);
}
void CudaDevice::rmsnorm_backward(int64_t N, int64_t C, const float* x, const float* gamma, const float* rstd,
                                  const float* dy, float* dx, float* dgamma) {
  make_current();
  cuda::rmsnorm_backward(N, C, x, gamma, rstd, dy, dx, dgamma, compute_);
}
void CudaDevice::swiglu_forward(int64_t N, int64_t F, const float* h, float* y) {
  make_current();
  cuda::swiglu_forward(N, F, h, y, compute_);
}
void CudaDevice::swiglu_backward(int64_t N, int64_t F, const float* h, const float* dy, float* dh) {
  make_current();
  cuda::swiglu_backward(N, F, h, dy, dh, compute_);
}
void CudaDevice::rope_forward(int64_t N, int64_t H, int64_t d, int64_t ld, float* x, const int64_t* pos,
                              const float* inv_freq) {
  make_current();
  cuda::rope(N, H, d, ld, x, pos, inv_freq, 1.f, compute_);
}
void CudaDevice::rope_backward(int64_t N, int64_t H, int64_t d, int64_t ld, float* dx, const int64_t* pos,
                               const float* inv_freq) {
  make_current();
  cuda::rope(N, H, d, ld, dx, pos, inv_freq, -1.f, compute_);
}
void CudaDevice::layernorm_backward(int64_t N, int64_t C, const float* x, const float* gamma, const float* mean,
                                    const float* rstd, const float* dy, float* dx, float* dgamma, float* dbeta) {
  make_current();
  cuda::layernorm_backward(N, C, x, gamma, mean, rstd, dy, dx, dgamma, dbeta, compute_);
}
void CudaDevice::gelu_forward(int64_t n, const float* x, float* y) {
  make_current();
  cuda::gelu_forward(n, x, y, compute_);
}
void CudaDevice::gelu_backward(int64_t n, const float* x, const float* dy, float* dx) {
  make_current();
  cuda::gelu_backward(n, x, dy, dx, compute_);
}
void CudaDevice::add_bias(int64_t N, int64_t D, float* y, const float* b) {
  make_current();
  cuda::add_bias(N, D, y, b, compute_);
}
double CudaDevice::squared_error(int64_t n, const float* y, const float* t, float* dy, float scale) {
  make_current();
  return cuda::squared_error(n, y, t, dy, scale, compute_);
}
void CudaDevice::adamw(int64_t n, float* w, const float* g, float* m, float* v, const AdamWStep& s) {
  make_current();
  cuda::adamw(n, w, g, m, v, s, compute_);
}

void CudaDevice::gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const void* A, int64_t lda,
                      const void* B, int64_t ldb, float beta, float* C, int64_t ldc, DType ab) {
  constexpr int64_t kIntMax = 2147483647;
  ringattn::check(M <= kIntMax && N <= kIntMax && K <= kIntMax && lda <= kIntMax && ldb <= kIntMax && ldc <= kIntMax,
                  "GEMM dimensions ", M, " x ", N, " x ", K, " exceed cuBLAS's 32-bit sizes");
  if (M == 0 || N == 0) return;
  const float alpha = 1.f;
  const cudaDataType t = ab == DType::bf16 ? CUDA_R_16BF : CUDA_R_32F;
  const cublasStatus_t st = cublas().gemm_ex(
      blas_, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, int(M), int(N), int(K), &alpha,
      A, t, int(lda), B, t, int(ldb), &beta, C, CUDA_R_32F, int(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  if (st != CUBLAS_STATUS_SUCCESS)
    throw Error(cat("cuBLAS GEMM ", M, " x ", N, " x ", K, " (", dtype_name(ab), "): ", cublas().status_string(st)));
}

// Row-major y[N, Cout] = x[N, Cin]·W[Cin, Cout] is column-major yᵀ = Wᵀ·xᵀ, where
// the row-major buffers already are Wᵀ [Cout, Cin] and xᵀ [Cin, N]. For bf16 the
// activation is rounded to bf16 first (as on the CPU).
void CudaDevice::linear_forward(int64_t N, int64_t Cin, int64_t Cout, const float* x, const void* W, const float* b,
                                float* y, DType compute) {
  ringattn::check(compute == DType::f32 || compute == DType::bf16, "linear layers compute in fp32 or bf16");
  make_current();
  DeviceTensor xb;
  const void* xo = x;
  if (compute == DType::bf16) {
    xb = alloc(DType::bf16, {N, Cin});
    cuda::copy(xb, TensorView(const_cast<float*>(x), DType::f32, {N, Cin}), compute_);
    xo = xb.ptr<void>();
  }
  gemm(false, false, Cout, N, Cin, W, Cout, xo, Cin, 0.f, y, Cout, compute);
  if (b) cuda::add_bias(N, Cout, y, b, compute_);
}

// dx = dy·Wᵀ: column-major dxᵀ [Cin, N] = W·dyᵀ, i.e. (Wᵀ)ᵀ·dyᵀ;
// dW += xᵀ·dy: column-major dWᵀ [Cout, Cin] = dyᵀ·(xᵀ)ᵀ; db += Σ_rows dy.
void CudaDevice::linear_backward(int64_t N, int64_t Cin, int64_t Cout, const float* x, const void* W, const float* dy,
                                 float* dx, float* dW, float* db, DType compute) {
  ringattn::check(compute == DType::f32 || compute == DType::bf16, "linear layers compute in fp32 or bf16");
  make_current();
  DeviceTensor xb, dyb;
  const void *xo = x, *dyo = dy;
  if (compute == DType::bf16) {
    xb = alloc(DType::bf16, {N, Cin}), dyb = alloc(DType::bf16, {N, Cout});
    cuda::copy(xb, TensorView(const_cast<float*>(x), DType::f32, {N, Cin}), compute_);
    cuda::copy(dyb, TensorView(const_cast<float*>(dy), DType::f32, {N, Cout}), compute_);
    xo = xb.ptr<void>(), dyo = dyb.ptr<void>();
  }
  if (dx) gemm(true, false, Cin, N, Cout, W, Cout, dyo, Cout, 0.f, dx, Cin, compute);
  gemm(false, true, Cout, Cin, N, dyo, Cout, xo, Cin, 1.f, dW, Cout, compute);
  if (db) cuda::bias_grad(N, Cout, dy, db, compute_);
}

void CudaDevice::synchronize(double timeout_seconds) {
  make_current();
  cudaEvent_t done;
  check(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "creating an event");
  const cudaError_t e = cudaEventRecord(done, compute_);
  try {
    check(e, "recording an event");
    wait_event_bounded(done, timeout_seconds, "waiting for the compute stream");
  } catch (...) {
    cudaEventDestroy(done);
    throw;
  }
  cudaEventDestroy(done);
}

CudaDevice& as_cuda(Device& dev) {
  auto* c = dynamic_cast<CudaDevice*>(&dev);
  ringattn::check(c != nullptr, "device '", dev.name(), "' is not a CUDA device");
  return *c;
}

}  // namespace cuda

bool cuda_built() { return true; }

std::string cuda_forward_kernel() { return cuda::sm90_forward_available() ? "wgmma" : "mma.sync"; }

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

void cuda::CudaDevice::release_cache() {
  if (pool_) pool_->release();
}

void release_cached_memory(Device& dev) { cuda::as_cuda(dev).release_cache(); }

std::unique_ptr<Device> make_cuda_device(int ordinal) {
  return std::make_unique<cuda::CudaDevice>(ordinal, /*cache=*/true);
}

}  // namespace ringattn
