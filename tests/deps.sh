#!/usr/bin/env bash
# Installs the Debian packages that corral's tests and lab use, when missing (needs root and apt-get).
# Sourced by tests/run.sh and tests/lab.sh.
set -euo pipefail
PKGS=(qemu-system-x86 ovmf ipxe linux-image-amd64 busybox-static dnsmasq curl atftp tftp-hpa
      isc-dhcp-client iproute2 kmod cpio gzip python3 nbd-client e2fsprogs
      libnbd-bin qemu-utils openipmi ipmitool python3-venv openssl libiscsi-bin qemu-block-extra
      open-iscsi syslinux syslinux-common mtools dosfstools systemd-boot-efi binutils)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing packages (${missing[*]}); run as root to install them" >&2
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
