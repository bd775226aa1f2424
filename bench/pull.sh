#!/usr/bin/env bash
# Download benchmark: modeld Pull against curl, same file, same local HTTP server, in
# pairs (curl, then modeld, then the next pair): this VM's speed and the Python
# server's response time drift by more than the gap between the two, so only a
# pair's ratio compares like with like. Two servers, both Python's http.server on
# this machine: as it ships (it copies the file through user space, 64 KiB at a
# time, taking about a quarter of the two cores from whoever downloads), and with
# the body sent by sendfile from the page cache, as nginx and CDNs send it, so the
# server's CPU says less about the client. Reports throughput for a 98 MB and a 393 MB
# file (modeld includes sha256 verification, fsync'd resume checkpoints and the final
# fsync; curl just writes the file, so curl + fsync + sha256sum is shown too), the
# disk's durable write rate as dd gives it (as many bytes, then fdatasync, on the
# same filesystem; dd writes everything before it flushes, where modeld starts the
# disk early, so it is a yardstick, not a ceiling) and the agent's peak RSS, to show
# memory stays flat in the file size.
#
#   bench/pull.sh [RUNS]      (default 5 pairs per file)
# Writes bench/results/pull-<date>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-5}"

. bench/common.sh

mkdir -p "$work/www"
cp "$MODELD_TEST_GGUF" "$work/www/small.bin"
for _ in 1 2 3 4; do cat "$MODELD_TEST_GGUF"; done > "$work/www/large.bin"

port="$(free_port)"
(cd "$work/www" && exec python3 -m http.server "$port" --bind 127.0.0.1 >/dev/null 2>&1) &
server_pid=$!
sendfile_port="$(free_port)"
python3 - "$work/www" "$sendfile_port" >/dev/null 2>&1 <<'PY' &
import functools, http.server, sys
class SendfileHandler(http.server.SimpleHTTPRequestHandler):
    def copyfile(self, source, outputfile):
        self.connection.sendfile(source)
handler = functools.partial(SendfileHandler, directory=sys.argv[1])
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), handler).serve_forever()
PY
sendfile_pid=$!
trap 'kill "$sendfile_pid" 2>/dev/null || true; cleanup' EXIT
sleep 1
declare -A bases=([copy]="http://127.0.0.1:$port" [sendfile]="http://127.0.0.1:$sendfile_port")

agent_port="$(free_port)"
"$modeld" --listen "127.0.0.1:$agent_port" --data-dir "$work/data" --log warn >"$work/agent.log" 2>&1 &
agent_pid=$!
export MODELD_ADDR="http://127.0.0.1:$agent_port"
for _ in $(seq 100); do "$modelctl" node info >/dev/null 2>&1 && break; sleep 0.1; done
rss_idle="$(awk '/VmRSS/ {print $2*1024}' /proc/$agent_pid/status)"

fsync_file() { python3 -c "import os,sys; os.fsync(os.open(sys.argv[1], os.O_RDONLY))" "$1"; }
now() { date +%s.%N; }
# Seconds each way of getting FILE: curl alone, curl + fsync + sha256sum, modeld Pull.
timed() {
    local start
    start="$(now)"
    "$@" >/dev/null
    python3 -c "print($(now) - $start)"
}
curl_plain() { curl -s -o "$work/curl.out" "$base/$1.bin"; }
curl_verified() { curl_plain "$1" && fsync_file "$work/curl.out" && sha256sum "$work/curl.out"; }
disk_write() { dd if=/dev/zero of="$work/dd.out" bs=1M count="$(($1 / 1048576))" conv=fdatasync status=none; }

for server in sendfile copy; do
base="${bases[$server]}"
for file in small large; do
    "$modelctl" models register --id "$server-$file" --url "$base/$file.bin" \
        --sha256 "$(sha256sum "$work/www/$file.bin" | cut -d' ' -f1)" \
        --size "$(stat -c %s "$work/www/$file.bin")" --format gguf >/dev/null
    echo "pull: $file.bin from the $server server, $RUNS pairs" >&2
    for _ in $(seq "$RUNS"); do
        rm -f "$work/curl.out"
        curl_s="$(timed curl_plain "$file")"
        rm -f "$work/curl.out"
        verified_s="$(timed curl_verified "$file")"
        rm -f "$work/curl.out"
        disk_s="$(timed disk_write "$(stat -c %s "$work/www/$file.bin")")"
        rm -f "$work/dd.out"
        modeld_s="$(timed "$modelctl" pull "$server-$file")"
        "$modelctl" storage rm "$server-$file" >/dev/null
        echo "$server $file $(stat -c %s "$work/www/$file.bin") $curl_s $verified_s $modeld_s $disk_s" >>"$work/pairs"
    done
    rss_peak="$(awk '/VmHWM/ {print $2*1024}' /proc/$agent_pid/status)"
    echo "$file $rss_peak" >>"$work/rss"
done
done

cpu="$(lscpu | sed -n 's/^Model name: *//p' | head -1)"
machine="$(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $cpu, $(. /etc/os-release; echo "$PRETTY_NAME")"
out="bench/results/pull-$(date -u +%Y-%m-%d).md"
python3 - "$work" "$machine" "$RUNS" "$rss_idle" >"$out" <<'PY'
import statistics, sys, datetime
work, machine, runs, rss_idle = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
pairs = {}
for line in open(f"{work}/pairs"):
    server, file, size, curl, verified, modeld, disk = line.split()
    pairs.setdefault((server, file), []).append((int(size), float(curl), float(verified), float(modeld), float(disk)))
rss = dict((f, int(b)) for f, b in (l.split() for l in open(f"{work}/rss")))
mib = lambda b: b / 1048576
print(f"# Pull benchmark, {datetime.date.today()}")
print()
print(f"Machine: {machine}. Release build. Loopback HTTP from python3's http.server, as it ships "
      "(`copy`: the file read and written through user space) and with the body sent by sendfile "
      f"from the page cache (`sendfile`, as nginx and CDNs send). {runs} pairs per file and server, "
      "each pair curl, curl + fsync + sha256sum, the disk's durable write rate as `dd` gives it (as many "
      "bytes with `conv=fdatasync` on the same filesystem: all written, then flushed), then `modelctl pull` (the wall time of each "
      "whole command); medians, and the range of the per-pair ratios.")
print()
print("| server | file | curl | curl + fsync + sha256sum | dd + fdatasync | modeld Pull | modeld / curl | modeld / (curl + fsync + sha256sum) | modeld / dd |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for (server, file), rows in pairs.items():
    size = rows[0][0]
    rate = lambda i: statistics.median(mib(size) / r[i] for r in rows)
    ratio = lambda i: [r[i] / r[3] for r in rows]
    def spread(xs):
        return f"{statistics.median(xs):.2f}× ({min(xs):.2f}–{max(xs):.2f})"
    print(f"| {server} | {mib(size):.0f} MiB | {rate(1):.0f} MiB/s | {rate(2):.0f} MiB/s | {rate(4):.0f} MiB/s | "
          f"{rate(3):.0f} MiB/s | **{spread(ratio(1))}** | {spread(ratio(2))} | {spread(ratio(4))} |")
print()
print("modeld hashes while it streams, checkpoints its offset with an fsync every 64 MiB or second, "
      "and fsyncs the blob before it reports done; curl leaves the file in the page cache. Target: "
      "modeld ≥ 0.9× curl.")
print()
print(f"Agent RSS: idle {mib(rss_idle):.1f} MiB; peak after the 98 MB file's pulls "
      f"{mib(rss['small']):.1f} MiB; after the 393 MB file's {mib(rss['large']):.1f} MiB.")
PY
cat "$out"
