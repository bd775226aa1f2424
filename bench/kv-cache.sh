#!/usr/bin/env bash
# KV cache types: what q8_0 and q4_0 save in memory and cost in speed against f16, for
# llama.cpp on the SmolLM2-135M Q4_1 GGUF (release build). One agent, one slot, a
# 4096-token context; each round loads the model with each type in turn, then runs a
# long prompt (so decoding reads a long KV cache) through `modelctl bench`.
# Memory is the engine process's resident set (ListLoaded) after the load and after the
# long prompts filled the cache (pages of the cache count only once written), next to
# the agent's estimate.
#
#   bench/kv-cache.sh [ROUNDS]      (default 3; per round 3 runs, medians reported)
# Writes bench/results/kv-cache-<date>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
THREADS="${THREADS:-$(nproc)}"
CONTEXT=4096
PROMPT=2048
GEN=64
TYPES=(f16 q8_0 q4_0)

. bench/common.sh

start_agent --threads "$THREADS" --parallel 1 --context-length "$CONTEXT"
register_smol
for round in $(seq "$ROUNDS"); do
    for kv in "${TYPES[@]}"; do
        echo "bench: round $round, KV $kv" >&2
        ctl load smol --kv-cache-type "$kv" --context-length "$CONTEXT" --parallel 1 >/dev/null
        ctl -o json ps >"$work/ps-$kv-$round.json"
        ctl -o json bench smol --concurrency 1 --prompt-tokens "$PROMPT" --max-tokens "$GEN" \
            --runs 3 >"$work/bench-$kv-$round.json"
        ctl -o json ps >"$work/ps-after-$kv-$round.json"
        ctl unload smol >/dev/null
    done
done
stop_agent

mkdir -p bench/results
out="bench/results/kv-cache-$(date -u +%F).md"
python3 - "$work" "$THREADS" "$ROUNDS" "$CONTEXT" "$PROMPT" "$GEN" >"$out" <<'PY'
import datetime, json, platform, statistics, sys
work, threads, rounds, context, prompt, gen = sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:]
load = lambda f: json.load(open(f"{work}/{f}.json"))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"# KV cache types, {datetime.date.today()}")
print()
print(f"Machine: {cpu}, {threads} threads, {platform.system()} {platform.release()}. llama.cpp on "
      f"SmolLM2-135M-Instruct Q4_1, release build, one slot, context {context}, flash attention auto. "
      f"Prompt {prompt} tokens, {gen} generated, greedy; {rounds} rounds (each type in turn), "
      "3 runs per round; medians over rounds of the per-round medians. Memory: the engine "
      "process's resident set after the load (ListLoaded), and the agent's estimate.")
print()
print("| KV cache | resident after load | after the prompts | estimate | prompt tokens/s | generation tokens/s | prompt vs f16 | generation vs f16 |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
rows = {}
for kv in ("f16", "q8_0", "q4_0"):
    rss, full, est, pp, tg = [], [], [], [], []
    for r in range(1, rounds + 1):
        m = next(m for m in load(f"ps-{kv}-{r}")["models"] if m["modelId"] == "smol")
        rss.append(int(m.get("actualMemoryBytes", 0)))
        after = next(m for m in load(f"ps-after-{kv}-{r}")["models"] if m["modelId"] == "smol")
        full.append(int(after.get("actualMemoryBytes", 0)))
        est.append(int(m.get("estimatedMemoryBytes", 0)))
        b = load(f"bench-{kv}-{r}")[0]
        pp.append(b["prompt_tokens_per_second"])
        tg.append(b["generation_tokens_per_second"])
    rows[kv] = (statistics.median(rss), statistics.median(full), statistics.median(est), statistics.median(pp), statistics.median(tg), pp, tg)
base = rows["f16"]
for kv, (rss, full, est, pp, tg, pps, tgs) in rows.items():
    rp = [a / b for a, b in zip(pps, base[5])]
    rt = [a / b for a, b in zip(tgs, base[6])]
    print(f"| {kv} | {rss/2**20:.0f} MiB | {full/2**20:.0f} MiB | {est/2**20:.0f} MiB | {pp:.1f} | {tg:.1f} | "
          f"{statistics.median(rp):.2f}× ({min(rp):.2f}–{max(rp):.2f}) | {statistics.median(rt):.2f}× ({min(rt):.2f}–{max(rt):.2f}) |")
PY
cat "$out"
