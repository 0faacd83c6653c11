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
#include "ringattn/perf.h"

namespace ringattn::cli {
namespace {

struct GenerateArgs {
  ModelConfig model{4, 256, 4, 0, 0, true, 1};
  std::vector<int64_t> prompt_len{8192};
  int64_t batch = 0, capacity = 0;
  int new_tokens = 32, tp = 1, threads = 0;
  std::string strategy = "sp", layout = "zigzag", attention = "ring", dtype = "fp32", device = "cpu";
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
    const DeviceTensor ref = model_forward(full, seq, SequenceParallel{}, act);
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

void run_on(const GenerateArgs& a, Communicator& world_comm) {
  if (a.threads > 0) omp_set_num_threads(a.threads);
  a.model.validate();
  Communicator* world = &world_comm;
  const int P = world->size(), rank = world->rank();
  check(a.strategy == "sp" || a.strategy == "tp" || a.strategy == "pp", "--strategy ", a.strategy,
        ": use sp (RA+SP), tp or pp");
  check(a.tp >= 1 && P % a.tp == 0, "--tp ", a.tp, " must divide the ", P, " ranks");
  check(a.strategy == "sp" || a.tp == 1, "--tp combines with --strategy sp only (SP x TP)");
  const int sp = a.strategy == "sp" ? P / a.tp : 1, tp = a.strategy == "tp" ? P : a.tp;
  const int pp = a.strategy == "pp" ? P : 1;
  check(a.new_tokens >= 1, "--new-tokens must be >= 1");
  check(a.strategy != "sp" || a.attention != "ulysses" || (a.model.heads / tp % sp == 0 && a.model.kv() / tp % sp == 0),
        "--prefill-attention ulysses splits the heads over the ", sp, " SP ranks: --heads ", a.model.heads,
        " and --kv-heads ", a.model.kv(), tp > 1 ? cat(" (/ --tp ", tp, ")") : std::string(),
        " must be divisible by ", sp, "; use --prefill-attention ring or allgather");
  // --prompt-len L (every sequence) or L1,L2,... (one per sequence).
  std::vector<int64_t> lens = a.prompt_len;
  check(a.batch == 0 || lens.size() == 1 || static_cast<int64_t>(lens.size()) == a.batch, "--batch ", a.batch,
        " and the ", lens.size(), " prompt lengths of --prompt-len differ");
  if (lens.size() == 1 && a.batch > 1) lens.assign(static_cast<size_t>(a.batch), lens[0]);
  const Layout layout = parse_layout(a.layout);
  for (int64_t L : lens) {
    check(L >= 1, "--prompt-len must be >= 1, got ", L);
    check_layout(layout, L, sp);
  }
  const int64_t B = static_cast<int64_t>(lens.size()), D = a.model.d_model;
  const int64_t longest = *std::max_element(lens.begin(), lens.end());
  const int64_t capacity = a.capacity > 0 ? a.capacity : needed_capacity(longest, a.new_tokens, sp);
  // The KV cache of this rank: K and V of its layers, sequences, entries and kv heads.
  const ModelConfig& mc = a.model;
  check_fits_in_memory(2.0 * (double(mc.layers) / pp) * double(B) * double(capacity) * (double(mc.kv()) / tp) *
                           double(mc.head_dim()) * double(dtype_size(mc.dtype)),
                       cat("the KV cache (", capacity, " entries per sequence and rank)"));

  Mesh mesh = Mesh::build(*world, 1, sp, tp, pp);
  // --device cuda: one GPU per rank (rank mod the GPUs visible), the SP group over
  // NCCL, model and KV cache on the GPU.
  std::unique_ptr<Device> gpu;
  std::unique_ptr<Communicator> nccl;
  if (a.device == "cuda") {
    check(a.strategy == "sp" && a.tp == 1, "--device cuda generates with RA+SP alone: --strategy sp, --tp 1");
    check(cuda_built(), "--device cuda: this ringattn was built without the CUDA path");
    check(cuda_device_count() > 0, "--device cuda: no GPU is visible to this process");
    gpu = make_cuda_device(rank % cuda_device_count());
    if (sp > 1) nccl = nccl_communicator(*world, *gpu);
  }
  Model model(a.model, tp, mesh.tp_index(), pp, mesh.pp_index(), gpu.get());
  SequenceParallel spc;
  spc.comm = gpu ? nccl.get() : sp > 1 ? mesh.sp_comm.get() : nullptr;
  spc.attn.device = gpu.get();
  spc.tp = tp > 1 ? mesh.tp_comm.get() : nullptr;
  spc.attn.strategy = parse_strategy(a.attention);
  spc.attn.layout = layout;
  spc.attn.threads = a.threads;
  std::vector<Tensor> prompts;
  std::mt19937_64 rng(a.model.seed + 1);
  std::normal_distribution<float> dist(0.f, 1.f);
  for (int64_t L : lens) {
    prompts.emplace_back(DType::f32, std::initializer_list<int64_t>{1, L, D});
    for (int64_t i = 0; i < prompts.back().numel(); ++i) prompts.back().ptr<float>()[i] = dist(rng);
  }
  reset_peak_memory();
  const bool show = !a.json && rank == 0;
  if (show) progress("prefill ...");
  const GenerationRun r = run_generation(*world, mesh, model, spc, prompts, a.new_tokens, capacity, [&](int j) {
    if (show && (j % 8 == 0)) progress(cat("decode step ", j + 1, "/", a.new_tokens));
  });
  if (show) progress_done();
  double peak = static_cast<double>(memory_stats().peak_bytes);
  world->all_reduce(&peak, 1, ReduceOp::max);
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
  j["model"] = {{"layers", a.model.layers}, {"d_model", D}, {"heads", a.model.heads}, {"kv_heads", a.model.kv()},
                {"mlp_hidden", a.model.hidden()}};
  j["strategy"] = a.strategy, j["sp"] = sp, j["tp"] = tp, j["pp"] = pp, j["ranks"] = P;
  j["layout"] = a.layout, j["prefill_attention"] = a.attention;
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
    std::printf("generate  %lld layers, d_model %lld = %lld heads x %lld, kv heads %lld, %s; %s: sp %d x tp %d x pp "
                "%d (prefill attention %s, layout %s); %d ranks\n",
                static_cast<long long>(a.model.layers), static_cast<long long>(D),
                static_cast<long long>(a.model.heads), static_cast<long long>(a.model.head_dim()),
                static_cast<long long>(a.model.kv()), a.dtype.c_str(), a.strategy.c_str(), sp, tp, pp,
                a.attention.c_str(),
                a.layout.c_str(), P);
    if (gpu) std::printf("device %s (peak below counts host memory only)\n", gpu->name().c_str());
    std::printf("prompts %lld x ", static_cast<long long>(B));
    for (size_t i = 0; i < lens.size(); ++i) std::printf("%s%lld", i ? "," : "", static_cast<long long>(lens[i]));
    std::printf(" tokens, %d new tokens each\n\n", a.new_tokens);
    std::printf("prefill                %10.1f ms   %10.0f tokens/s   %10.1f MiB sent/rank\n",
                r.prefill_seconds * 1e3, static_cast<double>(prompt_tokens) / r.prefill_seconds,
                r.prefill_bytes / 1048576.0);
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
  auto* cmd = app.add_subcommand("generate",
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
  cmd->add_option("--strategy", a->strategy, "sp (RA+SP: sequence-sharded cache), tp or pp")
      ->check(CLI::IsMember({"sp", "tp", "pp"}))
      ->capture_default_str();
  cmd->add_option("--tp", a->tp, "with --strategy sp: tensor-parallel ranks inside each SP rank (SP x TP)")
      ->check(positive_count())
      ->capture_default_str();
  cmd->add_option("--layout", a->layout, "sequence layout of the prompt under sp: contiguous, zigzag, striped")
      ->check(CLI::IsMember({"contiguous", "zigzag", "striped"}))
      ->capture_default_str();
  cmd->add_option("--prefill-attention", a->attention, "attention of the SP prefill: ring, allgather, ulysses")
      ->check(CLI::IsMember({"ring", "allgather", "ulysses"}))
      ->capture_default_str();
  cmd->add_option("--capacity", a->capacity, "KV cache entries per sequence per rank (default: just enough)")
      ->check(positive_count());
  add_model_options(cmd, a->model);
  cmd->add_option("--seed", a->model.seed, "weights and prompt seed")->check(seed_value())->capture_default_str();
  cmd->add_option("--dtype", a->dtype, "fp32, or bf16 mixed precision (bf16 KV cache)")
      ->check(CLI::IsMember({"fp32", "bf16"}))
      ->each([a](const std::string& s) { a->model.dtype = parse_dtype(s); })
      ->capture_default_str();
  cmd->add_option("--device", a->device,
                  "cpu, or cuda: one GPU per rank, RA+SP over NCCL, bf16 (the GPU kernels take bf16/fp16)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  cmd->add_option("--threads", a->threads, "threads per rank (default: OpenMP's)")->check(thread_count());
  add_timeout_option(cmd, a->timeout);
  cmd->add_flag("--check", a->check,
                "recompute the whole sequence on one process and compare (exit 1 beyond 1e-5; bf16: 2e-2)");
  cmd->add_flag("--json", a->json, "machine-readable output");
  cmd->callback([a] { run(*a); });
}

}  // namespace ringattn::cli
