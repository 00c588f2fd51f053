#!/usr/bin/env bash
# Re-provisioning speed: VMs (1, then 8 at once) moved from one cluster to another by corral, per step,
# the server-side part and the whole move, beside a cold netboot of the same image at the same
# concurrency (tests/bench_move.rs has the details). Needs root (namespaces, taps); takes a few minutes.
#
#   sudo bench/move.sh                 # 1 and 8 VMs
#   sudo MOVE_VMS="1" bench/move.sh    # only one VM
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/deps.sh
cargo build --release --quiet --bin corral-agent
CORRAL_AGENT="${CARGO_TARGET_DIR:-target}/release/corral-agent" bash tests/testos/build.sh images/testos >/dev/null
cargo test --release --quiet --test bench_move -- --ignored --nocapture --test-threads 1 2>&1 \
  | grep -v -E '^(running|test result|test bench_moves)|^$' || true
