#!/usr/bin/env bash
# The controller at fleet scale: one modeld-fleet (release) and N simulated devices
# (default 10000, in 100 sites) that speak the device protocol without running
# inference (bench/fleet-load). Records the time for every device to connect, and
# for a new deployment, a change, and a change rolled out behind a canary of 50 to
# reach every device and converge, with the controller's CPU time and peak memory.
# The reference in the same run is the controller idle with no device connected.
#
#   bench/fleet-scale.sh [DEVICES] [SITES]
# Writes bench/results/fleet-scale-<date>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-10000}"
SITES="${2:-100}"
cargo build --release --locked -q -p modeld-fleet -p modeld-fleet-load
target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
work="$(mktemp -d)"
fleet_pid=
cleanup() {
    [[ -n "$fleet_pid" ]] && kill "$fleet_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# CPU seconds (user + system) and peak resident MiB of a process.
cpu_seconds() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"; }
peak_mib() { awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
rss_mib() { awk '/VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }

# Enough descriptors for one connection per 100 devices, and then some.
ulimit -n 65536 2>/dev/null || true
port=$(free_port)
"$target/release/modeld-fleet" --listen "127.0.0.1:$port" --data-dir "$work/controller" --log warn &
fleet_pid=$!
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done
sleep 1
idle_rss=$(rss_mib "$fleet_pid")
idle_cpu=$(cpu_seconds "$fleet_pid")
result=$("$target/release/modeld-fleet-load" --controller "http://127.0.0.1:$port" \
    --devices "$N" --sites "$SITES")
cpu=$(python3 -c "print(round($(cpu_seconds "$fleet_pid") - $idle_cpu, 2))")
peak=$(peak_mib "$fleet_pid")
rss=$(rss_mib "$fleet_pid")

mkdir -p bench/results
out="bench/results/fleet-scale-$(date +%F).md"
python3 - "$result" "$N" "$SITES" "$idle_rss" "$peak" "$rss" "$cpu" > "$out" <<'PY'
import json, platform, sys, datetime, os
r = json.loads(sys.argv[1])
n, sites, idle, peak, rss, cpu = sys.argv[2:8]
cpu_model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"# Fleet controller at scale, {datetime.date.today()}")
print()
print(f"Machine: {cpu_model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}. "
      f"One modeld-fleet (release) and {n} simulated devices in {sites} sites "
      f"({r['connections']} HTTP/2 connections) on the same machine: the load "
      "generator's own CPU competes with the controller's.")
print()
print("| | value |")
print("|---|---:|")
print(f"| every device connected | {r['all_connected_seconds']:.2f} s |")
for p in r["phases"]:
    what = {"v1": "new deployment", "v2": "change, all at once", "v3": "change, canary of 50 then waves"}[p["tag"]]
    print(f"| {what}: apply answered | {p['apply_seconds']:.3f} s |")
    print(f"| {what}: every device assigned | {p['all_assigned_seconds']:.2f} s |")
    print(f"| {what}: converged (status) | {p['converged_seconds']:.2f} s |")
print(f"| assignment messages sent | {r['assignments_received']} |")
print(f"| controller CPU, whole run | {cpu} s |")
print(f"| controller memory: idle (reference) / peak / end | {idle} / {peak} / {rss} MiB |")
PY
cat "$out"
