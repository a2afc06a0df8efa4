#!/bin/sh
# A UBLKD_BENCH_HOOK for ublkd-bench (issue 12: where the nbd queue thread spends its
# time): during one fio run, perf record (cpu-clock, call graphs) of the serving process
# (BENCH_PID), or of the whole guest when there is none (the kernel nbd client), and the
# reports. Needs perf in the guest (tests/vm/run.sh --tool /usr/bin/perf) and, for kernel
# symbols, kptr_restrict 0 and perf_event_paranoid -1. No syscall tracepoints: enabling
# them under TCG panicked the guest (int3 in trace_syscall_enter while perf patched it).
PERF=/usr/bin/perf
n=$(cat /tmp/prof.n 2>/dev/null || echo 0); n=$((n + 1)); echo $n > /tmp/prof.n
d=${BENCH_DEV#/dev/}
ios() { awk '{print $1 + $5}' /sys/block/$d/stat; }
sleep 1.5
# No server process (the kernel's nbd client): profile the whole guest.
target="-p $BENCH_PID"; [ -n "$BENCH_PID" ] || target=-a
r0=$(ios)
$PERF record -q -F 1999 -e cpu-clock -g $target -o /tmp/perf.$n -- sleep 3 >/dev/null 2>&1
r1=$(ios)
count=$((r1 - r0))
{
echo "=== hook $n: $BENCH_DEV $BENCH_ROW pid ${BENCH_PID:-none}: $count IOs from the start of the recording to its end (perf slows it down)"
echo "--- perf report (flat, self, by thread,dso,sym)"
$PERF report -i /tmp/perf.$n --stdio --no-children -g none --sort comm,dso,sym 2>/dev/null | grep -v '^$' | head -60
echo "--- perf report (callers of top symbols)"
$PERF report -i /tmp/perf.$n --stdio --no-children -G --percent-limit 3 --sort sym 2>/dev/null | grep -v "^$" | head -70
} 2>&1
