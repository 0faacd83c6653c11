// Subcommands of the `ringattn` command. Each registers its options on the app and
// runs from a callback; errors are thrown as ringattn::Error and reported by main.
#pragma once
#include <CLI/CLI.hpp>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "ringattn/model.h"
#include "ringattn/parallel.h"

namespace ringattn::cli {

void add_info(CLI::App& app);
void add_attention(CLI::App& app);
void add_bench(CLI::App& app);
void add_bench_lm(CLI::App* bench);      // `bench lm`, under `bench`
void add_bench_layers(CLI::App* bench);  // `bench layers`, under `bench`
void add_train(CLI::App& app);
void add_compare(CLI::App& app);
void add_generate(CLI::App& app);
void add_forward(CLI::App& app);
void add_plan(CLI::App& app);
// Every subcommand above, in the order `ringattn --help` lists them (main and the
// command-line fuzzer register the same set).
void add_all(CLI::App& app);

// --layers, --d-model, --heads, --kv-heads, --mlp: the model's shape, the same on
// every subcommand that builds or models a transformer.
void add_model_options(CLI::App* cmd, ModelConfig& m);

// --dtype of a model: fp32, or bf16 mixed precision (`help` says what bf16 keeps
// in fp32); sets m.dtype, `name` keeps the spelling for reports.
void add_model_dtype_option(CLI::App* cmd, ModelConfig& m, std::string& name, const std::string& help);

// A parallel run's options, one vocabulary for train, forward and generate: --pp
// --sp --tp --strategy (ring, allgather, ulysses, hybrid) --ulysses --layout
// --device --threads, and with_dp --dp. ParallelConfig::for_ranks checks them.
void add_parallel_options(CLI::App* cmd, ParallelConfig& p, bool with_dp);

// Option checks shared by every subcommand: one vocabulary, one message style,
// and every bad value refused when parsed (exit 2), before anything runs.
// A real number > 0 and finite: nan, inf, 0 and negatives are refused.
const CLI::Validator& positive_finite();
// An integer >= 1. For options whose default 0 means "automatic" (--kv-heads,
// --kv-seq, --capacity, --ranks), an explicit 0 is refused rather than taken as
// the default.
const CLI::Validator& positive_count();
// --seed: a whole number that fits in 64 bits (-1 would wrap around).
const CLI::Validator& seed_value();
// --threads-style options: 1 to 16 x the CPUs.
const CLI::Validator& thread_count();
// --timeout: positive seconds or "none" (no limit, stored as 0); `timeout`
// holds the default.
void add_timeout_option(CLI::App* cmd, double& timeout);

// The message of the Error fn throws, or "" (CLI11 validators return messages).
std::string error_of(const std::function<void()>& fn);

// Token ids read on rank 0 only (`read` returns them and may set two numbers of
// its own in meta, e.g. the batch and the length), then given to every rank of
// world (null: one process) — or rank 0's Error, thrown on every rank, so a bad
// file never leaves the others waiting.
std::vector<int64_t> ids_from_rank0(Communicator* world, int64_t meta[2],
                                    const std::function<std::vector<int64_t>(int64_t meta[2])>& read);
// Token ids of a .npy of shape [L] or [B, L] (int64/int32): B and L into meta.
std::vector<int64_t> load_batch_ids(const std::string& path, int64_t meta[2]);
// Packed documents' offsets cu_seqlens from a .npy (int32 or int64, one
// dimension; empty path: none); its values are checked against the sequence
// length once that is known (check_cu_seqlens). `what` names the option.
std::vector<int32_t> load_cu_seqlens(const std::string& path, const char* what);
// The bytes of a text file (`what` names it in the error).
std::string read_text(const std::string& path, const std::string& what);

// Prints j (indented) to stdout.
void print_json(const nlohmann::json& j);
// A progress line on stderr (overwritten in place when stderr is a terminal).
void progress(const std::string& msg);
void progress_done();

}  // namespace ringattn::cli
