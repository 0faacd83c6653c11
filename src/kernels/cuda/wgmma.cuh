// Hopper warpgroup matrix multiply (wgmma, sm_90a) and the shared-memory layout
// it reads: the building blocks of attention_sm90.cu.
//
// Layout ("128-byte swizzle", PTX ISA §9.7.15.5.1.2): a tile of ROWS rows of
// 16-bit elements and C columns (C a multiple of 64) is stored as C/64 column
// blocks of [ROWS][64], each row 128 bytes; within a block, the 16-byte chunk c of
// row r sits at chunk c ^ (r % 8). Tiles start on 1024-byte boundaries.
//   K-major operand (rows = M or N, columns = K): descriptor start = the block of
//   the k-step plus 32 bytes per 16-column step inside it, SBO = 1024 (8 rows).
//   MN-major operand (rows = K, columns = N, "transposed" B): LBO = the byte
//   stride between 64-column blocks, SBO = 1024 (8 rows of K).
//
// Fragments (per warp w of the warpgroup, g = lane / 4, t = lane % 4):
//   accumulator m64nN, fp32: d[4j + e] = row 16w + g + 8·(e / 2), column 8j + 2t + e % 2;
//   A in registers, m64k16: a[0] rows g, cols 2t..2t+1; a[1] rows g+8; a[2] rows g,
//   cols 2t+8..; a[3] rows g+8, cols 2t+8.. (two 16-bit values per register).
// So two n8 blocks of an accumulator, packed to 16 bits, are an A fragment.
#pragma once
#include <cstdint>

// clang-format off

namespace ringattn::cuda::wg {

// Byte offset of element (r, c) in a swizzled tile of `rows` rows.
__device__ __forceinline__ uint32_t swizzled(int r, int c, int rows) {
  return uint32_t(c / 64) * rows * 128 + r * 128 + ((((c % 64) / 8) ^ (r % 8)) * 16) + (c % 8) * 2;
}

// A shared-memory matrix descriptor with the 128-byte swizzle.
__device__ __forceinline__ uint64_t desc(uint32_t smem_byte_addr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t(smem_byte_addr & 0x3FFFF) >> 4) | (uint64_t((lbo & 0x3FFFF) >> 4) << 16) |
         (uint64_t((sbo & 0x3FFFF) >> 4) << 32) | (uint64_t(1) << 62);
}

__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Ordinary shared-memory writes (cp.async included) made visible to the tensor cores.
__device__ __forceinline__ void fence_smem_to_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Keeps the compiler from moving uses of registers across an asynchronous MMA:
// call after wait() on the accumulators and A fragments it used.
template <int N>
__device__ __forceinline__ void hold(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void hold(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// The accumulator operand lists of the asm statements below ("{%0, ..., %N-1}" and
// the matching "+f" bindings), written out because inline asm takes no loops.
#define RA_WGMMA_D32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define RA_WGMMA_OUT32(d) "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define RA_WGMMA_D64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define RA_WGMMA_OUT64(d) "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
// clang-format on

// d (+)= A·B, m64n128k16, A and B K-major in shared memory; scale_d = 0 overwrites d.
template <bool kBf16>
__device__ __forceinline__ void mma_ss_n128(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
#define RA_WGMMA_SS(TY)                                                                                           \
  asm volatile(                                                                                                   \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                                \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " RA_WGMMA_D64 ", %64, %65, p, 1, 1, 0, 0;\n}\n" \
      : RA_WGMMA_OUT64(d)                                                                                         \
      : "l"(da), "l"(db), "r"(scale_d))
  if constexpr (kBf16)
    RA_WGMMA_SS("bf16");
  else
    RA_WGMMA_SS("f16");
#undef RA_WGMMA_SS
}

// d += A·B, m64nNk16 (N = 64 or 128), A in registers, B MN-major in shared memory.
template <bool kBf16>
__device__ __forceinline__ void mma_rs_t(float (&d)[64], const uint32_t (&a)[4], uint64_t db) {
#define RA_WGMMA_RS(TY)                                                         \
  asm volatile(                                                                 \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                              \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " RA_WGMMA_D64 \
      ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                           \
      : RA_WGMMA_OUT64(d)                                                       \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1))
  if constexpr (kBf16)
    RA_WGMMA_RS("bf16");
  else
    RA_WGMMA_RS("f16");
#undef RA_WGMMA_RS
}
template <bool kBf16>
__device__ __forceinline__ void mma_rs_t(float (&d)[32], const uint32_t (&a)[4], uint64_t db) {
#define RA_WGMMA_RS(TY)                                                        \
  asm volatile(                                                                \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                             \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " RA_WGMMA_D32 \
      ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                          \
      : RA_WGMMA_OUT32(d)                                                      \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1))
  if constexpr (kBf16)
    RA_WGMMA_RS("bf16");
  else
    RA_WGMMA_RS("f16");
#undef RA_WGMMA_RS
}

}  // namespace ringattn::cuda::wg
