#!/bin/sh
# A UBLKD_BENCH_HOOK for ublkd-bench rbd --profile (issue 15: where an rbd request's CPU
# time goes). During one fio run: the CPU time and context switches of every thread of the
# serving process (BENCH_PID: ublkd, or rbd-nbd), summed by thread name, and of the OSD and
# how busy the guest's CPUs were, per IO of the device. With perf in the guest (bench.sh
# copies it in when UBLKD_BENCH_PERF=1) instead a flat perf profile of the serving
# process, 2 s (use --runtime 6 or more). busybox sh.
n=$(cat /tmp/prof.n 2>/dev/null || echo 0); n=$((n + 1)); echo $n > /tmp/prof.n
d=${BENCH_DEV#/dev/}
ios() { awk '{print $1 + $5}' /sys/block/$d/stat; }
# "comm ns switches" per thread of process $1 (shell builtins only: a fork per thread
# would cost seconds under TCG).
threads() {
    for t in /proc/$1/task/*; do
        { read -r c < $t/comm; } 2>/dev/null || continue
        read -r ns rest < $t/schedstat
        cs=0
        while read -r k v rest; do
            case $k in *ctxt_switches:) cs=$((cs + v)) ;; esac
        done < $t/status
        echo "$c ${ns:-0} $cs"
    done
}
# busy and all jiffies of the guest's CPUs
guest() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8}' /proc/stat; }
osd=$(for p in /proc/[0-9]*; do { read -r c < $p/comm; } 2>/dev/null && [ "$c" = ceph-osd ] && echo ${p#/proc/}; done | head -1)
PERF=/usr/bin/perf
sleep 1.5
[ -n "$BENCH_PID" ] || exit 0
# With perf: only the profile (its own cost would skew the accounting).
if [ -x $PERF ]; then
    $PERF record -q -F 999 -e cpu-clock -p $BENCH_PID -o /tmp/perf.$n -- sleep 2 >/dev/null 2>&1
    echo "=== hook $n perf: $BENCH_DEV $BENCH_ROW pid $BENCH_PID (flat, self, by thread,dso,sym)"
    $PERF report -i /tmp/perf.$n --stdio --no-children --sort comm,dso,sym 2>/dev/null | grep -v '^$' | grep -v '^#' | head -60
    echo "--- hook $n perf by thread,dso"
    $PERF report -i /tmp/perf.$n --stdio --no-children --sort comm,dso 2>/dev/null | grep -v '^$' | grep -v '^#' | head -30
    exit 0
fi
r0=$(ios); g0=$(guest)
threads $BENCH_PID > /tmp/th0.$n
[ -n "$osd" ] && threads $osd > /tmp/osd0.$n
sleep 2
r1=$(ios); g1=$(guest)
threads $BENCH_PID > /tmp/th1.$n
[ -n "$osd" ] && threads $osd > /tmp/osd1.$n
count=$((r1 - r0))
{
echo "=== hook $n: $BENCH_DEV $BENCH_ROW pid $BENCH_PID: $count IOs in 2 s; guest CPUs busy $(echo $g0 $g1 | awk '{printf "%.0f", 100 * ($3 - $1) / ($4 - $2)}')%"
# per thread name: us/IO, switches/IO (threads that started or ended within count from 0)
sum() {
    awk -v ios=$count -v label="$3" '
        FNR == NR { ns[$1] += $2; cs[$1] += $3; next }
        { ns1[$1] += $2; cs1[$1] += $3 }
        END {
            for (k in ns1) { dn = ns1[k] - ns[k]; dc = cs1[k] - cs[k]; tn += dn; tc += dc
                if (dn > 0) printf "%s %-22s %8.1f us/IO %6.2f cs/IO\n", label, k, dn / 1000 / ios, dc / ios }
            printf "%s %-22s %8.1f us/IO %6.2f cs/IO\n", label, "TOTAL", tn / 1000 / ios, tc / ios
        }' "$1" "$2" | sort -k3 -n -r
}
[ $count -gt 0 ] && sum /tmp/th0.$n /tmp/th1.$n server
[ $count -gt 0 ] && [ -n "$osd" ] && sum /tmp/osd0.$n /tmp/osd1.$n osd
# where the threads may run: name and allowed CPUs, counted per distinct pair
for p in $BENCH_PID $osd; do
    for t in /proc/$p/task/*; do
        { read -r c < $t/comm; } 2>/dev/null || continue
        while read -r k v rest; do
            case $k in Cpus_allowed_list:) echo "cpus $p $c $v" ;; esac
        done < $t/status
    done
done | sort | uniq -c
} 2>&1
