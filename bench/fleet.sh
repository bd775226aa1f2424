#!/usr/bin/env bash
# Fleet benchmark: one controller and N real agents on this machine (default 100) in
# 5 sites, with mixed device profiles (edge box, iPhone-class, Mac-class), and two
# deployments of the SmolLM2 model: stored on every device, and loaded on a tenth of
# them (under a second id, sharing the stored blob). Each site's origin downloads are
# held to SITE_RATE (default 20MiB per second, the controller's per-site limit standing
# in for a WAN uplink). Records the requests and bytes the origin served (the goal is
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
    "$modeld" --listen 127.0.0.1:0 --data-dir "$work/agent-$i" --log warn \
        --fleet "$fleet_url" --site "site-$((i % SITES))" --label tier=edge \
        --device-profile "${profiles[$((i % 3))]}" &
    pids+=($!)
done
connected() { fctl devices -o json | python3 -c 'import json,sys; print(sum(1 for d in json.load(sys.stdin).get("devices", []) if d.get("connected")))'; }
until [[ "$(connected)" -ge "$N" ]]; do sleep 0.5; done
agents_seconds=$(calc "round($(date +%s.%N) - $agents_start)")

spec() {
    cat <<YAML
    spec:
      id: $1
      format: gguf
      tokenizer: {kind: embedded}
      files:
        - name: smol.gguf
          urls: ["http://127.0.0.1:$http_port/smol.gguf"]
          sha256: "$sha"
          size_bytes: $size
YAML
}
{ echo "name: smol-everywhere"; echo "prune: true"; echo "models:"; echo "  - state: stored"; spec smol; } >"$work/stored.yaml"
{ echo "name: smol-tenth"; echo "prune: true"; echo "placement: {fraction: 0.1}"; echo "models:";
  echo "  - state: loaded"; echo "    load_options: {context_length: 512}"; spec smol-hot; } >"$work/loaded.yaml"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$fleet_pid/stat"; }
origin_gets() { grep -c 'GET /smol.gguf' "$work/origin.log" || true; }
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
until [[ "$(delivered)" == 1 ]]; do sleep 0.05; done
delivered_seconds=$(calc "$(date +%s.%N) - $apply_start")
fctl apply "$work/loaded.yaml" >/dev/null
converged() { fctl status -o json | python3 -c 'import json,sys; d=json.load(sys.stdin)["deployments"]; print(int(len(d) == 2 and all(x.get("converged") for x in d)))'; }
until [[ "$(converged)" == 1 ]]; do sleep 0.5; done
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
} >"$result"
cat "$result"
