#!/usr/bin/env bash
# Makes the venv the Python package is built and tested in (.venv, or the path in
# $1) from Debian's /usr/bin/python3 (python3-venv, python3-dev from
# install_deps.sh) with python/requirements-test.txt from PyPI. Only what is
# missing: a venv whose stamp matches the requirements is left as it is.
# mpi4py's wheel loads the system's Open MPI (libmpi.so.40), the MPI ringattn links.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
req=python/requirements-test.txt
stamp="$venv/.ringattn-requirements"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && cmp -s "$req" "$stamp"; then
  exit 0
fi
echo "install_python: making $venv from $req" >&2
[ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" >&2
cp "$req" "$stamp"
