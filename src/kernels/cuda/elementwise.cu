// Elementwise kernels of the CUDA device: strided copy with dtype conversion,
// fill, and fp32 accumulation (the ring's copies and dq/dk/dv sums).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "kernels/cuda/kernels.h"
#include "ringattn/error.h"

namespace ringattn::cuda {
namespace {

// A view's shape and strides, passed by value to kernels.
struct Strided {
  void* p;
  int dt;  // 0 f32, 1 bf16, 2 f16
  int rank;
  int64_t shape[kMaxRank], strides[kMaxRank];
  __device__ int64_t offset(int64_t i) const {  // of the i-th element in row-major order
    int64_t off = 0;
    for (int r = rank - 1; r >= 0; --r) {
      off += (i % shape[r]) * strides[r];
      i /= shape[r];
    }
    return off;
  }
};

Strided strided(const TensorView& t) {
  Strided s{t.data, t.dtype == DType::f32 ? 0 : t.dtype == DType::bf16 ? 1 : 2, t.rank, {}, {}};
  for (int r = 0; r < t.rank; ++r) s.shape[r] = t.shape[r], s.strides[r] = t.strides[r];
  return s;
}

__device__ float load(const Strided& s, int64_t off) {
  if (s.dt == 0) return static_cast<const float*>(s.p)[off];
  if (s.dt == 1) return __bfloat162float(static_cast<const __nv_bfloat16*>(s.p)[off]);
  return __half2float(static_cast<const __half*>(s.p)[off]);
}
__device__ void store(const Strided& s, int64_t off, float x) {
  if (s.dt == 0)
    static_cast<float*>(s.p)[off] = x;
  else if (s.dt == 1)
    static_cast<__nv_bfloat16*>(s.p)[off] = __float2bfloat16_rn(x);
  else
    static_cast<__half*>(s.p)[off] = __float2half_rn(x);
}

__global__ void copy_kernel(Strided dst, Strided src, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    store(dst, dst.offset(i), load(src, src.offset(i)));
}
__global__ void fill_kernel(Strided x, float value, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    store(x, x.offset(i), value);
}
__global__ void add_kernel(float* acc, Strided x, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    acc[i] += load(x, i);
}

// splitmix64 of (seed, i): 24 random bits -> [lo, hi).
__global__ void uniform_kernel(Strided x, uint64_t seed, float lo, float hi, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint64_t z = seed * 0x9e3779b97f4a7c15ull + uint64_t(i) + 1;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    store(x, x.offset(i), lo + (hi - lo) * float(z >> 40) * (1.f / 16777216.f));
  }
}

unsigned grid_for(int64_t n) { return static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 65536)); }

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw Error(cat("CUDA launching ", what, ": ", cudaGetErrorString(e)));
}

}  // namespace

void copy(const TensorView& dst, const TensorView& src, cudaStream_t stream) {
  check(dst.rank == src.rank && same_shape(dst, src), "copy: shapes differ, ", dst.shape_str(), " vs ",
        src.shape_str());
  const int64_t n = src.numel();
  if (n == 0) return;
  if (dst.dtype == src.dtype && dst.is_contiguous() && src.is_contiguous()) {
    const cudaError_t e =
        cudaMemcpyAsync(dst.data, src.data, n * dtype_size(src.dtype), cudaMemcpyDeviceToDevice, stream);
    if (e != cudaSuccess) throw Error(cat("CUDA copy: ", cudaGetErrorString(e)));
    return;
  }
  copy_kernel<<<grid_for(n), 256, 0, stream>>>(strided(dst), strided(src), n);
  check_launch("the copy kernel");
}

void fill(const TensorView& x, float value, cudaStream_t stream) {
  const int64_t n = x.numel();
  if (n == 0) return;
  fill_kernel<<<grid_for(n), 256, 0, stream>>>(strided(x), value, n);
  check_launch("the fill kernel");
}

void add(const TensorView& acc, const TensorView& x, cudaStream_t stream) {
  check(acc.dtype == DType::f32 && acc.is_contiguous() && x.is_contiguous() && acc.rank == x.rank && same_shape(acc, x),
        "add: acc must be contiguous fp32 and x contiguous of the same shape, got ", acc.shape_str(), " and ",
        x.shape_str());
  const int64_t n = x.numel();
  if (n == 0) return;
  add_kernel<<<grid_for(n), 256, 0, stream>>>(acc.ptr<float>(), strided(x), n);
  check_launch("the add kernel");
}

void fill_uniform(const TensorView& x, uint64_t seed, float lo, float hi, cudaStream_t stream) {
  const int64_t n = x.numel();
  if (n == 0) return;
  uniform_kernel<<<grid_for(n), 256, 0, stream>>>(strided(x), seed, lo, hi, n);
  check_launch("the uniform fill kernel");
}

}  // namespace ringattn::cuda
