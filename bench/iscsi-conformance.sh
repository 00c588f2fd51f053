#!/usr/bin/env bash
# libiscsi's conformance suite against tgt and corral, side by side (issue 7).
#
# Usage (root; needs tgt and libiscsi-bin, and a built corral):
#   sudo bench/iscsi-conformance.sh [--corral PATH] [--keep] [-- extra iscsi-test-cu options]
#
#   --corral PATH  the corral binary (default: $CARGO_TARGET_DIR/debug/corral, else target/debug/corral)
#   --keep         keep the work directory (logs, raw outputs) instead of removing it
#   --tests SPEC   iscsi-test-cu test selection (default: ALL, the 230 tests of the ALL family)
#
# One run serves the same fresh 1 GiB raw image (a new sparse file for each target) through
#   (a) tgt: its own tgtd on 127.0.0.1:<free port>, its own control port (-C), the disk as LUN 1
#       (tgt's LUN 0 is its controller), and
#   (b) corral: `corral serve` with a one-cluster policy whose slot disk is the image; a boot request
#       from 127.0.0.1 puts that address in slot db/0, whose target is iqn.2026-11.io.corral:db.0, LUN 0,
# then runs `iscsi-test-cu -d -t ALL <url>` against each, the same way, and prints a per-test table
# (test, tgt, corral: PASS / FAIL / SKIP), both CUnit summaries, and the tests tgt passes but corral
# fails. The exit status is 1 when there are any such tests.
#
# The invocation: the issue's "222 of 230 tests, 81 skipped" for tgt is `iscsi-test-cu -d -t ALL`:
# the ALL family holds 230 tests (the default selection runs every family, 615 tests); without -d
# (--dataloss) the writing tests skip and tgt passes 209 of them. CUnit counts a skipped test as passed
# (libiscsi reports it with CU_PASS("[SKIPPED] ...")), and 81 is the number of "[SKIPPED]" lines in the
# output (some tests print two); as tests, tgt's 222 are 160 passes and 62 skips. This script
# counts a test SKIP when it printed [SKIPPED] before its result, PASS when it passed otherwise.
#
# tgtd takes control ports up to 32767 (-C); one in 20000..31999 that no tgtd uses is picked.
# Everything listens on loopback only; the processes started here are stopped by their PIDs.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
corral_bin=${CARGO_TARGET_DIR:-$here/target}/debug/corral
keep=0
tests=ALL
while [ $# -gt 0 ]; do
    case $1 in
    --corral) corral_bin=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --tests) tests=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
extra=("$@")

[ "$(id -u)" = 0 ] || { echo "run as root (tgtd needs it)" >&2; exit 2; }
bash "$here/tests/deps.sh" bench   # tgt, libiscsi-bin, ... from tests/deps.txt
[ -x "$corral_bin" ] || { echo "no corral binary at $corral_bin (cargo build, or --corral PATH)" >&2; exit 2; }

work=$(mktemp -d /tmp/iscsi-conformance.XXXXXX)
tgt_pid='' corral_pid='' ctl=''
cleanup() {
    if [ -n "$tgt_pid" ]; then
        # tgtd ignores SIGTERM: delete its target, then the system, then wait; SIGKILL if it lingers.
        tgtadm -C "$ctl" --lld iscsi --mode target --op delete --force --tid 1 >/dev/null 2>&1 || true
        tgtadm -C "$ctl" --mode system --op delete >/dev/null 2>&1 || true
        for _ in $(seq 30); do kill -0 "$tgt_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$tgt_pid" 2>/dev/null || true
        wait "$tgt_pid" 2>/dev/null || true
        rm -f "/var/run/tgtd/socket.$ctl" "/var/run/tgtd/socket.$ctl.lock"
    fi
    if [ -n "$corral_pid" ]; then
        kill "$corral_pid" 2>/dev/null || true
        wait "$corral_pid" 2>/dev/null || true
    fi
    if [ "$keep" = 1 ]; then echo "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # port, what
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "$2 did not listen on 127.0.0.1:$1" >&2
    return 1
}
fresh_image() { rm -f "$1"; truncate -s 1G "$1"; }

# iscsi-test-cu (CUnit "basic" output) -> "Suite.Test RESULT" lines. A test is SKIP when it printed
# [SKIPPED] before CUnit's "passed"; text after the result belongs to its teardown.
parse() {
    awk '
    /^Suite: / { suite = substr($0, 8); next }
    /^  Test: / {
        t = $0; sub(/^  Test: /, "", t); sub(/ \.\.\..*$/, "", t); name = suite "." t; skip = 0; done = 0
        if ($0 ~ /^  Test: .* \.\.\.(passed|FAILED)/) { print name, ($0 ~ /\.\.\.FAILED/ ? "FAIL" : "PASS"); done = 1 }
        else if ($0 ~ /\[SKIPPED\]/) skip = 1
        next
    }
    !done && /^(passed|FAILED)/ { print name, ($0 ~ /^FAILED/ ? "FAIL" : (skip ? "SKIP" : "PASS")); done = 1; next }
    !done && /\[SKIPPED\]/ { skip = 1 }
    ' "$1"
}

run_suite() { # name, url
    local start=$SECONDS
    iscsi-test-cu -d -t "$tests" "${extra[@]}" "$2" >"$work/$1.out" 2>&1 || true
    echo "$1: iscsi-test-cu finished in $((SECONDS - start)) s" >&2
    parse "$work/$1.out" >"$work/$1.res"
}

# (a) tgt
mkdir -p "$work/tgt"
fresh_image "$work/tgt/disk.img"
tgt_port=$(free_port)
ctl=$(( (RANDOM % 12000) + 20000 ))
while [ -e "/var/run/tgtd/socket.$ctl" ]; do ctl=$(( (RANDOM % 12000) + 20000 )); done
tgtd -f -C "$ctl" --iscsi "portal=127.0.0.1:$tgt_port" >"$work/tgt/tgtd.log" 2>&1 &
tgt_pid=$!
wait_port "$tgt_port" tgtd
tgt_iqn=iqn.2026-11.test.conformance:tgt
tgtadm -C "$ctl" --lld iscsi --mode target --op new --tid 1 --targetname "$tgt_iqn"
tgtadm -C "$ctl" --lld iscsi --mode logicalunit --op new --tid 1 --lun 1 --backing-store "$work/tgt/disk.img"
tgtadm -C "$ctl" --lld iscsi --mode target --op bind --tid 1 --initiator-address 127.0.0.1
run_suite tgt "iscsi://127.0.0.1:$tgt_port/$tgt_iqn/1"

# (b) corral
c=$work/corral
mkdir -p "$c/images/plain" "$c/disks"
printf 'kernel = "vmlinuz"\ninitrds = ["initrd.img"]\ncmdline = "disk={{disk}}"\n' >"$c/images/plain/image.toml"
echo k >"$c/images/plain/vmlinuz"
echo i >"$c/images/plain/initrd.img"
fresh_image "$c/disks/base.img"
http=$(free_port) nbd=$(free_port) iscsi=$(free_port)
cat >"$c/corral.toml" <<EOF
[server]
address = "127.0.0.1"
state_dir = "$c/state"
images_dir = "$c/images"
scripts_dir = "$here/boot-scripts"
policy = "$c/policy.toml"
disks_dir = "$c/disks"
[dhcp]
mode = "off"
[http]
listen = "127.0.0.1:$http"
[tftp]
enabled = false
[nbd]
listen = "127.0.0.1:$nbd"
[iscsi]
listen = "127.0.0.1:$iscsi"
# The node 52:54:00:00:00:01 is at 127.0.0.1 (as corral's DHCP would know it): its requests are its own.
[[dhcp.reservation]]
mac = "52:54:00:00:00:01"
address = "127.0.0.1"
EOF
cat >"$c/policy.toml" <<EOF
[settings]
cooldown = 0

[[cluster]]
name = "db"
min = 0
max = 1
default = 1
images = ["plain"]
disk = "base"
EOF
"$corral_bin" serve --config "$c/corral.toml" >"$c/serve.log" 2>&1 &
corral_pid=$!
wait_port "$iscsi" corral
# The node at 127.0.0.1 asks for its script: it fills db/0 and may log in to that slot's target.
curl -sf "http://127.0.0.1:$http/boot/52-54-00-00-00-01?buildarch=x86_64" >/dev/null
run_suite corral "iscsi://127.0.0.1:$iscsi/iqn.2026-11.io.corral:db.0/0"

# The table, the summaries, the regressions.
echo
printf '%-45s %-6s %-6s\n' TEST tgt corral
join -a1 -a2 -e MISSING -o 0,1.2,2.2 <(sort "$work/tgt.res") <(sort "$work/corral.res") |
    awk '{ printf "%-45s %-6s %-6s%s\n", $1, $2, $3, ($2 == "PASS" && $3 != "PASS" ? "   <-" : "") }' |
    tee "$work/table"
for n in tgt corral; do
    echo
    echo "== $n: CUnit summary (CUnit counts skips as passes; [SKIPPED] lines: $(grep -c '\[SKIPPED\]' "$work/$n.out" || true))"
    sed -n '/^Run Summary/,/^Elapsed/p' "$work/$n.out"
    awk '{ c[$2]++ } END { printf "as tests: %d PASS, %d FAIL, %d SKIP\n", c["PASS"], c["FAIL"], c["SKIP"] }' "$work/$n.res"
done
echo
worse=$(awk '$2 == "PASS" && $3 == "FAIL" { print $1 }' "$work/table")
lost=$(awk '$2 == "PASS" && $3 == "SKIP" { print $1 }' "$work/table")
if [ -n "$worse" ]; then
    echo "tgt passes, corral FAILS:"
    echo "$worse" | sed 's/^/  /'
else
    echo "no test that tgt passes fails against corral"
fi
if [ -n "$lost" ]; then
    echo "tgt passes, corral skips (not implemented in corral): $(echo "$lost" | wc -l)"
fi
[ -z "$worse" ]
