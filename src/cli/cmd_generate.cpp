// `ringattn generate`: long-context inference on the local ranks. The prompt is
// prefilled with RA+SP (or TP, PP) into a KV cache that stays where it was
// computed, then new tokens are decoded, each fed the previous output (the model
// works on vectors, so "generation" continues the sequence with its own outputs).
// Prints prefill time and tokens/s, time per output token (median, p99), bytes
// moved per step and cache memory per rank; --check recomputes the whole
// sequence on one process and reports the largest relative error.
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <random>

#include "cli/commands.h"
#include "cli/generation.h"
#include "ringattn/cuda.h"
#include "ringattn/error.h"
#include "ringattn/layout.h"
#include "ringattn/memory.h"
#include "ringattn/parallel.h"
#include "ringattn/perf.h"

namespace ringattn::cli {
namespace {

struct GenerateArgs {
  ModelConfig model;  // 4 layers, d_model 256, 4 heads x 64, MLP 4 x d_model, causal, seed 1
  ParallelConfig par;
  std::vector<int64_t> prompt_len{8192};
  int64_t batch = 0, capacity = 0;
  int new_tokens = 32;
  std::string dtype = "fp32";
  double timeout = 300;
  bool json = false, check = false;
};

// Largest max|diff| / max|ref| over the decoded outputs against one process
// running the full model over prompt + decode inputs of each sequence.
double check_against_one_process(const ModelConfig& c, const std::vector<Tensor>& prompts, const GenerationRun& r,
                                 int steps) {
  const int64_t B = static_cast<int64_t>(prompts.size()), D = c.d_model;
  Model full(c);
  double worst = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = prompts[static_cast<size_t>(b)].dim(1);
    Tensor seq(DType::f32, {1, L + steps, D});
    copy_into(seq.view().slice(1, 0, L), prompts[static_cast<size_t>(b)]);
    for (int j = 0; j < steps; ++j) {
      const float* in = j == 0 ? r.first_inputs.data() + b * D : r.outputs.data() + ((j - 1) * B + b) * D;
      std::copy(in, in + D, seq.ptr<float>() + (L + j) * D);
    }
    Activations act;
    act.keep = false;
    const DeviceTensor ref = model_forward(full, seq, ModelParallel{}, act);
    double num = 0, den = 0;
    for (int j = 0; j < steps; ++j)
      for (int64_t e = 0; e < D; ++e) {
        const double want = ref.ptr<float>()[(L + j) * D + e], got = r.outputs[((j * B) + b) * D + e];
        num = std::max(num, std::fabs(got - want));
        den = std::max(den, std::fabs(want));
      }
    worst = std::max(worst, num / den);
  }
  return worst;
}

void run_on(const GenerateArgs& a, Communicator& world) {
  if (a.par.threads > 0) omp_set_num_threads(a.par.threads);
  const int P = world.size(), rank = world.rank();
  const ParallelConfig pc = a.par.for_ranks(P);
  const int sp = pc.sp, tp = pc.tp, pp = pc.pp;
  check(pp == 1 || (sp == 1 && tp == 1), "generate runs pipeline stages alone: --pp ", pp, " needs --sp 1 --tp 1");
  check_model_fits(a.model, pc);
  // --prompt-len L (every sequence) or L1,L2,... (one per sequence).
  std::vector<int64_t> lens = a.prompt_len;
  check(a.batch == 0 || lens.size() == 1 || static_cast<int64_t>(lens.size()) == a.batch, "--batch ", a.batch,
        " and the ", lens.size(), " prompt lengths of --prompt-len differ");
  if (lens.size() == 1 && a.batch > 1) lens.assign(static_cast<size_t>(a.batch), lens[0]);
  for (int64_t L : lens) pc.check_sequence(L);
  const int64_t B = static_cast<int64_t>(lens.size()), D = a.model.d_model;
  const int64_t longest = *std::max_element(lens.begin(), lens.end());
  const int64_t capacity = a.capacity > 0 ? a.capacity : needed_capacity(longest, a.new_tokens, sp);
  // The KV cache of this rank: K and V of its layers, sequences, entries and kv heads.
  const ModelConfig& mc = a.model;
  check_fits_in_memory(2.0 * (double(mc.layers) / pp) * double(B) * double(capacity) * (double(mc.kv()) / tp) *
                           double(mc.head_dim()) * double(dtype_size(mc.dtype)),
                       cat("the KV cache (", capacity, " entries per sequence and rank)"));

  RunContext run(&world, pc);
  Model model = model_for(a.model, run);
  std::vector<Tensor> prompts;
  std::mt19937_64 rng(a.model.seed + 1);
  for (int64_t L : lens) prompts.push_back(random_normal(DType::f32, {1, L, D}, rng));
  reset_peak_memory();
  const bool show = !a.json && rank == 0;
  if (show) progress("prefill ...");
  const GenerationRun r = run_generation(run, model, prompts, a.new_tokens, capacity, [&](int j) {
    if (show && (j % 8 == 0)) progress(cat("decode step ", j + 1, "/", a.new_tokens));
  });
  if (show) progress_done();
  double peak = static_cast<double>(memory_stats().peak_bytes);
  world.all_reduce(&peak, 1, ReduceOp::max);
  double err = -1;
  if (a.check && rank == 0) {
    if (show) progress("check: recomputing on one process ...");
    err = check_against_one_process(a.model, prompts, r, a.new_tokens);
    if (show) progress_done();
  }
  if (rank != 0) return;

  int64_t prompt_tokens = 0;
  for (int64_t L : lens) prompt_tokens += L;
  const double med = percentile(r.step_seconds, 50), p99 = percentile(r.step_seconds, 99);
  nlohmann::json j;
  j["model"] = {{"layers", a.model.layers},
                {"d_model", D},
                {"heads", a.model.heads},
                {"kv_heads", a.model.kv()},
                {"mlp_hidden", a.model.hidden()}};
  j["dp"] = 1, j["sp"] = sp, j["tp"] = tp, j["pp"] = pp, j["ranks"] = P;
  j["strategy"] = strategy_name(pc.strategy), j["layout"] = layout_name(pc.layout);
  j["prompt_lengths"] = lens, j["new_tokens"] = a.new_tokens, j["cache_capacity_per_rank"] = capacity;
  j["prefill_seconds"] = r.prefill_seconds;
  j["prefill_tokens_per_s"] = static_cast<double>(prompt_tokens) / r.prefill_seconds;
  j["tpot_median_ms"] = med * 1e3, j["tpot_p99_ms"] = p99 * 1e3;
  j["step_seconds"] = r.step_seconds;
  j["prefill_bytes_per_rank"] = r.prefill_bytes, j["bytes_per_step_per_rank"] = r.step_bytes;
  j["cache_bytes_per_rank"] = r.cache_bytes, j["peak_memory_bytes_per_rank"] = peak;
  // bf16: the same roundings of the same values, but summation orders differ and
  // can move a rounding by one bf16 step, which later layers carry.
  const double limit = a.model.dtype == DType::bf16 ? 2e-2 : 1e-5;
  if (a.check) j["max_rel_error_vs_one_process"] = err;
  j["dtype"] = a.dtype;
  j["device"] = model.device().name();
  const bool ok = !a.check || err <= limit;
  if (a.json) {
    print_json(j);
  } else {
    std::printf(
        "generate  %lld layers, d_model %lld = %lld heads x %lld, kv heads %lld, %s; pp %d x sp %d x tp %d "
        "(strategy %s, layout %s); %d ranks\n",
        static_cast<long long>(a.model.layers), static_cast<long long>(D), static_cast<long long>(a.model.heads),
        static_cast<long long>(a.model.head_dim()), static_cast<long long>(a.model.kv()), a.dtype.c_str(), pp, sp, tp,
        strategy_name(pc.strategy), layout_name(pc.layout), P);
    if (!model.device().is_host())
      std::printf("device %s (peak below counts host memory only)\n", model.device().name().c_str());
    std::printf("prompts %lld x ", static_cast<long long>(B));
    for (size_t i = 0; i < lens.size(); ++i) std::printf("%s%lld", i ? "," : "", static_cast<long long>(lens[i]));
    std::printf(" tokens, %d new tokens each\n\n", a.new_tokens);
    std::printf("prefill                %10.1f ms   %10.0f tokens/s   %10.1f MiB sent/rank\n", r.prefill_seconds * 1e3,
                static_cast<double>(prompt_tokens) / r.prefill_seconds, r.prefill_bytes / 1048576.0);
    std::printf("time per output token  %10.3f ms median, %.3f ms p99 (%d steps)   %10.1f KiB sent/rank/step\n",
                med * 1e3, p99 * 1e3, a.new_tokens, r.step_bytes / 1024.0);
    std::printf("KV cache               %10.1f MiB/rank (capacity %lld entries per sequence)   peak %.1f MiB/rank\n",
                r.cache_bytes / 1048576.0, static_cast<long long>(capacity), peak / 1048576.0);
    if (a.check)
      std::printf("check: max relative error vs one process recomputing the sequence %.2e (limit %.0e) %s\n", err,
                  limit, ok ? "ok" : "FAILED");
  }
  check(ok, "generate --check: the decoded outputs differ from one process by ", err, " (limit ", limit, ")");
}

// Under MPI (mpirun, or a one-rank job MPI starts itself); `--device cuda`
// without mpirun runs its one rank in this process (no MPI needed on a GPU machine).
void run(const GenerateArgs& a) {
  if (MpiSession::active()) return run_on(a, *mpi_world(a.timeout));
  run_device_local_group(1, 0, [&](int, Device&, Communicator& world) { run_on(a, world); });
}

}  // namespace

void add_generate(CLI::App& app) {
  auto a = std::make_shared<GenerateArgs>();
  auto* cmd =
      app.add_subcommand("generate",
                         "long-context inference under mpirun: prefill into a sequence-sharded KV cache (RA+SP), "
                         "TP or PP, then decode; time per output token");
  cmd->add_option("--prompt-len", a->prompt_len, "prompt tokens, one value for every sequence or L1,L2,... (one each)")
      ->delimiter(',')
      ->check(positive_count())
      ->capture_default_str();
  cmd->add_option("--batch", a->batch, "sequences (default: one per --prompt-len value)")->check(positive_count());
  cmd->add_option("--new-tokens", a->new_tokens, "tokens to decode per sequence")
      ->check(positive_count())
      ->capture_default_str();
  add_parallel_options(cmd, a->par, false);
  cmd->add_option("--capacity", a->capacity, "KV cache entries per sequence per rank (default: just enough)")
      ->check(positive_count());
  add_model_options(cmd, a->model);
  cmd->add_option("--seed", a->model.seed, "weights and prompt seed")->check(seed_value())->capture_default_str();
  add_model_dtype_option(cmd, a->model, a->dtype, "bf16 KV cache");
  add_timeout_option(cmd, a->timeout);
  cmd->add_flag("--check", a->check,
                "recompute the whole sequence on one process and compare (exit 1 beyond 1e-5; bf16: 2e-2)");
  cmd->add_flag("--json", a->json, "machine-readable output");
  cmd->callback([a] { run(*a); });
}

}  // namespace ringattn::cli
