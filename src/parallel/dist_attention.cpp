// Distributed exact attention over a Communicator: the ring (RA+SP) and the two
// baselines, all-gather KV and Ulysses (see dist_attention.h).
#include "ringattn/dist_attention.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "ringattn/cpu/attention.h"
#include "ringattn/device.h"
#include "ringattn/error.h"
#include "ringattn/perf.h"

namespace ringattn {

const char* strategy_name(Strategy s) {
  switch (s) {
    case Strategy::ring:
      return "ring";
    case Strategy::allgather:
      return "allgather";
    case Strategy::ulysses:
      return "ulysses";
    default:
      return "hybrid";
  }
}

Strategy parse_strategy(const std::string& s) {
  for (Strategy x : {Strategy::ring, Strategy::allgather, Strategy::ulysses, Strategy::hybrid})
    if (s == strategy_name(x)) return x;
  throw Error(cat("unknown strategy '", s, "': valid strategies are ring, allgather, ulysses, hybrid"));
}

namespace {

void poll_comm(void* c) { static_cast<Communicator*>(c)->progress(); }

// Tokens of a block: global positions and, with packed documents, their document ids.
struct Tokens {
  std::vector<int64_t> pos, doc;
};

// One call's bookkeeping: shapes, positions, timers, traffic.
struct Call {
  Communicator& comm;
  const DistAttentionOptions& opt;
  Device& dev;  // where the tensors live and the kernels run
  DistStats* out;
  int P, p;
  int64_t B, Ll, H, Hkv, d, L;
  std::vector<int64_t> lens;  // every rank's shard length (they differ by at most one or two)
  DType dtype;
  bool masked;                    // causal, a window or documents: some blocks may see nothing
  int64_t left = -1, right = -1;  // the window, causal folded in (attention.h; −1: unbounded)
  double t_start, compute = 0;
  CommStats comm0;
  std::vector<std::pair<Communicator*, CommStats>> groups;  // hybrid: the sub-groups' traffic counts too

  // q, k, v, o, lse, then (backward) dout, dq, dk, dv.
  Call(Communicator& c, const DistAttentionOptions& o, DistStats* s, std::initializer_list<const TensorView*> ts)
      : comm(c), opt(o), dev(o.device ? *o.device : cpu_device()), out(s), P(c.size()), p(c.rank()) {
    const std::vector<const TensorView*> t(ts);
    const TensorView &q = *t[0], &k = *t[1], &v = *t[2], &o_ = *t[3], &lse = *t[4];
    // Every rank must agree on the problem before anyone communicates, and before
    // any rank-local check could make one rank leave alone. The sequence
    // dimension (1; lse: 2) may differ (uneven shards): it is checked below.
    auto dims = [](const TensorView& t, int seq) {
      std::array<int64_t, 5> r{t.rank, -1, -1, -1, -1};
      for (int i = 0; i < t.rank && i < 4; ++i) r[1 + i] = i == seq ? -1 : t.shape[i];
      return r;
    };
    auto seq_dim = [&](size_t i) { return i == 4 ? 2 : 1; };
    const float sc = opt.scale;
    int32_t scale_bits;
    std::memcpy(&scale_bits, &sc, 4);
    uint64_t docs_hash = 1469598103934665603ull;  // FNV-1a of cu_seqlens
    for (int32_t x : opt.cu_seqlens) docs_hash = (docs_hash ^ static_cast<uint32_t>(x)) * 1099511628211ull;
    std::vector<int64_t> cfg = {static_cast<int64_t>(q.dtype),
                                static_cast<int64_t>(k.dtype),
                                static_cast<int64_t>(v.dtype),
                                opt.causal,
                                opt.window_left,
                                opt.window_right,
                                static_cast<int64_t>(opt.cu_seqlens.size()),
                                static_cast<int64_t>(docs_hash >> 1),
                                static_cast<int64_t>(opt.strategy),
                                static_cast<int64_t>(opt.layout),
                                std::isnan(sc) ? -1 : scale_bits};
    for (size_t i = 0; i < t.size(); ++i) {
      cfg.push_back(t[i]->empty() ? -1 : static_cast<int64_t>(t[i]->dtype));
      for (int64_t e : dims(*t[i], seq_dim(i))) cfg.push_back(e);
    }
    check_same_on_all_ranks(
        comm, cfg,
        "attention config (dtypes, causal, window, cu_seqlens, strategy, layout, scale, then dtype, rank and shape "
        "of the q, k, v, o, lse[, dout, dq, dk, dv] shards)");
    // Every rank's shard lengths, seen by every rank: L is their sum, and each
    // rank's must be what the layout gives it (checked alike everywhere).
    std::vector<int64_t> mine(t.size()), all(t.size() * static_cast<size_t>(P));
    for (size_t i = 0; i < t.size(); ++i)
      mine[i] = t[i]->rank > seq_dim(i) && !t[i]->empty() ? t[i]->shape[seq_dim(i)] : -1;
    comm.all_gather(mine.data(), all.data(), mine.size() * sizeof(int64_t));
    L = 0;
    for (int r = 0; r < P; ++r) lens.push_back(all[static_cast<size_t>(r) * t.size()]), L += lens.back();
    const char* const names[] = {"q", "k", "v", "o", "lse", "dout", "dq", "dk", "dv"};
    for (int r = 0; r < P; ++r)
      for (size_t i = 1; i < t.size(); ++i)
        check(all[r * t.size() + i] == lens[r], "shard length mismatch: rank ", r, "'s ", names[i], " shard has ",
              all[r * t.size() + i], " tokens but its q shard ", lens[r],
              " (sequence parallel attention is self-attention)");
    if (!opt.cu_seqlens.empty()) check_cu_seqlens(opt.cu_seqlens, L, "cu_seqlens");
    check_layout(opt.layout, L, P, opt.cu_seqlens);
    for (int r = 0; r < P; ++r)
      check(lens[r] == shard_length(opt.layout, L, P, r, opt.cu_seqlens), "shard length mismatch: rank ", r, " passes ",
            lens[r], " tokens but the ", layout_name(opt.layout), " layout of L=", L, " over ", P, " ranks gives it ",
            shard_length(opt.layout, L, P, r, opt.cu_seqlens), " (the shards of all ranks add up to L)");
    AttentionOptions contract;
    contract.scale = opt.scale, contract.causal = opt.causal;
    contract.window_left = opt.window_left, contract.window_right = opt.window_right;
    const AttentionShape a = check_attention(q, k, v, o_, lse, contract);
    B = a.B, Ll = a.Lq, H = a.H, d = a.d, Hkv = a.Hkv;
    dtype = q.dtype;
    if (t.size() > 5) check_attention_grads(q, k, *t[5], *t[6], *t[7], *t[8]);
    masked = opt.causal || a.window_left >= 0 || a.window_right >= 0 || !opt.cu_seqlens.empty();
    left = a.window_left, right = a.window_right;
    check(dev.is_host() || (opt.cu_seqlens.empty() && a.window_left < 0 && a.window_right < 0),
          "packed documents and sliding windows run on the host (the CUDA kernels do not take them yet)");
    check(dev.is_host() || opt.strategy == Strategy::ring, "strategy '", strategy_name(opt.strategy),
          "' runs on the host only; on ", dev.name(), " use the ring");
    if (opt.strategy == Strategy::hybrid) {
      check(opt.ulysses_group && opt.ring_group, "the hybrid strategy needs its Ulysses and ring groups");
      const int U = opt.ulysses_group->size(), R = opt.ring_group->size();
      check(U * R == P && opt.ring_group->rank() * U + opt.ulysses_group->rank() == p,
            "the hybrid strategy's groups must tile the ranks: rank = ring rank x ", U, " + Ulysses rank, got ring ",
            opt.ring_group->rank(), " of ", R, " and Ulysses ", opt.ulysses_group->rank(), " of ", U, " for rank ", p,
            " of ", P);
      check(H % U == 0 && Hkv % U == 0, "the hybrid strategy splits heads over its Ulysses group: H=", H,
            " and Hkv=", Hkv, " must both be divisible by ", U);
      for (Communicator* g : {opt.ulysses_group, opt.ring_group}) groups.emplace_back(g, g->stats());
    }
    comm0 = comm.stats();
    t_start = now_seconds();
  }

  // The global positions of some tokens and (with cu_seqlens) their documents.
  Tokens tokens(std::vector<int64_t> pos) const {
    Tokens t{std::move(pos), {}};
    for (int64_t x : t.pos) {
      if (opt.cu_seqlens.empty()) break;
      const auto it = std::upper_bound(opt.cu_seqlens.begin(), opt.cu_seqlens.end(), x);
      t.doc.push_back(it - opt.cu_seqlens.begin() - 1);
    }
    return t;
  }

  // The local attention of queries q against keys k; polls `poll` (the group
  // whose transfers are in flight) between tiles. pos: where the device reads
  // the positions (q.pos and k.pos, or device copies of them).
  AttentionOptions local(const Tokens& q, const Tokens& k, Communicator* poll = nullptr,
                         std::span<const int64_t> q_pos = {}, std::span<const int64_t> k_pos = {}) const {
    AttentionOptions a;
    a.scale = opt.scale;
    a.causal = opt.causal;
    a.window_left = opt.window_left, a.window_right = opt.window_right;
    a.q_pos = q_pos.empty() ? std::span<const int64_t>(q.pos) : q_pos;
    a.k_pos = k_pos.empty() ? std::span<const int64_t>(k.pos) : k_pos;
    a.q_doc = q.doc, a.k_doc = k.doc;
    a.threads = opt.threads;
    a.isa = opt.isa;
    if (opt.overlap) {
      a.progress = poll_comm;
      a.progress_ctx = poll ? poll : &comm;
    }
    return a;
  }

  // Whether queries q see any key of k (exactly: a block that sees nothing is skipped).
  bool sees(const Tokens& q, const Tokens& k) const {
    return !masked || attention_visible_pairs(static_cast<int64_t>(q.pos.size()), static_cast<int64_t>(k.pos.size()),
                                              local(q, k)) > 0;
  }

  // The range [lo, hi) of k's tokens (in their order) that some query of qs sees,
  // {0, 0} for none, from the mask rule: the key at position x of document n is
  // seen from positions x − right .. x + left inside that document.
  std::pair<int64_t, int64_t> seen_range(const std::vector<const Tokens*>& qs, const Tokens& k) const {
    std::vector<std::vector<int64_t>> sorted;
    for (const Tokens* q : qs) {
      sorted.push_back(q->pos);
      std::sort(sorted.back().begin(), sorted.back().end());
    }
    auto seen = [&](size_t j) {
      const int64_t x = k.pos[j];
      int64_t lo = right < 0 ? std::numeric_limits<int64_t>::min() : x - right;
      int64_t hi = left < 0 ? std::numeric_limits<int64_t>::max() : x + left;
      if (!k.doc.empty()) {
        const size_t n = static_cast<size_t>(k.doc[j]);
        lo = std::max<int64_t>(lo, opt.cu_seqlens[n]), hi = std::min<int64_t>(hi, opt.cu_seqlens[n + 1] - 1);
      }
      for (const std::vector<int64_t>& q : sorted) {
        const auto it = std::lower_bound(q.begin(), q.end(), lo);
        if (it != q.end() && *it <= hi) return true;
      }
      return false;
    };
    size_t lo = 0, hi = k.pos.size();
    while (lo < hi && !seen(lo)) ++lo;
    while (hi > lo && !seen(hi - 1)) --hi;
    return {static_cast<int64_t>(lo), static_cast<int64_t>(hi)};
  }

  template <typename F>
  void timed(F&& f) {
    const double t0 = now_seconds();
    f();
    compute += now_seconds() - t0;
  }

  ~Call() {
    if (!out) return;
    const CommStats& c = comm.stats();
    out->seconds = now_seconds() - t_start;
    out->compute_seconds = compute;
    out->wait_seconds = c.wait_seconds - comm0.wait_seconds;
    out->bytes_sent = c.bytes_sent - comm0.bytes_sent;
    out->bytes_received = c.bytes_received - comm0.bytes_received;
    for (const auto& [g, s0] : groups) {
      out->wait_seconds += g->stats().wait_seconds - s0.wait_seconds;
      out->bytes_sent += g->stats().bytes_sent - s0.bytes_sent;
      out->bytes_received += g->stats().bytes_received - s0.bytes_received;
    }
  }
};

// Completes (or, past the timeout, abandons) transfers still in flight when an
// error unwinds a schedule, so no buffer is freed while MPI writes into it.
struct InFlight {
  Communicator& comm;
  std::vector<Request*> reqs;
  ~InFlight() {
    for (Request* r : reqs)
      if (r->pending()) try {
          comm.wait(*r);
        } catch (const Error&) {
        }
  }
};

std::vector<int64_t> all_positions(Layout l, int64_t L, int P, std::span<const int32_t> cu) {
  std::vector<int64_t> pos;
  pos.reserve(static_cast<size_t>(L));
  for (int r = 0; r < P; ++r) {
    const std::vector<int64_t> s = shard_positions(l, L, P, r, cu);
    pos.insert(pos.end(), s.begin(), s.end());
  }
  return pos;
}

TensorView kv_half(const TensorView& kv, int i) { return kv.select(0, i); }  // [2, B, L, Hkv, d] -> [B, L, Hkv, d]

// The block of n tokens at the start of a K/V buffer sized for the longest one:
// [2, B, Lmax, Hkv, d] -> [2, B, n, Hkv, d], contiguous (what travels).
TensorView kv_block(const DeviceTensor& buf, int64_t n) {
  const TensorView& v = buf.view();
  return TensorView(v.data, v.dtype, {2, v.shape[1], n, v.shape[3], v.shape[4]});
}
size_t bytes_of(const TensorView& t) { return static_cast<size_t>(t.numel()) * dtype_size(t.dtype); }

// ---- ring (RA+SP) -----------------------------------------------------------------
// The group the K/V blocks travel round and the tokens each member holds (its
// layout shard, or under the hybrid the shards of its Ulysses group), with their
// positions where the device's kernels read them. reach[s]: how many hops member
// s's block travels, to the farthest member (in ring order) whose queries see
// it — P − 1 without a mask, less with a window or causal contiguous shards
// (docs/architecture.md): stages past it neither compute nor transfer.
// travel[s]: the tokens of that block that leave member s, [lo, hi) in its
// order: those the members within its reach see (a window's last W keys), all of
// them without a mask; their K/V (and dK/dV) are what travels.
struct Ring {
  Communicator& comm;
  Device& dev;
  std::vector<Tokens> tokens, moving;  // moving[s]: tokens[s] in travel[s]
  std::vector<std::shared_ptr<const int64_t>> dev_pos;
  std::vector<int> reach;
  std::vector<std::pair<int64_t, int64_t>> travel;
  std::vector<bool> seen;  // seen[s]: this member's queries see member s's block
  Ring(const Call& c, Communicator& g, std::vector<Tokens> t) : comm(g), dev(c.dev), tokens(std::move(t)) {
    const int P = g.size(), me = g.rank();
    for (const auto& x : tokens) dev_pos.push_back(dev.upload_positions(x.pos));
    for (int s = 0; s < P; ++s) seen.push_back(c.sees(tokens[me], tokens[s]));
    // The shortened schedule runs on the host; a GPU keeps the full ring until it
    // has run there.
    const bool shorten = c.masked && dev.is_host();
    for (int s = 0; s < P; ++s) {
      int r = P - 1;
      while (shorten && r > 0 && !c.sees(tokens[(s + r) % P], tokens[s])) --r;
      reach.push_back(r);
      std::pair<int64_t, int64_t> range{0, length(s)};
      if (shorten) {
        std::vector<const Tokens*> receivers;
        for (int h = 1; h <= r; ++h) receivers.push_back(&tokens[(s + h) % P]);
        range = c.seen_range(receivers, tokens[s]);
      }
      travel.push_back(range);
      const auto a = static_cast<ptrdiff_t>(range.first), b = static_cast<ptrdiff_t>(range.second);
      moving.push_back(Tokens{{tokens[s].pos.begin() + a, tokens[s].pos.begin() + b},
                              tokens[s].doc.empty()
                                  ? std::vector<int64_t>()
                                  : std::vector<int64_t>(tokens[s].doc.begin() + a, tokens[s].doc.begin() + b)});
    }
  }
  int P() const { return comm.size(); }
  int p() const { return comm.rank(); }
  int64_t length(int member) const { return static_cast<int64_t>(tokens[member].pos.size()); }
  int64_t moving_length(int member) const { return travel[member].second - travel[member].first; }
  bool trimmed(int member) const { return moving_length(member) < length(member); }
  // The most tokens of a block that travel: what the ring's buffers hold.
  int64_t longest_moving() const {
    int64_t n = 0;
    for (int s = 0; s < P(); ++s) n = std::max(n, moving_length(s));
    return n;
  }
  // The local attention of this member's queries against member src's block:
  // the whole of it (our own), or the part that travelled.
  AttentionOptions local(const Call& c, int src, bool whole) const {
    const int me = p();
    const Tokens& k = whole ? tokens[src] : moving[src];
    return c.local(tokens[me], k, &comm, {dev_pos[me].get(), tokens[me].pos.size()},
                   {dev_pos[src].get() + (whole ? 0 : travel[src].first), k.pos.size()});
  }
};

Ring plain_ring(const Call& c) {
  std::vector<Tokens> members;
  for (int m = 0; m < c.P; ++m)
    members.push_back(c.tokens(shard_positions(c.opt.layout, c.L, c.P, m, c.opt.cu_seqlens)));
  return Ring(c, c.comm, std::move(members));
}

// Our K/V block at stage 0 (k, v) and as it leaves us (out, [2, B, n, Hkv, d]):
// when all of it travels, stacked into the ring buffer `first` and read from
// there; else k and v are read in place and the travel range is stacked into
// `keep`. So the ring's buffers hold what travels, longest_moving() tokens.
struct OwnBlock {
  TensorView k, v, out;
};
OwnBlock own_block(const Ring& ring, const TensorView& k, const TensorView& v, const DeviceTensor& first,
                   DeviceTensor& keep) {
  Device& dev = ring.dev;
  if (!ring.trimmed(ring.p())) {
    const TensorView whole = kv_block(first, k.dim(1));
    dev.copy(kv_half(whole, 0), k);
    dev.copy(kv_half(whole, 1), v);
    return {kv_half(whole, 0), kv_half(whole, 1), whole};
  }
  const int64_t lo = ring.travel[ring.p()].first, n = ring.moving_length(ring.p());
  keep = dev.alloc(k.dtype, {2, k.dim(0), n, k.dim(2), k.dim(3)});
  if (n > 0) {
    dev.copy(kv_half(keep.view(), 0), k.slice(1, lo, n));
    dev.copy(kv_half(keep.view(), 1), v.slice(1, lo, n));
  }
  return {k, v, keep.view()};
}

// Stage t: rank p attends to the K/V block of src = (p − t) mod P while sending
// the block it holds to p+1 and receiving the next from p−1. One schedule for
// every device: on a GPU the kernels and the transfers are queued on two streams
// and wait() orders them, on the CPU the kernels poll the communicator.
//   q, o: [B, Lr, H, d]   k, v: [B, Lr, Hkv, d]   lse: [B, H, Lr]   (Lr = the member's tokens)
void ring_forward(Call& c, const Ring& ring, const TensorView& q, const TensorView& k, const TensorView& v,
                  const TensorView& o, const TensorView& lse) {
  const int P = ring.P(), p = ring.p(), right = (p + 1) % P, left = (p - 1 + P) % P;
  const int64_t B = q.dim(0), Lr = q.dim(1), H = q.dim(2), d = q.dim(3), Hkv = k.dim(2), M = ring.longest_moving();
  Device& dev = ring.dev;
  DeviceTensor kv[2] = {dev.alloc(c.dtype, {2, B, M, Hkv, d}), dev.alloc(c.dtype, {2, B, M, Hkv, d})};
  DeviceTensor keep;
  const OwnBlock own = own_block(ring, k, v, kv[0], keep);
  DeviceTensor o_acc = dev.alloc(DType::f32, {B, Lr, H, d}), lse_acc = dev.alloc(DType::f32, {B, H, Lr});
  DeviceTensor o_part = dev.alloc(DType::f32, {B, Lr, H, d}), lse_part = dev.alloc(DType::f32, {B, H, Lr});
  dev.fill(o_acc, 0.f);
  dev.fill(lse_acc, -INFINITY);
  int cur = 0;
  for (int t = 0; t < P; ++t) {
    const int src = (p - t + P) % P, next = (src - 1 + P) % P;  // next: the block p−1 holds now
    // Stage 0 holds our whole block and sends what travels; later stages hold a
    // travelled part.
    const TensorView block = t == 0 ? own.out : kv_block(kv[cur], ring.moving_length(src));
    const TensorView keys = t == 0 ? own.k : kv_half(block, 0), values = t == 0 ? own.v : kv_half(block, 1);
    const TensorView incoming = kv_block(kv[1 - cur], ring.moving_length(next));
    Request send, recv;
    InFlight guard{ring.comm, {&send, &recv}};
    if (t < ring.reach[src]) send = ring.comm.isend(block.data, bytes_of(block), right, t);
    if (t < ring.reach[next]) recv = ring.comm.irecv(incoming.data, bytes_of(incoming), left, t);
    ring.comm.progress();                          // start them (a stream-ordered backend launches what was posted)
    if (t > ring.reach[src] || !ring.seen[src]) {  // past the block's reach, or it hides from us
      if (c.out) ++c.out->stages_skipped;
    } else {
      c.timed([&] {
        dev.attention_forward(q, keys, values, o_part, lse_part, ring.local(c, src, t == 0));
        dev.attention_merge(o_acc, lse_acc, o_part, lse_part, c.opt.threads);
      });
    }
    if (send.pending()) ring.comm.wait(send);
    if (recv.pending()) ring.comm.wait(recv);
    cur = 1 - cur;
  }
  dev.copy(o, o_acc);
  dev.copy(lse, lse_acc);
}

// Q, dO, O, lse and dQ stay home; each K/V block travels with its dK/dV
// accumulator, which reaches its owner one hop after the last stage.
void ring_backward(Call& c, const Ring& ring, const TensorView& q, const TensorView& k, const TensorView& v,
                   const TensorView& o, const TensorView& lse, const TensorView& dout, const TensorView& dq,
                   const TensorView& dk, const TensorView& dv) {
  const int P = ring.P(), p = ring.p(), right = (p + 1) % P, left = (p - 1 + P) % P;
  const int64_t B = q.dim(0), Lr = q.dim(1), H = q.dim(2), d = q.dim(3), Hkv = k.dim(2), M = ring.longest_moving();
  Communicator& comm = ring.comm;
  Device& dev = ring.dev;
  const std::initializer_list<int64_t> kv_shape = {2, B, M, Hkv, d};
  DeviceTensor kv[2] = {dev.alloc(c.dtype, kv_shape), dev.alloc(c.dtype, kv_shape)};
  DeviceTensor dkv[2] = {dev.alloc(DType::f32, kv_shape), dev.alloc(DType::f32, kv_shape)};
  DeviceTensor dkv_part = dev.alloc(DType::f32, kv_shape);
  DeviceTensor dq_acc = dev.alloc(DType::f32, {B, Lr, H, d}), dq_part = dev.alloc(DType::f32, {B, Lr, H, d});
  dev.fill(dq_acc, 0.f);
  DeviceTensor keep;
  const OwnBlock ours = own_block(ring, k, v, kv[0], keep);
  // When only part of our block travels, our own stage's dK/dV stays here (own)
  // and the travelling accumulator starts at zero; else it travels with them.
  const bool trimmed = ring.trimmed(p);
  const int64_t n_out = ring.moving_length(p);
  DeviceTensor own = trimmed ? dev.alloc(DType::f32, {2, B, Lr, Hkv, d}) : DeviceTensor();
  Request dkv_send[2];
  InFlight send_guard{comm, {&dkv_send[0], &dkv_send[1]}};
  const int kv_tag = 0, dkv_tag = 1, home_tag = 2 * P + dkv_tag;  // tags 2t + kind
  bool home_here = false;                                         // our block's dK/dV never left (nobody else sees it)
  // A block that stops short of the full ring goes home from a rank that is not
  // our left neighbour, at its stage reach[p]: the receive is posted now, into a
  // buffer of its own, so that sender's wait never depends on our progress.
  const int home_from = (p + ring.reach[p]) % P;
  const bool early_home = ring.reach[p] > 0 && ring.reach[p] < P - 1;
  DeviceTensor dkv_home = early_home ? dev.alloc(DType::f32, {2, B, n_out, Hkv, d}) : DeviceTensor();
  Request home_recv;
  InFlight home_guard{comm, {&home_recv}};
  if (early_home) home_recv = comm.irecv(dkv_home.ptr<void>(), dkv_home.bytes(), home_from, home_tag);
  int cur = 0;
  for (int t = 0; t < P; ++t) {
    const int src = (p - t + P) % P, next = (src - 1 + P) % P;
    const bool holding = t <= ring.reach[src];  // the block reached us
    // The block held now (stage 0: ours, as it leaves us), its keys and values, and
    // where its dK/dV go: the travelling accumulator acc; at stage 0 our own dK/dV
    // straight into own when only part of the block travels, else into acc.
    const TensorView block = t == 0 ? ours.out : kv_block(kv[cur], ring.moving_length(src));
    const TensorView keys = t == 0 ? ours.k : kv_half(block, 0), values = t == 0 ? ours.v : kv_half(block, 1);
    const TensorView incoming = kv_block(kv[1 - cur], ring.moving_length(next));
    const TensorView acc = kv_block(dkv[cur], ring.moving_length(src));
    const TensorView part = t > 0 ? kv_block(dkv_part, ring.moving_length(src)) : trimmed ? own.view() : acc;
    Request kv_send, kv_recv, dkv_recv;
    InFlight guard{comm, {&kv_send, &kv_recv, &dkv_recv}};
    // Receives are posted in the order p−1 sends (its dK/dV of the last stage,
    // then this stage's K/V): NCCL pairs point-to-point calls by order, not tag.
    if (dkv_send[cur].pending()) comm.wait(dkv_send[cur]);  // buffer sent two stages ago
    if (t > 0 && holding) dkv_recv = comm.irecv(acc.data, bytes_of(acc), left, 2 * t + dkv_tag);
    if (t < ring.reach[src]) kv_send = comm.isend(block.data, bytes_of(block), right, 2 * t + kv_tag);
    if (t < ring.reach[next]) kv_recv = comm.irecv(incoming.data, bytes_of(incoming), left, 2 * t + kv_tag);
    comm.progress();
    const bool visible = holding && ring.seen[src];
    if (visible) {
      c.timed([&] {
        dev.attention_backward(q, keys, values, o, lse, dout, dq_part, kv_half(part, 0), kv_half(part, 1),
                               ring.local(c, src, t == 0));
        dev.add(dq_acc, dq_part, c.opt.threads);
      });
    } else if (c.out) {
      ++c.out->stages_skipped;
    }
    if (holding) {
      if (t > 0) {
        comm.wait(dkv_recv);
        if (visible) c.timed([&] { dev.add(acc, part, c.opt.threads); });
      } else if (trimmed) {  // part is own
        if (!visible) dev.fill(own, 0.f);
        dev.fill(acc, 0.f);
      } else if (!visible) {  // part is acc
        dev.fill(acc, 0.f);
      }
      // To p+1, the block's next holder; from its last holder, home to its owner.
      if (t < ring.reach[src]) {
        dkv_send[cur] = comm.isend(acc.data, bytes_of(acc), right, 2 * (t + 1) + dkv_tag);
      } else if (t > 0) {
        dkv_send[cur] = comm.isend(acc.data, bytes_of(acc), src, home_tag);
      } else {  // t == 0 == reach: our own block, seen by us alone
        const TensorView mine = trimmed ? own.view() : acc;
        dev.copy(dk, kv_half(mine, 0));
        dev.copy(dv, kv_half(mine, 1));
        home_here = true;
      }
      comm.progress();
    }
    if (kv_send.pending()) comm.wait(kv_send);
    if (kv_recv.pending()) comm.wait(kv_recv);
    cur = 1 - cur;
  }
  // Our block's accumulator comes home from its last holder (after the full ring
  // from p−1, into dkv_part, free now).
  TensorView home = dkv_home.view();
  if (early_home) {
    comm.wait(home_recv);
  } else if (!home_here) {
    home = kv_block(dkv_part, n_out);
    Request r = comm.irecv(home.data, bytes_of(home), home_from, home_tag);
    InFlight guard{comm, {&r}};
    comm.wait(r);
  }
  for (Request& q : dkv_send)
    if (q.pending()) comm.wait(q);
  dev.copy(dq, dq_acc);
  if (home_here) return;
  if (trimmed) {  // own + the travelled range's dK/dV, put back at its place
    DeviceTensor whole = dev.alloc(DType::f32, {2, B, Lr, Hkv, d});
    dev.fill(whole, 0.f);
    dev.copy(whole.view().slice(2, ring.travel[p].first, n_out), home);
    dev.add(own, whole, c.opt.threads);
    home = own.view();
  }
  dev.copy(dk, kv_half(home, 0));
  dev.copy(dv, kv_half(home, 1));
}

// ---- all-gather KV ------------------------------------------------------------------
// Shards may differ in length (by at most two tokens): they travel padded to the
// longest and are put back at their places.
int64_t longest(const std::vector<int64_t>& lens) { return *std::max_element(lens.begin(), lens.end()); }
std::vector<int64_t> starts(const std::vector<int64_t>& lens) {
  std::vector<int64_t> s(lens.size(), 0);
  for (size_t r = 1; r < lens.size(); ++r) s[r] = s[r - 1] + lens[r - 1];
  return s;
}

// Gathers the [B, lens[p], Hkv, d] shards of all ranks into [B, L, Hkv, d] in rank order.
Tensor gather_seq(Call& c, const TensorView& x) {
  const int64_t Lmax = longest(c.lens);
  const std::vector<int64_t> at = starts(c.lens);
  Tensor mine = Tensor::zeros(x.dtype, {x.dim(0), Lmax, x.dim(2), x.dim(3)});
  copy_into(mine.view().slice(1, 0, x.dim(1)), x);
  Tensor blocks(x.dtype, {c.P, x.dim(0), Lmax, x.dim(2), x.dim(3)});
  c.comm.all_gather(mine.ptr<void>(), blocks.ptr<void>(), mine.bytes());
  Tensor full(x.dtype, {x.dim(0), c.L, x.dim(2), x.dim(3)});
  for (int r = 0; r < c.P; ++r)
    copy_into(full.view().slice(1, at[r], c.lens[r]), blocks.view().select(0, r).slice(1, 0, c.lens[r]));
  return full;
}

// The inverse of gather_seq with a sum: rank r receives its rows of every rank's
// [B, L, Hkv, d] partial and adds them in rank order (a reduce-scatter).
void reduce_scatter_seq(Call& c, const Tensor& full, const TensorView& out) {
  const int64_t B = full.dim(0), Hh = full.dim(2), d = full.dim(3), Lmax = longest(c.lens), Ll = c.Ll;
  const std::vector<int64_t> at = starts(c.lens);
  Tensor send = Tensor::zeros(DType::f32, {c.P, B, Lmax, Hh, d}), recv(DType::f32, {c.P, B, Lmax, Hh, d});
  for (int r = 0; r < c.P; ++r)
    copy_into(send.view().select(0, r).slice(1, 0, c.lens[r]), full.view().slice(1, at[r], c.lens[r]));
  c.comm.all_to_all(send.ptr<void>(), recv.ptr<void>(), send.bytes() / c.P);
  const int64_t n = Ll * Hh * d, block = Lmax * Hh * d;  // per batch row: the rows we own, then the padded block
  Tensor sum = Tensor::zeros(DType::f32, {B, Ll, Hh, d});
  for (int r = 0; r < c.P; ++r)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < n; ++i) sum.ptr<float>()[b * n + i] += recv.ptr<float>()[(r * B + b) * block + i];
  copy_into(out, sum);
}

void allgather_forward(Call& c, const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                       const TensorView& lse) {
  const Tokens qt = c.tokens(shard_positions(c.opt.layout, c.L, c.P, c.p, c.opt.cu_seqlens));
  const Tokens kt = c.tokens(all_positions(c.opt.layout, c.L, c.P, c.opt.cu_seqlens));
  Tensor k_all = gather_seq(c, k), v_all = gather_seq(c, v);
  c.timed([&] { attention_forward(q, k_all, v_all, o, lse, c.local(qt, kt)); });
}

void allgather_backward(Call& c, const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                        const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
                        const TensorView& dv) {
  const Tokens qt = c.tokens(shard_positions(c.opt.layout, c.L, c.P, c.p, c.opt.cu_seqlens));
  const Tokens kt = c.tokens(all_positions(c.opt.layout, c.L, c.P, c.opt.cu_seqlens));
  Tensor k_all = gather_seq(c, k), v_all = gather_seq(c, v);
  Tensor dk_all(DType::f32, {c.B, c.L, c.Hkv, c.d}), dv_all(DType::f32, {c.B, c.L, c.Hkv, c.d});
  c.timed([&] { attention_backward(q, k_all, v_all, o, lse, dout, dq, dk_all, dv_all, c.local(qt, kt)); });
  reduce_scatter_seq(c, dk_all, dk);
  reduce_scatter_seq(c, dv_all, dv);
}

// ---- Ulysses ----------------------------------------------------------------------
// Over the G ranks of group g, whose shards hold lens[r] tokens: sequence-sharded
// [B, Ll, Hx, d] -> head-sharded [B, Σ lens, Hx/G, d] (tokens in group-rank order),
// by one all-to-all of blocks padded to the longest shard.
Tensor seq_to_heads(Communicator& g, const TensorView& x, const std::vector<int64_t>& lens) {
  const int G = g.size();
  const int64_t B = x.dim(0), Ll = x.dim(1), Hp = x.dim(2) / G, d = x.dim(3), Lmax = longest(lens);
  const std::vector<int64_t> at = starts(lens);
  Tensor send = Tensor::zeros(x.dtype, {G, B, Lmax, Hp, d}), recv(x.dtype, {G, B, Lmax, Hp, d});
  for (int r = 0; r < G; ++r) copy_into(send.view().select(0, r).slice(1, 0, Ll), x.slice(2, r * Hp, Hp));
  g.all_to_all(send.ptr<void>(), recv.ptr<void>(), send.bytes() / G);
  Tensor out(x.dtype, {B, at[G - 1] + lens[G - 1], Hp, d});
  for (int r = 0; r < G; ++r)
    copy_into(out.view().slice(1, at[r], lens[r]), recv.view().select(0, r).slice(1, 0, lens[r]));
  return out;
}

// The inverse: head-sharded x [.., Σ lens along seq_dim, Hx/G along head_dim, ..]
// back to sequence-sharded out (Hx heads, lens[g.rank()] tokens).
void heads_to_seq(Communicator& g, const TensorView& x, const TensorView& out, int seq_dim, int head_dim,
                  const std::vector<int64_t>& lens) {
  const int G = g.size();
  const int64_t Hp = x.dim(head_dim), Lmax = longest(lens), Ll = lens[static_cast<size_t>(g.rank())];
  const std::vector<int64_t> at = starts(lens);
  std::vector<int64_t> shape = {G};
  shape.insert(shape.end(), x.shape.begin(), x.shape.begin() + x.rank);
  shape[1 + seq_dim] = Lmax;
  Tensor send(x.dtype, static_cast<int>(shape.size()), shape.data()),
      recv(x.dtype, static_cast<int>(shape.size()), shape.data());
  send.fill_zero();  // the padding rows travel too
  for (int r = 0; r < G; ++r)
    copy_into(send.view().select(0, r).slice(seq_dim, 0, lens[r]), x.slice(seq_dim, at[r], lens[r]));
  g.all_to_all(send.ptr<void>(), recv.ptr<void>(), send.bytes() / G);
  for (int r = 0; r < G; ++r)
    copy_into(out.slice(head_dim, r * Hp, Hp), recv.view().select(0, r).slice(seq_dim, 0, Ll));
}

// lse [B, H, Ll] -> [B, H/G, Σ lens]: as [B, Ll, H, 1] through the same all-to-all.
Tensor lse_to_heads(Communicator& g, const TensorView& lse, const std::vector<int64_t>& lens) {
  const int G = g.size();
  const int64_t B = lse.dim(0), H = lse.dim(1), Ll = lse.dim(2), Hp = H / G;
  Tensor lse_t(DType::f32, {B, Ll, H, 1});
  copy_into(lse_t.view(), TensorView(lse.data, lse.dtype, 4, std::array<int64_t, 4>{B, Ll, H, 1}.data(),
                                     std::array<int64_t, 4>{lse.strides[0], lse.strides[2], lse.strides[1], 1}.data()));
  Tensor lseh_t = seq_to_heads(g, lse_t, lens);  // [B, L, H/G, 1]
  const int64_t L = lseh_t.dim(1);
  Tensor lseh(DType::f32, {B, Hp, L});
  copy_into(lseh.view(), TensorView(lseh_t.ptr<void>(), DType::f32, 3, std::array<int64_t, 3>{B, Hp, L}.data(),
                                    std::array<int64_t, 3>{L * Hp, 1, Hp}.data()));
  return lseh;
}

// The shard lengths of group g's members: the whole world's, or the hybrid's
// Ulysses group (U consecutive ranks, rank = ring rank x U + Ulysses rank).
std::vector<int64_t> group_lens(const Call& c, const Communicator& g) {
  const int first = c.p - g.rank();
  return {c.lens.begin() + first, c.lens.begin() + first + g.size()};
}

void check_ulysses(const Call& c) {
  check(c.H % c.P == 0 && c.Hkv % c.P == 0, "Ulysses splits heads over ranks: H=", c.H, " and Hkv=", c.Hkv,
        " must both be divisible by P=", c.P, "; use the ring or all-gather strategy, or a rank count dividing ",
        c.Hkv);
}

// Ulysses over group g (all ranks, or the hybrid's Ulysses group): q, k, v to
// head-sharded [B, G·Ll, H/G, d], attention over those tokens by `attend` (local,
// or the hybrid's ring), results back to sequence-sharded.
template <typename Attend>
void ulysses_forward(Call& c, Communicator& g, const TensorView& q, const TensorView& k, const TensorView& v,
                     const TensorView& o, const TensorView& lse, Attend&& attend) {
  const std::vector<int64_t> lens = group_lens(c, g);
  const int64_t G = g.size(), Lg = std::accumulate(lens.begin(), lens.end(), int64_t{0});
  Tensor qh = seq_to_heads(g, q, lens), kh = seq_to_heads(g, k, lens), vh = seq_to_heads(g, v, lens);
  Tensor oh(DType::f32, {c.B, Lg, c.H / G, c.d}), lseh(DType::f32, {c.B, c.H / G, Lg});
  attend(qh, kh, vh, oh, lseh);
  heads_to_seq(g, oh, o, 1, 2, lens);
  heads_to_seq(g, lseh, lse, 2, 1, lens);
}

template <typename Attend>
void ulysses_backward(Call& c, Communicator& g, const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& o, const TensorView& lse, const TensorView& dout, const TensorView& dq,
                      const TensorView& dk, const TensorView& dv, Attend&& attend) {
  const std::vector<int64_t> lens = group_lens(c, g);
  const int64_t G = g.size(), Lg = std::accumulate(lens.begin(), lens.end(), int64_t{0}), Hp = c.H / G;
  Tensor qh = seq_to_heads(g, q, lens), kh = seq_to_heads(g, k, lens), vh = seq_to_heads(g, v, lens);
  Tensor oh = seq_to_heads(g, o, lens), doh = seq_to_heads(g, dout, lens), lseh = lse_to_heads(g, lse, lens);
  Tensor dqh(DType::f32, {c.B, Lg, Hp, c.d}), dkh(DType::f32, {c.B, Lg, c.Hkv / G, c.d}),
      dvh(DType::f32, {c.B, Lg, c.Hkv / G, c.d});
  attend(qh, kh, vh, oh, lseh, doh, dqh, dkh, dvh);
  heads_to_seq(g, dqh, dq, 1, 2, lens);
  heads_to_seq(g, dkh, dk, 1, 2, lens);
  heads_to_seq(g, dvh, dv, 1, 2, lens);
}

// The hybrid (Ulysses × ring): ring member m holds the tokens of the Ulysses
// group of ranks m·U .. m·U + U − 1 (in that order) after the all-to-all.
Ring hybrid_ring(const Call& c) {
  const int U = c.opt.ulysses_group->size(), R = c.opt.ring_group->size();
  std::vector<Tokens> members;
  for (int m = 0; m < R; ++m) {
    std::vector<int64_t> pos;
    for (int u = 0; u < U; ++u) {
      const std::vector<int64_t> s = shard_positions(c.opt.layout, c.L, c.P, m * U + u, c.opt.cu_seqlens);
      pos.insert(pos.end(), s.begin(), s.end());
    }
    members.push_back(c.tokens(std::move(pos)));
  }
  return Ring(c, *c.opt.ring_group, std::move(members));
}

void forward(Call& c, const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
             const TensorView& lse) {
  switch (c.opt.strategy) {
    case Strategy::ring:
      return ring_forward(c, plain_ring(c), q, k, v, o, lse);
    case Strategy::allgather:
      return allgather_forward(c, q, k, v, o, lse);
    case Strategy::ulysses: {
      check_ulysses(c);
      const Tokens all = c.tokens(all_positions(c.opt.layout, c.L, c.P, c.opt.cu_seqlens));
      return ulysses_forward(c, c.comm, q, k, v, o, lse,
                             [&](auto&... t) { c.timed([&] { attention_forward(t..., c.local(all, all)); }); });
    }
    case Strategy::hybrid: {
      const Ring ring = hybrid_ring(c);
      return ulysses_forward(c, *c.opt.ulysses_group, q, k, v, o, lse,
                             [&](auto&... t) { ring_forward(c, ring, t...); });
    }
  }
}

void backward(Call& c, const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
              const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
              const TensorView& dv) {
  switch (c.opt.strategy) {
    case Strategy::ring:
      return ring_backward(c, plain_ring(c), q, k, v, o, lse, dout, dq, dk, dv);
    case Strategy::allgather:
      return allgather_backward(c, q, k, v, o, lse, dout, dq, dk, dv);
    case Strategy::ulysses: {
      check_ulysses(c);
      const Tokens all = c.tokens(all_positions(c.opt.layout, c.L, c.P, c.opt.cu_seqlens));
      return ulysses_backward(c, c.comm, q, k, v, o, lse, dout, dq, dk, dv,
                              [&](auto&... t) { c.timed([&] { attention_backward(t..., c.local(all, all)); }); });
    }
    case Strategy::hybrid: {
      const Ring ring = hybrid_ring(c);
      return ulysses_backward(c, *c.opt.ulysses_group, q, k, v, o, lse, dout, dq, dk, dv,
                              [&](auto&... t) { ring_backward(c, ring, t...); });
    }
  }
}

}  // namespace

void dist_attention_forward(Communicator& comm, const TensorView& q, const TensorView& k, const TensorView& v,
                            const TensorView& o, const TensorView& lse, const DistAttentionOptions& opt,
                            DistStats* stats) {
  if (stats) *stats = {};
  Call c(comm, opt, stats, {&q, &k, &v, &o, &lse});
  forward(c, q, k, v, o, lse);
}

void dist_attention_backward(Communicator& comm, const TensorView& q, const TensorView& k, const TensorView& v,
                             const TensorView& o, const TensorView& lse, const TensorView& dout, const TensorView& dq,
                             const TensorView& dk, const TensorView& dv, const DistAttentionOptions& opt,
                             DistStats* stats) {
  if (stats) *stats = {};
  Call c(comm, opt, stats, {&q, &k, &v, &o, &lse, &dout, &dq, &dk, &dv});
  backward(c, q, k, v, o, lse, dout, dq, dk, dv);
}

void gather_shards(Communicator& comm, const TensorView& local, const TensorView& full, Layout l, int seq_dim,
                   std::span<const int32_t> cu) {
  const int P = comm.size();
  check(seq_dim >= 0 && seq_dim < full.rank && local.rank == full.rank, "gather_shards: shard ", local.shape_str(),
        " and full ", full.shape_str(), " along dimension ", seq_dim);
  const int64_t L = full.shape[seq_dim];
  check_layout(l, L, P, cu);
  int64_t Lmax = 0;
  for (int r = 0; r < P; ++r) Lmax = std::max(Lmax, shard_length(l, L, P, r, cu));
  std::vector<int64_t> shape(local.shape.begin(), local.shape.begin() + local.rank);
  shape[seq_dim] = Lmax;
  Tensor mine(local.dtype, local.rank, shape.data());
  mine.fill_zero();
  copy_into(mine.view().slice(seq_dim, 0, local.shape[seq_dim]), local);
  shape.insert(shape.begin(), P);
  Tensor blocks(local.dtype, static_cast<int>(shape.size()), shape.data());
  comm.all_gather(mine.ptr<void>(), blocks.ptr<void>(), mine.bytes());
  for (int r = 0; r < P; ++r)
    unshard(blocks.view().select(0, r).slice(seq_dim, 0, shard_length(l, L, P, r, cu)), full, l, P, r, seq_dim, cu);
}

void dist_merge(Communicator& comm, const TensorView& o, const TensorView& lse) {
  check(o.rank == 4 && lse.rank == 3 && o.dtype == DType::f32 && lse.dtype == DType::f32 && o.is_contiguous() &&
            lse.is_contiguous(),
        "dist_merge takes contiguous fp32 o [B, Lq, H, d] and lse [B, H, Lq], got ", o.shape_str(), " and ",
        lse.shape_str());
  const int64_t B = o.dim(0), Lq = o.dim(1), H = o.dim(2), d = o.dim(3), rows = B * Lq * H;
  check(lse.dim(0) == B && lse.dim(1) == H && lse.dim(2) == Lq, "lse ", lse.shape_str(), " does not match o ",
        o.shape_str());
  float* out = o.ptr<float>();
  float* l = lse.ptr<float>();
  auto lse_at = [&](int64_t r) -> float& {  // row r = (b·Lq + i)·H + h of o
    const int64_t h = r % H, i = (r / H) % Lq, b = r / (H * Lq);
    return l[(b * H + h) * Lq + i];
  };
  std::vector<float> m(static_cast<size_t>(rows)), sums(static_cast<size_t>(rows * (d + 1)));
  for (int64_t r = 0; r < rows; ++r) m[r] = lse_at(r);
  comm.all_reduce(m.data(), rows, ReduceOp::max);
  for (int64_t r = 0; r < rows; ++r) {
    const float w = m[r] == -INFINITY || lse_at(r) == -INFINITY ? 0.f : std::exp(lse_at(r) - m[r]);
    for (int64_t c = 0; c < d; ++c) sums[r * (d + 1) + c] = w * out[r * d + c];
    sums[r * (d + 1) + d] = w;
  }
  comm.all_reduce(sums.data(), rows * (d + 1), ReduceOp::sum);
  for (int64_t r = 0; r < rows; ++r) {
    const float den = sums[r * (d + 1) + d];
    for (int64_t c = 0; c < d; ++c) out[r * d + c] = den > 0.f ? sums[r * (d + 1) + c] / den : 0.f;
    lse_at(r) = den > 0.f ? m[r] + std::log(den) : -INFINITY;
  }
}

}  // namespace ringattn
