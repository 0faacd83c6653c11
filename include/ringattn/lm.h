// Hugging Face decoder-only language models (llama, qwen2, gpt2; lm_config.h):
// a checkpoint folder's weights (LanguageModel) and a one-process reference of
// their logits, loss and gradients written straight from the architectures'
// definitions; and the same model as the parallel Model (model.h) with its
// embedding, final norm, LM head and next-token loss under every layout.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "ringattn/lm_config.h"
#include "ringattn/model.h"
#include "ringattn/sampling.h"
#include "ringattn/tensor.h"

namespace ringattn {

class KVCache;

// The tensors an architecture's checkpoint holds, in Hugging Face's names and
// shapes (nn.Linear weights [out, in]; gpt2's Conv1D weights [in, out]); the LM
// head only when it is not tied to the embedding.
std::vector<std::pair<std::string, std::vector<int64_t>>> lm_tensor_shapes(const LmConfig& c);

struct LanguageModel {
  LmConfig config;
  std::map<std::string, Tensor> weights;  // fp32, by checkpoint name

  // config.json and model.safetensors (or its sharded index) of `dir`; every
  // tensor of lm_tensor_shapes must be there with its shape (Error naming the
  // tensor otherwise); F32, BF16 and F16 tensors are widened to fp32.
  static LanguageModel load(const std::string& dir);
  const Tensor& weight(const std::string& name) const;
};

// logits [B, L, vocab] of token ids [B, L] (positions 0..L−1, causal), fp32.
Tensor lm_logits(const LanguageModel& m, const std::vector<int64_t>& ids, int64_t B, int64_t L);
// n greedy tokens after `prompt`, recomputing the whole sequence with lm_logits
// at every step: the reference decoding is checked against (slow by design).
std::vector<int64_t> lm_greedy_reference(const LanguageModel& m, std::vector<int64_t> prompt, int64_t n);

// The causal-LM loss on ids [B, L] (labels shifted within each sequence: token
// t + 1 is the target of token t; the mean over the B·(L − 1) targets, as
// Hugging Face's ForCausalLMLoss), and its gradient for every weight (by
// checkpoint name; a tied head's gradient is in the embedding's). The LM head
// and cross-entropy run in row chunks (lm_head_cross_entropy).
struct LmLossGrads {
  double loss = 0;
  std::map<std::string, Tensor> grads;
};
LmLossGrads lm_loss_and_grads(const LanguageModel& m, const std::vector<int64_t>& ids, int64_t B, int64_t L);

// ---- the language model as the parallel Model ------------------------------------

// Copies checkpoint tensors (by Hugging Face name, HF shapes) into a full (tp =
// 1, pp = 1) host Model of model_config(c): its parameters, or its gradients
// when grads is true. Every tensor of lm_tensor_shapes must be there.
void lm_import(Model& full, const LmConfig& c, const std::map<std::string, Tensor>& tensors, bool grads = false);
// The inverse: a full Model's parameters (or gradients) as checkpoint tensors.
std::map<std::string, Tensor> lm_export(const Model& full, const LmConfig& c, bool grads = false);
// This rank's slice (TP, PP) of a checkpoint's model, computing in dtype: made
// empty and filled from the tensors, so a rank never holds more than its slice.
// From a checkpoint folder the tensors are read where they are mapped (fp32,
// bf16 or fp16), only the parts of them this rank holds.
Model lm_model(const LanguageModel& lm, DType dtype, const RunContext& run);
Model lm_model(const std::string& dir, DType dtype, const RunContext& run);
// The whole checkpoint from the ranks' slices of a run (TP, PP; SP and DP
// ranks hold copies): every tensor of lm_tensor_shapes on rank 0, each element
// taken from the one rank holding it; an empty map on the other ranks. Every
// rank calls it. Without a run (null, or one process) m is the full model.
std::map<std::string, Tensor> lm_gather(const Model& m, const LmConfig& c, const RunContext* run = nullptr);
// Writes the model (this rank's slice of run, or a full one without a run) as a
// checkpoint folder Hugging Face loads: rank 0 writes dir/config.json and
// dir/model.safetensors (fp32), each atomically; dir is created when missing.
// Every rank calls it.
void save_lm(const std::string& dir, const Model& m, const LmConfig& c, const RunContext* run = nullptr);

// Packed training rows: documents joined with an end-of-sequence token after
// each. lm_documents splits every row of ids [B, L] after each `eos` (and at
// the row's end) into one cu_seqlens [n_docs + 1] per row, the form
// model_forward takes; lm_targets counts the next-token targets: L − 1 per row,
// or per document its length − 1 (no target crosses a document).
std::vector<std::vector<int32_t>> lm_documents(std::span<const int64_t> ids, int64_t B, int64_t L, int64_t eos);
int64_t lm_targets(int64_t B, int64_t L, std::span<const std::vector<int32_t>> documents = {});
// The positions of this rank's tokens within their documents, [B·Ll]: global
// positions [Ll] less the start of the token's document in its row (what RoPE
// and learned positions see in a packed row, as if each document were alone).
std::vector<int64_t> lm_document_positions(std::span<const int64_t> positions, int64_t B,
                                           std::span<const std::vector<int32_t>> documents);

// Next-token labels of this rank's tokens: ids [B, L] of the whole batch (token
// t + 1 of each sequence is the label of token t, shifted before any split: a
// shard's last token is labelled by the next shard's first), taken at the global
// positions [Ll] of this rank's tokens; −1 for each sequence's last token and,
// with packed documents, for each document's last token.
std::vector<int64_t> lm_labels(std::span<const int64_t> ids, int64_t B, int64_t L, std::span<const int64_t> positions,
                               std::span<const std::vector<int32_t>> documents = {});
// This rank's ids [B, Ll] of the whole batch's ids [B, L] at positions [Ll].
std::vector<int64_t> lm_local_ids(std::span<const int64_t> ids, int64_t B, int64_t L,
                                  std::span<const int64_t> positions);

// The vocabulary-parallel ends of the model under TP (Megatron's): a TP rank
// holds the embedding and head rows of its part of the vocabulary
// (Model::vocab_first, local_vocab), so neither is ever held whole. Every rank of
// the TP group calls these together; with tp = 1 no communication.
//
// The embedding of ids [B, Ll] at global positions ([Ll] shared by the rows, or
// [B·Ll]; gpt2 adds its learned positions): x [B, Ll, D], each id's row summed
// from the TP rank holding it (exact: the others add zeros).
DeviceTensor lm_embed(const Model& m, const ModelParallel& par, std::span<const int64_t> ids, int64_t B,
                      std::span<const int64_t> positions);
// dL/dx [B, Ll, D] (the same on every TP rank) into the embedding rows held here
// (and the learned positions' gradients). No communication.
void lm_embed_backward(Model& m, std::span<const int64_t> ids, int64_t B, std::span<const int64_t> positions,
                       const TensorView& dx);
// logits [N, vocab] = head · norm_f(y) of the last stage's output rows y [N, D]
// (each TP rank computes its vocabulary's columns; all are gathered).
Tensor lm_head_logits(const Model& m, const ModelParallel& par, const TensorView& y);
// The summed next-token cross-entropy of rows y [N, D] with labels [N] (−1:
// none), the head in row chunks; dy := scale · dL/dy and the final norm's and
// head's gradients added into m.grads() (an empty dy: the loss alone). Returns
// the unscaled sum. Under TP the logits [N, vocab] are never gathered: the
// softmax's max and sums are reduced over the TP group (VocabShard), and each
// rank's part of dL/dy is summed.
double lm_head_loss(Model& m, const ModelParallel& par, const TensorView& y, std::span<const int64_t> labels,
                    float scale, const TensorView& dy);

// This rank's logits [B, Ll, vocab] of the whole batch's ids [B, L] (every rank
// passes all of them; each takes its tokens of par's layout). With documents
// (lm_documents) every document of a row is attended and positioned as if
// alone. With pp (this rank's model: stage pp->rank()) the rows run through the
// pipeline's forwards, one row per micro-batch, and every stage returns the last
// stage's logits.
Tensor lm_forward(const Model& m, const ModelParallel& par, std::span<const int64_t> ids, int64_t B, int64_t L,
                  std::span<const std::vector<int32_t>> documents = {}, Communicator* pp = nullptr);
// The logits [B, n, vocab] at positions at [n] (each in [0, L), any order,
// repeats allowed) of every row, the same on every rank: the LM head runs on
// those rows only, so the logits of a long sequence are never held whole.
Tensor lm_logits_at(const Model& m, const ModelParallel& par, std::span<const int64_t> ids, int64_t B, int64_t L,
                    std::span<const int64_t> at, std::span<const std::vector<int32_t>> documents = {},
                    Communicator* pp = nullptr);
// The causal-LM loss of ids [B, L] (the mean over the global_targets targets of
// the whole batch, lm_targets, summed over loss_group: the SP group, and the DP
// group when the batch is split) and this rank's gradients added into m.grads()
// (not reduced). With pp (this rank's model: stage pp->rank()) the batch runs
// through the 1F1B pipeline in micro_batches (B divisible by it); every stage
// returns the loss. A tied head under PP is held twice, the embedding on the
// first stage and a copy on the last: each adds the other's gradient of this
// call, so both copies get the whole gradient. documents: packed rows as in
// lm_forward.
double lm_loss_backward(Model& m, const ModelParallel& par, std::span<const int64_t> ids, int64_t B, int64_t L,
                        int64_t global_targets, Communicator* loss_group, Communicator* pp = nullptr,
                        int micro_batches = 1, std::span<const std::vector<int32_t>> documents = {});
// The same loss without the backward (evaluation; the forward of a training
// step): no activations kept, no gradients.
double lm_loss(const Model& m, const ModelParallel& par, std::span<const int64_t> ids, int64_t B, int64_t L,
               int64_t global_targets, Communicator* loss_group, Communicator* pp = nullptr, int micro_batches = 1,
               std::span<const std::vector<int32_t>> documents = {});

// Generation: the prompts (the same on every rank; their lengths may
// differ, each at least one token per SP rank) are prefilled into the
// sequence-sharded KV cache by par's strategy — whole, in uneven shards when
// the SP ranks do not divide them (a zigzag prompt too short to give every rank
// a token: its longest prefix that does, the few tokens left as decode steps);
// sequences of one prefill length together — and only the last position's
// logits are computed; then up to new_tokens decode steps, each token picked by
// sample_token (seeded: every rank draws the same). The batch decodes together:
// a sequence still reading its prompt's last tokens emits nothing that step. A
// sequence ends at its eos token (kept) or the count; on_token sees each step's
// tokens (−1: none from that sequence).
// Returns each sequence's new tokens. With pp (this rank's model: stage
// pp->rank()) the first stage embeds, the stages pass the prompt and each step's
// tokens along (inference.h), and the last stage samples and sends each step's
// tokens to every stage.
struct LmGenerateOptions {
  int64_t new_tokens = 16;
  SamplingOptions sampling;
  uint64_t seed = 0;
  int64_t eos = -1;  // −1: none
  std::function<void(std::span<const int64_t>)> on_token;
  std::function<void(const KVCache&)> on_prefilled;  // after every prompt's prefill, before the first token
};
std::vector<std::vector<int64_t>> lm_generate(const Model& m, const ModelParallel& par,
                                              const std::vector<std::vector<int64_t>>& prompts,
                                              const LmGenerateOptions& o, Communicator* pp = nullptr);
// The same for B prompts of L tokens each, ids [B, L].
std::vector<std::vector<int64_t>> lm_generate(const Model& m, const ModelParallel& par, std::span<const int64_t> ids,
                                              int64_t B, int64_t L, const LmGenerateOptions& o,
                                              Communicator* pp = nullptr);

}  // namespace ringattn
