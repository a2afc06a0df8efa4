#!/usr/bin/env bash
# Benchmarks ublkd against the kernel's own drivers, side by side in one VM run, and
# prints a table of ratios. Not a test: nothing here passes or fails on speed.
#
# Usage: scripts/bench.sh null|loop|nbd [--runtime SECS] [--rounds N] [--only TEXT] [--export nbdkit|qemu] [--buffers MODE,...] [--connections N]
set -euo pipefail
cd "$(dirname "$0")/.."

suite=${1:-null}
shift || true
tests/vm/setup-host.sh
cargo build --release --locked -p ublkd -p ublkctl -p ublkd-tests --bins
if [ -e /dev/ublk-control ]; then
    echo "note: running in the VM anyway, so both sides see the same (emulated) machine" >&2
fi
plugins=$(nbdkit --dump-config | sed -n 's/^plugindir=//p')
tests/vm/run.sh --timeout 1800 --mem 3G \
    --bin target/release/ublkd --bin target/release/ublkctl --bin target/release/ublkd-bench \
    --tool /usr/bin/nbdkit --tool /usr/bin/qemu-nbd --tool /usr/sbin/nbd-client \
    --tool "$plugins/nbdkit-memory-plugin.so" \
    -- ublkd-bench "$suite" "$@" | tr -d '\r'
