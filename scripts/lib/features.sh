# shellcheck shell=bash
# The agent's default features with llama.cpp's CPU variants left out, as
# `--features` for a build that compiles llama.cpp for one CPU (scripts/run,
# scripts/build-native): every runtime of the default build stays in.
modeld_one_cpu_features() {
    cargo metadata --format-version 1 --no-deps --locked | python3 -c '
import json, sys
modeld = next(p for p in json.load(sys.stdin)["packages"] if p["name"] == "modeld")
print(",".join("modeld/" + f for f in modeld["features"]["default"] if f != "llama-cpu-variants"))
'
}
