// Prefill into a KV cache and decode (see inference.h).
#include "ringattn/inference.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "ringattn/cpu/attention.h"
#include "ringattn/dist_attention.h"
#include "ringattn/error.h"
#include "ringattn/layout.h"

namespace ringattn {

KVCache::KVCache(const Model& m, int64_t batch, int64_t capacity, int P, int p)
    : batch_(batch), capacity_(capacity), P_(P), p_(p), dev_(&m.device()) {
  check(batch >= 1, "the KV cache needs batch >= 1, got ", batch);
  check(capacity >= 1, "the KV cache needs a capacity >= 1 entry per sequence, got ", capacity);
  check(P >= 1 && p >= 0 && p < P, "KV cache rank ", p, " of ", P, " is out of range");
  const int64_t kv = m.local_kv(), dh = m.config().head_dim();
  for (int l = 0; l < m.num_layers(); ++l) {
    const int64_t w = m.config().window_left(m.first_layer() + l);
    size_t g = 0;
    while (g < slots_.size() && slots_[g].window_left != w) ++g;
    if (g == slots_.size()) {
      Slots s;
      s.window_left = w, s.P = P;
      s.capacity = w < 0 ? capacity : std::min(capacity, window_slots(w, P));
      s.pos.assign(static_cast<size_t>(batch * P * s.capacity), 0);
      s.count.assign(static_cast<size_t>(batch * P), 0);
      s.oldest.assign(static_cast<size_t>(batch * P), 0);
      slots_.push_back(std::move(s));
    }
    slots_of_.push_back(static_cast<int>(g));
    const int64_t n = slots_[g].capacity;  // in the model's compute dtype
    k_.push_back(dev_->alloc(m.config().dtype, {batch, n, kv, dh}));
    v_.push_back(dev_->alloc(m.config().dtype, {batch, n, kv, dh}));
    dev_->fill(k_.back(), 0.f);
    dev_->fill(v_.back(), 0.f);
  }
  length_.assign(static_cast<size_t>(batch), 0);
}

int64_t KVCache::bytes() const {
  int64_t n = 0;
  for (const Slots& s : slots_) n += static_cast<int64_t>(s.pos.size() * sizeof(int64_t));
  for (const DeviceTensor& t : k_) n += static_cast<int64_t>(t.bytes());
  for (const DeviceTensor& t : v_) n += static_cast<int64_t>(t.bytes());
  return n;
}

// Slots fill in position order, then wrap: the ring's oldest slot holds the
// smallest position, so if any key is out of the window, that one is.
int64_t KVCache::Slots::slot_for(int64_t b, int r, int64_t t) const {
  const int64_t n = count[at(b, r)];
  if (n < capacity) return n;
  const int64_t o = oldest[at(b, r)];
  return window_left >= 0 && row(b, r)[o] < t - window_left ? o : -1;
}

void KVCache::Slots::append(int64_t b, int r, int64_t t) {
  const int64_t slot = slot_for(b, r, t);
  row(b, r)[slot] = t;
  if (count[at(b, r)] < capacity)
    ++count[at(b, r)];
  else
    oldest[at(b, r)] = (slot + 1) % capacity;
}

namespace {

// Every group the step communicates over agrees on `values` (else Error on every rank).
void agree(const ModelParallel& par, Communicator* pp, std::span<const int64_t> values, const char* what) {
  for (Communicator* c : {par.sp, par.tp, pp})
    if (c) check_same_on_all_ranks(*c, values, what);
}

// Stage s of a pipeline receives its input from s − 1 (stage 0 reads x) and hands
// its output to s + 1 (pipelines run on the host, see Model).
DeviceTensor stage_input(Device& dev, const TensorView& x, Communicator* pp, int tag) {
  DeviceTensor in = dev.alloc(DType::f32, std::span<const int64_t>(x.shape.data(), x.rank));
  if (!pp || pp->rank() == 0) {
    dev.copy(in, x);
  } else {
    Request r = pp->irecv(in.ptr<void>(), in.bytes(), pp->rank() - 1, tag);
    pp->wait(r);
  }
  return in;
}
void stage_output(const DeviceTensor& y, Communicator* pp, int tag) {
  if (!pp || pp->rank() + 1 == pp->size()) return;
  Request r = pp->isend(y.ptr<void>(), y.bytes(), pp->rank() + 1, tag);
  pp->wait(r);
}

constexpr int kPrefillTag = 40, kDecodeTag = 41;

// dist_merge of partials o [B, 1, H, dh], lse [B, H, 1] (contiguous fp32) in dev's
// memory: through host copies on a GPU (a few KiB per layer and step).
void merge_partials(Device& dev, Communicator& comm, const TensorView& o, const TensorView& lse) {
  if (dev.is_host()) return dist_merge(comm, o, lse);
  Tensor ho(DType::f32, o.rank, o.shape.data()), hl(DType::f32, lse.rank, lse.shape.data());
  dev.download(ho, o);
  dev.download(hl, lse);
  dist_merge(comm, ho, hl);
  dev.copy(o, dev.upload(ho));
  dev.copy(lse, dev.upload(hl));
}

}  // namespace

DeviceTensor prefill(const Model& m, KVCache& cache, const TensorView& x, int64_t first, const ModelParallel& par,
                     Communicator* pp) {
  const ModelConfig& c = m.config();
  Device& dev = m.device();
  check(cache.dev_ == &dev, "the KV cache is on ", cache.dev_->name(), " but the model on ", dev.name());
  check(x.rank == 3 && x.dim(2) == c.d_model && x.dtype == DType::f32,
        "the prompt must be fp32 [B, L, d_model=", c.d_model, "], got ", x.shape_str());
  const int64_t Bp = x.dim(0), Ll = x.dim(1);
  const int P = par.sp ? par.sp->size() : 1, p = par.sp ? par.sp->rank() : 0;
  // The ranks of one SP index hold the same shard (checked first, so that every
  // SP group then sees the same shard lengths and fails or passes together).
  for (Communicator* c : {par.tp, pp})
    if (c) check_same_on_all_ranks(*c, std::span<const int64_t>(&Ll, 1), "the prefill's shard length");
  const int64_t L = sp_sequence_length(par, Ll, "prefill");  // the prompt: its shards' sum
  const int64_t agreed[] = {Bp, L, first};
  agree(par, pp, agreed, "the prefill's batch, prompt length or first sequence");
  check(cache.ranks() == P && cache.rank() == p, "the KV cache is for rank ", cache.rank(), " of ", cache.ranks(),
        " but the SP group has this rank as ", p, " of ", P);
  check(first >= 0 && first + Bp <= cache.batch(), "sequences ", first, "..", first + Bp - 1,
        " are outside the cache's batch of ", cache.batch());
  for (int64_t b = first; b < first + Bp; ++b)
    check(cache.length(b) == 0, "sequence ", b, " already holds ", cache.length(b), " tokens; prefill an empty one");
  // Every rank's positions (each in increasing order), so every rank checks every
  // rank's slots. A layer of window W keeps its shard's suffix from L − W on.
  std::vector<std::vector<int64_t>> pos_of(static_cast<size_t>(P));
  for (int r = 0; r < P; ++r) {
    std::vector<int64_t>& v = pos_of[static_cast<size_t>(r)];
    if (par.sp) {
      v = shard_positions(par.attn.layout, L, P, r);
    } else {
      v.resize(static_cast<size_t>(L));
      for (int64_t i = 0; i < L; ++i) v[static_cast<size_t>(i)] = i;
    }
    check(std::is_sorted(v.begin(), v.end()), "internal: shard positions out of order");
  }
  auto kept = [&](const KVCache::Slots& g, int r) {
    const std::vector<int64_t>& v = pos_of[static_cast<size_t>(r)];
    const int64_t from = g.window_left < 0 ? 0 : L - g.window_left;
    return static_cast<int64_t>(v.end() - std::lower_bound(v.begin(), v.end(), from));
  };
  for (const KVCache::Slots& g : cache.slots_)
    for (int r = 0; r < P; ++r)
      check(kept(g, r) <= g.capacity, "a prompt of ", L, " tokens puts ", kept(g, r), " entries on rank ", r,
            g.window_left < 0 ? std::string() : " in a layer of window " + std::to_string(g.window_left + 1),
            ", more than the KV cache's capacity of ", g.capacity, " per rank");
  const std::vector<int64_t>& pos = pos_of[static_cast<size_t>(p)];

  // The attention of each layer, then the K/V it keeps into the cache.
  const AttentionHook store = [&](int l, const TensorView& q, const TensorView& k, const TensorView& v,
                                  const TensorView& o, const TensorView& lse) {
    sequence_parallel_attention(dev, par, c, m.first_layer() + l, q, k, v, o, lse);
    const int64_t n = kept(cache.slots_[static_cast<size_t>(cache.slots_of_[static_cast<size_t>(l)])], p);
    for (int64_t b = 0; b < Bp; ++b) {
      dev.copy(cache.k_[l].view().slice(0, first + b, 1).slice(1, 0, n), k.slice(0, b, 1).slice(1, Ll - n, n));
      dev.copy(cache.v_[l].view().slice(0, first + b, 1).slice(1, 0, n), v.slice(0, b, 1).slice(1, Ll - n, n));
    }
  };
  Activations act;
  act.keep = false;
  DeviceTensor y = model_forward(m, stage_input(dev, x, pp, kPrefillTag), par, act, store, pos);
  stage_output(y, pp, kPrefillTag);
  for (int64_t b = first; b < first + Bp; ++b) {
    for (KVCache::Slots& g : cache.slots_)
      for (int r = 0; r < P; ++r) {
        const std::vector<int64_t>& v = pos_of[static_cast<size_t>(r)];
        const int64_t n = kept(g, r);
        std::copy(v.end() - n, v.end(), g.row(b, r));
        g.count[g.at(b, r)] = n, g.oldest[g.at(b, r)] = 0;
      }
    cache.length_[b] = L;
  }
  return pp && pp->rank() + 1 < pp->size() ? DeviceTensor() : std::move(y);
}

DeviceTensor decode_step(const Model& m, KVCache& cache, const TensorView& x, const ModelParallel& par,
                         Communicator* pp) {
  const ModelConfig& c = m.config();
  Device& dev = m.device();
  check(cache.dev_ == &dev, "the KV cache is on ", cache.dev_->name(), " but the model on ", dev.name());
  const int64_t B = cache.batch();
  const int P = cache.ranks(), p = cache.rank();
  if (!cache.checked_) {
    const int64_t agreed[] = {x.rank, x.dim(0), x.dim(1), x.dim(2), B, cache.capacity()};
    agree(par, pp, agreed, "the decode input's shape or the KV cache's batch and capacity");
    cache.checked_ = true;
  }
  check(c.causal, "decoding needs a causal model (this one is bidirectional)");
  check(x.rank == 3 && x.dim(0) == B && x.dim(1) == 1 && x.dim(2) == c.d_model && x.dtype == DType::f32,
        "a decode step takes fp32 [B=", B, ", 1, d_model=", c.d_model, "], got ", x.shape_str());
  check(P == (par.sp ? par.sp->size() : 1), "the KV cache is sharded over ", P, " ranks but the SP group has ",
        par.sp ? par.sp->size() : 1);
  // Every rank checks every owner's slots, so all fail together.
  const int64_t G = static_cast<int64_t>(cache.slots_.size());
  std::vector<int64_t> slot(static_cast<size_t>(G * B));  // [slots, B]: where the new token goes
  for (int64_t b = 0; b < B; ++b) {
    check(cache.length(b) > 0, "sequence ", b, " has no prompt: prefill it before decoding");
    const int64_t t = cache.length(b);
    const int o = cache.owner(t);
    for (int64_t g = 0; g < G; ++g) {
      const KVCache::Slots& s = cache.slots_[static_cast<size_t>(g)];
      slot[g * B + b] = s.slot_for(b, o, t);
      check(slot[g * B + b] >= 0, "the KV cache is full: sequence ", b, " has ", t,
            " tokens and its next one (position ", t, ") belongs to rank ", o, ", which holds ", s.capacity,
            " entries, its capacity, ",
            s.window_left < 0 ? std::string("for full attention")
                              : "all within the window of " + std::to_string(s.window_left + 1),
            "; give the cache a larger capacity");
    }
  }

  // The global positions of each sequence's new token and of its entries here
  // after this step's append, where the device's kernels read them (the layers
  // of one window share them).
  std::vector<std::shared_ptr<const int64_t>> q_pos(static_cast<size_t>(B)), k_pos(static_cast<size_t>(G * B));
  std::vector<int64_t> n_here(static_cast<size_t>(G * B));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t = cache.length(b);
    q_pos[b] = dev.upload_positions(std::span<const int64_t>(&t, 1));
    for (int64_t g = 0; g < G; ++g) {
      const KVCache::Slots& s = cache.slots_[static_cast<size_t>(g)];
      std::vector<int64_t> kp(s.row(b, p), s.row(b, p) + s.count[s.at(b, p)]);
      if (cache.owner(t) == p) {
        const int64_t i = slot[g * B + b];
        if (i == static_cast<int64_t>(kp.size()))
          kp.push_back(t);
        else
          kp[static_cast<size_t>(i)] = t;
      }
      n_here[g * B + b] = static_cast<int64_t>(kp.size());
      if (!kp.empty()) k_pos[g * B + b] = dev.upload_positions(kp);
    }
  }
  // Per layer: write the new K/V into its owner's slot, attend the local entries
  // of every sequence, merge the partials over the SP group.
  const AttentionHook attend = [&](int l, const TensorView& q, const TensorView& k, const TensorView& v,
                                   const TensorView& o, const TensorView& lse) {
    const int64_t g = cache.slots_of_[static_cast<size_t>(l)];
    for (int64_t b = 0; b < B; ++b) {
      if (cache.owner(cache.length(b)) == p) {
        const int64_t i = slot[g * B + b];
        dev.copy(cache.k_[l].view().slice(0, b, 1).slice(1, i, 1), k.slice(0, b, 1));
        dev.copy(cache.v_[l].view().slice(0, b, 1).slice(1, i, 1), v.slice(0, b, 1));
      }
      const int64_t n = n_here[g * B + b];
      const TensorView ob = o.slice(0, b, 1), lb = lse.slice(0, b, 1);
      if (n == 0) {  // nothing of this sequence here: an empty partial
        dev.fill(ob, 0.f);
        dev.fill(lb, -INFINITY);
        continue;
      }
      AttentionOptions opt;
      opt.causal = true;
      opt.window_left = c.window_left(m.first_layer() + l);  // masks the keys left in slots not yet reused
      opt.threads = par.attn.threads;
      opt.isa = par.attn.isa;
      opt.q_pos = std::span<const int64_t>(q_pos[b].get(), 1);
      opt.k_pos = std::span<const int64_t>(k_pos[g * B + b].get(), static_cast<size_t>(n));
      dev.attention_forward(q.slice(0, b, 1), cache.k_[l].view().slice(0, b, 1).slice(1, 0, n),
                            cache.v_[l].view().slice(0, b, 1).slice(1, 0, n), ob, lb, opt);
    }
    if (par.sp) merge_partials(dev, *par.sp, o, lse);
  };
  std::vector<int64_t> new_pos(static_cast<size_t>(B));  // RoPE: each sequence's new token at its length
  for (int64_t b = 0; b < B; ++b) new_pos[b] = cache.length(b);
  Activations act;
  act.keep = false;
  DeviceTensor y = model_forward(m, stage_input(dev, x, pp, kDecodeTag), par, act, attend, new_pos);
  stage_output(y, pp, kDecodeTag);
  if (pp) pp->broadcast(y.ptr<void>(), y.bytes(), pp->size() - 1);
  for (int64_t b = 0; b < B; ++b) {
    for (KVCache::Slots& g : cache.slots_) g.append(b, cache.owner(cache.length(b)), cache.length(b));
    ++cache.length_[b];
  }
  return y;
}

}  // namespace ringattn
