#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what the tests need (as root, with apt-get),
# builds the tiny test OS, then runs every test (unit, property, loopback integration against real clients,
# namespace DHCP tests, and QEMU VMs netbooting from corral end to end).
#
#   sudo tests/run.sh            # everything
#   sudo tests/run.sh http_curl  # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/deps.sh
echo "== building the test OS (with corral-agent)"
cargo build --bin corral-agent
bash tests/testos/build.sh images/testos
echo "== cargo test"
cargo test "$@"
