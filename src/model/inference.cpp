// Prefill into a KV cache and decode (see inference.h).
#include "ringattn/inference.h"

#include <cmath>

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
  for (int l = 0; l < m.num_layers(); ++l) {  // in the model's compute dtype
    k_.push_back(dev_->alloc(m.config().dtype, {batch, capacity, kv, dh}));
    v_.push_back(dev_->alloc(m.config().dtype, {batch, capacity, kv, dh}));
    dev_->fill(k_.back(), 0.f);
    dev_->fill(v_.back(), 0.f);
  }
  pos_.assign(static_cast<size_t>(batch * capacity), 0);
  length_.assign(static_cast<size_t>(batch), 0);
  held_.assign(static_cast<size_t>(batch * P), 0);
}

int64_t KVCache::bytes() const {
  int64_t n = static_cast<int64_t>(pos_.size() * sizeof(int64_t));
  for (const DeviceTensor& t : k_) n += static_cast<int64_t>(t.bytes());
  for (const DeviceTensor& t : v_) n += static_cast<int64_t>(t.bytes());
  return n;
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
  const int64_t L = Ll * P;
  const int64_t agreed[] = {Bp, Ll, first};
  agree(par, pp, agreed, "the prefill's batch, prompt length or first sequence");
  check(cache.ranks() == P && cache.rank() == p, "the KV cache is for rank ", cache.rank(), " of ", cache.ranks(),
        " but the SP group has this rank as ", p, " of ", P);
  check(first >= 0 && first + Bp <= cache.batch(), "sequences ", first, "..", first + Bp - 1,
        " are outside the cache's batch of ", cache.batch());
  check(Ll <= cache.capacity(), "a prompt of ", L, " tokens puts ", Ll,
        " entries on each rank, more than the KV "
        "cache's capacity of ",
        cache.capacity(), " per rank");
  for (int64_t b = first; b < first + Bp; ++b)
    check(cache.length(b) == 0, "sequence ", b, " already holds ", cache.length(b), " tokens; prefill an empty one");
  if (par.sp) check_even_layout(par.attn.layout, L, P, "prefill");
  const std::vector<int64_t> pos = par.sp ? shard_positions(par.attn.layout, L, P, p) : [&] {
    std::vector<int64_t> v(static_cast<size_t>(L));
    for (int64_t i = 0; i < L; ++i) v[static_cast<size_t>(i)] = i;
    return v;
  }();

  // The attention of each layer, then its K/V into the cache.
  const AttentionHook store = [&](int l, const TensorView& q, const TensorView& k, const TensorView& v,
                                  const TensorView& o, const TensorView& lse) {
    sequence_parallel_attention(dev, par, c, m.first_layer() + l, q, k, v, o, lse);
    for (int64_t b = 0; b < Bp; ++b) {
      dev.copy(cache.k_[l].view().slice(0, first + b, 1).slice(1, 0, Ll), k.slice(0, b, 1));
      dev.copy(cache.v_[l].view().slice(0, first + b, 1).slice(1, 0, Ll), v.slice(0, b, 1));
    }
  };
  Activations act;
  act.keep = false;
  DeviceTensor y = model_forward(m, stage_input(dev, x, pp, kPrefillTag), par, act, store, pos);
  stage_output(y, pp, kPrefillTag);
  for (int64_t b = first; b < first + Bp; ++b) {
    std::copy(pos.begin(), pos.end(), cache.pos_.begin() + b * cache.capacity_);
    cache.length_[b] = L;
    for (int r = 0; r < P; ++r) cache.held_[b * P + r] = Ll;
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
  // Every rank checks every owner's shard, so all fail together.
  for (int64_t b = 0; b < B; ++b) {
    check(cache.length(b) > 0, "sequence ", b, " has no prompt: prefill it before decoding");
    const int o = cache.owner(cache.length(b));
    check(cache.held(b, o) < cache.capacity(), "the KV cache is full: sequence ", b, " has ", cache.length(b),
          " tokens and its next one (position ", cache.length(b), ") belongs to rank ", o, ", which already holds ",
          cache.held(b, o), " of its capacity of ", cache.capacity(), " entries; give the cache a larger capacity");
  }

  // The global positions of each sequence's new token and of its entries here
  // after this step's append, where the device's kernels read them (every layer
  // shares them).
  std::vector<std::shared_ptr<const int64_t>> q_pos(static_cast<size_t>(B)), k_pos(static_cast<size_t>(B));
  std::vector<int64_t> n_here(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t = cache.length(b), held = cache.held(b, p);
    std::vector<int64_t> kp(cache.pos_.begin() + b * cache.capacity_, cache.pos_.begin() + b * cache.capacity_ + held);
    if (cache.owner(t) == p) kp.push_back(t);
    n_here[b] = static_cast<int64_t>(kp.size());
    q_pos[b] = dev.upload_positions(std::span<const int64_t>(&t, 1));
    if (!kp.empty()) k_pos[b] = dev.upload_positions(kp);
  }
  // Per layer: append the new K/V to the owner's shard, attend the local shard of
  // every sequence (its own length), merge the partials over the SP group.
  const AttentionHook attend = [&](int l, const TensorView& q, const TensorView& k, const TensorView& v,
                                   const TensorView& o, const TensorView& lse) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t t = cache.length(b);
      if (cache.owner(t) == p) {
        const int64_t slot = cache.held(b, p);
        dev.copy(cache.k_[l].view().slice(0, b, 1).slice(1, slot, 1), k.slice(0, b, 1));
        dev.copy(cache.v_[l].view().slice(0, b, 1).slice(1, slot, 1), v.slice(0, b, 1));
      }
      const int64_t n = n_here[b];
      const TensorView ob = o.slice(0, b, 1), lb = lse.slice(0, b, 1);
      if (n == 0) {  // nothing of this sequence here: an empty partial
        dev.fill(ob, 0.f);
        dev.fill(lb, -INFINITY);
        continue;
      }
      AttentionOptions opt;
      opt.causal = true;
      opt.window_left = c.window_left(m.first_layer() + l);  // the decode kernel skips what the window evicted
      opt.threads = par.attn.threads;
      opt.isa = par.attn.isa;
      opt.q_pos = std::span<const int64_t>(q_pos[b].get(), 1);
      opt.k_pos = std::span<const int64_t>(k_pos[b].get(), static_cast<size_t>(n));
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
    const int64_t t = cache.length(b);
    if (cache.owner(t) == p) cache.pos_[b * cache.capacity_ + cache.held(b, p)] = t;
    ++cache.held_[b * P + cache.owner(t)];
    ++cache.length_[b];
  }
  return y;
}

}  // namespace ringattn
