#!/usr/bin/env bash
# The LLM judge against a real OpenAI-compatible server that this project did not write
# (issue 14 item 4): llama.cpp's server from the PyPI sdist `llama-cpp-python[server]`
# (pinned, built once into a cached venv; about 15 minutes of compiling on 2 cores), serving the
# default model's GGUF on 127.0.0.1. Then, on a few validation prompts:
#   1. `ipo intervene --detector judge` and `--detector rules` on the same rollouts;
#   2. `ipo eval --judge llm` and `--judge rules` on the same answers;
# and writes OUTDIR/judge-server.md with the requests served and the agreement of the two judges.
#   scripts/judge-server.sh [OUTDIR] [N_PROMPTS]      (default runs/judge-server, 8 prompts)
# The judge here is SmolLM2-135M: the run proves the protocol (requests, parsing, errors, cache)
# on a real server, not the quality of a 135M judge; point --judge-url at a strong model for that.
set -euo pipefail
root="$(cd -P "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${1:-runs/judge-server}"
n_prompts="${2:-8}"
venv="${IPO_JUDGE_VENV:-$HOME/.cache/ipo/judge-venv}"
pin="llama-cpp-python[server]==0.3.36"
log() { echo "judge-server: $*" >&2; }

if ! "$venv/bin/python" -c "import llama_cpp.server" >/dev/null 2>&1; then
  log "building $pin into $venv (llama.cpp is compiled from source; this takes a while)"
  python3 -m venv "$venv"
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$venv/bin/pip" install --quiet --disable-pip-version-check "$pin" >&2
fi
model="$(bash scripts/fetch-default-model.sh)"
bash scripts/fetch-prompts.sh >/dev/null
gguf="${IPO_MODEL_CACHE:-$HOME/.cache/ipo/models}/.downloads/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$gguf" ] || { log "missing $gguf (scripts/fetch-default-model.sh should have left it)"; exit 1; }
ipo="${CARGO_TARGET_DIR:-$root/target}/release/ipo"

mkdir -p "$out"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
log "starting llama_cpp.server on 127.0.0.1:$port ($gguf)"
"$venv/bin/python" -m llama_cpp.server --model "$gguf" --model_alias judge --host 127.0.0.1 --port "$port" \
  --n_ctx 4096 --n_threads "$(nproc)" >"$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
python3 - "$port" <<'EOF'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/v1/models"
for _ in range(240):
    try:
        urllib.request.urlopen(url, timeout=2).read()
        sys.exit(0)
    except Exception:
        time.sleep(0.5)
sys.exit(f"judge-server: {url} did not answer within 120 s (see server.log)")
EOF
url="http://127.0.0.1:$port/v1"
judge=(--judge-url "$url" --judge-model judge --judge-concurrency 1 --judge-timeout 120)

head -n "$n_prompts" data/external/harmful.val.jsonl >"$out/harmful.jsonl"
head -n "$n_prompts" data/benign/benign.val.jsonl >"$out/benign.jsonl"
"$ipo" generate --model "$model" --prompts "$out/harmful.jsonl" --output "$out/rollouts.jsonl" \
  --n 2 --max-new-tokens 96 --seed 1
for d in rules judge; do
  extra=()
  [ "$d" = judge ] && extra=("${judge[@]}")
  "$ipo" intervene --model "$model" --rollouts "$out/rollouts.jsonl" --output "$out/pairs.$d.jsonl" \
    --triggers configs/demo-triggers.txt --max-new-tokens 48 --detector "$d" "${extra[@]}"
done
for j in rules llm; do
  extra=()
  [ "$j" = llm ] && extra=("${judge[@]}")
  "$ipo" eval --model "$model" --harmful "$out/harmful.jsonl" --benign "$out/benign.jsonl" \
    --output "$out/eval.$j" --max-new-tokens 96 --judge "$j" "${extra[@]}"
done
python3 scripts/judge_agreement.py "$out" | tee "$out/judge-server.md"
