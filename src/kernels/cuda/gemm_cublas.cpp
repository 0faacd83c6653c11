// The GPU's matrix ceiling: cuBLAS bf16 GEMM (fp32 accumulation) timed with
// CUDA events on random data, the rate the attention kernels are compared to.
#include <algorithm>
#include <vector>

#include "kernels/cuda/cublas_loader.h"
#include "kernels/cuda/cuda_device.h"
#include "kernels/cuda/kernels.h"
#include "ringattn/cuda.h"
#include "ringattn/error.h"

namespace ringattn {

double cublas_bf16_gemm_tflops(Device& dev, int64_t size, int reps) {
  cuda::CudaDevice& cd = cuda::as_cuda(dev);
  check(size > 0 && reps > 0, "GEMM size and repetitions must be positive");
  cd.make_current();
  DeviceTensor a = dev.alloc(DType::bf16, {size, size}), b = dev.alloc(DType::bf16, {size, size}),
               c = dev.alloc(DType::bf16, {size, size});
  cuda::fill_uniform(a, 1, -1.f, 1.f, cd.compute());
  cuda::fill_uniform(b, 2, -1.f, 1.f, cd.compute());
  const cuda::Cublas& blas = cuda::cublas();
  cublasHandle_t h = nullptr;
  auto ok = [&](cublasStatus_t s, const char* what) {
    if (s != CUBLAS_STATUS_SUCCESS) {
      if (h) blas.destroy(h);
      throw Error(cat("cuBLAS ", what, ": ", blas.status_string(s)));
    }
  };
  ok(blas.create(&h), "creating a handle");
  ok(blas.set_stream(h, cd.compute()), "setting the stream");
  const float alpha = 1.f, beta = 0.f;
  const int n = static_cast<int>(size);
  auto gemm = [&] {
    ok(blas.gemm_ex(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a.ptr<void>(), CUDA_R_16BF, n, b.ptr<void>(),
                    CUDA_R_16BF, n, &beta, c.ptr<void>(), CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
       "bf16 GEMM");
  };
  for (int i = 0; i < 3; ++i) gemm();
  cudaEvent_t e0, e1;
  cuda::check(cudaEventCreate(&e0), "creating an event");
  cuda::check(cudaEventCreate(&e1), "creating an event");
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    cuda::check(cudaEventRecord(e0, cd.compute()), "recording an event");
    gemm();
    cuda::check(cudaEventRecord(e1, cd.compute()), "recording an event");
    cuda::check(cudaEventSynchronize(e1), "timing the GEMM");
    float t = 0;
    cuda::check(cudaEventElapsedTime(&t, e0, e1), "timing the GEMM");
    ms.push_back(t);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  blas.destroy(h);
  std::nth_element(ms.begin(), ms.begin() + ms.size() / 2, ms.end());
  return 2.0 * double(size) * double(size) * double(size) / (ms[ms.size() / 2] * 1e-3) / 1e12;
}

}  // namespace ringattn
