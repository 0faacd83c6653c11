// A Hugging Face decoder-only language model (llama, qwen2, gpt2; lm_config.h)
// loaded from its checkpoint folder, and its logits on one process on the CPU.
// This is the reference path the parallel Model will be checked against as the
// architectures are folded into it (issue 19); it holds fp32 copies of the
// weights.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "ringattn/lm_config.h"
#include "ringattn/tensor.h"

namespace ringattn {

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

}  // namespace ringattn
