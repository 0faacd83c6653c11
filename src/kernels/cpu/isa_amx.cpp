// The fused kernels with AMX bf16 tiles for the bf16 forward and backward (see flash_impl.inc).
#define RA_LEVEL 4
#define RA_NS isa_amx
#include "kernels/cpu/flash_impl.inc"
#include "kernels/cpu/layers_impl.inc"

namespace ringattn::cpu {
const KernelTable& kernels_amx() {
  static const KernelTable table{Isa::amx_bf16,   isa_amx::forward,  isa_amx::backward,
                                 isa_amx::decode, isa_amx::fma_peak, &isa_amx::layer_table};
  return table;
}
}  // namespace ringattn::cpu
