#!/usr/bin/env bash
# Crash safety at scale: the end-to-end crash test with many rounds. Each round runs a
# random mix of operations against one agent and kills it with SIGKILL at a random
# moment; after each restart it checks that nothing acknowledged was lost, that no
# model is stuck in a transient state and that every blob is whole.
#
#   bench/crash.sh [ROUNDS] [SEED]      (default 100 rounds)
# Writes bench/results/crash-<date>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-100}"
SEED="${2:-$(date +%s)}"
scripts/fetch-test-assets >/dev/null
cargo build --workspace --bins --locked -q
started=$(date +%s)
status=0
out="$(MODELD_CRASH_ROUNDS="$ROUNDS" MODELD_CRASH_SEED="$SEED" \
    cargo test --locked -q -p modeld-e2e --test crash_safety -- --nocapture 2>&1)" || status=$?
seconds=$(( $(date +%s) - started ))
summary="$(grep -E 'kills:|panicked|round [0-9]+ of' <<<"$out" || true)"
mkdir -p bench/results
result="bench/results/crash-$(date -u +%F).md"
{
    echo "# Crash safety, $(date -u +%F)"
    echo
    echo "Machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores."
    echo "Rounds: $ROUNDS, seed $SEED, $seconds s (debug build)."
    echo
    echo '```'
    echo "$summary"
    echo '```'
} >"$result"
cat "$result"
exit $status
