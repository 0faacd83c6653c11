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

namespace {

// Tokens [lo, hi) of piece c when L is cut into n pieces whose sizes differ by at most one.
int64_t cut(int64_t L, int64_t n, int64_t c) { return c * L / n; }

}  // namespace

int64_t shard_length(Layout l, int64_t L, int P, int p) {
  switch (l) {
    case Layout::contiguous:
      return cut(L, P, p + 1) - cut(L, P, p);
    case Layout::striped:
      return p < L ? (L - p + P - 1) / P : 0;
    default: {
      const int64_t n = 2 * static_cast<int64_t>(P), q = 2 * static_cast<int64_t>(P) - 1 - p;
      return cut(L, n, p + 1) - cut(L, n, p) + cut(L, n, q + 1) - cut(L, n, q);
    }
  }
}

void check_layout(Layout l, int64_t L, int P) {
  check(P >= 1, "the number of ranks must be >= 1, got ", P);
  check(L >= 1, "the sequence length must be >= 1, got ", L);
  for (int p = 0; p < P; ++p)
    check(shard_length(l, L, P, p) >= 1, "sequence length L=", L, " cannot be split over ", P, " ranks with the ",
          layout_name(l), " layout: rank ", p, " would hold no token (L must be at least ", P, ")");
}

void check_even_layout(Layout l, int64_t L, int P, const char* what) {
  check_layout(l, L, P);
  if (L % P == 0) return;  // every layout then gives every rank L/P tokens (zigzag's chunks alternate)
  const int64_t lo = L / P * P, hi = lo + P;
  throw Error(cat(what, " needs equal shards: sequence length L=", L, " over ", P, " ranks (", layout_name(l),
                  ") must be a multiple of ", P, "; the nearest that work are ",
                  lo > 0 ? cat(lo, " and ") : std::string(), hi,
                  " (uneven shards are taken by `ringattn attention` and dist_attention so far)"));
}

std::vector<int64_t> shard_positions(Layout l, int64_t L, int P, int p) {
  check_layout(l, L, P);
  check(p >= 0 && p < P, "rank ", p, " is out of range for ", P, " ranks");
  std::vector<int64_t> pos;
  pos.reserve(static_cast<size_t>(shard_length(l, L, P, p)));
  switch (l) {
    case Layout::contiguous:
      for (int64_t i = cut(L, P, p); i < cut(L, P, p + 1); ++i) pos.push_back(i);
      break;
    case Layout::striped:
      for (int64_t i = p; i < L; i += P) pos.push_back(i);
      break;
    case Layout::zigzag: {
      const int64_t n = 2 * static_cast<int64_t>(P);
      for (int64_t c : {static_cast<int64_t>(p), n - 1 - p})
        for (int64_t i = cut(L, n, c); i < cut(L, n, c + 1); ++i) pos.push_back(i);
      break;
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

void check_pair(const TensorView& full, const TensorView& local, Layout l, int P, int p, int seq_dim) {
  check(seq_dim >= 0 && seq_dim < full.rank, "sequence dimension ", seq_dim, " is out of range for ", full.shape_str());
  check(full.rank == local.rank, "full ", full.shape_str(), " and shard ", local.shape_str(), " differ in rank");
  check_layout(l, full.shape[seq_dim], P);
  for (int i = 0; i < full.rank; ++i) {
    const int64_t want = i == seq_dim ? shard_length(l, full.shape[i], P, p) : full.shape[i];
    check(local.shape[i] == want, "shard ", local.shape_str(), " does not fit full tensor ", full.shape_str(),
          " split over ", P, " ranks (", layout_name(l), ") along dimension ", seq_dim, ": rank ", p, " holds ",
          shard_length(l, full.shape[seq_dim], P, p), " tokens");
  }
}

}  // namespace

void shard(const TensorView& full, const TensorView& local, Layout l, int P, int p, int seq_dim) {
  check_pair(full, local, l, P, p, seq_dim);
  const std::vector<int64_t> pos = shard_positions(l, full.shape[seq_dim], P, p);
  for (size_t i = 0; i < pos.size(); ++i) copy_rows(full, pos[i], local, static_cast<int64_t>(i), seq_dim);
}

void unshard(const TensorView& local, const TensorView& full, Layout l, int P, int p, int seq_dim) {
  check_pair(full, local, l, P, p, seq_dim);
  const std::vector<int64_t> pos = shard_positions(l, full.shape[seq_dim], P, p);
  for (size_t i = 0; i < pos.size(); ++i) copy_rows(local, static_cast<int64_t>(i), full, pos[i], seq_dim);
}

}  // namespace ringattn
