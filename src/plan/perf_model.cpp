// The performance model of plan.h: what one training step, forward and decode
// step of a layout cost on a Hardware, following what src/model and src/parallel do.
#include <algorithm>
#include <cmath>

#include "ringattn/error.h"
#include "ringattn/plan.h"

namespace ringattn {

namespace {

double dbytes(DType t) { return static_cast<double>(dtype_size(t)); }

}  // namespace

namespace {

// Log-linear interpolation in x between the points, clamped at the ends.
double interpolate(const std::vector<std::pair<double, double>>& pts, double x) {
  if (x <= pts.front().first) return pts.front().second;
  for (size_t i = 1; i < pts.size(); ++i)
    if (x <= pts[i].first) {
      const double f = std::log(x / pts[i - 1].first) / std::log(pts[i].first / pts[i - 1].first);
      return pts[i - 1].second + f * (pts[i].second - pts[i - 1].second);
    }
  return pts.back().second;
}

const std::vector<std::pair<double, double>>& curve(
    const std::map<std::string, std::vector<std::pair<double, double>>>& m, DType dt, const std::string& hw,
    const char* what) {
  auto it = m.find(dtype_name(dt));
  check(it != m.end() && !it->second.empty(), "hardware '", hw, "' has no ", what, " rate for ", dtype_name(dt),
        ": add it to the hardware file (or calibrate)");
  return it->second;
}

}  // namespace

double Hardware::gemm_rate(DType dt, double m, double n, double k, bool backward) const {
  const bool own = backward && !gemm_backward.empty();
  return interpolate(curve(own ? gemm_backward : gemm, dt, name, own ? "GEMM backward" : "GEMM"), std::min({m, n, k}));
}

double Hardware::attention_rate(DType dt, bool backward, double head_dim) const {
  return interpolate(curve(backward ? attention_backward : attention_forward, dt, name,
                           backward ? "attention backward" : "attention forward"),
                     head_dim);
}

double Hardware::peak_rate(DType dt) const {
  auto it = peak.find(dtype_name(dt));
  return it == peak.end() ? 0 : it->second;
}

int Cluster::nodes_for(const Hardware& h) const {
  return nodes > 0 ? nodes : (world + h.devices_per_node - 1) / h.devices_per_node;
}

std::string Candidate::name() const {
  std::vector<std::string> parts;
  if (dp > 1) parts.push_back(cat("DP(", dp, ")"));
  if (sp > 1) {
    switch (strategy) {
      case Strategy::ring:
        parts.push_back(cat("RA+SP(", sp, ")"));
        break;
      case Strategy::ulysses:
        parts.push_back(cat("Ulysses(", sp, ")"));
        break;
      case Strategy::allgather:
        parts.push_back(cat("all-gather(", sp, ")"));
        break;
      case Strategy::hybrid:
        parts.push_back(cat("Ulysses(", ulysses, ") x ring(", sp / ulysses, ")"));
        break;
    }
  }
  if (tp > 1) parts.push_back(cat("TP(", tp, ")"));
  if (pp > 1) parts.push_back(cat("PP(", pp, ")"));
  if (parts.empty()) return "single device";
  std::string s = parts[0];
  for (size_t i = 1; i < parts.size(); ++i) s += " x " + parts[i];
  return s;
}

double forward_flops_per_layer_per_token_gemm(const ModelConfig& m) {
  const double D = static_cast<double>(m.d_model), C = static_cast<double>(m.qkv_width()),
               F = static_cast<double>(m.hidden()), A = static_cast<double>(m.heads * m.head_dim());
  const double Fin = (m.mlp == Mlp::swiglu ? 2 : 1) * F;  // W_in: [D, F], or SwiGLU's gate and up [D, 2F]
  return 2 * (D * C + A * D + D * Fin + F * D);
}

double forward_flops(const Workload& w) {
  const ModelConfig& m = w.model;
  const double L = static_cast<double>(w.seq), B = static_cast<double>(w.batch);
  const double pairs = busiest_fraction(Layout::contiguous, 1, w.seq, m.causal, m.window, w.cu_seqlens) * L * L;
  const double attn = 4 * B * static_cast<double>(m.heads) * pairs * static_cast<double>(m.head_dim());
  const double head = 2 * B * L * static_cast<double>(m.d_model) * static_cast<double>(m.vocab);  // LM head
  return static_cast<double>(m.layers) * (B * L * forward_flops_per_layer_per_token_gemm(m) + attn) + head;
}

namespace {

// The documents of cu_seqlens [n + 1] (empty: one document [0, L)).
std::vector<int64_t> document_bounds(int64_t L, std::span<const int32_t> cu) {
  if (cu.empty()) return {0, L};
  return std::vector<int64_t>(cu.begin(), cu.end());
}

}  // namespace

// Visible (query, key) pairs of the busiest rank over its (L/P) × L block. A
// query at offset t of its document sees min(t + 1, W) keys (causal; W = L
// without a window) or the whole document (not causal): closed-form sums over the
// documents' parts in each of the rank's intervals (contiguous: one, zigzag:
// two, doc-zigzag: two per document, doc-balanced: its whole documents and two
// per dealt one), or over the arithmetic progression of a striped shard in each
// document.
double busiest_fraction(Layout l, int P, int64_t L, bool causal, int64_t window, std::span<const int32_t> cu_seqlens) {
  const std::vector<int64_t> doc = document_bounds(L, cu_seqlens);
  const size_t n = doc.size() - 1;
  const double W = static_cast<double>(causal && window > 0 ? std::min(window, L) : L);
  auto run = [&](double a, double b) {  // Σ_{t=a}^{b−1} min(t + 1, W)
    const double m = std::clamp(W - 1, a, b);
    return (m * (m + 1) - a * (a + 1)) / 2 + (b - m) * W;
  };
  auto interval = [&](int64_t a, int64_t b) {  // the queries at positions [a, b)
    double pairs = 0;
    size_t d = static_cast<size_t>(std::upper_bound(doc.begin(), doc.end(), a) - doc.begin());
    for (d = d == 0 ? 0 : d - 1; d < n && doc[d] < b; ++d) {
      const int64_t s = doc[d], e = doc[d + 1], x0 = std::max(a, s) - s, x1 = std::min(b, e) - s;
      if (x1 > x0)
        pairs += causal ? run(static_cast<double>(x0), static_cast<double>(x1))
                        : static_cast<double>(x1 - x0) * static_cast<double>(e - s);
    }
    return pairs;
  };
  auto striped = [&](int r) {  // queries s + t of each document with s + t ≡ r (mod P)
    double pairs = 0;
    for (size_t d = 0; d < n; ++d) {
      const int64_t s = doc[d], len = doc[d + 1] - s, t0 = ((r - s) % P + P) % P;
      if (t0 >= len) continue;
      const double cnt = static_cast<double>((len - 1 - t0) / P + 1);
      if (!causal) {
        pairs += cnt * static_cast<double>(len);
        continue;
      }
      // the first K queries see t + 1 < W keys, the others W
      const double K = W - 2 < t0 ? 0 : std::min(cnt, std::floor((W - 2 - static_cast<double>(t0)) / P) + 1);
      pairs += K * static_cast<double>(t0 + 1) + P * K * (K - 1) / 2 + (cnt - K) * W;
    }
    return pairs;
  };
  auto cut = [&](int64_t i, int64_t parts) { return i * L / parts; };
  auto chunks = [&](size_t d, int r) {  // zigzag's two chunks of document d
    const int64_t s = doc[d], len = doc[d + 1] - s;
    double pairs = 0;
    for (int64_t c : {static_cast<int64_t>(r), 2 * static_cast<int64_t>(P) - 1 - r})
      pairs += interval(s + c * len / (2 * P), s + (c + 1) * len / (2 * P));
    return pairs;
  };
  const std::vector<int> owner =
      l == Layout::doc_balanced && !cu_seqlens.empty() ? document_owners(cu_seqlens, P) : std::vector<int>(n, -1);
  double busiest = 0;
  for (int r = 0; r < P; ++r) {
    double pairs = 0;
    switch (l) {
      case Layout::contiguous:
        pairs = interval(cut(r, P), cut(r + 1, P));
        break;
      case Layout::zigzag:
        pairs = interval(cut(r, 2 * P), cut(r + 1, 2 * P)) + interval(cut(2 * P - 1 - r, 2 * P), cut(2 * P - r, 2 * P));
        break;
      case Layout::striped:
        pairs = striped(r);
        break;
      case Layout::doc_zigzag:
      case Layout::doc_balanced:
        for (size_t d = 0; d < n; ++d)
          pairs += owner[d] < 0 ? chunks(d, r) : owner[d] == r ? interval(doc[d], doc[d + 1]) : 0;
        break;
    }
    busiest = std::max(busiest, pairs);
  }
  return busiest / (static_cast<double>(L) / P * static_cast<double>(L));
}

double pipeline_bubble(int stages, int micro_batches) {
  return static_cast<double>(stages - 1) / (micro_batches + stages - 1);
}

double cost_send(const LinkSpec& link, double bytes) { return link.latency_s + bytes / link.bandwidth; }

double cost_all_reduce(const LinkSpec& link, int g, double bytes) {
  if (g <= 1) return 0;
  return 2.0 * (g - 1) * link.latency_s + 2.0 * (g - 1) / g * bytes / link.bandwidth;
}

double cost_all_gather(const LinkSpec& link, int g, double total_bytes) {
  if (g <= 1) return 0;
  return (g - 1) * link.latency_s + static_cast<double>(g - 1) / g * total_bytes / link.bandwidth;
}

double cost_all_to_all(const LinkSpec& link, int g, double total_bytes) {
  return cost_all_gather(link, g, total_bytes);
}
double cost_reduce_scatter(const LinkSpec& link, int g, double total_bytes) {
  return cost_all_gather(link, g, total_bytes);
}

namespace {

// A group of the layout: its size and the block of consecutive ranks it lives in
// (size × the stride between members; Mesh's order puts tp innermost, then sp,
// pp, dp). Its traffic stays inside a node when the blocks tile the nodes.
struct Group {
  int size = 1;
  int64_t block = 1;
};

const LinkSpec& link_of(const Group& g, const Hardware& h, int ranks_per_node) {
  const bool within = g.block <= ranks_per_node && ranks_per_node % g.block == 0;
  return g.size <= 1 || within ? h.intra_node : h.inter_node;
}

// Accumulates one step's time, split into compute and exposed/hidden transfers.
struct Clock {
  double compute = 0, comm = 0, hidden = 0;
  double waits = 0;  // blocking waits for a peer (collectives, ring stages, hops)
  double bytes = 0, intra = 0, inter = 0;
  double total() const { return compute + comm - hidden; }
  void traffic(double b, bool inter_link) { bytes += b, (inter_link ? inter : intra) += b; }
};

struct Cost {
  const Workload& w;
  const Candidate& c;
  const Hardware& h;
  double share = 1;  // > 1: ranks time-share a device (applied by predict, not here)
  int ranks_per_node = 1;
  DType dt;
  double e, ab, L, D, dh, Hl, Hkvl, Fl, Fin, A, C, Ls, V, Vl;  // Vl: the widest TP rank's vocabulary rows
  double Lb;      // the busiest SP rank's tokens (shards may differ by a token or two)
  int64_t W = 0;  // the sliding window of every layer (0: none)
  Group tp_g, sp_g, uly_g, ring_g, pp_g, replica_g;  // replica: same pp and tp index (sp members, dp replicas)

  Cost(const Workload& w_, const Candidate& c_, const Hardware& h_, const Cluster& cl) : w(w_), c(c_), h(h_) {
    const ModelConfig& m = w.model;
    dt = m.dtype;
    e = dbytes(dt), ab = dbytes(w.activations);
    L = static_cast<double>(w.seq), D = static_cast<double>(m.d_model), dh = static_cast<double>(m.head_dim());
    Lb = 0;
    for (int r = 0; r < c.sp; ++r)
      Lb = std::max(Lb, static_cast<double>(shard_length(c.layout, w.seq, c.sp, r, w.cu_seqlens)));
    Hl = static_cast<double>(m.heads / c.tp), Hkvl = static_cast<double>(m.kv() / c.tp);
    Fl = static_cast<double>(m.hidden() / c.tp), A = Hl * dh, C = (Hl + 2 * Hkvl) * dh;
    Fin = (m.mlp == Mlp::swiglu ? 2 : 1) * Fl, V = static_cast<double>(m.vocab);
    Vl = std::ceil(V / c.tp);
    Ls = static_cast<double>(m.layers / c.pp);
    check(m.window == 0 || std::all_of(m.window_layers.begin(), m.window_layers.end(), [](bool b) { return b; }),
          "the performance model takes a sliding window on every layer or none");
    W = m.window;
    const int nodes = cl.nodes_for(h);
    ranks_per_node = (cl.world + nodes - 1) / nodes;
    share = std::max(1.0, static_cast<double>(ranks_per_node) / h.devices_per_node);
    const int64_t spt = static_cast<int64_t>(c.sp) * c.tp;
    tp_g = {c.tp, c.tp}, sp_g = {c.sp, spt}, pp_g = {c.pp, spt * c.pp};
    uly_g = {c.ulysses, static_cast<int64_t>(c.ulysses) * c.tp}, ring_g = {c.sp / c.ulysses, spt};
    if (c.strategy != Strategy::hybrid) uly_g = sp_g, ring_g = sp_g;
    replica_g = {c.dp * c.sp, c.dp > 1 ? spt * c.pp * c.dp : spt};
  }

  const LinkSpec& link(const Group& g) const { return link_of(g, h, ranks_per_node); }
  bool inter(const Group& g) const { return &link(g) == &h.inter_node; }
  // A linear layer [m, k] x [k, n]: forward 2·m·k·n FLOPs, backward (dx, dW) twice that.
  double gemm_s(double m, double k, double n, bool bwd = false) const {
    return (bwd ? 4 : 2) * m * k * n / h.gemm_rate(dt, m, n, k, bwd);
  }
  double elem_s(double bytes) const { return bytes / h.elementwise_bandwidth; }
  double ops_s(double n) const { return n * h.op_overhead_s; }
  double gelu_s(double elements, bool bwd) const {
    const double rate = bwd ? h.gelu_backward_rate : h.gelu_forward_rate;
    return rate > 0 ? elements / rate : elements * (bwd ? 12 : 8) / h.elementwise_bandwidth;
  }
  double attn_s(double flops, bool bwd) const {
    return flops / (h.attention_rate(dt, bwd, dh) * (w.model.causal ? h.causal_efficiency : 1.0));
  }
  // Busiest-rank attention FLOPs of Bm sequences, Hh heads, Lq queries against Lk
  // keys (the fraction of visible pairs given).
  double attn_flops(double Bm, double Hh, double Lq, double Lk, double frac) const {
    return 4 * Bm * Hh * Lq * Lk * dh * frac;
  }
  double full_frac() const { return busiest_fraction(Layout::contiguous, 1, w.seq, w.model.causal, W, w.cu_seqlens); }
  double layout_frac(int P) const { return busiest_fraction(c.layout, P, w.seq, w.model.causal, W, w.cu_seqlens); }
  // How far the ring of R members carries a block, and how many of its keys
  // (the ring sends what its receivers see). On contiguous causal shards a
  // block's keys are seen further on by the queries of the document that
  // crosses the shard's end — all of it, or its last W − 1 keys under a window —
  // up to where that document (or the window) ends: the most hops and keys over
  // the members. On doc-balanced shards only the dealt documents span members:
  // with any, a block's part from its first dealt token to its last goes the
  // whole ring (what the ring sends), and without, nothing moves. Other layouts
  // and full attention go the whole ring with whole blocks: modelled so, an upper
  // bound (the ring trims zigzag's and striped blocks, and documents that span no
  // shard edge shorten it).
  struct Trip {
    int hops;
    double keys;
  };
  Trip ring_trip(int R) const {
    const int64_t Lt = w.seq;
    if (c.layout == Layout::doc_balanced && !w.cu_seqlens.empty()) {
      const std::vector<int> owner = document_owners(w.cu_seqlens, R);
      Trip t{0, 0};
      for (int r = 0; r < R; ++r) {
        const std::vector<int64_t> pos = shard_positions(c.layout, Lt, R, r, w.cu_seqlens);
        int64_t lo = -1, hi = -1;
        for (size_t i = 0; i < pos.size(); ++i) {
          const auto d = std::upper_bound(w.cu_seqlens.begin(), w.cu_seqlens.end(), pos[i]) - w.cu_seqlens.begin() - 1;
          if (owner[static_cast<size_t>(d)] >= 0) continue;
          if (lo < 0) lo = static_cast<int64_t>(i);
          hi = static_cast<int64_t>(i);
        }
        if (lo >= 0) t.hops = R - 1, t.keys = std::max(t.keys, static_cast<double>(hi - lo + 1));
      }
      return t;
    }
    if (c.layout != Layout::contiguous || !w.model.causal || (W <= 0 && w.cu_seqlens.empty()))
      return {R - 1, static_cast<double>(Lt) / R};
    const std::vector<int64_t> doc = document_bounds(Lt, w.cu_seqlens);
    const int64_t reach = W > 0 ? W - 1 : Lt;  // a key at j is seen up to j + reach
    auto member_of = [&](int64_t i) {          // the member holding position i
      return static_cast<int>(std::min<int64_t>(R - 1, ((i + 1) * R - 1) / Lt));
    };
    Trip t{0, 0};
    for (int r = 0; r + 1 < R; ++r) {
      const int64_t a = r * Lt / R, b = (r + 1) * Lt / R;  // the member's [a, b)
      const size_t d = static_cast<size_t>(std::upper_bound(doc.begin(), doc.end(), b - 1) - doc.begin()) - 1;
      const int64_t end = std::min(doc[d + 1], b - 1 + reach + 1);  // the crossing document's seen end
      if (end <= b) continue;
      t.hops = std::max(t.hops, member_of(end - 1) - r);
      t.keys = std::max(t.keys, static_cast<double>(std::min(b - std::max(a, doc[d]), reach)));
    }
    return t;
  }

  // The ring over group g of R members (each holding Lr tokens and Hh heads):
  // R stages, the K/V block (and in the backward its fp32 dK/dV) in flight
  // during each stage's attention; the accumulators' last hop home is exposed.
  void ring(Clock& k, const Group& g, double Bm, double Lr, double Hh, double Hkvh, double frac, bool bwd) const {
    const int R = g.size;
    const Trip trip = ring_trip(R);
    const int hops = trip.hops;  // stages computed: hops + 1
    const double flops = attn_flops(Bm, Hh, Lr, Lr * R, frac) * (bwd ? 2.5 : 1.0);
    const double stage = attn_s(flops, bwd) / (hops + 1);
    const double moving = Bm * trip.keys * Hkvh * dh, kv = 2 * moving * e, dkv = 2 * moving * 4;
    const LinkSpec& l = link(g);
    const double merge = bwd ? 0 : elem_s(hops * 4 * Bm * Lr * Hh * dh * 4);
    k.compute += (hops + 1) * stage + merge + ops_s(2.0 * (hops + 1));
    if (hops == 0) return;
    const double per_stage = bwd ? kv + dkv : kv;
    for (int t = 0; t < hops; ++t) {
      const double x = cost_send(l, per_stage);
      k.comm += x, k.waits += 1;
      if (l.overlaps_compute) k.hidden += std::min(x, stage);
    }
    if (bwd) k.comm += cost_send(l, dkv), k.waits += 1;  // home hop
    k.traffic(hops * per_stage + (bwd ? dkv : 0), inter(g));
  }

  // An un-overlapped collective.
  void collective(Clock& k, const Group& g, double t, double bytes) const {
    if (g.size <= 1) return;
    k.comm += t, k.waits += 1;
    k.traffic(bytes, inter(g));
  }
  void all_to_all(Clock& k, const Group& g, double total) const {
    collective(k, g, cost_all_to_all(link(g), g.size, total), total * (g.size - 1) / g.size);
  }
  void all_reduce(Clock& k, const Group& g, double bytes) const {
    collective(k, g, cost_all_reduce(link(g), g.size, bytes), 2.0 * (g.size - 1) / g.size * bytes);
  }

  // One layer's attention, forward or backward, for Bm sequences on this device:
  // the busiest rank's visible pairs (busiest_fraction, relative to L/sp queries)
  // and its tokens' bytes.
  void attention(Clock& k, double Bm, bool bwd) const {
    const double Ll = L / c.sp, mult = bwd ? 2.5 : 1.0;
    if (c.sp == 1) {
      k.compute += attn_s(attn_flops(Bm, Hl, L, L, full_frac()) * mult, bwd) + ops_s(1);
      return;
    }
    const double qkv_b = Bm * Lb * C * e, o_b = Bm * Lb * A * ab, lse_b = Bm * Lb * Hl * 4;
    switch (c.strategy) {
      case Strategy::ring:
        ring(k, sp_g, Bm, Ll, Hl, Hkvl, layout_frac(c.sp), bwd);
        break;
      case Strategy::allgather: {
        // K and V gathered one after the other (each: own shard copied out, the
        // rank-ordered blocks copied into the full sequence, read and write).
        const double kv_all = 2 * Bm * L * Hkvl * dh;
        for (int kv = 0; kv < 2; ++kv)
          collective(k, sp_g, cost_all_gather(link(sp_g), c.sp, kv_all / 2 * e), kv_all / 2 * e * (c.sp - 1) / c.sp);
        k.compute += elem_s(2 * kv_all * e * (1 + 1.0 / c.sp)) + ops_s(4);
        k.compute += attn_s(attn_flops(Bm, Hl, Ll, L, layout_frac(c.sp)) * mult, bwd) + ops_s(1);
        if (bwd) {  // reduce-scatter of dK, dV: pack P blocks, all-to-all, sum P blocks, copy out (fp32)
          all_to_all(k, sp_g, kv_all * 4);
          k.compute += elem_s(kv_all * 4 * (2 + 1 + 2.0 / c.sp));
        }
        break;
      }
      case Strategy::ulysses:
      case Strategy::hybrid: {
        const int U = uly_g.size;
        // to heads: q, k, v (+ o, dO, lse in the backward); back: o, lse (dq, dk, dv)
        all_to_all(k, uly_g, qkv_b + (bwd ? 2 * o_b + lse_b : 0));
        if (c.strategy == Strategy::ulysses)
          k.compute += attn_s(attn_flops(Bm, Hl / U, L, L, full_frac()) * mult, bwd) + ops_s(1);
        else
          ring(k, ring_g, Bm, Ll * U, Hl / U, Hkvl / U, layout_frac(ring_g.size), bwd);
        all_to_all(k, uly_g, bwd ? Bm * Lb * C * ab : o_b + lse_b);
        break;
      }
    }
  }

  // One layer forward or backward on Bm sequences (N tokens here).
  void layer(Clock& k, double Bm, bool bwd) const {
    const double N = Bm * Lb, x = bwd ? 2 : 1;
    k.compute += gemm_s(N, D, C, bwd) + gemm_s(N, A, D, bwd) + gemm_s(N, D, Fin, bwd) + gemm_s(N, Fl, D, bwd);
    // fp32 passes over [N, D]: LayerNorms (read x, write y) and residual adds (2
    // reads, 1 write), under TP the bias adds after the all-reduces; the backward
    // reads x, dy and the saved statistics, writes dx, and sums the bias grads.
    // (The linear layers' bias and bf16 operand rounding are in the GEMM rates,
    // which are measured through the same linear_forward/backward.)
    double bytes = ab * N * D * (bwd ? 20 : 10);
    if (c.tp > 1) bytes += 4 * N * ab * D;
    if (dt != DType::f32 && !bwd) bytes += 6 * N * C;  // q, k, v rounded to bf16 once
    k.compute += elem_s(bytes) + gelu_s(N * Fl, bwd) + ops_s(12 * x);
    attention(k, Bm, bwd);
    for (int i = 0; i < 2; ++i) all_reduce(k, tp_g, N * D * ab);  // W_o and W_out outputs / W_qkv and W_in input grads
  }

  // A language model's ends for one micro-batch of N tokens here: the embedding
  // gather, the final norm, the LM head GEMM and the softmax cross-entropy over
  // [N, Vl] (fp32, in row chunks of 256), forward or backward (dx and dW of the
  // head). Under TP each rank holds Vl vocabulary rows: the embedding is summed
  // over the group (fp32), each chunk's softmax max and sums are reduced over it,
  // and the backward sums dL/dy's parts.
  void lm_ends(Clock& k, double N, bool bwd) const {
    if (V == 0) return;
    k.compute += gemm_s(N, D, Vl, bwd) + elem_s(N * Vl * 8) + elem_s(ab * N * D * (bwd ? 10 : 6));
    k.compute += ops_s(bwd ? 6 : 4);
    if (c.tp == 1) return;
    const double chunks = std::ceil(N / 256), rows = std::min(N, 256.0);
    all_reduce(k, tp_g, N * D * 4);  // forward: the embedding; backward: dL/dy
    for (double i = 0; i < chunks; ++i) all_reduce(k, tp_g, rows * 8), all_reduce(k, tp_g, rows * 16);
  }
  // The embedding and head matrices the busiest stage holds: both on one stage
  // (one when tied), else the embedding on the first and the head (or the tied
  // copy) on the last; gpt2's learned positions beside the embedding.
  double lm_params() const {
    const ModelConfig& m = w.model;
    if (V == 0) return 0;
    const double pos = static_cast<double>(m.positions) * D, table = Vl * D;
    return c.pp == 1 ? (m.tied ? 1 : 2) * table + pos + D : table + pos + D;
  }
  // This device's parameters: its layers' norms, biases and weight slices, and a
  // language model's embedding / head.
  double params_local() const {
    return (4 * D + D * C + C + A * D + 2 * D + D * Fin + Fin + Fl * D) * Ls + lm_params();
  }

  // Sequences per micro-batch on this replica.
  double Bm() const { return static_cast<double>(w.batch) / c.dp / c.micro_batches; }
};

}  // namespace

Prediction predict(const Workload& w, const Candidate& c, const Hardware& h, const Cluster& cl) {
  Prediction p;
  p.c = c;
  const ModelConfig& m = w.model;
  const int world = c.dp * c.pp * c.sp * c.tp;
  check(world == cl.world, "layout ", c.name(), " has ", world, " ranks, the cluster ", cl.world);
  auto invalid = [&](std::string why) {
    p.invalid = std::move(why);
    return p;
  };
  if (m.heads % c.tp || m.kv() % c.tp || m.hidden() % c.tp)
    return invalid(cat("heads/kv-heads/MLP not divisible by tp=", c.tp));
  if (m.layers % c.pp) return invalid(cat("layers not divisible by pp=", c.pp));
  if (w.batch % c.dp) return invalid(cat("batch not divisible by dp=", c.dp));
  if ((w.batch / c.dp) % c.micro_batches)
    return invalid(cat("batch/dp not divisible by ", c.micro_batches, " micro-batches"));
  try {  // any split that gives every SP rank a token (shards may differ by a token or two)
    check_layout(c.layout, w.seq, c.sp, w.cu_seqlens);
  } catch (const Error& e) {
    return invalid(e.what());
  }
  if (c.sp > 1 && c.strategy == Strategy::ulysses && ((m.heads / c.tp) % c.sp || (m.kv() / c.tp) % c.sp))
    return invalid(cat("heads/tp not divisible by sp=", c.sp));
  if (c.strategy == Strategy::hybrid &&
      (c.ulysses < 2 || c.sp % c.ulysses || (m.heads / c.tp) % c.ulysses || (m.kv() / c.tp) % c.ulysses))
    return invalid(cat("hybrid needs ulysses | sp and ulysses | heads/tp (ulysses=", c.ulysses, ")"));

  const Cost md(w, c, h, cl);
  const double Bm = md.Bm(), M = c.micro_batches, S = c.pp;
  const double Nm = Bm * md.Lb;  // tokens of one micro-batch here
  const bool pp_inter = md.inter(md.pp_g);
  const LinkSpec& pp_link = md.link(md.pp_g);

  // One micro-batch through this stage's layers, forward and backward.
  Clock f, b;
  for (int l = 0; l < md.Ls; ++l) md.layer(f, Bm, false), md.layer(b, Bm, true);
  f.compute += md.elem_s(8 * Nm * md.D);  // the stage's input copy
  // A language model's head: on the last stage, once per micro-batch (not in the
  // pipeline's bubble, which the other stages' slots fill).
  Clock hf, hb;
  md.lm_ends(hf, Nm, false), md.lm_ends(hb, Nm, true);
  const double act_b = Nm * md.D * md.ab;
  const double hop = S > 1 ? cost_send(pp_link, act_b) : 0;
  // 1F1B: the bubble is (p−1) micro-batch slots; a hop per slot boundary.
  const double slots = M + S - 1;
  // Ranks that time-share a device (share > 1) take the longer of the critical
  // path at full speed and their device's total work: a pipeline stage in its
  // bubble leaves the device to the others.
  const double share = md.share;
  // Time-shared, every blocking wait may find its peer descheduled: it costs the
  // hardware's timeshare_wait_s on top (hops: one per micro-batch and direction).
  const double tau = share > 1 ? h.timeshare_wait_s : 0, hop_waits = S > 1 ? M : 0;
  p.forward_s = std::max(slots * (f.total() + hop) + M * hf.total(), share * M * (f.total() + hf.total())) +
                tau * (M * f.waits + hop_waits);
  Clock step;
  const double params = md.params_local();
  md.all_reduce(step, md.replica_g, params * 4);                                           // the weight gradients
  step.compute += md.elem_s(params * (32 + (md.dt != DType::f32 ? 6 : 0))) + md.ops_s(3);  // zero grads, AdamW
  const double head = M * (hf.total() + hb.total());
  p.train_s = std::max(slots * (f.total() + b.total() + 2 * hop) + head + step.total(),
                       share * (M * (f.total() + b.total()) + head + step.total())) +
              tau * (M * (f.waits + b.waits) + 2 * hop_waits + step.waits);

  const double tokens = static_cast<double>(w.batch * w.seq);
  p.forward_tokens_per_s = tokens / p.forward_s;
  p.train_tokens_per_s = tokens / p.train_s;
  const double fl = forward_flops(w), peak = h.peak_rate(md.dt) * world;
  if (peak > 0) p.forward_mfu = fl / p.forward_s / peak, p.train_mfu = 3 * fl / p.train_s / peak;

  const double steps = M;  // micro-batches per step per stage
  p.forward_bytes_sent = steps * (f.bytes + (S > 1 ? act_b : 0));
  p.train_bytes_sent = steps * (f.bytes + b.bytes + (S > 1 ? 2 * act_b : 0)) + step.bytes;
  p.inter_bytes = steps * (f.inter + b.inter + (S > 1 && pp_inter ? 2 * act_b : 0)) + step.inter;
  p.intra_bytes = p.train_bytes_sent - p.inter_bytes;
  p.comm_s = slots * (f.comm + b.comm + 2 * hop) + step.comm;
  p.comm_hidden_s = slots * (f.hidden + b.hidden);

  // Memory per device (the busiest stage, 0, holds min(m, p) micro-batches in flight).
  const double D = md.D, A = md.A, C = md.C, Fl = md.Fl, Hl = md.Hl, Hkvl = md.Hkvl, dh = md.dh;
  const double weights = params * (16 + (md.dt != DType::f32 ? 2 : 0));
  const double ab = md.ab, act_token = ab * (4 * D + A + 2 * Fl) + 4 * (4 + Hl) + C * md.e;
  const double in_flight = S > 1 ? std::min(M, S) : 1;
  const double kept = md.Ls * Nm * act_token * in_flight;
  const double inputs = 2 * Nm * D * ab * in_flight + 2 * Nm * D * ab;  // x, target in flight; y, dy
  const double bwd_bufs = ab * Nm * (2 * Fl + 4 * D + A + C);
  double attn_bufs = 0;
  const double kv_local = 2 * Nm * Hkvl * dh;
  if (c.sp > 1) switch (c.strategy) {
      case Strategy::ring:
        attn_bufs = kv_local * (2 * md.e + 3 * 4);
        break;
      case Strategy::allgather:
        attn_bufs = kv_local * c.sp * (md.e + 4);
        break;
      case Strategy::ulysses:
        attn_bufs = Nm * (C * (md.e + 4) + 2 * A * 4 + 2 * Hl * 4);
        break;
      case Strategy::hybrid:
        attn_bufs = Nm * (C * (md.e + 4) + 2 * A * 4 + 2 * Hl * 4) + kv_local * (2 * md.e + 3 * 4);
        break;
    }
  p.peak_train_bytes = weights + kept + inputs + bwd_bufs + attn_bufs;
  p.capacity_bytes = h.memory_bytes / md.share;
  p.fits_train = p.peak_train_bytes <= p.capacity_bytes;

  // Decode: one new token for each of the replica's B/dp sequences against a cache of
  // seq tokens sharded over sp (by sequence), tp (by head) and pp (by layer).
  const double Bd = static_cast<double>(w.batch) / c.dp;
  const double cache_e = md.e;
  // A window keeps a ring buffer of W + ⌈W/sp⌉ entries per shard (inference.h).
  const double entries = md.W > 0 ? std::min(md.Lb, static_cast<double>(md.W + (md.W - 1 + c.sp) / c.sp)) : md.Lb;
  p.kv_cache_bytes = Bd * entries * Hkvl * dh * 2 * cache_e * md.Ls;
  const double layer_params = params - md.lm_params();
  const double weight_read = layer_params / md.Ls * (md.dt == DType::f32 ? 4 : 2);
  double stage_s = 0, decode_bytes = 0, decode_waits = S - 1;
  const double decode_bw = h.decode_bandwidth;
  // Weights every rank of the node re-reads each step: from the last-level cache
  // while they all fit in it and no rank shares its device (the cached rate is
  // measured one rank per device; ranks taking turns on a core evict each
  // other's), else from memory.
  const bool weights_cached =
      h.cached_weight_bandwidth > 0 && md.share == 1 && weight_read * md.Ls * md.ranks_per_node <= h.llc_bytes;
  const double weight_bw = weights_cached ? h.cached_weight_bandwidth : decode_bw;
  for (int l = 0; l < md.Ls; ++l) {
    const double flops = 2 * Bd * (layer_params / md.Ls);
    stage_s += std::max(flops / h.gemm_rate(md.dt, 1e9, 1e9, 1e9), weight_read / weight_bw);
    stage_s += p.kv_cache_bytes / md.Ls / decode_bw + md.ops_s(14);
    if (c.sp > 1) {  // the LSE merge: max, then sums of B·H·(d+1)
      stage_s += cost_all_reduce(md.link(md.sp_g), c.sp, Bd * Hl * 4) +
                 cost_all_reduce(md.link(md.sp_g), c.sp, Bd * Hl * (dh + 1) * 4);
      decode_bytes += 2.0 * (c.sp - 1) / c.sp * Bd * Hl * (dh + 2) * 4;
      decode_waits += 2;
    }
    if (c.tp > 1) {
      stage_s += 2 * cost_all_reduce(md.link(md.tp_g), c.tp, Bd * D * ab);
      decode_bytes += 2 * 2.0 * (c.tp - 1) / c.tp * Bd * D * ab;
      decode_waits += 2;
    }
  }
  // A language model's head on the last stage: [Bd, D] x [D, Vl], the fp32 head
  // rows read once; under TP each rank's greedy candidate gathered (a flag and a
  // (logit, id) of 16 bytes each per sequence: sample_split) and, on the first
  // stage, the embedding summed over the group.
  double head_s = 0;
  if (md.V > 0) {
    head_s = std::max(2 * Bd * D * md.Vl / h.gemm_rate(md.dt, 1e9, 1e9, 1e9), 4 * D * md.Vl / decode_bw);
    if (c.tp > 1) {
      const LinkSpec& tp_link = md.link(md.tp_g);
      head_s += cost_all_gather(tp_link, c.tp, Bd * 32 * c.tp) + cost_all_reduce(tp_link, c.tp, Bd * D * 4);
      decode_bytes += (c.tp - 1.0) * Bd * 32 + 2.0 * (c.tp - 1) / c.tp * Bd * D * 4;
      decode_waits += 2;
    }
  }
  p.decode_step_s =
      std::max(S * stage_s + head_s + (S - 1) * cost_send(pp_link, Bd * D * ab), share * (stage_s + head_s)) +
      tau * decode_waits;
  p.decode_bytes_sent = decode_bytes + (S > 1 ? Bd * D * ab : 0);
  p.peak_inference_bytes =
      params * (md.dt == DType::f32 ? 4 : 6) + p.kv_cache_bytes + Nm * (act_token + ab * (2 * Fl + C)) + attn_bufs / 2;
  p.fits_inference = p.peak_inference_bytes <= p.capacity_bytes;
  return p;
}

namespace {

std::vector<int> divisors(int64_t n, int64_t cap) {
  std::vector<int> d;
  for (int64_t i = 1; i <= std::min(n, cap); ++i)
    if (n % i == 0) d.push_back(static_cast<int>(i));
  return d;
}

}  // namespace

Prediction predict_best_micro_batches(const Workload& w, Candidate c, const Hardware& h, const Cluster& cl) {
  if (w.batch % c.dp) return c.micro_batches = 1, predict(w, c, h, cl);  // invalid: says why
  Prediction best;
  bool have = false;
  for (int m : divisors(w.batch / c.dp, w.batch / c.dp)) {
    c.micro_batches = m;
    Prediction p = predict(w, c, h, cl);
    if (!p.invalid.empty()) return p;  // invalid for a reason the micro-batches do not change
    const bool better = !have ||
                        (p.fits_train && (!best.fits_train || p.train_tokens_per_s > best.train_tokens_per_s)) ||
                        (!p.fits_train && !best.fits_train && p.peak_train_bytes < best.peak_train_bytes);
    if (better) best = p, have = true;
  }
  return best;
}

std::vector<Prediction> plan(const Workload& w, const Hardware& h, const Cluster& cl, bool keep_invalid) {
  check(cl.world >= 1, "the world size must be >= 1, got ", cl.world);
  std::vector<Prediction> out;
  const ModelConfig& m = w.model;
  for (int dp : divisors(cl.world, cl.world))
    for (int pp : divisors(cl.world / dp, cl.world))
      for (int tp : divisors(cl.world / dp / pp, cl.world)) {
        const int sp = cl.world / dp / pp / tp;
        std::vector<Candidate> attn;
        Candidate base;
        base.dp = dp, base.pp = pp, base.tp = tp, base.sp = sp;
        if (sp == 1) {
          attn.push_back(base);
        } else {
          for (Layout l : {Layout::zigzag, Layout::striped, Layout::contiguous}) {
            if (!m.causal && w.cu_seqlens.empty() && l != Layout::zigzag) continue;  // every layout is balanced
            Candidate r = base;
            r.strategy = Strategy::ring, r.layout = l;
            attn.push_back(r);
          }
          for (Strategy s : {Strategy::ulysses, Strategy::allgather}) {
            Candidate r = base;
            r.strategy = s;
            attn.push_back(r);
          }
          for (int u : divisors(sp, sp / 2))
            if (u > 1) {
              Candidate r = base;
              r.strategy = Strategy::hybrid, r.ulysses = u;
              attn.push_back(r);
            }
        }
        for (const Candidate& a : attn) {
          Prediction best = predict_best_micro_batches(w, a, h, cl);
          if (best.invalid.empty() || keep_invalid) out.push_back(std::move(best));
        }
      }
  std::stable_sort(out.begin(), out.end(), [](const Prediction& a, const Prediction& b) {
    if (a.invalid.empty() != b.invalid.empty()) return a.invalid.empty();
    if (a.fits_train != b.fits_train) return a.fits_train;
    return a.train_tokens_per_s > b.train_tokens_per_s;
  });
  return out;
}

}  // namespace ringattn
