// `ringattn compare`: the paper's experiment scaled to this machine. One dense
// transformer (same weights for every method) run on the local ranks with RA+SP,
// Ulysses, all-gather KV, TP, PP and TP × PP: forward (prefill) and training-step
// throughput, time per output token (prefill into a KV cache, then decode: see
// `ringattn generate`), peak memory and bytes moved per rank, in one table. The
// model is the vector transformer of --layers/--d-model/..., or with --config a
// language model's architecture (a Hugging Face config.json; weights from the
// seed) run whole: token ids in, embedding, layers, final norm, chunked LM head
// and next-token loss, generation of tokens.
//
// `ringattn compare` is a launcher: it starts one `mpirun -np R ringattn compare
// --method M --json` per method, so every method is measured in fresh processes
// (allocator and cache state left by one method measurably slowed the next when
// they shared a process), and a method that fails does not take the others down.
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <random>
#include <thread>

#include "cli/commands.h"
#include "cli/generation.h"
#include "cli/launch.h"
#include "ringattn/atomic_file.h"
#include "ringattn/error.h"
#include "ringattn/lm.h"
#include "ringattn/lm_config.h"
#include "ringattn/memory.h"
#include "ringattn/model.h"
#include "ringattn/parallel.h"
#include "ringattn/perf.h"
#include "ringattn/pipeline.h"

namespace ringattn::cli {
namespace {

struct CompareArgs {
  ModelConfig model;  // 4 layers, d_model 256, 4 heads x 64, MLP 4 x d_model, causal, seed 1
  int64_t batch = 2, seq = 8192;
  int threads = 1, ranks = 0, reps = 1, new_tokens = 16;
  std::string dtype = "fp32", json_out, only, method, launcher, config;
  double timeout = 600;
  bool json = false;
};

// One method of the comparison: its mesh (pp x sp x tp, dp = 1), the attention
// across the SP group, the sequence layout, and for the hybrid its Ulysses degree.
struct Method {
  std::string id, name;
  ParallelConfig par;
};

std::vector<Method> methods_for(int P) {
  auto method = [](std::string id, std::string name, int pp, int sp, int tp, Strategy s, int ulysses = 1) {
    Method m{std::move(id), std::move(name), {}};
    m.par.pp = pp, m.par.sp = sp, m.par.tp = tp, m.par.strategy = s, m.par.ulysses = ulysses;
    return m;
  };
  std::vector<Method> m = {method("ring", "RA+SP (ring, zigzag)", 1, P, 1, Strategy::ring),
                           method("ulysses", "Ulysses", 1, P, 1, Strategy::ulysses),
                           method("allgather", "all-gather KV", 1, P, 1, Strategy::allgather),
                           method("tp", "TP", 1, 1, P, Strategy::ring), method("pp", "PP", P, 1, 1, Strategy::ring)};
  if (P >= 4 && P % 2 == 0) {
    m.push_back(method("tpxpp", "TP x PP", 2, 1, P / 2, Strategy::ring));
    m.push_back(method("hybrid", "Ulysses(2) x ring", 1, P, 1, Strategy::hybrid, 2));
  }
  return m;
}

// The method as data, in every row of `compare --json` (measured, skipped or
// failed), so that `plan --validate` reads the layout instead of parsing names.
nlohmann::json method_json(const Method& m) {
  return {{"method", m.name},
          {"id", m.id},
          {"dp", m.par.dp},
          {"pp", m.par.pp},
          {"sp", m.par.sp},
          {"tp", m.par.tp},
          {"strategy", strategy_name(m.par.strategy)},
          {"layout", layout_name(m.par.layout)},
          {"ulysses", m.par.ulysses}};
}

struct Result {
  std::string name, why_skipped;
  double fwd_s = 0, train_s = 0, loss = 0;
  double peak_bytes = 0, fwd_bytes = 0, train_bytes = 0;
  double tpot_s = 0, tpot_p99_s = 0, step_bytes = 0, cache_bytes = 0;
};

// Why a method cannot run with this model and data ("" when it can).
std::string unsupported(const Method& m, const CompareArgs& a) {
  if (m.par.pp > 1 && a.batch < m.par.pp) return cat("needs batch >= pp=", m.par.pp, " for micro-batches");
  return error_of([&] {
    check_model_fits(a.model, m.par);
    m.par.check_sequence(a.seq);
  });
}

// The language model's TPOT column: lm_generate from the batch's prompts (ids
// [batch, seq]) for new_tokens decode steps after the first token, greedy, no EOS;
// a short untimed generation warms up first. Each step's time is the slowest
// rank's; bytes are the busiest rank's per step.
void measure_lm_generation(RunContext& run, const Model& model, const std::vector<int64_t>& ids, const CompareArgs& a,
                           Result& r) {
  Communicator& world = *run.world();
  const ParallelConfig& pc = run.config();
  Communicator* pp = pc.pp > 1 ? run.mesh().pp_comm.get() : nullptr;
  const int64_t warm = std::min<int64_t>(a.seq, 2 * pc.sp);  // a short prompt every layout splits
  LmGenerateOptions o;
  o.new_tokens = 2;
  lm_generate(model, run.model_parallel(), std::vector<int64_t>(ids.begin(), ids.begin() + warm), 1, warm, o, pp);
  std::vector<double> steps;
  double t_last = 0;
  o.new_tokens = a.new_tokens + 1;
  o.on_prefilled = [&](const KVCache& cache) { r.cache_bytes = static_cast<double>(cache.bytes()); };
  o.on_token = [&](std::span<const int64_t>) {
    const double now = now_seconds();
    if (t_last > 0)
      steps.push_back(now - t_last);
    else
      run.reset_stats();  // the first token: the prefill is over
    t_last = now;
  };
  world.barrier();
  lm_generate(model, run.model_parallel(), ids, a.batch, a.seq, o, pp);
  r.step_bytes = static_cast<double>(run.bytes_sent()) / static_cast<double>(steps.size());
  world.all_reduce(steps.data(), steps.size(), ReduceOp::max);
  double maxes[2] = {r.step_bytes, r.cache_bytes};
  world.all_reduce(maxes, 2, ReduceOp::max);
  r.step_bytes = maxes[0], r.cache_bytes = maxes[1];
  r.tpot_s = percentile(steps, 50), r.tpot_p99_s = percentile(steps, 99);
}

Result measure(Communicator& world, const CompareArgs& a, const Method& me) {
  Result r;
  r.name = me.name;
  r.why_skipped = unsupported(me, a);
  if (!r.why_skipped.empty()) return r;
  ParallelConfig pc = me.par;
  pc.threads = a.threads;
  RunContext run(&world, pc);
  const ModelParallel& par = run.model_parallel();
  Mesh& mesh = run.mesh();
  Model model = model_for(a.model, run);
  AdamW opt;
  const int micro = pc.pp > 1 ? static_cast<int>(a.batch) : 1;
  // One pass over the batch: the forward (train = false) or a training step.
  std::function<double(bool)> pass;
  Tensor x, t;
  std::vector<int64_t> ids;
  if (a.model.is_lm()) {  // token ids [batch, seq], the same on every rank
    std::mt19937_64 rng(a.model.seed + 1);
    ids.resize(static_cast<size_t>(a.batch * a.seq));
    for (int64_t& id : ids) id = static_cast<int64_t>(rng() % static_cast<uint64_t>(a.model.vocab));
    Communicator* pp = pc.pp > 1 ? mesh.pp_comm.get() : nullptr;
    const int64_t targets = a.batch * (a.seq - 1);
    pass = [&, pp, targets](bool train) {
      if (!train) return lm_loss(model, par, ids, a.batch, a.seq, targets, run.replicas(), pp, micro);
      model.zero_grads();
      const double loss = lm_loss_backward(model, par, ids, a.batch, a.seq, targets, run.replicas(), pp, micro);
      if (Communicator* reps = run.replicas()) reps->all_reduce(model.grads(), model.num_params(), ReduceOp::sum);
      opt.update(model);
      return loss;
    };
  } else {
    const int64_t D = a.model.d_model, Ll = run.shard_length(a.seq), count = a.batch * a.seq * D;
    x = Tensor(DType::f32, {a.batch, Ll, D}), t = Tensor(DType::f32, {a.batch, Ll, D});
    std::mt19937_64 rng(a.model.seed + 1);
    run.shard_batch(random_normal(DType::f32, {a.batch, a.seq, D}, rng), x);
    run.shard_batch(random_normal(DType::f32, {a.batch, a.seq, D}, rng), t);
    pass = [&, count](bool train) {
      return pipeline_step(model, train ? &opt : nullptr, x, t, par, *mesh.pp_comm, micro, count, run.replicas(),
                           train);
    };
  }
  world.barrier();
  reset_peak_memory();
  // The first run of each pass warms up (GEMM primitives, pages); the best of the
  // next `reps` is reported (the slowest rank's time, the busiest rank's bytes).
  auto timed = [&](bool train, double* seconds, double* bytes) {
    *seconds = 1e30;
    for (int rep = 0; rep <= a.reps; ++rep) {
      world.barrier();
      run.reset_stats();
      const double t0 = now_seconds();
      r.loss = pass(train);
      double dt = now_seconds() - t0, b = static_cast<double>(run.bytes_sent());
      world.all_reduce(&dt, 1, ReduceOp::max);
      world.all_reduce(&b, 1, ReduceOp::max);
      if (rep > 0) *seconds = std::min(*seconds, dt);
      *bytes = b;
    }
  };
  timed(false, &r.fwd_s, &r.fwd_bytes);
  timed(true, &r.train_s, &r.train_bytes);
  r.peak_bytes = static_cast<double>(memory_stats().peak_bytes);
  world.all_reduce(&r.peak_bytes, 1, ReduceOp::max);
  // Inference: prefill the batch's sequences into a KV cache, then decode.
  x = Tensor(), t = Tensor();
  if (a.model.is_lm()) {
    measure_lm_generation(run, model, ids, a, r);
    return r;
  }
  std::vector<Tensor> prompts;
  {
    const int64_t D = a.model.d_model;
    std::mt19937_64 rng(a.model.seed + 2);
    for (int64_t b = 0; b < a.batch; ++b) prompts.push_back(random_normal(DType::f32, {1, a.seq, D}, rng));
  }
  const GenerationRun g =
      run_generation(run, model, prompts, a.new_tokens, KVCache::capacity_for(a.seq, a.new_tokens, pc.sp));
  r.tpot_s = percentile(g.step_seconds, 50), r.tpot_p99_s = percentile(g.step_seconds, 99);
  r.step_bytes = g.step_bytes, r.cache_bytes = g.cache_bytes;
  return r;
}

nlohmann::json result_json(const Method& me, const Result& r, double tokens) {
  nlohmann::json m = method_json(me);
  if (!r.why_skipped.empty()) {
    m["skipped"] = r.why_skipped;
    return m;
  }
  m["forward_seconds"] = r.fwd_s;
  m["train_step_seconds"] = r.train_s;
  m["forward_tokens_per_s"] = tokens / r.fwd_s;
  m["train_tokens_per_s"] = tokens / r.train_s;
  m["time_per_output_token_ms"] = r.tpot_s * 1e3;
  m["time_per_output_token_p99_ms"] = r.tpot_p99_s * 1e3;
  m["decode_bytes_per_step_per_rank"] = r.step_bytes;
  m["kv_cache_bytes_per_rank"] = r.cache_bytes;
  m["peak_memory_bytes_per_rank"] = r.peak_bytes;
  m["forward_bytes_per_rank"] = r.fwd_bytes;
  m["train_step_bytes_per_rank"] = r.train_bytes;
  m["loss"] = r.loss;
  return m;
}

// Under mpirun: measure one method, rank 0 prints its JSON.
void run_method(const CompareArgs& a) {
  if (a.threads > 0) omp_set_num_threads(a.threads);
  std::unique_ptr<Communicator> world = mpi_world(a.timeout);
  const std::vector<Method> all = methods_for(world->size());
  auto it = std::find_if(all.begin(), all.end(), [&](const Method& m) { return m.id == a.method; });
  check(it != all.end(), "unknown --method '", a.method, "' for ", world->size(),
        " ranks: use ring, ulysses, allgather, tp, pp, or (4+ ranks) tpxpp, hybrid");
  const Result r = measure(*world, a, *it);
  if (world->rank() == 0) print_json(result_json(*it, r, static_cast<double>(a.batch * a.seq)));
}

// A comparison with a failed method is a failed run (exit 1), after its table
// and JSON are out: the message names each failure.
void check_no_method_failed(const nlohmann::json& j) {
  std::string failed;
  size_t n = 0;
  for (const auto& m : j["methods"])
    if (m.contains("failed"))
      failed += cat(n++ ? "; " : "", m["method"].get<std::string>(), ": ", m["failed"].get<std::string>());
  check(n == 0, n, " of ", j["methods"].size(), " methods failed: ", failed);
}

// The launcher: one mpirun per method, then one table.
void run(CompareArgs a) {
  if (!a.config.empty()) {  // the architecture of a config.json, the run's dtype and seed
    ModelConfig mc = model_config(load_lm_config(a.config));
    mc.dtype = a.model.dtype, mc.seed = a.model.seed;
    a.model = mc;
  }
  a.model.validate();
  if (!a.method.empty()) {
    check(MpiSession::active(), "--method is the per-method run that `ringattn compare` starts under mpirun");
    return run_method(a);
  }
  check(!MpiSession::active() || mpi_world(a.timeout)->size() == 1,
        "run `ringattn compare` directly (not under mpirun): it starts mpirun itself, once per method, with --ranks");
  check_output_paths({{"--json-out", a.json_out}});
  const int P = a.ranks > 0 ? a.ranks : static_cast<int>(std::max(2u, std::thread::hardware_concurrency()));
  const std::string launcher = a.launcher.empty() ? default_launcher(P) : a.launcher;
  const std::string self = self_executable();
  const std::string model_args = a.config.empty()
                                     ? cat(" --layers ", a.model.layers, " --d-model ", a.model.d_model, " --heads ",
                                           a.model.heads, " --kv-heads ", a.model.kv(), " --mlp ", a.model.hidden())
                                     : cat(" --config ", shell_quote(a.config));
  const std::string common = cat(" compare --json", model_args, " --batch ", a.batch, " --seq ", a.seq, " --dtype ",
                                 a.dtype, " --threads ", a.threads, " --reps ", a.reps, " --new-tokens ", a.new_tokens,
                                 " --timeout ", a.timeout > 0 ? cat(a.timeout) : std::string("none"));
  std::vector<Method> methods = methods_for(P);
  if (!a.only.empty())
    std::erase_if(methods, [&](const Method& m) { return m.id != a.only && m.name.find(a.only) == std::string::npos; });
  check(!methods.empty(), "--only '", a.only, "' matches no method");

  nlohmann::json j;
  j["model"] = {{"layers", a.model.layers},       {"d_model", a.model.d_model}, {"heads", a.model.heads},
                {"head_dim", a.model.head_dim()}, {"kv_heads", a.model.kv()},   {"mlp_hidden", a.model.hidden()},
                {"causal", a.model.causal}};
  if (!a.config.empty()) {
    const LmConfig lc = load_lm_config(a.config);
    j["model"]["config"] = a.config, j["model"]["arch"] = arch_name(lc.arch), j["model"]["vocab"] = lc.vocab;
    j["model"]["tied"] = lc.tie_embeddings, j["model"]["sliding_window"] = lc.sliding_window;
  }
  j["batch"] = a.batch, j["seq"] = a.seq, j["ranks"] = P, j["threads_per_rank"] = a.threads, j["dtype"] = a.dtype;
  j["launcher"] = launcher;
  j["methods"] = nlohmann::json::array();
  for (size_t i = 0; i < methods.size(); ++i) {
    if (!a.json) progress(cat("[", i + 1, "/", methods.size(), "] ", methods[i].name, " on ", P, " ranks ..."));
    const std::string cmd = cat(launcher, " -np ", P, " ", shell_quote(self), common, " --method ", methods[i].id);
    try {
      j["methods"].push_back(nlohmann::json::parse(capture(cmd)));
    } catch (const std::exception& e) {
      nlohmann::json failed = method_json(methods[i]);
      failed["failed"] = e.what();
      j["methods"].push_back(failed);
    }
  }
  if (!a.json) progress_done();
  if (!a.json_out.empty()) {
    const std::string text = j.dump(2) + "\n";
    write_file_atomically(a.json_out, [&](std::FILE* f) { return std::fputs(text.c_str(), f) >= 0; });
  }
  if (a.json) {
    print_json(j);
    return check_no_method_failed(j);
  }
  std::printf(
      "compare  %s%lld layers, d_model %lld = %lld heads x %lld, kv heads %lld, MLP %lld; batch %lld x seq %lld; "
      "%d ranks x %d thread(s), %s\n\n",
      a.config.empty() ? ""
                       : cat(j["model"]["arch"].get<std::string>(), " (", a.config, ", vocab ", a.model.vocab,
                             ", weights from the seed): ")
                             .c_str(),
      static_cast<long long>(a.model.layers), static_cast<long long>(a.model.d_model),
      static_cast<long long>(a.model.heads), static_cast<long long>(a.model.head_dim()),
      static_cast<long long>(a.model.kv()), static_cast<long long>(a.model.hidden()), static_cast<long long>(a.batch),
      static_cast<long long>(a.seq), P, a.threads, a.dtype.c_str());
  std::printf("%-22s %-12s %11s %11s %9s %13s %13s %13s %13s\n", "method", "pp x sp x tp", "fwd tok/s", "train tok/s",
              "TPOT ms", "peak MiB/rank", "fwd MiB/rank", "train MiB/rank", "KiB/rank/step");
  for (const auto& m : j["methods"]) {
    const std::string mesh = cat(m["pp"].get<int>(), " x ", m["sp"].get<int>(), " x ", m["tp"].get<int>());
    const std::string name = m["method"].get<std::string>();
    if (m.contains("skipped") || m.contains("failed")) {
      std::printf("%-22s %-12s %s: %s\n", name.c_str(), mesh.c_str(), m.contains("failed") ? "FAILED" : "skipped",
                  (m.contains("failed") ? m["failed"] : m["skipped"]).get<std::string>().c_str());
      continue;
    }
    std::printf("%-22s %-12s %11.0f %11.0f %9.2f %13.1f %13.1f %13.1f %13.1f\n", name.c_str(), mesh.c_str(),
                m["forward_tokens_per_s"].get<double>(), m["train_tokens_per_s"].get<double>(),
                m["time_per_output_token_ms"].get<double>(), m["peak_memory_bytes_per_rank"].get<double>() / 1048576.0,
                m["forward_bytes_per_rank"].get<double>() / 1048576.0,
                m["train_step_bytes_per_rank"].get<double>() / 1048576.0,
                m["decode_bytes_per_step_per_rank"].get<double>() / 1024.0);
  }
  std::printf(
      "\nTPOT: median time per output token over %d decode steps of all %lld sequences after prefilling "
      "them into a KV cache (RA+SP, Ulysses, all-gather: sharded by sequence; TP: by head; PP: by layer).\n"
      "peak MiB/rank: through the training step; KiB/rank/step: sent per decode step.\n",
      a.new_tokens, static_cast<long long>(a.batch));
  if (!a.json_out.empty()) std::printf("results written to %s\n", a.json_out.c_str());
  check_no_method_failed(j);
}

}  // namespace

void add_compare(CLI::App& app) {
  auto a = std::make_shared<CompareArgs>();
  auto* cmd = app.add_subcommand("compare",
                                 "the paper's comparison on the local ranks: RA+SP vs Ulysses, all-gather, TP, PP, "
                                 "TP x PP (starts mpirun itself, once per method)");
  add_model_options(cmd, a->model);
  auto* config = cmd->add_option("--config", a->config,
                                 "a language model's config.json or checkpoint folder (llama, mistral, qwen2, gpt2): "
                                 "its architecture whole, ids in and next-token loss out, weights from the seed");
  for (const char* vector_only : {"--layers", "--d-model", "--heads", "--kv-heads", "--mlp"})
    config->excludes(cmd->get_option(vector_only));
  cmd->add_option("--batch", a->batch, "sequences per step (PP uses one micro-batch per sequence)")
      ->check(positive_count())
      ->capture_default_str();
  cmd->add_option("--seq", a->seq, "sequence length")->check(positive_count())->capture_default_str();
  cmd->add_option("--dtype", a->dtype, "fp32, or bf16 mixed precision (fp32 master weights and accumulation)")
      ->check(CLI::IsMember({"fp32", "bf16"}))
      ->each([a](const std::string& s) { a->model.dtype = parse_dtype(s); })
      ->capture_default_str();
  cmd->add_option("--threads", a->threads, "threads per rank")->check(thread_count())->capture_default_str();
  cmd->add_option("--reps", a->reps, "timed runs per pass after one warm-up; the best is reported")
      ->check(positive_count())
      ->capture_default_str();
  cmd->add_option("--new-tokens", a->new_tokens, "decode steps for the TPOT column")
      ->check(positive_count())
      ->capture_default_str();
  cmd->add_option("--ranks", a->ranks, "ranks per method (default: the number of CPUs)")->check(positive_count());
  cmd->add_option(
      "--launcher", a->launcher,
      "the mpirun command line before -np (default: mpirun --bind-to none --mca pml ob1 --mca btl self,vader, plus "
      "--allow-run-as-root as root and --oversubscribe beyond the CPU count)");
  cmd->add_option("--method", a->method,
                  "measure one method under mpirun: ring, ulysses, allgather, tp, "
                  "pp, tpxpp, hybrid")
      ->group("");  // internal: how compare starts each method under mpirun; not in --help
  cmd->add_option("--only", a->only, "run only the method with this id (ring, ulysses, ...) or whose name contains it");
  cmd->add_option("--json-out", a->json_out,
                  "also write the results as JSON to this file (for scripts/plot_compare.py)");
  add_timeout_option(cmd, a->timeout);
  cmd->add_flag("--json", a->json, "machine-readable output on stdout");
  cmd->callback([a] { run(*a); });
}

}  // namespace ringattn::cli
