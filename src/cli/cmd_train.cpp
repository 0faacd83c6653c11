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
#include "ringattn/perf.h"

namespace ringattn::cli {
namespace {

struct TrainArgs {
  ModelConfig model;
  int64_t batch = 1, seq = 2048;
  int steps = 3, dp = 1, sp = 0, tp = 1, pp = 1, ulysses = 1, threads = 0;
  std::string strategy = "ring", layout = "zigzag", dtype = "fp32", device = "cpu";
  float lr = 1e-3f;
  double timeout = 300;
  bool json = false;
};

Tensor normal_tensor(std::initializer_list<int64_t> shape, std::mt19937_64& rng) {
  Tensor t(DType::f32, shape);
  std::normal_distribution<float> dist(0.f, 1.f);
  for (int64_t i = 0; i < t.numel(); ++i) t.ptr<float>()[i] = dist(rng);
  return t;
}

void run(const TrainArgs& a) {
  if (a.threads > 0) omp_set_num_threads(a.threads);  // GEMMs and layers too, not only attention
  std::unique_ptr<Communicator> world;
  if (MpiSession::active()) world = mpi_world(a.timeout);
  const int P = world ? world->size() : 1, rank = world ? world->rank() : 0;
  check(a.dp >= 1 && a.tp >= 1 && a.pp >= 1, "--dp, --tp and --pp must be >= 1");
  const int sp = a.sp > 0 ? a.sp : P / (a.dp * a.tp * a.pp);
  check(sp >= 1 && a.dp * a.pp * sp * a.tp == P, "--dp ", a.dp, " x --pp ", a.pp, " x --sp ", sp, " x --tp ", a.tp,
        " must equal the ", P, " ranks (run under mpirun -np ", a.dp * a.pp * std::max(sp, 1) * a.tp, ")");
  check(a.batch % a.dp == 0, "--batch ", a.batch, " must be divisible by --dp ", a.dp);
  check(a.batch / a.dp % a.pp == 0, "--batch ", a.batch, " / --dp ", a.dp, " must be divisible by --pp ", a.pp,
        " (one micro-batch per pipeline stage)");
  check(a.steps >= 1, "--steps must be >= 1");
  a.model.validate();
  const Layout layout = parse_layout(a.layout);
  check_layout(layout, a.seq, sp);
  Mesh mesh;
  check(a.ulysses >= 1 && sp % a.ulysses == 0, "--ulysses ", a.ulysses, " must divide the SP group of ", sp, " ranks");
  if (world) mesh = Mesh::build(*world, a.dp, sp, a.tp, a.pp, a.ulysses);

  SequenceParallel spc;
  spc.comm = world ? mesh.sp_comm.get() : nullptr;
  spc.tp = world && a.tp > 1 ? mesh.tp_comm.get() : nullptr;
  spc.attn.strategy = parse_strategy(a.strategy);
  spc.attn.layout = layout;
  spc.attn.threads = a.threads;
  if (world && a.ulysses > 1) mesh.use_hybrid(spc.attn);
  // --device cuda: one GPU per rank (rank mod the GPUs visible), the SP group over
  // NCCL, model, activations and data on the GPU.
  std::unique_ptr<Device> gpu;
  std::unique_ptr<Communicator> nccl;
  if (a.device == "cuda") {
    check(a.dp == 1 && a.tp == 1 && a.pp == 1 && a.ulysses == 1,
          "--device cuda trains with RA+SP alone: --dp, --tp, --pp and --ulysses must be 1");
    check(cuda_built(), "--device cuda: this ringattn was built without the CUDA path");
    check(cuda_device_count() > 0, "--device cuda: no GPU is visible to this process");
    gpu = make_cuda_device(rank % cuda_device_count());
    if (world && P > 1) nccl = nccl_communicator(*world, *gpu);
    spc.comm = nccl.get();
    spc.attn.device = gpu.get();
  }
  const int64_t D = a.model.d_model, Bl = a.batch / a.dp, Ll = a.seq / sp;

  // The same global data on every rank; each keeps its batch rows and tokens.
  std::mt19937_64 rng(a.model.seed + 1);
  Tensor x_full = normal_tensor({a.batch, a.seq, D}, rng), t_full = normal_tensor({a.batch, a.seq, D}, rng);
  const int dpi = world ? mesh.dp_index() : 0, spi = world ? mesh.sp_index() : 0;
  Tensor x(DType::f32, {Bl, Ll, D}), t(DType::f32, {Bl, Ll, D});
  shard(x_full.view().slice(0, dpi * Bl, Bl), x, layout, sp, spi, 1);
  shard(t_full.view().slice(0, dpi * Bl, Bl), t, layout, sp, spi, 1);
  x_full = Tensor(), t_full = Tensor();

  Model model(a.model, a.tp, world ? mesh.tp_index() : 0, a.pp, world ? mesh.pp_index() : 0, gpu.get());
  Device& dev = model.device();
  auto on_device = [&](const Tensor& h) { return dev.is_host() ? DeviceTensor(nullptr, h.view()) : dev.upload(h); };
  const DeviceTensor xd = on_device(x), td = on_device(t);
  AdamW opt;
  opt.lr = a.lr;
  const int64_t count = a.batch * a.seq * D;
  Communicator* replicas = gpu ? nccl.get() : world ? mesh.replica_comm.get() : nullptr;
  // One step (or, train = false, the forward alone), complete on the device when
  // it returns: 1F1B over the pipeline stages under MPI on the host (the plain
  // step when pp = 1), train_step on one process or a GPU.
  auto step = [&](bool train) {
    if (world && !gpu)
      return pipeline_step(model, train ? &opt : nullptr, x, t, spc, *mesh.pp_comm, a.pp, count, replicas, train);
    double loss = 0;
    if (train) {
      loss = train_step(model, opt, xd, td, spc, count, replicas);
    } else {
      Activations act;
      model_forward(model, xd, spc, act);
    }
    dev.synchronize();
    return loss;
  };
  // Bytes sent: the mesh's groups (MPI), and on GPUs the NCCL communicator.
  auto sent = [&] { return (world ? mesh.bytes_sent() : 0) + (nccl ? nccl->stats().bytes_sent : 0); };
  auto reset_sent = [&] {
    if (world) mesh.reset_stats();
    if (nccl) nccl->reset_stats();
  };
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
  double mine[3] = {static_cast<double>(memory_stats().peak_bytes),
                    static_cast<double>(sent()), static_cast<double>(fwd_bytes)};
  std::vector<double> all(3 * static_cast<size_t>(P));
  if (world)
    world->all_gather(mine, all.data(), sizeof(mine));
  else
    std::copy(mine, mine + 3, all.begin());
  if (rank != 0) return;

  double best_step = *std::min_element(step_times.begin(), step_times.end());
  const double tokens = static_cast<double>(a.batch * a.seq);
  nlohmann::json j;
  j["model"] = {{"layers", a.model.layers}, {"d_model", D}, {"heads", a.model.heads}, {"kv_heads", a.model.kv()},
                {"mlp_hidden", a.model.hidden()}, {"causal", a.model.causal}, {"params", model.num_params()}};
  j["batch"] = a.batch, j["seq"] = a.seq, j["dp"] = a.dp, j["pp"] = a.pp, j["sp"] = sp, j["tp"] = a.tp, j["ranks"] = P;
  j["strategy"] = a.ulysses > 1 ? cat("ulysses(", a.ulysses, ") x ring") : a.strategy, j["layout"] = a.layout, j["dtype"] = a.dtype;
  j["device"] = dev.name();
  j["forward_seconds"] = t_fwd;
  j["forward_tokens_per_s"] = tokens / t_fwd;
  j["train_step_seconds"] = step_times;
  j["train_tokens_per_s"] = tokens / best_step;
  j["loss"] = losses;
  j["per_rank"] = nlohmann::json::array();
  for (int r = 0; r < P; ++r)
    j["per_rank"].push_back({{"rank", r}, {"peak_memory_bytes", all[3 * r]}, {"bytes_sent", all[3 * r + 1]},
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
  std::printf("train  layers=%lld d_model=%lld heads=%lld/%lld mlp=%lld  B=%lld L=%lld  dp=%d x pp=%d x sp=%d x tp=%d "
              "(%s, %s, %s)\n",
              static_cast<long long>(a.model.layers), static_cast<long long>(D),
              static_cast<long long>(a.model.heads), static_cast<long long>(a.model.kv()),
              static_cast<long long>(a.model.hidden()), static_cast<long long>(a.batch),
              static_cast<long long>(a.seq), a.dp, a.pp, sp, a.tp, j["strategy"].get<std::string>().c_str(),
              a.layout.c_str(), a.dtype.c_str());
  if (gpu) std::printf("device %s (peak MiB below counts host memory only)\n", dev.name().c_str());
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
  auto* cmd = app.add_subcommand("train",
                                 "train the dense transformer with RA+SP (x data x tensor parallel) under mpirun: throughput, "
                                 "loss, memory, bytes");
  add_model_options(cmd, a->model);
  cmd->add_flag("!--bidirectional", a->model.causal, "no causal mask");
  cmd->add_option("--seed", a->model.seed, "weights and data seed")->check(seed_value())->capture_default_str();
  cmd->add_option("--dtype", a->dtype, "fp32, or bf16 mixed precision (fp32 master weights and accumulation)")
      ->check(CLI::IsMember({"fp32", "bf16"}))
      ->each([a](const std::string& s) { a->model.dtype = parse_dtype(s); })
      ->capture_default_str();
  cmd->add_option("--batch", a->batch, "global batch")->check(positive_count())->capture_default_str();
  cmd->add_option("--seq", a->seq, "sequence length")->check(positive_count())->capture_default_str();
  cmd->add_option("--steps", a->steps, "training steps")->check(positive_count())->capture_default_str();
  cmd->add_option("--lr", a->lr, "AdamW learning rate")->check(positive_finite())->capture_default_str();
  cmd->add_option("--dp", a->dp, "data-parallel groups")->check(positive_count())->capture_default_str();
  cmd->add_option("--sp", a->sp, "sequence-parallel ranks per group (default: ranks / (dp x tp))")
      ->check(positive_count());
  cmd->add_option("--tp", a->tp, "tensor-parallel ranks (Megatron: heads and MLP columns split)")
      ->check(positive_count())
      ->capture_default_str();
  cmd->add_option("--pp", a->pp, "pipeline stages (layers split, 1F1B over --pp micro-batches per DP group)")
      ->check(positive_count())
      ->capture_default_str();
  cmd->add_option("--ulysses", a->ulysses,
                  "Ulysses x ring: all-to-all inside groups of this many SP ranks, the ring across them")
      ->check(positive_count())
      ->capture_default_str();
  cmd->add_option("--strategy", a->strategy, "attention across the SP group: ring, allgather, ulysses")
      ->check(CLI::IsMember({"ring", "allgather", "ulysses"}))
      ->capture_default_str();
  cmd->add_option("--layout", a->layout, "sequence layout: contiguous, zigzag, striped")
      ->check(CLI::IsMember({"contiguous", "zigzag", "striped"}))
      ->capture_default_str();
  cmd->add_option("--device", a->device,
                  "cpu, or cuda: one GPU per rank, RA+SP over NCCL, bf16 (the GPU kernels take bf16/fp16)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  cmd->add_option("--threads", a->threads, "threads per rank for every kernel (default: OpenMP's)")
      ->check(thread_count());
  add_timeout_option(cmd, a->timeout);
  cmd->add_flag("--json", a->json, "machine-readable output");
  cmd->callback([a] { run(*a); });
}

}  // namespace ringattn::cli
