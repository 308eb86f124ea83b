#!/usr/bin/env bash
# Start a throw-away single-node Ceph (1 mon, 1 OSD, no mgr, cephx off) + radosgw (S3) on
# 127.0.0.1, entirely under $RGW_DIR. For tests and benchmarks; never for data you want to keep.
# Needs: apt-get install -y --no-install-recommends radosgw ceph-mon ceph-osd
#
# Every port is settable so that several instances can run side by side (tests run in parallel):
#   RGW_DIR       state, logs, pid files (wiped first)       default /tmp/rgw-s3
#   MON_PORT      monitor (msgr2)                            default 13300
#   RGW_PORT      S3 endpoint                                default 7480
#   OSD_PORT_MIN  first of 100 ports the OSD may bind        default 16800
#   OSD_STORE     memstore (RAM) | bluestore (sparse file)   default memstore
#   ACCESS_KEY, SECRET_KEY  credentials of the S3 user created here
# Prints KEY=value lines and writes $RGW_DIR/env (shell exports) on success.
set -euo pipefail
RGW_DIR=${RGW_DIR:-/tmp/rgw-s3}
MON_PORT=${MON_PORT:-13300}
RGW_PORT=${RGW_PORT:-7480}
OSD_PORT_MIN=${OSD_PORT_MIN:-16800}
OSD_STORE=${OSD_STORE:-memstore}
OSD_MEM_BYTES=${OSD_MEM_BYTES:-4294967296}      # memstore: capacity cap (RAM is used as data grows)
OSD_BLOCK_BYTES=${OSD_BLOCK_BYTES:-10737418240} # bluestore: size of the sparse block file
ACCESS_KEY=${ACCESS_KEY:-TESTACCESSKEY0000000}
SECRET_KEY=${SECRET_KEY:-testsecretkey0000000000000000000000000000}
# The ceph CLI waits forever for a monitor by default; a monitor that failed to bind must fail us.
CEPH_TIMEOUT=${CEPH_TIMEOUT:-30}

t0=$(date +%s.%N)
if [ -e "$RGW_DIR/run" ] && ls "$RGW_DIR"/run/*.pid >/dev/null 2>&1; then
  echo "already running? ($RGW_DIR/run/*.pid exists; run stop.sh first)" >&2; exit 1
fi
rm -rf "$RGW_DIR"
mkdir -p "$RGW_DIR"/{mon,osd,run,log,rgw,crash}
D=$RGW_DIR
CONF=$D/ceph.conf

new_uuid() {
  # uuidgen comes from uuid-runtime, which minimal images lack; the kernel can do it too.
  if command -v uuidgen >/dev/null 2>&1; then uuidgen; else cat /proc/sys/kernel/random/uuid; fi
}

# An HTTP status line from radosgw, without needing curl.
rgw_http_status() {
  local line
  exec 3<>"/dev/tcp/127.0.0.1/$RGW_PORT" || return 1
  printf 'GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
  IFS= read -r -t 5 line <&3 || { exec 3<&-; return 1; }
  exec 3<&-
  printf '%s' "$line"
}

FSID=$(new_uuid)
cat >"$CONF" <<CONF
[global]
fsid = $FSID
mon host = v2:127.0.0.1:$MON_PORT
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
ms bind port min = $OSD_PORT_MIN
ms bind port max = $((OSD_PORT_MIN + 99))
auth cluster required = none
auth service required = none
auth client required = none
keyring = $D/keyring
run dir = $D/run
admin socket = $D/run/\$name.asok
pid file = $D/run/\$name.pid
log file = $D/log/\$name.log
mon cluster log file = $D/log/cluster.log
crash dir = $D/crash
log to stderr = false
err to stderr = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
debug rgw = 0/0
debug ms = 0/0
[mon]
mon data = $D/mon
mon data avail warn = 1
mon data avail crit = 0
paxos propose interval = 0.05
paxos min wait = 0.01
[osd]
osd data = $D/osd
osd objectstore = $OSD_STORE
memstore device bytes = $OSD_MEM_BYTES
bluestore block path = $D/osd-block.img
bluestore block create = true
bluestore block size = $OSD_BLOCK_BYTES
bluestore block db create = false
bluestore block wal create = false
osd memory target = 1073741824
osd class load list = *
osd class default list = *
[client.rgw.a]
rgw data = $D/rgw
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT
ms mon client mode = crc
auth client required = none
rgw dns name = 127.0.0.1
rgw thread pool size = 128
rgw enable usage log = false
CONF
C=(-c "$CONF")
: >"$D/keyring"

# --- monitor
monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$MON_PORT]" "$D/monmap" >/dev/null
ceph-mon "${C[@]}" --mkfs -i a --monmap "$D/monmap"
ceph-mon "${C[@]}" -i a            # daemonizes, writes $D/run/mon.a.pid

# --- OSD (memstore: data in the OSD's RAM; bluestore: sparse file)
OSD_UUID=$(new_uuid)
OSD_ID=$(ceph "${C[@]}" --connect-timeout "$CEPH_TIMEOUT" osd new "$OSD_UUID") || {
  echo "monitor on 127.0.0.1:$MON_PORT did not answer; see $D/log/mon.a.log" >&2; tail -n 20 "$D/log/mon.a.log" >&2 || true; exit 1; }
ceph-osd "${C[@]}" -i "$OSD_ID" --mkfs --osd-uuid "$OSD_UUID" 2>>"$D/log/osd-mkfs.log"
ceph-osd "${C[@]}" -i "$OSD_ID"    # daemonizes, writes $D/run/osd.N.pid

# --- radosgw (creates its pools on first start)
radosgw "${C[@]}" -n client.rgw.a  # daemonizes, writes $D/run/client.rgw.a.pid

status=""
for _ in $(seq 1 600); do
  status=$(rgw_http_status 2>/dev/null || true)
  [[ "$status" == HTTP/*" 200"* ]] && break
  sleep 0.1
done
[[ "$status" == HTTP/*" 200"* ]] || {
  echo "radosgw did not come up on 127.0.0.1:$RGW_PORT (last status: '${status:-none}'); see $D/log" >&2
  tail -n 20 "$D/log/client.rgw.a.log" >&2 || true; exit 1; }
t1=$(date +%s.%N)

radosgw-admin "${C[@]}" user create --uid=test --display-name=test \
  --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" >"$D/user.json"
if command -v curl >/dev/null 2>&1; then
  # A first SigV4-signed request proves the user is usable before anyone relies on it.
  EMPTY_SHA256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
  curl -sf -o /dev/null --aws-sigv4 "aws:amz:us-east-1:s3" --user "$ACCESS_KEY:$SECRET_KEY" \
    -H "x-amz-content-sha256: $EMPTY_SHA256" \
    "http://127.0.0.1:$RGW_PORT/" || { echo "signed request failed" >&2; exit 1; }
fi
t2=$(date +%s.%N)

cat >"$D/env" <<ENV
export S3_ENDPOINT=http://127.0.0.1:$RGW_PORT
export AWS_ACCESS_KEY_ID=$ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$SECRET_KEY
export AWS_DEFAULT_REGION=us-east-1
export CEPH_CONF=$CONF
ENV
echo "S3_ENDPOINT=http://127.0.0.1:$RGW_PORT"
echo "AWS_ACCESS_KEY_ID=$ACCESS_KEY"
echo "AWS_SECRET_ACCESS_KEY=$SECRET_KEY"
echo "PIDS=$(cat "$D"/run/*.pid | tr '\n' ' ')"
awk -v a="$t0" -v b="$t1" -v c="$t2" \
  'BEGIN{printf "STARTUP=first anonymous 200 after %.1fs, user ready after %.1fs\n", b-a, c-a}'
