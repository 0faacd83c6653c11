// Causal attention over a sequence split across the ranks of `mpirun -np P`: the
// ring (RA+SP) on each rank's zigzag shard, checked against local attention of
// the whole sequence on rank 0. Exits 1 when they differ beyond fp32 rounding.
#include <cstdio>

#include "ringattn/comm.h"
#include "ringattn/cpu/attention.h"
#include "ringattn/dist_attention.h"
#include "ringattn/layout.h"

using namespace ringattn;

int main(int argc, char** argv) {
  MpiSession mpi(&argc, &argv);
  auto world = mpi_world();
  const int P = world->size(), p = world->rank();
  const int64_t B = 1, L = 512 * P, H = 4, d = 64;
  std::mt19937_64 rng(7);  // the same full tensors on every rank
  Tensor q = random_normal(DType::f32, {B, L, H, d}, rng), k = random_normal(DType::f32, {B, L, H, d}, rng),
         v = random_normal(DType::f32, {B, L, H, d}, rng);

  DistAttentionOptions ring;
  ring.causal = true, ring.layout = Layout::zigzag;
  Tensor ql(DType::f32, {B, L / P, H, d}), kl(DType::f32, {B, L / P, H, d}), vl(DType::f32, {B, L / P, H, d}),
      ol(DType::f32, {B, L / P, H, d}), lsel(DType::f32, {B, H, L / P});
  for (auto [full, mine] : {std::pair{&q, &ql}, {&k, &kl}, {&v, &vl}}) shard(*full, *mine, ring.layout, P, p);
  dist_attention_forward(*world, ql, kl, vl, ol, lsel, ring);

  Tensor o(DType::f32, {B, L, H, d}), lse(DType::f32, {B, H, L});
  AttentionOptions local;
  local.causal = true;
  attention_forward(q, k, v, o, lse, local);
  Tensor mine(DType::f32, {B, L / P, H, d});  // this rank's rows of the local result
  shard(o, mine, ring.layout, P, p);
  double err = max_abs_diff(mine, ol);
  world->all_reduce(&err, 1, ReduceOp::max);
  if (p == 0) std::printf("ring attention over %d ranks, L=%lld: max |ring - local| = %.2e\n", P, (long long)L, err);
  return err < 1e-5 ? 0 : 1;
}
