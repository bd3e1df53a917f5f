#!/usr/bin/env bash
# Installs NVRTC and the CUDA headers from PyPI wheels into .deps/cuda (no GPU or driver needed),
# so kernels can be compiled here and run in ptxsim. Idempotent; prints the prefix.
# Override the prefix with IPO_CUDA_DEPS.
#   <prefix>/nvidia/cuda_nvrtc/lib/libnvrtc.so.12         NVRTC 12.9 (the default of the tests)
#   <prefix>/nvrtc13/nvidia/cu13/lib/libnvrtc.so.13       NVRTC 13.0 (scripts/test.sh checks both)
#   <prefix>/nvidia/cuda_runtime/include, cuda_nvcc/include   headers (12.9; NVRTC 13.0 builds
#                                                         every kernel with them too)
# NVRTC 13 goes into its own folder: `pip install --target` into a folder that already has
# `nvidia/` would skip (or, with --upgrade, replace) the 12.9 wheels.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
prefix="${IPO_CUDA_DEPS:-$root/.deps/cuda}"
stamp="$prefix/.installed-12.9"
if [ ! -f "$stamp" ]; then
  mkdir -p "$prefix"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$prefix" \
    nvidia-cuda-nvrtc-cu12==12.9.86 \
    nvidia-cuda-runtime-cu12==12.9.79 \
    nvidia-cuda-nvcc-cu12==12.9.86 >&2
  # The wheels ship libnvrtc.so.12 only; add the unversioned name some loaders look for.
  lib="$prefix/nvidia/cuda_nvrtc/lib"
  [ -e "$lib/libnvrtc.so" ] || ln -s libnvrtc.so.12 "$lib/libnvrtc.so"
  touch "$stamp"
fi
# 13.0: the CUDA version of the 580 drivers we have run on (H200); its libnvrtc-builtins is
# found next to libnvrtc.so.13 by the library search (ptxsim/src/cudalib.rs), no LD_LIBRARY_PATH.
stamp13="$prefix/.installed-nvrtc-13.0.88"
if [ ! -f "$stamp13" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$prefix/nvrtc13" \
    nvidia-cuda-nvrtc==13.0.88 >&2
  touch "$stamp13"
fi
echo "$prefix"
