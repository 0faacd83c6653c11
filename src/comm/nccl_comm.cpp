// NCCL backend of ringattn::Communicator (see include/ringattn/cuda.h): one GPU
// per rank, every transfer stream-ordered on the CudaDevice's communication
// stream after the work queued so far on its compute stream.
//
// Point to point. isend/irecv only record the operation; the pending ones are
// launched together, in one ncclGroupStart/ncclGroupEnd, at the next progress(),
// wait(), test() or collective. A ring posts isend to p+1 and irecv from p−1:
// launched as separate NCCL calls, every rank's send would wait for a receive
// nobody has launched yet. NCCL matches sends and receives between two ranks in
// the order they are launched (so both sides must post them in the same order);
// tags only name a transfer in error messages. Each post records an event on the
// compute stream, and a launch makes the communication stream wait for the latest
// one: a send reads its buffer, and a receive overwrites its buffer, only after
// the kernels queued before the post, while the kernels queued between the post
// and the launch run alongside the transfer. One completion
// event, recorded after the group, is shared by every request of the batch:
// wait() makes the compute stream wait for it (the host does not block), test()
// queries it.
//
// Collectives take host or device pointers (cudaPointerGetAttributes tells which).
// Device buffers: the collective runs in place, and the compute stream waits for
// it (the host does not block). Host buffers are staged through device memory
// allocated on the communication stream, and the host waits for the result. Each
// host wait is bounded by timeout_seconds() (0 or less: no limit) and polls NCCL's
// asynchronous error state; on a timeout or an NCCL error the communicator is
// aborted (ncclCommAbort ends its kernels) and every later call throws.
//
// CommStats: as comm/backend.h says, a receive counting its bytes when posted.
// wait_seconds adds the time the host spends blocked (only collectives on host
// buffers, barrier and split block it).
#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <climits>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <type_traits>
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

// Device memory allocated on `stream`, freed there (after whatever uses it on
// that stream) when this goes out of scope.
class Scratch {
 public:
  Scratch(size_t bytes, cudaStream_t stream) : stream_(stream) {
    cuda::check(cudaMallocAsync(&ptr_, bytes, stream), "cudaMallocAsync (collective staging buffer)");
  }
  ~Scratch() { cudaFreeAsync(ptr_, stream_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  void* get() const { return ptr_; }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

template <typename T>
ncclDataType_t nccl_type() {
  if constexpr (std::is_same_v<T, float>) return ncclFloat32;
  if constexpr (std::is_same_v<T, double>) return ncclFloat64;
  if constexpr (std::is_same_v<T, int64_t>) return ncclInt64;
}

ncclRedOp_t nccl_op(ReduceOp op) { return op == ReduceOp::sum ? ncclSum : op == ReduceOp::max ? ncclMax : ncclMin; }

// NCCL's error string plus its last message for `comm` (when it has one).
std::string nccl_error(ncclResult_t r, ncclComm_t comm) {
  std::string s = ncclGetErrorString(r);
  const char* last = ncclGetLastError(comm);
  if (last && *last) s += cat(" (", last, ")");
  return s;
}

// One buffer of a collective: the caller's pointer, the bytes NCCL touches
// there, and whether NCCL reads it (in) and/or writes it (out).
struct Buffer {
  const void* ptr;
  size_t bytes;
  bool in, out;
};

class NcclComm final : public Communicator {
 public:
  // Takes ownership of `comm`; `label` names this rank in messages.
  NcclComm(ncclComm_t comm, cuda::CudaDevice& dev, double timeout, std::string label)
      : comm_(comm), dev_(dev), label_(std::move(label)) {
    timeout_ = timeout;
    ncclResult_t r = ncclCommUserRank(comm_, &rank_);
    if (r == ncclSuccess) r = ncclCommCount(comm_, &size_);
    if (r != ncclSuccess) {
      std::string msg = cat(label_, ": querying the NCCL communicator failed: ", nccl_error(r, comm_));
      ncclCommAbort(comm_);
      throw Error(msg);
    }
  }

  ~NcclComm() override {
    if (!comm_) return;
    try {
      flush();
      // Let the launched transfers end (bounded: host_wait aborts on a timeout).
      dev_.make_current();
      Event idle;
      cuda::check(cudaEventRecord(idle.get(), dev_.comm()), "cudaEventRecord");
      host_wait(idle.get(), "the transfers still in flight at destruction");
    } catch (...) {
      // Nothing to report from a destructor: on an error comm_ is aborted (null)
      // or still usable, and either way it is released below.
    }
    if (comm_) ncclCommDestroy(comm_);
  }

  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "nccl"; }

  // Stream-ordered: the compute stream waits for the transfer; the host does not.
  void wait(Request& r) override {
    if (!r.pending()) return;
    flush_for(r);
    std::shared_ptr<Event> done = take(r);
    cu(cudaStreamWaitEvent(dev_.compute(), done->get(), 0), "cudaStreamWaitEvent (compute after transfer)");
  }

  bool test(Request& r) override {
    if (!r.pending()) return true;
    flush_for(r);
    auto it = find(r);
    if (it->second.done && comm_) {
      const cudaError_t q = cudaEventQuery(it->second.done->get());
      if (q == cudaErrorNotReady) {
        poll_async_error(describe(it->second));
        return false;
      }
      if (q != cudaSuccess) {
        table_.erase(it);
        r.id = -1;
        cu(q, "cudaEventQuery (transfer completion)");
      }
    }
    take(r);  // complete; throws instead if never launched or aborted since
    return true;
  }

  void progress() override { flush(); }

  void all_reduce(float* buf, int64_t count, ReduceOp op) override { reduce(buf, count, op); }
  void all_reduce(double* buf, int64_t count, ReduceOp op) override { reduce(buf, count, op); }
  void all_reduce(int64_t* buf, int64_t count, ReduceOp op) override { reduce(buf, count, op); }

  void all_gather(const void* send, void* recv, size_t bytes) override {
    const size_t P = static_cast<size_t>(size_);
    const Buffer bufs[] = {{send, bytes, true, false}, {recv, bytes * P, false, true}};
    const std::string what = cat("all_gather of ", bytes, " bytes per rank");
    collective(what, bufs,
               [&](void* const* d) { nccl_ok(ncclAllGather(d[0], d[1], bytes, ncclInt8, comm_, dev_.comm()), what); });
    count_both(stats_, bytes * (P - 1));
  }

  void all_to_all(const void* send, void* recv, size_t bytes) override {
    const size_t P = static_cast<size_t>(size_);
    const Buffer bufs[] = {{send, bytes * P, true, false}, {recv, bytes * P, false, true}};
    const std::string what = cat("all_to_all of ", bytes, " bytes per block");
    collective(what, bufs, [&](void* const* d) {
      // Block r of send to rank r, block r of recv from rank r, as one group.
      nccl_ok(ncclGroupStart(), "ncclGroupStart (" + what + ")");
      ncclResult_t res = ncclSuccess;
      for (int r = 0; r < size_ && res == ncclSuccess; ++r) {
        const size_t off = static_cast<size_t>(r) * bytes;
        res = ncclSend(static_cast<const char*>(d[0]) + off, bytes, ncclInt8, r, comm_, dev_.comm());
        if (res == ncclSuccess) res = ncclRecv(static_cast<char*>(d[1]) + off, bytes, ncclInt8, r, comm_, dev_.comm());
      }
      const ncclResult_t end = ncclGroupEnd();
      nccl_ok(res != ncclSuccess ? res : end, what);
    });
    count_both(stats_, bytes * (P - 1));
  }

  void broadcast(void* buf, size_t bytes, int root) override {
    check_root(who(), root, size_);
    const bool is_root = rank_ == root;
    const Buffer bufs[] = {{buf, bytes, is_root, !is_root}};
    const std::string what = cat("broadcast of ", bytes, " bytes from rank ", root);
    collective(what, bufs, [&](void* const* d) {
      nccl_ok(ncclBroadcast(d[0], d[0], bytes, ncclInt8, root, comm_, dev_.comm()), what);
    });
    count_broadcast(stats_, bytes, size_, is_root);
  }

  // A one-integer all_reduce from host memory: the host blocks until every rank
  // has arrived (and its earlier transfers and kernels have finished).
  void barrier() override {
    int32_t token = 0;
    const Buffer bufs[] = {{&token, sizeof token, true, true}};
    collective("barrier", bufs, [&](void* const* d) {
      nccl_ok(ncclAllReduce(d[0], d[0], 1, ncclInt32, ncclSum, comm_, dev_.comm()), "barrier");
    });
  }

  // color < 0 is an error here; that rank still takes part (as
  // NCCL_SPLIT_NOCOLOR) so the others are not left waiting in ncclCommSplit.
  std::unique_ptr<Communicator> split(int color, int key) override {
    // ncclCommSplit blocks without limit; a bounded barrier first makes sure every
    // rank has arrived, so a dead peer gives an error instead of a hang.
    barrier();
    dev_.make_current();
    ncclComm_t sub = nullptr;
    const std::string what = cat("ncclCommSplit(color ", color, ", key ", key, ")");
    nccl_ok(ncclCommSplit(comm_, color < 0 ? NCCL_SPLIT_NOCOLOR : color, key, &sub, nullptr), what);
    check(color >= 0, who(), ": split color ", color,
          " is negative; the NCCL backend puts every rank in a sub-communicator");
    check(sub != nullptr, who(), ": ", what, " returned no communicator");
    int sub_rank = -1;
    ncclCommUserRank(sub, &sub_rank);
    return std::make_unique<NcclComm>(sub, dev_, timeout_,
                                      cat("rank ", sub_rank, " of split color ", color, " (", label_, ")"));
  }

 private:
  // A posted transfer; done is null until its batch is launched.
  struct Pending {
    void* buf = nullptr;
    size_t bytes = 0;
    int peer = 0, tag = 0;
    bool is_recv = false;
    std::shared_ptr<Event> done;
  };

  const std::string& who() const { return label_; }

  std::string describe(const Pending& p) const {
    return cat(p.is_recv ? "irecv of " : "isend of ", p.bytes, " bytes ", p.is_recv ? "from" : "to", " rank ", p.peer,
               " (tag ", p.tag, ")");
  }

  void cu(cudaError_t e, const char* what) const {
    if (e != cudaSuccess) throw Error(cat(who(), ": CUDA ", what, " failed: ", cudaGetErrorString(e)));
  }

  void usable(const std::string& what) const {
    check(comm_ != nullptr, who(), ": ", what,
          " refused: this NCCL communicator was aborted after an earlier error: ", broken_);
  }

  // Aborts the communicator (ending its kernels) and throws msg.
  [[noreturn]] void fail(const std::string& msg) {
    if (comm_) {
      broken_ = msg;
      ncclCommAbort(comm_);
      comm_ = nullptr;
    }
    throw Error(msg);
  }

  void nccl_ok(ncclResult_t r, const std::string& what) {
    if (r != ncclSuccess) fail(cat(who(), ": ", what, " failed: ", nccl_error(r, comm_)));
  }

  void poll_async_error(const std::string& what) {
    ncclResult_t async = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm_, &async);
    if (r != ncclSuccess) fail(cat(who(), ": ncclCommGetAsyncError during ", what, " failed: ", nccl_error(r, comm_)));
    if (async != ncclSuccess && async != ncclInProgress)
      fail(cat(who(), ": ", what, " failed: NCCL reported ", nccl_error(async, comm_)));
  }

  // The host waits for `e`, bounded by timeout_seconds() and polling NCCL's
  // asynchronous errors; on a timeout or an error the communicator is aborted.
  void host_wait(cudaEvent_t e, const std::string& what) {
    const auto t0 = Clock::now();
    for (int polls = 0;; ++polls) {
      const cudaError_t q = cudaEventQuery(e);
      if (q == cudaSuccess) break;
      const double el = seconds_since(t0);
      if (q != cudaErrorNotReady) {
        stats_.wait_seconds += el;
        fail(cat(who(), ": ", what, " failed: CUDA ", cudaGetErrorString(q)));
      }
      if (timeout_ > 0 && el > timeout_) {
        stats_.wait_seconds += el;
        fail(cat(who(), ": timed out after ", timeout_, " s waiting for ", what, " (", size_,
                 " ranks); a peer may have failed, be stuck, or be in a different collective or transfer"));
      }
      try {
        poll_async_error(what);
      } catch (...) {
        stats_.wait_seconds += seconds_since(t0);
        throw;
      }
      if (polls < 64)
        std::this_thread::yield();
      else
        std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
    stats_.wait_seconds += seconds_since(t0);
  }

  // Marks the end of the work queued so far on the compute stream.
  void mark_compute() { cu(cudaEventRecord(order_.get(), dev_.compute()), "cudaEventRecord (compute stream)"); }
  // The communication stream waits for the work before the latest mark.
  void comm_after_mark() {
    cu(cudaStreamWaitEvent(dev_.comm(), order_.get(), 0), "cudaStreamWaitEvent (communication after compute)");
  }

  Request post(void* buf, size_t bytes, int peer, int tag, bool is_recv) override {
    const char* op = is_recv ? "irecv" : "isend";
    usable(op);
    check_post(who(), is_recv, peer, size_, tag, INT_MAX, buf, bytes);
    check(bytes == 0 || is_device_pointer(buf), who(), ": ", op, " of ", bytes, " bytes ", is_recv ? "from" : "to",
          " rank ", peer, ": the buffer is not device memory (NCCL moves GPU memory only)");
    dev_.make_current();
    mark_compute();
    const int64_t id = next_id_++;
    table_.emplace(id, Pending{buf, bytes, peer, tag, is_recv, nullptr});
    queued_.push_back(id);
    if (is_recv)
      count_receive(stats_, bytes);
    else
      count_send(stats_, bytes);
    return Request{id};
  }

  // Launches every queued transfer as one NCCL group on the communication
  // stream, after the compute work queued before the last post (not the kernels
  // queued since, which the transfers overlap); one completion event for all.
  void flush() {
    if (queued_.empty()) return;
    const std::vector<int64_t> batch = std::move(queued_);
    queued_.clear();
    usable(cat("launching ", batch.size(), " queued transfer(s)"));
    dev_.make_current();
    comm_after_mark();
    auto done = std::make_shared<Event>();
    nccl_ok(ncclGroupStart(), "ncclGroupStart");
    ncclResult_t res = ncclSuccess;
    const Pending* bad = nullptr;
    for (int64_t id : batch) {
      const Pending& p = table_.at(id);
      res = p.is_recv ? ncclRecv(p.buf, p.bytes, ncclInt8, p.peer, comm_, dev_.comm())
                      : ncclSend(p.buf, p.bytes, ncclInt8, p.peer, comm_, dev_.comm());
      if (res != ncclSuccess) {
        bad = &p;
        break;
      }
    }
    const ncclResult_t end = ncclGroupEnd();
    if (bad) nccl_ok(res, cat("launching ", describe(*bad)));
    nccl_ok(end, cat("ncclGroupEnd launching ", batch.size(), " transfer(s)"));
    cu(cudaEventRecord(done->get(), dev_.comm()), "cudaEventRecord (transfer completion)");
    for (int64_t id : batch) table_.at(id).done = done;
  }

  // flush(); if it throws, r is dropped with it.
  void flush_for(Request& r) {
    try {
      flush();
    } catch (...) {
      table_.erase(r.id);
      r.id = -1;
      throw;
    }
  }

  std::unordered_map<int64_t, Pending>::iterator find(const Request& r) {
    auto it = table_.find(r.id);
    check(it != table_.end(), who(), ": wait/test on unknown request id ", r.id,
          " (already completed, failed, or from another communicator)");
    return it;
  }

  // Removes r from the table and returns its completion event; throws if it was
  // never launched or the communicator has been aborted since.
  std::shared_ptr<Event> take(Request& r) {
    auto it = find(r);
    Pending p = std::move(it->second);
    table_.erase(it);
    r.id = -1;
    check(p.done != nullptr, who(), ": ", describe(p), " was never launched: ", broken_);
    check(comm_ != nullptr, who(), ": ", describe(p), " abandoned: the communicator was aborted: ", broken_);
    return std::move(p.done);
  }

  // Runs launch(device pointers of bufs) on the communication stream after the
  // queued transfers and compute work. Host buffers are staged through device
  // memory and the host waits for the result; with device buffers only, the
  // compute stream waits for it instead.
  template <typename Launch>
  void collective(const std::string& what, std::span<const Buffer> bufs, Launch&& launch) {
    usable(what);
    flush();
    dev_.make_current();
    const cudaStream_t s = dev_.comm();
    std::vector<bool> host(bufs.size());
    bool any_host = false;
    for (size_t i = 0; i < bufs.size(); ++i) {
      host[i] = bufs[i].bytes > 0 && !is_device_pointer(bufs[i].ptr);
      any_host = any_host || host[i];
    }
    mark_compute();
    comm_after_mark();
    Event done;
    // Pageable copies may block the host until the stream reaches them, so the
    // stream must be idle first (a bounded wait instead of an unbounded one).
    if (any_host) {
      cu(cudaEventRecord(done.get(), s), "cudaEventRecord");
      host_wait(done.get(), "the transfers and kernels queued before " + what);
    }
    std::vector<std::unique_ptr<Scratch>> scratch;
    std::vector<void*> d(bufs.size());
    for (size_t i = 0; i < bufs.size(); ++i) {
      d[i] = const_cast<void*>(bufs[i].ptr);
      if (!host[i]) continue;
      scratch.push_back(std::make_unique<Scratch>(bufs[i].bytes, s));
      d[i] = scratch.back()->get();
      if (bufs[i].in)
        cu(cudaMemcpyAsync(d[i], bufs[i].ptr, bufs[i].bytes, cudaMemcpyHostToDevice, s),
           "cudaMemcpyAsync (staging in)");
    }
    launch(d.data());
    cu(cudaEventRecord(done.get(), s), "cudaEventRecord (collective completion)");
    if (!any_host) {
      cu(cudaStreamWaitEvent(dev_.compute(), done.get(), 0), "cudaStreamWaitEvent (compute after collective)");
      return;
    }
    host_wait(done.get(), what);
    for (size_t i = 0; i < bufs.size(); ++i)
      if (host[i] && bufs[i].out)
        cu(cudaMemcpyAsync(const_cast<void*>(bufs[i].ptr), d[i], bufs[i].bytes, cudaMemcpyDeviceToHost, s),
           "cudaMemcpyAsync (staging out)");
    cu(cudaEventRecord(done.get(), s), "cudaEventRecord (staging out)");
    host_wait(done.get(), "the copy of the result of " + what + " to host memory");
  }

  template <typename T>
  void reduce(T* buf, int64_t count, ReduceOp op) {
    check(count >= 0, who(), ": all_reduce count ", count, " is negative");
    check(buf != nullptr || count == 0, who(), ": all_reduce with a null buffer");
    const size_t bytes = static_cast<size_t>(count) * sizeof(T);
    const Buffer bufs[] = {{buf, bytes, true, true}};
    const std::string what = cat("all_reduce(", op_name(op), ") of ", count, " ", type_name<T>());
    collective(what, bufs, [&](void* const* d) {
      nccl_ok(ncclAllReduce(d[0], d[0], static_cast<size_t>(count), nccl_type<T>(), nccl_op(op), comm_, dev_.comm()),
              what);
    });
    if (size_ > 1) count_both(stats_, bytes);
  }

  ncclComm_t comm_ = nullptr;  // null once aborted
  cuda::CudaDevice& dev_;
  std::string label_;
  std::string broken_;  // why the communicator was aborted
  int rank_ = 0, size_ = 1;
  Event order_;  // recorded on the compute stream, waited for by the communication stream
  std::unordered_map<int64_t, Pending> table_;
  std::vector<int64_t> queued_;  // posted, not launched yet, in post order
  int64_t next_id_ = 0;
};

}  // namespace

std::unique_ptr<Communicator> nccl_communicator(Communicator& bootstrap, Device& dev) {
  cuda::CudaDevice& cd = cuda::as_cuda(dev);
  const int rank = bootstrap.rank(), size = bootstrap.size();
  // Rank 0's id, and whether it could make one, so that no rank waits alone.
  struct {
    int32_t ok;
    ncclUniqueId id;
  } msg{};
  std::string why;
  if (rank == 0) {
    const ncclResult_t r = ncclGetUniqueId(&msg.id);
    msg.ok = r == ncclSuccess;
    if (!msg.ok) why = nccl_error(r, nullptr);
  }
  bootstrap.broadcast(&msg, sizeof msg, 0);
  if (!msg.ok)
    throw Error(
        cat("rank ", rank, ": rank 0 could not create the NCCL unique id", why.empty() ? std::string() : ": " + why));
  cd.make_current();
  ncclComm_t comm = nullptr;
  const ncclResult_t r = ncclCommInitRank(&comm, size, msg.id, rank);
  if (r != ncclSuccess)
    throw Error(cat("rank ", rank, ": ncclCommInitRank (", size, " ranks, GPU ", cd.ordinal(),
                    ") failed: ", nccl_error(r, comm)));
  return std::make_unique<NcclComm>(comm, cd, bootstrap.timeout_seconds(), cat("rank ", rank));
}

}  // namespace ringattn
