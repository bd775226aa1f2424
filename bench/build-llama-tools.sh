#!/usr/bin/env bash
# Builds llama.cpp's own benchmark tools (llama-bench, llama-batched-bench) as the
# reference for bench/generate.sh. They are not in the llama-cpp-sys-2 crate; the
# llama-cpp-python sdist vendors llama.cpp with its tools. Built once, with the same
# native CPU tuning as the agent, and cached under ~/.cache/modeld/llama-tools.
#
#   bench/build-llama-tools.sh     prints the directory holding the binaries
set -euo pipefail
VERSION=0.3.36
cache="${MODELD_CACHE_DIR:-$HOME/.cache/modeld}/llama-tools"
bin="$cache/build-$VERSION/bin"
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
rm -rf "src-$VERSION"
mkdir "src-$VERSION"
tar -xzf "$sdist" -C "src-$VERSION" --strip-components=1
cmake -S "src-$VERSION/vendor/llama.cpp" -B "build-$VERSION" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF >&2
cmake --build "build-$VERSION" -j"$(nproc)" --target llama-bench llama-batched-bench >&2
echo "$bin"
