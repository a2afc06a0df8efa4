#!/bin/sh
# Runs inside the test VM: every real-kernel test binary, one test at a time.
#
# A binary that runs longer than UBLKD_TEST_LIMIT seconds (default 900; the slowest takes
# about 300 on a quiet machine, and twice that on a host busy compiling) is hung: its state is dumped (the newest ublkd logs, the kernel stacks of
# every ublkd thread, the blocked tasks) so the hang can be diagnosed from the console,
# then it is killed and counted as failed, and the other binaries still run.
limit=${UBLKD_TEST_LIMIT:-900}

dump_state() {
    echo "ublkd-vm: $1 still running after $limit s: it is hung; its state follows"
    # Every ublkd logs its queues' state on SIGUSR1 (tags in flight, command path).
    for p in $(pidof ublkd); do
        kill -USR1 "$p"
    done
    sleep 1
    for f in $(ls -t /tmp/ublkd-*.log 2>/dev/null | head -n 2); do
        echo "---- $f (last 80 lines)"
        tail -n 80 "$f"
    done
    for p in $(pidof ublkd); do
        for t in /proc/"$p"/task/*; do
            echo "---- ublkd $p thread $(basename "$t") $(cat "$t/comm" 2>/dev/null)"
            cat "$t/stack" 2>/dev/null
        done
    done
    # The block layer's view: requests started (busy) and parked (dispatch) per hctx.
    mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug 2>/dev/null
    for d in /sys/kernel/debug/block/ublkb*; do
        [ -d "$d" ] || continue
        echo "---- $d"
        cat "$d/state" 2>/dev/null
        for h in "$d"/hctx*; do
            echo "$(basename "$h") busy: $(cat "$h/busy" 2>/dev/null | head -n 20)"
            echo "$(basename "$h") dispatch: $(cat "$h/dispatch" 2>/dev/null | head -n 20)"
        done
    done
    echo w >/proc/sysrq-trigger
    sleep 2
    echo "---- kernel log (last 150 lines)"
    dmesg | tail -n 150
}

# cpu_ticks: "busy total" clock ticks of every CPU since boot, from /proc/stat.
cpu_ticks() {
    awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat
}

rc=0
for t in /usr/local/bin/ublkd-test-*; do
    name=$(basename "$t")
    echo "== $name"
    before=$(cpu_ticks)
    start=$(date +%s)
    # --report-time prints each test's duration (a libtest option that RUSTC_BOOTSTRAP
    # unlocks at run time; it changes nothing else), so the suite's time can be kept.
    RUST_BACKTRACE=1 RUSTC_BOOTSTRAP=1 "$t" --test-threads=1 -Z unstable-options --report-time "$@" &
    pid=$!
    (
        i=0
        while kill -0 "$pid" 2>/dev/null; do
            if [ "$i" -ge "$limit" ]; then
                dump_state "$name"
                kill -9 "$pid"
                break
            fi
            sleep 1
            i=$((i + 1))
        done
    ) &
    watchdog=$!
    wait "$pid" || rc=1
    wait "$watchdog"
    after=$(cpu_ticks)
    # How busy the guest's CPUs were: what is left idle could overlap another binary.
    echo "$before $after" | awk -v n="$name" -v s=$(($(date +%s) - start)) \
        '{ b = $3 - $1; t = $4 - $2; printf "== %s: %d s, CPUs busy %d%%\n", n, s, t ? 100 * b / t : 0 }'
done
exit $rc
