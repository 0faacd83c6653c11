// A training step on one process or a replica group, and the 1F1B pipeline
// schedule over the stages of a mesh's PP group.
#include "ringattn/pipeline.h"

#include <algorithm>
#include <vector>

#include "ringattn/error.h"

namespace ringattn {

double train_step(Model& m, AdamW& opt, const TensorView& x, const TensorView& target, const ModelParallel& par,
                  int64_t global_count, Communicator* reduce) {
  Activations act;
  Device& dev = m.device();
  DeviceTensor y = model_forward(m, x, par, act);
  DeviceTensor dy = dev.alloc(DType::f32, {y.dim(0), y.dim(1), y.dim(2)});
  const double loss = mse_loss(y, target, dy, reduce, global_count, dev);
  m.zero_grads();
  model_backward(m, act, dy, par);
  if (reduce) reduce->all_reduce(m.grads(), m.num_params(), ReduceOp::sum);
  opt.update(m);
  return loss;
}

// 1F1B over the stages of pp: activations forward to stage s+1 (tag 2i), their
// gradients back to stage s−1 (tag 2i+1), i = micro-batch. Sends stay in flight
// until the end of the step, so two neighbours sending to each other never
// block on one another.
double pipeline_run(Model& m, const PipelineEnds& ends, const ModelParallel& par, Communicator& pp, int micro_batches,
                    int64_t Bm, int64_t Ll, bool train) {
  const int S = pp.size(), s = pp.rank(), M = micro_batches;
  Device& dev = m.device();
  check(dev.is_host(), "pipeline parallelism runs on the host, not on ", dev.name());
  check(M >= 1, "a pipeline needs at least one micro-batch, got ", M);
  check(m.num_layers() * S == m.config().layers, "the model holds ", m.num_layers(), " layers, which is not layers/", S,
        " for a pipeline of ", S, " stages");
  const int64_t D = m.config().d_model;
  std::vector<Activations> acts(static_cast<size_t>(M));
  std::vector<DeviceTensor> dys(static_cast<size_t>(M)), sent;
  std::vector<Request> sends;
  double loss = 0;
  auto recv = [&](int from, int tag) {
    DeviceTensor t = dev.alloc(DType::f32, {Bm, Ll, D});
    Request r = pp.irecv(t.ptr<void>(), t.bytes(), from, tag);
    pp.wait(r);
    return t;
  };
  auto send = [&](DeviceTensor t, int to, int tag) {
    sends.push_back(pp.isend(t.ptr<void>(), t.bytes(), to, tag));
    sent.push_back(std::move(t));
  };
  auto forward = [&](int i) {
    const DeviceTensor in = s == 0 ? ends.input(i) : recv(s - 1, 2 * i);
    const size_t rows = static_cast<size_t>(Bm), at = static_cast<size_t>(i) * rows;
    const std::span<const int64_t> pos =
        ends.positions.empty() ? ends.positions : ends.positions.subspan(at * static_cast<size_t>(Ll), rows * Ll);
    const std::span<const std::vector<int32_t>> docs =
        ends.documents.empty() ? ends.documents : ends.documents.subspan(at, rows);
    acts[i].keep = train;  // inference frees each layer's tensors as it goes
    DeviceTensor out = model_forward(m, in, par, acts[i], {}, pos, docs);
    if (s + 1 < S) return send(std::move(out), s + 1, 2 * i);
    dys[i] = dev.alloc(DType::f32, {Bm, Ll, D});
    loss += ends.loss(i, out, dys[i]);
  };
  auto backward = [&](int i) {
    DeviceTensor dy = s + 1 < S ? recv(s + 1, 2 * i + 1) : std::move(dys[i]);
    DeviceTensor dx = model_backward(m, acts[i], dy, par);
    acts[i] = Activations();
    if (s > 0) return send(std::move(dx), s - 1, 2 * i + 1);
    if (ends.input_grad) ends.input_grad(i, dx);
  };
  if (!train) {
    for (int i = 0; i < M; ++i) forward(i);
  } else {
    const int warm = std::min(S - s - 1, M);
    int f = 0, b = 0;
    while (f < warm) forward(f++);
    while (f < M) forward(f++), backward(b++);
    while (b < M) backward(b++);
  }
  for (Request& r : sends) pp.wait(r);
  return s + 1 < S ? 0 : loss;
}

double pipeline_step(Model& m, AdamW* opt, const TensorView& x, const TensorView& target, const ModelParallel& par,
                     Communicator& pp, int micro_batches, int64_t global_count, Communicator* reduce, bool train) {
  check(x.rank == 3 && same_shape(target, x), "pipeline input and target must be [B, L, D] of the same shape");
  const int64_t B = x.dim(0), Ll = x.dim(1), D = x.dim(2), M = micro_batches;
  check(M >= 1 && B % M == 0, "batch ", B, " must be divisible by the number of micro-batches ", M);
  const int64_t Bm = B / M;
  Device& dev = m.device();
  auto micro = [&](const TensorView& t, int i) { return t.slice(0, i * Bm, Bm); };
  PipelineEnds ends;
  ends.input = [&](int i) {
    DeviceTensor in = dev.alloc(DType::f32, {Bm, Ll, D});
    copy_into(in, micro(x, i));
    return in;
  };
  ends.loss = [&](int i, const TensorView& y, const TensorView& dy) {
    DeviceTensor t = dev.alloc(DType::f32, {Bm, Ll, D});
    copy_into(t, micro(target, i));
    return mse_loss(y, t, dy, nullptr, global_count);
  };
  if (train) m.zero_grads();
  double loss = pipeline_run(m, ends, par, pp, micro_batches, Bm, Ll, train);
  // The loss lives on the last stage (and, summed over the replica group, covers
  // the whole batch and sequence); every stage reports it.
  if (reduce) reduce->all_reduce(&loss, 1, ReduceOp::sum);
  pp.all_reduce(&loss, 1, ReduceOp::sum);
  if (train) {
    if (reduce) reduce->all_reduce(m.grads(), m.num_params(), ReduceOp::sum);
    check(opt != nullptr, "a training pipeline step needs an optimizer");
    opt->update(m);
  }
  return loss;
}

}  // namespace ringattn
