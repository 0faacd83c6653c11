// `ringattn plan`: the performance model of plan.h as a command. Ranks every
// layout of a world for a model, sequence and hardware; `--calibrate` measures
// this machine into a hardware file; `--validate` puts the model against measured
// `ringattn compare --json-out` files; `--sweep` predicts over sequence lengths
// (and draws them with `--png`).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "cli/commands.h"
#include "cli/launch.h"
#include "ringattn/atomic_file.h"
#include "ringattn/attention.h"
#include "ringattn/comm.h"
#include "ringattn/error.h"
#include "ringattn/lm_config.h"
#include "ringattn/plan.h"

#ifndef RINGATTN_SOURCE_DIR
#define RINGATTN_SOURCE_DIR "."
#endif

namespace ringattn::cli {
namespace {

struct PlanArgs {
  ModelConfig model;  // 4 layers, d_model 256, 4 heads x 64, MLP 4 x d_model, causal, seed 1
  int64_t seq = 8192, batch = 2;
  std::string dtype = "fp32", activations = "fp32", hardware = "this-machine", objective = "train", out, png, sweep,
              attention_kernels, config, cu_seqlens;
  int world = 2, nodes = 0, top = 15, threads = 1;
  bool json = false, all = false, calibrate = false, calibrate_rank = false, timeshare_rank = false, non_causal = false;
  double claim = 0;
  std::vector<std::string> validate, meshes;
};

Workload workload(const PlanArgs& a) {
  Workload w;
  w.model = a.config.empty() ? a.model : model_config(load_lm_config(a.config));
  w.model.dtype = parse_dtype(a.dtype);
  w.model.causal = !a.non_causal;
  check(w.model.window == 0 || w.model.causal, "--sliding-window needs causal attention (drop --non-causal)");
  w.seq = a.seq, w.batch = a.batch;
  w.activations = parse_dtype(a.activations);
  check(w.model.layers >= 1 && w.model.d_model >= 1 && w.model.heads >= 1 &&
            (w.model.head_size > 0 || w.model.d_model % w.model.heads == 0) && w.model.heads % w.model.kv() == 0 &&
            w.model.hidden() >= 1,
        "model: layers, d_model, heads >= 1, d_model divisible by heads, heads by kv-heads");
  check(w.seq >= 1 && w.batch >= 1, "--seq and --batch must be >= 1");
  w.cu_seqlens = load_cu_seqlens(a.cu_seqlens, "--cu-seqlens");
  if (!w.cu_seqlens.empty()) check_cu_seqlens(w.cu_seqlens, w.seq, "--cu-seqlens");
  // The model counts tokens, bytes and FLOPs in 64-bit integers here and there.
  check(double(w.seq) * double(w.batch) * double(w.model.d_model) * double(w.model.layers) < 1e17, "--seq ", w.seq,
        " x --batch ", w.batch, " x --d-model x --layers is too large to model");
  return w;
}

Hardware hardware(const PlanArgs& a) {
  Hardware h = load_hardware(a.hardware);  // this-machine: says to calibrate when it must
  if (!a.attention_kernels.empty()) h.use_attention_kernels(a.attention_kernels);
  return h;
}

// "sp=16", "tp=8,pp=2", "sp=4,strategy=hybrid,ulysses=2,layout=contiguous,micro=4,dp=2"
Candidate parse_mesh(const std::string& spec) {
  Candidate c;
  bool micro = false;
  std::stringstream ss(spec);
  std::string kv;
  while (std::getline(ss, kv, ',')) {
    const auto eq = kv.find('=');
    check(eq != std::string::npos, "--mesh '", spec, "': expected key=value items, got '", kv, "'");
    const std::string k = kv.substr(0, eq), v = kv.substr(eq + 1);
    auto num = [&] {
      try {
        const int n = std::stoi(v);
        check(n >= 1, "");
        return n;
      } catch (...) {
        throw Error(cat("--mesh '", spec, "': ", k, " must be a positive integer, got '", v, "'"));
      }
    };
    if (k == "dp")
      c.dp = num();
    else if (k == "pp")
      c.pp = num();
    else if (k == "sp")
      c.sp = num();
    else if (k == "tp")
      c.tp = num();
    else if (k == "ulysses")
      c.ulysses = num(), c.strategy = Strategy::hybrid;
    else if (k == "micro")
      c.micro_batches = num(), micro = true;
    else if (k == "strategy")
      c.strategy = parse_strategy(v);
    else if (k == "layout")
      c.layout = parse_layout(v);
    else
      throw Error(cat("--mesh '", spec, "': unknown key '", k, "' (dp, pp, sp, tp, strategy, ulysses, layout, micro)"));
  }
  if (!micro) c.micro_batches = 0;  // chosen by predict_mesh: the best that fits
  return c;
}

// The candidate's micro-batch count when it was left open: the best that fits.
Prediction predict_mesh(const Workload& w, const Candidate& c, const Hardware& h, const Cluster& cl) {
  return c.micro_batches > 0 ? predict(w, c, h, cl) : predict_best_micro_batches(w, c, h, cl);
}

double objective(const Prediction& p, const std::string& o) {
  if (o == "forward") return p.forward_tokens_per_s;
  if (o == "decode") return 1 / p.decode_step_s;
  return p.train_tokens_per_s;
}

nlohmann::json prediction_json(const Prediction& p) {
  const Candidate& c = p.c;
  nlohmann::json j = {{"layout", c.name()}, {"dp", c.dp}, {"pp", c.pp},
                      {"sp", c.sp},         {"tp", c.tp}, {"strategy", c.sp > 1 ? strategy_name(c.strategy) : "none"}};
  if (c.strategy == Strategy::hybrid) j["ulysses"] = c.ulysses;
  if (c.sp > 1 && c.strategy != Strategy::ulysses) j["sequence_layout"] = layout_name(c.layout);
  j["micro_batches"] = c.micro_batches;
  if (!p.invalid.empty()) {
    j["invalid"] = p.invalid;
    return j;
  }
  j["forward_seconds"] = p.forward_s, j["train_step_seconds"] = p.train_s;
  j["forward_tokens_per_s"] = p.forward_tokens_per_s, j["train_tokens_per_s"] = p.train_tokens_per_s;
  j["decode_step_ms"] = p.decode_step_s * 1e3;
  j["forward_mfu"] = p.forward_mfu, j["train_mfu"] = p.train_mfu;
  j["peak_train_bytes_per_device"] = p.peak_train_bytes;
  j["peak_inference_bytes_per_device"] = p.peak_inference_bytes;
  j["kv_cache_bytes_per_device"] = p.kv_cache_bytes;
  j["device_memory_bytes"] = p.capacity_bytes;
  j["fits_train"] = p.fits_train, j["fits_inference"] = p.fits_inference;
  j["train_bytes_sent_per_device"] = p.train_bytes_sent;
  j["train_bytes_intra_node"] = p.intra_bytes, j["train_bytes_inter_node"] = p.inter_bytes;
  j["forward_bytes_sent_per_device"] = p.forward_bytes_sent;
  j["decode_bytes_sent_per_device"] = p.decode_bytes_sent;
  j["comm_seconds"] = p.comm_s, j["comm_hidden_share"] = p.hidden_share();
  return j;
}

std::string si(double v, const char* unit) {
  const char* pre[] = {"", "k", "M", "G", "T", "P"};
  int i = 0;
  while (std::fabs(v) >= 1000 && i < 5) v /= 1000, ++i;
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3g %s%s", v, pre[i], unit);
  return buf;
}

void print_table(const std::vector<Prediction>& ps, size_t top) {
  std::printf("%-4s %-34s %5s %12s %12s %10s %9s %11s %9s %11s %11s %7s\n", "rank", "layout", "micro", "fwd tok/s",
              "train tok/s", "decode ms", "train MFU", "peak GiB", "fits", "GB/step", "inter GB", "hidden");
  size_t shown = 0;
  for (size_t i = 0; i < ps.size() && shown < top; ++i, ++shown) {
    const Prediction& p = ps[i];
    std::string name = p.c.name();
    if (p.c.sp > 1 && p.c.strategy != Strategy::ulysses && p.c.layout != Layout::zigzag)
      name += cat(" [", layout_name(p.c.layout), "]");
    if (!p.invalid.empty()) {
      std::printf("%-4s %-34s invalid: %s\n", "-", name.c_str(), p.invalid.c_str());
      continue;
    }
    std::printf("%-4zu %-34s %5d %12.4g %12.4g %10.4g %8.1f%% %11.3g %9s %11.3g %11.3g %6.0f%%\n", i + 1, name.c_str(),
                p.c.micro_batches, p.forward_tokens_per_s, p.train_tokens_per_s, p.decode_step_s * 1e3,
                100 * p.train_mfu, p.peak_train_bytes / 1073741824.0,
                p.fits_train ? (p.fits_inference ? "yes" : "train") : (p.fits_inference ? "infer" : "NO"),
                p.train_bytes_sent / 1e9, p.inter_bytes / 1e9, 100 * p.hidden_share());
  }
  if (ps.size() > top) std::printf("... %zu more (--top N, --json)\n", ps.size() - top);
}

// Starts one rank per device (CPUs / --threads, at least 2) under mpirun; they
// measure together and rank 0 prints the description, written here.
void run_calibrate(const PlanArgs& a) {
  check(a.threads >= 1, "--threads must be >= 1");
  const std::string out = a.out.empty() ? this_machine_path() : a.out;
  if (a.out.empty()) std::filesystem::create_directories(std::filesystem::path(out).parent_path());
  check_output_paths({{"--out", out}});  // before minutes of measuring
  const int ranks = std::max(2, static_cast<int>(std::thread::hardware_concurrency()) / a.threads);
  const std::string cmd = cat(default_launcher(ranks), " -np ", ranks, " ", shell_quote(self_executable()),
                              " plan --calibrate-rank --threads ", a.threads);
  Hardware h = hardware_from_json(capture(cmd), "the calibration");  // checks what the ranks measured
  // Twice as many ranks as devices: the cost of waiting on a time-shared peer.
  progress(cat("time-sharing: ", 2 * ranks, " ranks on ", ranks, " devices"));
  const std::string ts = cat(default_launcher(2 * ranks), " -np ", 2 * ranks, " ", shell_quote(self_executable()),
                             " plan --timeshare-rank --threads ", a.threads);
  h.timeshare_wait_s = nlohmann::json::parse(capture(ts))["timeshare_wait_s"].get<double>();
  h.sources["timeshare_wait_s"] =
      cat(2 * ranks, " ranks on ", ranks,
          " devices: 400 steps of ~0.5 ms of LayerNorm "
          "each, alone and each followed by an all-reduce of one number; extra time per step");
  const std::string text = hardware_to_json(h);
  progress_done();
  write_file_atomically(out, [&](std::FILE* f) { return std::fputs(text.c_str(), f) >= 0; });
  if (a.json) return print_json(nlohmann::json::parse(text));
  std::printf("%s", text.c_str());
  std::printf("%s: %d devices per node; written to %s\n", h.name.c_str(), h.devices_per_node, out.c_str());
}

// Under mpirun, more ranks than devices: rank 0 prints the time-shared wait cost.
void run_timeshare_rank(const PlanArgs& a) {
  omp_set_num_threads(a.threads);
  std::unique_ptr<Communicator> world = mpi_world(600);
  const double tau = measure_timeshare_wait(*world);
  if (world->rank() == 0) print_json({{"timeshare_wait_s", tau}});
}

// Under mpirun: every rank measures; rank 0 prints the hardware JSON.
void run_calibrate_rank(const PlanArgs& a) {
  std::unique_ptr<Communicator> world = mpi_world(600);
  const Hardware h = calibrate_this_machine(*world, a.threads, [](const std::string& m) { progress(m); });
  if (world->rank() == 0) std::fputs(hardware_to_json(h).c_str(), stdout);
}

// compare's methods as layouts: the strategy, layout and Ulysses degree its
// --json records; files written before it recorded them (docs/results/plan-*)
// are read by the method's name, the zigzag layout and Ulysses(2) they all used.
Candidate method_candidate(const nlohmann::json& m, int64_t batch) {
  Candidate c;
  c.pp = m["pp"].get<int>(), c.sp = m["sp"].get<int>(), c.tp = m["tp"].get<int>();
  if (m.contains("strategy")) {
    c.strategy = parse_strategy(m["strategy"].get<std::string>());
    c.layout = parse_layout(m["layout"].get<std::string>());
    c.ulysses = m["ulysses"].get<int>();
    c.dp = m.value("dp", 1);
  } else {
    const std::string name = m["method"].get<std::string>();
    if (name.find("x ring") != std::string::npos)
      c.strategy = Strategy::hybrid, c.ulysses = 2;
    else if (name.rfind("Ulysses", 0) == 0)
      c.strategy = Strategy::ulysses;
    else if (name.rfind("all-gather", 0) == 0)
      c.strategy = Strategy::allgather;
    c.layout = Layout::zigzag;
  }
  c.micro_batches = c.pp > 1 ? static_cast<int>(batch) : 1;
  return c;
}

nlohmann::json ranking_json(const RankAgreement& r) {
  return {{"significant_pairs", r.pairs}, {"pairs_ordered_right", r.agree}, {"best_picked", r.best}};
}

// The measured figures of `ringattn compare --json-out` files, repeated runs of
// one configuration (model, dtype, ranks, batch, seq) merged: each method's time
// and memory figures become their median over the runs that measured it, and
// "runs" says how many did (a method skipped or failed in one run is left out of
// that run only). Files keep their first appearance's order.
std::vector<std::pair<std::string, nlohmann::json>> merged_runs(const std::vector<std::string>& files) {
  std::vector<std::pair<std::string, nlohmann::json>> out;  // (files, merged)
  std::vector<std::vector<nlohmann::json>> runs;
  for (const std::string& file : files) {
    check(std::filesystem::is_regular_file(file), "--validate: ", file, " is not a readable file");
    std::ifstream f(file);
    check(f.good(), "--validate: cannot read ", file);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(f);
    } catch (const nlohmann::json::exception& e) {
      throw Error(cat(file, ": not valid JSON: ", e.what()));
    }
    check(j.contains("methods") && j.contains("model"), file, ": not a `ringattn compare --json-out` file");
    const nlohmann::json key = {j["model"], j["dtype"], j["ranks"], j["batch"], j["seq"]};
    size_t g = 0;
    while (g < out.size() && nlohmann::json{out[g].second["model"], out[g].second["dtype"], out[g].second["ranks"],
                                            out[g].second["batch"], out[g].second["seq"]} != key)
      ++g;
    if (g == out.size())
      out.push_back({file, j}), runs.emplace_back();
    else
      out[g].first += " " + file;
    runs[g].push_back(std::move(j));
  }
  const char* figures[] = {"forward_seconds", "train_step_seconds", "time_per_output_token_ms",
                           "peak_memory_bytes_per_rank"};
  for (size_t g = 0; g < out.size(); ++g) {
    nlohmann::json methods = nlohmann::json::array();
    for (const auto& m : runs[g][0]["methods"]) {
      std::vector<nlohmann::json> same;
      for (const auto& r : runs[g])
        for (const auto& x : r["methods"])
          if (x["method"] == m["method"] && !x.contains("skipped") && !x.contains("failed")) same.push_back(x);
      if (same.empty()) {
        methods.push_back(m);
        continue;
      }
      nlohmann::json merged = same[0];
      for (const char* fig : figures) {
        std::vector<double> v;
        for (const auto& x : same) v.push_back(x[fig].get<double>());
        merged[fig] = median(v);
      }
      merged["runs"] = same.size();
      methods.push_back(merged);
    }
    out[g].second["methods"] = methods;
  }
  return out;
}

void run_validate(const PlanArgs& a) {
  const Hardware h = hardware(a);
  nlohmann::json rows = nlohmann::json::array(), groups = nlohmann::json::array();
  std::vector<double> errors, mem_errors;
  if (!a.json)
    std::printf("%-22s %5s %7s %4s  %-9s %12s %12s %8s\n", "method", "ranks", "seq", "runs", "metric", "predicted",
                "measured", "error");
  for (const auto& [file, j] : merged_runs(a.validate)) {
    Workload w;
    const auto& jm = j["model"];
    w.model.layers = jm["layers"], w.model.d_model = jm["d_model"], w.model.heads = jm["heads"];
    w.model.kv_heads = jm["kv_heads"], w.model.mlp_hidden = jm["mlp_hidden"], w.model.causal = jm["causal"];
    if (jm.contains("config")) w.model = model_config(load_lm_config(jm["config"].get<std::string>()));
    w.model.dtype = parse_dtype(j["dtype"].get<std::string>());
    w.seq = j["seq"], w.batch = j["batch"];
    Cluster cl;
    cl.world = j["ranks"], cl.nodes = 1;  // compare runs every rank on this machine
    std::vector<std::pair<double, double>> fwd, train, tpot;
    for (const auto& m : j["methods"]) {
      if (m.contains("skipped") || m.contains("failed")) continue;
      const Prediction p = predict(w, method_candidate(m, w.batch), h, cl);
      check(p.invalid.empty(), file, ": ", m["method"].get<std::string>(), " is invalid for the model: ", p.invalid);
      const double tok = static_cast<double>(w.batch * w.seq);
      const std::pair<const char*, std::pair<double, double>> metrics[] = {
          {"fwd tok/s", {p.forward_tokens_per_s, tok / m["forward_seconds"].get<double>()}},
          {"train tok/s", {p.train_tokens_per_s, tok / m["train_step_seconds"].get<double>()}},
          {"TPOT ms", {p.decode_step_s * 1e3, m["time_per_output_token_ms"].get<double>()}},
          {"peak MiB", {p.peak_train_bytes / 1048576.0, m["peak_memory_bytes_per_rank"].get<double>() / 1048576.0}}};
      for (const auto& [metric, pm] : metrics) {
        const double err = (pm.first - pm.second) / pm.second;
        const bool timed = std::string(metric) != "peak MiB";
        (timed ? errors : mem_errors).push_back(std::fabs(err));
        const int n_runs = m.value("runs", 1);
        rows.push_back({{"method", m["method"]},
                        {"ranks", cl.world},
                        {"seq", w.seq},
                        {"runs", n_runs},
                        {"metric", metric},
                        {"predicted", pm.first},
                        {"measured", pm.second},
                        {"error", err}});
        if (!a.json)
          std::printf("%-22s %5d %7lld %4d  %-9s %12.4g %12.4g %+7.1f%%\n", m["method"].get<std::string>().c_str(),
                      cl.world, static_cast<long long>(w.seq), n_runs, metric, pm.first, pm.second, 100 * err);
      }
      fwd.push_back({p.forward_tokens_per_s, tok / m["forward_seconds"].get<double>()});
      train.push_back({p.train_tokens_per_s, tok / m["train_step_seconds"].get<double>()});
      tpot.push_back({1 / p.decode_step_s, 1e3 / m["time_per_output_token_ms"].get<double>()});  // steps/s
    }
    groups.push_back({{"file", file},
                      {"ranks", cl.world},
                      {"seq", w.seq},
                      {"forward", ranking_json(rank_agreement(fwd))},
                      {"train", ranking_json(rank_agreement(train))},
                      {"tpot", ranking_json(rank_agreement(tpot))}});
  }
  check(!errors.empty(), "--validate: no measured method in the files");
  const double med = median(errors), worst = *std::max_element(errors.begin(), errors.end());
  nlohmann::json summary = {
      {"hardware", h.name},
      {"time_metrics", errors.size()},
      {"median_abs_error", med},
      {"worst_abs_error", worst},
      {"memory_median_abs_error", median(mem_errors)},
      {"memory_worst_abs_error", mem_errors.empty() ? 0 : *std::max_element(mem_errors.begin(), mem_errors.end())},
      {"rankings", groups}};
  if (a.json) return print_json({{"rows", rows}, {"summary", summary}});
  std::printf(
      "\ntime metrics (fwd tok/s, train tok/s, TPOT): %zu, median |error| %.1f%%, worst %.1f%% "
      "(targets 15%%, 30%%)\npeak memory: median |error| %.1f%%, worst %.1f%%\n",
      errors.size(), 100 * med, 100 * worst, 100 * summary["memory_median_abs_error"].get<double>(),
      100 * summary["memory_worst_abs_error"].get<double>());
  std::printf(
      "ranking: pairs of methods whose measured rates differ by more than 10%% (the run-to-run noise) that "
      "the model orders the same way; best: the predicted best is (within 10%% of) the measured best\n");
  int pairs = 0, agree = 0, best = 0, n = 0;
  for (const auto& g : groups) {
    std::printf("  %d ranks, seq %6lld:", g["ranks"].get<int>(), static_cast<long long>(g["seq"].get<int64_t>()));
    for (const char* k : {"forward", "train", "tpot"}) {
      const auto& r = g[k];
      pairs += r["significant_pairs"].get<int>(), agree += r["pairs_ordered_right"].get<int>();
      best += r["best_picked"].get<bool>(), ++n;
      std::printf("  %s %d/%d best %s", k, r["pairs_ordered_right"].get<int>(), r["significant_pairs"].get<int>(),
                  r["best_picked"].get<bool>() ? "yes" : "no");
    }
    std::printf("\n");
  }
  std::printf("  all: %d of %d significant pairs ordered right, best picked in %d of %d\n", agree, pairs, best, n);
}

// The chart's families: each sequence-parallel attention alone (all ranks in SP)
// and combined with DP/TP/PP, TP x PP alone, and the best layout without SP.
std::string family(const Candidate& c) {
  if (c.sp == 1) return c.tp > 1 && c.pp > 1 && c.dp == 1 ? "TP x PP" : "no SP (DP/TP/PP)";
  const std::string s = c.strategy == Strategy::ring        ? "RA+SP"
                        : c.strategy == Strategy::ulysses   ? "Ulysses"
                        : c.strategy == Strategy::allgather ? "all-gather"
                                                            : "Ulysses x ring";
  return c.dp == 1 && c.tp == 1 && c.pp == 1 ? s : s + " x DP/TP/PP";
}

void run_sweep(const PlanArgs& a, const Workload& w0, const Hardware& h, const Cluster& cl) {
  check_output_paths({{"--png", a.png}});
  std::vector<int64_t> seqs;
  std::stringstream ss(a.sweep);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      seqs.push_back(std::stoll(item));
    } catch (...) {
      throw Error(cat("--sweep: '", item, "' is not a sequence length"));
    }
    check(seqs.back() >= 1, "--sweep: sequence lengths must be >= 1");
  }
  nlohmann::json j = {
      {"hardware", h.name}, {"world", cl.world}, {"objective", a.objective}, {"points", nlohmann::json::array()}};
  for (int64_t L : seqs) {
    Workload w = w0;
    w.seq = L;
    std::map<std::string, Prediction> best;
    for (const Prediction& p : plan(w, h, cl)) {
      if (!p.fits_train && a.objective == "train") continue;
      auto it = best.find(family(p.c));
      if (it == best.end() || objective(p, a.objective) > objective(it->second, a.objective)) best[family(p.c)] = p;
    }
    for (const auto& [f, p] : best)
      j["points"].push_back({{"seq", L},
                             {"family", f},
                             {"layout", p.c.name()},
                             {"value", objective(p, a.objective)},
                             {"forward_tokens_per_s", p.forward_tokens_per_s},
                             {"train_tokens_per_s", p.train_tokens_per_s},
                             {"decode_step_ms", p.decode_step_s * 1e3}});
  }
  if (!a.png.empty()) {
    const std::string tmp = a.png + ".json";
    const std::string text = j.dump(2);
    write_file_atomically(tmp, [&](std::FILE* f) { return std::fputs(text.c_str(), f) >= 0; });
    const std::string script = std::string(RINGATTN_SOURCE_DIR) + "/scripts/plot_plan.py";
    capture(cat("/usr/bin/python3 ", shell_quote(script), " ", shell_quote(tmp), " ", shell_quote(a.png)));
    std::remove(tmp.c_str());
  }
  if (a.json) return print_json(j);
  std::printf("best %s rate of each kind of layout (%s, %d devices):\n%-8s", a.objective.c_str(), h.name.c_str(),
              cl.world, "seq");
  std::vector<std::string> fams;
  for (const auto& p : j["points"])
    if (std::find(fams.begin(), fams.end(), p["family"].get<std::string>()) == fams.end())
      fams.push_back(p["family"].get<std::string>());
  for (const auto& f : fams) std::printf(" %22.22s", f.c_str());
  std::printf("\n");
  for (int64_t L : seqs) {
    std::printf("%-8lld", static_cast<long long>(L));
    for (const auto& f : fams) {
      double v = 0;
      for (const auto& p : j["points"])
        if (p["seq"].get<int64_t>() == L && p["family"] == f) v = p["value"].get<double>();
      if (v > 0)
        std::printf(" %22.4g", v);
      else
        std::printf(" %22s", "-");
    }
    std::printf("\n");
  }
  if (!a.png.empty()) std::printf("chart written to %s\n", a.png.c_str());
}

void run(const PlanArgs& a) {
  if (a.calibrate_rank) return run_calibrate_rank(a);
  if (a.timeshare_rank) return run_timeshare_rank(a);
  if (a.calibrate) return run_calibrate(a);
  if (!a.validate.empty()) return run_validate(a);
  const Workload w = workload(a);
  const Hardware h = hardware(a);
  Cluster cl;
  cl.world = a.world, cl.nodes = a.nodes;
  check(a.world >= 1, "--world must be >= 1");
  check(a.nodes == 0 || a.nodes <= a.world, "--nodes must be at most --world");
  if (!a.sweep.empty()) return run_sweep(a, w, h, cl);

  std::vector<Prediction> ps;
  if (a.meshes.empty()) {
    ps = plan(w, h, cl, a.all);
  } else {
    for (const std::string& m : a.meshes) {
      Candidate c = parse_mesh(m);
      check(c.dp * c.pp * c.sp * c.tp == a.world, "--mesh '", m, "' has ", c.dp * c.pp * c.sp * c.tp,
            " ranks but --world is ", a.world);
      ps.push_back(predict_mesh(w, c, h, cl));
    }
  }
  std::stable_sort(ps.begin(), ps.end(), [&](const Prediction& x, const Prediction& y) {
    if (x.invalid.empty() != y.invalid.empty()) return x.invalid.empty();
    if (x.fits_train != y.fits_train) return x.fits_train;
    return objective(x, a.objective) > objective(y, a.objective);
  });
  // After the table: a plan with nothing that can run, or a requested --mesh
  // that cannot, is a failed run (exit 1) naming why.
  auto check_runnable = [&] {
    for (const Prediction& p : ps)
      check(a.meshes.empty() || p.invalid.empty(), "--mesh ", p.c.name(), " cannot run: ", p.invalid);
    const bool any = std::any_of(ps.begin(), ps.end(), [](const Prediction& p) { return p.invalid.empty(); });
    check(any, "no parallel layout of this model can run on --world ", a.world,
          ps.empty() ? std::string(" (none to enumerate)")
                     : cat(": e.g. ", ps.front().c.name(), ": ", ps.front().invalid),
          a.all ? "" : " (--all lists every layout with its reason)");
  };
  const double flops = forward_flops(w), tokens = static_cast<double>(w.batch * w.seq);
  const double world_peak = h.peak_rate(w.model.dtype) * a.world;
  nlohmann::json claim;
  if (a.claim > 0) {
    claim = {{"tokens_per_s", a.claim},
             {"forward_flops_per_s", a.claim * flops / tokens},
             {"train_flops_per_s", 3 * a.claim * flops / tokens},
             {"world_peak_flops_per_s", world_peak}};
    if (world_peak > 0)
      claim["forward_share_of_peak"] = a.claim * flops / tokens / world_peak,
      claim["train_share_of_peak"] = 3 * a.claim * flops / tokens / world_peak;
    claim["seconds_per_token"] = 1 / a.claim;
  }
  if (a.json) {
    nlohmann::json j = {{"hardware", h.name},       {"world", a.world},
                        {"nodes", cl.nodes_for(h)}, {"seq", w.seq},
                        {"batch", w.batch},         {"dtype", dtype_name(w.model.dtype)},
                        {"forward_flops", flops},   {"forward_flops_per_token", flops / tokens},
                        {"objective", a.objective}, {"layouts", nlohmann::json::array()}};
    j["sliding_window"] = w.model.window;
    j["documents"] = w.cu_seqlens.empty() ? 1 : w.cu_seqlens.size() - 1;
    if (!h.attention_kernels_used.empty()) j["attention_kernels"] = h.attention_kernels_used;
    for (const Prediction& p : ps) j["layouts"].push_back(prediction_json(p));
    if (!claim.is_null()) j["claim"] = claim;
    print_json(j);
    return check_runnable();
  }
  std::printf(
      "plan  %s%lld layers, d_model %lld = %lld heads x %lld, kv heads %lld, MLP %lld, %s; batch %lld x seq "
      "%lld%s\n      on %d x %s (%d per node, %d node(s)), ranked by %s tokens/s\n",
      a.config.empty() ? "" : cat(a.config, ": vocab ", w.model.vocab, w.model.tied ? " (tied), " : ", ").c_str(),
      static_cast<long long>(w.model.layers), static_cast<long long>(w.model.d_model),
      static_cast<long long>(w.model.heads), static_cast<long long>(w.model.head_dim()),
      static_cast<long long>(w.model.kv()), static_cast<long long>(w.model.hidden()), dtype_name(w.model.dtype),
      static_cast<long long>(w.batch), static_cast<long long>(w.seq),
      ((w.model.causal ? ", causal" + (w.model.window > 0 ? cat(", sliding window ", w.model.window) : "") : "") +
       (w.cu_seqlens.empty() ? "" : cat(", ", w.cu_seqlens.size() - 1, " packed documents")))
          .c_str(),
      a.world, h.name.c_str(), h.devices_per_node, cl.nodes_for(h),
      a.objective == "decode" ? "decode" : a.objective.c_str());
  if (!h.attention_kernels_used.empty())
    std::printf("      attention at the hardware file's %s rates\n", h.attention_kernels_used.c_str());
  std::printf("      model FLOPs: forward %s per token (training 3x)\n\n", si(flops / tokens, "FLOP").c_str());
  print_table(ps, static_cast<size_t>(a.top));
  std::printf(
      "\nmicro: pipeline micro-batches (PP) or gradient-accumulation steps per replica, the best that fits; "
      "decode ms: one decode step of the whole batch;\npeak GiB: per device through the training step; fits: "
      "train+inference / only one / NO; GB/step: sent per device per training step (inter: across nodes);\n"
      "hidden: share of the step's transfer time behind compute.\n");
  if (!claim.is_null()) {
    std::printf(
        "\nclaim %s tokens/s: forward needs %s = %.0f%% of %d x peak (%s); training (3x) %s = %.0f%%; "
        "1/throughput = %.3g us per token\n",
        si(a.claim, "").c_str(), si(claim["forward_flops_per_s"].get<double>(), "FLOP/s").c_str(),
        100 * claim.value("forward_share_of_peak", 0.0), a.world, si(h.peak_rate(w.model.dtype), "FLOP/s").c_str(),
        si(claim["train_flops_per_s"].get<double>(), "FLOP/s").c_str(), 100 * claim.value("train_share_of_peak", 0.0),
        1e6 / a.claim);
  }
  check_runnable();
}

}  // namespace

void add_plan(CLI::App& app) {
  auto a = std::make_shared<PlanArgs>();
  auto* cmd = app.add_subcommand(
      "plan",
      "predict every parallel layout (DP x PP x TP x SP, ring/Ulysses/all-gather/hybrid) of a model on a "
      "cluster from a hardware description, rank them; --calibrate measures this machine, --validate checks "
      "the model against measured `compare` runs");
  add_model_options(cmd, a->model);
  auto* config = cmd->add_option("--config", a->config,
                                 "a language model's config.json or checkpoint folder (llama, mistral, qwen2, gpt2): "
                                 "its architecture, embedding and LM head");
  cmd->add_option("--seq", a->seq, "sequence length")->check(positive_count())->capture_default_str();
  cmd->add_option("--batch", a->batch, "sequences per step")->check(positive_count())->capture_default_str();
  cmd->add_option("--dtype", a->dtype, "compute dtype: fp32, bf16, fp16")
      ->check(CLI::IsMember({"fp32", "bf16", "fp16"}))
      ->capture_default_str();
  cmd->add_option("--activations", a->activations,
                  "dtype of the activations between layers and of TP/PP transfers: fp32 (ringattn today), or "
                  "fp16/bf16 (Megatron-style systems)")
      ->check(CLI::IsMember({"fp32", "bf16", "fp16"}))
      ->capture_default_str();
  cmd->add_flag("--non-causal", a->non_causal, "bidirectional attention (default: causal)");
  cmd->add_option("--sliding-window", a->model.window,
                  "every layer's query sees its W most recent keys (mistral): attention work, the ring's trips on "
                  "contiguous shards and the KV cache shrink with it")
      ->check(positive_count());
  cmd->add_option("--cu-seqlens", a->cu_seqlens,
                  "packed documents of every sequence: offsets [n_docs + 1] from 0 to --seq (.npy, as attention takes "
                  "them); attention's work per rank and the ring's trips follow them");
  for (const char* vector_only : {"--layers", "--d-model", "--heads", "--kv-heads", "--mlp", "--sliding-window"})
    config->excludes(cmd->get_option(vector_only));
  cmd->add_option("--world", a->world, "devices (ranks)")->check(positive_count())->capture_default_str();
  cmd->add_option("--nodes", a->nodes,
                  "nodes (default: world / devices per node); fewer nodes than needed time-share the devices")
      ->check(positive_count());
  cmd->add_option("--hardware", a->hardware,
                  "this-machine (the calibration of this CPU), a file in hardware/ by name (h100-sxm, h200-sxm, "
                  "a100-sxm, xeon-2cpu-calibrated) or a JSON path")
      ->capture_default_str();
  cmd->add_option("--attention-kernels", a->attention_kernels,
                  "use the hardware file's rates for these attention kernels instead of its defaults (the GPU "
                  "files: fa3 = FlashAttention-3, ringattn = this project's kernels as measured on an H100; their "
                  "defaults are FlashAttention-2's)");
  cmd->add_option("--mesh", a->meshes,
                  "only these layouts, e.g. sp=16 or tp=8,pp=2 or sp=8,strategy=hybrid,ulysses=2,dp=2,micro=4 "
                  "(repeatable)");
  cmd->add_option("--objective", a->objective, "rank by train, forward or decode")
      ->check(CLI::IsMember({"train", "forward", "decode"}))
      ->capture_default_str();
  cmd->add_option("--top", a->top, "rows shown in the table")->check(positive_count())->capture_default_str();
  cmd->add_flag("--all", a->all, "also list the layouts that cannot run, with the reason");
  cmd->add_option("--claim", a->claim,
                  "a reported tokens/s to check: the FLOP/s it implies against the world's peak, forward and training")
      ->check(positive_finite());
  auto* sweep =
      cmd->add_option("--sweep", a->sweep, "comma-separated sequence lengths: the best layout of each kind at each");
  cmd->add_option("--png", a->png, "with --sweep: draw the sweep (scripts/plot_plan.py, Debian's python3-matplotlib)")
      ->needs(sweep);
  cmd->add_flag("--calibrate", a->calibrate,
                "measure this machine (kernels, GEMMs, bandwidths, MPI ping-pong; one rank per device, all at once, "
                "under mpirun) into this machine's description (~/.config/ringattn/this-machine.json, with the CPU "
                "it measured; `--hardware this-machine` refuses it on another CPU)");
  cmd->add_option("--threads", a->threads, "with --calibrate: threads per rank (one rank per that many CPUs)")
      ->check(thread_count())
      ->capture_default_str();
  cmd->add_option("--out", a->out, "with --calibrate: write here instead of ~/.config/ringattn/this-machine.json");
  cmd->add_option("--validate", a->validate,
                  "`ringattn compare --json-out` files: predicted vs measured for every method, the error table; "
                  "repeated runs of one configuration are compared by their median")
      ->expected(1, -1);
  // Internal: how --calibrate starts its ranks under mpirun; not in --help (empty group).
  cmd->add_flag("--calibrate-rank", a->calibrate_rank, "one rank of --calibrate, under mpirun")->group("");
  cmd->add_flag("--timeshare-rank", a->timeshare_rank, "the time-sharing measurement of --calibrate")->group("");
  cmd->add_flag("--json", a->json, "machine-readable output");
  cmd->callback([a] { run(*a); });
}

}  // namespace ringattn::cli
