// Flash attention forward on Hopper (sm_90a): warpgroup MMAs (wgmma) from
// swizzled shared memory, with FlashAttention-3's overlap of one tile's softmax
// with the tensor cores' work inside each warpgroup.
//
// A block of 2 warpgroups (256 threads) owns 128 query rows of one (batch, head);
// each warpgroup owns 64 of them. S = Q·Kᵀ reads Q and K from shared memory; P
// stays in registers as the A operand of O += P·V. Tiles of 128 keys come in by
// cp.async, two stages each of K and V. Step i of a warpgroup:
//   wait for K_i and V_{i−1}; prefetch K_{i+1} and V_i
//   issue S = Q·K_iᵀ; issue O += P_{i−1}·V_{i−1}
//   wait for S; mask, row max m_i, S := exp2(S − m_i)        (tensor cores busy with P·V)
//   wait for P·V; O ·= exp2(m_{i−1} − m_i); P_i := S in 16 bits
// and after the last tile O += P·V once more. Masking by global positions, GQA,
// the skipped tiles and the outputs (o, lse in natural log) are those of
// attention.cu's portable kernel (DESIGN.md §4).
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "kernels/cuda/attention_common.cuh"
#include "kernels/cuda/kernels.h"
#include "kernels/cuda/wgmma.cuh"
#include "ringattn/error.h"

namespace ringattn::cuda::fa {
namespace {

constexpr int kWarpgroups = 2;
constexpr int kThreads = 128 * kWarpgroups;
constexpr int kBM = 64 * kWarpgroups;  // query rows per block
constexpr int kBN = 128;               // keys per tile

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ float ex2(float x) {  // 2^x; 2^−inf = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Copies rows [row0, row0 + 128) of a [rows, D] matrix (row stride `ld` elements)
// into a swizzled [128][D] tile (wgmma.cuh) by cp.async; rows past nrows are zero.
// Thread x moves the 16-byte chunks x, x + 256, ...: the same column and, since
// 256 / (D / 8) rows apart is a multiple of 8 rows, the same swizzle for all of
// them, so each copy costs an add and a compare.
template <typename T, int D>
struct TileLoader {
  static constexpr int kChunks = D / 8, kRowStep = kThreads / kChunks, kCopies = kBN / kRowStep;
  static_assert(kRowStep % 8 == 0 && kBN % kRowStep == 0 && kBM == kBN);
  int r0, col;
  uint32_t offset;  // byte offset of (r0, col) in the tile
  __device__ TileLoader()
      : r0(threadIdx.x / kChunks), col(threadIdx.x % kChunks * 8), offset(wg::swizzled(r0, col, kBN)) {}
  __device__ __forceinline__ void operator()(unsigned char* tile, const T* g, int64_t ld, int64_t row0,
                                             int64_t nrows) const {
    const T* src = g + (row0 + r0) * ld + col;
    const int64_t step = int64_t(kRowStep) * ld;
    const int rows_left = static_cast<int>(min(max(nrows - row0 - r0, int64_t(0)), int64_t(kBN)));
    const uint32_t dst = smem_addr(tile) + offset;
#pragma unroll
    for (int j = 0; j < kCopies; ++j, src += step) {
      const bool valid = j * kRowStep < rows_left;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst + j * kRowStep * 128),
                   "l"(valid ? src : g), "r"(valid ? 16 : 0));
    }
  }
};

// q: [B, Lq, H, D]  k, v: [B, Lk, Hkv, D]  o: [B, Lq, H, D]  lse: [B, H, Lq]
// grid (⌈Lq/128⌉, H, B), 256 threads; shared memory: Q [128][D], K and V [2][128][D], swizzled.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) flash_forward_sm90_kernel(const FwdArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  constexpr uint32_t kQBytes = kBM * D * 2, kKVBytes = kBN * D * 2;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* Qs = smem_raw + (1024 - smem_addr(smem_raw) % 1024) % 1024;  // swizzle atoms: 1024-byte aligned
  unsigned char* Ks = Qs + kQBytes;                                           // [2 stages]
  unsigned char* Vs = Ks + 2 * kKVBytes;                                      // [2 stages]
  __shared__ int64_t warp_qmax[kThreads / 32];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int wgroup = warp / 4;
  const int64_t b = blockIdx.z, h = blockIdx.y, hk = h / (a.H / a.Hkv), m0 = int64_t(blockIdx.x) * kBM;
  const T* qg = static_cast<const T*>(a.q.p) + b * a.q.sb + h * a.q.sh;
  const T* kg = static_cast<const T*>(a.k.p) + b * a.k.sb + hk * a.k.sh;
  const T* vg = static_cast<const T*>(a.v.p) + b * a.v.sb + hk * a.v.sh;
  const Positions& pos = a.pos;

  // This thread's rows (r_a, r_b = r_a + 8: warp w owns rows 16w..16w+15) and the warp's and block's query range.
  const int64_t r_a = m0 + warp * 16 + g, r_b = r_a + 8;
  const int64_t pos_a = pos.query(r_a), pos_b = pos.query(r_b);
  const int64_t wq_max = warp_max(max(pos_a, pos_b));
  const int64_t wq_min = warp_min(min(pos_a == kNoPos ? INT64_MAX : pos_a, pos_b == kNoPos ? INT64_MAX : pos_b));
  if (lane == 0) warp_qmax[warp] = wq_max;

  const TileLoader<T, D> load;
  load(Qs, qg, a.q.sl, m0, a.Lq);
  __syncthreads();
  int64_t bq_max = warp_qmax[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) bq_max = max(bq_max, warp_qmax[w]);

  // The next key tile at or after `from` that some query of the block sees.
  const int64_t n_tiles = (a.Lk + kBN - 1) / kBN;
  int64_t kmin = 0, kmax = 0;
  auto next_tile = [&](int64_t from) {
    for (int64_t tile = from; tile < n_tiles; ++tile) {
      key_range<kBN>(pos, tile * kBN, lane, kmin, kmax);
      if (!a.causal || kmin <= bq_max) return tile;
    }
    return n_tiles;
  };

  // tile = t_i (this step's), next = t_{i+1}; their largest key positions.
  int64_t tile = next_tile(0), tile_kmax = kmax;
  if (tile < n_tiles) load(Ks, kg, a.k.sl, tile * kBN, a.Lk);
  cp_async_commit();  // group: Q, K_0
  int64_t next = tile < n_tiles ? next_tile(tile + 1) : n_tiles, next_kmax = kmax;
  if (next < n_tiles) load(Ks + kKVBytes, kg, a.k.sl, next * kBN, a.Lk);
  if (tile < n_tiles) load(Vs, vg, a.v.sl, tile * kBN, a.Lk);
  cp_async_commit();  // group: K_1, V_0

  const uint32_t q_addr = smem_addr(Qs) + wgroup * 64 * 128;  // this warpgroup's 64 rows
  float o[D / 2] = {};      // O accumulator m64nD
  float s[kBN / 2];         // S accumulator m64n128, then P in fp32
  uint32_t p[kBN / 16][4];  // P_{i−1}: A fragments of the k-steps of P·V
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;  // running max (base-2 units), per-lane sums

  // Queues S = Q·K_iᵀ (K_i in stage i % 2) and O += P·V_j (V_j in stage j % 2).
  auto issue_s = [&](int i) {
    const uint32_t k_addr = smem_addr(Ks + (i & 1) * kKVBytes);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      wg::mma_ss_n128<kBf16>(s, wg::desc(q_addr + (kk / 4) * kBM * 128 + (kk % 4) * 32, 16, 1024),
                             wg::desc(k_addr + (kk / 4) * kBN * 128 + (kk % 4) * 32, 16, 1024), kk > 0);
    wg::commit();
  };
  auto issue_pv = [&](int j) {
    const uint32_t v_addr = smem_addr(Vs + (j & 1) * kKVBytes);
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) wg::mma_rs_t<kBf16>(o, p[kk], wg::desc(v_addr + kk * 16 * 128, kBN * 128, 1024));
    wg::commit();
  };
  // Which of this thread's 32 key columns of the current tile (bit c: column 8·(c / 2) + 2t + c % 2) rows
  // r_a and r_b see. Computed before the tile's MMAs are queued: the branch and loop here would make
  // the compiler wait for the MMAs if they ran while these did.
  uint32_t seen_a = ~0u, seen_b = ~0u;
  auto visibility = [&] {
    seen_a = seen_b = ~0u;
    const int64_t n0 = tile * kBN;
    if (n0 + kBN > a.Lk || (a.causal && tile_kmax > wq_min)) {  // some key of the tile is hidden from this warp
#pragma unroll 1
      for (int c = 0; c < kBN / 4; ++c) {
        const int64_t kp = pos.key(n0 + (c / 2) * 8 + 2 * t + c % 2);
        if (kp == kFarPos || pos_a == kNoPos || (a.causal && kp > pos_a)) seen_a &= ~(1u << c);
        if (kp == kFarPos || pos_b == kNoPos || (a.causal && kp > pos_b)) seen_b &= ~(1u << c);
      }
    }
  };
  // Mask, the online softmax update of m and l in base 2, S := 2^(S·scale·log2 e − m); no branches (the
  // tensor cores may be busy with P·V meanwhile). Returns the rescale factors of O's rows r_a, r_b.
  auto softmax = [&](float& alpha_a, float& alpha_b) {
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        s[4 * nt + e] = ((e < 2 ? seen_a : seen_b) >> (2 * nt + e % 2)) & 1 ? s[4 * nt + e] : -INFINITY;
    float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
      mx_a = fmaxf(mx_a, fmaxf(s[4 * nt], s[4 * nt + 1]));
      mx_b = fmaxf(mx_b, fmaxf(s[4 * nt + 2], s[4 * nt + 3]));
    }
    // The running max in base-2 units (scale · log2 e > 0 commutes with max).
    const float mn_a = fmaxf(m_a, quad_max(mx_a) * a.scale_log2), mn_b = fmaxf(m_b, quad_max(mx_b) * a.scale_log2);
    // A row that has seen nothing yet keeps o = 0, l = 0 (no −inf − −inf).
    const float base_a = mn_a == -INFINITY ? 0.f : mn_a, base_b = mn_b == -INFINITY ? 0.f : mn_b;
    alpha_a = ex2(m_a - base_a);
    alpha_b = ex2(m_b - base_b);
    m_a = mn_a;
    m_b = mn_b;
    float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
      s[4 * nt] = ex2(fmaf(s[4 * nt], a.scale_log2, -base_a));
      s[4 * nt + 1] = ex2(fmaf(s[4 * nt + 1], a.scale_log2, -base_a));
      s[4 * nt + 2] = ex2(fmaf(s[4 * nt + 2], a.scale_log2, -base_b));
      s[4 * nt + 3] = ex2(fmaf(s[4 * nt + 3], a.scale_log2, -base_b));
      sum_a += s[4 * nt] + s[4 * nt + 1];
      sum_b += s[4 * nt + 2] + s[4 * nt + 3];
    }
    l_a = l_a * alpha_a + sum_a;
    l_b = l_b * alpha_b + sum_b;
  };
  auto pack_p = [&] {
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      p[kk][0] = pack2<T>(s[8 * kk], s[8 * kk + 1]);
      p[kk][1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
      p[kk][2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
      p[kk][3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
    }
  };
  auto advance = [&] {
    tile = next;
    tile_kmax = next_kmax;
    next = tile < n_tiles ? next_tile(tile + 1) : n_tiles;
    next_kmax = kmax;
  };

  auto rescale_o = [&](float alpha_a, float alpha_b) {
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o[4 * dt] *= alpha_a;
      o[4 * dt + 1] *= alpha_a;
      o[4 * dt + 2] *= alpha_b;
      o[4 * dt + 3] *= alpha_b;
    }
  };

  if (tile < n_tiles) {
    // Step 0: S_0 and its softmax (O is still zero).
    cp_async_wait<1>();
    wg::fence_smem_to_async();
    __syncthreads();
    visibility();
    wg::fence();
    issue_s(0);
    wg::wait<0>();
    wg::hold(s);
    float alpha_a, alpha_b;  // O's rescale from the last softmax, applied before P·V adds that step's P
    softmax(alpha_a, alpha_b);
    pack_p();
    advance();
    int i = 1;
    for (; tile < n_tiles; ++i) {
      cp_async_wait<0>();
      wg::fence_smem_to_async();
      __syncthreads();  // K_i, V_{i−1} in place; every warpgroup is done with K_{i−1}, V_{i−2}
      if (next < n_tiles) load(Ks + ((i + 1) & 1) * kKVBytes, kg, a.k.sl, next * kBN, a.Lk);
      load(Vs + (i & 1) * kKVBytes, vg, a.v.sl, tile * kBN, a.Lk);
      cp_async_commit();
      visibility();
      wg::fence();
      issue_s(i);
      rescale_o(alpha_a, alpha_b);  // O in m_{i−1} units, ready for P_{i−1}·V_{i−1}
      wg::fence();
      issue_pv(i - 1);
      wg::wait<1>();
      wg::hold(s);
      softmax(alpha_a, alpha_b);  // while the tensor cores do P·V
      wg::wait<0>();
      wg::hold(o);
      wg::hold(reinterpret_cast<uint32_t(&)[kBN / 4]>(p));
      pack_p();
      advance();
    }
    // The last tile's P·V.
    cp_async_wait<0>();
    wg::fence_smem_to_async();
    __syncthreads();
    rescale_o(alpha_a, alpha_b);
    wg::fence();
    issue_pv(i - 1);
    wg::wait<0>();
    wg::hold(o);
  }
  cp_async_wait<0>();

  // o /= l, lse = m + log l (natural log); rows that saw nothing: o = 0, lse = −inf.
  l_a = quad_sum(l_a);
  l_b = quad_sum(l_b);
  const float inv_a = l_a > 0.f ? 1.f / l_a : 0.f, inv_b = l_b > 0.f ? 1.f / l_b : 0.f;
  void* out = const_cast<void*>(a.o.p);
  const int64_t ob = b * a.o.sb + h * a.o.sh;
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    const int col = dt * 8 + 2 * t;
    if (r_a < a.Lq) {
      store_as(out, a.o.dt, ob + r_a * a.o.sl + col, o[4 * dt] * inv_a);
      store_as(out, a.o.dt, ob + r_a * a.o.sl + col + 1, o[4 * dt + 1] * inv_a);
    }
    if (r_b < a.Lq) {
      store_as(out, a.o.dt, ob + r_b * a.o.sl + col, o[4 * dt + 2] * inv_b);
      store_as(out, a.o.dt, ob + r_b * a.o.sl + col + 1, o[4 * dt + 3] * inv_b);
    }
  }
  if (t == 0) {
    float* lse = a.lse + b * a.lse_sb + h * a.lse_sh;
    if (r_a < a.Lq) lse[r_a * a.lse_sl] = l_a > 0.f ? (m_a + log2f(l_a)) * kLn2 : -INFINITY;
    if (r_b < a.Lq) lse[r_b * a.lse_sl] = l_b > 0.f ? (m_b + log2f(l_b)) * kLn2 : -INFINITY;
  }
#endif
}

template <typename T, int D>
void launch(const FwdArgs& a, cudaStream_t stream) {
  const size_t smem = 1024 + size_t(kBM + 4 * kBN) * D * 2;
  auto kernel = flash_forward_sm90_kernel<T, D>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
             "raising the Hopper forward kernel's shared memory limit");
  const dim3 grid(static_cast<unsigned>((a.Lq + kBM - 1) / kBM), static_cast<unsigned>(a.H),
                  static_cast<unsigned>(a.B));
  kernel<<<grid, kThreads, smem, stream>>>(a);
  check_cuda(cudaGetLastError(), "launching the Hopper flash forward kernel");
}

}  // namespace

void forward_sm90(const FwdArgs& a, bool bf16, int d, cudaStream_t stream) {
  if (d == 64)
    bf16 ? launch<__nv_bfloat16, 64>(a, stream) : launch<__half, 64>(a, stream);
  else
    bf16 ? launch<__nv_bfloat16, 128>(a, stream) : launch<__half, 128>(a, stream);
}

}  // namespace ringattn::cuda::fa

namespace ringattn::cuda {

bool sm90_forward_available() {
#ifdef RINGATTN_HAVE_SM90A
  const char* env = std::getenv("RINGATTN_CUDA_FORWARD");
  if (env && std::strcmp(env, "portable") == 0) return false;
  check(!env || !*env || std::strcmp(env, "auto") == 0 || std::strcmp(env, "sm90") == 0,
        "RINGATTN_CUDA_FORWARD must be auto, sm90 or portable, got '", env, "'");
  int dev = 0, major = 0, minor = 0;
  fa::check_cuda(cudaGetDevice(&dev), "reading the current device");
  fa::check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "reading the compute capability");
  fa::check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), "reading the compute capability");
  return major == 9 && minor == 0;
#else
  return false;
#endif
}

}  // namespace ringattn::cuda
