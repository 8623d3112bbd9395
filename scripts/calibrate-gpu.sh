#!/usr/bin/env bash
# Run the full GPU calibration on a CUDA machine from a prebuilt binary (scripts/build-cuda.sh).
#
# The GPU machine needs only the NVIDIA driver and the CUDA 13 runtime libraries (a system CUDA install, or
# the ones PyTorch's CUDA 13 wheels bring); no Rust, no network. Carry the repository's scripts/ and
# calibration/grids/ plus the binary.
#
# Usage: scripts/calibrate-gpu.sh [--bin PATH] [--out DIR] [--quick] [--device-id ID] [--no-torch]
#                                 [-- EXTRA ARGS FOR vramcal calibrate]
#   --bin PATH       the vramcal binary built with --features cuda (may be gzipped: *.gz).
#                    Default: $VRAMCAL_BIN, ./vramcal, target/cuda/release/vramcal, vramcal on PATH
#   --out DIR        where calibration/ and reports/ are written (default: the repository root, so the
#                    results land where they are committed)
#   --quick          the short grid (calibration/grids/cuda-quick.toml) instead of calibration/grids/cuda.toml
#   --grid FILE      any other grid
#   --device-id ID   override the id derived from nvidia-smi (e.g. h100-80gb)
#   --no-torch       skip the PyTorch reference (`vramcal sweep --backend torch` on the same grid)
#
# Writes $OUT/calibration/data/$ID.csv (raw measurements), $OUT/calibration/$ID.json (coefficients),
# $OUT/reports/$ID/ (report with its "Predicting PyTorch" section, plots, accuracy.json,
# calibrate.log) and $OUT/calibration/data/$ID-torch.csv (the PyTorch rows).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${VRAMCAL_BIN:-}"
OUT=""
GRID=""
QUICK=0
DEVICE_ID="${VRAMCAL_DEVICE_ID:-}"
TORCH=1
EXTRA=()

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bin) BIN="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        --quick) QUICK=1 ;;
        --grid) GRID="$2"; shift ;;
        --device-id) DEVICE_ID="$2"; shift ;;
        --no-torch) TORCH=0 ;;
        -h | --help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "calibrate-gpu.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
    shift
done

log() { echo "[calibrate-gpu] $*"; }
die() { echo "[calibrate-gpu] error: $*" >&2; exit 1; }
now() { date +%s; }
T_START=$(now)

OUT="${OUT:-$REPO}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
if [[ -z "$GRID" ]]; then
    if [[ $QUICK == 1 ]]; then GRID="$REPO/calibration/grids/cuda-quick.toml"; else GRID="$REPO/calibration/grids/cuda.toml"; fi
fi
[[ -f "$GRID" ]] || die "grid not found: $GRID"

# --- the binary -------------------------------------------------------------------------------------------
if [[ -z "$BIN" ]]; then
    for c in "$REPO/vramcal" "$REPO/target/cuda/release/vramcal" "$REPO/vramcal-cuda.gz" "$(command -v vramcal || true)"; do
        if [[ -n "$c" && -f "$c" ]]; then BIN="$c"; break; fi
    done
fi
[[ -n "$BIN" && -f "$BIN" ]] || die "no vramcal binary found; pass --bin (build it with scripts/build-cuda.sh)"
if [[ "$BIN" == *.gz ]]; then
    # The binary travels gzipped (50 MB -> 12 MB); unpack it next to the outputs.
    mkdir -p "$OUT/.bin"
    gzip -dc "$BIN" >"$OUT/.bin/vramcal"
    BIN="$OUT/.bin/vramcal"
fi
chmod +x "$BIN" 2>/dev/null || true
BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"

# --- CUDA runtime libraries -------------------------------------------------------------------------------
# The binary links libcuda.so.1 (the driver's) plus the CUDA 13 libraries below. Find each one: already
# known to the loader (ldconfig, LD_LIBRARY_PATH), a system CUDA install, or PyTorch's nvidia wheels.
NEEDED=(libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13)

python_lib_dirs() {
    # nvidia/*/lib from the pip wheels PyTorch depends on (CUDA 13 wheels: nvidia/cu13/lib).
    command -v python3 >/dev/null 2>&1 || return 0
    python3 - <<'EOF' 2>/dev/null || true
import glob, os, site, sys
roots = []
try:
    import nvidia
    roots += list(nvidia.__path__)
except Exception:
    pass
sp = []
try:
    sp += site.getsitepackages()
except Exception:
    pass
try:
    sp.append(site.getusersitepackages())
except Exception:
    pass
sp += [p for p in sys.path if p.endswith("-packages")]
for p in sp:
    roots.append(os.path.join(p, "nvidia"))
seen = set()
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "*", "lib"))):
        if d not in seen and os.path.isdir(d):
            seen.add(d)
            print(d)
EOF
    # And by globbing the usual site-packages locations, in case `python3` is not the one with torch.
    local d
    for d in /usr/local/lib/python3*/{site,dist}-packages/nvidia/*/lib /usr/lib/python3*/{site,dist}-packages/nvidia/*/lib \
        "$HOME"/.local/lib/python3*/site-packages/nvidia/*/lib /opt/conda/lib/python3*/site-packages/nvidia/*/lib \
        "${VIRTUAL_ENV:-/nonexistent}"/lib/python3*/site-packages/nvidia/*/lib; do
        [[ -d "$d" ]] && echo "$d"
    done
    return 0
}

in_ldcache() { command -v ldconfig >/dev/null 2>&1 && ldconfig -p 2>/dev/null | grep -qF " $1 ("; }

CANDIDATES=()
IFS=: read -r -a _llp <<<"${LD_LIBRARY_PATH:-}"
CANDIDATES+=("${_llp[@]}")
CANDIDATES+=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64
    /usr/local/cuda-13*/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu /usr/lib64)
mapfile -t _py < <(python_lib_dirs | awk '!seen[$0]++')
CANDIDATES+=("${_py[@]}")

ADD_DIRS=()
MISSING=()
for lib in "${NEEDED[@]}"; do
    found=""
    for d in "${CANDIDATES[@]}"; do
        [[ -n "$d" && -e "$d/$lib" ]] && { found="$d"; break; }
    done
    if [[ -z "$found" ]]; then
        if in_ldcache "$lib"; then continue; fi
        MISSING+=("$lib")
        continue
    fi
    [[ " ${ADD_DIRS[*]} " == *" $found "* ]] || ADD_DIRS+=("$found")
done
if [[ ${#MISSING[@]} -gt 0 ]]; then
    die "CUDA 13 libraries not found: ${MISSING[*]} (install PyTorch's CUDA 13 wheels or the CUDA runtime, or set LD_LIBRARY_PATH)"
fi
if [[ ${#ADD_DIRS[@]} -gt 0 ]]; then
    LD_LIBRARY_PATH="$(IFS=:; echo "${ADD_DIRS[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export LD_LIBRARY_PATH
fi
log "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
in_ldcache libcuda.so.1 || [[ -n "$(find /usr/lib* /usr/local/nvidia -name 'libcuda.so.1' 2>/dev/null | head -1)" ]] ||
    log "warning: libcuda.so.1 (NVIDIA driver) not in the loader cache"

# Everything the binary needs must resolve before a sweep starts.
if command -v ldd >/dev/null 2>&1; then
    if ldd "$BIN" 2>/dev/null | grep -q "not found"; then
        ldd "$BIN" >&2
        die "unresolved libraries for $BIN (see above)"
    fi
    log "ldd: $(ldd "$BIN" 2>/dev/null | grep -E 'libcuda|cublas|curand|nvrtc|cudart' | awk '{print $1" -> "$3}' | tr '\n' ' ')"
fi

# --- the GPU ----------------------------------------------------------------------------------------------
command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: no NVIDIA driver on this machine?"
GPU_INDEX=0
if [[ "${CUDA_VISIBLE_DEVICES:-}" =~ ^[0-9]+ ]]; then GPU_INDEX="${BASH_REMATCH[0]}"; fi
nvidia-smi -i "$GPU_INDEX" || true
GPU_CSV="$(nvidia-smi -i "$GPU_INDEX" --query-gpu=name,memory.total,driver_version --format=csv,noheader,nounits)"
GPU_NAME="$(echo "$GPU_CSV" | cut -d, -f1 | sed 's/^ *//; s/ *$//')"
GPU_MIB="$(echo "$GPU_CSV" | cut -d, -f2 | tr -dc '0-9')"
DRIVER="$(echo "$GPU_CSV" | cut -d, -f3 | tr -d ' ')"

device_id_from() {
    # "NVIDIA H100 80GB HBM3", 81559 MiB -> h100-80gb; "NVIDIA H200", 143771 MiB -> h200-140gb;
    # "NVIDIA A100-SXM4-80GB" -> a100-sxm4-80gb; "NVIDIA GeForce RTX 4090" -> rtx-4090-24gb.
    local name="$1" mib="$2" gb words=() w
    gb="$(echo "$name" | grep -oiE '[0-9]+ ?GB' | head -1 | tr -dc '0-9' || true)"
    [[ -n "$gb" ]] || gb=$(((mib + 512) / 1024))
    for w in $(echo "$name" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9\n' ' '); do
        case "$w" in
            nvidia | geforce | tesla | quadro | hbm* | gddr* | *gb) ;;
            *) words+=("$w") ;;
        esac
    done
    (IFS=-; echo "${words[*]}-${gb}gb")
}
ID="${DEVICE_ID:-$(device_id_from "$GPU_NAME" "$GPU_MIB")}"
log "GPU $GPU_INDEX: $GPU_NAME, $GPU_MIB MiB, driver $DRIVER -> device id '$ID'"

# --- calibrate --------------------------------------------------------------------------------------------
mkdir -p "$OUT/calibration/data" "$OUT/reports/$ID"
LOG="$OUT/reports/$ID/calibrate.log"
CMD=("$BIN" calibrate --device cuda:0 --grid "$GRID" --device-id "$ID"
    --data-dir "$OUT/calibration/data" --calib-dir "$OUT/calibration" --reports-dir "$OUT/reports" --resume
    ${EXTRA[@]+"${EXTRA[@]}"})
log "grid $(basename "$GRID"); running: ${CMD[*]}"
T_CAL=$(now)
# cd to the repo so relative paths inside the grid (if any) resolve as they do in CI.
set +e
(cd "$REPO" && "${CMD[@]}") 2>&1 | tee "$LOG"
CAL_RC=${PIPESTATUS[0]}
set -e
CAL_S=$(($(now) - T_CAL))
log "calibrate exited $CAL_RC after ${CAL_S} s (log: $LOG)"

# --- PyTorch reference on the same GPU --------------------------------------------------------------------
# The binary's own PyTorch backend (src/harness/torch/) over the same grid: transformers' classes,
# torch.cuda counters; then the report is rewritten with its "Predicting PyTorch" section.
TORCH_S="-"
TORCH_STATUS="skipped"
TORCH_CSV="$OUT/calibration/data/$ID-torch.csv"
if [[ $TORCH == 1 ]] && command -v python3 >/dev/null 2>&1 && python3 -c 'import torch, transformers' >/dev/null 2>&1; then
    T_T=$(now)
    set +e
    (cd "$REPO" && VRAMCAL_PYTHON="${VRAMCAL_PYTHON:-python3}" "$BIN" sweep --backend torch --device cuda:0 \
        --grid "$GRID" --out "$TORCH_CSV" --resume --timeout-s 300) 2>&1 | tee -a "$LOG"
    T_RC=${PIPESTATUS[0]}
    if [[ $T_RC == 0 && -f "$OUT/calibration/$ID.json" ]]; then
        (cd "$REPO" && "$BIN" report --data "$OUT/calibration/data/$ID.csv" --coeffs "$OUT/calibration/$ID.json" \
            --out "$OUT/reports/$ID" --grid "$GRID" --pytorch "$TORCH_CSV") 2>&1 | tee -a "$LOG"
        T_RC=${PIPESTATUS[0]}
    fi
    set -e
    if [[ $T_RC == 0 ]]; then TORCH_STATUS="ok"; else
        TORCH_STATUS="failed"
        log "warning: the PyTorch reference failed (the calibration itself is unaffected)"
    fi
    TORCH_S=$(($(now) - T_T))
elif [[ $TORCH == 1 ]]; then
    log "torch or transformers not importable: skipping the PyTorch reference"
fi

# --- summary ----------------------------------------------------------------------------------------------
ACC="$OUT/reports/$ID/accuracy.json"
ACC_LINE="(no $ACC)"
if [[ -f "$ACC" ]]; then
    if command -v python3 >/dev/null 2>&1; then
        ACC_LINE="$(python3 -c '
import json, sys
a = json.load(open(sys.argv[1]))
h = a.get("heldout", {})
# a metric with nothing scored (n = 0) has null percentages
pct = lambda v: "n/a" if v is None else "%.2f %%" % v
parts = ["held-out peak-memory MAPE %s (max %s, n=%s)" % (pct(h.get("mape")), pct(h.get("max_abs_pct")), h.get("n", "?"))]
for k in ("time_heldout", "seed_formula", "literature"):
    v = a.get(k)
    if isinstance(v, dict) and "mape" in v:
        parts.append("%s MAPE %s" % (k, pct(v["mape"])))
print("; ".join(parts))
' "$ACC" 2>/dev/null || echo "(unreadable $ACC)")"
    elif command -v jq >/dev/null 2>&1; then
        ACC_LINE="held-out MAPE $(jq -r '.heldout.mape' "$ACC") % (n=$(jq -r '.heldout.n' "$ACC"))"
    fi
fi
ROWS="-"
[[ -f "$OUT/calibration/data/$ID.csv" ]] && ROWS=$(($(wc -l <"$OUT/calibration/data/$ID.csv") - 1))
cat <<EOF

==================== vramcal GPU calibration: $ID ====================
GPU            $GPU_NAME ($GPU_MIB MiB), driver $DRIVER
binary         $BIN
grid           $GRID
calibrate      exit $CAL_RC, ${CAL_S} s, $ROWS rows in $OUT/calibration/data/$ID.csv
coefficients   $OUT/calibration/$ID.json
report         $OUT/reports/$ID/README.md
accuracy       $ACC_LINE
torch ref      $TORCH_STATUS (${TORCH_S} s) $TORCH_CSV
total          $(($(now) - T_START)) s
EOF
exit "$CAL_RC"
