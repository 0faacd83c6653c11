// ParallelConfig and RunContext: the one setup of a parallel run (groups, device,
// the ModelParallel of the layers), checked once.
#include <algorithm>

#include "ringattn/cuda.h"
#include "ringattn/error.h"
#include "ringattn/parallel.h"

namespace ringattn {

ParallelConfig ParallelConfig::for_ranks(int ranks) const {
  ParallelConfig c = *this;
  check(dp >= 1 && pp >= 1 && tp >= 1 && sp >= 0, "--dp, --pp, --tp must be >= 1 and --sp >= 1, got dp=", dp,
        " pp=", pp, " sp=", sp, " tp=", tp);
  if (c.sp == 0) c.sp = std::max(1, ranks / (dp * pp * tp));
  check(c.ranks() == ranks, "--dp ", dp, " x --pp ", pp, " x --sp ", c.sp, " x --tp ", tp, " = ", c.ranks(),
        " must equal the ", ranks, " ranks (run under mpirun -np ", c.ranks(), ")");
  if (strategy == Strategy::hybrid)
    check(ulysses >= 2 && c.sp % ulysses == 0, "--strategy hybrid needs --ulysses U >= 2 dividing the SP group of ",
          c.sp, " ranks, got --ulysses ", ulysses);
  else
    check(ulysses == 1, "--ulysses ", ulysses, " is the Ulysses degree of --strategy hybrid, not of --strategy ",
          strategy_name(strategy));
  if (cuda) {
    check(dp == 1 && pp == 1 && tp == 1 && strategy == Strategy::ring,
          "--device cuda runs RA+SP alone: --dp, --pp and --tp must be 1 and --strategy ring");
    check(cuda_built(), "--device cuda: this ringattn was built without the CUDA path");
    check(cuda_device_count() > 0, "--device cuda: no GPU is visible to this process");
  }
  check(threads >= 0, "--threads must be >= 0, got ", threads);
  check(layout != Layout::doc_zigzag && layout != Layout::doc_balanced, "the ", layout_name(layout),
        " layout is taken by `ringattn attention` and dist_attention so far; the model runs contiguous, zigzag or "
        "striped");
  return c;
}

std::string ParallelConfig::strategy_label() const {
  if (strategy == Strategy::hybrid) return cat("hybrid (ulysses ", ulysses, " x ring)");
  return strategy_name(strategy);
}

void ParallelConfig::check_sequence(int64_t L) const {
  check(L >= 1, "the sequence length must be >= 1, got ", L);
  check_layout(layout, L, std::max(sp, 1));
}

RunContext::RunContext(Communicator* world, const ParallelConfig& cfg)
    : cfg_(cfg.for_ranks(world ? world->size() : 1)), world_(world) {
  if (world_) mesh_ = Mesh::build(*world_, cfg_.dp, cfg_.sp, cfg_.tp, cfg_.pp, cfg_.ulysses);
  par_.sp = cfg_.sp > 1 ? mesh_.sp_comm.get() : nullptr;
  par_.tp = cfg_.tp > 1 ? mesh_.tp_comm.get() : nullptr;
  par_.attn.strategy = cfg_.strategy;
  par_.attn.layout = cfg_.layout;
  par_.attn.threads = cfg_.threads;
  if (cfg_.strategy == Strategy::hybrid) mesh_.use_hybrid(par_.attn);
  if (cfg_.cuda) {
    gpu_ = make_cuda_device(rank() % cuda_device_count());
    if (cfg_.sp > 1) nccl_ = nccl_communicator(*world_, *gpu_);
    par_.sp = nccl_.get();
    par_.attn.device = gpu_.get();
  }
}

Communicator* RunContext::replicas() const {
  if (gpu_) return nccl_.get();
  return world_ && world_->size() > 1 ? mesh_.replica_comm.get() : nullptr;
}

int64_t RunContext::shard_length(int64_t L) const {
  return ringattn::shard_length(cfg_.layout, L, cfg_.sp, mesh_.sp_index());
}

void RunContext::shard_batch(const TensorView& full, const TensorView& out) const {
  check(full.rank >= 2 && out.rank == full.rank && full.dim(0) % cfg_.dp == 0 && out.dim(0) == full.dim(0) / cfg_.dp,
        "shard_batch: ", full.shape_str(), " does not split into ", out.shape_str(), " over dp=", cfg_.dp);
  const int64_t Bl = out.dim(0);
  shard(full.slice(0, mesh_.dp_index() * Bl, Bl), out, cfg_.layout, cfg_.sp, mesh_.sp_index(), 1);
}

int64_t RunContext::bytes_sent() const { return mesh_.bytes_sent() + (nccl_ ? nccl_->stats().bytes_sent : 0); }

void RunContext::reset_stats() {
  mesh_.reset_stats();
  if (nccl_) nccl_->reset_stats();
}

}  // namespace ringattn
