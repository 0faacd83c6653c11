// The subcommands of `ringattn`, registered once for main and the fuzzer.
#include "cli/commands.h"

namespace ringattn::cli {

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
