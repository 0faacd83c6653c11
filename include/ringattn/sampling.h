// The next token from a row of logits: greedy, or sampled with temperature,
// top-k and top-p (nucleus) in Hugging Face's order (temperature, then top-k,
// then top-p), from a seeded generator so that a run can be repeated.
#pragma once
#include <cstdint>
#include <random>
#include <span>

namespace ringattn {

struct SamplingOptions {
  bool greedy = true;       // argmax (the lowest id on a tie); the others are then ignored
  float temperature = 1.f;  // > 0: logits / temperature
  int64_t top_k = 0;        // 0: off; else keep the k most likely tokens
  float top_p = 1.f;        // in (0, 1]: keep the fewest most likely tokens whose probabilities sum to >= top_p
};

// Throws Error naming the option for a temperature <= 0 or not finite, top_k < 0,
// top_p outside (0, 1], or logits with a NaN.
void check_sampling(const SamplingOptions& o);
int64_t sample_token(std::span<const float> logits, const SamplingOptions& o, std::mt19937_64& rng);

}  // namespace ringattn
