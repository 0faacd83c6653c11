// The vector vocabulary the fused kernels are written in, one definition per
// instruction set. Included only from flash_impl.inc inside an ISA namespace;
// RA_LEVEL selects: 0 generic x86-64, 1 AVX2+FMA, 2 AVX-512, 3 AVX-512 + BF16.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#if RA_LEVEL >= 2
struct Vf {
  __m512 r;
};
inline constexpr int kW = 16;  // fp32 lanes
static inline Vf vzero() { return {_mm512_setzero_ps()}; }
static inline Vf vset1(float x) { return {_mm512_set1_ps(x)}; }
static inline Vf vload(const float* p) { return {_mm512_load_ps(p)}; }
static inline Vf vloadu(const float* p) { return {_mm512_loadu_ps(p)}; }
// kW bf16 at p widened to fp32 (a bf16 is the top half of an fp32).
static inline Vf vloadu(const uint16_t* p) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(u, 16))};
}
static inline void vstore(float* p, Vf a) { _mm512_store_ps(p, a.r); }
static inline void vstoreu(float* p, Vf a) { _mm512_storeu_ps(p, a.r); }
static inline Vf vfma(Vf a, Vf b, Vf c) { return {_mm512_fmadd_ps(a.r, b.r, c.r)}; }
static inline Vf vmul(Vf a, Vf b) { return {_mm512_mul_ps(a.r, b.r)}; }
static inline Vf vadd(Vf a, Vf b) { return {_mm512_add_ps(a.r, b.r)}; }
static inline Vf vsub(Vf a, Vf b) { return {_mm512_sub_ps(a.r, b.r)}; }
static inline Vf vmax(Vf a, Vf b) { return {_mm512_max_ps(a.r, b.r)}; }
static inline Vf vmin(Vf a, Vf b) { return {_mm512_min_ps(a.r, b.r)}; }
static inline Vf vdiv(Vf a, Vf b) { return {_mm512_div_ps(a.r, b.r)}; }
// a where z < 0 (or z is -0), else b.
static inline Vf vsel_neg(Vf z, Vf a, Vf b) {
  const __mmask16 neg = _mm512_movepi32_mask(_mm512_castps_si512(z.r));
  return {_mm512_mask_blend_ps(neg, b.r, a.r)};
}
static inline float vhmax(Vf a) { return _mm512_reduce_max_ps(a.r); }
static inline float vhsum(Vf a) { return _mm512_reduce_add_ps(a.r); }
static inline Vf vround(Vf a) { return {_mm512_roundscale_ps(a.r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
// p·2^n for integral n in [-127, 0] (vscalefps): n = -127 gives exactly 0, set
// by the zero mask rather than by an underflow, which Intel cores serve with a
// microcode assist (a masked tile's -inf scores made the forward 15 % slower).
static inline Vf vscale2(Vf p, Vf n) {
  return {_mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(n.r, _mm512_set1_ps(-127.f), _CMP_GT_OQ), p.r, n.r)};
}
#elif RA_LEVEL == 1
struct Vf {
  __m256 r;
};
inline constexpr int kW = 8;
static inline Vf vzero() { return {_mm256_setzero_ps()}; }
static inline Vf vset1(float x) { return {_mm256_set1_ps(x)}; }
static inline Vf vload(const float* p) { return {_mm256_load_ps(p)}; }
static inline Vf vloadu(const float* p) { return {_mm256_loadu_ps(p)}; }
static inline Vf vloadu(const uint16_t* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(u, 16))};
}
static inline void vstore(float* p, Vf a) { _mm256_store_ps(p, a.r); }
static inline void vstoreu(float* p, Vf a) { _mm256_storeu_ps(p, a.r); }
static inline Vf vfma(Vf a, Vf b, Vf c) { return {_mm256_fmadd_ps(a.r, b.r, c.r)}; }
static inline Vf vmul(Vf a, Vf b) { return {_mm256_mul_ps(a.r, b.r)}; }
static inline Vf vadd(Vf a, Vf b) { return {_mm256_add_ps(a.r, b.r)}; }
static inline Vf vsub(Vf a, Vf b) { return {_mm256_sub_ps(a.r, b.r)}; }
static inline Vf vmax(Vf a, Vf b) { return {_mm256_max_ps(a.r, b.r)}; }
static inline Vf vmin(Vf a, Vf b) { return {_mm256_min_ps(a.r, b.r)}; }
static inline Vf vdiv(Vf a, Vf b) { return {_mm256_div_ps(a.r, b.r)}; }
static inline Vf vsel_neg(Vf z, Vf a, Vf b) { return {_mm256_blendv_ps(b.r, a.r, z.r)}; }
static inline float vhmax(Vf a) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a.r), _mm256_extractf128_ps(a.r, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
static inline float vhsum(Vf a) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(a.r), _mm256_extractf128_ps(a.r, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  m = _mm_add_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
static inline Vf vround(Vf a) { return {_mm256_round_ps(a.r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
// p·2^n for integral n in [-127, 0]: n = -127 gives exactly 0 (the exponent field 0).
static inline Vf vscale2(Vf p, Vf n) {
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.r), _mm256_set1_epi32(127)), 23);
  return vmul(p, {_mm256_castsi256_ps(e)});
}
#else
// Plain x86-64: 4-lane arrays the compiler maps onto SSE2.
struct Vf {
  float r[4];
};
inline constexpr int kW = 4;
#define RA_MAP(expr)                             \
  Vf out;                                        \
  for (int i = 0; i < 4; ++i) out.r[i] = (expr); \
  return out
static inline Vf vzero() { RA_MAP(0.f); }
static inline Vf vset1(float x) { RA_MAP(x); }
static inline Vf vload(const float* p) { RA_MAP(p[i]); }
static inline Vf vloadu(const float* p) { RA_MAP(p[i]); }
static inline Vf vloadu(const uint16_t* p) {
  Vf out;
  for (int i = 0; i < 4; ++i) {
    const uint32_t u = static_cast<uint32_t>(p[i]) << 16;
    std::memcpy(&out.r[i], &u, 4);
  }
  return out;
}
static inline void vstore(float* p, Vf a) {
  for (int i = 0; i < 4; ++i) p[i] = a.r[i];
}
static inline void vstoreu(float* p, Vf a) { vstore(p, a); }
static inline Vf vfma(Vf a, Vf b, Vf c) { RA_MAP(a.r[i] * b.r[i] + c.r[i]); }
static inline Vf vmul(Vf a, Vf b) { RA_MAP(a.r[i] * b.r[i]); }
static inline Vf vadd(Vf a, Vf b) { RA_MAP(a.r[i] + b.r[i]); }
static inline Vf vsub(Vf a, Vf b) { RA_MAP(a.r[i] - b.r[i]); }
static inline Vf vmax(Vf a, Vf b) { RA_MAP(a.r[i] > b.r[i] ? a.r[i] : b.r[i]); }
static inline Vf vmin(Vf a, Vf b) { RA_MAP(a.r[i] < b.r[i] ? a.r[i] : b.r[i]); }
static inline Vf vdiv(Vf a, Vf b) { RA_MAP(a.r[i] / b.r[i]); }
// (copysign, not signbit: g++ 12 -O3 fails to compile signbit's vectorized shift on this struct)
static inline Vf vsel_neg(Vf z, Vf a, Vf b) { RA_MAP(__builtin_copysignf(1.f, z.r[i]) < 0.f ? a.r[i] : b.r[i]); }
static inline float vhmax(Vf a) {
  float m = a.r[0];
  for (int i = 1; i < 4; ++i) m = a.r[i] > m ? a.r[i] : m;
  return m;
}
static inline float vhsum(Vf a) { return (a.r[0] + a.r[1]) + (a.r[2] + a.r[3]); }
static inline Vf vround(Vf a) { RA_MAP(__builtin_nearbyintf(a.r[i])); }
// p·2^n for integral n in [-127, 0]: n = -127 gives exactly 0 (the exponent field 0).
static inline Vf vscale2(Vf p, Vf n) {
  Vf out;
  for (int i = 0; i < 4; ++i) {
    uint32_t e = static_cast<uint32_t>(static_cast<int32_t>(n.r[i]) + 127) << 23;
    std::memcpy(&out.r[i], &e, 4);
    out.r[i] *= p.r[i];
  }
  return out;
}
#undef RA_MAP
#endif

// vscale2's lowest exponent, which gives 0.
inline constexpr float kExp2Lo = -127.f;

// 2^x for x <= 0 (x = -inf gives 0): x = n + f, |f| <= 1/2, 2^f by the
// polynomial c[0] + c[1]·f + ... (Horner). x is clamped to [kExp2Lo, 0] first
// (kExp2Lo gives exactly 0), so that a rounding above 0 gives 1 and never an
// exponent field that overflows.
template <int D>
static inline Vf vexp2_poly(Vf x, const float (&c)[D]) {
  x = vmin(vmax(x, vset1(kExp2Lo)), vzero());
  const Vf n = vround(x), f = vsub(x, n);
  Vf p = vset1(c[D - 1]);
  for (int k = D - 2; k >= 0; --k) p = vfma(p, f, vset1(c[k]));
  return vscale2(p, n);
}
// 2^f by its degree-7 Taylor series in f·ln2 (ln2^k/k!; relative error < 1e-8,
// below fp32 rounding).
static inline Vf vexp2(Vf x) {
  static constexpr float c[] = {1.f,
                                6.9314718055994531e-01f,
                                2.4022650695910071e-01f,
                                5.5504108664821580e-02f,
                                9.6181291076284772e-03f,
                                1.3333558146428443e-03f,
                                1.5403530393381609e-04f,
                                1.5252733804059841e-05f};
  return vexp2_poly(x, c);
}
// 2^f to a relative error of 3e-6 (degree 4, fitted for the least maximum
// relative error on [-1/2, 1/2], 2^0 = 1 exact): for p that is rounded to bf16
// (2^-9) next, three multiply-adds fewer than vexp2.
static inline Vf vexp2_bf16(Vf x) {
  static constexpr float c[] = {1.f, 6.931241750717163e-01f, 2.4024099111557007e-01f, 5.5906426161527634e-02f,
                                9.582852944731712e-03f};
  return vexp2_poly(x, c);
}

// The logistic σ(z) = 1 / (1 + e^−z) for any z, from E = e^−|z| <= 1 (so 2^x
// only sees x <= 0): σ = 1 / (1 + E) for z >= 0 and E / (1 + E) below.
static inline Vf vsigmoid(Vf z) {
  const Vf one = vset1(1.f);
  const Vf E = vexp2(vmul(vmin(z, vsub(vzero(), z)), vset1(1.4426950408889634f)));
  return vdiv(vsel_neg(z, E, one), vadd(one, E));
}
