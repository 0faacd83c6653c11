// The GEMM wrapper over oneDNN matmul. Primitives are created once per
// (shape, strides, dtype, alpha, beta) and cached; execution is thread-safe.
#include <dnnl.hpp>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "ringattn/cpu/gemm.h"
#include "ringattn/error.h"

namespace ringattn {
namespace {

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

}  // namespace

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const void* A, int64_t lda,
          const void* B, int64_t ldb, float beta, float* C, int64_t ldc, DType ab_dtype) {
  check(ab_dtype == DType::f32 || ab_dtype == DType::bf16, "gemm supports fp32 and bf16 inputs, got ",
        dtype_name(ab_dtype));
  check(M > 0 && N > 0 && K > 0, "gemm needs positive sizes, got M=", M, " N=", N, " K=", K);
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

const char* gemm_impl_name(int64_t n, DType ab_dtype) {
  const Key key{false, false, n, n, n, n, n, n, 1.f, 0.f, static_cast<int>(ab_dtype)};
  return primitive(key).second.c_str();
}

}  // namespace ringattn
