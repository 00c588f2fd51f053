#!/usr/bin/env bash
# corral's main job on an embedded default: installs QEMU/OVMF/iPXE and the test OS, builds corral, and runs
# `corral lab`: corral on an isolated namespace network with VMs (BIOS and UEFI) netbooting from it, printing
# what happens. Everything it creates is removed when it ends.
#
#   sudo tests/lab.sh                 # 3 VMs, full DHCP
#   sudo tests/lab.sh --vms 8 --mode proxy
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/deps.sh
cargo build --release --quiet
CORRAL_AGENT="${CARGO_TARGET_DIR:-target}/release/corral-agent" bash tests/testos/build.sh images/testos
exec "${CARGO_TARGET_DIR:-target}/release/corral" lab "$@"
