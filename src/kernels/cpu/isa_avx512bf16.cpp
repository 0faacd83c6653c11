// The fused kernels built for the avx512bf16 instruction set (see flash_impl.inc).
#define RA_LEVEL 3
#define RA_NS isa_avx512bf16
#include "kernels/cpu/flash_impl.inc"
#include "kernels/cpu/layers_impl.inc"

namespace ringattn::cpu {
const KernelTable& kernels_avx512bf16() {
  static const KernelTable table{Isa::avx512_bf16,       isa_avx512bf16::forward,  isa_avx512bf16::backward,
                                 isa_avx512bf16::decode, isa_avx512bf16::fma_peak, &isa_avx512bf16::layer_table};
  return table;
}
}  // namespace ringattn::cpu
