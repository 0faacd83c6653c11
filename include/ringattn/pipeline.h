// Training and prefill steps over a Model: one stage (train_step) or the 1F1B
// pipeline over a PP group (pipeline_step).
#pragma once
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "ringattn/comm.h"
#include "ringattn/model.h"
#include "ringattn/optimizer.h"

namespace ringattn {

// One training step: forward, MSE loss, backward, all-reduce of loss and weight
// gradients over `reduce` (sum; the loss is normalised by the global element
// count, so the sum is the gradient of the global mean), AdamW. reduce may be
// null (one process) or a mesh's replica group (its world when tp = 1; the TP
// ranks of a group hold the same outputs, so each replica group counts every
// element once). Returns the loss.
double train_step(Model& m, AdamW& opt, const TensorView& x, const TensorView& target, const ModelParallel& par,
                  int64_t global_count, Communicator* reduce);

// The pipeline-parallel version over the stages of `pp` (this rank holds stage
// pp.rank()): x and target [B, Ll, D] are split into micro_batches along B and
// run with the 1F1B schedule (stage s does pp.size() − s − 1 forwards, then
// alternates one forward and one backward); activations and their gradients move
// between neighbouring stages. With train = false only the forwards run
// (inference/prefill) and the loss is still reported. Returns the loss on every
// stage.
double pipeline_step(Model& m, AdamW* opt, const TensorView& x, const TensorView& target, const ModelParallel& par,
                     Communicator& pp, int micro_batches, int64_t global_count, Communicator* reduce, bool train);

// What the pipeline's two ends do with micro-batch i (of Bm rows, Ll tokens):
// the first stage's input [Bm, Ll, D] (and, training, what happens to its
// gradient), the last stage's loss of the output y (writing dL/dy into dy).
struct PipelineEnds {
  std::function<DeviceTensor(int i)> input;
  std::function<void(int i, const TensorView& dx)> input_grad;  // may be empty
  std::function<double(int i, const TensorView& y, const TensorView& dy)> loss;
  // Packed rows (both may be empty, see model_forward): the RoPE positions of all
  // micro-batches' rows [B·Ll] and their documents [B], micro-batch i taking rows
  // i·Bm .. (i + 1)·Bm − 1.
  std::span<const int64_t> positions;
  std::span<const std::vector<int32_t>> documents;
};
// The 1F1B schedule alone over the stages of pp (train = false: the forwards):
// weight gradients are added into m.grads() (not zeroed, not reduced). Returns
// the summed loss of the micro-batches on the last stage, 0 on the others.
double pipeline_run(Model& m, const PipelineEnds& ends, const ModelParallel& par, Communicator& pp, int micro_batches,
                    int64_t Bm, int64_t Ll, bool train);

}  // namespace ringattn
