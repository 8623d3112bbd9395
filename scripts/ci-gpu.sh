#!/usr/bin/env bash
# GPU regression check for a self-hosted CUDA runner: a short calibration, failing when the calibrated
# model's held-out peak-memory error gets worse than a threshold.
#
# Usage: scripts/ci-gpu.sh [--bin PATH] [--out DIR]
#   --bin PATH   a prebuilt vramcal with --features cuda (or $VRAMCAL_BIN). Without it the binary is built
#                with scripts/build-cuda.sh when cargo is present.
#   --out DIR    where calibration/ and reports/ go (default: a new temporary folder, printed at the end)
# Environment:
#   VRAMCAL_MAX_MAPE        held-out peak-memory MAPE limit in percent (default 5)
#   VRAMCAL_MAX_STEP_MAPE   optional: also limit the step-time MAPE (accuracy.json "time_heldout.mape")
# Exit status: 0 pass, 1 calibration failed or accuracy over the limit.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${VRAMCAL_BIN:-}"
OUT="${VRAMCAL_CI_OUT:-}"
MAX_MAPE="${VRAMCAL_MAX_MAPE:-5}"
MAX_STEP_MAPE="${VRAMCAL_MAX_STEP_MAPE:-}"
ID=ci-gpu

while [[ $# -gt 0 ]]; do
    case "$1" in
        --bin) BIN="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "ci-gpu.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
    shift
done
log() { echo "[ci-gpu] $*"; }

if [[ -z "$BIN" ]]; then
    if command -v cargo >/dev/null 2>&1; then
        log "building with scripts/build-cuda.sh"
        "$REPO/scripts/build-cuda.sh"
        BIN="${CARGO_TARGET_DIR:-$REPO/target/cuda}/release/vramcal"
    else
        echo "[ci-gpu] error: no --bin and no cargo to build one" >&2
        exit 1
    fi
fi
[[ -z "$OUT" ]] && OUT="$(mktemp -d "${TMPDIR:-/tmp}/vramcal-ci-gpu.XXXXXX")"
mkdir -p "$OUT"

# The short grid (calibration/grids/cuda-quick.toml), device id ci-gpu, no PyTorch reference: the same
# library discovery and invocation as a full calibration.
rc=0
"$REPO/scripts/calibrate-gpu.sh" --bin "$BIN" --out "$OUT" --quick --device-id "$ID" --no-torch || rc=$?
if [[ $rc -ne 0 ]]; then
    log "FAIL: calibration exited $rc (reports in $OUT/reports/$ID)"
    exit 1
fi

ACC="$OUT/reports/$ID/accuracy.json"
if [[ ! -f "$ACC" ]]; then
    log "FAIL: $ACC was not written"
    exit 1
fi
# Read heldout.mape (and time_heldout.mape when limited) with python3, else jq.
get() { # get KEY1 KEY2 -> value or empty
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import json,sys; a=json.load(open(sys.argv[1])); v=a.get(sys.argv[2],{}).get(sys.argv[3]); print("" if v is None else v)' "$ACC" "$1" "$2"
    elif command -v jq >/dev/null 2>&1; then
        jq -r --arg a "$1" --arg b "$2" '.[$a][$b] // empty' "$ACC"
    else
        echo "[ci-gpu] error: need python3 or jq to read $ACC" >&2
        exit 1
    fi
}
# over VALUE LIMIT -> exit 0 when VALUE > LIMIT (or VALUE is not a number)
over() { awk -v v="$1" -v l="$2" 'BEGIN { if (v == "" || v != v + 0) exit 0; exit !(v + 0 > l + 0) }'; }

MAPE="$(get heldout mape)"
N="$(get heldout n)"
MAXABS="$(get heldout max_abs_pct)"
log "held-out peak-memory MAPE ${MAPE:-?} % (max ${MAXABS:-?} %, n=${N:-?}); limit $MAX_MAPE %"
fail=0
if [[ -z "$N" || "$N" == 0 ]]; then
    log "FAIL: no held-out points were scored (n=${N:-missing})"
    fail=1
fi
if over "$MAPE" "$MAX_MAPE"; then
    log "FAIL: held-out MAPE ${MAPE:-missing} % > $MAX_MAPE %"
    fail=1
fi
if [[ -n "$MAX_STEP_MAPE" ]]; then
    SMAPE="$(get time_heldout mape)"
    log "step-time MAPE ${SMAPE:-?} %; limit $MAX_STEP_MAPE %"
    if over "$SMAPE" "$MAX_STEP_MAPE"; then
        log "FAIL: step-time MAPE ${SMAPE:-missing} % > $MAX_STEP_MAPE %"
        fail=1
    fi
fi
log "reports: $OUT/reports/$ID"
[[ $fail == 0 ]] && log "PASS"
exit "$fail"
