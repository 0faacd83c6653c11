// Flash attention on NVIDIA GPUs (FlashAttention-2 structure, docs/design.md §3):
// bf16/fp16 tensor-core MMAs (mma.sync m16n8k16, sm_80+) with fp32 accumulation,
// online softmax in base 2, causal masking by global positions, GQA.
//
// Forward: a block of 4 warps owns 64 query rows of one (batch, head); each warp
// owns 16 rows, keeps its Q fragments and its O accumulator in registers and
// streams 64-key tiles of K and V through shared memory (double-buffered
// cp.async, the next tile loads while this one computes). Tiles no query of the
// block can see are skipped; tiles fully visible to a warp skip the mask.
//
// Backward: a block owns 64 keys of one (batch, kv head); each warp owns 16 keys
// and keeps their dK, dV accumulators in registers, looping over the query heads
// of its GQA group and over 64-row query tiles: Sᵀ = K·Qᵀ, Pᵀ = exp(Sᵀ − lse),
// dV += Pᵀ·dO, dPᵀ = V·dOᵀ, dSᵀ = Pᵀ∘(dPᵀ − D), dK += dSᵀ·Q; dS goes through
// shared memory for dQ += dS·K, added atomically into an fp32 buffer (two
// adjacent values per request on Hopper).
//
// Fragment layouts are those of the PTX ISA for mma.m16n8k16 (.row.col): with
// g = lane/4 and t = lane%4, A holds rows g, g+8 and columns 2t, 2t+1, 2t+8,
// 2t+9; B holds k rows 2t, 2t+1, 2t+8, 2t+9 of column g; C holds rows g, g+8,
// columns 2t, 2t+1. A C tile of two n8 blocks is an A fragment, which is how
// P and dS feed the second product without leaving registers.
#include <cmath>
#include <cstdint>

#include "kernels/cuda/attention_common.cuh"
#include "kernels/cuda/kernels.h"
#include "ringattn/error.h"

namespace ringattn::cuda {
namespace {
using namespace fa;

constexpr int kThreads = 128;  // 4 warps
constexpr int kBM = 64;        // query rows per forward block / per backward query tile
constexpr int kBN = 64;        // keys per forward tile / per backward block
constexpr int kPad = 8;        // elements added to each shared-memory row: conflict-free fragment loads

// ---- device helpers -----------------------------------------------------------

// c += a·b for one m16n8k16 tile.
template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Four 8x8 b16 matrices, transposed: lanes 8m..8m+7 give the row addresses of
// matrix m; r[m] holds M_m[2t][g], M_m[2t+1][g] (a B fragment when rows are k).
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_ptr)));
}

// Four 8x8 b16 matrices: lanes 8m..8m+7 give the row addresses of matrix m;
// r[m] holds M_m[g][2t], M_m[g][2t+1] (a B fragment when rows are n, columns k).
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_ptr)));
}

__device__ __forceinline__ uint32_t lds32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Rows [row0, row0 + ROWS) of a [rows, D] matrix (row stride `ld` elements) into
// shared memory [ROWS][D + kPad]; rows past nrows are zero.
template <typename T, int ROWS, int D>
__device__ __forceinline__ void load_tile(T* smem, const T* g, int64_t ld, int64_t row0, int64_t nrows) {
  constexpr int kChunks = D / 8;  // 16-byte pieces per row
  for (int c = threadIdx.x; c < ROWS * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool valid = row0 + r < nrows;
    cp_async16(smem + r * (D + kPad) + col, valid ? g + (row0 + r) * ld + col : g, valid);
  }
}

// ---- forward --------------------------------------------------------------------
// q: [B, Lq, H, D]  k, v: [B, Lk, Hkv, D]  o: [B, Lq, H, D]  lse: [B, H, Lq]
// grid (⌈Lq/64⌉, H, B · splits), 128 threads (splits > 1: see FwdArgs::split_tiles,
// o and lse are then [B · splits, ...] partials).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) flash_forward_kernel(const FwdArgs a) {
  constexpr int ld = D + kPad;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);  // [kBM][ld]
  T* Ks = Qs + kBM * ld;                   // [2][kBN][ld]
  T* Vs = Ks + 2 * kBN * ld;               // [2][kBN][ld]
  __shared__ int64_t warp_qmax[4];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t splits = gridDim.z / a.B, b = blockIdx.z / splits, split = blockIdx.z % splits;
  const int64_t h = blockIdx.y, hk = h / (a.H / a.Hkv), m0 = int64_t(blockIdx.x) * kBM;
  const T* qg = static_cast<const T*>(a.q.p) + b * a.q.sb + h * a.q.sh;
  const T* kg = static_cast<const T*>(a.k.p) + b * a.k.sb + hk * a.k.sh;
  const T* vg = static_cast<const T*>(a.v.p) + b * a.v.sb + hk * a.v.sh;
  const Positions& pos = a.pos;

  // This thread's rows and the warp's and block's query range.
  const ThreadRows rows = thread_rows(pos, m0, warp, g);
  const int64_t r_a = rows.r_a, r_b = rows.r_b, pos_a = rows.pos_a, pos_b = rows.pos_b;
  const int64_t wq_min = rows.wq_min, wq_max = rows.wq_max;
  if (lane == 0) warp_qmax[warp] = wq_max;

  load_tile<T, kBM, D>(Qs, qg, a.q.sl, m0, a.Lq);
  cp_async_commit();
  __syncthreads();
  const int64_t bq_max = max(max(warp_qmax[0], warp_qmax[1]), max(warp_qmax[2], warp_qmax[3]));

  // The next key tile at or after `from` (in this block's split) that some query
  // of the block sees.
  const int64_t all_tiles = (a.Lk + kBN - 1) / kBN, first_tile = split * a.split_tiles;
  const int64_t n_tiles = a.split_tiles ? min(all_tiles, first_tile + a.split_tiles) : all_tiles;
  int64_t kmin = 0, kmax = 0;
  auto next_tile = [&](int64_t from) {
    for (int64_t tile = from; tile < n_tiles; ++tile) {
      key_range<kBN>(pos, tile * kBN, lane, kmin, kmax);
      if (!a.causal || kmin <= bq_max) return tile;
    }
    return n_tiles;
  };

  int64_t tile = next_tile(first_tile);
  int64_t cur_kmax = kmax;
  if (tile < n_tiles) {
    load_tile<T, kBN, D>(Ks, kg, a.k.sl, tile * kBN, a.Lk);
    load_tile<T, kBN, D>(Vs, vg, a.v.sl, tile * kBN, a.Lk);
  }
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  uint32_t qf[D / 16][4];  // this warp's 16 query rows as A fragments
#pragma unroll
  for (int kc = 0; kc < D / 16; ++kc) {
    const T* row = Qs + (warp * 16 + g) * ld + kc * 16 + 2 * t;
    qf[kc][0] = lds32(row);
    qf[kc][1] = lds32(row + 8 * ld);
    qf[kc][2] = lds32(row + 8);
    qf[kc][3] = lds32(row + 8 * ld + 8);
  }

  float o_acc[D / 8][4] = {};
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;  // running max (base-2 units) and sum
  int buf = 0;
  while (tile < n_tiles) {
    const int64_t n0 = tile * kBN;
    const bool need_mask = n0 + kBN > a.Lk || (a.causal && cur_kmax > wq_min);
    const int64_t next = next_tile(tile + 1);
    const int64_t next_kmax = kmax;
    if (next < n_tiles) {
      load_tile<T, kBN, D>(Ks + (buf ^ 1) * kBN * ld, kg, a.k.sl, next * kBN, a.Lk);
      load_tile<T, kBN, D>(Vs + (buf ^ 1) * kBN * ld, vg, a.v.sl, next * kBN, a.Lk);
    }
    cp_async_commit();

    const T* K = Ks + buf * kBN * ld;
    const T* V = Vs + buf * kBN * ld;
    // s = q·kᵀ for 16 rows × 64 keys.
    float s[kBN / 8][4] = {};
    // k's B fragments by ldmatrix, two n8 tiles per load.
#pragma unroll
    for (int np = 0; np < kBN / 16; ++np) {
#pragma unroll
      for (int kc = 0; kc < D / 16; ++kc) {
        uint32_t r[4];
        ldsm_x4(r, K + (np * 16 + (lane >> 4) * 8 + (lane & 7)) * ld + kc * 16 + ((lane >> 3) & 1) * 8);
        mma<T>(s[2 * np], qf[kc], r[0], r[1]);
        mma<T>(s[2 * np + 1], qf[kc], r[2], r[3]);
      }
    }
    // Scale to base 2, mask, and the online softmax update.
    float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = __fmul_rn(s[nt][e], a.scale_log2);  // never fused into x − base: the row max gives 2^0
        if (need_mask) {
          const int64_t kp = pos.key(n0 + nt * 8 + 2 * t + (e & 1));
          const int64_t qp = e < 2 ? pos_a : pos_b;
          if (kp == kFarPos || qp == kNoPos || (a.causal && kp > qp)) x = -INFINITY;
        }
        s[nt][e] = x;
      }
      mx_a = fmaxf(mx_a, fmaxf(s[nt][0], s[nt][1]));
      mx_b = fmaxf(mx_b, fmaxf(s[nt][2], s[nt][3]));
    }
    const float mn_a = fmaxf(m_a, quad_max(mx_a)), mn_b = fmaxf(m_b, quad_max(mx_b));
    // A row that has seen nothing yet keeps o = 0, l = 0 (no −inf − −inf).
    const float base_a = mn_a == -INFINITY ? 0.f : mn_a, base_b = mn_b == -INFINITY ? 0.f : mn_b;
    const float alpha_a = exp2f(m_a - base_a), alpha_b = exp2f(m_b - base_b);
    m_a = mn_a;
    m_b = mn_b;
    float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
      s[nt][0] = exp2f(s[nt][0] - base_a);
      s[nt][1] = exp2f(s[nt][1] - base_a);
      s[nt][2] = exp2f(s[nt][2] - base_b);
      s[nt][3] = exp2f(s[nt][3] - base_b);
      sum_a += s[nt][0] + s[nt][1];
      sum_b += s[nt][2] + s[nt][3];
    }
    l_a = l_a * alpha_a + sum_a;  // per-lane partial sums; the quad adds them at the end
    l_b = l_b * alpha_b + sum_b;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o_acc[dt][0] *= alpha_a;
      o_acc[dt][1] *= alpha_a;
      o_acc[dt][2] *= alpha_b;
      o_acc[dt][3] *= alpha_b;
    }
    // o += p·v: p's C fragments are A fragments, v's B fragments come transposed.
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t pf[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dt2 = 0; dt2 < D / 16; ++dt2) {
        uint32_t r[4];
        ldsm_x4_t(r, V + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * ld + dt2 * 16 + (lane >> 4) * 8);
        mma<T>(o_acc[2 * dt2], pf, r[0], r[1]);
        mma<T>(o_acc[2 * dt2 + 1], pf, r[2], r[3]);
      }
    }
    cp_async_wait_all();
    __syncthreads();
    buf ^= 1;
    tile = next;
    cur_kmax = next_kmax;
  }

  store_forward_rows<D>(a, blockIdx.z, h, r_a, r_b, t, reinterpret_cast<const float(&)[D / 2]>(o_acc), m_a, m_b, l_a,
                        l_b);
}

// The exact LSE merge of the `splits` partials of each row (docs/design.md §4 over
// many parts): o_part [B·splits, Lq, H, D] fp32 contiguous, lse_part
// [B·splits, H, Lq] contiguous -> o, lse. One warp per (b, h, row).
__global__ void combine_splits_kernel(const float* o_part, const float* lse_part, Bshd o, float* lse, int64_t lse_sb,
                                      int64_t lse_sh, int64_t lse_sl, int64_t B, int64_t Lq, int64_t H, int Dh,
                                      int64_t splits) {
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= B * H * Lq) return;
  const int64_t i = row % Lq, h = row / Lq % H, b = row / (Lq * H);
  auto part_lse = [&](int64_t s) { return lse_part[((b * splits + s) * H + h) * Lq + i]; };
  float m = -INFINITY;
  for (int64_t s = 0; s < splits; ++s) m = fmaxf(m, part_lse(s));
  float l = 0.f;
  for (int64_t s = 0; s < splits; ++s) l += m == -INFINITY ? 0.f : expf(part_lse(s) - m);
  for (int c = lane; c < Dh; c += 32) {
    float acc = 0.f;
    for (int64_t s = 0; s < splits; ++s) {
      const float w = m == -INFINITY ? 0.f : expf(part_lse(s) - m);
      if (w > 0.f) acc += w * o_part[(((b * splits + s) * Lq + i) * H + h) * Dh + c];
    }
    store_as(const_cast<void*>(o.p), o.dt, b * o.sb + i * o.sl + h * o.sh + c, l > 0.f ? acc / l : 0.f);
  }
  if (lane == 0) lse[b * lse_sb + h * lse_sh + i * lse_sl] = l > 0.f ? m + logf(l) : -INFINITY;
}

// ---- backward --------------------------------------------------------------------

// p[0] += x, p[1] += y atomically (p 8-byte aligned). sm_90 adds both in one
// request, so a warp's 32 adds fill whole 32-byte sectors of L2.
__device__ __forceinline__ void add2(float* p, float x, float y) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(x), "f"(y) : "memory");
#else
  atomicAdd(p, x);
  atomicAdd(p + 1, y);
#endif
}

struct BwdArgs {
  Bshd q, k, v, dout, dk, dv;
  const float* lse;  // [B, H, Lq] with strides
  int64_t lse_sb, lse_sh, lse_sl;
  const float* delta;  // D = rowsum(dO∘O): [B, H, Lq] contiguous
  float* dq_acc;       // [B, Lq, H, D] contiguous fp32, pre-scaled by `scale`
  int64_t B, Lq, Lk, H, Hkv;
  Positions pos;
  float scale, scale_log2;
  bool causal;
};

// D[b, h, i] = Σ_d dout·o, one warp per row.   dout, o: [B, Lq, H, Dh]   delta: [B, H, Lq]
__global__ void delta_kernel(Bshd dout, Bshd o, float* delta, int64_t B, int64_t Lq, int64_t H, int Dh) {
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= B * H * Lq) return;
  const int64_t i = row % Lq, h = (row / Lq) % H, b = row / (Lq * H);
  const int64_t od = b * dout.sb + i * dout.sl + h * dout.sh, oo = b * o.sb + i * o.sl + h * o.sh;
  float acc = 0.f;
  for (int c = lane; c < Dh; c += 32) acc += load_as(dout.p, dout.dt, od + c) * load_as(o.p, o.dt, oo + c);
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) delta[row] = acc;
}

// q, dout: [B, Lq, H, D]  k, v, dk, dv: [B, Lk, Hkv, D]  grid (⌈Lk/64⌉, Hkv, B), 128 threads.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) flash_backward_kernel(const BwdArgs a) {
  constexpr int ld = D + kPad, lds_ = kBN + kPad;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Ks = reinterpret_cast<T*>(smem_raw);                      // [kBN][ld]   this block's keys
  T* Vs = Ks + kBN * ld;                                       // [kBN][ld]
  T* Qs = Vs + kBN * ld;                                       // [kBM][ld]   the current query tile
  T* dOs = Qs + kBM * ld;                                      // [kBM][ld]
  T* dSs = dOs + kBM * ld;                                     // [kBM][lds_] dS of the tile, [query][key]
  float* lse2_s = reinterpret_cast<float*>(dSs + kBM * lds_);  // [kBM] lse·log2(e); +inf: row sees nothing
  float* delta_s = lse2_s + kBM;                               // [kBM]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t b = blockIdx.z, hk = blockIdx.y, n0 = int64_t(blockIdx.x) * kBN;
  const int64_t group = a.H / a.Hkv;
  const Positions& pos = a.pos;
  const T* kg = static_cast<const T*>(a.k.p) + b * a.k.sb + hk * a.k.sh;
  const T* vg = static_cast<const T*>(a.v.p) + b * a.v.sb + hk * a.v.sh;
  load_tile<T, kBN, D>(Ks, kg, a.k.sl, n0, a.Lk);
  load_tile<T, kBN, D>(Vs, vg, a.v.sl, n0, a.Lk);
  cp_async_commit();

  // This thread's keys (c_a, c_b = c_a + 8) and the block's key range.
  const int64_t c_a = n0 + warp * 16 + g, c_b = c_a + 8;
  const int64_t kp_a = pos.key(c_a), kp_b = pos.key(c_b);
  int64_t kmin, kmax;
  key_range<kBN>(pos, n0, lane, kmin, kmax);

  float dk_acc[D / 8][4] = {}, dv_acc[D / 8][4] = {};
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const T* qg = static_cast<const T*>(a.q.p) + b * a.q.sb + h * a.q.sh;
    const T* dog = static_cast<const T*>(a.dout.p) + b * a.dout.sb + h * a.dout.sh;
    const float* lse = a.lse + b * a.lse_sb + h * a.lse_sh;
    const float* delta = a.delta + (b * a.H + h) * a.Lq;
    for (int64_t m0 = 0; m0 < a.Lq; m0 += kBM) {
      const int64_t qa = pos.query(m0 + lane), qb = pos.query(m0 + 32 + lane);
      int64_t tq_min, tq_max;
      query_range(qa, qb, tq_min, tq_max);
      if (a.causal && kmin > tq_max) continue;  // no query of this tile sees these keys
      const bool need_mask = m0 + kBM > a.Lq || n0 + kBN > a.Lk || (a.causal && kmax > tq_min);

      __syncthreads();  // the previous tile's Qs, dOs, dSs are no longer read
      load_tile<T, kBM, D>(Qs, qg, a.q.sl, m0, a.Lq);
      load_tile<T, kBM, D>(dOs, dog, a.dout.sl, m0, a.Lq);
      cp_async_commit();
      for (int r = threadIdx.x; r < kBM; r += kThreads) {
        const float l = m0 + r < a.Lq ? lse[(m0 + r) * a.lse_sl] : -INFINITY;
        lse2_s[r] = l == -INFINITY ? INFINITY : l * kLog2e;
        delta_s[r] = m0 + r < a.Lq ? delta[m0 + r] : 0.f;
      }
      cp_async_wait_all();
      __syncthreads();

      // sᵀ = k·qᵀ and dpᵀ = v·doᵀ: 16 keys × 64 queries per warp.
      float st[kBM / 8][4] = {}, dpt[kBM / 8][4] = {};
#pragma unroll
      for (int kc = 0; kc < D / 16; ++kc) {
        const T* kr = Ks + (warp * 16 + g) * ld + kc * 16 + 2 * t;
        const T* vr = Vs + (warp * 16 + g) * ld + kc * 16 + 2 * t;
        const uint32_t kf[4] = {lds32(kr), lds32(kr + 8 * ld), lds32(kr + 8), lds32(kr + 8 * ld + 8)};
        const uint32_t vf[4] = {lds32(vr), lds32(vr + 8 * ld), lds32(vr + 8), lds32(vr + 8 * ld + 8)};
#pragma unroll
        for (int nt = 0; nt < kBM / 8; ++nt) {
          const T* qr = Qs + (nt * 8 + g) * ld + kc * 16 + 2 * t;
          const T* dr = dOs + (nt * 8 + g) * ld + kc * 16 + 2 * t;
          mma<T>(st[nt], kf, lds32(qr), lds32(qr + 8));
          mma<T>(dpt[nt], vf, lds32(dr), lds32(dr + 8));
        }
      }
      // pᵀ = exp(sᵀ − lse) (0 where masked), dsᵀ = pᵀ∘(dpᵀ − D).
#pragma unroll
      for (int nt = 0; nt < kBM / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = nt * 8 + 2 * t + (e & 1);
          // p <= 1: a rounding above lse (huge scores) must not overflow exp2
          float p = exp2f(fminf(__fmul_rn(st[nt][e], a.scale_log2) - lse2_s[qi], 0.f));
          if (need_mask) {
            const int64_t qp = pos.query(m0 + qi), kp = e < 2 ? kp_a : kp_b;
            if (kp == kFarPos || qp == kNoPos || (a.causal && kp > qp)) p = 0.f;
          }
          st[nt][e] = p;
          dpt[nt][e] = p * (dpt[nt][e] - delta_s[qi]);
        }
      }
      // dv += pᵀ·do and dk += dsᵀ·q (dO and Q as transposed B fragments, rows = queries).
#pragma unroll
      for (int kk = 0; kk < kBM / 16; ++kk) {
        const uint32_t pf[4] = {pack2<T>(st[2 * kk][0], st[2 * kk][1]), pack2<T>(st[2 * kk][2], st[2 * kk][3]),
                                pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                                pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3])};
        const uint32_t sf[4] = {pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]), pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]),
                                pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                                pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
        const int row = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
#pragma unroll
        for (int dt2 = 0; dt2 < D / 16; ++dt2) {
          uint32_t r[4];
          ldsm_x4_t(r, dOs + row * ld + dt2 * 16 + (lane >> 4) * 8);
          mma<T>(dv_acc[2 * dt2], pf, r[0], r[1]);
          mma<T>(dv_acc[2 * dt2 + 1], pf, r[2], r[3]);
          ldsm_x4_t(r, Qs + row * ld + dt2 * 16 + (lane >> 4) * 8);
          mma<T>(dk_acc[2 * dt2], sf, r[0], r[1]);
          mma<T>(dk_acc[2 * dt2 + 1], sf, r[2], r[3]);
        }
      }
      // ds to shared memory as [query][key], for dq.
#pragma unroll
      for (int nt = 0; nt < kBM / 8; ++nt) {
        const int qi = nt * 8 + 2 * t;
        const int kj = warp * 16 + g;
        T* d0 = dSs + qi * lds_;
        d0[kj] = T(dpt[nt][0]);
        d0[lds_ + kj] = T(dpt[nt][1]);
        d0[kj + 8] = T(dpt[nt][2]);
        d0[lds_ + kj + 8] = T(dpt[nt][3]);
      }
      __syncthreads();
      // dq += scale · ds·k for this warp's 16 queries (K as transposed B fragments, rows = keys).
      float dq[D / 8][4] = {};
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        const T* sr = dSs + (warp * 16 + g) * lds_ + kk * 16 + 2 * t;
        const uint32_t af[4] = {lds32(sr), lds32(sr + 8 * lds_), lds32(sr + 8), lds32(sr + 8 * lds_ + 8)};
        const int row = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
#pragma unroll
        for (int dt2 = 0; dt2 < D / 16; ++dt2) {
          uint32_t r[4];
          ldsm_x4_t(r, Ks + row * ld + dt2 * 16 + (lane >> 4) * 8);
          mma<T>(dq[2 * dt2], af, r[0], r[1]);
          mma<T>(dq[2 * dt2 + 1], af, r[2], r[3]);
        }
      }
      const int64_t qa_row = m0 + warp * 16 + g, qb_row = qa_row + 8;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        const int col = dt * 8 + 2 * t;
        if (qa_row < a.Lq)
          add2(a.dq_acc + ((b * a.Lq + qa_row) * a.H + h) * D + col, dq[dt][0] * a.scale, dq[dt][1] * a.scale);
        if (qb_row < a.Lq)
          add2(a.dq_acc + ((b * a.Lq + qb_row) * a.H + h) * D + col, dq[dt][2] * a.scale, dq[dt][3] * a.scale);
      }
    }
  }
  cp_async_wait_all();  // the K/V loads, when every query tile was skipped
  // dk = scale · Σ dsᵀ·q, dv = Σ pᵀ·do over the group's heads.
  void* dk = const_cast<void*>(a.dk.p);
  void* dv = const_cast<void*>(a.dv.p);
  const int64_t kb = b * a.dk.sb + hk * a.dk.sh, vb = b * a.dv.sb + hk * a.dv.sh;
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    const int col = dt * 8 + 2 * t;
    if (c_a < a.Lk) {
      store_as(dk, a.dk.dt, kb + c_a * a.dk.sl + col, dk_acc[dt][0] * a.scale);
      store_as(dk, a.dk.dt, kb + c_a * a.dk.sl + col + 1, dk_acc[dt][1] * a.scale);
      store_as(dv, a.dv.dt, vb + c_a * a.dv.sl + col, dv_acc[dt][0]);
      store_as(dv, a.dv.dt, vb + c_a * a.dv.sl + col + 1, dv_acc[dt][1]);
    }
    if (c_b < a.Lk) {
      store_as(dk, a.dk.dt, kb + c_b * a.dk.sl + col, dk_acc[dt][2] * a.scale);
      store_as(dk, a.dk.dt, kb + c_b * a.dk.sl + col + 1, dk_acc[dt][3] * a.scale);
      store_as(dv, a.dv.dt, vb + c_b * a.dv.sl + col, dv_acc[dt][2]);
      store_as(dv, a.dv.dt, vb + c_b * a.dv.sl + col + 1, dv_acc[dt][3]);
    }
  }
}

// dq (any dtype, strided) := dq_acc (fp32 [B, Lq, H, Dh] contiguous).
__global__ void dq_store_kernel(const float* dq_acc, Bshd dq, int64_t B, int64_t Lq, int64_t H, int Dh) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * Lq * H * Dh) return;
  const int64_t c = i % Dh, h = (i / Dh) % H, l = (i / (Dh * H)) % Lq, b = i / (Dh * H * Lq);
  store_as(const_cast<void*>(dq.p), dq.dt, b * dq.sb + l * dq.sl + h * dq.sh + c, dq_acc[i]);
}

// ---- merge ------------------------------------------------------------------------
// (o_acc, lse_acc) ⊕= (o_part, lse_part), one warp per (b, i, h) row.
//   o: [B, Lq, H, Dh]   lse: [B, H, Lq]
__global__ void merge_kernel(Bshd o_acc, float* lse_acc, int64_t la_sb, int64_t la_sh, int64_t la_sl, Bshd o_part,
                             const float* lse_part, int64_t lp_sb, int64_t lp_sh, int64_t lp_sl, int64_t B, int64_t Lq,
                             int64_t H, int Dh) {
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= B * Lq * H) return;
  const int64_t h = row % H, i = (row / H) % Lq, b = row / (H * Lq);
  float* la = lse_acc + b * la_sb + h * la_sh + i * la_sl;
  const float l1 = *la, l2 = lse_part[b * lp_sb + h * lp_sh + i * lp_sl];
  const float m = fmaxf(l1, l2);
  if (m == -INFINITY) return;  // neither side saw a key: stays o = 0, lse = −inf
  const float w1 = expf(l1 - m), w2 = expf(l2 - m), sum = w1 + w2;
  const float c1 = w1 / sum, c2 = w2 / sum;
  float* oa = static_cast<float*>(const_cast<void*>(o_acc.p)) + b * o_acc.sb + i * o_acc.sl + h * o_acc.sh;
  const int64_t op = b * o_part.sb + i * o_part.sl + h * o_part.sh;
  for (int c = lane; c < Dh; c += 32) oa[c] = c1 * oa[c] + c2 * load_as(o_part.p, o_part.dt, op + c);
  __syncwarp();
  if (lane == 0) *la = m + logf(sum);
}

// ---- host side ----------------------------------------------------------------------

int dt_code(DType t) { return t == DType::f32 ? 0 : t == DType::bf16 ? 1 : 2; }
Bshd bshd(const TensorView& t) { return {t.data, t.strides[0], t.strides[1], t.strides[2], dt_code(t.dtype)}; }

// Shapes, dtypes and alignment of one attention call; fills the shared arguments.
struct Checked {
  int64_t B, Lq, Lk, H, Hkv, d;
  float scale;
  Checked(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o, const TensorView& lse,
          const AttentionOptions& opt) {
    const AttentionShape a = check_attention(q, k, v, o, lse, opt);
    B = a.B, Lq = a.Lq, H = a.H, d = a.d, Lk = a.Lk, Hkv = a.Hkv, scale = a.scale;
    check(d == 64 || d == 128, "the CUDA kernels support head dims 64 and 128, got d=", d);
    check(opt.q_doc.empty() && a.window_left < 0 && (a.window_right < 0 || (opt.causal && a.window_right == 0)),
          "the CUDA kernels do not take packed documents or sliding windows yet (the CPU kernels do)");
    check(q.dtype == DType::bf16 || q.dtype == DType::f16, "the CUDA kernels take bf16 or fp16 q, k, v, got ",
          dtype_name(q.dtype));
    for (const TensorView* x : {&q, &k, &v}) {
      check(x->strides[3] == 1, "q, k, v need a contiguous last dimension, got strides of ", x->shape_str());
      check(reinterpret_cast<uintptr_t>(x->data) % 16 == 0 && x->strides[0] % 8 == 0 && x->strides[1] % 8 == 0 &&
                x->strides[2] % 8 == 0,
            "q, k, v rows must start on 16-byte boundaries (strides multiples of 8 elements)");
    }
    check(o.strides[3] == 1 && (o.dtype == DType::f32 || o.dtype == q.dtype),
          "o must be fp32 or q's dtype with a contiguous last dimension; got ", dtype_name(o.dtype));
    check(B <= 65535 && H <= 65535, "B=", B, " and H=", H, " must be at most 65535 (CUDA grid limits)");
  }
  Positions positions(const AttentionOptions& opt) const {
    return {opt.q_pos.empty() ? nullptr : opt.q_pos.data(), opt.k_pos.empty() ? nullptr : opt.k_pos.data(), Lq, Lk};
  }
};

template <typename T, int D>
void forward_t(const FwdArgs& a, cudaStream_t stream) {
  const size_t smem = size_t(kBM + 4 * kBN) * (D + kPad) * sizeof(T);
  auto kernel = flash_forward_kernel<T, D>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
             "raising the forward kernel's shared memory limit");
  const int64_t splits = a.split_tiles ? ((a.Lk + kBN - 1) / kBN + a.split_tiles - 1) / a.split_tiles : 1;
  const dim3 grid(static_cast<unsigned>((a.Lq + kBM - 1) / kBM), static_cast<unsigned>(a.H),
                  static_cast<unsigned>(a.B * splits));
  kernel<<<grid, kThreads, smem, stream>>>(a);
  check_cuda(cudaGetLastError(), "launching the flash forward kernel");
}

// Key tiles per split for a forward of one query block per (sequence, head) that
// would leave most of the GPU idle (decoding: one query row each): about two
// blocks per SM, at least 4 tiles (256 keys) per split; 0 = no split.
int64_t split_tiles_for(int64_t B, int64_t Lq, int64_t H, int64_t Lk, int sms) {
  const int64_t blocks = H * B, tiles = (Lk + kBN - 1) / kBN;
  if (Lq > kBM || blocks >= sms || tiles < 8) return 0;
  const int64_t splits = std::min<int64_t>(std::min<int64_t>((2 * sms + blocks - 1) / blocks, tiles / 4), 65535 / B);
  return splits < 2 ? 0 : (tiles + splits - 1) / splits;
}

int multiprocessors() {
  int dev = 0, sms = 0;
  check_cuda(cudaGetDevice(&dev), "reading the current GPU");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "reading the GPU's SM count");
  return sms;
}

template <typename T, int D>
void backward_t(const BwdArgs& a, cudaStream_t stream) {
  const size_t smem = size_t(2 * kBN + 2 * kBM) * (D + kPad) * sizeof(T) + size_t(kBM) * (kBN + kPad) * sizeof(T) +
                      2 * kBM * sizeof(float);
  auto kernel = flash_backward_kernel<T, D>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
             "raising the backward kernel's shared memory limit");
  const dim3 grid(static_cast<unsigned>((a.Lk + kBN - 1) / kBN), static_cast<unsigned>(a.Hkv),
                  static_cast<unsigned>(a.B));
  kernel<<<grid, kThreads, smem, stream>>>(a);
  check_cuda(cudaGetLastError(), "launching the flash backward kernel");
}

unsigned blocks_for(int64_t threads, int per_block) {
  return static_cast<unsigned>((threads + per_block - 1) / per_block);
}

}  // namespace

void flash_forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                   const TensorView& lse, const AttentionOptions& opt, cudaStream_t stream) {
  const Checked c(q, k, v, o, lse, opt);
  FwdArgs a{bshd(q), bshd(k), bshd(v), bshd(o), lse.ptr<float>(), lse.strides[0],   lse.strides[1], lse.strides[2], c.B,
            c.Lq,    c.Lk,    c.H,     c.Hkv,   c.positions(opt), c.scale * kLog2e, opt.causal};
  const bool bf = q.dtype == DType::bf16;
  auto portable = [&](const FwdArgs& x) {
    if (c.d == 64)
      bf ? forward_t<__nv_bfloat16, 64>(x, stream) : forward_t<__half, 64>(x, stream);
    else
      bf ? forward_t<__nv_bfloat16, 128>(x, stream) : forward_t<__half, 128>(x, stream);
  };
  const bool hopper = sm90_forward_available();  // also validates RINGATTN_CUDA_FORWARD
  const int64_t split_tiles = split_tiles_for(c.B, c.Lq, c.H, c.Lk, multiprocessors());
  if (split_tiles == 0) {
    if (hopper && forward_sm90(a, bf, static_cast<int>(c.d), stream)) return;
    return portable(a);
  }
  // Split keys (flash-decoding, the portable kernel on every GPU): partials in
  // fp32, then their exact merge.
  const int64_t splits = ((c.Lk + kBN - 1) / kBN + split_tiles - 1) / split_tiles, Bs = c.B * splits;
  float *o_part = nullptr, *lse_part = nullptr;
  check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&o_part), Bs * c.Lq * c.H * c.d * sizeof(float), stream),
             "allocating the split forward's partial outputs");
  check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&lse_part), Bs * c.H * c.Lq * sizeof(float), stream),
             "allocating the split forward's partial lse");
  FwdArgs split = a;
  split.o = Bshd{o_part, c.Lq * c.H * c.d, c.H * c.d, c.d, dt_code(DType::f32)};
  split.lse = lse_part, split.lse_sb = c.H * c.Lq, split.lse_sh = c.Lq, split.lse_sl = 1;
  split.split_tiles = split_tiles;
  portable(split);
  const int64_t rows = c.B * c.H * c.Lq;
  combine_splits_kernel<<<blocks_for(rows * 32, 256), 256, 0, stream>>>(o_part, lse_part, bshd(o), lse.ptr<float>(),
                                                                        lse.strides[0], lse.strides[1], lse.strides[2],
                                                                        c.B, c.Lq, c.H, static_cast<int>(c.d), splits);
  check_cuda(cudaGetLastError(), "launching the split forward's merge");
  check_cuda(cudaFreeAsync(o_part, stream), "freeing the split forward's partials");
  check_cuda(cudaFreeAsync(lse_part, stream), "freeing the split forward's partials");
}

void flash_backward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                    const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
                    const TensorView& dv, const AttentionOptions& opt, cudaStream_t stream) {
  const Checked c(q, k, v, o, lse, opt);
  check_attention_grads(q, k, dout, dq, dk, dv);
  check(dout.dtype == q.dtype && dout.strides[3] == 1 && reinterpret_cast<uintptr_t>(dout.data) % 16 == 0 &&
            dout.strides[0] % 8 == 0 && dout.strides[1] % 8 == 0 && dout.strides[2] % 8 == 0,
        "dout must be like q (dtype, 16-byte aligned rows), got ", dtype_name(dout.dtype), " ", dout.shape_str());
  for (const TensorView* x : {&dq, &dk, &dv})
    check(x->dtype == DType::f32 || x->dtype == q.dtype, "dq, dk and dv must be fp32 or q's dtype");
  const int64_t rows = c.B * c.H * c.Lq, n = rows * c.d;
  float *delta = nullptr, *dq_acc = nullptr;
  check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&delta), rows * sizeof(float), stream),
             "allocating the backward's row sums");
  check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&dq_acc), n * sizeof(float), stream),
             "allocating the backward's dq accumulator");
  check_cuda(cudaMemsetAsync(dq_acc, 0, n * sizeof(float), stream), "zeroing the dq accumulator");
  delta_kernel<<<blocks_for(rows * 32, 256), 256, 0, stream>>>(bshd(dout), bshd(o), delta, c.B, c.Lq, c.H,
                                                               static_cast<int>(c.d));
  check_cuda(cudaGetLastError(), "launching the backward's row sums");
  BwdArgs a{bshd(q),
            bshd(k),
            bshd(v),
            bshd(dout),
            bshd(dk),
            bshd(dv),
            lse.ptr<float>(),
            lse.strides[0],
            lse.strides[1],
            lse.strides[2],
            delta,
            dq_acc,
            c.B,
            c.Lq,
            c.Lk,
            c.H,
            c.Hkv,
            c.positions(opt),
            c.scale,
            c.scale * kLog2e,
            opt.causal};
  const bool bf = q.dtype == DType::bf16;
  if (c.d == 64)
    bf ? backward_t<__nv_bfloat16, 64>(a, stream) : backward_t<__half, 64>(a, stream);
  else
    bf ? backward_t<__nv_bfloat16, 128>(a, stream) : backward_t<__half, 128>(a, stream);
  dq_store_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(dq_acc, bshd(dq), c.B, c.Lq, c.H, static_cast<int>(c.d));
  check_cuda(cudaGetLastError(), "launching the dq store");
  check_cuda(cudaFreeAsync(dq_acc, stream), "freeing the dq accumulator");
  check_cuda(cudaFreeAsync(delta, stream), "freeing the row sums");
}

void merge(const TensorView& o_acc, const TensorView& lse_acc, const TensorView& o_part, const TensorView& lse_part,
           cudaStream_t stream) {
  check_attention_merge(o_acc, lse_acc, o_part, lse_part);
  const int64_t B = o_acc.dim(0), Lq = o_acc.dim(1), H = o_acc.dim(2), d = o_acc.dim(3);
  check(o_acc.strides[3] == 1 && o_part.strides[3] == 1, "merge: o needs a contiguous last dimension");
  const int64_t rows = B * Lq * H;
  merge_kernel<<<blocks_for(rows * 32, 256), 256, 0, stream>>>(
      bshd(o_acc), lse_acc.ptr<float>(), lse_acc.strides[0], lse_acc.strides[1], lse_acc.strides[2], bshd(o_part),
      lse_part.ptr<float>(), lse_part.strides[0], lse_part.strides[1], lse_part.strides[2], B, Lq, H,
      static_cast<int>(d));
  check_cuda(cudaGetLastError(), "launching the merge kernel");
}

}  // namespace ringattn::cuda
