#!/usr/bin/env bash
# Inference benchmark: the agent through the full gRPC stream against llama.cpp's own
# tools, same model (SmolLM2-135M Q4_1), same thread count, same run, for both builds
# of the agent:
#
#   portable  the default build: every llama.cpp CPU variant, the best picked at
#             startup; compared with llama-bench built the same way;
#   native    scripts/build-native (tuned for this CPU, AMX off); compared with a
#             native llama-bench.
#
#   - prompt and generation tokens/s of one stream vs llama-bench, in interleaved
#     rounds (agent, reference, next build...), since this VM drifts by more than the
#     gaps between runs; medians and the range of the per-round ratios are reported;
#   - time to first token at the client minus the engine's own (gRPC + queueing);
#   - aggregate tokens/s of the portable build with 1, 4 and 8 concurrent streams vs
#     `llama-batched-bench` at the same parallel levels (continuous batching), with
#     the streams starting together as batched-bench's do, and again arriving
#     STAGGER_MS apart (no reference does that; modeld against itself);
#   - the cost of the process boundary: the portable build with its models in
#     engine processes (the default) against the same build with
#     --engine-isolation in-process, in the same rounds: generation tokens/s and
#     time to first token;
#   - peak memory of the agent with its engine process and of llama-bench, both
#     sampled by bench/peak-memory.py (proportional set size: what the two processes
#     share counts once), at llama-bench's context (prompt + generated, padded to
#     256 as llama.cpp pads it).
#
#   bench/generate.sh [ROUNDS]      (default 4 rounds of 3 runs each)
#   NATIVE=0 bench/generate.sh      the portable build alone (the native one compiles
#                                   the whole agent again, about 35 minutes on 2 cores)
# Writes bench/results/generate-<date>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-4}"
RUNS=3
# The agent runs with its default thread count (one per physical core it may use), as
# a user's does, and the reference tools get the count the agent reports in ListLoaded;
# THREADS=N gives both N.
agent_threads=()
if [[ -n "${THREADS:-}" ]]; then agent_threads=(--threads "$THREADS"); fi
PROMPT=128
GEN=64
LEVELS=1,4,8
CONTEXT=1024
# Arrival spacing of the staggered ramp: about one decode step of 8 streams here.
STAGGER_MS=100
# llama-bench's context is its prompt plus its generated tokens, padded to 256.
ONE_STREAM_CONTEXT=$(((PROMPT + GEN + 255) / 256 * 256))

. bench/common.sh
kinds=(portable inproc)
declare -A agent_bins=([portable]="$modeld" [inproc]="$modeld")
declare -A agent_args=([portable]="" [inproc]="--engine-isolation in-process" [native]="")
declare -A tools=([portable]="$(bench/build-llama-tools.sh portable)")
if [[ "${NATIVE:-1}" != 0 ]]; then
    kinds+=(native)
    agent_bins[native]="$(scripts/build-native)/modeld"
    tools[native]="$(bench/build-llama-tools.sh native)"
fi

for round in $(seq "$ROUNDS"); do
    for kind in "${kinds[@]}"; do
        echo "bench: round $round, $kind: modeld through gRPC" >&2
        # shellcheck disable=SC2086 # the extra arguments are words
        agent_bin="${agent_bins[$kind]}" start_agent "${agent_threads[@]}" --parallel 1 --context-length "$ONE_STREAM_CONTEXT" ${agent_args[$kind]}
        bench/peak-memory.py "$agent_pid" "$work/$kind-rss-$round" &
        sampler=$!
        register_smol
        ctl load smol >/dev/null
        ctl -o json node info >"$work/$kind-caps.json"
        THREADS="$(ctl -o json ps | python3 -c 'import json,sys; print(json.load(sys.stdin)["models"][0]["threads"])')"
        # Generation from an empty context, as llama-bench's tg test measures it.
        ctl -o json bench smol --concurrency 1 --prompt-tokens 1 --max-tokens "$GEN" \
            --runs "$RUNS" >"$work/$kind-tg-$round.json"
        ctl -o json bench smol --concurrency 1 --prompt-tokens "$PROMPT" --max-tokens "$GEN" \
            --runs "$RUNS" >"$work/$kind-pp-$round.json"
        kill -TERM "$sampler"
        wait "$sampler"
        stop_agent
        if [[ "$kind" == inproc ]]; then continue; fi
        echo "bench: round $round, $kind: llama-bench" >&2
        "${tools[$kind]}/llama-bench" -m "$MODELD_TEST_GGUF" -t "$THREADS" -p "$PROMPT" -n "$GEN" \
            -r "$RUNS" -o json >"$work/$kind-lb-$round.json" 2>/dev/null &
        reference=$!
        bench/peak-memory.py "$reference" "$work/$kind-lb-rss-$round"
        wait "$reference"
    done
done

# Concurrent streams in rounds too, agent then batched-bench: this VM drifts by more
# than the gaps measured, so only per-round ratios compare like with like.
for round in $(seq "$ROUNDS"); do
    echo "bench: round $round, portable, concurrent streams" >&2
    start_agent "${agent_threads[@]}" --parallel 8 --context-length "$CONTEXT"
    register_smol
    ctl load smol >/dev/null
    ctl -o json bench smol --concurrency "$LEVELS" --prompt-tokens "$PROMPT" --max-tokens "$GEN" \
        --runs "$RUNS" >"$work/levels-$round.json"
    if [[ "$round" == 1 ]]; then
        # The other ramp: requests arriving one after another, as a server sees them.
        ctl -o json bench smol --concurrency "$LEVELS" --prompt-tokens "$PROMPT" --max-tokens "$GEN" \
            --runs "$RUNS" --stagger-ms "$STAGGER_MS" >"$work/levels-staggered.json"
    fi
    stop_agent
    echo "bench: round $round, llama-batched-bench (portable)" >&2
    "${tools[portable]}/llama-batched-bench" -m "$MODELD_TEST_GGUF" -t "$THREADS" -c $((CONTEXT * 8)) -b 512 -ub 512 \
        -npp "$PROMPT" -ntg "$GEN" -npl "$LEVELS" --output-format jsonl >"$work/batched-$round.jsonl" 2>/dev/null
done

mkdir -p bench/results
out="bench/results/generate-$(date -u +%F).md"
python3 - "$work" "$THREADS" "$ROUNDS" "$RUNS" "$ONE_STREAM_CONTEXT" "$STAGGER_MS" >"$out" <<'PY'
import json, os, platform, statistics, sys, datetime
work, threads, rounds, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
def load(p): return json.load(open(f"{work}/{p}"))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
amx = "with AMX" if "amx_int8" in flags else "without AMX"
print(f"# Inference benchmark, {datetime.date.today()}")
print()
print(f"Machine: {cpu} ({amx}), {threads} threads, {platform.system()} {platform.release()}. "
      f"Model: SmolLM2-135M-Instruct Q4_1 (98 MB). Release builds. Prompt 128 tokens, 64 generated "
      f"(end-of-sequence ignored), greedy. {rounds} interleaved rounds of {runs} runs "
      "(agent, its llama-bench, then the other build); per round the median of its runs, "
      "then the median over rounds, and the range of the per-round ratios. "
      "Generation vs llama-bench starts from an empty context (a 1-token prompt), as its tg test does; "
      "prompt tokens/s is the prompt over the client's time to first token. "
      f"One-stream runs use llama-bench's context ({sys.argv[5]} tokens); peak memory is the "
      "largest proportional set size of the agent with its engine process (shared pages once), "
      "sampled every 100 ms, and of llama-bench by the same sampler. llama-bench and "
      "llama-batched-bench are built by bench/build-llama-tools.sh over the llama.cpp the agent links.")
print()
print("## One stream vs llama-bench, portable and native builds")
print()
print("| build | llama.cpp kernels chosen | | modeld (gRPC) | llama-bench | ratio (median, range) |")
print("|---|---|---|---:|---:|---:|")
summary = {}
for kind in [k for k in ["portable", "native"] if os.path.exists(f"{work}/{k}-caps.json")]:
    caps = load(f"{kind}-caps.json")
    rt = next(r for r in caps["runtimes"] if r["runtime"] == "RUNTIME_LLAMA_CPP")
    v = rt.get("cpuVariant", {})
    kernels = f"{v.get('name', '?')} ({v.get('dispatch', '?').replace('CPU_DISPATCH_', '').lower()})"
    pp, tg, lpp, ltg, rss, lrss = [], [], [], [], [], []
    for r in range(1, rounds + 1):
        pp.append(load(f"{kind}-pp-{r}.json")[0]["prompt_tokens_per_second"])
        tg.append(load(f"{kind}-tg-{r}.json")[0]["generation_tokens_per_second"])
        lb = load(f"{kind}-lb-{r}.json")
        lpp.append(next(x["avg_ts"] for x in lb if x["n_gen"] == 0))
        ltg.append(next(x["avg_ts"] for x in lb if x["n_prompt"] == 0))
        rss.append(int(open(f"{work}/{kind}-rss-{r}").read()))
        lrss.append(int(open(f"{work}/{kind}-lb-rss-{r}").read().split()[-1]))
    for what, ours, ref in [("prompt tokens/s", pp, lpp), ("generation tokens/s", tg, ltg)]:
        ratios = [o / f for o, f in zip(ours, ref)]
        print(f"| {kind} | {kernels} | {what} | {statistics.median(ours):.1f} | {statistics.median(ref):.1f} | "
              f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f}) |")
    print(f"| {kind} | | peak memory (Pss; agent + engine process) | {max(rss)/1024:.0f} MiB | {max(lrss)/1024:.0f} MiB | "
          f"{max(rss)/max(lrss):.2f}× |")
    summary[kind] = (statistics.median(pp), statistics.median(tg), statistics.median(lpp), statistics.median(ltg))
if "native" in summary:
    p, n = summary["portable"], summary["native"]
    print()
    print(f"Native over portable: modeld prompt {n[0]/p[0]:.2f}×, generation {n[1]/p[1]:.2f}×; "
          f"llama-bench prompt {n[2]/p[2]:.2f}×, generation {n[3]/p[3]:.2f}×.")
else:
    print()
    print("The native build was not measured in this run (NATIVE=0).")
print()
print("## The process boundary (portable build)")
print()
print("Each model runs in its own engine process by default; `--engine-isolation in-process` "
      "runs it inside the agent. Same binary, same rounds.")
print()
print("| | engine process | in-process | ratio or difference (median, range) |")
print("|---|---:|---:|---:|")
def per_round(kind, test, field):
    return [load(f"{kind}-{test}-{r}.json")[0][field] for r in range(1, rounds + 1)]
for what, test, field in [("generation tokens/s", "tg", "generation_tokens_per_second"),
                          ("prompt tokens/s", "pp", "prompt_tokens_per_second")]:
    a, b = per_round("portable", test, field), per_round("inproc", test, field)
    ratios = [x / y for x, y in zip(a, b)]
    print(f"| {what} | {statistics.median(a):.1f} | {statistics.median(b):.1f} | "
          f"{statistics.median(ratios):.3f}× ({min(ratios):.3f}–{max(ratios):.3f}) |")
a = per_round("portable", "tg", "time_to_first_token_ms")
b = per_round("inproc", "tg", "time_to_first_token_ms")
diffs = [x - y for x, y in zip(a, b)]
print(f"| time to first token, 1-token prompt | {statistics.median(a):.2f} ms | {statistics.median(b):.2f} ms | "
      f"{statistics.median(diffs):+.2f} ms ({min(diffs):+.2f} to {max(diffs):+.2f}) |")
rp = max(int(open(f"{work}/portable-rss-{r}").read()) for r in range(1, rounds + 1))
ri = max(int(open(f"{work}/inproc-rss-{r}").read()) for r in range(1, rounds + 1))
print(f"| peak memory (Pss, agent + engine process) | {rp/1024:.0f} MiB | {ri/1024:.0f} MiB | {(rp-ri)/1024:+.0f} MiB |")
print()
print("## Concurrent streams vs llama-batched-bench (portable builds)")
print()
rounds_ours = [{l["concurrency"]: l for l in load(f"levels-{r}.json")} for r in range(1, rounds + 1)]
rounds_batched = []
for r in range(1, rounds + 1):
    batched = {}
    for line in open(f"{work}/batched-{r}.jsonl"):
        line = line.strip()
        if line.startswith("{"):
            b = json.loads(line)
            if "pl" in b:
                batched[b["pl"]] = b
    rounds_batched.append(batched)
ours = rounds_ours[0]
one = ours[1]
print(f"Time to first token through gRPC (round 1): {one['time_to_first_token_ms']:.1f} ms, of which "
      f"{one['time_to_first_token_overhead_ms']:.2f} ms is outside the engine "
      "(tokenizing, gRPC, queue hand-off).")
print()
print("Generation tokens/s summed over streams while all of them generate (batched-bench's S_TG), "
      "and all tokens over wall time (its S); medians over rounds, ratio as the median (range) of "
      "the per-round ratios.")
print()
print("| streams | modeld gen t/s | batched-bench S_TG | ratio | modeld total t/s | batched-bench S | ratio |")
print("|---:|---:|---:|---:|---:|---:|---:|")
def spread(xs):
    return f"{statistics.median(xs):.2f}× ({min(xs):.2f}–{max(xs):.2f})"
for n in sorted(ours):
    pairs = [(o[n], b[n]) for o, b in zip(rounds_ours, rounds_batched) if n in o and n in b]
    if not pairs:
        continue
    gen = [o["generation_tokens_per_second"] for o, _ in pairs]
    stg = [b["speed_tg"] for _, b in pairs]
    tot = [o["total_tokens_per_second"] for o, _ in pairs]
    sp = [b["speed"] for _, b in pairs]
    print(f"| {n} | {statistics.median(gen):.1f} | {statistics.median(stg):.1f} | "
          f"{spread([x / y for x, y in zip(gen, stg)])} | {statistics.median(tot):.1f} | "
          f"{statistics.median(sp):.1f} | {spread([x / y for x, y in zip(tot, sp)])} |")
print()
print(f"### Staggered arrival: streams starting {sys.argv[6]} ms apart")
print()
print("No reference tool starts its sequences apart, so this compares modeld with itself: the "
      "streams' own generation rates (first token to last) summed, and all tokens over wall time, "
      "for both ramps (round 1).")
print()
print("| streams | together: streams' gen t/s | staggered: streams' gen t/s | together: total t/s | staggered: total t/s | staggered TTFT of the first stream |")
print("|---:|---:|---:|---:|---:|---:|")
staggered = {l["concurrency"]: l for l in load("levels-staggered.json")}
for n in sorted(ours):
    o, t = ours[n], staggered.get(n)
    if not t:
        continue
    print(f"| {n} | {o['summed_stream_tokens_per_second']:.1f} | {t['summed_stream_tokens_per_second']:.1f} | "
          f"{o['total_tokens_per_second']:.1f} | {t['total_tokens_per_second']:.1f} | {t['time_to_first_token_ms']:.0f} ms |")
PY
cat "$out"
