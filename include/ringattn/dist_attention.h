// Exact attention over a sequence split across the ranks of a Communicator.
//
// Every rank passes its own shard (layout of layout.h, global length L = P·local):
//   q: [B, L/P, H, d]   k, v: [B, L/P, Hkv, d]   o: [B, L/P, H, d]   lse: [B, H, L/P] fp32
// and gets the rows of the full attention result that belong to its queries.
// The mask of attention.h applies to global positions: causal, a sliding window,
// and packed documents given by cu_seqlens over the whole sequence (the same on
// every rank). A block with no visible pair is never computed (stages_skipped).
//
// Strategies:
//   ring      RA+SP: P stages; at stage t rank p attends to the K/V block of rank
//             (p − t) mod P while the next block is in flight; LSE merge in fp32.
//             Backward: K, V travel with their dK, dV accumulators, which arrive
//             home after the last stage.
//   allgather all-gather K/V (and their positions), then local attention;
//             backward reduce-scatters dK/dV to their owners.
//   ulysses   all-to-all from sequence-sharded to head-sharded, local attention on
//             the full sequence for H/P heads, all-to-all back (H and Hkv must be
//             divisible by P).
//   hybrid    Ulysses × ring (2D sequence parallelism): P = U·R ranks, rank
//             r·U + u is member u of Ulysses group r and member r of ring group u.
//             All-to-all inside the Ulysses group (U·L/P tokens, H/U heads), the
//             ring over the ring group, all-to-all back. The all-to-all stays in a
//             small (e.g. intra-node) group; the ring crosses the slower links.
#pragma once
#include <limits>
#include <span>
#include <string>

#include "ringattn/attention.h"
#include "ringattn/comm.h"
#include "ringattn/device.h"
#include "ringattn/layout.h"

namespace ringattn {

enum class Strategy { ring, allgather, ulysses, hybrid };
const char* strategy_name(Strategy s);
Strategy parse_strategy(const std::string& s);

struct DistAttentionOptions {
  Strategy strategy = Strategy::ring;
  Layout layout = Layout::contiguous;
  float scale = std::numeric_limits<float>::quiet_NaN();  // NaN: 1/sqrt(d)
  bool causal = false;
  int64_t window_left = -1, window_right = -1;  // attention.h's window; -1: unbounded
  std::span<const int32_t> cu_seqlens;          // [n_docs + 1] over the global sequence; empty: one document
  int threads = 0;
  const Isa* isa = nullptr;
  bool overlap = true;  // poll the communicator between compute tiles
  // Where q, k, v, o, lse (and the gradients) live and the kernels run; nullptr:
  // the host. A CUDA device needs a communicator for its memory (cuda.h) and
  // the ring strategy.
  Device* device = nullptr;
  // hybrid only: the two sub-groups of the communicator (Mesh builds them).
  Communicator* ulysses_group = nullptr;
  Communicator* ring_group = nullptr;
};

// Per-call measurements on this rank.
struct DistStats {
  double seconds = 0;          // the whole call
  double compute_seconds = 0;  // inside the local kernels and merges
  double wait_seconds = 0;     // blocked on communication
  int64_t bytes_sent = 0, bytes_received = 0;
  int stages_skipped = 0;  // ring stages whose block has no visible pair (causal, window, documents)
};

void dist_attention_forward(Communicator& comm, const TensorView& q, const TensorView& k, const TensorView& v,
                            const TensorView& o, const TensorView& lse, const DistAttentionOptions& opt,
                            DistStats* stats = nullptr);

// dq, dk, dv of this rank's shards, given o and lse from dist_attention_forward.
void dist_attention_backward(Communicator& comm, const TensorView& q, const TensorView& k, const TensorView& v,
                             const TensorView& o, const TensorView& lse, const TensorView& dout, const TensorView& dq,
                             const TensorView& dk, const TensorView& dv, const DistAttentionOptions& opt,
                             DistStats* stats = nullptr);

// The inverse of shard() over the communicator: every rank's `local` shard (its
// layout shard of dimension seq_dim, of any length the layout gives it) written
// into `full` at its places, on every rank (one all-gather of shards padded to
// the longest). cu: the documents, for the doc-zigzag layout.
void gather_shards(Communicator& comm, const TensorView& local, const TensorView& full, Layout l, int seq_dim = 1,
                   std::span<const int32_t> cu = {});

// Exact merge of every rank's partial result for the same queries (decoding
// against a sequence-sharded KV cache, docs/design.md §8, the §4 merge over P parts at once):
//   lse = m + log Σ_p e^{lse_p − m},  o = Σ_p e^{lse_p − m}·o_p / Σ_p e^{lse_p − m},  m = max_p lse_p
// in place on every rank by two all-reduces (the max of lse, then the sums); the
// cache itself never moves. o [B, Lq, H, d] and lse [B, H, Lq], fp32 contiguous,
// the same shapes on every rank (the caller checks). Rows that no rank saw a key
// for stay o = 0, lse = −inf.
void dist_merge(Communicator& comm, const TensorView& o, const TensorView& lse);

}  // namespace ringattn
