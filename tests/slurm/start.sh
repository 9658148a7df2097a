#!/usr/bin/env bash
# A real, single-node SLURM on loopback for painnet's scheduler tests (tests/test_slurm.py).
#
#   eval "$(tests/slurm/start.sh)"     # installs if needed, starts munged/slurmctld/slurmd,
#                                      # prints `export SLURM_CONF=...` for the clients
#   tests/slurm/stop.sh                # stops the daemons it started
#
# Debian's slurm-wlm and munge come from apt-get (root needed the first time). Every file lives
# under $PAINNET_SLURM_DIR (default /tmp/painnet-slurm): slurm.conf, state, logs, pid files.
# One node, "localhost" on 127.0.0.1, with this machine's CPUs and memory; one partition "debug".
# Progress goes to stderr; stdout carries only the export line.
set -euo pipefail
DIR=${PAINNET_SLURM_DIR:-/tmp/painnet-slurm}
CPUS=${PAINNET_SLURM_CPUS:-$(nproc)}

say() { echo "slurm/start.sh: $*" >&2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >&2
fi

mkdir -p "$DIR"/{state,spool,log,run,munge}
# munge: its own key, socket and pid file under $DIR.
KEY="$DIR/munge/munge.key"
SOCKET="$DIR/munge/munge.socket"
if [ ! -s "$KEY" ]; then
    dd if=/dev/urandom bs=1 count=1024 of="$KEY" status=none
fi
# munged runs as the current user (--force: also as root); it refuses keys and sockets that
# other users could touch, hence the modes below.
chmod 711 "$DIR/munge"
chmod 400 "$KEY"

# Memory in MB as slurmd itself measures it (RealMemory may not exceed that).
MEM=$(slurmd -C 2>/dev/null | tr ' ' '\n' | sed -n 's/^RealMemory=//p')
MEM=${MEM:-$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 ))}

cat > "$DIR/slurm.conf" <<CONF
# Written by tests/slurm/start.sh: one node on loopback, no accounting, no cgroups.
ClusterName=painnet
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=$(id -un)
AuthType=auth/munge
AuthInfo=socket=$SOCKET
CredType=cred/munge
SlurmctldPort=${PAINNET_SLURM_PORT:-16817}
SlurmdPort=$(( ${PAINNET_SLURM_PORT:-16817} + 1 ))
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF="$DIR/slurm.conf"
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if ! running "$DIR/munge/munged.pid"; then
    say "starting munged"
    munged --force --key-file="$KEY" --socket="$SOCKET" --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
fi
if ! running "$DIR/run/slurmctld.pid"; then
    say "starting slurmctld"
    slurmctld -f "$SLURM_CONF"
fi
if ! running "$DIR/run/slurmd.pid"; then
    say "starting slurmd"
    slurmd -f "$SLURM_CONF" -N localhost
fi

# Ready when the node accepts work.
for _ in $(seq 60); do
    state=$(sinfo -h -N -o '%T' 2>/dev/null | head -1 || true)
    case "$state" in
        idle*|mixed*|allocated*) say "node localhost is $state ($CPUS CPUs, ${MEM} MB)"
            echo "export SLURM_CONF=$SLURM_CONF"
            exit 0 ;;
    esac
    sleep 1
done
say "the node did not come up; logs in $DIR/log:"
tail -n 20 "$DIR"/log/*.log >&2 || true
exit 1
