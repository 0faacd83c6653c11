// The NVIDIA GPU path: a CUDA Device (device.h) and the Communicators that move
// its memory. Built when CMake finds nvcc and NCCL (option RINGATTN_CUDA);
// without it every function here is still declared, cuda_built() is false and
// the factories throw Error saying so.
#pragma once
#include <functional>
#include <memory>
#include <string>

#include "ringattn/comm.h"
#include "ringattn/device.h"

namespace ringattn {

bool cuda_built();        // compiled with the CUDA path
int cuda_device_count();  // GPUs visible to this process (0 without the CUDA path or a driver)

// One GPU: a compute stream for kernels and a communication stream for its
// communicators. Kernels: flash-attention forward/backward and the merge for
// bf16 and fp16 (fp32 accumulation; fp32 o/lse outputs allowed), head dims 64
// and 128, causal by global positions, GQA.
// Freed memory is kept for reuse (cudaFree would stall the host on every
// temporary) and given back when an allocation fails, the device goes, or
// release_cached_memory is called.
std::unique_ptr<Device> make_cuda_device(int ordinal);
// Gives dev's cached free blocks back to CUDA, for memory the cache cannot lend:
// other devices on the same GPU (run_device_local_group), kernels' scratch.
void release_cached_memory(Device& dev);
// The forward kernel attention_forward uses on the current GPU: "wgmma" (Hopper,
// sm_90a build) or "mma.sync" (any other GPU, or RINGATTN_CUDA_FORWARD=portable).
std::string cuda_forward_kernel();

// NCCL across processes, one GPU per rank: rank 0 makes the unique id, which is
// broadcast over `bootstrap` (e.g. the MPI world); ranks and size are bootstrap's.
// Point-to-point calls are stream-ordered on dev's communication stream after
// the work queued so far on its compute stream; wait() makes the compute stream
// wait (the host does not block), so transfers overlap the kernels queued between
// the post and the wait. Collectives accept host or device pointers.
std::unique_ptr<Communicator> nccl_communicator(Communicator& bootstrap, Device& dev);

// P ranks in one process sharing one GPU (NCCL refuses two ranks of one
// communicator on the same GPU): fn(rank, device, comm) runs on P threads, each
// rank with its own CudaDevice (its own streams) and a Communicator whose
// transfers are device-to-device copies between the ranks' buffers on the
// receiver's communication stream. The first exception any rank throws is
// rethrown after every thread has ended (the others see their transfers fail).
void run_device_local_group(int P, int ordinal,
                            const std::function<void(int rank, Device& dev, Communicator& comm)>& fn);

// bf16 GEMM rate of cuBLAS on this GPU (TFLOP/s, m = n = k = size, median of
// `reps` timed products on random data after warm-up): the ceiling the attention
// kernels are measured against.
double cublas_bf16_gemm_tflops(Device& dev, int64_t size, int reps);

}  // namespace ringattn
