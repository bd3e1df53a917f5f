#!/usr/bin/env bash
# Installs NVRTC and the CUDA headers from PyPI wheels into .deps/cuda (no GPU or driver needed),
# so kernels can be compiled here and run in ptxsim. Idempotent; prints the prefix.
# Override the prefix with IPO_CUDA_DEPS.
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
echo "$prefix"
