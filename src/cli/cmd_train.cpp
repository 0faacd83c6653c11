// `ringattn train`: the dense transformer trained with RA+SP (× data parallel)
// on the local ranks: forward (prefill) and training-step throughput, loss,
// peak memory and bytes moved per rank.
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <random>

#include "cli/commands.h"
#include "ringattn/cuda.h"
#include "ringattn/error.h"
#include "ringattn/memory.h"
#include "ringattn/model.h"
#include "ringattn/parallel.h"
#include "ringattn/perf.h"
#include "ringattn/pipeline.h"

namespace ringattn::cli {
namespace {

struct TrainArgs {
  ModelConfig model;
  ParallelConfig par;
  int64_t batch = 1, seq = 2048;
  int steps = 3;
  std::string dtype = "fp32";
  float lr = 1e-3f;
  double timeout = 300;
  bool json = false;
};

void run(const TrainArgs& a) {
  if (a.par.threads > 0) omp_set_num_threads(a.par.threads);  // GEMMs and layers too, not only attention
  std::unique_ptr<Communicator> world;
  if (MpiSession::active()) world = mpi_world(a.timeout);
  const int P = world ? world->size() : 1, rank = world ? world->rank() : 0;
  const ParallelConfig pc = a.par.for_ranks(P);
  check(a.batch % pc.dp == 0, "--batch ", a.batch, " must be divisible by --dp ", pc.dp);
  check(a.batch / pc.dp % pc.pp == 0, "--batch ", a.batch, " / --dp ", pc.dp, " must be divisible by --pp ", pc.pp,
        " (one micro-batch per pipeline stage)");
  check_model_fits(a.model, pc);
  pc.check_sequence(a.seq);
  RunContext run(world.get(), pc);
  const ModelParallel& par = run.model_parallel();
  const int sp = pc.sp;
  const int64_t D = a.model.d_model, Bl = a.batch / pc.dp, Ll = a.seq / sp;

  // The same global data on every rank; each keeps its batch rows and tokens.
  std::mt19937_64 rng(a.model.seed + 1);
  Tensor x(DType::f32, {Bl, Ll, D}), t(DType::f32, {Bl, Ll, D});
  run.shard_batch(random_normal(DType::f32, {a.batch, a.seq, D}, rng), x);
  run.shard_batch(random_normal(DType::f32, {a.batch, a.seq, D}, rng), t);

  Model model = model_for(a.model, run);
  Device& dev = model.device();
  auto on_device = [&](const Tensor& h) { return dev.is_host() ? DeviceTensor(nullptr, h.view()) : dev.upload(h); };
  const DeviceTensor xd = on_device(x), td = on_device(t);
  AdamW opt;
  opt.lr = a.lr;
  const int64_t count = a.batch * a.seq * D;
  Communicator* replicas = run.replicas();
  // One step (or, train = false, the forward alone), complete on the device when
  // it returns: 1F1B over the pipeline stages under MPI on the host (the plain
  // step when pp = 1), train_step on one process or a GPU.
  auto step = [&](bool train) {
    if (world && dev.is_host())
      return pipeline_step(model, train ? &opt : nullptr, x, t, par, *run.mesh().pp_comm, pc.pp, count, replicas,
                           train);
    double loss = 0;
    if (train) {
      loss = train_step(model, opt, xd, td, par, count, replicas);
    } else {
      Activations act;
      model_forward(model, xd, par, act);
    }
    dev.synchronize();
    return loss;
  };
  // Bytes sent: the mesh's groups (MPI), and on GPUs the NCCL communicator.
  auto sent = [&] { return run.bytes_sent(); };
  auto reset_sent = [&] { run.reset_stats(); };
  if (world) world->barrier(), world->reset_stats();
  reset_peak_memory();

  // Forward only (prefill), activations kept as training would; the first run
  // also warms up (GEMM primitives, pages), so the second is timed.
  double t_fwd = 0, t0 = 0;
  int64_t fwd_bytes = 0;
  for (int rep = 0; rep < 2; ++rep) {
    reset_sent();
    t0 = now_seconds();
    step(false);
    t_fwd = now_seconds() - t0;
    fwd_bytes = sent();
  }
  reset_sent();
  std::vector<double> losses, step_times;
  for (int s = 0; s < a.steps; ++s) {
    if (!a.json && rank == 0) progress(cat("step ", s + 1, "/", a.steps));
    t0 = now_seconds();
    losses.push_back(step(true));
    step_times.push_back(now_seconds() - t0);
  }
  if (!a.json && rank == 0) progress_done();
  double mine[3] = {static_cast<double>(memory_stats().peak_bytes), static_cast<double>(sent()),
                    static_cast<double>(fwd_bytes)};
  std::vector<double> all(3 * static_cast<size_t>(P));
  if (world)
    world->all_gather(mine, all.data(), sizeof(mine));
  else
    std::copy(mine, mine + 3, all.begin());
  if (rank != 0) return;

  double best_step = *std::min_element(step_times.begin(), step_times.end());
  const double tokens = static_cast<double>(a.batch * a.seq);
  nlohmann::json j;
  j["model"] = {{"layers", a.model.layers},       {"d_model", D},
                {"heads", a.model.heads},         {"kv_heads", a.model.kv()},
                {"mlp_hidden", a.model.hidden()}, {"causal", a.model.causal},
                {"params", model.num_params()}};
  j["batch"] = a.batch, j["seq"] = a.seq, j["dp"] = pc.dp, j["pp"] = pc.pp, j["sp"] = sp, j["tp"] = pc.tp,
  j["ranks"] = P;
  j["strategy"] = strategy_name(pc.strategy), j["ulysses"] = pc.ulysses, j["layout"] = layout_name(pc.layout);
  j["dtype"] = a.dtype;
  j["device"] = dev.name();
  j["forward_seconds"] = t_fwd;
  j["forward_tokens_per_s"] = tokens / t_fwd;
  j["train_step_seconds"] = step_times;
  j["train_tokens_per_s"] = tokens / best_step;
  j["loss"] = losses;
  j["per_rank"] = nlohmann::json::array();
  for (int r = 0; r < P; ++r)
    j["per_rank"].push_back({{"rank", r},
                             {"peak_memory_bytes", all[3 * r]},
                             {"bytes_sent", all[3 * r + 1]},
                             {"forward_bytes_sent", all[3 * r + 2]}});
  // A loss that is not finite is a failed run (after the report): the step diverged.
  auto check_loss = [&] {
    for (size_t s = 0; s < losses.size(); ++s)
      check(std::isfinite(losses[s]), "the loss is ", losses[s], " after step ", s + 1,
            ": training diverged (try a smaller --lr than ", a.lr, ")");
  };
  if (a.json) {
    print_json(j);
    return check_loss();
  }
  std::printf(
      "train  layers=%lld d_model=%lld heads=%lld/%lld mlp=%lld  B=%lld L=%lld  dp=%d x pp=%d x sp=%d x tp=%d "
      "(%s, %s, %s)\n",
      static_cast<long long>(a.model.layers), static_cast<long long>(D), static_cast<long long>(a.model.heads),
      static_cast<long long>(a.model.kv()), static_cast<long long>(a.model.hidden()), static_cast<long long>(a.batch),
      static_cast<long long>(a.seq), pc.dp, pc.pp, sp, pc.tp, pc.strategy_label().c_str(), layout_name(pc.layout),
      a.dtype.c_str());
  if (!dev.is_host()) std::printf("device %s (peak MiB below counts host memory only)\n", dev.name().c_str());
  std::printf("forward (prefill)   %10.1f ms   %10.0f tokens/s\n", t_fwd * 1e3, tokens / t_fwd);
  std::printf("training step (best of %d) %6.1f ms   %10.0f tokens/s\n", a.steps, best_step * 1e3, tokens / best_step);
  std::printf("loss by step:");
  for (double l : losses) std::printf(" %.5f", l);
  std::printf("\n%4s %12s %22s %18s\n", "rank", "peak MiB", "sent MiB (all steps)", "sent MiB (forward)");
  for (int r = 0; r < P; ++r)
    std::printf("%4d %12.1f %22.1f %18.1f\n", r, all[3 * r] / 1048576.0, all[3 * r + 1] / 1048576.0,
                all[3 * r + 2] / 1048576.0);
  check_loss();
}

}  // namespace

void add_train(CLI::App& app) {
  auto a = std::make_shared<TrainArgs>();
  auto* cmd =
      app.add_subcommand("train",
                         "train the dense transformer with RA+SP (x data x tensor parallel) under mpirun: throughput, "
                         "loss, memory, bytes");
  add_model_options(cmd, a->model);
  cmd->add_flag("!--bidirectional", a->model.causal, "no causal mask");
  cmd->add_option("--seed", a->model.seed, "weights and data seed")->check(seed_value())->capture_default_str();
  add_model_dtype_option(cmd, a->model, a->dtype, "fp32 master weights and accumulation");
  cmd->add_option("--batch", a->batch, "global batch")->check(positive_count())->capture_default_str();
  cmd->add_option("--seq", a->seq, "sequence length")->check(positive_count())->capture_default_str();
  cmd->add_option("--steps", a->steps, "training steps")->check(positive_count())->capture_default_str();
  cmd->add_option("--lr", a->lr, "AdamW learning rate")->check(positive_finite())->capture_default_str();
  add_parallel_options(cmd, a->par, true);
  add_timeout_option(cmd, a->timeout);
  cmd->add_flag("--json", a->json, "machine-readable output");
  cmd->callback([a] { run(*a); });
}

}  // namespace ringattn::cli
