// ringattn — exact attention over long sequences (Ring Attention + Sequence
// Parallelism). Exit codes: 0 success, 1 runtime error, 2 usage error.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>

#include "cli/commands.h"
#include "ringattn/comm.h"
#include "ringattn/cpu/features.h"
#include "ringattn/error.h"
#include "ringattn/version.h"

namespace {

// MPI starts when mpirun launched us, for `generate` (a one-rank job without
// mpirun; not with --device cuda, whose one rank runs in-process), or when a
// distributed option asks for it.
bool wants_cuda(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], "--device=cuda") == 0 ||
        (std::strcmp(argv[i], "--device") == 0 && i + 1 < argc && std::strcmp(argv[i + 1], "cuda") == 0))
      return true;
  return false;
}

bool wants_mpi(int argc, char** argv) {
  if (ringattn::launched_by_mpi()) return true;
  bool generate = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "generate") == 0) generate = true;
    if (std::strncmp(argv[i], "--strategy", 10) == 0 || std::strncmp(argv[i], "--method", 8) == 0) return true;
  }
  return generate && !wants_cuda(argc, argv);
}

// A failed rank ends the whole job (MPI_Abort) so no peer waits for it.
int fail(const char* what, const char* msg) {
  if (ringattn::MpiSession::active()) ringattn::abort_job(nullptr, msg, 1);
  std::fprintf(stderr, "ringattn: %s: %s\n", what, msg);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  // GPU runs load every kernel when CUDA starts, not at its first launch, so no
  // timed step pays for a kernel the warm-up did not use (unless the user chose).
  if (wants_cuda(argc, argv)) setenv("CUDA_MODULE_LOADING", "EAGER", 0);
  // Before the OpenMP runtime starts a thread (an absurd count crashes it); ranks
  // started together on one machine divide its CPUs unless OMP_NUM_THREADS says.
  try {
    ringattn::check_omp_num_threads_env();
    ringattn::share_cpus_with_local_ranks();
  } catch (const ringattn::Error& e) {
    std::fprintf(stderr, "ringattn: error: %s\n", e.what());
    return 2;
  }
  std::optional<ringattn::MpiSession> mpi;
  if (wants_mpi(argc, argv)) mpi.emplace(&argc, &argv);
  CLI::App app{"ringattn: exact attention over long sequences by Ring Attention + Sequence Parallelism"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "ringattn " RINGATTN_VERSION);
  ringattn::cli::add_all(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  } catch (const ringattn::Error& e) {
    return fail("error", e.what());
  } catch (const std::exception& e) {
    return fail("internal error", e.what());
  }
  return 0;
}
