#!/usr/bin/env bash
# The long simulator campaign (tests/sim.rs `campaign`): CORRAL_SIM_SEEDS seeds × CORRAL_SIM_DAYS simulated
# days on CORRAL_SIM_NODES nodes in CORRAL_SIM_CLUSTERS clusters (defaults 50 × 30 × 5000 × 100). Prints
# one line per seed (steps, faults injected by kind, invariant checks, plans and their cost, restarts,
# moves, failovers, wall time) and a total. A violated invariant stops it with the seed to replay:
#   CORRAL_SIM_SEED=<seed> cargo test --release --test sim
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --test sim -- --ignored campaign --nocapture 2>&1 | grep --line-buffered -v '^\s*$'
