// Aligned allocation with process-wide accounting of the bytes ringattn holds.
#include "ringattn/memory.h"

#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>

#include "ringattn/error.h"

namespace ringattn {
namespace {

std::atomic<int64_t> g_current_bytes{0};
std::atomic<int64_t> g_peak_bytes{0};

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
  void* p = std::aligned_alloc(kAlignment, padded);
  if (!p) throw_out_of_memory(bytes);
  const auto n = static_cast<int64_t>(padded);
  const int64_t now = g_current_bytes.fetch_add(n, std::memory_order_relaxed) + n;
  int64_t peak = g_peak_bytes.load(std::memory_order_relaxed);
  while (now > peak && !g_peak_bytes.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
  return p;
}

void aligned_free_tracked(void* p, size_t bytes) noexcept {
  if (!p) return;
  std::free(p);
  g_current_bytes.fetch_sub(static_cast<int64_t>(padded_size(bytes)), std::memory_order_relaxed);
}

MemoryStats memory_stats() {
  return MemoryStats{g_current_bytes.load(std::memory_order_relaxed), g_peak_bytes.load(std::memory_order_relaxed)};
}

void reset_peak_memory() {
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
  const int64_t avail = available_memory_bytes();
  if (avail < 0) return;  // unknown: let the allocations decide
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
