#!/usr/bin/env bash
# Prediction benchmark: how close the speed CheckCompatibility predicts before a model
# has ever run on this node comes to what Node.Benchmark then measures, for each
# runtime and format of the runtime benchmark, on a fresh agent (release build):
#   - llama.cpp and candle on the SmolLM2-135M Q4_1 GGUF;
#   - candle on the derived F32 safetensors and the derived MLX directory, ONNX Runtime
#     on the derived F32 export, LiteRT on the derived F32 TFLite decoder.
# Every prediction is taken before any benchmark runs, so each is the built-in factors
# on this node's measured memory bandwidth and compute rate. The table also gives the
# decode ceiling (bandwidth ÷ model bytes) next to the measured generation speed, and
# the factors the benchmarks imply (what the agent calibrates itself with).
#
#   bench/predict.sh [RUNS]      (Node.Benchmark repetitions, default 5)
# Writes bench/results/predict-<date>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-5}"
THREADS="${THREADS:-$(nproc)}"

. bench/common.sh

start_agent --threads "$THREADS" --onnxruntime-library "$MODELD_TEST_ORT_LIB" \
    --litert-library "$MODELD_TEST_LITERT_LIB" \
    --context-length 1024 --parallel 1
register_smol
scan_derived

# The rates are measured in the background at start-up.
for _ in $(seq 100); do
    ctl -o json node info >"$work/caps-before.json"
    grep -q '"performance"' "$work/caps-before.json" && break
    sleep 0.2
done

pairs=("llama-gguf smol llama.cpp" "candle-gguf smol candle"
       "candle-safetensors $hf_id candle" "candle-mlx $mlx_id candle"
       "onnxruntime-onnx $onnx_id onnxruntime" "litert-tflite $tflite_id tflite")
for pair in "${pairs[@]}"; do
    read -r name id runtime <<<"$pair"
    ctl -o json models check "$id" --runtime "$runtime" >"$work/predicted-$name.json"
done
for pair in "${pairs[@]}"; do
    read -r name id runtime <<<"$pair"
    echo "bench: Node.Benchmark $name ($RUNS repetitions)" >&2
    ctl -o json node benchmark "$id" --runtime "$runtime" --repetitions "$RUNS" >"$work/measured-$name.json"
done
ctl -o json node info >"$work/caps-after.json"
stop_agent

# How steady the rates are: fresh agents, one after another, each measuring anew.
for i in 1 2 3 4 5; do
    start_agent
    ctl -o json node info >"$work/rates-$i.json"
    stop_agent
done

mkdir -p bench/results
out="bench/results/predict-$(date -u +%F).md"
python3 - "$work" "$THREADS" "$RUNS" >"$out" <<'PY'
import datetime, json, platform, sys
work, threads, runs = sys.argv[1], sys.argv[2], sys.argv[3]
load = lambda f: json.load(open(f"{work}/{f}.json"))
caps = load("caps-before")
rates = caps["performance"]
bw, flops = rates["memoryReadBytesPerSecond"], rates["computeFlopsPerSecond"]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"# Speed prediction against measurement, {datetime.date.today()}")
print()
print(f"Machine: {cpu}, {threads} threads, {platform.system()} {platform.release()}; release build "
      f"(portable). Measured by the agent at start-up: {bw/2**30:.2f} GiB/s memory read bandwidth, "
      f"{flops/1e9:.1f} GFLOP/s f32 matrix multiply. Predictions from CheckCompatibility on a "
      f"fresh agent, before any benchmark; measurements from Node.Benchmark (128-token prompt, "
      f"64 generated, median of {runs}).")
print()
print("| runtime | format | prompt predicted | prompt measured | ratio | generation predicted | generation measured | ratio | decode ceiling | measured / ceiling |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
names = [("llama-gguf", "llama.cpp", "GGUF Q4_1"), ("candle-gguf", "candle", "GGUF Q4_1"),
         ("candle-safetensors", "candle", "safetensors F32"), ("candle-mlx", "candle", "MLX 4-bit"),
         ("onnxruntime-onnx", "onnxruntime", "ONNX F32"), ("litert-tflite", "tflite (LiteRT)", "TFLite F32")]
for name, runtime, fmt in names:
    p = load(f"predicted-{name}")["performance"]
    m = load(f"measured-{name}")
    pp, pg = p["promptTokensPerSecond"], p["generationTokensPerSecond"]
    mp, mg = m["promptTokensPerSecond"], m["generationTokensPerSecond"]
    ceiling = p["generationCeilingTokensPerSecond"]
    print(f"| {runtime} | {fmt} | {pp:.1f} | {mp:.1f} | {pp/mp:.2f}× | {pg:.1f} | {mg:.1f} | {pg/mg:.2f}× | {ceiling:.1f} | {mg/ceiling:.0%} |")
print()
print("Ratio = predicted ÷ measured (goal: within 0.75–1.25×).")
print()
runs_rates = [load(f"rates-{i}")["performance"] for i in range(1, 6)]
bws = sorted(r["memoryReadBytesPerSecond"] / 2**30 for r in runs_rates)
fl = sorted(r["computeFlopsPerSecond"] / 1e9 for r in runs_rates)
print(f"The rates on 5 more fresh agents, one after another: memory bandwidth {bws[0]:.2f}–{bws[-1]:.2f} GiB/s "
      f"(median {bws[2]:.2f}), compute {fl[0]:.1f}–{fl[-1]:.1f} GFLOP/s (median {fl[2]:.1f}).")
print()
print("Factors the benchmarks imply (decode = measured generation × bytes per token ÷ bandwidth; "
      "prefill = measured prompt × FLOPs per token ÷ compute), as the agent now reports them in "
      "GetCapabilities and uses for every other model of the format:")
print()
print("| runtime | format | decode | prefill | source |")
print("|---|---|---:|---:|---|")
for f in load("caps-after")["performance"]["runtimes"]:
    print(f"| {f['runtime'].removeprefix('RUNTIME_').lower()} | {f['format'].removeprefix('MODEL_FORMAT_').lower()} "
          f"| {f.get('decode', 0):.3f} | {f.get('prefill', 0):.3f} | {f['source'].removeprefix('ESTIMATE_SOURCE_').lower()} |")
PY
cat "$out"
