#!/usr/bin/env bash
# corral's iSCSI target beside tgt, in one run, with ratios.
#
#   bench/iscsi.sh              (about 4 minutes: 1 GiB image, iscsi-perf runs of 8 s, median of 5 rounds)
#   QUICK=1 bench/iscsi.sh      (smoke test, under a minute: 128 MiB image, runs of 3 s, one round)
#   ROUNDS=9 RUNTIME=10 bench/iscsi.sh   (more rounds, longer runs)
#
# One base image of random bytes (fully allocated: nothing reads as a hole, GET LBA STATUS reports it all
# mapped, and qemu-img finds no zeros to skip) is served by both targets; it is read once before the first
# line so both start from a warm page cache. Every line is measured on corral and tgt in turn, ROUNDS
# times each (the peers alternate, and which one goes first alternates too, so that noise on this shared
# machine falls on both alike); the table shows medians. ratio = corral / tgt, higher is better; goal >= 1.0.
#
# seq read, iscsi-perf (MiB/s)      iscsi-perf -b <128 KiB in blocks> -m 16: sequential READs of 128 KiB,
#                                   16 in flight, for RUNTIME seconds (then SIGINT); its own average.
# seq read, qemu-img convert        qemu-img convert -n of the whole LUN from iscsi:// into a null-co
#   (MiB/s)                         target (qemu's libiscsi driver, its default 8 coroutines, 2 MiB
#                                   requests); MiB/s = image size / wall time.
# 4K rand read, iscsi-perf (IOPS)   iscsi-perf -r -b <4 KiB in blocks> -m 32: random 4 KiB READs, 32 in
#                                   flight, for RUNTIME seconds; its own average.
#
# The block counts come from the block size each target reports (iscsi-readcapacity16; both say 512).
#
# Targets: corral serve with one cluster whose slot db/0 is a copy-on-write overlay over the image (never
# written, so every read goes through the overlay's bitmap to the base), the node at 127.0.0.1 assigned to
# it by fetching /boot/<mac>, target iqn.2026-11.io.corral:db.0 LUN 0; tgtd (Debian tgt) with its
# defaults (bstype rdwr: pread through the page cache, 16 I/O threads), the same image as LUN 1 of one
# target (LUN 0 is tgt's controller), its own control port (-C) so that it leaves any other tgtd alone.
#
# The machine has 2 cores: initiator and target share them, so absolute figures are low and noisy; the
# ratios are what to read. Everything listens on 127.0.0.1 (ports 18310-18313); all it starts is stopped by
# PID when it ends, and its temporary directory is removed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${QUICK:-0}" = 1 ]; then SIZE_MIB=128; RUNTIME=${RUNTIME:-3}; ROUNDS=${ROUNDS:-1}
else SIZE_MIB=1024; RUNTIME=${RUNTIME:-8}; ROUNDS=${ROUNDS:-5}; fi

bash tests/deps.sh bench   # the anchors too, from tests/deps.txt, in one apt transaction
[ "$(id -u)" = 0 ] || { echo "tgtd needs root" >&2; exit 1; }

HTTP=18310 CORRAL_PORT=18311 TGT_PORT=18312 TGT_CTL=18313
for p in $HTTP $CORRAL_PORT $TGT_PORT $TGT_CTL; do
  if ss -Htln "sport = :$p" | grep -q .; then echo "port $p is in use" >&2; exit 1; fi
done

cargo build --release --quiet --bin corral
# CORRAL_BIN=path runs another build (e.g. an older commit's, for a before/after comparison).
CORRAL="${CORRAL_BIN:-${CARGO_TARGET_DIR:-target}/release/corral}"
W=$(mktemp -d /tmp/corral-iscsi-bench.XXXX)
PIDS=()
TGTD=
cleanup() {
  # tgtd ignores SIGTERM while it has targets: its own way down first (its control port is ours alone).
  if [ -n "$TGTD" ]; then
    command tgtadm -C "$TGT_CTL" --lld iscsi --mode target --op delete --force --tid 1 >/dev/null 2>&1 || true
    command tgtadm -C "$TGT_CTL" --mode system --op delete >/dev/null 2>&1 || true
  fi
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  rm -rf "$W"
}
trap cleanup EXIT
bg() { "$@" & PIDS+=($!); LAST=$!; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
INI=iqn.2026-11.io.corral.bench:initiator
echo "machine: $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB; initiators and targets share the cores"
echo "tgt $(dpkg-query -W -f='${Version}' tgt), libiscsi-bin $(dpkg-query -W -f='${Version}' libiscsi-bin), $(qemu-img --version | head -1)"

# --- the base, and corral with one cluster of one slot over it
D=$W/corral
mkdir -p "$D/images/testos" "$D/disks"
printf 'kernel = "vmlinuz"\ninitrds = ["initrd.img"]\ncmdline = "x"\n' > "$D/images/testos/image.toml"
echo kernel > "$D/images/testos/vmlinuz"; echo initrd > "$D/images/testos/initrd.img"
BASE=$D/disks/base.img
head -c $((SIZE_MIB << 20)) /dev/urandom > "$BASE"
printf '[settings]\ncooldown = 0\n[[cluster]]\nname = "db"\nmin = 0\nmax = 1\ndefault = 1\nimages = ["testos"]\ndisk = "base"\n' > "$D/policy.toml"
cat > "$D/corral.toml" <<EOF
[server]
address = "127.0.0.1"
state_dir = "$D/state"
images_dir = "$D/images"
scripts_dir = "$(pwd)/boot-scripts"
policy = "$D/policy.toml"
disks_dir = "$D/disks"
[http]
listen = "127.0.0.1:$HTTP"
[tftp]
enabled = false
[nbd]
enabled = false
[iscsi]
listen = "127.0.0.1:$CORRAL_PORT"
# The node 52:54:00:00:00:01 is at 127.0.0.1 (as corral's DHCP would know it): its requests are its own.
[[dhcp.reservation]]
mac = "52:54:00:00:00:01"
address = "127.0.0.1"
EOF
cat "$BASE" > /dev/null   # warm the page cache for both

bg "$CORRAL" serve --config "$D/corral.toml" 2>"$W/corral.log"
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$HTTP/boot.ipxe" >/dev/null && break; sleep 0.1; done
# The node at 127.0.0.1 asks for its script: it fills db/0 and may log in to that target.
curl -sf "http://127.0.0.1:$HTTP/boot/52-54-00-00-00-01?buildarch=x86_64" >/dev/null \
  || { echo "corral refused the node its script: $(tail -3 "$W/corral.log")" >&2; exit 1; }
C_LUN="iscsi://127.0.0.1:$CORRAL_PORT/iqn.2026-11.io.corral:db.0/0"

bg tgtd -f -C "$TGT_CTL" --iscsi "portal=127.0.0.1:$TGT_PORT" >"$W/tgtd.log" 2>&1
TGTD=$LAST
tgtadm() { command tgtadm -C "$TGT_CTL" --lld iscsi "$@"; }
for _ in $(seq 100); do tgtadm --mode target --op show >/dev/null 2>&1 && break; sleep 0.1; done
tgtadm --mode target --op new --tid 1 --targetname iqn.2026-11.io.corral.bench:tgt
tgtadm --mode logicalunit --op new --tid 1 --lun 1 --backing-store "$BASE"
tgtadm --mode target --op bind --tid 1 --initiator-address ALL
T_LUN="iscsi://127.0.0.1:$TGT_PORT/iqn.2026-11.io.corral.bench:tgt/1"

# The block size a LUN reports, and its size in bytes (both must see the whole image).
block_size() { iscsi-readcapacity16 -i "$INI" "$1" | awk -F: '/LOGICAL BLOCK LENGTH IN BYTES/ { print $2 }'; }
lun_bytes() { iscsi-readcapacity16 -i "$INI" "$1" | awk -F: '/Total size/ { print $2 }'; }
C_BS=$(block_size "$C_LUN"); T_BS=$(block_size "$T_LUN")
for u in "$C_LUN" "$T_LUN"; do
  [ "$(lun_bytes "$u")" = $((SIZE_MIB << 20)) ] || { echo "$u is not $SIZE_MIB MiB: $(lun_bytes "$u")" >&2; exit 1; }
done
echo "block size: corral $C_BS, tgt $T_BS"

# iscsi-perf for RUNTIME seconds: perf LUN BLOCK_SIZE REQUEST_BYTES DEPTH [-r] -> "IOPS MiB/s" (its
# final average; MiB/s computed from IOPS and the request size, iscsi-perf's own figure is rounded)
perf() {
  local lun=$1 bs=$2 bytes=$3 depth=$4; shift 4
  timeout -s INT "$RUNTIME" iscsi-perf -i "$INI" -b $((bytes / bs)) -m "$depth" "$@" "$lun" >"$W/perf.out" 2>&1 || true
  local iops
  iops=$(tr '\r' '\n' <"$W/perf.out" | sed -n 's/.*iops average \([0-9]*\) .*/\1/p' | tail -1)
  if [ -z "$iops" ]; then
    echo "iscsi-perf on $lun gave no figure: $(tr '\r' '\n' <"$W/perf.out" | tail -3 | head -c 300)" >&2; echo "0 0"; return
  fi
  awk -v i="$iops" -v b="$bytes" 'BEGIN { printf "%d %.0f\n", i, i * b / 1048576 }'
}
# qemu-img convert of the whole LUN into a null target -> MiB/s
convert() {
  local s e
  s=$(date +%s.%N)
  if ! qemu-img convert -n --target-image-opts "$1" "driver=null-co,size=$((SIZE_MIB << 20))" 2>"$W/qemu.err"; then
    echo "qemu-img convert from $1 failed: $(head -c 300 "$W/qemu.err")" >&2; echo 0; return
  fi
  e=$(date +%s.%N)
  awk -v s="$s" -v e="$e" -v m="$SIZE_MIB" 'BEGIN { printf "%.0f", m / (e - s) }'
}
seq_perf() { perf "$1" "$2" $((128 << 10)) 16 | cut -d' ' -f2; }
rand_perf() { perf "$1" "$2" 4096 32 -r | cut -d' ' -f1; }

row() { printf "%-38s %9s %9s %7s\n" "$@"; }
# line LABEL FUNCTION: ROUNDS turns on each target, alternating which goes first; medians and the ratio
line() {
  local label=$1 f=$2 i c=() t=()
  for i in $(seq "$ROUNDS"); do
    if [ $((i % 2)) = 1 ]; then c+=("$($f "$C_LUN" "$C_BS")"); t+=("$($f "$T_LUN" "$T_BS")")
    else t+=("$($f "$T_LUN" "$T_BS")"); c+=("$($f "$C_LUN" "$C_BS")"); fi
  done
  local cm tm
  cm=$(printf '%s\n' "${c[@]}" | median); tm=$(printf '%s\n' "${t[@]}" | median)
  row "$label" "$cm" "$tm" "$(ratio "$cm" "$tm")"
  echo "  corral: ${c[*]}; tgt: ${t[*]}" >>"$W/rounds"
}

echo; echo "== iscsi ($SIZE_MIB MiB image; iscsi-perf runs of ${RUNTIME} s; median of $ROUNDS rounds, targets alternating)"
row "line" "corral" "tgt" "ratio"
line "seq read 128K x16, iscsi-perf (MiB/s)" seq_perf
line "seq read, qemu-img convert (MiB/s)" convert
line "4K rand read x32, iscsi-perf (IOPS)" rand_perf
echo "(goal: ratio >= 1.0 on every line; ratio = corral / tgt)"
echo "every round, in the order of the lines:"; cat "$W/rounds"

# anything the targets complained about: corral's log and tgtd's output
for l in corral tgtd; do
  # (corral's "cluster db is short" comes before the node's boot request and says nothing about iSCSI)
  n=$(grep -iE 'error|warn|panic' "$W/$l.log" | grep -vc 'cluster db is short' || true)
  [ "$n" = 0 ] || { echo "$l: $n error/warning lines, first ones:"; grep -iE 'error|warn|panic' "$W/$l.log" | grep -v 'cluster db is short' | head -3 | sed 's/^/  /'; }
done
