// Distributed exact attention over a Communicator: the ring (RA+SP) and the two
// baselines, all-gather KV and Ulysses (see dist_attention.h).
#include "ringattn/dist_attention.h"

#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include "ringattn/error.h"
#include "ringattn/perf.h"

namespace ringattn {

const char* strategy_name(Strategy s) {
  switch (s) {
    case Strategy::ring: return "ring";
    case Strategy::allgather: return "allgather";
    default: return "ulysses";
  }
}

Strategy parse_strategy(const std::string& s) {
  for (Strategy x : {Strategy::ring, Strategy::allgather, Strategy::ulysses})
    if (s == strategy_name(x)) return x;
  throw Error(cat("unknown strategy '", s, "': valid strategies are ring, allgather, ulysses"));
}

namespace {

void poll_comm(void* c) { static_cast<Communicator*>(c)->progress(); }

// One call's bookkeeping: shapes, positions, timers, traffic.
struct Call {
  Communicator& comm;
  const DistAttentionOptions& opt;
  DistStats* out;
  int P, p;
  int64_t B, Ll, H, Hkv, d, L;
  DType dtype;
  double t_start, compute = 0;
  CommStats comm0;

  // q, k, v, o, lse, then (backward) dout, dq, dk, dv.
  Call(Communicator& c, const DistAttentionOptions& o, DistStats* s, std::initializer_list<const TensorView*> ts)
      : comm(c), opt(o), out(s), P(c.size()), p(c.rank()) {
    const std::vector<const TensorView*> t(ts);
    const TensorView &q = *t[0], &k = *t[1], &v = *t[2], &o_ = *t[3], &lse = *t[4];
    // Every rank must agree on the problem before anyone communicates, and before
    // any rank-local check could make one rank leave alone.
    auto dims = [](const TensorView& t) {
      std::array<int64_t, 5> r{t.rank, -1, -1, -1, -1};
      for (int i = 0; i < t.rank && i < 4; ++i) r[1 + i] = t.shape[i];
      return r;
    };
    const float sc = opt.scale;
    int32_t scale_bits;
    std::memcpy(&scale_bits, &sc, 4);
    std::vector<int64_t> cfg = {static_cast<int64_t>(q.dtype), static_cast<int64_t>(k.dtype),
                                static_cast<int64_t>(v.dtype), opt.causal, static_cast<int64_t>(opt.strategy),
                                static_cast<int64_t>(opt.layout), std::isnan(sc) ? -1 : scale_bits};
    for (const TensorView* x : t) {
      cfg.push_back(x->empty() ? -1 : static_cast<int64_t>(x->dtype));
      for (int64_t e : dims(*x)) cfg.push_back(e);
    }
    check_same_on_all_ranks(comm, cfg,
                            "attention config (dtypes, causal, strategy, layout, scale, then dtype, rank and shape "
                            "of the q, k, v, o, lse[, dout, dq, dk, dv] shards)");
    check(q.rank == 4 && k.rank == 4 && v.rank == 4, "q, k, v shards must be [B, L/P, H, d] and [B, L/P, Hkv, d]");
    check(lse.rank == 3, "lse shard must be [B, H, L/P]");
    B = q.dim(0), Ll = q.dim(1), H = q.dim(2), d = q.dim(3), Hkv = k.dim(2);
    L = Ll * P;
    dtype = q.dtype;
    check(k.dim(1) == Ll, "sequence parallel attention needs q and k shards of the same length, got ", q.shape_str(),
          " and ", k.shape_str());
    check(k.dim(0) == B && k.dim(3) == d && v.shape == k.shape && v.rank == 4, "k ", k.shape_str(), " and v ",
          v.shape_str(), " shards must be [B, L/P, Hkv, d] with q's B and d ", q.shape_str());
    check(H % Hkv == 0, "query heads H=", H, " must be a multiple of key/value heads Hkv=", Hkv);
    check(q.dtype == k.dtype && q.dtype == v.dtype, "q, k and v must share a dtype");
    check(o_.rank == 4 && o_.shape == q.shape, "o must have the shape of q ", q.shape_str(), ", got ", o_.shape_str());
    check(lse.dtype == DType::f32 && lse.dim(0) == B && lse.dim(1) == H && lse.dim(2) == Ll,
          "lse must be fp32 [B, H, L/P] = [", B, ", ", H, ", ", Ll, "], got ", lse.shape_str());
    if (t.size() > 5) {
      const TensorView &dout = *t[5], &dq = *t[6], &dk = *t[7], &dv = *t[8];
      check(dout.rank == 4 && dout.shape == q.shape, "dout must have the shape of q ", q.shape_str());
      check(dq.rank == 4 && dq.shape == q.shape, "dq must have the shape of q ", q.shape_str());
      check(dk.rank == 4 && dk.shape == k.shape && dv.rank == 4 && dv.shape == k.shape,
            "dk and dv must have the shape of k ", k.shape_str());
    }
    check_layout(opt.layout, L, P);
    comm0 = comm.stats();
    t_start = now_seconds();
  }

  AttentionOptions local(std::span<const int64_t> q_pos, std::span<const int64_t> k_pos) const {
    AttentionOptions a;
    a.scale = opt.scale;
    a.causal = opt.causal;
    a.q_pos = q_pos;
    a.k_pos = k_pos;
    a.threads = opt.threads;
    a.isa = opt.isa;
    if (opt.overlap) {
      a.progress = poll_comm;
      a.progress_ctx = &comm;
    }
    return a;
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

// x += y elementwise (fp32, same shape, contiguous).
void add_into(const Tensor& x, const Tensor& y, int threads) {
  float* a = x.ptr<float>();
  const float* b = y.ptr<float>();
  const int64_t n = x.numel();
#pragma omp parallel for simd schedule(static) num_threads(threads > 0 ? threads : omp_get_max_threads())
  for (int64_t i = 0; i < n; ++i) a[i] += b[i];
}

std::vector<int64_t> all_positions(Layout l, int64_t L, int P) {
  std::vector<int64_t> pos;
  pos.reserve(static_cast<size_t>(L));
  for (int r = 0; r < P; ++r) {
    const std::vector<int64_t> s = shard_positions(l, L, P, r);
    pos.insert(pos.end(), s.begin(), s.end());
  }
  return pos;
}

bool sees_any(std::span<const int64_t> q_pos, std::span<const int64_t> k_pos) {
  return *std::min_element(k_pos.begin(), k_pos.end()) <= *std::max_element(q_pos.begin(), q_pos.end());
}

TensorView kv_half(const Tensor& kv, int i) { return kv.view().select(0, i); }  // [2, B, L, Hkv, d] -> [B, L, Hkv, d]

// ---- ring (RA+SP) -----------------------------------------------------------------
// Stage t: rank p attends to the K/V block of src = (p − t) mod P while sending
// the block it holds to p+1 and receiving the next from p−1.
void ring_forward(Call& c, const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                  const TensorView& lse) {
  const int right = (c.p + 1) % c.P, left = (c.p - 1 + c.P) % c.P;
  const std::vector<int64_t> q_pos = shard_positions(c.opt.layout, c.L, c.P, c.p);
  Tensor kv[2] = {Tensor(c.dtype, {2, c.B, c.Ll, c.Hkv, c.d}), Tensor(c.dtype, {2, c.B, c.Ll, c.Hkv, c.d})};
  copy_into(kv_half(kv[0], 0), k);
  copy_into(kv_half(kv[0], 1), v);
  Tensor o_acc = Tensor::zeros(DType::f32, {c.B, c.Ll, c.H, c.d}), lse_acc(DType::f32, {c.B, c.H, c.Ll});
  Tensor o_part(DType::f32, {c.B, c.Ll, c.H, c.d}), lse_part(DType::f32, {c.B, c.H, c.Ll});
  std::fill_n(lse_acc.ptr<float>(), lse_acc.numel(), -INFINITY);
  int cur = 0;
  for (int t = 0; t < c.P; ++t) {
    const int src = (c.p - t + c.P) % c.P;
    Request send, recv;
    InFlight guard{c.comm, {&send, &recv}};
    if (t < c.P - 1) {
      send = c.comm.isend(kv[cur].ptr<void>(), kv[cur].bytes(), right, t);
      recv = c.comm.irecv(kv[1 - cur].ptr<void>(), kv[1 - cur].bytes(), left, t);
    }
    const std::vector<int64_t> k_pos = shard_positions(c.opt.layout, c.L, c.P, src);
    if (c.opt.causal && !sees_any(q_pos, k_pos)) {
      if (c.out) ++c.out->stages_skipped;
    } else {
      c.timed([&] {
        attention_forward(q, kv_half(kv[cur], 0), kv_half(kv[cur], 1), o_part, lse_part, c.local(q_pos, k_pos));
        attention_merge(o_acc, lse_acc, o_part, lse_part, c.opt.threads);
      });
    }
    if (t < c.P - 1) {
      c.comm.wait(send);
      c.comm.wait(recv);
    }
    cur = 1 - cur;
  }
  copy_into(o, o_acc);
  copy_into(lse, lse_acc);
}

// Q, dO, O, lse and dQ stay home; each K/V block travels with its dK/dV
// accumulator, which reaches its owner one hop after the last stage.
void ring_backward(Call& c, const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                   const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
                   const TensorView& dv) {
  const int right = (c.p + 1) % c.P, left = (c.p - 1 + c.P) % c.P;
  const std::vector<int64_t> q_pos = shard_positions(c.opt.layout, c.L, c.P, c.p);
  const std::initializer_list<int64_t> kv_shape = {2, c.B, c.Ll, c.Hkv, c.d};
  Tensor kv[2] = {Tensor(c.dtype, kv_shape), Tensor(c.dtype, kv_shape)};
  Tensor dkv[2] = {Tensor(DType::f32, kv_shape), Tensor(DType::f32, kv_shape)};
  Tensor dkv_part(DType::f32, kv_shape);
  Tensor dq_acc = Tensor::zeros(DType::f32, {c.B, c.Ll, c.H, c.d}), dq_part(DType::f32, {c.B, c.Ll, c.H, c.d});
  copy_into(kv_half(kv[0], 0), k);
  copy_into(kv_half(kv[0], 1), v);
  Request dkv_send[2];
  InFlight send_guard{c.comm, {&dkv_send[0], &dkv_send[1]}};
  const int kv_tag = 0, dkv_tag = 1;  // tags 2t + kind
  int cur = 0;
  for (int t = 0; t < c.P; ++t) {
    const int src = (c.p - t + c.P) % c.P;
    Request kv_send, kv_recv, dkv_recv;
    InFlight guard{c.comm, {&kv_send, &kv_recv, &dkv_recv}};
    if (t < c.P - 1) {
      kv_send = c.comm.isend(kv[cur].ptr<void>(), kv[cur].bytes(), right, 2 * t + kv_tag);
      kv_recv = c.comm.irecv(kv[1 - cur].ptr<void>(), kv[1 - cur].bytes(), left, 2 * t + kv_tag);
    }
    if (dkv_send[cur].pending()) c.comm.wait(dkv_send[cur]);  // buffer sent two stages ago
    if (t > 0) dkv_recv = c.comm.irecv(dkv[cur].ptr<void>(), dkv[cur].bytes(), left, 2 * t + dkv_tag);
    const std::vector<int64_t> k_pos = shard_positions(c.opt.layout, c.L, c.P, src);
    const bool visible = !c.opt.causal || sees_any(q_pos, k_pos);
    if (visible) {
      c.timed([&] {
        attention_backward(q, kv_half(kv[cur], 0), kv_half(kv[cur], 1), o, lse, dout, dq_part,
                           kv_half(dkv_part, 0), kv_half(dkv_part, 1), c.local(q_pos, k_pos));
        add_into(dq_acc, dq_part, c.opt.threads);
      });
    } else if (c.out) {
      ++c.out->stages_skipped;
    }
    if (t > 0) {
      c.comm.wait(dkv_recv);
      if (visible) c.timed([&] { add_into(dkv[cur], dkv_part, c.opt.threads); });
    } else if (visible) {
      copy_into(dkv[cur], dkv_part);
    } else {
      dkv[cur].fill_zero();
    }
    if (c.P > 1) {
      // To p+1: the next holder of this block, or (after the last stage) its owner.
      dkv_send[cur] = c.comm.isend(dkv[cur].ptr<void>(), dkv[cur].bytes(), right, 2 * (t + 1) + dkv_tag);
      c.comm.wait(kv_send);
      c.comm.wait(kv_recv);
    }
    cur = 1 - cur;
  }
  // With one rank the block never left; otherwise its accumulator comes home
  // from p−1 (into dkv_part, free now).
  const Tensor* home = &dkv[1 - cur];
  if (c.P > 1) {
    Request r = c.comm.irecv(dkv_part.ptr<void>(), dkv_part.bytes(), left, 2 * c.P + dkv_tag);
    InFlight guard{c.comm, {&r}};
    c.comm.wait(r);
    for (Request& q : dkv_send)
      if (q.pending()) c.comm.wait(q);
    home = &dkv_part;
  }
  copy_into(dq, dq_acc);
  copy_into(dk, kv_half(*home, 0));
  copy_into(dv, kv_half(*home, 1));
}

// ---- all-gather KV ------------------------------------------------------------------
// Gathers the [B, L/P, Hkv, d] shards of all ranks into [B, L, Hkv, d] in rank order.
Tensor gather_seq(Call& c, const TensorView& x) {
  Tensor mine(x.dtype, x.rank, x.shape.data());
  copy_into(mine, x);
  Tensor blocks(x.dtype, {c.P, x.dim(0), x.dim(1), x.dim(2), x.dim(3)});
  c.comm.all_gather(mine.ptr<void>(), blocks.ptr<void>(), mine.bytes());
  Tensor full(x.dtype, {x.dim(0), x.dim(1) * c.P, x.dim(2), x.dim(3)});
  for (int r = 0; r < c.P; ++r) {
    copy_into(full.view().slice(1, r * x.dim(1), x.dim(1)), blocks.view().select(0, r));
  }
  return full;
}

// The inverse of gather_seq with a sum: rank r receives block r of every rank's
// [B, L, Hkv, d] partial and adds them in rank order (a reduce-scatter).
void reduce_scatter_seq(Call& c, const Tensor& full, const TensorView& out) {
  const int64_t B = full.dim(0), Ll = full.dim(1) / c.P, Hh = full.dim(2), d = full.dim(3);
  Tensor send(DType::f32, {c.P, B, Ll, Hh, d}), recv(DType::f32, {c.P, B, Ll, Hh, d});
  for (int r = 0; r < c.P; ++r) {
    copy_into(send.view().select(0, r), full.view().slice(1, r * Ll, Ll));
  }
  c.comm.all_to_all(send.ptr<void>(), recv.ptr<void>(), send.bytes() / c.P);
  const int64_t n = B * Ll * Hh * d;
  Tensor sum = Tensor::zeros(DType::f32, {B, Ll, Hh, d});
  for (int r = 0; r < c.P; ++r)
    for (int64_t i = 0; i < n; ++i) sum.ptr<float>()[i] += recv.ptr<float>()[r * n + i];
  copy_into(out, sum);
}

void allgather_forward(Call& c, const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                       const TensorView& lse) {
  const std::vector<int64_t> q_pos = shard_positions(c.opt.layout, c.L, c.P, c.p);
  const std::vector<int64_t> k_pos = all_positions(c.opt.layout, c.L, c.P);
  Tensor k_all = gather_seq(c, k), v_all = gather_seq(c, v);
  c.timed([&] { attention_forward(q, k_all, v_all, o, lse, c.local(q_pos, k_pos)); });
}

void allgather_backward(Call& c, const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                        const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
                        const TensorView& dv) {
  const std::vector<int64_t> q_pos = shard_positions(c.opt.layout, c.L, c.P, c.p);
  const std::vector<int64_t> k_pos = all_positions(c.opt.layout, c.L, c.P);
  Tensor k_all = gather_seq(c, k), v_all = gather_seq(c, v);
  Tensor dk_all(DType::f32, {c.B, c.L, c.Hkv, c.d}), dv_all(DType::f32, {c.B, c.L, c.Hkv, c.d});
  c.timed([&] { attention_backward(q, k_all, v_all, o, lse, dout, dq, dk_all, dv_all, c.local(q_pos, k_pos)); });
  reduce_scatter_seq(c, dk_all, dk);
  reduce_scatter_seq(c, dv_all, dv);
}

// ---- Ulysses ----------------------------------------------------------------------
// Sequence-sharded [B, L/P, Hx, d] -> head-sharded [B, L, Hx/P, d] (tokens in rank
// order), by one all-to-all.
Tensor seq_to_heads(Call& c, const TensorView& x) {
  const int64_t B = x.dim(0), Ll = x.dim(1), Hp = x.dim(2) / c.P, d = x.dim(3);
  Tensor send(x.dtype, {c.P, B, Ll, Hp, d}), recv(x.dtype, {c.P, B, Ll, Hp, d});
  for (int r = 0; r < c.P; ++r) {
    copy_into(send.view().select(0, r), x.slice(2, r * Hp, Hp));
  }
  c.comm.all_to_all(send.ptr<void>(), recv.ptr<void>(), send.bytes() / c.P);
  Tensor out(x.dtype, {B, Ll * c.P, Hp, d});
  for (int r = 0; r < c.P; ++r) {
    copy_into(out.view().slice(1, r * Ll, Ll), recv.view().select(0, r));
  }
  return out;
}

// The inverse: head-sharded x [.., L along seq_dim, Hx/P along head_dim, ..] back
// to sequence-sharded out (Hx heads, L/P tokens).
void heads_to_seq(Call& c, const TensorView& x, const TensorView& out, int seq_dim, int head_dim) {
  const int64_t Ll = x.dim(seq_dim) / c.P, Hp = x.dim(head_dim);
  std::vector<int64_t> bshape(x.shape.begin(), x.shape.begin() + x.rank);
  bshape[seq_dim] = Ll;
  std::vector<int64_t> full_shape = {c.P};
  full_shape.insert(full_shape.end(), bshape.begin(), bshape.end());
  Tensor send(x.dtype, static_cast<int>(full_shape.size()), full_shape.data());
  Tensor recv(x.dtype, static_cast<int>(full_shape.size()), full_shape.data());
  for (int r = 0; r < c.P; ++r) copy_into(send.view().select(0, r), x.slice(seq_dim, r * Ll, Ll));
  c.comm.all_to_all(send.ptr<void>(), recv.ptr<void>(), send.bytes() / c.P);
  for (int r = 0; r < c.P; ++r) copy_into(out.slice(head_dim, r * Hp, Hp), recv.view().select(0, r));
}

void check_ulysses(const Call& c) {
  check(c.H % c.P == 0 && c.Hkv % c.P == 0, "Ulysses splits heads over ranks: H=", c.H, " and Hkv=", c.Hkv,
        " must both be divisible by P=", c.P, "; use --strategy ring or allgather, or a rank count dividing ",
        c.Hkv);
}

void ulysses_forward(Call& c, const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                     const TensorView& lse) {
  check_ulysses(c);
  const std::vector<int64_t> pos = all_positions(c.opt.layout, c.L, c.P);
  Tensor qh = seq_to_heads(c, q), kh = seq_to_heads(c, k), vh = seq_to_heads(c, v);
  Tensor oh(DType::f32, {c.B, c.L, c.H / c.P, c.d}), lseh(DType::f32, {c.B, c.H / c.P, c.L});
  c.timed([&] { attention_forward(qh, kh, vh, oh, lseh, c.local(pos, pos)); });
  heads_to_seq(c, oh, o, 1, 2);
  heads_to_seq(c, lseh, lse, 2, 1);
}

void ulysses_backward(Call& c, const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                      const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
                      const TensorView& dv) {
  check_ulysses(c);
  const std::vector<int64_t> pos = all_positions(c.opt.layout, c.L, c.P);
  Tensor qh = seq_to_heads(c, q), kh = seq_to_heads(c, k), vh = seq_to_heads(c, v);
  Tensor oh = seq_to_heads(c, o), doh = seq_to_heads(c, dout);
  // lse [B, H, L/P] -> [B, H/P, L]: as [B, L/P, H, 1] through the same all-to-all.
  Tensor lse_t(DType::f32, {c.B, c.Ll, c.H, 1});
  copy_into(lse_t.view(), TensorView(lse.data, lse.dtype, 4, std::array<int64_t, 4>{c.B, c.Ll, c.H, 1}.data(),
                                      std::array<int64_t, 4>{lse.strides[0], lse.strides[2], lse.strides[1], 1}.data()));
  Tensor lseh_t = seq_to_heads(c, lse_t);  // [B, L, H/P, 1]
  const int64_t Hp = c.H / c.P;
  Tensor lseh(DType::f32, {c.B, Hp, c.L});
  copy_into(lseh.view(), TensorView(lseh_t.ptr<void>(), DType::f32, 3, std::array<int64_t, 3>{c.B, Hp, c.L}.data(),
                                    std::array<int64_t, 3>{c.L * Hp, 1, Hp}.data()));
  Tensor dqh(DType::f32, {c.B, c.L, Hp, c.d}), dkh(DType::f32, {c.B, c.L, c.Hkv / c.P, c.d}),
      dvh(DType::f32, {c.B, c.L, c.Hkv / c.P, c.d});
  c.timed([&] { attention_backward(qh, kh, vh, oh, lseh, doh, dqh, dkh, dvh, c.local(pos, pos)); });
  heads_to_seq(c, dqh, dq, 1, 2);
  heads_to_seq(c, dkh, dk, 1, 2);
  heads_to_seq(c, dvh, dv, 1, 2);
}

}  // namespace

void dist_attention_forward(Communicator& comm, const TensorView& q, const TensorView& k, const TensorView& v,
                            const TensorView& o, const TensorView& lse, const DistAttentionOptions& opt,
                            DistStats* stats) {
  if (stats) *stats = {};
  Call c(comm, opt, stats, {&q, &k, &v, &o, &lse});
  switch (opt.strategy) {
    case Strategy::ring: return ring_forward(c, q, k, v, o, lse);
    case Strategy::allgather: return allgather_forward(c, q, k, v, o, lse);
    case Strategy::ulysses: return ulysses_forward(c, q, k, v, o, lse);
  }
}

void dist_attention_backward(Communicator& comm, const TensorView& q, const TensorView& k, const TensorView& v,
                             const TensorView& o, const TensorView& lse, const TensorView& dout, const TensorView& dq,
                             const TensorView& dk, const TensorView& dv, const DistAttentionOptions& opt,
                             DistStats* stats) {
  if (stats) *stats = {};
  Call c(comm, opt, stats, {&q, &k, &v, &o, &lse, &dout, &dq, &dk, &dv});
  switch (opt.strategy) {
    case Strategy::ring: return ring_backward(c, q, k, v, o, lse, dout, dq, dk, dv);
    case Strategy::allgather: return allgather_backward(c, q, k, v, o, lse, dout, dq, dk, dv);
    case Strategy::ulysses: return ulysses_backward(c, q, k, v, o, lse, dout, dq, dk, dv);
  }
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
