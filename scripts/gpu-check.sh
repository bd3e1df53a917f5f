#!/usr/bin/env bash
# The prepared check of ipo on a machine with an NVIDIA GPU: `scripts/gpu-check.sh --help`.
set -u

usage() {
  cat <<'EOF'
scripts/gpu-check.sh [OUTDIR]

Checks and measures ipo on an NVIDIA GPU in a few minutes, with no network and no Rust:
  env          nvidia-smi, driver and CUDA versions, the libraries ipo finds
  selftest     ipo selftest --device cuda: every kernel against the CPU reference, per-op times
               (bf16, cuda's default precision)
  lm-head      the bf16 lm-head forward at the SmolLM2 shape with IPO_LM_HEAD=cublas (cuBLAS
               GEMM + lse_rows) and =mma (kernels/lm_head_mma.cu): parity row and ms per call
  ceiling      ipo bench ceiling: bf16/fp32 cuBLAS GEMM TFLOP/s and streaming GB/s (the roofline)
  anchor       the same ceilings and a Hugging Face Llama-1B training step in PyTorch (if present)
  ops-smollm2  ipo bench ops --precision f32: every op at a SmolLM2-135M layer (1024 tokens),
               share of the ceiling
  ops-llama1b  the same at a Llama-3.2-1B layer (4096 tokens)
  train-f32    ipo bench train --precision f32: segment-DPO steps (fwd + bwd + AdamW) of a
               random-weight 1B Llama
  train-bf16   the same with --precision bf16
  decode       ipo bench decode --precision f32: batched greedy decode of the 1B Llama at batch 1,
               32, 256, each with decode steps as CUDA graphs and without (IPO_CUDA_GRAPHS)
  run          ipo run of a shrunken demo on a random-weight 4-layer SmolLM2 (default tokenizer)
               on cuda (bf16, the default) and on cpu; the CPU run's pairs re-scored on cuda at
               --precision f32 must match
  multi-gpu    with 2 or more GPUs: ipo launch --nproc 2 -- train --zero 1 (NCCL reduce-scatter,
               all-gather, all-reduce) against one process on the run part's pairs: final weights
               and wall times (scaling); skipped on one GPU
Every part runs (a failure never stops the check) and reports pass / fail / timeout /
skipped / no GPU with its message. Results: OUTDIR/gpu-check.json, gpu-check.md and
gpu-check.log (all output). OUTDIR defaults to $OUT, else ./gpu-check-out. Exit status 0 only
when every part passed.

What it needs on the GPU machine (nothing is built or downloaded there):
  - the ipo binary: $IPO_BIN, else .gpu/ipo, else target/release/ipo;
  - the default model's config.json and tokenizer files (not its weights): $IPO_TOKENIZER_DIR,
    else .gpu/tokenizer, else ~/.cache/ipo/models/smollm2-135m-instruct;
  - this repository (kernels are compiled into the binary; data/demo and configs are read);
  - an NVIDIA driver; CUDA 12 or 13 cuBLAS and NVRTC (toolkit, loader path or pip wheels:
    ipo finds them itself); python3 for the summary (PyTorch for the anchor part, optional).

Carrying it to a remote GPU machine (everything fits in a few tens of MiB):
  cargo build --release && mkdir -p .gpu/tokenizer && echo /.gpu/ >> .git/info/exclude
  cp target/release/ipo .gpu/ipo && strip .gpu/ipo          # ~15 MiB once stripped
  bash scripts/fetch-default-model.sh                        # once, for the tokenizer files
  cp ~/.cache/ipo/models/smollm2-135m-instruct/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,generation_config.json} .gpu/tokenizer/
  # copy the repository with .gpu/ to the machine (rsync, or the device tool's carry: [".gpu"]),
  # then there:  bash scripts/gpu-check.sh "$OUT"
The binary needs glibc 2.36 or newer (built on Debian 12).

GPU_CHECK_DRY=1 checks the script itself on a machine without a GPU: kernel parts on the PTX
simulator and tiny shapes, model parts on the CPU (nothing it reports is a GPU number).

Environment: GPU_CHECK_BUDGET (seconds, default 450): parts that would start after it are
reported as skipped; GPU_CHECK_PARTS: a space-separated subset of the part names.
EOF
}

case "${1:-}" in
  -h | --help) usage; exit 0 ;;
esac

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root" || exit 2
out="${1:-${OUT:-$root/gpu-check-out}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="${TMPDIR:-/tmp}/ipo-gpu-check"
rm -rf "$work"
mkdir -p "$work/logs"
export IPO_KERNEL_CACHE="$work/kernels"
budget="${GPU_CHECK_BUDGET:-450}"
parts="${GPU_CHECK_PARTS:-env selftest lm-head ceiling ops-smollm2 train-f32 decode run multi-gpu anchor ops-llama1b train-bf16}"
start=$SECONDS
: >"$work/parts.tsv"

bin="${IPO_BIN:-}"
for c in "$root/.gpu/ipo" "$root/target/release/ipo"; do
  [ -z "$bin" ] && [ -x "$c" ] && bin="$c"
done
tok="${IPO_TOKENIZER_DIR:-}"
for c in "$root/.gpu/tokenizer" "$HOME/.cache/ipo/models/smollm2-135m-instruct"; do
  [ -z "$tok" ] && [ -f "$c/tokenizer.json" ] && tok="$c"
done

dev=cuda; big=llama1b; small=smollm2; train_dev=cuda; dry=()
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  dev=sim; big=tiny; small=tiny; train_dev=cpu
  dry=(--gemm 64 --copy-mib 1 --reps 1)
fi

# One row per part: name, status, seconds, message (tab separated).
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(echo "$4" | tr '\t\n' '  ' | cut -c1-400)" >>"$work/parts.tsv"; }

gpu=1
gpu_why=""
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  :
elif ! command -v nvidia-smi >/dev/null 2>&1; then
  gpu=0; gpu_why="no GPU: nvidia-smi not found"
elif ! nvidia-smi -L >/dev/null 2>&1; then
  gpu=0; gpu_why="no GPU: nvidia-smi -L failed ($(nvidia-smi -L 2>&1 | head -1))"
fi

# run_part NAME TIMEOUT CMD...: runs CMD with a time limit, output to logs/NAME.log.
run_part() {
  local name="$1" limit="$2"
  shift 2
  case " $parts " in *" $name "*) ;; *) return 0 ;; esac
  local log="$work/logs/$name.log"
  if [ "$gpu" = 0 ]; then
    record "$name" "no GPU" 0 "$gpu_why"; return 0
  fi
  if [ -z "$bin" ]; then
    record "$name" error 0 "no ipo binary: set IPO_BIN or put one at .gpu/ipo (see --help)"; return 0
  fi
  local used=$((SECONDS - start))
  if [ "$used" -ge "$budget" ]; then
    record "$name" skipped 0 "time budget of ${budget}s spent (GPU_CHECK_BUDGET)"; return 0
  fi
  echo "== $name (limit ${limit}s, ${used}s used)" | tee -a "$work/progress.log"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local dt=$((SECONDS - t0))
  local msg
  msg="$(grep -E '^(error|Error|thread .* panicked)' "$log" | head -2)"
  [ -z "$msg" ] && msg="$(tail -n 2 "$log")"
  if [ "$rc" = 0 ]; then
    record "$name" pass "$dt" "$(tail -n 1 "$log")"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    record "$name" timeout "$dt" "stopped after ${limit}s: $msg"
  else
    record "$name" fail "$dt" "exit $rc: $msg"
  fi
  echo "   $(tail -n 1 "$work/parts.tsv" | cut -f2,3) s"
}

part_env() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  nvidia-smi | head -4 | tail -2
  echo "ipo: $bin ($("$bin" --version))"
  echo "tokenizer: ${tok:-none}"
  uname -a
  ldd --version 2>&1 | head -1
  "$bin" selftest --device "$dev" --ops add_assign --reps 1
}

# The bf16 lm-head forward on both implementations (IPO_LM_HEAD): the lm_head_bf16 parity
# row and the lm_head_logprobs time of each; the last line compares the times.
part_lm_head() {
  local impl ms=()
  for impl in cublas mma; do
    echo "## IPO_LM_HEAD=$impl"
    IPO_LM_HEAD=$impl "$bin" selftest --device "$dev" --precision bf16 --time --ops lm_head_logprobs,lm_head_bf16 >"$work/lm-head-$impl.txt" 2>&1 || { cat "$work/lm-head-$impl.txt"; return 1; }
    cat "$work/lm-head-$impl.txt"
    ms+=("$(awk '$1 == "lm_head_logprobs" && NF == 2 { print $2 }' "$work/lm-head-$impl.txt")")
  done
  echo "lm_head_logprobs bf16 ms/call: cublas ${ms[0]:-?}, mma ${ms[1]:-?}"
}

part_run() {
  [ -n "$tok" ] || { echo "error: no tokenizer folder (IPO_TOKENIZER_DIR, .gpu/tokenizer)"; return 1; }
  "$bin" bench init-model --from "$tok" --out "$work/rand4" --layers 4 || return 1
  local dev rc=0
  local first=cuda
  [ "${GPU_CHECK_DRY:-0}" = 1 ] && first=cpu
  local pair name
  for pair in cuda:$first cpu:cpu; do
    name=${pair%%:*} dev=${pair#*:}
    sed -e "s#MODEL#$work/rand4#; s#RUN_DIR#$work/run-$name#; s#DEVICE#$dev#" scripts/gpu-check/run.toml >"$work/run-$name.toml"
    echo "--- ipo run --device $dev"
    "$bin" run --config "$work/run-$name.toml" >"$work/run-$name.log" 2>&1 || rc=1
    grep -v 'samples, [0-9]* tokens/s$' "$work/run-$name.log" | tail -n 30
  done
  echo "--- ipo score --device $first of the CPU run's pairs"
  "$bin" score --model "$work/rand4" --pairs "$work/run-cpu/pairs.jsonl" --output "$work/score-cuda.jsonl" --device $first --precision f32 || rc=1
  python3 scripts/gpu-check/compare_runs.py "$work" "$work/run.json" || rc=1
  return $rc
}

# Data parallel on 2 GPUs: one process against `ipo launch --nproc 2 -- train --zero 1` with the
# same global batch, on the run part's pairs and model.
part_multi_gpu() {
  local pairs="$work/run-cpu/pairs.jsonl"
  [ -f "$pairs" ] || { echo "error: no pairs at $pairs (the run part writes them)"; return 1; }
  local flags=(--model "$work/rand4" --pairs "$pairs" --device "$train_dev" --batch-size 8 --micro-batch-size 2 --epochs 2 --lr 1e-4 --seed 7)
  local t0=$SECONDS
  "$bin" train "${flags[@]}" --output "$work/dp1" || return 1
  local t1=$SECONDS
  "$bin" launch --nproc 2 -- train "${flags[@]}" --output "$work/dp2" --zero 1 || return 1
  local t2=$SECONDS
  python3 - "$work/rand4/model.safetensors" "$work/dp1/final/model.safetensors" "$work/dp2/final/model.safetensors" "$((t1 - t0))" "$((t2 - t1))" <<'PY'
import json, struct, sys
def load(p):
    b = open(p, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    out = {}
    for k, v in h.items():
        if k == "__metadata__":
            continue
        s, e = v["data_offsets"]
        raw = b[8 + n + s:8 + n + e]
        if v["dtype"] == "F32":
            out[k] = struct.unpack(f"<{len(raw) // 4}f", raw)
        elif v["dtype"] == "BF16":
            out[k] = [struct.unpack("<f", b"\0\0" + raw[i:i + 2])[0] for i in range(0, len(raw), 2)]
    return out
w0, w1, w2 = (load(p) for p in sys.argv[1:4])
moved = max(abs(a - b) for k in w1 for a, b in zip(w0[k], w1[k]))
diff = max(abs(a - b) for k in w1 for a, b in zip(w1[k], w2[k]))
t1, t2 = int(sys.argv[4]), int(sys.argv[5])
print(f"1 GPU {t1} s, 2 GPUs --zero 1 {t2} s (wall, start-up included); final weights max |diff| {diff:.3e}, moved {moved:.3e}")
sys.exit(0 if diff <= 0.05 * moved else 1)
PY
}

export -f part_env part_lm_head part_run part_multi_gpu
export bin tok work dev train_dev

small_train=()
[ "$big" = tiny ] && small_train=(--context 16 --segment 8 --prompt 8 --new-tokens 4)
run_part env 60 bash -c part_env
run_part selftest 180 "$bin" selftest --device "$dev"
run_part lm-head 60 bash -c part_lm_head
run_part ceiling 90 "$bin" bench ceiling --device "$dev" "${dry[@]}" --json "$work/ceiling.json"
ceil=()
[ -f "$work/ceiling.json" ] && ceil=(--ceiling "$work/ceiling.json")
run_part ops-smollm2 90 "$bin" bench ops --device "$dev" --precision f32 --shape "$small" "${ceil[@]}" --json "$work/ops-smollm2.json"
run_part train-f32 150 "$bin" bench train --device "$train_dev" --precision f32 --shape "$big" "${small_train[@]:0:4}" "${ceil[@]}" --json "$work/train-f32.json"
run_part decode 240 "$bin" bench decode --device "$train_dev" --precision f32 --shape "$big" "${small_train[@]:4:4}" "${ceil[@]}" --json "$work/decode.json"
run_part run 240 bash -c part_run
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if [ "$gpu" = 0 ] || [ "${GPU_CHECK_DRY:-0}" = 1 ] || [ "${ngpu:-0}" -ge 2 ]; then
  run_part multi-gpu 240 bash -c part_multi_gpu
else
  case " $parts " in *" multi-gpu "*) record multi-gpu skipped 0 "${ngpu:-0} GPU(s): the data-parallel check needs 2" ;; esac
fi
run_part anchor 150 python3 scripts/gpu-check/anchor.py "$work/anchor.json"
run_part ops-llama1b 120 "$bin" bench ops --device "$dev" --precision f32 --shape "$big" "${ceil[@]}" --json "$work/ops-llama1b.json"
run_part train-bf16 150 "$bin" bench train --device "$train_dev" --precision bf16 --shape "$big" "${small_train[@]:0:4}" "${ceil[@]}" --json "$work/train-bf16.json"

# Everything each part printed, in one file.
for f in "$work"/logs/*.log; do
  [ -f "$f" ] || continue
  echo "################ $(basename "$f" .log)"
  cat "$f"
done >"$out/gpu-check.log"
if command -v python3 >/dev/null 2>&1; then
  python3 scripts/gpu-check/summarize.py "$work" "$out" "$((SECONDS - start))"
else
  { echo '| part | status | s | message |'; echo '|---|---|---|---|'; sed 's/\t/ | /g; s/^/| /; s/$/ |/' "$work/parts.tsv"; } >"$out/gpu-check.md"
  echo '{"error": "python3 missing: see gpu-check.md"}' >"$out/gpu-check.json"
fi
cat "$out/gpu-check.md"
if cut -f2 "$work/parts.tsv" | grep -qv '^pass$'; then
  exit 1
fi
exit 0
