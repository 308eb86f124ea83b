#!/usr/bin/env bash
# Stop the daemons start.sh started (only the PIDs in $RGW_DIR/run, and only if they are still
# ceph daemons), then wipe $RGW_DIR unless KEEP=1.
# STOP_GRACE: seconds between SIGTERM and SIGKILL (default 10). radosgw alone takes ~5 s to exit
# on SIGTERM; a throw-away instance whose state is wiped anyway loses nothing to a short grace.
RGW_DIR=${RGW_DIR:-/tmp/rgw-s3}
grace_steps=$(awk -v g="${STOP_GRACE:-10}" 'BEGIN { printf "%d", g * 10 }')
shopt -s nullglob
pids=()
# A zombie still answers kill -0; where nothing reaps daemons (containers without an init) it would
# look alive forever.
running() {
  local state
  state=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}
for f in "$RGW_DIR"/run/*.pid; do
  pid=$(cat "$f"); exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
  case "$exe" in
    */radosgw|*/ceph-osd|*/ceph-mon) pids+=("$pid"); echo "stopping $(basename "$f" .pid) pid $pid";;
    *) echo "skip $f (pid $pid not a ceph daemon: '$exe')";;
  esac
done
# Clients before servers: radosgw, then the OSD, then the monitor.
for want in radosgw ceph-osd ceph-mon; do
  for pid in "${pids[@]}"; do
    [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" == */$want ]] && kill -TERM "$pid"
  done
done
for _ in $(seq 1 "$grace_steps"); do
  alive=0; for pid in "${pids[@]}"; do running "$pid" && alive=1; done
  [ $alive = 0 ] && break; sleep 0.1
done
for pid in "${pids[@]}"; do running "$pid" && { echo "SIGKILL $pid"; kill -KILL "$pid"; }; done
# A killed daemon is gone only once reaped; wiping its directory before that races its last writes.
for _ in $(seq 1 50); do
  alive=0; for pid in "${pids[@]}"; do running "$pid" && alive=1; done
  [ $alive = 0 ] && break; sleep 0.1
done
[ "${KEEP:-0}" = 1 ] || rm -rf "$RGW_DIR"
echo stopped
