#!/usr/bin/env bash
# Fleet benchmark: one controller and N real agents on this machine (default 100) in
# 5 sites, with mixed device profiles (edge box, iPhone-class, Mac-class), and two
# deployments of the SmolLM2 model: stored on every device, and loaded on a tenth of
# them (under a second id, sharing the stored blob). Each site's origin downloads are
# held to SITE_RATE (default 20MiB per second, the controller's per-site limit standing
# in for a WAN uplink). Then a third deployment loads the model on all N devices and two
# rollouts of new digests go out to them with a canary of 5: one that fails its smoke
# gate and rolls back, one that passes. Records the requests and bytes the origin served (the goal is
# one copy per site), the time from apply to every device converged, the controller's
# CPU time and peak memory, and the bytes that crossed loopback, against the reference
# of N concurrent `curl` downloads of the same file from the same server in the same run.
#
#   bench/fleet.sh [AGENTS]
# Writes bench/results/fleet-<date>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-100}"
SITES=5
SITE_RATE="${SITE_RATE:-20MiB}"
. bench/common.sh
cargo build --release --locked -q -p modeld-fleet
fleetd="$target/release/modeld-fleet"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# The model, served over HTTP from loopback.
mkdir -p "$work/models"
ln -s "$MODELD_TEST_GGUF" "$work/models/smol.gguf"
size=$(stat -L -c %s "$MODELD_TEST_GGUF")
sha=$(sha256sum "$MODELD_TEST_GGUF" | cut -d' ' -f1)
http_port=$(free_port)
(cd "$work/models" && exec python3 -m http.server "$http_port" --bind 127.0.0.1 >/dev/null 2>"$work/origin.log") &
pids+=($!)

# Reference: N concurrent downloads of the same file with curl.
sleep 0.5
calc() { python3 -c "print($1)"; }
# await SECONDS WHAT CMD...: runs CMD until it prints 1; past SECONDS the benchmark
# fails saying WHAT did not happen, instead of waiting forever.
await() {
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until [[ "$("$@")" == 1 ]]; do
        if ((SECONDS >= deadline)); then
            echo "bench: $what did not happen within the time allowed" >&2
            exit 1
        fi
        sleep 0.5
    done
}
ref_start=$(date +%s.%N)
curls=()
for i in $(seq "$N"); do
    curl -sf -o /dev/null "http://127.0.0.1:$http_port/smol.gguf" &
    curls+=($!)
done
for c in "${curls[@]}"; do wait "$c"; done
ref_seconds=$(calc "$(date +%s.%N) - $ref_start")

# The controller.
fleet_port=$(free_port)
"$fleetd" --listen "127.0.0.1:$fleet_port" --data-dir "$work/controller" --log warn \
    --site-origin-rate-limit "$SITE_RATE" &
fleet_pid=$!
pids+=($fleet_pid)
fleet_url="http://127.0.0.1:$fleet_port"
fctl() { "$modelctl" fleet --fleet-addr "$fleet_url" "$@"; }
for _ in $(seq 100); do fctl devices >/dev/null 2>&1 && break; sleep 0.1; done

# N agents, a third of each kind.
profiles=(deploy/fleet/profiles/edge-box.toml deploy/fleet/profiles/iphone.toml deploy/fleet/profiles/mac.toml)
agents_start=$(date +%s.%N)
for i in $(seq "$N"); do
    # The devices share this machine's memory, so its pressure is no one device's:
    # pressure eviction is off (each device still keeps to its profile's budget).
    "$modeld" --listen 127.0.0.1:0 --data-dir "$work/agent-$i" --log warn \
        --memory-pressure-threshold 0 \
        --fleet "$fleet_url" --site "site-$((i % SITES))" --label tier=edge \
        --device-profile "${profiles[$((i % 3))]}" &
    pids+=($!)
done
all_connected() { fctl devices -o json | python3 -c 'import json,sys; print(int(sum(1 for d in json.load(sys.stdin).get("devices", []) if d.get("connected")) >= int(sys.argv[1])))' "$N"; }
await 300 "every agent connected" all_connected
agents_seconds=$(calc "round($(date +%s.%N) - $agents_start)")

# spec ID [FILE]: the model under ID, served from the origin as FILE (default smol.gguf).
spec() {
    local file="${2:-smol.gguf}"
    cat <<YAML
    spec:
      id: $1
      format: gguf
      tokenizer: {kind: embedded}
      files:
        - name: smol.gguf
          urls: ["http://127.0.0.1:$http_port/$file"]
          sha256: "$(sha256sum "$work/models/$file" | cut -d' ' -f1)"
          size_bytes: $(stat -L -c %s "$work/models/$file")
YAML
}
{ echo "name: smol-everywhere"; echo "prune: true"; echo "models:"; echo "  - state: stored"; spec smol; } >"$work/stored.yaml"
{ echo "name: smol-tenth"; echo "prune: true"; echo "placement: {fraction: 0.1}"; echo "models:";
  echo "  - state: loaded"; echo "    load_options: {context_length: 512}"; spec smol-hot; } >"$work/loaded.yaml"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$fleet_pid/stat"; }
origin_gets() { grep -c "GET /${1:-smol.gguf}" "$work/origin.log" || true; }
gets0=$(origin_gets)
lo_bytes() { awk '/^ *lo:/ {print $2}' /proc/net/dev; }
ticks0=$(cpu_ticks)
lo0=$(lo_bytes)
fctl watch -o json >"$work/events.jsonl" &
pids+=($!)
sleep 0.5
apply_start=$(date +%s.%N)
fctl apply "$work/stored.yaml" >/dev/null
# Delivery: every device has confirmed the generation of assignments it was sent.
delivered() { fctl devices -o json | python3 -c 'import json,sys; d=json.load(sys.stdin).get("devices", []); print(int(all(int(x.get("appliedGeneration", 0)) >= int(x.get("assignedGeneration", 0)) >= 1 for x in d)))'; }
await 300 "every device confirmed its assignments" delivered
delivered_seconds=$(calc "$(date +%s.%N) - $apply_start")
fctl apply "$work/loaded.yaml" >/dev/null
converged() { fctl status -o json | python3 -c 'import json,sys; d=json.load(sys.stdin)["deployments"]; print(int(len(d) == 2 and all(x.get("converged") for x in d)))'; }
await 900 "convergence of both deployments" converged
converge_seconds=$(calc "$(date +%s.%N) - $apply_start")
cpu_seconds=$(calc "($(cpu_ticks) - $ticks0) / $(getconf CLK_TCK)")
origin_downloads=$(( $(origin_gets) - gets0 ))
lo_mb=$(calc "($(lo_bytes) - $lo0) // 1048576")
# From the controller's own clock: when each device confirmed the first apply's
# assignments (ASSIGNMENTS_APPLIED events), after the apply began.
read -r delivery_median delivery_max < <(python3 - "$work/events.jsonl" "$apply_start" <<'PY'
import json, sys
from datetime import datetime
start = float(sys.argv[2])
first = {}
for line in open(sys.argv[1]):
    e = json.loads(line)
    if e.get("kind") != "EVENT_KIND_ASSIGNMENTS_APPLIED":
        continue
    t = datetime.fromisoformat(e["time"].replace("Z", "+00:00")).timestamp() - start
    first.setdefault(e["deviceId"], t)
times = sorted(first.values())
print(f"{times[len(times) // 2]:.3f} {times[-1]:.3f}" if times else "nan nan")
PY
)
peak_kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$fleet_pid/status")
rss_kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$fleet_pid/status")
loaded=$(fctl status smol-tenth -o json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["deployments"][0].get("devices", [])))')

# Rollouts to all N devices. A third deployment loads the model everywhere (a small
# context, one thread: the machine holds N engines), sharing the stored blob; then two
# revisions with new digests go out with a canary of 5 and a smoke gate. The first
# (token embeddings zeroed: it loads, and answers badly) must fail on the canaries and
# roll back with no other device touched; the second (the same weights, renamed) must
# reach every device in waves.
"$MODELD_PYTHON" bench/gguf-variant.py "$MODELD_TEST_GGUF" "$work/models/smol-broken.gguf" broken
"$MODELD_PYTHON" bench/gguf-variant.py "$MODELD_TEST_GGUF" "$work/models/smol-renamed.gguf" renamed
fleet_yaml() {
    cat <<YAML
name: smol-fleet
prune: true
rollout:
  canary: {devices: 5}
  max_unavailable: $ROLLOUT_MAX_UNAVAILABLE
  growth_factor: 2
  gates:
    ready_within_seconds: 600
    smoke_tests:
      - {prompt: "Tell me the capital of France.", max_tokens: 24, contains: Paris}
models:
  - state: loaded
    load_options: {context_length: 256, threads: 1, max_concurrent_requests: 1}
YAML
    spec smol-fleet "$1"
}
ROLLOUT_MAX_UNAVAILABLE="${ROLLOUT_MAX_UNAVAILABLE:-20}"
deployment_converged() { fctl status "$1" -o json | python3 -c 'import json,sys; d=json.load(sys.stdin)["deployments"]; print(int(bool(d) and all(x.get("converged") for x in d)))'; }
fleet_yaml smol.gguf >"$work/fleet-1.yaml"
fleet_start=$(date +%s.%N)
fctl apply "$work/fleet-1.yaml" >/dev/null
await 900 "convergence of smol-fleet" deployment_converged smol-fleet
fleet_seconds=$(calc "$(date +%s.%N) - $fleet_start")
used_mib=$(free -m | awk '/Mem:/ {print $3}')

# follow_rollout STATE: polls the rollout until it reaches STATE (or another end) and
# prints: the state reached, seconds, most devices updating at one sample, devices
# that ever left WAITING, of those the ones outside the canary wave, waves, reason.
follow_rollout() {
    local started
    started=$(date +%s.%N)
    : >"$work/rollout.samples"
    while :; do
        fctl rollout status smol-fleet -o json >"$work/rollout.json" 2>/dev/null || { sleep 0.5; continue; }
        cp "$work/rollout.json" "$work/rollout.$(wc -l <"$work/rollout.samples").json"
        echo >>"$work/rollout.samples"
        state=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("state", ""))' "$work/rollout.json")
        case "$state" in
            ROLLOUT_STATE_COMPLETED|ROLLOUT_STATE_ROLLED_BACK|ROLLOUT_STATE_ABORTED) break ;;
        esac
        if [[ "$(calc "$(date +%s.%N) - $started > 1800")" == True ]]; then
            echo "bench: the rollout did not end within 30 minutes" >&2
            exit 1
        fi
        sleep 0.5
    done
    python3 - "$work" "$state" "$(calc "$(date +%s.%N) - $started")" <<'PY'
import glob, json, sys
work, state, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
most, touched, outside = 0, set(), set()
last = None
for path in sorted(glob.glob(f"{work}/rollout.[0-9]*.json"), key=lambda p: int(p.split(".")[-2])):
    r = json.load(open(path))
    last = r
    devices = r.get("devices", [])
    most = max(most, sum(1 for d in devices if d.get("phase") == "DEVICE_ROLLOUT_PHASE_UPDATING"))
    for d in devices:
        if d.get("phase") not in (None, "DEVICE_ROLLOUT_PHASE_WAITING"):
            touched.add(d["deviceId"])
            if int(d.get("wave", 0)) != 0:
                outside.add(d["deviceId"])
reason = (last or {}).get("reason", "").replace("|", "/")[:160]
print(f"{state.removeprefix('ROLLOUT_STATE_').lower()} {seconds:.1f} {most} {len(touched)} {len(outside)} {(last or {}).get('waves', 0)} {reason}")
PY
    rm -f "$work"/rollout.[0-9]*.json
}
broken_gets0=$(origin_gets smol-broken.gguf)
fleet_yaml smol-broken.gguf >"$work/fleet-2.yaml"
fctl apply "$work/fleet-2.yaml" >/dev/null
read -r bad_state bad_seconds bad_most bad_touched bad_outside _ bad_reason < <(follow_rollout)
bad_gets=$(( $(origin_gets smol-broken.gguf) - broken_gets0 ))
await 900 "convergence of smol-fleet" deployment_converged smol-fleet
renamed_gets0=$(origin_gets smol-renamed.gguf)
fleet_yaml smol-renamed.gguf >"$work/fleet-3.yaml"
fctl apply "$work/fleet-3.yaml" >/dev/null
read -r good_state good_seconds good_most good_touched _ good_waves _ < <(follow_rollout)
good_gets=$(( $(origin_gets smol-renamed.gguf) - renamed_gets0 ))
await 900 "convergence of smol-fleet" deployment_converged smol-fleet

mkdir -p bench/results
result="bench/results/fleet-$(date -u +%F).md"
{
    echo "# Fleet, $(date -u +%F)"
    echo
    echo "Machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB."
    echo "$N agents (release build, edge-box / iPhone / Mac profiles in turn, $SITES sites), one controller, the model"
    echo "($((size / 1048576)) MiB) served over loopback by Python's http.server; each site's origin downloads held to"
    echo "$SITE_RATE/s by the controller's per-site limit (standing in for the site's WAN uplink)."
    echo
    echo "| measure | value |"
    echo "|---|---:|"
    echo "| agents started and connected | $agents_seconds s |"
    echo "| apply → assignments confirmed by a device, median / last of $N (controller's event times) | $delivery_median s / $delivery_max s |"
    echo "| apply → assignments confirmed by all $N devices, seen by a modelctl poll every 50 ms | $(printf %.2f "$delivered_seconds") s |"
    echo "| apply → all $N devices converged (stored everywhere, loaded on $loaded) | $(printf %.1f "$converge_seconds") s |"
    echo "| downloads the origin served ($SITES sites; goal: one per site) | $origin_downloads ($((origin_downloads * size / 1048576)) MiB; one copy per site = $((SITES * size / 1048576)) MiB) |"
    echo "| reference: $N concurrent curl downloads of the same file | $(printf %.1f "$ref_seconds") s |"
    echo "| ratio (fleet / curl) | $(printf %.2f "$(calc "$converge_seconds / $ref_seconds")")× |"
    echo "| controller CPU time during convergence | $(printf %.2f "$cpu_seconds") s |"
    echo "| controller memory: peak (VmHWM) / now (VmRSS) | $((peak_kb / 1024)) MiB / $((rss_kb / 1024)) MiB |"
    echo "| bytes over loopback during convergence (all traffic) | $lo_mb MiB (model × devices = $((size * N / 1048576)) MiB) |"
    echo
    echo "Rollouts to all $N devices (deployment \`smol-fleet\`: loaded everywhere, context 256, one thread;"
    echo "canary of 5, then waves doubling up to max_unavailable $ROLLOUT_MAX_UNAVAILABLE; smoke gate: greedy answer to"
    echo "\"Tell me the capital of France.\" contains \"Paris\")."
    echo
    echo "| measure | value |"
    echo "|---|---:|"
    echo "| load the model on all $N devices (revision 1, blob already stored) | $(printf %.1f "$fleet_seconds") s; memory in use on the machine then: $used_mib MiB |"
    echo "| revision 2, new digest, token embeddings zeroed: outcome | $bad_state after $bad_seconds s |"
    echo "| … devices that left the previous revision / of them outside the canary | $bad_touched / $bad_outside |"
    echo "| … downloads of the broken file the origin served | $bad_gets |"
    echo "| … why it stopped | $bad_reason |"
    echo "| revision 3, new digest, same weights renamed: outcome | $good_state after $good_seconds s, $good_waves waves |"
    echo "| … devices updated / most updating at one sample (limit $ROLLOUT_MAX_UNAVAILABLE) | $good_touched / $good_most |"
    echo "| … downloads of the new file the origin served ($SITES sites; goal: one per site) | $good_gets |"
} >"$result"
cat "$result"
