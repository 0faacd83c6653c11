// The decode path of attention_forward (at most kDecodeRows query rows per GQA
// group: flash-decoding over key chunks) against the double-precision reference:
// chunk boundaries (the chunk is 256 keys), GQA, head dims that are not a multiple
// of the vector width, causal positions with rows that see no key, reduced-precision
// storage, every ISA path, and independence of the thread count.
#include <gtest/gtest.h>

#include "attn_case.h"

namespace ringattn::testing {
namespace {

std::vector<AttnCase> decode_cases() {
  std::vector<AttnCase> cs;
  uint32_t seed = 700;
  for (bool causal : {false, true})
    for (int64_t Lk : {1, 255, 256, 257, 1000, 2311})
      for (auto [lq, h, hkv, d] : std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>>{
               {1, 4, 4, 64}, {1, 8, 2, 80}, {3, 4, 1, 32}, {4, 8, 1, 128}, {1, 1, 1, 3}}) {
        AttnCase c;
        c.B = 2, c.Lq = lq, c.Lk = Lk, c.H = h, c.Hkv = hkv, c.d = d, c.causal = causal, c.seed = seed++;
        cs.push_back(c);
      }
  return cs;
}

class Decode : public ::testing::TestWithParam<AttnCase> {};

TEST_P(Decode, MatchesReference) {
  const AttnCase& c = GetParam();
  ASSERT_LE(c.Lq * (c.H / c.Hkv), kDecodeRows) << "this case would not take the decode path";
  AttnData a = make_data(c);
  run_forward(c, a);
  check_forward(c, a, kTolF32);
}

INSTANTIATE_TEST_SUITE_P(Sweep, Decode, ::testing::ValuesIn(decode_cases()),
                         [](const ::testing::TestParamInfo<AttnCase>& i) { return i.param.name(); });

TEST(DecodeEdges, RowsPerGroupAtAndAboveTheLimitAgree) {
  // kDecodeRows rows per group take the decode kernel, one more the tiled one.
  for (int64_t lq : {kDecodeRows / 4, kDecodeRows / 4 + 1}) {
    AttnCase c;
    c.B = 1, c.Lq = lq, c.Lk = 700, c.H = 8, c.Hkv = 2, c.d = 64, c.causal = true, c.seed = 800;
    AttnData a = make_data(c);
    run_forward(c, a);
    check_forward(c, a, kTolF32);
  }
}

TEST(DecodeEdges, PositionsWithRowsThatSeeNoKeyAndInterleavedCache) {
  // A striped shard of a cache (every third position) and queries before, inside
  // and after it: the first row sees no key (o = 0, lse = -inf).
  AttnCase c;
  c.B = 1, c.Lq = 3, c.Lk = 600, c.H = 4, c.Hkv = 2, c.d = 64, c.causal = true, c.seed = 801;
  c.k_pos = iota_pos(c.Lk, 5, 3);
  c.q_pos = std::vector<int64_t>{2, 900, 5000};
  AttnData a = make_data(c);
  run_forward(c, a);
  const RefResult ref = check_forward(c, a, kTolF32);
  int empty = 0;
  for (double l : ref.lse) empty += std::isinf(l);
  EXPECT_EQ(empty, c.H);
}

TEST(DecodeEdges, ReducedPrecisionAndStridedViews) {
  for (DType dt : {DType::bf16, DType::f16}) {
    AttnCase c;
    c.B = 2, c.Lq = 1, c.Lk = 530, c.H = 4, c.Hkv = 2, c.d = 80, c.causal = true, c.in = dt, c.out = dt;
    c.seed = 802;
    AttnData a = make_data(c);
    run_forward(c, a);
    check_forward(c, a, dt == DType::bf16 ? kTolBf16 : kTolF16);
  }
  AttnCase c;
  c.B = 2, c.Lq = 2, c.Lk = 300, c.H = 4, c.Hkv = 4, c.d = 64, c.strided = true, c.seed = 803;
  AttnData a = make_data(c);
  run_forward(c, a);
  check_forward(c, a, kTolF32);
}

TEST(DecodeEdges, EveryIsaPathMatchesReference) {
  for (Isa isa : all_isas()) {
    if (!isa_supported(isa)) continue;
    for (DType dt : {DType::f32, DType::bf16}) {
      AttnCase c;
      c.B = 1, c.Lq = 1, c.Lk = 777, c.H = 8, c.Hkv = 2, c.d = 128, c.causal = true, c.in = dt, c.out = dt;
      c.isa = &isa, c.seed = 804;
      AttnData a = make_data(c);
      run_forward(c, a);
      SCOPED_TRACE(isa_name(isa));
      check_forward(c, a, tol_for(dt));
    }
  }
}

TEST(DecodeEdges, ThreadsOneAndTwoBitwiseIdentical) {
  AttnCase c;
  c.B = 2, c.Lq = 1, c.Lk = 3000, c.H = 4, c.Hkv = 2, c.d = 64, c.causal = true, c.seed = 805, c.threads = 1;
  AttnData a = make_data(c);
  run_forward(c, a);
  AttnCase c2 = c;
  c2.threads = 2;
  AttnData b = make_data(c2);
  run_forward(c2, b);
  EXPECT_TRUE(bitwise_equal(a.o, b.o));
  EXPECT_TRUE(bitwise_equal(a.lse, b.lse));
}

}  // namespace
}  // namespace ringattn::testing
