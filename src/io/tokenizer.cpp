// BPE from Hugging Face tokenizer.json (byte-level, and SentencePiece-style with
// byte fallback), and the byte tokenizer.
//
// encode(text): split on added tokens -> normalizer steps -> pre-tokens (Split
// regexes, ByteLevel's GPT-2 regex when use_regex, Metaspace) -> with ByteLevel
// each pre-token's bytes as GPT-2's printable stand-ins (bytes_to_unicode) ->
// characters to tokens (byte fallback, unk) -> BPE merges by rank -> ids; then
// the template. decode(ids): the tokens' strings through the decoder steps.
#include "ringattn/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <unicode/unorm2.h>
#include <unicode/ustring.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <climits>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>

#include "ringattn/error.h"

namespace ringattn {
namespace {

using nlohmann::json;

// GPT-2's regex, the one ByteLevel applies when use_regex is true.
constexpr const char* kGpt2Regex = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

std::string utf8(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6)), s += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += static_cast<char>(0xE0 | (cp >> 12)), s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xF0 | (cp >> 18)), s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F)), s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

// The length of the UTF-8 sequence starting with byte c (1 for a stray byte).
size_t utf8_len(unsigned char c) { return c < 0xC0 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4; }

// The code point of the UTF-8 sequence at s[i] and its length, or length 0
// where none starts there well formed (a stray or continuation byte, a cut or
// overlong sequence, a surrogate, past U+10FFFF).
std::pair<uint32_t, size_t> code_point(const std::string& s, size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  const size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
  if (n == 0 || i + n > s.size()) return {0, 0};
  uint32_t cp = n == 1 ? c : c & (0xFF >> (n + 1));
  for (size_t k = 1; k < n; ++k) {
    const auto b = static_cast<unsigned char>(s[i + k]);
    if ((b & 0xC0) != 0x80) return {0, 0};
    cp = (cp << 6) | (b & 0x3F);
  }
  static constexpr uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return {0, 0};
  return {cp, n};
}

// GPT-2's bytes_to_unicode: printable bytes stand for themselves, the others for
// code points 256, 257, ... in byte order.
struct ByteMap {
  std::array<std::string, 256> to_text;
  std::unordered_map<uint32_t, unsigned char> to_byte;
  ByteMap() {
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const uint32_t cp = printable ? static_cast<uint32_t>(b) : next++;
      to_text[b] = utf8(cp);
      to_byte[cp] = static_cast<unsigned char>(b);
    }
  }
};
const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

// One compiled regex (PCRE2, UTF + Unicode properties).
class Regex {
 public:
  Regex(const std::string& pattern, const std::string& where) {
    int err = 0;
    PCRE2_SIZE at = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP, &err,
                          &at, nullptr);
    if (!code_) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      throw Error(cat(where, ": the regex does not compile at offset ", at, ": ", reinterpret_cast<char*>(msg)));
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // faster where the JIT exists; the interpreter otherwise
    data_ = pcre2_match_data_create_from_pattern(code_, nullptr);
  }
  ~Regex() {
    pcre2_match_data_free(data_);
    pcre2_code_free(code_);
  }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  // Isolated split: every match, and every gap between matches, is a piece.
  void split(const std::string& s, std::vector<std::string>& out) const {
    size_t at = 0, gap = 0;
    while (at <= s.size()) {
      const int rc =
          pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), at, PCRE2_NO_UTF_CHECK, data_, nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      check(rc >= 0, "tokenizer: a regex match failed (code ", rc, ")");
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(data_);
      if (ov[1] == ov[0]) {  // an empty match: step over one character
        at = ov[0] + (ov[0] < s.size() ? utf8_len(static_cast<unsigned char>(s[ov[0]])) : 1);
        continue;
      }
      if (ov[0] > gap) out.push_back(s.substr(gap, ov[0] - gap));
      out.push_back(s.substr(ov[0], ov[1] - ov[0]));
      gap = at = ov[1];
    }
    if (gap < s.size()) out.push_back(s.substr(gap));
  }

 private:
  pcre2_code* code_ = nullptr;
  pcre2_match_data* data_ = nullptr;  // one thread at a time
};

// A Unicode normalization form (ICU): text -> NFC/NFD/NFKC/NFKD(text), UTF-8 in and out.
class Normalizer {
 public:
  Normalizer(const std::string& form, const std::string& where) : form_(form) {
    UErrorCode e = U_ZERO_ERROR;
    n_ = form == "NFC"    ? unorm2_getNFCInstance(&e)
         : form == "NFD"  ? unorm2_getNFDInstance(&e)
         : form == "NFKC" ? unorm2_getNFKCInstance(&e)
         : form == "NFKD" ? unorm2_getNFKDInstance(&e)
                          : nullptr;
    check(n_ != nullptr && U_SUCCESS(e), where, ": normalizer \"", form,
          "\" is not supported (NFC, NFD, NFKC, NFKD, Prepend, Replace, Sequence)");
  }
  std::string operator()(const std::string& s) const {
    if (s.empty()) return s;
    UErrorCode e = U_ZERO_ERROR;
    int32_t n16 = 0;
    u_strFromUTF8(nullptr, 0, &n16, s.data(), static_cast<int32_t>(s.size()), &e);
    std::u16string in(static_cast<size_t>(n16), u'\0');
    e = U_ZERO_ERROR;
    u_strFromUTF8WithSub(in.data(), n16, nullptr, s.data(), static_cast<int32_t>(s.size()), 0xFFFD, nullptr, &e);
    check(U_SUCCESS(e), "tokenizer: the text is not UTF-8 (", u_errorName(e), ")");
    e = U_ZERO_ERROR;
    const int32_t n = unorm2_normalize(n_, in.data(), n16, nullptr, 0, &e);
    std::u16string out(static_cast<size_t>(n), u'\0');
    e = U_ZERO_ERROR;
    unorm2_normalize(n_, in.data(), n16, out.data(), n, &e);
    check(U_SUCCESS(e), "tokenizer: ", form_, " normalization failed (", u_errorName(e), ")");
    int32_t n8 = 0;
    e = U_ZERO_ERROR;
    u_strToUTF8(nullptr, 0, &n8, out.data(), n, &e);
    std::string r(static_cast<size_t>(n8), '\0');
    e = U_ZERO_ERROR;
    u_strToUTF8(r.data(), n8, nullptr, out.data(), n, &e);
    check(U_SUCCESS(e), "tokenizer: writing UTF-8 failed (", u_errorName(e), ")");
    return r;
  }

 private:
  std::string form_;
  const UNormalizer2* n_ = nullptr;  // owned by ICU
};

// Every occurrence of `from` in s replaced by `to`.
std::string replace_all(const std::string& s, const std::string& from, const std::string& to) {
  if (from.empty()) return s;
  std::string r;
  size_t at = 0;
  for (size_t hit; (hit = s.find(from, at)) != std::string::npos; at = hit + from.size())
    r.append(s, at, hit - at) += to;
  return r.append(s, at);
}

// A string field of a JSON object, or an error naming it.
std::string str_field(const json& j, const char* key, const std::string& where) {
  check(j.is_object() && j.contains(key) && j[key].is_string(), where, ": ", key, " must be a string, in ", j.dump());
  return j[key].get<std::string>();
}

// A Replace step's literal pattern ({"String": ...}; regex patterns are refused).
std::string literal_pattern(const json& step, const std::string& where) {
  const json& pat = step.value("pattern", json());
  check(pat.is_object() && pat.contains("String") && pat["String"].is_string(), where, ": Replace supports a ",
        "{\"String\": ...} pattern, got ", pat.dump());
  return pat["String"].get<std::string>();
}

// The steps of a Sequence (its `list` field), or the object itself.
std::vector<json> steps_of(const json& j, const char* list) {
  if (j.value("type", "") != "Sequence") return {j};
  return j.value(list, json::array()).get<std::vector<json>>();
}

// A normalizer step: a Unicode form, Prepend (to a text that is not empty) or
// Replace (every occurrence of a literal).
struct NormStep {
  std::unique_ptr<Normalizer> unicode;
  bool prepend = false;
  std::string from, to;  // Replace; Prepend: `to` is prepended
  std::string operator()(const std::string& s) const {
    if (unicode) return (*unicode)(s);
    if (prepend) return s.empty() ? s : to + s;
    return replace_all(s, from, to);
  }
};

// Metaspace's prepend_scheme: a replacement character put before every piece,
// before the piece at the start of the text only, or never.
enum class Prepend { always, first, never };

Prepend prepend_scheme(const json& s, const std::string& where) {
  if (!s.contains("prepend_scheme")) return s.value("add_prefix_space", true) ? Prepend::always : Prepend::never;
  const std::string p = str_field(s, "prepend_scheme", where);
  check(p == "always" || p == "first" || p == "never", where, ": Metaspace prepend_scheme must be always, first or ",
        "never, got '", p, "'");
  return p == "always" ? Prepend::always : p == "first" ? Prepend::first : Prepend::never;
}

struct PreStep {
  std::unique_ptr<Regex> split;  // a Split step, or ByteLevel's regex (may be null)
  bool byte_level = false, add_prefix_space = false;
  bool metaspace = false, metaspace_split = false;  // Metaspace: spaces become `replacement`
  std::string replacement;
  Prepend prepend = Prepend::never;
};

// A pre-token; at_start: it begins at the first byte of the text (Metaspace's "first").
struct Piece {
  std::string text;
  bool at_start;
};

// A decoder step, applied to the list of token strings in turn (Hugging Face's decode_chain).
struct DecodeStep {
  enum Kind { byte_level, replace, byte_fallback, fuse, strip, metaspace } kind = fuse;
  std::string from, to;         // replace; metaspace: from = the replacement character
  std::string content;          // strip: the character removed
  int64_t start = 0, stop = 0;  // strip: at most this many from the start / the end
  bool drop_first = false;      // metaspace: replacements in the first token are dropped
};

class ByteTokenizer final : public Tokenizer {
 public:
  std::vector<int64_t> encode(std::string_view text, bool) const override {
    return std::vector<int64_t>(reinterpret_cast<const unsigned char*>(text.data()),
                                reinterpret_cast<const unsigned char*>(text.data()) + text.size());
  }
  std::string decode(std::span<const int64_t> ids) const override {
    std::string s;
    for (int64_t id : ids) {
      check(id >= 0 && id < 256, "byte tokenizer: id ", id, " is not a byte (0-255)");
      s += static_cast<char>(id);
    }
    return s;
  }
  std::string decode_continued(std::span<const int64_t> ids) const override { return decode(ids); }
  int64_t vocab_size() const override { return 256; }
  std::string name() const override { return "byte"; }
};

class BpeTokenizer final : public Tokenizer {
 public:
  BpeTokenizer(const json& j, const std::string& where) : where_(where) {
    check(j.is_object(), where, ": must be a JSON object");
    const json& m = j.value("model", json());
    check(m.is_object() && m.value("type", "") == "BPE", where, ": model.type must be BPE, got ",
          m.is_object() ? m.value("type", json("none")).dump() : "no model");
    for (const char* k : {"dropout", "continuing_subword_prefix", "end_of_word_suffix"})
      check(!m.contains(k) || m[k].is_null(), where, ": model.", k, " is not supported");
    byte_fallback_ = m.value("byte_fallback", false);
    fuse_unk_ = m.value("fuse_unk", false);
    ignore_merges_ = m.value("ignore_merges", false);
    check(m.contains("vocab") && m["vocab"].is_object(), where, ": model.vocab must be an object");
    for (const auto& [tok, id] : m["vocab"].items()) {
      check(id.is_number_integer() && id.get<int64_t>() >= 0 && id.get<int64_t>() < INT32_MAX, where, ": vocab id of '",
            tok, "' must be in 0 .. 2^31 - 2");
      vocab_[tok] = id.get<int64_t>();
      vocab_size_ = std::max(vocab_size_, id.get<int64_t>() + 1);
    }
    if (m.contains("unk_token") && !m["unk_token"].is_null()) {
      const std::string unk = str_field(m, "unk_token", where + ": model");
      check(vocab_.count(unk), where, ": model.unk_token '", unk, "' is not in the vocabulary");
      unk_id_ = vocab_.at(unk);
    }
    for (int b = 0; b < 256; ++b) {  // byte fallback's tokens <0x00> .. <0xFF>
      char name[8];
      std::snprintf(name, sizeof name, "<0x%02X>", b);
      const auto it = vocab_.find(name);
      byte_id_[b] = it == vocab_.end() ? -1 : it->second;
    }
    read_merges(m);
    read_normalizer(j.value("normalizer", json()));
    for (const auto& t : j.value("added_tokens", json::array())) {
      const std::string content = t.value("content", "");
      check(!content.empty() && t.contains("id"), where, ": an added token needs content and id");
      for (const char* k : {"lstrip", "rstrip", "single_word"})
        check(!t.value(k, false), where, ": added token '", content, "' uses ", k, ", which is not supported");
      check(norm_.empty() || !t.value("normalized", false), where, ": added token '", content,
            "' is matched after normalization (normalized: true), which is not supported");
      added_[content] = t["id"].get<int64_t>();
      added_text_[t["id"].get<int64_t>()] = content;
      vocab_size_ = std::max(vocab_size_, t["id"].get<int64_t>() + 1);
    }
    for (const auto& [content, id] : added_) {
      added_by_length_.push_back(content);
      added_first_[static_cast<unsigned char>(content[0])] = true;
    }
    std::sort(added_by_length_.begin(), added_by_length_.end(),
              [](const std::string& x, const std::string& y) { return x.size() > y.size(); });
    read_pre_tokenizer(j.value("pre_tokenizer", json()));
    read_decoder(j.value("decoder", json()));
    read_post_processor(j.value("post_processor", json()));
  }

  std::vector<int64_t> encode(std::string_view text, bool add_special) const override {
    std::vector<int64_t> ids;
    if (add_special) ids.insert(ids.end(), prefix_.begin(), prefix_.end());
    size_t at = 0, plain = 0;
    auto flush = [&](size_t end) {
      if (end > plain) encode_plain(std::string(text.substr(plain, end - plain)), plain == 0, ids);
    };
    while (at < text.size()) {
      const std::string* hit = nullptr;
      if (!added_first_[static_cast<unsigned char>(text[at])]) {
        ++at;
        continue;
      }
      for (const std::string& a : added_by_length_)
        if (text.compare(at, a.size(), a) == 0) {
          hit = &a;
          break;
        }
      if (!hit) {
        ++at;
        continue;
      }
      flush(at);
      ids.push_back(added_.at(*hit));
      plain = at = at + hit->size();
    }
    flush(text.size());
    if (add_special) ids.insert(ids.end(), suffix_.begin(), suffix_.end());
    return ids;
  }

  std::string decode(std::span<const int64_t> ids) const override { return decode_chain(ids, false); }
  std::string decode_continued(std::span<const int64_t> ids) const override { return decode_chain(ids, true); }

  int64_t vocab_size() const override { return vocab_size_; }
  std::string name() const override { return where_; }

 private:
  // Merge rules keyed by the id pair: (rank, id of the merged token).
  static uint64_t pair_key(int64_t a, int64_t b) { return static_cast<uint64_t>(a) << 32 | static_cast<uint64_t>(b); }

  void read_merges(const json& m) {
    check(m.contains("merges") && m["merges"].is_array(), where_, ": model.merges must be an array");
    int64_t rank = 0;
    for (const auto& mg : m["merges"]) {
      std::string a, b;
      if (mg.is_string()) {  // "a b" (older files)
        const std::string s = mg.get<std::string>();
        const size_t sp = s.find(' ');
        check(sp != std::string::npos && sp > 0 && sp + 1 < s.size(), where_, ": merge '", s, "' is not 'a b'");
        a = s.substr(0, sp), b = s.substr(sp + 1);
      } else {
        check(mg.is_array() && mg.size() == 2 && mg[0].is_string() && mg[1].is_string(), where_,
              ": a merge must be \"a b\" or [\"a\", \"b\"], got ", mg.dump());
        a = mg[0].get<std::string>(), b = mg[1].get<std::string>();
      }
      for (const std::string& tok : {a, b, a + b}) {
        check(vocab_.count(tok), where_, ": merge '", a, " ", b, "': '", tok, "' is not in the vocabulary");
      }
      merges_.insert_or_assign(pair_key(vocab_.at(a), vocab_.at(b)), std::pair{rank++, vocab_.at(a + b)});
    }
  }

  void read_normalizer(const json& n) {
    if (n.is_null()) return;
    check(n.is_object() && n.contains("type"), where_, ": normalizer must be an object with a type");
    for (const json& s : steps_of(n, "normalizers")) {
      const std::string type = s.value("type", "");
      NormStep step;
      if (type == "Prepend") {
        step.prepend = true, step.to = str_field(s, "prepend", where_ + ": normalizer Prepend");
      } else if (type == "Replace") {
        step.from = literal_pattern(s, where_ + ": normalizer");
        step.to = str_field(s, "content", where_ + ": normalizer Replace");
      } else {
        step.unicode = std::make_unique<Normalizer>(type, where_);
      }
      norm_.push_back(std::move(step));
    }
  }

  void read_pre_tokenizer(const json& p) {
    if (p.is_null()) return;  // the normalized text is one pre-token
    check(p.is_object(), where_, ": pre_tokenizer must be an object or null, got ", p.dump());
    for (const json& s : steps_of(p, "pretokenizers")) {
      const std::string type = s.value("type", "");
      PreStep step;
      if (type == "Split") {
        check(s.value("behavior", "") == "Isolated" && !s.value("invert", false), where_,
              ": pre_tokenizer Split supports behavior Isolated without invert, got ", s.dump());
        const json& pat = s.value("pattern", json());
        check(pat.is_object() && (pat.contains("Regex") || pat.contains("String")), where_,
              ": a Split pattern must be {\"Regex\": ...} or {\"String\": ...}");
        std::string re = pat.contains("Regex") ? pat["Regex"].get<std::string>() : std::string();
        if (!pat.contains("Regex")) {  // a literal: quote it for the regex engine
          re = "\\Q" + pat["String"].get<std::string>() + "\\E";
        }
        step.split = std::make_unique<Regex>(re, where_ + ": pre_tokenizer Split");
      } else if (type == "ByteLevel") {
        step.byte_level = byte_level_ = true;
        step.add_prefix_space = s.value("add_prefix_space", false);
        if (s.value("use_regex", true)) step.split = std::make_unique<Regex>(kGpt2Regex, where_ + ": ByteLevel");
      } else if (type == "Metaspace") {
        step.metaspace = true;
        step.replacement = str_field(s, "replacement", where_ + ": pre_tokenizer Metaspace");
        step.prepend = prepend_scheme(s, where_);
        step.metaspace_split = s.value("split", true);
      } else {
        throw Error(
            cat(where_, ": pre_tokenizer type '", type, "' is not supported (ByteLevel, Split, Metaspace, Sequence)"));
      }
      pre_.push_back(std::move(step));
    }
  }

  void read_decoder(const json& d) {
    if (d.is_null()) return;  // Hugging Face joins the tokens with spaces
    check(d.is_object(), where_, ": decoder must be an object or null, got ", d.dump());
    for (const json& s : steps_of(d, "decoders")) {
      const std::string type = s.value("type", "");
      DecodeStep step;
      if (type == "ByteLevel") {
        step.kind = DecodeStep::byte_level;
      } else if (type == "Replace") {
        step.kind = DecodeStep::replace;
        step.from = literal_pattern(s, where_ + ": decoder");
        step.to = str_field(s, "content", where_ + ": decoder Replace");
      } else if (type == "ByteFallback") {
        step.kind = DecodeStep::byte_fallback;
      } else if (type == "Fuse") {
        step.kind = DecodeStep::fuse;
      } else if (type == "Strip") {
        step.kind = DecodeStep::strip;
        step.content = str_field(s, "content", where_ + ": decoder Strip");
        check(utf8_len(static_cast<unsigned char>(step.content[0])) == step.content.size(), where_,
              ": decoder Strip content must be one character, got '", step.content, "'");
        step.start = s.value("start", int64_t{0}), step.stop = s.value("stop", int64_t{0});
      } else if (type == "Metaspace") {
        step.kind = DecodeStep::metaspace;
        step.from = str_field(s, "replacement", where_ + ": decoder Metaspace");
        step.drop_first = prepend_scheme(s, where_) != Prepend::never;
      } else {
        throw Error(cat(where_, ": decoder ", d.dump().substr(0, 200),
                        " is not supported (ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace, Sequence)"));
      }
      decoders_.push_back(std::move(step));
    }
    has_decoder_ = true;
  }

  // TemplateProcessing's "single" template: the special tokens before and after $A.
  void read_post_processor(const json& p) {
    if (p.is_null() || p.value("type", "") == "ByteLevel") return;
    check(p.value("type", "") == "TemplateProcessing", where_, ": post_processor ", p.value("type", json("?")).dump(),
          " is not supported (TemplateProcessing, ByteLevel)");
    bool seen_a = false;
    for (const auto& item : p.value("single", json::array())) {
      if (item.contains("Sequence")) {
        check(!seen_a, where_, ": the single template holds $A twice");
        seen_a = true;
        continue;
      }
      check(item.contains("SpecialToken"), where_, ": template item ", item.dump(), " is not supported");
      const std::string id = item["SpecialToken"].value("id", "");
      const json& st = p.value("special_tokens", json::object());
      check(st.contains(id) && st[id].contains("ids"), where_, ": template token '", id, "' has no ids");
      for (const auto& x : st[id]["ids"]) (seen_a ? suffix_ : prefix_).push_back(x.get<int64_t>());
    }
  }

  // Metaspace: spaces become the replacement, which is put first as the scheme
  // says; with split, a piece starts at each replacement (Hugging Face's MergedWithNext).
  static void metaspace(const PreStep& step, const Piece& piece, std::vector<Piece>& out) {
    std::string t = replace_all(piece.text, " ", step.replacement);
    const bool put = step.prepend == Prepend::always || (step.prepend == Prepend::first && piece.at_start);
    if (put && t.compare(0, step.replacement.size(), step.replacement) != 0) t.insert(0, step.replacement);
    if (!step.metaspace_split) return out.push_back({std::move(t), piece.at_start});
    size_t begin = 0;
    for (size_t hit = t.find(step.replacement, 1); hit != std::string::npos;
         hit = t.find(step.replacement, hit + step.replacement.size())) {
      out.push_back({t.substr(begin, hit - begin), piece.at_start && begin == 0});
      begin = hit;
    }
    out.push_back({t.substr(begin), piece.at_start && begin == 0});
  }

  // A run of text between added tokens: normalize, pre-tokenize, BPE each piece.
  void encode_plain(const std::string& raw, bool at_start, std::vector<int64_t>& ids) const {
    std::string text = raw;
    for (const NormStep& n : norm_) text = n(text);
    if (text.empty()) return;
    std::vector<Piece> pieces{{std::move(text), at_start}}, next;
    std::vector<std::string> split;
    for (const PreStep& step : pre_) {
      next.clear();
      for (Piece& piece : pieces) {
        if (step.metaspace) {
          metaspace(step, piece, next);
          continue;
        }
        if (step.add_prefix_space && (piece.text.empty() || piece.text[0] != ' ')) piece.text = " " + piece.text;
        if (!step.split) {
          next.push_back(std::move(piece));
          continue;
        }
        split.clear();
        step.split->split(piece.text, split);
        for (size_t i = 0; i < split.size(); ++i) next.push_back({std::move(split[i]), piece.at_start && i == 0});
      }
      pieces.swap(next);
    }
    for (const Piece& piece : pieces) {
      if (!byte_level_) {
        bpe(piece.text, ids);
        continue;
      }
      std::string mapped;
      for (unsigned char c : piece.text) mapped += byte_map().to_text[c];
      bpe(mapped, ids);
    }
  }

  // Hugging Face's BPE word: each character its token (if not in the vocabulary:
  // its bytes' <0xXX> tokens with byte_fallback, else unk_token, runs of unknown
  // characters fused into one with fuse_unk); then the merges by rank, the lowest
  // first and the leftmost on a tie, through a priority queue.
  void bpe(const std::string& word, std::vector<int64_t>& ids) const {
    if (word.empty()) return;
    if (ignore_merges_) {
      const auto it = vocab_.find(word);
      if (it != vocab_.end()) return ids.push_back(it->second);
    }
    std::vector<int64_t> sym;
    bool unk_open = false;  // the last symbol is an unk that the next unknown character joins
    for (size_t i = 0; i < word.size();) {
      const size_t n = std::min(utf8_len(static_cast<unsigned char>(word[i])), word.size() - i);
      const std::string ch = word.substr(i, n);
      i += n;
      const auto it = vocab_.find(ch);
      if (it != vocab_.end()) {
        sym.push_back(it->second), unk_open = false;
        continue;
      }
      if (byte_fallback_ &&
          std::all_of(ch.begin(), ch.end(), [&](char c) { return byte_id_[static_cast<unsigned char>(c)] >= 0; })) {
        for (char c : ch) sym.push_back(byte_id_[static_cast<unsigned char>(c)]);
        unk_open = false;
        continue;
      }
      check(unk_id_ >= 0, where_, ": the character '", ch,
            "' is not in the vocabulary (no byte_fallback, no unk_token)");
      if (!(unk_open && fuse_unk_)) sym.push_back(unk_id_);
      unk_open = true;
    }
    const int64_t n = static_cast<int64_t>(sym.size());
    std::vector<int64_t> prev(static_cast<size_t>(n)), next(static_cast<size_t>(n));
    std::vector<bool> gone(static_cast<size_t>(n), false);
    for (int64_t i = 0; i < n; ++i) prev[i] = i - 1, next[i] = i + 1 < n ? i + 1 : -1;
    struct Cand {
      int64_t rank, pos, id;
    };
    auto later = [](const Cand& a, const Cand& b) { return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos; };
    std::priority_queue<Cand, std::vector<Cand>, decltype(later)> queue(later);
    auto offer = [&](int64_t pos) {  // the pair (pos, next[pos]), if a merge joins it
      if (pos < 0 || next[pos] < 0) return;
      const auto m = merges_.find(pair_key(sym[pos], sym[next[pos]]));
      if (m != merges_.end()) queue.push({m->second.first, pos, m->second.second});
    };
    for (int64_t i = 0; i + 1 < n; ++i) offer(i);
    while (!queue.empty()) {
      const Cand top = queue.top();
      queue.pop();
      const int64_t right = next[top.pos];
      if (gone[top.pos] || right < 0) continue;
      const auto m = merges_.find(pair_key(sym[top.pos], sym[right]));
      if (m == merges_.end() || m->second.second != top.id) continue;  // an expired entry
      sym[top.pos] = top.id;
      gone[right] = true;
      next[top.pos] = next[right];
      if (next[right] >= 0) prev[next[right]] = top.pos;
      offer(prev[top.pos]);
      offer(top.pos);
    }
    for (int64_t i = 0; i >= 0; i = next[i]) ids.push_back(sym[i]);
  }

  // The tokens' strings through the decoder steps (Hugging Face's decode_chain),
  // joined. continued: the ids follow text already decoded, so the steps that act
  // on the text's start (Strip's leading cut, Metaspace's first token) are
  // skipped, and byte-fallback bytes are given as they are even where a
  // character is split across calls (whole decoding gives U+FFFD for each byte
  // of a run that is not UTF-8, as Hugging Face does).
  std::string decode_chain(std::span<const int64_t> ids, bool continued) const {
    if (id_text_.empty()) build_id_text();
    std::vector<std::string> toks;
    for (int64_t id : ids) {
      const auto a = added_text_.find(id);
      if (a != added_text_.end()) {
        toks.push_back(a->second);
        continue;
      }
      check(id >= 0 && id < static_cast<int64_t>(id_text_.size()) && !id_text_[static_cast<size_t>(id)].empty(),
            "tokenizer: id ", id, " is not in the vocabulary of ", vocab_size_);
      toks.push_back(id_text_[static_cast<size_t>(id)]);
    }
    if (!has_decoder_) {
      std::string out;
      for (size_t i = 0; i < toks.size(); ++i) out += (i ? " " : "") + toks[i];
      return out;
    }
    for (const DecodeStep& step : decoders_) toks = apply(step, std::move(toks), continued);
    std::string out;
    for (const std::string& t : toks) out += t;
    return out;
  }

  static std::vector<std::string> apply(const DecodeStep& step, std::vector<std::string> toks, bool continued) {
    std::vector<std::string> out;
    switch (step.kind) {
      case DecodeStep::byte_level:  // stand-ins back to bytes (a token with other characters stays as it is)
        for (std::string& t : toks) {
          std::string bytes;
          bool all = true;
          for (size_t i = 0; i < t.size() && all;) {
            const auto [cp, n] = code_point(t, i);
            const auto b = byte_map().to_byte.find(cp);
            all = n > 0 && b != byte_map().to_byte.end();
            if (all) bytes += static_cast<char>(b->second);
            i += n;
          }
          out.push_back(all ? bytes : t);
        }
        return out;
      case DecodeStep::replace:
        for (std::string& t : toks) out.push_back(replace_all(t, step.from, step.to));
        return out;
      case DecodeStep::byte_fallback: {
        std::string run;  // the bytes of consecutive <0xXX> tokens
        auto flush = [&] {
          if (run.empty()) return;
          if (continued || valid_utf8(run)) {
            out.push_back(run);
          } else {
            for (size_t i = 0; i < run.size(); ++i) out.push_back("\xEF\xBF\xBD");
          }
          run.clear();
        };
        for (std::string& t : toks) {
          if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' &&
              std::isxdigit(static_cast<unsigned char>(t[3])) && std::isxdigit(static_cast<unsigned char>(t[4]))) {
            run += static_cast<char>(std::stoi(t.substr(3, 2), nullptr, 16));
            continue;
          }
          flush();
          out.push_back(std::move(t));
        }
        flush();
        return out;
      }
      case DecodeStep::fuse: {
        std::string all;
        for (const std::string& t : toks) all += t;
        return {all};
      }
      case DecodeStep::strip:
        for (std::string& t : toks) {
          const size_t c = step.content.size();
          size_t lo = 0, hi = t.size();
          for (int64_t k = 0; !continued && k < step.start && lo + c <= hi && t.compare(lo, c, step.content) == 0; ++k)
            lo += c;
          for (int64_t k = 0; k < step.stop && hi >= lo + c && t.compare(hi - c, c, step.content) == 0; ++k) hi -= c;
          out.push_back(t.substr(lo, hi - lo));
        }
        return out;
      case DecodeStep::metaspace:
        for (size_t i = 0; i < toks.size(); ++i)
          out.push_back(replace_all(toks[i], step.from, i == 0 && step.drop_first && !continued ? "" : " "));
        return out;
    }
    return out;
  }

  static bool valid_utf8(const std::string& s) {
    for (size_t i = 0; i < s.size();) {
      const size_t n = code_point(s, i).second;
      if (n == 0) return false;
      i += n;
    }
    return true;
  }

  void build_id_text() const {
    id_text_.assign(static_cast<size_t>(vocab_size_), std::string());
    for (const auto& [tok, id] : vocab_) id_text_[static_cast<size_t>(id)] = tok;
  }

  std::string where_;
  std::unordered_map<std::string, int64_t> vocab_;
  std::unordered_map<uint64_t, std::pair<int64_t, int64_t>> merges_;
  std::array<int64_t, 256> byte_id_{};  // the id of <0xXX>, or -1
  std::map<std::string, int64_t> added_;
  std::map<int64_t, std::string> added_text_;
  std::vector<std::string> added_by_length_;
  std::array<bool, 256> added_first_{};  // the bytes an added token can start with
  std::vector<NormStep> norm_;
  std::vector<PreStep> pre_;
  std::vector<DecodeStep> decoders_;
  std::vector<int64_t> prefix_, suffix_;
  bool byte_level_ = false, byte_fallback_ = false, fuse_unk_ = false, ignore_merges_ = false, has_decoder_ = false;
  int64_t unk_id_ = -1, vocab_size_ = 0;
  mutable std::vector<std::string> id_text_;
};

}  // namespace

std::unique_ptr<Tokenizer> byte_tokenizer() { return std::make_unique<ByteTokenizer>(); }

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& dir_or_file) {
  namespace fs = std::filesystem;
  const fs::path p = fs::is_directory(dir_or_file) ? fs::path(dir_or_file) / "tokenizer.json" : fs::path(dir_or_file);
  std::ifstream in(p);
  check(in.good(), p.string(), ": cannot read (a Hugging Face checkpoint folder holds tokenizer.json)");
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    throw Error(cat(p.string(), ": not valid JSON: ", e.what()));
  }
  return std::make_unique<BpeTokenizer>(j, p.string());
}

}  // namespace ringattn
