// `ringattn forward`: the logits of a Hugging Face language model (llama,
// mistral, qwen2, gpt2 checkpoint folder) for token ids from a .npy file. One
// process for now: the sequence-parallel language model is the next part of
// issue 19, and under mpirun with more than one rank this says so and stops.
#include <omp.h>

#include <algorithm>
#include <cstdio>

#include "cli/commands.h"
#include "ringattn/atomic_file.h"
#include "ringattn/comm.h"
#include "ringattn/error.h"
#include "ringattn/lm.h"
#include "ringattn/npy.h"
#include "ringattn/perf.h"

namespace ringattn::cli {
namespace {

struct ForwardArgs {
  std::string model, ids, logits;
  int threads = 0;
  bool json = false;
};

void run(const ForwardArgs& a) {
  check(!MpiSession::active() || mpi_world(60)->size() == 1,
        "forward runs on one process so far (the sequence-parallel language model is not there yet): run it without "
        "mpirun, or with -np 1");
  check_output_paths({{"--logits", a.logits}}, {{"--ids", a.ids}});
  if (a.threads > 0) omp_set_num_threads(a.threads);
  std::vector<int64_t> shape;
  const std::vector<int64_t> ids = load_npy_ids(a.ids, &shape);
  check(shape.size() == 1 || shape.size() == 2, a.ids, ": token ids must be [L] or [B, L], got rank ", shape.size());
  const int64_t B = shape.size() == 2 ? shape[0] : 1, L = shape.back();
  check(B >= 1 && L >= 1, a.ids, ": no tokens");
  const LanguageModel m = LanguageModel::load(a.model);
  const LmConfig& c = m.config;
  const double t0 = now_seconds();
  const Tensor logits = lm_logits(m, ids, B, L);
  const double seconds = now_seconds() - t0;
  if (!a.logits.empty()) save_npy(a.logits, logits);
  std::vector<int64_t> next;  // the most likely token after each sequence
  for (int64_t b = 0; b < B; ++b) {
    const float* last = logits.ptr<float>() + ((b + 1) * L - 1) * c.vocab;
    next.push_back(std::max_element(last, last + c.vocab) - last);
  }
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
                {"seconds", seconds},
                {"tokens_per_s", static_cast<double>(B * L) / seconds},
                {"next_token", next},
                {"logits", a.logits}});
    return;
  }
  std::printf("forward  %s: %lld layers, d_model %lld, %lld/%lld heads, vocab %lld; %lld x %lld tokens\n",
              arch_name(c.arch), static_cast<long long>(c.layers), static_cast<long long>(c.d_model),
              static_cast<long long>(c.heads), static_cast<long long>(c.kv_heads), static_cast<long long>(c.vocab),
              static_cast<long long>(B), static_cast<long long>(L));
  std::printf("%.3f s, %.0f tokens/s; most likely next token:", seconds, static_cast<double>(B * L) / seconds);
  for (int64_t t : next) std::printf(" %lld", static_cast<long long>(t));
  std::printf("\n");
  if (!a.logits.empty())
    std::printf("logits [%lld, %lld, %lld] written to %s\n", static_cast<long long>(B), static_cast<long long>(L),
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
  cmd->add_option("--logits", a->logits, "write the logits [B, L, vocab] here (float32 .npy)");
  cmd->add_option("--threads", a->threads, "threads (default: OpenMP's)")->check(thread_count());
  cmd->add_flag("--json", a->json, "machine-readable output");
  cmd->callback([a] { run(*a); });
}

}  // namespace ringattn::cli
