#!/usr/bin/env bash
# The main job: build ublkd, start it, create a device, run a short fio through it and
# print the result. Runs on this machine when it has /dev/ublk-control, otherwise in the
# test VM (a kernel with ublk, booted under QEMU). Installs what it needs by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

tests/vm/setup-host.sh
cargo build --release --locked -p ublkd -p ublkctl
if [ -e /dev/ublk-control ] && [ -z "${UBLKD_DEMO_VM:-}" ]; then
    PATH="$PWD/target/release:$PATH" sh scripts/demo-steps.sh
else
    echo "demo: no /dev/ublk-control here; running in the test VM" >&2
    tests/vm/run.sh --timeout 900 \
        --bin target/release/ublkd --bin target/release/ublkctl \
        --file scripts/demo-steps.sh:/root/demo-steps.sh \
        -- sh /root/demo-steps.sh | stdbuf -oL tr -d '\r'
fi
