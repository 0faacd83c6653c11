// The fused kernels built for the generic instruction set (see flash_impl.inc).
#define RA_LEVEL 0
#define RA_NS isa_generic
#include "kernels/cpu/flash_impl.inc"
#include "kernels/cpu/layers_impl.inc"

namespace ringattn::cpu {
const KernelTable& kernels_generic() {
  static const KernelTable table{Isa::generic,        isa_generic::forward,  isa_generic::backward,
                                 isa_generic::decode, isa_generic::fma_peak, &isa_generic::layer_table};
  return table;
}
}  // namespace ringattn::cpu
