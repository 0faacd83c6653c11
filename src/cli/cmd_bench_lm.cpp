// `ringattn bench lm`: a language model's prefill and decode on one process
// against this machine's limits measured in the same run: prefill model FLOP/s
// over the oneDNN GEMM rate (docs/design.md §9 FLOP conventions: 2 FLOPs per
// weight per token, attention_forward_flops per layer), and time per output
// token against the streaming read bandwidth (every weight and the KV cache read
// once per step).
#include <omp.h>

#include <cstdio>
#include <random>
#include <thread>

#include "cli/commands.h"
#include "ringattn/error.h"
#include "ringattn/lm.h"
#include "ringattn/parallel.h"
#include "ringattn/perf.h"

namespace ringattn::cli {
namespace {

struct BenchLmArgs {
  std::string model, config, dtype = "fp32";
  int64_t seq = 8192;
  int new_tokens = 16, threads = 0;
  uint64_t seed = 1;
  bool json = false;
};

void run_bench_lm(const BenchLmArgs& a) {
  check(a.model.empty() != a.config.empty(), "bench lm needs one of --model DIR or --config CFG.json");
  const int T = a.threads > 0 ? a.threads : static_cast<int>(std::thread::hardware_concurrency());
  omp_set_num_threads(T);
  const DType dt = parse_dtype(a.dtype);
  const LmConfig lc = load_lm_config(a.model.empty() ? a.config : a.model);
  check(lc.arch != Arch::gpt2 || a.seq + a.new_tokens <= lc.max_positions, "--seq ", a.seq, " + --new-tokens ",
        a.new_tokens, " pass gpt2's ", lc.max_positions, " learned positions");
  const RunContext run(nullptr, ParallelConfig{});
  ModelConfig mc = model_config(lc);
  mc.dtype = dt, mc.seed = a.seed;
  const Model m = a.model.empty() ? Model(mc) : lm_model(a.model, dt, run);
  progress("measuring the GEMM rate and the read bandwidth...");
  const double gemm = measure_gemm_gflops(dt, 1024, T), bw = measure_read_bandwidth_gbs(T);
  std::mt19937_64 rng(a.seed);
  std::vector<int64_t> ids(static_cast<size_t>(a.seq));
  for (int64_t& id : ids) id = static_cast<int64_t>(rng() % static_cast<uint64_t>(lc.vocab));
  LmGenerateOptions o;
  o.new_tokens = 2;
  progress("warm-up ...");
  (void)lm_generate(m, run.model_parallel(), std::span<const int64_t>(ids).first(std::min<int64_t>(a.seq, 256)), 1,
                    std::min<int64_t>(a.seq, 256), o);
  std::vector<double> marks;
  o.new_tokens = a.new_tokens;
  o.on_token = [&](std::span<const int64_t>) { marks.push_back(now_seconds()); };
  progress(cat("prefill of ", a.seq, " tokens, then ", a.new_tokens, " decode steps ..."));
  const double t0 = now_seconds();
  (void)lm_generate(m, run.model_parallel(), ids, 1, a.seq, o);
  progress_done();
  const double prefill = marks.front() - t0;
  std::vector<double> steps;
  for (size_t i = 1; i < marks.size(); ++i) steps.push_back(marks[i] - marks[i - 1]);
  check(!steps.empty(), "bench lm needs --new-tokens >= 2 to time a decode step");
  std::sort(steps.begin(), steps.end());
  const double tpot = steps[steps.size() / 2];

  // Model FLOPs of the prefill and bytes one decode step reads.
  const int64_t D = lc.d_model, A = lc.heads * lc.head_dim, K = lc.kv_heads * lc.head_dim, F = lc.mlp_hidden;
  const int64_t per_layer = D * (A + 2 * K) + A * D + D * F * (lc.arch == Arch::gpt2 ? 1 : 2) + F * D;
  const double flops =
      static_cast<double>(lc.layers) * (2.0 * static_cast<double>(per_layer * a.seq) +
                                        attention_forward_flops(1, lc.heads, a.seq, a.seq, lc.head_dim, true)) +
      2.0 * static_cast<double>(D * lc.vocab);                         // the last position's logits
  const double mid = static_cast<double>(a.seq) + a.new_tokens / 2.0;  // cache length, mid-decode
  const double bytes = static_cast<double>(lc.layers * per_layer) * static_cast<double>(dtype_size(dt)) +
                       4.0 * static_cast<double>(D * lc.vocab) +  // the LM head, fp32
                       2.0 * static_cast<double>(lc.layers * K) * mid * static_cast<double>(dtype_size(dt));
  const double prefill_rate = flops / prefill * 1e-9, decode_gbs = bytes / tpot * 1e-9;
  if (a.json) {
    print_json({{"arch", arch_name(lc.arch)},
                {"params", m.num_params()},
                {"dtype", a.dtype},
                {"threads", T},
                {"seq", a.seq},
                {"gemm_gflops", gemm},
                {"read_bandwidth_gbs", bw},
                {"prefill_seconds", prefill},
                {"prefill_tokens_per_s", static_cast<double>(a.seq) / prefill},
                {"prefill_gflops", prefill_rate},
                {"prefill_gemm_ratio", prefill_rate / gemm},
                {"tpot_ms", tpot * 1e3},
                {"decode_bytes_per_step", bytes},
                {"decode_gbs", decode_gbs},
                {"decode_bandwidth_ratio", decode_gbs / bw}});
    return;
  }
  std::printf(
      "bench lm  %s, %lld layers, d_model %lld, %lld/%lld heads x %lld, mlp %lld, vocab %lld (%.1fM params), "
      "%s, %d threads\n",
      arch_name(lc.arch), static_cast<long long>(lc.layers), static_cast<long long>(D),
      static_cast<long long>(lc.heads), static_cast<long long>(lc.kv_heads), static_cast<long long>(lc.head_dim),
      static_cast<long long>(F), static_cast<long long>(lc.vocab), static_cast<double>(m.num_params()) * 1e-6,
      a.dtype.c_str(), T);
  std::printf("measured  oneDNN GEMM %.1f GFLOP/s (n=1024), read bandwidth %.1f GB/s\n", gemm, bw);
  std::printf("prefill   %lld tokens in %.3f s = %.0f tokens/s, %.1f GFLOP/s = %.2f of the GEMM rate (target 0.50)\n",
              static_cast<long long>(a.seq), prefill, static_cast<double>(a.seq) / prefill, prefill_rate,
              prefill_rate / gemm);
  std::printf(
      "decode    %.3f ms per token (median of %zu), %.1f MB read per step = %.1f GB/s = %.2f of the read "
      "bandwidth (target 0.60)\n",
      tpot * 1e3, steps.size(), bytes * 1e-6, decode_gbs, decode_gbs / bw);
}

}  // namespace

void add_bench_lm(CLI::App* bench) {
  auto a = std::make_shared<BenchLmArgs>();
  auto* cmd = bench->add_subcommand("lm", "a language model's prefill vs the GEMM rate and decode vs read bandwidth");
  auto* model = cmd->add_option("--model", a->model, "a Hugging Face checkpoint folder");
  cmd->add_option("--config", a->config, "or a config.json (weights drawn from --seed)")->excludes(model);
  cmd->add_option("--seq", a->seq, "prompt tokens")->check(positive_count())->capture_default_str();
  cmd->add_option("--new-tokens", a->new_tokens, "decode steps timed")
      ->check(CLI::Range(2, 1 << 20))
      ->capture_default_str();
  cmd->add_option("--threads", a->threads, "threads (default: all CPUs)")->check(thread_count());
  cmd->add_option("--dtype", a->dtype, "fp32, or bf16 mixed precision")
      ->check(CLI::IsMember({"fp32", "bf16"}))
      ->capture_default_str();
  cmd->add_option("--seed", a->seed, "weights (--config) and prompt seed")->check(seed_value())->capture_default_str();
  cmd->add_flag("--json", a->json, "machine-readable output");
  cmd->callback([a] { run_bench_lm(*a); });
}

}  // namespace ringattn::cli
