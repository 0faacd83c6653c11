// RoPE under sequence parallelism: each rank rotates its own shard of q and k by
// the tokens' *global* positions (shard_positions of the layout), then the
// distributed attention runs; the result must equal rotating the whole sequence
// by 0..L−1 and attending on one process, for every layout and strategy — and
// rotating by the shard's local indices instead must not (the classic bug).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "ringattn/comm.h"
#include "ringattn/cpu/attention.h"
#include "ringattn/cpu/layers.h"
#include "ringattn/dist_attention.h"
#include "ringattn/layout.h"
#include "test_util.h"

namespace ringattn::testing {
namespace {

double max_rel(const TensorView& got, const TensorView& want) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < want.numel(); ++i) {
    num = std::max(num, std::fabs(double(got.ptr<float>()[i]) - want.ptr<float>()[i]));
    den = std::max(den, std::fabs(double(want.ptr<float>()[i])));
  }
  return num / den;
}

TEST(RopeDistributed, GlobalPositionsUnderEveryLayoutAndStrategy) {
  auto comm = mpi_world(60);
  const int P = comm->size(), p = comm->rank();
  const int64_t L = 2 * P * 12, H = 2 * P, Hkv = P, d = 16;  // heads divisible by P for Ulysses
  RopeConfig rope;
  rope.theta = 500000, rope.type = "llama3", rope.factor = 8, rope.original_max_positions = 32;
  const std::vector<float> inv_freq = rope_inv_freq(rope, d);
  std::mt19937_64 rng(11);  // the same full tensors on every rank
  const Tensor q = random_normal(DType::f32, {1, L, H, d}, rng), k = random_normal(DType::f32, {1, L, Hkv, d}, rng),
               v = random_normal(DType::f32, {1, L, Hkv, d}, rng);
  // One process: rotate by 0..L−1, attend causally.
  Tensor qr(DType::f32, {1, L, H, d}), kr(DType::f32, {1, L, Hkv, d}), o(DType::f32, {1, L, H, d}),
      lse(DType::f32, {1, H, L});
  copy_into(qr, q), copy_into(kr, k);
  std::vector<int64_t> all(L);
  for (int64_t t = 0; t < L; ++t) all[t] = t;
  rope_forward(L, H, d, H * d, qr.ptr<float>(), all.data(), inv_freq.data());
  rope_forward(L, Hkv, d, Hkv * d, kr.ptr<float>(), all.data(), inv_freq.data());
  AttentionOptions causal;
  causal.causal = true;
  attention_forward(qr, kr, v, o, lse, causal);

  const int64_t Ll = L / P;
  for (Layout layout : {Layout::contiguous, Layout::zigzag, Layout::striped})
    for (Strategy strategy : {Strategy::ring, Strategy::allgather, Strategy::ulysses})
      for (bool global : {true, false}) {
        Tensor ql(DType::f32, {1, Ll, H, d}), kl(DType::f32, {1, Ll, Hkv, d}), vl(DType::f32, {1, Ll, Hkv, d}),
            ol(DType::f32, {1, Ll, H, d}), lsel(DType::f32, {1, H, Ll}), want(DType::f32, {1, Ll, H, d});
        shard(q, ql, layout, P, p), shard(k, kl, layout, P, p), shard(v, vl, layout, P, p);
        shard(o, want, layout, P, p);
        std::vector<int64_t> pos = shard_positions(layout, L, P, p);
        if (!global)
          for (int64_t t = 0; t < Ll; ++t) pos[t] = t;  // the bug: the shard's own indices
        rope_forward(Ll, H, d, H * d, ql.ptr<float>(), pos.data(), inv_freq.data());
        rope_forward(Ll, Hkv, d, Hkv * d, kl.ptr<float>(), pos.data(), inv_freq.data());
        DistAttentionOptions opt;
        opt.strategy = strategy, opt.layout = layout, opt.causal = true;
        dist_attention_forward(*comm, ql, kl, vl, ol, lsel, opt);
        double err = max_rel(ol, want);
        comm->all_reduce(&err, 1, ReduceOp::max);
        const std::string what = cat(layout_name(layout), " ", strategy_name(strategy), " on ", P, " ranks");
        if (global) {
          EXPECT_LT(err, 1e-5) << what << ": rotated by global positions";
        } else if (P > 1) {
          EXPECT_GT(err, 1e-2) << what << ": rotating by local indices went unnoticed";
        }
      }
}

}  // namespace
}  // namespace ringattn::testing
