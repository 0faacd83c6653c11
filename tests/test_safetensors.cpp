// Safetensors checkpoints: files written byte by byte here (the format's own
// layout, not our writer) read back exactly; our writer round-trips every dtype,
// odd offsets and strided views; sharded checkpoints; and every malformed file
// refused with a message naming the file, the tensor and the problem.
#include "ringattn/safetensors.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>

#include "ringattn/error.h"
#include "test_util.h"

namespace ringattn::testing {
namespace {

namespace fs = std::filesystem;

using Safetensors = ScratchDir;

// The bytes of a safetensors file: the header's length (8 bytes, little endian),
// the header text, the data.
std::string file_bytes(const std::string& header, const std::string& data) {
  std::string s;
  for (int i = 0; i < 8; ++i) s.push_back(static_cast<char>(static_cast<uint64_t>(header.size()) >> (8 * i)));
  return s + header + data;
}

void write_bytes(const std::string& path, const std::string& bytes) { std::ofstream(path, std::ios::binary) << bytes; }

std::string floats(std::initializer_list<float> xs) {
  std::string s;
  for (float x : xs) s.append(reinterpret_cast<const char*>(&x), 4);
  return s;
}

TEST_F(Safetensors, ReadsAFileWrittenByTheFormatsRules) {
  const uint16_t bf[3] = {f32_to_bf16(1.5f), f32_to_bf16(-2.f), f32_to_bf16(0.25f)};
  const std::string data = floats({1, 2, 3, 4, 5, 6}) + std::string(reinterpret_cast<const char*>(bf), 6);
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
      R"("b":{"dtype":"BF16","shape":[3],"data_offsets":[24,30]}})";
  write_bytes(path("m.safetensors"), file_bytes(header, data));
  SafetensorsFile f(path("m.safetensors"));
  EXPECT_EQ(f.metadata().at("format"), "pt");
  ASSERT_EQ(f.entries().size(), 2u);
  const TensorView w = f.view("w");
  EXPECT_EQ(w.dtype, DType::f32);
  EXPECT_EQ(w.shape_str(), "[2, 3]");
  EXPECT_EQ(w.get({1, 2}), 6.f);
  const TensorView b = f.view("b");
  EXPECT_EQ(b.dtype, DType::bf16);
  EXPECT_EQ(b.get({0}), 1.5f);
  EXPECT_EQ(b.get({2}), 0.25f);
  EXPECT_NE(message_of([&] { (void)f.view("missing"); }).find("no tensor 'missing'"), std::string::npos);
}

// Written by Hugging Face's safetensors library (scripts/make_safetensors_fixture.py):
// element i of the k-th tensor is (i % 23) * 0.25 - 2 + k.
TEST(SafetensorsFixture, ReadsWhatTheHuggingFaceLibraryWrites) {
  const SafetensorsFile f(RINGATTN_TEST_FIXTURES "/hf_numpy.safetensors");
  EXPECT_EQ(f.metadata().at("format"), "np");
  const std::pair<const char*, std::string> tensors[] = {{"model.embed_tokens.weight", "[7, 5]"},
                                                         {"model.layers.0.self_attn.q_proj.bias", "[3]"},
                                                         {"model.layers.0.mlp.up_proj.weight", "[2, 3, 4]"},
                                                         {"lm_head.weight", "[1, 9]"},
                                                         {"scalar", "[]"}};
  ASSERT_EQ(f.entries().size(), 5u);
  for (int k = 0; k < 5; ++k) {
    const TensorView t = f.view(tensors[k].first);
    EXPECT_EQ(t.shape_str(), tensors[k].second) << tensors[k].first;
    for (int64_t i = 0; i < t.numel(); ++i)
      EXPECT_EQ(load_as_f32(t.data, t.dtype, i), static_cast<float>(i % 23) * 0.25f - 2 + k) << tensors[k].first;
  }
  EXPECT_EQ(f.entry("lm_head.weight").dtype, DType::f16);
}

TEST_F(Safetensors, WriterRoundTripsDtypesOddOffsetsAndStridedViews) {
  std::mt19937_64 rng(5);
  const Tensor a = random_normal(DType::f32, {3, 5}, rng), b = random_normal(DType::bf16, {5}, rng),
               c = random_normal(DType::f16, {2, 1, 3}, rng), e = random_normal(DType::f32, {7}, rng);
  const Tensor empty(DType::f32, {0, 4});
  Tensor scalar(DType::f32, {1});
  scalar.ptr<float>()[0] = 42.f;
  const TensorView scalar0(scalar.ptr<void>(), DType::f32, 0, nullptr, nullptr);
  const TensorView at = a.view().select(1, 2);  // a strided column of a
  save_safetensors(
      path("w.safetensors"),
      {{"a", a}, {"b", b}, {"e_after_odd_bf16", e}, {"c", c}, {"empty", empty}, {"s", scalar0}, {"a_col", at}},
      {{"note", "ringattn test"}});
  SafetensorsFile f(path("w.safetensors"));
  EXPECT_EQ(f.metadata().at("note"), "ringattn test");
  EXPECT_EQ(max_abs_diff(f.view("a"), a), 0.0);
  EXPECT_EQ(max_abs_diff(f.view("b"), b), 0.0);
  EXPECT_EQ(max_abs_diff(f.view("c"), c), 0.0);
  // 10 bytes of bf16 before it: its bytes are not 4-byte aligned in the map, so
  // the reader hands out an aligned copy.
  EXPECT_EQ(max_abs_diff(f.view("e_after_odd_bf16"), e), 0.0);
  EXPECT_EQ(f.view("empty").shape_str(), "[0, 4]");
  EXPECT_EQ(f.view("s").rank, 0);
  EXPECT_EQ(f.view("s").ptr<float>()[0], 42.f);
  EXPECT_EQ(max_abs_diff(f.view("a_col"), at), 0.0);
  EXPECT_NE(message_of([&] {
              save_safetensors(path("x.safetensors"), {{"a", a}, {"a", b}});
            }).find("twice"),
            std::string::npos);
}

TEST_F(Safetensors, MalformedFilesAreRefusedByName) {
  const std::string ok = R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  struct Case {
    const char* what;
    std::string bytes;
    const char* needle;
  } cases[] = {
      {"empty file", "", "too short"},
      {"header beyond the file", file_bytes(ok, "").substr(0, 8) + "{}", "truncated"},
      {"not JSON", file_bytes("{\"t\": [", ""), "not valid JSON"},
      {"not an object", file_bytes("[1,2]", ""), "must be a JSON object"},
      {"integer dtype", file_bytes(R"({"t":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})", floats({0, 0})),
       "dtype I64 is not supported"},
      {"negative dimension", file_bytes(R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", floats({0, 0})),
       "whole number >= 0"},
      {"offsets outside", file_bytes(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", floats({0, 0})),
       "outside the 8 data bytes"},
      {"size mismatch", file_bytes(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", floats({0, 0})),
       "needs 12 bytes"},
      {"a gap", file_bytes(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", floats({0, 0})),
       "a gap or an overlap"},
      {"an overlap",
       file_bytes(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"u":{"dtype":"F32","shape":[1],)"
                  R"("data_offsets":[4,8]}})",
                  floats({0, 0})),
       "a gap or an overlap"},
      {"trailing bytes", file_bytes(ok, floats({0, 0, 0})), "trailing bytes"},
      {"seven dimensions",
       file_bytes(R"({"t":{"dtype":"F32","shape":[1,1,1,1,1,1,2],"data_offsets":[0,8]}})", floats({0, 0})),
       "at most 6"},
      {"metadata not strings", file_bytes(R"({"__metadata__":{"n":3}})", ""), "must be a string"},
  };
  for (const Case& c : cases) {
    write_bytes(path("bad.safetensors"), c.bytes);
    const std::string m = message_of([&] { SafetensorsFile f(path("bad.safetensors")); });
    EXPECT_NE(m.find(c.needle), std::string::npos) << c.what << ": " << m;
    EXPECT_NE(m.find("bad.safetensors"), std::string::npos) << c.what << ": the message does not name the file";
  }
  EXPECT_NE(message_of([&] { SafetensorsFile f(path("nothing.safetensors")); }).find("cannot open"), std::string::npos);
}

TEST_F(Safetensors, ShardedCheckpointsFollowTheirIndex) {
  std::mt19937_64 rng(9);
  const Tensor x = random_normal(DType::f32, {4}, rng), y = random_normal(DType::bf16, {2, 2}, rng);
  fs::create_directories(dir_ / "sharded");
  save_safetensors(path("sharded/model-00001-of-00002.safetensors"), {{"x", x}});
  save_safetensors(path("sharded/model-00002-of-00002.safetensors"), {{"y", y}});
  std::ofstream(path("sharded/model.safetensors.index.json"))
      << R"({"metadata":{"total_size":24},"weight_map":{"x":"model-00001-of-00002.safetensors",)"
         R"("y":"model-00002-of-00002.safetensors"}})";
  const Checkpoint ck(path("sharded"));
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"x", "y"}));
  EXPECT_EQ(max_abs_diff(ck.view("x"), x), 0.0);
  EXPECT_EQ(max_abs_diff(ck.view("y"), y), 0.0);
  EXPECT_NE(message_of([&] { (void)ck.view("z"); }).find("no tensor 'z'"), std::string::npos);

  std::ofstream(path("sharded/model.safetensors.index.json"))
      << R"({"weight_map":{"x":"model-00002-of-00002.safetensors"}})";
  EXPECT_NE(message_of([&] { Checkpoint c(path("sharded")); }).find("which does not hold it"), std::string::npos);
  std::ofstream(path("sharded/model.safetensors.index.json")) << R"({"weight_map":{"x":"../elsewhere"}})";
  EXPECT_NE(message_of([&] { Checkpoint c(path("sharded")); }).find("must be a file name"), std::string::npos);

  fs::create_directories(dir_ / "single");
  save_safetensors(path("single/model.safetensors"), {{"x", x}});
  EXPECT_EQ(max_abs_diff(Checkpoint(path("single")).view("x"), x), 0.0);
  EXPECT_EQ(max_abs_diff(Checkpoint(path("single/model.safetensors")).view("x"), x), 0.0);
  fs::create_directories(dir_ / "none");
  EXPECT_NE(message_of([&] { Checkpoint c(path("none")); }).find("holds neither"), std::string::npos);
}

}  // namespace
}  // namespace ringattn::testing
