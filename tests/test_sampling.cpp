// Sampling the next token: greedy is the argmax; top-k and top-p keep exactly
// the tokens Hugging Face's warpers keep; sampled frequencies follow the softmax
// of logits / temperature over what is kept; a seed repeats a run; bad options
// are refused by name.
#include "ringattn/sampling.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <vector>

#include "test_util.h"

namespace ringattn::testing {
namespace {

std::map<int64_t, double> frequencies(const std::vector<float>& z, const SamplingOptions& o, int n) {
  std::mt19937_64 rng(1);
  std::map<int64_t, double> f;
  for (int i = 0; i < n; ++i) f[sample_token(z, o, rng)] += 1.0 / n;
  return f;
}

TEST(Sampling, GreedyIsTheArgmax) {
  std::mt19937_64 rng(0);
  EXPECT_EQ(sample_token(std::vector<float>{0.1f, 3.f, -1.f, 3.f}, {}, rng), 1);  // the lower id on a tie
  SamplingOptions top1;
  top1.greedy = false, top1.top_k = 1;
  EXPECT_EQ(sample_token(std::vector<float>{0.1f, 3.f, 5.f}, top1, rng), 2);
}

TEST(Sampling, FrequenciesFollowTheTemperedSoftmax) {
  const std::vector<float> z = {1.f, 2.f, 0.f, -1.f};
  SamplingOptions o;
  o.greedy = false, o.temperature = 0.7f;
  const auto f = frequencies(z, o, 40000);
  double sum = 0;
  for (float x : z) sum += std::exp(x / 0.7);
  for (int64_t i = 0; i < 4; ++i) EXPECT_NEAR(f.count(i) ? f.at(i) : 0, std::exp(z[i] / 0.7) / sum, 0.01) << i;
}

TEST(Sampling, TopKAndTopPKeepWhatHuggingFaceKeeps) {
  // softmax(z) = 0.5, 0.25, 0.125, 0.0625, 0.0625 (ln-spaced logits)
  const std::vector<float> z = {std::log(8.f), std::log(4.f), std::log(2.f), 0.f, 0.f};
  SamplingOptions k2;
  k2.greedy = false, k2.top_k = 2;
  auto f = frequencies(z, k2, 30000);
  EXPECT_EQ(f.size(), 2u);
  EXPECT_NEAR(f[0], 2.0 / 3, 0.01);
  SamplingOptions p;
  p.greedy = false, p.top_p = 0.7f;  // 0.5 < 0.7 <= 0.75: the two most likely tokens
  f = frequencies(z, p, 30000);
  EXPECT_EQ(f.size(), 2u);
  EXPECT_NEAR(f[1], 1.0 / 3, 0.01);
  p.top_p = 0.75f;  // exactly 0.5 + 0.25: still two (the sum reaches top_p)
  EXPECT_EQ(frequencies(z, p, 3000).size(), 2u);
  p.top_p = 0.01f;  // at least one token is always kept
  EXPECT_EQ(frequencies(z, p, 300).size(), 1u);
}

TEST(Sampling, ASeedRepeatsARun) {
  const std::vector<float> z = {0.3f, 0.1f, 0.2f, 0.4f, 0.f};
  SamplingOptions o;
  o.greedy = false, o.top_p = 0.9f, o.top_k = 4, o.temperature = 1.3f;
  std::mt19937_64 a(42), b(42);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(sample_token(z, o, a), sample_token(z, o, b));
}

// A row split into parts (a vocabulary-parallel head): every part's candidates,
// merged, give sample_token's pick on the whole row and leave the generator in the
// same state — greedy, top-k, top-p, both, any temperature, ties across parts.
TEST(Sampling, CandidatesOfPartsPickWhatTheWholeRowPicks) {
  std::mt19937_64 gen(5);
  std::uniform_real_distribution<float> u(-3.f, 3.f);
  for (int trial = 0; trial < 300; ++trial) {
    const int64_t V = 1 + static_cast<int64_t>(gen() % 40), T = 1 + static_cast<int64_t>(gen() % 5);
    std::vector<float> z(static_cast<size_t>(V));
    for (float& x : z) x = trial % 3 == 0 ? static_cast<float>(gen() % 4) : u(gen);  // many ties every third row
    SamplingOptions o;
    o.greedy = trial % 5 == 0;
    o.temperature = 0.5f + static_cast<float>(trial % 4) * 0.4f;
    o.top_k = static_cast<int64_t>(gen() % 6);
    o.top_p = trial % 2 ? 1.f : 0.3f + static_cast<float>(trial % 7) * 0.1f;
    std::vector<TokenCandidate> merged;
    for (int64_t r = 0; r < T; ++r) {
      const int64_t a = r * V / T, b = (r + 1) * V / T;
      const std::vector<TokenCandidate> c =
          sampling_candidates(std::span<const float>(z.data() + a, static_cast<size_t>(b - a)), a, o);
      EXPECT_EQ(static_cast<int64_t>(c.size()), candidates_per_part(o, b - a));
      merged.insert(merged.end(), c.begin(), c.end());
    }
    std::sort(merged.begin(), merged.end(), before);
    std::mt19937_64 r1(trial), r2(trial);
    EXPECT_EQ(sample_candidates(merged, o, r1), sample_token(z, o, r2))
        << "trial " << trial << " V=" << V << " T=" << T;
    EXPECT_EQ(r1(), r2()) << "trial " << trial;
  }
}

TEST(Sampling, BadOptionsAreRefusedByName) {
  std::mt19937_64 rng(0);
  const std::vector<float> z = {1.f, 2.f};
  SamplingOptions o;
  o.greedy = false;
  o.temperature = 0;
  EXPECT_NE(message_of([&] { (void)sample_token(z, o, rng); }).find("--temperature"), std::string::npos);
  o.temperature = 1, o.top_k = -1;
  EXPECT_NE(message_of([&] { (void)sample_token(z, o, rng); }).find("--top-k"), std::string::npos);
  o.top_k = 0, o.top_p = 1.5f;
  EXPECT_NE(message_of([&] { (void)sample_token(z, o, rng); }).find("--top-p"), std::string::npos);
  EXPECT_NE(message_of([&] {
              (void)sample_token(std::vector<float>{1.f, NAN}, {}, rng);
            }).find("NaN"),
            std::string::npos);
}

}  // namespace
}  // namespace ringattn::testing
