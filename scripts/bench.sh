#!/usr/bin/env bash
# Benchmarks ublkd against the kernel's own drivers and (null, loop) against rublk, side
# by side in one VM run, and prints a table of ratios. Not a test: nothing here passes or
# fails on speed.
#
# Usage: scripts/bench.sh null|loop|nbd|rbd [--runtime SECS] [--rounds N] [--only TEXT] [--export nbdkit|nbdkit-tcp|nbdkit-unix|nbdkit-tls|qemu] [--buffers MODE,...] [--ublkd "ARGS;ARGS"] [--connections N] [--rublk-multi-cpus] [--profile] [--backing ext4|tmpfs] [--nbdkit-threads N] [--sync] [--ms-mode MODE]
#
# rublk (https://github.com/ublk-org/rublk, a ublk daemon on libublk) is installed from
# crates.io with `cargo install` into $UBLKD_BENCH_RUBLK_ROOT (default
# /var/cache/ublkd-bench/rublk) the first time, and reused after. Pinned to 0.2.15 (on
# libublk 0.4.7), so numbers from different runs compare; --no-default-features leaves out
# its vram target, which needs OpenCL, and the benchmark uses only null and loop.
set -euo pipefail
cd "$(dirname "$0")/.."

RUBLK_VERSION=0.2.15
rublk_root=${UBLKD_BENCH_RUBLK_ROOT:-/var/cache/ublkd-bench/rublk}
rublk=$rublk_root/bin/rublk

suite=${1:-null}
shift || true
tests/vm/setup-host.sh
cargo build --release --locked -p ublkd -p ublkctl -p ublkd-tests --bins
if [[ $("$rublk" --version 2>/dev/null) != "rublk $RUBLK_VERSION" ]]; then
    mkdir -p "$rublk_root" || {
        echo "bench.sh: cannot create $rublk_root for rublk; set UBLKD_BENCH_RUBLK_ROOT to a writable directory" >&2
        exit 1
    }
    cargo install --locked --no-default-features --version "$RUBLK_VERSION" \
        --root "$rublk_root" rublk
fi
if [ -e /dev/ublk-control ]; then
    echo "note: running in the VM anyway, so both sides see the same (emulated) machine" >&2
fi
plugins=$(nbdkit --dump-config | sed -n 's/^plugindir=//p')
# rbd: the single-node Ceph cluster and rbd-nbd, and krbd: tests/vm/kernel.sh extracts the
# rbd module (and libceph) only when asked, so the test runs need not carry them; asking
# here fetches the kernel package once more (a few seconds) if the cached kernel lacks them.
ceph=()
if [ "$suite" = rbd ]; then
    mapfile -t ceph < <(tests/vm/ceph-args.sh)
    export UBLKD_VM_EXTRA_MODULES="${UBLKD_VM_EXTRA_MODULES:-} rbd"
fi
# Profiling (see tests/src/bin/bench/measure.rs): UBLKD_BENCH_HOOK=FILE copies the script FILE in
# and runs it beside every fio run; UBLKD_BENCH_PERF=1 copies perf in too and lets it see
# kernel symbols. UBLKD_BENCH_ENV="NAME=VALUE ..." sets environment variables for the
# benchmark (and the daemon it starts) in the guest.
prof=()
guest_env=()
if [ -n "${UBLKD_BENCH_HOOK:-}" ]; then
    prof+=(--file "$(realpath "$UBLKD_BENCH_HOOK"):/root/bench-hook.sh")
    guest_env+=(UBLKD_BENCH_HOOK="sh /root/bench-hook.sh")
fi
pre=""
if [ "${UBLKD_BENCH_PERF:-}" = 1 ]; then
    prof+=(--tool /usr/bin/perf)
    pre="echo 0 > /proc/sys/kernel/kptr_restrict; echo -1 > /proc/sys/kernel/perf_event_paranoid; "
fi
# UBLKD_BENCH_TOOLS="PATH ...": more host programs or shared objects for the guest, at the
# same paths (an allocator to preload with `--daemon-env LD_PRELOAD=...`, say).
for tool in ${UBLKD_BENCH_TOOLS:-}; do
    prof+=(--tool "$tool")
done
read -ra extra_env <<< "${UBLKD_BENCH_ENV:-}"
guest_env+=("${extra_env[@]}")
# The guest runs the command with sh -c: quote the arguments (--ublkd has ';' and spaces).
tests/vm/run.sh --timeout 1800 --mem 3G \
    --bin target/release/ublkd --bin target/release/ublkctl --bin target/release/ublkd-bench \
    --bin "$rublk" \
    --tool /usr/bin/nbdkit --tool /usr/bin/qemu-nbd --tool /usr/sbin/nbd-client \
    --tool "$plugins/nbdkit-memory-plugin.so" "${ceph[@]}" "${prof[@]}" \
    -- "$pre$(printf '%q ' env "${guest_env[@]}" ublkd-bench "$suite" "$@")" | stdbuf -oL tr -d '\r'
