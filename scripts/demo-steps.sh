#!/bin/sh
# The main job, step by step (POSIX sh: runs on the host or inside the test VM): start
# ublkd, create a null device and push 5 s of fio through it, create a loop device on a
# file and write + verify data through it, delete both, stop the daemon. Needs ublkd and
# ublkctl on PATH and runs as root.
set -eu
FIO=${FIO:-/usr/bin/fio}
dir=$(mktemp -d /tmp/ublkd-demo.XXXXXX)
sock=$dir/ublkd.sock

ublkd --socket "$sock" --state-dir "$dir/state" 2>"$dir/ublkd.log" &
pid=$!
i=0
until ublkctl --socket "$sock" list >/dev/null 2>&1; do
    i=$((i + 1))
    if [ "$i" -gt 200 ] || ! kill -0 "$pid" 2>/dev/null; then
        echo "demo: ublkd did not start:" >&2
        cat "$dir/ublkd.log" >&2
        exit 1
    fi
    sleep 0.1
done

echo "== ublkctl add null --size 1G --queues 2"
dev=$(ublkctl --socket "$sock" add null --size 1G --queues 2)
echo "$dev"
echo "== ublkctl list"
ublkctl --socket "$sock" list
echo "== fio: 4k random read/write, io_uring, direct, QD32, 5 s"
"$FIO" --name=demo --filename="$dev" --ioengine=io_uring --direct=1 --rw=randrw --bs=4k \
    --iodepth=32 --time_based --runtime=5 --group_reporting --eta=never
echo "== ublkctl show ${dev#/dev/ublkb}"
ublkctl --socket "$sock" show "${dev#/dev/ublkb}"

echo "== ublkctl add loop --file $dir/disk.img (256 MiB file)"
dd if=/dev/zero of="$dir/disk.img" bs=1M count=0 seek=256 2>/dev/null
loopdev=$(ublkctl --socket "$sock" add loop --file "$dir/disk.img")
echo "$loopdev"
echo "== fio: 64 MiB of 4k random writes with crc32c verify through $loopdev"
"$FIO" --name=verify --filename="$loopdev" --ioengine=io_uring --direct=1 --rw=randwrite \
    --bs=4k --iodepth=32 --size=64M --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --verify_state_save=0 --group_reporting --eta=never | grep -E "WRITE:|READ:|err="
ublkctl --socket "$sock" list
echo "== ublkctl del --all; stop ublkd"
ublkctl --socket "$sock" del --all
kill -TERM "$pid"
wait "$pid"
echo "demo: done"
