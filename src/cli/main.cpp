// ringattn — exact attention over long sequences (Ring Attention + Sequence
// Parallelism). Exit codes: 0 success, 1 runtime error, 2 usage error.
#include <unistd.h>

#include <cstdio>
#include <iostream>

#include "cli/commands.h"
#include "ringattn/error.h"

namespace ringattn::cli {

void print_json(const nlohmann::json& j) { std::cout << j.dump(2) << std::endl; }

void progress(const std::string& msg) {
  static const bool tty = isatty(STDERR_FILENO);
  if (tty)
    std::fprintf(stderr, "\r\033[K%s", msg.c_str());
  else
    std::fprintf(stderr, "%s\n", msg.c_str());
  std::fflush(stderr);
}

void progress_done() {
  static const bool tty = isatty(STDERR_FILENO);
  if (tty) std::fprintf(stderr, "\r\033[K");
}

}  // namespace ringattn::cli

int main(int argc, char** argv) {
  CLI::App app{"ringattn: exact attention over long sequences by Ring Attention + Sequence Parallelism"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "ringattn 0.1.0");
  ringattn::cli::add_info(app);
  ringattn::cli::add_attention(app);
  ringattn::cli::add_bench(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  } catch (const ringattn::Error& e) {
    std::fprintf(stderr, "ringattn: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ringattn: internal error: %s\n", e.what());
    return 1;
  }
  return 0;
}
