// Storage data types. Compute and accumulation are always fp32.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

namespace ringattn {

enum class DType : uint8_t { f32, bf16, f16 };

size_t dtype_size(DType t);
const char* dtype_name(DType t);
// Parses "fp32"/"f32"/"float32", "bf16"/"bfloat16", "fp16"/"f16"/"float16".
DType parse_dtype(const std::string& s);

// Scalar conversions (round to nearest even; NaN stays NaN).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t f32_to_f16(float f);
float f16_to_f32(uint16_t h);

// Reads element i of a buffer of dtype t as fp32 / writes fp32 x into it.
inline float load_as_f32(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::f32:
      return static_cast<const float*>(p)[i];
    case DType::bf16:
      return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default:
      return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}
inline void store_from_f32(void* p, DType t, int64_t i, float x) {
  switch (t) {
    case DType::f32:
      static_cast<float*>(p)[i] = x;
      break;
    case DType::bf16:
      static_cast<uint16_t*>(p)[i] = f32_to_bf16(x);
      break;
    default:
      static_cast<uint16_t*>(p)[i] = f32_to_f16(x);
      break;
  }
}

}  // namespace ringattn
