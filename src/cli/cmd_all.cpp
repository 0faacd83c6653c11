// The subcommands of `ringattn`, registered once for main and the fuzzer, and
// the options and option checks they share.
#include <cerrno>
#include <cmath>
#include <cstdlib>

#include "cli/commands.h"
#include "ringattn/comm.h"
#include "ringattn/cpu.h"
#include "ringattn/error.h"

namespace ringattn::cli {

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
  static const CLI::Validator v(
      [](std::string& s) -> std::string {
        char* end = nullptr;
        errno = 0;
        const long long x = std::strtoll(s.c_str(), &end, 10);
        if (s.empty() || !end || *end != '\0') return cat("'", s, "' is not a whole number");
        if (errno == ERANGE) return cat(s, " is too large");
        if (x < 1) return cat("must be at least 1, got ", s);
        return {};
      },
      "COUNT");
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

const CLI::Validator& thread_count() {
  static const CLI::Validator v(
      [](std::string& s) -> std::string {
        char* end = nullptr;
        const long long x = std::strtoll(s.c_str(), &end, 10);
        if (s.empty() || !end || *end != '\0') return cat("'", s, "' is not a thread count");
        try {
          check_thread_count(x, "the thread count");
        } catch (const Error& e) {
          return e.what();
        }
        return {};
      },
      "THREADS");
  return v;
}

void add_timeout_option(CLI::App* cmd, double& timeout) {
  cmd->add_option_function<std::string>(
         "--timeout", [&timeout](const std::string& s) { timeout = parse_timeout(s, "--timeout"); },
         cat("seconds a rank waits for a peer before failing, or 'none' for no limit (default ", timeout, ")"))
      ->check(CLI::Validator(
          [](std::string& s) -> std::string {
            try {
              parse_timeout(s, "the timeout");
            } catch (const Error& e) {
              return e.what();
            }
            return {};
          },
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

void add_all(CLI::App& app) {
  add_info(app);
  add_attention(app);
  add_bench(app);
  add_train(app);
  add_compare(app);
  add_generate(app);
  add_plan(app);
}

}  // namespace ringattn::cli
