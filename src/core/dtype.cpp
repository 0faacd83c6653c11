// Storage dtypes: sizes, names, parsing, and IEEE binary16 conversions in plain
// integer arithmetic (this file is built for baseline x86-64, without F16C).
#include "ringattn/dtype.h"

#include <cctype>
#include <cstdint>
#include <cstring>
#include <string>

#include "ringattn/error.h"

namespace ringattn {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32:
      return 4;
    case DType::bf16:
      return 2;
    case DType::f16:
      return 2;
  }
  throw Error(cat("dtype_size: invalid DType value ", static_cast<int>(t)));
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32:
      return "fp32";
    case DType::bf16:
      return "bf16";
    case DType::f16:
      return "fp16";
  }
  return "invalid";
}

DType parse_dtype(const std::string& s) {
  std::string k;
  k.reserve(s.size());
  for (char c : s) k += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (k == "fp32" || k == "f32" || k == "float32") return DType::f32;
  if (k == "bf16" || k == "bfloat16") return DType::bf16;
  if (k == "fp16" || k == "f16" || k == "float16") return DType::f16;
  throw Error(
      cat("unknown dtype '", s, "': valid names are fp32 (f32, float32), bf16 (bfloat16), fp16 (f16, float16)"));
}

// binary32 -> binary16, round to nearest even. Overflow gives ±inf, values below
// half the smallest subnormal (2^-25) give ±0, NaN stays a quiet NaN.
uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
  // 65520 = 0x477ff000 is the tie between 65504 (odd mantissa) and 2^16: it and
  // everything above round to infinity.
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);
  if (a < 0x38800000u) {  // below 2^-14: a half subnormal (or zero)
    const uint32_t e = a >> 23;
    if (e < 102) return static_cast<uint16_t>(sign);  // < 2^-25 rounds to zero
    // value = m · 2^(e-150) = (m >> shift) units of 2^-24, shift = 126 - e in [14, 24].
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;  // may carry into the smallest normal
    return static_cast<uint16_t>(sign | r);
  }
  // Normal: rebias the exponent (127 -> 15) and drop 13 mantissa bits; a carry out
  // of the mantissa correctly bumps the exponent.
  uint32_t h = (a - 0x38000000u) >> 13;
  const uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

// binary16 -> binary32 (exact).
float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu;
  uint32_t m = h & 0x3ffu;
  uint32_t u;
  if (e == 0x1f) {
    u = sign | 0x7f800000u | (m << 13);  // inf, or NaN with its payload
  } else if (e == 0) {
    if (m == 0) {
      u = sign;
    } else {  // subnormal m · 2^-24: normalise
      e = 113;
      while (!(m & 0x400u)) {
        m <<= 1;
        --e;
      }
      u = sign | (e << 23) | ((m & 0x3ffu) << 13);
    }
  } else {
    u = sign | ((e + 112) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace ringattn
