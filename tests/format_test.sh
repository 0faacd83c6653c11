#!/usr/bin/env bash
# The C++ and CUDA sources follow .clang-format: `clang-format --dry-run --Werror`
# over every tracked .cpp/.h/.cu/.cuh/.inc file with Debian 12's clang-format 14
# (other versions format some constructs differently). To fix: run
# `git ls-files '*.cpp' '*.h' '*.cu' '*.cuh' '*.inc' | xargs clang-format-14 -i`.
# Skips (77) outside a git checkout or without clang-format.
set -uo pipefail
cd "$1" || exit 1
fmt=$(command -v clang-format-14 || command -v clang-format) || { echo "format: no clang-format"; exit 77; }
files=$(git ls-files '*.cpp' '*.h' '*.cu' '*.cuh' '*.inc' 2>/dev/null) || { echo "format: not a git checkout"; exit 77; }
[ -n "$files" ] || { echo "format: no tracked sources"; exit 77; }
# shellcheck disable=SC2086
if ! out=$("$fmt" --dry-run --Werror $files 2>&1); then
  echo "$out" | head -40
  echo "format: $(echo "$out" | grep -c 'error:') places differ from .clang-format ($("$fmt" --version))"
  exit 1
fi
echo "format: $(echo "$files" | wc -l) files follow .clang-format ($("$fmt" --version))"
