#!/bin/bash
# Builds gemm_rows.cpp against a release build's libraries (BUILD, default
# ../../../build/release) into OUT and runs it: the binary before a change and
# after are built from their own trees, then run alternately by hand.
set -euo pipefail
BUILD=${BUILD:-../../../build/release}
OUT=${OUT:-gemm_rows}
g++ -O2 -std=c++20 -fopenmp -I ../../../include -I ../../../src gemm_rows.cpp \
  "$BUILD/libringattn_kernels.a" "$BUILD/libringattn_core.a" -ldnnl -licuuc -lpcre2-8 -o "$OUT"
"./$OUT"
