// The fused kernels built for the avx2 instruction set (see flash_impl.inc).
#define RA_LEVEL 1
#define RA_NS isa_avx2
#include "kernels/cpu/flash_impl.inc"
#include "kernels/cpu/layers_impl.inc"

namespace ringattn::cpu {
const KernelTable& kernels_avx2() {
  static const KernelTable table{Isa::avx2,        isa_avx2::forward,  isa_avx2::backward,
                                 isa_avx2::decode, isa_avx2::fma_peak, &isa_avx2::layer_table};
  return table;
}
}  // namespace ringattn::cpu
