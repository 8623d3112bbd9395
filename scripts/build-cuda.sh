#!/usr/bin/env bash
# Build vramcal with the `cuda` feature on a machine that has no GPU and no system CUDA toolkit.
#
# Recipe (see docs/architecture.md, "Building with CUDA"):
#   1. nvcc, the CUDA headers and the link-time libraries come from NVIDIA's PyPI wheels (CUDA 13.0, to match
#      the GPU machines' driver 580 / CUDA 13.0), cached outside the clone.
#   2. libcuda.so (the driver) only exists where the NVIDIA driver is installed; for linking we build a stub
#      with the same function names. The real one is loaded at run time on the GPU machine.
#   3. cargo builds with PATH/CUDA_ROOT/CUDA_COMPUTE_CAP/LIBRARY_PATH pointing at the above.
#
# Usage: scripts/build-cuda.sh [--check | --toolkit-only | --env] [-- EXTRA CARGO ARGS]
#   (default)       cargo build --release --features cuda; prints the binary's path and size
#   --check         cargo check --features cuda --all-targets (fast; what CI runs)
#   --toolkit-only  only fetch/unpack the toolkit and build the libcuda stub
#   --env           prepare the toolkit, then print `export ...` lines (eval "$(scripts/build-cuda.sh --env)")
#
# Environment:
#   VRAMCAL_CUDA_CACHE   toolkit cache (default ~/.cache/vramcal-cuda); delete it to force a fresh download
#   CUDA_COMPUTE_CAP     GPU architecture the kernels are compiled for (default 90: H100/H200)
#   CARGO_TARGET_DIR     default target/cuda, so this build does not invalidate the CPU build in target/
#   PYTHON               python with pip, used only to download wheels (default python3)
set -euo pipefail

MODE=build
CARGO_EXTRA=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --check) MODE=check ;;
        --toolkit-only) MODE=toolkit ;;
        --env) MODE="env" ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        --)
            shift
            CARGO_EXTRA=("$@")
            break
            ;;
        *)
            echo "build-cuda.sh: unknown argument '$1' (try --help)" >&2
            exit 2
            ;;
    esac
    shift
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

CACHE="${VRAMCAL_CUDA_CACHE:-$HOME/.cache/vramcal-cuda}"
PYTHON="${PYTHON:-python3}"
# In --env mode stdout is for the export lines only; progress goes to stderr.
log() { echo "[build-cuda] $*" >&2; }
now() { date +%s; }
T_START=$(now)

# The toolkit pieces. Pinned to the CUDA 13.0 series: the GPU machines' driver supports CUDA 13.0, and the
# CUDA version nvcc reports is what cudarc's `cuda-version-from-build-system` compiles its bindings for.
# curand has its own numbering: 10.4.0.x is the one shipped with CUDA 13.0.
PACKAGES=(
    "nvidia-cuda-nvcc==13.0.*"    # nvcc, ptxas (candle-kernels compiles its .cu files to PTX at build time)
    "nvidia-cuda-crt==13.0.*"     # include/crt/host_config.h etc., needed by nvcc
    "nvidia-nvvm==13.0.*"         # nvvm/bin/cicc, nvcc's device front end
    "nvidia-cuda-runtime==13.0.*" # cuda_runtime.h & co, libcudart
    "nvidia-cuda-cccl==13.0.*"    # CUB/Thrust/libcu++ headers included by candle's kernels
    "nvidia-cuda-nvrtc==13.0.*"   # libnvrtc (linked by cudarc)
    "nvidia-cublas==13.0.*"       # libcublas, libcublasLt (linked by cudarc); ~420 MB
    "nvidia-curand==10.4.0.*"     # libcurand (linked by cudarc)
)
# Bump LAYOUT when the way the cache is laid out changes, so stale caches are rebuilt.
LAYOUT=1
STAMP_CONTENT="layout=$LAYOUT ${PACKAGES[*]}"
TOOLKIT="$CACHE/toolkit"   # the unzipped wheels
R="$TOOLKIT/nvidia/cu13"   # everything lands in nvidia/cu13/{bin,include,lib,nvvm}
STAMP="$CACHE/toolkit.stamp"

mkdir -p "$CACHE"

# Serialise concurrent runs (e.g. two CI jobs sharing ~/.cache) so neither sees a half-unpacked toolkit.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE/.lock"
    flock 9
fi

toolkit_complete() {
    [[ -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "$STAMP_CONTENT" ]] &&
        [[ -x "$R/bin/nvcc" ]] && [[ -x "$R/nvvm/bin/cicc" ]] &&
        [[ -f "$R/include/cuda_runtime.h" ]] && [[ -f "$R/include/crt/host_config.h" ]] &&
        [[ -e "$R/lib/libcublas.so" ]] && [[ -e "$R/lib/libcurand.so" ]]
}

fetch_toolkit() {
    local t0 dl unpack
    t0=$(now)
    if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
        log "error: '$PYTHON -m pip' is needed to download the CUDA wheels"
        exit 1
    fi
    # Work in fresh temporary folders and move into place at the end, so an interrupted run never leaves
    # something that looks complete.
    dl="$CACHE/wheels.partial"
    unpack="$CACHE/toolkit.partial"
    rm -rf "$dl" "$unpack"
    mkdir -p "$dl" "$unpack"
    log "downloading CUDA 13.0 wheels (~630 MB) into $dl"
    # --no-deps: the wheels' dependency metadata would pull other CUDA pieces we do not need.
    # --only-binary: never build from source. --no-cache-dir: do not keep a second copy in pip's cache.
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --no-cache-dir \
        --dest "$dl" "${PACKAGES[@]}" >&2
    log "download: $(($(now) - t0)) s, $(du -sh "$dl" | cut -f1)"
    local t1
    t1=$(now)
    # A wheel is a zip; unzipping them all into one folder gives a toolkit tree under nvidia/cu13.
    local whl
    for whl in "$dl"/*.whl; do
        if command -v unzip >/dev/null 2>&1; then
            unzip -q -o "$whl" -d "$unpack"
        else
            "$PYTHON" -m zipfile -e "$whl" "$unpack" # no unzip on a minimal image
        fi
    done
    # Python's zipfile drops the executable bits; make sure nvcc and its helpers can run either way.
    chmod u+x "$unpack"/nvidia/cu13/bin/* "$unpack"/nvidia/cu13/nvvm/bin/* 2>/dev/null || true
    # Keep only the toolkit tree; the *.dist-info folders are of no use here.
    rm -rf "$unpack"/*.dist-info
    if [[ ! -x "$unpack/nvidia/cu13/bin/nvcc" ]]; then
        log "error: the wheels did not unpack to nvidia/cu13/bin/nvcc; layout changed?"
        find "$unpack" -maxdepth 3 >&2
        exit 1
    fi
    rm -rf "$TOOLKIT"
    mv "$unpack" "$TOOLKIT"
    rm -rf "$dl" # the unpacked tree is all we need; dropping the wheels halves the cache
    log "unpack: $(($(now) - t1)) s, $(du -sh "$TOOLKIT" | cut -f1) in $TOOLKIT"
}

link_unversioned() {
    # The wheels ship only versioned names (libcublas.so.13, libcurand.so.10); the linker's -lcublas looks
    # for libcublas.so, so add libX.so -> libX.so.N links.
    local f base
    for f in "$R"/lib/lib*.so.*; do
        [[ -e "$f" ]] || continue
        base="${f%%.so.*}.so"
        if [[ ! -e "$base" ]]; then
            ln -s "$(basename "$f")" "$base"
        fi
    done
}

if toolkit_complete; then
    log "toolkit cached: $R"
else
    fetch_toolkit
    link_unversioned
    echo "$STAMP_CONTENT" >"$STAMP"
    toolkit_complete || {
        log "error: toolkit incomplete after unpacking"
        exit 1
    }
fi

# --- the libcuda stub -----------------------------------------------------------------------------------
# The symbol list comes from the cudarc version this crate actually resolves to (Cargo.lock), so it stays
# right when cudarc is upgraded. `cargo fetch` makes sure its source is in the registry.
cudarc_dir() {
    cargo fetch --quiet >&2
    cargo metadata --quiet --format-version 1 --features cuda 2>/dev/null |
        "$PYTHON" -c '
import json, os, sys
m = json.load(sys.stdin)
for p in m["packages"]:
    if p["name"] == "cudarc":
        print(os.path.dirname(p["manifest_path"]))
        break
'
}

build_stub() {
    local src ver stub
    src="$(cudarc_dir)"
    if [[ -z "$src" || ! -d "$src/src/driver/sys" ]]; then
        # Fall back to the registry if cargo metadata did not answer (should not happen).
        src="$(find "${CARGO_HOME:-$HOME/.cargo}"/registry/src -maxdepth 2 -type d -name 'cudarc-0.19.*' 2>/dev/null |
            sort -V | tail -1)"
    fi
    if [[ -z "$src" || ! -d "$src/src/driver/sys" ]]; then
        log "error: cudarc source not found (run cargo fetch)"
        exit 1
    fi
    ver="$(basename "$src")"
    STUB_DIR="$CACHE/stub/$ver"
    stub="$STUB_DIR/libcuda.so"
    if [[ -f "$stub" && -e "$STUB_DIR/libcuda.so.1" ]]; then
        log "libcuda stub cached: $stub"
        return
    fi
    mkdir -p "$STUB_DIR"
    # Every driver-API function cudarc declares (`fn cuXxx(`), for every CUDA version it supports: a stub
    # only has to satisfy the linker, never to run.
    grep -rhoE '\bfn cu[A-Za-z0-9_]*[[:space:]]*\(' "$src/src/driver/sys" |
        sed -E 's/^fn //; s/[[:space:]]*\($//' | sort -u >"$STUB_DIR/symbols.txt"
    local n
    n=$(wc -l <"$STUB_DIR/symbols.txt")
    if [[ "$n" -lt 100 ]]; then
        log "error: only $n cu* symbols found in $src/src/driver/sys; cudarc layout changed?"
        exit 1
    fi
    {
        echo "/* Link-time stub of the CUDA driver (libcuda.so), generated by scripts/build-cuda.sh from $ver. */"
        echo "/* Never loaded at run time: the GPU machine's driver provides the real library. */"
        sed -E 's/.*/void &(void) {}/' "$STUB_DIR/symbols.txt"
    } >"$STUB_DIR/libcuda_stub.c"
    # soname libcuda.so.1 = the real driver's, so the binary's DT_NEEDED entry finds the real one later.
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub.tmp" "$STUB_DIR/libcuda_stub.c"
    mv "$stub.tmp" "$stub"
    ln -sfn libcuda.so "$STUB_DIR/libcuda.so.1"
    log "libcuda stub: $n symbols from $ver -> $stub"
}

STUB_DIR=""
build_stub

# --- environment ------------------------------------------------------------------------------------------
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" # else candle-kernels asks nvidia-smi, absent here
export PATH="$R/bin:$PATH"                        # nvcc (candle-kernels, and cudarc's version detection)
export CUDA_ROOT="$R" CUDA_PATH="$R"              # headers and lib folder for the build scripts
# Link-time search path only (not LD_LIBRARY_PATH: the stub must never be loaded at run time).
export LIBRARY_PATH="$R/lib:$STUB_DIR${LIBRARY_PATH:+:$LIBRARY_PATH}"
# A separate target dir: the cuda feature changes candle's build, and sharing target/ with the CPU build
# would make the two rebuild each other's dependencies.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"

log "toolkit ready in $(($(now) - T_START)) s ($("$R/bin/nvcc" --version | grep -o 'release [0-9.]*'), sm_$CUDA_COMPUTE_CAP)"

case "$MODE" in
    toolkit)
        exit 0
        ;;
    env)
        for v in PATH CUDA_ROOT CUDA_PATH CUDA_COMPUTE_CAP LIBRARY_PATH CARGO_TARGET_DIR; do
            printf 'export %s=%q\n' "$v" "${!v}"
        done
        exit 0
        ;;
    check)
        t0=$(now)
        log "cargo check --features cuda --all-targets (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
        cargo check --features cuda --all-targets ${CARGO_EXTRA[@]+"${CARGO_EXTRA[@]}"}
        log "check ok in $(($(now) - t0)) s"
        ;;
    build)
        t0=$(now)
        log "cargo build --release --features cuda (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
        cargo build --release --features cuda ${CARGO_EXTRA[@]+"${CARGO_EXTRA[@]}"}
        bin="$CARGO_TARGET_DIR/release/vramcal"
        case "$bin" in /*) ;; *) bin="$REPO/$bin" ;; esac
        log "build ok in $(($(now) - t0)) s"
        echo "binary: $bin ($(du -h "$bin" | cut -f1), $(stat -c %s "$bin") bytes)"
        # What the binary needs at run time; on the GPU machine these must resolve (see calibrate-gpu.sh).
        echo "needs: $(readelf -d "$bin" 2>/dev/null | sed -nE 's/.*Shared library: \[(.*)\]/\1/p' | tr '\n' ' ')"
        echo "to ship: gzip -9 -c $bin > vramcal-cuda.gz   (the binary alone; the GPU machine needs no Rust)"
        ;;
esac
