// The performance model and planner (`ringattn plan`): predicts, for a model, a
// sequence, a batch, a world size and a hardware description, what every parallel
// layout would reach — forward and training tokens/s, time per output token,
// peak memory per device, bytes per link, the share of communication hidden —
// and ranks them.
//
// The model follows what ringattn executes (src/model, src/parallel):
//   compute  per-operation roofline: GEMM FLOPs at the achievable GEMM rate for
//            that dtype and size, attention FLOPs (docs/design.md §9 conventions) at the
//            fused kernel's rate, token-local kernels (LayerNorm, GELU, adds,
//            AdamW) as bytes at the elementwise bandwidth, decode as cache and
//            weight bytes at the decode bandwidth, plus a fixed cost per operation;
//   comm     alpha-beta: a message of n bytes costs α + n/β on the slowest link
//            its group crosses; ring algorithms for the collectives
//            (all-reduce 2(g−1)α + 2(g−1)/g·n/β, all-gather and all-to-all
//            (g−1)α + (g−1)/g·n/β of the gathered/exchanged total n);
//   overlap  ring K/V transfers overlap the attention of the current block
//            (stage time = max(compute, transfer)) when the link copies without
//            the compute units (GPUs); TP all-reduces, Ulysses all-to-alls,
//            all-gathers, gradient all-reduces and pipeline transfers do not;
//            the pipeline bubble is (p−1)/(m+p−1) with 1F1B.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "ringattn/dtype.h"
#include "ringattn/layout.h"
#include "ringattn/model.h"

namespace ringattn {

// One kind of link, per device and direction.
struct LinkSpec {
  double latency_s = 0;          // α
  double bandwidth = 0;          // β, bytes/s
  bool overlaps_compute = true;  // false: the transfer is a copy by the compute core (CPU shared memory)
};

// What a device can do (achievable rates, not datasheet peaks except `peak`).
// Loaded from a JSON file (hardware/*.json); `sources` names where every number
// came from.
struct Hardware {
  std::string name, description;
  // A calibration (`plan --calibrate`) records the CPU it measured (this_cpu());
  // datasheet files leave it empty.
  std::string measured_cpu;
  int devices_per_node = 1;
  double memory_bytes = 0;             // per device
  double memory_bandwidth = 0;         // bytes/s per device (datasheet or measured streaming read)
  std::map<std::string, double> peak;  // dtype -> FLOP/s (for model FLOP utilisation)
  // dtype -> [(n, FLOP/s)]: GEMM rate against the smallest of M, N, K (log-linear
  // between points, clamped at the ends).
  std::map<std::string, std::vector<std::pair<double, double>>> gemm;
  // The same for the backward of a linear layer (dx and dW GEMMs, 4·m·n·k FLOPs);
  // empty: the forward rate.
  std::map<std::string, std::vector<std::pair<double, double>>> gemm_backward;
  // dtype -> [(head dim, FLOP/s)] of the fused attention kernels the file takes by
  // default (non-causal, long sequences; interpolated like the GEMM rate).
  std::map<std::string, std::vector<std::pair<double, double>>> attention_forward, attention_backward;
  // Other attention kernels' rates by name (the GPU files: "fa3", FlashAttention-3;
  // "ringattn", this project's own kernels as measured), each with its causal
  // efficiency (0: the file's). use_attention_kernels(name) swaps a set in.
  struct AttentionKernels {
    std::map<std::string, std::vector<std::pair<double, double>>> forward, backward;
    double causal_efficiency = 0;
  };
  std::map<std::string, AttentionKernels> attention_kernels;
  std::string attention_kernels_used;  // the name swapped in; empty: the defaults
  // Throws Error listing the file's names for an unknown one, and when a set was chosen already.
  void use_attention_kernels(const std::string& name);
  // Causal attention's rate on its visible pairs relative to the non-causal rate
  // (diagonal tiles computed whole, shorter rows): 1 when not given.
  double causal_efficiency = 1;
  double elementwise_bandwidth = 0;  // bytes/s of LayerNorm, residual adds, copies, AdamW
  // GELU elements/s, forward and backward (0: memory-bound, 8 and 12 bytes per
  // element at the elementwise bandwidth; on CPUs its tanh is compute-bound).
  double gelu_forward_rate = 0, gelu_backward_rate = 0;
  // bytes/s of a decode step reading the KV cache and the weights, every device at
  // once, from memory (CPUs: caches far beyond the last-level cache).
  double decode_bandwidth = 0;
  // bytes/s of a decode step's GEMMs re-reading weights that stay in the
  // last-level cache from one step to the next (CPUs), and that cache's size per
  // node: used while the weights of all ranks of a node fit in it (0: not
  // measured; weights are then read at decode_bandwidth).
  double cached_weight_bandwidth = 0, llc_bytes = 0;
  double op_overhead_s = 0;  // fixed cost of each kernel/operation
  // More ranks than devices on a node: the extra cost of each blocking wait for a
  // peer, which may be descheduled (0: not measured; GPUs never time-share).
  double timeshare_wait_s = 0;
  LinkSpec intra_node, inter_node;
  std::map<std::string, std::string> sources;

  double gemm_rate(DType dt, double m, double n, double k,
                   bool backward = false) const;  // throws Error if the dtype is missing
  double attention_rate(DType dt, bool backward, double head_dim) const;
  double peak_rate(DType dt) const;
};

Hardware hardware_from_json(const std::string& text, const std::string& origin);  // throws Error naming the field
std::string hardware_to_json(const Hardware& h);  // throws Error after use_attention_kernels
// A name from the hardware/ folder ("h100-sxm"), "this-machine" (the calibration
// at this_machine_path(), refused when it was measured on another CPU) or a path
// to a JSON file.
Hardware load_hardware(const std::string& name_or_path);
std::vector<std::string> builtin_hardware_names();
// The CPU as a calibration records it: model, logical CPUs, kernel paths.
std::string this_cpu();
// Where `plan --calibrate` keeps this machine's description by default:
// $XDG_CONFIG_HOME/ringattn/this-machine.json (else ~/.config/ringattn/...).
std::string this_machine_path();

// What is to be run.
struct Workload {
  ModelConfig model;
  int64_t seq = 8192, batch = 1;
  // Storage of the activations between layers and of the TP/PP transfers: fp32 as
  // ringattn keeps them; fp16/bf16 as Megatron-style systems do.
  DType activations = DType::f32;
  // Packed documents, the same in every sequence: cu_seqlens [n + 1] from 0 to
  // seq (empty: each sequence is one document). Attention's work and the ring's
  // trips follow them (busiest_fraction); the rest of the model does not see them.
  std::vector<int32_t> cu_seqlens;
};

// One layout of the world: ranks = dp·pp·sp·tp, rank order as in Mesh (tp
// innermost, then sp, pp, dp). sp > 1 uses `strategy` for attention
// (hybrid: Ulysses groups of `ulysses` ranks × a ring of sp/ulysses).
struct Candidate {
  int dp = 1, pp = 1, sp = 1, tp = 1, ulysses = 1;
  Strategy strategy = Strategy::ring;
  Layout layout = Layout::zigzag;
  int micro_batches = 1;     // per data-parallel replica: pipeline micro-batches, or gradient accumulation at pp = 1
  std::string name() const;  // e.g. "RA+SP(16)", "TP(8) x PP(2)", "DP(2) x Ulysses(2) x ring(4)"
};

// Where the machines are: `world` ranks on `nodes` nodes (consecutive ranks share
// a node). More ranks on a node than it has devices time-share them.
struct Cluster {
  int world = 1, nodes = 0;  // nodes 0: as many as world needs at devices_per_node
  int nodes_for(const Hardware& h) const;
};

struct Prediction {
  Candidate c;
  std::string invalid;                                   // why this layout cannot run ("" when it can)
  double forward_s = 0, train_s = 0, decode_step_s = 0;  // one forward / training step of the batch, one decode step
  double forward_tokens_per_s = 0, train_tokens_per_s = 0;
  double train_mfu = 0, forward_mfu = 0;                                      // model FLOPs / (world · peak)
  double peak_train_bytes = 0, peak_inference_bytes = 0, kv_cache_bytes = 0;  // per device
  double capacity_bytes = 0;  // memory a device has (shared by time-sharing ranks)
  bool fits_train = true, fits_inference = true;
  double train_bytes_sent = 0, forward_bytes_sent = 0, decode_bytes_sent = 0;  // per device per step
  double intra_bytes = 0, inter_bytes = 0;  // of train_bytes_sent, over each link kind
  double comm_s = 0, comm_hidden_s = 0;     // training step: transfer time, and the part behind compute
  double hidden_share() const { return comm_s > 0 ? comm_hidden_s / comm_s : 1.0; }
};

// Model FLOPs of one forward over the whole batch (the training step counts 3×):
// GEMMs 2·m·n·k each, attention 4·B·H·Lq·Lk·d (causal: visible pairs only).
double forward_flops(const Workload& w);
double forward_flops_per_layer_per_token_gemm(const ModelConfig& m);
// Attention pairs visible to the busiest of P ranks of layout l, as a fraction
// of its (L/P) × L block: causal, 1/2 for balanced layouts, 1 − 1/(2P) for
// contiguous; with a sliding window of W keys (W > 0, causal: query i sees keys
// i − W + 1 .. i) about W/L; with packed documents (cu_seqlens [n + 1], 0 … L;
// empty: one) a query sees its own document's keys only, positions restarting
// in each, so the busiest rank is the one whose documents' parts hold the most
// pairs (zigzag and contiguous balance one document, not a mix; striped
// balances any).
double busiest_fraction(Layout l, int P, int64_t L, bool causal = true, int64_t window = 0,
                        std::span<const int32_t> cu_seqlens = {});
double pipeline_bubble(int stages, int micro_batches);  // (p−1)/(m+p−1)

// Collective costs over a group of g devices on `link` (ring algorithms).
double cost_send(const LinkSpec& link, double bytes);
double cost_all_reduce(const LinkSpec& link, int g, double bytes);
double cost_all_gather(const LinkSpec& link, int g, double total_bytes);  // total = g · each rank's block
double cost_all_to_all(const LinkSpec& link, int g, double total_bytes);  // each rank's whole buffer
double cost_reduce_scatter(const LinkSpec& link, int g, double total_bytes);

Prediction predict(const Workload& w, const Candidate& c, const Hardware& h, const Cluster& cl);
// The layout with the micro-batch count (a divisor of batch/dp) that gives the best
// training rate among those that fit (the least memory when none fits).
Prediction predict_best_micro_batches(const Workload& w, Candidate c, const Hardware& h, const Cluster& cl);
// Every valid layout of cl.world ranks (and the invalid ones with their reason when
// keep_invalid), for each mesh the micro-batch count with the best training rate
// among those that fit (the least memory when none fits).
std::vector<Prediction> plan(const Workload& w, const Hardware& h, const Cluster& cl, bool keep_invalid = false);

// Measures this machine: every rank of comm (one per device: `threads` cores)
// runs the same measurement at the same time and the figure is the mean over the
// ranks, a device's rate while all are busy, as in a run. GEMM rates at several
// sizes (linear_forward/backward), the attention kernels at head dims 64 and 128
// and causal, the elementwise and decode bandwidths, the per-operation overhead,
// and the link's α, β by ping-pong between ranks 0 and 1. Rank 0 calls progress.
Hardware calibrate_this_machine(Communicator& comm, int threads,
                                const std::function<void(const std::string&)>& progress);
// The timeshare_wait_s of this machine: comm has more ranks than cores; every rank
// runs the same compute steps, alone and then each followed by an all-reduce of
// one number; the extra time per step. Every rank calls it.
double measure_timeshare_wait(Communicator& comm);
// Point-to-point α (half the round trip of 8 bytes) and β (bytes/s of 64 MiB
// messages) between ranks 0 and 1 of comm, by ping-pong; every rank calls it.
std::pair<double, double> measure_pingpong(Communicator& comm);

// ---- validation against measurements (plan --validate) ------------------------------
// The median of xs (0 for none).
double median(std::vector<double> xs);
// The ranking check for one metric (higher is better) over the methods of one
// run, given (predicted, measured) per method: the pairs whose measured rates
// differ by more than `noise` (run-to-run differences below it are not an order),
// how many of them the model orders the same way, and whether the predicted best
// is (within the noise of) the measured best.
struct RankAgreement {
  int pairs = 0, agree = 0;
  bool best = false;
};
RankAgreement rank_agreement(const std::vector<std::pair<double, double>>& predicted_measured, double noise = 0.10);

}  // namespace ringattn
