#!/usr/bin/env bash
# Build llama.cpp's own C++ server (the peer the benchmarks compare against) from the llama.cpp
# sources vendored in the pinned llama-cpp-python sdist: the same engine code as our backend.
# The binary is cached like the wheels: .peers/llama-server-<version>-<flags>/bin/llama-server.
# The CPU flags of our wheel (scripts/bootstrap.sh): portable (GGML_NATIVE=OFF) and without
# llamafile's tinyBLAS (GGML_LLAMAFILE=OFF), so both engines run the same kernels; ~8 minutes on
# 2 cores. Prints its path.
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_VERSION=0.3.36
PEERS=${PEERS:-.peers}
OUT="$PEERS/llama-server-$LLAMA_VERSION-nollamafile"
BIN="$OUT/bin/llama-server"
PYTHON=${PYTHON:-.venv/bin/python}

if [ ! -x "$BIN" ]; then
  src=$(mktemp -d)
  trap 'rm -rf "$src"' EXIT
  "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    "llama-cpp-python==$LLAMA_VERSION" -d "$src" >&2
  tar -xzf "$src"/llama_cpp_python-"$LLAMA_VERSION".tar.gz -C "$src"
  llama="$src/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp"
  echo "building llama-server from $llama ..." >&2
  cmake -S "$llama" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_LLAMAFILE=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >&2
  cmake --build "$src/build" --target llama-server -j "$(nproc)" >&2
  mkdir -p "$OUT/bin"
  cp "$src/build/bin/llama-server" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
fi
echo "$BIN"
