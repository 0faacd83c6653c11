// What every Communicator has whatever its backend: the timeout, the check that
// all ranks pass the same values, and ending the job on an error.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "comm/backend.h"
#include "ringattn/comm.h"
#include "ringattn/error.h"

namespace ringattn {

double parse_timeout(const std::string& text, const std::string& what) {
  if (text == "none") return 0;
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  check(!text.empty() && end && *end == '\0' && std::isfinite(v) && v > 0, what,
        " must be a positive number of seconds, or 'none' for no limit; got '", text, "'");
  return v;
}

void Communicator::set_timeout_seconds(double s) {
  check(s == 0 || (std::isfinite(s) && s > 0), "a timeout must be positive and finite seconds (0: no limit), got ", s);
  timeout_ = s;
}

void check_same_on_all_ranks(Communicator& comm, std::span<const int64_t> values, const std::string& what) {
  const int64_t n = static_cast<int64_t>(values.size());
  int64_t counts[2] = {n, n};
  comm.all_reduce(&counts[0], 1, ReduceOp::min);
  comm.all_reduce(&counts[1], 1, ReduceOp::max);
  if (counts[0] != counts[1])
    throw Error(cat(what, " differs across ranks: the number of entries is ", counts[0], " on some rank and ",
                    counts[1], " on another (this rank has ", n, ")"));
  if (n == 0) return;
  std::vector<int64_t> lo(values.begin(), values.end()), hi(values.begin(), values.end());
  comm.all_reduce(lo.data(), n, ReduceOp::min);
  comm.all_reduce(hi.data(), n, ReduceOp::max);
  for (int64_t i = 0; i < n; ++i)
    if (lo[static_cast<size_t>(i)] != hi[static_cast<size_t>(i)])
      throw Error(cat(what, " differs across ranks: entry ", i, " is ", lo[static_cast<size_t>(i)],
                      " on some rank and ", hi[static_cast<size_t>(i)], " on another (this rank has ",
                      values[static_cast<size_t>(i)], ")"));
}

void abort_job(Communicator* comm, const std::string& msg, int code) {
  int rank = 0;
  const bool mpi = comm_backend::mpi_world_rank(&rank);
  if (!mpi && comm) rank = comm->rank();
  std::fprintf(stderr, "ringattn: error on rank %d: %s\n", rank, msg.c_str());
  std::fflush(stderr);
  std::fflush(stdout);
  if (mpi) comm_backend::mpi_abort(code);
  std::exit(code);
}

}  // namespace ringattn
