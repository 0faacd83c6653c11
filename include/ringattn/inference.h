// Long-context inference: prefill the prompt into a KV cache that stays where it
// was computed, then decode one token per sequence per step (docs/design.md §1, §8).
//
//   SP (RA+SP)  the cache is sharded by sequence: rank p of the SP group holds the
//               K/V of its prompt tokens (the layout's positions) and of the decoded
//               tokens it owns. A decode step runs the token-local layers for the
//               new token on every SP rank (one token cannot be split), each rank
//               attends its shard and dist_merge combines the (o_p, lse_p) exactly
//               by all-reduce: the cache never moves.
//               Append policy: the token at global position t goes to rank t mod P,
//               so shards of an evenly split prompt never differ by more than one.
//               A sliding-window layer keeps a ring buffer instead: the prompt's
//               keys the first decoded token still sees, then each new token in
//               the slot of the oldest key no query can see any more.
//   TP          every rank holds all tokens for its heads; the row-parallel
//               projections all-reduce as in training.
//   PP          every stage holds all tokens for its layers; activations pass
//               stage to stage, the last stage's output is broadcast to all stages.
//   SP × TP     both at once (the SP group of each TP rank shards its heads' cache).
// Attention is causal by global position throughout; the decode kernel is
// attention_forward's (flash-decoding) path.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "ringattn/model.h"

namespace ringattn {

class KVCache {
 public:
  // The cache of the layers and kv heads `m` holds, for `batch` sequences and up
  // to `capacity` entries per sequence on this rank for a layer of full attention;
  // shared by the P ranks of an SP group, of which this is rank p (P = 1 without SP).
  // A sliding-window layer (window_left W) keeps only what a later query can still
  // see, in a ring buffer of min(capacity, window_slots(W, P)) entries: memory
  // bounded by the window, however long the prompt and the generation.
  KVCache(const Model& m, int64_t batch, int64_t capacity, int P = 1, int p = 0);

  // The entries rank p may need at once under window_left W: the prompt's last
  // W + 1 tokens (all on one rank in the contiguous layout) and its share of the
  // decoded ones among them (the token at t goes to rank t mod P).
  static int64_t window_slots(int64_t window_left, int P) { return window_left + 1 + (window_left + P) / P; }
  // The capacity per rank that holds a prompt of `prompt` tokens and `steps`
  // decoded ones: its shard (up to two tokens over prompt/P in zigzag) and every
  // P-th token after it.
  static int64_t capacity_for(int64_t prompt, int64_t steps, int P) { return (prompt + steps + P - 1) / P + 2; }

  int64_t batch() const { return batch_; }
  int64_t capacity() const { return capacity_; }
  int64_t capacity(int l) const { return slots(l).capacity; }  // layer l's entries per sequence here
  int ranks() const { return P_; }
  int rank() const { return p_; }
  // Tokens of sequence b so far (prompt + decoded), the same on every rank.
  int64_t length(int64_t b) const { return length_[static_cast<size_t>(b)]; }
  // Entries of layer l of sequence b held by SP rank r (every rank tracks every rank's).
  int64_t held(int l, int64_t b, int r) const { return slots(l).count[slots(l).at(b, r)]; }
  // The SP rank that stores the token at global position t.
  int owner(int64_t t) const { return static_cast<int>(t % P_); }
  // Layer l's keys / values of sequence b here: [1, held(l, b, p), kv_heads, dh],
  // in the model's device memory (a ring buffer: in position order from its
  // oldest entry, which need not be the first).
  TensorView keys(int l, int64_t b) const { return entries(k_, l, b); }
  TensorView values(int l, int64_t b) const { return entries(v_, l, b); }
  // Global positions of those entries.
  std::span<const int64_t> positions(int l, int64_t b) const {
    return {slots(l).row(b, p_), static_cast<size_t>(held(l, b, p_))};
  }
  int64_t bytes() const;  // K, V and positions allocated on this rank

 private:
  friend DeviceTensor prefill(const Model&, KVCache&, const TensorView&, int64_t, const ModelParallel&, Communicator*);
  friend DeviceTensor decode_step(const Model&, KVCache&, const TensorView&, const ModelParallel&, Communicator*);
  // The slots of the layers that share one window (one entry per window in the
  // model): every rank keeps every rank's positions, so all decide alike.
  struct Slots {
    int64_t window_left = -1, capacity = 0;
    int P = 1;
    std::vector<int64_t> pos;            // [batch, P, capacity]: global position of each slot
    std::vector<int64_t> count, oldest;  // [batch, P]: slots in use, the ring's oldest slot
    size_t at(int64_t b, int r) const { return static_cast<size_t>(b * P + r); }
    const int64_t* row(int64_t b, int r) const { return pos.data() + at(b, r) * static_cast<size_t>(capacity); }
    int64_t* row(int64_t b, int r) { return pos.data() + at(b, r) * static_cast<size_t>(capacity); }
    // The slot the token at position t takes on rank r, or −1 when every slot
    // there holds a key that t (and so every later token) still sees.
    int64_t slot_for(int64_t b, int r, int64_t t) const;
    void append(int64_t b, int r, int64_t t);  // t into slot_for(b, r, t)
  };

  const Slots& slots(int l) const { return slots_[static_cast<size_t>(slots_of_[static_cast<size_t>(l)])]; }
  TensorView entries(const std::vector<DeviceTensor>& t, int l, int64_t b) const {
    return t[static_cast<size_t>(l)].view().slice(0, b, 1).slice(1, 0, held(l, b, p_));
  }
  int64_t batch_, capacity_;
  int P_, p_;
  Device* dev_;                      // the model's
  std::vector<DeviceTensor> k_, v_;  // per layer here: [batch, capacity(l), kv_heads, dh], model dtype
  std::vector<Slots> slots_;         // per distinct window
  std::vector<int> slots_of_;        // per layer here: its entry in slots_
  std::vector<int64_t> length_;      // [batch]
  bool checked_ = false;             // decode shapes agreed across ranks
};

// Runs the forward over the prompts of sequences first .. first + Bp − 1 (one
// prompt length L for all of them) and stores every layer's K/V and global
// positions in the cache (a sliding-window layer's only from position L − W on,
// what the next token sees); those sequences must be empty.
//   x: this rank's prompt tokens [Bp, Ll, D]: its shard of L in par.attn.layout
//      under SP (any L >= P: shards may differ by a token or two; L is their
//      sum; attention by par.attn.strategy), Ll = L otherwise. Under PP (pp = the
//      stages, this rank's model holds stage pp->rank()) stage 0 reads x, the
//      others receive the previous stage's output (x still gives the shape).
// x and y are in the model's device memory.
// Returns y [Bp, Ll, D], this rank's tokens; under PP on the last stage only
// (an empty tensor elsewhere).
DeviceTensor prefill(const Model& m, KVCache& cache, const TensorView& x, int64_t first, const ModelParallel& par,
                     Communicator* pp = nullptr);

// One decode step for every sequence of the cache: x [B, 1, D] is the next token
// of each (the same on every rank); returns y [B, 1, D] on every rank. The new
// token's K/V are appended to its owner's shard. Throws Error, on every rank, when
// a sequence has no prompt yet or the owner's shard of a sequence is full (every
// slot of a layer holds a key the new token still sees).
DeviceTensor decode_step(const Model& m, KVCache& cache, const TensorView& x, const ModelParallel& par,
                         Communicator* pp = nullptr);

}  // namespace ringattn
