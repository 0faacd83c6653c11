// `ringattn train`: training with RA+SP (x data x tensor parallel) on the local
// ranks.
//   --model DIR | --config CFG.json   a language model (a Hugging Face
//       checkpoint to continue, or a config.json to start from the seed) on a
//       text (--data, through --tokenizer): next-token loss, held-out loss and
//       bits per byte, --save as a checkpoint transformers loads.
//   otherwise   the vector model of the benchmarks on random data (MSE):
//       forward (prefill) and training-step throughput, loss, peak memory and
//       bytes moved per rank.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>

#include "cli/commands.h"
#include "ringattn/atomic_file.h"
#include "ringattn/cuda.h"
#include "ringattn/error.h"
#include "ringattn/lm.h"
#include "ringattn/memory.h"
#include "ringattn/model.h"
#include "ringattn/parallel.h"
#include "ringattn/perf.h"
#include "ringattn/pipeline.h"
#include "ringattn/tokenizer.h"

namespace ringattn::cli {
namespace {

struct TrainArgs {
  ModelConfig model;
  ParallelConfig par;
  int64_t batch = 1, seq = 2048;
  int steps = 3;
  std::string dtype = "fp32";
  float lr = 1e-3f;
  double timeout = 300;
  bool json = false;
  // A language model.
  std::string lm, config, data, tokenizer, save, log;
  std::optional<std::string> documents;  // the line that separates documents in --data
  double val_fraction = 0.05;
  int eval_every = 50;
  int64_t eval_windows = 64;
};

// ---- --model / --config: a language model on a text --------------------------------

std::unique_ptr<Tokenizer> train_tokenizer(const TrainArgs& a) {
  if (a.tokenizer == "byte") return byte_tokenizer();
  if (!a.tokenizer.empty()) return load_tokenizer(a.tokenizer);
  check(!a.lm.empty() && std::ifstream(a.lm + "/tokenizer.json"),
        "train --data needs a tokenizer: --tokenizer byte|DIR (the checkpoint has no tokenizer.json)");
  return load_tokenizer(a.lm);
}

void run_lm(const TrainArgs& a) {
  if (a.par.threads > 0) omp_set_num_threads(a.par.threads);
  std::unique_ptr<Communicator> world;
  if (MpiSession::active()) world = mpi_world(a.timeout);
  const int P = world ? world->size() : 1, rank = world ? world->rank() : 0;
  const ParallelConfig pc = a.par.for_ranks(P);
  check(!a.data.empty(), "train --model/--config needs --data FILE (a text)");
  check(a.batch % pc.dp == 0, "--batch ", a.batch, " must be divisible by --dp ", pc.dp);
  check(a.batch / pc.dp % pc.pp == 0, "--batch ", a.batch, " / --dp ", pc.dp, " must be divisible by --pp ", pc.pp,
        " (one micro-batch per pipeline stage)");
  check(a.val_fraction > 0 && a.val_fraction < 1, "--val-fraction must be in (0, 1), got ", a.val_fraction);
  pc.check_sequence(a.seq);
  const LmConfig lc = load_lm_config(a.lm.empty() ? a.config : a.lm);
  check(a.seq <= lc.max_positions || lc.arch != Arch::gpt2, "--seq ", a.seq, " is beyond gpt2's ", lc.max_positions,
        " learned positions");
  const std::unique_ptr<Tokenizer> tok = train_tokenizer(a);
  check(tok->vocab_size() <= lc.vocab, "the tokenizer has ", tok->vocab_size(), " tokens, the model's vocabulary ",
        lc.vocab);
  // --documents: each document is encoded alone and followed by the EOS token.
  const bool packed = a.documents.has_value();
  const int64_t eos = lc.eos_token;
  if (packed) {
    check(eos >= 0 && eos < lc.vocab, "--documents puts an end-of-sequence token after each document, but ",
          a.lm.empty() ? a.config : a.lm + "/config.json", " has no eos_token_id inside the vocabulary of ", lc.vocab);
  }
  int64_t meta[2];  // the text's bytes (of the documents), the documents
  const std::vector<int64_t> ids = ids_from_rank0(world.get(), meta, [&](int64_t m[2]) {
    // Every output before any compute: --save's folder is made now, and its two
    // files must be writable and not the checkpoint trained from.
    NamedPaths outputs{{"--log", a.log}}, inputs{{"--data", a.data}};
    if (!a.save.empty()) {
      std::error_code e;
      std::filesystem::create_directories(a.save, e);
      check(!e && std::filesystem::is_directory(a.save), "--save ", a.save, ": cannot make the folder",
            e ? ": " + e.message() : std::string(" (a file is there)"));
      outputs.push_back({"--save", a.save + "/model.safetensors"}),
          outputs.push_back({"--save", a.save + "/config.json"});
      if (!a.lm.empty())
        inputs.push_back({"--model", a.lm + "/model.safetensors"}),
            inputs.push_back({"--model", a.lm + "/config.json"});
    }
    check_output_paths(outputs, inputs);
    const std::string text = read_text(a.data, "the training text");
    m[0] = static_cast<int64_t>(text.size()), m[1] = 1;
    if (!packed) return tok->encode(text, false);
    std::vector<int64_t> out;
    std::string doc;
    m[0] = m[1] = 0;
    auto flush = [&] {
      if (doc.empty()) return;
      const std::vector<int64_t> d = tok->encode(doc, false);
      check(std::find(d.begin(), d.end(), eos) == d.end(), a.data, ": document ", m[1] + 1,
            " encodes to the end-of-sequence id ", eos, " itself, so documents could not be told apart");
      out.insert(out.end(), d.begin(), d.end());
      out.push_back(eos);
      m[0] += static_cast<int64_t>(doc.size()), ++m[1];
      doc.clear();
    };
    for (size_t i = 0; i < text.size();) {  // documents end at each line that is exactly the separator
      const size_t e = std::min(text.find('\n', i), text.size());
      if (text.compare(i, e - i, *a.documents) == 0)
        flush();
      else
        doc.append(text, i, std::min(e + 1, text.size()) - i);
      i = e + 1;
    }
    flush();
    check(m[1] > 0, a.data, ": no document between the --documents '", *a.documents, "' lines");
    return out;
  });
  const int64_t bytes = meta[0], n_docs = meta[1];
  const int64_t n = static_cast<int64_t>(ids.size()), L = a.seq;
  const int64_t n_val = std::max<int64_t>(L, static_cast<int64_t>(static_cast<double>(n) * a.val_fraction));
  const int64_t n_train = n - n_val;
  check(n_train > L, a.data, ": ", n, " tokens are too few for --seq ", L, " and a held-out ", a.val_fraction,
        " of the text");
  const double bytes_per_token = static_cast<double>(bytes) / static_cast<double>(n);

  RunContext run(world.get(), pc);
  const ModelParallel& par = run.model_parallel();
  ModelConfig mc = model_config(lc);
  mc.dtype = a.model.dtype, mc.seed = a.model.seed;
  Model model = a.lm.empty() ? model_for(mc, run) : lm_model(a.lm, mc.dtype, run);
  Communicator* replicas = run.replicas();
  Communicator* pp = pc.pp > 1 ? run.mesh().pp_comm.get() : nullptr;
  const int64_t Bl = a.batch / pc.dp, dp0 = run.mesh().dp_index() * Bl;
  AdamW opt;
  opt.lr = a.lr;

  // The held-out loss: consecutive windows of the last n_val tokens (at most
  // eval_windows of them), mean over their targets; bits per byte from it.
  const int64_t windows = std::min<int64_t>(a.eval_windows, n_val / L) / a.batch * a.batch;
  check(windows >= a.batch, "the held-out text (", n_val, " tokens) has fewer than --batch ", a.batch,
        " windows of --seq ", L, "; raise --val-fraction");
  // One step's loss and this rank's gradients for the global batch [batch, L]:
  // its rows dp0 .. dp0 + Bl − 1 here, packed by their EOS tokens with --documents.
  // With train false the loss alone (the held-out windows).
  auto loss_pass = [&](const std::vector<int64_t>& batch, bool train) {
    const std::vector<int64_t> mine(batch.begin() + dp0 * L, batch.begin() + (dp0 + Bl) * L);
    std::vector<std::vector<int32_t>> docs, my_docs;
    if (packed) {
      docs = lm_documents(batch, a.batch, L, eos);
      my_docs.assign(docs.begin() + dp0, docs.begin() + dp0 + Bl);
    }
    const int64_t targets = lm_targets(a.batch, L, docs);
    if (!train) return lm_loss(model, par, mine, Bl, L, targets, replicas, pp, pc.pp, my_docs);
    model.zero_grads();
    return lm_loss_backward(model, par, mine, Bl, L, targets, replicas, pp, pc.pp, my_docs);
  };
  auto held_out = [&] {
    double sum = 0;
    for (int64_t w = 0; w < windows; w += a.batch)
      sum += loss_pass(std::vector<int64_t>(ids.begin() + n_train + w * L, ids.begin() + n_train + (w + a.batch) * L),
                       false);
    return sum / static_cast<double>(windows / a.batch);
  };
  std::mt19937_64 rng(a.model.seed + 1);  // the same windows on every rank
  std::uniform_int_distribution<int64_t> start(0, n_train - L);
  nlohmann::json log = nlohmann::json::array();
  const bool show = rank == 0 && !a.json;
  double t_total = 0;
  for (int s = 1; s <= a.steps; ++s) {
    std::vector<int64_t> batch(static_cast<size_t>(a.batch * L));
    for (int64_t r = 0; r < a.batch; ++r) std::copy_n(ids.begin() + start(rng), L, batch.begin() + r * L);
    const double t0 = now_seconds();
    const double loss = loss_pass(batch, true);
    check(std::isfinite(loss), "the loss is ", loss, " at step ", s, ": training diverged (try a smaller --lr than ",
          a.lr, ")");
    if (replicas) replicas->all_reduce(model.grads(), model.num_params(), ReduceOp::sum);
    opt.update(model);
    t_total += now_seconds() - t0;
    nlohmann::json row = {{"step", s}, {"loss", loss}};
    if (s % a.eval_every == 0 || s == a.steps) {
      const double v = held_out();
      row["val_loss"] = v, row["val_bits_per_byte"] = v / std::log(2.0) / bytes_per_token;
      if (show)
        progress_done(), std::printf("step %5d  loss %.4f  held-out loss %.4f  %.4f bits/byte\n", s, loss, v,
                                     v / std::log(2.0) / bytes_per_token);
    } else if (show) {
      progress(cat("step ", s, "/", a.steps, "  loss ", loss));
    }
    log.push_back(row);
  }
  if (show) progress_done();
  if (!a.save.empty()) save_lm(a.save, model, lc, &run);  // the slices gathered to rank 0
  if (rank != 0) return;
  const double tokens_per_s = static_cast<double>(a.batch * L) * a.steps / t_total;
  int64_t params = 0;  // the whole model's (this rank holds a TP/PP slice)
  for (const auto& [name, shape] : lm_tensor_shapes(lc)) {
    int64_t n_el = 1;
    for (int64_t d : shape) n_el *= d;
    params += n_el;
  }
  nlohmann::json j = {{"arch", arch_name(lc.arch)},
                      {"params", params},
                      {"data", a.data},
                      {"tokenizer", tok->name()},
                      {"tokens", n},
                      {"train_tokens", n_train},
                      {"held_out_tokens", n_val},
                      {"documents", packed ? nlohmann::json(n_docs) : nlohmann::json(nullptr)},
                      {"bytes_per_token", bytes_per_token},
                      {"batch", a.batch},
                      {"seq", L},
                      {"dp", pc.dp},
                      {"pp", pc.pp},
                      {"sp", pc.sp},
                      {"tp", pc.tp},
                      {"strategy", pc.strategy_label()},
                      {"layout", layout_name(pc.layout)},
                      {"tokens_per_s", tokens_per_s},
                      {"steps", log}};
  if (!a.save.empty()) j["saved"] = a.save;
  if (!a.log.empty()) {
    const std::string text = j.dump(1) + "\n";
    write_file_atomically(a.log,
                          [&](std::FILE* f) { return std::fwrite(text.data(), 1, text.size(), f) == text.size(); });
  }
  if (a.json) return print_json(j);
  std::printf(
      "train  %s, %lld parameters, %s tokenizer; %lld tokens (%lld held out%s), B=%lld L=%lld, "
      "dp=%d x pp=%d x sp=%d x tp=%d (%s, %s): %.0f tokens/s\n",
      arch_name(lc.arch), static_cast<long long>(params), tok->name().c_str(), static_cast<long long>(n),
      static_cast<long long>(n_val), packed ? cat("; ", n_docs, " packed documents").c_str() : "",
      static_cast<long long>(a.batch), static_cast<long long>(L), pc.dp, pc.pp, pc.sp, pc.tp,
      pc.strategy_label().c_str(), layout_name(pc.layout), tokens_per_s);
  if (!a.save.empty()) std::printf("saved to %s (config.json, model.safetensors)\n", a.save.c_str());
}

void run(const TrainArgs& a) {
  if (!a.lm.empty() || !a.config.empty()) return run_lm(a);
  check(a.data.empty(), "--data trains a language model: give --model DIR or --config CFG.json");
  if (a.par.threads > 0) omp_set_num_threads(a.par.threads);  // GEMMs and layers too, not only attention
  std::unique_ptr<Communicator> world;
  if (MpiSession::active()) world = mpi_world(a.timeout);
  const int P = world ? world->size() : 1, rank = world ? world->rank() : 0;
  const ParallelConfig pc = a.par.for_ranks(P);
  check(a.batch % pc.dp == 0, "--batch ", a.batch, " must be divisible by --dp ", pc.dp);
  check(a.batch / pc.dp % pc.pp == 0, "--batch ", a.batch, " / --dp ", pc.dp, " must be divisible by --pp ", pc.pp,
        " (one micro-batch per pipeline stage)");
  check_model_fits(a.model, pc);
  pc.check_sequence(a.seq);
  RunContext run(world.get(), pc);
  const ModelParallel& par = run.model_parallel();
  const int sp = pc.sp;
  const int64_t D = a.model.d_model, Bl = a.batch / pc.dp, Ll = run.shard_length(a.seq);

  // The same global data on every rank; each keeps its batch rows and tokens.
  std::mt19937_64 rng(a.model.seed + 1);
  Tensor x(DType::f32, {Bl, Ll, D}), t(DType::f32, {Bl, Ll, D});
  run.shard_batch(random_normal(DType::f32, {a.batch, a.seq, D}, rng), x);
  run.shard_batch(random_normal(DType::f32, {a.batch, a.seq, D}, rng), t);

  Model model = model_for(a.model, run);
  Device& dev = model.device();
  auto on_device = [&](const Tensor& h) { return dev.is_host() ? DeviceTensor(nullptr, h.view()) : dev.upload(h); };
  const DeviceTensor xd = on_device(x), td = on_device(t);
  AdamW opt;
  opt.lr = a.lr;
  const int64_t count = a.batch * a.seq * D;
  Communicator* replicas = run.replicas();
  // One step (or, train = false, the forward alone), complete on the device when
  // it returns: 1F1B over the pipeline stages under MPI on the host (the plain
  // step when pp = 1), train_step on one process or a GPU.
  auto step = [&](bool train) {
    if (world && dev.is_host())
      return pipeline_step(model, train ? &opt : nullptr, x, t, par, *run.mesh().pp_comm, pc.pp, count, replicas,
                           train);
    double loss = 0;
    if (train) {
      loss = train_step(model, opt, xd, td, par, count, replicas);
    } else {
      Activations act;
      model_forward(model, xd, par, act);
    }
    dev.synchronize();
    return loss;
  };
  // Bytes sent: the mesh's groups (MPI), and on GPUs the NCCL communicator.
  auto sent = [&] { return run.bytes_sent(); };
  auto reset_sent = [&] { run.reset_stats(); };
  if (world) world->barrier(), world->reset_stats();
  reset_peak_memory();

  // Forward only (prefill), activations kept as training would; the first run
  // also warms up (GEMM primitives, pages), so the second is timed.
  double t_fwd = 0, t0 = 0;
  int64_t fwd_bytes = 0;
  for (int rep = 0; rep < 2; ++rep) {
    reset_sent();
    t0 = now_seconds();
    step(false);
    t_fwd = now_seconds() - t0;
    fwd_bytes = sent();
  }
  reset_sent();
  std::vector<double> losses, step_times;
  for (int s = 0; s < a.steps; ++s) {
    if (!a.json && rank == 0) progress(cat("step ", s + 1, "/", a.steps));
    t0 = now_seconds();
    losses.push_back(step(true));
    step_times.push_back(now_seconds() - t0);
  }
  if (!a.json && rank == 0) progress_done();
  double mine[3] = {static_cast<double>(memory_stats().peak_bytes), static_cast<double>(sent()),
                    static_cast<double>(fwd_bytes)};
  std::vector<double> all(3 * static_cast<size_t>(P));
  if (world)
    world->all_gather(mine, all.data(), sizeof(mine));
  else
    std::copy(mine, mine + 3, all.begin());
  if (rank != 0) return;

  double best_step = *std::min_element(step_times.begin(), step_times.end());
  const double tokens = static_cast<double>(a.batch * a.seq);
  nlohmann::json j;
  j["model"] = {{"layers", a.model.layers},       {"d_model", D},
                {"heads", a.model.heads},         {"kv_heads", a.model.kv()},
                {"mlp_hidden", a.model.hidden()}, {"causal", a.model.causal},
                {"params", model.num_params()}};
  j["batch"] = a.batch, j["seq"] = a.seq, j["dp"] = pc.dp, j["pp"] = pc.pp, j["sp"] = sp, j["tp"] = pc.tp,
  j["ranks"] = P;
  j["strategy"] = strategy_name(pc.strategy), j["ulysses"] = pc.ulysses, j["layout"] = layout_name(pc.layout);
  j["dtype"] = a.dtype;
  j["device"] = dev.name();
  j["forward_seconds"] = t_fwd;
  j["forward_tokens_per_s"] = tokens / t_fwd;
  j["train_step_seconds"] = step_times;
  j["train_tokens_per_s"] = tokens / best_step;
  j["loss"] = losses;
  j["per_rank"] = nlohmann::json::array();
  for (int r = 0; r < P; ++r)
    j["per_rank"].push_back({{"rank", r},
                             {"peak_memory_bytes", all[3 * r]},
                             {"bytes_sent", all[3 * r + 1]},
                             {"forward_bytes_sent", all[3 * r + 2]}});
  // A loss that is not finite is a failed run (after the report): the step diverged.
  auto check_loss = [&] {
    for (size_t s = 0; s < losses.size(); ++s)
      check(std::isfinite(losses[s]), "the loss is ", losses[s], " after step ", s + 1,
            ": training diverged (try a smaller --lr than ", a.lr, ")");
  };
  if (a.json) {
    print_json(j);
    return check_loss();
  }
  std::printf(
      "train  layers=%lld d_model=%lld heads=%lld/%lld mlp=%lld  B=%lld L=%lld  dp=%d x pp=%d x sp=%d x tp=%d "
      "(%s, %s, %s)\n",
      static_cast<long long>(a.model.layers), static_cast<long long>(D), static_cast<long long>(a.model.heads),
      static_cast<long long>(a.model.kv()), static_cast<long long>(a.model.hidden()), static_cast<long long>(a.batch),
      static_cast<long long>(a.seq), pc.dp, pc.pp, sp, pc.tp, pc.strategy_label().c_str(), layout_name(pc.layout),
      a.dtype.c_str());
  if (!dev.is_host()) std::printf("device %s (peak MiB below counts host memory only)\n", dev.name().c_str());
  std::printf("forward (prefill)   %10.1f ms   %10.0f tokens/s\n", t_fwd * 1e3, tokens / t_fwd);
  std::printf("training step (best of %d) %6.1f ms   %10.0f tokens/s\n", a.steps, best_step * 1e3, tokens / best_step);
  std::printf("loss by step:");
  for (double l : losses) std::printf(" %.5f", l);
  std::printf("\n%4s %12s %22s %18s\n", "rank", "peak MiB", "sent MiB (all steps)", "sent MiB (forward)");
  for (int r = 0; r < P; ++r)
    std::printf("%4d %12.1f %22.1f %18.1f\n", r, all[3 * r] / 1048576.0, all[3 * r + 1] / 1048576.0,
                all[3 * r + 2] / 1048576.0);
  check_loss();
}

}  // namespace

void add_train(CLI::App& app) {
  auto a = std::make_shared<TrainArgs>();
  auto* cmd =
      app.add_subcommand("train",
                         "train the dense transformer with RA+SP (x data x tensor parallel) under mpirun: throughput, "
                         "loss, memory, bytes");
  add_model_options(cmd, a->model);
  cmd->add_flag("!--bidirectional", a->model.causal, "no causal mask");
  cmd->add_option("--seed", a->model.seed, "weights and data seed")->check(seed_value())->capture_default_str();
  add_model_dtype_option(cmd, a->model, a->dtype, "fp32 master weights and accumulation");
  cmd->add_option("--batch", a->batch, "global batch")->check(positive_count())->capture_default_str();
  cmd->add_option("--seq", a->seq, "sequence length")->check(positive_count())->capture_default_str();
  cmd->add_option("--steps", a->steps, "training steps")->check(positive_count())->capture_default_str();
  cmd->add_option("--lr", a->lr, "AdamW learning rate")->check(positive_finite())->capture_default_str();
  add_parallel_options(cmd, a->par, true);
  add_timeout_option(cmd, a->timeout);
  cmd->add_flag("--json", a->json, "machine-readable output");
  // A language model.
  auto* model = cmd->add_option("--model", a->lm, "a Hugging Face checkpoint folder to train further");
  auto* config =
      cmd->add_option("--config", a->config, "a config.json (llama, mistral, qwen2, gpt2) to train from the seed");
  model->excludes(config);
  auto* data = cmd->add_option("--data", a->data, "--model/--config: the training text (UTF-8)");
  cmd->add_option("--documents", a->documents,
                  "--model/--config: --data holds documents separated by lines equal to this one (e.g. % for "
                  "fortune files); each ends with the EOS token and attention, positions and targets never cross "
                  "one")
      ->needs(data);
  cmd->add_option("--tokenizer", a->tokenizer, "--model/--config: tokenizer.json folder, or 'byte' (ids = bytes)");
  cmd->add_option("--save", a->save, "--model/--config: write the trained checkpoint to this folder");
  cmd->add_option("--log", a->log, "--model/--config: write the loss by step as JSON here");
  cmd->add_option("--val-fraction", a->val_fraction, "--model/--config: the end of the text held out")
      ->capture_default_str();
  cmd->add_option("--eval-every", a->eval_every, "--model/--config: steps between held-out evaluations")
      ->check(positive_count())
      ->capture_default_str();
  cmd->add_option("--eval-windows", a->eval_windows, "--model/--config: held-out windows of --seq tokens evaluated")
      ->check(positive_count())
      ->capture_default_str();
  for (const char* vector_only : {"--layers", "--d-model", "--heads", "--kv-heads", "--mlp", "--bidirectional"}) {
    model->excludes(cmd->get_option(vector_only));
    config->excludes(cmd->get_option(vector_only));
  }
  cmd->callback([a] { run(*a); });
}

}  // namespace ringattn::cli
