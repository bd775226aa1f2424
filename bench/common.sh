# Sourced by the benchmarks: test assets, a release build of modeld and modelctl,
# a work directory removed on exit (with any agent or server the script started),
# and small helpers. Runs from the repository root.

scripts/fetch-test-assets >/dev/null
. "${MODELD_CACHE_DIR:-$HOME/.cache/modeld}/assets/env"
cargo build --release --bins --locked -q
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
