#!/usr/bin/env bash
# Side-by-side CPU benchmark (issue 15 item 5): ipo and its anchors measured in ONE run, on the
# same machine, with the same thread count on every side, printed as one markdown table and
# written as JSON. Every measurement runs as its own process under /usr/bin/time -v (peak RSS).
#
# Rows (what is compared, and why):
#   fwd-bwd  1. forward + backward, 2 x 256 tokens, SmolLM2-135M shape, random weights, fp32:
#               ipo (benches/forward_backward.rs, criterion) vs PyTorch eager fp32 (HF
#               LlamaForCausalLM). The per-token compute of training, nothing else.
#            2. the same in bf16: ipo bf16 (criterion forward_backward_2x256_bf16, n/a while the
#               bench does not exist) vs PyTorch bf16 weights (model.to(torch.bfloat16): bf16
#               storage, bf16 matmuls, what "eager bf16" means here) and vs PyTorch autocast bf16
#               (fp32 master weights, bf16 matmuls: the usual mixed-precision training setup).
#  train     3. one full segment-DPO optimizer step (4 pairs, context 192, segments 64, 2 micro-
#               batches of 2, AdamW, clipping; ipo bench train = the step of benches/train.rs)
#               vs PyTorch eager on the TRL layout (scripts/bench_cpu/torch_train_step.py: each
#               pair as two padded sequences, full logits). Whole-system: packing counts.
#  decode    4. greedy decode tokens/s at batch 1, 8, 32 (64-token prompt, 32 new tokens, no EOS
#               stop on any side): ipo bench decode f32 / bf16 / q8 / q4 (--precision; n/a when
#               the binary rejects it) vs HF generate (fp32 and bf16, random weights, same shape)
#               vs llama.cpp (llama-cpp-python, the default model's Q4_1 GGUF and a Q8_0 of it;
#               ipo q4 is set beside Q4_1, q8 beside Q8_0 and Q4_1).
#  prefill   5. prefill tokens/s of 8 prompts x 128 tokens in one forward, the same sides.
#            6. every row's peak RSS (its process's maximum resident set size).
#
# Usage: scripts/bench-cpu.sh [--quick] [--only fwd-bwd|train|decode|prefill]... [--threads N]
#                             [--omp-passive] [--out DIR]
#   --quick        fewer iterations (criterion's minimum of 10 samples, 3 PyTorch iterations,
#                  1 timed train step): a smoke check of the whole table;
#   --only NAME    run one row group (repeatable);
#   --threads N    threads on every side (default 2);
#   --omp-passive  OMP_WAIT_POLICY=PASSIVE for the OpenMP sides (PyTorch, llama.cpp). Only for a
#                  machine that other work keeps busy: there OpenMP's spinning barriers collapse
#                  (llama.cpp measured 0.4 vs 65 tokens/s at batch 1 under a load of 9 on 2 cores),
#                  rayon's do not. On an idle machine leave it off: the libraries' defaults count;
#   --out DIR      default runs/bench-cpu; the table: DIR/bench-cpu.md, JSON: DIR/bench-cpu.json,
#                  each process's output: DIR/logs/KEY.log.
# Needs: cargo, python3.11 (or python3), the default model (scripts/fetch-default-model.sh, run
# here when missing). Python side: a venv at ${IPO_BENCH_VENV:-~/.cache/ipo/bench-venv} with
# pinned torch/transformers/llama-cpp-python, created here once (torch's Linux wheel from PyPI
# is the CUDA build and does not import without its nvidia-* libraries, so they come too:
# ~4 GB; llama-cpp-python compiles llama.cpp from source when pip has no cached wheel, ~15 min).
set -euo pipefail
root="$(cd -P "$(dirname "$0")/.." && pwd)"
cd "$root"
log() { echo "bench-cpu: $*" >&2; }

args=("$@")
threads=2
only=()
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --only) only+=("${args[$((i + 1))]}") ;;
    --only=*) only+=("${args[$i]#--only=}") ;;
    --threads) threads="${args[$((i + 1))]}" ;;
    --threads=*) threads="${args[$i]#--threads=}" ;;
    --omp-passive) export OMP_WAIT_POLICY=PASSIVE ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  esac
done

# Same thread count everywhere: rayon (ipo), OpenMP/MKL (torch), llama.cpp gets n_threads from
# the Python side. Exported here so every child inherits them.
export RAYON_NUM_THREADS="$threads" OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# --- Python venv (pinned; idempotent) -------------------------------------------------------
venv="${IPO_BENCH_VENV:-$HOME/.cache/ipo/bench-venv}"
py_pins=(torch==2.15.0 transformers==5.23.0 tokenizers==0.23.3 safetensors==0.8.0 numpy==2.4.6
         llama-cpp-python==0.3.36)
stamp="${py_pins[*]}"
pybin="$(command -v python3.11 || command -v python3)"
if [ "$(cat "$venv/.ipo-bench-pins" 2>/dev/null)" != "$stamp" ] \
   || ! "$venv/bin/python" -c "import torch, transformers, llama_cpp" >/dev/null 2>&1; then
  log "creating $venv (${py_pins[*]}); first time only"
  "$pybin" -m venv "$venv"
  # llama-cpp-python is an sdist that compiles llama.cpp (GGML_NATIVE: tuned for this CPU, as a
  # user would build it). A wheel of the pinned version that pip built earlier on this machine
  # (e.g. for scripts/judge-server.sh's venv) sits in pip's wheel cache: install that file, since
  # pip does not always find it by itself.
  pins=("${py_pins[@]}")
  whl="$(find "$("$venv/bin/pip" cache dir 2>/dev/null || echo "$HOME/.cache/pip")/wheels" \
         -name 'llama_cpp_python-0.3.36-*.whl' 2>/dev/null | head -n 1 || true)"
  if [ -n "$whl" ]; then
    log "llama-cpp-python: reusing the wheel pip built before ($whl)"
    pins=("${pins[@]/llama-cpp-python==0.3.36/$whl}")
  fi
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "${pins[@]}" >&2
  "$venv/bin/python" -c "import torch, transformers, llama_cpp" >&2
  echo "$stamp" > "$venv/.ipo-bench-pins"
fi

# --- ipo binaries ---------------------------------------------------------------------------
target="${CARGO_TARGET_DIR:-$root/target}"
log "cargo build --release --bin ipo"
cargo build --release --bin ipo --quiet >&2
fb_exe=""
if [ ${#only[@]} -eq 0 ] || [[ " ${only[*]} " == *" fwd-bwd "* ]]; then
  # Rows 1-2 run the criterion bench binary directly (one process per bench function).
  log "cargo bench --bench forward_backward --no-run"
  cargo bench --bench forward_backward --no-run --quiet >&2
  fb_exe="$(cargo bench --bench forward_backward --no-run --message-format=json 2>/dev/null \
    | "$venv/bin/python" -c 'import json, sys
exe = [m["executable"] for m in map(json.loads, sys.stdin) if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "forward_backward"]
print(exe[-1] if exe else "")')"
  [ -x "$fb_exe" ] || { log "could not find the forward_backward bench executable"; exit 1; }
fi

# --- the default model (GGUF for llama.cpp; the imported folder is not needed by the rows) ---
model_cache="${IPO_MODEL_CACHE:-$HOME/.cache/ipo/models}"
gguf="$model_cache/.downloads/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$gguf" ] || bash scripts/fetch-default-model.sh >/dev/null
[ -f "$gguf" ] || { log "missing $gguf (scripts/fetch-default-model.sh should have left it)"; exit 1; }

exec "$venv/bin/python" scripts/bench_cpu/run.py --ipo "$target/release/ipo" --fb-bench "$fb_exe" \
  --gguf "$gguf" --gguf-cache "$model_cache/.bench" "${args[@]}"
