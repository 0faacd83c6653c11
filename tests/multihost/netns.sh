#!/usr/bin/env bash
# Several "hosts" on one machine: Linux network namespaces joined by veth pairs to
# a bridge, and Open MPI over TCP between them (no shared memory), launched into
# each namespace by a remote agent instead of ssh. Only the project's own
# addresses (10.77.<net>.0/24) in its own namespaces are ever used.
#
#   netns.sh up N [RATE]      create hosts 0..N-1 (optional egress limit, e.g. 1gbit)
#   netns.sh down             remove them
#   netns.sh mpirun N ARGS... mpirun over the N hosts (one rank each), TCP only
#   netns.sh launcher N       that mpirun command line without -np (for `compare --launcher`)
#   netns.sh agent HOST CMD   the remote agent Open MPI calls (internal)
#   netns.sh check            exit 0 if this machine can do it, 77 (skip) with the reason if not
#
# RA_NET (default 77) picks the subnet and the names (ra<net>h<i>, ra<net>br), so
# concurrent users do not collide.
set -uo pipefail
NET=${RA_NET:-77}
BR=ra${NET}br
ns() { echo "ra${NET}h$1"; }
ip_of() { echo "10.${NET}.0.$(($1 + 1))"; }
here=$(cd "$(dirname "$0")" && pwd)

check() {
  [ "$(id -u)" -eq 0 ] || { echo "multihost: skipped: needs root to create network namespaces"; exit 77; }
  command -v ip >/dev/null || { echo "multihost: skipped: iproute2 (ip) is not installed"; exit 77; }
  local probe=ra${NET}probe$$
  if ! ip netns add "$probe" 2>/dev/null; then
    echo "multihost: skipped: this machine does not allow network namespaces (ip netns add failed)"; exit 77
  fi
  ip netns del "$probe"
}

down() {
  local h l
  # The root ends of the veth pairs first (that removes both ends at once), so a
  # following `up` can reuse the names.
  for l in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep "^ra${NET}v"); do
    ip link del "$l" 2>/dev/null
  done
  for h in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^ra${NET}h"); do ip netns del "$h" 2>/dev/null; done
  ip link del "$BR" 2>/dev/null
  rm -rf /tmp/ra${NET}h*
  true
}

up() {
  local n=$1 rate=${2:-}
  down
  ip link add "$BR" type bridge && ip addr add "10.${NET}.0.254/24" dev "$BR" && ip link set "$BR" up || return 1
  for ((i = 0; i < n; i++)); do
    local h; h=$(ns $i)
    ip netns add "$h" || return 1
    ip link add "ra${NET}v$i" type veth peer name eth0 netns "$h" || return 1
    ip link set "ra${NET}v$i" master "$BR" up
    ip -n "$h" addr add "$(ip_of $i)/24" dev eth0
    ip -n "$h" link set eth0 up
    ip -n "$h" link set lo up
    if [ -n "$rate" ]; then
      # Egress of every host (both directions of each link are limited by the two ends).
      ip netns exec "$h" tc qdisc add dev eth0 root tbf rate "$rate" burst 1mb latency 100ms || return 1
    fi
  done
}

agent() {
  # Open MPI calls: agent [options] HOST COMMAND...; the host is one of our addresses.
  while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
  local host=$1; shift
  local i=$(( ${host##*.} - 1 ))
  # Each host its own Open MPI session directory (they share /tmp and a hostname
  # here; daemons starting at once raced to create the same one).
  local tmp=/tmp/$(ns $i)
  mkdir -p "$tmp"
  exec ip netns exec "$(ns $i)" env OMPI_MCA_orte_tmpdir_base="$tmp" TMPDIR="$tmp" /bin/sh -c "$*"
}

# The mpirun command line (shell-quoted, without -np) that runs one rank on each
# of hosts 0..N-1, TCP only.
launcher() {
  local n=$1 hosts="" i
  for ((i = 0; i < n; i++)); do hosts="$hosts${hosts:+,}$(ip_of $i):1"; done
  # routed=direct: every daemon talks to mpirun itself, not through a tree; no hwloc
  # rtc component (binding is off anyway; its shared topology segment crashed orted
  # now and then when several daemons start on one machine); TCP keepalives on the
  # daemons' connections so a cut link ends the job in ~10 s, not Open MPI's 8 min;
  # a rank waiting on the network yields its core: the hosts share this machine's
  # cores, which no daemon sees as oversubscribed (4 hosts on 2 cores spun 71 s).
  printf '%s' "mpirun --allow-run-as-root --host $hosts --bind-to none --mca routed direct --mca rtc ^hwloc" \
    " --mca mpi_yield_when_idle 1" \
    " --mca oob_tcp_keepalive_time 5 --mca oob_tcp_keepalive_intvl 2 --mca oob_tcp_keepalive_probes 3" \
    " --mca plm_rsh_agent '$here/netns.sh agent'" \
    " --mca pml ob1 --mca btl tcp,self --mca btl_tcp_if_include 10.${NET}.0.0/24 --mca oob_tcp_if_include 10.${NET}.0.0/24" \
    " -x RA_NET=$NET${RINGATTN_TIMEOUT:+ -x RINGATTN_TIMEOUT}${OMP_NUM_THREADS:+ -x OMP_NUM_THREADS}"
}

run_mpi() {
  local n=$1; shift
  eval "$(launcher "$n") -np $n \"\$@\""
}

cmd=${1:-}; shift || true
case "$cmd" in
  check) check ;;
  up) up "$@" || { echo "multihost: could not create the hosts" >&2; down; exit 1; } ;;
  down) down ;;
  mpirun) run_mpi "$@" ;;
  launcher) launcher "$@" ;;
  agent) agent "$@" ;;
  *) sed -n '2,15p' "$0"; exit 2 ;;
esac
