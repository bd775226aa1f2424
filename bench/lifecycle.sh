#!/usr/bin/env bash
# Lifecycle benchmark, in one run on the same file:
#   - Load-to-READY through gRPC (`modelctl load`, the model already stored) against
#     llama.cpp loading the same GGUF (`llama-batched-bench` with one 1-token prompt:
#     process start, model load, context, one decode), cold (page cache dropped, when
#     the kernel lets us) and warm;
#   - the agent's startup-to-SERVING time and idle RSS.
#
#   bench/lifecycle.sh [RUNS]     (default 5; medians are reported)
# Writes bench/results/lifecycle-<date>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-5}"

. bench/common.sh
tools="$(bench/build-llama-tools.sh)"

now() { date +%s.%N; }
calc() { python3 -c "print($1)"; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; }
cold=yes
drop_caches || cold=no

port="$(free_port)"
addr="127.0.0.1:$port"
ctl() { "$modelctl" --addr "http://$addr" "$@"; }

# Startup to SERVING and idle RSS, on a fresh data directory each time.
for i in $(seq "$RUNS"); do
    rm -rf "$work/data"
    start="$(now)"
    "$modeld" --listen "$addr" --data-dir "$work/data" --log info 2>"$work/agent.log" &
    agent_pid=$!
    until grep -q '"serving"\|serving$\| serving' "$work/agent.log" 2>/dev/null; do sleep 0.002; done
    end="$(now)"
    calc "$end - $start" >>"$work/startup"
    sleep 1
    awk '/VmRSS/ {print $2}' "/proc/$agent_pid/status" >>"$work/idle_rss_kb"
    kill "$agent_pid"; wait "$agent_pid" 2>/dev/null || true; agent_pid=
done

# Load-to-READY.
"$modeld" --listen "$addr" --data-dir "$work/data" --log warn --context-length 512 --parallel 1 \
    --allow-dir "$(dirname "$MODELD_TEST_GGUF")" &
agent_pid=$!
for _ in $(seq 100); do ctl node info >/dev/null 2>&1 && break; sleep 0.1; done
sha="$(sha256sum "$MODELD_TEST_GGUF" | cut -d' ' -f1)"
ctl models register --id smol --url "file://$MODELD_TEST_GGUF" --sha256 "$sha" \
    --size "$(stat -c %s "$MODELD_TEST_GGUF")" >/dev/null
ctl pull smol >/dev/null
blob="$work/data/blobs/sha256/$sha"
for mode in cold warm; do
    [[ "$mode" == cold && "$cold" == no ]] && continue
    for i in $(seq "$RUNS"); do
        [[ "$mode" == cold ]] && drop_caches
        start="$(now)"; ctl load smol >/dev/null 2>&1; end="$(now)"
        calc "$end - $start" >>"$work/load_$mode"
        ctl unload smol >/dev/null
        [[ "$mode" == cold ]] && drop_caches
        start="$(now)"
        "$tools/llama-batched-bench" -m "$blob" -c 512 -npp 1 -ntg 1 -npl 1 >/dev/null 2>&1
        end="$(now)"
        calc "$end - $start" >>"$work/llama_$mode"
    done
done
kill "$agent_pid"; wait "$agent_pid" 2>/dev/null || true; agent_pid=

out="bench/results/lifecycle-$(date -u +%F).md"
cpu="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
{
    echo "# Lifecycle benchmark, $(date -u +%F)"
    echo
    echo "Machine: $cpu, $(nproc) cores, $(uname -sr). Release build. Median of $RUNS runs."
    echo "Model: SmolLM2-135M-Instruct Q4_1 (98 MB), 512-token context, one slot."
    echo
    echo "| | modeld | llama.cpp | ratio | target |"
    echo "|---|---:|---:|---:|---:|"
    for mode in cold warm; do
        [[ -f "$work/load_$mode" ]] || continue
        a="$(median <"$work/load_$mode")"; b="$(median <"$work/llama_$mode")"
        printf '| Load to READY, %s cache | %.0f ms | %.0f ms | %.2f× | ≤ 1.1× |\n' "$mode" \
            "$(calc "$a*1000")" "$(calc "$b*1000")" "$(calc "$a/$b")"
    done
    printf '| startup to SERVING | %.0f ms | | | ≤ 200 ms |\n' "$(calc "$(median <"$work/startup")*1000")"
    printf '| idle RSS | %.1f MiB | | | ≤ 25 MB |\n' "$(calc "$(median <"$work/idle_rss_kb")/1024")"
    echo
    [[ "$cold" == no ]] && echo "The page cache could not be dropped here (no permission): only warm loads were measured." && echo
    echo "llama.cpp's time is a whole \`llama-batched-bench\` process: start, load, context, one decode."
    echo "modeld's is a \`modelctl load\` process: start, gRPC, checks, load, context, tokenizer."
} >"$out"
cat "$out"
