// Timing and measured machine peaks (docs/design.md §9: report ratios to peaks measured
// in the same run on the same core).
#pragma once
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <functional>

#include "ringattn/cpu/features.h"
#include "ringattn/dtype.h"

namespace ringattn {

inline double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// The shortest of `reps` timed runs of f, after `warmups` untimed ones.
inline double best_seconds(int reps, const std::function<void()>& f, int warmups = 0) {
  for (int i = 0; i < warmups; ++i) f();
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const double t0 = now_seconds();
    f();
    best = std::min(best, now_seconds() - t0);
  }
  return best;
}

// A register-resident FMA loop on the calling thread (fp32: vfmadd; bf16: the
// widest bf16 dot product the path has, e.g. vdpbf16ps). GFLOP/s of one core.
double measure_fma_peak_gflops(DType dtype, Isa isa, double seconds = 0.2);
// Streaming read bandwidth (GB/s) of `threads` threads summing a buffer of
// `bytes` (far larger than the caches): the peak of memory-bound kernels such as
// decoding.
double measure_read_bandwidth_gbs(int threads = 1, size_t bytes = size_t{512} << 20, double seconds = 0.3);
// oneDNN matmul rate on square n×n×n matrices on `threads` threads (0: default):
// the best call in `seconds`. On a 2-vCPU Sapphire Rapids VM the AMX GEMM ran at
// ~700 GFLOP/s with stretches of hundreds of ms at ~330 (the first ~0.2 s, and
// at random later: the core's AMX unit shared with a neighbour), so a 0.3 s
// window reported the slow rate in half the runs; 1 s gave 700-800 every time.
double measure_gemm_gflops(DType dtype, int64_t n = 1024, int threads = 1, double seconds = 1.0);

}  // namespace ringattn
