// The CUDA Device: memory by cudaMalloc, kernels queued on the compute stream,
// host copies synchronous, waits bounded.
#include "kernels/cuda/cuda_device.h"

#include <chrono>
#include <thread>

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

CudaDevice::CudaDevice(int ordinal) : ordinal_(ordinal) {
  int n = 0;
  check(cudaGetDeviceCount(&n), "counting GPUs");
  ringattn::check(ordinal >= 0 && ordinal < n, "GPU ", ordinal, " does not exist: this process sees ", n, " GPU(s)");
  make_current();
  check(cudaGetDeviceProperties(&props_, ordinal), "reading the GPU's properties");
  check(cudaStreamCreateWithFlags(&compute_, cudaStreamNonBlocking), "creating the compute stream");
  check(cudaStreamCreateWithFlags(&comm_, cudaStreamNonBlocking), "creating the communication stream");
}

CudaDevice::~CudaDevice() {
  cudaSetDevice(ordinal_);
  cudaStreamSynchronize(comm_);
  cudaStreamSynchronize(compute_);
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
  const size_t bytes = static_cast<size_t>(n) * dtype_size(dtype);
  if (bytes) {
    const cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
      cudaGetLastError();  // clear the sticky-free allocation error
      throw Error(cat("CUDA out of memory allocating ", bytes, " bytes on ", name(), ": ", cudaGetErrorString(e)));
    }
  }
  const int ord = ordinal_;
  std::shared_ptr<void> storage(p, [ord](void* q) {
    if (q) {
      cudaSetDevice(ord);
      cudaFree(q);
    }
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
  check(cudaStreamSynchronize(compute_), "copying to the GPU");
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
  make_current();
  int64_t* p = nullptr;
  if (!host.empty()) {
    check(cudaMalloc(&p, host.size_bytes()), "allocating positions on the GPU");
    check(cudaMemcpy(p, host.data(), host.size_bytes(), cudaMemcpyHostToDevice), "copying positions to the GPU");
  }
  const int ord = ordinal_;
  return std::shared_ptr<const int64_t>(p, [ord](const int64_t* q) {
    if (q) {
      cudaSetDevice(ord);
      cudaFree(const_cast<int64_t*>(q));
    }
  });
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
void CudaDevice::attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                                   const TensorView& o, const TensorView& lse, const AttentionOptions& opt) {
  make_current();
  flash_forward(q, k, v, o, lse, opt, compute_);
}
void CudaDevice::attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                                    const TensorView& o, const TensorView& lse, const TensorView& dout,
                                    const TensorView& dq, const TensorView& dk, const TensorView& dv,
                                    const AttentionOptions& opt) {
  make_current();
  flash_backward(q, k, v, o, lse, dout, dq, dk, dv, opt, compute_);
}
void CudaDevice::attention_merge(const TensorView& o_acc, const TensorView& lse_acc, const TensorView& o_part,
                                 const TensorView& lse_part, int) {
  make_current();
  merge(o_acc, lse_acc, o_part, lse_part, compute_);
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

std::unique_ptr<Device> make_cuda_device(int ordinal) { return std::make_unique<cuda::CudaDevice>(ordinal); }

}  // namespace ringattn
