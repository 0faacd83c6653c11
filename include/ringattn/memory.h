// Aligned owning buffers with process-wide accounting of the bytes ringattn holds
// (current and peak), so every command can report peak memory per rank.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

namespace ringattn {

inline constexpr size_t kAlignment = 64;  // one cache line / one zmm register

// Blocks of 1 MiB and more are kept after their free for the next request of the
// same size (fresh pages fault and are zeroed on first touch), while held plus
// kept bytes stay within the peak held since the last reset.
void* aligned_alloc_tracked(size_t bytes);  // throws Error on failure
void aligned_free_tracked(void* p, size_t bytes) noexcept;
void release_cached_memory() noexcept;  // returns the kept blocks to the C library

struct MemoryStats {
  int64_t current_bytes;  // bytes held in Buffers now
  int64_t peak_bytes;     // most ever held at once since the last reset
  int64_t cached_bytes;   // freed blocks kept for reuse (held + cached <= peak)
};
MemoryStats memory_stats();
void reset_peak_memory();          // peak := current (and the kept blocks released)
int64_t peak_rss_bytes();          // the process's peak resident set (getrusage)
int64_t available_memory_bytes();  // MemAvailable of /proc/meminfo (-1: unknown)
// Throws Error "<what> needs at least X GiB but this machine has Y GiB available"
// when bytes exceed the available memory: absurd sizes fail up front, clearly,
// instead of in an allocation (or, with overcommit, the OOM killer) later.
void check_fits_in_memory(double bytes, const std::string& what);

// Owning, 64-byte aligned, uninitialised storage.
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t bytes) : data_(bytes ? aligned_alloc_tracked(bytes) : nullptr), bytes_(bytes) {}
  ~Buffer() { aligned_free_tracked(data_, bytes_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace ringattn
