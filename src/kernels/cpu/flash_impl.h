// The fused attention kernels, written once over simd.h and compiled once per
// instruction set (isa_*.cpp define RA_LEVEL and RA_NS, then include this file).
// Everything here lives in namespace ringattn::cpu::RA_NS and uses no STL
// containers or algorithms (only C library functions and std::bit_cast), so no
// inline template compiled with one ISA's flags can be merged by the linker into
// another ISA's copy.
//
// Forward: flash-attention with online softmax (docs/design.md §3) over query tiles of
// kBq rows and key tiles of kBk keys; scores live in the log2 domain
// (x = s·scale·log2 e) so the softmax is exp2. K and V are packed once per
// (batch, kv head) into tile-major blocks that the micro-kernels stream.
// Backward: FlashAttention-2 with recomputation, parallel over (batch, kv head,
// key-tile chunk); dK/dV of a tile are summed over the query heads of its group.
#include <immintrin.h>
#include <omp.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/cpu/kernel_args.h"
#include "ringattn/memory.h"

namespace ringattn::cpu::RA_NS {

#include "kernels/cpu/simd.h"

constexpr int kMR = 6;                              // micro-kernel rows
constexpr int kNV = (RA_LEVEL == 1) ? 2 : 4;        // micro-kernel vectors per row
constexpr int64_t kBq = 96;                         // query tile (forward)
constexpr int64_t kBk = 64;                         // key tile
constexpr int64_t kBqB = 64;                        // query tile (backward)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_inff();

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }
// Lets the caller drive communication between tiles (thread 0 is the caller's thread).
static inline void poll(const AttnShape& s) {
  if (s.progress && omp_get_thread_num() == 0) s.progress(s.progress_ctx);
}

// Scratch memory counted by the library's peak-memory accounting.
struct Scratch {
  void* p;
  size_t n;
  explicit Scratch(size_t bytes) : p(bytes ? aligned_alloc_tracked(bytes) : nullptr), n(bytes) {
    if (p) std::memset(p, 0, n);
  }
  ~Scratch() { aligned_free_tracked(p, n); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <typename T>
  T* as() const { return static_cast<T*>(p); }
};

// ---- scalar conversions (local copies: see the file comment) -----------------
static inline float bf16_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline uint16_t f32_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
static inline float ld(const void* p, DType t, int64_t i) {
  if (t == DType::f32) return static_cast<const float*>(p)[i];
  if (t == DType::bf16) return bf16_f32(static_cast<const uint16_t*>(p)[i]);
  return ringattn::f16_to_f32(static_cast<const uint16_t*>(p)[i]);
}
static inline void st(void* p, DType t, int64_t i, float x) {
  if (t == DType::f32)
    static_cast<float*>(p)[i] = x;
  else if (t == DType::bf16)
    static_cast<uint16_t*>(p)[i] = f32_bf16(x);
  else
    static_cast<uint16_t*>(p)[i] = ringattn::f32_to_f16(x);
}
// Row (b, l, h) of a [B, L, H, d] operand as fp32 into dst[0..d), zeros to dp.
static inline void load_row(const Bshd& t, int64_t b, int64_t l, int64_t h, int64_t d, int64_t dp, float* dst) {
  const int64_t base = b * t.sb + l * t.sl + h * t.sh;
  if (t.dtype == DType::f32) {
    std::memcpy(dst, static_cast<const float*>(t.data) + base, d * sizeof(float));
  } else if (t.dtype == DType::bf16) {  // bf16 is the top half of an fp32
    const uint16_t* src = static_cast<const uint16_t*>(t.data) + base;
    for (int64_t c = 0; c < d; ++c) dst[c] = std::bit_cast<float>(static_cast<uint32_t>(src[c]) << 16);
  } else {
    for (int64_t c = 0; c < d; ++c) dst[c] = ld(t.data, t.dtype, base + c);
  }
  for (int64_t c = d; c < dp; ++c) dst[c] = 0.f;
}
static inline void store_row(const BshdOut& t, int64_t b, int64_t l, int64_t h, int64_t d, const float* src,
                             float mul) {
  const int64_t base = b * t.sb + l * t.sl + h * t.sh;
  for (int64_t c = 0; c < d; ++c) st(t.data, t.dtype, base + c, src[c] * mul);
}

// ---- fp32 micro-kernel: C[MR, NV·W] (+)= A[MR, K] · B[K, NV·W] ---------------
// A(r, k) = A[r·rsa + k·csa] (any strides: plain or transposed operands);
// B rows are ldb apart and 64-byte aligned; C rows ldc apart.
template <bool kAcc, int MR, int NV>
static inline void ukr_f32(int64_t K, const float* A, int64_t rsa, int64_t csa, const float* B, int64_t ldb,
                           float* C, int64_t ldc) {
  Vf acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = kAcc ? vload(C + r * ldc + v * kW) : vzero();
  for (int64_t k = 0; k < K; ++k) {
    Vf bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = vload(B + k * ldb + v * kW);
    const float* a = A + k * csa;
    for (int r = 0; r < MR; ++r) {
      const Vf av = vset1(a[r * rsa]);
      for (int v = 0; v < NV; ++v) acc[r][v] = vfma(av, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) vstore(C + r * ldc + v * kW, acc[r][v]);
}

template <bool kAcc, int MR>
static inline void ukr_f32_nv(int nv, int64_t K, const float* A, int64_t rsa, int64_t csa, const float* B,
                              int64_t ldb, float* C, int64_t ldc) {
  if constexpr (kNV >= 4)
    if (nv == 4) return ukr_f32<kAcc, MR, 4>(K, A, rsa, csa, B, ldb, C, ldc);
  if constexpr (kNV >= 3)
    if (nv == 3) return ukr_f32<kAcc, MR, 3>(K, A, rsa, csa, B, ldb, C, ldc);
  if (nv == 2) return ukr_f32<kAcc, MR, 2>(K, A, rsa, csa, B, ldb, C, ldc);
  ukr_f32<kAcc, MR, 1>(K, A, rsa, csa, B, ldb, C, ldc);
}

// C[M, N] (+)= A[M, K] · B[K, N]; N a multiple of kW.
template <bool kAcc>
static void gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t rsa, int64_t csa, const float* B,
                     int64_t ldb, float* C, int64_t ldc) {
  for (int64_t n0 = 0; n0 < N; n0 += kNV * kW) {
    const int nv = static_cast<int>(imin(kNV, (N - n0) / kW));
    for (int64_t m0 = 0; m0 < M; m0 += kMR) {
      const float* a = A + m0 * rsa;
      const float* b = B + n0;
      float* c = C + m0 * ldc + n0;
      switch (imin(kMR, M - m0)) {
        case 6: ukr_f32_nv<kAcc, 6>(nv, K, a, rsa, csa, b, ldb, c, ldc); break;
        case 5: ukr_f32_nv<kAcc, 5>(nv, K, a, rsa, csa, b, ldb, c, ldc); break;
        case 4: ukr_f32_nv<kAcc, 4>(nv, K, a, rsa, csa, b, ldb, c, ldc); break;
        case 3: ukr_f32_nv<kAcc, 3>(nv, K, a, rsa, csa, b, ldb, c, ldc); break;
        case 2: ukr_f32_nv<kAcc, 2>(nv, K, a, rsa, csa, b, ldb, c, ldc); break;
        default: ukr_f32_nv<kAcc, 1>(nv, K, a, rsa, csa, b, ldb, c, ldc); break;
      }
    }
  }
}

#if RA_LEVEL >= 3
// ---- bf16 micro-kernel (vdpbf16ps): C[MR, NV·16] (+)= A[MR, 2K2] · B[2K2, NV·16]
// A pairs (A(r,2k), A(r,2k+1)) as uint32 at A[r·rsa + k·csa]; B in pair-interleaved
// ("VNNI") layout: B[k][n][2] with rows of 2·N bf16, ldb in bf16 elements.
template <bool kAcc, int MR, int NV>
static inline void ukr_bf16(int64_t K2, const uint32_t* A, int64_t rsa, const uint16_t* B, int64_t ldb, float* C,
                            int64_t ldc) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = kAcc ? _mm512_load_ps(C + r * ldc + v * 16) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K2; ++k) {
    __m512bh bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_load_si512(B + k * ldb + v * 32);
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(A[r * rsa + k]));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm512_store_ps(C + r * ldc + v * 16, acc[r][v]);
}

template <bool kAcc, int MR>
static inline void ukr_bf16_nv(int nv, int64_t K2, const uint32_t* A, int64_t rsa, const uint16_t* B, int64_t ldb,
                               float* C, int64_t ldc) {
  switch (nv) {
    case 4: return ukr_bf16<kAcc, MR, 4>(K2, A, rsa, B, ldb, C, ldc);
    case 3: return ukr_bf16<kAcc, MR, 3>(K2, A, rsa, B, ldb, C, ldc);
    case 2: return ukr_bf16<kAcc, MR, 2>(K2, A, rsa, B, ldb, C, ldc);
    default: return ukr_bf16<kAcc, MR, 1>(K2, A, rsa, B, ldb, C, ldc);
  }
}

// C[M, N] (+)= A[M, 2·K2] · B; A rows of packed pairs rsa uint32 apart.
template <bool kAcc>
static void gemm_bf16(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t rsa, const uint16_t* B,
                      int64_t ldb, float* C, int64_t ldc) {
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const int nv = static_cast<int>(imin(4, (N - n0) / 16));
    for (int64_t m0 = 0; m0 < M; m0 += kMR) {
      const uint32_t* a = A + m0 * rsa;
      const uint16_t* b = B + 2 * n0;
      float* c = C + m0 * ldc + n0;
      switch (imin(kMR, M - m0)) {
        case 6: ukr_bf16_nv<kAcc, 6>(nv, K2, a, rsa, b, ldb, c, ldc); break;
        case 5: ukr_bf16_nv<kAcc, 5>(nv, K2, a, rsa, b, ldb, c, ldc); break;
        case 4: ukr_bf16_nv<kAcc, 4>(nv, K2, a, rsa, b, ldb, c, ldc); break;
        case 3: ukr_bf16_nv<kAcc, 3>(nv, K2, a, rsa, b, ldb, c, ldc); break;
        case 2: ukr_bf16_nv<kAcc, 2>(nv, K2, a, rsa, b, ldb, c, ldc); break;
        default: ukr_bf16_nv<kAcc, 1>(nv, K2, a, rsa, b, ldb, c, ldc); break;
      }
    }
  }
}
#endif


#if RA_LEVEL >= 4
// ---- AMX bf16 tiles: tdpbf16ps C[16, 16] += A[16, 32] · B[32, 16] ------------------
// Tiles 0-3 accumulate a 32×32 block of C, 4-5 hold A, 6-7 hold B (VNNI pairs).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// C[Mp, N] (+)= A[Mp, K] · B[K, N] with A bf16 rows lda elements apart, B in VNNI
// layout [K/2][N][2] (ldb elements per pair row), C fp32 rows ldc apart.
// Mp, N and K are multiples of 32.
template <bool kAcc>
static void gemm_amx(int64_t Mp, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
                     int64_t ldb, float* C, int64_t ldc) {
  for (int64_t m0 = 0; m0 < Mp; m0 += 32)
    for (int64_t n0 = 0; n0 < N; n0 += 32) {
      float* c00 = C + m0 * ldc + n0;
      float* c10 = c00 + 16 * ldc;
      if (kAcc) {
        _tile_loadd(0, c00, ldc * 4);
        _tile_loadd(1, c00 + 16, ldc * 4);
        _tile_loadd(2, c10, ldc * 4);
        _tile_loadd(3, c10 + 16, ldc * 4);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t k0 = 0; k0 < K; k0 += 32) {
        _tile_loadd(4, A + m0 * lda + k0, lda * 2);
        _tile_loadd(5, A + (m0 + 16) * lda + k0, lda * 2);
        _tile_loadd(6, B + (k0 / 2) * ldb + 2 * n0, ldb * 2);
        _tile_loadd(7, B + (k0 / 2) * ldb + 2 * (n0 + 16), ldb * 2);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c00, ldc * 4);
      _tile_stored(1, c00 + 16, ldc * 4);
      _tile_stored(2, c10, ldc * 4);
      _tile_stored(3, c10 + 16, ldc * 4);
    }
}
#endif

// ---- tile bookkeeping ---------------------------------------------------------
// Per tile of n positions: min and max global position.
static void tile_bounds(const int64_t* pos, int64_t L, int64_t tile, int64_t* lo, int64_t* hi) {
  for (int64_t t = 0; t * tile < L; ++t) {
    int64_t mn = pos[t * tile], mx = mn;
    for (int64_t i = t * tile; i < imin(L, (t + 1) * tile); ++i) {
      mn = imin(mn, pos[i]);
      mx = imax(mx, pos[i]);
    }
    lo[t] = mn;
    hi[t] = mx;
  }
}

// Orders n items by decreasing cost (counting sort; cost in [0, max_cost]) so a
// dynamic schedule starts the longest causal rows first.
static void order_by_cost(const int64_t* cost, int64_t n, int64_t max_cost, int64_t* order) {
  Scratch count_buf((max_cost + 2) * sizeof(int64_t));
  int64_t* start = count_buf.as<int64_t>();
  for (int64_t i = 0; i < n; ++i) ++start[max_cost - cost[i] + 1];
  for (int64_t c = 1; c <= max_cost + 1; ++c) start[c] += start[c - 1];
  for (int64_t i = 0; i < n; ++i) order[start[max_cost - cost[i]]++] = i;
}

// Max over one row of raw scores s[j], after setting s[j] = -inf where key j of
// the tile is padding (j >= nk) or not visible (k_pos > qp).
static inline float mask_max(float* s, int64_t n, bool masked, int64_t nk, const int64_t* kp, int64_t qp,
                             bool causal) {
  if (masked)
    for (int64_t j = 0; j < n; ++j)
      if (j >= nk || (causal && kp[j] > qp)) s[j] = kNegInf;
  Vf mx = vset1(kNegInf);
  for (int64_t j = 0; j < n; j += kW) mx = vmax(mx, vload(s + j));
  return vhmax(mx);
}

// p[j] = 2^(s[j]·c - m) in place; returns the sum. s[j]·c is rounded before m
// is subtracted (no FMA): m is the rounded row max fl(max·c), so the row's
// maximum gives exactly 2^0 and every other entry an exponent <= 0, whatever the
// scores' size (a fused s·c - m leaves the rounding error of m, up to half an
// ulp of m: 2^64 and more for scores of 1e30, which 2^x cannot represent).
static inline float exp2_row(float* s, int64_t n, float c, float m) {
  const Vf vc = vset1(c), vm = vset1(m);
  Vf sum = vzero();
  for (int64_t j = 0; j < n; j += kW) {
    Vf p = vexp2(vsub(vmul(vload(s + j), vc), vm));
    vstore(s + j, p);
    sum = vadd(sum, p);
  }
  return vhsum(sum);
}

// p[j] = e^(s[j]·scale − lse) = 2^((fl(s[j]·scale) − lse)·log2 e) in place, at
// most 1. The difference is taken in natural units, where the forward's lse is
// fl(fl(s_max·scale) + ln l): for scores too large for fp32 to hold ln l next to
// them, the row max gives exactly e^0 (lse·log2 e would not round back to the
// forward's log2-domain max).
static inline void exp_row_lse(float* s, int64_t n, float scale, float lse) {
  const Vf vs = vset1(scale), vl = vset1(lse), vlog2e = vset1(kLog2e);
  for (int64_t j = 0; j < n; j += kW) vstore(s + j, vexp2(vmul(vsub(vmul(vload(s + j), vs), vl), vlog2e)));
}

// lse of a row from its raw score max s_max (log2-domain max m = fl(s_max·c)) and
// l = Σ 2^(x − m): fl(s_max·scale) + ln l, so that the backward's exp_row_lse
// gives the row max exactly 1 at any magnitude.
static inline float row_lse(float s_max, float scale, float l) { return s_max * scale + std::log(l); }

// Prefetches n bytes at p into L2 (the next key tile while this one computes).
static inline void prefetch_l2(const void* p, int64_t n) {
  for (int64_t o = 0; o < n; o += 64) _mm_prefetch(static_cast<const char*>(p) + o, _MM_HINT_T1);
}

static inline void scale_row(float* x, int64_t n, float a) {
  const Vf va = vset1(a);
  for (int64_t j = 0; j < n; j += kW) vstore(x + j, vmul(vload(x + j), va));
}

// ---- forward ----------------------------------------------------------------------
// q: [B, Lq, H, d]  k, v: [B, Lk, Hkv, d]  ->  o: [B, Lq, H, d], lse: [B, H, Lq]
static void forward(const FwdArgs& a) {
  const AttnShape& s = a.s;
#if RA_LEVEL >= 3
  const bool use_bf16 = a.q.dtype == DType::bf16 && a.k.dtype == DType::bf16 && a.v.dtype == DType::bf16;
#else
  const bool use_bf16 = false;
#endif
  const bool use_amx = RA_LEVEL >= 4 && use_bf16;  // AMX tiles need d padded to 32
  const int64_t d = s.d, dp = round_up(d, use_amx ? 32 : kW);
  const int64_t nqt = (s.Lq + kBq - 1) / kBq, nkt = (s.Lk + kBk - 1) / kBk;
  const int64_t group = s.H / s.Hkv;
  const float c = s.scale * kLog2e;
  const size_t elt = use_bf16 ? 2 : 4;

  // Packed K (transposed per tile: [dp][kBk]) and V ([kBk][dp]) for every (b, kv head).
  const int64_t tile_elems = kBk * dp;
  Scratch kpack(static_cast<size_t>(s.B * s.Hkv * nkt * tile_elems) * elt);
  Scratch vpack(static_cast<size_t>(s.B * s.Hkv * nkt * tile_elems) * elt);
#pragma omp parallel for schedule(static) num_threads(s.threads)
  for (int64_t w = 0; w < s.B * s.Hkv * nkt; ++w) {
    const int64_t jt = w % nkt, hk = (w / nkt) % s.Hkv, b = w / (nkt * s.Hkv);
    float row[1024 + 32];  // dp <= 1024 is checked by the dispatcher
    for (int64_t jj = 0; jj < kBk; ++jj) {
      const int64_t j = jt * kBk + jj;
      if (j < s.Lk) {
        load_row(a.k, b, j, hk, d, dp, row);
      } else {
        std::memset(row, 0, dp * sizeof(float));
      }
      if (!use_bf16) {
        float* kt = kpack.as<float>() + w * tile_elems;
        for (int64_t cc = 0; cc < dp; ++cc) kt[cc * kBk + jj] = row[cc];
      } else {
        uint16_t* kt = kpack.as<uint16_t>() + w * tile_elems;  // [dp/2][kBk][2]
        for (int64_t cc = 0; cc < dp; ++cc) kt[(cc / 2) * 2 * kBk + 2 * jj + (cc & 1)] = f32_bf16(row[cc]);
      }
      if (j < s.Lk) {
        load_row(a.v, b, j, hk, d, dp, row);
      }
      if (!use_bf16) {
        std::memcpy(vpack.as<float>() + w * tile_elems + jj * dp, row, dp * sizeof(float));
      } else {
        uint16_t* vt = vpack.as<uint16_t>() + w * tile_elems;  // [kBk/2][dp][2]
        for (int64_t cc = 0; cc < dp; ++cc) vt[(jj / 2) * 2 * dp + 2 * cc + (jj & 1)] = f32_bf16(row[cc]);
      }
    }
  }

  Scratch bounds(static_cast<size_t>(2 * (nqt + nkt)) * sizeof(int64_t));
  int64_t* qlo = bounds.as<int64_t>();
  int64_t* qhi = qlo + nqt;
  int64_t* klo = qhi + nqt;
  int64_t* khi = klo + nkt;
  tile_bounds(s.q_pos, s.Lq, kBq, qlo, qhi);
  tile_bounds(s.k_pos, s.Lk, kBk, klo, khi);

  // Work items (b, h, query tile), longest first.
  const int64_t n_items = s.B * s.H * nqt;
  Scratch cost_buf(static_cast<size_t>(nqt) * sizeof(int64_t));
  Scratch order_buf(static_cast<size_t>(n_items) * sizeof(int64_t));
  Scratch item_cost(static_cast<size_t>(n_items) * sizeof(int64_t));
  for (int64_t it = 0; it < nqt; ++it) {
    int64_t n = 0;
    for (int64_t jt = 0; jt < nkt; ++jt) n += !(s.causal && klo[jt] > qhi[it]);
    cost_buf.as<int64_t>()[it] = n;
  }
  for (int64_t w = 0; w < n_items; ++w) item_cost.as<int64_t>()[w] = cost_buf.as<int64_t>()[w % nqt];
  order_by_cost(item_cost.as<int64_t>(), n_items, nkt, order_buf.as<int64_t>());
  const int64_t* order = order_buf.as<int64_t>();

#pragma omp parallel num_threads(s.threads)
  {
    Scratch qbuf(kBq * dp * sizeof(float));
    Scratch q16buf(kBq * dp * sizeof(uint16_t));
    Scratch sbuf(kBq * kBk * sizeof(float));
    Scratch pbuf(kBq * kBk * sizeof(uint16_t));
    Scratch obuf(kBq * dp * sizeof(float));
    Scratch ml(3 * kBq * sizeof(float));
    float* Q = qbuf.as<float>();
    float* S = sbuf.as<float>();
    float* O = obuf.as<float>();
    float* m = ml.as<float>();  // running max of x = s·c (log2 domain)
    float* l = m + kBq;
    float* smax = l + kBq;      // running max of the raw scores s (for the lse)
#if RA_LEVEL >= 4
    if (use_amx) amx_configure();
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < n_items; ++w) {
      poll(s);
      const int64_t item = order[w];
      const int64_t it = item % nqt, h = (item / nqt) % s.H, b = item / (nqt * s.H);
      const int64_t hk = h / group;
      const int64_t q0 = it * kBq, nq = imin(kBq, s.Lq - q0);
      const int64_t mp = use_amx ? round_up(nq, 32) : nq;  // rows the GEMMs compute
      for (int64_t r = 0; r < nq; ++r) {
        load_row(a.q, b, q0 + r, h, d, dp, Q + r * dp);
#if RA_LEVEL >= 3
        if (use_bf16) {
          uint16_t* q16 = q16buf.as<uint16_t>() + r * dp;
          for (int64_t cc = 0; cc < dp; ++cc) q16[cc] = f32_bf16(Q[r * dp + cc]);
        }
#endif
        m[r] = kNegInf;
        l[r] = 0.f;
        smax[r] = kNegInf;
      }
      std::memset(O, 0, mp * dp * sizeof(float));
      for (int64_t jt = 0; jt < nkt; ++jt) {
        if (s.causal && klo[jt] > qhi[it]) continue;  // fully masked tile: skipped
        const int64_t k0 = jt * kBk, nk = imin(kBk, s.Lk - k0);
        const bool masked = nk < kBk || (s.causal && khi[jt] > qlo[it]);
        const size_t tile_off = static_cast<size_t>(((b * s.Hkv + hk) * nkt + jt) * tile_elems);
        // S = Q · Kᵀ   [nq, kBk]
        if (!use_bf16) {
          gemm_f32<false>(nq, kBk, dp, Q, dp, 1, kpack.as<float>() + tile_off, kBk, S, kBk);
        }
#if RA_LEVEL >= 4
        else if (use_amx) {
          gemm_amx<false>(mp, kBk, dp, q16buf.as<uint16_t>(), dp, kpack.as<uint16_t>() + tile_off, 2 * kBk, S, kBk);
        }
#endif
#if RA_LEVEL >= 3
        else {
          gemm_bf16<false>(nq, kBk, dp / 2, q16buf.as<uint32_t>(), dp / 2,
                           kpack.as<uint16_t>() + tile_off, 2 * kBk, S, kBk);
        }
#endif
        // While the softmax runs, the next key tile's K and V stream into L2.
        const size_t next_off = jt + 1 < nkt ? tile_off + tile_elems : tile_off;
        const char* next_k = static_cast<const char*>(kpack.p) + next_off * elt;
        const char* next_v = static_cast<const char*>(vpack.p) + next_off * elt;
        const int64_t pf_chunk = round_up(static_cast<int64_t>(tile_elems * elt) / nq, 64);
        // Online softmax: m' = max(m, rowmax), p = 2^(x - m'), l' = 2^(m-m')·l + Σp, O *= 2^(m-m').
        for (int64_t r = 0; r < nq; ++r) {
          float* x = S + r * kBk;
          const float sx = mask_max(x, kBk, masked, nk, s.k_pos + k0, s.q_pos[q0 + r], s.causal);
          const float mx = sx * c;  // fl(sx·c) = the rounded max of x: exp2_row's m
          prefetch_l2(next_k + r * pf_chunk, pf_chunk);
          prefetch_l2(next_v + r * pf_chunk, pf_chunk);
          if (mx == kNegInf) {  // this row sees no key of this tile
            std::memset(x, 0, kBk * sizeof(float));
          } else {
            const float m_new = m[r] > mx ? m[r] : mx;
            const float alpha = m[r] == kNegInf ? 0.f : std::exp2(m[r] - m_new);
            l[r] = l[r] * alpha + exp2_row(x, kBk, c, m_new);
            if (alpha != 1.f) scale_row(O + r * dp, dp, alpha);
            m[r] = m_new;
            smax[r] = smax[r] > sx ? smax[r] : sx;
          }
#if RA_LEVEL >= 3
          if (use_bf16) {
            uint16_t* p16 = pbuf.as<uint16_t>() + r * kBk;
            for (int64_t j = 0; j < kBk; j += 32) {
              __m512bh pb = _mm512_cvtne2ps_pbh(_mm512_load_ps(x + j + 16), _mm512_load_ps(x + j));
              _mm512_store_si512(p16 + j, (__m512i)pb);
            }
          }
#endif
        }
        // O += P · V   [nq, dp]
        if (!use_bf16) {
          gemm_f32<true>(nq, dp, kBk, S, kBk, 1, vpack.as<float>() + tile_off, dp, O, dp);
        }
#if RA_LEVEL >= 4
        else if (use_amx) {
          gemm_amx<true>(mp, dp, kBk, pbuf.as<uint16_t>(), kBk, vpack.as<uint16_t>() + tile_off, 2 * dp, O, dp);
        }
#endif
#if RA_LEVEL >= 3
        else {
          gemm_bf16<true>(nq, dp, kBk / 2, pbuf.as<uint32_t>(), kBk / 2, vpack.as<uint16_t>() + tile_off, 2 * dp,
                          O, dp);
        }
#endif
      }
      // o = O / l, lse = s_max·scale + ln l; rows that saw no key: o = 0, lse = -inf.
      for (int64_t r = 0; r < nq; ++r) {
        const bool empty = l[r] == 0.f;
        store_row(a.o, b, q0 + r, h, d, O + r * dp, empty ? 0.f : 1.f / l[r]);
        a.lse.data[b * a.lse.sb + h * a.lse.sh + (q0 + r) * a.lse.sl] =
            empty ? kNegInf : row_lse(smax[r], s.scale, l[r]);
      }
    }
#if RA_LEVEL >= 4
    if (use_amx) _tile_release();
#endif
  }
}

// ---- decode -----------------------------------------------------------------------
// A few query rows against a long K/V cache (flash-decoding). The keys are split
// into chunks of kDk, run in parallel over b × chunk; a chunk reads its K/V rows of
// every kv head once, in memory order, for all R = H·Lq query rows (the rows of a
// GQA group share each row read), and leaves a partial (O, m, l) per row in the
// log2 domain. The partials are merged in chunk order, so the result does not
// depend on the thread count.
//   q: [B, Lq, H, d]   k, v: [B, Lk, Hkv, d]   ->   o: [B, Lq, H, d], lse: [B, H, Lq]
// Query row r = h·Lq + i (head h, query i) attends with kv head h / (H/Hkv).
constexpr int64_t kDk = 256;  // keys per decode chunk
static void decode(const FwdArgs& a) {
  const AttnShape& s = a.s;
  const int64_t d = s.d, dp = round_up(d, kW), G = s.H / s.Hkv, R = s.H * s.Lq, RG = G * s.Lq;
  const int64_t nch = (s.Lk + kDk - 1) / kDk;
  const float c = s.scale * kLog2e;
  // fp32 rows of exactly dp elements are read in place; others are converted into a buffer.
  const bool in_place = a.k.dtype == DType::f32 && a.v.dtype == DType::f32 && d == dp;
  // Partials of (b, chunk, row): O [dp], then m, l and the raw score max.
  Scratch part_o(static_cast<size_t>(s.B * nch * R * dp) * sizeof(float));
  Scratch part_ml(static_cast<size_t>(s.B * nch * R * 3) * sizeof(float));
#pragma omp parallel num_threads(s.threads)
  {
    Scratch qbuf(R * dp * sizeof(float)), sbuf(R * kDk * sizeof(float)), rowbuf(dp * sizeof(float));
    float* Q = qbuf.as<float>();
    float* S = sbuf.as<float>();
    auto row = [&](const Bshd& t, int64_t b, int64_t j, int64_t hk) -> const float* {
      if (in_place) return static_cast<const float*>(t.data) + b * t.sb + j * t.sl + hk * t.sh;
      load_row(t, b, j, hk, d, dp, rowbuf.as<float>());
      return rowbuf.as<float>();
    };
#pragma omp for schedule(static)
    for (int64_t w = 0; w < s.B * nch; ++w) {
      poll(s);
      const int64_t ch = w % nch, b = w / nch;
      const int64_t j0 = ch * kDk, nk = imin(kDk, s.Lk - j0);
      for (int64_t r = 0; r < R; ++r) load_row(a.q, b, r % s.Lq, r / s.Lq, d, dp, Q + r * dp);
      // S = Q Kᵀ (raw scores), -inf where masked or past the last key.
      for (int64_t r = 0; r < R; ++r)
        for (int64_t jj = nk; jj < kDk; ++jj) S[r * kDk + jj] = kNegInf;
      for (int64_t jj = 0; jj < nk; ++jj) {
        const int64_t j = j0 + jj;
        for (int64_t hk = 0; hk < s.Hkv; ++hk) {
          const float* kr = row(a.k, b, j, hk);
          for (int64_t r = hk * RG; r < (hk + 1) * RG; ++r) {
            Vf acc = vzero();
            for (int64_t cc = 0; cc < dp; cc += kW) acc = vfma(vload(Q + r * dp + cc), vloadu(kr + cc), acc);
            const bool visible = !s.causal || s.k_pos[j] <= s.q_pos[r % s.Lq];
            S[r * kDk + jj] = visible ? vhsum(acc) : kNegInf;
          }
        }
      }
      // P = 2^(S·c − m) (exactly 0 where masked), l = Σ P, O = P · V.
      float* O = part_o.as<float>() + w * R * dp;
      float* ml = part_ml.as<float>() + w * R * 3;
      for (int64_t r = 0; r < R; ++r) {
        float* x = S + r * kDk;
        Vf mx = vset1(kNegInf);
        for (int64_t jj = 0; jj < kDk; jj += kW) mx = vmax(mx, vload(x + jj));
        const float smax = vhmax(mx), m = smax * c;
        ml[3 * r] = m;
        ml[3 * r + 1] = m == kNegInf ? 0.f : exp2_row(x, kDk, c, m);  // vexp2(−inf) is exactly 0
        ml[3 * r + 2] = smax;
        if (m == kNegInf) std::memset(x, 0, kDk * sizeof(float));
      }
      for (int64_t jj = 0; jj < nk; ++jj) {
        for (int64_t hk = 0; hk < s.Hkv; ++hk) {
          const float* vr = row(a.v, b, j0 + jj, hk);
          for (int64_t r = hk * RG; r < (hk + 1) * RG; ++r) {
            const Vf p = vset1(S[r * kDk + jj]);
            for (int64_t cc = 0; cc < dp; cc += kW)
              vstore(O + r * dp + cc, vfma(p, vloadu(vr + cc), vload(O + r * dp + cc)));
          }
        }
      }
    }
  }
  // Merge the chunks: M = max m_c, l = Σ l_c·2^(m_c − M), o = Σ O_c·2^(m_c − M) / l,
  // lse = s_max·scale + ln l (s_max: the largest raw score of all chunks).
#pragma omp parallel for schedule(static) num_threads(s.threads)
  for (int64_t br = 0; br < s.B * R; ++br) {
    const int64_t r = br % R, b = br / R, i = r % s.Lq, h = r / s.Lq;
    const float* ml = part_ml.as<float>();
    const float* po = part_o.as<float>();
    float M = kNegInf, smax = kNegInf;
    for (int64_t ch = 0; ch < nch; ++ch) {
      M = std::fmax(M, ml[((b * nch + ch) * R + r) * 3]);
      smax = std::fmax(smax, ml[((b * nch + ch) * R + r) * 3 + 2]);
    }
    float acc[1024 + 32] = {};
    float l = 0;
    for (int64_t ch = 0; ch < nch && M != kNegInf; ++ch) {
      const int64_t part = (b * nch + ch) * R + r;
      if (ml[3 * part + 1] == 0.f) continue;
      const float alpha = std::exp2(ml[3 * part] - M);
      l += alpha * ml[3 * part + 1];
      for (int64_t cc = 0; cc < d; ++cc) acc[cc] += alpha * po[part * dp + cc];
    }
    const bool empty = l == 0.f;
    store_row(a.o, b, i, h, d, acc, empty ? 0.f : 1.f / l);
    a.lse.data[b * a.lse.sb + h * a.lse.sh + i * a.lse.sl] = empty ? kNegInf : row_lse(smax, s.scale, l);
  }
}

// ---- backward ---------------------------------------------------------------------
// Given q, k, v, o, lse, dO: D = rowsum(dO∘O); per (key tile j, query tile i):
//   P = e^(s·scale − lse), dV_j += Pᵀ dO_i, dP = dO_i V_jᵀ, dS = scale·P∘(dP − D),
//   dQ_i += dS K_j, dK_j += dSᵀ Q_i.
static void backward(const BwdArgs& a) {
  const AttnShape& s = a.s;
  const int64_t d = s.d, dp = round_up(d, kW);
  const int64_t nqt = (s.Lq + kBqB - 1) / kBqB, nkt = (s.Lk + kBk - 1) / kBk;
  const int64_t group = s.H / s.Hkv;
  const int64_t BH = s.B * s.H;

  // Q, dO as [B, H, Lq, dp] fp32; D and lse as [B, H, Lq].
  Scratch qp(static_cast<size_t>(BH * s.Lq * dp) * 4), dop(static_cast<size_t>(BH * s.Lq * dp) * 4);
  Scratch dvec(static_cast<size_t>(BH * s.Lq) * 4), lsev(static_cast<size_t>(BH * s.Lq) * 4);
#pragma omp parallel for schedule(static) num_threads(s.threads)
  for (int64_t w = 0; w < BH * s.Lq; ++w) {
    const int64_t i = w % s.Lq, h = (w / s.Lq) % s.H, b = w / (s.Lq * s.H);
    float orow[1024 + 32];
    float* qrow = qp.as<float>() + w * dp;
    float* dorow = dop.as<float>() + w * dp;
    load_row(a.q, b, i, h, d, dp, qrow);
    load_row(a.dout, b, i, h, d, dp, dorow);
    load_row(a.o, b, i, h, d, dp, orow);
    float D = 0.f;
    for (int64_t cc = 0; cc < d; ++cc) D += dorow[cc] * orow[cc];
    dvec.as<float>()[w] = D;
    lsev.as<float>()[w] = a.lse.data[b * a.lse.sb + h * a.lse.sh + i * a.lse.sl];
  }
  // K transposed per tile [dp][kBk], K rows [kBk][dp], V transposed [dp][kBk].
  const int64_t tile_elems = kBk * dp;
  const size_t kv_bytes = static_cast<size_t>(s.B * s.Hkv * nkt * tile_elems) * 4;
  Scratch ktp(kv_bytes), krp(kv_bytes), vtp(kv_bytes);
#pragma omp parallel for schedule(static) num_threads(s.threads)
  for (int64_t w = 0; w < s.B * s.Hkv * nkt; ++w) {
    const int64_t jt = w % nkt, hk = (w / nkt) % s.Hkv, b = w / (nkt * s.Hkv);
    float* kt = ktp.as<float>() + w * tile_elems;
    float* kr = krp.as<float>() + w * tile_elems;
    float* vt = vtp.as<float>() + w * tile_elems;
    float row[1024 + 32];
    for (int64_t jj = 0; jj < imin(kBk, s.Lk - jt * kBk); ++jj) {
      load_row(a.k, b, jt * kBk + jj, hk, d, dp, kr + jj * dp);
      for (int64_t cc = 0; cc < dp; ++cc) kt[cc * kBk + jj] = kr[jj * dp + cc];
      load_row(a.v, b, jt * kBk + jj, hk, d, dp, row);
      for (int64_t cc = 0; cc < dp; ++cc) vt[cc * kBk + jj] = row[cc];
    }
  }

  Scratch bounds(static_cast<size_t>(2 * (nqt + nkt)) * sizeof(int64_t));
  int64_t* qlo = bounds.as<int64_t>();
  int64_t* qhi = qlo + nqt;
  int64_t* klo = qhi + nqt;
  int64_t* khi = klo + nkt;
  tile_bounds(s.q_pos, s.Lq, kBqB, qlo, qhi);
  tile_bounds(s.k_pos, s.Lk, kBk, klo, khi);

  // Key tiles are dealt round-robin to `chunks` chunks per (b, kv head) so that
  // small B·Hkv still feeds every thread; each chunk owns a dQ partial, summed in
  // a fixed order afterwards (results do not depend on the schedule).
  const int64_t want = s.threads > 1 ? (4 * s.threads + s.B * s.Hkv - 1) / (s.B * s.Hkv) : 1;
  const int64_t chunks = imax(1, imin(nkt, s.B * s.Hkv >= 2 * s.threads ? 1 : want));
  Scratch dqp(static_cast<size_t>(chunks * BH * s.Lq * dp) * 4);
  const int64_t n_items = s.B * s.Hkv * chunks;

#pragma omp parallel num_threads(s.threads)
  {
    Scratch pbuf(kBqB * kBk * 4), dsbuf(kBqB * kBk * 4), dkbuf(kBk * dp * 4), dvbuf(kBk * dp * 4);
    float* P = pbuf.as<float>();
    float* dS = dsbuf.as<float>();
    float* dK = dkbuf.as<float>();
    float* dV = dvbuf.as<float>();
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < n_items; ++w) {
      const int64_t ch = w % chunks, hk = (w / chunks) % s.Hkv, b = w / (chunks * s.Hkv);
      for (int64_t jt = ch; jt < nkt; jt += chunks) {
        poll(s);
        const int64_t k0 = jt * kBk, nk = imin(kBk, s.Lk - k0);
        const size_t tile_off = static_cast<size_t>(((b * s.Hkv + hk) * nkt + jt) * tile_elems);
        const float* Kt = ktp.as<float>() + tile_off;
        const float* Kr = krp.as<float>() + tile_off;
        const float* Vt = vtp.as<float>() + tile_off;
        std::memset(dK, 0, kBk * dp * 4);
        std::memset(dV, 0, kBk * dp * 4);
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          const int64_t bh = b * s.H + h;
          for (int64_t it = 0; it < nqt; ++it) {
            if (s.causal && klo[jt] > qhi[it]) continue;
            const int64_t q0 = it * kBqB, nq = imin(kBqB, s.Lq - q0);
            const bool masked = nk < kBk || (s.causal && khi[jt] > qlo[it]);
            const float* Qi = qp.as<float>() + (bh * s.Lq + q0) * dp;
            const float* dOi = dop.as<float>() + (bh * s.Lq + q0) * dp;
            const float* Di = dvec.as<float>() + bh * s.Lq + q0;
            const float* L = lsev.as<float>() + bh * s.Lq + q0;
            float* dQi = dqp.as<float>() + ((ch * BH + bh) * s.Lq + q0) * dp;
            // P = e^(s·scale − lse)   [nq, kBk]
            gemm_f32<false>(nq, kBk, dp, Qi, dp, 1, Kt, kBk, P, kBk);
            for (int64_t r = 0; r < nq; ++r) {
              float* x = P + r * kBk;
              mask_max(x, kBk, masked, nk, s.k_pos + k0, s.q_pos[q0 + r], s.causal);
              if (L[r] == kNegInf) {
                std::memset(x, 0, kBk * 4);
              } else {
                exp_row_lse(x, kBk, s.scale, L[r]);
              }
            }
            // dV += Pᵀ · dO   [kBk, dp]
            gemm_f32<true>(kBk, dp, nq, P, 1, kBk, dOi, dp, dV, dp);
            // dP = dO · Vᵀ   [nq, kBk];  dS = scale · P ∘ (dP − D)
            gemm_f32<false>(nq, kBk, dp, dOi, dp, 1, Vt, kBk, dS, kBk);
            for (int64_t r = 0; r < nq; ++r) {
              const Vf vD = vset1(Di[r]), vs = vset1(s.scale);
              for (int64_t j = 0; j < kBk; j += kW) {
                Vf ds = vmul(vmul(vload(P + r * kBk + j), vsub(vload(dS + r * kBk + j), vD)), vs);
                vstore(dS + r * kBk + j, ds);
              }
            }
            // dQ += dS · K   [nq, dp];  dK += dSᵀ · Q   [kBk, dp]
            gemm_f32<true>(nq, dp, kBk, dS, kBk, 1, Kr, dp, dQi, dp);
            gemm_f32<true>(kBk, dp, nq, dS, 1, kBk, Qi, dp, dK, dp);
          }
        }
        for (int64_t jj = 0; jj < nk; ++jj) {
          store_row(a.dk, b, k0 + jj, hk, d, dK + jj * dp, 1.f);
          store_row(a.dv, b, k0 + jj, hk, d, dV + jj * dp, 1.f);
        }
      }
    }
  }
  // dQ = Σ_chunks dQ partials, in chunk order.
#pragma omp parallel for schedule(static) num_threads(s.threads)
  for (int64_t w = 0; w < BH * s.Lq; ++w) {
    const int64_t i = w % s.Lq, h = (w / s.Lq) % s.H, b = w / (s.Lq * s.H);
    float* acc = dqp.as<float>() + w * dp;
    for (int64_t ch = 1; ch < chunks; ++ch) {
      const float* part = dqp.as<float>() + (ch * BH * s.Lq + w) * dp;
      for (int64_t cc = 0; cc < d; ++cc) acc[cc] += part[cc];
    }
    store_row(a.dq, b, i, h, d, acc, 1.f);
  }
}

// ---- machine peak -------------------------------------------------------------------
// A register-resident loop of independent FMAs (or bf16 dot products): GFLOP/s of
// the calling thread.
static double fma_peak(bool bf16, double seconds) {
  constexpr int kAcc = 16;
  const int64_t kIters = 1 << 16;
  double flops = 0, t0 = omp_get_wtime(), t = t0;
  float sink = 0;
#if RA_LEVEL >= 4
  if (bf16) {  // tdpbf16ps on four independent accumulator tiles
    amx_configure();
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    while (t - t0 < seconds) {
      for (int64_t n = 0; n < kIters / 16; ++n) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      flops += 4.0 * (kIters / 16) * 16 * 16 * 32 * 2;
      t = omp_get_wtime();
    }
    _tile_release();
    return flops / (t - t0) * 1e-9;
  }
#endif
  while (t - t0 < seconds) {
#if RA_LEVEL >= 3
    if (bf16) {
      __m512 acc[kAcc];
      for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));
      const __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80), y = (__m512bh)_mm512_set1_epi32(0x00010001);
      for (int64_t n = 0; n < kIters; ++n)
        for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], x, y);
      for (int i = 0; i < kAcc; ++i) sink += _mm512_reduce_add_ps(acc[i]);
      flops += 4.0 * kW * kAcc * kIters;
      t = omp_get_wtime();
      continue;
    }
#endif
    Vf acc[kAcc];
    for (int i = 0; i < kAcc; ++i) acc[i] = vset1(static_cast<float>(i));
    const Vf x = vset1(0.999999f), y = vset1(1e-7f);
    for (int64_t n = 0; n < kIters; ++n)
      for (int i = 0; i < kAcc; ++i) acc[i] = vfma(acc[i], x, y);
    for (int i = 0; i < kAcc; ++i) sink += vhsum(acc[i]);
    flops += 2.0 * kW * kAcc * kIters;
    t = omp_get_wtime();
  }
  volatile float keep = sink;
  (void)keep;
  return flops / (t - t0) * 1e-9;
}

}  // namespace ringattn::cpu::RA_NS
