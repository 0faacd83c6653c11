// `ringattn forward`: the logits of a Hugging Face language model (llama,
// mistral, qwen2, gpt2 checkpoint folder) for token ids from a .npy file, on one
// process or under mpirun with any SP strategy and layout, TP and PP (the parallel
// options of train). Rank 0 checks the outputs, reads the ids and writes the
// logits; every rank loads the checkpoint (its TP slice) and computes its tokens.
// --positions keeps the logits of chosen positions only (a long prompt's whole
// [B, L, vocab] logits would not fit anywhere).
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "cli/commands.h"
#include "ringattn/atomic_file.h"
#include "ringattn/comm.h"
#include "ringattn/error.h"
#include "ringattn/layout.h"
#include "ringattn/lm.h"
#include "ringattn/memory.h"
#include "ringattn/npy.h"
#include "ringattn/parallel.h"
#include "ringattn/perf.h"

namespace ringattn::cli {
namespace {

struct ForwardArgs {
  std::string model, ids, logits, positions;
  ParallelConfig par;
  double timeout = 300;
  bool json = false;
};

void run(const ForwardArgs& a) {
  if (a.par.threads > 0) omp_set_num_threads(a.par.threads);
  std::unique_ptr<Communicator> world = MpiSession::active() ? mpi_world(a.timeout) : nullptr;
  const RunContext run(world.get(), a.par);
  int64_t meta[2];  // B, L
  const std::vector<int64_t> ids = ids_from_rank0(world.get(), meta, [&](int64_t m[2]) {
    check_output_paths({{"--logits", a.logits}}, {{"--ids", a.ids}, {"--positions", a.positions}});
    return load_batch_ids(a.ids, m);
  });
  const int64_t B = meta[0], L = meta[1];
  run.config().check_sequence(L);
  int64_t unused[2];
  std::vector<int64_t> at =
      a.positions.empty() ? std::vector<int64_t>() : ids_from_rank0(world.get(), unused, [&](int64_t[2]) {
        std::vector<int64_t> shape;
        std::vector<int64_t> p = load_npy_ids(a.positions, &shape);
        check(shape.size() == 1 && !p.empty(), a.positions, ": positions must be a non-empty [n] array");
        return p;
      });
  if (a.positions.empty())
    for (int64_t t = 0; t < L; ++t) at.push_back(t);
  const int64_t n = static_cast<int64_t>(at.size());
  const LmConfig c = load_lm_config(a.model);
  const Model m = lm_model(a.model, DType::f32, run);
  if (world) world->barrier();
  reset_peak_memory();
  const double t0 = now_seconds();
  const Tensor logits = lm_logits_at(m, run.model_parallel(), ids, B, L, at, {},
                                     run.config().pp > 1 ? run.mesh().pp_comm.get() : nullptr);
  const double seconds = now_seconds() - t0;
  double peak = static_cast<double>(memory_stats().peak_bytes);  // weights, one layer's activations, the logits
  if (world) world->all_reduce(&peak, 1, ReduceOp::max);
  if (run.rank() != 0) return;
  if (!a.logits.empty()) save_npy(a.logits, logits);
  std::vector<int64_t> next;  // the most likely token after each row's last position asked for
  for (int64_t b = 0; b < B; ++b) {
    const float* last = logits.ptr<float>() + ((b + 1) * n - 1) * c.vocab;
    next.push_back(std::max_element(last, last + c.vocab) - last);
  }
  const ParallelConfig& pc = run.config();
  if (a.json) {
    print_json({{"model", a.model},
                {"arch", arch_name(c.arch)},
                {"layers", c.layers},
                {"d_model", c.d_model},
                {"heads", c.heads},
                {"kv_heads", c.kv_heads},
                {"vocab", c.vocab},
                {"batch", B},
                {"seq", L},
                {"ranks", pc.ranks()},
                {"pp", pc.pp},
                {"sp", pc.sp},
                {"tp", pc.tp},
                {"strategy", pc.strategy_label()},
                {"layout", layout_name(pc.layout)},
                {"seconds", seconds},
                {"tokens_per_s", static_cast<double>(B * L) / seconds},
                {"positions", n},
                {"peak_memory_bytes_per_rank", peak},
                {"next_token", next},
                {"logits", a.logits}});
    return;
  }
  std::printf("forward  %s: %lld layers, d_model %lld, %lld/%lld heads, vocab %lld; %lld x %lld tokens\n",
              arch_name(c.arch), static_cast<long long>(c.layers), static_cast<long long>(c.d_model),
              static_cast<long long>(c.heads), static_cast<long long>(c.kv_heads), static_cast<long long>(c.vocab),
              static_cast<long long>(B), static_cast<long long>(L));
  std::printf("%d rank(s): pp %d x sp %d x tp %d, %s, %s layout\n", pc.ranks(), pc.pp, pc.sp, pc.tp,
              pc.strategy_label().c_str(), layout_name(pc.layout));
  std::printf("%.3f s, %.0f tokens/s; most likely token after position %lld:", seconds,
              static_cast<double>(B * L) / seconds, static_cast<long long>(at.back()));
  for (int64_t t : next) std::printf(" %lld", static_cast<long long>(t));
  std::printf("\npeak memory held by ringattn: %.1f MiB per rank\n", peak / 1048576.0);
  if (!a.logits.empty())
    std::printf("logits [%lld, %lld, %lld] written to %s\n", static_cast<long long>(B), static_cast<long long>(n),
                static_cast<long long>(c.vocab), a.logits.c_str());
}

}  // namespace

void add_forward(CLI::App& app) {
  auto a = std::make_shared<ForwardArgs>();
  auto* cmd = app.add_subcommand("forward",
                                 "logits of a Hugging Face language model (llama, mistral, qwen2, gpt2) for token ids");
  cmd->add_option("--model", a->model, "checkpoint folder: config.json and model.safetensors (or its index)")
      ->required();
  cmd->add_option("--ids", a->ids, "token ids, int64 or int32 .npy of shape [L] or [B, L]")->required();
  cmd->add_option("--logits", a->logits,
                  "write the logits [B, L, vocab] here (float32 .npy; [B, n, vocab] with --positions)");
  cmd->add_option("--positions", a->positions,
                  "only the logits at these positions of each row (int64/int32 .npy of shape [n], each in [0, L))");
  add_parallel_options(cmd, a->par, false);
  add_timeout_option(cmd, a->timeout);
  cmd->add_flag("--json", a->json, "machine-readable output");
  cmd->callback([a] { run(*a); });
}

}  // namespace ringattn::cli
