// Tensor and pipeline parallelism (and their combinations with SP and DP) give
// the same loss and gradients as one process running the full model.
//
// Every rank builds the full model and data, computes the one-process reference,
// then runs its slice on a Mesh. Gradients are compared slice by slice
// (Model::copy_slice_from cuts the reference's gradients the same way), with the
// relative error max|diff| / max|ref| reduced over ranks so every rank agrees.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <utility>
#include <vector>

#include "ringattn/comm.h"
#include "ringattn/error.h"
#include "ringattn/layout.h"
#include "ringattn/model.h"
#include "ringattn/parallel.h"
#include "ringattn/pipeline.h"
#include "ringattn/tensor.h"

namespace ringattn {
namespace {

struct MeshShape {
  int dp, pp, sp, tp;
};

// Every factorisation dp·pp·sp·tp = P with pp | layers (4), tp | heads, kv, mlp.
std::vector<MeshShape> shapes(int P) {
  std::vector<MeshShape> v;
  for (int dp = 1; dp <= P; ++dp)
    for (int pp = 1; pp <= P; ++pp)
      for (int tp = 1; tp <= P; ++tp) {
        if (P % (dp * pp * tp)) continue;
        const int sp = P / (dp * pp * tp);
        if (4 % pp || 4 % tp || tp > 2 || (tp == 1 && pp == 1)) continue;  // TP or PP in every case
        v.push_back({dp, pp, sp, tp});
      }
  return v;
}

double max_rel(const float* got, const float* ref, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    num = std::max(num, static_cast<double>(std::fabs(got[i] - ref[i])));
    den = std::max(den, static_cast<double>(std::fabs(ref[i])));
  }
  return den > 0 ? num / den : num;
}

class ThreadsOne : public ::testing::Test {
 protected:
  void SetUp() override { saved_ = omp_get_max_threads(), omp_set_num_threads(1); }
  void TearDown() override { omp_set_num_threads(saved_); }
  int saved_ = 1;
};

TEST_F(ThreadsOne, TensorAndPipelineParallelMatchOneProcess) {
  auto world = mpi_world(120);
  const int P = world->size();
  ModelConfig c;
  c.layers = 4, c.d_model = 32, c.heads = 4, c.kv_heads = 2, c.mlp_hidden = 64, c.seed = 7;
  // fp32 causal and bidirectional; bf16 mixed precision (causal) against one
  // process in bf16: the same roundings, only fp32 summation orders differ.
  const std::pair<DType, bool> variants[] = {{DType::f32, true}, {DType::f32, false}, {DType::bf16, true}};
  for (const MeshShape& ms : shapes(P)) {
    for (const auto& [dtype, causal] : variants) {
      c.causal = causal, c.dtype = dtype;
      const bool bf16 = dtype == DType::bf16;
      const int64_t B = 2 * ms.dp * ms.pp, L = 16, D = c.d_model;  // micro-batches = pp per DP group
      SCOPED_TRACE(
          cat("dp ", ms.dp, " pp ", ms.pp, " sp ", ms.sp, " tp ", ms.tp, causal ? " causal" : "", bf16 ? " bf16" : ""));
      std::mt19937 rng(11);
      std::normal_distribution<float> nd(0.f, 1.f);
      Tensor x(DType::f32, {B, L, D}), t(DType::f32, {B, L, D});
      for (int64_t i = 0; i < x.numel(); ++i) x.ptr<float>()[i] = nd(rng), t.ptr<float>()[i] = nd(rng);
      // One process.
      Model full(c);
      Activations act;
      DeviceTensor y = model_forward(full, x, ModelParallel{}, act);
      Tensor dy(DType::f32, {B, L, D});
      const double loss_ref = mse_loss(y, t, dy, nullptr, x.numel());
      full.zero_grads();
      model_backward(full, act, dy, ModelParallel{});
      // The mesh, set up the way the commands do it.
      ParallelConfig pc;
      pc.dp = ms.dp, pc.pp = ms.pp, pc.sp = ms.sp, pc.tp = ms.tp, pc.layout = Layout::zigzag, pc.threads = 1;
      RunContext run(world.get(), pc);
      const Mesh& mesh = run.mesh();
      Model part = model_for(c, run);
      const int64_t Bl = B / ms.dp, Ll = L / ms.sp;
      Tensor xl(DType::f32, {Bl, Ll, D}), tl(DType::f32, {Bl, Ll, D});
      run.shard_batch(x, xl);
      run.shard_batch(t, tl);
      AdamW frozen;  // lr 0: the step leaves the parameters and keeps the gradients
      frozen.lr = 0, frozen.weight_decay = 0;
      const ModelParallel& par = run.model_parallel();
      const double loss = pipeline_step(part, &frozen, xl, tl, par, *mesh.pp_comm, static_cast<int>(ms.pp), x.numel(),
                                        run.replicas(), true);
      const double loss_fwd = pipeline_step(part, nullptr, xl, tl, par, *mesh.pp_comm, static_cast<int>(ms.pp),
                                            x.numel(), run.replicas(), false);
      Model ref(c, ms.tp, mesh.tp_index(), ms.pp, mesh.pp_index());
      ref.copy_slice_from(full, true);
      double errs[3] = {std::fabs(loss - loss_ref) / loss_ref, std::fabs(loss_fwd - loss_ref) / loss_ref,
                        max_rel(part.grads(), ref.grads(), part.num_params())};
      world->all_reduce(errs, 3, ReduceOp::max);
      EXPECT_LE(errs[0], bf16 ? 1e-3 : 1e-6) << "training loss";
      EXPECT_LE(errs[1], bf16 ? 1e-3 : 1e-6) << "forward-only loss";
      EXPECT_LE(errs[2], bf16 ? 2e-2 : 1e-5) << "gradients";
    }
  }
}

TEST(MeshErrors, ModelSlicesNeedDivisibleSizes) {
  ModelConfig c;
  c.layers = 3, c.d_model = 32, c.heads = 4, c.kv_heads = 2, c.mlp_hidden = 64;
  EXPECT_THROW(Model(c, 1, 0, 2, 0), Error);  // 3 layers over 2 stages
  EXPECT_THROW(Model(c, 4, 0), Error);        // 2 kv heads over 4 TP ranks
  EXPECT_THROW(Model(c, 2, 2), Error);        // TP rank out of range
  EXPECT_NO_THROW(Model(c, 2, 1));
}

TEST(MeshErrors, WrongProductThrowsOnEveryRank) {
  auto world = mpi_world(60);
  const int P = world->size();
  EXPECT_THROW(Mesh::build(*world, 1, P, 1, 2), Error);
  EXPECT_NO_THROW(Mesh::build(*world, 1, P, 1, 1));
}

}  // namespace
}  // namespace ringattn
