// `ringattn plan --calibrate`: a Hardware description of this machine from
// measurements of the operations the performance model charges for.
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "ringattn/comm.h"
#include "ringattn/cpu/attention.h"
#include "ringattn/cpu/features.h"
#include "ringattn/cpu/layers.h"
#include "ringattn/error.h"
#include "ringattn/layout.h"
#include "ringattn/perf.h"
#include "ringattn/plan.h"
#include "ringattn/tensor.h"

namespace ringattn {

namespace {

// Best of `reps` runs after one warm-up.
double best_of(int reps, const std::function<void()>& f) { return best_seconds(reps, f, 1); }

// Bytes of the largest cache level of CPU 0 ("size" in sysfs: "480M", "2048K"); 0 if unknown.
double last_level_cache_bytes() {
  double best = 0;
  for (int i = 0; i < 8; ++i) {
    std::ifstream f(cat("/sys/devices/system/cpu/cpu0/cache/index", i, "/size"));
    std::string v;
    if (!(f >> v) || v.empty()) continue;
    const char unit = v.back();
    const double mult = unit == 'K' ? 1024.0 : unit == 'M' ? 1048576.0 : unit == 'G' ? 1073741824.0 : 1.0;
    try {
      best = std::max(best, std::stod(v) * mult);
    } catch (...) {
    }
  }
  return best;
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

double measure_timeshare_wait(Communicator& comm) {
  // One step: a LayerNorm over [64, 256] repeated until ~0.5 ms alone.
  const int64_t N = 64, D = 256;
  std::vector<float> x(N * D, 1.f), y(N * D), g(D, 1.f), b(D, 0.f), mean(N), rstd(N);
  auto work = [&](int reps) {
    for (int i = 0; i < reps; ++i)
      layernorm_forward(N, D, x.data(), g.data(), b.data(), y.data(), mean.data(), rstd.data());
  };
  const double t0 = now_seconds();
  work(100);
  const int reps = std::max(1, static_cast<int>(0.5e-3 / ((now_seconds() - t0) / 100)));
  const int steps = 400;
  auto phase = [&](bool sync) {
    comm.barrier();
    const double start = now_seconds();
    for (int s = 0; s < steps; ++s) {
      work(reps);
      if (sync) {
        double v = 1;
        comm.all_reduce(&v, 1, ReduceOp::sum);
      }
    }
    double t = now_seconds() - start;
    comm.all_reduce(&t, 1, ReduceOp::max);
    return t;
  };
  const double alone = phase(false), synced = phase(true);
  return std::max(0.0, (synced - alone) / steps);
}

Hardware calibrate_this_machine(Communicator& comm, int threads,
                                const std::function<void(const std::string&)>& progress) {
  check(threads >= 1, "threads must be >= 1");
  check(comm.size() >= 2, "calibration runs one rank per device, at least 2 (for the ping-pong); got ", comm.size());
  omp_set_num_threads(threads);
  const unsigned cpus = std::max(1u, std::thread::hardware_concurrency());
  const int ranks = comm.size();
  // Every rank measures the same thing at the same time; the figure is the mean
  // over the ranks: a device's rate while all devices are busy, as in a run.
  auto together = [&](const std::string& what) {
    if (comm.rank() == 0) progress(what);
    comm.barrier();
  };
  auto mean_of_ranks = [&](double x) {
    comm.all_reduce(&x, 1, ReduceOp::sum);
    return x / ranks;
  };
  Hardware h;
  const CpuFeatures& f = cpu_features();
  h.name = "this-machine";
  h.measured_cpu = this_cpu();
  h.description = cat(f.model.empty() ? f.vendor : f.model, ", ", cpus, " CPUs; one rank per ", threads,
                      " thread(s), shared-memory MPI (measured by ringattn plan --calibrate)");
  h.devices_per_node = ranks;
  h.memory_bytes =
      static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGE_SIZE)) / h.devices_per_node;
  h.sources["memory_bytes"] = "physical memory / devices_per_node";
  h.sources["devices_per_node"] =
      cat("the ranks of the calibration: ", cpus, " CPUs / ", threads, " thread(s) per rank");
  std::mt19937_64 rng(7);

  together("peaks (FMA loops) and read bandwidth");
  h.peak["fp32"] = mean_of_ranks(measure_fma_peak_gflops(DType::f32, default_isa()) * 1e9 * threads);
  h.peak["bf16"] = mean_of_ranks(measure_fma_peak_gflops(DType::bf16, default_isa()) * 1e9 * threads);
  comm.barrier();
  h.memory_bandwidth = mean_of_ranks(measure_read_bandwidth_gbs(threads, size_t{256} << 20) * 1e9);
  h.sources["peak"] =
      cat("register-resident FMA loops (", isa_name(default_isa()), ") x ", threads, " thread(s), every rank at once");
  h.sources["memory_bandwidth"] = "streaming read of 256 MiB per rank, every rank at once";

  // The linear layers as the model runs them (linear_forward / linear_backward:
  // bias, bf16 operand rounding, fresh outputs): [M, n] x [n, n] with many rows.
  const int64_t M = 8192;
  for (DType dt : {DType::f32, DType::bf16}) {
    for (int64_t n : {64, 128, 256, 512, 1024, 2048}) {
      together(cat("linear ", dtype_name(dt), " ", M, " x ", n, " x ", n));
      Tensor x = random_normal(DType::f32, {M, n}, rng), dy = random_normal(DType::f32, {M, n}, rng);
      Tensor w = random_normal(dt, {n, n}, rng), b = random_normal(DType::f32, {n}, rng);
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
      h.gemm[dtype_name(dt)].push_back({static_cast<double>(n), mean_of_ranks(2.0 * M * n * n / tf)});
      h.gemm_backward[dtype_name(dt)].push_back({static_cast<double>(n), mean_of_ranks(4.0 * M * n * n / tb)});
    }
  }
  h.sources["gemm"] = cat("linear_forward (oneDNN matmul + bias) [8192, n] x [n, n] into fresh outputs, best of 3, ",
                          threads, " thread(s)");
  h.sources["gemm_backward"] =
      cat("linear_backward (dx, dW GEMMs + bias gradient) [8192, n] x [n, n], best of 2, ", threads, " thread(s)");

  // The fused attention kernels, non-causal, B = 1, H = 4, L = 2048.
  const int64_t L = 2048, H = 4;
  for (DType dt : {DType::f32, DType::bf16}) {
    for (int64_t d : {64, 128}) {
      together(cat("attention ", dtype_name(dt), " d=", d));
      Tensor q = random_normal(dt, {1, L, H, d}, rng), k = random_normal(dt, {1, L, H, d}, rng),
             v = random_normal(dt, {1, L, H, d}, rng), dout = random_normal(DType::f32, {1, L, H, d}, rng);
      Tensor o(DType::f32, {1, L, H, d}), lse(DType::f32, {1, H, L});
      Tensor dq(DType::f32, {1, L, H, d}), dk(DType::f32, {1, L, H, d}), dv(DType::f32, {1, L, H, d});
      AttentionOptions opt;
      opt.threads = threads;
      const double flops = 4.0 * H * L * L * d;
      const double tf = best_of(3, [&] { attention_forward(q, k, v, o, lse, opt); });
      const double tb = best_of(2, [&] { attention_backward(q, k, v, o, lse, dout, dq, dk, dv, opt); });
      h.attention_forward[dtype_name(dt)].push_back({static_cast<double>(d), mean_of_ranks(flops / tf)});
      h.attention_backward[dtype_name(dt)].push_back({static_cast<double>(d), mean_of_ranks(2.5 * flops / tb)});
    }
  }
  {  // causal, as the sequence-parallel strategies run it: one zigzag shard of two
     // ranks (L/2 queries at scattered positions) against all L keys, fp32, d = 64;
     // the rate on the visible pairs against the non-causal rate
    const int64_t d = 64, Lq = L / 2;
    const std::vector<int64_t> q_pos = shard_positions(Layout::zigzag, L, 2, 0);
    std::vector<int64_t> k_pos(static_cast<size_t>(L));
    for (int64_t i = 0; i < L; ++i) k_pos[static_cast<size_t>(i)] = i;
    Tensor q = random_normal(DType::f32, {1, Lq, H, d}, rng), k = random_normal(DType::f32, {1, L, H, d}, rng),
           v = random_normal(DType::f32, {1, L, H, d}, rng);
    Tensor o(DType::f32, {1, Lq, H, d}), lse(DType::f32, {1, H, Lq});
    AttentionOptions opt;
    opt.threads = threads, opt.causal = true, opt.q_pos = q_pos, opt.k_pos = k_pos;
    double pairs = 0;
    for (int64_t p : q_pos) pairs += static_cast<double>(p + 1);
    together("causal attention");
    const double t = best_of(3, [&] { attention_forward(q, k, v, o, lse, opt); });
    h.causal_efficiency = mean_of_ranks(4.0 * H * pairs * d / t) / h.attention_forward["fp32"].front().second;
    h.sources["causal_efficiency"] =
        "causal fp32 forward of a zigzag shard (L/2 = 1024 queries of L = 2048) against all keys, d=64, FLOPs of "
        "the visible pairs, / the non-causal rate";
  }
  h.sources["attention"] =
      cat("ringattn's fused kernels (", isa_name(default_isa()), "), non-causal, B=1, H=4, L=2048, d=64 and 128");

  // Token-local kernels on fresh buffers, as the model allocates them, on every
  // core at once (each rank gets its share of the memory system).
  {
    together("elementwise (LayerNorm, adds) and GELU");
    const int64_t N = 16384, D = 256, F = 1024;
    Tensor x = random_normal(DType::f32, {N, D}, rng), dy = random_normal(DType::f32, {N, D}, rng);
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
    h.elementwise_bandwidth = mean_of_ranks(36.0 * N * D / t);
    h.sources["elementwise_bandwidth"] =
        "LayerNorm forward + backward and an add over fresh fp32 [16384, 256] buffers (36 B per element), every "
        "rank at once";
    Tensor hx = random_normal(DType::f32, {N, F}, rng), hdy = random_normal(DType::f32, {N, F}, rng);
    comm.barrier();
    const double tf = best_of(3, [&] {
      Tensor y(DType::f32, {N, F});
      gelu_forward(N * F, hx.ptr<float>(), y.ptr<float>());
    });
    comm.barrier();
    const double tb = best_of(3, [&] {
      Tensor dx(DType::f32, {N, F});
      gelu_backward(N * F, hx.ptr<float>(), hdy.ptr<float>(), dx.ptr<float>());
    });
    h.gelu_forward_rate = mean_of_ranks(static_cast<double>(N * F) / tf);
    h.gelu_backward_rate = mean_of_ranks(static_cast<double>(N * F) / tb);
    h.sources["gelu_rate"] = "GELU forward / backward over fresh fp32 [16384, 1024], elements/s, every rank at once";
  }
  // The decode kernel over a cache far beyond the last-level cache (one query
  // row, 4 heads x 64, fp32, 256 MiB per rank).
  {
    together("decode against a 131072-token cache");
    const int64_t Lc = 131072, d = 64;
    Tensor q = random_normal(DType::f32, {1, 1, H, d}, rng), k = random_normal(DType::f32, {1, Lc, H, d}, rng),
           v = random_normal(DType::f32, {1, Lc, H, d}, rng);
    Tensor o(DType::f32, {1, 1, H, d}), lse(DType::f32, {1, H, 1});
    AttentionOptions opt;
    opt.threads = threads;
    const double t = best_of(5, [&] { attention_forward(q, k, v, o, lse, opt); });
    h.decode_bandwidth = mean_of_ranks(2.0 * static_cast<double>(k.bytes()) / t);
    h.sources["decode_bandwidth"] =
        "decode kernel over an fp32 K/V cache of 131072 tokens x 4 heads x 64 (256 MiB), every rank at once";
  }
  // A decode step's GEMMs: 2 rows through the weights of 4 layers of the
  // d_model 256 model (12 MiB fp32), every pass re-reading them, as each decode
  // step does; they stay in the last-level cache between passes.
  {
    together("decode GEMMs over cache-resident weights");
    const int64_t D = 256, rows = 2;
    const int64_t shapes[4][2] = {{D, 3 * D}, {D, D}, {D, 4 * D}, {4 * D, D}};
    std::vector<Tensor> w;
    double bytes = 0;
    for (int l = 0; l < 4; ++l)
      for (const auto& sh : shapes) {
        w.push_back(random_normal(DType::f32, {sh[0], sh[1]}, rng));
        bytes += static_cast<double>(w.back().bytes());
      }
    Tensor x = random_normal(DType::f32, {rows, 4 * D}, rng), y(DType::f32, {rows, 4 * D});
    auto pass = [&] {
      for (const Tensor& m : w)
        linear_forward(rows, m.dim(0), m.dim(1), x.ptr<float>(), m.ptr<void>(), nullptr, y.ptr<float>());
    };
    pass();
    h.cached_weight_bandwidth = mean_of_ranks(bytes / best_of(20, pass));
    h.sources["cached_weight_bandwidth"] =
        "2-row linear layers through 12 MiB of fp32 weights (4 layers of d_model 256, MLP 1024) re-read every pass, "
        "every rank at once";
    h.llc_bytes = last_level_cache_bytes();
    h.sources["llc_bytes"] = "the largest cache level in /sys/devices/system/cpu/cpu0/cache (0: not found)";
  }
  {
    together("per-operation overhead");
    const int64_t n = 64;
    Tensor x = random_normal(DType::f32, {1, n}, rng), w = random_normal(DType::f32, {n, n}, rng);
    Tensor y(DType::f32, {1, n}), mean(DType::f32, {1}), rstd(DType::f32, {1});
    const int reps = 2000;
    const double t = best_of(3, [&] {
      for (int i = 0; i < reps; ++i) {
        linear_forward(1, n, n, x.ptr<float>(), w.ptr<void>(), nullptr, y.ptr<float>());
        layernorm_forward(1, n, y.ptr<float>(), x.ptr<float>(), x.ptr<float>(), y.ptr<float>(), mean.ptr<float>(),
                          rstd.ptr<float>());
      }
    });
    h.op_overhead_s = mean_of_ranks(t / (2.0 * reps));
    h.sources["op_overhead_s"] = "a 1-row linear and a 1-row LayerNorm, averaged";
  }
  together("MPI ping-pong between ranks 0 and 1");
  const auto [latency_s, bandwidth] = measure_pingpong(comm);
  h.intra_node = {latency_s, bandwidth, false};
  h.inter_node = h.intra_node;
  h.sources["links.intra_node"] =
      "MPI ping-pong between 2 ranks of this machine (8 B and 64 MiB); shared memory: the copy is done by the ranks' "
      "own cores, so it does not overlap their compute";
  h.sources["links.inter_node"] = "no second node here: the same as intra_node";
  return h;
}

}  // namespace ringattn
