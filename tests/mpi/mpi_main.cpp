// main() of ringattn_mpi_tests: every rank runs the same GoogleTest list under one
// MPI session. Rank 0 prints the usual report; other ranks print only their own
// failures (prefixed with the rank). All ranks exit with the same code: non-zero
// if any rank failed.
//
// RINGATTN_MPI_TEST_ABORT=1 instead checks abort_job: rank 1 aborts the job while
// the other ranks wait in a barrier (run by the mpi_abort_np3 CTest test).
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include "ringattn/comm.h"

namespace {

// Failure lines of a non-zero rank, so a failure there is not silent.
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  // The test's name is kept here: UnitTest::current_test_info() must not be
  // called from OnTestPartResult (gtest holds its mutex there: deadlock).
  void OnTestStart(const ::testing::TestInfo& t) override { name_ = std::string(t.test_suite_name()) + "." + t.name(); }
  void OnTestEnd(const ::testing::TestInfo&) override { name_ = "(outside a test)"; }
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] FAILED %s at %s:%d\n%s\n", rank_, name_.c_str(),
                 r.file_name() ? r.file_name() : "?", r.line_number(), r.message());
    std::fflush(stderr);
  }

 private:
  int rank_;
  std::string name_ = "(outside a test)";
};

int abort_check() {
  auto world = ringattn::mpi_world();
  if (world->rank() == 1) ringattn::abort_job(world.get(), "deliberate abort from the test", 3);
  world->barrier();  // ended by rank 1's abort
  std::fprintf(stderr, "rank %d: barrier returned although rank 1 aborted\n", world->rank());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  ringattn::MpiSession session(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (const char* a = std::getenv("RINGATTN_MPI_TEST_ABORT"); a && a[0] == '1') {
    try {
      return abort_check();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
      return 1;
    }
  }

  ::testing::InitGoogleTest(&argc, argv);
  auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
  if (rank != 0) {
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(rank));
  }
  int failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  int any_failed = failed;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0 && any_failed && !failed) std::fprintf(stderr, "FAILED on another rank (see [rank N] lines)\n");
  return any_failed;
}
