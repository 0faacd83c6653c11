// The Communicator: the one interface the distributed code talks to, so the ring
// schedule is written once. Three backends implement it: MPI (CPU clusters, across
// hosts), NCCL (GPUs: the same calls stream-ordered, a Request is then an event)
// and local (several ranks of one process sharing one GPU: the one-GPU ring in
// tests and `bench --ring-ranks`).
//
// Every wait is bounded: a peer that does not answer within timeout_seconds()
// makes the call throw ringattn::Error naming this rank, the peer and the
// operation. The CLI turns any Error into a job-wide abort, so no rank is left
// waiting forever.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

namespace ringattn {

enum class ReduceOp { sum, max, min };

// A pending point-to-point transfer; id indexes the backend's table.
struct Request {
  int64_t id = -1;
  bool pending() const { return id >= 0; }
};

// Traffic and waiting seen by one communicator (point to point and collectives).
struct CommStats {
  int64_t bytes_sent = 0;
  int64_t bytes_received = 0;
  int64_t messages_sent = 0;
  double wait_seconds = 0;  // time spent blocked in wait/collectives
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // Non-blocking point to point. The buffer must stay valid and untouched until
  // the request completes. Tags must be >= 0.
  Request isend(const void* buf, size_t bytes, int dst, int tag) {
    return post(const_cast<void*>(buf), bytes, dst, tag, /*is_recv=*/false);  // a send only reads buf
  }
  Request irecv(void* buf, size_t bytes, int src, int tag) { return post(buf, bytes, src, tag, /*is_recv=*/true); }
  // Blocks until r completes (bounded); r becomes not pending.
  virtual void wait(Request& r) = 0;
  // True (and r becomes not pending) when r has completed.
  virtual bool test(Request& r) = 0;
  void wait_all(std::span<Request> rs) {
    for (Request& r : rs) wait(r);
  }
  // Drives every outstanding transfer forward without blocking. MPI moves large
  // (rendezvous) messages only inside MPI calls, so compute loops call this
  // between tiles to overlap communication with computation.
  virtual void progress() = 0;

  // Collectives over all ranks of this communicator (bounded).
  virtual void all_reduce(float* buf, int64_t count, ReduceOp op) = 0;
  virtual void all_reduce(double* buf, int64_t count, ReduceOp op) = 0;
  virtual void all_reduce(int64_t* buf, int64_t count, ReduceOp op) = 0;
  // recv holds size() blocks of `bytes` each, block r from rank r.
  virtual void all_gather(const void* send, void* recv, size_t bytes) = 0;
  // send and recv hold size() blocks of `bytes`; block r of send goes to rank r,
  // block r of recv comes from rank r.
  virtual void all_to_all(const void* send, void* recv, size_t bytes) = 0;
  virtual void broadcast(void* buf, size_t bytes, int root) = 0;
  virtual void barrier() = 0;
  // Sub-communicator of the ranks with the same color, ordered by key (then rank).
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  virtual std::string backend() const = 0;  // "mpi", "nccl", "local"
  // 0: no limit (parse_timeout's "none"); otherwise positive and finite.
  double timeout_seconds() const { return timeout_; }
  void set_timeout_seconds(double s);
  const CommStats& stats() const { return stats_; }
  void reset_stats() { stats_ = {}; }

 protected:
  // What a backend does for isend (is_recv false) and irecv to/from `peer`.
  virtual Request post(void* buf, size_t bytes, int peer, int tag, bool is_recv) = 0;
  double timeout_ = 300;
  CommStats stats_;
};

// A wait limit as users write it: a positive, finite number of seconds, or
// "none" for no limit (returned as 0). Anything else (0, negative, nan, inf,
// text) is an Error naming `what`: a non-positive limit once meant "wait forever"
// by accident, so a stopped rank hung the job.
double parse_timeout(const std::string& text, const std::string& what);

// Checks that every rank passes the same values (shapes, dtype, options): on a
// mismatch every rank throws Error naming `what`, the differing entry and the
// range of values seen, so no rank goes on alone.
void check_same_on_all_ranks(Communicator& comm, std::span<const int64_t> values, const std::string& what);

// Ends the job on every rank with `code` after printing msg (used on any Error).
// Under MPI the rank first waits up to 3 s for the other ranks to fail too (a
// barrier on a communicator of its own), so an error found on every rank is
// printed by every rank before MPI_Abort ends the job.
[[noreturn]] void abort_job(Communicator* comm, const std::string& msg, int code = 1);

// ---- MPI backend ---------------------------------------------------------------
// Initialises MPI (MPI_THREAD_FUNNELED) for the process lifetime; finalises on
// destruction. Errors on MPI_COMM_WORLD are returned, not fatal.
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  static bool active();  // MPI initialised and not finalised
};

// MPI_COMM_WORLD as a Communicator (needs an MpiSession).
std::unique_ptr<Communicator> mpi_world(double timeout_seconds = 300);
// A duplicate of an MPI communicator another library made (mpi4py's
// comm.py2f(): the Fortran handle, the same integer under every MPI), for
// MPI initialised by anyone with at least MPI_THREAD_FUNNELED.
std::unique_ptr<Communicator> mpi_from_fortran_handle(int64_t handle, double timeout_seconds = 300);

// True when this process was started by mpirun/mpiexec (OpenMPI/MPICH env vars).
bool launched_by_mpi();

}  // namespace ringattn
