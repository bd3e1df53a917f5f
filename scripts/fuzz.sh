#!/usr/bin/env bash
# Long fuzzing run of tests/fuzz.rs (issue 16): N mutated inputs per target (default 10^6;
# CI runs 2000 through the plain test suite). Prints, per target, the executions, how many were
# accepted whole, the time, the slowest input and the peak allocation, then every finding
# (each input is saved under target/fuzz-crashes/ as .bin and .hex).
#   scripts/fuzz.sh [N] [seed]      e.g. scripts/fuzz.sh 100000 7
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-1000000}"
SEED="${2:-${IPO_FUZZ_SEED:-0}}"
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
echo "fuzz: $N executions per target, seed $SEED"
start=$(date +%s)
rc=0
IPO_FUZZ_EXECS="$N" IPO_FUZZ_SEED="$SEED" cargo test --release --test fuzz -- --nocapture >"$LOG" 2>&1 || rc=$?
# Test progress and panic messages interleave with the summaries; keep the summaries.
grep -o 'fuzz [a-z]*: .*' "$LOG" | grep -v 'FINDING' | sort || true
echo "findings:"
grep -o 'fuzz [a-z]*: FINDING.*' "$LOG" || echo "  none"
echo "wall time: $(( $(date +%s) - start )) s, exit status $rc"
if [ "$rc" -ne 0 ]; then
    tail -n 40 "$LOG"
fi
exit "$rc"
