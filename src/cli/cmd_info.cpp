// `ringattn info`: what this machine is and what it can do, measured.
#include <omp.h>

#include <algorithm>
#include <cstdio>

#include "cli/commands.h"
#include "ringattn/cpu/features.h"
#include "ringattn/cpu/gemm.h"
#include "ringattn/perf.h"

namespace ringattn::cli {

void add_info(CLI::App& app) {
  auto* cmd = app.add_subcommand("info", "CPU features, threads, measured FMA peaks and the GEMM library's rate");
  auto json = std::make_shared<bool>(false);
  auto quick = std::make_shared<bool>(false);
  cmd->add_flag("--json", *json, "machine-readable output");
  cmd->add_flag("--no-measure", *quick, "skip the peak and GEMM measurements");
  cmd->callback([json, quick] {
    const CpuFeatures& f = cpu_features();
    nlohmann::json j;
    j["cpu"] = {{"vendor", f.vendor}, {"model", f.model}, {"logical_cpus", f.logical_cpus}};
    j["features"] = {{"avx2", f.avx2},
                     {"fma", f.fma},
                     {"f16c", f.f16c},
                     {"avx512f", f.avx512f},
                     {"avx512bw", f.avx512bw},
                     {"avx512vl", f.avx512vl},
                     {"avx512dq", f.avx512dq},
                     {"avx512_bf16", f.avx512_bf16},
                     {"avx512_fp16", f.avx512_fp16},
                     {"avx512_vnni", f.avx512_vnni},
                     {"amx_tile", f.amx_tile},
                     {"amx_bf16", f.amx_bf16},
                     {"os_avx", f.os_avx},
                     {"os_avx512", f.os_avx512}};
    nlohmann::json isas = nlohmann::json::array();
    for (Isa i : supported_isas()) isas.push_back(isa_name(i));
    j["kernel_paths"] = isas;
    j["default_path"] = isa_name(default_isa());
    j["omp_threads"] = omp_get_max_threads();
    j["local_ranks"] = std::max(1, launcher_local_ranks());
    if (!*quick) {
      if (!*json) progress("measuring FMA peaks and GEMM rates...");
      const Isa isa = default_isa();
      j["fma_peak_gflops_per_core"] = {{"fp32", measure_fma_peak_gflops(DType::f32, isa)},
                                       {"bf16", measure_fma_peak_gflops(DType::bf16, isa)}};
      j["gemm"] = {{"library", "oneDNN matmul"},
                   {"fp32_gflops_1_thread", measure_gemm_gflops(DType::f32, 1024, 1)},
                   {"bf16_gflops_1_thread", measure_gemm_gflops(DType::bf16, 1024, 1)},
                   {"fp32_impl", gemm_impl_name(1024, DType::f32)},
                   {"bf16_impl", gemm_impl_name(1024, DType::bf16)}};
      if (!*json) progress_done();
    }
    if (*json) return print_json(j);
    std::printf("CPU            %s (%s), %d logical CPUs, %d OpenMP threads", f.model.c_str(), f.vendor.c_str(),
                f.logical_cpus, omp_get_max_threads());
    if (j["local_ranks"].get<int>() > 1)
      std::printf(" (this rank's; %d ranks on this machine)", j["local_ranks"].get<int>());
    std::printf("\n");
    std::printf("features      ");
    for (auto& [k, v] : j["features"].items())
      if (v.get<bool>()) std::printf(" %s", k.c_str());
    std::printf("\nkernel paths   %s (default %s)\n", isas.dump().c_str(), isa_name(default_isa()));
    if (!*quick) {
      std::printf("FMA peak/core  fp32 %.1f GFLOP/s, bf16 %.1f GFLOP/s (path %s)\n",
                  j["fma_peak_gflops_per_core"]["fp32"].get<double>(),
                  j["fma_peak_gflops_per_core"]["bf16"].get<double>(), isa_name(default_isa()));
      std::printf("oneDNN GEMM    fp32 %.1f GFLOP/s [%s], bf16 %.1f GFLOP/s [%s] (1 thread, n=1024)\n",
                  j["gemm"]["fp32_gflops_1_thread"].get<double>(), j["gemm"]["fp32_impl"].get<std::string>().c_str(),
                  j["gemm"]["bf16_gflops_1_thread"].get<double>(), j["gemm"]["bf16_impl"].get<std::string>().c_str());
    }
  });
}

}  // namespace ringattn::cli
