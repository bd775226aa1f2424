#!/usr/bin/env bash
# Download benchmark: modeld Pull against curl, same file, same local HTTP server, same
# run. Reports throughput (modeld includes sha256 verification and fsync'd resume
# checkpoints; curl just writes the file) and the agent's peak RSS while pulling a 98 MB
# and a 393 MB file, to show memory stays flat in the file size.
#
#   bench/pull.sh [RUNS]      (default 3 runs of each)
# Writes bench/results/pull-<date>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-3}"

. bench/common.sh

mkdir -p "$work/www"
cp "$MODELD_TEST_GGUF" "$work/www/small.bin"
for _ in 1 2 3 4; do cat "$MODELD_TEST_GGUF"; done > "$work/www/large.bin"
small_sha="$(sha256sum "$work/www/small.bin" | cut -d' ' -f1)"; small_size="$(stat -c %s "$work/www/small.bin")"
large_sha="$(sha256sum "$work/www/large.bin" | cut -d' ' -f1)"; large_size="$(stat -c %s "$work/www/large.bin")"

port="$(free_port)"
(cd "$work/www" && exec python3 -m http.server "$port" --bind 127.0.0.1 >/dev/null 2>&1) &
server_pid=$!
sleep 1
base="http://127.0.0.1:$port"


# Both tools are timed the same way: wall clock of the whole command, process start
# included, so neither side is credited with the other's setup.
fsync_file() { python3 -c "import os,sys; os.fsync(os.open(sys.argv[1], os.O_RDONLY))" "$1"; }
curl_plain() { curl -s -o "$work/curl.out" "$base/small.bin"; }
curl_durable() { curl_plain && fsync_file "$work/curl.out"; }
curl_verified() { curl_durable && sha256sum "$work/curl.out" >/dev/null; }
# median rate in bytes/s of RUNS runs of command $1, each after removing the output file
rate_of() {
    local start end
    for _ in $(seq "$RUNS"); do
        rm -f "$work/curl.out"
        start="$(date +%s.%N)"
        "$1"
        end="$(date +%s.%N)"
        python3 -c "print($small_size/($end-$start))"
    done | median
}

echo "curl baseline ..."
curl_rate="$(rate_of curl_plain)"
# What modeld guarantees before it answers is closer to curl plus an fsync (the blob
# survives a power cut) plus sha256sum (the bytes are verified); time those too.
durable_rate="$(rate_of curl_durable)"
verified_rate="$(rate_of curl_verified)"

agent_port="$(free_port)"
"$modeld" --listen "127.0.0.1:$agent_port" --data-dir "$work/data" --log warn >"$work/agent.log" 2>&1 &
agent_pid=$!
export MODELD_ADDR="http://127.0.0.1:$agent_port"
for _ in $(seq 100); do "$modelctl" node info >/dev/null 2>&1 && break; sleep 0.1; done
rss_idle="$(awk '/VmRSS/ {print $2*1024}' /proc/$agent_pid/status)"

"$modelctl" models register --id small --url "$base/small.bin" --sha256 "$small_sha" --size "$small_size" --format gguf >/dev/null
"$modelctl" models register --id large --url "$base/large.bin" --sha256 "$large_sha" --size "$large_size" --format gguf >/dev/null

echo "modeld pulls ..."
modeld_rates=()
for _ in $(seq "$RUNS"); do
    start="$(date +%s.%N)"
    "$modelctl" pull small >/dev/null
    end="$(date +%s.%N)"
    modeld_rates+=("$(python3 -c "print($small_size/($end-$start))")")
    "$modelctl" storage rm small >/dev/null
done
modeld_rate="$(printf '%s\n' "${modeld_rates[@]}" | median)"
rss_small="$(awk '/VmHWM/ {print $2*1024}' /proc/$agent_pid/status)"
"$modelctl" pull large >/dev/null
rss_large="$(awk '/VmHWM/ {print $2*1024}' /proc/$agent_pid/status)"

ratio="$(python3 -c "print(f'{$modeld_rate/$curl_rate:.2f}')")"
mib() { python3 -c "print(f'{$1/1048576:.1f}')"; }
date_now="$(date -u +%Y-%m-%d)"
cpu="$(lscpu | sed -n 's/^Model name: *//p' | head -1)"
machine="$(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $cpu, $(. /etc/os-release; echo "$PRETTY_NAME")"
out="bench/results/pull-$date_now.md"
cat > "$out" <<MD
# Pull benchmark, $date_now

Machine: $machine. Release build. Loopback HTTP (python3 http.server), median of $RUNS runs,
each the wall time of the whole command (\`curl -o FILE URL\` vs \`modelctl pull ID\`).

| | throughput | notes |
| --- | --- | --- |
| curl | $(mib "$curl_rate") MiB/s | writes the file, nothing else |
| modeld Pull | $(mib "$modeld_rate") MiB/s | sha256 while streaming, fsync'd checkpoints, rename into the blob store |
| ratio | **${ratio}x curl** | target ≥ 0.9x |
| curl + fsync | $(mib "$durable_rate") MiB/s | modeld is $(python3 -c "print(f'{$modeld_rate/$durable_rate:.2f}')")x this |
| curl + fsync + sha256sum | $(mib "$verified_rate") MiB/s | the same guarantees as modeld; modeld is $(python3 -c "print(f'{$modeld_rate/$verified_rate:.2f}')")x this |

Agent RSS: idle $(mib "$rss_idle") MiB; peak after pulling the $(mib "$small_size") MiB file
$(mib "$rss_small") MiB; peak after also pulling the $(mib "$large_size") MiB file $(mib "$rss_large") MiB.
MD
cat "$out"
