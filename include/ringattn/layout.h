// How a sequence of L tokens is split over P ranks (docs/design.md §6 "causal load
// balance"), for any L >= P. Every rank knows the global positions of its tokens.
//   contiguous: rank p holds [⌊p·L/P⌋, ⌊(p+1)·L/P⌋) (shards differ by at most one)
//   zigzag:     L cut into 2P chunks [⌊c·L/2P⌋, ⌊(c+1)·L/2P⌋); rank p holds
//               chunks p and 2P−1−p
//   striped:    token i on rank i mod P
//   doc-zigzag: zigzag inside each document of cu_seqlens: a document of n
//               tokens cut into 2P chunks [⌊c·n/2P⌋, ⌊(c+1)·n/2P⌋); rank p holds
//               chunks p and 2P−1−p of every document (without documents: zigzag).
//               Balances causal work document by document; every document then
//               spans every rank.
// With L a multiple of P every shard of the first three is L/P tokens.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "ringattn/tensor.h"

namespace ringattn {

enum class Layout { contiguous, zigzag, striped, doc_zigzag };
const char* layout_name(Layout l);
Layout parse_layout(const std::string& s);  // throws Error listing the valid names

// `cu` is the documents' offsets [n_docs + 1] (0 … L) for doc-zigzag, ignored by
// the other layouts; empty: one document.
// Throws Error when some rank would hold no token (L < P, or for doc-zigzag
// documents too short to give every rank a token).
void check_layout(Layout l, int64_t L, int P, std::span<const int32_t> cu = {});
// The same, and that every shard is L/P tokens (L a multiple of P, in every
// layout: zigzag's chunks then alternate ⌊L/2P⌋ and ⌈L/2P⌉ and pair up),
// naming `what` needs it and the nearest lengths that work: for the parts that
// take equal shards only (the model, generation).
void check_even_layout(Layout l, int64_t L, int P, const char* what);
// How many tokens rank p holds.
int64_t shard_length(Layout l, int64_t L, int P, int p, std::span<const int32_t> cu = {});
// Global positions of rank p's tokens, in local order (ascending).
std::vector<int64_t> shard_positions(Layout l, int64_t L, int P, int p, std::span<const int32_t> cu = {});

// Copies the tokens of rank p along dimension seq_dim of `full` (length L) into
// `local` (shard_length there, other dimensions equal).
void shard(const TensorView& full, const TensorView& local, Layout l, int P, int p, int seq_dim = 1,
           std::span<const int32_t> cu = {});
// The inverse: writes `local` of rank p into its places in `full`.
void unshard(const TensorView& local, const TensorView& full, Layout l, int P, int p, int seq_dim = 1,
             std::span<const int32_t> cu = {});

}  // namespace ringattn
