// Sequence layouts: which global tokens each rank holds (see layout.h).
#include "ringattn/layout.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <queue>
#include <utility>

#include "ringattn/error.h"

namespace ringattn {

const char* layout_name(Layout l) {
  switch (l) {
    case Layout::contiguous:
      return "contiguous";
    case Layout::zigzag:
      return "zigzag";
    case Layout::striped:
      return "striped";
    case Layout::doc_zigzag:
      return "doc-zigzag";
    default:
      return "doc-balanced";
  }
}

Layout parse_layout(const std::string& s) {
  for (Layout l : {Layout::contiguous, Layout::zigzag, Layout::striped, Layout::doc_zigzag, Layout::doc_balanced})
    if (s == layout_name(l)) return l;
  throw Error(cat("unknown layout '", s, "': valid layouts are contiguous, zigzag, striped, doc-zigzag, doc-balanced"));
}

namespace {

// Tokens [lo, hi) of piece c when L is cut into n pieces whose sizes differ by at most one.
int64_t cut(int64_t L, int64_t n, int64_t c) { return c * L / n; }

// The tokens of rank p as runs [lo, hi) in ascending order, passed to f(lo, hi).
template <typename F>
void for_each_run(Layout l, int64_t L, int P, int p, std::span<const int32_t> cu, F f) {
  const int64_t n2 = 2 * static_cast<int64_t>(P);
  switch (l) {
    case Layout::contiguous:
      f(cut(L, P, p), cut(L, P, p + 1));
      break;
    case Layout::striped:
      for (int64_t i = p; i < L; i += P) f(i, i + 1);
      break;
    case Layout::zigzag:
      for (int64_t c : {static_cast<int64_t>(p), n2 - 1 - p}) f(cut(L, n2, c), cut(L, n2, c + 1));
      break;
    case Layout::doc_zigzag:
    case Layout::doc_balanced: {
      // The dealt documents' chunks first, then the documents held whole, each in
      // document order: what other ranks see then starts the block (the ring
      // sends one range of it).
      const size_t nd = cu.empty() ? 1 : cu.size() - 1;
      const std::vector<int> owner =
          l == Layout::doc_balanced && !cu.empty() ? document_owners(cu, P) : std::vector<int>(nd, -1);
      auto start = [&](size_t i) -> int64_t { return cu.empty() ? 0 : cu[i]; };
      auto end = [&](size_t i) -> int64_t { return cu.empty() ? L : cu[i + 1]; };
      for (size_t i = 0; i < nd; ++i)
        if (owner[i] < 0)
          for (int64_t c : {static_cast<int64_t>(p), n2 - 1 - p})
            f(start(i) + cut(end(i) - start(i), n2, c), start(i) + cut(end(i) - start(i), n2, c + 1));
      for (size_t i = 0; i < nd; ++i)
        if (owner[i] == p) f(start(i), end(i));
      break;
    }
  }
}

void check_documents(Layout l, int64_t L, std::span<const int32_t> cu) {
  if (!by_documents(l) || cu.empty()) return;
  check(cu.size() >= 2 && cu.front() == 0 && cu.back() == L, "the ", layout_name(l),
        " layout needs cu_seqlens from 0 to L=", L, " (got ", cu.size(), " offsets",
        cu.empty() ? "" : cat(" from ", cu.front(), " to ", cu.back()), ")");
  for (size_t i = 1; i < cu.size(); ++i)
    check(cu[i] >= cu[i - 1], "the ", layout_name(l), " layout needs non-decreasing cu_seqlens: cu_seqlens[", i,
          "] = ", cu[i], " < cu_seqlens[", i - 1, "] = ", cu[i - 1]);
}

}  // namespace

std::vector<int> document_owners(std::span<const int32_t> cu, int P) {
  check(P >= 1, "the number of ranks must be >= 1, got ", P);
  check_documents(Layout::doc_balanced, cu.empty() ? 0 : cu.back(), cu);
  // Every rank asks for every rank's shard: the last answer is kept per thread.
  thread_local std::vector<int32_t> last_cu;
  thread_local int last_P = 0;
  thread_local std::vector<int> last_owner;
  if (P == last_P && std::equal(cu.begin(), cu.end(), last_cu.begin(), last_cu.end())) return last_owner;
  const size_t nd = cu.empty() ? 0 : cu.size() - 1;
  // Work in units of 1/P pair: a whole document adds w·P to its rank, a dealt one w
  // to every rank, and a rank's share W is Σw (exact: w <= 2^61, P < 2^31).
  using Work = __int128;
  std::vector<Work> w(nd);
  Work total = 0;
  for (size_t i = 0; i < nd; ++i) {
    const Work n = cu[i + 1] - cu[i];
    total += w[i] = n * (n + 1) / 2;
  }
  std::vector<size_t> order(nd);
  for (size_t i = 0; i < nd; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return w[a] > w[b]; });
  // The ranks by their whole documents' work (then rank), least first; the dealt
  // documents add the same to every rank, kept apart in `dealt`.
  using Load = std::pair<Work, int>;
  std::priority_queue<Load, std::vector<Load>, std::greater<Load>> least;
  for (int r = 0; r < P; ++r) least.push({0, r});
  Work dealt = 0;
  std::vector<int> owner(nd, -1);
  for (size_t i : order) {
    const auto [whole, r] = least.top();
    if (whole + dealt + w[i] * P <= total) {
      least.pop();
      least.push({whole + w[i] * P, r});
      owner[i] = r;
    } else {
      dealt += w[i];
    }
  }
  last_cu.assign(cu.begin(), cu.end()), last_P = P, last_owner = owner;
  return owner;
}

int64_t shard_length(Layout l, int64_t L, int P, int p, std::span<const int32_t> cu) {
  if (l == Layout::striped) return p < L ? (L - p + P - 1) / P : 0;
  check_documents(l, L, cu);
  int64_t n = 0;
  for_each_run(l, L, P, p, cu, [&](int64_t lo, int64_t hi) { n += hi - lo; });
  return n;
}

void check_layout(Layout l, int64_t L, int P, std::span<const int32_t> cu) {
  check(P >= 1, "the number of ranks must be >= 1, got ", P);
  check(L >= 1, "the sequence length must be >= 1, got ", L);
  for (int p = 0; p < P; ++p)
    check(shard_length(l, L, P, p, cu) >= 1, "sequence length L=", L, " cannot be split over ", P, " ranks with the ",
          layout_name(l), " layout: rank ", p, " would hold no token (",
          by_documents(l) && !cu.empty() ? "its documents are too short to give every rank one"
                                         : cat("L must be at least ", P),
          ")");
}

std::vector<int64_t> shard_positions(Layout l, int64_t L, int P, int p, std::span<const int32_t> cu) {
  check_layout(l, L, P, cu);
  check(p >= 0 && p < P, "rank ", p, " is out of range for ", P, " ranks");
  std::vector<int64_t> pos;
  pos.reserve(static_cast<size_t>(shard_length(l, L, P, p, cu)));
  for_each_run(l, L, P, p, cu, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) pos.push_back(i);
  });
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

void check_pair(const TensorView& full, const TensorView& local, Layout l, int P, int p, int seq_dim,
                std::span<const int32_t> cu) {
  check(seq_dim >= 0 && seq_dim < full.rank, "sequence dimension ", seq_dim, " is out of range for ", full.shape_str());
  check(full.rank == local.rank, "full ", full.shape_str(), " and shard ", local.shape_str(), " differ in rank");
  check_layout(l, full.shape[seq_dim], P, cu);
  for (int i = 0; i < full.rank; ++i) {
    const int64_t want = i == seq_dim ? shard_length(l, full.shape[i], P, p, cu) : full.shape[i];
    check(local.shape[i] == want, "shard ", local.shape_str(), " does not fit full tensor ", full.shape_str(),
          " split over ", P, " ranks (", layout_name(l), ") along dimension ", seq_dim, ": rank ", p, " holds ",
          shard_length(l, full.shape[seq_dim], P, p, cu), " tokens");
  }
}

}  // namespace

void shard(const TensorView& full, const TensorView& local, Layout l, int P, int p, int seq_dim,
           std::span<const int32_t> cu) {
  check_pair(full, local, l, P, p, seq_dim, cu);
  const std::vector<int64_t> pos = shard_positions(l, full.shape[seq_dim], P, p, cu);
  for (size_t i = 0; i < pos.size(); ++i) copy_rows(full, pos[i], local, static_cast<int64_t>(i), seq_dim);
}

void unshard(const TensorView& local, const TensorView& full, Layout l, int P, int p, int seq_dim,
             std::span<const int32_t> cu) {
  check_pair(full, local, l, P, p, seq_dim, cu);
  const std::vector<int64_t> pos = shard_positions(l, full.shape[seq_dim], P, p, cu);
  for (size_t i = 0; i < pos.size(); ++i) copy_rows(local, static_cast<int64_t>(i), full, pos[i], seq_dim);
}

}  // namespace ringattn
