#!/usr/bin/env bash
# corral beside the tools people use today, in one run, with ratios.
#
#   sudo bench/run.sh [http|tftp|dhcp|all]      (default: all; about 6 minutes)
#
# http  64 MiB initrd: MiB/s at 1 connection (curl, median of 3) and 64 connections (wrk, 10 s), corral vs
#       nginx (sendfile on); per-node script requests/s (corral's /boot/<mac>, rendered per request) vs nginx
#       serving a small static file (wrk -c64, 10 s). ratio = corral / nginx; goal >= 1.0.
# tftp  undionly.kpxe and ipxe.efi, blksize 512/1468/8192, 1 client (median of 5 downloads) and 100 clients
#       at once (curl); total seconds, corral vs tftpd-hpa and dnsmasq's TFTP. ratio = best anchor time /
#       corral time (> 1 means corral is faster); goal >= 1.0.
# dhcp  perfdhcp (Kea's) as a relay in a namespace, 10 s at a target of 20,000 DORA/s over 50,000 clients:
#       achieved DORA/s and delays, corral vs Kea (memfile, persisted) and dnsmasq (lease file, --no-ping),
#       all persisting leases. ratio = corral rate / Kea rate; goal >= 2.0 with delays no worse.
#
# The machine has 2 cores: client and server share them, so absolute figures are low and noisy; the ratios
# are what to read. Everything runs on loopback or in namespaces this script creates; all it starts is
# stopped by PID when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
[ "$(id -u)" = 0 ] || { echo "run as root (namespaces, ports 67/69/80)" >&2; exit 1; }

bash tests/deps.sh bench   # the anchors too, from tests/deps.txt, in one apt transaction

cargo build --release --quiet
# CORRAL_BIN=path runs another build (e.g. an older commit's, for a before/after comparison).
CORRAL="${CORRAL_BIN:-${CARGO_TARGET_DIR:-target}/release/corral}"
W=$(mktemp -d /tmp/corral-bench.XXXX)
chmod 755 "$W"   # nginx and tftpd workers run as other users and must reach the files
PIDS=()
NETNS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  for n in "${NETNS[@]}"; do ip netns del "$n" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT
bg() { "$@" & PIDS+=($!); }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
wait_tcp() { for _ in $(seq 100); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done; echo "no answer from $1" >&2; return 1; }
echo "machine: $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB; clients and servers share the cores"

scripts=$(pwd)/boot-scripts

bench_http() {
  echo; echo "== http"
  mkdir -p "$W/http/images/testos" "$W/http/nginx"
  head -c $((64 << 20)) /dev/urandom > "$W/http/images/testos/initrd.img"
  echo kernel > "$W/http/images/testos/vmlinuz"
  cp images/testos/image.toml "$W/http/images/testos/"
  head -c 500 /dev/urandom | base64 > "$W/http/images/small.txt"
  cat > "$W/http/nginx/nginx.conf" <<EOF
worker_processes $(nproc);
pid $W/http/nginx/nginx.pid;
error_log $W/http/nginx/error.log;
daemon off;
events { worker_connections 4096; }
http { access_log off; sendfile on; tcp_nopush on; keepalive_requests 1000000;
  server { listen 127.0.0.1:18081; root $W/http/images; } }
EOF
  cat > "$W/http/corral.toml" <<EOF
[server]
address = "127.0.0.1"
state_dir = "$W/http/state"
images_dir = "$W/http/images"
scripts_dir = "$scripts"
[http]
listen = "127.0.0.1:18080"
# wrk's 64 connections come from one address, as 64 nodes would from 64.
max_connections_per_peer = 256
[tftp]
enabled = false
[boot]
default_image = "testos"
# The node 52:54:00:00:00:01 is at 127.0.0.1 (as corral's DHCP would know it): its requests are its own.
[[dhcp.reservation]]
mac = "52:54:00:00:00:01"
address = "127.0.0.1"
EOF
  bg nginx -c "$W/http/nginx/nginx.conf"
  bg "$CORRAL" serve --config "$W/http/corral.toml" 2>"$W/http/corral.log"
  wait_tcp http://127.0.0.1:18081/small.txt; wait_tcp http://127.0.0.1:18080/healthz
  local n_url=http://127.0.0.1:18081/testos/initrd.img c_url=http://127.0.0.1:18080/images/testos/initrd.img
  curl -s -o /dev/null "$n_url"; curl -s -o /dev/null "$c_url"   # warm caches
  one() { for _ in 1 2 3; do curl -s -o /dev/null -w '%{speed_download}\n' "$1"; done | median | awk '{printf "%.0f", $1 / 1048576}'; }
  many() { wrk -t2 -c64 -d10s "$1" | awk '/Transfer\/sec/ { v = $2; u = substr(v, length(v) - 1); n = v + 0; if (u == "GB") n *= 1024; if (u == "KB") n /= 1024; printf "%.0f", n }'; }
  rps() { wrk -t2 -c64 -d10s "$1" | awk '/Requests\/sec/ { printf "%.0f", $2 }'; }
  local a b
  printf "%-44s %10s %10s %7s\n" "line" "corral" "nginx" "ratio"
  a=$(one "$c_url"); b=$(one "$n_url"); printf "%-44s %10s %10s %7s\n" "64 MiB initrd, 1 connection (MiB/s)" "$a" "$b" "$(ratio "$a" "$b")"
  a=$(many "$c_url"); b=$(many "$n_url"); printf "%-44s %10s %10s %7s\n" "64 MiB initrd, 64 connections (MiB/s)" "$a" "$b" "$(ratio "$a" "$b")"
  a=$(rps "http://127.0.0.1:18080/boot/52-54-00-00-00-01?buildarch=x86_64"); b=$(rps http://127.0.0.1:18081/small.txt)
  printf "%-44s %10s %10s %7s\n" "per-node script vs static file (req/s)" "$a" "$b" "$(ratio "$a" "$b")"
}

bench_tftp() {
  echo; echo "== tftp"
  local root=$W/tftp/root
  mkdir -p "$root"
  cp -L /usr/lib/ipxe/undionly.kpxe /usr/lib/ipxe/ipxe.efi "$root/"
  cat > "$W/tftp/corral.toml" <<EOF
[server]
address = "127.0.0.1"
state_dir = "$W/tftp/state"
scripts_dir = "$scripts"
[http]
listen = "127.0.0.1:18090"
[tftp]
listen = "127.0.0.1:16969"
root = "$root"
# 100 clients on one loopback address stand for 100 nodes with an address each: the per-address cap
# (8 by default) would refuse most of them and time refusals.
max_sessions_per_peer = 128
EOF
  bg "$CORRAL" serve --config "$W/tftp/corral.toml" 2>"$W/tftp/corral.log"
  bg in.tftpd -L -s "$root" -a 127.0.0.1:16970
  bg dnsmasq --no-daemon --conf-file=/dev/null --port=0 --enable-tftp --tftp-root="$root" --listen-address=127.0.0.2 --bind-interfaces --tftp-max=1000 --pid-file="$W/tftp/dnsmasq.pid" 2>/dev/null
  wait_tcp http://127.0.0.1:18090/healthz; sleep 0.5
  # seconds for one download: median of 15, the three servers taking turns so that noise on this shared
  # machine falls on all of them alike; and for 100 concurrent downloads
  one_t() { curl -s -o /dev/null --tftp-blksize "$3" -w '%{time_total}\n' "tftp://$1/$2"; }
  t1() {
    local i
    for i in $(seq 15); do
      one_t 127.0.0.1:16969 "$1" "$2" >> "$W/tftp/c"; one_t 127.0.0.1:16970 "$1" "$2" >> "$W/tftp/h"; one_t 127.0.0.2:69 "$1" "$2" >> "$W/tftp/d"
    done
    c=$(median < "$W/tftp/c"); h=$(median < "$W/tftp/h"); d=$(median < "$W/tftp/d")
    rm -f "$W/tftp/c" "$W/tftp/h" "$W/tftp/d"
  }
  t100() {
    local s e pids=()
    s=$(date +%s.%N)
    for _ in $(seq 100); do curl -s -o /dev/null --max-time 60 --tftp-blksize "$3" "tftp://$1/$2" & pids+=($!); done
    local p failed=0
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || failed=$((failed + 1)); done
    e=$(date +%s.%N)
    # A refused or failed download would make a server look fast: say so.
    [ "$failed" = 0 ] || echo "  ($failed of 100 downloads from $1 failed)" >&2
    awk -v s="$s" -v e="$e" 'BEGIN { printf "%.3f", e - s }'
  }
  printf "%-36s %9s %9s %9s %7s\n" "line (seconds, lower is better)" "corral" "tftpd-hpa" "dnsmasq" "ratio"
  for f in undionly.kpxe ipxe.efi; do
    for b in 512 1468 8192; do
      for mode in 1 100; do
        local c h d best
        if [ $mode = 1 ]; then
          t1 $f $b
        else
          c=$(t100 127.0.0.1:16969 $f $b); h=$(t100 127.0.0.1:16970 $f $b); d=$(t100 127.0.0.2:69 $f $b)
        fi
        best=$(printf '%s\n%s\n' "$h" "$d" | sort -g | head -1)
        printf "%-36s %9s %9s %9s %7s\n" "$f blksize $b, $mode client(s)" "$c" "$h" "$d" "$(ratio "$best" "$c")"
      done
    done
  done
}

bench_dhcp() {
  echo; echo "== dhcp"
  local s=crlb-s-$$ c=crlb-c-$$ si=crlbs$$ ci=crlbc$$
  si=${si:0:15}; ci=${ci:0:15}
  ip netns add $s; NETNS+=($s); ip netns add $c; NETNS+=($c)
  ip link add "$si" netns $s type veth peer name "$ci" netns $c
  ip -n $s addr add 10.55.0.1/16 dev "$si"; ip -n $c addr add 10.55.0.2/16 dev "$ci"
  for n in $s $c; do ip -n $n link set lo up; done
  ip -n $s link set "$si" up; ip -n $c link set "$ci" up
  # perfdhcp exits non-zero when any packet was dropped, which is expected at saturation
  perf() { ip netns exec $c perfdhcp -4 -l 10.55.0.2 -r "$1" -R 50000 -p 10 10.55.0.1 2>&1 || true; }
  # saturation (target far above what anyone reaches) for the rate; a steady 1,000 DORA/s for the delays
  both() { perf 20000; echo "@@LAT@@"; perf 1000; }
  rate() { awk '/Rate:/ { for (i = 1; i <= NF; i++) if ($i == "Rate:") { print $(i + 1); exit } }'; }
  delays() { awk '/avg delay/ { a = $3 } /max delay/ { m = $3 } END { printf "%s/%s", a, m }'; }
  # corral
  mkdir -p "$W/dhcp/corral"
  cat > "$W/dhcp/corral/corral.toml" <<EOF
[server]
interface = "$si"
address = "10.55.0.1"
state_dir = "$W/dhcp/corral/state"
scripts_dir = "$scripts"
[dhcp]
mode = "full"
subnet = "10.55.0.0/16"
range = ["10.55.1.0", "10.55.255.254"]
lease_time = 3600
[tftp]
enabled = false
[http]
listen = "10.55.0.1:18070"
EOF
  ip netns exec $s "$CORRAL" serve --config "$W/dhcp/corral/corral.toml" 2>"$W/dhcp/corral/log" & local cp=$!; PIDS+=($cp)
  sleep 1
  local out_c; out_c=$(both); kill $cp; wait $cp 2>/dev/null || true
  # Kea, memfile persisted
  mkdir -p "$W/dhcp/kea"
  cat > "$W/dhcp/kea/kea.json" <<EOF
{ "Dhcp4": { "interfaces-config": { "interfaces": [ "$si" ] },
  "lease-database": { "type": "memfile", "persist": true, "name": "$W/dhcp/kea/leases.csv", "lfc-interval": 0 },
  "valid-lifetime": 3600, "subnet4": [ { "id": 1, "subnet": "10.55.0.0/16", "pools": [ { "pool": "10.55.1.0 - 10.55.255.254" } ] } ],
  "loggers": [ { "name": "kea-dhcp4", "output_options": [ { "output": "$W/dhcp/kea/log" } ], "severity": "WARN" } ] } }
EOF
  KEA_PIDFILE_DIR=$W/dhcp/kea KEA_LOCKFILE_DIR=$W/dhcp/kea ip netns exec $s kea-dhcp4 -c "$W/dhcp/kea/kea.json" >/dev/null 2>&1 & local kp=$!; PIDS+=($kp)
  sleep 2
  local out_k; out_k=$(both); kill $kp; wait $kp 2>/dev/null || true
  # dnsmasq, lease file
  ip netns exec $s dnsmasq --no-daemon --conf-file=/dev/null --port=0 --interface="$si" --bind-interfaces --no-ping \
    --dhcp-range=10.55.1.0,10.55.255.254,255.255.0.0,1h --dhcp-lease-max=100000 --dhcp-leasefile="$W/dhcp/dnsmasq.leases" \
    --pid-file="$W/dhcp/dnsmasq.pid" >/dev/null 2>&1 & local dp=$!; PIDS+=($dp)
  sleep 1
  local out_d; out_d=$(both); kill $dp; wait $dp 2>/dev/null || true
  sat() { sed '/@@LAT@@/,$d'; }
  lat() { sed '1,/@@LAT@@/d'; }
  local rc rk rd
  rc=$(echo "$out_c" | sat | rate); rk=$(echo "$out_k" | sat | rate); rd=$(echo "$out_d" | sat | rate)
  printf "%-30s %12s %12s %12s %9s\n" "line" "corral" "Kea" "dnsmasq" "ratio/Kea"
  printf "%-30s %12s %12s %12s %9s\n" "DORA/s at saturation" "${rc:-0}" "${rk:-0}" "${rd:-0}" "$(ratio "${rc:-0}" "${rk:-0}")"
  for x in DISCOVER-OFFER REQUEST-ACK; do
    printf "%-30s %12s %12s %12s\n" "${x%%-*} avg/max ms at 1,000/s" "$(echo "$out_c" | lat | grep -A12 "for: $x" | delays)" \
      "$(echo "$out_k" | lat | grep -A12 "for: $x" | delays)" "$(echo "$out_d" | lat | grep -A12 "for: $x" | delays)"
  done
  for x in DISCOVER-OFFER REQUEST-ACK; do
    printf "%-30s %12s %12s %12s\n" "${x%%-*} drops % at 1,000/s" "$(echo "$out_c" | lat | grep -A4 "for: $x" | awk '/drops ratio/ {print $3}')" \
      "$(echo "$out_k" | lat | grep -A4 "for: $x" | awk '/drops ratio/ {print $3}')" "$(echo "$out_d" | lat | grep -A4 "for: $x" | awk '/drops ratio/ {print $3}')"
  done
  echo "(goal: corral >= 2x Kea's rate with delays no worse; perfdhcp reports avg and max delay, not percentiles)"
}

case "$what" in
  http) bench_http ;;
  tftp) bench_tftp ;;
  dhcp) bench_dhcp ;;
  all) bench_http; bench_tftp; bench_dhcp ;;
  *) echo "usage: bench/run.sh [http|tftp|dhcp|all]" >&2; exit 2 ;;
esac
