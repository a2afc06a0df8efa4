#!/usr/bin/env bash
# Removes what scripts/install.sh put in place, as listed in its manifest
# PREFIX/share/ublkd/installed-files, then reloads systemd. `make uninstall` runs this.
# The device records in /var/lib/ublkd stay: they are the user's, and a later install
# restores the devices from them (remove them by hand to forget the devices).
#
# Usage: scripts/uninstall.sh [--prefix DIR] [--destdir DIR] [--no-reload]
#   --prefix DIR   the prefix install.sh was given (default /usr/local)
#   --destdir DIR  the staging directory install.sh was given; implies --no-reload
#   --no-reload    do not run `systemctl daemon-reload`
#
# Refuses while ublkd.service is active: stop it first (`systemctl disable --now ublkd`
# removes the devices from the kernel; their records stay).
set -euo pipefail

prefix=/usr/local
destdir=""
reload=1
while (($#)); do
    case $1 in
        --prefix) prefix=$2; shift 2 ;;
        --destdir) destdir=$2; reload=0; shift 2 ;;
        --no-reload) reload=0; shift ;;
        -h|--help) sed -n '/^# Usage:/,/^# Refuses/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "uninstall.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ $prefix == /* ]] || { echo "uninstall.sh: --prefix must be an absolute path" >&2; exit 2; }

root=${destdir%/}
manifest=$prefix/share/ublkd/installed-files
[[ -f $root$manifest ]] || {
    echo "uninstall.sh: $root$manifest is missing: nothing was installed with this prefix" >&2
    exit 1
}
if [[ -z $root ]] && command -v systemctl >/dev/null && systemctl is-active --quiet ublkd.service; then
    echo "uninstall.sh: ublkd.service is running; stop it first: systemctl disable --now ublkd" >&2
    exit 1
fi
if [[ -z $root ]] && command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
    systemctl disable --quiet ublkd.service 2>/dev/null || true
fi

mapfile -t files <"$root$manifest"
removed=0
for f in "${files[@]}"; do
    [[ $f == /* ]] || continue
    if [[ -e $root$f || -L $root$f ]]; then
        rm -f -- "$root$f"
        removed=$((removed + 1))
    fi
done
# ublkd's own directories go too when empty; shared ones (man8, completions) stay.
rmdir -- "$root$prefix/share/ublkd" "$root$prefix/share/doc/ublkd" 2>/dev/null || true
echo "removed $removed files of ublkd from $root$prefix"

if ((reload)) && [[ -d /run/systemd/system ]]; then
    udevadm control --reload 2>/dev/null || true
    systemctl daemon-reload
fi
