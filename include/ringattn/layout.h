// How a sequence of L tokens is split over P ranks (docs/design.md §6 "causal load
// balance"). Every rank holds L/P tokens and knows their global positions.
//   contiguous: rank p holds [p·L/P, (p+1)·L/P)
//   zigzag:     L cut into 2P chunks; rank p holds chunks p and 2P−1−p
//   striped:    token i on rank i mod P
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "ringattn/tensor.h"

namespace ringattn {

enum class Layout { contiguous, zigzag, striped };
const char* layout_name(Layout l);
Layout parse_layout(const std::string& s);  // throws Error listing the valid names

// Throws Error when L cannot be split over P ranks in this layout, saying which
// L values work (multiples of P, or of 2P for zigzag) and the nearest ones.
void check_layout(Layout l, int64_t L, int P);
// Global positions of the L/P tokens of rank p, in local order (ascending).
std::vector<int64_t> shard_positions(Layout l, int64_t L, int P, int p);

// Copies the tokens of rank p along dimension seq_dim of `full` (length L) into
// `local` (length L/P there, other dimensions equal).
void shard(const TensorView& full, const TensorView& local, Layout l, int P, int p, int seq_dim = 1);
// The inverse: writes `local` of rank p into its places in `full`.
void unshard(const TensorView& local, const TensorView& full, Layout l, int P, int p, int seq_dim = 1);

}  // namespace ringattn
