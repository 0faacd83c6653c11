// Times ringattn::gemm (the decode step's dispatch: the vector GEMV for few rows,
// else oneDNN) on the five weight shapes of docs/results/lm-2026-12-02/bench_config.json
// (q/k/v, o, gate+up, down; the LM head transposed), four copies of each so they
// stream from memory, for M = 1..12 rows of x, fp32 and bf16 weights, best of 5.
// Build and run: run.sh.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>
#include "ringattn/cpu/gemm.h"
#include "ringattn/dtype.h"
using namespace ringattn;
int main() {
  struct S {
    int64_t K, N;
    bool tb;
  };
  std::vector<S> shapes = {
      {1024, 1536, false}, {1024, 1024, false}, {1024, 5632, false}, {2816, 1024, false}, {1024, 32000, true}};
  for (DType dt : {DType::f32, DType::bf16}) {
    const size_t es = dt == DType::f32 ? 4 : 2;
    std::vector<std::vector<char>> W;
    for (auto& s : shapes)
      for (int c = 0; c < 4; ++c) {
        W.emplace_back(s.K * s.N * es);
        std::memset(W.back().data(), 0x3c, W.back().size());
      }
    std::vector<char> A(16 * 4096 * es);
    std::memset(A.data(), 0x3c, A.size());
    std::vector<float> C(16 * 32000);
    for (int M = 1; M <= 12; ++M) {
      double best = 1e9;
      for (int rep = 0; rep < 5; ++rep) {
        auto t0 = std::chrono::steady_clock::now();
        for (int c = 0; c < 4; ++c)
          for (size_t i = 0; i < shapes.size(); ++i) {
            const S& s = shapes[i];
            const void* B = W[i * 4 + c].data();
            gemm(false, s.tb, M, s.N, s.K, 1.f, A.data(), s.K, B, s.tb ? s.K : s.N, 0.f, C.data(), s.N, dt);
          }
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 4);
      }
      double bytes = 0;
      for (auto& s : shapes) bytes += s.K * s.N * es;
      printf("%s M=%2d  %.3f ms  %.1f GB/s\n", dt == DType::f32 ? "fp32" : "bf16", M, best * 1e3, bytes / best / 1e9);
    }
  }
}
