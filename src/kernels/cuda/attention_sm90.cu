// Flash attention forward on Hopper (sm_90a): warpgroup MMAs (wgmma) from
// swizzled shared memory filled by the tensor memory accelerator (TMA), two
// warpgroups taking turns on the tensor cores (FlashAttention-3's ping-pong).
//
// A block of 2 warpgroups (256 threads) owns 128 query rows of one (batch, head);
// each warpgroup owns 64 of them. S = Q·Kᵀ reads Q and K from shared memory; P
// stays in registers as the A operand of O += P·V. Tiles of 128 keys come in by
// TMA (issued by thread 0) into three stages each of K and V, each stage with a
// "full" mbarrier (the copy landed) and an "empty" one (all 8 warps are done with
// it). Step i of a warpgroup:
//   wait for K_i and V_{i−1}; wait for its turn (named barrier)
//   issue S = Q·K_iᵀ; O ·= exp2(m_{i−2} − m_{i−1}); issue O += P_{i−1}·V_{i−1}; pass the turn
//   wait for S; mask, row max m_i, S := exp2(S·scale − m_i)
//   wait for P·V; P_i := S in 16 bits; release K_i and V_{i−1}
// and after the last tile O += P·V once more. While one warpgroup does its
// softmax the other's products keep the tensor cores busy. Masking by global
// positions, GQA, the skipped tiles and the outputs (o, lse in natural log) are
// those of attention.cu's portable kernel (docs/design.md §3).
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include <cuda.h>
#include <cudaTypedefs.h>

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

constexpr int kStages = 3;  // K and V tiles in flight

// The device helpers exist only in the sm_90a pass (the kernel body is empty in the others).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ float ex2(float x) {  // 2^x; 2^−inf = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// mbarriers (PTX ISA §9.7.13.15) in shared memory, by their shared-window address.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done)
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done)
                 : "r"(bar), "r"(parity)
                 : "memory");
}
// A [64 columns × 128 rows] box of a [B, L, H, d] tensor (coordinates d, h, l, b) into a
// swizzled column block at `dst`, completing on `bar`.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, int d0, int h, int l0, int b,
                                         uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(d0), "r"(h), "r"(l0), "r"(b), "r"(bar)
      : "memory");
}
// Named barriers 1 and 2: warpgroup w waits on 1 + w for its turn and passes it on 2 − w.
__device__ __forceinline__ void named_sync(int id) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(kThreads)); }
__device__ __forceinline__ void named_arrive(int id) { asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(kThreads)); }
#endif

// q: [B, Lq, H, D]  k, v: [B, Lk, Hkv, D]  o: [B, Lq, H, D]  lse: [B, H, Lq]; tq, tk, tv: TMA maps of
// q, k, v (dims d, heads, L, B; boxes of 64 × 1 × 128 × 1, 128-byte swizzle).
// grid (⌈Lq/128⌉, H, B), 256 threads; shared memory: Q [128][D], K and V [3][128][D], swizzled.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    flash_forward_sm90_kernel(const FwdArgs a, const __grid_constant__ CUtensorMap tq,
                              const __grid_constant__ CUtensorMap tk, const __grid_constant__ CUtensorMap tv) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  constexpr uint32_t kQBytes = kBM * D * 2, kKVBytes = kBN * D * 2;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* Qs = smem_raw + (1024 - smem_addr(smem_raw) % 1024) % 1024;  // swizzle atoms: 1024-byte aligned
  unsigned char* Ks = Qs + kQBytes;                                           // [kStages]
  unsigned char* Vs = Ks + kStages * kKVBytes;                                // [kStages]
  // mbarriers: Q full; K full, V full, K empty, V empty per stage.
  __shared__ __align__(8) uint64_t bars[1 + 4 * kStages];
  __shared__ int64_t warp_qmax[kThreads / 32];
  const uint32_t q_full = smem_addr(&bars[0]);
  auto k_full = [&](int st) { return smem_addr(&bars[1 + st]); };
  auto v_full = [&](int st) { return smem_addr(&bars[1 + kStages + st]); };
  auto k_empty = [&](int st) { return smem_addr(&bars[1 + 2 * kStages + st]); };
  auto v_empty = [&](int st) { return smem_addr(&bars[1 + 3 * kStages + st]); };

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int wgroup = warp / 4;
  const bool producer = threadIdx.x == 0;  // issues the TMA copies
  // Causal: the last query blocks (the most key tiles) first, so that the short ones fill the tail.
  const int64_t mb = a.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int64_t b = blockIdx.z, h = blockIdx.y, hk = h / (a.H / a.Hkv), m0 = mb * kBM;
  const Positions& pos = a.pos;

  // This thread's rows and the warp's and block's query range.
  const ThreadRows rows = thread_rows(pos, m0, warp, g);
  const int64_t r_a = rows.r_a, r_b = rows.r_b, pos_a = rows.pos_a, pos_b = rows.pos_b;
  const int64_t wq_min = rows.wq_min, wq_max = rows.wq_max;
  if (lane == 0) warp_qmax[warp] = wq_max;
  if (producer) {
    mbar_init(q_full, 1);
    for (int st = 0; st < kStages; ++st) {
      mbar_init(k_full(st), 1);
      mbar_init(v_full(st), 1);
      mbar_init(k_empty(st), kThreads / 32);
      mbar_init(v_empty(st), kThreads / 32);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  int64_t bq_max = warp_qmax[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) bq_max = max(bq_max, warp_qmax[w]);

  // Tile j of the visible ones (key tile `kt`) into stage j % kStages, once the tile kStages before it
  // has left the stage.
  auto load = [&](bool is_k, int j, int64_t kt) {
    const int st = j % kStages;
    if (j >= kStages) mbar_wait(is_k ? k_empty(st) : v_empty(st), (j / kStages - 1) & 1);
    const uint32_t full = is_k ? k_full(st) : v_full(st);
    mbar_expect_tx(full, kKVBytes);
    const uint32_t dst = smem_addr((is_k ? Ks : Vs) + st * kKVBytes);
#pragma unroll
    for (int c = 0; c < D / 64; ++c)
      tma_load(dst + c * kBN * 128, is_k ? &tk : &tv, c * 64, static_cast<int>(hk), static_cast<int>(kt * kBN),
               static_cast<int>(b), full);
  };

  // The next key tile at or after `from` that some query of the block sees.
  const int64_t n_tiles = (a.Lk + kBN - 1) / kBN;
  int64_t kmin = 0, kmax = 0;
  auto next_tile = [&](int64_t from) {
    if (!pos.k) {  // key j at position j: the visible tiles are a prefix
      if (from >= n_tiles || (a.causal && from * kBN > bq_max)) return n_tiles;
      kmin = from * kBN;
      kmax = min(kmin + kBN, a.Lk) - 1;
      return from;
    }
    for (int64_t tile = from; tile < n_tiles; ++tile) {
      key_range<kBN>(pos, tile * kBN, lane, kmin, kmax);
      if (!a.causal || kmin <= bq_max) return tile;
    }
    return n_tiles;
  };

  // tile = t_i (this step's), next = t_{i+1}; their largest key positions.
  int64_t tile = next_tile(0), tile_kmax = kmax;
  int64_t next = tile < n_tiles ? next_tile(tile + 1) : n_tiles, next_kmax = kmax;
  if (producer && tile < n_tiles) {
    mbar_expect_tx(q_full, kQBytes);
#pragma unroll
    for (int c = 0; c < D / 64; ++c)
      tma_load(smem_addr(Qs) + c * kBM * 128, &tq, c * 64, static_cast<int>(h), static_cast<int>(m0),
               static_cast<int>(b), q_full);
    load(true, 0, tile);
    load(false, 0, tile);
    if (next < n_tiles) load(true, 1, next);
  }
  __syncwarp();

  const uint32_t q_addr = smem_addr(Qs) + wgroup * 64 * 128;     // this warpgroup's 64 rows
  float o[D / 2] = {};                                           // O accumulator m64nD
  float s[kBN / 2];                                              // S accumulator m64n128, then P in fp32
  uint32_t p[kBN / 16][4];                                       // P_{i−1}: A fragments of the k-steps of P·V
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;  // running max (base-2 units), per-lane sums

  // Queues S = Q·K_iᵀ and O += P·V_j (tile j in stage j % kStages).
  auto issue_s = [&](int i) {
    const uint32_t k_addr = smem_addr(Ks + (i % kStages) * kKVBytes);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      wg::mma_ss_n128<kBf16>(s, wg::desc(q_addr + (kk / 4) * kBM * 128 + (kk % 4) * 32, 16, 1024),
                             wg::desc(k_addr + (kk / 4) * kBN * 128 + (kk % 4) * 32, 16, 1024), kk > 0);
    wg::commit();
  };
  auto issue_pv = [&](int j) {
    const uint32_t v_addr = smem_addr(Vs + (j % kStages) * kKVBytes);
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk)
      wg::mma_rs_t<kBf16>(o, p[kk], wg::desc(v_addr + kk * 16 * 128, kBN * 128, 1024));
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
    const float mn_a = fmaxf(m_a, __fmul_rn(quad_max(mx_a), a.scale_log2)),
                mn_b = fmaxf(m_b, __fmul_rn(quad_max(mx_b), a.scale_log2));
    // A row that has seen nothing yet keeps o = 0, l = 0 (no −inf − −inf).
    const float base_a = mn_a == -INFINITY ? 0.f : mn_a, base_b = mn_b == -INFINITY ? 0.f : mn_b;
    alpha_a = ex2(m_a - base_a);
    alpha_b = ex2(m_b - base_b);
    m_a = mn_a;
    m_b = mn_b;
    // s·scale is rounded before the max is subtracted (__fmul_rn is never fused):
    // the row max then gives exactly 2^0 and the rest exponents <= 0 for scores
    // of any size (a fused fmaf leaves m's rounding error, 2^64 at scores of 1e30).
    float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
      s[4 * nt] = ex2(__fmul_rn(s[4 * nt], a.scale_log2) - base_a);
      s[4 * nt + 1] = ex2(__fmul_rn(s[4 * nt + 1], a.scale_log2) - base_a);
      s[4 * nt + 2] = ex2(__fmul_rn(s[4 * nt + 2], a.scale_log2) - base_b);
      s[4 * nt + 3] = ex2(__fmul_rn(s[4 * nt + 3], a.scale_log2) - base_b);
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

  // The ping-pong: warpgroup w waits on named barrier 1 + w before queueing its products and then
  // lets the other go (barrier 2 − w); warpgroup 1 starts by letting warpgroup 0 go first.
  auto my_turn = [&] { named_sync(1 + wgroup); };
  auto pass_turn = [&] { named_arrive(2 - wgroup); };
  // Each warp tells the producer it is done with K_i and V_j.
  auto release = [&](int i, int j) {
    if (lane == 0) {
      mbar_arrive(k_empty(i % kStages));
      if (j >= 0) mbar_arrive(v_empty(j % kStages));
    }
  };
  auto wait_k = [&](int i) { mbar_wait(k_full(i % kStages), (i / kStages) & 1); };
  auto wait_v = [&](int j) { mbar_wait(v_full(j % kStages), (j / kStages) & 1); };

  if (tile < n_tiles) {
    if (wgroup == 1) pass_turn();
    // Step 0: S_0 and its softmax (O is still zero).
    mbar_wait(q_full, 0);
    wait_k(0);
    visibility();
    my_turn();
    wg::fence();
    issue_s(0);
    pass_turn();
    wg::wait<0>();
    wg::hold(s);
    float alpha_a, alpha_b;  // O's rescale from the last softmax, applied before P·V adds that step's P
    softmax(alpha_a, alpha_b);
    pack_p();
    release(0, -1);
    advance();
    int i = 1;
    for (; tile < n_tiles; ++i) {
      if (producer) {
        if (next < n_tiles) load(true, i + 1, next);
        load(false, i, tile);
      }
      __syncwarp();  // warp 0 whole again before its barriers and MMAs
      wait_k(i);
      wait_v(i - 1);
      visibility();
      my_turn();
      wg::fence();
      issue_s(i);
      rescale_o(alpha_a, alpha_b);  // O in m_{i−1} units, ready for P_{i−1}·V_{i−1}
      wg::fence();
      issue_pv(i - 1);
      pass_turn();
      wg::wait<1>();
      wg::hold(s);
      softmax(alpha_a, alpha_b);  // while the tensor cores do P·V and the other warpgroup's products
      wg::wait<0>();
      wg::hold(o);
      wg::hold(reinterpret_cast<uint32_t(&)[kBN / 4]>(p));
      pack_p();
      release(i, i - 1);
      advance();
    }
    // The last tile's P·V (warpgroup 1 has nobody left to pass the turn to).
    wait_v(i - 1);
    rescale_o(alpha_a, alpha_b);
    my_turn();
    wg::fence();
    issue_pv(i - 1);
    if (wgroup == 0) pass_turn();
    wg::wait<0>();
    wg::hold(o);
  }

  store_forward_rows<D>(a, b, h, r_a, r_b, t, o, m_a, m_b, l_a, l_b);
#endif
}

PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// The TMA map of a [B, L, H, d] view: dims (d, H, L, B), boxes of 64 × 1 × 128 × 1 elements into the
// 128-byte swizzle, rows past L read as zeros. False when the driver refuses the strides.
bool tensor_map(CUtensorMap& map, const Bshd& x, int64_t B, int64_t L, int64_t H, int d, bool bf16) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = encode_tiled();
  if (!encode) return false;
  const cuuint64_t dims[4] = {cuuint64_t(d), cuuint64_t(H), cuuint64_t(L), cuuint64_t(B)};
  const cuuint64_t strides[3] = {cuuint64_t(x.sh) * 2, cuuint64_t(x.sl) * 2, cuuint64_t(x.sb) * 2};
  const cuuint32_t box[4] = {64, 1, kBN, 1}, elem[4] = {1, 1, 1, 1};
  return encode(&map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
                const_cast<void*>(x.p), dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <typename T, int D>
bool launch(const FwdArgs& a, cudaStream_t stream) {
  constexpr bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  CUtensorMap tq, tk, tv;
  if (a.Lq >= INT32_MAX || a.Lk >= INT32_MAX || !tensor_map(tq, a.q, a.B, a.Lq, a.H, D, bf16) ||
      !tensor_map(tk, a.k, a.B, a.Lk, a.Hkv, D, bf16) || !tensor_map(tv, a.v, a.B, a.Lk, a.Hkv, D, bf16))
    return false;
  const size_t smem = 1024 + size_t(kBM + 2 * kStages * kBN) * D * 2;
  auto kernel = flash_forward_sm90_kernel<T, D>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
             "raising the Hopper forward kernel's shared memory limit");
  const dim3 grid(static_cast<unsigned>((a.Lq + kBM - 1) / kBM), static_cast<unsigned>(a.H),
                  static_cast<unsigned>(a.B));
  kernel<<<grid, kThreads, smem, stream>>>(a, tq, tk, tv);
  check_cuda(cudaGetLastError(), "launching the Hopper flash forward kernel");
  return true;
}

}  // namespace

bool forward_sm90(const FwdArgs& a, bool bf16, int d, cudaStream_t stream) {
  if (d == 64) return bf16 ? launch<__nv_bfloat16, 64>(a, stream) : launch<__half, 64>(a, stream);
  return bf16 ? launch<__nv_bfloat16, 128>(a, stream) : launch<__half, 128>(a, stream);
}

}  // namespace ringattn::cuda::fa

namespace ringattn::cuda {

bool sm90_forward_available() {
  const char* env = std::getenv("RINGATTN_CUDA_FORWARD");
  const std::string mode = env && *env ? env : "auto";
  check(mode == "auto" || mode == "sm90" || mode == "portable",
        "RINGATTN_CUDA_FORWARD must be auto, sm90 or portable, got '", mode, "'");
  if (mode == "portable") return false;
  bool hopper = false;
#ifdef RINGATTN_HAVE_SM90A
  int dev = 0, major = 0, minor = 0;
  fa::check_cuda(cudaGetDevice(&dev), "reading the current device");
  fa::check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "reading the GPU's version");
  fa::check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), "reading the GPU's version");
  hopper = major == 9 && minor == 0 && fa::encode_tiled() != nullptr;
#endif
  check(hopper || mode == "auto",
        "RINGATTN_CUDA_FORWARD=sm90: the Hopper forward needs a compute capability 9.0 GPU, a build with sm_90a code "
        "(RINGATTN_CUDA_ARCHITECTURES) and a driver that has cuTensorMapEncodeTiled");
  return hopper;
}

}  // namespace ringattn::cuda
