#!/usr/bin/env bash
# Every test of ublkd: the host unit tests, a bounded fuzzing run, then the real-kernel
# tests in the test VM.
# Works on a fresh Debian 12 machine as root: installs what it needs by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

tests/vm/setup-host.sh
echo "== unit tests (host)"
cargo test --locked --workspace
echo "== fuzzing: every parser of outside input, ${UBLKD_FUZZ_SECONDS:-10} s each"
scripts/fuzz.sh "${UBLKD_FUZZ_SECONDS:-10}"
echo "== real-kernel tests (VM)"
tests/run-vm-tests.sh "$@"
