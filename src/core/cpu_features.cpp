// CPU feature detection (CPUID + XGETBV) and the choice of kernel path.
#include "ringattn/cpu/features.h"

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__linux__)
#include <omp.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include "ringattn/error.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define RINGATTN_X86 1
#endif

namespace ringattn {
namespace {

constexpr Isa kAllIsas[] = {Isa::generic, Isa::avx2, Isa::avx512, Isa::avx512_bf16, Isa::amx_bf16};

#ifdef RINGATTN_X86
bool bit(uint32_t reg, int b) { return (reg >> b) & 1u; }

#if defined(__linux__)
// Linux hands out the 8 KiB AMX tile state only to processes that ask for it.
bool request_amx_permission() {
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}
#else
bool request_amx_permission() { return false; }
#endif

// XCR0: which register states the OS saves on context switch. Only valid to
// execute when CPUID reports OSXSAVE.
uint64_t read_xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}
#endif

std::string trim(std::string s) {
  auto blank = [](char c) { return c == '\0' || std::isspace(static_cast<unsigned char>(c)); };
  size_t b = 0, e = s.size();
  while (b < e && blank(s[b])) ++b;
  while (e > b && blank(s[e - 1])) --e;
  return s.substr(b, e - b);
}

CpuFeatures detect() {
  CpuFeatures f;
  f.logical_cpus = static_cast<int>(std::thread::hardware_concurrency());
#ifdef RINGATTN_X86
  uint32_t a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(0, 0, &a, &b, &c, &d)) return f;
  const uint32_t max_leaf = a;
  char vendor[13] = {};
  std::memcpy(vendor + 0, &b, 4);
  std::memcpy(vendor + 4, &d, 4);
  std::memcpy(vendor + 8, &c, 4);
  f.vendor = trim(vendor);

  bool osxsave = false;
  if (max_leaf >= 1 && __get_cpuid_count(1, 0, &a, &b, &c, &d)) {
    f.sse42 = bit(c, 20);
    f.fma = bit(c, 12);
    osxsave = bit(c, 27);
    f.avx = bit(c, 28);
    f.f16c = bit(c, 29);
  }
  if (max_leaf >= 7 && __get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    const uint32_t max_subleaf = a;
    f.avx2 = bit(b, 5);
    f.avx512f = bit(b, 16);
    f.avx512dq = bit(b, 17);
    f.avx512bw = bit(b, 30);
    f.avx512vl = bit(b, 31);
    f.avx512_vnni = bit(c, 11);
    f.amx_bf16 = bit(d, 22);
    f.avx512_fp16 = bit(d, 23);
    f.amx_tile = bit(d, 24);
    if (max_subleaf >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512_bf16 = bit(a, 5);
  }
  if (osxsave) {
    const uint64_t xcr0 = read_xcr0();
    f.os_avx = (xcr0 & 0x6) == 0x6;                                      // XMM, YMM
    f.os_avx512 = (xcr0 & 0xe6) == 0xe6;                                 // XMM, YMM, opmask, ZMM0-15 upper, ZMM16-31
    f.os_amx = (xcr0 & 0x60000) == 0x60000 && request_amx_permission();  // XTILECFG, XTILEDATA
  }

  if (__get_cpuid_max(0x80000000u, nullptr) >= 0x80000004u) {
    char brand[49] = {};
    for (uint32_t i = 0; i < 3; ++i) {
      __get_cpuid_count(0x80000002u + i, 0, &a, &b, &c, &d);
      std::memcpy(brand + 16 * i + 0, &a, 4);
      std::memcpy(brand + 16 * i + 4, &b, 4);
      std::memcpy(brand + 16 * i + 8, &c, 4);
      std::memcpy(brand + 16 * i + 12, &d, 4);
    }
    f.model = trim(brand);
  }
#endif
  return f;
}

std::string lower(const std::string& s) {
  std::string r;
  for (char ch : s) r += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return r;
}

std::string isa_list(const std::vector<Isa>& v) {
  std::string s;
  for (Isa i : v) {
    if (!s.empty()) s += ", ";
    s += isa_name(i);
  }
  return s;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

const char* isa_name(Isa i) {
  switch (i) {
    case Isa::generic:
      return "generic";
    case Isa::avx2:
      return "avx2";
    case Isa::avx512:
      return "avx512";
    case Isa::avx512_bf16:
      return "avx512_bf16";
    case Isa::amx_bf16:
      return "amx_bf16";
  }
  return "invalid";
}

Isa parse_isa(const std::string& s) {
  const std::string k = lower(s);
  for (Isa i : kAllIsas)
    if (k == isa_name(i)) return i;
  throw Error(cat("unknown instruction-set path '", s, "': valid names are ",
                  isa_list(std::vector<Isa>(std::begin(kAllIsas), std::end(kAllIsas)))));
}

bool isa_supported(Isa i) {
  const CpuFeatures& f = cpu_features();
  switch (i) {
    case Isa::generic:
      return true;
    case Isa::avx2:
      return f.avx && f.avx2 && f.fma && f.f16c && f.os_avx;
    case Isa::avx512:
      return f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.os_avx512 && isa_supported(Isa::avx2);
    case Isa::avx512_bf16:
      return f.avx512_bf16 && isa_supported(Isa::avx512);
    case Isa::amx_bf16:
      return f.amx_tile && f.amx_bf16 && f.os_amx && isa_supported(Isa::avx512_bf16);
  }
  return false;
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> v;
  for (Isa i : kAllIsas)
    if (isa_supported(i)) v.push_back(i);
  return v;
}

// Not cached: tests set RINGATTN_ISA to exercise each path in one process.
Isa default_isa() {
  const std::vector<Isa> ok = supported_isas();
  const char* env = std::getenv("RINGATTN_ISA");
  if (!env || !*env) return ok.back();
  Isa want = Isa::generic;
  try {
    want = parse_isa(env);
  } catch (const Error& e) {
    throw Error(cat("RINGATTN_ISA=", env, ": ", e.what(), "; this CPU supports ", isa_list(ok),
                    " (unset RINGATTN_ISA to use the best one)"));
  }
  if (!isa_supported(want)) {
    const std::string& model = cpu_features().model;
    throw Error(cat("RINGATTN_ISA=", env, ": this CPU", model.empty() ? std::string() : " (" + model + ")",
                    " cannot run the ", isa_name(want), " path; it supports ", isa_list(ok),
                    " (unset RINGATTN_ISA to use the best one)"));
  }
  return want;
}

int max_threads() {
  const long n = ::sysconf(_SC_NPROCESSORS_ONLN);
  return 16 * static_cast<int>(n > 0 ? n : 1);
}

int threads_sharing_cpus(int affinity_cpus, int online_cpus, int local_ranks) {
  check(affinity_cpus >= 1 && online_cpus >= affinity_cpus && local_ranks >= 1,
        "threads_sharing_cpus: need 1 <= affinity CPUs (", affinity_cpus, ") <= online CPUs (", online_cpus,
        ") and at least one local rank (", local_ranks, ")");
  // Ranks per affinity set when the launcher spread them evenly: ceil(local × aff / online).
  const long long sharing = (static_cast<long long>(local_ranks) * affinity_cpus + online_cpus - 1) / online_cpus;
  return std::max(1, static_cast<int>(affinity_cpus / sharing));
}

int launcher_local_ranks() {
  for (const char* v : {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE"}) {
    const char* env = std::getenv(v);
    if (!env || !*env) continue;
    char* end = nullptr;
    const long n = std::strtol(env, &end, 10);
    check(*end == '\0' && n >= 1, v, " (set by the launcher) must be a rank count, got '", env, "'");
    return static_cast<int>(std::min<long>(n, 1 << 20));
  }
  return 0;
}

int share_cpus_with_local_ranks() {
  const char* chosen = std::getenv("OMP_NUM_THREADS");
  if (chosen && *chosen) return 0;
  const int local = launcher_local_ranks();
  if (local <= 1) return 0;
  cpu_set_t mask;
  CPU_ZERO(&mask);
  const long online = ::sysconf(_SC_NPROCESSORS_ONLN);
  if (online < 1 || ::sched_getaffinity(0, sizeof mask, &mask) != 0) return 0;
  const int affinity = std::min(CPU_COUNT(&mask), static_cast<int>(online));
  omp_set_num_threads(threads_sharing_cpus(std::max(affinity, 1), static_cast<int>(online), local));
  return local;
}

void check_thread_count(long long n, const std::string& what) {
  check(n >= 1, what, " must be at least 1 thread, got ", n);
  check(n <= max_threads(), what, " = ", n, " is more than 16 x the ", max_threads() / 16, " CPUs of this machine (",
        max_threads(), "): use at most that many threads");
}

void check_omp_num_threads_env() {
  const char* env = std::getenv("OMP_NUM_THREADS");
  if (!env || !*env) return;
  const std::string s = env;
  size_t start = 0;
  while (start <= s.size()) {
    const size_t comma = s.find(',', start);
    const std::string part = s.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    char* end = nullptr;
    const long long n = std::strtoll(part.c_str(), &end, 10);
    check(!part.empty() && end && *end == '\0',
          "OMP_NUM_THREADS must be a thread count (or a comma list of them), got '", s, "'");
    check_thread_count(n, cat("OMP_NUM_THREADS (", s, ")"));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
}

}  // namespace ringattn
