#!/usr/bin/env bash
# Installs what ringattn needs on Debian 12 with apt-get, only what is missing.
# Python helpers (tests, charts) use Debian's /usr/bin/python3 with python3-numpy,
# not a pyenv/venv interpreter that may be first on PATH; python3-venv and
# python3-dev are for the Python package's venv and extension (install_python.sh),
# ca-certificates for its downloads from PyPI over HTTPS (absent from minimal roots).
# Packages are installed without their recommends, so a recommend that a CMake
# config requires is listed here: Debian's oneDNN is built with its OpenCL GPU
# runtime and its dnnl-config.cmake calls find_package(OpenCL REQUIRED), whose
# headers and loader come with ocl-icd-opencl-dev (only recommended by libdnnl-dev).
# scripts/fresh_machine_check.sh proves on every CI run that this list is enough.
set -euo pipefail

PACKAGES=(build-essential cmake pkg-config libdnnl-dev ocl-icd-opencl-dev libcli11-dev nlohmann-json3-dev libpcre2-dev libicu-dev
          libopenmpi-dev openmpi-bin iproute2 clang clang-format libclang-rt-14-dev libomp-14-dev libgtest-dev
          python3-numpy python3-matplotlib python3-venv python3-dev ca-certificates)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install_deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
echo "install_deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; then
  $SUDO apt-get update -q >&2
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
