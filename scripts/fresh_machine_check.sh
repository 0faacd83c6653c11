#!/usr/bin/env bash
# Proves that a brand-new Debian 12 machine can build and run ringattn with the
# README's two commands and nothing installed by hand: builds a new Debian 12
# (bookworm) root from Debian's packages with mmdebstrap, clones this repository
# into it, and runs there, with a clean environment, as a newcomer would:
#
#   full  (default)  scripts/install_deps.sh, the release build, ./test.sh, ./run.sh
#   smoke            scripts/install_deps.sh, the release build, and ring attention
#                    on 2 ranks under mpirun checked against one rank
#
#   scripts/fresh_machine_check.sh [--smoke] [--rev REV] [--keep] [-- COMMAND...]
#
# With `-- COMMAND...` it runs that command (in the clone, after nothing else)
# instead. Each step's time is printed; the exit status is the first failing
# step's (0 when all pass). Needs root (chroot and mounts) and the network access
# apt-get already has: packages come from the Debian mirrors in this machine's
# own apt sources. The root is made anew on every run under
# ${RINGATTN_FRESH_DIR:-/var/tmp/ringattn-fresh} and removed afterwards (--keep
# keeps it); runs that were killed are cleaned up by the next one.
set -euo pipefail

mode=full; rev=HEAD; keep=0; cmd=()
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) mode=smoke; shift ;;
    --rev) [ $# -ge 2 ] || { echo "fresh_machine_check: --rev needs a revision" >&2; exit 2; }; rev=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --) shift; mode=command; cmd=("$@"); break ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "fresh_machine_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ "$mode" != command ] || [ ${#cmd[@]} -gt 0 ] || { echo "fresh_machine_check: '--' needs a command" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "fresh_machine_check: needs root (chroot, mount)" >&2; exit 2; }
repo=$(cd "$(dirname "$0")/.." && git rev-parse --show-toplevel)
commit=$(git -C "$repo" rev-parse --verify "$rev^{commit}") \
  || { echo "fresh_machine_check: '$rev' is not a commit of $repo" >&2; exit 2; }

log() { echo "fresh_machine_check: $*" >&2; }
step_start=0
begin() { step_start=$(date +%s); log "== $* =="; }
took() { echo $(( $(date +%s) - step_start )); }

top=${RINGATTN_FRESH_DIR:-/var/tmp/ringattn-fresh}
mkdir -p "$top"

# Processes still running inside a root (a killed run's mpirun, say) keep its
# mounts busy: end them, unmount everything below the root, then remove it
# without ever crossing into a mount.
teardown() {
  local run=$1 root=$1/root p
  for p in /proc/[0-9]*; do
    if [ "$(readlink "$p/root" 2>/dev/null)" = "$root" ]; then kill -9 "${p#/proc/}" 2>/dev/null || true; fi
  done
  if grep -q " $root" /proc/mounts; then umount -R -l "$root" 2>/dev/null || true; fi
  if grep -q " $run/" /proc/mounts; then log "$run still has mounts; not removed"; return 1; fi
  rm -rf --one-file-system "$run"
}
for stale in "$top"/run.*; do
  if [ -d "$stale" ]; then log "removing $stale, left by a run that was killed"; teardown "$stale" || true; fi
done

# The Debian mirrors this machine's apt uses, as one-line sources for mmdebstrap:
# deb822 stanzas (*.sources) and classic lines (*.list) for the bookworm suites;
# other repositories (third-party, disabled files) are left out.
sources() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk 'function flush() { if (types ~ /(^| )deb( |$)/ && uris != "" && comps != "")
                              { n = split(suites, s, " "); for (i = 1; i <= n; i++) if (s[i] ~ /^bookworm/)
                                  { m = split(uris, u, " "); for (j = 1; j <= m; j++) print "deb " u[j] " " s[i] " " comps } }
                            types = uris = suites = comps = "" }
         /^#/ { next }
         /^[ \t]*$/ { flush(); next }
         { key = tolower($1); sub(/^[^:]*:[ \t]*/, "") }
         key == "types:" { types = $0 } key == "uris:" { uris = $0 }
         key == "suites:" { suites = $0 } key == "components:" { comps = $0 }
         END { flush() }' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    sed -e 's/\[[^]]*\]//' "$f" | awk '$1 == "deb" && $3 ~ /^bookworm/ { $1 = "deb"; print }'
  done
}
mirrors=$(sources | sort -u)
[ -n "$mirrors" ] || { log "no Debian bookworm mirror in this machine's apt sources"; exit 2; }
if ! command -v mmdebstrap >/dev/null; then
  log "installing mmdebstrap on this machine (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap >/dev/null; }
fi

run=$(mktemp -d "$top/run.XXXXXX")
root=$run/root
cleanup() {
  local rc=$?
  if [ "$keep" = 1 ]; then
    umount -R -l "$root" 2>/dev/null || true
    log "kept $root"
  else
    teardown "$run" || true
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

begin "a new Debian 12 root (mmdebstrap, minimal apt variant)"
printf '%s\n' "$mirrors" | sed 's/^/  /' >&2
printf '%s\n' "$mirrors" >"$run/sources.list"
mmdebstrap --variant=apt bookworm "$root" "$run/sources.list" >"$run/mmdebstrap.log" 2>&1 \
  || { tail -20 "$run/mmdebstrap.log" >&2; log "mmdebstrap failed"; exit 1; }
cp /etc/resolv.conf "$root/etc/resolv.conf"
# /etc/hosts, which every installed Debian has (the installer writes it) and a
# minimal root lacks: without it each mpirun asks DNS for "localhost", and a lost
# reply costs the resolver's 5 s timeout (every other mpirun here: cli_smoke took
# 354 s instead of ~40).
cp /etc/hosts "$root/etc/hosts" 2>/dev/null || printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
# The machine's own HTTPS trust anchors, like its resolver: on a network behind a
# TLS-inspecting proxy, the proxy's CA (PyPI is reached through it); none
# elsewhere. ca-certificates (install_deps.sh) adds them to the root's store.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
fi
log "root made in $(took) s"

git clone -q --no-hardlinks "$repo" "$root/src"
git -C "$root/src" checkout -q "$commit"
log "cloned $(git -C "$repo" rev-parse --short "$commit") into the root"

# The root is a mount of its own, private, as a host's / is (ip netns exec
# remounts / as a slave); the kernel's file systems as on a host.
mount --bind "$root" "$root"
mount --make-private "$root"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"; mount --make-rslave "$root/sys"
mount --rbind /dev "$root/dev"; mount --make-rslave "$root/dev"
mount -t tmpfs -o size=8g tmpfs "$root/dev/shm"
mount -t tmpfs tmpfs "$root/run"
mkdir -p "$root/run/netns" "$root/run/lock"

inside() {
  chroot "$root" /usr/bin/env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 TERM=dumb bash -c 'cd /src && "$@"' fresh "$@"
}
summary=()
step() {
  local name=$1; shift
  begin "$name: $*"
  local rc=0
  # In the background and waited for, so that a signal ends this script at once
  # (bash runs a trap only after a foreground command returns); the EXIT trap
  # then kills whatever still runs inside the root.
  inside "$@" &
  wait $! || rc=$?
  summary+=("$(printf '%-34s %5s s  exit %s' "$name" "$(took)" "$rc")")
  if [ $rc -ne 0 ]; then
    log "FAILED: $name (exit $rc)"
    printf '%s\n' "${summary[@]}" >&2
    exit $rc
  fi
}

case $mode in
  command) step command "${cmd[@]}" ;;
  *)
    step install scripts/install_deps.sh
    step "configure + build (release)" bash -c 'cmake --preset release >/dev/null && cmake --build --preset release -j "$(nproc)"'
    if [ "$mode" = smoke ]; then
      step "ring attention, 2 ranks, --check" mpirun --allow-run-as-root --oversubscribe --bind-to none \
        --mca pml ob1 --mca btl self,vader -np 2 ./build/release/ringattn attention --strategy ring --layout zigzag \
        --seq 1024 --heads 4 --dim 64 --causal --backward --check --threads 1
    else
      step ./test.sh ./test.sh
      step ./run.sh ./run.sh
    fi
    ;;
esac
log "all steps passed in a fresh Debian 12 root ($(git -C "$repo" rev-parse --short "$commit")):"
printf '%s\n' "${summary[@]}" >&2
