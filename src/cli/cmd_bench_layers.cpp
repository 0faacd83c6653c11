// `ringattn bench layers`: the token-local layers of the models (layers.h) on
// N tokens of C features against the streaming read bandwidth measured in the
// same run. Each row counts the bytes the layer must move at least: every input
// array read once and every output written once (fp32), best of --reps.
#include <omp.h>

#include <cstdio>
#include <functional>
#include <random>
#include <thread>

#include "cli/commands.h"
#include "ringattn/cpu/layers.h"
#include "ringattn/error.h"
#include "ringattn/perf.h"

namespace ringattn::cli {
namespace {

struct BenchLayersArgs {
  int64_t tokens = 4096, dim = 2048, head_dim = 128, vocab = 32000, ce_rows = 256;
  int threads = 1, reps = 5;
  bool json = false;
};

struct LayerRow {
  std::string layer, pass;
  double seconds, bytes, gbs, bw_ratio;
};

void run_bench_layers(const BenchLayersArgs& a) {
  const int64_t N = a.tokens, C = a.dim, d = a.head_dim, H = C / d, V = a.vocab, R = a.ce_rows;
  check(C % d == 0 && d % 2 == 0, "--dim ", C, " must be a multiple of the even --head-dim ", d);
  // x, dy, y, dx of [N, C], h/dh of [N, 2C], logits [R, V]: refused before any measurement.
  check_fits_in_memory(4.0 * (8.0 * N * C + static_cast<double>(R) * V), cat("bench layers of N=", N, " C=", C));
  omp_set_num_threads(a.threads);
  progress("measuring the read bandwidth...");
  const double bw = measure_read_bandwidth_gbs(a.threads);

  std::mt19937_64 rng(1);
  std::normal_distribution<float> normal;
  auto filled = [&](int64_t n, float mean = 0.f) {
    std::vector<float> v(static_cast<size_t>(n));
    for (float& x : v) x = mean + normal(rng);
    return v;
  };
  const std::vector<float> x = filled(N * C), dy = filled(N * C), gamma = filled(C, 1.f), beta = filled(C);
  const std::vector<float> h = filled(2 * N * C), dyf = filled(N * C);
  std::vector<float> y(N * C), dx(N * C), dh(2 * N * C), mean(N), rstd(N), dgamma(C), dbeta(C);
  std::vector<float> q = filled(N * C), z = filled(R * V);
  std::vector<int64_t> pos(N), labels(R);
  for (int64_t t = 0; t < N; ++t) pos[t] = t;
  for (int64_t i = 0; i < R; ++i) labels[i] = static_cast<int64_t>(rng() % static_cast<uint64_t>(V));
  const std::vector<float> inv_freq = rope_inv_freq(RopeConfig{}, d);

  std::vector<LayerRow> rows;
  auto add = [&](const char* layer, const char* pass, double bytes, const std::function<void()>& f) {
    progress(cat(layer, " ", pass));
    const double t = best_seconds(a.reps, f, 1);
    rows.push_back({layer, pass, t, bytes, bytes / t * 1e-9, bytes / t * 1e-9 / bw});
  };
  const double nc = 4.0 * N * C;  // bytes of one [N, C] fp32 array
  add("layernorm", "forward", 2 * nc,
      [&] { layernorm_forward(N, C, x.data(), gamma.data(), beta.data(), y.data(), mean.data(), rstd.data()); });
  add("layernorm", "backward", 3 * nc, [&] {
    layernorm_backward(N, C, x.data(), gamma.data(), mean.data(), rstd.data(), dy.data(), dx.data(), dgamma.data(),
                       dbeta.data());
  });
  add("rmsnorm", "forward", 2 * nc,
      [&] { rmsnorm_forward(N, C, x.data(), gamma.data(), y.data(), rstd.data(), 1e-6f); });
  add("rmsnorm", "backward", 3 * nc,
      [&] { rmsnorm_backward(N, C, x.data(), gamma.data(), rstd.data(), dy.data(), dx.data(), dgamma.data()); });
  add("gelu", "forward", 2 * nc, [&] { gelu_forward(N * C, x.data(), y.data()); });
  add("gelu", "backward", 3 * nc, [&] { gelu_backward(N * C, x.data(), dy.data(), dx.data()); });
  add("swiglu", "forward", 3 * nc, [&] { swiglu_rows_forward(N, C, h.data(), y.data()); });
  add("swiglu", "backward", 5 * nc, [&] { swiglu_rows_backward(N, C, h.data(), dyf.data(), dh.data()); });
  add("rope", "forward", 2 * nc, [&] { rope_forward(N, H, d, C, q.data(), pos.data(), inv_freq.data()); });
  add("rope", "backward", 2 * nc, [&] { rope_backward(N, H, d, C, q.data(), pos.data(), inv_freq.data()); });
  // In place: each repetition takes the previous one's output as its logits.
  add("softmax + cross-entropy", "both", 2.0 * 4 * R * V,
      [&] { softmax_cross_entropy_rows(R, V, z.data(), labels.data(), 1.f / static_cast<float>(R)); });
  progress_done();

  if (a.json) {
    nlohmann::json j;
    j["shape"] = {{"tokens", N}, {"dim", C}, {"head_dim", d}, {"vocab", V}, {"ce_rows", R}};
    j["threads"] = a.threads;
    j["read_bandwidth_gbs"] = bw;
    j["rows"] = nlohmann::json::array();
    for (const LayerRow& r : rows)
      j["rows"].push_back({{"layer", r.layer},
                           {"pass", r.pass},
                           {"seconds", r.seconds},
                           {"bytes", r.bytes},
                           {"gbs", r.gbs},
                           {"bandwidth_ratio", r.bw_ratio},
                           {"goal", 0.5},
                           {"met", r.bw_ratio >= 0.5}});
    return print_json(j);
  }
  std::printf("bench layers  N=%lld tokens, C=%lld (RoPE: %lld heads of %lld), cross-entropy %lld rows of %lld\n",
              static_cast<long long>(N), static_cast<long long>(C), static_cast<long long>(H),
              static_cast<long long>(d), static_cast<long long>(R), static_cast<long long>(V));
  std::printf("read bandwidth measured %.1f GB/s (%d thr); goal: each layer >= 0.50 of it\n\n", bw, a.threads);
  std::printf("%-24s %-9s %11s %10s %9s %8s\n", "layer", "pass", "time [ms]", "MB moved", "GB/s", "of BW");
  for (const LayerRow& r : rows)
    std::printf("%-24s %-9s %11.3f %10.1f %9.1f %7.1f%%  %s\n", r.layer.c_str(), r.pass.c_str(), r.seconds * 1e3,
                r.bytes * 1e-6, r.gbs, 100 * r.bw_ratio, r.bw_ratio >= 0.5 ? "met" : "MISSED");
}

}  // namespace

void add_bench_layers(CLI::App* bench) {
  auto a = std::make_shared<BenchLayersArgs>();
  auto* cmd = bench->add_subcommand("layers", "the models' token-local layers vs the read bandwidth");
  cmd->add_option("--tokens", a->tokens, "tokens N")->check(positive_count())->capture_default_str();
  cmd->add_option("--dim", a->dim, "features C (the MLP's F for SwiGLU)")
      ->check(positive_count())
      ->capture_default_str();
  cmd->add_option("--head-dim", a->head_dim, "RoPE's head dim (heads = dim / head-dim)")
      ->check(positive_count())
      ->capture_default_str();
  cmd->add_option("--vocab", a->vocab, "cross-entropy: vocabulary")->check(positive_count())->capture_default_str();
  cmd->add_option("--ce-rows", a->ce_rows, "cross-entropy: logit rows (the LM head's chunk)")
      ->check(positive_count())
      ->capture_default_str();
  cmd->add_option("--threads", a->threads, "threads")->check(thread_count())->capture_default_str();
  cmd->add_option("--reps", a->reps, "repetitions; the best time is reported")
      ->check(positive_count())
      ->capture_default_str();
  cmd->add_flag("--json", a->json, "machine-readable output");
  cmd->callback([a] { run_bench_layers(*a); });
}

}  // namespace ringattn::cli
