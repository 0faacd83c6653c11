// The subcommands of `ringattn`, registered once for main and the fuzzer, and
// the options they share.
#include "cli/commands.h"

namespace ringattn::cli {

void add_model_options(CLI::App* cmd, ModelConfig& m) {
  cmd->add_option("--layers", m.layers, "transformer layers")->capture_default_str();
  cmd->add_option("--d-model", m.d_model, "model width (= heads x head dim)")->capture_default_str();
  cmd->add_option("--heads", m.heads, "attention heads")->capture_default_str();
  cmd->add_option("--kv-heads", m.kv_heads, "key/value heads (default: --heads)");
  cmd->add_option("--mlp", m.mlp_hidden, "MLP hidden width (default: 4 x d_model)");
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
