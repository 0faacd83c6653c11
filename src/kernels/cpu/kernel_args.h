// Plain argument blocks handed from the dispatcher (attention.cpp) to the
// per-ISA kernels. No inline functions or STL here: the ISA translation units are
// compiled with different -m flags and must not share code the linker could merge.
#pragma once
#include <cstdint>

#include "ringattn/cpu/features.h"
#include "ringattn/dtype.h"

namespace ringattn::cpu {

// A [B, L, H, d] operand: element (b, l, h, c) is at data[b*sb + l*sl + h*sh + c].
struct Bshd {
  const void* data;
  DType dtype;
  int64_t sb, sl, sh;
};
struct BshdOut {
  void* data;
  DType dtype;
  int64_t sb, sl, sh;
};
// lse [B, H, L] fp32: element (b, h, l) at data[b*sb + h*sh + l*sl].
struct Lse {
  float* data;
  int64_t sb, sh, sl;
};

struct AttnShape {
  int64_t B, Lq, Lk, H, Hkv, d;
  float scale;
  int64_t left, right;   // the window, causal folded in (right = 0); -1: unbounded
  const int64_t* q_pos;  // [Lq] global positions (always given by the dispatcher)
  const int64_t* k_pos;  // [Lk]
  const int64_t* q_doc;  // [Lq] document ids, or null (one document)
  const int64_t* k_doc;  // [Lk], null with q_doc
  int threads;
  void (*progress)(void*);  // may be null; called by OpenMP thread 0 between tiles
  void* progress_ctx;
};

struct FwdArgs {
  AttnShape s;
  Bshd q, k, v;
  BshdOut o;
  Lse lse;
};

struct BwdArgs {
  AttnShape s;
  Bshd q, k, v, o, dout;
  Lse lse;
  BshdOut dq, dk, dv;
};

// The vector loops of the token-local layers (layers.cpp keeps the shapes, the
// checks, the threads and the order of every sum across rows). All arrays fp32,
// contiguous, any length and alignment.
struct LayerTable {
  // y = x·σ(2u), u = √(2/π)(x + 0.044715 x³) (GELU, tanh form); its derivative.
  void (*gelu)(int64_t n, const float* x, float* y);
  void (*gelu_backward)(int64_t n, const float* x, const float* dy, float* dx);
  // y = g·σ(g)·u (SwiGLU); dg, du from dy.
  void (*swiglu)(int64_t n, const float* g, const float* u, float* y);
  void (*swiglu_backward)(int64_t n, const float* g, const float* u, const float* dy, float* dg, float* du);
  // One row of LayerNorm (centered) or RMSNorm: y = (x − mean)·rstd·gamma (+ beta
  // when not null); writes mean (0 for RMSNorm) and rstd.
  void (*norm_row)(int64_t C, const float* x, const float* gamma, const float* beta, float eps, bool centered, float* y,
                   float* mean, float* rstd);
  // Its backward: dx, and dgamma_part += dy·x̂, dbeta_part += dy (when not null).
  void (*norm_row_backward)(int64_t C, const float* x, const float* gamma, float mean, float rstd, bool centered,
                            const float* dy, float* dx, float* dgamma_part, float* dbeta_part);
  // The softmax of a logit row z [V]: m = max z; Σ e^(z − m) (blocks of 256
  // fp32 terms added in double); in place z <- scale·e^(z − lse).
  float (*row_max)(int64_t V, const float* z);
  double (*exp_sum_row)(int64_t V, const float* z, float m);
  void (*exp_scale_row)(int64_t V, float* z, float lse, float scale);
  // Rotates H heads of d (rows d apart from x) by the token's cos/sin [d/2].
  void (*rope_row)(int64_t H, int64_t d, float* x, const float* cos, const float* sin);
  // y [M, n] = x [M, K] · W (W [K, n], rows ldw apart) or, dots, y[m, j] =
  // x[m, :] · W[j, :] (W [n, K]); M <= 4; x, y rows ldx, ldy apart; W fp32 or
  // bf16 (widened in registers); fp32 sums.
  void (*gemv)(int64_t M, int64_t K, int64_t n, const float* x, int64_t ldx, const void* W, int64_t ldw, bool bf16,
               bool dots, float* y, int64_t ldy);
};

struct KernelTable {
  Isa isa;
  void (*forward)(const FwdArgs&);
  void (*backward)(const BwdArgs&);
  void (*decode)(const FwdArgs&);  // the forward for a few query rows (flash-decoding)
  // GFLOP/s of a register-resident FMA (bf16=false) or bf16 dot (bf16=true) loop.
  double (*fma_peak)(bool bf16, double seconds);
  const LayerTable* layers;
};

// The table of one instruction set (checked: this CPU supports it).
const KernelTable& kernels_for(Isa isa);

const KernelTable& kernels_generic();
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();
const KernelTable& kernels_avx512bf16();
const KernelTable& kernels_amx();

}  // namespace ringattn::cpu
