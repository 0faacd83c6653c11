// Bad inputs to the attention API throw ringattn::Error with a message that names
// the problem. Messages are checked loosely (any of a few keywords) so wording can
// evolve.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "ringattn/cpu/attention.h"
#include "ringattn/dtype.h"
#include "ringattn/error.h"
#include "ringattn/tensor.h"
#include "test_util.h"

namespace ringattn::testing {
namespace {

// Runs fn, expects ringattn::Error whose message contains any of `needles`
// (case-insensitive; an empty list only requires a non-empty message).
void expect_error(const std::function<void()>& fn, std::initializer_list<const char*> needles,
                  const std::string& what) {
  try {
    fn();
    ADD_FAILURE() << what << ": no exception";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_FALSE(msg.empty()) << what;
    if (needles.size()) {
      EXPECT_TRUE(contains_any(msg, needles)) << what << ": unhelpful message: " << msg;
    }
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": threw a non-ringattn exception: " << e.what();
  }
}

// A valid problem: B=2, Lq=8, Lk=10, H=4, Hkv=2, d=16.
struct Problem {
  int64_t B = 2, Lq = 8, Lk = 10, H = 4, Hkv = 2, d = 16;
  Tensor q{DType::f32, {2, 8, 4, 16}}, k{DType::f32, {2, 10, 2, 16}}, v{DType::f32, {2, 10, 2, 16}};
  Tensor o{DType::f32, {2, 8, 4, 16}}, lse{DType::f32, {2, 4, 8}};
  Tensor dout{DType::f32, {2, 8, 4, 16}}, dq{DType::f32, {2, 8, 4, 16}};
  Tensor dk{DType::f32, {2, 10, 2, 16}}, dv{DType::f32, {2, 10, 2, 16}};
  Problem() {
    uint32_t s = 1;
    for (const Tensor* t : {&q, &k, &v, &dout}) fill_uniform(*t, s++);
  }
  void forward(const AttentionOptions& opt = {}) { attention_forward(q, k, v, o, lse, opt); }
};

TEST(Errors, ValidProblemDoesNotThrow) {
  Problem p;
  EXPECT_NO_THROW(p.forward());
  EXPECT_NO_THROW(attention_backward(p.q, p.k, p.v, p.o, p.lse, p.dout, p.dq, p.dk, p.dv));
  Tensor o2(DType::f32, {2, 8, 4, 16}), l2(DType::f32, {2, 4, 8});
  copy_into(o2, p.o);
  copy_into(l2, p.lse);
  EXPECT_NO_THROW(attention_merge(o2, l2, p.o, p.lse));
}

TEST(Errors, HeadsNotDivisibleByKvHeads) {
  Problem p;
  Tensor k(DType::f32, {2, 10, 3, 16}), v(DType::f32, {2, 10, 3, 16});
  expect_error([&] { attention_forward(p.q, k, v, p.o, p.lse); }, {"head", "H", "Hkv", "divisible"}, "H=4, Hkv=3");
}

TEST(Errors, MismatchedHeadDim) {
  Problem p;
  Tensor k(DType::f32, {2, 10, 2, 32});
  expect_error([&] { attention_forward(p.q, k, p.v, p.o, p.lse); }, {"d", "dim", "shape"}, "q d=16, k d=32");
  Tensor v(DType::f32, {2, 10, 2, 8});
  expect_error([&] { attention_forward(p.q, p.k, v, p.o, p.lse); }, {"d", "dim", "shape", "v"}, "v d=8");
}

TEST(Errors, MismatchedBatch) {
  Problem p;
  Tensor k(DType::f32, {3, 10, 2, 16}), v(DType::f32, {3, 10, 2, 16});
  expect_error([&] { attention_forward(p.q, k, v, p.o, p.lse); }, {"batch", "B", "shape"}, "B 2 vs 3");
}

TEST(Errors, KeyValueLengthMismatch) {
  Problem p;
  Tensor v(DType::f32, {2, 11, 2, 16});
  expect_error([&] { attention_forward(p.q, p.k, v, p.o, p.lse); }, {"v", "shape", "L"}, "k L=10, v L=11");
}

TEST(Errors, LseNotFp32) {
  Problem p;
  Tensor lse(DType::bf16, {2, 4, 8});
  expect_error([&] { attention_forward(p.q, p.k, p.v, p.o, lse); }, {"lse", "fp32", "f32", "float"}, "bf16 lse");
}

TEST(Errors, WrongRank) {
  Problem p;
  const TensorView q3(p.q.ptr<float>(), DType::f32, {2, 8, 64});
  expect_error([&] { attention_forward(q3, p.k, p.v, p.o, p.lse); }, {"rank", "dim", "shape", "4"}, "rank-3 q");
  const TensorView lse2(p.lse.ptr<float>(), DType::f32, {8, 8});
  expect_error([&] { attention_forward(p.q, p.k, p.v, p.o, lse2); }, {"rank", "lse", "shape"}, "rank-2 lse");
}

TEST(Errors, OutputShapeMismatch) {
  Problem p;
  Tensor o(DType::f32, {2, 8, 4, 15});
  expect_error([&] { attention_forward(p.q, p.k, p.v, o, p.lse); }, {"o", "shape", "out"}, "o d=15");
  Tensor o2(DType::f32, {2, 9, 4, 16});
  expect_error([&] { attention_forward(p.q, p.k, p.v, o2, p.lse); }, {"o", "shape", "out"}, "o Lq=9");
  Tensor lse(DType::f32, {2, 8, 4});  // [B, Lq, H] instead of [B, H, Lq]
  expect_error([&] { attention_forward(p.q, p.k, p.v, p.o, lse); }, {"lse", "shape"}, "lse transposed");
}

TEST(Errors, PositionsOfWrongLength) {
  Problem p;
  const std::vector<int64_t> qp(7, 0), kp(10, 0), qp_ok(8, 0), kp_bad(11, 0);
  AttentionOptions opt;
  opt.causal = true;
  opt.q_pos = qp;
  opt.k_pos = kp;
  expect_error([&] { p.forward(opt); }, {"q_pos", "position", "length", "Lq"}, "q_pos of 7 for Lq=8");
  opt.q_pos = qp_ok;
  opt.k_pos = kp_bad;
  expect_error([&] { p.forward(opt); }, {"k_pos", "position", "length", "Lk"}, "k_pos of 11 for Lk=10");
  opt.k_pos = {};
  opt.q_pos = qp;
  expect_error([&] { p.forward(opt); }, {"q_pos", "position", "length", "Lq"}, "q_pos of 7, default k_pos");
}

TEST(Errors, NonFiniteScale) {
  Problem p;
  AttentionOptions opt;
  opt.scale = std::numeric_limits<float>::infinity();
  expect_error([&] { p.forward(opt); }, {}, "scale = inf");
}

TEST(Errors, BackwardShapeMismatches) {
  Problem p;
  p.forward();
  Tensor dq(DType::f32, {2, 8, 4, 8}), dk(DType::f32, {2, 10, 4, 16}), dv(DType::f32, {2, 9, 2, 16});
  Tensor dout(DType::f32, {2, 8, 2, 16});
  expect_error([&] { attention_backward(p.q, p.k, p.v, p.o, p.lse, p.dout, dq, p.dk, p.dv); }, {"dq", "shape"},
               "dq shape");
  expect_error([&] { attention_backward(p.q, p.k, p.v, p.o, p.lse, p.dout, p.dq, dk, p.dv); }, {"dk", "shape"},
               "dk shape (H instead of Hkv heads)");
  expect_error([&] { attention_backward(p.q, p.k, p.v, p.o, p.lse, p.dout, p.dq, p.dk, dv); }, {"dv", "shape"},
               "dv shape");
  expect_error([&] { attention_backward(p.q, p.k, p.v, p.o, p.lse, dout, p.dq, p.dk, p.dv); }, {"dout", "do", "shape"},
               "dout shape");
  Tensor lse(DType::f16, {2, 4, 8});
  expect_error([&] { attention_backward(p.q, p.k, p.v, p.o, lse, p.dout, p.dq, p.dk, p.dv); }, {"lse", "fp32", "f32"},
               "fp16 lse");
  Tensor k(DType::f32, {2, 10, 3, 16}), v(DType::f32, {2, 10, 3, 16}), dk3(DType::f32, {2, 10, 3, 16});
  expect_error([&] { attention_backward(p.q, k, v, p.o, p.lse, p.dout, p.dq, dk3, dk3); }, {"head", "H", "divisible"},
               "backward H % Hkv");
}

TEST(Errors, MergeMismatches) {
  Problem p;
  p.forward();
  Tensor o_acc(DType::f32, {2, 8, 4, 16}), l_acc(DType::f32, {2, 4, 8});
  copy_into(o_acc, p.o);
  copy_into(l_acc, p.lse);
  Tensor o_bad(DType::f32, {2, 8, 4, 8});
  expect_error([&] { attention_merge(o_acc, l_acc, o_bad, p.lse); }, {"shape", "o"}, "o_part shape");
  Tensor l_bad(DType::f32, {2, 4, 9});
  expect_error([&] { attention_merge(o_acc, l_acc, p.o, l_bad); }, {"shape", "lse"}, "lse_part shape");
  Tensor o_acc_bf16(DType::bf16, {2, 8, 4, 16});
  expect_error([&] { attention_merge(o_acc_bf16, l_acc, p.o, p.lse); }, {"fp32", "f32", "o_acc", "dtype"},
               "bf16 o_acc");
  Tensor l_bf16(DType::bf16, {2, 4, 8});
  expect_error([&] { attention_merge(o_acc, l_bf16, p.o, p.lse); }, {"fp32", "f32", "lse", "dtype"}, "bf16 lse_acc");
}

TEST(Errors, ParseDtypeRejectsUnknownNames) {
  EXPECT_EQ(parse_dtype("fp32"), DType::f32);
  EXPECT_EQ(parse_dtype("BF16"), DType::bf16);
  EXPECT_EQ(parse_dtype("float16"), DType::f16);
  expect_error([] { (void)parse_dtype("fp8"); }, {"fp32", "bf16"}, "fp8");
  expect_error([] { (void)parse_dtype(""); }, {"fp32", "bf16"}, "empty dtype");
}

TEST(Errors, CopyIntoShapeMismatch) {
  Tensor a(DType::f32, {2, 3}), b(DType::f32, {3, 2});
  expect_error([&] { copy_into(a, b); }, {"shape"}, "copy_into [2,3] <- [3,2]");
}

}  // namespace
}  // namespace ringattn::testing
