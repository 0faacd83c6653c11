// Prefill + decode on a mesh with timings (see generation.h).
#include "cli/generation.h"

#include <algorithm>
#include <cmath>

#include "ringattn/error.h"
#include "ringattn/layout.h"
#include "ringattn/perf.h"

namespace ringattn::cli {

double percentile(std::vector<double> xs, double p) {
  if (xs.empty()) return 0;
  std::sort(xs.begin(), xs.end());
  const size_t i = static_cast<size_t>(std::ceil(p / 100.0 * static_cast<double>(xs.size())));
  return xs[std::min(xs.size() - 1, i == 0 ? 0 : i - 1)];
}

namespace {

struct Pass {
  KVCache cache;
  DeviceTensor x;  // the next decode input [B, 1, D], on the model's device
};

// Prefills every prompt into a fresh cache; x gets each prompt's last output,
// broadcast from the world rank that holds it.
Pass prefill_all(Communicator& world, const Mesh& mesh, const Model& m, const ModelParallel& par,
                 const std::vector<Tensor>& prompts, int64_t capacity) {
  const int64_t B = static_cast<int64_t>(prompts.size()), D = m.config().d_model;
  const int P = mesh.sp, p = mesh.sp_index();
  Communicator* pp = mesh.pp > 1 ? mesh.pp_comm.get() : nullptr;
  Device& dev = m.device();
  Pass s{KVCache(m, B, capacity, P, p), dev.alloc(DType::f32, {B, 1, D})};
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = prompts[static_cast<size_t>(b)].dim(1), Ll = shard_length(par.attn.layout, L, P, p);
    Tensor x(DType::f32, {1, Ll, D});
    shard(prompts[static_cast<size_t>(b)], x, par.attn.layout, P, p);
    const DeviceTensor y = prefill(m, s.cache, dev.upload(x), b, par, pp);
    // The last position's owner: its SP rank, TP rank 0, the last stage.
    int owner_sp = 0;
    for (int r = 0; r < P; ++r) {
      const std::vector<int64_t> pr = shard_positions(par.attn.layout, L, P, r);
      if (std::find(pr.begin(), pr.end(), L - 1) != pr.end()) owner_sp = r;
    }
    const int root = mesh.rank_of(0, mesh.pp - 1, owner_sp, 0);
    Tensor row(DType::f32, {1, 1, D});
    if (world.rank() == root) {
      const std::vector<int64_t> mine = shard_positions(par.attn.layout, L, P, p);
      const int64_t i = std::find(mine.begin(), mine.end(), L - 1) - mine.begin();
      dev.download(row, y.view().slice(1, i, 1));
    }
    world.broadcast(row.ptr<void>(), row.bytes(), root);
    dev.copy(s.x.view().slice(0, b, 1), dev.upload(row));
  }
  return s;
}

}  // namespace

GenerationRun run_generation(RunContext& run, const Model& m, const std::vector<Tensor>& prompts, int steps,
                             int64_t capacity, const std::function<void(int)>& tick) {
  check(!prompts.empty() && steps >= 1, "generation needs at least one prompt and one new token");
  check(run.world() != nullptr, "generation runs over a world communicator (one rank or more)");
  Communicator& world = *run.world();
  const Mesh& mesh = run.mesh();
  const ModelParallel& par = run.model_parallel();
  const int64_t B = static_cast<int64_t>(prompts.size()), D = m.config().d_model;
  Communicator* pp = mesh.pp > 1 ? mesh.pp_comm.get() : nullptr;
  {  // warm-up: the same batch and shapes per decode step, the shortest prompt the layout allows
    const int64_t Lw = (par.attn.layout == Layout::zigzag ? 2 : 1) * mesh.sp;
    std::vector<Tensor> short_prompts;
    for (int64_t b = 0; b < B; ++b) {
      short_prompts.emplace_back(DType::f32, std::initializer_list<int64_t>{1, Lw, D});
      copy_into(short_prompts.back(), prompts[static_cast<size_t>(b)].view().slice(1, 0, Lw));
    }
    Pass w = prefill_all(world, mesh, m, par, short_prompts, KVCache::capacity_for(Lw, 2, mesh.sp));
    for (int j = 0; j < 2; ++j) w.x = decode_step(m, w.cache, w.x, par, pp);
  }
  GenerationRun r;
  // Bytes sent: the mesh's groups and the world, and a GPU's own SP communicator.
  auto sent = [&] { return run.bytes_sent(); };
  auto reset = [&] { run.reset_stats(); };
  world.barrier();
  reset();
  world.reset_stats();
  double t0 = now_seconds();
  Pass s = prefill_all(world, mesh, m, par, prompts, capacity);
  r.prefill_seconds = now_seconds() - t0;
  r.prefill_bytes = static_cast<double>(sent() + world.stats().bytes_sent);
  Tensor out(DType::f32, {B, 1, D});
  m.device().download(out, s.x);
  r.first_inputs.assign(out.ptr<float>(), out.ptr<float>() + B * D);
  world.barrier();
  reset();
  for (int j = 0; j < steps; ++j) {
    if (tick) tick(j);
    t0 = now_seconds();
    s.x = decode_step(m, s.cache, s.x, par, pp);
    m.device().download(out, s.x);  // the step ends when its token is on the host
    r.step_seconds.push_back(now_seconds() - t0);
    r.outputs.insert(r.outputs.end(), out.ptr<float>(), out.ptr<float>() + B * D);
  }
  r.step_bytes = static_cast<double>(sent()) / steps;
  r.cache_bytes = static_cast<double>(s.cache.bytes());
  world.all_reduce(r.step_seconds.data(), steps, ReduceOp::max);
  double maxes[4] = {r.prefill_seconds, r.prefill_bytes, r.step_bytes, r.cache_bytes};
  world.all_reduce(maxes, 4, ReduceOp::max);
  r.prefill_seconds = maxes[0], r.prefill_bytes = maxes[1], r.step_bytes = maxes[2], r.cache_bytes = maxes[3];
  return r;
}

}  // namespace ringattn::cli
