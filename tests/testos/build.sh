#!/usr/bin/env bash
# Builds the tiny test OS that netbooting VMs run: Debian's kernel and a busybox initramfs whose /init loads
# the NIC driver, prints one marker line on the serial console
#   CORRAL-MARKER mac=<the NIC's MAC> cmdline=<the kernel command line>
# and powers off (unless corral.testos.stay=1 is on the command line).
#
# With corral.disk=nbd:HOST:PORT:EXPORT on the command line it also takes an address by DHCP, attaches the
# NBD export with the kernel's NBD client, mounts it (ext4) and reports on lines starting "CORRAL-DISK ":
#   attached export=EXPORT | error=<what failed>
#   base=<mnt/base.txt or none>   found=<mnt/node.txt or none>
#   wrote=VALUE                   (only with corral.testos.write=VALUE, which it writes to node.txt first)
#   detached
# so that tests can see what a node's disk held and that what it wrote persists.
#
# With corral.disk=ibft (a disk image's own boot loader passes it, see mkboot.sh) the machine was sanbooted
# by iPXE: it reads the iBFT, logs in to the same iSCSI target with the kernel's initiator (open-iscsi's
# iscsistart), reports the marker in sector 1024 of the disk, writes its MAC there if there was none
# (CORRAL-DISK ibft/attached/found/wrote/detached lines) and powers off.
#
# With corral.api=URL and corral.token=T on the command line (corral's {{agent}} placeholder) it becomes a
# running node: it sets its hostname from corral.hostname=, takes an address by DHCP, installs a drain hook
# (/etc/corral/drain, which prints "CORRAL-STOP-HOOK host=<hostname>" on the console), prints
#   CORRAL-AGENT start host=<hostname>
# and runs corral-agent (heartbeats; on orders: the drain hook, poweroff -f, reboot -f) instead of powering
# off. corral.testos.busy=1 makes the agent report the node busy.
#
# Such a node also runs an application for corral's probes: busybox httpd on port 80, started, checked and
# restarted by the agent as the service group `app` (/etc/corral/groups.toml). GET /cgi-bin/health answers
# "ok" after the node's current delay; GET /cgi-bin/slow?MS sets that delay (0 clears it), so a test can
# make one node slow. The drain hook stops nothing itself: the agent stops the group first.
#
#   tests/testos/build.sh OUTDIR     # writes OUTDIR/vmlinuz and OUTDIR/initrd.img
#   CORRAL_AGENT=path/to/corral-agent tests/testos/build.sh OUTDIR
#                                    # default: target/debug/corral-agent (under CARGO_TARGET_DIR if set)
set -euo pipefail
out=${1:?usage: build.sh OUTDIR}
mkdir -p "$out"
kver=$(ls /lib/modules | sort -V | tail -n 1)
kernel=/boot/vmlinuz-$kver
[ -r "$kernel" ] || { echo "no kernel at $kernel: sudo tests/deps.sh installs it (linux-image-amd64)" >&2; exit 1; }
busybox=$(command -v busybox) || { echo "busybox missing: sudo tests/deps.sh installs it (busybox-static)" >&2; exit 1; }
# Busybox has no NBD client, so the guest runs Debian's.
nbd_client=$(PATH=$PATH:/usr/sbin:/sbin command -v nbd-client) \
  || { echo "nbd-client missing: sudo tests/deps.sh installs it" >&2; exit 1; }

repo=$(cd "$(dirname "$0")/../.." && pwd)
agent=${CORRAL_AGENT:-${CARGO_TARGET_DIR:-$repo/target}/debug/corral-agent}
[ -x "$agent" ] || { echo "no corral-agent at $agent: run cargo build --bin corral-agent first" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,mnt,lib/modules/"$kver"}
cp "$busybox" "$root/bin/busybox"
for applet in sh mount umount cat echo ls sleep modprobe insmod poweroff reboot ip udhcpc mkdir basename \
              grep sed tr head tail dd sync wget timeout mdev hexdump date uname ifconfig route true hostname \
              cut touch chmod httpd mknod; do
  ln -sf busybox "$root/bin/$applet"
done

# nbd-client is dynamically linked: copy it, the libraries ldd names and the loader to the same paths, which
# the loader searches by default (Debian's multiarch directories are built in), so no ld.so.cache is needed.
copy_same_path() { mkdir -p "$root$(dirname "$1")" && cp -L "$1" "$root$1"; }
copy_same_path "$nbd_client"
for lib in $(ldd "$nbd_client" | sed -n -e 's/.*=> \(\/[^ ]*\) .*/\1/p' -e 's/^[[:space:]]*\(\/[^ ]*\) .*/\1/p'); do
  copy_same_path "$lib"
done

# open-iscsi's iscsistart, the initramfs login tool: with corral.disk=ibft the test OS logs in to the target
# iPXE sanbooted from, as the iBFT describes it, through the kernel's iSCSI initiator.
iscsistart=$(PATH=$PATH:/usr/sbin:/sbin command -v iscsistart) \
  || { echo "iscsistart missing: sudo tests/deps.sh installs it (open-iscsi)" >&2; exit 1; }
copy_same_path "$iscsistart"
for lib in $(ldd "$iscsistart" | sed -n -e 's/.*=> \(\/[^ ]*\) .*/\1/p' -e 's/^[[:space:]]*\(\/[^ ]*\) .*/\1/p'); do
  [ -e "$root$lib" ] || copy_same_path "$lib"
done

# corral's agent, stripped (debug builds carry ~100 MB of debug info), with its libraries.
mkdir -p "$root/usr/bin"
strip -o "$root/usr/bin/corral-agent" "$agent"
for lib in $(ldd "$agent" | sed -n -e 's/.*=> \(\/[^ ]*\) .*/\1/p' -e 's/^[[:space:]]*\(\/[^ ]*\) .*/\1/p'); do
  [ -e "$root$lib" ] || copy_same_path "$lib"
done

# busybox udhcpc only talks DHCP; this script is what puts the lease on the interface.
mkdir -p "$root/etc/udhcpc"
cat > "$root/etc/udhcpc/default.script" <<'DHCP'
#!/bin/sh
case "$1" in
  deconfig)
    ip addr flush dev "$interface"
    ip link set "$interface" up
    ;;
  bound|renew)
    ip addr flush dev "$interface"
    ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" ${broadcast:+broadcast "$broadcast"}
    for r in $router; do ip route replace default via "$r" dev "$interface"; break; done
    : > /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    ;;
esac
exit 0
DHCP
chmod +x "$root/etc/udhcpc/default.script"

# NIC drivers for QEMU's virtio-net and e1000(e), nbd and ext4 for the node disk, with everything they depend
# on (followed recursively, so a kernel update that adds a dependency still builds a working initramfs).
# ext4 and jbd2 only name crc32c as a soft dependency, through the crypto alias, which busybox modprobe does
# not follow: include the generic implementation (the one that works on any CPU) by name; /init loads it.
add_module() {
  local f dep
  f=$(modinfo -k "$kver" -n "$1" 2>/dev/null) || return 0   # not in this kernel
  case "$f" in /*) ;; *) return 0;; esac                     # built in
  [ -e "$root$f" ] && return 0
  mkdir -p "$root$(dirname "$f")"
  cp "$f" "$root$f"
  for dep in $(modinfo -k "$kver" -F depends "$1" | tr , ' '); do add_module "$dep"; done
}
for m in virtio virtio_ring virtio_pci virtio_pci_modern_dev virtio_pci_legacy_dev virtio_net net_failover \
         failover e1000 e1000e nbd ext4 crc32c_generic iscsi_tcp iscsi_ibft sd_mod; do
  add_module "$m"
done
cp /lib/modules/"$kver"/modules.builtin* "$root/lib/modules/$kver/" 2>/dev/null || true
cp /lib/modules/"$kver"/modules.order "$root/lib/modules/$kver/" 2>/dev/null || true
depmod -b "$root" "$kver"

cat > "$root/init" <<'INIT'
#!/bin/sh
# The kernel starts init without PATH; nbd-client lives in /usr/sbin.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
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

# corral.disk=nbd:HOST:PORT:EXPORT: attach the node's disk, report what it holds, write if asked, detach.
# Returns early (after one error line) at the first step that fails.
disk() {
  local spec rest host port name value out
  spec=${1#nbd:}
  case "$1" in nbd:*:*:?*) ;; *) echo "CORRAL-DISK error=unsupported corral.disk=$1"; return;; esac
  # Only the first two colons after nbd: separate fields: the export name may hold more (and slashes).
  host=${spec%%:*}; rest=${spec#*:}
  port=${rest%%:*}; name=${rest#*:}
  [ -n "$dev" ] || { echo "CORRAL-DISK error=no network interface"; return; }
  # Keep kernel chatter (nbd, EXT4-fs) from landing in the middle of the lines tests match on.
  echo 4 > /proc/sys/kernel/printk
  ip link set "$dev" up
  udhcpc -i "$dev" -n -q -t 5 -s /etc/udhcpc/default.script >/dev/null 2>&1 \
    || { echo "CORRAL-DISK error=dhcp on $dev failed"; return; }
  modprobe nbd || { echo "CORRAL-DISK error=modprobe nbd failed"; return; }
  # ext4 checksums its metadata with crc32c, a soft dependency busybox modprobe does not load.
  modprobe crc32c_generic 2>/dev/null
  modprobe ext4 || { echo "CORRAL-DISK error=modprobe ext4 failed"; return; }
  # Newstyle handshake with a named export; a dead server must not hang the boot.
  if ! out=$(timeout 60 nbd-client "$host" "$port" /dev/nbd0 -N "$name" 2>&1); then
    echo "CORRAL-DISK error=nbd-client $host $port -N $name failed: $(echo "$out" | tr '\n' ' ' | sed 's/ *$//')"
    return
  fi
  echo "CORRAL-DISK attached export=$name"
  if ! out=$(mount -t ext4 /dev/nbd0 /mnt 2>&1); then
    echo "CORRAL-DISK error=mount failed: $(echo "$out" | tr '\n' ' ' | sed 's/ *$//')"
    nbd-client -d /dev/nbd0 >/dev/null 2>&1
    return
  fi
  if [ -f /mnt/base.txt ]; then echo "CORRAL-DISK base=$(cat /mnt/base.txt)"; else echo "CORRAL-DISK base=none"; fi
  if [ -f /mnt/node.txt ]; then echo "CORRAL-DISK found=$(cat /mnt/node.txt)"; else echo "CORRAL-DISK found=none"; fi
  value=$(arg corral.testos.write)
  if [ -n "$value" ]; then
    if echo "$value" > /mnt/node.txt && sync; then
      echo "CORRAL-DISK wrote=$value"
    else
      echo "CORRAL-DISK error=write to node.txt failed"
    fi
  fi
  umount /mnt || { echo "CORRAL-DISK error=umount failed"; return; }
  sync
  # Disconnect cleanly so the server sees NBD_CMD_DISC after the last flush, not a dropped connection.
  nbd-client -d /dev/nbd0 >/dev/null 2>&1 || { echo "CORRAL-DISK error=nbd-client -d failed"; return; }
  echo "CORRAL-DISK detached"
}
# corral.disk=ibft: the machine booted this OS from an iSCSI disk with iPXE's sanboot. Read the iBFT iPXE
# left, log in to the same target as the same initiator with the kernel's initiator (iscsistart -b), and
# report on CORRAL-DISK lines:
#   ibft target=IQN initiator=IQN     attached dev=sdX
#   found=<the marker in sector 1024, or none>
#   wrote=<this node's MAC>          (only when the sector held no marker: the first boot of a slot's disk)
#   detached
ibft_disk() {
  local m t i name found
  echo 4 > /proc/sys/kernel/printk
  # libiscsi asks the crypto API for crc32c (digests) when a connection is made: a soft dependency busybox
  # modprobe does not load.
  for m in crc32c_generic iscsi_ibft iscsi_tcp sd_mod; do
    modprobe "$m" || { echo "CORRAL-DISK error=modprobe $m failed"; return; }
  done
  t=/sys/firmware/ibft/target0/target-name
  i=/sys/firmware/ibft/initiator/initiator-name
  [ -r "$t" ] || { echo "CORRAL-DISK error=no iBFT target (is this a sanboot?)"; return; }
  echo "CORRAL-DISK ibft target=$(cat "$t") initiator=$(cat "$i")"
  [ -n "$dev" ] || { echo "CORRAL-DISK error=no network interface"; return; }
  ip link set "$dev" up
  udhcpc -i "$dev" -n -q -t 5 -s /etc/udhcpc/default.script >/dev/null 2>&1 \
    || { echo "CORRAL-DISK error=dhcp on $dev failed"; return; }
  mkdir -p /etc/iscsi /run/lock/iscsi /var/lock/iscsi
  if ! out=$(timeout 60 iscsistart -b 2>&1); then
    echo "CORRAL-DISK error=iscsistart -b failed: $(echo "$out" | tr '\n' ' ' | sed 's/ *$//')"
    return
  fi
  name=""
  i=0
  while [ -z "$name" ] && [ $i -lt 100 ]; do
    for b in /sys/block/sd*; do [ -e "$b" ] && name=$(basename "$b"); done
    [ -z "$name" ] && sleep 0.1
    i=$((i + 1))
  done
  [ -n "$name" ] || { echo "CORRAL-DISK error=no disk appeared after the login"; return; }
  [ -e "/dev/$name" ] || mknod "/dev/$name" b "$(cut -d: -f1 "/sys/block/$name/dev")" "$(cut -d: -f2 "/sys/block/$name/dev")"
  echo "CORRAL-DISK attached dev=$name"
  found=$(dd if="/dev/$name" bs=512 skip=1024 count=1 2>/dev/null | tr -d '\000' | sed -n 's/^CORRAL-MARK://p')
  echo "CORRAL-DISK found=${found:-none}"
  if [ -z "$found" ]; then
    # fsync makes the kernel send the write and a SYNCHRONIZE CACHE before the line says it is written.
    if printf 'CORRAL-MARK:%s\n' "$mac" | dd of="/dev/$name" bs=512 seek=1024 conv=sync,notrunc,fsync 2>/dev/null && sync; then
      echo "CORRAL-DISK wrote=$mac"
    else
      echo "CORRAL-DISK error=write to sector 1024 failed"
    fi
  fi
  echo "CORRAL-DISK detached"
}
d=$(arg corral.disk)
case "$d" in
  ibft) ibft_disk;;
  ?*) disk "$d";;
esac

# corral.api=...: a running node with corral's agent, until corral orders it off.
api=$(arg corral.api)
if [ -n "$api" ] && [ -n "$dev" ]; then
  h=$(arg corral.hostname)
  [ -n "$h" ] && hostname "$h"
  echo 4 > /proc/sys/kernel/printk
  ip link set "$dev" up
  udhcpc -i "$dev" -n -q -t 10 -s /etc/udhcpc/default.script >/dev/null 2>&1 \
    || echo "CORRAL-AGENT error=dhcp on $dev failed"
  ip link set lo up
  mkdir -p /etc/corral /run/corral
  printf '#!/bin/sh\necho "CORRAL-STOP-HOOK host=$(hostname)" > /dev/console\n' > /etc/corral/drain
  chmod +x /etc/corral/drain
  [ "$(arg corral.testos.busy)" = 1 ] && touch /run/corral/busy
  mkdir -p /www/cgi-bin
  echo ok > /www/index.html
  printf '#!/bin/sh\nd=$(cat /run/corral/delay 2>/dev/null)\n[ -n "$d" ] && [ "$d" != 0 ] && sleep "$(($d / 1000)).$(printf %%03d $(($d %% 1000)))"\nprintf "Content-Type: text/plain\\r\\n\\r\\nok $(hostname)\\n"\n' > /www/cgi-bin/health
  printf '#!/bin/sh\necho "${QUERY_STRING:-0}" > /run/corral/delay\necho "CORRAL-SLOW delay=${QUERY_STRING:-0}" > /dev/console\nprintf "Content-Type: text/plain\\r\\n\\r\\ndelay ${QUERY_STRING:-0}\\n"\n' > /www/cgi-bin/slow
  chmod +x /www/cgi-bin/health /www/cgi-bin/slow
  cat > /etc/corral/groups.toml <<'GROUPS'
[[group]]
name = "app"
restarts = 2
[[group.resource]]
name = "httpd"
start = "httpd -f -p 80 -h /www"
check = "wget -q -O /dev/null http://127.0.0.1/index.html"
GROUPS
  echo "CORRAL-AGENT start host=$(hostname) ip=$(ip -4 -o addr show dev "$dev" | sed -n 's/.* inet \([0-9.]*\).*/\1/p')"
  corral-agent --poweroff "poweroff -f" --reboot "reboot -f"
  echo "CORRAL-AGENT exited"
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
