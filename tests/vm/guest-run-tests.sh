#!/bin/sh
# Runs inside the test VM: every real-kernel test binary, one test at a time per binary.
#
# UBLKD_TEST_LANES runs binaries side by side: lanes separated by ';', each a list of
# binary names (the part after "ublkd-test-") run one after the other. The lanes run at
# the same time (one binary's waits and single-threaded stretches leave a vCPU idle that
# the other lane uses); lane N > 1 gives its daemons the device ids N*1000 to
# N*1000+999 (UBLKD_TEST_DEVICE_IDS), so no lane takes an id another lane's daemon
# restores a device under. Binaries no lane names join the first. Each line a binary
# prints is then prefixed with its name. Without UBLKD_TEST_LANES, one lane runs them all.
#
# A binary that runs longer than UBLKD_TEST_LIMIT seconds (default 1500; the slowest, nbd,
# takes about 350 beside the other lane on a quiet machine and 620 in a slow stretch of
# the same machine) is hung: its state is dumped (the newest ublkd logs, the kernel stacks
# of every ublkd thread, the blocked tasks) so the hang can be diagnosed from the console,
# then it is killed and counted as failed, and the other binaries still run.
limit=${UBLKD_TEST_LIMIT:-1500}
# The arguments are test name filters, passed to every binary (none has a space).
filters="$*"

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
    # Every other process (servers, fio, the rbd tool, the Ceph daemons): where it waits.
    echo "---- processes (pid state wchan command)"
    for p in /proc/[0-9]*; do
        cmd=$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null | cut -c1-160)
        [ -n "$cmd" ] || continue # kernel threads
        echo "$(basename "$p") $(cut -d' ' -f3 "$p/stat" 2>/dev/null) $(cat "$p/wchan" 2>/dev/null) $cmd"
    done
    # The rbd tests' cluster (tests/src/ceph.rs) logs under /tmp/ublkd-ceph/log.
    for f in /tmp/ublkd-ceph/log/*.log; do
        [ -f "$f" ] || continue
        echo "---- $f (last 40 lines)"
        tail -n 40 "$f"
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

# run_binary NAME [PREFIX]: runs /usr/local/bin/ublkd-test-NAME with the watchdog;
# returns its status.
run_binary() {
    name=ublkd-test-$1
    t=/usr/local/bin/$name
    echo "${2:-}== $name"
    before=$(cpu_ticks)
    start=$(date +%s)
    out=/tmp/$name.out
    rm -f "$out"
    mkfifo "$out"
    # Whole lines, prefixed, so side-by-side lanes do not cut each other's lines.
    awk -v p="${2:-}" '{ print p $0; fflush() }' <"$out" &
    printer=$!
    # --report-time prints each test's duration (a libtest option that RUSTC_BOOTSTRAP
    # unlocks at run time; it changes nothing else), so the suite's time can be kept.
    # UBLKD_TEST_TRACE: the test library prints each step's time, which needs the
    # tests' output uncaptured.
    RUST_BACKTRACE=1 RUSTC_BOOTSTRAP=1 "$t" --test-threads=1 -Z unstable-options --report-time ${UBLKD_TEST_TRACE:+--nocapture} $filters >"$out" 2>&1 &
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
    status=0
    wait "$pid" || status=1
    wait "$watchdog"
    wait "$printer"
    rm -f "$out"
    after=$(cpu_ticks)
    # How busy the guest's CPUs were (while other lanes ran too, if any).
    echo "$before $after" | awk -v n="${2:-}== $name" -v s=$(($(date +%s) - start)) \
        '{ b = $3 - $1; t = $4 - $2; printf "%s: %d s, CPUs busy %d%%\n", n, s, t ? 100 * b / t : 0 }'
    return $status
}

rc=0
all=$(cd /usr/local/bin && ls ublkd-test-* | sed 's/^ublkd-test-//')
if [ -z "${UBLKD_TEST_LANES:-}" ]; then
    for b in $all; do
        run_binary "$b" || rc=1
    done
    exit $rc
fi
named=" $(echo "$UBLKD_TEST_LANES" | tr ';' ' ') "
rest=""
for b in $all; do
    case "$named" in *" $b "*) ;; *) rest="$rest $b" ;; esac
done
echo "$UBLKD_TEST_LANES" | tr ';' '\n' >/tmp/ublkd-test-lanes
n=0
lanes=""
while read -r lane; do
    n=$((n + 1))
    [ "$n" -eq 1 ] && lane="$lane$rest"
    echo "ublkd-vm: lane $n:$(for b in $lane; do [ -x "/usr/local/bin/ublkd-test-$b" ] && printf ' %s' "$b"; done)"
    (
        [ "$n" -gt 1 ] && export UBLKD_TEST_DEVICE_IDS="$((n * 1000))-$((n * 1000 + 999))"
        lane_rc=0
        for b in $lane; do
            # A lane may name a binary this run left out (UBLKD_VM_BINARIES).
            [ -x "/usr/local/bin/ublkd-test-$b" ] || continue
            run_binary "$b" "[$b] " || lane_rc=1
        done
        exit $lane_rc
    ) &
    lanes="$lanes $!"
done </tmp/ublkd-test-lanes
for p in $lanes; do
    wait "$p" || rc=1
done
exit $rc
