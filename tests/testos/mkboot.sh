#!/usr/bin/env bash
# Makes a whole-disk image with its own boot loader, for nodes that boot with iPXE's `sanboot` from corral's
# iSCSI target: an MBR disk (syslinux's mbr.bin) with one active FAT partition holding syslinux, the test
# OS's kernel and initramfs, and a syslinux.cfg that boots them with `corral.disk=ibft`; for UEFI, the same
# kernel, initramfs and command line as one unified kernel image (systemd's EFI stub) at the removable-media
# path \EFI\BOOT\BOOTX64.EFI that firmware and iPXE start (the test OS then
# attaches the same disk through the iBFT and reads/writes a marker in sector 1024, between the MBR and the
# partition). Built with mtools and syslinux's --offset, so it needs neither root nor a loop mount.
#
#   tests/testos/mkboot.sh TESTOS_DIR OUTFILE [SIZE_MIB]   # TESTOS_DIR holds vmlinuz and initrd.img
set -euo pipefail
src=${1:?usage: mkboot.sh TESTOS_DIR OUTFILE [SIZE_MIB]}
out=${2:?usage: mkboot.sh TESTOS_DIR OUTFILE [SIZE_MIB]}
size=${3:-128}
[[ $size =~ ^[1-9][0-9]*$ ]] && [ "$size" -ge 40 ] || { echo "SIZE_MIB must be a whole number >= 40, not '$size'" >&2; exit 1; }
for f in vmlinuz initrd.img; do
  [ -r "$src/$f" ] || { echo "no $src/$f: build the test OS first (tests/testos/build.sh $src)" >&2; exit 1; }
done
mbr=/usr/lib/syslinux/mbr/mbr.bin
for tool in syslinux mcopy mkfs.vfat; do
  PATH=$PATH:/usr/sbin:/sbin command -v "$tool" >/dev/null \
    || { echo "$tool missing (install syslinux syslinux-common mtools dosfstools)" >&2; exit 1; }
done
[ -r "$mbr" ] || { echo "no $mbr (install syslinux-common)" >&2; exit 1; }
export PATH=$PATH:/usr/sbin:/sbin
export MTOOLS_SKIP_CHECK=1

tmp=$out.tmp.$$
work=$(mktemp -d)
trap 'rm -rf "$work" "$tmp"' EXIT
truncate -s "${size}M" "$tmp"
# The MBR: syslinux's boot code, then one active FAT32-LBA partition (type 0x0c) from 1 MiB (sector 2048)
# to the end, written by hand (16-byte entry at 446, 55 AA at 510); sectors 1..2047 stay free.
le32() { printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 & 255)) $(($1 >> 8 & 255)) $(($1 >> 16 & 255)) $(($1 >> 24 & 255)); }
sectors=$(( (size - 1) * 2048 ))
dd if="$mbr" of="$tmp" bs=440 count=1 conv=notrunc status=none
# CHS of sector 2048 in a 255-head, 63-sector geometry is 0/32/33; the end is past CHS reach (FE FF FF).
printf "\\x80\\x20\\x21\\x00\\x0c\\xfe\\xff\\xff$(le32 2048)$(le32 $sectors)" \
  | dd of="$tmp" bs=1 seek=446 conv=notrunc status=none
printf '\x55\xaa' | dd of="$tmp" bs=1 seek=510 conv=notrunc status=none
part_bytes=$(( sectors * 512 ))
mkfs.vfat -F 32 -n CORRALBOOT --offset 2048 "$tmp" $((part_bytes / 1024)) >/dev/null
cat > "$work/syslinux.cfg" <<'CFG'
DEFAULT corral
PROMPT 0
TIMEOUT 0
LABEL corral
  KERNEL vmlinuz
  INITRD initrd.img
  APPEND console=ttyS0 panic=-1 quiet corral.disk=ibft
CFG
mcopy -i "$tmp@@1M" "$src/vmlinuz" "$src/initrd.img" "$work/syslinux.cfg" ::/
# UEFI: a unified kernel image, systemd-boot-efi's stub with the kernel, initramfs and command line added
# as sections (the layout systemd documents for objcopy), so no boot loader stands between firmware and
# kernel.
stub=/usr/lib/systemd/boot/efi/linuxx64.efi.stub
if [ -r "$stub" ] && command -v objcopy >/dev/null; then
  printf "%s" "console=ttyS0 panic=-1 quiet corral.disk=ibft" > "$work/cmdline"
  printf 'NAME=corral-testos\nID=corral-testos\n' > "$work/os-release"
  objcopy --add-section .osrel="$work/os-release" --change-section-vma .osrel=0x20000 \
          --add-section .cmdline="$work/cmdline" --change-section-vma .cmdline=0x30000 \
          --add-section .linux="$src/vmlinuz" --change-section-vma .linux=0x2000000 \
          --add-section .initrd="$src/initrd.img" --change-section-vma .initrd=0x3000000 \
          "$stub" "$work/BOOTX64.EFI"
  mmd -i "$tmp@@1M" ::/EFI ::/EFI/BOOT
  mcopy -i "$tmp@@1M" "$work/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
else
  echo "note: no $stub or objcopy (install systemd-boot-efi binutils): the disk boots on BIOS only" >&2
fi
syslinux --offset $((2048 * 512)) --install "$tmp"
mv "$tmp" "$out"
echo "boot disk: $out (${size} MiB, syslinux on FAT32 at 1 MiB)"
