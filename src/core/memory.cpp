// Aligned allocation with process-wide accounting of the bytes ringattn holds.
#include "ringattn/memory.h"

#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>

#include "ringattn/error.h"

namespace ringattn {
namespace {

std::atomic<int64_t> g_current_bytes{0};
std::atomic<int64_t> g_peak_bytes{0};

// Freed blocks of at least kCacheMin bytes are kept for the next request of the
// same size instead of going back to the C library, which returns such blocks to
// the OS: the next one's every page would fault and be zeroed again (a model's
// layers and a benchmark's repetitions ask for the same sizes over and over; an
// 8192-token bf16 prefill spent ~15 % of its time there). Held plus cached bytes
// never exceed the peak held since the last reset, so the process's memory stays
// what memory_stats() reports. Not under AddressSanitizer, whose use-after-free
// checks need the real free.
#if defined(__SANITIZE_ADDRESS__)
constexpr size_t kCacheMin = std::numeric_limits<size_t>::max();
#else
constexpr size_t kCacheMin = size_t{1} << 20;
#endif
struct BlockCache {
  std::mutex mu;
  std::multimap<size_t, void*> blocks;  // padded size -> block
  int64_t bytes = 0;
};
BlockCache& block_cache() {
  static BlockCache* cache = new BlockCache;  // never destroyed: frees may come during exit
  return *cache;
}
// Frees cached blocks, smallest first (a large block saves the most faults when
// reused), until held + cached <= limit (caller holds mu).
void shrink_cache_locked(BlockCache& c, int64_t limit) {
  while (!c.blocks.empty() && g_current_bytes.load(std::memory_order_relaxed) + c.bytes > limit) {
    c.bytes -= static_cast<int64_t>(c.blocks.begin()->first);
    std::free(c.blocks.begin()->second);
    c.blocks.erase(c.blocks.begin());
  }
}

// The size actually requested from the allocator and counted: a non-zero multiple
// of kAlignment, as std::aligned_alloc requires. Returns 0 on overflow.
size_t padded_size(size_t bytes) {
  if (bytes == 0) return kAlignment;
  if (bytes > std::numeric_limits<size_t>::max() - (kAlignment - 1)) return 0;
  return (bytes + kAlignment - 1) / kAlignment * kAlignment;
}

[[noreturn]] void throw_out_of_memory(size_t bytes) {
  char mib[32];
  std::snprintf(mib, sizeof mib, "%.1f", static_cast<double>(bytes) / (1024.0 * 1024.0));
  throw Error(cat("out of memory: could not allocate ", mib,
                  " MiB (reduce the sequence length, batch or head count, or spread the "
                  "sequence over more ranks)"));
}

}  // namespace

void* aligned_alloc_tracked(size_t bytes) {
  const size_t padded = padded_size(bytes);
  if (padded == 0 || padded > static_cast<size_t>(std::numeric_limits<int64_t>::max())) throw_out_of_memory(bytes);
  const auto n = static_cast<int64_t>(padded);
  void* p = nullptr;
  if (padded >= kCacheMin) {
    BlockCache& c = block_cache();
    std::lock_guard<std::mutex> lock(c.mu);
    if (auto it = c.blocks.find(padded); it != c.blocks.end()) {
      p = it->second;
      c.bytes -= n;
      c.blocks.erase(it);
    } else {  // a new block: make room under the peak (all of the cache if this sets a new one)
      const int64_t peak = g_peak_bytes.load(std::memory_order_relaxed);
      shrink_cache_locked(c, peak - n);
    }
  }
  if (!p) p = std::aligned_alloc(kAlignment, padded);
  if (!p) throw_out_of_memory(bytes);
  const int64_t now = g_current_bytes.fetch_add(n, std::memory_order_relaxed) + n;
  int64_t peak = g_peak_bytes.load(std::memory_order_relaxed);
  while (now > peak && !g_peak_bytes.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
  return p;
}

void aligned_free_tracked(void* p, size_t bytes) noexcept {
  if (!p) return;
  const size_t padded = padded_size(bytes);
  const auto n = static_cast<int64_t>(padded);
  g_current_bytes.fetch_sub(n, std::memory_order_relaxed);
  if (padded >= kCacheMin) {
    BlockCache& c = block_cache();
    std::lock_guard<std::mutex> lock(c.mu);
    const int64_t held = g_current_bytes.load(std::memory_order_relaxed);
    if (held + c.bytes + n <= g_peak_bytes.load(std::memory_order_relaxed)) {
      try {
        c.blocks.emplace(padded, p);
        c.bytes += n;
        return;
      } catch (...) {  // no memory for the map node: free the block instead
      }
    }
  }
  std::free(p);
}

void release_cached_memory() noexcept {
  BlockCache& c = block_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  shrink_cache_locked(c, std::numeric_limits<int64_t>::min());
}

MemoryStats memory_stats() {
  BlockCache& c = block_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return MemoryStats{g_current_bytes.load(std::memory_order_relaxed), g_peak_bytes.load(std::memory_order_relaxed),
                     c.bytes};
}

void reset_peak_memory() {
  release_cached_memory();  // the cache's bound is the peak
  g_peak_bytes.store(g_current_bytes.load(std::memory_order_relaxed), std::memory_order_relaxed);
}

int64_t available_memory_bytes() {
  if (std::FILE* f = std::fopen("/proc/meminfo", "r")) {
    char line[256];
    long long kib = -1;
    while (std::fgets(line, sizeof line, f))
      if (std::sscanf(line, "MemAvailable: %lld kB", &kib) == 1) break;
    std::fclose(f);
    if (kib >= 0) return static_cast<int64_t>(kib) * 1024;
  }
  const long pages = sysconf(_SC_AVPHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? static_cast<int64_t>(pages) * page : -1;
}

void check_fits_in_memory(double bytes, const std::string& what) {
  int64_t avail = available_memory_bytes();
  if (avail < 0) return;                 // unknown: let the allocations decide
  avail += memory_stats().cached_bytes;  // kept blocks give way to new sizes
  constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
  check(bytes <= static_cast<double>(avail), what, " needs at least ", bytes / kGiB, " GiB but this machine has ",
        static_cast<double>(avail) / kGiB, " GiB available: use a smaller size or more ranks");
}

int64_t peak_rss_bytes() {
  struct rusage ru {};
  if (getrusage(RUSAGE_SELF, &ru) != 0) return 0;
  return static_cast<int64_t>(ru.ru_maxrss) * 1024;  // Linux reports KiB
}

}  // namespace ringattn
