#!/usr/bin/env bash
# The installed package as another project uses it: `cmake --install` this build
# into a scratch prefix, build examples/ring_attention against it with
# find_package(ringattn), and run it on 1 and 2 ranks (it exits 1 when the ring
# differs from local attention). Usage: install_test.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build=$1 src=$2
work=$(mktemp -d "${TMPDIR:-/tmp}/ringattn-install.XXXXXX")
trap 'rm -rf --one-file-system "$work"' EXIT
cmake --install "$build" --prefix "$work/prefix" >"$work/install.log"
test -f "$work/prefix/lib/cmake/ringattn/ringattnConfig.cmake"
test -f "$work/prefix/include/ringattn/version.h"
cmake -S "$src/examples/ring_attention" -B "$work/example" -DCMAKE_PREFIX_PATH="$work/prefix" \
  -DCMAKE_BUILD_TYPE=Release >"$work/configure.log" 2>&1 || { cat "$work/configure.log"; exit 1; }
cmake --build "$work/example" -j "$(nproc)" >"$work/build.log" || { cat "$work/build.log"; exit 1; }
mpirun=(mpirun --allow-run-as-root --oversubscribe --bind-to none --mca pml ob1 --mca btl self,vader)
for n in 1 2; do
  "${mpirun[@]}" -np $n "$work/example/ring_attention"
done
