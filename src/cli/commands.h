// Subcommands of the `ringattn` command. Each registers its options on the app and
// runs from a callback; errors are thrown as ringattn::Error and reported by main.
#pragma once
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <string>

#include "ringattn/model.h"

namespace ringattn::cli {

void add_info(CLI::App& app);
void add_attention(CLI::App& app);
void add_bench(CLI::App& app);
void add_train(CLI::App& app);
void add_compare(CLI::App& app);
void add_generate(CLI::App& app);
void add_plan(CLI::App& app);
// Every subcommand above, in the order `ringattn --help` lists them (main and the
// command-line fuzzer register the same set).
void add_all(CLI::App& app);

// --layers, --d-model, --heads, --kv-heads, --mlp: the model's shape, the same on
// every subcommand that builds or models a transformer.
void add_model_options(CLI::App* cmd, ModelConfig& m);

// Prints j (indented) to stdout.
void print_json(const nlohmann::json& j);
// A progress line on stderr (overwritten in place when stderr is a terminal).
void progress(const std::string& msg);
void progress_done();

}  // namespace ringattn::cli
