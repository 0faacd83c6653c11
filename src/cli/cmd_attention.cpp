// `ringattn attention`: the fused kernels on the user's own .npy data (or on
// generated inputs), forward and optionally backward.
#include <omp.h>

#include <cstdio>
#include <optional>
#include <random>

#include "cli/commands.h"
#include "ringattn/attention.h"
#include "ringattn/error.h"
#include "ringattn/memory.h"
#include "ringattn/npy.h"
#include "ringattn/perf.h"

namespace ringattn::cli {
namespace {

struct AttentionArgs {
  std::string q, k, v, out, lse, dout, dq, dk, dv;
  bool causal = false, backward = false;
  std::optional<float> scale;
  std::string dtype = "fp32";
  std::string isa;
  int threads = 0;
  bool json = false;
  int64_t batch = 1, seq = 1024, heads = 8, kv_heads = 0, dim = 64;
  uint64_t seed = 0;
};

Tensor load_input(const std::string& path, const char* what, int rank, const char* layout) {
  Tensor t = load_npy(path);
  check(t.rank() == rank, what, " (", path, ") has shape ", t.view().shape_str(), " but must be ", layout);
  check(all_finite(t.view()), what, " (", path, ") contains NaN or Inf values");
  return t;
}

Tensor random_tensor(std::initializer_list<int64_t> shape, std::mt19937_64& rng) {
  Tensor t(DType::f32, shape);
  std::normal_distribution<float> dist(0.f, 1.f);
  for (int64_t i = 0; i < t.numel(); ++i) t.ptr<float>()[i] = dist(rng);
  return t;
}

// The same values stored as `dtype` (rounded for bf16/fp16).
Tensor as_dtype(const Tensor& t, DType dtype) {
  Tensor c(dtype, t.rank(), t.view().shape.data());
  copy_into(c.view(), t.view());
  return c;
}

void run(const AttentionArgs& a) {
  const DType dtype = parse_dtype(a.dtype);
  const bool from_files = !a.q.empty();
  check(!from_files || (!a.k.empty() && !a.v.empty()), "--q needs --k and --v as well");
  check(from_files || (a.k.empty() && a.v.empty()), "--k/--v given without --q");
  const bool backward = a.backward || !a.dout.empty();
  check(a.dout.empty() || from_files, "--dout needs --q/--k/--v files");
  check(!from_files || backward || (a.dq.empty() && a.dk.empty() && a.dv.empty()),
        "--dq/--dk/--dv need --dout (the gradient of the output)");
  check(!from_files || !a.backward || !a.dout.empty(), "--backward on files needs --dout");

  Tensor q32, k32, v32, do32;
  if (from_files) {
    q32 = load_input(a.q, "q", 4, "[B, Lq, H, d]");
    k32 = load_input(a.k, "k", 4, "[B, Lk, Hkv, d]");
    v32 = load_input(a.v, "v", 4, "[B, Lk, Hkv, d]");
    if (!a.dout.empty()) do32 = load_input(a.dout, "dout", 4, "[B, Lq, H, d]");
  } else {
    const int64_t hkv = a.kv_heads > 0 ? a.kv_heads : a.heads;
    check(a.batch > 0 && a.seq > 0 && a.heads > 0 && a.dim > 0, "--batch, --seq, --heads and --dim must be positive");
    std::mt19937_64 rng(a.seed);
    q32 = random_tensor({a.batch, a.seq, a.heads, a.dim}, rng);
    k32 = random_tensor({a.batch, a.seq, hkv, a.dim}, rng);
    v32 = random_tensor({a.batch, a.seq, hkv, a.dim}, rng);
    if (backward) do32 = random_tensor({a.batch, a.seq, a.heads, a.dim}, rng);
  }
  const int64_t B = q32.dim(0), Lq = q32.dim(1), H = q32.dim(2), d = q32.dim(3), Lk = k32.dim(1);
  if (!do32.view().empty())
    check(do32.view().shape == q32.view().shape, "dout ", do32.view().shape_str(), " must have the shape of q ",
          q32.view().shape_str());

  Tensor q = as_dtype(q32, dtype), k = as_dtype(k32, dtype), v = as_dtype(v32, dtype);
  Tensor o(DType::f32, {B, Lq, H, d}), lse(DType::f32, {B, H, Lq});
  AttentionOptions opt;
  opt.causal = a.causal;
  if (a.scale) opt.scale = *a.scale;
  opt.threads = a.threads;
  Isa isa = a.isa.empty() ? default_isa() : parse_isa(a.isa);
  opt.isa = &isa;
  const int threads = a.threads > 0 ? a.threads : omp_get_max_threads();

  reset_peak_memory();
  double t0 = now_seconds();
  attention_forward(q, k, v, o, lse, opt);
  const double t_fwd = now_seconds() - t0;
  const double flops = attention_forward_flops(B, H, Lq, Lk, d, a.causal);

  nlohmann::json j;
  j["shape"] = {{"B", B}, {"Lq", Lq}, {"Lk", Lk}, {"H", H}, {"Hkv", k32.dim(2)}, {"d", d}};
  j["dtype"] = dtype_name(dtype);
  j["causal"] = a.causal;
  j["isa"] = isa_name(isa);
  j["threads"] = threads;
  j["forward"] = {{"seconds", t_fwd}, {"gflops", flops / t_fwd * 1e-9}};

  if (backward) {
    Tensor dout = as_dtype(do32, dtype);
    Tensor dq(DType::f32, {B, Lq, H, d}), dk(DType::f32, k32.rank(), k32.view().shape.data()),
        dv(DType::f32, v32.rank(), v32.view().shape.data());
    t0 = now_seconds();
    attention_backward(q, k, v, o, lse, dout, dq, dk, dv, opt);
    const double t_bwd = now_seconds() - t0;
    j["backward"] = {{"seconds", t_bwd}, {"gflops", 2.5 * flops / t_bwd * 1e-9}};
    if (!a.dq.empty()) save_npy(a.dq, dq);
    if (!a.dk.empty()) save_npy(a.dk, dk);
    if (!a.dv.empty()) save_npy(a.dv, dv);
  }
  if (!a.out.empty()) save_npy(a.out, o);
  if (!a.lse.empty()) save_npy(a.lse, lse);
  j["peak_memory_bytes"] = memory_stats().peak_bytes;

  if (a.json) return print_json(j);
  std::printf("attention  B=%lld Lq=%lld Lk=%lld H=%lld Hkv=%lld d=%lld  %s%s  path %s, %d thread(s)\n",
              static_cast<long long>(B), static_cast<long long>(Lq), static_cast<long long>(Lk),
              static_cast<long long>(H), static_cast<long long>(k32.dim(2)), static_cast<long long>(d),
              dtype_name(dtype), a.causal ? " causal" : "", isa_name(isa), threads);
  std::printf("%-10s %12s %12s\n", "pass", "time [ms]", "GFLOP/s");
  std::printf("%-10s %12.3f %12.1f\n", "forward", t_fwd * 1e3, j["forward"]["gflops"].get<double>());
  if (backward)
    std::printf("%-10s %12.3f %12.1f\n", "backward", j["backward"]["seconds"].get<double>() * 1e3,
                j["backward"]["gflops"].get<double>());
  std::printf("peak memory held by ringattn: %.1f MiB\n", memory_stats().peak_bytes / 1048576.0);
}

}  // namespace

void add_attention(CLI::App& app) {
  auto a = std::make_shared<AttentionArgs>();
  auto* cmd = app.add_subcommand("attention", "exact attention on .npy inputs (or generated ones), forward and backward");
  cmd->add_option("--q", a->q, "queries, float32 .npy [B, Lq, H, d]");
  cmd->add_option("--k", a->k, "keys, float32 .npy [B, Lk, Hkv, d]");
  cmd->add_option("--v", a->v, "values, float32 .npy [B, Lk, Hkv, d]");
  cmd->add_option("--out", a->out, "write the output o [B, Lq, H, d] here");
  cmd->add_option("--lse", a->lse, "write the log-sum-exp [B, H, Lq] here");
  cmd->add_option("--dout", a->dout, "gradient of the output [B, Lq, H, d]: runs the backward pass");
  cmd->add_option("--dq", a->dq, "write dq here");
  cmd->add_option("--dk", a->dk, "write dk here");
  cmd->add_option("--dv", a->dv, "write dv here");
  cmd->add_flag("--backward", a->backward, "also run the backward pass (generated inputs use a random dout)");
  cmd->add_flag("--causal", a->causal, "causal mask (bottom-right aligned when Lq != Lk)");
  cmd->add_option("--scale", a->scale, "softmax scale (default 1/sqrt(d))");
  cmd->add_option("--dtype", a->dtype, "storage dtype for the computation: fp32, bf16 or fp16")->capture_default_str();
  cmd->add_option("--isa", a->isa, "kernel path: generic, avx2, avx512, avx512_bf16 (default: best available)");
  cmd->add_option("--threads", a->threads, "threads (default: OpenMP's)");
  cmd->add_option("--batch", a->batch, "generated inputs: batch")->capture_default_str();
  cmd->add_option("--seq", a->seq, "generated inputs: sequence length")->capture_default_str();
  cmd->add_option("--heads", a->heads, "generated inputs: query heads")->capture_default_str();
  cmd->add_option("--kv-heads", a->kv_heads, "generated inputs: key/value heads (default: --heads)");
  cmd->add_option("--dim", a->dim, "generated inputs: head dim")->capture_default_str();
  cmd->add_option("--seed", a->seed, "generated inputs: random seed")->capture_default_str();
  cmd->add_flag("--json", a->json, "machine-readable output");
  cmd->callback([a] { run(*a); });
}

}  // namespace ringattn::cli
