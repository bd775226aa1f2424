#!/usr/bin/env bash
# Conversation benchmark: a 10-turn greedy chat through the agent's Generate path
# (what `modelctl chat` sends: the whole conversation every turn), each turn timed
# with the prompt cache and, in the same run, without it (`cache_prompt: false`),
# on the release build with SmolLM2-135M Q4_1. Reports per turn the prompt, what the
# cache gave, the time to first token both ways (median of RUNS fresh agents) and
# whether the two replies were the same token for token.
#
#   bench/conversation.sh [RUNS]      (default 3)
# Writes bench/results/conversation-<date>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-3}"
TURNS=10
THREADS="${THREADS:-$(nproc)}"
CONTEXT=4096
REPLY=128

. bench/common.sh

for run in $(seq "$RUNS"); do
    echo "bench: run $run of $RUNS" >&2
    start_agent --threads "$THREADS" --context-length "$CONTEXT"
    register_smol
    ctl load smol >/dev/null
    ctl -o json bench smol --conversation "$TURNS" --max-tokens "$REPLY" >"$work/run-$run.json"
    stop_agent
done

mkdir -p bench/results
out="bench/results/conversation-$(date -u +%F).md"
python3 - "$work" "$RUNS" "$THREADS" "$REPLY" >"$out" <<'PY'
import datetime, json, platform, statistics, sys
work, runs, threads, reply = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
data = [json.load(open(f"{work}/run-{r}.json")) for r in range(1, runs + 1)]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"# Conversation benchmark, {datetime.date.today()}")
print()
print(f"Machine: {cpu}, {threads} threads, {platform.system()} {platform.release()}. "
      f"Model: SmolLM2-135M-Instruct Q4_1. Release build, default --parallel. A {len(data[0])}-turn greedy "
      f"chat, replies up to {reply} tokens, the whole conversation sent every turn, first with "
      f"the prompt cache, then without it (`cache_prompt: false`); time to first token at the "
      f"client, median of {runs} runs on fresh agents.")
print()
print("| turn | prompt tokens | new since last turn | from the cache | TTFT with cache | TTFT without | same reply |")
print("|---:|---:|---:|---:|---:|---:|---|")
last = 0
same_all = True
for i, turn in enumerate(data[0]):
    rows = [d[i] for d in data]
    cached = statistics.median(r["time_to_first_token_ms_cached"] for r in rows)
    fresh = statistics.median(r["time_to_first_token_ms_uncached"] for r in rows)
    same = all(r["same_reply"] for r in rows)
    same_all &= same
    print(f"| {turn['turn']} | {turn['prompt_tokens']} | {turn['prompt_tokens'] - last} | "
          f"{turn['cached_prompt_tokens']} | {cached:.0f} ms | {fresh:.0f} ms | {'yes' if same else 'NO'} |")
    last = turn["prompt_tokens"]
print()
first, final = data[0][0], data[0][-1]
def med(i, k): return statistics.median(d[i][k] for d in data)
print(f"Last turn: {med(-1, 'time_to_first_token_ms_cached'):.0f} ms with the cache against "
      f"{med(-1, 'time_to_first_token_ms_uncached'):.0f} ms without, for a {final['prompt_tokens']}-token prompt. "
      f"Replies the same with and without the cache in every turn of every run: {'yes' if same_all else 'NO'}.")
PY
cat "$out"
