// Prefill + decode on a mesh with timings, shared by `ringattn generate` and the
// TPOT column of `ringattn compare`.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "ringattn/inference.h"
#include "ringattn/model.h"
#include "ringattn/parallel.h"

namespace ringattn::cli {

struct GenerationRun {
  double prefill_seconds = 0;        // all prompts, slowest rank
  std::vector<double> step_seconds;  // per decode step, slowest rank
  double prefill_bytes = 0;          // sent by the busiest rank during the prefill
  double step_bytes = 0;             // sent by the busiest rank per decode step (mean)
  double cache_bytes = 0;            // the largest per-rank KV cache
  std::vector<float> first_inputs;   // [B, D]: the output at each prompt's last position
  std::vector<float> outputs;        // [steps, B, D]: step j's output is step j + 1's input
};

// prompts[b]: the whole prompt of sequence b [1, L_b, D] (the same on every rank;
// each rank keeps its tokens). Prefills every sequence, then runs `steps` decode
// steps for all sequences at once, each fed the previous output. A short
// untimed warm-up run comes first. tick(j) is called before step j (progress).
// The run's world, mesh and ModelParallel carry the groups; m is this rank's slice.
GenerationRun run_generation(RunContext& run, const Model& m, const std::vector<Tensor>& prompts, int steps,
                             int64_t capacity, const std::function<void(int)>& tick = {});

// Median and 99th percentile (nearest rank) of xs.
double percentile(std::vector<double> xs, double p);

}  // namespace ringattn::cli
