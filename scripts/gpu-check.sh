#!/usr/bin/env bash
# One-shot GPU check of the CUDA backends (llama.cpp, ExLlamaV2, ExLlamaV3) on a lent H100/H200 that has
# python 3.12, torch 2.11.0+cu130, nvcc 13.0, transformers, and no network. Everything else comes from the
# git-ignored folder .gpu-kit/ (filled on the CPU machine by scripts/gpu-kit/build.sh; carry it).
#
# usage: scripts/gpu-check.sh OUTDIR [--part all|llama-exl2|exl3|sizes|speculative] [--deadline SECONDS]
#        scripts/gpu-check.sh [OUTDIR] --dry-run      (CPU/CI: the kit's MANIFEST and size budget, then
#                                                      the `sizes` and `speculative` steps with tiny
#                                                      models on the CPU)
#
# Steps, each logged with its elapsed seconds and run under its own `timeout` (a failing step never stops
# the later ones; all limits are cut to fit the overall deadline, default 450 s):
#   env, install-wheels (pip --no-index --no-deps --target), install-project (entry points), exl2-ext
#   (prebuilt, JIT fallback), exl3-jit (background, all cores but two), tiny-models (HF fp16 + GGUF),
#   smoke-llama, exl2-convert, smoke-exl2, pytest-gpu (-m gpu, not exllamav3), bench, exl3-convert,
#   smoke-exl3, pytest-gpu-exl3, bench-exl3.
# --part sizes (issue 29, real model sizes; same deadline): env, install-wheels, install-project,
#   llama-server (the CUDA binary carried in .gpu-kit/bin, built from the same sources as the wheel),
#   real-sizes (scripts/gpu-kit/real_sizes.py: Llama-3-8B-shaped Q4_K_M and Q8_0 GGUFs made with the
#   gguf package, `gateway serve` beside llama-server and llama_cpp.server at 1/8/32/64 streams x 256
#   tokens, the bandwidth roofline, the engine-loop profile at 64 streams) -> OUTDIR/real-sizes.md,
#   to be copied to docs/gpu-check/. --dry-run runs the same driver with --tiny on the CPU
#   (GPU_CHECK_DRY_SIZES=0 leaves it out).
# --part speculative (issue 25's GPU clause; same deadline): env, install-wheels, install-project,
#   llama-server, spec-model (a random-weight Llama-3-8B-shaped Q4_K_M GGUF, real_sizes.make_gguf; kept in
#   /tmp/gpu-check for a later run), bench-verify-cost (bench/bench_verify_cost.py: what verifying k draft
#   tokens costs on the GPU, the ceiling of any drafting -> OUTDIR/verify-cost.json, 8 sequences at 4k
#   cells -> OUTDIR/verify-cost-8-seqs.json), bench-speculative
#   (bench/bench_speculative.py on that model: gateway ngram/off vs llama-server ngram-mod/off, 1 and 8
#   streams -> OUTDIR/speculative.json; random weights copy nothing, so its edit task measures drafts
#   that miss). --dry-run runs the same steps with the tiny shape on the CPU (GPU_CHECK_DRY_SPEC=0
#   leaves it out).
# Tests find the models through GATEWAY_TEST_HF_MODEL, GATEWAY_TEST_GGUF_MODEL, GATEWAY_TEST_EXL2_MODEL and
# GATEWAY_TEST_EXL3_MODEL (a test whose variable is unset should skip). bench/bench_backends.py, if present,
# gets the same variables plus GATEWAY_BENCH_OUT (a folder whose files land in the report) and
# $GPU_CHECK_BENCH_ARGS as arguments. GPU_CHECK_SKIP="step ..." skips steps by name (e.g. a CPU rehearsal:
# GPU_CHECK_SKIP="exl2-ext-jit exl3-jit").
#
# OUTDIR receives at most 7 files (the device tool brings back 8): report.md, gpu-check.log, junit-gpu.xml,
# junit-gpu-exl3.xml, logs.tar.gz (every step's log and result), and exllamav2_ext.so.gz / exllamav3_ext.so.gz
# when an extension had to be JIT-compiled here (carry them next time; exllamav3's only if under 15 MiB).
# --part sizes writes report.md, gpu-check.log, logs.tar.gz and real-sizes.md.
set -uo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SELF")/.." && pwd)
KIT=${GPU_KIT_DIR:-$REPO/.gpu-kit}
KIT_SCRIPTS=$REPO/scripts/gpu-kit
BUDGET_MIB=${BUDGET_MIB:-60}
TRAVEL_MIB=64

log() { printf '[gpu-check %5ss] %s\n' "$SECONDS" "$*"; }

# ------------------------------------------------------------------------------------------ dry run (CPU)

manifest_check() {  # verify every MANIFEST row (size + sha256), no unlisted file, total within budget
    local bad=0 path size sha total=0 listed unlisted
    listed=$(mktemp)
    while read -r path size sha; do
        [ "$path" = TOTAL ] && continue
        echo "$path" >> "$listed"
        if [ ! -f "$KIT/$path" ]; then echo "  MISSING  $path"; bad=1; continue; fi
        if [ "$(stat -c %s "$KIT/$path")" != "$size" ]; then echo "  SIZE     $path"; bad=1; fi
        if [ "$(sha256sum "$KIT/$path" | cut -d' ' -f1)" != "$sha" ]; then echo "  SHA256   $path"; bad=1; fi
        total=$((total + size))
        printf '  %9s  %s\n' "$size" "$path"
    done < "$KIT/MANIFEST"
    unlisted=$( (cd "$KIT" && find . -type f ! -name MANIFEST | sed 's|^\./||') | grep -vxFf "$listed")
    [ -z "$unlisted" ] || { echo "$unlisted" | sed 's/^/  UNLISTED /'; bad=1; }
    rm -f "$listed"
    printf '  kit total: %s bytes = %s MiB (budget %s MiB)\n' "$total" "$((total / 1048576))" "$BUDGET_MIB"
    grep -q '^TOTAL ' "$KIT/MANIFEST" || { echo "  MANIFEST has no TOTAL line"; bad=1; }
    [ "$total" -le $((BUDGET_MIB * 1048576)) ] || { echo "  OVER BUDGET"; bad=1; }
    [ -n "$(ls "$KIT"/wheels/llama_cpp_python-*.whl 2>/dev/null)" ] || echo "  note: no CUDA llama-cpp-python wheel"
    [ -f "$KIT/ext/exllamav2_ext.so.xz" ] || echo "  note: no prebuilt exllamav2 extension (JIT on the GPU)"
    return $bad
}

travel_size() {  # bytes of what the device tool sends: tracked + untracked-not-ignored files (+ the kit)
    (cd "$REPO" && git ls-files -co --exclude-standard -z 2>/dev/null | xargs -0 -r stat -c %s -- 2>/dev/null) \
        | awk '{s += $1} END {print s + 0}'
}

dry_run() {
    local bad=0 f tree kit=0
    log "dry run: repo $REPO, kit $KIT"
    bash -n "$SELF" || bad=1
    for f in build.sh make_tiny_models.py smoke.py requirements-device.txt slim_wheel.py make_torch_stubs.py \
        real_sizes.py add_llama_server.sh; do
        [ -f "$KIT_SCRIPTS/$f" ] || { echo "  missing scripts/gpu-kit/$f"; bad=1; }
    done
    bash -n "$KIT_SCRIPTS/build.sh" || bad=1
    bash -n "$KIT_SCRIPTS/add_llama_server.sh" || bad=1
    if command -v python3 > /dev/null; then
        python3 - "$KIT_SCRIPTS" <<'EOF' || bad=1
import ast, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.py")):
    ast.parse(p.read_text(), str(p))
EOF
    fi
    if [ -f "$KIT/MANIFEST" ]; then
        log "kit present: checking MANIFEST"
        manifest_check || bad=1
        kit=$(du -sb "$KIT" | cut -f1)
    elif [ -d "$KIT" ]; then
        echo "  $KIT exists without MANIFEST: run scripts/gpu-kit/build.sh --assemble"; bad=1
    else
        log "no $KIT: it would carry (scripts/gpu-kit/build.sh fills it)"
        grep -vE '^\s*(#|$)' "$KIT_SCRIPTS/requirements-device.txt" | sed 's/^/  wheel  /'
        echo "  wheel  llama_cpp_python-0.3.36-cp312 (CUDA sm_90, slimmed, ~26 MB)"
        echo "  ext    exllamav2_ext.so.xz (exllamav2 0.3.2 for torch 2.11.0+cu130/sm_90, ~10 MB)"
        echo "  budget: kit <= $BUDGET_MIB MiB"
    fi
    tree=$(travel_size)
    printf '  travels: repo %s MiB + kit %s MiB = %s MiB (device limit %s MiB)\n' \
        "$((tree / 1048576))" "$((kit / 1048576))" "$(((tree + kit) / 1048576))" "$TRAVEL_MIB"
    [ $((tree + kit)) -le $((TRAVEL_MIB * 1048576)) ] || { echo "  working tree + kit over $TRAVEL_MIB MiB"; bad=1; }
    if [ "${GPU_CHECK_DRY_SIZES:-1}" != 0 ]; then dry_sizes || bad=1; fi
    if [ "${GPU_CHECK_DRY_SPEC:-1}" != 0 ]; then dry_speculative || bad=1; fi
    if [ "$bad" = 0 ]; then log "dry run OK"; else log "dry run FAILED"; fi
    return $bad
}

dry_sizes() {  # the `sizes` steps with tiny models on the CPU (every step: card, build, models, servers, report)
    local py=${PYTHON:-} out rc bin=()
    [ -n "$py" ] || { [ -x "$REPO/.venv/bin/python" ] && py=$REPO/.venv/bin/python; } || py=python3
    out=${DRY_OUTDIR:-$(mktemp -d)}
    [ -n "${LLAMA_SERVER:-}" ] && bin=(--llama-server "$LLAMA_SERVER")
    log "dry run: real-sizes steps with tiny models on the CPU ($py, out $out)"
    timeout -k 5 "${GPU_CHECK_DRY_SIZES_LIMIT:-75}" "$py" "$KIT_SCRIPTS/real_sizes.py" "$out/real-sizes" --tiny \
        --models "$out/models" --report "$out/real-sizes.md" --deadline-s 60 --start-timeout-s 40 "${bin[@]}" \
        > "$out/real-sizes.log" 2>&1
    rc=$?
    grep -E '^\[real-sizes' "$out/real-sizes.log" | cut -c1-200 | sed 's/^/  /'
    if [ "$rc" = 0 ] && [ -f "$out/real-sizes.md" ]; then
        grep -E '^\| (gateway|llama-server|llama_cpp.server) ' "$out/real-sizes.md" | sed 's/^/  /'
        log "real-sizes dry run OK: $out/real-sizes.md"
    else
        tail -n 30 "$out/real-sizes.log" | sed 's/^/  | /'
        log "real-sizes dry run FAILED (rc=$rc)"
        rc=1
    fi
    [ -n "${DRY_OUTDIR:-}" ] || rm -rf "$out"
    return "$rc"
}

# ------------------------------------------------------------------------------------ step functions (GPU)
# Each runs in a child (`timeout ... $SELF --step-fn NAME`) so that `timeout` can kill its whole process group.

fn_env() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader || true
    "$PY" -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda,
torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
    command -v nvcc && nvcc --version | tail -n 2
    echo "CUDA_HOME=${CUDA_HOME:-}"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    nproc; free -g | head -n 2; df -h /tmp | tail -n 1
}

fn_install_wheels() {
    local stamp
    stamp=$(cat "$KIT/MANIFEST" 2>/dev/null | sha256sum | cut -c1-16)
    if [ -f "$SITE/.stamp" ] && [ "$(cat "$SITE/.stamp")" = "$stamp" ]; then echo "reuse $SITE"; return 0; fi
    rm -rf "$SITE" && mkdir -p "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$SITE" "$KIT"/wheels/*.whl || {
        echo "pip install failed; unpacking the wheels instead"
        for w in "$KIT"/wheels/*.whl; do "$PY" -m zipfile -e "$w" "$SITE" || return 1; done
    }
    echo "$stamp" > "$SITE/.stamp"
    echo "$(find "$SITE" -maxdepth 1 -name "*.dist-info" | wc -l) distributions in $SITE"
}

fn_install_project() {
    # The project's backends are found through entry points (group gateway.backends): install its metadata
    # with --no-deps; its code stays importable from the checkout (REPO first on PYTHONPATH).
    # Built from a copy: an in-tree build would leave build/ and *.egg-info (a second distribution) in the repo.
    local src=$WORK/project-src f
    rm -rf "$PROJ" "$src" && mkdir -p "$PROJ" "$src"
    for f in "$REPO"/*; do
        case $(basename "$f") in tests | bench | scripts | build | dist | *.egg-info) ;; *) cp -r "$f" "$src/" ;; esac
    done
    if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
            --disable-pip-version-check --target "$PROJ" "$src"; then
        echo "pip could not build the project; writing its dist-info from pyproject.toml"
        "$PY" - "$REPO/pyproject.toml" "$PROJ" <<'EOF' || return 1
import pathlib, sys, tomllib
project = tomllib.loads(pathlib.Path(sys.argv[1]).read_text())["project"]
name, version = project["name"].replace("-", "_"), project.get("version", "0")
info = pathlib.Path(sys.argv[2]) / f"{name}-{version}.dist-info"
info.mkdir(parents=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {version}\n")
groups = dict(project.get("entry-points", {}))
if project.get("scripts"):
    groups["console_scripts"] = project["scripts"]
(info / "entry_points.txt").write_text("".join(
    f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for g, eps in groups.items()))
bindir = pathlib.Path(sys.argv[2]) / "bin"
bindir.mkdir()
for script, target in project.get("scripts", {}).items():
    module, attr = target.split(":")
    path = bindir / script
    path.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {attr}\nsys.exit({attr}())\n")
    path.chmod(0o755)
EOF
    fi
    find "$PROJ" -mindepth 1 -maxdepth 1 ! -name '*.dist-info' ! -name bin -exec rm -rf {} +
    "$PY" - <<'EOF'
from importlib.metadata import entry_points
for group in ("gateway.backends", "gateway.plugins"):
    print(group, sorted(f"{e.name}={e.value}" for e in entry_points(group=group)))
EOF
}

fn_exl2_ext() {
    "$PY" -c "import time; t = time.time()
import exllamav2, exllamav2.ext as e
print('exllamav2', exllamav2.__version__, 'ext', getattr(e.exllamav2_ext, '__file__', e.exllamav2_ext),
      round(time.time() - t, 1), 's')"
}

fn_exl3_jit() {
    "$PY" -c "import time; t = time.time()
import exllamav3, exllamav3.ext as e
print('exllamav3 ext', getattr(e.exllamav3_ext, '__file__', e.exllamav3_ext), round(time.time() - t, 1), 's')"
}

fn_tiny_models() { "$PY" "$KIT_SCRIPTS/make_tiny_models.py" "$MODELS"; }

fn_llama_server() {  # the carried CUDA llama-server (+ its own libraries), linked to the wheel's libllama/ggml
    local f
    export LD_LIBRARY_PATH=$WORK/bin:$SITE/llama_cpp/lib:$LD_LIBRARY_PATH
    rm -rf "$WORK/bin" && mkdir -p "$WORK/bin"
    for f in "$KIT"/bin/*.gz; do gunzip -c "$f" > "$WORK/bin/$(basename "$f" .gz)" || return 1; done
    chmod +x "$WORK/bin/llama-server"
    for f in "$SITE"/llama_cpp/lib/lib*.so; do  # the wheel keeps one file per library: libllama.so, SONAME .so.0
        [ -e "$f.0" ] || ln -sf "$f" "$WORK/bin/$(basename "$f").0"
    done
    ldd "$WORK/bin/llama-server" | grep -E 'not found|llama|ggml|mtmd|cuda'
    ! ldd "$WORK/bin/llama-server" | grep -q 'not found' || return 1
    "$WORK/bin/llama-server" --version
}

fn_real_sizes() {  # $1 = seconds the driver may use (it stops starting servers before then)
    local bin=()
    export LD_LIBRARY_PATH=$WORK/bin:$SITE/llama_cpp/lib:$LD_LIBRARY_PATH
    [ -x "$WORK/bin/llama-server" ] && ok llama-server && bin=(--llama-server "$WORK/bin/llama-server")
    cd "$REPO" || return 1
    # shellcheck disable=SC2086
    "$PY" "$KIT_SCRIPTS/real_sizes.py" "$LOGS/real-sizes" --models "$WORK/real-size-models" \
        --report "$OUTDIR/real-sizes.md" --deadline-s "$1" "${bin[@]}" ${GPU_CHECK_SIZES_ARGS:-}
}

# Issue 25's GPU clause. SPEC_SHAPE (LLAMA3_8B | TINY), SPEC_GGUF, SPEC_NGL, SPEC_PEER (a llama-server binary,
# or empty to leave the peer out) and OUTDIR say what to run and where its results go.
fn_spec_model() {  # a random-weight Llama GGUF of SPEC_SHAPE, Q4_K_M (kept: a later run reuses it)
    [ -f "$SPEC_GGUF" ] && { echo "reuse $SPEC_GGUF"; return 0; }
    "$PY" - "$KIT_SCRIPTS" "$SPEC_SHAPE" "$SPEC_GGUF" <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
import real_sizes

facts = real_sizes.make_gguf(getattr(real_sizes, sys.argv[2]), "q4_k_m", Path(sys.argv[3]))
print({k: v for k, v in facts.items() if k != "tensor_types"})
EOF
}

fn_verify_cost() {  # 1 sequence up to 16k cells, then 8 at 4k; the tiny shape (CPU rehearsals): less
    local cells=512,4096,16384 drafts=1,2,4,8,16,32,64 seqs=8 seq_cells=4096 threads
    [ "$SPEC_SHAPE" = TINY ] && cells=64,256 drafts=1,4 seqs=2 seq_cells=64
    threads=$(($(nproc) > 8 ? 8 : $(nproc)))
    "$PY" "$REPO/bench/bench_verify_cost.py" --gguf "$SPEC_GGUF" --n-gpu-layers "$SPEC_NGL" --cells "$cells" \
        --drafts "$drafts" --threads "$threads" --json "$OUTDIR/verify-cost.json" || return 1
    "$PY" "$REPO/bench/bench_verify_cost.py" --gguf "$SPEC_GGUF" --n-gpu-layers "$SPEC_NGL" --cells "$seq_cells" \
        --drafts "$drafts" --seqs "$seqs" --threads "$threads" --json "$OUTDIR/verify-cost-$seqs-seqs.json"
}

fn_bench_speculative() {  # both servers, all four configurations; the tiny shape: short answers, 1 stream
    local size=(--streams 1,8 --max-tokens 512 --chat-tokens 256) peer=(--skip-peer)
    [ "$SPEC_SHAPE" = TINY ] && size=(--streams 1 --max-tokens 24 --chat-tokens 16)
    [ -n "${SPEC_PEER:-}" ] && peer=(--llama-server "$SPEC_PEER")
    "$PY" "$REPO/bench/bench_speculative.py" --gguf "$SPEC_GGUF" --n-gpu-layers "$SPEC_NGL" "${size[@]}" \
        "${peer[@]}" --threads "$(($(nproc) > 8 ? 8 : $(nproc)))" --json "$OUTDIR/speculative.json"
}

fn_exl2_convert() {
    rm -rf "$WORK/exl2-work" "$MODELS/llama-tiny-exl2" && mkdir -p "$WORK/exl2-work"
    "$PY" -m exllamav2.conversion.convert_exl2 -i "$MODELS/llama-tiny-hf" -o "$WORK/exl2-work" \
        -cf "$MODELS/llama-tiny-exl2" -b 4.0 -hb 6 -r 4 -mr 4 -l 512 -ml 512 || return 1
    cp "$WORK/exl2-work/measurement.json" "$LOGS/exl2-measurement.json" 2> /dev/null
    ls -la "$MODELS/llama-tiny-exl2"
}

fn_exl3_convert() {
    rm -rf "$WORK/exl3-work" "$MODELS/llama-tiny-exl3" && mkdir -p "$WORK/exl3-work"
    "$PY" -m exllamav3.conversion.convert_model -i "$MODELS/llama-tiny-hf" -o "$MODELS/llama-tiny-exl3" \
        -w "$WORK/exl3-work" -b 4.0 -hb 6 -cr 8 -cc 512 || return 1
    ls -la "$MODELS/llama-tiny-exl3"
}

fn_smoke() { "$PY" "$KIT_SCRIPTS/smoke.py" "$2" "$3" "$LOGS/$1.json"; }  # NAME KIND MODEL

fn_pytest() {  # $1 = junit file name, $2 = -k expression
    # The carried pytest shadows the machine's; its other plugins (xdist, cov, benchmark...) may not fit
    # it, so plugin autoload is off and the project's test plugins are named explicitly.
    local plugins=() m
    for m in pytest_asyncio.plugin pytest_timeout anyio.pytest_plugin _hypothesis_pytestplugin; do
        "$PY" -c "import $m" 2> /dev/null && plugins+=(-p "$m")
    done
    cd "$REPO" || return 1
    PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "$PY" -m pytest "${plugins[@]}" -m gpu -k "$2" -rA -v \
        -p no:cacheprovider --continue-on-collection-errors --junitxml="$OUTDIR/$1" tests
}

fn_bench() {  # $1 = output subfolder
    cd "$REPO" || return 1
    export GATEWAY_BENCH_OUT=$LOGS/$1 && mkdir -p "$GATEWAY_BENCH_OUT"
    # shellcheck disable=SC2086
    "$PY" bench/bench_backends.py ${GPU_CHECK_BENCH_ARGS:-}
}

# ------------------------------------------------------------------------------------------ step runner

STEPS_TSV=""
declare -A BG_PID BG_START BG_LIMIT

limit_for() {  # min(wanted, time left before the deadline minus a reserve for the report)
    local left=$((DEADLINE - SECONDS - 15))
    if [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}

record() {  # name status seconds limit
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STEPS_TSV"
    log "<<< $1: $2 in ${3}s (limit ${4}s)"
    write_report
}

status_of() {  # rc -> word
    case $1 in
        0) echo ok ;;
        124 | 137) echo TIMEOUT ;;
        5) echo "no tests collected" ;;
        *) echo "FAILED(rc=$1)" ;;
    esac
}

skipped_by_request() { [[ " ${GPU_CHECK_SKIP:-} " == *" $1 "* ]] && record "$1" "skipped (GPU_CHECK_SKIP)" 0 0; }

step() {  # step NAME LIMIT FN [ARGS...]
    local name=$1 want=$2 t start rc
    shift 2
    skipped_by_request "$name" && return 1
    t=$(limit_for "$want")
    if [ "$t" -lt 10 ]; then record "$name" "skipped (deadline)" 0 0; return 1; fi
    log ">>> $name (limit ${t}s)"
    start=$SECONDS
    timeout -k 10 "$t" bash "$SELF" --step-fn "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    tail -n 12 "$LOGS/$name.log" | sed 's/^/    | /'
    record "$name" "$(status_of $rc)" $((SECONDS - start)) "$t"
    return $rc
}

skip() { record "$1" "skipped ($2)" 0 0; }

bg_step() {  # like step, in the background; collect with wait_step NAME
    local name=$1 want=$2 t
    shift 2
    skipped_by_request "$name" && return 1
    t=$(limit_for "$want")
    log ">>> $name in the background (limit ${t}s)"
    timeout -k 10 "$t" bash "$SELF" --step-fn "$@" > "$LOGS/$name.log" 2>&1 &
    BG_PID[$name]=$!
    BG_START[$name]=$SECONDS
    BG_LIMIT[$name]=$t
}

wait_step() {
    local name=$1 rc
    [ -n "${BG_PID[$name]:-}" ] || return 1
    log "... waiting for $name"
    wait "${BG_PID[$name]}"
    rc=$?
    tail -n 8 "$LOGS/$name.log" | sed 's/^/    | /'
    record "$name" "$(status_of $rc)" $((SECONDS - BG_START[$name])) "${BG_LIMIT[$name]}"
    unset "BG_PID[$name]"
    return $rc
}

write_report() {
    local r=$OUTDIR/report.md name status secs limit f
    {
        echo "# GPU check ($PART)"
        echo
        echo "- date: $(date -u +%FT%TZ); host: $(hostname); elapsed: ${SECONDS}s of ${DEADLINE}s"
        echo "- gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
        echo "- git: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null) $(git -C "$REPO" status --porcelain 2>/dev/null | wc -l) changed files"
        echo
        echo "| step | status | seconds | limit |"
        echo "| --- | --- | ---: | ---: |"
        while IFS=$'\t' read -r name status secs limit; do
            echo "| $name | $status | $secs | $limit |"
        done < "$STEPS_TSV"
        for f in "$LOGS"/smoke-*.json; do
            [ -f "$f" ] || continue
            echo; echo "## $(basename "$f" .json)"; echo; echo '```json'; head -c 3000 "$f"; echo; echo '```'
        done
        for f in "$LOGS"/pytest-gpu*.log; do
            [ -f "$f" ] || continue
            echo; echo "## $(basename "$f" .log)"; echo; echo '```'
            grep -E '^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) ' "$f" | head -n 80
            tail -n 1 "$f"; echo '```'
        done
        for f in "$LOGS"/bench*.log; do
            [ -f "$f" ] || continue
            echo; echo "## $(basename "$f" .log)"; echo; echo '```'; tail -n 40 "$f"; echo '```'
        done
        for f in "$LOGS"/bench*/*.md; do [ -f "$f" ] && { echo; cat "$f"; }; done
        [ -f "$OUTDIR/real-sizes.md" ] && { echo; sed 's/^#/##/' "$OUTDIR/real-sizes.md"; }
        while IFS=$'\t' read -r name status secs limit; do
            case $status in ok | skipped*) continue ;; esac
            [ -f "$LOGS/$name.log" ] || continue
            echo; echo "## $name: $status (last 30 lines)"; echo; echo '```'; tail -n 30 "$LOGS/$name.log"; echo '```'
        done < "$STEPS_TSV"
    } > "$r.tmp" 2> /dev/null
    mv "$r.tmp" "$r"
    tar czf "$OUTDIR/logs.tar.gz.tmp" -C "$WORK" logs 2> /dev/null && mv "$OUTDIR/logs.tar.gz.tmp" "$OUTDIR/logs.tar.gz"
}

dry_speculative() {  # the `speculative` steps with the tiny shape on the CPU, each under its own timeout
    local py=${PYTHON:-} out rc=0 f
    [ -n "$py" ] || { [ -x "$REPO/.venv/bin/python" ] && py=$REPO/.venv/bin/python; } || py=python3
    out=${DRY_OUTDIR:-$(mktemp -d)}
    log "dry run: speculative steps with the tiny shape on the CPU ($py, out $out)"
    for f in fn_spec_model fn_verify_cost fn_bench_speculative; do
        PY=$py OUTDIR=$out SPEC_SHAPE=TINY SPEC_NGL=0 SPEC_GGUF=$out/spec-tiny.gguf SPEC_PEER=${LLAMA_SERVER:-} \
            timeout -k 5 "${GPU_CHECK_DRY_SPEC_LIMIT:-60}" bash "$SELF" --step-fn "$f" > "$out/$f.log" 2>&1 || {
            rc=1
            tail -n 20 "$out/$f.log" | sed 's/^/  | /'
        }
        log "  $f: $([ "$rc" = 0 ] && echo ok || echo FAILED)"
        [ "$rc" = 0 ] || break
    done
    if [ "$rc" = 0 ]; then log "speculative dry run OK: $out"; else log "speculative dry run FAILED"; fi
    [ -n "${DRY_OUTDIR:-}" ] || rm -rf "$out"
    return "$rc"
}

ok() { grep -qP "^$1\tok\t" "$STEPS_TSV"; }

# ------------------------------------------------------------------------------------------ environment

setup_env() {
    export PY=${PYTHON:-python3}
    export WORK=${GPU_CHECK_WORK:-/tmp/gpu-check} OUTDIR PART
    export SITE=$WORK/site PROJ=$WORK/project LOGS=$WORK/logs MODELS=$WORK/models EXT=$WORK/ext
    mkdir -p "$WORK" "$LOGS" "$MODELS" "$EXT"
    rm -f "$LOGS"/*.log "$LOGS"/*.json
    export PYTHONPATH=$REPO:$PROJ:$SITE PATH=$PROJ/bin:$SITE/bin:$PATH
    export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
    export TORCH_CUDA_ARCH_LIST=9.0 TORCH_EXTENSIONS_DIR=$WORK/torch_ext
    export MAX_JOBS=$(($(nproc) > 4 ? $(nproc) - 2 : 2))
    # CUDA runtime libraries (cudart, cuBLAS) for the llama.cpp wheel: torch's nvidia-* wheels, then the driver
    local nv
    nv=$("$PY" - <<'EOF' 2>/dev/null
import glob, os, sys
libs, incs = [], []
for p in sys.path:
    for d in sorted(glob.glob(os.path.join(p, "nvidia", "*", "lib")) + glob.glob(os.path.join(p, "nvidia", "*", "*", "lib"))):
        if d not in libs: libs.append(d)
    for d in sorted(glob.glob(os.path.join(p, "nvidia", "*", "include"))):
        if d not in incs: incs.append(d)
print(":".join(libs)); print(":".join(incs))
EOF
)
    NV_LIBS=$(sed -n 1p <<< "$nv")
    NV_INCS=$(sed -n 2p <<< "$nv")
    export LD_LIBRARY_PATH=${NV_LIBS}${NV_LIBS:+:}/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
    local c
    for c in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda \
        "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent)")")")"; do
        [ -n "$c" ] && [ -x "$c/bin/nvcc" ] && { export CUDA_HOME=$c; break; }
    done
    merge_cuda_home
}

merge_cuda_home() {  # a CUDA_HOME with cuBLAS/cuSPARSE/cuRAND headers and libs for JIT builds, if the toolkit lacks them
    [ -n "${CUDA_HOME:-}" ] || { log "WARNING: no CUDA toolkit (nvcc) found: JIT builds will fail"; return 0; }
    [ -f "$CUDA_HOME/include/cublas_v2.h" ] && [ -f "$CUDA_HOME/include/curand_kernel.h" ] && return 0
    [ -n "$NV_INCS" ] || return 0
    local m=$WORK/cuda d f
    rm -rf "$m" && mkdir -p "$m/include" "$m/lib64"
    for f in "$CUDA_HOME"/*; do
        case $(basename "$f") in include | lib64 | lib) ;; *) ln -s "$f" "$m/" ;; esac
    done
    cp -rs "$CUDA_HOME/include/." "$m/include/" 2> /dev/null
    cp -rs "$(readlink -f "$CUDA_HOME/lib64")/." "$m/lib64/" 2> /dev/null
    for d in ${NV_INCS//:/ }; do cp -rsn "$d/." "$m/include/" 2> /dev/null; done
    for d in ${NV_LIBS//:/ }; do
        for f in "$d"/*.so.*; do
            [ -e "$f" ] || continue
            ln -sfn "$f" "$m/lib64/$(basename "$f")"
            [ -e "$m/lib64/$(basename "$f" | sed -E 's/\.so\..*$/.so/')" ] ||
                ln -s "$f" "$m/lib64/$(basename "$f" | sed -E 's/\.so\..*$/.so/')"
        done
    done
    ln -sfn lib64 "$m/lib"
    log "CUDA_HOME $CUDA_HOME lacks cuBLAS headers: merged toolkit + nvidia wheels in $m"
    export CUDA_HOME=$m
}

# ------------------------------------------------------------------------------------------ main flow

prepare_exl2_ext() {  # the prebuilt extension goes on PYTHONPATH as module exllamav2_ext; JIT if refused
    local so=$TORCH_EXTENSIONS_DIR/exllamav2_ext/exllamav2_ext.so
    if [ -f "$KIT/ext/exllamav2_ext.so.xz" ] && "$PY" -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as src, open(sys.argv[2], "wb") as dst: shutil.copyfileobj(src, dst)' \
        "$KIT/ext/exllamav2_ext.so.xz" "$EXT/exllamav2_ext.so"; then
        export PYTHONPATH=$PYTHONPATH:$EXT
        step exl2-ext 90 fn_exl2_ext && return 0
        log "prebuilt exllamav2_ext refused: JIT fallback"
        rm -f "$EXT/exllamav2_ext.so"
        export PYTHONPATH=${PYTHONPATH%:"$EXT"}
    fi
    step exl2-ext-jit 360 fn_exl2_ext && [ -f "$so" ] && gzip -c "$so" > "$OUTDIR/exllamav2_ext.so.gz"
}

save_exl3_ext() {
    local so=$TORCH_EXTENSIONS_DIR/exllamav3_ext/exllamav3_ext.so
    [ -f "$so" ] || return 0
    gzip -c "$so" > "$WORK/exllamav3_ext.so.gz"
    if [ "$(stat -c %s "$WORK/exllamav3_ext.so.gz")" -lt $((15 * 1048576)) ]; then
        mv "$WORK/exllamav3_ext.so.gz" "$OUTDIR/"
    else
        log "exllamav3_ext.so.gz is $(($(stat -c %s "$WORK/exllamav3_ext.so.gz") / 1048576)) MiB: not brought back"
    fi
}

part_llama_exl2() {
    prepare_exl2_ext
    local exl2=0
    ok exl2-ext || ok exl2-ext-jit && exl2=1
    if ok tiny-models; then
        step smoke-llama 90 fn_smoke smoke-llama llama "$GATEWAY_TEST_GGUF_MODEL"
        if [ $exl2 = 1 ]; then
            step smoke-exl2-fp16 90 fn_smoke smoke-exl2-fp16 exl2 "$GATEWAY_TEST_HF_MODEL"
            step exl2-convert 180 fn_exl2_convert && export GATEWAY_TEST_EXL2_MODEL=$MODELS/llama-tiny-exl2 &&
                step smoke-exl2 90 fn_smoke smoke-exl2 exl2 "$GATEWAY_TEST_EXL2_MODEL"
        else
            skip exl2-convert "no exllamav2 extension"
        fi
    fi
    step pytest-gpu 200 fn_pytest junit-gpu.xml "not exllamav3 and not exl3"
    if [ -f "$REPO/bench/bench_backends.py" ]; then step bench 90 fn_bench bench; else skip bench "no bench/bench_backends.py"; fi
}

part_exl3() {
    [ -n "${BG_PID[exl3-jit]:-}" ] && wait_step exl3-jit
    ok exl3-jit || { skip exl3-convert "exllamav3 extension not built"; return; }
    save_exl3_ext
    ok tiny-models || return
    step exl3-convert 180 fn_exl3_convert || return
    export GATEWAY_TEST_EXL3_MODEL=$MODELS/llama-tiny-exl3
    step smoke-exl3 90 fn_smoke smoke-exl3 exl3 "$GATEWAY_TEST_EXL3_MODEL"
    step pytest-gpu-exl3 180 fn_pytest junit-gpu-exl3.xml "exllamav3 or exl3"
    if [ -f "$REPO/bench/bench_backends.py" ]; then
        # only the ExLlamaV3 model this time
        (unset GATEWAY_TEST_GGUF_MODEL GATEWAY_TEST_EXL2_MODEL GATEWAY_TEST_HF_MODEL; step bench-exl3 90 fn_bench bench-exl3)
    fi
}

part_sizes() {  # issue 29: real model sizes (no tiny models, no ExLlama)
    if [ -f "$KIT/bin/llama-server.gz" ]; then
        step llama-server 30 fn_llama_server
    else
        skip llama-server "no .gpu-kit/bin/llama-server.gz (scripts/gpu-kit/add_llama_server.sh)"
    fi
    local t
    t=$(limit_for 600)
    # the driver's own deadline leaves 20 s to write its report before this step's timeout
    step real-sizes "$t" fn_real_sizes $((t > 40 ? t - 20 : 20))
}

part_speculative() {  # issue 25: speculative decoding on the GPU (a random-weight 8B-shaped model)
    # GPU_CHECK_SPEC_SHAPE=TINY: a rehearsal of this part on a machine without a GPU (the CUDA build falls back
    # to its CPU backend)
    export SPEC_SHAPE=${GPU_CHECK_SPEC_SHAPE:-LLAMA3_8B} SPEC_NGL=-1 SPEC_PEER=""
    export SPEC_GGUF=$WORK/real-size-models/spec-${SPEC_SHAPE,,}-q4_k_m.gguf
    if [ -f "$KIT/bin/llama-server.gz" ]; then
        step llama-server 30 fn_llama_server && SPEC_PEER=$WORK/bin/llama-server
        export LD_LIBRARY_PATH=$WORK/bin:$SITE/llama_cpp/lib:$LD_LIBRARY_PATH
    else
        skip llama-server "no .gpu-kit/bin/llama-server.gz (scripts/gpu-kit/add_llama_server.sh): gateway only"
    fi
    step spec-model 240 fn_spec_model || return 1
    step bench-verify-cost 120 fn_verify_cost
    step bench-speculative "$(limit_for 420)" fn_bench_speculative
}

main_gpu() {
    mkdir -p "$OUTDIR"
    OUTDIR=$(readlink -f "$OUTDIR")
    exec > >(tee "$OUTDIR/gpu-check.log") 2>&1
    setup_env
    STEPS_TSV=$WORK/steps.tsv && : > "$STEPS_TSV"
    log "gpu-check part=$PART deadline=${DEADLINE}s repo=$REPO kit=$KIT work=$WORK out=$OUTDIR"
    [ -f "$KIT/MANIFEST" ] || log "WARNING: no $KIT/MANIFEST (was .gpu-kit carried?)"
    step env 30 fn_env
    step install-wheels 120 fn_install_wheels
    step install-project 90 fn_install_project
    if [ "$PART" = sizes ]; then
        part_sizes
    elif [ "$PART" = speculative ]; then
        part_speculative
    else
        [ "$PART" = llama-exl2 ] || bg_step exl3-jit 420 fn_exl3_jit
        step tiny-models 120 fn_tiny_models &&
            export GATEWAY_TEST_HF_MODEL=$MODELS/llama-tiny-hf GATEWAY_TEST_GGUF_MODEL=$MODELS/llama-tiny-f16.gguf
        [ "$PART" = exl3 ] || part_llama_exl2
        [ "$PART" = llama-exl2 ] || part_exl3
    fi
    write_report
    log "done in ${SECONDS}s: $OUTDIR"
    ls -la "$OUTDIR"
    ! grep -qvP '\t(ok|skipped[^\t]*|no tests collected)\t' "$STEPS_TSV"
}

# ------------------------------------------------------------------------------------------ arguments

if [ "${1:-}" = --step-fn ]; then  # internal: run one step function in this child process
    shift
    [[ $1 == fn_* ]] || exit 2
    "$@"
    exit $?
fi

OUTDIR="" PART=all DRY=0 DEADLINE=${GPU_CHECK_DEADLINE_S:-450}
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --part) PART=$2; shift ;;
        --deadline) DEADLINE=$2; shift ;;
        -h | --help) sed -n '2,/^set -uo/p' "$SELF" | sed '$d'; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) OUTDIR=$1 ;;
    esac
    shift
done
case $PART in all | llama-exl2 | exl3 | sizes | speculative) ;; *) echo "--part must be all, llama-exl2, exl3, sizes or speculative" >&2; exit 2 ;; esac
export DEADLINE
if [ "$DRY" = 1 ]; then dry_run; exit $?; fi
[ -n "$OUTDIR" ] || { echo "usage: $0 OUTDIR [--part all|llama-exl2|exl3|sizes|speculative] [--deadline S] | [--dry-run]" >&2; exit 2; }
main_gpu
