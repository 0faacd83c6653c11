// Text <-> token ids: Hugging Face tokenizer.json BPE — byte-level (the GPT-2,
// Llama 3 and Qwen2 family) and SentencePiece-style with byte fallback (Llama 2,
// TinyLlama, Mistral) — and a byte tokenizer (ids 0-255 are the bytes) for
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
  // The bytes the ids stand for (special tokens included as their text), as
  // Hugging Face's decode(ids, skip_special_tokens=False) gives them.
  virtual std::string decode(std::span<const int64_t> ids) const = 0;
  // The bytes of ids that follow ids already decoded (streaming): decode(a) +
  // decode_continued(b) is decode(a + b) for any split of a text whose bytes are
  // UTF-8. Nothing is stripped from the start, and byte-fallback tokens give
  // their bytes even where a character is split between calls.
  virtual std::string decode_continued(std::span<const int64_t> ids) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual std::string name() const = 0;
};

// ids 0-255: the bytes of the text.
std::unique_ptr<Tokenizer> byte_tokenizer();

// A tokenizer.json (or a folder holding one) of model type BPE: added tokens
// matched in the raw text first (longest first); on the text between them a
// normalizer (NFC, NFD, NFKC, NFKD through ICU, Prepend, Replace of a literal, or
// a Sequence of these: Qwen2 uses NFC, Llama 2 Prepend + Replace) and a
// pre-tokenizer (none, ByteLevel, Split by a regex with behavior Isolated run by
// PCRE2 in Unicode mode, Metaspace, or a Sequence of these); each character a
// token, else its bytes' <0xXX> tokens (byte_fallback), else unk_token (runs
// fused with fuse_unk); merges by rank (ignore_merges: a pre-token found whole
// in the vocabulary is one token); post-processor none, ByteLevel or
// TemplateProcessing; decoder none, ByteLevel, Replace, ByteFallback, Fuse,
// Strip, Metaspace or a Sequence. What it does not implement (other normalizers,
// other models, lstrip/rstrip added tokens, ...) is refused when loading,
// naming the field.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& dir_or_file);

}  // namespace ringattn
