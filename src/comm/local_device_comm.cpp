// run_device_local_group (see include/ringattn/cuda.h): P ranks as P threads of
// one process sharing one GPU, each with its own CudaDevice (its own streams) and
// a Communicator ("local") whose transfers are device-to-device copies.
//
// Every communicator of a group, and of the groups split from it, meets in a Hub
// guarded by one mutex (with one condition variable and one failure state for
// the whole group). A rank that throws marks the group failed; a rank blocked in
// the group then throws Error naming the failed rank instead of waiting.
//
// Point to point. isend/irecv record an event on the poster's compute stream
// (send: the buffer is ready; receive: its old contents are no longer read) and
// post to the hub, where sends and receives match by (source, destination, tag)
// in post order. The second poster of a pair issues the copy, under the hub
// mutex, on the receiver's communication stream: it waits for both events, copies
// device to device and records a completion event shared by both requests, so the
// copy overlaps the kernels queued after the posts. wait() blocks the host
// (bounded) until the pair has matched, then makes the compute stream wait for the
// copy; test() is true once the copy is done.
//
// Collectives are host rendezvous: each rank synchronizes its device, deposits a
// host copy of its input for the collective's sequence number, waits (bounded)
// for all P deposits, computes its own result on the host from them (reductions
// in rank order, so every rank gets the same bits) and copies it back (to device
// memory when the pointer is device memory). A round's deposits are freed once
// every rank has read them. Every rank checks that all ranks called the same
// collective with the same sizes.
//
// Waits are bounded by timeout_seconds() (0 or less: no limit). CommStats follow
// comm/backend.h, a receive counting its bytes when posted; wait_seconds adds the time blocked in wait() and in
// collectives.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "comm/backend.h"
#include "kernels/cuda/cuda_device.h"
#include "ringattn/cuda.h"
#include "ringattn/error.h"

namespace ringattn {
namespace {

using namespace comm_backend;

using cuda::Event;
using cuda::is_device_pointer;

template <typename T>
T combine(T a, T b, ReduceOp op) {
  switch (op) {
    case ReduceOp::sum:
      return a + b;
    case ReduceOp::max:
      return std::max(a, b);
    case ReduceOp::min:
      return std::min(a, b);
  }
  throw Error("unknown ReduceOp");
}

std::string describe(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  } catch (...) {
    return "an exception that is not a std::exception";
  }
}

// What every hub of one group shares.
struct Shared {
  std::mutex mu;  // guards every hub of the group, and the posts in them
  std::condition_variable cv;
  std::string failed;  // "rank r failed: ..." once a rank has thrown

  void fail(int rank, const std::string& why) {
    std::lock_guard lk(mu);
    if (failed.empty()) failed = cat("rank ", rank, " failed: ", why);
    cv.notify_all();
  }
};

// One side of a point-to-point transfer (ranks are the hub's).
struct Post {
  void* buf = nullptr;
  size_t bytes = 0;
  int src = 0, dst = 0, tag = 0;
  bool is_recv = false;
  std::shared_ptr<Event> ready;   // recorded on the poster's compute stream
  cudaStream_t stream = nullptr;  // receiver: its communication stream, where the copy runs
  // Set (under Shared::mu) when the pair matches.
  bool matched = false;
  std::shared_ptr<Event> done;  // the copy's completion; null when error is set
  std::string error;
};

std::string describe(const Post& p) {
  return cat(p.is_recv ? "irecv of " : "isend of ", p.bytes, " bytes ", p.is_recv ? "from" : "to", " rank ",
             p.is_recv ? p.src : p.dst, " (tag ", p.tag, ")");
}

struct Hub;

// One collective: every rank's deposit, then the ranks that have read them.
struct Round {
  std::vector<std::vector<char>> in;  // by rank
  std::vector<std::string> what;      // by rank: the collective it called ("" until it arrives)
  int arrived = 0, released = 0;
  std::map<int, std::shared_ptr<Hub>> children;  // split: the new hub of each color
};

// Where the ranks of one communicator meet (all members guarded by shared->mu).
struct Hub {
  using Key = std::tuple<int, int, int>;  // (src, dst, tag)
  Hub(std::shared_ptr<Shared> s, int n) : shared(std::move(s)), P(n) {}
  std::shared_ptr<Shared> shared;
  const int P;
  std::map<Key, std::deque<std::shared_ptr<Post>>> sends, recvs;  // unmatched, in post order
  std::map<int64_t, Round> rounds;                                // by collective sequence number
};

Hub::Key key_of(const Post& p) { return {p.src, p.dst, p.tag}; }

// Pairs s with r (called under Shared::mu by the second poster): the copy on the
// receiver's communication stream, after both posts' events.
void match(Post& s, Post& r) {
  s.matched = r.matched = true;
  if (s.bytes != r.bytes) {
    s.error = r.error = cat("rank ", s.src, " sent ", s.bytes, " bytes but rank ", r.dst, " posted a receive of ",
                            r.bytes, " bytes (tag ", s.tag, "); sender and receiver must use the same message size");
    return;
  }
  try {
    auto done = std::make_shared<Event>();
    cuda::check(cudaStreamWaitEvent(r.stream, s.ready->get(), 0), "cudaStreamWaitEvent (send buffer ready)");
    cuda::check(cudaStreamWaitEvent(r.stream, r.ready->get(), 0), "cudaStreamWaitEvent (receive buffer free)");
    if (s.bytes > 0)
      cuda::check(cudaMemcpyAsync(r.buf, s.buf, s.bytes, cudaMemcpyDeviceToDevice, r.stream),
                  "cudaMemcpyAsync (device to device)");
    cuda::check(cudaEventRecord(done->get(), r.stream), "cudaEventRecord (transfer completion)");
    s.done = r.done = std::move(done);
  } catch (const std::exception& e) {
    s.error = r.error = e.what();
  }
}

class LocalComm final : public Communicator {
 public:
  LocalComm(std::shared_ptr<Hub> hub, int rank, cuda::CudaDevice& dev, std::string label)
      : hub_(std::move(hub)), rank_(rank), dev_(dev), label_(std::move(label)) {}

  // Withdraws this rank's unmatched posts (so no peer copies into or out of its
  // buffers later) and waits (bounded) for its matched copies still in flight.
  ~LocalComm() override {
    std::vector<std::shared_ptr<Event>> in_flight;
    {
      std::lock_guard lk(sh().mu);
      for (auto& [id, p] : table_) {
        if (!p->matched)
          unpost(*p);
        else if (p->done)
          in_flight.push_back(p->done);
      }
    }
    for (const auto& e : in_flight) try {
        cuda::wait_event_bounded(e->get(), device_bound(), "a transfer still in flight when its communicator ended");
      } catch (...) {
        // Nothing to report from a destructor; the event stays valid until done.
      }
  }

  LocalComm(const LocalComm&) = delete;
  LocalComm& operator=(const LocalComm&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return hub_->P; }
  std::string backend() const override { return "local"; }

  void wait(Request& r) override {
    if (!r.pending()) return;
    auto it = find(r);
    const std::shared_ptr<Post> p = it->second;
    table_.erase(it);
    r.id = -1;
    const auto t0 = Clock::now();
    {
      std::unique_lock lk(sh().mu);
      if (!block(lk, [&] { return p->matched; })) {
        unpost(*p);
        stats_.wait_seconds += seconds_since(t0);
        throw Error(gave_up(describe(*p), "the peer may have failed or be stuck"));
      }
    }
    stats_.wait_seconds += seconds_since(t0);
    // error and done were set before matched, under the mutex, and stay as they are.
    check(p->error.empty(), who(), ": ", describe(*p), " failed: ", p->error);
    cu(cudaStreamWaitEvent(dev_.compute(), p->done->get(), 0), "cudaStreamWaitEvent (compute after transfer)");
  }

  bool test(Request& r) override {
    if (!r.pending()) return true;
    auto it = find(r);
    const std::shared_ptr<Post> p = it->second;
    {
      std::lock_guard lk(sh().mu);
      if (!p->matched) {
        if (sh().failed.empty()) return false;
        unpost(*p);
        table_.erase(it);
        r.id = -1;
        throw Error(cat(who(), ": ", describe(*p), " abandoned: ", sh().failed));
      }
    }
    if (p->error.empty()) {
      const cudaError_t q = cudaEventQuery(p->done->get());
      if (q == cudaErrorNotReady) return false;
      table_.erase(it);
      r.id = -1;
      cu(q, "cudaEventQuery (transfer completion)");
      return true;
    }
    table_.erase(it);
    r.id = -1;
    throw Error(cat(who(), ": ", describe(*p), " failed: ", p->error));
  }

  // Nothing to drive: pairs are matched, and their copies queued, when posted.
  void progress() override {}

  void all_reduce(float* buf, int64_t count, ReduceOp op) override { reduce(buf, count, op); }
  void all_reduce(double* buf, int64_t count, ReduceOp op) override { reduce(buf, count, op); }
  void all_reduce(int64_t* buf, int64_t count, ReduceOp op) override { reduce(buf, count, op); }

  void all_gather(const void* send, void* recv, size_t bytes) override {
    const int P = size();
    collective(cat("all_gather of ", bytes, " bytes per rank"), send, bytes, [&](Round& rd) {
      std::vector<char> out(bytes * static_cast<size_t>(P));
      for (int r = 0; r < P; ++r)
        if (bytes > 0) std::memcpy(out.data() + static_cast<size_t>(r) * bytes, rd.in[r].data(), bytes);
      from_host(recv, out.data(), out.size());
    });
    count_both(stats_, bytes * static_cast<size_t>(P - 1));
  }

  void all_to_all(const void* send, void* recv, size_t bytes) override {
    const int P = size();
    collective(cat("all_to_all of ", bytes, " bytes per block"), send, bytes * static_cast<size_t>(P), [&](Round& rd) {
      // Block r of the result: block rank_ of rank r's deposit.
      std::vector<char> out(bytes * static_cast<size_t>(P));
      for (int r = 0; r < P; ++r)
        if (bytes > 0)
          std::memcpy(out.data() + static_cast<size_t>(r) * bytes, rd.in[r].data() + static_cast<size_t>(rank_) * bytes,
                      bytes);
      from_host(recv, out.data(), out.size());
    });
    count_both(stats_, bytes * static_cast<size_t>(P - 1));
  }

  void broadcast(void* buf, size_t bytes, int root) override {
    const int P = size();
    check_root(who(), root, P);
    const bool is_root = rank_ == root;
    collective(cat("broadcast of ", bytes, " bytes from rank ", root), buf, is_root ? bytes : 0, [&](Round& rd) {
      if (!is_root) from_host(buf, rd.in[root].data(), bytes);
    });
    count_broadcast(stats_, bytes, P, is_root);
  }

  void barrier() override {
    collective("barrier", nullptr, 0, [](Round&) {});
  }

  // Ranks of equal color form a new hub, ordered by key, then rank. color < 0 is
  // an error; that rank still takes part, so the others are not left waiting.
  std::unique_ptr<Communicator> split(int color, int key) override {
    const int32_t mine[2] = {color, key};
    std::shared_ptr<Hub> child;
    int child_rank = -1;
    collective("split", mine, sizeof mine, [&](Round& rd) {
      if (color < 0) return;
      std::vector<std::pair<int32_t, int>> members;  // (key, rank) of this color
      for (int r = 0; r < size(); ++r) {
        int32_t ck[2];
        std::memcpy(ck, rd.in[r].data(), sizeof ck);
        if (ck[0] == color) members.emplace_back(ck[1], r);
      }
      std::sort(members.begin(), members.end());
      child_rank = static_cast<int>(std::find(members.begin(), members.end(), std::pair<int32_t, int>(key, rank_)) -
                                    members.begin());
      std::lock_guard lk(sh().mu);
      std::shared_ptr<Hub>& h = rd.children[color];
      if (!h) h = std::make_shared<Hub>(hub_->shared, static_cast<int>(members.size()));
      child = h;
    });
    check(color >= 0, who(), ": split color ", color, " is negative; this backend puts every rank in a sub-group");
    auto sub = std::make_unique<LocalComm>(child, child_rank, dev_,
                                           cat("rank ", child_rank, " of split color ", color, " (", label_, ")"));
    sub->set_timeout_seconds(timeout_);
    return sub;
  }

 private:
  Shared& sh() const { return *hub_->shared; }
  const std::string& who() const { return label_; }
  // The bound for waits on the device: timeout_seconds(), or (no limit) ~30 years.
  double device_bound() const { return timeout_ > 0 ? timeout_ : 1e9; }

  void cu(cudaError_t e, const char* what) const {
    if (e != cudaSuccess) throw Error(cat(who(), ": CUDA ", what, " failed: ", cudaGetErrorString(e)));
  }

  // Blocks (lk held on Shared::mu) until ready(), the group fails, or
  // timeout_seconds() pass; true when ready().
  template <typename Ready>
  bool block(std::unique_lock<std::mutex>& lk, Ready ready) {
    Shared& s = sh();
    auto stop = [&] { return ready() || !s.failed.empty(); };
    if (timeout_ > 0) {
      const auto limit = std::chrono::duration<double>(std::min(timeout_, 1e7));  // 1e7 s: no overflow
      s.cv.wait_until(lk, Clock::now() + std::chrono::duration_cast<Clock::duration>(limit), stop);
    } else {
      s.cv.wait(lk, stop);
    }
    return ready();
  }

  // Why block() returned false (called with Shared::mu held).
  std::string gave_up(const std::string& what, const std::string& hint) const {
    if (!sh().failed.empty()) return cat(who(), ": ", what, " abandoned: ", sh().failed);
    return cat(who(), ": timed out after ", timeout_, " s waiting for ", what, "; ", hint);
  }

  // Removes p from the hub's unmatched posts (Shared::mu held).
  void unpost(const Post& p) {
    if (p.matched) return;
    auto& queues = p.is_recv ? hub_->recvs : hub_->sends;
    auto it = queues.find(key_of(p));
    if (it == queues.end()) return;
    std::erase_if(it->second, [&](const std::shared_ptr<Post>& q) { return q.get() == &p; });
    if (it->second.empty()) queues.erase(it);
  }

  std::unordered_map<int64_t, std::shared_ptr<Post>>::iterator find(const Request& r) {
    auto it = table_.find(r.id);
    check(it != table_.end(), who(), ": wait/test on unknown request id ", r.id,
          " (already completed, failed, or from another communicator)");
    return it;
  }

  Request post(void* buf, size_t bytes, int peer, int tag, bool is_recv) override {
    const char* op = is_recv ? "irecv" : "isend";
    check_post(who(), is_recv, peer, size(), tag, INT_MAX, buf, bytes);
    check(bytes == 0 || is_device_pointer(buf), who(), ": ", op, " of ", bytes, " bytes ", is_recv ? "from" : "to",
          " rank ", peer, ": the buffer is not device memory");
    auto p = std::make_shared<Post>();
    p->buf = buf;
    p->bytes = bytes;
    p->src = is_recv ? peer : rank_;
    p->dst = is_recv ? rank_ : peer;
    p->tag = tag;
    p->is_recv = is_recv;
    p->ready = std::make_shared<Event>();
    p->stream = is_recv ? dev_.comm() : nullptr;
    cu(cudaEventRecord(p->ready->get(), dev_.compute()), "cudaEventRecord (compute stream)");
    {
      std::lock_guard lk(sh().mu);
      check(sh().failed.empty(), who(), ": ", describe(*p), " refused: ", sh().failed);
      auto& others = is_recv ? hub_->sends : hub_->recvs;
      auto it = others.find(key_of(*p));
      if (it == others.end()) {
        (is_recv ? hub_->recvs : hub_->sends)[key_of(*p)].push_back(p);
      } else {
        const std::shared_ptr<Post> q = it->second.front();
        it->second.pop_front();
        if (it->second.empty()) others.erase(it);
        if (is_recv)
          match(*q, *p);
        else
          match(*p, *q);
        sh().cv.notify_all();
      }
    }
    const int64_t id = next_id_++;
    table_.emplace(id, std::move(p));
    if (is_recv)
      count_receive(stats_, bytes);
    else
      count_send(stats_, bytes);
    return Request{id};
  }

  // A host copy of `bytes` at p (device or host memory); the device is idle.
  std::vector<char> to_host(const void* p, size_t bytes) {
    std::vector<char> v(bytes);
    if (bytes == 0) return v;
    if (is_device_pointer(p)) {
      cu(cudaMemcpyAsync(v.data(), p, bytes, cudaMemcpyDeviceToHost, dev_.compute()), "cudaMemcpyAsync (to host)");
      cu(cudaStreamSynchronize(dev_.compute()), "cudaStreamSynchronize (to host)");
    } else {
      std::memcpy(v.data(), p, bytes);
    }
    return v;
  }

  // p := the `bytes` at src (p device or host memory); the device is idle.
  void from_host(void* p, const void* src, size_t bytes) {
    if (bytes == 0) return;
    if (is_device_pointer(p)) {
      cu(cudaMemcpyAsync(p, src, bytes, cudaMemcpyHostToDevice, dev_.compute()), "cudaMemcpyAsync (from host)");
      cu(cudaStreamSynchronize(dev_.compute()), "cudaStreamSynchronize (from host)");
    } else {
      std::memcpy(p, src, bytes);
    }
  }

  // The rendezvous: deposits a host copy of the `bytes` at `in` (read once the
  // device is idle), waits for every rank's deposit, then runs use(round). `what`
  // must be the same on every rank (it names the collective and its sizes).
  template <typename Use>
  void collective(const std::string& what, const void* in, size_t bytes, Use&& use) {
    dev_.synchronize(device_bound());
    std::vector<char> deposit = to_host(in, bytes);
    const int P = size();
    const int64_t seq = seq_++;
    const auto t0 = Clock::now();
    Round* rd = nullptr;
    {
      std::unique_lock lk(sh().mu);
      check(sh().failed.empty(), who(), ": ", what, " refused: ", sh().failed);
      Round& round = hub_->rounds[seq];
      if (round.in.empty()) {
        round.in.resize(static_cast<size_t>(P));
        round.what.resize(static_cast<size_t>(P));
      }
      round.in[rank_] = std::move(deposit);
      round.what[rank_] = what;
      if (++round.arrived == P) sh().cv.notify_all();
      if (!block(lk, [&] { return round.arrived == P; })) {
        std::string missing;
        for (int r = 0; r < P; ++r)
          if (round.what[r].empty()) missing += cat(missing.empty() ? "" : ", ", r);
        stats_.wait_seconds += seconds_since(t0);
        throw Error(gave_up(cat(what, " over ", P, " ranks"),
                            cat("rank(s) ", missing, " did not join (failed, stuck, or in a different collective)")));
      }
      rd = &round;
    }
    stats_.wait_seconds += seconds_since(t0);
    // The deposits stay as they are until every rank has released the round.
    try {
      for (int r = 0; r < P; ++r)
        check(rd->what[r] == what, who(), ": collective mismatch: this rank called ", what, " but rank ", r, " called ",
              rd->what[r]);
      use(*rd);
    } catch (...) {
      release(seq);
      throw;
    }
    release(seq);
  }

  void release(int64_t seq) {
    std::lock_guard lk(sh().mu);
    auto it = hub_->rounds.find(seq);
    if (++it->second.released == hub_->P) hub_->rounds.erase(it);
  }

  template <typename T>
  void reduce(T* buf, int64_t count, ReduceOp op) {
    check(count >= 0, who(), ": all_reduce count ", count, " is negative");
    check(buf != nullptr || count == 0, who(), ": all_reduce with a null buffer");
    const size_t n = static_cast<size_t>(count), bytes = n * sizeof(T);
    collective(cat("all_reduce(", op_name(op), ") of ", count, " ", type_name<T>()), buf, bytes, [&](Round& rd) {
      std::vector<T> acc(n), x(n);
      if (bytes == 0) return;
      std::memcpy(acc.data(), rd.in[0].data(), bytes);
      for (int r = 1; r < size(); ++r) {
        std::memcpy(x.data(), rd.in[r].data(), bytes);
        for (size_t i = 0; i < n; ++i) acc[i] = combine(acc[i], x[i], op);
      }
      from_host(buf, acc.data(), bytes);
    });
    if (size() > 1) count_both(stats_, bytes);
  }

  std::shared_ptr<Hub> hub_;
  int rank_;
  cuda::CudaDevice& dev_;
  std::string label_;
  std::unordered_map<int64_t, std::shared_ptr<Post>> table_;
  int64_t next_id_ = 0;
  int64_t seq_ = 0;  // collectives called on this hub so far
};

}  // namespace

void run_device_local_group(int P, int ordinal,
                            const std::function<void(int rank, Device& dev, Communicator& comm)>& fn) {
  check(P >= 1, "run_device_local_group: the number of ranks must be at least 1, got ", P);
  auto shared = std::make_shared<Shared>();
  auto hub = std::make_shared<Hub>(shared, P);
  std::vector<std::exception_ptr> errors(static_cast<size_t>(P));
  auto body = [&](int r) {
    try {
      cuda::CudaDevice dev(ordinal);
      dev.make_current();
      LocalComm comm(hub, r, dev, cat("rank ", r));
      try {
        fn(r, dev, comm);
        dev.synchronize(comm.timeout_seconds() > 0 ? comm.timeout_seconds() : 1e9);
      } catch (...) {
        // Mark the group failed before unwinding, so peers stop waiting for this rank.
        shared->fail(r, describe(std::current_exception()));
        throw;
      }
    } catch (...) {
      errors[static_cast<size_t>(r)] = std::current_exception();
      shared->fail(r, describe(errors[static_cast<size_t>(r)]));
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(P));
  try {
    for (int r = 0; r < P; ++r) threads.emplace_back(body, r);
  } catch (...) {
    shared->fail(static_cast<int>(threads.size()), "could not start its thread");
    for (std::thread& t : threads) t.join();
    throw;
  }
  for (std::thread& t : threads) t.join();
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace ringattn
