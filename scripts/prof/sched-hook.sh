#!/bin/sh
# A UBLKD_BENCH_HOOK for ublkd-bench: where the guest's idle time comes from. During
# one fio run, traces the scheduler (sched_switch, sched_wakeup) for 0.5 s through
# tracefs and prints, per device: the idle periods of each CPU (count, total, mean),
# which thread ran when an idle period ended and which thread had woken it, and how
# long woken threads waited for a CPU (wake-up to switch-in), by thread name.
T=/sys/kernel/tracing
[ -d $T/events ] || mount -t tracefs nodev $T 2>/dev/null
sleep 1.5
echo 0 > $T/tracing_on
echo > $T/trace
echo 4096 > $T/buffer_size_kb
echo 1 > $T/events/sched/sched_switch/enable
echo 1 > $T/events/sched/sched_wakeup/enable
echo 1 > $T/tracing_on
sleep 0.5
echo 0 > $T/tracing_on
echo 0 > $T/events/sched/sched_switch/enable
echo 0 > $T/events/sched/sched_wakeup/enable
echo "=== sched $BENCH_DEV $BENCH_ROW"
awk '
function short(c) { sub(/[-\/:].*/, "", c); return c }
/sched_wakeup:/ {
    match($0, /\[[0-9]+\]/); cpu = substr($0, RSTART + 1, RLENGTH - 2) + 0
    ts = $0; sub(/^.*\] [^ ]+ +/, "", ts); sub(/:.*/, "", ts)
    waker = $0; sub(/^ +/, "", waker); sub(/ +\[.*/, "", waker); sub(/-[0-9]+$/, "", waker)
    match($0, /pid=[0-9]+/); pid = substr($0, RSTART + 4, RLENGTH - 4)
    match($0, /comm=[^ ]+/); wcomm = substr($0, RSTART + 5, RLENGTH - 5)
    wts[pid] = ts; wby[pid] = short(waker) "@" cpu
    next
}
/sched_switch:/ {
    match($0, /\[[0-9]+\]/); cpu = substr($0, RSTART + 1, RLENGTH - 2) + 0
    ts = $0; sub(/^.*\] [^ ]+ +/, "", ts); sub(/:.*/, "", ts)
    match($0, /prev_comm=[^ ]+/); prev = substr($0, RSTART + 10, RLENGTH - 10)
    match($0, /next_comm=[^ ]+/); next_c = substr($0, RSTART + 10, RLENGTH - 10)
    match($0, /next_pid=[0-9]+/); npid = substr($0, RSTART + 9, RLENGTH - 9)
    if (first == "") first = ts
    last = ts
    if (prev ~ /^swapper/ && (cpu in idle0)) {
        d = ts - idle0[cpu]; idle[cpu] += d; nidle[cpu]++
        k = short(next_c) " woken by " ((npid in wby) ? wby[npid] : "?")
        kc[k]++; kd[k] += d
        delete idle0[cpu]
    }
    if (next_c ~ /^swapper/) idle0[cpu] = ts
    if (npid in wts) {
        l = ts - wts[npid]; n = short(next_c); lat[n] += l; nlat[n]++
        if (l > 0.0002) slow[n]++
        delete wts[npid]
    }
}
END {
    span = last - first
    printf "traced %.3f s\n", span
    for (c in idle) printf "cpu %d idle %.1f%% in %d periods, mean %.1f us\n", c, 100 * idle[c] / span, nidle[c], 1e6 * idle[c] / nidle[c]
    print "idle periods ended by (count, mean idle us):"
    for (k in kc) printf "  %-40s %6d %8.1f\n", k, kc[k], 1e6 * kd[k] / kc[k] | "sort -k5 -nr | head -12"
    close("sort -k5 -nr | head -12")
    print "wake-up to run, by thread (count, mean us, over 200 us):"
    for (n in lat) printf "  %-20s %6d %8.1f %6d\n", n, nlat[n], 1e6 * lat[n] / nlat[n], slow[n] | "sort -k2 -nr | head -10"
    close("sort -k2 -nr | head -10")
}' $T/trace
