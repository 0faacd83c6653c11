// Greedy and temperature / top-k / top-p sampling of the next token.
#include "ringattn/sampling.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "ringattn/error.h"

namespace ringattn {

void check_sampling(const SamplingOptions& o) {
  check(std::isfinite(o.temperature) && o.temperature > 0, "--temperature must be positive and finite, got ",
        o.temperature);
  check(o.top_k >= 0, "--top-k must be >= 0 (0: off), got ", o.top_k);
  check(std::isfinite(o.top_p) && o.top_p > 0 && o.top_p <= 1, "--top-p must be in (0, 1], got ", o.top_p);
}

int64_t candidates_per_part(const SamplingOptions& o, int64_t n) {
  return o.greedy ? std::min<int64_t>(1, n) : o.top_k > 0 ? std::min(o.top_k, n) : n;
}

bool has_nan(std::span<const float> logits) {
  return std::any_of(logits.begin(), logits.end(), [](float z) { return std::isnan(z); });
}

std::vector<TokenCandidate> sampling_candidates(std::span<const float> logits, int64_t first_id,
                                                const SamplingOptions& o) {
  const int64_t n = static_cast<int64_t>(logits.size());
  std::vector<TokenCandidate> c(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) c[i] = {logits[i], first_id + i};
  const auto keep = c.begin() + candidates_per_part(o, n);
  std::partial_sort(c.begin(), keep, c.end(), before);
  c.erase(keep, c.end());
  return c;
}

int64_t sample_candidates(std::span<const TokenCandidate> sorted, const SamplingOptions& o, std::mt19937_64& rng) {
  const int64_t n = static_cast<int64_t>(sorted.size());
  check(n >= 1, "sampling needs at least one logit");
  if (o.greedy) return sorted[0].id;
  check_sampling(o);
  // The tokens top_k keeps (the candidates are the best first), then top_p's.
  int64_t keep = o.top_k > 0 ? std::min(o.top_k, n) : n;
  const double top = sorted[0].logit / o.temperature;
  std::vector<double> p(static_cast<size_t>(keep));
  double sum = 0;
  for (int64_t i = 0; i < keep; ++i) sum += p[i] = std::exp(sorted[i].logit / o.temperature - top);
  if (o.top_p < 1) {
    double cum = 0;
    int64_t k = 0;
    while (k < keep && cum < o.top_p * sum) cum += p[k++];
    keep = std::max<int64_t>(k, 1);
    sum = cum > 0 ? cum : p[0];
  }
  std::uniform_real_distribution<double> u(0.0, sum);
  const double x = u(rng);
  double acc = 0;
  for (int64_t i = 0; i < keep; ++i)
    if ((acc += p[i]) > x) return sorted[i].id;
  return sorted[keep - 1].id;
}

int64_t sample_token(std::span<const float> logits, const SamplingOptions& o, std::mt19937_64& rng) {
  check(!logits.empty(), "sampling needs at least one logit");
  check(!has_nan(logits), "the logits hold a NaN: nothing can be sampled");
  return sample_candidates(sampling_candidates(logits, 0, o), o, rng);
}

}  // namespace ringattn
