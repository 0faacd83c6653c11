// CPU feature detection and the instruction-set paths the kernels are built for.
#pragma once
#include <string>
#include <vector>

namespace ringattn {

struct CpuFeatures {
  std::string vendor, model;
  bool sse42 = false, avx = false, avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_bf16 = false, avx512_fp16 = false, avx512_vnni = false;
  bool amx_tile = false, amx_bf16 = false;
  bool os_avx = false, os_avx512 = false;  // XCR0 says the OS saves the registers
  bool os_amx = false;                     // tile state enabled and granted to this process
  int logical_cpus = 0;
};
const CpuFeatures& cpu_features();

// The most threads one process may run: 16 × the CPUs it can use. More only
// oversubscribes, and absurd counts (100000) crash the OpenMP runtime.
int max_threads();
// Checks a thread count a user gave (an option or OMP_NUM_THREADS, named by
// `what`): at least 1 and at most max_threads(). Throws Error.
void check_thread_count(long long n, const std::string& what);
// OMP_NUM_THREADS (a count, or a comma list of counts per nesting level), checked
// as above before the OpenMP runtime starts any thread.
void check_omp_num_threads_env();

// Ranks that a launcher (mpirun, mpiexec) started on one machine share its CPUs,
// but OpenMP's default team is one thread per CPU the process may run on: 4
// unbound ranks on 16 CPUs would run 64 threads, each spinning at its barriers.
// The team one rank should run: the CPUs it may run on (`affinity_cpus`), divided
// by the ranks that share them (`local_ranks` spread evenly over the machine's
// `online_cpus`: ranks bound to distinct cores or sockets share nothing); >= 1.
int threads_sharing_cpus(int affinity_cpus, int online_cpus, int local_ranks);
// The launcher's count of ranks on this machine (OMPI_COMM_WORLD_LOCAL_SIZE,
// MPI_LOCALNRANKS, MV2_COMM_WORLD_LOCAL_SIZE); 0 when not started by one.
int launcher_local_ranks();
// Unless OMP_NUM_THREADS chose, sets OpenMP's default team to
// threads_sharing_cpus for this process (nothing outside a launcher). Returns the
// local rank count it divided by (0: left as it was). Call before any parallel region.
int share_cpus_with_local_ranks();

// Kernel paths, from least to most capable.
enum class Isa { generic, avx2, avx512, avx512_bf16, amx_bf16 };
const char* isa_name(Isa i);
Isa parse_isa(const std::string& s);  // throws Error listing the valid names
bool isa_supported(Isa i);            // this CPU and OS can run it
std::vector<Isa> supported_isas();    // every path this machine can run
// The path used by default: the best supported one, or RINGATTN_ISA if set
// (an unsupported RINGATTN_ISA is an error, not a silent fallback).
Isa default_isa();

}  // namespace ringattn
