#!/usr/bin/env bash
# Builds llama.cpp's own benchmark tools (llama-bench, llama-batched-bench) as the
# reference for bench/generate.sh. They are not in the llama-cpp-sys-2 crate; the
# llama-cpp-python sdist vendors llama.cpp with its tools. Two builds, each matching
# one build of the agent, cached under ~/.cache/modeld/llama-tools:
#
#   portable  every CPU variant as a module, the best chosen at startup (what the
#             agent's default build does), with the AMX variant removed as the agent
#             withholds it;
#   native    tuned for this CPU, AMX kept out (-mno-amx-*), as scripts/build-native.
#
#   bench/build-llama-tools.sh portable|native    prints the directory of the binaries
set -euo pipefail
KIND="${1:-portable}"
VERSION=0.3.36
cache="${MODELD_CACHE_DIR:-$HOME/.cache/modeld}/llama-tools"
build="$cache/build-$VERSION-$KIND"
bin="$build/bin"
if [[ -x "$bin/llama-bench" && -x "$bin/llama-batched-bench" ]]; then
    echo "$bin"
    exit 0
fi
mkdir -p "$cache"
cd "$cache"
sdist="llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$sdist" ]]; then
    python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d . >&2
fi
if [[ ! -d "src-$VERSION" ]]; then
    mkdir "src-$VERSION.tmp"
    tar -xzf "$sdist" -C "src-$VERSION.tmp" --strip-components=1
    mv "src-$VERSION.tmp" "src-$VERSION"
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
cmake -S "src-$VERSION/vendor/llama.cpp" -B "$build" \
    -DCMAKE_BUILD_TYPE=Release "${flags[@]}" \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF >&2
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
