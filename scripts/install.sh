#!/usr/bin/env bash
# Installs ublkd and ublkctl (built in release mode), the systemd unit, the module load
# file, the udev rule (/dev/ublkd/NAME links), the man pages and ublkctl's bash, zsh and
# fish completions, then reloads udev and systemd.
# `make install` runs this; every file it puts in place is listed in
# PREFIX/share/ublkd/installed-files, which `make uninstall` (scripts/uninstall.sh) reads.
#
# Usage: scripts/install.sh [--prefix DIR] [--destdir DIR] [--no-build] [--no-reload]
#   --prefix DIR   installation prefix (default /usr/local): DIR/sbin/ublkd,
#                  DIR/bin/ublkctl, DIR/lib/systemd/system/ublkd.service,
#                  DIR/share/doc/ublkd/README.md, DIR/share/man/man8/ublkd.8 and
#                  ublkctl*.8, DIR/share/{bash-completion/completions,zsh/site-functions,
#                  fish/vendor_completions.d}/
#   --destdir DIR  stage everything under DIR (for packaging or a VM image); implies
#                  --no-reload
#   --no-build     install the binaries already in target/release ($CARGO_TARGET_DIR/release)
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
# Where cargo put the binaries (CARGO_TARGET_DIR is honoured).
bindir=${CARGO_TARGET_DIR:-target}/release
for b in "$bindir/ublkd" "$bindir/ublkctl"; do
    [[ -x $b ]] || { echo "install.sh: $b is missing; build first (or drop --no-build)" >&2; exit 1; }
done

root=${destdir%/}
unitdir=$prefix/lib/systemd/system
manifest=$prefix/share/ublkd/installed-files
installed=()
# put MODE SOURCE DEST: installs one file and remembers it for the manifest.
put() {
    install -D -m "$1" "$2" "$root$3"
    installed+=("$3")
}
gen=$(mktemp -d)
trap 'rm -rf "$gen"' EXIT
put 0755 "$bindir/ublkd" "$prefix/sbin/ublkd"
put 0755 "$bindir/ublkctl" "$prefix/bin/ublkctl"
# The unit names the binary by its path: follow the prefix.
sed "s|/usr/local/|$prefix/|g" systemd/ublkd.service >"$gen/ublkd.service"
put 0644 "$gen/ublkd.service" "$unitdir/ublkd.service"
put 0644 systemd/ublkd-modules.conf /etc/modules-load.d/ublkd.conf
put 0644 systemd/60-ublkd.rules /etc/udev/rules.d/60-ublkd.rules
put 0644 README.md "$prefix/share/doc/ublkd/README.md"
# Man pages and completions come from the binaries' own command-line definitions.
"$bindir/ublkd" --generate-man >"$gen/ublkd.8"
put 0644 "$gen/ublkd.8" "$prefix/share/man/man8/ublkd.8"
pages=$("$bindir/ublkctl" __generate man "$gen/man")
for page in $pages; do
    put 0644 "$page" "$prefix/share/man/man8/${page##*/}"
done
"$bindir/ublkctl" __generate completions bash >"$gen/ublkctl.bash"
put 0644 "$gen/ublkctl.bash" "$prefix/share/bash-completion/completions/ublkctl"
"$bindir/ublkctl" __generate completions zsh >"$gen/_ublkctl"
put 0644 "$gen/_ublkctl" "$prefix/share/zsh/site-functions/_ublkctl"
"$bindir/ublkctl" __generate completions fish >"$gen/ublkctl.fish"
put 0644 "$gen/ublkctl.fish" "$prefix/share/fish/vendor_completions.d/ublkctl.fish"
printf '%s\n' "${installed[@]}" "$manifest" >"$gen/installed-files"
install -D -m 0644 "$gen/installed-files" "$root$manifest"
echo "installed ublkd in $root$prefix (unit $root$unitdir/ublkd.service)"

if ((reload)) && [[ -d /run/systemd/system ]]; then
    udevadm control --reload 2>/dev/null || true
    systemctl daemon-reload
    echo "systemd reloaded; start with: systemctl enable --now ublkd"
fi
