// Device helpers and argument structs shared by the CUDA attention kernels:
// attention.cu (FlashAttention-2 structure, mma.sync, any sm_80+ GPU) and
// attention_sm90.cu (warpgroup MMAs, Hopper only). Conventions of docs/design.md §2-§3:
// o and lse for queries at global positions, base-2 online softmax, causal by
// position, GQA by h / (H / Hkv).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
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
  __device__ __forceinline__ int64_t query(int64_t i) const { return i >= Lq ? kNoPos : (q ? q[i] : i + (Lk - Lq)); }
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
  // Split keys (the portable kernel, few query rows): 0 = one block sees every
  // key; else grid z = B · splits and block z takes key tiles [s·split_tiles,
  // (s + 1)·split_tiles) of batch z / splits and writes its partial (o, lse) at
  // batch index z of o and lse, to be combined by the caller.
  int64_t split_tiles = 0;
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

// The smallest and largest position of a warp's queries, two per lane (a, b);
// padding rows (kNoPos) are left out of the smallest.
__device__ __forceinline__ void query_range(int64_t a, int64_t b, int64_t& qmin, int64_t& qmax) {
  qmax = warp_max(max(a, b));
  qmin = warp_min(min(a == kNoPos ? INT64_MAX : a, b == kNoPos ? INT64_MAX : b));
}

// This thread's two query rows of a warp's m16 MMA fragments (warp w owns rows
// m0 + 16w .. m0 + 16w + 15; lane group g: r_a = m0 + 16w + g and r_b = r_a + 8),
// their positions, and the range of the warp's query positions.
struct ThreadRows {
  int64_t r_a, r_b, pos_a, pos_b, wq_min, wq_max;
};
__device__ __forceinline__ ThreadRows thread_rows(const Positions& pos, int64_t m0, int warp, int g) {
  ThreadRows t;
  t.r_a = m0 + warp * 16 + g, t.r_b = t.r_a + 8;
  t.pos_a = pos.query(t.r_a), t.pos_b = pos.query(t.r_b);
  query_range(t.pos_a, t.pos_b, t.wq_min, t.wq_max);
  return t;
}

// The forward's outputs for this thread's rows r_a and r_b of (b, h): o = acc / l and
// lse = (m + log2 l)·ln 2, with acc in the C-fragment layout (acc[4j + e]: row r_a
// for e < 2, else r_b; column 8j + 2t + e % 2), m the running max in base-2 units and
// l this lane's partial sums (added over the quad here). Rows that saw nothing:
// o = 0, lse = −inf.
template <int D>
__device__ __forceinline__ void store_forward_rows(const FwdArgs& a, int64_t b, int64_t h, int64_t r_a, int64_t r_b,
                                                   int t, const float (&acc)[D / 2], float m_a, float m_b, float l_a,
                                                   float l_b) {
  l_a = quad_sum(l_a);
  l_b = quad_sum(l_b);
  const float inv_a = l_a > 0.f ? 1.f / l_a : 0.f, inv_b = l_b > 0.f ? 1.f / l_b : 0.f;
  void* o = const_cast<void*>(a.o.p);
  const int64_t ob = b * a.o.sb + h * a.o.sh;
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    const int col = j * 8 + 2 * t;
    if (r_a < a.Lq) {
      store_as(o, a.o.dt, ob + r_a * a.o.sl + col, acc[4 * j] * inv_a);
      store_as(o, a.o.dt, ob + r_a * a.o.sl + col + 1, acc[4 * j + 1] * inv_a);
    }
    if (r_b < a.Lq) {
      store_as(o, a.o.dt, ob + r_b * a.o.sl + col, acc[4 * j + 2] * inv_b);
      store_as(o, a.o.dt, ob + r_b * a.o.sl + col + 1, acc[4 * j + 3] * inv_b);
    }
  }
  if (t == 0) {
    float* lse = a.lse + b * a.lse_sb + h * a.lse_sh;
    if (r_a < a.Lq) lse[r_a * a.lse_sl] = l_a > 0.f ? (m_a + log2f(l_a)) * kLn2 : -INFINITY;
    if (r_b < a.Lq) lse[r_b * a.lse_sl] = l_b > 0.f ? (m_b + log2f(l_b)) * kLn2 : -INFINITY;
  }
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
