#!/bin/sh
# A UBLKD_BENCH_HOOK for ublkd-bench: perf record (cpu-clock, no call graphs) of the whole
# guest during one fio run, whatever the device, so that the kernel's clients and ublkd
# compare on the same footing: samples per thread name and per symbol, and the IOs done
# while perf ran. Per-IO cost of a line = samples / 1999 Hz / IOs. Needs UBLKD_BENCH_PERF=1.
PERF=/usr/bin/perf
n=$(cat /tmp/prof.n 2>/dev/null || echo 0); n=$((n + 1)); echo $n > /tmp/prof.n
d=${BENCH_DEV#/dev/}
ios() { awk '{print $1 + $5}' /sys/block/$d/stat; }
sleep 1.5
r0=$(ios)
$PERF record -q -F 1999 -e cpu-clock -a -o /tmp/perf.$n -- sleep 3 >/dev/null 2>&1
r1=$(ios)
echo "=== guest $n: $BENCH_DEV $BENCH_ROW: $((r1 - r0)) IOs in 3 s of perf, 2 CPUs at 1999 Hz"
echo "--- by thread"
$PERF report -i /tmp/perf.$n --stdio --no-children --sort comm -n 2>/dev/null | grep -v '^#' | grep -v '^$' | head -25
echo "--- by thread and symbol"
$PERF report -i /tmp/perf.$n --stdio --no-children --sort comm,sym -n 2>/dev/null | grep -v '^#' | grep -v '^$' | head -70
