// Measured machine peaks: the FMA loop of the chosen kernel path and oneDNN's
// square-GEMM rate, so benchmarks report ratios measured in the same run.
#include <omp.h>

#include <algorithm>

#include "kernels/cpu/kernel_args.h"
#include "ringattn/cpu/gemm.h"
#include "ringattn/error.h"
#include "ringattn/perf.h"
#include "ringattn/tensor.h"

namespace ringattn {

double measure_fma_peak_gflops(DType dtype, Isa isa, double seconds) {
  const cpu::KernelTable& t = cpu::kernels_for(isa);
  t.fma_peak(dtype == DType::bf16, 0.02);  // warm up (clock ramp, AVX-512 licence)
  return t.fma_peak(dtype == DType::bf16, seconds);
}

double measure_read_bandwidth_gbs(int threads, size_t bytes, double seconds) {
  check(threads >= 1, "threads must be >= 1, got ", threads);
  const int64_t n = static_cast<int64_t>(bytes / sizeof(float));
  Tensor buf(DType::f32, {n});
  float* x = buf.ptr<float>();
#pragma omp parallel for simd schedule(static) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) x[i] = 1.f;  // first touch by the reading threads
  double best = 1e30, total = 0;
  volatile float sink = 0;
  while (total < seconds || best == 1e30) {
    const double t0 = now_seconds();
    float sum = 0;
#pragma omp parallel for simd schedule(static) num_threads(threads) reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += x[i];
    const double dt = now_seconds() - t0;
    sink = sink + sum;
    best = std::min(best, dt);
    total += dt;
  }
  return static_cast<double>(n) * sizeof(float) / best * 1e-9;
}

double measure_gemm_gflops(DType dtype, int64_t n, int threads, double seconds) {
  check(dtype == DType::f32 || dtype == DType::bf16, "GEMM rate is measured for fp32 and bf16 only");
  Tensor a(dtype, {n, n}), b(dtype, {n, n});
  Tensor c(DType::f32, {n, n});
  for (int64_t i = 0; i < n * n; ++i) {
    store_from_f32(a.ptr<void>(), dtype, i, static_cast<float>((i * 7) % 13) * 0.01f);
    store_from_f32(b.ptr<void>(), dtype, i, static_cast<float>((i * 5) % 11) * 0.01f);
  }
  const int saved = omp_get_max_threads();
  if (threads > 0) omp_set_num_threads(threads);
  gemm(false, false, n, n, n, 1.f, a.ptr<void>(), n, b.ptr<void>(), n, 0.f, c.ptr<float>(), n, dtype);  // warm up
  double best = 1e30, total = 0;
  while (total < seconds) {
    const double t0 = now_seconds();
    gemm(false, false, n, n, n, 1.f, a.ptr<void>(), n, b.ptr<void>(), n, 0.f, c.ptr<float>(), n, dtype);
    const double dt = now_seconds() - t0;
    best = std::min(best, dt);
    total += dt;
  }
  omp_set_num_threads(saved);
  return 2.0 * static_cast<double>(n) * n * n / best * 1e-9;
}

}  // namespace ringattn
