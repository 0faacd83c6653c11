// The MPI Communicator: point to point, chunking of large messages, stats,
// collectives, split, bounded waits and the collective consistency check.
// Runs under mpiexec with any number of ranks (CTest: 1, 2, 3, 4, 8).
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "ringattn/comm.h"
#include "ringattn/error.h"

using namespace ringattn;

namespace {

std::unique_ptr<Communicator> world() { return mpi_world(30); }

// Sets an environment variable for one scope (same on every rank).
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old, had_ = true;
    setenv(name, value.c_str(), 1);
  }
  ~ScopedEnv() {
    if (had_)
      setenv(name_, old_.c_str(), 1);
    else
      unsetenv(name_);
  }

 private:
  const char* name_;
  std::string old_;
  bool had_ = false;
};

uint8_t pattern(size_t i, int src) {
  return static_cast<uint8_t>((i * 131u + i / 4099u + static_cast<size_t>(src) * 7u) & 0xffu);
}

void fill(std::vector<uint8_t>& v, int src) {
  for (size_t i = 0; i < v.size(); ++i) v[i] = pattern(i, src);
}

// Index of the first byte that differs from pattern(src), or -1.
int64_t first_mismatch(const std::vector<uint8_t>& v, int src) {
  for (size_t i = 0; i < v.size(); ++i)
    if (v[i] != pattern(i, src)) return static_cast<int64_t>(i);
  return -1;
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace

TEST(MpiComm, Basics) {
  auto comm = world();
  int r = -1, p = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  EXPECT_EQ(comm->rank(), r);
  EXPECT_EQ(comm->size(), p);
  EXPECT_EQ(comm->backend(), "mpi");
  EXPECT_TRUE(MpiSession::active());
  EXPECT_TRUE(launched_by_mpi());
  const char* env = std::getenv("RINGATTN_TIMEOUT");  // CTest sets 60
  EXPECT_DOUBLE_EQ(comm->timeout_seconds(), env && *env ? std::atof(env) : 30.0);
}

TEST(MpiComm, TimeoutFromEnvironment) {
  {
    ScopedEnv env("RINGATTN_TIMEOUT", "12.5");
    EXPECT_DOUBLE_EQ(mpi_world(300)->timeout_seconds(), 12.5);
  }
  {
    ScopedEnv env("RINGATTN_TIMEOUT", "soon");
    try {
      mpi_world(300);
      FAIL() << "expected Error";
    } catch (const Error& e) {
      EXPECT_TRUE(contains(e.what(), "RINGATTN_TIMEOUT")) << e.what();
    }
  }
}

TEST(MpiComm, RingExchange) {
  auto comm = world();
  const int P = comm->size(), r = comm->rank();
  const int next = (r + 1) % P, prev = (r + P - 1) % P;
  // Two messages in flight each way, different tags, posted receive-first and
  // send-first.
  std::vector<int32_t> a_out(1000), b_out(77), a_in(1000, -1), b_in(77, -1);
  for (int i = 0; i < 1000; ++i) a_out[i] = r * 1000 + i;
  for (int i = 0; i < 77; ++i) b_out[i] = -(r * 100 + i);
  Request rs[4];
  rs[0] = comm->irecv(a_in.data(), a_in.size() * 4, prev, 3);
  rs[1] = comm->isend(a_out.data(), a_out.size() * 4, next, 3);
  rs[2] = comm->isend(b_out.data(), b_out.size() * 4, next, 9);
  rs[3] = comm->irecv(b_in.data(), b_in.size() * 4, prev, 9);
  for (const Request& q : rs) EXPECT_TRUE(q.pending());
  comm->wait_all(rs);
  for (const Request& q : rs) EXPECT_FALSE(q.pending());
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(a_in[i], prev * 1000 + i) << "index " << i;
  for (int i = 0; i < 77; ++i) ASSERT_EQ(b_in[i], -(prev * 100 + i)) << "index " << i;
  comm->wait(rs[0]);  // waiting on a finished request is a no-op
  EXPECT_TRUE(comm->test(rs[0]));
}

TEST(MpiComm, ZeroByteMessage) {
  auto comm = world();
  const int P = comm->size(), r = comm->rank();
  Request rr = comm->irecv(nullptr, 0, (r + P - 1) % P, 0);
  Request rs = comm->isend(nullptr, 0, (r + 1) % P, 0);
  comm->wait(rs);
  comm->wait(rr);
  EXPECT_EQ(comm->stats().bytes_received, 0);
  EXPECT_EQ(comm->stats().messages_sent, 1);
}

TEST(MpiComm, LargeMessageChunked) {
  // 64 MiB + 13 bytes in chunks of 1 MiB + 7: 64 full chunks and an odd remainder.
  ScopedEnv env("RINGATTN_MPI_CHUNK_BYTES", std::to_string((1 << 20) + 7));
  auto comm = world();
  const int P = comm->size(), r = comm->rank();
  const int next = (r + 1) % P, prev = (r + P - 1) % P;
  const size_t bytes = (size_t{64} << 20) + 13;
  std::vector<uint8_t> out(bytes), in(bytes, 0);
  fill(out, r);
  Request rr = comm->irecv(in.data(), bytes, prev, 5);
  Request rs = comm->isend(out.data(), bytes, next, 5);
  comm->wait(rr);
  comm->wait(rs);
  EXPECT_EQ(first_mismatch(in, prev), -1);
  EXPECT_EQ(comm->stats().bytes_sent, static_cast<int64_t>(bytes));
  EXPECT_EQ(comm->stats().bytes_received, static_cast<int64_t>(bytes));
  EXPECT_EQ(comm->stats().messages_sent, 1);  // one message, however many chunks
}

// Only with RINGATTN_MPI_BIG_TEST=1 and 2 ranks: a real > 2^31-byte message
// (about 4.3 GB of memory per rank).
TEST(MpiComm, HugeMessageOverIntMax) {
  auto comm = world();
  const char* big = std::getenv("RINGATTN_MPI_BIG_TEST");
  if (!big || big[0] != '1' || comm->size() != 2) GTEST_SKIP() << "set RINGATTN_MPI_BIG_TEST=1, 2 ranks";
  const size_t bytes = (size_t{1} << 31) + 4099;
  const int r = comm->rank();
  std::vector<uint8_t> buf(bytes);
  auto t0 = std::chrono::steady_clock::now();
  if (r == 0) {
    fill(buf, 0);
    Request q = comm->isend(buf.data(), bytes, 1, 1);
    comm->wait(q);
  } else {
    Request q = comm->irecv(buf.data(), bytes, 0, 1);
    comm->wait(q);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "[rank 1] %zu bytes in %.3f s\n", bytes, s);
    EXPECT_EQ(first_mismatch(buf, 0), -1);
  }
  comm->barrier();
}

TEST(MpiComm, StatsPointToPointExact) {
  auto comm = world();
  const int P = comm->size(), r = comm->rank();
  const int next = (r + 1) % P, prev = (r + P - 1) % P;
  comm->reset_stats();
  const size_t sizes[3] = {1, 4096, 300001};
  std::vector<std::vector<uint8_t>> out, in;
  std::vector<Request> reqs;
  for (int i = 0; i < 3; ++i) {
    out.emplace_back(sizes[i], uint8_t(i));
    in.emplace_back(sizes[i]);
  }
  for (int i = 0; i < 3; ++i) reqs.push_back(comm->irecv(in[i].data(), sizes[i], prev, 20 + i));
  for (int i = 0; i < 3; ++i) reqs.push_back(comm->isend(out[i].data(), sizes[i], next, 20 + i));
  // Sends count when posted, receives when completed.
  EXPECT_EQ(comm->stats().bytes_sent, 1 + 4096 + 300001);
  EXPECT_EQ(comm->stats().messages_sent, 3);
  comm->wait_all(reqs);
  EXPECT_EQ(comm->stats().bytes_sent, 1 + 4096 + 300001);
  EXPECT_EQ(comm->stats().bytes_received, 1 + 4096 + 300001);
  EXPECT_GE(comm->stats().wait_seconds, 0.0);

  // Collectives (see the accounting in src/comm/mpi_comm.cpp).
  comm->reset_stats();
  std::vector<double> d(10, 1.0);
  comm->all_reduce(d.data(), 10, ReduceOp::sum);
  const int64_t Pm1 = P - 1;
  EXPECT_EQ(comm->stats().bytes_sent, P > 1 ? 80 : 0);
  EXPECT_EQ(comm->stats().bytes_received, P > 1 ? 80 : 0);
  comm->reset_stats();
  std::vector<uint8_t> g(static_cast<size_t>(P) * 16);
  comm->all_gather(g.data() + r * 16, g.data(), 16);
  EXPECT_EQ(comm->stats().bytes_sent, 16 * Pm1);
  EXPECT_EQ(comm->stats().bytes_received, 16 * Pm1);
  comm->reset_stats();
  std::vector<uint8_t> g2(g.size());
  comm->all_to_all(g.data(), g2.data(), 16);
  EXPECT_EQ(comm->stats().bytes_sent, 16 * Pm1);
  EXPECT_EQ(comm->stats().bytes_received, 16 * Pm1);
  comm->reset_stats();
  comm->broadcast(g.data(), 16, 0);
  EXPECT_EQ(comm->stats().bytes_sent, r == 0 ? 16 * Pm1 : 0);
  EXPECT_EQ(comm->stats().bytes_received, r == 0 || P == 1 ? 0 : 16);
  EXPECT_EQ(comm->stats().messages_sent, 0);
}

template <typename T>
void check_all_reduce(Communicator& comm, int64_t n) {
  const int P = comm.size(), r = comm.rank();
  auto val = [](int rank, int64_t i) { return static_cast<T>((rank % 5) * 3 + (i % 7) - 2 * (rank == 2)); };
  for (ReduceOp op : {ReduceOp::sum, ReduceOp::max, ReduceOp::min}) {
    std::vector<T> buf(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) buf[i] = val(r, i);
    comm.all_reduce(buf.data(), n, op);
    for (int64_t i = 0; i < n; ++i) {
      T want = val(0, i);
      for (int q = 1; q < P; ++q) {
        T v = val(q, i);
        want = op == ReduceOp::sum ? want + v : op == ReduceOp::max ? std::max(want, v) : std::min(want, v);
      }
      ASSERT_EQ(buf[i], want) << "op " << int(op) << " index " << i;
    }
  }
}

TEST(MpiComm, AllReduce) {
  auto comm = world();
  check_all_reduce<float>(*comm, 1000);
  check_all_reduce<double>(*comm, 333);
  check_all_reduce<int64_t>(*comm, 1001);
  // Large int64 values survive (no float round trip).
  int64_t big = (int64_t{1} << 50) + comm->rank();
  comm->all_reduce(&big, 1, ReduceOp::max);
  EXPECT_EQ(big, (int64_t{1} << 50) + comm->size() - 1);
  comm->all_reduce(&big, 0, ReduceOp::sum);  // empty is fine
}

TEST(MpiComm, AllReduceInPieces) {
  ScopedEnv env("RINGATTN_MPI_CHUNK_BYTES", "1000");  // 125 doubles per MPI call
  auto comm = world();
  check_all_reduce<double>(*comm, 1001);
}

void check_all_gather(Communicator& comm, size_t bytes) {
  const int P = comm.size(), r = comm.rank();
  std::vector<uint8_t> mine(bytes), all(bytes * P, 0);
  fill(mine, r);
  comm.all_gather(mine.data(), all.data(), bytes);
  for (int q = 0; q < P; ++q) {
    std::vector<uint8_t> block(all.begin() + q * bytes, all.begin() + (q + 1) * bytes);
    ASSERT_EQ(first_mismatch(block, q), -1) << "block " << q;
  }
  // In place: this rank's block already sits in the output.
  std::vector<uint8_t> all2(bytes * P, 0);
  std::copy(mine.begin(), mine.end(), all2.begin() + r * bytes);
  comm.all_gather(all2.data() + r * bytes, all2.data(), bytes);
  EXPECT_EQ(all2, all);
}

TEST(MpiComm, AllGather) {
  auto comm = world();
  check_all_gather(*comm, 37);
  check_all_gather(*comm, 0);
}

TEST(MpiComm, AllGatherDerivedType) {
  ScopedEnv env("RINGATTN_MPI_CHUNK_BYTES", "64");  // blocks of 1000 = 15 × 64 + 40
  auto comm = world();
  check_all_gather(*comm, 1000);
  check_all_gather(*comm, 128);  // exact multiple of the chunk
}

void check_all_to_all(Communicator& comm, size_t bytes) {
  const int P = comm.size(), r = comm.rank();
  std::vector<uint8_t> send(bytes * P), recv(bytes * P, 0);
  for (int dst = 0; dst < P; ++dst)
    for (size_t i = 0; i < bytes; ++i) send[dst * bytes + i] = pattern(i, r * 16 + dst);
  comm.all_to_all(send.data(), recv.data(), bytes);
  for (int src = 0; src < P; ++src)
    for (size_t i = 0; i < bytes; ++i)
      ASSERT_EQ(recv[src * bytes + i], pattern(i, src * 16 + r)) << "block " << src << " byte " << i;
}

TEST(MpiComm, AllToAll) {
  auto comm = world();
  check_all_to_all(*comm, 53);
}

TEST(MpiComm, AllToAllDerivedType) {
  ScopedEnv env("RINGATTN_MPI_CHUNK_BYTES", "100");
  auto comm = world();
  check_all_to_all(*comm, 1234);
}

TEST(MpiComm, BroadcastFromLastRank) {
  auto comm = world();
  const int P = comm->size(), r = comm->rank(), root = P - 1;
  for (size_t bytes : {size_t{1}, size_t{4097}}) {
    std::vector<uint8_t> buf(bytes, 0);
    if (r == root) fill(buf, 42);
    comm->broadcast(buf.data(), bytes, root);
    EXPECT_EQ(first_mismatch(buf, 42), -1);
  }
  EXPECT_THROW(comm->broadcast(nullptr, 0, P), Error);
}

TEST(MpiComm, BroadcastDerivedType) {
  ScopedEnv env("RINGATTN_MPI_CHUNK_BYTES", "256");
  auto comm = world();
  std::vector<uint8_t> buf(10000, 0);
  if (comm->rank() == 0) fill(buf, 9);
  comm->broadcast(buf.data(), buf.size(), 0);
  EXPECT_EQ(first_mismatch(buf, 9), -1);
}

TEST(MpiComm, Barrier) {
  auto comm = world();
  // Rank 0 arrives 50 ms late; nobody may leave the barrier before it arrives
  // (steady_clock is one clock for all processes of a host).
  auto now = [] { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); };
  if (comm->rank() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  double arrived = now();
  comm->barrier();
  double left = now();
  comm->broadcast(&arrived, sizeof arrived, 0);
  EXPECT_GE(left, arrived);
  for (int i = 0; i < 5; ++i) comm->barrier();
}

TEST(MpiComm, SplitEvenOdd) {
  auto comm = world();
  const int P = comm->size(), r = comm->rank();
  auto sub = comm->split(r % 2, r);
  ASSERT_TRUE(sub);
  const int members = r % 2 == 0 ? (P + 1) / 2 : P / 2;
  EXPECT_EQ(sub->size(), members);
  EXPECT_EQ(sub->rank(), r / 2);
  EXPECT_EQ(sub->backend(), "mpi");
  EXPECT_EQ(sub->timeout_seconds(), comm->timeout_seconds());
  // Collectives stay inside the group.
  int64_t v = r;
  sub->all_reduce(&v, 1, ReduceOp::sum);
  int64_t want = 0;
  for (int q = r % 2; q < P; q += 2) want += q;
  EXPECT_EQ(v, want);
  std::vector<int64_t> ranks(static_cast<size_t>(sub->size()));
  int64_t mine = r;
  sub->all_gather(&mine, ranks.data(), sizeof(int64_t));
  for (int i = 0; i < sub->size(); ++i) EXPECT_EQ(ranks[i], 2 * i + r % 2);
  // Point to point inside the group.
  const int n = sub->size(), sr = sub->rank();
  int64_t got = -1;
  Request rr = sub->irecv(&got, 8, (sr + n - 1) % n, 1);
  Request rs = sub->isend(&mine, 8, (sr + 1) % n, 1);
  sub->wait(rr);
  sub->wait(rs);
  EXPECT_EQ(got, 2 * ((sr + n - 1) % n) + r % 2);
  sub->barrier();
  // Key orders the ranks: reversed.
  auto rev = comm->split(0, -r);
  EXPECT_EQ(rev->rank(), P - 1 - r);
  // A negative color joins no group.
  auto none = comm->split(r == 0 ? -1 : 1, r);
  EXPECT_EQ(none == nullptr, r == 0);
  if (none) {
    EXPECT_EQ(none->size(), P - 1);
  }
}

TEST(MpiComm, CheckSameOnAllRanks) {
  auto comm = world();
  const int P = comm->size(), r = comm->rank();
  std::vector<int64_t> same = {4, 4096, 64, -1};
  EXPECT_NO_THROW(check_same_on_all_ranks(*comm, same, "q shape"));
  EXPECT_NO_THROW(check_same_on_all_ranks(*comm, std::span<const int64_t>(), "nothing"));
  if (P == 1) return;
  // Entry 2 differs on the last rank: every rank throws, naming it.
  std::vector<int64_t> vals = same;
  if (r == P - 1) vals[2] = 128;
  try {
    check_same_on_all_ranks(*comm, vals, "q shape");
    ADD_FAILURE() << "rank " << r << " did not throw";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_TRUE(contains(m, "q shape differs across ranks")) << m;
    EXPECT_TRUE(contains(m, "entry 2 is 64 on some rank and 128 on another")) << m;
    EXPECT_TRUE(contains(m, cat("this rank has ", vals[2]))) << m;
  }
  // A different number of entries.
  std::vector<int64_t> fewer = same;
  if (r == 0) fewer.pop_back();
  try {
    check_same_on_all_ranks(*comm, fewer, "options");
    ADD_FAILURE() << "rank " << r << " did not throw";
  } catch (const Error& e) {
    EXPECT_TRUE(contains(e.what(), "options differs across ranks")) << e.what();
  }
  comm->barrier();  // still in step
}

TEST(MpiComm, InvalidArguments) {
  auto comm = world();
  const int P = comm->size();
  int x = 0;
  EXPECT_THROW(comm->isend(&x, 4, P, 0), Error);
  EXPECT_THROW(comm->irecv(&x, 4, -1, 0), Error);
  EXPECT_THROW(comm->isend(&x, 4, 0, -3), Error);
  Request bogus{12345};
  EXPECT_THROW(comm->wait(bogus), Error);
  Request none;
  EXPECT_NO_THROW(comm->wait(none));
  EXPECT_TRUE(comm->test(none));
}

TEST(MpiComm, SizeMismatchIsAnError) {
  auto comm = world();
  const int P = comm->size(), r = comm->rank();
  if (P == 1) GTEST_SKIP() << "needs 2 ranks";
  auto sub = comm->split(0, r);  // own communicator: nothing can leak into later tests
  const int next = (r + 1) % P, prev = (r + P - 1) % P;
  std::vector<uint8_t> out(100, 1), in(100, 0);
  // Sent 100, expected 64: MPI truncation.
  Request rr = sub->irecv(in.data(), 64, prev, 1);
  Request rs = sub->isend(out.data(), 100, next, 1);
  sub->wait(rs);
  try {
    sub->wait(rr);
    ADD_FAILURE() << "expected Error";
  } catch (const Error& e) {
    EXPECT_TRUE(contains(e.what(), "irecv of 64 bytes from rank")) << e.what();
  }
  EXPECT_FALSE(rr.pending());
  // Sent 64, expected 100.
  rr = sub->irecv(in.data(), 100, prev, 2);
  rs = sub->isend(out.data(), 64, next, 2);
  sub->wait(rs);
  try {
    sub->wait(rr);
    ADD_FAILURE() << "expected Error";
  } catch (const Error& e) {
    EXPECT_TRUE(contains(e.what(), "received only 64 bytes")) << e.what();
  }
  sub->barrier();
}

TEST(MpiComm, PointToPointTimeout) {
  auto comm = world();
  const int P = comm->size(), r = comm->rank();
  if (P == 1) GTEST_SKIP() << "needs 2 ranks";
  auto sub = comm->split(0, r);
  sub->set_timeout_seconds(0.5);
  int32_t got = -1;
  if (r == 0) {
    Request q = sub->irecv(&got, 4, 1, 7);  // rank 1 sends nothing (yet)
    auto t0 = std::chrono::steady_clock::now();
    try {
      sub->wait(q);
      ADD_FAILURE() << "expected a timeout";
    } catch (const Error& e) {
      std::string m = e.what();
      EXPECT_TRUE(contains(m, "rank 0: timed out after 0.5 s waiting for irecv of 4 bytes from rank 1 (tag 7)")) << m;
      EXPECT_TRUE(contains(m, "the peer may have failed or be stuck")) << m;
    }
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_GE(s, 0.5);
    EXPECT_LT(s, 5.0);
    EXPECT_FALSE(q.pending());
    EXPECT_GE(sub->stats().wait_seconds, 0.5);
  }
  comm->barrier();
  // The abandoned receive was cancelled: a message sent now reaches a new receive.
  if (r == 1) {
    int32_t v = 1234;
    Request q = sub->isend(&v, 4, 0, 7);
    sub->wait(q);
  } else if (r == 0) {
    Request q = sub->irecv(&got, 4, 1, 7);
    sub->wait(q);
    EXPECT_EQ(got, 1234);
  }
  sub->barrier();
}

TEST(MpiComm, CollectiveTimeout) {
  auto comm = world();
  const int P = comm->size(), r = comm->rank();
  if (P == 1) GTEST_SKIP() << "needs 2 ranks";
  auto sub = comm->split(0, r);
  sub->set_timeout_seconds(0.3);
  if (r == 0) {
    try {
      sub->barrier();  // the others are not there yet
      ADD_FAILURE() << "expected a timeout";
    } catch (const Error& e) {
      EXPECT_TRUE(contains(e.what(), "rank 0: timed out after 0.3 s in barrier over")) << e.what();
    }
    // Out of step now: refused rather than mismatched.
    EXPECT_THROW(sub->barrier(), Error);
  }
  comm->barrier();
  // The others join the abandoned barrier (rank 0 progresses it in the world barrier).
  if (r != 0) {
    sub->set_timeout_seconds(30);
    sub->barrier();
  }
  comm->barrier();
}

TEST(MpiComm, ProgressCompletesWithoutWait) {
  auto comm = world();
  const int P = comm->size(), r = comm->rank();
  if (P == 1) GTEST_SKIP() << "needs 2 ranks";
  const size_t bytes = size_t{64} << 20;
  std::vector<uint8_t> buf(bytes);
  comm->barrier();
  auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  if (r == 0 || r == 1) {
    if (r == 0) fill(buf, 0);
    for (int rep = 0; rep < 2; ++rep) {  // the second one is reported (pages already touched)
      t0 = std::chrono::steady_clock::now();
      Request q = r == 0 ? comm->isend(buf.data(), bytes, 1, 11) : comm->irecv(buf.data(), bytes, 0, 11);
      long polls = 0;
      bool done = false;
      while (!done && elapsed() < 20) {
        comm->progress();
        ++polls;
        done = comm->test(q);
      }
      double s = elapsed();
      ASSERT_TRUE(done) << "64 MiB transfer not complete after " << polls << " progress() calls";
      EXPECT_FALSE(q.pending());
      if (r == 1) {
        EXPECT_EQ(first_mismatch(buf, 0), -1);
        EXPECT_EQ(comm->stats().bytes_received, static_cast<int64_t>(bytes) * (rep + 1));
        if (rep == 1)
          std::fprintf(stderr, "[rank 1] 64 MiB via progress()/test(): %.1f ms, %.2f GB/s, %ld polls (%d ranks)\n",
                       s * 1e3, bytes / s / 1e9, polls, P);
      }
    }
  }
  comm->barrier();
}

TEST(MpiComm, Bandwidth64MiB) {
  auto comm = world();
  const int P = comm->size(), r = comm->rank();
  if (P == 1) GTEST_SKIP() << "needs 2 ranks";
  const size_t bytes = size_t{64} << 20;
  std::vector<uint8_t> buf(bytes, 1);
  for (int rep = 0; rep < 3; ++rep) {
    comm->barrier();
    double t0 = MPI_Wtime();
    if (r == 0) {
      Request q = comm->isend(buf.data(), bytes, 1, 12);
      comm->wait(q);
    } else if (r == 1) {
      Request q = comm->irecv(buf.data(), bytes, 0, 12);
      comm->wait(q);
      double s = MPI_Wtime() - t0;
      if (rep == 2)
        std::fprintf(stderr, "[rank 1] 64 MiB isend/irecv+wait: %.1f ms, %.2f GB/s (%d ranks)\n", s * 1e3,
                     bytes / s / 1e9, P);
    }
  }
  comm->barrier();
}
