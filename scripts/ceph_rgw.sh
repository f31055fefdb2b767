#!/usr/bin/env bash
# A throw-away, single-host Ceph cluster serving S3 on 127.0.0.1, for running asyncckpt's
# test-suite against a real, authenticating S3 implementation (RADOS Gateway) instead of moto.
#
# One monitor, one manager, one OSD (memstore: the data lives in the OSD's RAM and is gone at
# stop; or bluestore on a sparse file) and radosgw (beast), all bound to 127.0.0.1, all state
# and logs under DIR. No systemd, no Docker, nothing in /etc/ceph or /var/lib/ceph.
#
#   scripts/ceph_rgw.sh install             apt-get the Ceph packages if missing (needs root)
#   scripts/ceph_rgw.sh start DIR [PORT]    build the cluster in DIR, or reuse the one running
#                                           there; prints the test-suite's variables as
#                                           `export ASYNCCKPT_TEST_...=...` lines (for eval)
#   scripts/ceph_rgw.sh stop DIR            stop the daemons whose PIDs were recorded in DIR
#   scripts/ceph_rgw.sh status DIR          the recorded PIDs, alive or dead
#   scripts/ceph_rgw.sh run DIR -- CMD...   start, run CMD with those variables exported, then
#                                           stop (pass, fail or interrupt) unless the cluster
#                                           was already running before; exits with CMD's status
#
# For example `make test-rgw`, or by hand:
#   eval "$(scripts/ceph_rgw.sh start .rgw)" && .venv/bin/python -m pytest -q; scripts/ceph_rgw.sh stop .rgw
#
# Start-up takes about 30 s on 2 cores (the OSD booting, then radosgw creating its pools), an
# idempotent `start` on a healthy cluster 0.1 s, `stop` about 6 s. Every wait is bounded by
# CEPH_RGW_WAIT seconds. A build that fails stops whatever it had started. DIR is wiped and
# rebuilt only if it is empty or was made by this script (it holds a marker file). `stop` and
# `status` treat a recorded PID as this cluster's only if its command line names DIR's
# ceph.conf, so a reused PID is never signalled.
#
# The S3 user gets fresh random keys on every build (in DIR/s3_keys, mode 600).
# Tested with Debian 12's Ceph 16.2.15 (Pacific). Environment knobs:
#   CEPH_RGW_OBJECTSTORE=memstore|bluestore   (default memstore)
#   CEPH_RGW_STORE_BYTES=8589934592           (memstore's RAM cap / bluestore's sparse file size)
#   CEPH_RGW_MGR=1                            (0: no ceph-mgr; radosgw does not need it)
#   CEPH_RGW_WAIT=180                         (seconds each readiness wait may take)
#   CEPH_RGW_UID=s3test                       (the RGW user created)
set -euo pipefail

PACKAGES=(radosgw ceph-mon ceph-osd ceph-mgr ceph-common)
OBJECTSTORE=${CEPH_RGW_OBJECTSTORE:-memstore}
STORE_BYTES=${CEPH_RGW_STORE_BYTES:-8589934592}
WITH_MGR=${CEPH_RGW_MGR:-1}
WAIT=${CEPH_RGW_WAIT:-180}
RGW_UID=${CEPH_RGW_UID:-s3test}
PY=/usr/bin/python3 # the ceph CLI's own interpreter (a dependency of ceph-common), not a venv's

log() { echo "[ceph_rgw $(date +%T)] $*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}
usage() {
  echo "usage: $0 install | start DIR [PORT] | stop DIR | status DIR | run DIR -- CMD..." >&2
  exit 2
}

# ---- install ------------------------------------------------------------------------------
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
  command -v curl >/dev/null || missing+=(curl)
  if ((${#missing[@]} == 0)); then
    log "Ceph packages present: $(dpkg-query -W -f='${Version}' radosgw)"
    return 0
  fi
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install Ceph (radosgw, mon, osd, mgr, CLI) yourself"
  ((EUID == 0)) || die "missing ${missing[*]}; installing them needs root: sudo $0 install"
  log "installing ${missing[*]} (about 100 packages, 2-3 minutes)"
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -q >&2 || die "apt-get update failed"
  timeout 1200 apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 || die "apt-get install failed"
  log "installed Ceph $(dpkg-query -W -f='${Version}' radosgw)"
}

# ---- the cluster in DIR --------------------------------------------------------------------
set_dir() { # set_dir DIR: the paths of the cluster kept in DIR
  mkdir -p "$1"
  DIR=$(cd "$1" && pwd)
  CONF="$DIR/ceph.conf"
  PIDS="$DIR/pids"
  LOG="$DIR/log"
  MARK="$DIR/.ceph_rgw_cluster"
}

ceph_() { timeout 60 ceph -c "$CONF" --connect-timeout 30 "$@"; }

ours() { # ours NAME: print the recorded PID of daemon NAME if it is alive and runs our ceph.conf
  local f="$PIDS/$1.pid" pid
  [[ -f "$f" ]] || return 1
  pid=$(cat "$f")
  [[ "$pid" =~ ^[0-9]+$ && -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$CONF" || return 1
  echo "$pid"
}

stop_all() {
  local name pid _
  for name in rgw mgr osd mon; do
    if pid=$(ours "$name"); then
      log "stopping $name (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 40); do
        [[ -d /proc/$pid ]] || break
        sleep 0.5
      done
      if [[ -d /proc/$pid ]]; then
        log "$name did not exit within 20 s; SIGKILL $pid"
        kill -KILL "$pid" 2>/dev/null || true
      fi
    fi
    rm -f "$PIDS/$name.pid"
  done
}

status_all() {
  local name pid
  for name in mon mgr osd rgw; do
    if pid=$(ours "$name"); then
      echo "$name $pid alive"
    elif [[ -f "$PIDS/$name.pid" ]]; then
      echo "$name $(cat "$PIDS/$name.pid") dead"
    else
      echo "$name - not started"
    fi
  done
}

free_ports() { # free_ports N: N distinct free loopback ports
  "$PY" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

wait_for() { # wait_for WHAT SECONDS CMD...: run CMD every second until it succeeds, at most SECONDS
  local what=$1 secs=$2 t0=$SECONDS
  shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS - t0 < secs)) || die "timed out after ${secs}s waiting for $what (logs in $LOG)"
    sleep 1
  done
}

launch() { # launch NAME BINARY ARGS...: a foreground daemon, in the background, its PID recorded
  local name=$1
  shift
  # in a session of its own: a Ctrl-C or hang-up of the caller's terminal reaches only `stop`
  setsid "$@" >"$LOG/$name.stdout" 2>&1 </dev/null &
  echo $! >"$PIDS/$name.pid"
  sleep 0.5
  ours "$name" >/dev/null || die "$name exited at once; see $LOG/$name.stdout and $LOG/"
  log "started $name (pid $(cat "$PIDS/$name.pid"))"
}

print_env() {
  local port key secret
  port=$(cat "$DIR/rgw_port")
  read -r key secret <"$DIR/s3_keys"
  echo "export ASYNCCKPT_TEST_S3_ENDPOINT=http://127.0.0.1:$port"
  echo "export ASYNCCKPT_TEST_AWS_ACCESS_KEY_ID=$key"
  echo "export ASYNCCKPT_TEST_AWS_SECRET_ACCESS_KEY=$secret"
}

rgw_serves() { curl -sf -o /dev/null --max-time 5 "http://127.0.0.1:$(cat "$DIR/rgw_port")/"; }

running() { # a healthy cluster built by this script runs in DIR
  [[ -f "$MARK" && -f "$DIR/s3_keys" && -f "$DIR/rgw_port" ]] && ours mon >/dev/null && ours osd >/dev/null \
    && ours rgw >/dev/null && rgw_serves
}

write_conf() { # write_conf FSID MON_V2_PORT MON_V1_PORT RGW_PORT
  local store_conf asok="$DIR/run/\$name.asok"
  # a UNIX socket path has at most 107 bytes: in a deep DIR go without admin sockets (unused here)
  ((${#DIR} + 30 <= 107)) || asok=""
  if [[ "$OBJECTSTORE" == bluestore ]]; then
    # not `bluestore block path = $osd_data/block`: mkfs then makes `block` a symlink to itself
    store_conf="osd objectstore = bluestore
bluestore block create = true
bluestore block size = $STORE_BYTES
bluestore block db create = false
bluestore block wal create = false
bluestore fsck on mount = false
bdev enable discard = false"
  else
    store_conf="osd objectstore = memstore
memstore device bytes = $STORE_BYTES"
  fi
  # one OSD: pools of size 1 and 8 PGs (radosgw makes 7 pools, the mgr one); loopback only;
  # cephx everywhere; reclaim deleted objects' space after a minute, not 2 h (memstore is RAM)
  cat >"$CONF" <<EOF
[global]
fsid = $1
mon host = [v2:127.0.0.1:$2,v1:127.0.0.1:$3]
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
mon warn on insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
keyring = $DIR/keyring
run dir = $DIR/run
admin socket = $asok
log file = $LOG/\$name.log
mon cluster log file = $LOG/cluster.log
crash dir = $DIR/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
mon data avail warn = 5
osd crush chooseleaf type = 0

[mon]
mon data = $DIR/mon/\$cluster-\$id
keyring = \$mon_data/keyring

[mgr]
mgr data = $DIR/mgr/\$cluster-\$id
keyring = \$mgr_data/keyring
mgr initial modules = status

[osd]
osd data = $DIR/osd/\$cluster-\$id
keyring = \$osd_data/keyring
$store_conf

[client.rgw.a]
keyring = $DIR/rgw/keyring
rgw data = $DIR/rgw
rgw frontends = beast endpoint=127.0.0.1:$4
rgw dns name = localhost
rgw enable usage log = false
rgw init timeout = $WAIT
rgw gc obj min wait = 60
rgw gc processor period = 60
EOF
}

random_string() { # random_string ALPHABET LENGTH
  "$PY" -c 'import secrets, sys; print("".join(secrets.choice(sys.argv[1]) for _ in range(int(sys.argv[2]))))' "$1" "$2"
}

build() { # build [PORT]: a new cluster in the (empty or ours) DIR
  local mon2 mon1 auto_port rgw_port fsid osd_uuid osd_secret osd_id key secret t0=$SECONDS
  if [[ ! -x "$PY" ]] || ! command -v ceph-mon >/dev/null || ! command -v radosgw >/dev/null; then
    die "Ceph is not installed: run $0 install"
  fi
  stop_all
  find "$DIR" -mindepth 1 -delete
  mkdir -p "$PIDS" "$LOG" "$DIR/run" "$DIR/crash" "$DIR/mon/ceph-a" "$DIR/mgr/ceph-x" "$DIR/osd/ceph-0" "$DIR/rgw"
  touch "$MARK"
  # a failed build leaves nothing running
  trap 'rc=$?; if ((rc != 0)); then log "build failed (rc $rc); stopping what was started"; stop_all; fi' EXIT

  read -r mon2 mon1 auto_port < <(free_ports 3)
  rgw_port=${1:-$auto_port}
  echo "$rgw_port" >"$DIR/rgw_port"
  fsid=$(cat /proc/sys/kernel/random/uuid)
  write_conf "$fsid" "$mon2" "$mon1" "$rgw_port"

  log "mon a on 127.0.0.1:$mon2 (v2) and $mon1 (v1); radosgw will serve 127.0.0.1:$rgw_port"
  ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$DIR/keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
  monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$mon2,v1:127.0.0.1:$mon1]" "$DIR/monmap" >/dev/null
  ceph-mon -c "$CONF" -i a --mkfs --monmap "$DIR/monmap" --keyring "$DIR/keyring" >"$LOG/mon-mkfs.stdout" 2>&1 \
    || die "ceph-mon --mkfs failed; see $LOG/mon-mkfs.stdout"
  launch mon ceph-mon -c "$CONF" -i a -f
  wait_for "mon quorum" "$WAIT" ceph_ mon stat

  if [[ "$WITH_MGR" == 1 ]]; then
    ceph_ auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' -o "$DIR/mgr/ceph-x/keyring"
    launch mgr ceph-mgr -c "$CONF" -i x -f
  fi

  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  osd_secret=$(ceph-authtool --gen-print-key)
  echo "{\"cephx_secret\": \"$osd_secret\"}" >"$DIR/osd/new.json"
  osd_id=$(ceph_ osd new "$osd_uuid" -i "$DIR/osd/new.json")
  [[ "$osd_id" == 0 ]] || die "expected osd id 0, got '$osd_id'"
  printf '[osd.0]\n\tkey = %s\n' "$osd_secret" >"$DIR/osd/ceph-0/keyring"
  ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$osd_uuid" >"$LOG/osd-mkfs.stdout" 2>&1 \
    || die "ceph-osd --mkfs failed; see $LOG/osd-mkfs.stdout and $LOG/osd.0.log"
  launch osd ceph-osd -c "$CONF" -i 0 -f
  wait_for "osd.0 up" "$WAIT" osd_up

  ceph_ auth get-or-create client.rgw.a mon 'allow rw' osd 'allow rwx' mgr 'allow rw' -o "$DIR/rgw/keyring"
  launch rgw radosgw -c "$CONF" -n client.rgw.a -f
  wait_for "radosgw on 127.0.0.1:$rgw_port" "$WAIT" rgw_serves

  key=$(random_string ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 20)
  secret=$(random_string abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 40)
  timeout 120 radosgw-admin -c "$CONF" user create --uid="$RGW_UID" --display-name="asyncckpt tests" \
    --access-key="$key" --secret-key="$secret" --max-buckets=100000 >/dev/null 2>"$LOG/user-create.stderr" \
    || die "radosgw-admin user create failed; see $LOG/user-create.stderr"
  (umask 077 && echo "$key $secret" >"$DIR/s3_keys")
  log "serving S3 on http://127.0.0.1:$rgw_port after $((SECONDS - t0)) s"
  trap - EXIT
}

osd_up() {
  ceph_ osd dump --format json \
    | "$PY" -c 'import json, sys; d = json.load(sys.stdin); sys.exit(0 if d["osds"] and d["osds"][0]["up"] == 1 else 1)'
}

start() { # start [PORT]
  if running; then
    log "cluster in $DIR already running"
  else
    [[ -z "$(ls -A "$DIR")" || -f "$MARK" ]] || die "$DIR is not empty and was not made by this script; not wiping it"
    build "$@"
  fi
  print_env
}

run() { # run -- CMD...
  local was_running=0 exports rc
  [[ "${1:-}" == -- ]] && shift
  (($# > 0)) || usage
  ! running || was_running=1
  exports=$(start)
  eval "$exports"
  if ((!was_running)); then trap 'stop_all' EXIT; fi
  trap 'exit 130' INT
  trap 'exit 143' TERM
  log "running $* against $ASYNCCKPT_TEST_S3_ENDPOINT"
  set +e
  "$@"
  rc=$?
  set -e
  log "$1 exited with status $rc"
  exit "$rc"
}

cmd=${1:-}
case "$cmd" in
  install) install_packages ;;
  start | stop | status | run)
    [[ -n "${2:-}" ]] || usage
    set_dir "$2"
    shift 2
    case "$cmd" in
      start) start "$@" ;;
      stop) stop_all ;;
      status) status_all ;;
      run) run "$@" ;;
    esac
    ;;
  *) usage ;;
esac
