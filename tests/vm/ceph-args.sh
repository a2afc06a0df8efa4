#!/usr/bin/env bash
# Prints the tests/vm/run.sh arguments that carry a single-node Ceph cluster into the
# busybox guest (tests/src/ceph.rs starts it), one per line: the daemons and tools with
# their libraries, and librados' plugin folders (cls_rbd is in rados-classes; the
# erasure-code, compressor and crypto plugins in ceph/), each plugin with its libraries.
#
# Usage: mapfile -t ceph < <(tests/vm/ceph-args.sh); tests/vm/run.sh "${ceph[@]}" ...
set -euo pipefail
for t in ceph-mon ceph-osd monmaptool rbd rbd-nbd; do
    [ -x "/usr/bin/$t" ] || { echo "ceph-args.sh: /usr/bin/$t is missing; run tests/vm/setup-host.sh" >&2; exit 1; }
    printf '%s\n' --tool "/usr/bin/$t"
done
for d in /usr/lib/x86_64-linux-gnu/ceph /usr/lib/x86_64-linux-gnu/rados-classes; do
    find "$d" -type f -name '*.so*' | sort | while read -r so; do
        printf '%s\n' --tool "$so"
    done
    printf '%s\n' --file "$d:$d"
done
