// `ringattn plan --calibrate`: a Hardware description of this machine from
// measurements of the operations the performance model charges for.
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <random>
#include <thread>

#include "ringattn/attention.h"
#include "ringattn/comm.h"
#include "ringattn/cpu.h"
#include "ringattn/error.h"
#include "ringattn/layers.h"
#include "ringattn/perf.h"
#include "ringattn/plan.h"
#include "ringattn/tensor.h"

namespace ringattn {

namespace {

// Best of `reps` runs after one warm-up.
template <typename F>
double best_of(int reps, F&& f) {
  f();
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const double t0 = now_seconds();
    f();
    best = std::min(best, now_seconds() - t0);
  }
  return best;
}

Tensor random_tensor(DType dt, std::initializer_list<int64_t> shape, std::mt19937_64& rng) {
  Tensor t(dt, shape);
  std::normal_distribution<float> dist(0.f, 1.f);
  for (int64_t i = 0; i < t.numel(); ++i) store_from_f32(t.ptr<void>(), dt, i, dist(rng));
  return t;
}

}  // namespace

std::pair<double, double> measure_pingpong(Communicator& comm) {
  check(comm.size() >= 2, "the ping-pong needs 2 ranks, got ", comm.size());
  const int r = comm.rank();
  auto round_trip = [&](size_t bytes, int reps) {
    std::vector<char> buf(bytes);
    double best = 1e30;
    for (int i = 0; i <= reps; ++i) {
      comm.barrier();
      const double t0 = now_seconds();
      if (r == 0) {
        Request s = comm.isend(buf.data(), bytes, 1, i);
        comm.wait(s);
        Request q = comm.irecv(buf.data(), bytes, 1, i);
        comm.wait(q);
      } else if (r == 1) {
        Request q = comm.irecv(buf.data(), bytes, 0, i);
        comm.wait(q);
        Request s = comm.isend(buf.data(), bytes, 0, i);
        comm.wait(s);
      }
      if (i > 0) best = std::min(best, now_seconds() - t0);
    }
    double b = best;
    comm.all_reduce(&b, 1, ReduceOp::max);
    return b;
  };
  const double alpha = round_trip(8, 200) / 2;
  const size_t big = size_t{64} << 20;
  const double t = round_trip(big, 5) / 2;
  return {alpha, static_cast<double>(big) / std::max(t - alpha, 1e-9)};
}

Hardware calibrate_this_machine(int threads, double latency_s, double bandwidth,
                                const std::function<void(const std::string&)>& progress) {
  check(threads >= 1, "threads must be >= 1");
  omp_set_num_threads(threads);
  const unsigned cpus = std::max(1u, std::thread::hardware_concurrency());
  Hardware h;
  const CpuFeatures& f = cpu_features();
  h.name = "this-machine";
  h.description = cat(f.model.empty() ? f.vendor : f.model, ", ", cpus, " CPUs; one rank per ", threads,
                      " thread(s), shared-memory MPI (measured by ringattn plan --calibrate)");
  h.devices_per_node = static_cast<int>(std::max(1u, cpus / static_cast<unsigned>(threads)));
  h.memory_bytes = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGE_SIZE)) /
                   h.devices_per_node;
  h.sources["memory_bytes"] = "physical memory / devices_per_node";
  h.sources["devices_per_node"] = cat(cpus, " CPUs / ", threads, " thread(s) per rank");
  std::mt19937_64 rng(7);

  progress("peaks (FMA loops) and read bandwidth");
  h.peak["fp32"] = measure_fma_peak_gflops(DType::f32, default_isa()) * 1e9 * threads;
  h.peak["bf16"] = measure_fma_peak_gflops(DType::bf16, default_isa()) * 1e9 * threads;
  h.memory_bandwidth = measure_read_bandwidth_gbs(threads) * 1e9;
  h.sources["peak"] = cat("register-resident FMA loops (", isa_name(default_isa()), ") x ", threads, " thread(s)");
  h.sources["memory_bandwidth"] = "streaming read of 512 MiB";

  // The linear layers as the model runs them (linear_forward / linear_backward:
  // bias, bf16 operand rounding, fresh outputs): [M, n] x [n, n] with many rows.
  const int64_t M = 8192;
  for (DType dt : {DType::f32, DType::bf16}) {
    for (int64_t n : {64, 128, 256, 512, 1024, 2048}) {
      progress(cat("linear ", dtype_name(dt), " ", M, " x ", n, " x ", n));
      Tensor x = random_tensor(DType::f32, {M, n}, rng), dy = random_tensor(DType::f32, {M, n}, rng);
      Tensor w = random_tensor(dt, {n, n}, rng), b = random_tensor(DType::f32, {n}, rng);
      Tensor dw(DType::f32, {n, n}), db(DType::f32, {n});
      const double tf = best_of(3, [&] {
        Tensor y(DType::f32, {M, n});
        linear_forward(M, n, n, x.ptr<float>(), w.ptr<void>(), b.ptr<float>(), y.ptr<float>(), dt);
      });
      const double tb = best_of(2, [&] {
        Tensor dx(DType::f32, {M, n});
        linear_backward(M, n, n, x.ptr<float>(), w.ptr<void>(), dy.ptr<float>(), dx.ptr<float>(), dw.ptr<float>(),
                        db.ptr<float>(), dt);
      });
      h.gemm[dtype_name(dt)].push_back({static_cast<double>(n), 2.0 * M * n * n / tf});
      h.gemm_backward[dtype_name(dt)].push_back({static_cast<double>(n), 4.0 * M * n * n / tb});
    }
  }
  h.sources["gemm"] = cat("linear_forward (oneDNN matmul + bias) [8192, n] x [n, n] into fresh outputs, best of 3, ",
                          threads, " thread(s)");
  h.sources["gemm_backward"] = cat("linear_backward (dx, dW GEMMs + bias gradient) [8192, n] x [n, n], best of 2, ",
                                   threads, " thread(s)");

  // The fused attention kernels, non-causal, B = 1, H = 4, L = 2048.
  const int64_t L = 2048, H = 4;
  for (DType dt : {DType::f32, DType::bf16}) {
    for (int64_t d : {64, 128}) {
      progress(cat("attention ", dtype_name(dt), " d=", d));
      Tensor q = random_tensor(dt, {1, L, H, d}, rng), k = random_tensor(dt, {1, L, H, d}, rng),
             v = random_tensor(dt, {1, L, H, d}, rng), dout = random_tensor(DType::f32, {1, L, H, d}, rng);
      Tensor o(DType::f32, {1, L, H, d}), lse(DType::f32, {1, H, L});
      Tensor dq(DType::f32, {1, L, H, d}), dk(DType::f32, {1, L, H, d}), dv(DType::f32, {1, L, H, d});
      AttentionOptions opt;
      opt.threads = threads;
      const double flops = 4.0 * H * L * L * d;
      const double tf = best_of(3, [&] { attention_forward(q, k, v, o, lse, opt); });
      const double tb = best_of(2, [&] { attention_backward(q, k, v, o, lse, dout, dq, dk, dv, opt); });
      h.attention_forward[dtype_name(dt)].push_back({static_cast<double>(d), flops / tf});
      h.attention_backward[dtype_name(dt)].push_back({static_cast<double>(d), 2.5 * flops / tb});
    }
  }
  {  // causal: the rate on the visible pairs (fp32, d = 64) against the non-causal one
    const int64_t d = 64;
    Tensor q = random_tensor(DType::f32, {1, L, H, d}, rng), k = random_tensor(DType::f32, {1, L, H, d}, rng),
           v = random_tensor(DType::f32, {1, L, H, d}, rng);
    Tensor o(DType::f32, {1, L, H, d}), lse(DType::f32, {1, H, L});
    AttentionOptions opt;
    opt.threads = threads, opt.causal = true;
    const double t = best_of(3, [&] { attention_forward(q, k, v, o, lse, opt); });
    const double rate = 4.0 * H * (L * (L + 1) / 2) * d / t;
    h.causal_efficiency = rate / h.attention_forward["fp32"].front().second;
    h.sources["causal_efficiency"] = "causal fp32 forward, L=2048, d=64, FLOPs of the visible pairs, / non-causal rate";
  }
  h.sources["attention"] = cat("ringattn's fused kernels (", isa_name(default_isa()),
                               "), non-causal, B=1, H=4, L=2048, d=64 and 128");

  // Token-local kernels on fresh buffers, as the model allocates them, on every
  // core at once (each rank gets its share of the memory system).
  {
    progress("elementwise (LayerNorm, adds) and GELU");
    omp_set_num_threads(static_cast<int>(cpus));
    const int64_t N = 16384, D = 256, F = 1024;
    Tensor x = random_tensor(DType::f32, {N, D}, rng), dy = random_tensor(DType::f32, {N, D}, rng);
    Tensor g(DType::f32, {D}), b(DType::f32, {D}), dg(DType::f32, {D}), db(DType::f32, {D});
    std::fill_n(g.ptr<float>(), D, 1.f);
    std::fill_n(b.ptr<float>(), D, 0.f);
    // LayerNorm forward (8 B per element) + backward (16 B) + one add (12 B)
    const double t = best_of(3, [&] {
      Tensor y(DType::f32, {N, D}), mean(DType::f32, {N}), rstd(DType::f32, {N}), dx(DType::f32, {N, D});
      layernorm_forward(N, D, x.ptr<float>(), g.ptr<float>(), b.ptr<float>(), y.ptr<float>(), mean.ptr<float>(),
                        rstd.ptr<float>());
      layernorm_backward(N, D, x.ptr<float>(), g.ptr<float>(), mean.ptr<float>(), rstd.ptr<float>(), dy.ptr<float>(),
                         dx.ptr<float>(), dg.ptr<float>(), db.ptr<float>());
      float* d = dx.ptr<float>();
      const float* yy = y.ptr<float>();
#pragma omp parallel for simd schedule(static)
      for (int64_t i = 0; i < N * D; ++i) d[i] += yy[i];
    });
    h.elementwise_bandwidth = 36.0 * N * D / t / h.devices_per_node;
    h.sources["elementwise_bandwidth"] =
        cat("LayerNorm forward + backward and an add over fresh fp32 [16384, 256] buffers on all ", cpus,
            " CPUs (36 B per element), / devices_per_node");
    Tensor hx = random_tensor(DType::f32, {N, F}, rng), hdy = random_tensor(DType::f32, {N, F}, rng);
    const double tf = best_of(3, [&] {
      Tensor y(DType::f32, {N, F});
      gelu_forward(N * F, hx.ptr<float>(), y.ptr<float>());
    });
    const double tb = best_of(3, [&] {
      Tensor dx(DType::f32, {N, F});
      gelu_backward(N * F, hx.ptr<float>(), hdy.ptr<float>(), dx.ptr<float>());
    });
    h.gelu_forward_rate = static_cast<double>(N * F) / tf / h.devices_per_node;
    h.gelu_backward_rate = static_cast<double>(N * F) / tb / h.devices_per_node;
    h.sources["gelu_rate"] = cat("GELU forward / backward over fresh fp32 [16384, 1024] on all ", cpus,
                                 " CPUs, elements/s / devices_per_node");
  }
  // The decode kernel on every core at once over a cache far beyond the
  // last-level cache (one query row, 4 heads x 64, fp32).
  {
    progress("decode against a 262144-token cache");
    omp_set_num_threads(static_cast<int>(cpus));
    const int64_t Lc = 262144, d = 64;
    Tensor q = random_tensor(DType::f32, {1, 1, H, d}, rng), k = random_tensor(DType::f32, {1, Lc, H, d}, rng),
           v = random_tensor(DType::f32, {1, Lc, H, d}, rng);
    Tensor o(DType::f32, {1, 1, H, d}), lse(DType::f32, {1, H, 1});
    AttentionOptions opt;
    opt.threads = static_cast<int>(cpus);
    const double t = best_of(5, [&] { attention_forward(q, k, v, o, lse, opt); });
    h.decode_bandwidth = 2.0 * static_cast<double>(k.bytes()) / t / h.devices_per_node;
    omp_set_num_threads(threads);
    h.sources["decode_bandwidth"] = cat("decode kernel on all ", cpus,
                                        " CPUs over an fp32 K/V cache of 262144 tokens x 4 heads x 64 (512 MiB), "
                                        "/ devices_per_node");
  }
  {
    progress("per-operation overhead");
    const int64_t n = 64;
    Tensor x = random_tensor(DType::f32, {1, n}, rng), w = random_tensor(DType::f32, {n, n}, rng);
    Tensor y(DType::f32, {1, n}), mean(DType::f32, {1}), rstd(DType::f32, {1});
    const int reps = 2000;
    const double t = best_of(3, [&] {
      for (int i = 0; i < reps; ++i) {
        linear_forward(1, n, n, x.ptr<float>(), w.ptr<void>(), nullptr, y.ptr<float>());
        layernorm_forward(1, n, y.ptr<float>(), x.ptr<float>(), x.ptr<float>(), y.ptr<float>(), mean.ptr<float>(),
                          rstd.ptr<float>());
      }
    });
    h.op_overhead_s = t / (2.0 * reps);
    h.sources["op_overhead_s"] = "a 1-row linear and a 1-row LayerNorm, averaged";
  }
  h.intra_node = {latency_s, bandwidth, false};
  h.inter_node = h.intra_node;
  h.sources["links.intra_node"] =
      "MPI ping-pong between 2 ranks of this machine (8 B and 64 MiB); shared memory: the copy is done by the ranks' "
      "own cores, so it does not overlap their compute";
  h.sources["links.inter_node"] = "no second node here: the same as intra_node";
  return h;
}

}  // namespace ringattn
