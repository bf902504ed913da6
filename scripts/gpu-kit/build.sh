#!/usr/bin/env bash
# Fill the git-ignored folder .gpu-kit/ (on the CPU machine) with everything the GPU check needs
# beyond the GPU machine's own packages (python 3.12, torch 2.11.0+cu130, transformers, safetensors,
# tokenizers, numpy, nvcc 13.0), within a 60 MiB budget:
#   .gpu-kit/wheels/*.whl                       py3.12 wheels (exllamav2, exllamav3, the project's deps,
#                                               hatchling) and the CUDA (sm_90) llama-cpp-python wheel
#   .gpu-kit/ext/exllamav2_ext.so.xz            exllamav2 0.3.2 extension prebuilt for torch 2.11.0+cu130/sm_90
#   .gpu-kit/MANIFEST                           file, size, sha256 of each, and the total
#
# The heavy builds run in a scratch folder outside the repo ($GPU_KIT_WORK, default /work/gpuwork) and are
# reused when their artifact already exists there (--force rebuilds). Every build runs under `nice -n 19`
# with at most $JOBS (2) parallel jobs.
#
# usage: scripts/gpu-kit/build.sh [STEP...] [--force]
#   steps (default: all, in this order):
#     --toolkit    copy nvcc 13.0 into $WORK/cuda13, add cuBLAS/cuSPARSE/cuSOLVER/cuRAND headers and libs
#                  from the nvidia-* cu13 wheels, and a libcuda stub that defines the driver API symbols
#     --llama      build + slim the CUDA llama-cpp-python wheel            (~3,700 CPU-s)
#     --torch-venv py3.12 venv with the real torch wheel made importable with stub CUDA libraries
#     --exl2-ext   prebuild the exllamav2 extension under a stubbed torch   (~1,100 CPU-s)
#     --wheels     download the py3.12 wheels the GPU machine lacks
#     --verify     the CUDA wheel's libraries resolve every symbol against the cu13 wheels' libs;
#                  the prebuilt exllamav2 extension imports under the (stubbed) torch 2.11.0
#     --assemble   copy artifacts into .gpu-kit/ and write MANIFEST (fails above the budget)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
WORK=${GPU_KIT_WORK:-/work/gpuwork}
KIT=${GPU_KIT_DIR:-$REPO/.gpu-kit}
PY312=${PY312:-/root/.pyenv/versions/3.12.1/bin/python3.12}
CUDA_SRC=${CUDA_SRC:-/usr/local/cuda-13.0}
JOBS=${JOBS:-2}
BUDGET_MIB=${BUDGET_MIB:-60}

LLAMA_VERSION=0.3.36
EXL2_VERSION=0.3.2
TORCH_VERSION=2.11.0
# nvidia-* cu13 wheels matching torch 2.11.0's cuda-toolkit==13.0.2 pin (headers + libs to build against)
NV_SPEC='cuda-toolkit[cublas,cudart,cusparse,cusolver,curand]==13.0.2'
# What the GPU machine lacks (see scripts/gpu-kit/requirements-device.txt for the pinned list).
DEVICE_REQS=$HERE/requirements-device.txt

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64
           --platform manylinux_2_35_x86_64 --platform linux_x86_64)

FORCE=0
STEPS=()

log() { printf '[gpu-kit %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
niced() { nice -n 19 "$@"; }

venv_build() {  # build tools for llama-cpp-python (python 3.12: the wheel must be cp312)
    if [ ! -x "$WORK/venv-build/bin/python" ]; then
        "$PY312" -m venv "$WORK/venv-build"
        "$WORK/venv-build/bin/pip" install -q -U pip
    fi
    "$WORK/venv-build/bin/pip" install -q scikit-build-core 'cmake>=3.27' ninja
}

write_libcuda_stub() {  # $1 = output dir; a libcuda.so (SONAME libcuda.so.1) defining every driver API entry
    local out=$1 c
    mkdir -p "$out"
    c=$out/libcuda_stub.c
    {
        echo '/* link-time stand-in for the CUDA driver; the real libcuda.so.1 comes with the GPU driver */'
        printf '#include <cuda.h>\n' | gcc -E -x c -I"$WORK/cuda13/include" - \
            | grep -oE '\bCUresult[[:space:]]+cu[A-Za-z0-9_]+[[:space:]]*\(' \
            | sed -E 's/^CUresult[[:space:]]+//; s/[[:space:]]*\($//' | sort -u \
            | sed -E 's/.*/int &(void){return 999;}/'
    } > "$c"
    gcc -shared -fPIC -w -fno-builtin -Wl,-soname,libcuda.so.1 -o "$out/libcuda.so" "$c"
    ln -sf libcuda.so "$out/libcuda.so.1"
    log "libcuda stub: $(grep -c '^int ' "$c") driver symbols -> $out/libcuda.so"
}

nv_unpack() {  # the nvidia-* cu13 wheels (what torch 2.11.0 runs with on the GPU) -> $WORK/nvx/nvidia/cu13
    local w
    for w in "$WORK"/dl/nv/nvidia_{cublas,cuda_runtime,cusparse,cusolver,curand,nvjitlink}-*.whl; do
        unzip -q -n "$w" 'nvidia/cu13/*' -d "$WORK/nvx"
    done
}

step_toolkit() {
    local tk=$WORK/cuda13 w f
    if [ -f "$tk/.ready" ] && [ "$FORCE" = 0 ]; then log "toolkit: reuse $tk"; return; fi
    log "toolkit: $CUDA_SRC + nvidia-* cu13 wheels -> $tk"
    mkdir -p "$WORK/dl/nv"
    venv_build
    "$WORK/venv-build/bin/pip" download -q --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" "$NV_SPEC" -d "$WORK/dl/nv"
    rm -rf "$tk" "$WORK/nvx"
    cp -a "$CUDA_SRC" "$tk"
    nv_unpack
    cp -n -r "$WORK"/nvx/nvidia/cu13/include/. "$tk/include/"
    for f in "$WORK"/nvx/nvidia/cu13/lib/*.so.*; do
        cp -n "$f" "$tk/lib/"
        ln -sf "$(basename "$f")" "$tk/lib/$(basename "$f" | sed -E 's/\.so\..*$/.so/')"
    done
    write_libcuda_stub "$tk/lib/stubs"
    touch "$tk/.ready"
}

llama_wheel() { ls "$WORK"/wheels_out/slim/llama_cpp_python-$LLAMA_VERSION-*.whl 2>/dev/null | head -1 || true; }

step_llama() {
    local src=$WORK/src/llama_cpp_python-$LLAMA_VERSION raw
    if [ -n "$(llama_wheel)" ] && [ "$FORCE" = 0 ]; then log "llama: reuse $(llama_wheel)"; return; fi
    [ -f "$WORK/cuda13/.ready" ] || step_toolkit
    venv_build
    if [ ! -d "$src" ]; then
        mkdir -p "$WORK/src"
        "$WORK/venv-build/bin/pip" download -q --no-deps --no-binary=:all: "llama-cpp-python==$LLAMA_VERSION" -d "$WORK/src"
        tar xzf "$WORK/src/llama_cpp_python-$LLAMA_VERSION.tar.gz" -C "$WORK/src"
    fi
    mkdir -p "$WORK/wheels_out/raw"
    log "llama: building CUDA sm_90 wheel (nice 19, $JOBS jobs; ~3,700 CPU-s)"
    date +%s > "$WORK/llama_build.start"
    (
        cd "$src"
        export PATH=$WORK/venv-build/bin:$WORK/cuda13/bin:$PATH
        export CUDA_HOME=$WORK/cuda13 CUDA_PATH=$WORK/cuda13 CUDACXX=$WORK/cuda13/bin/nvcc
        export CMAKE_BUILD_PARALLEL_LEVEL=$JOBS
        export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90-real -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF \
-DCUDAToolkit_ROOT=$WORK/cuda13 -DCMAKE_CUDA_COMPILER=$WORK/cuda13/bin/nvcc \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
        niced pip wheel --no-cache-dir --no-deps --no-build-isolation -v . -w "$WORK/wheels_out/raw" \
            --config-settings=build-dir="$WORK/build-llama"
    )
    date +%s > "$WORK/llama_build.end"
    raw=$(ls "$WORK"/wheels_out/raw/llama_cpp_python-$LLAMA_VERSION-*.whl | head -1)
    mkdir -p "$WORK/wheels_out/slim"
    niced "$WORK/venv-build/bin/python" "$HERE/slim_wheel.py" "$raw" "$WORK/wheels_out/slim/$(basename "$raw")"
    log "llama: $(llama_wheel) ($(du -m "$(llama_wheel)" | cut -f1) MiB)"
}

step_torch_venv() { venv_torch; }

venv_torch() {  # py3.12 venv with the real torch 2.11.0 wheel (no nvidia-* deps) + exllamav2, for the ext build
    local v=$WORK/venv312
    if [ -f "$v/.ready" ]; then return; fi
    [ -x "$v/bin/python" ] || "$PY312" -m venv "$v"
    "$v/bin/pip" install -q -U pip
    mkdir -p "$WORK/dl"
    "$v/bin/pip" download -q --no-deps --only-binary=:all: "torch==$TORCH_VERSION" -d "$WORK/dl"
    "$v/bin/pip" install -q --no-deps "$WORK"/dl/torch-$TORCH_VERSION-cp312-*.whl
    "$v/bin/pip" install -q filelock 'typing-extensions>=4.10' 'setuptools<82' sympy networkx jinja2 fsspec ninja
    "$v/bin/pip" install -q "exllamav2==$EXL2_VERSION"
    # what the GPU machine has besides torch: exllamav2 imports tokenizers, make_tiny_models.py (--verify)
    # transformers; pip did not bring them with exllamav2 here
    "$v/bin/pip" install -q tokenizers transformers safetensors numpy certifi
    "$v/bin/python" "$HERE/make_torch_stubs.py" "$v/lib/python3.12/site-packages/torch/lib" "$WORK/stubs312"
    touch "$v/.ready"
}

exl2_ext() { echo "$WORK/ext/exllamav2_ext.so.xz"; }  # xz: 10 MiB where gzip -9 made 14

step_exl2_ext() {
    local so
    if [ -f "$(exl2_ext)" ] && [ "$FORCE" = 0 ]; then log "exl2-ext: reuse $(exl2_ext)"; return; fi
    [ -f "$WORK/cuda13/.ready" ] || step_toolkit
    venv_torch
    log "exl2-ext: JIT-building exllamav2_ext for torch $TORCH_VERSION/cp312/sm_90 (nice 19, $JOBS jobs; ~1,100 CPU-s)"
    date +%s > "$WORK/exl2_build.start"
    (
        export LD_LIBRARY_PATH=$WORK/stubs312:$WORK/cuda13/lib
        export CUDA_HOME=$WORK/cuda13 PATH=$WORK/cuda13/bin:$WORK/venv312/bin:$PATH
        export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$JOBS TORCH_EXTENSIONS_DIR=$WORK/torch_ext312
        cd "$WORK"
        niced "$WORK/venv312/bin/python" -c "
import time; t = time.time()
import exllamav2.ext as e
print('exllamav2_ext built:', e.exllamav2_ext.__file__, round(time.time() - t, 1), 's')"
    )
    date +%s > "$WORK/exl2_build.end"
    so=$WORK/torch_ext312/exllamav2_ext/exllamav2_ext.so
    [ -f "$so" ] || die "exl2-ext: $so missing"
    mkdir -p "$WORK/ext"
    strip --strip-unneeded -o "$WORK/ext/exllamav2_ext.so" "$so"
    niced xz -9e -T1 -c "$WORK/ext/exllamav2_ext.so" > "$(exl2_ext).tmp" && mv "$(exl2_ext).tmp" "$(exl2_ext)"
    log "exl2-ext: $(exl2_ext) ($(du -m "$(exl2_ext)" | cut -f1) MiB)"
}

step_wheels() {
    local d=$WORK/device-wheels
    if [ -f "$d/.ready" ] && [ "$FORCE" = 0 ] && [ "$d/.ready" -nt "$DEVICE_REQS" ]; then
        log "wheels: reuse $d"; return
    fi
    rm -rf "$d" && mkdir -p "$d"
    log "wheels: downloading $(grep -cvE '^\s*(#|$)' "$DEVICE_REQS") py3.12 wheels -> $d"
    "$PY312" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --abi cp312 --abi abi3 --abi none "${PLATFORMS[@]}" -r "$DEVICE_REQS" -d "$d"
    touch "$d/.ready"
}

step_verify() {  # what a CPU can check of the two binary artifacts
    local w tmp nvlib rc=0 torch_env f
    w=$(llama_wheel)
    nvlib=$WORK/nvx/nvidia/cu13/lib   # the cu13 wheels torch 2.11.0 depends on = the GPU machine's libs
    torch_env="LD_LIBRARY_PATH=$WORK/stubs312:$WORK/cuda13/lib"
    nv_unpack
    [ -f "$WORK/venv312/.ready" ] || venv_torch
    if [ -n "$w" ]; then
        tmp=$(mktemp -d)
        unzip -q "$w" -d "$tmp/whl"
        log "verify: $(basename "$w"): NEEDED of each library"
        for f in "$tmp"/whl/llama_cpp/lib/*.so*; do
            printf '  %-22s %s\n' "$(basename "$f")" \
                "$(readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
        done
        readelf -d "$tmp/whl/llama_cpp/lib/libggml-cuda.so.0" | grep -q 'libcuda.so.1' ||
            { log "verify: libggml-cuda does not link libcuda.so.1"; rc=1; }
        log "verify: the device wheels + CUDA wheel install together (pip --target, --no-deps)"
        "$WORK/venv312/bin/python" -m pip install -q --no-index --no-deps --no-compile --target "$tmp/site" \
            "$WORK"/device-wheels/*.whl "$w" || rc=1
        log "verify: tiny models, then dlopen(RTLD_NOW) each library, import llama_cpp, generate on the CPU"
        # as on the GPU machine: its own torch/transformers, the kit's wheels (gguf) on PYTHONPATH
        env "$torch_env" PYTHONPATH="$tmp/site" "$WORK/venv312/bin/python" "$HERE/make_tiny_models.py" \
            "$tmp/models" > "$tmp/make_tiny_models.log" 2>&1 || { rc=1; tail -n 5 "$tmp/make_tiny_models.log"; }
        LD_LIBRARY_PATH=$nvlib:$WORK/cuda13/lib/stubs PYTHONPATH=$tmp/site OMP_WAIT_POLICY=PASSIVE \
            "$WORK/venv312/bin/python" - "$tmp/site" "$tmp/models/llama-tiny-f16.gguf" <<'PY' || rc=1
import ctypes, glob, os, sys
for f in sorted(glob.glob(os.path.join(sys.argv[1], "llama_cpp/lib/*.so*"))):
    ctypes.CDLL(f, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    print("  resolved", os.path.basename(f))
import llama_cpp
info = llama_cpp.llama_print_system_info().decode()
print("  llama_cpp", llama_cpp.__version__, "|", info.strip()[:60])
assert "CUDA : ARCHS = 900" in info, info
llm = llama_cpp.Llama(model_path=sys.argv[2], n_gpu_layers=0, n_ctx=256, n_threads=1, verbose=False)
text = llm.create_completion("Hello", max_tokens=16, temperature=0.0)["choices"][0]["text"]
print("  CPU completion through the CUDA build (no GPU here):", repr(text))
assert text
PY
        rm -rf "$tmp"
    else
        log "verify: no CUDA llama-cpp-python wheel yet"
    fi
    if [ -f "$(exl2_ext)" ]; then
        tmp=$(mktemp -d)
        xz -dc "$(exl2_ext)" > "$tmp/exllamav2_ext.so"
        log "verify: prebuilt exllamav2_ext imports under torch $TORCH_VERSION (stub CUDA libs) and is used"
        (cd "$tmp" && env "$torch_env" PYTHONPATH="$tmp" TORCH_EXTENSIONS_DIR="$tmp/none" \
            "$WORK/venv312/bin/python" -c "
import torch, exllamav2_ext, exllamav2.ext as e
assert e.exllamav2_ext is exllamav2_ext, e.exllamav2_ext
print('  exllamav2_ext', exllamav2_ext.__file__, len(dir(exllamav2_ext)), 'names; torch', torch.__version__)
" 2>&1 | grep -v 'No CUDA runtime'; exit "${PIPESTATUS[0]}") || rc=1
        rm -rf "$tmp"
    else
        log "verify: no prebuilt exllamav2 extension yet"
    fi
    [ "$rc" = 0 ] || die "verify failed"
}

write_manifest() {  # MANIFEST: "path size sha256" per file, then "TOTAL bytes MiB"
    local total=0 f sz
    (
        cd "$KIT"
        find . -type f ! -name 'MANIFEST*' | sed 's|^\./||' | LC_ALL=C sort | while read -r f; do
            sz=$(stat -c %s "$f")
            printf '%s %s %s\n' "$f" "$sz" "$(sha256sum "$f" | cut -d' ' -f1)"
        done
    ) > "$KIT/MANIFEST.tmp"
    total=$(awk '{s += $2} END {print s + 0}' "$KIT/MANIFEST.tmp")
    printf 'TOTAL %s %.1fMiB budget=%sMiB\n' "$total" "$(echo "$total / 1048576" | bc -l)" "$BUDGET_MIB" >> "$KIT/MANIFEST.tmp"
    mv "$KIT/MANIFEST.tmp" "$KIT/MANIFEST"
    echo "$total"
}

step_assemble() {
    local total w
    rm -rf "$KIT" && mkdir -p "$KIT/wheels" "$KIT/ext"
    cp "$WORK"/device-wheels/*.whl "$KIT/wheels/" 2>/dev/null || log "assemble: no device wheels (run --wheels)"
    w=$(llama_wheel)
    if [ -n "$w" ]; then
        cp "$w" "$KIT/wheels/"
    else
        log "assemble: no CUDA llama-cpp-python wheel yet (run --llama)"
    fi
    if [ -f "$(exl2_ext)" ]; then cp "$(exl2_ext)" "$KIT/ext/"; else log "assemble: no exllamav2 ext (JIT on device)"; fi
    total=$(write_manifest)
    log "assemble: $KIT = $((total / 1048576)) MiB (budget $BUDGET_MIB MiB)"
    tail -n 1 "$KIT/MANIFEST" >&2
    [ "$total" -le $((BUDGET_MIB * 1048576)) ] || die "kit is over budget: $total bytes > $BUDGET_MIB MiB"
}

main() {
    local a s
    for a in "$@"; do
        case $a in
            --force) FORCE=1 ;;
            --toolkit|--llama|--torch-venv|--exl2-ext|--wheels|--verify|--assemble) STEPS+=("${a#--}") ;;
            -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
            *) die "unknown argument: $a" ;;
        esac
    done
    [ ${#STEPS[@]} -gt 0 ] || STEPS=(toolkit llama torch-venv exl2-ext wheels verify assemble)
    mkdir -p "$WORK"
    for s in "${STEPS[@]}"; do
        SECONDS=0
        "step_${s//-/_}"
        log "step $s done in ${SECONDS}s"
    done
}

main "$@"
