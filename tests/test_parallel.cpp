// ParallelConfig and RunContext: the one setup of a parallel run refuses a bad
// mesh, strategy or device with a message naming the option, before any group
// or device exists; on one process it is the plain single-rank run.
#include <gtest/gtest.h>

#include <fstream>
#include <functional>
#include <random>
#include <string>

#include "ringattn/cuda.h"
#include "ringattn/error.h"
#include "ringattn/model.h"
#include "ringattn/parallel.h"
#include "test_util.h"

namespace ringattn::testing {
namespace {

ParallelConfig mesh(int dp, int pp, int sp, int tp) {
  ParallelConfig p;
  p.dp = dp, p.pp = pp, p.sp = sp, p.tp = tp;
  return p;
}

TEST(ParallelConfig, TheSequenceGroupTakesTheRanksLeft) {
  EXPECT_EQ(mesh(2, 1, 0, 1).for_ranks(8).sp, 4);
  EXPECT_EQ(mesh(1, 2, 0, 2).for_ranks(8).sp, 2);
  EXPECT_EQ(mesh(1, 1, 0, 1).for_ranks(1).sp, 1);
}

TEST(ParallelConfig, AMeshThatDoesNotMatchTheRanksNamesTheOptions) {
  const std::string m = message_of([] { (void)mesh(1, 1, 2, 2).for_ranks(2); });
  EXPECT_NE(m.find("--sp 2 x --tp 2"), std::string::npos) << m;
  EXPECT_NE(m.find("must equal the 2 ranks"), std::string::npos) << m;
  EXPECT_NE(message_of([] { (void)mesh(3, 1, 0, 1).for_ranks(8); }).find("must equal the 8 ranks"), std::string::npos);
  EXPECT_NE(message_of([] { (void)mesh(0, 1, 0, 1).for_ranks(8); }).find("--dp"), std::string::npos);
}

TEST(ParallelConfig, TheUlyssesDegreeBelongsToTheHybridStrategy) {
  ParallelConfig p = mesh(1, 1, 4, 1);
  p.strategy = Strategy::hybrid;
  EXPECT_NE(message_of([&] { (void)p.for_ranks(4); }).find("needs --ulysses"), std::string::npos);
  p.ulysses = 3;  // does not divide sp = 4
  EXPECT_NE(message_of([&] { (void)p.for_ranks(4); }).find("dividing the SP group of 4"), std::string::npos);
  p.ulysses = 2;
  EXPECT_EQ(p.for_ranks(4).ulysses, 2);
  EXPECT_EQ(p.strategy_label(), "hybrid (ulysses 2 x ring)");
  p.strategy = Strategy::ring;  // --ulysses 2 without --strategy hybrid
  EXPECT_NE(message_of([&] { (void)p.for_ranks(4); }).find("--strategy hybrid"), std::string::npos);
}

// The document layouts' shards follow one set of documents; the model's packed
// rows each have their own, so the model refuses them (attention takes them).
TEST(ParallelConfig, TheModelRefusesTheDocumentLayouts) {
  for (Layout l : {Layout::doc_zigzag, Layout::doc_balanced}) {
    ParallelConfig p = mesh(1, 1, 0, 1);
    p.layout = l;
    EXPECT_NE(
        message_of([&] { (void)p.for_ranks(2); }).find(cat(layout_name(l), " layout is taken by `ringattn attention`")),
        std::string::npos);
  }
}

TEST(ParallelConfig, TheGpuRunsRaSpAloneAndOnlyWhereThereIsOne) {
  ParallelConfig p = mesh(1, 1, 0, 2);
  p.cuda = true;
  EXPECT_NE(message_of([&] { (void)p.for_ranks(2); }).find("--device cuda runs RA+SP alone"), std::string::npos);
  p.tp = 1;
  if (!cuda_built() || cuda_device_count() == 0) {
    EXPECT_NE(message_of([&] { (void)p.for_ranks(2); }).find("--device cuda"), std::string::npos);
  }
}

// cuBLAS is opened when a CUDA device is made (src/kernels/cuda/cublas_loader.h),
// never at process start: linked, its initialisers cost every process (each MPI
// rank, each CPU run) ~0.1 s of CPU and ~100 MB of touched pages.
TEST(CudaPath, CublasIsNotLoadedAtProcessStart) {
  std::ifstream maps("/proc/self/maps");
  ASSERT_TRUE(maps.good());
  std::string line;
  while (std::getline(maps, line)) EXPECT_EQ(line.find("libcublas"), std::string::npos) << line;
}

TEST(ParallelConfig, TheModelMustSplitOverTheMesh) {
  ModelConfig c;
  c.layers = 4, c.d_model = 48, c.heads = 3, c.kv_heads = 3, c.mlp_hidden = 96;
  ParallelConfig p = mesh(1, 1, 2, 1);
  EXPECT_NO_THROW(check_model_fits(c, p));  // the ring splits the sequence, not the heads
  p.strategy = Strategy::ulysses;           // 3 heads over 2 SP ranks
  const std::string m = message_of([&] { check_model_fits(c, p); });
  EXPECT_NE(m.find("heads=3"), std::string::npos) << m;
  EXPECT_NE(m.find("--strategy ring"), std::string::npos) << m;
  EXPECT_NE(message_of([&] { check_model_fits(c, mesh(1, 1, 1, 2)); }).find("tp=2"), std::string::npos);
  EXPECT_NE(message_of([&] { check_model_fits(c, mesh(1, 3, 1, 1)); }).find("pp=3"), std::string::npos);
  // Any length with a token per rank (uneven shards: 14 over 4 ranks is 3 or 4 each).
  EXPECT_NO_THROW(mesh(1, 1, 4, 1).check_sequence(14));
  EXPECT_NE(message_of([] { mesh(1, 1, 4, 1).check_sequence(3); }).find("would hold no token"), std::string::npos);
}

TEST(RunContext, OneProcessIsThePlainRun) {
  RunContext run(nullptr, ParallelConfig{});
  EXPECT_EQ(run.config().sp, 1);
  EXPECT_EQ(run.model_parallel().sp, nullptr);
  EXPECT_EQ(run.model_parallel().tp, nullptr);
  EXPECT_EQ(run.replicas(), nullptr);
  EXPECT_EQ(run.device(), nullptr);
  EXPECT_EQ(run.bytes_sent(), 0);
  std::mt19937_64 rng(3);
  const Tensor full = random_normal(DType::f32, {2, 8, 4}, rng);
  Tensor mine(DType::f32, {2, 8, 4});
  EXPECT_EQ(run.shard_length(8), 8);
  run.shard_batch(full, mine);  // one rank holds every row and token, in order
  EXPECT_EQ(max_abs_diff(full, mine), 0.0);
  EXPECT_THROW(RunContext(nullptr, mesh(2, 1, 0, 1)), Error);  // dp = 2 on one process
}

}  // namespace
}  // namespace ringattn::testing
