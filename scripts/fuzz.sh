#!/usr/bin/env bash
# Fuzzes every parser of outside input (fuzz/fuzz_targets/) for a bounded time each,
# starting from the seed corpora in fuzz/corpus/TARGET (read only: what the fuzzer
# finds on the way goes to a scratch directory that is removed afterwards).
# Exits non-zero when any target crashes; the crashing input is kept in
# fuzz/artifacts/TARGET/ and the line to reproduce it is printed.
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]    (default: 20 s, all targets)
#
# cargo-fuzz needs nightly compiler flags (sanitizer, coverage); RUSTC_BOOTSTRAP=1 lets
# the stable toolchain take them.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-20}
shift || true
case $seconds in
'' | *[!0-9]*)
    echo "fuzz.sh: SECONDS_PER_TARGET must be a whole number, not '$seconds'" >&2
    exit 2
    ;;
esac

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

cd fuzz
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

echo "== building ${#targets[@]} fuzz targets"
cargo fuzz build

scratch=$(mktemp -d /tmp/ublkd-fuzz.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
# The device_record target keeps its state directory under TMPDIR.
export TMPDIR=$scratch

passed=0
failed=0
summary=()
for t in "${targets[@]}"; do
    echo "== $t: ${seconds} s"
    mkdir -p "$scratch/$t" "artifacts/$t"
    log=$scratch/$t.log
    # -timeout: an input that takes 10 s is a hang; -malloc_limit_mb: no length field may
    # make a parser allocate more than 256 MiB.
    status=0
    cargo fuzz run "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -malloc_limit_mb=256 \
        -artifact_prefix="artifacts/$t/" -print_final_stats=1 >"$log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    if [ -z "$runs" ]; then
        # No final stats (a crash): the last progress line's count.
        runs=$(grep -ao '^#[0-9]*' "$log" | tail -1 | tr -d '#')
    fi
    corpus=$(find "$scratch/$t" -type f | wc -l)
    if [ "$status" -eq 0 ]; then
        passed=$((passed + 1))
        line="$t: ok, ${runs:-?} runs, $corpus new corpus entries"
    else
        failed=$((failed + 1))
        line="$t: FAILED (exit $status) after ${runs:-?} runs"
        grep -aE 'panicked at|^SUMMARY|ERROR: libFuzzer|==ERROR' "$log" | head -5 || true
        grep -a -A3 'panicked at' "$log" | head -8 || true
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
        if [ -n "$artifact" ]; then
            echo "reproduce: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run $t $artifact)"
        else
            tail -20 "$log"
        fi
    fi
    echo "$line"
    summary+=("$line")
done

echo "== summary (${seconds} s per target)"
printf '%s\n' "${summary[@]}"
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
