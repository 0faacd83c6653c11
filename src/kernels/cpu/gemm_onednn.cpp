// The GEMM wrapper over oneDNN matmul. Primitives are created once per
// (shape, strides, dtype, alpha, beta) and cached; execution is thread-safe.
// Up to four rows (a decode step) go to the vector GEMV of the kernel paths
// instead: it reads each weight once, near the read bandwidth, where oneDNN's
// M = 1 path ran at 0.3-0.6 of it (AMD Zen 4, 2 threads).
// oneDNN serves bf16 matmuls only where the CPU has bf16 instructions (AVX-512
// or AVX2-VNNI-2); elsewhere (AMD Zen 3: AVX2 only) bf16 operands are widened to
// fp32 (exactly: a bf16 is the top half of an fp32) and multiplied in fp32.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <dnnl.hpp>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cpu/kernel_args.h"
#include "ringattn/cpu/features.h"
#include "ringattn/cpu/gemm.h"
#include "ringattn/error.h"
#include "ringattn/tensor.h"

namespace ringattn {
namespace {

// The most rows the vector GEMV takes (a decode step of up to this many
// sequences): 4, where it streams the weights faster than oneDNN's matmul, but
// for bf16 weights on AMX 1, oneDNN's AMX kernels winning from 2 rows on
// (docs/benchmarks.md, "Decode GEMMs on AMX").
int64_t gemv_rows(DType ab_dtype) { return ab_dtype == DType::bf16 && default_isa() == Isa::amx_bf16 ? 1 : 4; }

using Key = std::tuple<bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, float, int>;

struct Engine {
  dnnl::engine eng{dnnl::engine::kind::cpu, 0};
  std::mutex mu;
  std::map<Key, std::pair<dnnl::matmul, std::string>> cache;
};

Engine& engine() {
  static Engine e;
  return e;
}

const std::pair<dnnl::matmul, std::string>& primitive(const Key& key) {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.mu);
  auto it = e.cache.find(key);
  if (it != e.cache.end()) return it->second;
  const auto [ta, tb, M, N, K, lda, ldb, ldc, alpha, beta, dt_i] = key;
  using dt = dnnl::memory::data_type;
  const dt ab = dt_i == static_cast<int>(DType::bf16) ? dt::bf16 : dt::f32;
  // Row-major op(A)[M,K]: A stored [M,K] (strides lda,1) or [K,M] (strides 1,lda).
  dnnl::memory::desc a_md({M, K}, ab, ta ? dnnl::memory::dims{1, lda} : dnnl::memory::dims{lda, 1});
  dnnl::memory::desc b_md({K, N}, ab, tb ? dnnl::memory::dims{1, ldb} : dnnl::memory::dims{ldb, 1});
  dnnl::memory::desc c_md({M, N}, dt::f32, dnnl::memory::dims{ldc, 1});
  dnnl::primitive_attr attr;
  if (alpha != 1.f) attr.set_output_scales(0, {alpha});
  if (beta != 0.f) {
    dnnl::post_ops po;
    po.append_sum(beta);
    attr.set_post_ops(po);
  }
  try {
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, c_md), attr, e.eng);
    return e.cache.emplace(key, std::make_pair(dnnl::matmul(pd), std::string(pd.impl_info_str()))).first->second;
  } catch (const dnnl::error& err) {
    throw Error(cat("oneDNN could not create a matmul for M=", M, " N=", N, " K=", K, ": ", err.what()));
  }
}

// C[M, N] = alpha · op(A)[M, K] · op(B) + beta · C for M <= gemv_rows(). Without
// trans_b the threads take consecutive rows of B (a contiguous stream each) and
// their partial sums are added in thread order; with trans_b they take rows of
// Bᵀ (dots).
void gemv(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const void* A, int64_t lda,
          const void* B, int64_t ldb, float beta, float* C, int64_t ldc, DType ab_dtype) {
  const bool bf16 = ab_dtype == DType::bf16;
  std::vector<float> x(static_cast<size_t>(M * K));  // op(A) in fp32 (exact for bf16)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) x[m * K + k] = load_as_f32(A, ab_dtype, trans_a ? k * lda + m : m * lda + k);
  const cpu::LayerTable& vec = *cpu::kernels_for(default_isa()).layers;
  const size_t esize = dtype_size(ab_dtype);
  const auto* b = static_cast<const unsigned char*>(B);
  const int64_t work = trans_b ? N : K;
  const int T = static_cast<int>(std::clamp<int64_t>(std::min<int64_t>(omp_get_max_threads(), work / 64), 1, 64));
  std::vector<float> part(static_cast<size_t>((trans_b ? 1 : T) * M * N));
#pragma omp parallel num_threads(T) if (T > 1 && K * N >= (1 << 16))
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t lo = work * t / nt, hi = work * (t + 1) / nt;
    if (trans_b)
      vec.gemv(M, K, hi - lo, x.data(), K, b + lo * ldb * esize, ldb, bf16, true, part.data() + lo, N);
    else
      vec.gemv(M, hi - lo, N, x.data() + lo, K, b + lo * ldb * esize, ldb, bf16, false, part.data() + t * M * N, N);
#pragma omp barrier
#pragma omp for collapse(2) schedule(static)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < N; ++j) {
        float sum = part[m * N + j];
        if (!trans_b)
          for (int u = 1; u < nt; ++u) sum += part[(u * M + m) * N + j];
        float& c = C[m * ldc + j];
        c = beta == 0.f ? alpha * sum : alpha * sum + beta * c;
      }
  }
}

// Whether oneDNN has a bf16 matmul on this CPU: asked once, of a small one.
bool onednn_bf16() {
  static const bool ok = [] {
    using dt = dnnl::memory::data_type;
    const dnnl::memory::desc md({16, 16}, dt::bf16, dnnl::memory::dims{16, 1});
    const dnnl::memory::desc c_md({16, 16}, dt::f32, dnnl::memory::dims{16, 1});
    try {
      dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(md, md, c_md), engine().eng);
      return true;
    } catch (const dnnl::error&) {
      return false;
    }
  }();
  return ok;
}

// X[rows, cols] bf16 with rows ld apart -> fp32, rows cols apart (counted memory).
Tensor widen_bf16(const void* X, int64_t rows, int64_t cols, int64_t ld) {
  Tensor out(DType::f32, {rows, cols});
  const auto* x = static_cast<const uint16_t*>(X);
  float* o = out.ptr<float>();
#pragma omp parallel for schedule(static) if (rows * cols >= (1 << 16))
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) o[r * cols + c] = bf16_to_f32(x[r * ld + c]);
  return out;
}

}  // namespace

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const void* A, int64_t lda,
          const void* B, int64_t ldb, float beta, float* C, int64_t ldc, DType ab_dtype) {
  check(ab_dtype == DType::f32 || ab_dtype == DType::bf16, "gemm supports fp32 and bf16 inputs, got ",
        dtype_name(ab_dtype));
  check(M > 0 && N > 0 && K > 0, "gemm needs positive sizes, got M=", M, " N=", N, " K=", K);
  if (M <= gemv_rows(ab_dtype)) return gemv(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, ab_dtype);
  if (ab_dtype == DType::bf16 && !onednn_bf16()) {  // stored A is [M, K] or [K, M], B [K, N] or [N, K]
    const Tensor a = trans_a ? widen_bf16(A, K, M, lda) : widen_bf16(A, M, K, lda);
    const Tensor b = trans_b ? widen_bf16(B, N, K, ldb) : widen_bf16(B, K, N, ldb);
    return gemm(trans_a, trans_b, M, N, K, alpha, a.ptr<float>(), trans_a ? M : K, b.ptr<float>(), trans_b ? K : N,
                beta, C, ldc, DType::f32);
  }
  const Key key{trans_a, trans_b, M, N, K, lda, ldb, ldc, alpha, beta, static_cast<int>(ab_dtype)};
  const auto& [prim, name] = primitive(key);
  Engine& e = engine();
  using dt = dnnl::memory::data_type;
  const dt ab = ab_dtype == DType::bf16 ? dt::bf16 : dt::f32;
  dnnl::memory::desc a_md({M, K}, ab, trans_a ? dnnl::memory::dims{1, lda} : dnnl::memory::dims{lda, 1});
  dnnl::memory::desc b_md({K, N}, ab, trans_b ? dnnl::memory::dims{1, ldb} : dnnl::memory::dims{ldb, 1});
  dnnl::memory::desc c_md({M, N}, dt::f32, dnnl::memory::dims{ldc, 1});
  dnnl::memory a_mem(a_md, e.eng, const_cast<void*>(A)), b_mem(b_md, e.eng, const_cast<void*>(B)),
      c_mem(c_md, e.eng, C);
  dnnl::stream strm(e.eng);
  prim.execute(strm, {{DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, b_mem}, {DNNL_ARG_DST, c_mem}});
  strm.wait();
}

std::string gemm_impl_name(int64_t n, DType ab_dtype) {
  const bool widened = ab_dtype == DType::bf16 && !onednn_bf16();
  const Key key{false, false, n, n, n, n, n, n, 1.f, 0.f, static_cast<int>(widened ? DType::f32 : ab_dtype)};
  return widened ? primitive(key).second + " (bf16 widened to fp32)" : primitive(key).second;
}

}  // namespace ringattn
