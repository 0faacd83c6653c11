// The fused kernels built for the avx512 instruction set (see flash_impl.inc).
#define RA_LEVEL 2
#define RA_NS isa_avx512
#include "kernels/cpu/flash_impl.inc"
#include "kernels/cpu/layers_impl.inc"

namespace ringattn::cpu {
const KernelTable& kernels_avx512() {
  static const KernelTable table{Isa::avx512,        isa_avx512::forward,  isa_avx512::backward,
                                 isa_avx512::decode, isa_avx512::fma_peak, &isa_avx512::layer_table};
  return table;
}
}  // namespace ringattn::cpu
