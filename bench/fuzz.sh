#!/usr/bin/env bash
# Runs the cargo-fuzz targets for a set time each and prints one table: executions, executions per second,
# crashes (crash/oom/timeout/leak artifacts written during the run), and the corpus size afterwards.
#
#   bench/fuzz.sh [seconds-per-target] [target...]     (default: 60 s, every target in fuzz/Cargo.toml)
#
# Two libFuzzer workers per target (-jobs=2 -workers=2: this machine has 2 cores), sharing the target's
# corpus in fuzz/corpus/<target>/; crash inputs land in fuzz/artifacts/<target>/. Needs the nightly
# toolchain and cargo-fuzz (`cargo install cargo-fuzz`). FUZZ_JOBS overrides the worker count. The corpus
# size is the files' bytes.
set -euo pipefail

secs=${1:-60}
shift || true
repo=$(cd "$(dirname "$0")/.." && pwd)
fuzz="$repo/fuzz"
jobs=${FUZZ_JOBS:-2}

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cd "$fuzz" && cargo +nightly fuzz list)
fi

# Optimised, with overflow checks and debug assertions (an arithmetic overflow on hostile input is a bug
# even where release builds would wrap), without AddressSanitizer: the code under test is safe Rust, and
# ASan cut the DHCP target from ~77k to ~9k exec/s here. FUZZ_BUILD="-O" gives cargo-fuzz's default (ASan,
# no overflow checks).
build=(${FUZZ_BUILD:--O -a -s none})
tdir="$fuzz/target/checked"
log=$(mktemp)
for t in "${targets[@]}"; do
    (cd "$fuzz" && cargo +nightly fuzz build "${build[@]}" --target-dir "$tdir" "$t") >"$log" 2>&1 ||
        { tail -30 "$log" >&2; exit 1; }
done
rm -f "$log"
bin="$tdir/x86_64-unknown-linux-gnu/release"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rows=()
for t in "${targets[@]}"; do
    corpus="$fuzz/corpus/$t"
    art="$fuzz/artifacts/$t"
    mkdir -p "$corpus" "$art" "$work/$t"
    before=$(find "$art" -type f | wc -l)
    dict=()
    [ -f "$fuzz/dict/$t.dict" ] && dict=(-dict="$fuzz/dict/$t.dict")
    start=$(date +%s.%N)
    # libFuzzer writes each worker's log as fuzz-<n>.log in its working directory.
    (cd "$work/$t" && "$bin/$t" "$corpus" "${dict[@]}" -jobs="$jobs" -workers="$jobs" \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=1024 -print_final_stats=1 \
        -artifact_prefix="$art/" >/dev/null 2>&1) || true
    end=$(date +%s.%N)
    execs=0
    for log in "$work/$t"/fuzz-*.log; do
        [ -f "$log" ] || continue
        # "Done N runs in S second(s)" at a normal end; otherwise the last status line "#N ...".
        n=$(grep -oE '^Done [0-9]+ runs' "$log" | tail -1 | grep -oE '[0-9]+' || true)
        [ -n "$n" ] || n=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#' || true)
        execs=$((execs + ${n:-0}))
    done
    crashes=$(($(find "$art" -type f | wc -l) - before))
    files=$(find "$corpus" -type f | wc -l)
    size=$(( $(find "$corpus" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }') / 1024 ))
    rate=$(awk -v n="$execs" -v a="$start" -v b="$end" 'BEGIN { printf "%d", n / (b - a) }')
    rows+=("$(printf '%-16s %12s %10s %8s %8s %9s' "$t" "$execs" "$rate" "$crashes" "$files" "${size}K")")
    grep -h -E 'ERROR: libFuzzer|panicked at' "$work/$t"/fuzz-*.log 2>/dev/null | sort | uniq -c | sed "s/^/  $t: /" >&2 || true
done

printf '\n%-16s %12s %10s %8s %8s %9s\n' target execs exec/s crashes corpus size
for r in "${rows[@]}"; do echo "$r"; done
echo "($secs s per target, $jobs workers; crash inputs in fuzz/artifacts/<target>/)"
