// The GPU entry points of cuda.h in a build without the CUDA path
// (RINGATTN_CUDA=OFF): nothing is visible, and asking for a GPU says why.
#include "ringattn/cuda.h"
#include "ringattn/error.h"

namespace ringattn {
namespace {
[[noreturn]] void not_built() {
  throw Error(
      "this ringattn was built without the CUDA path: rebuild with nvcc and NCCL installed "
      "(CMake option RINGATTN_CUDA=ON)");
}
}  // namespace

bool cuda_built() { return false; }
int cuda_device_count() { return 0; }
std::string cuda_forward_kernel() { not_built(); }
std::unique_ptr<Device> make_cuda_device(int) { not_built(); }
void release_cached_memory(Device&) { not_built(); }
std::unique_ptr<Communicator> nccl_communicator(Communicator&, Device&) { not_built(); }
void run_device_local_group(int, int, const std::function<void(int, Device&, Communicator&)>&) { not_built(); }
double cublas_bf16_gemm_tflops(Device&, int64_t, int) { not_built(); }

}  // namespace ringattn
