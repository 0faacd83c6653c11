// Byte-level BPE against Hugging Face `tokenizers` (fixtures written by
// scripts/make_tokenizer_fixtures.py: a GPT-2-style and a Llama-3-style
// tokenizer.json and their encodings of a multilingual test text), the byte
// tokenizer, and tokenizer.json features we do not implement refused by name.
#include "ringattn/tokenizer.h"

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "ringattn/error.h"
#include "test_util.h"

namespace ringattn::testing {
namespace {

const std::string kDir = RINGATTN_TEST_FIXTURES "/tokenizers";

nlohmann::json encodings() {
  std::ifstream in(kDir + "/encodings.json");
  return nlohmann::json::parse(in);
}

void expect_like_hugging_face(const std::string& name) {
  const auto tok = load_tokenizer(kDir + "/" + name + ".json");
  const nlohmann::json e = encodings();
  const auto& texts = e["texts"];
  ASSERT_GT(texts.size(), 5u);
  EXPECT_EQ(tok->vocab_size(), 600);
  for (size_t i = 0; i < texts.size(); ++i) {
    const std::string text = texts[i].get<std::string>();
    const std::vector<int64_t> want = e[name][i].get<std::vector<int64_t>>(),
                               plain = e[name + "_plain"][i].get<std::vector<int64_t>>();
    EXPECT_EQ(tok->encode(text), want) << name << " text " << i << ": " << text;
    EXPECT_EQ(tok->encode(text, /*add_special=*/false), plain) << name << " text " << i;
    EXPECT_EQ(tok->decode(plain), e[name + "_decoded"][i].get<std::string>()) << name << " text " << i;
  }
}

TEST(Tokenizer, Gpt2StyleByteLevelBpeEqualsHuggingFace) { expect_like_hugging_face("gpt2_style"); }
TEST(Tokenizer, Llama3StyleSplitRegexAndTemplateEqualHuggingFace) { expect_like_hugging_face("llama3_style"); }

TEST(Tokenizer, NfcNormalizerEqualsHuggingFace) { expect_like_hugging_face("nfc_style"); }

TEST(Tokenizer, ByteTokenizerIsTheBytes) {
  const auto tok = byte_tokenizer();
  const std::string text = "a\xC3\xA9\n\x00z";
  const std::vector<int64_t> ids = tok->encode(std::string_view(text.data(), 5));
  EXPECT_EQ(ids, (std::vector<int64_t>{97, 0xC3, 0xA9, 10, 0}));
  EXPECT_EQ(tok->decode(ids), std::string(text.data(), 5));
  EXPECT_EQ(tok->vocab_size(), 256);
  EXPECT_NE(message_of([&] { (void)tok->decode(std::vector<int64_t>{300}); }).find("not a byte"), std::string::npos);
}

class TokenizerFile : public ScratchDir {
 protected:
  // The GPT-2-style fixture with one field replaced.
  std::string variant(const std::function<void(nlohmann::json&)>& edit) {
    std::ifstream in(kDir + "/gpt2_style.json");
    nlohmann::json j = nlohmann::json::parse(in);
    edit(j);
    const std::string p = path("tokenizer.json");
    std::ofstream(p) << j.dump();
    return p;
  }
};

TEST_F(TokenizerFile, UnsupportedFeaturesAreRefusedByName) {
  using J = nlohmann::json;
  struct Case {
    std::function<void(J&)> edit;
    const char* needle;
  } cases[] = {
      {[](J& j) {
         j["normalizer"] = {{"type", "Lowercase"}};
       },
       "normalizer \"Lowercase\" is not supported"},
      {[](J& j) {
         j["normalizer"] = {{"type", "NFC"}};
         j["added_tokens"][0]["normalized"] = true;
       },
       "normalized: true"},
      {[](J& j) { j["model"]["type"] = "WordPiece"; }, "model.type must be BPE"},
      {[](J& j) { j["model"]["byte_fallback"] = true; }, "byte_fallback"},
      {[](J& j) { j["added_tokens"][0]["lstrip"] = true; }, "uses lstrip"},
      {[](J& j) {
         j["pre_tokenizer"] = {{"type", "Whitespace"}};
       },
       "pre_tokenizer type 'Whitespace'"},
      {[](J& j) { j["pre_tokenizer"] = nullptr; }, "a byte-level pre_tokenizer is needed"},
      {[](J& j) {
         j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "("}}}, {"behavior", "Isolated"}};
       },
       "does not compile"},
      {[](J& j) {
         j["decoder"] = {{"type", "WordPiece"}};
       },
       "decoder"},
      {[](J& j) { j["model"]["merges"][0] = 7; }, "a merge must be"},
  };
  for (const Case& c : cases) {
    const std::string p = variant(c.edit);
    const std::string m = message_of([&] { (void)load_tokenizer(p); });
    EXPECT_NE(m.find(c.needle), std::string::npos) << m;
    EXPECT_NE(m.find("tokenizer.json"), std::string::npos) << m;
  }
  std::ofstream(path("tokenizer.json")) << "{";
  EXPECT_NE(message_of([&] { (void)load_tokenizer(dir()); }).find("not valid JSON"), std::string::npos);
  EXPECT_NE(message_of([&] { (void)load_tokenizer(path("none")); }).find("cannot read"), std::string::npos);
}

TEST_F(TokenizerFile, OlderStringMergesReadTheSame) {
  const std::string p = variant([](nlohmann::json& j) {
    for (auto& m : j["model"]["merges"]) m = m[0].get<std::string>() + " " + m[1].get<std::string>();
  });
  const auto a = load_tokenizer(p), b = load_tokenizer(kDir + "/gpt2_style.json");
  const std::string text = encodings()["texts"][3].get<std::string>();
  EXPECT_EQ(a->encode(text), b->encode(text));
}

}  // namespace
}  // namespace ringattn::testing
