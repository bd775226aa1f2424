#!/usr/bin/env bash
# What observability costs on the token path: the same release agent, same model
# (SmolLM2-135M Q4_1), same run, in interleaved rounds, three ways:
#
#   off         no export, no /metrics (the default): the reference;
#   otlp        traces and metrics exported over OTLP/gRPC to a local receiver (a
#               Python gRPC server that takes the collector's Export calls and counts
#               their bytes), every span sampled, metrics every second;
#   prometheus  /metrics served and scraped every second by curl.
#
# Measured through the full gRPC stream with `modelctl bench`: one stream (generation
# tokens/s from an empty context, prompt tokens/s of a 128-token prompt, time to first
# token) and 4 concurrent streams (aggregate generation tokens/s).
#
#   bench/telemetry.sh [ROUNDS]      (default 3 rounds of 3 runs each)
# Writes bench/results/telemetry-<date>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
RUNS=3
THREADS="${THREADS:-$(nproc)}"
PROMPT=128
GEN=64
CONTEXT=1024

. bench/common.sh

# The receiver: the collector's two Export methods, answered with an empty response
# (what an ExportServiceResponse with nothing rejected encodes to).
receiver_port="$(free_port)"
"$MODELD_PYTHON" - "$receiver_port" "$work/received" <<'PY' &
import sys, threading, time
from concurrent import futures
import grpc
port, out = sys.argv[1], sys.argv[2]
lock, seen = threading.Lock(), {"calls": 0, "bytes": 0}
def export(request, context):
    with lock:
        seen["calls"] += 1
        seen["bytes"] += len(request)
        open(out, "w").write(f'{seen["calls"]} {seen["bytes"]}\n')
    return b""
methods = {"Export": grpc.unary_unary_rpc_method_handler(export, lambda b: b, lambda b: b)}
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
for service in ["opentelemetry.proto.collector.trace.v1.TraceService",
                "opentelemetry.proto.collector.metrics.v1.MetricsService"]:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, methods),))
server.add_insecure_port(f"127.0.0.1:{port}")
server.start()
server.wait_for_termination()
PY
server_pid=$!

for round in $(seq "$ROUNDS"); do
    for kind in off otlp prometheus; do
        echo "bench: round $round, $kind" >&2
        extra=()
        case "$kind" in
            otlp) extra=(--otlp-endpoint "http://127.0.0.1:$receiver_port" --otlp-export-interval-ms 1000) ;;
            prometheus) metrics_port="$(free_port)"; extra=(--metrics-listen "127.0.0.1:$metrics_port") ;;
        esac
        OTEL_BSP_SCHEDULE_DELAY=1000 start_agent --threads "$THREADS" --parallel 4 \
            --context-length "$CONTEXT" "${extra[@]}"
        register_smol
        ctl load smol >/dev/null
        scraper=
        if [[ "$kind" == prometheus ]]; then
            (while sleep 1; do curl -s "http://127.0.0.1:$metrics_port/metrics" >/dev/null || true; done) &
            scraper=$!
        fi
        ctl -o json bench smol --concurrency 1 --prompt-tokens 1 --max-tokens "$GEN" \
            --runs "$RUNS" >"$work/$kind-tg-$round.json"
        ctl -o json bench smol --concurrency 1 --prompt-tokens "$PROMPT" --max-tokens "$GEN" \
            --runs "$RUNS" >"$work/$kind-pp-$round.json"
        ctl -o json bench smol --concurrency 4 --prompt-tokens "$PROMPT" --max-tokens "$GEN" \
            --runs "$RUNS" >"$work/$kind-c4-$round.json"
        [[ -n "$scraper" ]] && kill "$scraper" 2>/dev/null
        stop_agent
    done
done

mkdir -p bench/results
out="bench/results/telemetry-$(date -u +%F).md"
python3 - "$work" "$THREADS" "$ROUNDS" "$RUNS" >"$out" <<'PY'
import json, platform, statistics, sys, datetime
work, threads, rounds, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
def load(p): return json.load(open(f"{work}/{p}"))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"# Observability overhead, {datetime.date.today()}")
print()
print(f"Machine: {cpu}, {threads} threads, {platform.system()} {platform.release()}. "
      "Model: SmolLM2-135M-Instruct Q4_1. Release build, 4 parallel slots. "
      f"{rounds} interleaved rounds (off, otlp, prometheus) of {runs} runs; per round the median "
      "of its runs, then the median over rounds, and the range of the per-round ratios to `off`. "
      "otlp: every span exported (OTLP/gRPC to a local receiver), metrics every 1 s; "
      "prometheus: /metrics scraped every 1 s.")
print()
print("| measure | off | otlp | prometheus | otlp / off | prometheus / off |")
print("|---|---:|---:|---:|---:|---:|")
tests = [("generation tokens/s, one stream", "tg", "generation_tokens_per_second", True),
         ("prompt tokens/s, one stream", "pp", "prompt_tokens_per_second", True),
         ("time to first token (ms), one stream, 128-token prompt", "pp", "time_to_first_token_ms", False),
         ("aggregate generation tokens/s, 4 streams", "c4", "generation_tokens_per_second", True)]
for what, test, field, _ in tests:
    per = {k: [load(f"{k}-{test}-{r}.json")[0][field] for r in range(1, rounds + 1)] for k in ["off", "otlp", "prometheus"]}
    cells = [f"{statistics.median(per[k]):.1f}" for k in ["off", "otlp", "prometheus"]]
    ratios = []
    for k in ["otlp", "prometheus"]:
        r = [a / b for a, b in zip(per[k], per["off"])]
        ratios.append(f"{statistics.median(r):.3f}× ({min(r):.3f}–{max(r):.3f})")
    print(f"| {what} | " + " | ".join(cells + ratios) + " |")
received = open(f"{work}/received").read().split() if __import__("os").path.exists(f"{work}/received") else ["0", "0"]
print()
print(f"The receiver took {received[0]} Export calls, {int(received[1]) / 1024:.0f} KiB in all.")
PY
echo "bench: wrote $out" >&2
cat "$out"
