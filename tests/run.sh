#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what the tests need (as root, with apt-get),
# builds the tiny test OS, then runs every test (unit, property, loopback integration against real clients,
# namespace DHCP tests, and QEMU VMs netbooting from corral end to end).
#
#   sudo tests/run.sh            # everything
#   sudo tests/run.sh http_curl  # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use: real peers (curl, atftp, tftp-hpa, busybox udhcpc, dhclient, dnsmasq),
# the VM lab (QEMU, OVMF, iPXE, Debian's kernel, busybox for the test OS), and tools.
PKGS=(qemu-system-x86 ovmf ipxe linux-image-amd64 busybox-static dnsmasq curl atftp tftp-hpa
      isc-dhcp-client iproute2 kmod cpio gzip)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "tests/run.sh: missing packages (${missing[*]}); run as root to install them" >&2
    exit 1
  fi
  echo "== installing: ${missing[*]}"
  # Packages such as dnsmasq would start a service on the host's interfaces: keep services from starting.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "== building the test OS"
bash tests/testos/build.sh images/testos

echo "== cargo test"
cargo test "$@"
