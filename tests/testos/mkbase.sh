#!/usr/bin/env bash
# Makes the base image that node disks start from: a raw ext4 file system holding base.txt ("corral base"),
# which the test OS reports as CORRAL-DISK base=... so tests can tell the base's content from a node's own.
# mke2fs -d fills the file system from a directory, so this needs neither root nor a loop mount.
#
#   tests/testos/mkbase.sh OUTFILE [SIZE_MIB]     # SIZE_MIB defaults to 64
set -euo pipefail
out=${1:?usage: mkbase.sh OUTFILE [SIZE_MIB]}
size=${2:-64}
[[ $size =~ ^[1-9][0-9]*$ ]] || { echo "SIZE_MIB must be a positive whole number, not '$size'" >&2; exit 1; }
mke2fs=$(PATH=$PATH:/usr/sbin:/sbin command -v mke2fs) || { echo "mke2fs missing (install e2fsprogs)" >&2; exit 1; }

# Build beside the target and rename, so a failed run never leaves a half-made image under OUTFILE.
tmp=$out.tmp.$$
work=$(mktemp -d)
trap 'rm -rf "$work" "$tmp"' EXIT
mkdir "$work/root"
echo "corral base" > "$work/root/base.txt"
"$mke2fs" -q -t ext4 -L corral-base -d "$work/root" -F "$tmp" "${size}M" >/dev/null
mv "$tmp" "$out"
echo "base image: $out (${size} MiB ext4)"
