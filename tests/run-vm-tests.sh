#!/usr/bin/env bash
# Builds ublkd, ublkctl and the real-kernel test binaries (crate ublkd-tests, feature
# "vm"), boots the test VM (tests/vm/run.sh) and runs every test there as root. The
# systemd tests (tests/tests/systemd.rs) run in a second VM with systemd as PID 1 and
# ublkd installed by scripts/install.sh. Prints one line per test and ends with
# "vm: N passed, N failed".
#
# Usage: tests/run-vm-tests.sh [TEST_FILTER...]   (filters go to each test binary)
# Environment: UBLKD_VM_SUITES="busybox systemd" (the default) picks the VMs to boot;
#              UBLKD_VM_BINARIES="nbd loop" runs only those test binaries (default: all);
#              UBLKD_VM_LANES: which binaries run side by side in the busybox VM
#              (tests/vm/guest-run-tests.sh); "" runs them one after the other;
#              UBLKD_TEST_TRACE=1 prints how long each step of a test took (the test
#              library's `traced`: daemon starts, ublkctl calls, fio runs, waits).
set -euo pipefail
cd "$(dirname "$0")/.."

tests/vm/setup-host.sh
cargo build --release --locked --bins
# The test binaries, for the install test and for the VM. With --workspace, cargo
# resolves the dependencies' features as for the release binaries just built, so it
# compiles only the test crate again (50 s from a clean clone, not 155 s with -p).
test_build=(cargo test --release --locked --workspace --features ublkd-tests/vm,ublkd-tests/install)
echo "== install and uninstall (host)"
"${test_build[@]}" --test install

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Every test target of ublkd-tests, as "name executable" lines.
"${test_build[@]}" --test '*' --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in t.get("kind", []) \
            and m.get("package_id", "").find("ublkd-tests") >= 0 and t.get("name") != "ublkd_tests":
        print(t["name"], m["executable"])
' >"$work/tests.txt"
[ -s "$work/tests.txt" ] || { echo "run-vm-tests: no test binaries were built" >&2; exit 1; }

args=(--bin target/release/ublkd --bin target/release/ublkctl)
while read -r name exe; do
    if [ -n "${UBLKD_VM_BINARIES:-}" ] && [[ " $UBLKD_VM_BINARIES " != *" $name "* ]]; then
        continue
    fi
    # The librbd layer's tests run on the host (cargo test), against a host cluster;
    # the install test ran on the host above.
    [ "$name" = rbd_host ] && continue
    [ "$name" = install ] && continue
    if [ "$name" = systemd ]; then
        cp "$exe" "$work/ublkd-systemd-test"
        continue
    fi
    cp "$exe" "$work/ublkd-test-$name"
    args+=(--bin "$work/ublkd-test-$name")
done <"$work/tests.txt"
args+=(--file "tests/vm/guest-run-tests.sh:/usr/local/bin/guest-run-tests.sh")
# Real NBD servers for the nbd target's tests.
plugins=$(nbdkit --dump-config | sed -n 's/^plugindir=//p')
args+=(--tool /usr/bin/nbdkit --tool /usr/bin/qemu-nbd)
# iproute2's ip (busybox's cannot name a veth's peer): a server in another network
# namespace, for the nbd target's remote-server test (tests/src/remote_net.rs).
args+=(--tool /usr/sbin/ip)
args+=(--tool "$plugins/nbdkit-memory-plugin.so" --tool "$plugins/nbdkit-file-plugin.so")
# A single-node Ceph cluster for the rbd target's tests (tests/src/ceph.rs).
mapfile -t ceph < <(tests/vm/ceph-args.sh)
args+=("${ceph[@]}")

# boot_seed DIR: what an earlier boot of a server leaves behind, for the systemd VM's
# first test (systemd::a_boot_...): a loop device named "boot" recorded by ublkd (id 7),
# its backing file holding an ext4 file system with one file, the README's fstab line for
# it, and ublkd.service enabled. At boot, ublkd must restore the device, udev link
# /dev/ublkd/boot, and systemd mount it on /mnt/boot.
boot_seed() {
    local dir=$1
    mkdir -p "$dir/content" "$dir/wants"
    printf 'written before the boot\n' >"$dir/content/before-boot"
    truncate -s 32M "$dir/backing-boot.img"
    /usr/sbin/mkfs.ext4 -q -F -L ublkd-boot -d "$dir/content" "$dir/backing-boot.img"
    cat >"$dir/7.json" <<'JSON'
{
  "version": 1,
  "id": 7,
  "add": {
    "target": { "type": "loop", "file": "/var/tmp/backing-boot.img", "direct_io": "auto", "read_only": false },
    "id": 7,
    "name": "boot"
  },
  "buffer": "auto-zc"
}
JSON
    printf '/dev/ublkd/boot /mnt/boot ext4 _netdev,x-systemd.requires=ublkd.service 0 2\n' >"$dir/fstab"
    ln -sfn /usr/local/lib/systemd/system/ublkd.service "$dir/wants/ublkd.service"
}

# Two lanes of about equal time (seconds from a run one after the other: nbd 320, stress
# 223, recovery 75, safety 44; rbd 255, nbd_tls 221, loop 102, null 72, security 28).
# The guest's CPUs are about 55% busy with one binary at a time, and two lanes finish
# in about 60% of the time (794 s against 1348 s). Since the cephx tests the rbd binary
# is the longest (440 s beside the other lane, against nbd's 295), so null moved to
# the first lane (731 + 64 s against 820 - 64 s in the run that showed it).
lanes=${UBLKD_VM_LANES-nbd stress recovery safety null;rbd nbd_tls loop security}

suites=${UBLKD_VM_SUITES:-busybox systemd}
status=0
: >"$work/console.log"
if [[ " $suites " == *" busybox "* ]]; then
    set +e
    tests/vm/run.sh --timeout "${UBLKD_VM_TIMEOUT:-2100}" --mem "${UBLKD_VM_MEM:-4G}" "${args[@]}" \
        -- "UBLKD_TEST_LANES='$lanes'" ${UBLKD_TEST_TRACE:+UBLKD_TEST_TRACE=1} /bin/sh /usr/local/bin/guest-run-tests.sh "$@" | stdbuf -oL tr -d '\r' | tee -a "$work/console.log"
    status=${PIPESTATUS[0]}
    set -e
fi

if [[ " $suites " == *" systemd "* ]]; then
    # ublkd as a user installs it: the install script, staged into the guest's /usr/local.
    scripts/install.sh --no-build --destdir "$work/stage" >/dev/null
    boot_seed "$work/boot"
    set +e
    tests/vm/run.sh --systemd --timeout "${UBLKD_VM_TIMEOUT:-2100}" --mem "${UBLKD_VM_MEM:-3G}" \
        --file "$work/stage/usr/local:/usr/local" \
        --file "$work/stage/etc/modules-load.d/ublkd.conf:/etc/modules-load.d/ublkd.conf" \
        --file "$work/stage/etc/udev/rules.d/60-ublkd.rules:/etc/udev/rules.d/60-ublkd.rules" \
        --file "$work/boot/fstab:/etc/fstab" \
        --file "$work/boot/backing-boot.img:/var/tmp/backing-boot.img" \
        --file "$work/boot/7.json:/var/lib/ublkd/devices/7.json" \
        --file "$work/boot/wants:/etc/systemd/system/multi-user.target.wants" \
        --bin "$work/ublkd-systemd-test" \
        -- RUST_BACKTRACE=1 RUSTC_BOOTSTRAP=1 UBLKCTL_BIN=/usr/local/bin/ublkctl \
        /usr/local/bin/ublkd-systemd-test --test-threads=1 -Z unstable-options --report-time "$@" | stdbuf -oL tr -d '\r' | tee -a "$work/console.log"
    s=${PIPESTATUS[0]}
    set -e
    [ "$status" -ne 0 ] || status=$s
fi

# Count from each binary's libtest summary ("test result: ok. N passed; M failed; ..."):
# server and kernel messages may land in the middle of a per-test line.
sum() { grep -oE "test result: [A-Za-z]+\. [0-9]+ passed; [0-9]+ failed" "$work/console.log" |
    awk -v f="$1" '{ n += (f == "passed" ? $4 : $6) } END { print n + 0 }'; }
passed=$(sum passed)
failed=$(sum failed)
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
    # The VM or a test binary died without reporting a failed test: count it.
    echo "run-vm-tests: the VM run ended with status $status before reporting every test" >&2
    failed=$((failed + 1))
fi
echo "vm: $passed passed, $failed failed"
[ "$status" -eq 0 ] && [ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
