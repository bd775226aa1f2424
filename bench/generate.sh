#!/usr/bin/env bash
# Inference benchmark: the agent through the full gRPC stream against llama.cpp's own
# tools, same model (SmolLM2-135M Q4_1), same thread count, same run.
#
#   - prompt and generation tokens/s of one stream vs `llama-bench`;
#   - time to first token at the client minus the engine's own (gRPC + queueing);
#   - aggregate tokens/s with 1, 4 and 8 concurrent streams vs `llama-batched-bench`
#     at the same parallel levels (continuous batching);
#   - peak RSS of the agent and of llama-bench.
#
#   bench/generate.sh [RUNS]      (default 5 runs per level; medians are reported)
# Writes bench/results/generate-<date>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-5}"
THREADS="${THREADS:-$(nproc)}"
PROMPT=128
GEN=64
LEVELS=1,4,8
CONTEXT=1024

. bench/common.sh
tools="$(bench/build-llama-tools.sh)"

start_agent --threads "$THREADS" --parallel 8 --context-length "$CONTEXT"
register_smol
ctl load smol >/dev/null

echo "bench: modeld through gRPC ($RUNS runs per level)" >&2
# Generation from an empty context, as llama-bench's tg test measures it.
ctl -o json bench smol --concurrency 1 --prompt-tokens 1 --max-tokens "$GEN" \
    --runs "$RUNS" >"$work/modeld-tg.json"
ctl -o json bench smol --concurrency "$LEVELS" --prompt-tokens "$PROMPT" --max-tokens "$GEN" \
    --runs "$RUNS" >"$work/modeld.json"
agent_rss_kb="$(awk '/VmHWM/ {print $2}' "/proc/$agent_pid/status")"
stop_agent

echo "bench: llama-bench" >&2
/usr/bin/time -f "%M" -o "$work/llama-bench.rss" "$tools/llama-bench" -m "$MODELD_TEST_GGUF" \
    -t "$THREADS" -p "$PROMPT" -n "$GEN" -r "$RUNS" -o json >"$work/llama-bench.json" 2>/dev/null
echo "bench: llama-batched-bench" >&2
"$tools/llama-batched-bench" -m "$MODELD_TEST_GGUF" -t "$THREADS" -c $((CONTEXT * 8)) -b 512 -ub 512 \
    -npp "$PROMPT" -ntg "$GEN" -npl "$LEVELS" --output-format jsonl >"$work/batched.jsonl" 2>/dev/null

mkdir -p bench/results
out="bench/results/generate-$(date -u +%F).md"
python3 - "$work" "$agent_rss_kb" "$THREADS" "$RUNS" >"$out" <<'PY'
import json, platform, subprocess, sys, datetime
work, agent_rss_kb, threads, runs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ours = {l["concurrency"]: l for l in json.load(open(f"{work}/modeld.json"))}
ours_tg = json.load(open(f"{work}/modeld-tg.json"))[0]
lb = json.load(open(f"{work}/llama-bench.json"))
pp = next(r["avg_ts"] for r in lb if r["n_gen"] == 0)
tg = next(r["avg_ts"] for r in lb if r["n_prompt"] == 0)
lb_rss_kb = int(open(f"{work}/llama-bench.rss").read().split()[-1])
batched = {}
for line in open(f"{work}/batched.jsonl"):
    line = line.strip()
    if line.startswith("{"):
        r = json.loads(line)
        if "pl" in r:
            batched[r["pl"]] = r
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
one = ours[1]
print(f"# Inference benchmark, {datetime.date.today()}")
print()
print(f"Machine: {cpu}, {threads} threads, {platform.system()} {platform.release()}. "
      f"Model: SmolLM2-135M-Instruct Q4_1 (98 MB). Release build, `-C target-cpu=native`. "
      f"Prompt 128 tokens, 64 generated (end-of-sequence ignored), greedy; median of {runs} runs. "
      "Generation vs llama-bench starts from an empty context (a 1-token prompt), as its tg test does; "
      "prompt tokens/s is the prompt over the client's time to first token.")
print()
print("## One stream vs llama-bench")
print()
print("| | modeld (gRPC) | llama-bench | ratio |")
print("|---|---:|---:|---:|")
print(f"| prompt tokens/s | {one['prompt_tokens_per_second']:.1f} | {pp:.1f} | {one['prompt_tokens_per_second']/pp:.2f}× |")
print(f"| generation tokens/s | {ours_tg['generation_tokens_per_second']:.1f} | {tg:.1f} | {ours_tg['generation_tokens_per_second']/tg:.2f}× |")
print(f"| peak RSS | {agent_rss_kb/1024:.0f} MiB | {lb_rss_kb/1024:.0f} MiB | |")
print()
print(f"Time to first token through gRPC: {one['time_to_first_token_ms']:.1f} ms, of which "
      f"{one['time_to_first_token_overhead_ms']:.2f} ms is outside the engine "
      "(tokenizing, gRPC, queue hand-off).")
print()
print("## Concurrent streams vs llama-batched-bench")
print()
print("Generation tokens/s summed over streams while all of them generate (batched-bench's S_TG), "
      "and all tokens over wall time (its S).")
print()
print("| streams | modeld gen t/s | batched-bench S_TG | ratio | modeld total t/s | batched-bench S | ratio |")
print("|---:|---:|---:|---:|---:|---:|---:|")
for n in sorted(ours):
    o, b = ours[n], batched.get(n)
    if not b:
        continue
    print(f"| {n} | {o['generation_tokens_per_second']:.1f} | {b['speed_tg']:.1f} | "
          f"{o['generation_tokens_per_second']/b['speed_tg']:.2f}× | {o['total_tokens_per_second']:.1f} | "
          f"{b['speed']:.1f} | {o['total_tokens_per_second']/b['speed']:.2f}× |")
if 1 in ours and 8 in ours:
    print()
    print(f"Scaling 1 → 8 streams: modeld {ours[8]['generation_tokens_per_second']/ours[1]['generation_tokens_per_second']:.2f}×, "
          f"llama-batched-bench {batched[8]['speed_tg']/batched[1]['speed_tg']:.2f}×.")
PY
cat "$out"
