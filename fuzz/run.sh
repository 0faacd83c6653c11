#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (AddressSanitizer + UBSan) and runs
# each: first every input kept in fuzz/regressions/<target>/ (crashes found
# earlier, fixed, kept so they stay fixed), then fuzzing from fuzz/corpus/<target>/
# for FUZZ_SECONDS per target (default 300). Exit 77 (skipped) without clang's
# libFuzzer. The test suite runs it with FUZZ_SECONDS=5 (a smoke run: the build,
# the regressions, a few thousand inputs) built at FUZZ_OPT=-O0, which halves
# the compile (the CLI sources take 20 s each at -O1 under the sanitizers); long
# fuzzing is this script by hand, at the default -O1:
#   FUZZ_SECONDS=3600 fuzz/run.sh build/fuzz build/release
# The command-line target (fuzz_cli) links the release build's libraries, so it
# is built only when RELEASE_BUILD_DIR (with `ringattn` built) is given. Sources
# compile in parallel, FUZZ_JOBS at a time (default: the number of CPUs).
#   fuzz/run.sh OUT_DIR [RELEASE_BUILD_DIR]
set -uo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$src/build/fuzz}
release=${2:-}
CXX=${FUZZ_CXX:-clang++}
command -v "$CXX" >/dev/null || { echo "fuzz: skipped: $CXX is not installed (Debian: clang)"; exit 77; }
mkdir -p "$out"
echo 'extern "C" int LLVMFuzzerTestOneInput(const char*, unsigned long) { return 0; }' >"$out/probe.cpp"
if ! "$CXX" -fsanitize=fuzzer "$out/probe.cpp" -o "$out/probe" 2>/dev/null; then
  echo "fuzz: skipped: $CXX cannot link -fsanitize=fuzzer (libFuzzer missing)"; exit 77
fi
flags=(-std=c++20 "${FUZZ_OPT:--O1}" -g -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
       -I"$src/include" -I"$src/src")
jobs=${FUZZ_JOBS:-$(nproc)}

# compile SOURCE...: each source to $out/obj/<name>.o, $jobs at a time; prints the objects
compile() {
  local obj failed=$out/obj/failed
  mkdir -p "$out/obj"; rm -f "$failed"
  for source in "$@"; do
    obj=$out/obj/$(basename "${source%.cpp}").o
    echo "$obj"
    ( "$CXX" "${flags[@]}" -c "$source" -o "$obj" >&2 || touch "$failed" ) &
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
  done
  wait
  [ ! -e "$failed" ]
}

npy_objs=$(compile "$src/fuzz/fuzz_npy.cpp" "$src/src/io/npy.cpp" "$src/src/io/atomic_file.cpp" \
  "$src/src/core/tensor.cpp" "$src/src/core/dtype.cpp" "$src/src/core/memory.cpp") || exit 1
# shellcheck disable=SC2086
"$CXX" "${flags[@]}" $npy_objs -o "$out/fuzz_npy" || exit 1
targets=(npy)
link=${release:+$release/CMakeFiles/ringattn.dir/link.txt}
if [ -n "$link" ] && [ -f "$link" ] && [ -f "$release/libringattn_core.a" ]; then
  # The CLI sources compiled (and instrumented) here, everything below them from
  # the release build: its link line after `-o ringattn`, its libraries by path.
  libs=$(sed -e 's/.* -o ringattn //' -e "s#\(^\| \)\(libringattn_[a-z]*\.a\)#\1$release/\2#g" "$link")
  # The CLI sources in $jobs unity files (as CMake builds `ringattn`): each source
  # alone compiles CLI11's and nlohmann-json's inline code again.
  cli_sources=("$src"/src/cli/cmd_*.cpp "$src/src/cli/generation.cpp" "$src/src/cli/output.cpp" "$src/src/cli/launch.cpp")
  unity=()
  for ((u = 0; u < jobs; ++u)); do
    unity+=("$out/cli_unity_$u.cpp")
    for ((i = u; i < ${#cli_sources[@]}; i += jobs)); do echo "#include \"${cli_sources[i]}\""; done >"${unity[u]}"
  done
  cli_objs=$(compile "$src/fuzz/fuzz_cli.cpp" "${unity[@]}") || exit 1
  # shellcheck disable=SC2086
  "$CXX" "${flags[@]}" $cli_objs $libs -o "$out/fuzz_cli" || exit 1
  targets+=(cli)
else
  echo "fuzz: fuzz_cli not built (no release build given)"
fi
fail=0
for target in "${targets[@]}"; do
  bin=$out/fuzz_$target
  reg=$src/fuzz/regressions/$target
  if [ -d "$reg" ] && [ -n "$(ls -A "$reg")" ]; then
    "$bin" "$reg"/* >"$out/regressions_$target.log" 2>&1 || { tail -30 "$out/regressions_$target.log"; fail=1; }
    echo "fuzz_$target: $(ls "$reg" | wc -l) regression inputs pass"
  fi
  work=$out/corpus_$target
  mkdir -p "$work"
  cp -n "$src/fuzz/corpus/$target"/* "$work"/ 2>/dev/null
  "$bin" -max_total_time="${FUZZ_SECONDS:-300}" -rss_limit_mb=1024 -max_len=4096 -artifact_prefix="$out/crash_${target}_" \
    "$work" >"$out/fuzz_$target.log" 2>&1
  rc=$?
  echo "fuzz_$target: $(grep -a -o 'Done [0-9]* runs in [0-9]* second(s)' "$out/fuzz_$target.log" | tail -1), corpus $(ls "$work" | wc -l) inputs, exit $rc"
  if [ $rc -ne 0 ]; then
    grep -a -A15 "ERROR:" "$out/fuzz_$target.log" | head -30
    echo "the crashing input is in $out/crash_${target}_*: fix it, then keep it in fuzz/regressions/$target/"
    fail=1
  fi
done
exit $fail
