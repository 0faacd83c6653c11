// How the ranks of a job are cut into data, pipeline, sequence and tensor
// parallel groups, and the one setup every parallel run goes through:
// ParallelConfig (what the user asked for, checked once) -> RunContext (the
// groups, the device, the ModelParallel the layers use).
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "ringattn/comm.h"
#include "ringattn/device.h"
#include "ringattn/dist_attention.h"
#include "ringattn/layout.h"
#include "ringattn/tensor.h"

namespace ringattn {

// The groups a model's layers communicate over: attention on this process alone
// (sp == nullptr) or sequence parallel over the SP group with attn's strategy and
// layout (x holds this rank's tokens); with tp set, the model is a tensor-parallel
// slice and the row-parallel outputs (W_o, W_out) and the input gradients of the
// column-parallel layers (W_qkv, W_in) are all-reduced over the TP group.
struct ModelParallel {
  Communicator* sp = nullptr;
  DistAttentionOptions attn;
  Communicator* tp = nullptr;
};

// A data × pipeline × sequence × tensor parallel mesh over `world`: rank
// r = ((dp_index·pp + pp_index)·sp + sp_index)·tp + tp_index. The DP group splits
// the batch, the PP group the layers, the SP group the sequence, the TP group
// heads and MLP columns; the replica group (same pp and tp index) holds the same
// parameter slice and sums its gradients. With ulysses = U > 1 the SP group is
// also cut for the Ulysses × ring attention: SP rank s is member s mod U of
// Ulysses group s / U and member s / U of ring group s mod U.
struct Mesh {
  int dp = 1, pp = 1, sp = 1, tp = 1, ulysses = 1;
  Communicator* world = nullptr;
  std::unique_ptr<Communicator> dp_comm, pp_comm, sp_comm, tp_comm, replica_comm, ulysses_comm, ring_comm;
  // Throws Error (on every rank) unless dp·pp·sp·tp equals the number of ranks
  // and ulysses divides sp.
  static Mesh build(Communicator& world, int dp, int sp, int tp = 1, int pp = 1, int ulysses = 1);
  // Sets o to the Ulysses × ring strategy over this mesh's SP sub-groups.
  void use_hybrid(DistAttentionOptions& o) const;
  // This rank's place in each group (0 without a world: one process).
  int dp_index() const { return rank() / (pp * sp * tp); }
  int pp_index() const { return rank() / (sp * tp) % pp; }
  int sp_index() const { return rank() / tp % sp; }
  int tp_index() const { return rank() % tp; }
  int rank() const { return world ? world->rank() : 0; }
  // World rank of the given indices.
  int rank_of(int dp_i, int pp_i, int sp_i, int tp_i) const { return ((dp_i * pp + pp_i) * sp + sp_i) * tp + tp_i; }
  // Bytes this rank sent over the mesh's groups since the last reset_stats().
  int64_t bytes_sent() const;
  void reset_stats();
};

// A parallel run as the user describes it: the mesh degrees, the attention across
// the SP group (hybrid: Ulysses groups of `ulysses` SP ranks, the ring across
// them), the sequence layout, the device and threads per rank.
struct ParallelConfig {
  int dp = 1, pp = 1, sp = 0, tp = 1;  // sp = 0: the ranks the others leave
  int ulysses = 1;                     // hybrid only: the Ulysses degree (>= 2, divides sp)
  Strategy strategy = Strategy::ring;
  Layout layout = Layout::zigzag;
  bool cuda = false;  // one GPU per rank (rank mod the GPUs visible), the SP group over NCCL
  int threads = 0;    // 0: OpenMP's default

  // The same with sp resolved for `ranks` ranks, after checking that
  // dp·pp·sp·tp = ranks, the strategy's degree and the device (CUDA built, a GPU
  // visible, RA+SP alone). Throws Error naming the option (--dp, --sp, ...).
  ParallelConfig for_ranks(int ranks) const;
  // A sequence of L tokens splits over the SP ranks in the layout: at least one
  // token per rank (shards may differ by a token or two).
  void check_sequence(int64_t L) const;
  int ranks() const { return dp * pp * sp * tp; }
  // The strategy as reports print it: "ring", ..., "hybrid (ulysses 2 x ring)".
  std::string strategy_label() const;
};

// The groups and device of one run, built once from a ParallelConfig on every
// rank of `world` (nullptr: this process alone). What train, compare, generate
// and the tests use instead of assembling meshes and devices by hand.
class RunContext {
 public:
  RunContext(Communicator* world, const ParallelConfig& cfg);
  RunContext(const RunContext&) = delete;
  RunContext& operator=(const RunContext&) = delete;

  const ParallelConfig& config() const { return cfg_; }
  Communicator* world() const { return world_; }
  int rank() const { return world_ ? world_->rank() : 0; }
  Mesh& mesh() { return mesh_; }
  const Mesh& mesh() const { return mesh_; }
  // The GPU of this rank (cfg.cuda), or nullptr: the host.
  Device* device() const { return gpu_.get(); }
  // The groups the model's layers use (SP over NCCL on GPUs).
  const ModelParallel& model_parallel() const { return par_; }
  // The group that sums gradients: the replica group (the world when tp = pp =
  // 1), nullptr for one process.
  Communicator* replicas() const;
  // How many of a sequence's L tokens this rank holds (its SP shard).
  int64_t shard_length(int64_t L) const;
  // This rank's part of a global [B, L, ...] tensor: rows of its DP group, then
  // its tokens of the SP layout (out: [B/dp, shard_length(L), ...]).
  void shard_batch(const TensorView& full, const TensorView& out) const;
  // Bytes this rank sent over the run's groups since reset_stats().
  int64_t bytes_sent() const;
  void reset_stats();

 private:
  ParallelConfig cfg_;
  Communicator* world_;
  Mesh mesh_;
  std::unique_ptr<Device> gpu_;
  std::unique_ptr<Communicator> nccl_;
  ModelParallel par_;
};

}  // namespace ringattn
