#!/usr/bin/env bash
# Runs submit.sh for real on a one-node Slurm cluster started here (slurmctld + slurmd on this
# machine, munge for authentication), waits for the merge job and checks its outputs. Used by
# tests/deploy_slurm.rs; also a way to try the scripts by hand. Needs root (slurmd) and the
# Debian/Ubuntu packages slurmctld, slurmd, slurm-client and munge.
#
# Usage: deploy/slurm/localtest.sh WORKDIR GRID N [VRAMCAL]
# Exit: 0 when all.csv, table.json and report/README.md were written; 77 (with "SKIP: why" on
# stdout) when this machine cannot run a local cluster; anything else is a failure.
set -euo pipefail

work=$1 grid=$2 n=$3
export VRAMCAL="${4:-vramcal}"
skip() {
    echo "SKIP: $*"
    exit 77
}
for tool in slurmctld slurmd sbatch squeue sinfo scontrol munge unmunge munged; do
    command -v "$tool" >/dev/null || skip "$tool is not installed (apt-get install slurmctld slurmd slurm-client munge)"
done
[[ $(id -u) -eq 0 ]] || skip "slurmd must run as root"

here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$work"/{state,spool,out}
work=$(cd "$work" && pwd)
host=$(hostname -s)

# munge: the system's daemon if it answers, else one started here and stopped at the end (its
# key comes with the package)
started_munged=
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [[ -s /etc/munge/munge.key ]] || skip "no /etc/munge/munge.key (the munge package creates it)"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    runuser -u munge -- munged 2>>"$work/munged.err" || munged --force 2>>"$work/munged.err" ||
        skip "munged does not start: $(tail -1 "$work/munged.err")"
    started_munged=$(cat /run/munge/munged.pid 2>/dev/null || true)
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n | unmunge >/dev/null || skip "munge does not authenticate"
fi

# free ports for this cluster, so a real slurmctld on the default 6817 is left alone
read -r cport dport < <(python3 -c 'import socket
s=[socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
node=$(slurmd -C | head -1 | sed 's/ *UpTime=.*//')
cat >"$work/slurm.conf" <<CONF
ClusterName=vramcaltest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$cport
SlurmdPort=$dport
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/slurmctld.log
SlurmdLogFile=$work/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$work/slurm.conf"

# in the foreground (-D) as this script's children, so stop() can end and reap exactly them
pids=()
stop() {
    for p in "${pids[@]}"; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    if [[ -n "$started_munged" ]]; then
        kill "$started_munged" 2>/dev/null || true
    fi
}
trap stop EXIT
slurmctld -D -i -f "$SLURM_CONF" 2>>"$work/slurmctld.err" &
pids+=($!)
slurmd -D -f "$SLURM_CONF" 2>>"$work/slurmd.err" &
pids+=($!)
for _ in $(seq 60); do
    state=$(sinfo -h -N -o %t 2>/dev/null | head -1)
    [[ "$state" == idle* || "$state" == mix* ]] && break
    sleep 0.5
done
[[ "$state" == idle* || "$state" == mix* ]] ||
    skip "the local node did not come up (state '$state'): $(tail -2 "$work/slurmctld.err" "$work/slurmd.err" "$work/slurmd.log" 2>/dev/null | tr '\n' ' ')"

read -r array merge < <(VRAMCAL_DEVICE=cpu VRAMCAL_GRES=none "$here/submit.sh" "$grid" "$n" "$work/out")
echo "submitted array $array and merge $merge"
deadline=$((SECONDS + ${VRAMCAL_SLURM_WAIT_S:-600}))
while [[ -n "$(squeue -h -j "$array,$merge" 2>/dev/null)" ]]; do
    if ((SECONDS > deadline)); then
        squeue
        echo "error: jobs still queued or running after ${VRAMCAL_SLURM_WAIT_S:-600} s" >&2
        exit 1
    fi
    sleep 1
done
for f in "$work"/out/vramcal-*.log; do
    echo "== $f"
    cat "$f"
done
for f in all.csv table.json report/README.md; do
    [[ -s "$work/out/$f" ]] || {
        echo "error: the merge job did not write $f" >&2
        exit 1
    }
done
echo "ok: $work/out/all.csv, table.json, report/"
