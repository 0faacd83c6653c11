// Storage dtypes (bf16/fp16 conversions, checked exhaustively and against the
// F16C hardware conversion where available), TensorView/Tensor basics, copy_into
// across dtypes and strides, and memory accounting.
#include <gtest/gtest.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "ringattn/dtype.h"
#include "ringattn/error.h"
#include "ringattn/memory.h"
#include "ringattn/tensor.h"
#include "test_util.h"

namespace ringattn::testing {
namespace {

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// ---------------------------------------------------------------------------
// bf16

TEST(DtypeBf16, RoundToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(f32_to_bf16(-2.0f), 0xc000);
  EXPECT_EQ(f32_to_bf16(0.0f), 0x0000);
  EXPECT_EQ(f32_to_bf16(-0.0f), 0x8000);
  // Exactly halfway: ties go to the even mantissa.
  EXPECT_EQ(f32_to_bf16(from_bits(0x3f808000u)), 0x3f80);  // lower is even: stay
  EXPECT_EQ(f32_to_bf16(from_bits(0x3f818000u)), 0x3f82);  // lower is odd: round up
  // Just above / below halfway.
  EXPECT_EQ(f32_to_bf16(from_bits(0x3f808001u)), 0x3f81);
  EXPECT_EQ(f32_to_bf16(from_bits(0x3f807fffu)), 0x3f80);
  EXPECT_EQ(f32_to_bf16(from_bits(0x3f81ffffu)), 0x3f82);
  // Carry into the exponent.
  EXPECT_EQ(f32_to_bf16(from_bits(0x3fffffffu)), 0x4000);
  // Largest finite float rounds to infinity (beyond bf16's max + half ulp).
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7f80);
  EXPECT_EQ(f32_to_bf16(from_bits(0x7f7f7fffu)), 0x7f7f);
  // Infinities and NaN.
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(f32_to_bf16(-std::numeric_limits<float>::infinity()), 0xff80);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(from_bits(0x7f800001u)))));  // signalling, low payload
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(from_bits(0xffc00001u)))));
  // Subnormals are kept (no flush to zero).
  EXPECT_EQ(f32_to_bf16(from_bits(0x00010000u)), 0x0001);
  EXPECT_EQ(bf16_to_f32(0x0001), from_bits(0x00010000u));
}

TEST(DtypeBf16, ExhaustiveRoundTrip) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = bf16_to_f32(static_cast<uint16_t>(h));
    EXPECT_EQ(to_bits(f), h << 16);
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(f)))) << h;
    } else {
      ASSERT_EQ(f32_to_bf16(f), h) << h;
    }
  }
}

TEST(DtypeBf16, RandomValuesAreNearest) {
  // The result is one of the two bf16 neighbours and the nearer one.
  std::mt19937 rng(3);
  for (int i = 0; i < 200000; ++i) {
    const uint32_t u = rng() & 0x7f7fffffu;          // finite, positive
    if ((u & 0xffff0000u) == 0x7f7f0000u) continue;  // above bf16's max: may round to inf
    const float f = from_bits(u);
    const float r = bf16_to_f32(f32_to_bf16(f));
    const float lo = from_bits(u & 0xffff0000u), hi = from_bits((u & 0xffff0000u) + 0x10000u);
    ASSERT_TRUE(r == lo || r == hi) << u;
    const double dl = static_cast<double>(f) - lo, dh = static_cast<double>(hi) - f;
    if (dl < dh) {
      ASSERT_EQ(r, lo) << u;
    }
    if (dh < dl) {
      ASSERT_EQ(r, hi) << u;
    }
  }
}

// ---------------------------------------------------------------------------
// fp16

TEST(DtypeF16, KnownValues) {
  EXPECT_EQ(f32_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(f32_to_f16(-2.0f), 0xc000);
  EXPECT_EQ(f32_to_f16(0.0f), 0x0000);
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_f16(65504.f), 0x7bff);  // largest finite
  EXPECT_EQ(f32_to_f16(65519.f), 0x7bff);  // below the tie
  EXPECT_EQ(f32_to_f16(65520.f), 0x7c00);  // the tie rounds to even = inf
  EXPECT_EQ(f32_to_f16(1e6f), 0x7c00);
  EXPECT_EQ(f32_to_f16(-1e6f), 0xfc00);
  EXPECT_EQ(f32_to_f16(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(f32_to_f16(-std::numeric_limits<float>::infinity()), 0xfc00);
  EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(from_bits(0x7f800001u)))));
  // Normal boundary and subnormals.
  EXPECT_EQ(f32_to_f16(std::ldexp(1.f, -14)), 0x0400);      // smallest normal
  EXPECT_EQ(f32_to_f16(std::ldexp(1.f, -24)), 0x0001);      // smallest subnormal
  EXPECT_EQ(f32_to_f16(std::ldexp(1023.f, -24)), 0x03ff);   // largest subnormal
  EXPECT_EQ(f32_to_f16(std::ldexp(1.f, -25)), 0x0000);      // half the smallest: tie to even (0)
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0001f, -25)), 0x0001);  // just above the tie
  EXPECT_EQ(f32_to_f16(std::ldexp(3.f, -25)), 0x0002);      // 1.5 units: tie to even (2)
  EXPECT_EQ(f32_to_f16(std::ldexp(5.f, -25)), 0x0002);      // 2.5 units: tie to even (2)
  EXPECT_EQ(f32_to_f16(std::ldexp(1.f, -30)), 0x0000);
  EXPECT_EQ(f32_to_f16(-std::ldexp(1.f, -30)), 0x8000);
  EXPECT_EQ(f32_to_f16(std::ldexp(2047.f, -25)), 0x0400);  // rounds up into the smallest normal
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.f, -24));
  EXPECT_EQ(f16_to_f32(0x03ff), std::ldexp(1023.f, -24));
  EXPECT_EQ(f16_to_f32(0x8001), -std::ldexp(1.f, -24));
  EXPECT_EQ(f16_to_f32(0x7bff), 65504.f);
  EXPECT_EQ(f16_to_f32(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(f16_to_f32(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7e00)));
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7c01)));
  // Normal rounding: 1 + 2^-11 is the tie between 1 and 1 + 2^-10.
  EXPECT_EQ(f32_to_f16(1.f + std::ldexp(1.f, -11)), 0x3c00);
  EXPECT_EQ(f32_to_f16(1.f + 3 * std::ldexp(1.f, -11)), 0x3c02);
}

TEST(DtypeF16, ExhaustiveRoundTrip) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = f16_to_f32(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      ASSERT_TRUE(((h >> 10) & 0x1f) == 0x1f && (h & 0x3ff)) << h;
      ASSERT_TRUE(std::isnan(f16_to_f32(f32_to_f16(f)))) << h;
    } else {
      ASSERT_EQ(f32_to_f16(f), h) << h;
    }
  }
}

__attribute__((target("f16c"))) uint16_t hw_f32_to_f16(float f) {
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
}
__attribute__((target("f16c"))) float hw_f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }

TEST(DtypeF16, MatchesF16cHardware) {
  if (!cpu_features().f16c) GTEST_SKIP() << "no F16C on this CPU";
  for (uint32_t h = 0; h < 65536; ++h) {
    const float a = f16_to_f32(static_cast<uint16_t>(h)), b = hw_f16_to_f32(static_cast<uint16_t>(h));
    if (std::isnan(b)) {
      ASSERT_TRUE(std::isnan(a)) << h;
    } else {
      ASSERT_EQ(to_bits(a), to_bits(b)) << h;
    }
  }
  // Every float exponent, with random mantissas and the halfway patterns.
  std::mt19937 rng(4);
  for (uint32_t e = 0; e < 256; ++e)
    for (int i = 0; i < 600; ++i) {
      uint32_t m = rng() & 0x7fffffu;
      if (i < 8) m = (m & ~0x1fffu) | 0x1000u;             // normal tie
      if (i >= 8 && i < 16) m = (m & ~0x1fffu) | 0x0fffu;  // just below
      if (i >= 16 && i < 24) m &= ~0x7ffu;                 // ties for subnormal shifts
      const uint32_t u = (rng() & 0x80000000u) | (e << 23) | m;
      const float f = from_bits(u);
      const uint16_t sw = f32_to_f16(f), hw = hw_f32_to_f16(f);
      if (std::isnan(f)) {
        ASSERT_TRUE(std::isnan(f16_to_f32(sw))) << std::hex << u;
      } else {
        ASSERT_EQ(sw, hw) << std::hex << "bits 0x" << u << " = " << f;
      }
    }
}

TEST(Dtype, SizesNamesAndLoadStore) {
  EXPECT_EQ(dtype_size(DType::f32), 4u);
  EXPECT_EQ(dtype_size(DType::bf16), 2u);
  EXPECT_EQ(dtype_size(DType::f16), 2u);
  for (DType t : {DType::f32, DType::bf16, DType::f16}) EXPECT_EQ(parse_dtype(dtype_name(t)), t);
  EXPECT_EQ(parse_dtype("float32"), DType::f32);
  EXPECT_EQ(parse_dtype("bfloat16"), DType::bf16);
  EXPECT_EQ(parse_dtype("f16"), DType::f16);
  EXPECT_THROW(parse_dtype("int8"), Error);

  float f[2];
  uint16_t h[2];
  store_from_f32(f, DType::f32, 1, 1.25f);
  EXPECT_EQ(load_as_f32(f, DType::f32, 1), 1.25f);
  store_from_f32(h, DType::bf16, 1, 1.0f + std::ldexp(1.f, -8));  // tie: stays 1 (even)
  EXPECT_EQ(h[1], 0x3f80);
  EXPECT_EQ(load_as_f32(h, DType::bf16, 1), 1.0f);
  store_from_f32(h, DType::f16, 0, -0.5f);
  EXPECT_EQ(h[0], 0xb800);
  EXPECT_EQ(load_as_f32(h, DType::f16, 0), -0.5f);
}

// ---------------------------------------------------------------------------
// TensorView / Tensor

TEST(TensorViewTest, ContiguousViewBasics) {
  std::vector<float> buf(2 * 3 * 4 * 5);
  const TensorView v(buf.data(), DType::f32, {2, 3, 4, 5});
  EXPECT_EQ(v.rank, 4);
  EXPECT_EQ(v.numel(), 120);
  EXPECT_EQ(v.stride(0), 60);
  EXPECT_EQ(v.stride(1), 20);
  EXPECT_EQ(v.stride(2), 5);
  EXPECT_EQ(v.stride(3), 1);
  EXPECT_TRUE(v.is_contiguous());
  EXPECT_FALSE(v.empty());
  EXPECT_EQ(v.offset({1, 2, 3, 4}), 119);
  EXPECT_EQ(v.offset({0, 1, 0, 2}), 22);
  EXPECT_EQ(v.shape_str(), "[2, 3, 4, 5]");
  v.set({1, 0, 2, 3}, 7.5f);
  EXPECT_EQ(buf[60 + 10 + 3], 7.5f);
  EXPECT_EQ(v.get({1, 0, 2, 3}), 7.5f);
  EXPECT_TRUE(TensorView().empty());

  const TensorView r1(buf.data(), DType::bf16, {9});
  EXPECT_EQ(r1.shape_str(), "[9]");
  EXPECT_TRUE(r1.is_contiguous());
}

TEST(TensorViewTest, StridedViews) {
  std::vector<float> buf(3 * 4);
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<float>(i);
  const int64_t shape[2] = {4, 3}, strides[2] = {1, 4};  // transpose of [3, 4]
  const TensorView t(buf.data(), DType::f32, 2, shape, strides);
  EXPECT_FALSE(t.is_contiguous());
  EXPECT_EQ(t.numel(), 12);
  EXPECT_EQ(t.offset({2, 1}), 6);
  EXPECT_EQ(t.get({2, 1}), 6.f);
  EXPECT_EQ(t.shape_str(), "[4, 3]");
  // Row slice of a padded buffer: rows of 3 inside rows of 4.
  const int64_t s2[2] = {3, 3}, st2[2] = {4, 1};
  const TensorView p(buf.data() + 1, DType::f32, 2, s2, st2);
  EXPECT_FALSE(p.is_contiguous());
  EXPECT_EQ(p.get({2, 0}), 9.f);
}

TEST(TensorTest, OwningTensor) {
  Tensor t(DType::bf16, {3, 5, 7});
  EXPECT_EQ(t.rank(), 3);
  EXPECT_EQ(t.dim(1), 5);
  EXPECT_EQ(t.numel(), 105);
  EXPECT_EQ(t.dtype(), DType::bf16);
  EXPECT_GE(t.bytes(), 210u);
  EXPECT_TRUE(t.view().is_contiguous());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.ptr<void>()) % kAlignment, 0u);
  t.fill_zero();
  for (double x : to_double(t)) ASSERT_EQ(x, 0.0);

  Tensor z = Tensor::zeros(DType::f32, {4, 4});
  for (double x : to_double(z)) ASSERT_EQ(x, 0.0);
  const int64_t shape[2] = {2, 9};
  Tensor u(DType::f16, 2, shape);
  EXPECT_EQ(u.numel(), 18);
  EXPECT_EQ(u.view().shape_str(), "[2, 9]");
}

TEST(TensorTest, CopyIntoAcrossDtypesAndStrides) {
  // f32 source as a transposed view; destinations of every dtype, strided and not.
  TestTensor src_mem = make_tensor(DType::f32, {6, 5});
  fill_normal(src_mem, 11, 3.f);
  const TensorView src = make_view(src_mem.view.data, DType::f32, {5, 6}, {1, 5});
  const auto want = to_double(src);
  for (DType dt : {DType::f32, DType::bf16, DType::f16})
    for (bool strided : {false, true}) {
      TestTensor dst = strided ? make_tensor(dt, {5, 6}, {2, 3}, {1, 0}) : make_tensor(dt, {5, 6});
      copy_into(dst, src);
      const auto got = to_double(dst);
      for (size_t i = 0; i < want.size(); ++i) {
        float expect = static_cast<float>(want[i]);
        if (dt == DType::bf16) expect = bf16_to_f32(f32_to_bf16(expect));
        if (dt == DType::f16) expect = f16_to_f32(f32_to_f16(expect));
        ASSERT_EQ(got[i], expect) << dtype_name(dt) << " element " << i;
      }
      if (strided) {
        EXPECT_EQ(count_padding_changes(dst), 0);
      }
      // And back into f32 (exact: bf16/f16 ⊂ f32).
      Tensor back(DType::f32, {5, 6});
      copy_into(back, dst);
      EXPECT_EQ(to_double(back), got);
    }
  // bf16 -> f16 directly.
  Tensor b(DType::bf16, {3, 3}), h(DType::f16, {3, 3});
  fill_uniform(b, 12);
  copy_into(h, b);
  const auto bv = to_double(b), hv = to_double(h);
  for (size_t i = 0; i < bv.size(); ++i) EXPECT_EQ(hv[i], f16_to_f32(f32_to_f16(static_cast<float>(bv[i]))));
}

TEST(TensorTest, AllFiniteAndMaxAbsDiff) {
  Tensor t(DType::f32, {4, 4});
  fill_uniform(t, 13);
  EXPECT_TRUE(all_finite(t));
  EXPECT_EQ(max_abs_diff(t, t), 0.0);
  t.ptr<float>()[5] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_FALSE(all_finite(t));
  t.ptr<float>()[5] = std::numeric_limits<float>::infinity();
  EXPECT_FALSE(all_finite(t));
  Tensor b(DType::bf16, {3});
  fill_value(b, 1.f);
  EXPECT_TRUE(all_finite(b));
  b.ptr<uint16_t>()[2] = 0xff80;  // -inf
  EXPECT_FALSE(all_finite(b));
}

// ---------------------------------------------------------------------------
// Memory accounting

TEST(Memory, PeakAccountingFollowsBuffers) {
  const MemoryStats before = memory_stats();
  reset_peak_memory();
  EXPECT_EQ(memory_stats().peak_bytes, before.current_bytes);
  const size_t n = 3u << 20;
  {
    Buffer b(n);
    ASSERT_NE(b.data(), nullptr);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(b.data()) % kAlignment, 0u);
    const MemoryStats during = memory_stats();
    EXPECT_GE(during.current_bytes, before.current_bytes + static_cast<int64_t>(n));
    EXPECT_GE(during.peak_bytes, during.current_bytes);
    {
      Tensor t(DType::f32, {1024, 256});  // 1 MiB more
      EXPECT_GE(memory_stats().current_bytes, during.current_bytes + 1024 * 256 * 4);
    }
    EXPECT_EQ(memory_stats().current_bytes, during.current_bytes);
    // Moving a buffer does not change the accounting.
    Buffer moved(std::move(b));
    EXPECT_EQ(memory_stats().current_bytes, during.current_bytes);
  }
  const MemoryStats after = memory_stats();
  EXPECT_EQ(after.current_bytes, before.current_bytes);
  EXPECT_GE(after.peak_bytes, before.current_bytes + static_cast<int64_t>(n) + 1024 * 256 * 4);
  reset_peak_memory();
  EXPECT_EQ(memory_stats().peak_bytes, after.current_bytes);
  EXPECT_GT(peak_rss_bytes(), 0);
}

TEST(Memory, FreedLargeBlocksAreKeptForReuseWithinThePeak) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "the block cache is off under AddressSanitizer";
#endif
  reset_peak_memory();
  EXPECT_EQ(memory_stats().cached_bytes, 0);
  constexpr size_t kMiB = size_t{1} << 20;
  void* first = nullptr;
  {
    Buffer a(4 * kMiB);
    first = a.data();
  }
  EXPECT_EQ(memory_stats().cached_bytes, static_cast<int64_t>(4 * kMiB));
  {
    Buffer again(4 * kMiB);  // the same size: the kept block
    EXPECT_EQ(again.data(), first);
    EXPECT_EQ(memory_stats().cached_bytes, 0);
    Buffer small(64 * 1024);  // below 1 MiB: never kept
  }
  EXPECT_EQ(memory_stats().cached_bytes, static_cast<int64_t>(4 * kMiB));
  {
    Buffer b(2 * kMiB);  // a new size: keeping the 4 MiB block would take held + kept over the peak
    const MemoryStats s = memory_stats();
    EXPECT_EQ(s.cached_bytes, 0);
    EXPECT_LE(s.current_bytes + s.cached_bytes, s.peak_bytes);
  }
  EXPECT_EQ(memory_stats().cached_bytes, static_cast<int64_t>(2 * kMiB));
  MemoryStats s;
  {
    Buffer big(8 * kMiB);  // a new peak: everything kept is released first
    s = memory_stats();
    EXPECT_EQ(s.cached_bytes, 0);
    EXPECT_LE(s.current_bytes + s.cached_bytes, s.peak_bytes);
  }
  EXPECT_EQ(memory_stats().cached_bytes, static_cast<int64_t>(8 * kMiB));
  reset_peak_memory();  // the bound moves down to what is held: nothing kept
  s = memory_stats();
  EXPECT_EQ(s.cached_bytes, 0);
  EXPECT_EQ(s.peak_bytes, s.current_bytes);
}

TEST(Memory, ZeroByteBufferIsEmpty) {
  const int64_t cur = memory_stats().current_bytes;
  {
    Buffer b(0);
    EXPECT_EQ(b.data(), nullptr);
    EXPECT_EQ(b.bytes(), 0u);
  }
  EXPECT_EQ(memory_stats().current_bytes, cur);
}

}  // namespace
}  // namespace ringattn::testing
