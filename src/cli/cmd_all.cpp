// The subcommands of `ringattn`, registered once for main and the fuzzer, and
// the options and option checks they share.
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <sstream>

#include "cli/commands.h"
#include "ringattn/comm.h"
#include "ringattn/cpu/features.h"
#include "ringattn/error.h"
#include "ringattn/npy.h"

namespace ringattn::cli {

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return {};
}

namespace {

// A whole number that fits in 64 bits (strtoll saturates; CLI11 passed that on),
// then check_value(x, text): the message for a bad value, or "".
CLI::Validator whole_number(const char* name, std::string (*check_value)(long long, const std::string&)) {
  return CLI::Validator(
      [check_value](std::string& s) -> std::string {
        char* end = nullptr;
        errno = 0;
        const long long x = std::strtoll(s.c_str(), &end, 10);
        if (s.empty() || !end || *end != '\0') return cat("'", s, "' is not a whole number");
        if (errno == ERANGE) return cat(s, " is too large");
        return check_value(x, s);
      },
      name);
}

}  // namespace

const CLI::Validator& positive_finite() {
  static const CLI::Validator v(
      [](std::string& s) -> std::string {
        char* end = nullptr;
        const double x = std::strtod(s.c_str(), &end);
        if (s.empty() || !end || *end != '\0') return cat("'", s, "' is not a number");
        if (!std::isfinite(x) || x <= 0) return cat("must be a positive, finite number, got ", s);
        return {};
      },
      "POSITIVE");
  return v;
}

const CLI::Validator& positive_count() {
  static const CLI::Validator v = whole_number("COUNT", [](long long x, const std::string& s) {
    return x < 1 ? cat("must be at least 1, got ", s) : std::string();
  });
  return v;
}

const CLI::Validator& thread_count() {
  static const CLI::Validator v = whole_number("THREADS", [](long long x, const std::string&) {
    return error_of([x] { check_thread_count(x, "the thread count"); });
  });
  return v;
}

const CLI::Validator& seed_value() {
  static const CLI::Validator v(
      [](std::string& s) -> std::string {
        char* end = nullptr;
        errno = 0;
        (void)std::strtoull(s.c_str(), &end, 10);
        if (s.empty() || s[0] == '-' || !end || *end != '\0') return cat("must be a whole number >= 0, got ", s);
        if (errno == ERANGE) return cat(s, " does not fit in 64 bits");
        return {};
      },
      "SEED");
  return v;
}

void add_timeout_option(CLI::App* cmd, double& timeout) {
  cmd->add_option_function<std::string>(
         "--timeout", [&timeout](const std::string& s) { timeout = parse_timeout(s, "--timeout"); },
         cat("seconds a rank waits for a peer before failing, or 'none' for no limit (default ", timeout, ")"))
      ->check(CLI::Validator([](std::string& s) { return error_of([&s] { parse_timeout(s, "the timeout"); }); },
                             "SECONDS|none"));
}

void add_model_options(CLI::App* cmd, ModelConfig& m) {
  cmd->add_option("--layers", m.layers, "transformer layers")->check(positive_count())->capture_default_str();
  cmd->add_option("--d-model", m.d_model, "model width (= heads x head dim)")
      ->check(positive_count())
      ->capture_default_str();
  cmd->add_option("--heads", m.heads, "attention heads")->check(positive_count())->capture_default_str();
  cmd->add_option("--kv-heads", m.kv_heads, "key/value heads (default: --heads)")->check(positive_count());
  cmd->add_option("--mlp", m.mlp_hidden, "MLP hidden width (default: 4 x d_model)")->check(positive_count());
}

void add_model_dtype_option(CLI::App* cmd, ModelConfig& m, std::string& name, const std::string& help) {
  cmd->add_option("--dtype", name, cat("fp32, or bf16 mixed precision (", help, ")"))
      ->check(CLI::IsMember({"fp32", "bf16"}))
      ->each([&m](const std::string& s) { m.dtype = parse_dtype(s); })
      ->capture_default_str();
}

void add_parallel_options(CLI::App* cmd, ParallelConfig& p, bool with_dp) {
  if (with_dp)
    cmd->add_option("--dp", p.dp, "data-parallel groups (the batch split)")
        ->check(positive_count())
        ->capture_default_str();
  cmd->add_option("--pp", p.pp, "pipeline stages (layers split, 1F1B over micro-batches)")
      ->check(positive_count())
      ->capture_default_str();
  cmd->add_option("--sp", p.sp,
                  with_dp ? "sequence-parallel ranks (default: the ranks left by dp x pp x tp)"
                          : "sequence-parallel ranks (default: the ranks left by pp x tp)")
      ->check(positive_count());
  cmd->add_option("--tp", p.tp,
                  "tensor-parallel ranks (Megatron: heads, MLP columns and a language model's vocabulary split)")
      ->check(positive_count())
      ->capture_default_str();
  cmd->add_option_function<std::string>(
         "--strategy", [&p](const std::string& s) { p.strategy = parse_strategy(s); },
         "attention across the SP group: ring (RA+SP), allgather, ulysses, or hybrid (Ulysses inside groups of "
         "--ulysses ranks, the ring across them)")
      ->check(CLI::IsMember({"ring", "allgather", "ulysses", "hybrid"}))
      ->default_str(strategy_name(p.strategy));
  cmd->add_option("--ulysses", p.ulysses, "--strategy hybrid: the Ulysses degree (SP ranks per all-to-all group)")
      ->check(positive_count())
      ->capture_default_str();
  cmd->add_option_function<std::string>(
         "--layout", [&p](const std::string& s) { p.layout = parse_layout(s); },
         "sequence layout over the SP ranks: contiguous, zigzag, striped")
      ->check(CLI::IsMember({"contiguous", "zigzag", "striped"}))
      ->default_str(layout_name(p.layout));
  cmd->add_option_function<std::string>(
         "--device", [&p](const std::string& s) { p.cuda = s == "cuda"; },
         "cpu, or cuda: one GPU per rank, RA+SP over NCCL, bf16 (the GPU kernels take bf16/fp16)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->default_str("cpu");
  cmd->add_option(
         "--threads", p.threads,
         "threads per rank for every kernel (default: OpenMP's, its CPUs divided among the ranks on one machine)")
      ->check(thread_count());
}

void add_all(CLI::App& app) {
  add_info(app);
  add_attention(app);
  add_bench(app);
  add_train(app);
  add_compare(app);
  add_generate(app);
  add_forward(app);
  add_plan(app);
}

std::vector<int64_t> ids_from_rank0(Communicator* world, int64_t meta[2],
                                    const std::function<std::vector<int64_t>(int64_t meta[2])>& read) {
  std::string err;
  std::vector<int64_t> ids;
  int64_t hdr[4] = {0, 0, 0, 0};  // error length, ids, meta
  if (!world || world->rank() == 0) {
    try {
      ids = read(hdr + 2);
      hdr[1] = static_cast<int64_t>(ids.size());
    } catch (const Error& e) {
      err = e.what();
    }
    hdr[0] = static_cast<int64_t>(err.size());
  }
  if (world) {
    world->broadcast(hdr, sizeof(hdr), 0);
    err.resize(static_cast<size_t>(hdr[0]));
    if (hdr[0] > 0) world->broadcast(err.data(), err.size(), 0);
  }
  if (!err.empty()) throw Error(err);
  ids.resize(static_cast<size_t>(hdr[1]));
  if (world) world->broadcast(ids.data(), ids.size() * sizeof(int64_t), 0);
  meta[0] = hdr[2], meta[1] = hdr[3];
  return ids;
}

std::vector<int32_t> load_cu_seqlens(const std::string& path, const char* what) {
  if (path.empty()) return {};
  std::vector<int64_t> shape;
  const std::vector<int64_t> v = load_npy_ids(path, &shape);
  check(shape.size() == 1, what, " (", path, ") must be one-dimensional [n_docs + 1], got ", shape.size(),
        " dimensions");
  std::vector<int32_t> cu;
  for (int64_t x : v) {
    check(x >= 0 && x <= INT32_MAX, what, " (", path, ") holds ", x, ": offsets must lie in [0, 2^31)");
    cu.push_back(static_cast<int32_t>(x));
  }
  return cu;
}

std::vector<int64_t> load_batch_ids(const std::string& path, int64_t meta[2]) {
  std::vector<int64_t> shape;
  std::vector<int64_t> ids = load_npy_ids(path, &shape);
  check(shape.size() == 1 || shape.size() == 2, path, ": token ids must be [L] or [B, L], got rank ", shape.size());
  meta[0] = shape.size() == 2 ? shape[0] : 1, meta[1] = shape.back();
  check(meta[0] >= 1 && meta[1] >= 1, path, ": no tokens");
  return ids;
}

std::string read_text(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  check(static_cast<bool>(in), path, ": cannot read ", what);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace ringattn::cli
