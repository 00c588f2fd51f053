#!/usr/bin/env bash
# IPMI peer for corral's power-driver tests: OpenIPMI's BMC simulator (ipmi_sim, Debian package openipmi),
# speaking IPMI 1.5/2.0 (RMCP+) on 127.0.0.1 only. See tests/peers/README.md for how it behaves.
#   ipmi.sh install                idempotent; apt-get installs openipmi and ipmitool when missing
#   ipmi.sh start PORT DIR         PID in DIR/ipmi.pid, log in DIR/ipmi.log; prints "127.0.0.1 PORT"
#   ipmi.sh stop DIR
# Credentials admin/secret (admin privilege). Fresh state on every start: chassis off, boot device "default".
# The chassis is ipmi_sim's external chassis-control program (DIR/chassis.sh); it keeps the "hardware" in
# files the tests read back: DIR/chassis.power (0/1), DIR/chassis.boot (none/pxe/default/cdrom/bios) and
# DIR/chassis.log (every get/set ipmi_sim asked for, one a line).
set -euo pipefail

die() { echo "ipmi.sh: $*" >&2; exit 1; }

missing() {
  for p in openipmi ipmitool; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}

install() {
  [ -z "$(missing)" ] && return 0
  [ "$(id -u)" = 0 ] || die "missing packages ($(missing | xargs)); run tests/deps.sh as root"
  # Tests start simulators in parallel: one installs, the others wait (the lock dies with the subshell).
  (
    flock 9
    pkgs=$(missing)
    [ -z "$pkgs" ] && exit 0
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
  ) 9>"${TMPDIR:-/tmp}/corral-peers-apt.lock"
}

start() {
  local port=${1:?usage: start PORT DIR} dir=${2:?usage: start PORT DIR}
  install
  mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
  [ -f "$dir/ipmi.pid" ] && kill -0 "$(cat "$dir/ipmi.pid")" 2>/dev/null && die "already running in $dir"
  # ipmi_sim keeps users, SEL and SDRs under its state dir and prefers them over the config: start fresh.
  rm -rf "$dir/ipmi-state" "$dir/chassis.power" "$dir/chassis.boot" "$dir/chassis.log"
  mkdir -p "$dir/ipmi-state"

  # The chassis-control program (lan.conf `chassis_control`, see upstream lanserv/ipmi_sim_chassiscontrol):
  #   chassis.sh <mc> get power|boot ...      prints "power:1", "boot:pxe", ...
  #   chassis.sh <mc> set power 1 boot pxe ...
  # ipmi_sim calls it for Get Chassis Status, Chassis Control (power up/down/cycle/reset/soft-off) and the
  # boot-flags parameters of Set/Get System Boot Options.
  cat > "$dir/chassis.sh" <<'SH'
#!/bin/sh
dir=$(dirname "$0")
echo "$*" >> "$dir/chassis.log"
shift                       # the MC address
op=$1; shift
case $op in
  get)
    for p in "$@"; do
      case $p in
        power) echo "power:$(cat "$dir/chassis.power" 2>/dev/null || echo 0)" ;;
        boot)  echo "boot:$(cat "$dir/chassis.boot" 2>/dev/null || echo default)" ;;
        *) echo "cannot get $p"; exit 1 ;;
      esac
    done ;;
  set)
    while [ $# -gt 0 ]; do
      p=$1; v=${2-}; shift 2 || { echo "no value for $p"; exit 1; }
      case $p in
        power) echo "$v" > "$dir/chassis.power" ;;
        boot) echo "$v" > "$dir/chassis.boot" ;;
        # A soft-off request (ACPI button): the emulated OS obeys at once.
        shutdown) [ "$v" = 1 ] && echo 0 > "$dir/chassis.power" ;;
        reset) ;;
        identify) shift ;;   # "identify <interval> <force>"
        *) echo "cannot set $p"; exit 1 ;;
      esac
    done ;;
  *) echo "unknown operation $op"; exit 1 ;;
esac
SH
  chmod 755 "$dir/chassis.sh"
  echo 0 > "$dir/chassis.power"

  cat > "$dir/ipmi.conf" <<CONF
name "corral-peer"
set_working_mc 0x20
  startlan 1
    addr 127.0.0.1 $port
    priv_limit admin
    allowed_auths_callback md5
    allowed_auths_user md5
    allowed_auths_operator md5
    allowed_auths_admin md5
    guid a123456789abcdefa123456789abcdef
  endlan
  chassis_control "$dir/chassis.sh 0x20"
  #    num enabled name     password  max-priv max-sessions
  user 2   true    "admin"  "secret"  admin    10           md5
CONF
  cat > "$dir/ipmi.emu" <<'EMU'
mc_setbmc 0x20
mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02
mc_enable 0x20
EMU
  ipmi_sim -n -c "$dir/ipmi.conf" -f "$dir/ipmi.emu" -s "$dir/ipmi-state" </dev/null >"$dir/ipmi.log" 2>&1 &
  echo $! > "$dir/ipmi.pid"
  # Ready once an authenticated RMCP+ session works (Get Device ID does not touch the chassis).
  for _ in $(seq 100); do
    IPMI_PASSWORD=secret ipmitool -I lanplus -H 127.0.0.1 -p "$port" -U admin -E -N 1 -R 1 mc info \
      >/dev/null 2>&1 && { echo "127.0.0.1 $port"; return 0; }
    kill -0 "$(cat "$dir/ipmi.pid")" 2>/dev/null || { cat "$dir/ipmi.log" >&2; die "ipmi_sim exited"; }
    sleep 0.1
  done
  stop "$dir"; die "ipmi_sim did not answer on 127.0.0.1:$port"
}

stop() {
  local dir=${1:?usage: stop DIR} pid
  [ -f "$dir/ipmi.pid" ] || return 0
  pid=$(cat "$dir/ipmi.pid")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$dir/ipmi.pid"
}

cmd=${1:-}; shift || true
case "$cmd" in
  install) install ;;
  start) start "$@" ;;
  stop) stop "$@" ;;
  *) die "usage: $0 install | start PORT DIR | stop DIR" ;;
esac
