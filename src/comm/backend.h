// What the three Communicator backends (mpi_comm.cpp, nccl_comm.cpp,
// local_device_comm.cpp) share: the checks every post and broadcast makes, the
// names their error messages use, and the CommStats accounting. The accounting is
// algorithm-free (what this rank logically contributes, not what the library's
// internal algorithm moves):
//   isend        bytes_sent += bytes, messages_sent += 1 (once, however many chunks);
//   irecv        bytes_received += bytes (MPI: the size actually received);
//   all_reduce   bytes_sent += count·sizeof(T), bytes_received += same;
//   all_gather   bytes_sent += bytes·(P−1), bytes_received += bytes·(P−1);
//   all_to_all   bytes_sent += bytes·(P−1), bytes_received += bytes·(P−1);
//   broadcast    root: bytes_sent += bytes·(P−1); others: bytes_received += bytes;
//   barrier      nothing.
// Collectives never add to messages_sent; with one rank they add nothing.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>
#include <type_traits>

#include "ringattn/comm.h"
#include "ringattn/error.h"

namespace ringattn::comm_backend {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

inline const char* op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum:
      return "sum";
    case ReduceOp::max:
      return "max";
    case ReduceOp::min:
      return "min";
  }
  return "?";
}

template <typename T>
constexpr const char* type_name() {
  if constexpr (std::is_same_v<T, float>) return "float";
  if constexpr (std::is_same_v<T, double>) return "double";
  if constexpr (std::is_same_v<T, int64_t>) return "int64";
}

// An isend (is_recv false) or irecv to/from `peer` of a communicator of `size`
// ranks: the peer in range, the tag in [0, max_tag], a buffer unless it is empty.
// `who` names this rank in the message.
inline void check_post(const std::string& who, bool is_recv, int peer, int size, int tag, int max_tag, const void* buf,
                       size_t bytes) {
  const char* op = is_recv ? "irecv" : "isend";
  check(peer >= 0 && peer < size, who, ": ", op, " ", is_recv ? "from" : "to", " rank ", peer,
        ", which is out of range [0, ", size, ")");
  check(tag >= 0 && tag <= max_tag, who, ": ", op, " tag ", tag, " is out of range [0, ", max_tag, "]");
  check(buf != nullptr || bytes == 0, who, ": ", op, " of ", bytes, " bytes with a null buffer");
}

inline void check_root(const std::string& who, int root, int size) {
  check(root >= 0 && root < size, who, ": broadcast root ", root, " is out of range [0, ", size, ")");
}

inline void count_send(CommStats& s, size_t bytes) {
  s.bytes_sent += static_cast<int64_t>(bytes);
  s.messages_sent += 1;
}
inline void count_receive(CommStats& s, size_t bytes) { s.bytes_received += static_cast<int64_t>(bytes); }
// A collective that sends and receives `bytes` (all_reduce, all_gather, all_to_all).
inline void count_both(CommStats& s, size_t bytes) {
  s.bytes_sent += static_cast<int64_t>(bytes);
  s.bytes_received += static_cast<int64_t>(bytes);
}
inline void count_broadcast(CommStats& s, size_t bytes, int size, bool is_root) {
  if (size <= 1) return;
  if (is_root)
    s.bytes_sent += static_cast<int64_t>(bytes) * (size - 1);
  else
    s.bytes_received += static_cast<int64_t>(bytes);
}

// abort_job's MPI part (mpi_comm.cpp): while MPI runs, this process's rank in
// MPI_COMM_WORLD (the rank mpirun's user sees; false when MPI is not running),
// and MPI_Abort of the whole job (after waiting up to 3 s for the other ranks).
bool mpi_world_rank(int* rank);
[[noreturn]] void mpi_abort(int code);

}  // namespace ringattn::comm_backend
