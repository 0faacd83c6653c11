// MPI backend of ringattn::Communicator (see include/ringattn/comm.h).
//
// Every MPI call's return code is checked (MPI_COMM_WORLD and every communicator
// made here return errors instead of aborting); a failure throws ringattn::Error
// naming this rank, the operation, the peer and MPI's own error text.
//
// Bounded waits. MPI has no timed wait, so wait() and every collective poll
// (MPI_Testall / MPI_Test on non-blocking MPI-3 operations) until done or until
// timeout_seconds() have passed. Between polls a waiting rank spins briefly, then
// yields (for 1 ms plus the transfer's time at 1 GB/s), then sleeps ~20 µs per
// poll, so that it does not steal the core of a computing rank when ranks
// outnumber cores. On a timeout:
//   - point to point: the request is cancelled (MPI_Cancel; freed if the cancel
//     does not complete) and dropped, so a later message cannot land in it;
//   - collectives: MPI cannot cancel them; the request is abandoned and the
//     communicator refuses further collectives (the ranks would be out of step).
// A timeout of 0 (or less) means no limit.
//
// Environment:
//   RINGATTN_TIMEOUT          seconds (positive, e.g. 30 or 0.5) or "none" (no
//                             limit): replaces the timeout passed to mpi_world().
//   RINGATTN_MPI_CHUNK_BYTES  the most bytes one MPI call moves (default and cap:
//                             1 GiB). Larger point-to-point messages become several
//                             MPI messages behind one Request; larger collective
//                             blocks use a derived datatype; long all_reduces run in
//                             pieces. Lowered by the tests to exercise those paths.
//
// Message sizes: a receive must be posted with exactly the size that was sent
// (more → MPI truncation error, fewer → Error "received only N of M bytes").
//
// CommStats: as comm/backend.h says; an irecv counts the bytes actually received,
// when it completes. wait_seconds adds the time spent inside wait() and inside collectives.
#include <mpi.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "comm/backend.h"
#include "ringattn/comm.h"
#include "ringattn/error.h"

namespace ringattn {
namespace {

using namespace comm_backend;

constexpr size_t kDefaultChunkBytes = size_t{1} << 30;  // 1 GiB

bool g_we_initialised = false;
// A duplicate of MPI_COMM_WORLD used by nothing but mpi_abort's last barrier, so
// that barrier can never be matched against a collective the job is running.
MPI_Comm g_abort_comm = MPI_COMM_NULL;
// How long a failing rank waits for the others before ending the job: input
// errors are found on every rank, and each should print its own message before
// MPI_Abort kills the rest; a rank that failed alone waits this long, once.
constexpr double kAbortGraceSeconds = 3.0;

std::string mpi_error_string(int code) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, buf, &len) != MPI_SUCCESS) return cat("MPI error code ", code);
  return std::string(buf, static_cast<size_t>(len));
}

// The first real error code behind MPI_ERR_IN_STATUS.
int status_error(int rc, const MPI_Status* st, int n) {
  if (rc != MPI_ERR_IN_STATUS) return rc;
  for (int i = 0; i < n; ++i)
    if (st[i].MPI_ERROR != MPI_SUCCESS && st[i].MPI_ERROR != MPI_ERR_PENDING) return st[i].MPI_ERROR;
  return rc;
}

double env_timeout(double fallback) {
  const char* s = std::getenv("RINGATTN_TIMEOUT");
  if (!s || !*s) return fallback;
  return parse_timeout(s, "RINGATTN_TIMEOUT");
}

size_t env_chunk_bytes() {
  const char* s = std::getenv("RINGATTN_MPI_CHUNK_BYTES");
  if (!s || !*s) return kDefaultChunkBytes;
  char* end = nullptr;
  long long v = std::strtoll(s, &end, 10);
  check(end && *end == '\0' && v > 0, "RINGATTN_MPI_CHUNK_BYTES must be a positive number of bytes, got '", s, "'");
  return std::min(static_cast<size_t>(v), kDefaultChunkBytes);
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Polling pace: spin for the first few µs (fast replies), then poll with
// sched_yield (keeps a pipelined transfer moving: without single-copy shared
// memory, or over TCP, data advances only while both sides poll), then sleep
// ~20 µs between polls so an idle waiter leaves the core to computing ranks
// (ranks may outnumber cores). The yield phase lasts 1 ms plus the time the
// transfer would take at 1 GB/s.
class Backoff {
 public:
  explicit Backoff(size_t bytes = 0) : yield_until_(1e-3 + static_cast<double>(bytes) * 1e-9) {}
  void pause(double elapsed) {
    ++polls_;
    if (polls_ < 64 && elapsed < 20e-6) {
      for (int i = 0; i < 16; ++i) cpu_relax();
    } else if (elapsed < yield_until_) {
      sched_yield();
    } else {
      timespec ts{0, 20000};
      nanosleep(&ts, nullptr);
    }
  }

 private:
  double yield_until_;
  int polls_ = 0;
};

bool timed_out(double elapsed, double timeout) { return timeout > 0 && elapsed > timeout; }

// Polls one request until it completes (true) or `timeout` passes (false).
// Throws (via on_error) if MPI reports an error.
bool wait_request(MPI_Request& req, double timeout, size_t bytes, double& elapsed,
                  const std::function<void(int)>& on_error) {
  auto t0 = Clock::now();
  Backoff backoff(bytes);
  for (;;) {
    int flag = 0;
    MPI_Status st;
    int rc = MPI_Test(&req, &flag, &st);
    if (rc != MPI_SUCCESS) {
      elapsed = seconds_since(t0);
      on_error(rc);
    }
    elapsed = seconds_since(t0);
    if (flag) return true;
    if (timed_out(elapsed, timeout)) return false;
    backoff.pause(elapsed);
  }
}

// A type describing `bytes` contiguous bytes as (type, count) with count fitting
// an int: MPI_BYTE when bytes <= chunk, else one derived struct type
// [n × chunk-byte blocks, rem bytes] whose extent is exactly `bytes`.
class ByteType {
 public:
  ByteType(size_t bytes, size_t chunk) {
    if (bytes <= chunk) {
      count_ = static_cast<int>(bytes);
      return;
    }
    size_t n = bytes / chunk, rem = bytes % chunk;
    check(n <= static_cast<size_t>(INT_MAX), "message of ", bytes, " bytes is too large for MPI (", n, " chunks of ",
          chunk, " bytes)");
    MPI_Datatype chunk_t = MPI_DATATYPE_NULL, blocks_t = MPI_DATATYPE_NULL;
    ok(MPI_Type_contiguous(static_cast<int>(chunk), MPI_BYTE, &chunk_t));
    ok(MPI_Type_contiguous(static_cast<int>(n), chunk_t, &blocks_t));
    if (rem == 0) {
      type_ = blocks_t;
    } else {
      int lens[2] = {1, static_cast<int>(rem)};
      MPI_Aint disps[2] = {0, static_cast<MPI_Aint>(n * chunk)};
      MPI_Datatype types[2] = {blocks_t, MPI_BYTE};
      ok(MPI_Type_create_struct(2, lens, disps, types, &type_));
      MPI_Type_free(&blocks_t);
    }
    MPI_Type_free(&chunk_t);
    ok(MPI_Type_commit(&type_));
    owned_ = true;
    count_ = 1;
  }
  ~ByteType() {
    if (owned_ && MpiSession::active()) MPI_Type_free(&type_);
  }
  ByteType(const ByteType&) = delete;
  ByteType& operator=(const ByteType&) = delete;
  MPI_Datatype type() const { return type_; }
  int count() const { return count_; }

 private:
  static void ok(int rc) {
    if (rc != MPI_SUCCESS) throw Error(cat("MPI datatype construction failed: ", mpi_error_string(rc)));
  }
  MPI_Datatype type_ = MPI_BYTE;
  int count_ = 0;
  bool owned_ = false;
};

template <typename T>
MPI_Datatype mpi_type() {
  if constexpr (std::is_same_v<T, float>) return MPI_FLOAT;
  if constexpr (std::is_same_v<T, double>) return MPI_DOUBLE;
  if constexpr (std::is_same_v<T, int64_t>) return MPI_INT64_T;
}

MPI_Op mpi_op(ReduceOp op) { return op == ReduceOp::sum ? MPI_SUM : op == ReduceOp::max ? MPI_MAX : MPI_MIN; }

class MpiCommunicator final : public Communicator {
 public:
  // Takes ownership of `comm` (a dup or split made for this object).
  MpiCommunicator(MPI_Comm comm, double timeout, size_t chunk_bytes) : comm_(comm), chunk_(chunk_bytes) {
    timeout_ = timeout;
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    void* ub = nullptr;
    int flag = 0;
    MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &ub, &flag);
    tag_ub_ = flag && ub ? *static_cast<int*>(ub) : 32767;
    // World ranks of the members, for messages that make sense to the user.
    MPI_Group group, world_group;
    MPI_Comm_group(comm_, &group);
    MPI_Comm_group(MPI_COMM_WORLD, &world_group);
    std::vector<int> local(static_cast<size_t>(size_));
    std::iota(local.begin(), local.end(), 0);
    world_.assign(static_cast<size_t>(size_), MPI_UNDEFINED);
    MPI_Group_translate_ranks(group, size_, local.data(), world_group, world_.data());
    MPI_Group_free(&group);
    MPI_Group_free(&world_group);
    int world_size = 0;
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    same_as_world_ = size_ == world_size;
    for (int i = 0; i < size_ && same_as_world_; ++i) same_as_world_ = world_[static_cast<size_t>(i)] == i;
  }

  ~MpiCommunicator() override {
    if (!MpiSession::active()) return;  // MPI already finalised: nothing left to free
    for (auto& [id, p] : table_) abandon(p);
    table_.clear();
    // Give abandoned collectives a moment to finish (their peers may catch up).
    auto t0 = Clock::now();
    while (!abandoned_.empty() && seconds_since(t0) < 0.1) {
      int flag = 0;
      if (MPI_Testall(static_cast<int>(abandoned_.size()), abandoned_.data(), &flag, MPI_STATUSES_IGNORE) !=
              MPI_SUCCESS ||
          flag)
        abandoned_.clear();
      else
        sched_yield();
    }
    if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "mpi"; }

  void wait(Request& r) override {
    if (!r.pending()) return;
    auto it = find(r);
    Pending& p = it->second;
    auto t0 = Clock::now();
    Backoff backoff(p.bytes);
    try {
      while (!poll(p)) {
        double el = seconds_since(t0);
        if (timed_out(el, timeout_)) {
          abandon(p);
          throw Error(cat(who(), ": timed out after ", timeout_, " s waiting for ", describe(p),
                          "; the peer may have failed or be stuck"));
        }
        backoff.pause(el);
      }
    } catch (...) {
      stats_.wait_seconds += seconds_since(t0);
      table_.erase(it);
      r.id = -1;
      throw;
    }
    stats_.wait_seconds += seconds_since(t0);
    table_.erase(it);
    r.id = -1;
  }

  bool test(Request& r) override {
    if (!r.pending()) return true;
    auto it = find(r);
    bool done;
    try {
      done = poll(it->second);
    } catch (...) {
      table_.erase(it);
      r.id = -1;
      throw;
    }
    if (!done) return false;
    table_.erase(it);
    r.id = -1;
    return true;
  }

  void progress() override {
    for (auto it = table_.begin(); it != table_.end(); ++it) {
      try {
        poll(it->second);
      } catch (...) {
        table_.erase(it);  // the owner's Request now names an unknown id; wait() says so
        throw;
      }
    }
    if (!abandoned_.empty()) {
      int flag = 0;
      if (MPI_Testall(static_cast<int>(abandoned_.size()), abandoned_.data(), &flag, MPI_STATUSES_IGNORE) !=
              MPI_SUCCESS ||
          flag)
        abandoned_.clear();
    }
  }

  void all_reduce(float* buf, int64_t count, ReduceOp op) override { reduce(buf, count, op); }
  void all_reduce(double* buf, int64_t count, ReduceOp op) override { reduce(buf, count, op); }
  void all_reduce(int64_t* buf, int64_t count, ReduceOp op) override { reduce(buf, count, op); }

  void all_gather(const void* send, void* recv, size_t bytes) override {
    ByteType t(bytes, chunk_);
    const void* sendp = send;
    if (send == static_cast<const char*>(recv) + static_cast<size_t>(rank_) * bytes) sendp = MPI_IN_PLACE;
    collective(cat("all_gather of ", bytes, " bytes per rank"), bytes * static_cast<size_t>(size_),
               [&](MPI_Request* req) {
                 return MPI_Iallgather(sendp, t.count(), t.type(), recv, t.count(), t.type(), comm_, req);
               });
    count_both(stats_, bytes * static_cast<size_t>(size_ - 1));
  }

  void all_to_all(const void* send, void* recv, size_t bytes) override {
    ByteType t(bytes, chunk_);
    collective(cat("all_to_all of ", bytes, " bytes per block"), bytes * static_cast<size_t>(size_),
               [&](MPI_Request* req) {
                 return MPI_Ialltoall(send, t.count(), t.type(), recv, t.count(), t.type(), comm_, req);
               });
    count_both(stats_, bytes * static_cast<size_t>(size_ - 1));
  }

  void broadcast(void* buf, size_t bytes, int root) override {
    check_root(who(), root, size_);
    ByteType t(bytes, chunk_);
    collective(cat("broadcast of ", bytes, " bytes from ", peer_name(root)), bytes,
               [&](MPI_Request* req) { return MPI_Ibcast(buf, t.count(), t.type(), root, comm_, req); });
    count_broadcast(stats_, bytes, size_, rank_ == root);
  }

  void barrier() override {
    collective("barrier", 0, [&](MPI_Request* req) { return MPI_Ibarrier(comm_, req); });
  }

  // color < 0: this rank joins no sub-communicator and gets nullptr.
  std::unique_ptr<Communicator> split(int color, int key) override {
    // MPI_Comm_split blocks without limit; a bounded barrier first makes sure every
    // rank has arrived, so a dead peer gives an error instead of a hang.
    barrier();
    MPI_Comm sub = MPI_COMM_NULL;
    int rc = MPI_Comm_split(comm_, color < 0 ? MPI_UNDEFINED : color, key, &sub);
    if (rc != MPI_SUCCESS)
      throw Error(cat(who(), ": MPI_Comm_split(color ", color, ", key ", key, ") failed: ", mpi_error_string(rc)));
    if (sub == MPI_COMM_NULL) return nullptr;
    return std::make_unique<MpiCommunicator>(sub, timeout_, chunk_);
  }

 private:
  struct Pending {
    std::vector<MPI_Request> reqs;  // one per chunk
    std::vector<int> chunk_bytes;   // expected size of each chunk
    bool is_recv = false;
    bool done = false;
    int peer = 0;
    int tag = 0;
    size_t bytes = 0;
  };

  std::string who() const {
    return same_as_world_ ? cat("rank ", rank_) : cat("rank ", rank_, " (world rank ", world_[rank_], ")");
  }
  std::string peer_name(int p) const {
    if (same_as_world_ || p < 0 || p >= size_) return cat("rank ", p);
    return cat("rank ", p, " (world rank ", world_[static_cast<size_t>(p)], ")");
  }
  std::string describe(const Pending& p) const {
    return cat(p.is_recv ? "irecv of " : "isend of ", p.bytes, " bytes ", p.is_recv ? "from " : "to ",
               peer_name(p.peer), " (tag ", p.tag, ")");
  }

  std::unordered_map<int64_t, Pending>::iterator find(const Request& r) {
    auto it = table_.find(r.id);
    check(it != table_.end(), who(), ": wait/test on unknown request id ", r.id,
          " (already completed, failed, or from another communicator)");
    return it;
  }

  Request post(void* buf, size_t bytes, int peer, int tag, bool is_recv) override {
    check_post(who(), is_recv, peer, size_, tag, tag_ub_, buf, bytes);
    Pending p;
    p.is_recv = is_recv;
    p.peer = peer;
    p.tag = tag;
    p.bytes = bytes;
    size_t n = bytes == 0 ? 1 : (bytes + chunk_ - 1) / chunk_;
    p.reqs.reserve(n);
    p.chunk_bytes.reserve(n);
    char* base = static_cast<char*>(buf);
    for (size_t i = 0; i < n; ++i) {
      size_t off = i * chunk_;
      int len = static_cast<int>(std::min(chunk_, bytes - off));
      MPI_Request req = MPI_REQUEST_NULL;
      int rc = is_recv ? MPI_Irecv(base + off, len, MPI_BYTE, peer, tag, comm_, &req)
                       : MPI_Isend(base + off, len, MPI_BYTE, peer, tag, comm_, &req);
      if (rc != MPI_SUCCESS) {
        abandon(p);
        throw Error(
            cat(who(), ": MPI_", is_recv ? "Irecv" : "Isend", " failed for ", describe(p), ": ", mpi_error_string(rc)));
      }
      p.reqs.push_back(req);
      p.chunk_bytes.push_back(len);
    }
    if (!is_recv) {
      count_send(stats_, bytes);
    }
    int64_t id = next_id_++;
    table_.emplace(id, std::move(p));
    return Request{id};
  }

  // True when every chunk of p has completed; throws on an MPI error or a size
  // mismatch.
  bool poll(Pending& p) {
    if (p.done) return true;
    int n = static_cast<int>(p.reqs.size());
    statuses_.resize(p.reqs.size());
    int flag = 0;
    int rc = MPI_Testall(n, p.reqs.data(), &flag, statuses_.data());
    if (rc != MPI_SUCCESS) {
      int code = status_error(rc, statuses_.data(), n);
      abandon(p);
      throw Error(cat(who(), ": ", describe(p), " failed: ", mpi_error_string(code)));
    }
    if (!flag) return false;
    p.done = true;
    if (p.is_recv) {
      int64_t got = 0;
      bool short_chunk = false;
      for (int i = 0; i < n; ++i) {
        int c = 0;
        MPI_Get_count(&statuses_[static_cast<size_t>(i)], MPI_BYTE, &c);
        got += c;
        short_chunk |= c != p.chunk_bytes[static_cast<size_t>(i)];
      }
      count_receive(stats_, static_cast<size_t>(got));
      if (short_chunk)
        throw Error(cat(who(), ": ", describe(p), " received only ", got,
                        " bytes; sender and receiver must use the same message size"));
    }
    return true;
  }

  // Cancels (or, failing that, frees) whatever of p is still in flight, so a
  // later message cannot land in a buffer nobody waits for.
  void abandon(Pending& p) {
    for (MPI_Request& req : p.reqs) {
      if (req == MPI_REQUEST_NULL) continue;
      MPI_Cancel(&req);
      auto t0 = Clock::now();
      int flag = 0;
      while (MPI_Test(&req, &flag, MPI_STATUS_IGNORE) == MPI_SUCCESS && !flag && seconds_since(t0) < 0.05)
        sched_yield();
      if (!flag && req != MPI_REQUEST_NULL) MPI_Request_free(&req);
      req = MPI_REQUEST_NULL;
    }
    p.done = true;
  }

  // Starts a non-blocking collective and waits for it, bounded.
  // `bytes`: about what this rank moves (paces the polling).
  template <typename Start>
  void collective(const std::string& what, size_t bytes, Start&& start) {
    check(broken_.empty(), who(), ": this communicator is unusable: ", broken_);
    MPI_Request req = MPI_REQUEST_NULL;
    int rc = start(&req);
    if (rc != MPI_SUCCESS) throw Error(cat(who(), ": ", what, " failed to start: ", mpi_error_string(rc)));
    double el = 0;
    bool done = wait_request(req, timeout_, bytes, el, [&](int code) {
      stats_.wait_seconds += el;
      throw Error(cat(who(), ": ", what, " failed: ", mpi_error_string(code)));
    });
    stats_.wait_seconds += el;
    if (!done) {
      abandoned_.push_back(req);
      broken_ = cat(what, " timed out earlier and the ranks are out of step");
      throw Error(cat(who(), ": timed out after ", timeout_, " s in ", what, " over ", size_,
                      " ranks; some rank did not join (it may have failed, be stuck, or be in a different "
                      "collective)"));
    }
  }

  template <typename T>
  void reduce(T* buf, int64_t count, ReduceOp op) {
    check(count >= 0, who(), ": all_reduce count ", count, " is negative");
    check(buf != nullptr || count == 0, who(), ": all_reduce with a null buffer");
    const int64_t step = std::max<int64_t>(1, static_cast<int64_t>(chunk_ / sizeof(T)));
    int64_t off = 0;
    do {
      int n = static_cast<int>(std::min(step, count - off));
      T* p = buf + off;
      collective(
          cat("all_reduce(", op_name(op), ") of ", count, " ", type_name<T>()), 2 * static_cast<size_t>(n) * sizeof(T),
          [&](MPI_Request* req) { return MPI_Iallreduce(MPI_IN_PLACE, p, n, mpi_type<T>(), mpi_op(op), comm_, req); });
      off += n;
    } while (off < count);
    if (size_ > 1) count_both(stats_, static_cast<size_t>(count) * sizeof(T));
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1, tag_ub_ = 32767;
  size_t chunk_ = kDefaultChunkBytes;
  std::vector<int> world_;
  bool same_as_world_ = true;
  std::unordered_map<int64_t, Pending> table_;
  int64_t next_id_ = 0;
  std::vector<MPI_Status> statuses_;
  std::vector<MPI_Request> abandoned_;  // collectives given up on after a timeout
  std::string broken_;                  // why collectives are refused, if they are
};

}  // namespace

// ---- session --------------------------------------------------------------------

MpiSession::MpiSession(int* argc, char*** argv) {
  int initialised = 0;
  MPI_Initialized(&initialised);
  if (!initialised) {
    int provided = 0;
    int rc = MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
    if (rc != MPI_SUCCESS) throw Error(cat("MPI_Init_thread failed: ", mpi_error_string(rc)));
    g_we_initialised = true;
    if (provided < MPI_THREAD_FUNNELED)
      throw Error(cat("this MPI library provides thread level ", provided,
                      "; ringattn needs MPI_THREAD_FUNNELED (OpenMP threads around MPI calls)"));
  }
  int rc = MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  if (rc != MPI_SUCCESS) throw Error(cat("MPI_Comm_set_errhandler failed: ", mpi_error_string(rc)));
  if (g_abort_comm == MPI_COMM_NULL) {
    rc = MPI_Comm_dup(MPI_COMM_WORLD, &g_abort_comm);
    if (rc != MPI_SUCCESS) throw Error(cat("MPI_Comm_dup(MPI_COMM_WORLD) failed: ", mpi_error_string(rc)));
  }
}

MpiSession::~MpiSession() {
  if (g_abort_comm != MPI_COMM_NULL && active()) MPI_Comm_free(&g_abort_comm);
  g_abort_comm = MPI_COMM_NULL;
  if (g_we_initialised && active()) MPI_Finalize();
  g_we_initialised = false;
}

bool MpiSession::active() {
  int initialised = 0, finalised = 0;
  MPI_Initialized(&initialised);
  if (!initialised) return false;
  MPI_Finalized(&finalised);
  return !finalised;
}

namespace {

// A Communicator on a duplicate of `base` (`what` names it in errors):
// MPI_Comm_idup, so that a rank that never arrives gives an error, not a hang.
std::unique_ptr<Communicator> duplicate(MPI_Comm base, const std::string& what, double timeout_seconds) {
  check(MpiSession::active(), "MPI is not initialised: create a ringattn::MpiSession first");
  check(timeout_seconds == 0 || (std::isfinite(timeout_seconds) && timeout_seconds > 0),
        "the timeout must be positive and finite seconds (0: no limit), got ", timeout_seconds);
  int provided = 0;
  MPI_Query_thread(&provided);
  check(provided >= MPI_THREAD_FUNNELED, "MPI was initialised with thread level ", provided,
        "; ringattn needs MPI_THREAD_FUNNELED (OpenMP threads around MPI calls)");
  double timeout = env_timeout(timeout_seconds);
  size_t chunk = env_chunk_bytes();
  MPI_Comm comm = MPI_COMM_NULL;
  MPI_Request req = MPI_REQUEST_NULL;
  int rc = MPI_Comm_idup(base, &comm, &req);
  if (rc != MPI_SUCCESS) throw Error(cat("MPI_Comm_idup(", what, ") failed: ", mpi_error_string(rc)));
  double el = 0;
  auto fail = [&](int code) { throw Error(cat("MPI_Comm_idup(", what, ") failed: ", mpi_error_string(code))); };
  if (!wait_request(req, timeout, 0, el, fail)) {
    int r = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &r);
    throw Error(cat("rank ", r, ": timed out after ", timeout, " s duplicating ", what,
                    "; some rank did not arrive (it may have failed or be stuck)"));
  }
  return std::make_unique<MpiCommunicator>(comm, timeout, chunk);
}

}  // namespace

std::unique_ptr<Communicator> mpi_world(double timeout_seconds) {
  return duplicate(MPI_COMM_WORLD, "MPI_COMM_WORLD", timeout_seconds);
}

std::unique_ptr<Communicator> mpi_from_fortran_handle(int64_t handle, double timeout_seconds) {
  check(MpiSession::active(), "MPI is not initialised (mpi4py initialises it on `from mpi4py import MPI`)");
  check(handle >= std::numeric_limits<MPI_Fint>::min() && handle <= std::numeric_limits<MPI_Fint>::max(),
        "not an MPI communicator handle: ", handle);
  MPI_Comm base = MPI_Comm_f2c(static_cast<MPI_Fint>(handle));
  check(base != MPI_COMM_NULL, "the MPI communicator is MPI_COMM_NULL (this process is not in it)");
  int inter = 0;
  check(MPI_Comm_test_inter(base, &inter) == MPI_SUCCESS, "not a valid MPI communicator handle: ", handle);
  check(!inter, "an inter-communicator cannot carry a ring: pass an intra-communicator");
  return duplicate(base, "the given communicator", timeout_seconds);
}

bool launched_by_mpi() {
  static const char* const vars[] = {
      "OMPI_COMM_WORLD_SIZE",
      "OMPI_COMM_WORLD_RANK",  // Open MPI
      "PMIX_RANK",
      "PMIX_NAMESPACE",  // PMIx (Open MPI 4+/5, Slurm)
      "PMI_SIZE",
      "PMI_RANK",  // MPICH, Intel MPI (Hydra), Slurm PMI
      "MPI_LOCALNRANKS",
      "MPI_LOCALRANKID",  // MPICH Hydra
      "MV2_COMM_WORLD_SIZE",
      "MV2_COMM_WORLD_RANK",  // MVAPICH2
  };
  for (const char* v : vars)
    if (std::getenv(v)) return true;
  return false;
}

// ---- abort_job's MPI part ------------------------------------------------------------

namespace comm_backend {

bool mpi_world_rank(int* rank) {
  if (!MpiSession::active()) return false;
  MPI_Comm_rank(MPI_COMM_WORLD, rank);
  return true;
}

void mpi_abort(int code) {
  if (g_abort_comm != MPI_COMM_NULL) {
    MPI_Request req = MPI_REQUEST_NULL;
    if (MPI_Ibarrier(g_abort_comm, &req) == MPI_SUCCESS) {
      const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(kAbortGraceSeconds);
      int done = 0;
      const timespec ms{0, 1000000};
      while (MPI_Test(&req, &done, MPI_STATUS_IGNORE) == MPI_SUCCESS && !done && std::chrono::steady_clock::now() < end)
        nanosleep(&ms, nullptr);
      // Every rank failed: rank 0 alone ends the job (one MPI_Abort, one report
      // from mpirun); the others abort too if it has not killed them by then.
      int rank = 0;
      MPI_Comm_rank(g_abort_comm, &rank);
      if (done && rank != 0)
        for (int i = 0; i < 10000; ++i) nanosleep(&ms, nullptr);
    }
  }
  MPI_Abort(MPI_COMM_WORLD, code);
  std::exit(code);
}

}  // namespace comm_backend

}  // namespace ringattn
