#!/usr/bin/env bash
# Add llama.cpp's own server to the GPU kit, built from the same sources and build tree as the CUDA
# llama-cpp-python wheel (scripts/gpu-kit/build.sh --llama keeps its CMake tree in $GPU_KIT_WORK/build-llama):
# the same configure flags plus LLAMA_BUILD_TOOLS/LLAMA_BUILD_SERVER, so only the server and its
# helper libraries compile (minutes; the CUDA kernels are already built). llama-server stays linked to
# the shared libllama/libggml*, which on the GPU machine come from the installed wheel
# (LD_LIBRARY_PATH=<site>/llama_cpp/lib, set by scripts/gpu-check.sh): both servers run the same
# library code. Its own extra shared libraries (libmtmd...) travel next to it.
#
# usage: scripts/gpu-kit/add_llama_server.sh     (after build.sh: its --assemble empties .gpu-kit/bin)
# writes .gpu-kit/bin/llama-server.gz (+ lib*.so.*.gz the wheel lacks) and rewrites .gpu-kit/MANIFEST.
# Not yet run on this project's machines: check `scripts/gpu-check.sh --dry-run` (budget) afterwards.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
WORK=${GPU_KIT_WORK:-/work/gpuwork}
KIT=${GPU_KIT_DIR:-$REPO/.gpu-kit}
JOBS=${JOBS:-2}
BUDGET_MIB=${BUDGET_MIB:-60}
BUILD=$WORK/build-llama

log() { printf '[add-llama-server %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ -f "$BUILD/CMakeCache.txt" ] || die "no $BUILD/CMakeCache.txt: run scripts/gpu-kit/build.sh --llama first"
[ -f "$KIT/MANIFEST" ] || die "no $KIT/MANIFEST: run scripts/gpu-kit/build.sh first"
export PATH=$WORK/venv-build/bin:$WORK/cuda13/bin:$PATH
export CUDA_HOME=$WORK/cuda13 CUDA_PATH=$WORK/cuda13 CUDACXX=$WORK/cuda13/bin/nvcc
# linking the executable resolves libggml-cuda's own NEEDED (libcublas.so.13, the libcuda stub): GNU ld
# looks for them on LD_LIBRARY_PATH
export LD_LIBRARY_PATH=$WORK/cuda13/lib:$WORK/cuda13/lib/stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

log "configure $BUILD with the server on (the cache keeps every other flag of the wheel build)"
nice -n 19 cmake -S "$(grep -m1 '^CMAKE_HOME_DIRECTORY' "$BUILD/CMakeCache.txt" | cut -d= -f2)" -B "$BUILD" \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF > "$WORK/add_llama_server.configure.log"
log "build llama-server ($JOBS jobs)"
nice -n 19 cmake --build "$BUILD" --target llama-server -j "$JOBS" > "$WORK/add_llama_server.build.log"
bin=$(find "$BUILD" -type f -name llama-server -perm -u+x | head -1)
[ -n "$bin" ] || die "no llama-server binary under $BUILD"

rm -rf "$KIT/bin" && mkdir -p "$KIT/bin"
strip --strip-unneeded -o "$WORK/llama-server.stripped" "$bin"
gzip -9 -c "$WORK/llama-server.stripped" > "$KIT/bin/llama-server.gz"
# shared libraries it needs from the build tree that the slimmed wheel does not ship (libllama-server-impl,
# libllama-common, libmtmd...), followed through their own NEEDED; the wheel's are matched by SONAME
# (its libllama.so is libllama.so.0: gpu-check.sh links the SONAME names on the device)
wheel_dir=$(mktemp -d)
unzip -q "$(ls "$KIT"/wheels/llama_cpp_python-*.whl | head -1)" 'llama_cpp/lib/*' -d "$wheel_dir"
wheel_libs=$(for f in "$wheel_dir"/llama_cpp/lib/*; do
    basename "$f"
    readelf -d "$f" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p'
done | sort -u)
rm -rf "$wheel_dir"
queue=("$bin") carried=""
while [ ${#queue[@]} -gt 0 ]; do
    file=${queue[0]} && queue=("${queue[@]:1}")
    for need in $(readelf -d "$file" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
        case $need in libc.so* | libm.so* | libstdc++* | libgcc_s* | libgomp* | ld-linux* | libpthread* | libdl* | \
            libcuda* | librt.so* | libssl.so* | libcrypto.so*) continue ;; esac
        grep -qxF "$need" <<< "$wheel_libs" && continue
        grep -qxF "$need" <<< "$carried" && continue
        carried+="$need"$'\n'
        lib=$(find "$BUILD" -name "$need" | head -1)
        [ -n "$lib" ] || { log "warning: $need neither in the wheel nor in $BUILD"; continue; }
        strip --strip-unneeded -o "$WORK/$need" "$(readlink -f "$lib")"
        gzip -9 -c "$WORK/$need" > "$KIT/bin/$need.gz"
        log "carried $need (needed by $(basename "$file"))"
        queue+=("$(readlink -f "$lib")")
    done
done

( cd "$KIT"
  find . -type f ! -name 'MANIFEST*' | sed 's|^\./||' | LC_ALL=C sort | while read -r f; do
      printf '%s %s %s\n' "$f" "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -d' ' -f1)"
  done ) > "$KIT/MANIFEST.tmp"
total=$(awk '{s += $2} END {print s + 0}' "$KIT/MANIFEST.tmp")
printf 'TOTAL %s %.1fMiB budget=%sMiB\n' "$total" "$(echo "$total / 1048576" | bc -l)" "$BUDGET_MIB" >> "$KIT/MANIFEST.tmp"
mv "$KIT/MANIFEST.tmp" "$KIT/MANIFEST"
log "kit: $((total / 1048576)) MiB (budget $BUDGET_MIB MiB); bin: $(ls "$KIT/bin" | tr '\n' ' ')"
[ "$total" -le $((BUDGET_MIB * 1048576)) ] || die "kit over budget"
