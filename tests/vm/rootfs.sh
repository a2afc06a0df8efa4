#!/usr/bin/env bash
# Ensure a minimal Debian root file system with systemd is built and cached, then
# print the path of its tarball on stdout. The systemd VM tests boot it with systemd
# as PID 1 (tests/vm/run.sh --systemd).
#
# Built with mmdebstrap from the host's Debian mirror (suite bookworm, like the host,
# so the host-built binaries and the libraries copied beside them fit), variant
# minbase plus systemd, udev (the /dev/ublkd/NAME links), kmod, e2fsprogs and procps;
# documentation left out. About 35 s and 200 MB the first time; once cached, no network
# and it returns at once.
#
# Usage: tests/vm/rootfs.sh [--rebuild]
# Environment: UBLKD_VM_CACHE (default /var/cache/ublkd-vm),
#              UBLKD_VM_DEBIAN_MIRROR (default: the host's first deb.debian.org-style URI)
set -euo pipefail

PROG=rootfs.sh
CACHE=${UBLKD_VM_CACHE:-/var/cache/ublkd-vm}
SUITE=bookworm
PACKAGES=systemd,systemd-sysv,udev,kmod,e2fsprogs,procps
# Bump when the recipe changes, so caches rebuild.
RECIPE=2
OUT=$CACHE/rootfs/$SUITE-systemd-r$RECIPE.tar

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
log() { printf '%s: %s\n' "$PROG" "$*" >&2; }

rebuild=0
case ${1:-} in
    --rebuild) rebuild=1 ;;
    "") ;;
    -h|--help) sed -n '/^# Usage:/,/^# Environment:/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
esac

if [[ -s $OUT && $rebuild == 0 ]]; then
    printf '%s\n' "$OUT"
    exit 0
fi
command -v mmdebstrap >/dev/null 2>&1 || die "mmdebstrap not found; run tests/vm/setup-host.sh"
((EUID == 0)) || die "building the root file system needs root"

mirror=${UBLKD_VM_DEBIAN_MIRROR:-}
if [[ -z $mirror ]]; then
    mirror=$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
        | awk '{print $2}' | grep -v security | head -n1 || true)
    mirror=${mirror:-http://deb.debian.org/debian}
fi

mkdir -p "$CACHE/rootfs"
exec 9>"$CACHE/rootfs/.lock"
flock 9
if [[ -s $OUT && $rebuild == 0 ]]; then
    printf '%s\n' "$OUT"
    exit 0
fi
log "building the Debian $SUITE root file system with systemd (mirror $mirror)"
tmp=$OUT.partial
rm -f "$tmp"
mmdebstrap --quiet --format=tar --variant=minbase --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    "$SUITE" "$tmp" "$mirror" >&2 || die "mmdebstrap failed"
mv "$tmp" "$OUT"
log "cached $OUT ($(($(stat -c %s "$OUT") / 1048576)) MiB)"
printf '%s\n' "$OUT"
