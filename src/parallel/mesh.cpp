// The data × pipeline × sequence × tensor parallel mesh: one split of the world
// per group.
#include "ringattn/parallel.h"

#include "ringattn/error.h"

namespace ringattn {

Mesh Mesh::build(Communicator& world, int dp, int sp, int tp, int pp, int ulysses) {
  check(dp >= 1 && pp >= 1 && sp >= 1 && tp >= 1 && dp * pp * sp * tp == world.size(), "mesh dp=", dp, " x pp=", pp,
        " x sp=", sp, " x tp=", tp, " = ", dp * pp * sp * tp, " does not match the ", world.size(), " ranks");
  check(ulysses >= 1 && sp % ulysses == 0, "the Ulysses degree ", ulysses, " must divide sp=", sp);
  Mesh m;
  m.dp = dp, m.pp = pp, m.sp = sp, m.tp = tp, m.ulysses = ulysses, m.world = &world;
  const int r = world.rank(), di = m.dp_index(), pi = m.pp_index(), si = m.sp_index(), ti = m.tp_index();
  // color = the indices the group shares, key = the index it runs over
  m.dp_comm = world.split((pi * sp + si) * tp + ti, di);
  m.pp_comm = world.split((di * sp + si) * tp + ti, pi);
  m.sp_comm = world.split((di * pp + pi) * tp + ti, si);
  m.tp_comm = world.split((di * pp + pi) * sp + si, ti);
  m.replica_comm = world.split(pi * tp + ti, r);
  if (ulysses > 1) {
    m.ulysses_comm = m.sp_comm->split(si / ulysses, si % ulysses);
    m.ring_comm = m.sp_comm->split(si % ulysses, si / ulysses);
  }
  return m;
}

void Mesh::use_hybrid(DistAttentionOptions& o) const {
  check(ulysses > 1, "the mesh has no Ulysses groups (ulysses = 1)");
  o.strategy = Strategy::hybrid;
  o.ulysses_group = ulysses_comm.get();
  o.ring_group = ring_comm.get();
}

int64_t Mesh::bytes_sent() const {
  int64_t b = 0;
  for (const auto* c : {&dp_comm, &pp_comm, &sp_comm, &tp_comm, &replica_comm, &ulysses_comm, &ring_comm})
    if (*c) b += (*c)->stats().bytes_sent;
  return b;
}

void Mesh::reset_stats() {
  for (auto* c : {&dp_comm, &pp_comm, &sp_comm, &tp_comm, &replica_comm, &ulysses_comm, &ring_comm})
    if (*c) (*c)->reset_stats();
}

}  // namespace ringattn
