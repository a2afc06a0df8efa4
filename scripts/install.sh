#!/usr/bin/env bash
# Installs ublkd and ublkctl (built in release mode), the systemd unit and the module
# load file, then reloads systemd. `make install` runs this.
#
# Usage: scripts/install.sh [--prefix DIR] [--destdir DIR] [--no-build] [--no-reload]
#   --prefix DIR   installation prefix (default /usr/local): DIR/sbin/ublkd,
#                  DIR/bin/ublkctl, DIR/lib/systemd/system/ublkd.service,
#                  DIR/share/doc/ublkd/README.md
#   --destdir DIR  stage everything under DIR (for packaging or a VM image); implies
#                  --no-reload
#   --no-build     install the binaries already in target/release
#   --no-reload    do not run `systemctl daemon-reload`
#
# Then: systemctl enable --now ublkd
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=/usr/local
destdir=""
build=1
reload=1
while (($#)); do
    case $1 in
        --prefix) prefix=$2; shift 2 ;;
        --destdir) destdir=$2; reload=0; shift 2 ;;
        --no-build) build=0; shift ;;
        --no-reload) reload=0; shift ;;
        -h|--help) sed -n '/^# Usage:/,/^# Then:/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ $prefix == /* ]] || { echo "install.sh: --prefix must be an absolute path" >&2; exit 2; }

if ((build)); then
    cargo build --release --locked -p ublkd -p ublkctl
fi
for b in target/release/ublkd target/release/ublkctl; do
    [[ -x $b ]] || { echo "install.sh: $b is missing; build first (or drop --no-build)" >&2; exit 1; }
done

root=${destdir%/}
unitdir=$prefix/lib/systemd/system
install -D -m 0755 target/release/ublkd "$root$prefix/sbin/ublkd"
install -D -m 0755 target/release/ublkctl "$root$prefix/bin/ublkctl"
# The unit names the binary by its path: follow the prefix.
unit=$(mktemp)
trap 'rm -f "$unit"' EXIT
sed "s|/usr/local/|$prefix/|g" systemd/ublkd.service >"$unit"
install -D -m 0644 "$unit" "$root$unitdir/ublkd.service"
install -D -m 0644 systemd/ublkd-modules.conf "$root/etc/modules-load.d/ublkd.conf"
install -D -m 0644 README.md "$root$prefix/share/doc/ublkd/README.md"
echo "installed ublkd in $root$prefix (unit $root$unitdir/ublkd.service)"

if ((reload)) && [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    echo "systemd reloaded; start with: systemctl enable --now ublkd"
fi
