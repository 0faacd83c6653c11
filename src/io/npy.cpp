// NumPy .npy reader/writer for little-endian float32, C order.
// Format: https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html
//   magic "\x93NUMPY", version (major, minor), header length (uint16 LE in 1.0,
//   uint32 LE in 2.0/3.0), an ASCII Python dict literal padded with spaces and
//   ended by '\n', then the raw data.
#include "ringattn/npy.h"

#include <bit>
#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "ringattn/atomic_file.h"
#include "ringattn/error.h"

namespace ringattn {
namespace {

static_assert(std::endian::native == std::endian::little,
              "npy.cpp reads and writes little-endian float32 without byte swapping");

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicLen = 6;

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};
using File = std::unique_ptr<std::FILE, FileCloser>;

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw Error(cat("npy file '", path, "': ", what));
}

// The header text without its padding, for error messages.
std::string shown(const std::string& header) {
  size_t e = header.size();
  while (e > 0 && std::isspace(static_cast<unsigned char>(header[e - 1]))) --e;
  return header.substr(0, e);
}

// The parsed header dict.
struct Header {
  std::string descr;
  bool fortran_order = false;
  std::vector<int64_t> shape;
  bool has_descr = false, has_fortran_order = false, has_shape = false;
};

// A parser for the small subset of Python literals a .npy header holds: a dict
// with string keys whose values are strings, True/False, or tuples of integers.
// Unknown keys are skipped.
class HeaderParser {
 public:
  HeaderParser(const std::string& text, const std::string& path) : s_(text), path_(path) {}

  Header parse() {
    Header h;
    expect('{', "at the start of the header dict");
    for (;;) {
      if (eat('}')) break;
      const std::string key = string_literal();
      expect(':', cat("after key '", key, "'"));
      if (key == "descr") {
        h.descr = string_literal();
        h.has_descr = true;
      } else if (key == "fortran_order") {
        h.fortran_order = boolean();
        h.has_fortran_order = true;
      } else if (key == "shape") {
        h.shape = int_tuple();
        h.has_shape = true;
      } else {
        skip_value();
      }
      if (eat(',')) continue;
      expect('}', "after a value");
      break;
    }
    skip_ws();
    if (i_ != s_.size()) error("unexpected text after the dict");
    return h;
  }

 private:
  [[noreturn]] void error(const std::string& what) const {
    fail(path_, cat("malformed header (", what, " at character ", i_, "): ", shown(s_)));
  }
  void skip_ws() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  bool eat(char c) {
    skip_ws();
    if (i_ < s_.size() && s_[i_] == c) {
      ++i_;
      return true;
    }
    return false;
  }
  void expect(char c, const std::string& where) {
    if (!eat(c)) error(cat("expected '", c, "' ", where));
  }
  bool eat_word(const char* w) {
    skip_ws();
    const size_t n = std::strlen(w);
    if (s_.compare(i_, n, w) != 0) return false;
    i_ += n;
    return true;
  }
  std::string string_literal() {
    skip_ws();
    if (i_ >= s_.size() || (s_[i_] != '\'' && s_[i_] != '"')) error("expected a quoted string");
    const char q = s_[i_++];
    const size_t end = s_.find(q, i_);
    if (end == std::string::npos) error("unterminated string");
    std::string r = s_.substr(i_, end - i_);
    i_ = end + 1;
    return r;
  }
  bool boolean() {
    if (eat_word("True")) return true;
    if (eat_word("False")) return false;
    error("expected True or False");
  }
  int64_t integer() {
    skip_ws();
    if (i_ >= s_.size() || !std::isdigit(static_cast<unsigned char>(s_[i_]))) error("expected a non-negative integer");
    int64_t v = 0;
    while (i_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[i_]))) {
      if (__builtin_mul_overflow(v, 10, &v) || __builtin_add_overflow(v, s_[i_] - '0', &v))
        error("dimension too large");
      ++i_;
    }
    if (i_ < s_.size() && s_[i_] == 'L') ++i_;  // Python 2 long
    return v;
  }
  std::vector<int64_t> int_tuple() {
    std::vector<int64_t> v;
    expect('(', "to open the shape tuple");
    for (;;) {
      if (eat(')')) break;
      v.push_back(integer());
      if (eat(',')) continue;
      expect(')', "to close the shape tuple");
      break;
    }
    return v;
  }
  // Skips one literal: a string, a word or number, or a bracketed group.
  void skip_value() {
    skip_ws();
    if (i_ >= s_.size()) error("expected a value");
    const char c = s_[i_];
    if (c == '\'' || c == '"') {
      string_literal();
      return;
    }
    if (c == '(' || c == '[' || c == '{') {
      int depth = 0;
      while (i_ < s_.size()) {
        const char x = s_[i_];
        if (x == '\'' || x == '"') {
          string_literal();
          continue;
        }
        if (x == '(' || x == '[' || x == '{') ++depth;
        if (x == ')' || x == ']' || x == '}') --depth;
        ++i_;
        if (depth == 0) return;
      }
      error("unbalanced brackets");
    }
    const size_t start = i_;
    while (i_ < s_.size() && s_[i_] != ',' && s_[i_] != '}' && !std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
    if (i_ == start) error("expected a value");
  }

  const std::string& s_;
  const std::string& path_;
  size_t i_ = 0;
};

std::string shape_tuple(std::span<const int64_t> shape) {
  if (shape.size() == 1) return cat("(", shape[0], ",)");
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + ")";
}

// A C-order little-endian array of dtype descr (e.g. '<f4') and shape, data_bytes from data.
void write_npy(const std::string& path, const char* descr, std::span<const int64_t> shape, const void* data,
               size_t data_bytes) {
  std::string header = cat("{'descr': '", descr, "', 'fortran_order': False, 'shape': ", shape_tuple(shape), ", }");
  // Pad with spaces so that magic + version + length + header + '\n' is a multiple of 64.
  const size_t unpadded = kMagicLen + 2 + 2 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  const unsigned char pre[10] = {0x93,
                                 'N',
                                 'U',
                                 'M',
                                 'P',
                                 'Y',
                                 1,
                                 0,
                                 static_cast<unsigned char>(header.size() & 0xff),
                                 static_cast<unsigned char>(header.size() >> 8)};
  write_file_atomically(path, [&](std::FILE* f) {
    return std::fwrite(pre, 1, sizeof pre, f) == sizeof pre &&
           std::fwrite(header.data(), 1, header.size(), f) == header.size() &&
           (data_bytes == 0 || std::fwrite(data, 1, data_bytes, f) == data_bytes);
  });
}

}  // namespace

namespace {

// An array's element type and shape, its bytes read (checked) from `path`;
// `accepted` maps each descr it takes to its element size, `hint` says how to convert.
struct NpyArray {
  std::string descr;
  std::vector<int64_t> shape;
  std::vector<unsigned char> bytes;
};

NpyArray read_npy(const std::string& path, const std::vector<std::pair<std::string, uint64_t>>& accepted,
                  const std::string& hint) {
  File f(std::fopen(path.c_str(), "rb"));
  if (!f) fail(path, cat("cannot open: ", std::strerror(errno)));
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) fail(path, "is not a regular file");
  const uint64_t file_size = std::filesystem::file_size(path, ec);
  if (ec) fail(path, cat("cannot read its size: ", ec.message()));

  unsigned char pre[12];
  if (file_size < 10 || std::fread(pre, 1, 8, f.get()) != 8 || std::memcmp(pre, kMagic, kMagicLen) != 0)
    fail(path, "not a NumPy .npy file (missing the \\x93NUMPY magic); save it with np.save");
  const int major = pre[6], minor = pre[7];
  uint64_t header_len = 0;
  size_t len_bytes = 0;
  if (major == 1) {
    len_bytes = 2;
  } else if (major == 2 || major == 3) {
    len_bytes = 4;
  } else {
    fail(path, cat("unsupported .npy format version ", major, ".", minor, " (1.0, 2.0 and 3.0 are supported)"));
  }
  if (std::fread(pre + 8, 1, len_bytes, f.get()) != len_bytes) fail(path, "truncated header");
  for (size_t k = 0; k < len_bytes; ++k) header_len |= static_cast<uint64_t>(pre[8 + k]) << (8 * k);
  const uint64_t data_start = 8 + len_bytes + header_len;
  if (data_start > file_size)
    fail(path, cat("truncated header: it claims ", header_len, " bytes but the file has ", file_size));

  std::string text(header_len, '\0');
  if (header_len && std::fread(text.data(), 1, header_len, f.get()) != header_len) fail(path, "truncated header");
  const Header h = HeaderParser(text, path).parse();
  if (!h.has_descr || !h.has_fortran_order || !h.has_shape)
    fail(path, cat("header lacks '",
                   !h.has_descr           ? "descr"
                   : !h.has_fortran_order ? "fortran_order"
                                          : "shape",
                   "': ", shown(text)));
  uint64_t elem = 0;
  std::string names;
  for (const auto& [d, size] : accepted) {
    names += cat(names.empty() ? "" : ", ", "'", d, "'");
    if (h.descr == d) elem = size;
  }
  if (elem == 0) fail(path, cat("dtype '", h.descr, "' is not supported here (", names, "); ", hint));
  // A Fortran-ordered array of rank <= 1 has the same bytes as a C-ordered one.
  if (h.fortran_order && h.shape.size() > 1)
    fail(path, "array is in Fortran order; save np.ascontiguousarray(arr) instead");
  if (h.shape.size() > static_cast<size_t>(kMaxRank))
    fail(path, cat("array has rank ", h.shape.size(), "; ringattn supports at most ", kMaxRank));

  uint64_t data_bytes = elem;
  for (int64_t d : h.shape)
    if (__builtin_mul_overflow(data_bytes, static_cast<uint64_t>(d), &data_bytes)) fail(path, "shape is too large");
  const uint64_t have = file_size - data_start;
  if (have != data_bytes)
    fail(path, cat(have < data_bytes ? "truncated data" : "unexpected trailing data", ": the shape needs ", data_bytes,
                   " bytes of ", h.descr, " but the file holds ", have));

  NpyArray a{h.descr, h.shape, std::vector<unsigned char>(data_bytes)};
  if (data_bytes && std::fread(a.bytes.data(), 1, data_bytes, f.get()) != data_bytes)
    fail(path, cat("read error: ", std::strerror(errno)));
  return a;
}

}  // namespace

Tensor load_npy(const std::string& path) {
  const NpyArray a = read_npy(path, {{"<f4", 4}}, "convert with arr.astype(np.float32)");
  Tensor t(DType::f32, static_cast<int>(a.shape.size()), a.shape.data());
  if (!a.bytes.empty()) std::memcpy(t.ptr<void>(), a.bytes.data(), a.bytes.size());
  return t;
}

std::vector<int64_t> load_npy_ids(const std::string& path, std::vector<int64_t>* shape) {
  const NpyArray a = read_npy(path, {{"<i8", 8}, {"<i4", 4}}, "save token ids with arr.astype(np.int64)");
  std::vector<int64_t> ids(a.bytes.size() / (a.descr == "<i8" ? 8 : 4));
  for (size_t i = 0; i < ids.size(); ++i) {
    if (a.descr == "<i8") {
      std::memcpy(&ids[i], a.bytes.data() + 8 * i, 8);
    } else {
      int32_t x;
      std::memcpy(&x, a.bytes.data() + 4 * i, 4);
      ids[i] = x;
    }
  }
  if (shape) *shape = a.shape;
  return ids;
}

void save_npy(const std::string& path, const TensorView& t) {
  const int64_t n = t.numel();
  if (t.data == nullptr && n != 0) fail(path, cat("cannot save a tensor of shape ", t.shape_str(), " with no data"));
  Tensor converted;
  const void* data = t.data;
  if (n > 0 && !(t.dtype == DType::f32 && t.is_contiguous())) {
    converted = Tensor(DType::f32, t.rank, t.shape.data());
    copy_into(converted, t);
    data = converted.ptr<float>();
  }
  write_npy(path, "<f4", std::span<const int64_t>(t.shape.data(), static_cast<size_t>(t.rank)), data,
            static_cast<size_t>(n) * 4);
}

void save_npy_ids(const std::string& path, std::span<const int64_t> ids, std::span<const int64_t> shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  check(n == static_cast<int64_t>(ids.size()), path, ": ", ids.size(), " ids for shape ", shape_tuple(shape));
  write_npy(path, "<i8", shape, ids.data(), ids.size() * sizeof(int64_t));
}

}  // namespace ringattn
