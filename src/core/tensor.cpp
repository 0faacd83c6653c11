// Tensor views and owning tensors: construction, layout queries, and the generic
// strided element loops (copy with dtype conversion, comparison, finiteness).
#include "ringattn/tensor.h"

#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "ringattn/error.h"

namespace ringattn {
namespace {

std::string dims_str(int rank, const int64_t* shape) {
  std::string s = "[";
  for (int i = 0; i < rank; ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

void check_rank(int64_t rank) {
  check(rank >= 0 && rank <= kMaxRank, "tensor rank ", rank, " is out of range: ringattn supports ranks 0 to ",
        kMaxRank, " (kMaxRank)");
}

int list_rank(std::initializer_list<int64_t> shape) {
  check_rank(static_cast<int64_t>(shape.size()));
  return static_cast<int>(shape.size());
}

void check_dims(int rank, const int64_t* shape) {
  for (int i = 0; i < rank; ++i)
    if (shape[i] < 0) throw Error(cat("tensor shape ", dims_str(rank, shape), " has a negative dimension"));
}

void check_same_shape(const TensorView& a, const TensorView& b, const char* what, const char* a_name,
                      const char* b_name) {
  bool same = a.rank == b.rank;
  for (int i = 0; same && i < a.rank; ++i) same = a.shape[i] == b.shape[i];
  if (!same)
    throw Error(cat(what, ": shape mismatch: ", a_name, " is ", a.shape_str(), " but ", b_name, " is ", b.shape_str()));
}

void check_has_data(const TensorView& t, const char* what, const char* name) {
  if (t.data == nullptr && t.numel() != 0)
    throw Error(cat(what, ": ", name, " of shape ", t.shape_str(), " has no data (an empty view)"));
}

// Walks every element of views that share v[0]'s shape, one innermost row at a
// time: f(base offsets, row length, innermost strides), offsets in elements.
template <size_t N, typename F>
void for_each_row(const std::array<const TensorView*, N>& v, F&& f) {
  const TensorView& s = *v[0];
  if (s.numel() == 0) return;
  std::array<int64_t, N> base{}, inner{};
  if (s.rank == 0) {
    inner.fill(1);
    f(base, int64_t{1}, inner);
    return;
  }
  const int last = s.rank - 1;
  for (size_t k = 0; k < N; ++k) inner[k] = v[k]->strides[last];
  std::array<int64_t, kMaxRank> idx{};
  for (;;) {
    f(base, s.shape[last], inner);
    int d = last - 1;
    for (; d >= 0; --d) {
      if (++idx[d] < s.shape[d]) {
        for (size_t k = 0; k < N; ++k) base[k] += v[k]->strides[d];
        break;
      }
      for (size_t k = 0; k < N; ++k) base[k] -= (s.shape[d] - 1) * v[k]->strides[d];
      idx[d] = 0;
    }
    if (d < 0) return;
  }
}

}  // namespace

// ---- TensorView ----------------------------------------------------------------

TensorView::TensorView(void* data_, DType dtype_, std::initializer_list<int64_t> shape_)
    : TensorView(data_, dtype_, list_rank(shape_), shape_.begin(), nullptr) {}

// strides == nullptr means contiguous row-major.
TensorView::TensorView(void* data_, DType dtype_, int rank_, const int64_t* shape_, const int64_t* strides_)
    : data(data_), dtype(dtype_), rank(rank_) {
  check_rank(rank_);
  for (int i = 0; i < rank; ++i) shape[i] = shape_[i];
  check_dims(rank, shape.data());
  int64_t s = 1;
  for (int k = rank - 1; k >= 0; --k) {
    strides[k] = strides_ ? strides_[k] : s;
    s *= shape[k];
  }
}

TensorView TensorView::slice(int dim, int64_t start, int64_t len) const {
  check(dim >= 0 && dim < rank, "slice: dimension ", dim, " out of range for ", shape_str());
  check(start >= 0 && len >= 0 && start + len <= shape[dim], "slice [", start, ", ", start + len, ") of dimension ",
        dim, " is out of range for ", shape_str());
  TensorView v = *this;
  v.data = static_cast<char*>(data) + start * strides[dim] * static_cast<int64_t>(dtype_size(dtype));
  v.shape[dim] = len;
  return v;
}

TensorView TensorView::select(int dim, int64_t i) const {
  TensorView v = slice(dim, i, 1);
  for (int j = dim; j + 1 < rank; ++j) {
    v.shape[j] = v.shape[j + 1];
    v.strides[j] = v.strides[j + 1];
  }
  --v.rank;
  v.shape[v.rank] = v.strides[v.rank] = 0;  // entries past the rank stay zero, as in a new view
  return v;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int i = 0; i < rank; ++i) n *= shape[i];
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t expected = 1;
  for (int i = rank - 1; i >= 0; --i) {
    if (shape[i] == 0) return true;
    if (shape[i] != 1 && strides[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

std::string TensorView::shape_str() const { return dims_str(rank, shape.data()); }

int64_t TensorView::offset(std::initializer_list<int64_t> idx) const {
  if (static_cast<int>(idx.size()) != rank)
    throw Error(cat("tensor index has ", idx.size(), " coordinates but the tensor has rank ", rank, " (shape ",
                    shape_str(), ")"));
  int64_t off = 0;
  int i = 0;
  for (int64_t x : idx) {
    if (x < 0 || x >= shape[i]) {
      std::array<int64_t, kMaxRank> at{};
      int j = 0;
      for (int64_t y : idx) at[j++] = y;
      throw Error(cat("tensor index ", dims_str(rank, at.data()), " is out of range for shape ", shape_str()));
    }
    off += x * strides[i++];
  }
  return off;
}

// ---- Tensor --------------------------------------------------------------------

Tensor::Tensor(DType dtype, std::initializer_list<int64_t> shape) : Tensor(dtype, list_rank(shape), shape.begin()) {}

Tensor::Tensor(DType dtype, int rank, const int64_t* shape) : view_(nullptr, dtype, rank, shape, nullptr) {
  int64_t bytes = static_cast<int64_t>(dtype_size(dtype));
  for (int i = 0; i < rank; ++i)
    if (__builtin_mul_overflow(bytes, shape[i], &bytes))
      throw Error(cat("tensor of shape ", view_.shape_str(), " is too large to allocate"));
  buf_ = Buffer(static_cast<size_t>(bytes));
  view_.data = buf_.data();
}

Tensor Tensor::zeros(DType dtype, std::initializer_list<int64_t> shape) {
  Tensor t(dtype, shape);
  t.fill_zero();
  return t;
}

// All-zero bits are +0.0 in fp32, bf16 and fp16 alike.
void Tensor::fill_zero() {
  if (buf_.data()) std::memset(buf_.data(), 0, buf_.bytes());
}

// ---- element loops -------------------------------------------------------------

// dst, src: the same shape, any strides and dtypes.
void copy_into(const TensorView& dst, const TensorView& src) {
  check_same_shape(dst, src, "copy_into", "destination", "source");
  const int64_t n = dst.numel();
  if (n == 0) return;
  check_has_data(dst, "copy_into", "destination");
  check_has_data(src, "copy_into", "source");
  const size_t es = dtype_size(dst.dtype);
  if (dst.dtype == src.dtype && dst.is_contiguous() && src.is_contiguous()) {
    std::memmove(dst.data, src.data, static_cast<size_t>(n) * es);
    return;
  }
  if (dst.dtype == src.dtype) {  // same dtype: move bytes, never round-trip through fp32
    auto* d = static_cast<char*>(dst.data);
    const auto* s = static_cast<const char*>(src.data);
    for_each_row<2>({&dst, &src}, [&](const auto& base, int64_t len, const auto& inner) {
      if (inner[0] == 1 && inner[1] == 1) {
        std::memmove(d + base[0] * es, s + base[1] * es, static_cast<size_t>(len) * es);
        return;
      }
      for (int64_t i = 0; i < len; ++i)
        std::memcpy(d + (base[0] + i * inner[0]) * es, s + (base[1] + i * inner[1]) * es, es);
    });
    return;
  }
  for_each_row<2>({&dst, &src}, [&](const auto& base, int64_t len, const auto& inner) {
    for (int64_t i = 0; i < len; ++i)
      store_from_f32(dst.data, dst.dtype, base[0] + i * inner[0],
                     load_as_f32(src.data, src.dtype, base[1] + i * inner[1]));
  });
}

// a, b: the same shape. Equal values (including equal infinities, e.g. the -inf
// LSE of fully masked rows) differ by 0; any NaN makes the result NaN.
double max_abs_diff(const TensorView& a, const TensorView& b) {
  check_same_shape(a, b, "max_abs_diff", "a", "b");
  if (a.numel() == 0) return 0.0;
  check_has_data(a, "max_abs_diff", "a");
  check_has_data(b, "max_abs_diff", "b");
  double worst = 0.0;
  bool nan = false;
  for_each_row<2>({&a, &b}, [&](const auto& base, int64_t len, const auto& inner) {
    for (int64_t i = 0; i < len && !nan; ++i) {
      const double x = load_as_f32(a.data, a.dtype, base[0] + i * inner[0]);
      const double y = load_as_f32(b.data, b.dtype, base[1] + i * inner[1]);
      if (x == y) continue;
      const double d = std::fabs(x - y);
      if (std::isnan(d))
        nan = true;
      else if (d > worst)
        worst = d;
    }
  });
  return nan ? std::numeric_limits<double>::quiet_NaN() : worst;
}

bool all_finite(const TensorView& t) {
  if (t.numel() == 0) return true;
  check_has_data(t, "all_finite", "tensor");
  bool ok = true;
  for_each_row<1>({&t}, [&](const auto& base, int64_t len, const auto& inner) {
    for (int64_t i = 0; i < len && ok; ++i) ok = std::isfinite(load_as_f32(t.data, t.dtype, base[0] + i * inner[0]));
  });
  return ok;
}

void fill_normal(const TensorView& t, std::mt19937_64& rng) {
  check(t.is_contiguous(), "fill_normal needs a contiguous tensor, got ", t.shape_str());
  std::normal_distribution<float> dist(0.f, 1.f);
  for (int64_t i = 0; i < t.numel(); ++i) store_from_f32(t.data, t.dtype, i, dist(rng));
}

Tensor random_normal(DType dtype, std::initializer_list<int64_t> shape, std::mt19937_64& rng) {
  Tensor t(dtype, shape);
  fill_normal(t, rng);
  return t;
}

}  // namespace ringattn
