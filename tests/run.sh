#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what the tests need (tests/deps.sh, as root,
# with apt-get; then tests/preflight.sh checks every command is here), builds the tiny test OS, then runs
# every test (unit, property, loopback integration against real clients, namespace DHCP tests, and QEMU VMs
# netbooting from corral end to end), and ends with one line: `N passed, N failed, N skipped`.
#
#   sudo tests/run.sh            # everything; as root a missing prerequisite fails its test
#   tests/run.sh                 # without root: tests that need root are counted as skipped
#   sudo tests/run.sh http_curl  # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/deps.sh
echo "== building the test OS (with corral-agent)"
cargo build --bin corral-agent
bash tests/testos/build.sh images/testos

# Tests that could not run record themselves here (tests/common: skip); the closing line counts them.
skips=$(mktemp /tmp/corral-skipped.XXXXXX)
out=$(mktemp /tmp/corral-tests.XXXXXX)
trap 'rm -f "$skips" "$out"' EXIT
chmod 666 "$skips"
echo "== cargo test"
set +e
CORRAL_SKIP_LOG=$skips cargo test --no-fail-fast "$@" 2>&1 | tee "$out"
status=${PIPESTATUS[0]}
# The simulator's 5,000-node farm needs an optimised build (it is ignored in the debug one above): the
# whole simulated week, about 2.5 minutes of CPU here (it was 40 before the slow-node replan storm and the
# per-tick scans of every assignment went).
if [ $# -eq 0 ]; then
  echo "== cargo test --release --test sim (5,000 nodes, 100 clusters, a simulated week)"
  CORRAL_SIM_DAYS=${CORRAL_SIM_DAYS:-7} cargo test --release --test sim five_thousand -- --nocapture 2>&1 | tee -a "$out"
  sim_status=${PIPESTATUS[0]}
  [ "$sim_status" != 0 ] && status=$sim_status
fi
set -e
# libtest prints one "test result: ... N passed; N failed; N ignored; ..." per test binary; a skipped test
# passed as far as libtest knows, so it is taken out of the passed count.
read -r passed failed ignored < <(awk '/^test result:/ {
    for (i = 1; i <= NF; i++) { v = $i + 0
      if ($(i+1) ~ /^passed/) p += v; if ($(i+1) ~ /^failed/) f += v; if ($(i+1) ~ /^ignored/) g += v }
  } END { print p + 0, f + 0, g + 0 }' "$out")
skipped=$(wc -l < "$skips")
if [ "$skipped" -gt 0 ]; then
  echo "== skipped:"
  sed 's/^/  /' "$skips"
fi
# A test binary that failed to build or crashed prints no result line: the exit status still tells.
if [ "$status" != 0 ] && [ "$failed" = 0 ]; then failed="$failed (cargo test exited $status)"; fi
extra=""
[ "$ignored" -gt 0 ] && extra=", $ignored ignored (#[ignore]: benchmarks run by bench/, and the debug build's copy of the simulator's 5,000-node farm, run above with --release)"
echo "== $((passed - skipped)) passed, $failed failed, $skipped skipped$extra"
exit "$status"
