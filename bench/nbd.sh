#!/usr/bin/env bash
# corral's NBD target beside nbdkit and qemu-nbd, in one run, with ratios.
#
#   bench/nbd.sh              (about 4 minutes: 1 GiB image, fio runs of 10 s, copies median of 5)
#   QUICK=1 bench/nbd.sh      (smoke test, under a minute: 128 MiB image, fio runs of 2 s, one copy each)
#
# One base image of random bytes (so nothing reads as a hole) is served by all three; it is read once
# before the first line so all of them start from a warm page cache. Every line is measured on corral,
# nbdkit and qemu-nbd back to back (copies: the three take turns, median of 5) so that noise on this
# shared machine falls on all alike. ratio = corral / the faster of nbdkit and qemu-nbd; goal >= 1.0.
#
# base seq read, N conn (MiB/s)     nbdcopy -C N -T N <export> null: over the whole disk, read-only base:
#                                   corral base/base, nbdkit -r file, qemu-nbd -r -f raw. (-T N because
#                                   nbdcopy caps connections at its thread count, which defaults to the
#                                   number of cores.) MiB/s = disk size / wall time of nbdcopy.
# half-written seq read, N conn     the same copy from each server's copy-on-write export after every other
#   (MiB/s)                         64 KiB chunk of it was written (fio rw=write:64k, then a flush), so
#                                   reads alternate between overlay and base: corral db/0; nbdkit
#                                   --filter=cow file (default cow-block-size, 64 KiB); qemu-nbd -f qcow2
#                                   over a fresh `qemu-img create -f qcow2 -b base.img -F raw` overlay
#                                   (default 64 KiB clusters).
# 4K rand read, N conn (IOPS)       fio --ioengine=nbd, 4 KiB random reads, iodepth 16 per job, numjobs=N
#                                   (each job is one NBD connection), time-based, on the read-only bases.
# 4K rand write, N conn (IOPS)      the same with random writes to a copy-on-write export that starts
#                                   empty: a slot corral never wrote (db/1 for 1 conn, db/2 for 4), and
#                                   nbdkit's cow filter and qemu-nbd's qcow2 overlay started afresh.
# TLS seq read, 1 conn (MiB/s)      nbdcopy -C 1 over TLS 1.3 with a pre-shared key (nbds://, tls-psk-file):
#                                   corral's slot db/3 (never written: reads go through its overlay to the
#                                   base) with its own key from corral's store; nbdkit --tls=require
#                                   --tls-psk and qemu-nbd with a tls-creds-psk object, both over the
#                                   read-only base with the same key. A last line gives corral's TLS and
#                                   plain reads of db/3 (taking turns, median) and TLS / plain.
#
# Servers: corral serve (admin_hosts = 127.0.0.1, so loopback may open every export); nbdkit -f, default
# threads (16), file plugin with default cache; qemu-nbd -t --shared=8 --cache=writeback --aio=threads
# (its defaults, page cache like the others). All of them advertise multi-conn (checked: a line says so
# when one does not, since then nbdcopy and the 4-connection lines fall back to 1 connection).
# Copy-on-write granularity differs and is part of what is compared: corral 4 KiB grains, nbdkit cow
# 64 KiB blocks, qcow2 64 KiB clusters (each one's default).
#
# The machine has 2 cores: client and server share them, so absolute figures are low and noisy; the ratios
# are what to read. Everything listens on 127.0.0.1 (ports 18300-18305); all it starts is stopped by PID
# when it ends, and its temporary directory is removed. TLS servers listen on 18306-18307.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${QUICK:-0}" = 1 ]; then SIZE_MIB=128; RUNTIME=2; REPS=1; else SIZE_MIB=1024; RUNTIME=10; REPS=5; fi

bash tests/deps.sh bench   # the anchors too, from tests/deps.txt, in one apt transaction

cargo build --release --quiet
# CORRAL_BIN=path runs another build (e.g. an older commit's, for a before/after comparison).
CORRAL="${CORRAL_BIN:-${CARGO_TARGET_DIR:-target}/release/corral}"
W=$(mktemp -d /tmp/corral-nbd-bench.XXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT
bg() { "$@" & PIDS+=($!); LAST=$!; }
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
max() { printf '%s\n%s\n' "$1" "$2" | sort -g | tail -1; }
wait_nbd() { for _ in $(seq 100); do nbdinfo --size "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "no NBD server at $1" >&2; return 1; }
echo "machine: $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB; clients and servers share the cores"
echo "$(nbdkit --version), $(qemu-nbd --version | head -1), $(nbdcopy --version | head -1), $(fio --version)"

# --- the base, and corral with one cluster of 4 slots over it
D=$W/corral
mkdir -p "$D/images/testos" "$D/disks" "$W/tmp"
printf 'kernel = "vmlinuz"\ninitrds = ["initrd.img"]\ncmdline = "x"\n' > "$D/images/testos/image.toml"
echo kernel > "$D/images/testos/vmlinuz"; echo initrd > "$D/images/testos/initrd.img"
BASE=$D/disks/base.img
head -c $((SIZE_MIB << 20)) /dev/urandom > "$BASE"
printf '[settings]\ncooldown = 0\n[[cluster]]\nname = "db"\nmin = 0\nmax = 4\ndefault = 0\nimages = ["testos"]\ndisk = "base"\n' > "$D/policy.toml"
cat > "$D/corral.toml" <<EOF
[server]
address = "127.0.0.1"
state_dir = "$D/state"
images_dir = "$D/images"
scripts_dir = "$(pwd)/boot-scripts"
policy = "$D/policy.toml"
disks_dir = "$D/disks"
[http]
listen = "127.0.0.1:18300"
[tftp]
enabled = false
[nbd]
listen = "127.0.0.1:18301"
admin_hosts = ["127.0.0.1"]
EOF
cat "$BASE" > /dev/null   # warm the page cache for everyone

C=nbd://127.0.0.1:18301
K_RO=nbd://127.0.0.1:18302/
Q_RO=nbd://127.0.0.1:18303/
K_COW=nbd://127.0.0.1:18304/
Q_COW=nbd://127.0.0.1:18305/
QEMU_OPTS=(-t --shared=8 --cache=writeback --aio=threads -b 127.0.0.1)

bg "$CORRAL" serve --config "$D/corral.toml" 2>"$W/corral.log"
bg nbdkit -f --exit-with-parent -i 127.0.0.1 -p 18302 -r file "$BASE" 2>"$W/nbdkit-ro.log"
bg qemu-nbd "${QEMU_OPTS[@]}" -p 18303 -r -f raw "$BASE" 2>"$W/qemu-ro.log"
wait_nbd "$C/base/base"; wait_nbd "$K_RO"; wait_nbd "$Q_RO"

# Fresh copy-on-write servers: nbdkit's cow filter (its overlay is a temporary file in TMPDIR) and
# qemu-nbd over a new qcow2 overlay. The previous pair is stopped first.
KP=; QP=; N_COW=0
fresh_cow() {
  [ -z "$KP" ] || stop "$KP"; [ -z "$QP" ] || stop "$QP"
  N_COW=$((N_COW + 1))
  local ov=$W/ov$N_COW.qcow2
  rm -f "$W"/ov*.qcow2
  qemu-img create -q -f qcow2 -b "$BASE" -F raw "$ov"
  bg env TMPDIR="$W/tmp" nbdkit -f --exit-with-parent -i 127.0.0.1 -p 18304 --filter=cow file "$BASE" 2>>"$W/nbdkit-cow.log"; KP=$LAST
  bg qemu-nbd "${QEMU_OPTS[@]}" -p 18305 -f qcow2 "$ov" 2>>"$W/qemu-cow.log"; QP=$LAST
  wait_nbd "$K_COW"; wait_nbd "$Q_COW"
}
fresh_cow

for u in "$C/base/base" "$C/db/0" "$K_RO" "$K_COW" "$Q_RO" "$Q_COW"; do
  nbdinfo --can multi-conn "$u" || echo "note: $u does not advertise multi-conn: its 4-connection lines use 1"
done

# MiB/s of one nbdcopy of the whole export to null: with $2 connections
copy() {
  local s e
  s=$(date +%s.%N)
  if ! nbdcopy -C "$2" -T "$2" "$1" null: 2>"$W/nbdcopy.err"; then
    echo "nbdcopy from $1 failed: $(head -c 300 "$W/nbdcopy.err")" >&2; echo 0; return
  fi
  e=$(date +%s.%N)
  awk -v s="$s" -v e="$e" -v m="$SIZE_MIB" 'BEGIN { printf "%.0f", m / (e - s) }'
}
# fio with the nbd engine: fio_run URI NUMJOBS ARGS... -> IOPS (reads + writes)
fio_run() {
  local uri=$1 jobs=$2; shift 2
  if ! fio --name=nbd --ioengine=nbd --uri="$uri" --numjobs="$jobs" --group_reporting "$@" \
      --output-format=json --output="$W/fio.json" >"$W/fio.out" 2>&1; then
    echo "fio against $uri failed: $(grep -v 'connected to NBD' "$W/fio.out" | head -c 300)" >&2; echo 0; return
  fi
  jq '.jobs[0].read.iops + .jobs[0].write.iops | floor' "$W/fio.json"
}
randio() { fio_run "$1" "$2" --rw="$3" --bs=4k --iodepth=16 --time_based --runtime="$RUNTIME" --ramp_time=1; }
# every other 64 KiB chunk, each once (without io_size fio would wrap around and write them all twice)
halfwrite() { fio_run "$1" 1 --rw=write:64k --bs=64k --io_size=$((SIZE_MIB / 2))m --iodepth=16 --end_fsync=1 >/dev/null; }

row() { printf "%-38s %9s %9s %9s %7s\n" "$@"; }
line() { row "$1" "$2" "$3" "$4" "$(ratio "$2" "$(max "$3" "$4")")"; }
# copies from three URIs, taking turns, $REPS times each: line LABEL CONNS CORRAL NBDKIT QEMU
copies() {
  local label=$1 n=$2 i c=() k=() q=()
  for i in $(seq "$REPS"); do c+=("$(copy "$3" "$n")"); k+=("$(copy "$4" "$n")"); q+=("$(copy "$5" "$n")"); done
  line "$label" "$(printf '%s\n' "${c[@]}" | median)" "$(printf '%s\n' "${k[@]}" | median)" "$(printf '%s\n' "${q[@]}" | median)"
}

echo; echo "== nbd ($SIZE_MIB MiB image; fio ${RUNTIME} s runs after 1 s ramp; copies median of $REPS)"
row "line" "corral" "nbdkit" "qemu-nbd" "ratio"
for n in 1 4; do copies "base seq read, $n conn (MiB/s)" $n "$C/base/base" "$K_RO" "$Q_RO"; done

halfwrite "$C/db/0"; halfwrite "$K_COW"; halfwrite "$Q_COW"
for n in 1 4; do copies "half-written seq read, $n conn (MiB/s)" $n "$C/db/0" "$K_COW" "$Q_COW"; done

for n in 1 4; do
  line "4K rand read, $n conn (IOPS)" "$(randio "$C/base/base" $n randread)" "$(randio "$K_RO" $n randread)" "$(randio "$Q_RO" $n randread)"
done

slot=1
for n in 1 4; do
  fresh_cow
  line "4K rand write, $n conn (IOPS)" "$(randio "$C/db/$slot" $n randwrite)" "$(randio "$K_COW" $n randwrite)" "$(randio "$Q_COW" $n randwrite)"
  slot=$((slot + 1))
done

# TLS: db/3's key from corral's store, in the psk file format all three read (identity:hexkey).
python3 - "$D/state/corral.db" > "$W/keys.psk" <<'PY'
import json, sqlite3, sys
doc = sqlite3.connect(sys.argv[1]).execute("SELECT doc FROM slot_psk WHERE slot = 'db.3'").fetchone()[0]
p = json.loads(doc)
print(f"{p['identity']}:{p['key']}")
PY
PSK_ID=$(cut -d: -f1 "$W/keys.psk")
bg nbdkit -f --exit-with-parent -i 127.0.0.1 -p 18306 --tls=require --tls-psk="$W/keys.psk" -r file "$BASE" 2>"$W/nbdkit-tls.log"
bg qemu-nbd "${QEMU_OPTS[@]}" -p 18307 -r -f raw --object "tls-creds-psk,id=tls0,endpoint=server,dir=$W" --tls-creds tls0 "$BASE" 2>"$W/qemu-tls.log"
tls() { echo "nbds://$PSK_ID@127.0.0.1:$1/$2?tls-psk-file=$W/keys.psk"; }
wait_nbd "$(tls 18306 '')"; wait_nbd "$(tls 18307 '')"
copies "TLS seq read, 1 conn (MiB/s)" 1 "$(tls 18301 db/3)" "$(tls 18306 '')" "$(tls 18307 '')"
ct=(); cp=()
for i in $(seq "$REPS"); do ct+=("$(copy "$(tls 18301 db/3)" 1)"); cp+=("$(copy "$C/db/3" 1)"); done
t=$(printf '%s\n' "${ct[@]}" | median); p=$(printf '%s\n' "${cp[@]}" | median)
echo "(goal: ratio >= 1.0 on every line; random write starts from an empty overlay on every server)"
echo "corral db/3 seq read, 1 conn: TLS $t MiB/s, plain $p MiB/s, TLS / plain $(ratio "$t" "$p") (the cost of TLS)"

# anything the servers complained about: corral's log, nbdkit's and qemu-nbd's stderr
for l in corral nbdkit-ro qemu-ro nbdkit-cow qemu-cow nbdkit-tls qemu-tls; do
  n=$(grep -ciE 'error|warn|panic' "$W/$l.log" || true)
  [ "$n" = 0 ] || { echo "$l: $n error/warning lines, first ones:"; grep -iE 'error|warn|panic' "$W/$l.log" | head -3 | sed 's/^/  /'; }
done
