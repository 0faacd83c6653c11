// `ringattn attention`: exact attention on the user's own .npy data or on
// generated inputs, forward and optionally backward; on one process with the
// fused kernels, or under mpirun with --strategy ring|allgather|ulysses.
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <optional>
#include <random>

#include "cli/commands.h"
#include "ringattn/atomic_file.h"
#include "ringattn/comm.h"
#include "ringattn/cpu/attention.h"
#include "ringattn/dist_attention.h"
#include "ringattn/error.h"
#include "ringattn/memory.h"
#include "ringattn/npy.h"
#include "ringattn/perf.h"

namespace ringattn::cli {
namespace {

struct AttentionArgs {
  std::string q, k, v, out, lse, dout, dq, dk, dv;
  bool causal = false, backward = false, check = false;
  std::optional<float> scale;
  std::string dtype = "fp32", isa, strategy, layout = "contiguous";
  std::string window, cu_seqlens, cu_seqlens_q, cu_seqlens_k;
  int threads = 0;
  int reps = 1;
  double timeout = 300;
  bool json = false, no_overlap = false;
  int64_t batch = 1, seq = 1024, kv_seq = 0, heads = 8, kv_heads = 0, dim = 64;
  uint64_t seed = 0;
};

// Full-size fp32 inputs, as read or generated, and the packed documents.
struct Inputs {
  Tensor q, k, v, dout;
  bool backward = false;
  std::vector<int32_t> cu_q, cu_k;  // empty: one document
};

// The mask options: --window LEFT,RIGHT (-1: unbounded side) and --causal.
struct Window {
  int64_t left = -1, right = -1;
  bool any() const { return left >= 0 || right >= 0; }
};
Window parse_window(const std::string& s) {
  Window w;
  if (s.empty()) return w;
  const size_t comma = s.find(',');
  auto side = [&](const std::string& x) {
    size_t used = 0;
    int64_t v = 0;
    try {
      v = std::stoll(x, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    check(used == x.size() && !x.empty() && v >= -1,
          "--window takes LEFT,RIGHT with each side >= 0 or -1 for "
          "unbounded (e.g. 4095,0), got '",
          s, "'");
    return v;
  };
  check(comma != std::string::npos, "--window takes LEFT,RIGHT (e.g. 4095,0 or 128,128), got '", s, "'");
  w.left = side(s.substr(0, comma));
  w.right = side(s.substr(comma + 1));
  return w;
}

void read_documents(const AttentionArgs& a, Inputs& in) {
  check(a.cu_seqlens.empty() || (a.cu_seqlens_q.empty() && a.cu_seqlens_k.empty()),
        "--cu-seqlens sets both sides: use it or --cu-seqlens-q with --cu-seqlens-k, not both");
  check(a.cu_seqlens_q.empty() == a.cu_seqlens_k.empty(), "--cu-seqlens-q and --cu-seqlens-k go together");
  in.cu_q = load_cu_seqlens(a.cu_seqlens.empty() ? a.cu_seqlens_q : a.cu_seqlens, "--cu-seqlens");
  in.cu_k = a.cu_seqlens.empty() ? load_cu_seqlens(a.cu_seqlens_k, "--cu-seqlens-k") : in.cu_q;
}

// The documents against the sequence lengths; positions and ids for the kernels.
std::optional<Documents> documents_of(const AttentionArgs& a, const Inputs& in) {
  if (in.cu_q.empty()) return std::nullopt;
  const bool one = !a.cu_seqlens.empty();
  check_cu_seqlens(in.cu_q, in.q.dim(1), one ? "--cu-seqlens" : "--cu-seqlens-q");
  check_cu_seqlens(in.cu_k, in.k.dim(1), one ? "--cu-seqlens" : "--cu-seqlens-k");
  return documents(in.cu_q, in.cu_k);
}

Tensor load_input(const std::string& path, const char* what, const char* layout) {
  Tensor t = load_npy(path);
  check(t.rank() == 4, what, " (", path, ") has shape ", t.view().shape_str(), " but must be ", layout);
  check(t.numel() > 0, what, " (", path, ") has shape ", t.view().shape_str(), ": every dimension of ", layout,
        " must be at least 1");
  check(all_finite(t.view()), what, " (", path, ") contains NaN or Inf values");
  return t;
}

Tensor convert(const TensorView& t, DType dtype) {
  Tensor c(dtype, t.rank, t.shape.data());
  copy_into(c.view(), t);
  return c;
}

Tensor like(const TensorView& t, DType dtype) { return Tensor(dtype, t.rank, t.shape.data()); }

Inputs read_inputs(const AttentionArgs& a) {
  const bool from_files = !a.q.empty();
  check(!from_files || (!a.k.empty() && !a.v.empty()), "--q needs --k and --v as well");
  check(from_files || (a.k.empty() && a.v.empty()), "--k/--v given without --q");
  check(a.dout.empty() || from_files, "--dout needs --q/--k/--v files");
  Inputs in;
  in.backward = a.backward || !a.dout.empty();
  check(!from_files || in.backward || (a.dq.empty() && a.dk.empty() && a.dv.empty()),
        "--dq/--dk/--dv need --dout (the gradient of the output)");
  check(!from_files || !a.backward || !a.dout.empty(), "--backward on files needs --dout");
  if (from_files) {
    in.q = load_input(a.q, "q", "[B, Lq, H, d]");
    in.k = load_input(a.k, "k", "[B, Lk, Hkv, d]");
    in.v = load_input(a.v, "v", "[B, Lk, Hkv, d]");
    if (!a.dout.empty()) {
      in.dout = load_input(a.dout, "dout", "[B, Lq, H, d]");
      check(same_shape(in.dout, in.q), "dout ", in.dout.view().shape_str(), " must have the shape of q ",
            in.q.view().shape_str());
    }
  } else {
    const int64_t hkv = a.kv_heads > 0 ? a.kv_heads : a.heads;
    check(a.batch > 0 && a.seq > 0 && a.heads > 0 && a.dim > 0 && hkv > 0,
          "--batch, --seq, --heads, --kv-heads and --dim must be positive");
    const int64_t lk = a.kv_seq > 0 ? a.kv_seq : a.seq;
    // q, o (and dout, dq) of [B, Lq, H, d], k, v (and dk, dv) of [B, Lk, Hkv, d], fp32:
    // the least the run holds at once (double: no overflow for absurd sizes).
    const double per = in.backward ? 2 : 1;
    check_fits_in_memory(4.0 * per * (2.0 * a.batch * a.seq * a.heads * a.dim + 2.0 * a.batch * lk * hkv * a.dim),
                         cat("attention of B=", a.batch, " L=", a.seq, " H=", a.heads, " d=", a.dim));
    std::mt19937_64 rng(a.seed);
    in.q = random_normal(DType::f32, {a.batch, a.seq, a.heads, a.dim}, rng);
    in.k = random_normal(DType::f32, {a.batch, lk, hkv, a.dim}, rng);
    in.v = random_normal(DType::f32, {a.batch, lk, hkv, a.dim}, rng);
    if (in.backward) in.dout = random_normal(DType::f32, {a.batch, a.seq, a.heads, a.dim}, rng);
  }
  return in;
}

// The outputs can be written, are distinct files and none is an input: checked
// before anything is read or computed.
void check_outputs(const AttentionArgs& a) {
  check_output_paths({{"--out", a.out}, {"--lse", a.lse}, {"--dq", a.dq}, {"--dk", a.dk}, {"--dv", a.dv}},
                     {{"--q", a.q}, {"--k", a.k}, {"--v", a.v}, {"--dout", a.dout}});
}

// max |a − b| / max |b|: the relative error convention of the tests.
double rel_error(const TensorView& got, const TensorView& ref) {
  double num = 0, den = 0;
  const int64_t n = ref.numel();
  Tensor g = convert(got, DType::f32), r = convert(ref, DType::f32);
  for (int64_t i = 0; i < n; ++i) {
    const float x = g.ptr<float>()[i], y = r.ptr<float>()[i];
    if (std::isinf(y) && x == y) continue;
    num = std::max(num, static_cast<double>(std::fabs(x - y)));
    if (std::isfinite(y)) den = std::max(den, static_cast<double>(std::fabs(y)));
  }
  return den > 0 ? num / den : num;
}

// " window 4095,0, 12 documents" for the human report.
std::string mask_words(const Window& w, const Inputs& in) {
  std::string s;
  if (w.any()) s += cat(" window ", w.left, ",", w.right);
  if (!in.cu_q.empty()) s += cat(", ", in.cu_q.size() - 1, " documents");
  return s;
}

// ---- one process ----------------------------------------------------------------
void run_local(const AttentionArgs& a, Inputs& in, DType dtype) {
  const int64_t B = in.q.dim(0), Lq = in.q.dim(1), H = in.q.dim(2), d = in.q.dim(3), Lk = in.k.dim(1);
  Tensor q = convert(in.q, dtype), k = convert(in.k, dtype), v = convert(in.v, dtype);
  Tensor o(DType::f32, {B, Lq, H, d}), lse(DType::f32, {B, H, Lq});
  const Window w = parse_window(a.window);
  const std::optional<Documents> docs = documents_of(a, in);
  AttentionOptions opt;
  opt.causal = a.causal;
  opt.window_left = w.left, opt.window_right = w.right;
  if (docs) docs->apply(opt);
  if (a.scale) opt.scale = *a.scale;
  opt.threads = a.threads;
  const Isa isa = a.isa.empty() ? default_isa() : parse_isa(a.isa);
  opt.isa = &isa;
  const int threads = a.threads > 0 ? a.threads : omp_get_max_threads();

  // Each pass --reps times, the best time reported (the first repetition also pays
  // for its buffers' first touch, which a training step's later ones do not).
  reset_peak_memory();
  const double t_fwd = best_seconds(a.reps, [&] { attention_forward(q, k, v, o, lse, opt); });
  const double flops = attention_forward_flops(B, H, Lq, Lk, d, opt);

  nlohmann::json j;
  j["shape"] = {{"B", B}, {"Lq", Lq}, {"Lk", Lk}, {"H", H}, {"Hkv", in.k.dim(2)}, {"d", d}};
  j["dtype"] = dtype_name(dtype);
  j["causal"] = a.causal;
  j["window"] = {w.left, w.right};
  j["documents"] = in.cu_q.empty() ? 1 : static_cast<int64_t>(in.cu_q.size()) - 1;
  j["visible_pairs"] = attention_visible_pairs(Lq, Lk, opt);
  j["isa"] = isa_name(isa);
  j["threads"] = threads;
  j["forward"] = {{"seconds", t_fwd}, {"gflops", flops / t_fwd * 1e-9}};
  if (in.backward) {
    Tensor dout = convert(in.dout, dtype);
    Tensor dq = like(in.q, DType::f32), dk = like(in.k, DType::f32), dv = like(in.v, DType::f32);
    const double t_bwd = best_seconds(a.reps, [&] { attention_backward(q, k, v, o, lse, dout, dq, dk, dv, opt); });
    j["backward"] = {{"seconds", t_bwd}, {"gflops", 2.5 * flops / t_bwd * 1e-9}};
    if (!a.dq.empty()) save_npy(a.dq, dq);
    if (!a.dk.empty()) save_npy(a.dk, dk);
    if (!a.dv.empty()) save_npy(a.dv, dv);
  }
  if (!a.out.empty()) save_npy(a.out, o);
  if (!a.lse.empty()) save_npy(a.lse, lse);
  j["peak_memory_bytes"] = memory_stats().peak_bytes;

  if (a.json) return print_json(j);
  std::printf("attention  B=%lld Lq=%lld Lk=%lld H=%lld Hkv=%lld d=%lld  %s%s%s  path %s, %d thread(s)\n",
              static_cast<long long>(B), static_cast<long long>(Lq), static_cast<long long>(Lk),
              static_cast<long long>(H), static_cast<long long>(in.k.dim(2)), static_cast<long long>(d),
              dtype_name(dtype), a.causal ? " causal" : "", mask_words(w, in).c_str(), isa_name(isa), threads);
  std::printf("%-10s %12s %12s\n", "pass", "time [ms]", "GFLOP/s");
  std::printf("%-10s %12.3f %12.1f\n", "forward", t_fwd * 1e3, j["forward"]["gflops"].get<double>());
  if (in.backward)
    std::printf("%-10s %12.3f %12.1f\n", "backward", j["backward"]["seconds"].get<double>() * 1e3,
                j["backward"]["gflops"].get<double>());
  std::printf("peak memory held by ringattn: %.1f MiB\n", memory_stats().peak_bytes / 1048576.0);
}

// ---- under mpirun -----------------------------------------------------------------
// Rank 0 (which writes the outputs) checks them and reads the input files; a
// status word reaches every rank first, so a rank-0 error becomes an error on
// every rank instead of a hang. Rank 0's tensors then reach every rank; generated
// inputs are drawn by every rank from the seed.
void share_inputs(Communicator& comm, const AttentionArgs& a, Inputs& in) {
  std::string err;
  std::vector<int32_t> cu;
  if (comm.rank() == 0) {
    try {
      check_outputs(a);
      check(a.cu_seqlens_q.empty() && a.cu_seqlens_k.empty(),
            "sequence parallel attention is self-attention: give --cu-seqlens, not -q/-k");
      if (!a.q.empty()) in = read_inputs(a);
      read_documents(a, in);
      cu = in.cu_q;
    } catch (const Error& e) {
      err = e.what();
    }
  }
  // The documents reach every rank (after any rank-0 error, which ends the job).
  auto share_documents = [&] {
    int64_t n = static_cast<int64_t>(cu.size());
    comm.broadcast(&n, sizeof(n), 0);
    cu.resize(static_cast<size_t>(n));
    if (n > 0) comm.broadcast(cu.data(), cu.size() * sizeof(int32_t), 0);
    in.cu_q = in.cu_k = cu;
  };
  if (a.q.empty()) {
    int64_t n = static_cast<int64_t>(err.size());
    comm.broadcast(&n, sizeof(n), 0);
    err.resize(static_cast<size_t>(n));
    if (n > 0) {
      comm.broadcast(err.data(), err.size(), 0);
      throw Error(err);
    }
    in = read_inputs(a);
    return share_documents();
  }
  int64_t hdr[18] = {static_cast<int64_t>(err.size())};
  if (comm.rank() == 0 && err.empty()) {
    const Tensor* ts[] = {&in.q, &in.k, &in.v, &in.dout};
    for (int t = 0; t < 4; ++t)
      for (int i = 0; i < 4; ++i) hdr[1 + 4 * t + i] = ts[t]->rank() ? ts[t]->dim(i) : 0;
    hdr[17] = in.backward;
  }
  comm.broadcast(hdr, sizeof(hdr), 0);
  if (hdr[0] > 0) {
    err.resize(static_cast<size_t>(hdr[0]));
    comm.broadcast(err.data(), err.size(), 0);
    throw Error(err);
  }
  Tensor* ts[] = {&in.q, &in.k, &in.v, &in.dout};
  for (int t = 0; t < 4; ++t) {
    if (hdr[1 + 4 * t] == 0) continue;
    if (comm.rank() != 0) *ts[t] = Tensor(DType::f32, {hdr[1 + 4 * t], hdr[2 + 4 * t], hdr[3 + 4 * t], hdr[4 + 4 * t]});
    comm.broadcast(ts[t]->ptr<void>(), ts[t]->bytes(), 0);
  }
  in.backward = hdr[17];
  share_documents();
}

// FNV-1a over a tensor's 8-byte words (then its tail bytes): ranks compare it
// to find inputs that differ.
int64_t content_hash(const Tensor& t) {
  uint64_t h = 1469598103934665603ull;
  const size_t n = t.rank() ? t.bytes() : 0;
  const auto* p = static_cast<const unsigned char*>(t.ptr<void>());
  size_t i = 0;
  for (uint64_t w; i + 8 <= n; i += 8) {
    std::memcpy(&w, p + i, 8);
    h = (h ^ w) * 1099511628211ull;
  }
  for (; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return static_cast<int64_t>(h >> 1);
}

// Every rank must run the same job: the options that decide what each rank
// computes, and the inputs (generated from --seed on each rank, or rank 0's
// files), compared before any compute. Ranks started with different --seed,
// --backward or --check under MPMD would otherwise give a wrong result or a
// message mismatch deep inside MPI.
void check_same_job(Communicator& comm, const AttentionArgs& a, const Inputs& in, DType dtype) {
  float scale = a.scale ? *a.scale : 0.f;
  int32_t scale_bits;
  std::memcpy(&scale_bits, &scale, 4);
  const Window w = parse_window(a.window);
  const int64_t values[] = {in.backward,
                            a.check,
                            a.causal,
                            w.left,
                            w.right,
                            a.no_overlap,
                            static_cast<int64_t>(dtype),
                            static_cast<int64_t>(parse_strategy(a.strategy)),
                            static_cast<int64_t>(parse_layout(a.layout)),
                            a.scale.has_value(),
                            scale_bits,
                            content_hash(in.q),
                            content_hash(in.k),
                            content_hash(in.v),
                            content_hash(in.dout)};
  check_same_on_all_ranks(
      comm, values,
      "the job (backward, check, causal, window, no-overlap, dtype, strategy, layout, scale, then hashes "
      "of q, k, v, dout: start every rank with the same options and --seed)");
}

Tensor shard_of(const Tensor& full, Layout layout, std::span<const int32_t> cu, int P, int p, DType dtype) {
  std::vector<int64_t> shape(full.view().shape.begin(), full.view().shape.begin() + full.rank());
  shape[1] = shard_length(layout, shape[1], P, p, cu);
  Tensor s(dtype, static_cast<int>(shape.size()), shape.data());
  shard(full, s, layout, P, p, 1, cu);
  return s;
}

// Every rank's shard of x gathered and put back in global order (on every rank).
Tensor gather_full(Communicator& comm, const Tensor& x, Layout layout, std::span<const int32_t> cu, int64_t L,
                   int seq_dim = 1) {
  std::vector<int64_t> shape(x.view().shape.begin(), x.view().shape.begin() + x.rank());
  shape[seq_dim] = L;
  Tensor full(x.dtype(), static_cast<int>(shape.size()), shape.data());
  gather_shards(comm, x, full, layout, seq_dim, cu);
  return full;
}

void run_distributed(const AttentionArgs& a, Inputs& in, DType dtype) {
  std::unique_ptr<Communicator> comm = mpi_world(a.timeout);
  const int P = comm->size(), p = comm->rank();
  DistAttentionOptions opt;
  opt.strategy = parse_strategy(a.strategy);
  opt.layout = parse_layout(a.layout);
  opt.causal = a.causal;
  const Window w = parse_window(a.window);
  opt.window_left = w.left, opt.window_right = w.right;
  if (a.scale) opt.scale = *a.scale;
  opt.threads = a.threads;
  opt.overlap = !a.no_overlap;
  const Isa isa = a.isa.empty() ? default_isa() : parse_isa(a.isa);
  opt.isa = &isa;

  share_inputs(*comm, a, in);
  check_same_job(*comm, a, in, dtype);
  check(in.q.dim(1) == in.k.dim(1), "sequence parallel attention needs Lq == Lk, got ", in.q.dim(1), " and ",
        in.k.dim(1));
  const std::optional<Documents> docs = documents_of(a, in);  // the same check on every rank
  const std::vector<int32_t> cu_seqlens = in.cu_q;            // outlives `in` (released below)
  opt.cu_seqlens = cu_seqlens;
  AttentionOptions global;  // the whole sequence's mask, for one-rank checks and FLOP counts
  global.causal = a.causal, global.window_left = w.left, global.window_right = w.right;
  if (docs) docs->apply(global);
  if (a.scale) global.scale = *a.scale;
  global.threads = a.threads;
  global.isa = &isa;
  const int64_t B = in.q.dim(0), L = in.q.dim(1), H = in.q.dim(2), d = in.q.dim(3), Hkv = in.k.dim(2);
  check_layout(opt.layout, L, P, cu_seqlens);
  Tensor q = shard_of(in.q, opt.layout, cu_seqlens, P, p, dtype),
         k = shard_of(in.k, opt.layout, cu_seqlens, P, p, dtype),
         v = shard_of(in.v, opt.layout, cu_seqlens, P, p, dtype);
  Tensor dout = in.backward ? shard_of(in.dout, opt.layout, cu_seqlens, P, p, dtype) : Tensor();
  const bool keep_full = a.check && p == 0;
  if (!keep_full) in = Inputs{Tensor(), Tensor(), Tensor(), Tensor(), in.backward, in.cu_q, in.cu_k};
  const int64_t Ll = shard_length(opt.layout, L, P, p, cu_seqlens);
  Tensor o(DType::f32, {B, Ll, H, d}), lse(DType::f32, {B, H, Ll});
  Tensor dq, dk, dv;
  if (in.backward) dq = like(q, DType::f32), dk = like(k, DType::f32), dv = like(v, DType::f32);

  // The step (forward, backward) --reps times; reported: the repetition whose
  // slowest rank was fastest, every rank's row from that repetition.
  constexpr int kCols = 12;
  std::vector<double> rows(static_cast<size_t>(P) * kCols), rep_rows(rows.size());
  double best = 1e300;
  reset_peak_memory();
  for (int r = 0; r < a.reps; ++r) {
    comm->barrier();
    comm->reset_stats();
    DistStats fwd, bwd;
    dist_attention_forward(*comm, q, k, v, o, lse, opt, &fwd);
    if (in.backward) dist_attention_backward(*comm, q, k, v, o, lse, dout, dq, dk, dv, opt, &bwd);
    const double peak = static_cast<double>(memory_stats().peak_bytes);
    // Per-rank report rows, gathered everywhere.
    const double mine[kCols] = {
        fwd.seconds, fwd.compute_seconds,       fwd.wait_seconds, double(fwd.bytes_sent), double(fwd.bytes_received),
        bwd.seconds, bwd.compute_seconds,       bwd.wait_seconds, double(bwd.bytes_sent), double(bwd.bytes_received),
        peak,        double(fwd.stages_skipped)};
    comm->all_gather(mine, rep_rows.data(), sizeof(mine));
    double slowest = 0;
    for (int rank = 0; rank < P; ++rank)
      slowest = std::max(slowest, rep_rows[rank * kCols] + rep_rows[rank * kCols + 5]);
    if (slowest < best) best = slowest, rows = rep_rows;
  }

  // Results back in global order for --out/--check (every rank takes part).
  const bool need_full = a.check || !a.out.empty() || !a.lse.empty() || !a.dq.empty() || !a.dk.empty() || !a.dv.empty();
  nlohmann::json errors;
  if (need_full) {
    Tensor o_full = gather_full(*comm, o, opt.layout, cu_seqlens, L),
           lse_full = gather_full(*comm, lse, opt.layout, cu_seqlens, L, 2);
    Tensor dq_full, dk_full, dv_full;
    if (in.backward) {
      dq_full = gather_full(*comm, dq, opt.layout, cu_seqlens, L);
      dk_full = gather_full(*comm, dk, opt.layout, cu_seqlens, L);
      dv_full = gather_full(*comm, dv, opt.layout, cu_seqlens, L);
    }
    if (p == 0) {
      if (!a.out.empty()) save_npy(a.out, o_full);
      if (!a.lse.empty()) save_npy(a.lse, lse_full);
      if (!a.dq.empty()) save_npy(a.dq, dq_full);
      if (!a.dk.empty()) save_npy(a.dk, dk_full);
      if (!a.dv.empty()) save_npy(a.dv, dv_full);
      if (a.check) {  // against the fused kernels on one rank, same dtype and options
        const AttentionOptions& lo = global;
        Tensor fq = convert(in.q, dtype), fk = convert(in.k, dtype), fv = convert(in.v, dtype);
        Tensor ro = like(in.q, DType::f32), rl(DType::f32, {B, H, L});
        attention_forward(fq, fk, fv, ro, rl, lo);
        errors["o"] = rel_error(o_full, ro);
        errors["lse"] = rel_error(lse_full, rl);
        if (in.backward) {
          Tensor rdq = like(in.q, DType::f32), rdk = like(in.k, DType::f32), rdv = like(in.v, DType::f32);
          attention_backward(fq, fk, fv, ro, rl, convert(in.dout, dtype), rdq, rdk, rdv, lo);
          errors["dq"] = rel_error(dq_full, rdq);
          errors["dk"] = rel_error(dk_full, rdk);
          errors["dv"] = rel_error(dv_full, rdv);
        }
      }
    }
  }
  if (p != 0) return;

  const double flops = attention_forward_flops(B, H, L, L, d, global);
  nlohmann::json j;
  j["shape"] = {{"B", B}, {"L", L}, {"H", H}, {"Hkv", Hkv}, {"d", d}};
  j["ranks"] = P;
  j["strategy"] = strategy_name(opt.strategy);
  j["layout"] = layout_name(opt.layout);
  j["dtype"] = dtype_name(dtype);
  j["causal"] = a.causal;
  j["window"] = {w.left, w.right};
  j["documents"] = in.cu_q.empty() ? 1 : static_cast<int64_t>(in.cu_q.size()) - 1;
  j["visible_pairs"] = attention_visible_pairs(L, L, global);
  j["isa"] = isa_name(isa);
  j["per_rank"] = nlohmann::json::array();
  for (int r = 0; r < P; ++r) {
    const double* x = rows.data() + r * kCols;
    nlohmann::json row = {{"rank", r},
                          {"forward",
                           {{"seconds", x[0]},
                            {"compute_seconds", x[1]},
                            {"wait_seconds", x[2]},
                            {"bytes_sent", x[3]},
                            {"bytes_received", x[4]},
                            {"gflops", flops / P / x[0] * 1e-9},
                            {"stages_skipped", x[11]}}},
                          {"peak_memory_bytes", x[10]}};
    if (in.backward)
      row["backward"] = {{"seconds", x[5]},    {"compute_seconds", x[6]}, {"wait_seconds", x[7]},
                         {"bytes_sent", x[8]}, {"bytes_received", x[9]},  {"gflops", 2.5 * flops / P / x[5] * 1e-9}};
    j["per_rank"].push_back(row);
  }
  if (a.check) j["max_rel_error_vs_single_rank"] = errors;
  if (a.json) return print_json(j);

  std::printf("attention  B=%lld L=%lld H=%lld Hkv=%lld d=%lld  %s%s%s  strategy %s, layout %s, %d ranks, path %s\n",
              static_cast<long long>(B), static_cast<long long>(L), static_cast<long long>(H),
              static_cast<long long>(Hkv), static_cast<long long>(d), dtype_name(dtype), a.causal ? " causal" : "",
              mask_words(w, in).c_str(), strategy_name(opt.strategy), layout_name(opt.layout), P, isa_name(isa));
  std::printf("%4s %-8s %10s %10s %10s %9s %10s %10s %10s\n", "rank", "pass", "time [ms]", "GFLOP/s", "compute", "wait",
              "sent MiB", "recv MiB", "peak MiB");
  for (int r = 0; r < P; ++r) {
    const double* x = rows.data() + r * kCols;
    for (int pass = 0; pass < (in.backward ? 2 : 1); ++pass) {
      const double* y = x + 5 * pass;
      std::printf("%4d %-8s %10.2f %10.1f %10.2f %9.2f %10.2f %10.2f %10.1f\n", r, pass ? "backward" : "forward",
                  y[0] * 1e3, (pass ? 2.5 : 1.0) * flops / P / y[0] * 1e-9, y[1] * 1e3, y[2] * 1e3, y[3] / 1048576.0,
                  y[4] / 1048576.0, x[10] / 1048576.0);
    }
  }
  if (a.check) {
    std::printf("max relative error vs one rank:");
    for (auto& [name, e] : errors.items()) std::printf("  %s %.2e", name.c_str(), e.get<double>());
    std::printf("\n");
  }
}

void run(const AttentionArgs& a) {
  const DType dtype = parse_dtype(a.dtype);
  if (a.threads > 0) omp_set_num_threads(a.threads);  // copies and merges too, not only the kernels
  if (!a.strategy.empty() || launched_by_mpi()) {
    AttentionArgs b = a;
    if (b.strategy.empty()) b.strategy = "ring";
    Inputs in;
    return run_distributed(b, in, dtype);
  }
  check(!a.check, "--check compares a distributed run with one rank: use it with --strategy under mpirun");
  parse_window(a.window);
  check_outputs(a);
  Inputs in = read_inputs(a);
  read_documents(a, in);
  run_local(a, in, dtype);
}

}  // namespace

void add_attention(CLI::App& app) {
  auto a = std::make_shared<AttentionArgs>();
  auto* cmd =
      app.add_subcommand("attention",
                         "exact attention on .npy inputs (or generated ones), forward and backward; under mpirun "
                         "sequence-parallel with --strategy");
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
  cmd->add_option("--window", a->window,
                  "sliding window LEFT,RIGHT: query i sees keys i-LEFT..i+RIGHT (-1: unbounded side; with --causal "
                  "RIGHT is 0), e.g. 4095,0");
  cmd->add_option("--cu-seqlens", a->cu_seqlens,
                  "packed documents: int32/int64 .npy [n_docs + 1] of offsets 0..L; attention stays inside each");
  cmd->add_option("--cu-seqlens-q", a->cu_seqlens_q, "documents' query offsets when Lq != Lk (with --cu-seqlens-k)");
  cmd->add_option("--cu-seqlens-k", a->cu_seqlens_k, "documents' key offsets when Lq != Lk (with --cu-seqlens-q)");
  cmd->add_option("--scale", a->scale, "softmax scale (default 1/sqrt(d))")->check(positive_finite());
  cmd->add_option("--dtype", a->dtype, "storage dtype for the computation: fp32, bf16 or fp16")->capture_default_str();
  cmd->add_option("--isa", a->isa, "kernel path: generic, avx2, avx512, avx512_bf16, amx_bf16 (default: best)");
  cmd->add_option("--threads", a->threads,
                  "threads per process (default: OpenMP's, its CPUs divided among the ranks on one machine)")
      ->check(thread_count());
  cmd->add_option("--strategy", a->strategy, "distributed strategy under mpirun: ring, allgather, ulysses")
      ->check(CLI::IsMember({"ring", "allgather", "ulysses"}));
  cmd->add_option("--layout", a->layout,
                  "sequence layout: contiguous, zigzag, striped, doc-zigzag (zigzag inside each document of "
                  "--cu-seqlens) or doc-balanced (documents whole, balanced by causal work; those too long for "
                  "one rank dealt zigzag)")
      ->check(CLI::IsMember({"contiguous", "zigzag", "striped", "doc-zigzag", "doc-balanced"}))
      ->capture_default_str();
  cmd->add_option("--reps", a->reps, "repetitions of each pass; the best time is reported")
      ->check(positive_count())
      ->capture_default_str();
  cmd->add_flag("--check", a->check, "compare the distributed result with one rank's (max relative error)");
  cmd->add_flag("--no-overlap", a->no_overlap, "do not poll communication between compute tiles");
  add_timeout_option(cmd, a->timeout);
  cmd->add_option("--batch", a->batch, "generated inputs: batch")->check(positive_count())->capture_default_str();
  cmd->add_option("--seq", a->seq, "generated inputs: sequence length")->check(positive_count())->capture_default_str();
  cmd->add_option("--kv-seq", a->kv_seq, "generated inputs: key/value length Lk (default: --seq; one process only)")
      ->check(positive_count());
  cmd->add_option("--heads", a->heads, "generated inputs: query heads")->check(positive_count())->capture_default_str();
  cmd->add_option("--kv-heads", a->kv_heads, "generated inputs: key/value heads (default: --heads)")
      ->check(positive_count());
  cmd->add_option("--dim", a->dim, "generated inputs: head dim")->check(positive_count())->capture_default_str();
  cmd->add_option("--seed", a->seed, "generated inputs: random seed")->check(seed_value())->capture_default_str();
  cmd->add_flag("--json", a->json, "machine-readable output");
  cmd->callback([a] { run(*a); });
}

}  // namespace ringattn::cli
