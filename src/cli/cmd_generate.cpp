// `ringattn generate`: long-context inference on the local ranks. The prompt is
// prefilled with RA+SP (or TP, PP) into a KV cache that stays where it was
// computed, then new tokens are decoded.
//   --model DIR   a Hugging Face language model: a text (--prompt, --prompt-file,
//                 through the checkpoint's tokenizer.json or --tokenizer) or ids
//                 (--prompt-ids) in, greedy or seeded sampling, tokens streamed to
//                 stdout as they come, ending at the model's EOS or the count;
//                 --check recomputes every step's logits on one process.
//   otherwise     the vector model of the benchmarks (random weights, each new
//                 input is the previous output): prefill time and tokens/s, time
//                 per output token (median, p99), bytes moved per step, cache
//                 memory per rank; --check recomputes the whole sequence on one
//                 process and reports the largest relative error.
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <random>

#include "cli/commands.h"
#include "cli/generation.h"
#include "ringattn/atomic_file.h"
#include "ringattn/cuda.h"
#include "ringattn/error.h"
#include "ringattn/layout.h"
#include "ringattn/lm.h"
#include "ringattn/memory.h"
#include "ringattn/npy.h"
#include "ringattn/parallel.h"
#include "ringattn/perf.h"
#include "ringattn/tokenizer.h"

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
  // --model: a language model
  std::string lm, prompt, prompt_file, prompt_ids, tokenizer, out_ids;
  SamplingOptions sampling;
  bool sample = false;  // --temperature, --top-k or --top-p given
  bool greedy = false, ignore_eos = false;
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
  const int64_t capacity = a.capacity > 0 ? a.capacity : KVCache::capacity_for(longest, a.new_tokens, sp);
  // The KV cache of this rank: K and V of its layers, sequences, entries and kv heads.
  const ModelConfig& mc = a.model;
  const int64_t slots = mc.window > 0 ? std::min(capacity, KVCache::window_slots(mc.window - 1, sp)) : capacity;
  check_fits_in_memory(2.0 * (double(mc.layers) / pp) * double(B) * double(slots) * (double(mc.kv()) / tp) *
                           double(mc.head_dim()) * double(dtype_size(mc.dtype)),
                       cat("the KV cache (", slots, " entries per sequence and rank)"));

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
  j["model"] = {{"layers", a.model.layers},       {"d_model", D},
                {"heads", a.model.heads},         {"kv_heads", a.model.kv()},
                {"mlp_hidden", a.model.hidden()}, {"sliding_window", a.model.window}};
  j["dp"] = 1, j["sp"] = sp, j["tp"] = tp, j["pp"] = pp, j["ranks"] = P;
  j["strategy"] = strategy_name(pc.strategy), j["layout"] = layout_name(pc.layout);
  j["prompt_lengths"] = lens, j["new_tokens"] = a.new_tokens, j["cache_capacity_per_rank"] = slots;
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
        "generate  %lld layers, d_model %lld = %lld heads x %lld, kv heads %lld%s, %s; pp %d x sp %d x tp %d "
        "(strategy %s, layout %s); %d ranks\n",
        static_cast<long long>(a.model.layers), static_cast<long long>(D), static_cast<long long>(a.model.heads),
        static_cast<long long>(a.model.head_dim()), static_cast<long long>(a.model.kv()),
        a.model.window > 0 ? cat(", sliding window ", a.model.window).c_str() : "", a.dtype.c_str(), pp, sp, tp,
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
    std::printf("KV cache               %10.1f MiB/rank (%lld entries per sequence)   peak %.1f MiB/rank\n",
                r.cache_bytes / 1048576.0, static_cast<long long>(slots), peak / 1048576.0);
    if (a.check)
      std::printf("check: max relative error vs one process recomputing the sequence %.2e (limit %.0e) %s\n", err,
                  limit, ok ? "ok" : "FAILED");
  }
  check(ok, "generate --check: the decoded outputs differ from one process by ", err, " (limit ", limit, ")");
}

// ---- --model: a Hugging Face language model ------------------------------------------

// The tokenizer of a text prompt: --tokenizer byte|DIR, else the checkpoint's
// tokenizer.json when it has one (nullptr: none; ids only).
std::unique_ptr<Tokenizer> lm_tokenizer(const GenerateArgs& a) {
  if (a.tokenizer == "byte") return byte_tokenizer();
  if (!a.tokenizer.empty()) return load_tokenizer(a.tokenizer);
  if (std::ifstream(a.lm + "/tokenizer.json")) return load_tokenizer(a.lm);
  return nullptr;
}

void run_lm(const GenerateArgs& a, Communicator& world) {
  if (a.par.threads > 0) omp_set_num_threads(a.par.threads);
  const ParallelConfig pc = a.par.for_ranks(world.size());
  check(a.prompt_ids.empty() + a.prompt.empty() + a.prompt_file.empty() == 2,
        "generate --model needs exactly one of --prompt, --prompt-file, --prompt-ids");
  SamplingOptions s = a.sampling;
  s.greedy = !a.sample;
  check_sampling(s);
  const std::unique_ptr<Tokenizer> tok = lm_tokenizer(a);
  int64_t meta[2];  // B, L
  const std::vector<int64_t> ids = ids_from_rank0(&world, meta, [&](int64_t m[2]) {
    check_output_paths({{"--out-ids", a.out_ids}}, {{"--prompt-ids", a.prompt_ids}, {"--prompt-file", a.prompt_file}});
    if (!a.prompt_ids.empty()) return load_batch_ids(a.prompt_ids, m);
    check(tok != nullptr,
          "a text prompt needs a tokenizer: the checkpoint has no tokenizer.json; pass --tokenizer DIR|byte or "
          "--prompt-ids");
    std::vector<int64_t> t = tok->encode(a.prompt_file.empty() ? a.prompt : read_text(a.prompt_file, "the prompt"));
    check(!t.empty(), "the prompt has no tokens");
    m[0] = 1, m[1] = static_cast<int64_t>(t.size());
    return t;
  });
  const int64_t B = meta[0], L = meta[1];
  // Rows of --prompt-ids may end in -1s: prompts of different lengths.
  std::vector<std::vector<int64_t>> prompts(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const auto row = ids.begin() + b * L, end = row + L, pad = std::find(row, end, -1);
    check(pad != row, a.prompt_ids, ": prompt ", b, " is empty (its row starts with -1)");
    check(std::all_of(pad, end, [](int64_t t) { return t == -1; }), a.prompt_ids, ": prompt ", b,
          " has ids after its -1 padding (pad only the end of a row)");
    prompts[b].assign(row, pad);
  }
  const LmConfig lc = load_lm_config(a.lm);
  const RunContext run(&world, pc);
  const Model m = lm_model(a.lm, a.model.dtype, run);
  const bool show = world.rank() == 0 && !a.json;
  LmGenerateOptions o;
  o.new_tokens = a.new_tokens, o.sampling = s, o.seed = a.model.seed, o.eos = a.ignore_eos ? -1 : lc.eos_token;
  std::vector<double> step_times;
  double t_last = now_seconds();
  const double t0 = t_last;
  o.on_token = [&](std::span<const int64_t> t) {
    const double now = now_seconds();
    step_times.push_back(now - t_last);
    t_last = now;
    if (!show) return;
    if (B == 1 && tok) {  // stream the text
      std::fputs(tok->decode_continued(t).c_str(), stdout);
    } else {
      for (int64_t id : t) std::printf(" %lld", static_cast<long long>(id));
      std::printf("\n");
    }
    std::fflush(stdout);
  };
  if (show && B == 1 && tok) {
    std::fputs(tok->decode(prompts[0]).c_str(), stdout);
    std::fflush(stdout);
  }
  reset_peak_memory();
  const std::vector<std::vector<int64_t>> out =
      lm_generate(m, run.model_parallel(), prompts, o, pc.pp > 1 ? run.mesh().pp_comm.get() : nullptr);
  if (show) std::printf("\n");
  double peak = static_cast<double>(memory_stats().peak_bytes);  // weights, cache, activations
  world.all_reduce(&peak, 1, ReduceOp::max);
  const double prefill = step_times.empty() ? now_seconds() - t0 : step_times.front();
  std::vector<double> tpot(step_times.begin() + (step_times.empty() ? 0 : 1), step_times.end());
  // --check: one process recomputes the whole sequence each step; greedy must pick the same tokens.
  int64_t mismatches = -1;
  if (a.check && world.rank() == 0) {
    check(s.greedy, "--check compares greedy decoding: drop --temperature, --top-k, --top-p");
    mismatches = 0;
    const LanguageModel lm = LanguageModel::load(a.lm);  // the one-process reference, whole
    for (int64_t b = 0; b < B; ++b) {  // each token against the reference's pick after the same tokens
      std::vector<int64_t> seq = prompts[b];
      for (int64_t t : out[b]) {
        mismatches += lm_greedy_reference(lm, seq, 1)[0] != t;
        seq.push_back(t);
      }
    }
  }
  if (world.rank() != 0) return;
  std::vector<int64_t> lengths;
  for (const auto& q : prompts) lengths.push_back(static_cast<int64_t>(q.size()));
  if (!a.out_ids.empty()) {
    int64_t longest = 0;
    for (const auto& v : out) longest = std::max<int64_t>(longest, static_cast<int64_t>(v.size()));
    std::vector<int64_t> t(static_cast<size_t>(B * longest), -1);
    for (int64_t b = 0; b < B; ++b) std::copy(out[b].begin(), out[b].end(), t.begin() + b * longest);
    const int64_t shape[2] = {B, longest};
    save_npy_ids(a.out_ids, t, shape);
  }
  const double med = tpot.empty() ? 0 : percentile(tpot, 50);
  if (a.json) {
    nlohmann::json j = {{"model", a.lm},
                        {"arch", arch_name(lc.arch)},
                        {"ranks", pc.ranks()},
                        {"pp", pc.pp},
                        {"sp", pc.sp},
                        {"tp", pc.tp},
                        {"strategy", pc.strategy_label()},
                        {"layout", layout_name(pc.layout)},
                        {"batch", B},
                        {"prompt_tokens", L},
                        {"prompt_lengths", lengths},
                        {"new_tokens", out},
                        {"prefill_seconds", prefill},
                        {"tpot_median_ms", med * 1e3},
                        {"peak_memory_bytes_per_rank", peak}};
    if (tok && B == 1) j["text"] = tok->decode_continued(out[0]);  // the new text, as streamed
    if (a.check) j["check_mismatches"] = mismatches;
    print_json(j);
  } else {
    std::fprintf(stderr,
                 "%s, %d rank(s) (pp %d x sp %d x tp %d, %s, %s): prompt %lld x %lld tokens, prefill %.3f s, "
                 "%.2f ms per output token (median), peak %.1f MiB/rank\n",
                 arch_name(lc.arch), pc.ranks(), pc.pp, pc.sp, pc.tp, pc.strategy_label().c_str(),
                 layout_name(pc.layout), static_cast<long long>(B), static_cast<long long>(L), prefill, med * 1e3,
                 peak / 1048576.0);
    if (a.check)
      std::fprintf(stderr, "check: %lld of the tokens differ from one process\n", static_cast<long long>(mismatches));
  }
  check(!a.check || mismatches == 0, "generate --check: ", mismatches,
        " tokens differ from one process recomputing the whole sequence");
}

// Under MPI (mpirun, or a one-rank job MPI starts itself); `--device cuda`
// without mpirun runs its one rank in this process (no MPI needed on a GPU machine).
void run(const GenerateArgs& a) {
  if (!a.lm.empty()) return run_lm(a, *mpi_world(a.timeout));
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
  cmd->add_option("--sliding-window", a->model.window,
                  "every layer's query sees its W most recent keys (mistral); the KV cache keeps only those")
      ->check(positive_count());
  cmd->add_option("--seed", a->model.seed, "weights and prompt seed")->check(seed_value())->capture_default_str();
  add_model_dtype_option(cmd, a->model, a->dtype, "bf16 KV cache");
  add_timeout_option(cmd, a->timeout);
  cmd->add_flag("--check", a->check,
                "recompute the whole sequence on one process and compare (exit 1 beyond 1e-5; bf16: 2e-2)");
  cmd->add_flag("--json", a->json, "machine-readable output");
  // A language model.
  auto* model = cmd->add_option("--model", a->lm,
                                "a Hugging Face checkpoint folder (llama, mistral, qwen2, gpt2): generate text");
  cmd->add_option("--prompt", a->prompt, "--model: the prompt text");
  cmd->add_option("--prompt-file", a->prompt_file, "--model: read the prompt text from this file");
  cmd->add_option("--prompt-ids", a->prompt_ids,
                  "--model: prompt token ids, int64/int32 .npy [L] or [B, L] (rows padded at the end with -1: "
                  "prompts of different lengths)");
  cmd->add_option("--tokenizer", a->tokenizer, "--model: tokenizer.json folder or 'byte' (default: the checkpoint's)");
  cmd->add_option("--out-ids", a->out_ids, "--model: write the new ids [B, N] here (int64 .npy; -1 after EOS)");
  cmd->add_flag("--ignore-eos", a->ignore_eos, "--model: decode --new-tokens tokens even past the EOS token");
  auto* greedy = cmd->add_flag("--greedy", a->greedy, "--model: argmax decoding (the default)");
  auto sampled = [a](float* field) { return [a, field](float v) { *field = v, a->sample = true; }; };
  cmd->add_option_function<float>("--temperature", sampled(&a->sampling.temperature),
                                  "--model: sample at this "
                                  "temperature");
  cmd->add_option_function<int64_t>(
      "--top-k", [a](int64_t k) { a->sampling.top_k = k, a->sample = true; },
      "--model: sample from the k most likely tokens");
  cmd->add_option_function<float>("--top-p", sampled(&a->sampling.top_p),
                                  "--model: sample from the smallest set of tokens with probability >= p");
  for (const char* vector_only : {"--prompt-len", "--batch", "--capacity", "--layers", "--d-model", "--heads",
                                  "--kv-heads", "--mlp", "--sliding-window"})
    model->excludes(cmd->get_option(vector_only));
  for (const char* lm_only : {"--prompt", "--prompt-file", "--prompt-ids", "--tokenizer", "--out-ids", "--greedy",
                              "--ignore-eos", "--temperature", "--top-k", "--top-p"})
    cmd->get_option(lm_only)->needs(model);
  for (const char* sampling : {"--temperature", "--top-k", "--top-p"}) greedy->excludes(cmd->get_option(sampling));
  cmd->callback([a] { run(*a); });
}

}  // namespace ringattn::cli
