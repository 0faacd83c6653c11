// The one GEMM wrapper (oneDNN matmul). Row-major:
//   C[M, N] = alpha · op(A)[M, K] · op(B)[K, N] + beta · C
// op(X) = X or Xᵀ; A and B share a dtype (fp32 or bf16); C is fp32.
#pragma once
#include <cstdint>
#include <string>

#include "ringattn/dtype.h"

namespace ringattn {

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const void* A, int64_t lda,
          const void* B, int64_t ldb, float beta, float* C, int64_t ldc, DType ab_dtype = DType::f32);

// Which oneDNN implementation serves a square GEMM of this size (e.g. "brg:avx512_core_amx";
// "... (bf16 widened to fp32)" where oneDNN has no bf16 matmul on this CPU).
std::string gemm_impl_name(int64_t n, DType ab_dtype);

}  // namespace ringattn
