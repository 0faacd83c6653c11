// The next token from a row of logits: greedy, or sampled with temperature,
// top-k and top-p (nucleus) in Hugging Face's order (temperature, then top-k,
// then top-p), from a seeded generator so that a run can be repeated.
#pragma once
#include <cstdint>
#include <random>
#include <span>
#include <vector>

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

// The same in two steps, for a row of logits split over ranks (a vocabulary-
// parallel LM head): each part's candidates, then the pick from all parts'
// candidates merged in `before` order. A token outside its part's candidates
// can never be picked, so the pick equals sample_token's on the whole row.
struct TokenCandidate {
  float logit;
  int64_t id;
};
// Best first: the higher logit, on a tie the lower id.
inline bool before(const TokenCandidate& a, const TokenCandidate& b) {
  return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
}
// How many candidates a part of n logits contributes: 1 greedy, else min(top_k, n), else n.
int64_t candidates_per_part(const SamplingOptions& o, int64_t n);
bool has_nan(std::span<const float> logits);
// The candidates of logits[0, n) (token ids first_id + i; no NaN among them: check
// has_nan first), sorted by `before`.
std::vector<TokenCandidate> sampling_candidates(std::span<const float> logits, int64_t first_id,
                                                const SamplingOptions& o);
// The pick from every part's candidates merged and sorted by `before` (a prefix
// of them is enough: at least candidates_per_part(o, V) of the row's V tokens).
int64_t sample_candidates(std::span<const TokenCandidate> sorted, const SamplingOptions& o, std::mt19937_64& rng);

}  // namespace ringattn
