// BPE against Hugging Face `tokenizers` (fixtures written by
// scripts/make_tokenizer_fixtures.py: GPT-2-, Llama-3- and Qwen2-style byte-level
// tokenizer.json files, SentencePiece-style ones as Llama 2 and transformers 5
// write them, and their encodings of a multilingual test text), streaming
// decode, the byte tokenizer, and tokenizer.json features we do not implement
// refused by name.
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

// Llama 2 / TinyLlama / Mistral: Prepend + Replace normalizer, the whole text one
// BPE word, byte fallback, unk_token, a BOS template, Strip decoder.
TEST(Tokenizer, Llama2StyleSentencePieceEqualsHuggingFace) { expect_like_hugging_face("llama2_style"); }
TEST(Tokenizer, MetaspaceFirstEqualsHuggingFace) { expect_like_hugging_face("metaspace_style"); }
// No byte fallback: unknown characters as one fused unk; Metaspace split and decoder.
TEST(Tokenizer, UnkAndMetaspaceSplitEqualHuggingFace) { expect_like_hugging_face("unk_style"); }

// Streaming: a prefix decoded whole, then each further id by decode_continued,
// gives the whole decode — at every split that ends on a character.
TEST(Tokenizer, StreamedDecodeEqualsWholeDecode) {
  const nlohmann::json e = encodings();
  for (const char* name : {"gpt2_style", "llama3_style", "llama2_style", "metaspace_style", "unk_style"}) {
    const auto tok = load_tokenizer(kDir + "/" + std::string(name) + ".json");
    for (size_t i = 0; i < e["texts"].size(); ++i) {
      const std::vector<int64_t> ids = e[std::string(name) + "_plain"][i].get<std::vector<int64_t>>();
      const std::string whole = tok->decode(ids);
      int splits = 0;
      for (size_t k = 1; k <= ids.size(); ++k) {
        std::string text = tok->decode(std::span(ids).first(k));
        if (whole.compare(0, text.size(), text) != 0) continue;  // k splits a character
        ++splits;
        for (size_t t = k; t < ids.size(); ++t) text += tok->decode_continued(std::span(ids).subspan(t, 1));
        EXPECT_EQ(text, whole) << name << " text " << i << " split at " << k;
      }
      EXPECT_TRUE(ids.empty() || splits > 0) << name << " text " << i;
    }
  }
}

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
      {[](J& j) { j["model"]["unk_token"] = "<nope>"; }, "model.unk_token '<nope>' is not in the vocabulary"},
      {[](J& j) {
         j["model"]["merges"][0] = J::array({"Ġ", "nope"});
       },
       "'nope' is not in the vocabulary"},
      {[](J& j) {
         j["normalizer"] = {{"type", "Replace"}, {"pattern", {{"Regex", " +"}}}, {"content", " "}};
       },
       "Replace supports a {\"String\": ...} pattern"},
      {[](J& j) {
         j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "_"}, {"prepend_scheme", "sometimes"}};
       },
       "prepend_scheme must be always, first or never"},
      {[](J& j) { j["added_tokens"][0]["lstrip"] = true; }, "uses lstrip"},
      {[](J& j) {
         j["pre_tokenizer"] = {{"type", "Whitespace"}};
       },
       "pre_tokenizer type 'Whitespace'"},
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

TEST_F(TokenizerFile, CharacterWithoutTokenIsAnError) {
  // No ByteLevel step, no byte fallback, no unk_token: a character outside the
  // vocabulary has no token (Hugging Face drops it silently).
  const std::string p = variant([](nlohmann::json& j) { j["pre_tokenizer"] = nullptr; });
  const auto tok = load_tokenizer(p);
  const std::string m = message_of([&] { (void)tok->encode("\xE2\x82\xAC"); });
  EXPECT_NE(m.find("is not in the vocabulary (no byte_fallback, no unk_token)"), std::string::npos) << m;
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
