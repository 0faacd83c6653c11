// cuBLAS, loaded when the first CUDA device is made rather than at process start.
// Linked the usual way, cuBLAS's initialisers run in every process that links it:
// ~0.1 s of CPU and ~100 MB of touched pages per process (measured with an empty
// main), paid by every CPU-only run, every MPI rank and every test process. Here
// the library is opened with dlopen on first use and the few entry points the
// CUDA path calls are resolved once.
#pragma once
#include <cublas_v2.h>

namespace ringattn::cuda {

// cublasGemmEx's C entry point (C++ also sees an inline overload taking a
// cudaDataType compute type).
using CublasGemmEx = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                                        const void*, const void*, cudaDataType, int, const void*, cudaDataType, int,
                                        const void*, void*, cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);

struct Cublas {
  decltype(&cublasCreate_v2) create;
  decltype(&cublasDestroy_v2) destroy;
  decltype(&cublasSetStream_v2) set_stream;
  CublasGemmEx gemm_ex;
  decltype(&cublasGetStatusString) status_string;
};

// The loaded library's entry points (thread-safe; loads on the first call). The
// library is looked up by its soname (LD_LIBRARY_PATH, the system's paths), then
// in the directory CMake found it in at build time. Throws Error naming the
// library and dlerror()'s reason when it cannot be opened or lacks an entry point.
const Cublas& cublas();

}  // namespace ringattn::cuda
