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
//   doc-balanced: documents kept whole where they fit, dealt zigzag where not
//               (document_owners): causal work balanced over the ranks, and only
//               the dealt documents span ranks; their chunks come first in each
//               shard, so that what travels is one range at its start.
// With L a multiple of P every shard of the first three is L/P tokens.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "ringattn/tensor.h"

namespace ringattn {

enum class Layout { contiguous, zigzag, striped, doc_zigzag, doc_balanced };
const char* layout_name(Layout l);
// Whether the layout deals the documents of cu_seqlens (doc-zigzag, doc-balanced).
inline bool by_documents(Layout l) { return l == Layout::doc_zigzag || l == Layout::doc_balanced; }
Layout parse_layout(const std::string& s);  // throws Error listing the valid names

// `cu` is the documents' offsets [n_docs + 1] (0 … L) for doc-zigzag and
// doc-balanced, ignored by the other layouts; empty: one document.
// Throws Error when some rank would hold no token (L < P, or for the document
// layouts documents too short to give every rank a token).
void check_layout(Layout l, int64_t L, int P, std::span<const int32_t> cu = {});
// doc-balanced's documents: owner[i] = the rank that holds document i whole, or
// −1 for a document dealt zigzag over every rank. Documents are taken longest
// first (ties: the earlier); with w = n(n+1)/2 the causal pairs of a document of
// n tokens and W = Σw / P the mean work per rank, a document goes whole to the
// least loaded rank (ties: the lowest) if that rank's work stays within W, else
// it is dealt and adds w/P to every rank (zigzag's two chunks of it).
std::vector<int> document_owners(std::span<const int32_t> cu, int P);
// How many tokens rank p holds.
int64_t shard_length(Layout l, int64_t L, int P, int p, std::span<const int32_t> cu = {});
// Global positions of rank p's tokens, in local order: ascending (doc-balanced:
// the dealt documents' tokens first, then the whole documents', each ascending).
std::vector<int64_t> shard_positions(Layout l, int64_t L, int P, int p, std::span<const int32_t> cu = {});

// Copies the tokens of rank p along dimension seq_dim of `full` (length L) into
// `local` (shard_length there, other dimensions equal).
void shard(const TensorView& full, const TensorView& local, Layout l, int P, int p, int seq_dim = 1,
           std::span<const int32_t> cu = {});
// The inverse: writes `local` of rank p into its places in `full`.
void unshard(const TensorView& local, const TensorView& full, Layout l, int P, int p, int seq_dim = 1,
             std::span<const int32_t> cu = {});

}  // namespace ringattn
