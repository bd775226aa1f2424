#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers that read untrusted bytes: the GGUF and
# safetensors header readers, the protobuf reader behind ONNX (with the ONNX engine's
# external-data check), archive inspection and extraction, and the catalog parser.
#
#   bench/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default 600 s; all five targets)
#
# The engine is libFuzzer through `cargo fuzz`, on the stable toolchain: `--sanitizer
# none` needs no nightly flag, and Rust's own bounds and overflow checks (debug
# assertions are on) stand in for AddressSanitizer in safe code. Seed corpora come from
# the fixtures that scripts/gen-fixtures.py writes; the grown corpora and any crash
# artifacts stay under the cache directory. Writes bench/results/fuzz-<date>.md and
# exits non-zero when a target crashed: turn each artifact into a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET="${1:-600}"
shift || true
TARGETS=("$@")
[[ ${#TARGETS[@]} -gt 0 ]] || TARGETS=(gguf safetensors onnx archive catalog)
CACHE="${MODELD_CACHE_DIR:-$HOME/.cache/modeld}"
CARGO_FUZZ_VERSION=0.13.2

scripts/fetch-test-assets >/dev/null
fixtures="$CACHE/fixtures"
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    cargo install --locked --version "$CARGO_FUZZ_VERSION" cargo-fuzz
fi
export CARGO_TARGET_DIR="$CACHE/fuzz-target"
(cd fuzz && cargo fuzz build --sanitizer none --release --debug-assertions)

# seed DIR FILE...: copies the seeds that exist into DIR.
seed() {
    local dir="$1"
    shift
    mkdir -p "$dir"
    for f in "$@"; do [[ -f "$f" ]] && cp -- "$f" "$dir/"; done
    return 0
}

results=()
crashed=0
for target in "${TARGETS[@]}"; do
    corpus="$CACHE/fuzz/corpus/$target"
    artifacts="$CACHE/fuzz/artifacts/$target"
    mkdir -p "$corpus" "$artifacts"
    case "$target" in
        gguf) seed "$corpus" "$fixtures"/*.gguf "$fixtures"/corrupt/*.gguf ;;
        safetensors) seed "$corpus" "$fixtures"/single.safetensors "$fixtures"/hf-dir/model.safetensors \
            "$fixtures"/hostile-models/*/model.safetensors ;;
        onnx) seed "$corpus" "$fixtures"/tiny.onnx "$fixtures"/tiny.mlmodel \
            "$fixtures"/hostile-models/onnx-escape/model.onnx ;;
        archive) seed "$corpus" "$fixtures"/bundle.zip "$fixtures"/bundle.tar.gz "$fixtures"/hostile/* ;;
        catalog) seed "$corpus" "$fixtures"/catalogs/* server/node/catalog/builtin.yaml ;;
        *) echo "fuzz: unknown target $target" >&2; exit 2 ;;
    esac
    log="$CACHE/fuzz/$target.log"
    echo "fuzz: $target for ${SECONDS_PER_TARGET}s" >&2
    status=0
    # The archive and ONNX targets write each input to a file: keep that in memory.
    (cd fuzz && TMPDIR=/dev/shm cargo fuzz run --sanitizer none --release --debug-assertions "$target" "$corpus" -- \
        -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1 -rss_limit_mb=4096 \
        -artifact_prefix="$artifacts/") >"$log" 2>&1 || status=$?
    execs=$(grep -m1 'stat::number_of_executed_units' "$log" | awk '{print $2}')
    rate=$(grep -m1 'stat::average_exec_per_sec' "$log" | awk '{print $2}')
    last=$(grep -E '^#[0-9]+' "$log" | tail -1)
    cov=$(grep -oE 'cov: [0-9]+' <<<"$last" | awk '{print $2}')
    ft=$(grep -oE 'ft: [0-9]+' <<<"$last" | awk '{print $2}')
    units=$(find "$corpus" -type f | wc -l)
    if [[ $status -ne 0 ]]; then
        crashed=1
        outcome="crashed: $(ls -t "$artifacts" | head -1)"
        grep -m5 -E 'panicked|ERROR: libFuzzer' "$log" >&2 || true
    else
        outcome="no crash"
    fi
    results+=("| $target | $SECONDS_PER_TARGET | ${execs:-?} | ${rate:-?} | ${cov:-?} | ${ft:-?} | $units | $outcome |")
done

mkdir -p bench/results
result="bench/results/fuzz-$(date -u +%F).md"
{
    echo "# Fuzzing, $(date -u +%F)"
    echo
    echo "Machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores."
    echo "Engine: libFuzzer via cargo-fuzz $CARGO_FUZZ_VERSION, $(rustc --version | cut -d' ' -f1-2) (stable),"
    echo "\`--sanitizer none --release --debug-assertions\`, one job per target."
    echo "Coverage is libFuzzer's count of covered edges (cov) and features (ft) at the end."
    echo
    echo "| target | seconds | executions | execs/s | edges (cov) | features (ft) | corpus | result |"
    echo "|---|---:|---:|---:|---:|---:|---:|---|"
    printf '%s\n' "${results[@]}"
} >"$result"
cat "$result"
exit $crashed
