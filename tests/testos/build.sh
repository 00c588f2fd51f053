#!/usr/bin/env bash
# Builds the tiny test OS that netbooting VMs run: Debian's kernel and a busybox initramfs whose /init loads
# the NIC driver, prints one marker line on the serial console
#   CORRAL-MARKER mac=<the NIC's MAC> cmdline=<the kernel command line>
# and powers off (unless corral.testos.stay=1 is on the command line).
#
#   tests/testos/build.sh OUTDIR     # writes OUTDIR/vmlinuz and OUTDIR/initrd.img
set -euo pipefail
out=${1:?usage: build.sh OUTDIR}
mkdir -p "$out"
kver=$(ls /lib/modules | sort -V | tail -n 1)
kernel=/boot/vmlinuz-$kver
[ -r "$kernel" ] || { echo "no kernel at $kernel (install linux-image-amd64)" >&2; exit 1; }
busybox=$(command -v busybox) || { echo "busybox missing (install busybox-static)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,mnt,lib/modules/"$kver"}
cp "$busybox" "$root/bin/busybox"
for applet in sh mount umount cat echo ls sleep modprobe insmod poweroff reboot ip udhcpc mkdir basename \
              grep sed tr head dd sync wget timeout mdev hexdump date uname ifconfig route; do
  ln -sf busybox "$root/bin/$applet"
done

# NIC drivers for QEMU's virtio-net and e1000(e), and nbd for the disk issue, with what they depend on.
mods="virtio virtio_ring virtio_pci virtio_pci_modern_dev virtio_pci_legacy_dev virtio_net net_failover failover e1000 e1000e nbd"
for m in $mods; do
  f=$(find /lib/modules/"$kver"/kernel -name "$m.ko*" | head -n 1)
  [ -n "$f" ] || continue
  rel=${f#/lib/modules/$kver/}
  mkdir -p "$root/lib/modules/$kver/$(dirname "$rel")"
  cp "$f" "$root/lib/modules/$kver/$rel"
done
cp /lib/modules/"$kver"/modules.builtin* "$root/lib/modules/$kver/" 2>/dev/null || true
cp /lib/modules/"$kver"/modules.order "$root/lib/modules/$kver/" 2>/dev/null || true
depmod -b "$root" "$kver"

cat > "$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1="*) echo "${w#*=}";; esac; done; }
# Load drivers for the PCI devices present (the NIC), by alias and, for busybox builds whose modprobe does
# not read modules.alias, by name.
for a in $(cat /sys/bus/pci/devices/*/modalias); do modprobe -q "$a" 2>/dev/null; done
for m in virtio_pci virtio_net e1000 e1000e; do modprobe -q "$m" 2>/dev/null; done
mac=""
i=0
while [ -z "$mac" ] && [ $i -lt 50 ]; do
  for n in /sys/class/net/*; do
    [ "$(basename "$n")" = lo ] && continue
    mac=$(cat "$n/address"); dev=$(basename "$n"); break
  done
  [ -z "$mac" ] && sleep 0.1
  i=$((i + 1))
done
echo "CORRAL-MARKER mac=$mac cmdline=$(cat /proc/cmdline)"
if [ "$(arg corral.testos.net)" = 1 ] && [ -n "$dev" ]; then
  ip link set "$dev" up
  udhcpc -i "$dev" -n -q -t 5 -s /bin/true >/dev/null 2>&1
  echo "CORRAL-NET dev=$dev"
fi
if [ "$(arg corral.testos.stay)" = 1 ]; then
  exec sh
fi
sync
poweroff -f
INIT
chmod +x "$root/init"

(cd "$root" && find . | cpio -o -H newc --quiet) | gzip -1 > "$out/initrd.img.tmp"
mv "$out/initrd.img.tmp" "$out/initrd.img"
cp "$kernel" "$out/vmlinuz"
echo "test OS: $out/vmlinuz ($kver), $out/initrd.img ($(stat -c %s "$out/initrd.img") bytes)"
