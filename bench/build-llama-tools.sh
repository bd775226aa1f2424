#!/usr/bin/env bash
# Builds llama.cpp's own benchmark tools (llama-bench, llama-batched-bench) as the
# reference for bench/generate.sh, against the very llama.cpp the agent links: the
# llama-cpp-sys-2 crate vendors llama.cpp (cargo has fetched it already) but strips
# the tools' sources, so those two come from the llama-cpp-python sdist, the newest
# llama.cpp a package registry ships, and are built over the crate's library,
# kernels and common code. (An earlier version built everything from the sdist: an
# older commit with other kernels, so a gap it measured could be llama.cpp's, not
# modeld's.) Two builds, each matching one build of the agent, cached under
# ~/.cache/modeld/llama-tools per crate version:
#
#   portable  every CPU variant as a module, the best chosen at startup (what the
#             agent's default build does), with the AMX variant removed as the agent
#             withholds it;
#   native    tuned for this CPU, AMX kept out (-mno-amx-*), as scripts/build-native.
#
#   bench/build-llama-tools.sh portable|native    prints the directory of the binaries
set -euo pipefail
cd "$(dirname "$0")/.."
KIND="${1:-portable}"
crate="$(cargo metadata --format-version 1 --locked | python3 -c '
import json, os, sys
package = next(p for p in json.load(sys.stdin)["packages"] if p["name"] == "llama-cpp-sys-2")
print(package["version"], os.path.dirname(package["manifest_path"]))
')"
read -r VERSION crate_dir <<<"$crate"
TOOLS_SDIST=0.3.36
cache="${MODELD_CACHE_DIR:-$HOME/.cache/modeld}/llama-tools"
build="$cache/build-sys-$VERSION-$KIND"
bin="$build/bin"
if [[ -x "$bin/llama-bench" && -x "$bin/llama-batched-bench" ]]; then
    echo "$bin"
    exit 0
fi
mkdir -p "$cache"
cd "$cache"
sdist="llama_cpp_python-$TOOLS_SDIST.tar.gz"
if [[ ! -f "$sdist" ]]; then
    python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$TOOLS_SDIST" -d . >&2
fi
# The crate's llama.cpp with the two tools put back, and only them in tools/.
source_dir="$cache/src-sys-$VERSION"
if [[ ! -d "$source_dir" ]]; then
    rm -rf "$source_dir.tmp"
    cp -r "$crate_dir/llama.cpp" "$source_dir.tmp"
    chmod -R u+w "$source_dir.tmp"
    for tool in llama-bench batched-bench; do
        rm -rf "$source_dir.tmp/tools/$tool"
        tar -xzf "$sdist" -C "$source_dir.tmp/tools" --strip-components=4 \
            "llama_cpp_python-$TOOLS_SDIST/vendor/llama.cpp/tools/$tool"
    done
    printf 'add_subdirectory(batched-bench)\nadd_subdirectory(llama-bench)\n' >"$source_dir.tmp/tools/CMakeLists.txt"
    mv "$source_dir.tmp" "$source_dir"
fi
case "$KIND" in
    portable) flags=(-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DBUILD_SHARED_LIBS=ON) ;;
    native)
        flags=(-DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF)
        if [[ "$(uname -m)" == x86_64 ]]; then
            noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
            flags+=("-DCMAKE_C_FLAGS=$noamx" "-DCMAKE_CXX_FLAGS=$noamx")
        fi
        ;;
    *) echo "usage: $0 portable|native" >&2; exit 2 ;;
esac
rm -rf "$build"
cmake -S "$source_dir" -B "$build" \
    -DCMAKE_BUILD_TYPE=Release "${flags[@]}" \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF >&2
targets=(llama-bench llama-batched-bench)
if [[ "$KIND" == portable ]]; then
    # The variant modules are separate targets that nothing links against.
    mapfile -t variants < <(cmake --build "$build" --target help | awk '/ggml-cpu-/ {gsub(/^\.\.\. /, ""); print $1}')
    targets+=("${variants[@]}")
fi
cmake --build "$build" -j"$(nproc)" --target "${targets[@]}" >&2
# ggml loads the variants it finds beside the binary; withhold the AMX one as modeld does.
rm -f "$bin"/libggml-cpu-sapphirerapids.*
echo "$bin"
