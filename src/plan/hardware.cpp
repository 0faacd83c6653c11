// Hardware descriptions (plan.h) as JSON files: reading with a clear error for a
// missing or misspelt field, writing, and the built-in files in hardware/.
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "ringattn/cpu/features.h"
#include "ringattn/error.h"
#include "ringattn/plan.h"

#ifndef RINGATTN_HARDWARE_DIR
#define RINGATTN_HARDWARE_DIR "hardware"
#endif

namespace ringattn {

namespace {

using Curves = std::map<std::string, std::vector<std::pair<double, double>>>;
using nlohmann::json;

double positive(const json& j, const std::string& key, const std::string& origin) {
  check(j.contains(key), origin, ": missing field '", key, "'");
  check(j[key].is_number() && j[key].get<double>() > 0, origin, ": '", key, "' must be a positive number");
  return j[key].get<double>();
}

// A rate: one number (any size) or [[size, rate], ...] with ascending sizes.
std::vector<std::pair<double, double>> rate_curve(const json& v, const std::string& where) {
  std::vector<std::pair<double, double>> pts;
  if (v.is_number()) {
    check(v.get<double>() > 0, where, " must be positive");
    return {{1.0, v.get<double>()}};
  }
  check(v.is_array() && !v.empty(), where, " must be a rate or a list of [size, rate]");
  for (const auto& p : v) {
    check(p.is_array() && p.size() == 2 && p[0].is_number() && p[1].is_number() && p[0].get<double>() > 0 &&
              p[1].get<double>() > 0,
          where, ": each point must be [size, rate] with positive numbers");
    check(pts.empty() || p[0].get<double>() > pts.back().first, where, ": sizes must ascend");
    pts.push_back({p[0].get<double>(), p[1].get<double>()});
  }
  return pts;
}

// {"bf16": rate or [[size, rate], ...], ...}
Curves curves(const json& j, const std::string& key, const std::string& origin) {
  Curves c;
  check(j[key].is_object(), origin, ": '", key, "' must be an object of dtype -> rate");
  for (auto& [dt, v] : j[key].items()) c[dtype_name(parse_dtype(dt))] = rate_curve(v, origin + ": " + key + "." + dt);
  return c;
}

json curve_json(const std::vector<std::pair<double, double>>& pts) {
  json a = json::array();
  for (const auto& [x, r] : pts) a.push_back({x, r});
  return a;
}

LinkSpec link(const json& j, const std::string& key, const std::string& origin) {
  check(j.contains(key) && j[key].is_object(), origin, ": missing object '", key, "'");
  const std::string o = origin + ": " + key;
  for (auto& [k, v] : j[key].items())
    check(k == "latency_s" || k == "bandwidth" || k == "overlaps_compute", o, ": unknown field '", k, "'");
  LinkSpec l;
  l.latency_s = j[key].value("latency_s", -1.0);
  check(l.latency_s >= 0, o, ".latency_s must be a number >= 0");
  l.bandwidth = positive(j[key], "bandwidth", o);
  l.overlaps_compute = j[key].value("overlaps_compute", true);
  return l;
}

json curves_json(const Curves& c) {
  json j = json::object();
  for (const auto& [dt, pts] : c) j[dt] = curve_json(pts);
  return j;
}

}  // namespace

void Hardware::use_attention_kernels(const std::string& kernels) {
  check(attention_kernels_used.empty(), "hardware '", name, "': attention kernels '", attention_kernels_used,
        "' were chosen already");
  const auto it = attention_kernels.find(kernels);
  if (it == attention_kernels.end()) {
    std::string have;
    for (const auto& [k, v] : attention_kernels) have += (have.empty() ? "" : ", ") + k;
    throw Error(cat("hardware '", name, "' has no rates for attention kernels '", kernels,
                    "' (it has: ", have.empty() ? "none besides its defaults" : have, ")"));
  }
  attention_forward = it->second.forward, attention_backward = it->second.backward;
  if (it->second.causal_efficiency > 0) causal_efficiency = it->second.causal_efficiency;
  attention_kernels_used = kernels;
}

Hardware hardware_from_json(const std::string& text, const std::string& origin) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw Error(cat(origin, ": not valid JSON: ", e.what()));
  }
  check(j.is_object(), origin, ": a hardware description is a JSON object");
  static const std::set<std::string> known = {"name",
                                              "description",
                                              "devices_per_node",
                                              "memory_bytes",
                                              "memory_bandwidth",
                                              "peak",
                                              "gemm",
                                              "gemm_backward",
                                              "attention_forward",
                                              "attention_backward",
                                              "attention_kernels",
                                              "elementwise_bandwidth",
                                              "gelu_forward_rate",
                                              "gelu_backward_rate",
                                              "decode_bandwidth",
                                              "cached_weight_bandwidth",
                                              "llc_bytes",
                                              "causal_efficiency",
                                              "timeshare_wait_s",
                                              "op_overhead_s",
                                              "links",
                                              "sources",
                                              "measured",
                                              "measured_cpu"};
  for (auto& [k, v] : j.items()) check(known.count(k), origin, ": unknown field '", k, "'");
  Hardware h;
  check(j.contains("name") && j["name"].is_string(), origin, ": missing string 'name'");
  h.name = j["name"].get<std::string>();
  h.description = j.value("description", "");
  h.measured_cpu = j.value("measured_cpu", "");
  check(j.contains("devices_per_node") && j["devices_per_node"].is_number_integer() &&
            j["devices_per_node"].get<int>() >= 1,
        origin, ": 'devices_per_node' must be an integer >= 1");
  h.devices_per_node = j["devices_per_node"].get<int>();
  h.memory_bytes = positive(j, "memory_bytes", origin);
  h.memory_bandwidth = positive(j, "memory_bandwidth", origin);
  h.elementwise_bandwidth = positive(j, "elementwise_bandwidth", origin);
  h.decode_bandwidth = positive(j, "decode_bandwidth", origin);
  if (j.contains("cached_weight_bandwidth")) h.cached_weight_bandwidth = positive(j, "cached_weight_bandwidth", origin);
  if (j.contains("llc_bytes")) h.llc_bytes = positive(j, "llc_bytes", origin);
  if (j.contains("causal_efficiency")) h.causal_efficiency = positive(j, "causal_efficiency", origin);
  check(h.causal_efficiency <= 1.5, origin, ": 'causal_efficiency' is a ratio near 1, got ", h.causal_efficiency);
  if (j.contains("gelu_forward_rate")) h.gelu_forward_rate = positive(j, "gelu_forward_rate", origin);
  if (j.contains("gelu_backward_rate")) h.gelu_backward_rate = positive(j, "gelu_backward_rate", origin);
  h.op_overhead_s = j.value("op_overhead_s", 0.0);
  check(h.op_overhead_s >= 0, origin, ": 'op_overhead_s' must be >= 0");
  h.timeshare_wait_s = j.value("timeshare_wait_s", 0.0);
  check(h.timeshare_wait_s >= 0, origin, ": 'timeshare_wait_s' must be >= 0");
  for (const char* k : {"gemm", "attention_forward", "attention_backward"})
    check(j.contains(k), origin, ": missing field '", k, "'");
  h.gemm = curves(j, "gemm", origin);
  if (j.contains("gemm_backward")) h.gemm_backward = curves(j, "gemm_backward", origin);
  h.attention_forward = curves(j, "attention_forward", origin);
  h.attention_backward = curves(j, "attention_backward", origin);
  if (j.contains("attention_kernels")) {
    check(j["attention_kernels"].is_object(), origin, ": 'attention_kernels' must be an object of name -> rates");
    for (auto& [name, k] : j["attention_kernels"].items()) {
      const std::string o = origin + ": attention_kernels." + name;
      check(k.is_object() && k.contains("forward") && k.contains("backward"), o,
            " must be an object with 'forward' and 'backward' rates");
      for (auto& [f, v] : k.items())
        check(f == "forward" || f == "backward" || f == "causal_efficiency", o, ": unknown field '", f, "'");
      Hardware::AttentionKernels ak;
      ak.forward = curves(k, "forward", o);
      ak.backward = curves(k, "backward", o);
      if (k.contains("causal_efficiency")) {
        ak.causal_efficiency = positive(k, "causal_efficiency", o);
        check(ak.causal_efficiency <= 1.5, o, ": 'causal_efficiency' is a ratio near 1, got ", ak.causal_efficiency);
      }
      h.attention_kernels[name] = ak;
    }
  }
  if (j.contains("peak")) {
    check(j["peak"].is_object(), origin, ": 'peak' must be an object of dtype -> FLOP/s");
    for (auto& [dt, v] : j["peak"].items()) {
      check(v.is_number() && v.get<double>() > 0, origin, ": peak.", dt, " must be a positive number");
      h.peak[dtype_name(parse_dtype(dt))] = v.get<double>();
    }
  }
  check(j.contains("links") && j["links"].is_object(), origin, ": missing object 'links'");
  h.intra_node = link(j["links"], "intra_node", origin + ": links");
  h.inter_node = link(j["links"], "inter_node", origin + ": links");
  if (j.contains("sources"))
    for (auto& [k, v] : j["sources"].items()) h.sources[k] = v.is_string() ? v.get<std::string>() : v.dump();
  return h;
}

std::string hardware_to_json(const Hardware& h) {
  check(h.attention_kernels_used.empty(), "hardware '", h.name, "': write it before choosing attention kernels ('",
        h.attention_kernels_used, "' would be saved as its defaults)");
  json j;
  j["name"] = h.name, j["description"] = h.description, j["devices_per_node"] = h.devices_per_node;
  if (!h.measured_cpu.empty()) j["measured_cpu"] = h.measured_cpu;
  j["memory_bytes"] = h.memory_bytes, j["memory_bandwidth"] = h.memory_bandwidth;
  j["peak"] = h.peak;
  j["gemm"] = curves_json(h.gemm);
  if (!h.gemm_backward.empty()) j["gemm_backward"] = curves_json(h.gemm_backward);
  j["attention_forward"] = curves_json(h.attention_forward);
  j["attention_backward"] = curves_json(h.attention_backward);
  for (const auto& [name, k] : h.attention_kernels) {
    j["attention_kernels"][name] = {{"forward", curves_json(k.forward)}, {"backward", curves_json(k.backward)}};
    if (k.causal_efficiency > 0) j["attention_kernels"][name]["causal_efficiency"] = k.causal_efficiency;
  }
  j["elementwise_bandwidth"] = h.elementwise_bandwidth, j["decode_bandwidth"] = h.decode_bandwidth;
  if (h.cached_weight_bandwidth > 0) j["cached_weight_bandwidth"] = h.cached_weight_bandwidth;
  if (h.llc_bytes > 0) j["llc_bytes"] = h.llc_bytes;
  if (h.gelu_forward_rate > 0) j["gelu_forward_rate"] = h.gelu_forward_rate;
  if (h.gelu_backward_rate > 0) j["gelu_backward_rate"] = h.gelu_backward_rate;
  j["causal_efficiency"] = h.causal_efficiency;
  j["op_overhead_s"] = h.op_overhead_s;
  if (h.timeshare_wait_s > 0) j["timeshare_wait_s"] = h.timeshare_wait_s;
  for (const auto& [k, l] : {std::pair{"intra_node", h.intra_node}, std::pair{"inter_node", h.inter_node}})
    j["links"][k] = {{"latency_s", l.latency_s}, {"bandwidth", l.bandwidth}, {"overlaps_compute", l.overlaps_compute}};
  j["sources"] = h.sources;
  return j.dump(2) + "\n";
}

namespace {

std::filesystem::path hardware_dir() {
  if (const char* d = std::getenv("RINGATTN_HARDWARE_DIR")) return d;
  return RINGATTN_HARDWARE_DIR;
}

}  // namespace

std::vector<std::string> builtin_hardware_names() {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& f : std::filesystem::directory_iterator(hardware_dir(), ec))
    if (f.path().extension() == ".json") names.push_back(f.path().stem().string());
  std::sort(names.begin(), names.end());
  return names;
}

std::string this_cpu() {
  const CpuFeatures& f = cpu_features();
  std::string paths;
  for (Isa i : supported_isas()) paths += cat(paths.empty() ? "" : " ", isa_name(i));
  return cat(f.model.empty() ? f.vendor : f.model, ", ", f.logical_cpus, " CPUs, kernel paths ", paths);
}

std::string this_machine_path() {
  const char* xdg = std::getenv("XDG_CONFIG_HOME");
  const char* home = std::getenv("HOME");
  std::string dir;
  if (xdg && xdg[0] == '/')
    dir = xdg;
  else if (home && *home)
    dir = cat(home, "/.config");
  else
    throw Error("neither XDG_CONFIG_HOME nor HOME is set: give `plan --calibrate --out FILE` and `--hardware FILE`");
  return dir + "/ringattn/this-machine.json";
}

Hardware load_hardware(const std::string& name_or_path) {
  if (name_or_path == "this-machine" && !std::filesystem::exists(name_or_path)) {
    const std::string p = this_machine_path();
    check(std::filesystem::exists(p), "this machine has not been calibrated (no ", p,
          "): run `ringattn plan --calibrate` (about a minute), or name a datasheet file with --hardware");
    Hardware h = load_hardware(p);
    check(h.measured_cpu == this_cpu(), p, " describes another machine (measured on ",
          h.measured_cpu.empty() ? std::string("a CPU it does not record") : h.measured_cpu, "; this is ", this_cpu(),
          "): run `ringattn plan --calibrate` to measure this one");
    return h;
  }
  std::filesystem::path p = name_or_path;
  if (!std::filesystem::exists(p) && p.extension() != ".json") p = hardware_dir() / (name_or_path + ".json");
  std::ifstream f(p);
  if (!f) {
    std::string names;
    for (const auto& n : builtin_hardware_names()) names += (names.empty() ? "" : ", ") + n;
    throw Error(cat("no hardware description '", name_or_path, "': give a JSON file or one of: ",
                    names.empty() ? std::string("(none found in ") + hardware_dir().string() + ")" : names));
  }
  std::stringstream ss;
  ss << f.rdbuf();
  return hardware_from_json(ss.str(), p.string());
}

}  // namespace ringattn
