// How a sequence of L tokens is split over P ranks (docs/design.md §6 "causal load
// balance"), for any L >= P. Every rank knows the global positions of its tokens.
//   contiguous: rank p holds [⌊p·L/P⌋, ⌊(p+1)·L/P⌋) (shards differ by at most one)
//   zigzag:     L cut into 2P chunks [⌊c·L/2P⌋, ⌊(c+1)·L/2P⌋); rank p holds
//               chunks p and 2P−1−p
//   striped:    token i on rank i mod P
// With L a multiple of P every shard is L/P tokens.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "ringattn/tensor.h"

namespace ringattn {

enum class Layout { contiguous, zigzag, striped };
const char* layout_name(Layout l);
Layout parse_layout(const std::string& s);  // throws Error listing the valid names

// Throws Error when some rank would hold no token (L < P).
void check_layout(Layout l, int64_t L, int P);
// The same, and that every shard is L/P tokens (L a multiple of P, in every
// layout: zigzag's chunks then alternate ⌊L/2P⌋ and ⌈L/2P⌉ and pair up),
// naming `what` needs it and the nearest lengths that work: for the parts that
// take equal shards only (the model, generation).
void check_even_layout(Layout l, int64_t L, int P, const char* what);
// How many tokens rank p holds.
int64_t shard_length(Layout l, int64_t L, int P, int p);
// Global positions of rank p's tokens, in local order (ascending).
std::vector<int64_t> shard_positions(Layout l, int64_t L, int P, int p);

// Copies the tokens of rank p along dimension seq_dim of `full` (length L) into
// `local` (shard_length there, other dimensions equal).
void shard(const TensorView& full, const TensorView& local, Layout l, int P, int p, int seq_dim = 1);
// The inverse: writes `local` of rank p into its places in `full`.
void unshard(const TensorView& local, const TensorView& full, Layout l, int P, int p, int seq_dim = 1);

}  // namespace ringattn
