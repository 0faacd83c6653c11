// Device helpers and argument structs shared by the CUDA attention kernels:
// attention.cu (FlashAttention-2 structure, mma.sync, any sm_80+ GPU) and
// attention_sm90.cu (warpgroup MMAs, Hopper only). Conventions of DESIGN.md §4:
// o and lse for queries at global positions, base-2 online softmax, causal by
// position, GQA by h / (H / Hkv).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ringattn/error.h"

namespace ringattn::cuda::fa {

constexpr float kLn2 = 0.693147180559945309f;
constexpr float kLog2e = 1.442695040888963407f;
constexpr int64_t kNoPos = INT64_MIN;   // a padding query row: sees nothing
constexpr int64_t kFarPos = INT64_MAX;  // a padding key: seen by nothing

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);  // .x = a in the low half
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronous; zero-filled when !valid.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ int64_t warp_max(int64_t x) {
  for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ int64_t warp_min(int64_t x) {
  for (int o = 16; o > 0; o >>= 1) x = min(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
// Across the 4 lanes of a quad (the lanes holding one row of a C fragment).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Stores fp32 x as element i of a buffer of dtype `dt` (0 f32, 1 bf16, 2 f16).
__device__ __forceinline__ void store_as(void* p, int dt, int64_t i, float x) {
  if (dt == 0)
    static_cast<float*>(p)[i] = x;
  else if (dt == 1)
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x);
  else
    static_cast<__half*>(p)[i] = __float2half_rn(x);
}
__device__ __forceinline__ float load_as(const void* p, int dt, int64_t i) {
  if (dt == 0) return static_cast<const float*>(p)[i];
  if (dt == 1) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return __half2float(static_cast<const __half*>(p)[i]);
}

// A [B, L, H, d] view: element strides of b, l, h (d is contiguous).
struct Bshd {
  const void* p;
  int64_t sb, sl, sh;
  int dt;
};

struct Positions {
  const int64_t* q;  // nullptr: i + (Lk − Lq)
  const int64_t* k;  // nullptr: j
  int64_t Lq, Lk;
  __device__ __forceinline__ int64_t query(int64_t i) const {
    return i >= Lq ? kNoPos : (q ? q[i] : i + (Lk - Lq));
  }
  __device__ __forceinline__ int64_t key(int64_t j) const { return j >= Lk ? kFarPos : (k ? k[j] : j); }
};

struct FwdArgs {
  Bshd q, k, v, o;
  float* lse;
  int64_t lse_sb, lse_sh, lse_sl;
  int64_t B, Lq, Lk, H, Hkv;
  Positions pos;
  float scale_log2;  // softmax scale · log2(e)
  bool causal;
};

// The smallest and largest key position of keys [n0, n0 + BN) (the same in every warp).
template <int BN>
__device__ __forceinline__ void key_range(const Positions& pos, int64_t n0, int lane, int64_t& kmin, int64_t& kmax) {
  int64_t lo = INT64_MAX, hi = INT64_MIN;
#pragma unroll
  for (int c = 0; c < BN; c += 32) {
    const int64_t x = pos.key(n0 + c + lane);
    lo = min(lo, x);
    hi = max(hi, x == kFarPos ? INT64_MIN : x);
  }
  kmax = warp_max(hi);
  kmin = warp_min(lo);
}

inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(cat("CUDA ", what, ": ", cudaGetErrorString(e)));
}

// The Hopper forward (attention_sm90.cu): q, k, v bf16 (bf16 = true) or fp16,
// head dim d in {64, 128}. Queued on `stream`; the caller has checked the arguments.
// False (nothing queued) when the driver cannot map q, k or v for the TMA (their
// strides): the caller then runs the portable kernel.
bool forward_sm90(const FwdArgs& a, bool bf16, int d, cudaStream_t stream);

}  // namespace ringattn::cuda::fa
