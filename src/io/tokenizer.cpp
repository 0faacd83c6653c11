// Byte-level BPE from Hugging Face tokenizer.json, and the byte tokenizer.
//
// encode(text): split on added tokens -> pre-tokens (Split regexes, ByteLevel's
// GPT-2 regex when use_regex) -> each pre-token's bytes as GPT-2's printable
// stand-ins (bytes_to_unicode) -> BPE merges by rank -> ids; then the template.
#include "ringattn/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <unicode/unorm2.h>
#include <unicode/ustring.h>

#include <algorithm>
#include <array>
#include <climits>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>

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
    check(n_ != nullptr && U_SUCCESS(e), where, ": normalizer \"", form, "\" is not supported (NFC, NFD, NFKC, NFKD)");
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

struct PreStep {
  std::unique_ptr<Regex> split;  // a Split step, or ByteLevel's regex (may be null)
  bool byte_level = false, add_prefix_space = false;
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
    for (const char* k : {"dropout", "continuing_subword_prefix", "end_of_word_suffix", "unk_token"})
      check(!m.contains(k) || m[k].is_null(), where, ": model.", k, " is not supported (byte-level BPE needs none)");
    check(!m.value("byte_fallback", false), where, ": model.byte_fallback is not supported");
    ignore_merges_ = m.value("ignore_merges", false);
    check(m.contains("vocab") && m["vocab"].is_object(), where, ": model.vocab must be an object");
    for (const auto& [tok, id] : m["vocab"].items()) {
      check(id.is_number_integer() && id.get<int64_t>() >= 0, where, ": vocab id of '", tok, "' must be >= 0");
      vocab_[tok] = id.get<int64_t>();
      vocab_size_ = std::max(vocab_size_, id.get<int64_t>() + 1);
    }
    check(m.contains("merges") && m["merges"].is_array(), where, ": model.merges must be an array");
    int64_t rank = 0;
    for (const auto& mg : m["merges"]) {
      std::string a, b;
      if (mg.is_string()) {  // "a b" (older files)
        const std::string s = mg.get<std::string>();
        const size_t sp = s.find(' ');
        check(sp != std::string::npos && sp > 0 && sp + 1 < s.size(), where, ": merge '", s, "' is not 'a b'");
        a = s.substr(0, sp), b = s.substr(sp + 1);
      } else {
        check(mg.is_array() && mg.size() == 2 && mg[0].is_string() && mg[1].is_string(), where,
              ": a merge must be \"a b\" or [\"a\", \"b\"], got ", mg.dump());
        a = mg[0].get<std::string>(), b = mg[1].get<std::string>();
      }
      ranks_.emplace(a + '\0' + b, rank++);
    }
    if (j.contains("normalizer") && !j["normalizer"].is_null()) {
      const json& n = j["normalizer"];
      check(n.is_object() && n.contains("type"), where, ": normalizer must be an object with a type");
      normalizer_ = std::make_unique<Normalizer>(n["type"].get<std::string>(), where);
    }
    for (const auto& t : j.value("added_tokens", json::array())) {
      const std::string content = t.value("content", "");
      check(!content.empty() && t.contains("id"), where, ": an added token needs content and id");
      for (const char* k : {"lstrip", "rstrip", "single_word"})
        check(!t.value(k, false), where, ": added token '", content, "' uses ", k, ", which is not supported");
      check(!normalizer_ || !t.value("normalized", false), where, ": added token '", content,
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
      if (end > plain) encode_plain(std::string(text.substr(plain, end - plain)), ids);
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

  std::string decode(std::span<const int64_t> ids) const override {
    if (id_text_.empty()) build_id_text();
    std::string out;
    for (int64_t id : ids) {
      const auto a = added_text_.find(id);
      if (a != added_text_.end()) {
        out += a->second;
        continue;
      }
      check(id >= 0 && id < static_cast<int64_t>(id_text_.size()) && !id_text_[static_cast<size_t>(id)].empty(),
            "tokenizer: id ", id, " is not in the vocabulary of ", vocab_size_);
      const std::string& t = id_text_[static_cast<size_t>(id)];
      for (size_t i = 0; i < t.size();) {  // stand-in code points back to bytes
        const size_t n = utf8_len(static_cast<unsigned char>(t[i]));
        uint32_t cp = n == 1 ? static_cast<unsigned char>(t[i]) : static_cast<unsigned char>(t[i]) & (0xFF >> (n + 1));
        for (size_t k = 1; k < n && i + k < t.size(); ++k)
          cp = (cp << 6) | (static_cast<unsigned char>(t[i + k]) & 0x3F);
        const auto b = byte_map().to_byte.find(cp);
        check(b != byte_map().to_byte.end(), "tokenizer: token ", id, " holds a character that is not a byte stand-in");
        out += static_cast<char>(b->second);
        i += n;
      }
    }
    return out;
  }

  int64_t vocab_size() const override { return vocab_size_; }
  std::string name() const override { return where_; }

 private:
  void read_pre_tokenizer(const json& p) {
    check(p.is_object(), where_, ": a byte-level pre_tokenizer is needed, got ", p.dump());
    std::vector<json> steps;
    if (p.value("type", "") == "Sequence")
      for (const auto& s : p.value("pretokenizers", json::array())) steps.push_back(s);
    else
      steps.push_back(p);
    bool byte_level = false;
    for (const json& s : steps) {
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
        step.byte_level = byte_level = true;
        step.add_prefix_space = s.value("add_prefix_space", false);
        if (s.value("use_regex", true)) step.split = std::make_unique<Regex>(kGpt2Regex, where_ + ": ByteLevel");
      } else {
        throw Error(cat(where_, ": pre_tokenizer type '", type, "' is not supported (ByteLevel, Split, Sequence)"));
      }
      pre_.push_back(std::move(step));
    }
    check(byte_level, where_, ": the pre_tokenizer has no ByteLevel step (only byte-level BPE is supported)");
  }

  void read_decoder(const json& d) {
    check(d.is_null() || d.value("type", "") == "ByteLevel", where_, ": decoder ", d.dump(),
          " is not supported (ByteLevel)");
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

  void encode_plain(const std::string& raw, std::vector<int64_t>& ids) const {
    std::vector<std::string> pieces{normalizer_ ? (*normalizer_)(raw) : raw}, next;
    for (const PreStep& step : pre_) {
      next.clear();
      for (std::string& piece : pieces) {
        if (step.add_prefix_space && (piece.empty() || piece[0] != ' ')) piece.insert(piece.begin(), ' ');
        if (step.split)
          step.split->split(piece, next);
        else
          next.push_back(std::move(piece));
      }
      pieces.swap(next);
    }
    for (const std::string& piece : pieces) {
      std::string mapped;
      for (unsigned char c : piece) mapped += byte_map().to_text[c];
      bpe(mapped, ids);
    }
  }

  // Merges by rank (the lowest first, the leftmost on a tie) until no pair has one.
  void bpe(const std::string& word, std::vector<int64_t>& ids) const {
    if (word.empty()) return;
    if (ignore_merges_) {
      const auto it = vocab_.find(word);
      if (it != vocab_.end()) return ids.push_back(it->second);
    }
    std::vector<std::string> sym;
    for (size_t i = 0; i < word.size();) {
      const size_t n = utf8_len(static_cast<unsigned char>(word[i]));
      sym.push_back(word.substr(i, n));
      i += n;
    }
    while (sym.size() > 1) {
      int64_t best = INT64_MAX;
      size_t at = 0;
      for (size_t i = 0; i + 1 < sym.size(); ++i) {
        const auto it = ranks_.find(sym[i] + '\0' + sym[i + 1]);
        if (it != ranks_.end() && it->second < best) best = it->second, at = i;
      }
      if (best == INT64_MAX) break;
      sym[at] += sym[at + 1];
      sym.erase(sym.begin() + static_cast<std::ptrdiff_t>(at) + 1);
    }
    for (const std::string& s : sym) {
      const auto it = vocab_.find(s);
      check(it != vocab_.end(), where_, ": the piece '", s, "' is not in the vocabulary (no unk_token)");
      ids.push_back(it->second);
    }
  }

  void build_id_text() const {
    id_text_.assign(static_cast<size_t>(vocab_size_), std::string());
    for (const auto& [tok, id] : vocab_) id_text_[static_cast<size_t>(id)] = tok;
  }

  std::string where_;
  std::unordered_map<std::string, int64_t> vocab_, ranks_;
  std::map<std::string, int64_t> added_;
  std::map<int64_t, std::string> added_text_;
  std::vector<std::string> added_by_length_;
  std::array<bool, 256> added_first_{};  // the bytes an added token can start with
  std::unique_ptr<Normalizer> normalizer_;
  std::vector<PreStep> pre_;
  std::vector<int64_t> prefix_, suffix_;
  bool ignore_merges_ = false;
  int64_t vocab_size_ = 0;
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
