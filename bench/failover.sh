#!/usr/bin/env bash
# Failover speed: runs the end-to-end failover scenario (tests/e2e_failover.rs: a slow VM and a killed VM
# replaced from the pool, under TCG) and prints, per case, the detection time, the time from the failure to
# the replacement's first good probe, and the server-side part. Needs root (namespaces, taps).
#
#   sudo bench/failover.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/deps.sh
cargo build --quiet --bin corral-agent
bash tests/testos/build.sh images/testos >/dev/null
cargo test --quiet --test e2e_failover -- --nocapture 2>&1 | grep -E '^(FAILOVER|  )' || true
