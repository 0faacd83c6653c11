// Sequence layouts: which global tokens each rank holds (see layout.h).
#include "ringattn/layout.h"

#include <cstring>

#include "ringattn/error.h"

namespace ringattn {

const char* layout_name(Layout l) {
  switch (l) {
    case Layout::contiguous:
      return "contiguous";
    case Layout::zigzag:
      return "zigzag";
    default:
      return "striped";
  }
}

Layout parse_layout(const std::string& s) {
  for (Layout l : {Layout::contiguous, Layout::zigzag, Layout::striped})
    if (s == layout_name(l)) return l;
  throw Error(cat("unknown layout '", s, "': valid layouts are contiguous, zigzag, striped"));
}

void check_layout(Layout l, int64_t L, int P) {
  check(P >= 1, "the number of ranks must be >= 1, got ", P);
  check(L >= 1, "the sequence length must be >= 1, got ", L);
  const int64_t m = l == Layout::zigzag ? 2 * static_cast<int64_t>(P) : P;
  if (L % m == 0) return;
  const int64_t lo = L / m * m, hi = lo + m;
  throw Error(cat("sequence length L=", L, " cannot be split over ", P, " ranks with the ", layout_name(l),
                  " layout: L must be a multiple of ", m, l == Layout::zigzag ? " (2P chunks)" : " (P ranks)",
                  "; the nearest that work are ", lo > 0 ? cat(lo, " and ") : std::string(), hi));
}

std::vector<int64_t> shard_positions(Layout l, int64_t L, int P, int p) {
  check_layout(l, L, P);
  check(p >= 0 && p < P, "rank ", p, " is out of range for ", P, " ranks");
  const int64_t n = L / P;
  std::vector<int64_t> pos(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    switch (l) {
      case Layout::contiguous:
        pos[i] = p * n + i;
        break;
      case Layout::striped:
        pos[i] = i * P + p;
        break;
      case Layout::zigzag: {
        const int64_t c = L / (2 * P);  // chunk length
        pos[i] = i < c ? p * c + i : (2 * P - 1 - p) * c + (i - c);
        break;
      }
    }
  }
  return pos;
}

namespace {

// Copies row `from` of a (along seq_dim) to row `to` of b; every other dimension
// is walked in full. Both views have the same rank and non-sequence extents.
void copy_rows(const TensorView& src, int64_t from, const TensorView& dst, int64_t to, int seq_dim) {
  TensorView s = src, d = dst;
  const size_t es_s = dtype_size(src.dtype), es_d = dtype_size(dst.dtype);
  s.data = static_cast<char*>(src.data) + from * src.strides[seq_dim] * es_s;
  d.data = static_cast<char*>(dst.data) + to * dst.strides[seq_dim] * es_d;
  s.shape[seq_dim] = d.shape[seq_dim] = 1;
  copy_into(d, s);
}

void check_pair(const TensorView& full, const TensorView& local, int P, int seq_dim) {
  check(seq_dim >= 0 && seq_dim < full.rank, "sequence dimension ", seq_dim, " is out of range for ", full.shape_str());
  check(full.rank == local.rank, "full ", full.shape_str(), " and shard ", local.shape_str(), " differ in rank");
  for (int i = 0; i < full.rank; ++i) {
    const int64_t want = i == seq_dim ? full.shape[i] / P : full.shape[i];
    check(local.shape[i] == want && (i != seq_dim || full.shape[i] % P == 0), "shard ", local.shape_str(),
          " does not fit full tensor ", full.shape_str(), " split over ", P, " ranks along dimension ", seq_dim);
  }
}

}  // namespace

void shard(const TensorView& full, const TensorView& local, Layout l, int P, int p, int seq_dim) {
  check_pair(full, local, P, seq_dim);
  const std::vector<int64_t> pos = shard_positions(l, full.shape[seq_dim], P, p);
  for (size_t i = 0; i < pos.size(); ++i) copy_rows(full, pos[i], local, static_cast<int64_t>(i), seq_dim);
}

void unshard(const TensorView& local, const TensorView& full, Layout l, int P, int p, int seq_dim) {
  check_pair(full, local, P, seq_dim);
  const std::vector<int64_t> pos = shard_positions(l, full.shape[seq_dim], P, p);
  for (size_t i = 0; i < pos.size(); ++i) copy_rows(local, static_cast<int64_t>(i), full, pos[i], seq_dim);
}

}  // namespace ringattn
