#!/bin/sh
# Runs inside the test VM: every real-kernel test binary, one test at a time.
rc=0
for t in /usr/local/bin/ublkd-test-*; do
    echo "== $(basename "$t")"
    RUST_BACKTRACE=1 "$t" --test-threads=1 "$@" || rc=1
done
exit $rc
