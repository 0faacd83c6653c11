// Greedy and temperature / top-k / top-p sampling of the next token.
#include "ringattn/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "ringattn/error.h"

namespace ringattn {

void check_sampling(const SamplingOptions& o) {
  check(std::isfinite(o.temperature) && o.temperature > 0, "--temperature must be positive and finite, got ",
        o.temperature);
  check(o.top_k >= 0, "--top-k must be >= 0 (0: off), got ", o.top_k);
  check(std::isfinite(o.top_p) && o.top_p > 0 && o.top_p <= 1, "--top-p must be in (0, 1], got ", o.top_p);
}

int64_t sample_token(std::span<const float> logits, const SamplingOptions& o, std::mt19937_64& rng) {
  const int64_t V = static_cast<int64_t>(logits.size());
  check(V >= 1, "sampling needs at least one logit");
  for (float z : logits) check(!std::isnan(z), "the logits hold a NaN: nothing can be sampled");
  if (o.greedy) return std::max_element(logits.begin(), logits.end()) - logits.begin();
  check_sampling(o);
  // Tokens by decreasing logit (ties: lower id first); the ones top_k and top_p keep.
  std::vector<int64_t> order(static_cast<size_t>(V));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return logits[a] > logits[b]; });
  int64_t keep = o.top_k > 0 ? std::min(o.top_k, V) : V;
  const double top = logits[order[0]] / o.temperature;
  std::vector<double> p(static_cast<size_t>(keep));
  double sum = 0;
  for (int64_t i = 0; i < keep; ++i) sum += p[i] = std::exp(logits[order[i]] / o.temperature - top);
  if (o.top_p < 1) {
    double cum = 0;
    int64_t n = 0;
    while (n < keep && cum < o.top_p * sum) cum += p[n++];
    keep = std::max<int64_t>(n, 1);
    sum = cum > 0 ? cum : p[0];
  }
  std::uniform_real_distribution<double> u(0.0, sum);
  const double x = u(rng);
  double acc = 0;
  for (int64_t i = 0; i < keep; ++i)
    if ((acc += p[i]) > x) return order[i];
  return order[keep - 1];
}

}  // namespace ringattn
