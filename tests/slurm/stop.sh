#!/usr/bin/env bash
# Stop the daemons tests/slurm/start.sh started (by their pid files) and drop its state folder.
#   tests/slurm/stop.sh [--keep]      # --keep: leave $PAINNET_SLURM_DIR (logs) in place
set -uo pipefail
DIR=${PAINNET_SLURM_DIR:-/tmp/painnet-slurm}
[ -d "$DIR" ] || exit 0
# Cancel what is still queued or running while the daemons can clean up its job steps.
if [ -s "$DIR/slurm.conf" ] && [ -s "$DIR/run/slurmctld.pid" ]; then
    export SLURM_CONF="$DIR/slurm.conf"
    scancel --full --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 60); do
        [ -z "$(squeue -h 2>/dev/null)" ] && break
        sleep 1
    done
fi
for pidfile in "$DIR/run/slurmd.pid" "$DIR/run/slurmctld.pid" "$DIR/munge/munged.pid"; do
    [ -s "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
done
if [ "${1:-}" != "--keep" ]; then
    rm -rf "$DIR"
fi
