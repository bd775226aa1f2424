#!/usr/bin/env bash
# Runtime benchmark: one network in five formats through the agent's four engines,
# in one run, same prompt, same threads:
#   - llama.cpp on the SmolLM2-135M Q4_1 GGUF;
#   - candle on the same GGUF (quantized llama), on the derived safetensors (F32) and
#     on the derived MLX directory (4-bit affine groups of 32, run as Q4_1), and, as
#     the reference for the last, mlx-lm on MLX's own CPU backend (the mlx[cpu]
#     wheel) on the same directory with the same KV-cache loop;
#   - ONNX Runtime on the derived ONNX export (F32), and, as the reference, ONNX
#     Runtime driven directly from Python (the onnxruntime wheel) on the same export
#     with the same KV-cache loop;
#   - LiteRT on the derived TFLite decoder (F32, prefill and decode signatures), and,
#     as the reference, LiteRT's Python interpreter (the ai-edge-litert wheel) on the
#     same file with the same signatures and cache loop;
#   - LiteRT-LM on the derived .litertlm bundle of the same decoder, and, as the
#     reference, LiteRT-LM driven from Python (the litert-lm-api wheel) on the same
#     bundle with the same prompt text;
# then Node.Benchmark on the GGUF with both runtimes that can run it, and the runtime
# the agent's selector then picks.
#
#   bench/runtimes.sh [RUNS]      (default 5; medians are reported)
# Writes bench/results/runtimes-<date>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-5}"
THREADS="${THREADS:-$(nproc)}"
PROMPT=128
GEN=64

. bench/common.sh

start_agent --threads "$THREADS" --onnxruntime-library "$MODELD_TEST_ORT_LIB" \
    --litert-library "$MODELD_TEST_LITERT_LIB" --litert-lm-library "$MODELD_TEST_LITERT_LM_LIB" \
    --context-length 1024 --parallel 1
register_smol
scan_derived

measure() {  # measure NAME ID RUNTIME
    echo "bench: $1 through gRPC ($RUNS runs)" >&2
    ctl load "$2" --runtime "$3" >/dev/null
    ctl -o json bench "$2" --concurrency 1 --prompt-tokens "$PROMPT" --max-tokens "$GEN" \
        --runs "$RUNS" >"$work/$1.json"
    ctl unload "$2" >/dev/null
}
measure llama-gguf smol llama.cpp
measure candle-gguf smol candle
measure candle-safetensors "$hf_id" candle
measure candle-mlx "$mlx_id" candle
measure onnxruntime-onnx "$onnx_id" onnxruntime
measure litert-tflite "$tflite_id" tflite
measure litertlm-bundle "$litertlm_id" tflite

echo "bench: Node.Benchmark on the GGUF, then what the selector picks" >&2
ctl -o json node benchmark smol --runtime llama.cpp --repetitions "$RUNS" >"$work/nb-llama.json"
ctl -o json node benchmark smol --runtime candle --repetitions "$RUNS" >"$work/nb-candle.json"
ctl -o json models check smol >"$work/check.json"
agent_rss_kb="$(awk '/VmHWM/ {print $2}' "/proc/$agent_pid/status")"
stop_agent

echo "bench: ONNX Runtime from Python on the same export ($RUNS runs)" >&2
"$MODELD_PYTHON" - "$MODELD_TEST_ONNX_DIR" "$THREADS" "$PROMPT" "$GEN" "$RUNS" >"$work/ort-python.json" <<'PY'
# The reference loop: what a Python user of the onnxruntime wheel would write, the
# presents of one step fed back as the pasts of the next, greedy.
import json, statistics, sys, time
import numpy as np
import onnxruntime as ort
d, threads, prompt_len, gen, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
cfg = json.load(open(f"{d}/genai_config.json"))["model"]
dec = cfg["decoder"]
so = ort.SessionOptions()
so.intra_op_num_threads = threads
so.inter_op_num_threads = 1
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
sess = ort.InferenceSession(f"{d}/{dec['filename']}", so, providers=["CPUExecutionProvider"])
layers, kv, hd = dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]
prompt = (np.arange(prompt_len, dtype=np.int64) * 7919 % 40000 + 100).reshape(1, -1)
def run_once():
    past = {}
    for i in range(layers):
        past[f"past_key_values.{i}.key"] = np.zeros((1, kv, 0, hd), np.float32)
        past[f"past_key_values.{i}.value"] = np.zeros((1, kv, 0, hd), np.float32)
    names = [o.name for o in sess.get_outputs()]
    def step(ids, total):
        n = ids.shape[1]
        feed = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64),
                "position_ids": np.arange(total - n, total, dtype=np.int64).reshape(1, -1), **past}
        out = dict(zip(names, sess.run(None, feed)))
        for i in range(layers):
            past[f"past_key_values.{i}.key"] = out[f"present.{i}.key"]
            past[f"past_key_values.{i}.value"] = out[f"present.{i}.value"]
        return int(out["logits"][0, -1].argmax())
    t0 = time.perf_counter()
    tok = step(prompt, prompt_len)
    t1 = time.perf_counter()
    total = prompt_len
    for _ in range(gen - 1):
        total += 1
        tok = step(np.array([[tok]], np.int64), total)
    t2 = time.perf_counter()
    return prompt_len / (t1 - t0), (gen - 1) / (t2 - t1)
run_once()  # warm-up, as the agent's numbers come from a loaded, warmed session
results = [run_once() for _ in range(runs)]
print(json.dumps({"prompt_tokens_per_second": statistics.median(r[0] for r in results),
                  "generation_tokens_per_second": statistics.median(r[1] for r in results)}))
PY

echo "bench: LiteRT's Python interpreter on the same TFLite decoder ($RUNS runs)" >&2
"$MODELD_PYTHON" - "$MODELD_TEST_TFLITE_DIR" "$THREADS" "$PROMPT" "$GEN" "$RUNS" >"$work/litert-python.json" <<'PY'
# The reference loop: what a Python user of the ai-edge-litert wheel would write with
# the file's own signatures, prefill in blocks and decode one token at a time, the
# updated caches of one call fed to the next, greedy.
import json, statistics, sys, time
import numpy as np
from ai_edge_litert.interpreter import Interpreter
d, threads, prompt_len, gen, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
layers = json.load(open(f"{d}/config.json"))["num_hidden_layers"]
interpreter = Interpreter(model_path=f"{d}/model.tflite", num_threads=threads)
# The largest prefill block (prefill_N), as the engine takes for a long prompt.
blocks = {k: int(interpreter.get_signature_runner(k).get_input_details()["tokens"]["shape"][1])
          for k in interpreter.get_signature_list() if k.startswith("prefill")}
key = max(blocks, key=blocks.get)
prefill, decode = interpreter.get_signature_runner(key), interpreter.get_signature_runner("decode")
block = blocks[key]
shape = tuple(decode.get_input_details()["kv_cache_k_0"]["shape"])
assert prompt_len % block == 0
prompt = np.arange(prompt_len, dtype=np.int32) * 7919 % 40000 + 100
def run_once():
    cache = {f"kv_cache_{k}_{i}": np.zeros(shape, np.float32) for i in range(layers) for k in "kv"}
    def step(runner, ids, start):
        out = runner(tokens=np.asarray([ids], np.int32),
                     input_pos=np.arange(start, start + len(ids), dtype=np.int32), **cache)
        for name in cache:  # the updated cache is named like the input
            cache[name] = out[name]
        return int(out["logits"][0, -1].argmax())
    t0 = time.perf_counter()
    for start in range(0, prompt_len, block):
        tok = step(prefill, prompt[start:start + block], start)
    t1 = time.perf_counter()
    for i in range(gen - 1):
        tok = step(decode, [tok], prompt_len + i)
    t2 = time.perf_counter()
    return prompt_len / (t1 - t0), (gen - 1) / (t2 - t1)
run_once()
results = [run_once() for _ in range(runs)]
print(json.dumps({"prompt_tokens_per_second": statistics.median(r[0] for r in results),
                  "generation_tokens_per_second": statistics.median(r[1] for r in results)}))
PY

echo "bench: LiteRT-LM from Python on the same bundle ($RUNS runs)" >&2
"$MODELD_PYTHON" - "$MODELD_TEST_LITERTLM_DIR" "$THREADS" "$PROMPT" "$GEN" "$RUNS" >"$work/litertlm-python.json" <<'PY'
# The reference loop: what a Python user of the litert-lm-api wheel would write, a
# session without a template, the same text modelctl bench sends (" the" repeated),
# greedy, tokens streamed; timed at the caller as modelctl bench times the agent.
import json, statistics, sys, tempfile, time
import litert_lm
d, threads, prompt_len, gen, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
cache = tempfile.mkdtemp()
engine = litert_lm.Engine(f"{d}/model.litertlm", backend=litert_lm.Backend.CPU(thread_count=threads),
                          max_num_tokens=1024, cache_dir=cache)
text = " the" * prompt_len
def run_once():
    session = engine.create_session(apply_prompt_template=False, max_output_tokens=gen)
    t0 = time.perf_counter()
    session.run_prefill([text])
    t1, n = None, 0
    for _ in session.run_decode_async():
        n += 1
        if t1 is None:
            t1 = time.perf_counter()
    t2 = time.perf_counter()
    session.close()
    return prompt_len / (t1 - t0), (n - 1) / (t2 - t1), n
run_once()
results = [run_once() for _ in range(runs)]
print(json.dumps({"prompt_tokens_per_second": statistics.median(r[0] for r in results),
                  "generation_tokens_per_second": statistics.median(r[1] for r in results),
                  "generated_tokens": statistics.median(r[2] for r in results)}))
PY

# MLX's CPU backend is slow on this machine: about 1 token/s with the model's
# bfloat16 scales (emulated), 7 with them widened to float32. Its reference runs
# the widened model on a 32-token prompt and 16 generated tokens, so it ends in
# minutes.
MLX_PROMPT=32
MLX_GEN=16
echo "bench: mlx-lm from Python on the same MLX directory ($RUNS runs)" >&2
"$MODELD_PYTHON" - "$MODELD_TEST_MLX_DIR" "$MLX_PROMPT" "$MLX_GEN" "$RUNS" >"$work/mlx-python.json" <<'PY'
# The reference loop: mlx-lm's model and prompt cache, greedy, each step evaluated
# before the next (MLX is lazy), as mlx-lm's own generate does.
import json, statistics, sys, time
import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache
d, prompt_len, gen, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model, _ = load(d)
widen = lambda p: p.astype(mx.float32) if p.dtype in (mx.bfloat16, mx.float16) else p
model.update(tree_map(widen, model.parameters()))
prompt = mx.array([[i * 7919 % 40000 + 100 for i in range(prompt_len)]])
def run_once():
    cache = make_prompt_cache(model)
    t0 = time.perf_counter()
    tok = mx.argmax(model(prompt, cache=cache)[0, -1])
    mx.eval(tok)
    t1 = time.perf_counter()
    for _ in range(gen - 1):
        tok = mx.argmax(model(tok.reshape(1, 1), cache=cache)[0, -1])
        mx.eval(tok)
    t2 = time.perf_counter()
    return prompt_len / (t1 - t0), (gen - 1) / (t2 - t1)
run_once()
results = [run_once() for _ in range(runs)]
print(json.dumps({"prompt_tokens_per_second": statistics.median(r[0] for r in results),
                  "generation_tokens_per_second": statistics.median(r[1] for r in results)}))
PY

mkdir -p bench/results
out="bench/results/runtimes-$(date -u +%F).md"
python3 - "$work" "$agent_rss_kb" "$THREADS" "$RUNS" >"$out" <<'PY'
import json, platform, sys, datetime
work, agent_rss_kb, threads, runs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
def ours(name):
    return json.load(open(f"{work}/{name}.json"))[0]
ref = json.load(open(f"{work}/ort-python.json"))
mlx_ref = json.load(open(f"{work}/mlx-python.json"))
litert_ref = json.load(open(f"{work}/litert-python.json"))
litertlm_ref = json.load(open(f"{work}/litertlm-python.json"))
nb = {r: json.load(open(f"{work}/nb-{r}.json")) for r in ("llama", "candle")}
check = json.load(open(f"{work}/check.json"))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"# Runtime benchmark, {datetime.date.today()}")
print()
print(f"Machine: {cpu}, {threads} threads, {platform.system()} {platform.release()}. "
      "One network (SmolLM2-135M-Instruct) in five formats: the Q4_1 GGUF (98 MB) and, derived "
      "from it by scripts/derive-models.py, an F32 safetensors directory, an F32 ONNX export and "
      "an F32 TFLite decoder (540 MB each; the TFLite graph holds a fixed 1024-slot KV cache) "
      "and an MLX directory (4-bit affine groups of 32, bfloat16 scales, 88 MB). "
      "mlx-lm runs on MLX's CPU backend with MLX's own threads. "
      f"Release build (portable, kernels picked at run time). Prompt 128 tokens, 64 generated "
      f"(end-of-sequence ignored, except by LiteRT-LM, which always stops at it), greedy, one stream; median of {runs} runs. Agent figures are "
      "measured at the gRPC client (`modelctl bench`).")
print()
print("| runtime | format | prompt tokens/s | generation tokens/s |")
print("|---|---|---:|---:|")
for name, runtime, fmt in [("llama-gguf", "llama.cpp", "GGUF Q4_1"), ("candle-gguf", "candle", "GGUF Q4_1"),
                           ("candle-safetensors", "candle", "safetensors F32"),
                           ("candle-mlx", "candle", "MLX 4-bit"),
                           ("onnxruntime-onnx", "onnxruntime", "ONNX F32"),
                           ("litert-tflite", "tflite (LiteRT)", "TFLite F32"),
                           ("litertlm-bundle", "tflite (LiteRT-LM)", "LiteRT-LM bundle F32")]:
    o = ours(name)
    print(f"| {runtime} | {fmt} | {o['prompt_tokens_per_second']:.1f} | {o['generation_tokens_per_second']:.1f} |")
print(f"| mlx-lm from Python on MLX's CPU backend (reference; 32-token prompt, 16 generated, scales widened to F32) | MLX 4-bit | {mlx_ref['prompt_tokens_per_second']:.1f} | {mlx_ref['generation_tokens_per_second']:.1f} |")
print(f"| onnxruntime from Python (reference) | ONNX F32 | {ref['prompt_tokens_per_second']:.1f} | {ref['generation_tokens_per_second']:.1f} |")
print(f"| LiteRT's Python interpreter (reference) | TFLite F32 | {litert_ref['prompt_tokens_per_second']:.1f} | {litert_ref['generation_tokens_per_second']:.1f} |")
print(f"| LiteRT-LM from Python (reference; {litertlm_ref['generated_tokens']:.0f} generated) | LiteRT-LM bundle F32 | {litertlm_ref['prompt_tokens_per_second']:.1f} | {litertlm_ref['generation_tokens_per_second']:.1f} |")
print()
for name, what, r in [("candle-mlx", "candle on MLX vs mlx-lm", mlx_ref),
                      ("onnxruntime-onnx", "onnx engine vs ONNX Runtime's own Python loop", ref),
                      ("litert-tflite", "litert engine vs LiteRT's Python interpreter", litert_ref),
                      ("litertlm-bundle", "LiteRT-LM behind modeld vs LiteRT-LM from Python", litertlm_ref)]:
    o = ours(name)
    print(f"{what}: prompt {o['prompt_tokens_per_second']/r['prompt_tokens_per_second']:.2f}×, "
          f"generation {o['generation_tokens_per_second']/r['generation_tokens_per_second']:.2f}×.")
print()
print("## Selection")
print()
print("Node.Benchmark on the GGUF (the format two runtimes can run), recorded in the agent's store:")
print()
print("| runtime | prompt tokens/s | generation tokens/s | peak memory added |")
print("|---|---:|---:|---:|")
for r in ("llama", "candle"):
    b = nb[r]
    print(f"| {b['runtime']} | {b['promptTokensPerSecond']:.1f} | {b['generationTokensPerSecond']:.1f} | "
          f"{int(b.get('peakMemoryBytes', 0))/2**20:.0f} MiB |")
print()
picked = check.get("settings", {}).get("runtime", "?")
print(f"CheckCompatibility (and Load) then pick **{picked}** for GGUF models: the runtime with the "
      "highest measured generation speed on this node.")
print()
print(f"Agent peak RSS over the run: {agent_rss_kb/1024:.0f} MiB.")
PY
cat "$out"
