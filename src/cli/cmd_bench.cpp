// `ringattn bench kernel`: GFLOP/s of the fused kernels (docs/design.md §9 FLOP
// conventions) with ratios to the FMA peak and the oneDNN GEMM rate measured in
// the same run, an unfused GEMM→softmax→GEMM baseline, thread scaling, and the
// decode kernel (one query row per head against the L-token cache) against the
// streaming read bandwidth measured in the same run.
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <random>
#include <thread>

#include "cli/commands.h"
#include "ringattn/cpu/attention.h"
#include "ringattn/cpu/gemm.h"
#include "ringattn/cuda.h"
#include "ringattn/dist_attention.h"
#include "ringattn/error.h"
#include "ringattn/memory.h"
#include "ringattn/perf.h"

namespace ringattn::cli {
namespace {

struct BenchArgs {
  int64_t batch = 1, seq = 4096, heads = 8, kv_heads = 0, dim = 128;
  int threads = 1, scale_threads = 0, reps = 3, ring_ranks = 4;
  std::string isa, device = "cpu";
  bool json = false, no_unfused = false, no_backward = false;
};

struct DecodeRow {
  std::string dtype;
  int threads;
  double seconds, gbs, bw_ratio;
};

struct Row {
  std::string kernel, dtype, pass;
  bool causal;
  int threads;
  double seconds, gflops, peak_ratio, gemm_ratio;
};

void run(const BenchArgs& a) {
  const Isa isa = a.isa.empty() ? default_isa() : parse_isa(a.isa);
  const int64_t B = a.batch, L = a.seq, H = a.heads, Hkv = a.kv_heads > 0 ? a.kv_heads : a.heads, d = a.dim;
  check(B > 0 && L > 0 && H > 0 && d > 0 && a.reps > 0 && a.threads > 0,
        "sizes, --reps and --threads must be positive");
  const int scale_threads =
      a.scale_threads > 0 ? a.scale_threads : static_cast<int>(std::thread::hardware_concurrency());
  // q, k, v, o, dout, dq, dk, dv in fp32: refused before seconds of peak measurements.
  check_fits_in_memory(4.0 * (4.0 * B * L * H * d + 4.0 * B * L * Hkv * d),
                       cat("bench kernel of B=", B, " L=", L, " H=", H, " d=", d));

  progress("measuring peaks (FMA loop, oneDNN GEMM)...");
  // Best of three, as each kernel row is the best of --reps: a VM's slow moments
  // must not lower the peak the rows are divided by.
  auto best_peak = [&](DType dt) {
    double best = 0;
    for (int i = 0; i < 3; ++i) best = std::max(best, measure_fma_peak_gflops(dt, isa, 0.2));
    return best;
  };
  const double peak32 = best_peak(DType::f32), peak16 = best_peak(DType::bf16);
  const double gemm32 = measure_gemm_gflops(DType::f32, 1024, a.threads);
  const double gemm16 = measure_gemm_gflops(DType::bf16, 1024, a.threads);
  const double bw1 = measure_read_bandwidth_gbs(a.threads), bwn = measure_read_bandwidth_gbs(scale_threads);

  std::vector<Row> rows;
  std::vector<DecodeRow> decode_rows;
  std::mt19937_64 rng(1);
  for (DType dt : {DType::f32, DType::bf16}) {
    Tensor q(dt, {B, L, H, d}), k(dt, {B, L, Hkv, d}), v(dt, {B, L, Hkv, d}), dout(dt, {B, L, H, d});
    for (auto* t : {&q, &k, &v, &dout}) fill_normal(*t, rng);
    Tensor o(DType::f32, {B, L, H, d}), lse(DType::f32, {B, H, L});
    Tensor dq(DType::f32, {B, L, H, d}), dk(DType::f32, {B, L, Hkv, d}), dv(DType::f32, {B, L, Hkv, d});
    const double peak = dt == DType::f32 ? peak32 : peak16, gemm_rate = dt == DType::f32 ? gemm32 : gemm16;
    for (bool causal : {false, true}) {
      const double flops = attention_forward_flops(B, H, L, L, d, causal);
      auto add = [&](const char* kernel, const char* pass, int threads, double t, double f) {
        const double g = f / t * 1e-9;
        const double pk = peak * threads;
        rows.push_back(
            {kernel, dtype_name(dt), pass, causal, threads, t, g, g / pk, g / (gemm_rate * threads / a.threads)});
      };
      AttentionOptions opt;
      opt.causal = causal;
      opt.threads = a.threads;
      opt.isa = &isa;
      const std::string what = cat(dtype_name(dt), causal ? " causal" : "");
      progress("fused " + what + " forward");
      add("fused", "forward", a.threads, best_seconds(a.reps, [&] { attention_forward(q, k, v, o, lse, opt); }), flops);
      if (!a.no_backward) {
        progress("fused " + what + " backward");
        add("fused", "backward", a.threads,
            best_seconds(a.reps, [&] { attention_backward(q, k, v, o, lse, dout, dq, dk, dv, opt); }), 2.5 * flops);
      }
      if (!a.no_unfused) {
        progress("unfused " + what + " forward");
        add("unfused", "forward", a.threads,
            best_seconds(a.reps, [&] { attention_forward_unfused(q, k, v, o, lse, opt); }), flops);
      }
      if (causal) {  // decode: the last token's query row against the whole cache
        std::vector<int> counts{a.threads};
        if (scale_threads != a.threads) counts.push_back(scale_threads);
        for (int threads : counts) {
          progress(cat(dtype_name(dt), " decode, ", threads, " threads"));
          const TensorView q1 = q.view().slice(1, L - 1, 1), o1 = o.view().slice(1, L - 1, 1);
          const TensorView lse1 = lse.view().slice(2, L - 1, 1);
          opt.threads = threads;
          const double t = best_seconds(a.reps, [&] { attention_forward(q1, k, v, o1, lse1, opt); });
          const double gbs = 2.0 * static_cast<double>(k.bytes()) / t * 1e-9;  // K and V read once
          decode_rows.push_back({dtype_name(dt), threads, t, gbs, gbs / (threads == a.threads ? bw1 : bwn)});
        }
        opt.threads = a.threads;
      }
      if (scale_threads != a.threads) {
        opt.threads = scale_threads;
        progress(cat("fused ", what, " forward, ", scale_threads, " threads"));
        add("fused", "forward", scale_threads, best_seconds(a.reps, [&] { attention_forward(q, k, v, o, lse, opt); }),
            flops);
      }
    }
  }
  progress_done();

  auto find = [&](const char* kernel, const char* dtype, const char* pass, bool causal, int threads) -> const Row* {
    for (const Row& r : rows)
      if (r.kernel == kernel && r.dtype == dtype && r.pass == pass && r.causal == causal && r.threads == threads)
        return &r;
    return nullptr;
  };
  struct Target {
    std::string what;
    double value, goal;
  };
  std::vector<Target> targets;
  const int t1 = a.threads;
  // bf16 rates are held against the bf16 dot-product peak, or with AMX against
  // oneDNN's AMX GEMM (the tile loop's peak is far above any real GEMM).
  const double bf16_rate = isa == Isa::amx_bf16 ? gemm16 : peak16 * t1;
  const char* bf16_peak = isa == Isa::amx_bf16 ? "oneDNN AMX GEMM" : "bf16 peak";
  for (bool causal : {false, true})
    if (auto* f = find("fused", "fp32", "forward", causal, t1))
      targets.push_back({cat("fp32 ", causal ? "causal " : "", "forward / FMA peak"), f->peak_ratio, 0.85});
  if (auto* f = find("fused", "fp32", "backward", false, t1))
    targets.push_back({"fp32 backward / FMA peak", f->peak_ratio, 0.75});
  const bool bf16_dot = isa == Isa::avx512_bf16 || isa == Isa::amx_bf16;  // else bf16 runs in fp32: no bf16 target
  if (auto* b = find("fused", "bf16", "forward", false, t1); b && bf16_dot)
    targets.push_back({cat("bf16 forward / ", bf16_peak), b->gflops / bf16_rate, 0.8});
  if (auto* b = find("fused", "bf16", "backward", false, t1); b && bf16_dot)
    targets.push_back({cat("bf16 backward / ", bf16_peak), b->gflops / bf16_rate, 0.6});
  if (auto* f = find("fused", "fp32", "forward", false, t1); f)
    if (auto* u = find("unfused", "fp32", "forward", false, t1))
      targets.push_back({"fused / unfused forward time ratio", u->seconds / f->seconds, 1.3});
  if (auto* f = find("fused", "fp32", "forward", false, t1); f)
    if (auto* c = find("fused", "fp32", "forward", true, t1))
      targets.push_back({"non-causal / causal forward time", f->seconds / c->seconds, 1.8});
  if (scale_threads != t1)
    if (auto* f = find("fused", "fp32", "forward", false, t1); f)
      if (auto* s = find("fused", "fp32", "forward", false, scale_threads))
        targets.push_back({cat(scale_threads, " threads / ", t1, " thread speed-up"), f->seconds / s->seconds,
                           0.95 * scale_threads / t1});

  for (const DecodeRow& r : decode_rows)
    if (r.threads == t1)
      targets.push_back({cat(r.dtype, " decode / read bandwidth"), r.bw_ratio, r.dtype == "fp32" ? 0.6 : 0.85});

  if (a.json) {
    nlohmann::json j;
    j["shape"] = {{"B", B}, {"L", L}, {"H", H}, {"Hkv", Hkv}, {"d", d}};
    j["isa"] = isa_name(isa);
    j["peaks_gflops_per_core"] = {{"fma_fp32", peak32}, {"fma_bf16", peak16}};
    j["gemm_gflops"] = {{"fp32", gemm32}, {"bf16", gemm16}, {"threads", a.threads}};
    j["rows"] = nlohmann::json::array();
    for (const Row& r : rows)
      j["rows"].push_back({{"kernel", r.kernel},
                           {"dtype", r.dtype},
                           {"pass", r.pass},
                           {"causal", r.causal},
                           {"threads", r.threads},
                           {"seconds", r.seconds},
                           {"gflops", r.gflops},
                           {"peak_ratio", r.peak_ratio},
                           {"gemm_ratio", r.gemm_ratio}});
    j["read_bandwidth_gbs"] = {
        {"threads", a.threads}, {"gbs", bw1}, {"scale_threads", scale_threads}, {"scale_gbs", bwn}};
    j["decode"] = nlohmann::json::array();
    for (const DecodeRow& r : decode_rows)
      j["decode"].push_back({{"dtype", r.dtype},
                             {"threads", r.threads},
                             {"seconds", r.seconds},
                             {"gbs", r.gbs},
                             {"bandwidth_ratio", r.bw_ratio}});
    j["targets"] = nlohmann::json::array();
    for (const Target& t : targets)
      j["targets"].push_back({{"what", t.what}, {"value", t.value}, {"goal", t.goal}, {"met", t.value >= t.goal}});
    return print_json(j);
  }
  std::printf("bench kernel  B=%lld L=%lld H=%lld Hkv=%lld d=%lld  path %s\n", static_cast<long long>(B),
              static_cast<long long>(L), static_cast<long long>(H), static_cast<long long>(Hkv),
              static_cast<long long>(d), isa_name(isa));
  std::printf(
      "measured per core: FMA peak fp32 %.1f GFLOP/s, bf16 %.1f GFLOP/s; oneDNN GEMM (n=1024, %d thr) "
      "fp32 %.1f, bf16 %.1f GFLOP/s\n\n",
      peak32, peak16, a.threads, gemm32, gemm16);
  std::printf("%-8s %-5s %-6s %-9s %4s %11s %9s %8s %8s\n", "kernel", "dtype", "causal", "pass", "thr", "time [ms]",
              "GFLOP/s", "of peak", "of GEMM");
  for (const Row& r : rows)
    std::printf("%-8s %-5s %-6s %-9s %4d %11.1f %9.1f %7.1f%% %7.1f%%\n", r.kernel.c_str(), r.dtype.c_str(),
                r.causal ? "yes" : "no", r.pass.c_str(), r.threads, r.seconds * 1e3, r.gflops, 100 * r.peak_ratio,
                100 * r.gemm_ratio);
  std::printf(
      "\ndecode: 1 query row per head against the %lld-token K/V cache; read bandwidth measured "
      "%.1f GB/s (%d thr), %.1f GB/s (%d thr)\n",
      static_cast<long long>(L), bw1, a.threads, bwn, scale_threads);
  std::printf("%-5s %4s %11s %9s %8s\n", "dtype", "thr", "time [ms]", "GB/s", "of BW");
  for (const DecodeRow& r : decode_rows)
    std::printf("%-5s %4d %11.3f %9.1f %7.1f%%\n", r.dtype.c_str(), r.threads, r.seconds * 1e3, r.gbs,
                100 * r.bw_ratio);
  std::printf("\n%-40s %8s %8s\n", "target", "measured", "goal");
  for (const Target& t : targets)
    std::printf("%-40s %8.2f %8.2f  %s\n", t.what.c_str(), t.value, t.goal, t.value >= t.goal ? "met" : "MISSED");
}

// The same measurement on GPU 0: the flash kernels in bf16 and fp16 against the
// bf16 GEMM rate of cuBLAS measured in the same run (median times, host clock
// around a device synchronize; inputs uniform in [-1, 1)).
void run_cuda(const BenchArgs& a) {
  const int64_t B = a.batch, L = a.seq, H = a.heads, Hkv = a.kv_heads > 0 ? a.kv_heads : a.heads, d = a.dim;
  check(B > 0 && L > 0 && H > 0 && d > 0 && a.reps > 0, "sizes and --reps must be positive");
  auto dev = make_cuda_device(0);
  progress("measuring the cuBLAS bf16 GEMM rate...");
  const double gemm = cublas_bf16_gemm_tflops(*dev, 8192, std::max(a.reps, 5));
  auto median_time = [&](const std::function<void()>& f) {
    f();
    dev->synchronize();
    std::vector<double> t;
    for (int r = 0; r < std::max(a.reps, 5); ++r) {
      const double t0 = now_seconds();
      f();
      dev->synchronize();
      t.push_back(now_seconds() - t0);
    }
    std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
    return t[t.size() / 2];
  };
  std::vector<Row> rows;
  std::mt19937_64 rng(1);
  const std::string fwd_kernel = cuda_forward_kernel();
  for (DType dt : {DType::bf16, DType::f16}) {
    progress(cat("timing the ", dtype_name(dt), " kernels..."));
    Tensor hq(dt, {B, L, H, d}), hk(dt, {B, L, Hkv, d});
    fill_normal(hq, rng);
    fill_normal(hk, rng);
    DeviceTensor q = dev->upload(hq), k = dev->upload(hk), v = dev->upload(hk), dout = dev->upload(hq);
    DeviceTensor o = dev->alloc(dt, {B, L, H, d}), lse = dev->alloc(DType::f32, {B, H, L});
    DeviceTensor dq = dev->alloc(dt, {B, L, H, d}), dk = dev->alloc(dt, {B, L, Hkv, d}),
                 dv = dev->alloc(dt, {B, L, Hkv, d});
    for (bool causal : {false, true}) {
      AttentionOptions opt;
      opt.causal = causal;
      const double f = attention_forward_flops(B, H, L, L, d, causal);
      const double tf = median_time([&] { dev->attention_forward(q, k, v, o, lse, opt); });
      rows.push_back({fwd_kernel, dtype_name(dt), "forward", causal, 0, tf, f / tf / 1e9, 0, f / tf / 1e12 / gemm});
      if (a.no_backward) continue;
      const double tb = median_time([&] { dev->attention_backward(q, k, v, o, lse, dout, dq, dk, dv, opt); });
      rows.push_back(
          {"mma.sync", dtype_name(dt), "backward", causal, 0, tb, 2.5 * f / tb / 1e9, 0, 2.5 * f / tb / 1e12 / gemm});
    }
  }
  // The ring (zigzag layout) with ring_ranks ranks sharing this GPU against one
  // kernel over the whole sequence: what the schedule costs (smaller kernels,
  // the copies round the ring, the merges) when the ranks cannot run in parallel.
  struct RingRow {
    std::string dtype;
    bool causal;
    double seconds, single_seconds;
  };
  std::vector<RingRow> ring_rows;
  const int P = a.ring_ranks;
  if (P > 1) {
    check(L % (2 * P) == 0, "--seq must be divisible by 2 x --ring-ranks for the zigzag ring, got ", L, " and ", P);
    const DType dt = DType::bf16;
    progress(cat("timing the ring on ", P, " ranks sharing the GPU..."));
    release_cached_memory(*dev);  // the ranks' own devices allocate on the same GPU
    Tensor hq(dt, {B, L / P, H, d}), hk(dt, {B, L / P, Hkv, d});
    fill_normal(hq, rng);
    fill_normal(hk, rng);
    for (bool causal : {false, true}) {
      std::vector<double> t(P);
      run_device_local_group(P, 0, [&](int p, Device& rdev, Communicator& comm) {
        DeviceTensor q = rdev.upload(hq), k = rdev.upload(hk);
        DeviceTensor o = rdev.alloc(DType::f32, {B, L / P, H, d}), lse = rdev.alloc(DType::f32, {B, H, L / P});
        DistAttentionOptions opt;
        opt.layout = Layout::zigzag;
        opt.causal = causal;
        opt.device = &rdev;
        std::vector<double> times;
        for (int r = 0; r <= std::max(a.reps, 5); ++r) {
          comm.barrier();
          const double t0 = now_seconds();
          dist_attention_forward(comm, q, k, k, o, lse, opt);
          rdev.synchronize();
          comm.barrier();
          if (r > 0) times.push_back(now_seconds() - t0);  // the first is a warm-up
        }
        std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
        t[p] = times[times.size() / 2];
      });
      const Row* single = nullptr;
      for (const Row& r : rows)
        if (r.dtype == dtype_name(dt) && r.pass == "forward" && r.causal == causal) single = &r;
      ring_rows.push_back({dtype_name(dt), causal, *std::max_element(t.begin(), t.end()), single->seconds});
    }
  }
  progress_done();
  if (a.json) {
    nlohmann::json j = {{"device", dev->name()},
                        {"B", B},
                        {"L", L},
                        {"H", H},
                        {"Hkv", Hkv},
                        {"d", d},
                        {"cublas_bf16_gemm_tflops", gemm},
                        {"rows", nlohmann::json::array()}};
    for (const Row& r : rows)
      j["rows"].push_back({{"kernel", r.kernel},
                           {"dtype", r.dtype},
                           {"pass", r.pass},
                           {"causal", r.causal},
                           {"seconds", r.seconds},
                           {"tflops", r.gflops / 1e3},
                           {"gemm_ratio", r.gemm_ratio}});
    for (const RingRow& r : ring_rows)
      j["ring"].push_back({{"ranks", P},
                           {"layout", "zigzag"},
                           {"dtype", r.dtype},
                           {"causal", r.causal},
                           {"seconds", r.seconds},
                           {"single_kernel_seconds", r.single_seconds},
                           {"efficiency", r.single_seconds / r.seconds}});
    print_json(j);
    return;
  }
  std::printf("bench kernel --device cuda  %s  B=%lld L=%lld H=%lld Hkv=%lld d=%lld\n", dev->name().c_str(),
              static_cast<long long>(B), static_cast<long long>(L), static_cast<long long>(H),
              static_cast<long long>(Hkv), static_cast<long long>(d));
  std::printf("cuBLAS bf16 GEMM 8192^3: %.1f TFLOP/s (the ceiling below)\n\n", gemm);
  std::printf("%-9s %-5s %-6s %-9s %11s %9s %9s\n", "kernel", "dtype", "causal", "pass", "time [ms]", "TFLOP/s",
              "of GEMM");
  for (const Row& r : rows)
    std::printf("%-9s %-5s %-6s %-9s %11.3f %9.1f %8.1f%%\n", r.kernel.c_str(), r.dtype.c_str(),
                r.causal ? "yes" : "no", r.pass.c_str(), r.seconds * 1e3, r.gflops / 1e3, 100 * r.gemm_ratio);
  if (ring_rows.empty()) return;
  std::printf("\nring forward, %d ranks sharing the GPU (zigzag), vs one kernel over the sequence\n", P);
  std::printf("%-5s %-6s %11s %11s %11s\n", "dtype", "causal", "ring [ms]", "kernel [ms]", "efficiency");
  for (const RingRow& r : ring_rows)
    std::printf("%-5s %-6s %11.3f %11.3f %10.1f%%\n", r.dtype.c_str(), r.causal ? "yes" : "no", r.seconds * 1e3,
                r.single_seconds * 1e3, 100 * r.single_seconds / r.seconds);
}

}  // namespace

void add_bench(CLI::App& app) {
  auto* bench = app.add_subcommand("bench", "benchmarks (programs that print GFLOP/s and ratios to measured peaks)");
  bench->require_subcommand(1);
  auto a = std::make_shared<BenchArgs>();
  auto* cmd =
      bench->add_subcommand("kernel", "fused attention kernels vs FMA peak, oneDNN GEMM and an unfused baseline");
  cmd->add_option("--batch", a->batch, "batch")->check(positive_count())->capture_default_str();
  cmd->add_option("--seq", a->seq, "sequence length (Lq = Lk)")->check(positive_count())->capture_default_str();
  cmd->add_option("--heads", a->heads, "query heads")->check(positive_count())->capture_default_str();
  cmd->add_option("--kv-heads", a->kv_heads, "key/value heads (default: --heads)")->check(positive_count());
  cmd->add_option("--dim", a->dim, "head dim")->check(positive_count())->capture_default_str();
  cmd->add_option("--threads", a->threads, "threads for the main rows")->check(thread_count())->capture_default_str();
  cmd->add_option("--scale-threads", a->scale_threads, "threads for the scaling row (default: all CPUs)")
      ->check(thread_count());
  cmd->add_option("--reps", a->reps, "repetitions; the best time is reported")
      ->check(positive_count())
      ->capture_default_str();
  cmd->add_option("--isa", a->isa, "kernel path (default: best available)");
  cmd->add_flag("--no-unfused", a->no_unfused, "skip the unfused baseline");
  cmd->add_flag("--no-backward", a->no_backward, "skip the backward pass");
  cmd->add_option("--ring-ranks", a->ring_ranks, "with --device cuda: ranks of the one-GPU ring row (0: none)")
      ->check(CLI::Range(0, 64))
      ->capture_default_str();
  cmd->add_option("--device", a->device, "cpu, or cuda (GPU 0: bf16/fp16 kernels vs cuBLAS)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  cmd->add_flag("--json", a->json, "machine-readable output");
  cmd->callback([a] { a->device == "cuda" ? run_cuda(*a) : run(*a); });
  add_bench_lm(bench);
  add_bench_layers(bench);
}

}  // namespace ringattn::cli
