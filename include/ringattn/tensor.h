// Tensor views (pointer + shape + strides in elements + dtype) and owning tensors.
// Activations are [B, L, H, d] row-major; kernels take strides, so views of
// shards or heads need no copies.
#pragma once
#include <array>
#include <cstdint>
#include <initializer_list>
#include <random>
#include <string>

#include "ringattn/dtype.h"
#include "ringattn/memory.h"

namespace ringattn {

inline constexpr int kMaxRank = 6;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::f32;
  int rank = 0;
  std::array<int64_t, kMaxRank> shape{};
  std::array<int64_t, kMaxRank> strides{};  // in elements

  TensorView() = default;
  // Contiguous row-major view.
  TensorView(void* data, DType dtype, std::initializer_list<int64_t> shape);
  TensorView(void* data, DType dtype, int rank, const int64_t* shape, const int64_t* strides);

  int64_t dim(int i) const { return shape[i]; }
  int64_t stride(int i) const { return strides[i]; }
  int64_t numel() const;
  bool is_contiguous() const;
  bool empty() const { return data == nullptr; }
  std::string shape_str() const;  // "[2, 128, 8, 64]"
  template <typename T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
  // The view of indices [start, start + len) along dimension dim.
  TensorView slice(int dim, int64_t start, int64_t len) const;
  // The view at index i of dimension dim, with that dimension removed.
  TensorView select(int dim, int64_t i) const;
  // Offset (elements) of a multi-index.
  int64_t offset(std::initializer_list<int64_t> idx) const;
  float get(std::initializer_list<int64_t> idx) const { return load_as_f32(data, dtype, offset(idx)); }
  void set(std::initializer_list<int64_t> idx, float x) const { store_from_f32(data, dtype, offset(idx), x); }
};

// An owning, contiguous tensor.
class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, std::initializer_list<int64_t> shape);
  Tensor(DType dtype, int rank, const int64_t* shape);
  static Tensor zeros(DType dtype, std::initializer_list<int64_t> shape);

  const TensorView& view() const { return view_; }
  operator const TensorView&() const { return view_; }
  int64_t dim(int i) const { return view_.shape[i]; }
  int rank() const { return view_.rank; }
  int64_t numel() const { return view_.numel(); }
  DType dtype() const { return view_.dtype; }
  size_t bytes() const { return buf_.bytes(); }
  template <typename T>
  T* ptr() const {
    return view_.ptr<T>();
  }
  void fill_zero();

 private:
  Buffer buf_;
  TensorView view_;
};

// Same rank and extents (the entries of shape past the rank are not compared).
inline bool same_shape(const TensorView& a, const TensorView& b) {
  if (a.rank != b.rank) return false;
  for (int i = 0; i < a.rank; ++i)
    if (a.shape[i] != b.shape[i]) return false;
  return true;
}

// Copies src into dst elementwise (any strides, converting dtypes). Shapes must match.
void copy_into(const TensorView& dst, const TensorView& src);
// Largest |a - b| over all elements (0 where both are the same infinity; NaN if either has a NaN).
double max_abs_diff(const TensorView& a, const TensorView& b);
// True when every element is finite.
bool all_finite(const TensorView& t);

// Fills t with N(0, 1) samples from rng in element order, each rounded to t's
// dtype (generated inputs, weights for benchmarks).
void fill_normal(const TensorView& t, std::mt19937_64& rng);
// A new tensor of dtype and shape, filled by fill_normal.
Tensor random_normal(DType dtype, std::initializer_list<int64_t> shape, std::mt19937_64& rng);

}  // namespace ringattn
