// Shared helpers of the unit tests: deterministic random fill, strided views inside
// larger (NaN-padded) buffers, element iteration and the error metric.
//
// Error metric used throughout the suite ("normalized max error"):
//
//     err(got, ref) = max_i |got_i - ref_i| / max(max_i |ref_i|, tiny)
//
// i.e. the largest absolute deviation measured in units of the largest reference
// magnitude of that tensor. It is insensitive to tiny individual reference values
// (where an elementwise relative error would blow up) and scale-free across
// tensors. Entries where the reference is -inf (lse of a row that sees no key)
// must be exactly -inf in `got` and are excluded from both maxima; any NaN, or any
// mismatch of infinities, makes the error +inf. Where a tensor is zero in exact
// arithmetic (e.g. dq with a single visible key, where ds ≡ 0) the denominator
// is instead a caller-given floor (see check_backward in attn_case.h).
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <ostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "ringattn/cpu/features.h"
#include "ringattn/dtype.h"
#include "ringattn/error.h"
#include "ringattn/tensor.h"

namespace ringattn::testing {

// Tolerances of the normalized metric above.
// fp32 storage: the kernel and the reference see identical inputs; the only
// differences are fp32 rounding of dot products, exp and the online-softmax
// rescaling (observed ~1e-6 at L = 300, d = 128 on every path).
inline constexpr double kTolF32 = 1e-5;
// bf16 storage: the reference runs on the bf16-rounded inputs, so the remaining
// error comes from rounding that the kernel may do internally (e.g. P = exp(S - m)
// to bf16 before P·V, 8 significant bits: 2^-9 ≈ 2e-3 relative per term) and from
// rounding the output itself to bf16 (2^-9). Observed ~2.5e-3; the bound is 2e-2.
inline constexpr double kTolBf16 = 2e-2;
// bf16 backward: gradients involve ds = p ∘ (dp − D), a difference of similar
// numbers, formed from the bf16-rounded o (so D differs by ~2^-9 relative) and
// possibly bf16 GEMM operands, then stored in bf16; observed ~3e-3, bound 3e-2.
inline constexpr double kTolBf16Bwd = 3e-2;
// fp16 storage: 11 significant bits (2^-12 ≈ 2.4e-4 per rounding), reference on
// the fp16-rounded inputs; observed ~3e-4 (output rounding), bound 2e-3.
inline constexpr double kTolF16 = 2e-3;

inline double tol_for(DType t) {
  switch (t) {
    case DType::f32:
      return kTolF32;
    case DType::bf16:
      return kTolBf16;
    default:
      return kTolF16;
  }
}

// ---------------------------------------------------------------------------
// Shapes and element iteration

inline int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

// Element offset (in elements) of a multi-index, computed from the view's strides
// directly (independent of the library's TensorView::offset).
inline int64_t offset_of(const TensorView& t, const int64_t* idx) {
  int64_t off = 0;
  for (int i = 0; i < t.rank; ++i) off += idx[i] * t.strides[i];
  return off;
}

// Calls fn(linear_index, element_offset) for every element in row-major order of
// the logical shape.
inline void for_each_element(const TensorView& t, const std::function<void(int64_t, int64_t)>& fn) {
  int64_t n = 1;
  for (int i = 0; i < t.rank; ++i) n *= t.shape[i];
  if (n == 0) return;
  std::array<int64_t, kMaxRank> idx{};
  for (int64_t lin = 0; lin < n; ++lin) {
    fn(lin, offset_of(t, idx.data()));
    for (int i = t.rank - 1; i >= 0; --i) {
      if (++idx[i] < t.shape[i]) break;
      idx[i] = 0;
    }
  }
}

inline float load(const TensorView& t, int64_t off) { return load_as_f32(t.data, t.dtype, off); }

// Logical row-major contents as doubles.
inline std::vector<double> to_double(const TensorView& t) {
  std::vector<double> out;
  int64_t n = 1;
  for (int i = 0; i < t.rank; ++i) n *= t.shape[i];
  out.resize(static_cast<size_t>(n));
  for_each_element(t, [&](int64_t lin, int64_t off) { out[lin] = load(t, off); });
  return out;
}

// Builds a rank-r view from a shape and explicit strides.
inline TensorView make_view(void* data, DType dt, const std::vector<int64_t>& shape,
                            const std::vector<int64_t>& strides) {
  return TensorView(data, dt, static_cast<int>(shape.size()), shape.data(), strides.data());
}

// Row-major strides of a shape.
inline std::vector<int64_t> row_major_strides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> st(shape.size(), 1);
  for (int i = static_cast<int>(shape.size()) - 2; i >= 0; --i) st[i] = st[i + 1] * shape[i + 1];
  return st;
}

// ---------------------------------------------------------------------------
// Owning test tensors: an owning contiguous buffer and a (possibly strided) view
// into it. With padding, the view is the interior of a larger buffer whose other
// elements hold a sentinel (NaN for inputs, so any out-of-view read shows up as
// NaN in the results; check_padding() verifies outputs never write there).

struct TestTensor {
  TestTensor() = default;
  TestTensor(TestTensor&&) = default;  // the heap block (and so `view`) stays put
  TestTensor& operator=(TestTensor&&) = default;
  TestTensor(const TestTensor&) = delete;
  TestTensor& operator=(const TestTensor&) = delete;

  std::vector<unsigned char> storage;  // raw bytes of the whole allocation
  DType dtype = DType::f32;
  std::vector<int64_t> full_shape;  // shape of the whole allocation
  TensorView view;                  // the logical tensor
  const TensorView& operator*() const { return view; }
  operator const TensorView&() const { return view; }
};

inline float quiet_nan() { return std::numeric_limits<float>::quiet_NaN(); }

// A tensor of `shape`, embedded in a row-major buffer of shape
// shape[i] + pad_front[i] + pad[i]; every element outside the view holds
// `sentinel`. The last dimension keeps unit stride (padding it just makes the rows
// longer than the view).
inline TestTensor make_tensor(DType dt, const std::vector<int64_t>& shape, std::vector<int64_t> pad = {},
                              std::vector<int64_t> pad_front = {}, float sentinel = quiet_nan()) {
  TestTensor t;
  t.dtype = dt;
  pad.resize(shape.size(), 0);
  pad_front.resize(shape.size(), 0);
  t.full_shape.resize(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) t.full_shape[i] = shape[i] + pad[i] + pad_front[i];
  const int64_t n = std::max<int64_t>(numel_of(t.full_shape), 1);
  t.storage.assign(static_cast<size_t>(n * static_cast<int64_t>(dtype_size(dt))) + 64, 0);
  // 64-byte align the start of the allocation (the std::vector is over-allocated).
  auto* base = t.storage.data();
  const auto mis = reinterpret_cast<uintptr_t>(base) % 64;
  unsigned char* aligned = base + (mis ? 64 - mis : 0);
  for (int64_t i = 0; i < n; ++i) store_from_f32(aligned, dt, i, sentinel);
  const auto st = row_major_strides(t.full_shape);
  int64_t first = 0;
  for (size_t i = 0; i < shape.size(); ++i) first += pad_front[i] * st[i];
  t.view = make_view(aligned + first * static_cast<int64_t>(dtype_size(dt)), dt, shape, st);
  return t;
}

// The aligned start of the whole allocation of a TestTensor.
inline unsigned char* alloc_start(const TestTensor& t) {
  auto* base = const_cast<unsigned char*>(t.storage.data());
  const auto mis = reinterpret_cast<uintptr_t>(base) % 64;
  return base + (mis ? 64 - mis : 0);
}

// Number of allocation elements outside the view whose value is not the sentinel
// (NaN sentinel: not NaN). Used to check that outputs are written only in-view.
inline int64_t count_padding_changes(const TestTensor& t, float sentinel = quiet_nan()) {
  const int64_t n = numel_of(t.full_shape);
  std::vector<char> inside(static_cast<size_t>(n), 0);
  const auto* start = alloc_start(t);
  const int64_t base_off =
      (static_cast<const unsigned char*>(t.view.data) - start) / static_cast<int64_t>(dtype_size(t.dtype));
  for_each_element(t.view, [&](int64_t, int64_t off) { inside[base_off + off] = 1; });
  int64_t changed = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (inside[i]) continue;
    const float x = load_as_f32(start, t.dtype, i);
    const bool same = std::isnan(sentinel) ? std::isnan(x) : x == sentinel;
    if (!same) ++changed;
  }
  return changed;
}

// Fills every element of the view with U(lo, hi) (rounded to the view's dtype).
inline void fill_uniform(const TensorView& t, uint32_t seed, float lo = -1.f, float hi = 1.f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  for_each_element(t, [&](int64_t, int64_t off) { store_from_f32(t.data, t.dtype, off, dist(rng)); });
}

// Fills every element of the view with N(0, sigma²).
inline void fill_normal(const TensorView& t, uint32_t seed, float sigma = 1.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.f, sigma);
  for_each_element(t, [&](int64_t, int64_t off) { store_from_f32(t.data, t.dtype, off, dist(rng)); });
}

inline void fill_value(const TensorView& t, float x) {
  for_each_element(t, [&](int64_t, int64_t off) { store_from_f32(t.data, t.dtype, off, x); });
}

// Copies the logical contents of src into dst elementwise (test-side, no library).
inline void copy_elements(const TensorView& dst, const TensorView& src) {
  std::vector<double> v = to_double(src);
  for_each_element(
      dst, [&](int64_t lin, int64_t off) { store_from_f32(dst.data, dst.dtype, off, static_cast<float>(v[lin])); });
}

// ---------------------------------------------------------------------------
// Error metric

struct ErrReport {
  double err = 0;      // normalized max error (see top of file)
  double max_abs = 0;  // max |got - ref|
  double max_ref = 0;  // max |ref|
  int64_t worst = -1;  // linear index of the worst element
  double got_w = 0, ref_w = 0;
  std::string problem;  // non-empty: NaN / infinity mismatch description
};

inline std::ostream& operator<<(std::ostream& os, const ErrReport& r) {
  os << "normalized err " << r.err << " (max|diff| " << r.max_abs << ", max|ref| " << r.max_ref;
  if (r.worst >= 0) os << ", worst at " << r.worst << ": got " << r.got_w << " ref " << r.ref_w;
  os << ")";
  if (!r.problem.empty()) os << " " << r.problem;
  return os;
}

inline ErrReport compare(const std::vector<double>& got, const std::vector<double>& ref, double floor = 1e-30) {
  ErrReport r;
  if (got.size() != ref.size()) {
    r.err = std::numeric_limits<double>::infinity();
    r.problem = "size mismatch";
    return r;
  }
  for (size_t i = 0; i < ref.size(); ++i) {
    const double g = got[i], e = ref[i];
    if (std::isnan(g) || std::isnan(e)) {
      if (r.problem.empty()) r.problem = cat("NaN at ", i, " (got ", g, ", ref ", e, ")");
      continue;
    }
    if (std::isinf(e) || std::isinf(g)) {
      if (g != e && r.problem.empty()) r.problem = cat("infinity mismatch at ", i, " (got ", g, ", ref ", e, ")");
      continue;
    }
    r.max_ref = std::max(r.max_ref, std::abs(e));
    const double d = std::abs(g - e);
    if (d > r.max_abs || r.worst < 0) {
      r.max_abs = std::max(r.max_abs, d);
      r.worst = static_cast<int64_t>(i);
      r.got_w = g;
      r.ref_w = e;
    }
  }
  r.err = r.problem.empty() ? r.max_abs / std::max(r.max_ref, floor) : std::numeric_limits<double>::infinity();
  return r;
}

inline ErrReport compare(const TensorView& got, const std::vector<double>& ref, double floor = 1e-30) {
  return compare(to_double(got), ref, floor);
}
inline ErrReport compare(const TensorView& got, const TensorView& ref) {
  return compare(to_double(got), to_double(ref));
}

// EXPECT that `got` matches `ref` within `tol` (normalized), with a useful message.
#define RA_EXPECT_CLOSE(got, ref, tol, what)                                                   \
  do {                                                                                         \
    const ::ringattn::testing::ErrReport ra_rep_ = ::ringattn::testing::compare((got), (ref)); \
    EXPECT_LE(ra_rep_.err, (tol)) << (what) << ": " << ra_rep_;                                \
  } while (0)
// The same with a floor under the normalizing magnitude.
#define RA_EXPECT_CLOSE_FLOOR(got, ref, tol, floor, what)                                               \
  do {                                                                                                  \
    const ::ringattn::testing::ErrReport ra_rep_ = ::ringattn::testing::compare((got), (ref), (floor)); \
    EXPECT_LE(ra_rep_.err, (tol)) << (what) << ": " << ra_rep_;                                         \
  } while (0)

// Bitwise equality of the logical contents of two views of the same dtype/shape.
inline bool bitwise_equal(const TensorView& a, const TensorView& b) {
  if (a.rank != b.rank || a.dtype != b.dtype) return false;
  for (int i = 0; i < a.rank; ++i)
    if (a.shape[i] != b.shape[i]) return false;
  const size_t es = dtype_size(a.dtype);
  std::vector<int64_t> offs;
  for_each_element(b, [&](int64_t, int64_t off) { offs.push_back(off); });
  bool eq = true;
  for_each_element(a, [&](int64_t lin, int64_t off) {
    if (!eq) return;
    const auto* pa = static_cast<const unsigned char*>(a.data) + off * static_cast<int64_t>(es);
    const auto* pb = static_cast<const unsigned char*>(b.data) + offs[lin] * static_cast<int64_t>(es);
    if (std::memcmp(pa, pb, es) != 0) eq = false;
  });
  return eq;
}

inline bool any_nan(const TensorView& t) {
  bool bad = false;
  for_each_element(t, [&](int64_t, int64_t off) { bad |= std::isnan(load(t, off)); });
  return bad;
}

inline bool any_nonfinite(const TensorView& t) {
  bool bad = false;
  for_each_element(t, [&](int64_t, int64_t off) { bad |= !std::isfinite(load(t, off)); });
  return bad;
}

// Case-insensitive "message contains any of these".
inline bool contains_any(const std::string& msg, std::initializer_list<const char*> needles) {
  std::string m = msg;
  std::transform(m.begin(), m.end(), m.begin(), [](unsigned char c) { return std::tolower(c); });
  for (const char* n : needles) {
    std::string s = n;
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
    if (m.find(s) != std::string::npos) return true;
  }
  return false;
}

// The message of the ringattn::Error f throws, or "(no error)".
inline std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// A fresh directory per test under the system's temporary directory, removed after.
class ScratchDir : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = std::filesystem::temp_directory_path() /
           cat("ringattn_", info->test_suite_name(), "_", ::getpid(), "_", info->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  std::string dir() const { return dir_.string(); }
  std::filesystem::path dir_;
};

// Positions helpers.
inline std::vector<int64_t> iota_pos(int64_t n, int64_t start = 0, int64_t step = 1) {
  std::vector<int64_t> p(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) p[i] = start + i * step;
  return p;
}

}  // namespace ringattn::testing

namespace ringattn {
// GoogleTest prints Isa parameters by name.
// Every value of enum class Isa (keep in sync with include/ringattn/cpu/features.h).
inline const std::vector<Isa>& all_isas() {
  static const std::vector<Isa> v{Isa::generic, Isa::avx2, Isa::avx512, Isa::avx512_bf16, Isa::amx_bf16};
  return v;
}

inline void PrintTo(Isa i, std::ostream* os) { *os << isa_name(i); }
}  // namespace ringattn
