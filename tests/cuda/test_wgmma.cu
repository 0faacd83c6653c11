// The Hopper building blocks of attention_sm90.cu (src/kernels/cuda/wgmma.cuh)
// against plain products: the swizzled tile layout, the descriptors of K-major
// and MN-major ("transposed") operands, and the accumulator and A-register
// fragment layouts, for head dims 64 and 128 and both 16-bit types. One
// warpgroup computes S = Q·Kᵀ (Q [64][D], K [128][D], both K-major) and
// O = P·V (P [64][128] in registers, V [128][D] MN-major). Skips unless the GPU
// is a compute capability 9.0 one and the build has sm_90a code.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "kernels/cuda/attention_common.cuh"
#include "kernels/cuda/wgmma.cuh"

namespace ringattn::testing {
namespace {

using namespace ringattn::cuda;

template <typename T, int D>
__global__ void __launch_bounds__(128)
    products_kernel(const T* q, const T* k, const T* p, const T* v, float* s_out, float* o_out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* Qs = smem_raw + (1024 - fa::smem_addr(smem_raw) % 1024) % 1024;  // [64][D], swizzled
  unsigned char* Ks = Qs + 64 * D * 2;                                            // [128][D]
  unsigned char* Vs = Ks + 128 * D * 2;                                           // [128][D]
  for (int i = threadIdx.x; i < 64 * D; i += 128) *reinterpret_cast<T*>(Qs + wg::swizzled(i / D, i % D, 64)) = q[i];
  for (int i = threadIdx.x; i < 128 * D; i += 128) {
    *reinterpret_cast<T*>(Ks + wg::swizzled(i / D, i % D, 128)) = k[i];
    *reinterpret_cast<T*>(Vs + wg::swizzled(i / D, i % D, 128)) = v[i];
  }
  wg::fence_smem_to_async();
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int r0 = 16 * warp + g;  // this thread's rows r0, r0 + 8

  float s[64];
  wg::fence();
  for (int kk = 0; kk < D / 16; ++kk)
    wg::mma_ss_n128<kBf16>(s, wg::desc(fa::smem_addr(Qs) + (kk / 4) * 64 * 128 + (kk % 4) * 32, 16, 1024),
                           wg::desc(fa::smem_addr(Ks) + (kk / 4) * 128 * 128 + (kk % 4) * 32, 16, 1024), kk > 0);
  wg::commit();
  wg::wait<0>();
  wg::hold(s);
  for (int j = 0; j < 16; ++j)
    for (int e = 0; e < 4; ++e) s_out[(r0 + 8 * (e / 2)) * 128 + 8 * j + 2 * t + e % 2] = s[4 * j + e];

  // P's A fragments straight from memory: rows r0 / r0 + 8, columns 2t.. and 2t + 8.. of each 16-column step.
  float o[D / 2] = {};
  uint32_t a[8][4];
  auto pair = [&](int r, int c) {
    uint16_t lo, hi;
    memcpy(&lo, &p[r * 128 + c], 2);
    memcpy(&hi, &p[r * 128 + c + 1], 2);
    return uint32_t(lo) | uint32_t(hi) << 16;
  };
  for (int kk = 0; kk < 8; ++kk) {
    a[kk][0] = pair(r0, 16 * kk + 2 * t);
    a[kk][1] = pair(r0 + 8, 16 * kk + 2 * t);
    a[kk][2] = pair(r0, 16 * kk + 8 + 2 * t);
    a[kk][3] = pair(r0 + 8, 16 * kk + 8 + 2 * t);
  }
  wg::fence();
  for (int kk = 0; kk < 8; ++kk)
    wg::mma_rs_t<kBf16>(o, a[kk], wg::desc(fa::smem_addr(Vs) + kk * 16 * 128, 128 * 128, 1024));
  wg::commit();
  wg::wait<0>();
  wg::hold(o);
  for (int j = 0; j < D / 8; ++j)
    for (int e = 0; e < 4; ++e) o_out[(r0 + 8 * (e / 2)) * D + 8 * j + 2 * t + e % 2] = o[4 * j + e];
#endif
}

template <typename T>
T from_float(float x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __float2bfloat16_rn(x);
  else
    return __float2half_rn(x);
}
template <typename T>
float to_float(T x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __bfloat162float(x);
  else
    return __half2float(x);
}

template <typename T>
T* to_device(const std::vector<T>& h) {
  T* d = nullptr;
  fa::check_cuda(cudaMalloc(&d, h.size() * sizeof(T)), "allocating");
  fa::check_cuda(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), "uploading");
  return d;
}

template <typename T, int D>
void check_products() {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  auto random = [&](size_t n) {
    std::vector<T> x(n);
    for (T& e : x) e = from_float<T>(u(rng));
    return x;
  };
  const std::vector<T> q = random(64 * D), k = random(128 * D), p = random(64 * 128), v = random(128 * D);
  T *dq = to_device(q), *dk = to_device(k), *dp = to_device(p), *dv = to_device(v);
  float *ds = nullptr, *dout = nullptr;
  fa::check_cuda(cudaMalloc(&ds, 64 * 128 * sizeof(float)), "allocating");
  fa::check_cuda(cudaMalloc(&dout, 64 * D * sizeof(float)), "allocating");
  const int smem = 1024 + (64 + 2 * 128) * D * 2;
  fa::check_cuda(cudaFuncSetAttribute(products_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
                 "raising the shared memory limit");
  products_kernel<T, D><<<1, 128, smem>>>(dq, dk, dp, dv, ds, dout);
  fa::check_cuda(cudaDeviceSynchronize(), "running the products kernel");
  std::vector<float> s(64 * 128), o(64 * D);
  fa::check_cuda(cudaMemcpy(s.data(), ds, s.size() * sizeof(float), cudaMemcpyDeviceToHost), "downloading");
  fa::check_cuda(cudaMemcpy(o.data(), dout, o.size() * sizeof(float), cudaMemcpyDeviceToHost), "downloading");
  for (void* x : {static_cast<void*>(dq), static_cast<void*>(dk), static_cast<void*>(dp), static_cast<void*>(dv),
                  static_cast<void*>(ds), static_cast<void*>(dout)})
    cudaFree(x);

  int bad_s = 0, bad_o = 0;
  for (int i = 0; i < 64; ++i)
    for (int j = 0; j < 128; ++j) {
      double ref = 0;
      for (int c = 0; c < D; ++c) ref += double(to_float(q[i * D + c])) * to_float(k[j * D + c]);
      if (std::abs(s[i * 128 + j] - ref) > 1e-3 * (1 + std::abs(ref)) && bad_s++ < 5)
        ADD_FAILURE() << "S[" << i << "][" << j << "] = " << s[i * 128 + j] << ", expected " << ref;
    }
  for (int i = 0; i < 64; ++i)
    for (int c = 0; c < D; ++c) {
      double ref = 0;
      for (int j = 0; j < 128; ++j) ref += double(to_float(p[i * 128 + j])) * to_float(v[j * D + c]);
      if (std::abs(o[i * D + c] - ref) > 1e-3 * (1 + std::abs(ref)) && bad_o++ < 5)
        ADD_FAILURE() << "O[" << i << "][" << c << "] = " << o[i * D + c] << ", expected " << ref;
    }
  EXPECT_EQ(bad_s, 0) << "wrong elements of S = Q·Kᵀ";
  EXPECT_EQ(bad_o, 0) << "wrong elements of O = P·V";
}

bool hopper() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) return false;
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0);
#ifdef RINGATTN_HAVE_SM90A
  return major == 9 && minor == 0;
#else
  return false;
#endif
}

#define REQUIRE_HOPPER()                                                                 \
  do {                                                                                   \
    if (!hopper()) GTEST_SKIP() << "not a Hopper GPU with sm_90a code (or none at all)"; \
  } while (0)

TEST(CudaWgmma, ProductsBf16D128) {
  REQUIRE_HOPPER();
  check_products<__nv_bfloat16, 128>();
}
TEST(CudaWgmma, ProductsBf16D64) {
  REQUIRE_HOPPER();
  check_products<__nv_bfloat16, 64>();
}
TEST(CudaWgmma, ProductsF16D128) {
  REQUIRE_HOPPER();
  check_products<__half, 128>();
}
TEST(CudaWgmma, ProductsF16D64) {
  REQUIRE_HOPPER();
  check_products<__half, 64>();
}

}  // namespace
}  // namespace ringattn::testing
