#!/usr/bin/env bash
# Submit a sharded vramcal calibration to Slurm: a job array of N sweep shards (one GPU each),
# then a merge + fit + report job that runs once every shard has ended.
#
# Usage: deploy/slurm/submit.sh GRID N OUTDIR [extra sbatch args for both jobs...]
#   GRID    grid TOML (e.g. calibration/grids/cuda.toml), on storage every node reads
#   N       number of shards = array tasks
#   OUTDIR  shared results directory
# Environment:
#   VRAMCAL          vramcal binary on the nodes (default: vramcal on PATH)
#   VRAMCAL_DEVICE   default cuda:0; cpu for a CPU-only cluster (then also VRAMCAL_GRES=none)
#   VRAMCAL_GRES     the array tasks' --gres (default gpu:1; none for no GRES request)
#   VRAMCAL_METRICS_ADDR  optional HOST:PORT each task serves Prometheus metrics on
# Prints the two job ids (array, merge) on stdout.
set -euo pipefail

if [[ $# -lt 3 ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
grid=$1 n=$2 out=$3
shift 3
if ! [[ "$n" =~ ^[0-9]+$ ]] || ((n < 1)); then
    echo "error: invalid N: '$n'; accepted a whole number >= 1" >&2
    exit 2
fi
if [[ ! -f "$grid" ]]; then
    echo "error: invalid GRID: $grid does not exist; accepted a grid TOML file" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
grid=$(cd "$(dirname "$grid")" && pwd)/$(basename "$grid")
out=$(cd "$out" && pwd)

export VRAMCAL="${VRAMCAL:-vramcal}" VRAMCAL_GRID="$grid" VRAMCAL_OUT="$out" VRAMCAL_SHARDS="$n"
export VRAMCAL_DEVICE="${VRAMCAL_DEVICE:-cuda:0}"
gres=()
if [[ "${VRAMCAL_GRES:-gpu:1}" != none ]]; then
    gres=(--gres="${VRAMCAL_GRES:-gpu:1}")
fi

array=$(sbatch --parsable --array="0-$((n - 1))" "${gres[@]}" --chdir="$out" \
    --export=ALL "$@" "$here/sweep-array.sbatch")
array=${array%%;*}
# afterany, not afterok: merge also runs when a shard failed, and then names what is missing
merge=$(sbatch --parsable --dependency="afterany:$array" --chdir="$out" \
    --export=ALL "$@" "$here/merge.sbatch")
merge=${merge%%;*}
echo "$array $merge"
