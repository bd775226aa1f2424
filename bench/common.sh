# Sourced by the benchmarks: test assets, a release build of modeld and modelctl,
# a work directory removed on exit (with any agent or server the script started),
# and small helpers. Runs from the repository root.

scripts/fetch-test-assets >/dev/null
. "${MODELD_CACHE_DIR:-$HOME/.cache/modeld}/assets/env"
cargo build --release --locked -q -p modeld -p modelctl
target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
modeld="$target/release/modeld"
modelctl="$target/release/modelctl"

work="$(mktemp -d)"
cleanup() {
    [[ -n "${server_pid:-}" ]] && kill "$server_pid" 2>/dev/null || true
    [[ -n "${agent_pid:-}" ]] && kill "$agent_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# start_agent ARGS...: a release agent ($agent_bin, default the portable build) on a
# free port, with a fresh data directory in the work directory; sets addr and
# agent_pid and returns once it answers. ctl talks to it.
start_agent() {
    addr="127.0.0.1:$(free_port)"
    "${agent_bin:-$modeld}" --listen "$addr" --data-dir "$(mktemp -d -p "$work" data.XXXX)" --log warn \
        --allow-dir "${MODELD_CACHE_DIR:-$HOME/.cache/modeld}" "$@" &
    agent_pid=$!
    for _ in $(seq 100); do
        "$modelctl" --addr "http://$addr" node info >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "bench: the agent did not answer" >&2
    return 1
}
ctl() { "$modelctl" --addr "http://$addr" "$@"; }
stop_agent() { kill "$agent_pid"; wait "$agent_pid" 2>/dev/null || true; agent_pid=; }

# register_smol: the test GGUF as model "smol", stored on the agent.
register_smol() {
    ctl models register --id smol --url "file://$MODELD_TEST_GGUF" \
        --sha256 "$(sha256sum "$MODELD_TEST_GGUF" | cut -d' ' -f1)" \
        --size "$(stat -c %s "$MODELD_TEST_GGUF")" >/dev/null
    ctl pull smol >/dev/null
}

# scan_derived: registers the derived ONNX export, safetensors directory, MLX
# directory, TFLite decoder and LiteRT-LM bundle of the test model; sets onnx_id,
# hf_id, mlx_id, tflite_id and litertlm_id.
scan_derived() {
    ctl -o json scan "$MODELD_TEST_ONNX_DIR" "$MODELD_TEST_HF_DIR" "$MODELD_TEST_MLX_DIR" \
        "$MODELD_TEST_TFLITE_DIR" >"$work/scan.json"
    read -r onnx_id hf_id mlx_id tflite_id < <(python3 -c '
import json, sys
by = {m["spec"]["format"]: m["spec"]["id"] for m in json.load(open(sys.argv[1]))["models"]}
print(by["MODEL_FORMAT_ONNX"], by["MODEL_FORMAT_SAFETENSORS"], by["MODEL_FORMAT_MLX"],
      by["MODEL_FORMAT_TFLITE"])
' "$work/scan.json")
    # The bundle is TFLite too: scanned on its own to tell the two apart.
    ctl -o json scan "$MODELD_TEST_LITERTLM_DIR" >"$work/scan-litertlm.json"
    litertlm_id="$(python3 -c '
import json, sys
print(json.load(open(sys.argv[1]))["models"][0]["spec"]["id"])
' "$work/scan-litertlm.json")"
}
