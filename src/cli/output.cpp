// The CLI's shared output helpers (commands.h): JSON to stdout, progress lines
// to stderr.
#include <unistd.h>

#include <cstdio>
#include <iostream>

#include "cli/commands.h"

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
