// Text <-> token ids: Hugging Face tokenizer.json byte-level BPE (the GPT-2,
// Llama 3 and Qwen2 family) and a byte tokenizer (ids 0-255 are the bytes) for
// models trained from scratch.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace ringattn {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // The ids of `text` (UTF-8 bytes). With add_special, the post-processor's
  // template (e.g. a BOS token) is applied, as Hugging Face's encode() does.
  virtual std::vector<int64_t> encode(std::string_view text, bool add_special = true) const = 0;
  // The bytes the ids stand for (special tokens included as their text).
  virtual std::string decode(std::span<const int64_t> ids) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual std::string name() const = 0;
};

// ids 0-255: the bytes of the text.
std::unique_ptr<Tokenizer> byte_tokenizer();

// A tokenizer.json (or a folder holding one) of model type BPE with byte-level
// pre-tokenization and decoding: pre-tokenizer ByteLevel, or a Sequence of Split
// (a regex, behavior Isolated) and ByteLevel steps, the regexes run by PCRE2 in
// Unicode mode; a normalizer NFC, NFD, NFKC or NFKD (ICU; Qwen2 uses NFC) on the
// text between added tokens; added tokens matched in the raw text first (longest first); BPE
// merges by rank (ignore_merges: a pre-token found whole in the vocabulary is one
// token); post-processor none, ByteLevel or TemplateProcessing. What it does not
// implement (other normalizers, byte fallback, other models, lstrip/rstrip added tokens,
// ...) is refused when loading, naming the field.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& dir_or_file);

}  // namespace ringattn
