#!/usr/bin/env bash
# Latency of the script and DHCP paths under a busy farm's load (issue 16), before and after a change:
#
#   sudo bench/paths.sh [BEFORE_BIN]     (about 2 minutes per build measured)
#
# corral runs in one namespace with a policy of 100 clusters x 50 slots and 5,000 listed nodes; the driver
# (benches/paths.rs) runs in another, across a veth pair. The driver first boots the 5,000 nodes (one
# script each, which carries the node's boot token), then for 30 s at once:
#   - 5,000 agents heartbeat every 5 s (1,000 POSTs/s),
#   - 50 new nodes a second arrive (each a discovery and a re-plan of the whole 5,000-node fleet),
#   - 200 scripts/s are fetched again by assigned nodes (the script path),
#   - 100 DHCP clients/s do DISCOVER->OFFER->REQUEST->ACK through a relay (the DHCP path, leases fsynced).
# It prints p50/p99/max per path. With BEFORE_BIN (a corral binary built from an earlier commit) the same
# run is done with it first, and the ratios before/after are printed (> 1: the change made it faster).
#
# Both programs share the machine's 2 cores, so absolute figures are low; compare runs on one machine.
# Everything runs in namespaces this script creates; all it starts is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (namespaces)" >&2; exit 1; }
before=${1:-}
NODES=${NODES:-5000} SECS=${SECS:-30}

cargo build --release --quiet --bin corral
# DRIVER=path skips building the driver (it does not change with corral's code).
driver=${DRIVER:-$(cargo bench --no-run --bench paths --message-format=json 2>/dev/null |
  grep '"kind":\["bench"\]' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)}
[ -x "$driver" ] || { echo "cannot build the driver (cargo bench --no-run --bench paths)" >&2; exit 1; }
after="${CARGO_TARGET_DIR:-target}/release/corral"

W=$(mktemp -d /tmp/corral-paths.XXXX)
s=crlp-s-$$ c=crlp-c-$$ si=crlps$$ ci=crlpc$$
si=${si:0:15}; ci=${ci:0:15}
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  ip netns del $s 2>/dev/null || true; ip netns del $c 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
ip netns add $s; ip netns add $c
ip link add "$si" netns $s type veth peer name "$ci" netns $c
ip -n $s addr add 10.55.0.1/16 dev "$si"; ip -n $c addr add 10.55.0.2/16 dev "$ci"
for n in $s $c; do ip -n $n link set lo up; done
ip -n $s link set "$si" up; ip -n $c link set "$ci" up

mkdir -p "$W/images/img"
echo kernel > "$W/images/img/vmlinuz"; echo initrd > "$W/images/img/initrd.img"
printf 'arch = "x86_64"\nkernel = "vmlinuz"\ninitrds = ["initrd.img"]\ncmdline = "quiet {{agent}}"\n' > "$W/images/img/image.toml"
{
  printf '[settings]\ncooldown = 0\nheartbeat_interval = "5s"\n'
  for k in $(seq 0 99); do
    printf '[[cluster]]\nname = "c%d"\npriority = %d\nmin = 0\nmax = 50\ndefault = 50\nimages = ["img"]\nidentity = { hostname = "c%d-{n}" }\n' \
      "$k" $((k % 10)) "$k"
  done
  for i in $(seq 0 $((NODES - 1))); do
    printf '[[node]]\nmac = "52:54:01:%02x:%02x:%02x"\n' $((i >> 16 & 255)) $((i >> 8 & 255)) $((i & 255))
  done
} > "$W/policy.toml"

run() { # $1 = corral binary; prints the driver's lines
  rm -rf "$W/state"
  cat > "$W/corral.toml" <<EOF
[server]
interface = "$si"
address = "10.55.0.1"
state_dir = "$W/state"
images_dir = "$W/images"
scripts_dir = "$(pwd)/boot-scripts"
policy = "$W/policy.toml"
[dhcp]
mode = "full"
subnet = "10.55.0.0/16"
range = ["10.55.1.0", "10.55.255.254"]
lease_time = 3600
[tftp]
enabled = false
[nbd]
enabled = false
[http]
listen = "10.55.0.1:18090"
max_connections = 4096
max_connections_per_peer = 4096
[boot]
trust_request_address = true
[discovery]
rate_per_peer = 1000000
max_unassigned = 1000000
EOF
  ip netns exec $s "$1" serve --config "$W/corral.toml" 2>"$W/log" & local cp=$!; PIDS+=($cp)
  for _ in $(seq 300); do ip netns exec $c curl -s -o /dev/null http://10.55.0.1:18090/healthz && break; sleep 0.1; done
  ip netns exec $c "$driver" --http 10.55.0.1:18090 --relay 10.55.0.2 --server 10.55.0.1 \
    --nodes "$NODES" --secs "$SECS" --replans 50 --scripts 200 --dhcp 100 --beat-secs 5
  # corral's own count of what DHCP received and answered, and anything it refused
  ip netns exec $c curl -s http://10.55.0.1:18090/metrics | grep -E '^corral_(dhcp_(received|replies|malformed|ignored|store_errors)|store_(commits|commits_synced|writes)_total)' | tr '\n' ' '; echo
  grep -iE ' (WARN|ERROR) ' "$W/log" | tail -3 || true
  kill $cp; wait $cp 2>/dev/null || true
}
p() { awk -v k="$2" '{ for (i = 1; i <= NF; i++) if ($i ~ "^" k "=") { sub(k "=", "", $i); print $i } }' <<<"$1"; }

echo "machine: $(nproc) cores; driver and corral share them"
if [ -n "$before" ]; then
  echo "== before: $before"; out_b=$(run "$before"); echo "$out_b"
fi
echo "== after: $after"; out_a=$(run "$after"); echo "$out_a"
if [ -n "$before" ]; then
  echo; printf "%-22s %10s %10s %7s %10s %10s %7s\n" path p50_before p50_after ratio p99_before p99_after ratio
  for path in script dhcp_discover_offer dhcp_request_ack heartbeat arrival_script; do
    lb=$(grep "^$path " <<<"$out_b" || true); la=$(grep "^$path " <<<"$out_a" || true)
    b50=$(p "$lb" p50_ms); a50=$(p "$la" p50_ms); b99=$(p "$lb" p99_ms); a99=$(p "$la" p99_ms)
    printf "%-22s %10s %10s %7s %10s %10s %7s\n" "$path" "$b50" "$a50" \
      "$(awk -v a="$b50" -v b="$a50" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')" "$b99" "$a99" \
      "$(awk -v a="$b99" -v b="$a99" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')"
  done
  echo "(ratio = before / after: above 1 the change made the path faster)"
fi
