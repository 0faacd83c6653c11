// Helpers of the MPI tests (every rank runs the same test body).
#pragma once
#include <gtest/gtest.h>

#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "ringattn/comm.h"
#include "ringattn/error.h"
#include "test_util.h"

namespace ringattn::testing {

// Bounded waits: a mistake in a test or the library fails in a minute, not hangs.
constexpr double kCommTimeout = 60;

// This process's world rank, once world() has run (for rank-0-only printing).
inline int g_rank = -1;

inline std::unique_ptr<Communicator> world() {
  auto c = mpi_world(kCommTimeout);
  g_rank = c->rank();
  return c;
}

// Max of each entry over all ranks (so every rank decides the same).
inline std::vector<double> max_over_ranks(Communicator& comm, std::vector<double> v) {
  comm.all_reduce(v.data(), static_cast<int64_t>(v.size()), ReduceOp::max);
  return v;
}

// Every rank expects `f` to throw ringattn::Error whose message contains any of
// `needles`; the ranks compare notes, so a rank that went on alone fails too.
template <typename F>
void expect_error_everywhere(Communicator& comm, F&& f, std::initializer_list<const char*> needles,
                             const std::string& what) {
  double threw = 0, matched = 0;
  std::string msg;
  try {
    f();
  } catch (const Error& e) {
    threw = 1;
    msg = e.what();
    matched = contains_any(msg, needles) ? 1 : 0;
  }
  double mine[2] = {threw, matched};
  comm.all_reduce(mine, 2, ReduceOp::min);  // every rank must have thrown (and matched)
  EXPECT_EQ(threw, 1) << what << ": no ringattn::Error on rank " << comm.rank();
  EXPECT_EQ(matched, 1) << what << ": message does not say why: '" << msg << "'";
  EXPECT_EQ(mine[0], 1) << what << ": some rank did not throw";
  EXPECT_EQ(mine[1], 1) << what << ": some rank's message does not say why";
}

}  // namespace ringattn::testing
