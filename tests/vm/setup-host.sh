#!/usr/bin/env bash
# Install the Debian (bookworm) host packages the ublkd VM test harness needs.
# Idempotent: prints nothing and touches no network when everything is present.
#
# Usage: tests/vm/setup-host.sh
set -euo pipefail

# package -> why
#   qemu-system-x86        qemu-system-x86_64 (TCG guest)
#   busybox-static         guest userland (static /bin/busybox)
#   fio                    guest I/O load generator
#   cpio                   initramfs packing
#   xz-utils               decompress the kernel's .ko.xz modules
#   e2fsprogs              mkfs.ext4 / mke2fs / e2fsck for the guest
#   util-linux             blkdiscard (+ flock, used by kernel.sh)
#   mount                  losetup (bookworm ships losetup in "mount", not util-linux)
#   libclang-dev           bindgen for the Rust build
#   libssl-dev, pkg-config OpenSSL for the nbd target's TLS-PSK (crate openssl)
#   nbdkit, qemu-utils     NBD servers for the nbd target's tests (nbdkit, qemu-nbd)
#   nbd-client             the kernel NBD client, for the nbd benchmark
#   debian-archive-keyring trixie keys, used to verify trixie-backports
#   apt                    apt-get/apt-cache for fetching the guest kernel
#   coreutils              timeout, mktemp, ...
#   mmdebstrap             the Debian root file system of the systemd VM tests
#   systemd                systemd-analyze verify for the unit file (host side)
#   man-db                 man, to render the installed man pages (tests/tests/install.rs)
#   librbd-dev, librados-dev  the rbd target's link libraries (cargo feature rbd)
#   ceph-mon, ceph-osd, ceph-common  the single-node cluster of the rbd tests (rbd, monmaptool)
#   rbd-nbd                the rbd-nbd mapper, for the rbd benchmark
#   iproute2               ip, for a veth pair into another network namespace (nbd tests)
readonly PACKAGES=(
    qemu-system-x86 busybox-static fio cpio xz-utils e2fsprogs util-linux mount
    libclang-dev libssl-dev pkg-config debian-archive-keyring apt coreutils nbdkit qemu-utils nbd-client
    mmdebstrap systemd man-db librbd-dev librados-dev ceph-mon ceph-osd ceph-common rbd-nbd
    iproute2
)

die() { printf 'setup-host.sh: error: %s\n' "$*" >&2; exit 1; }

command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found: this script supports Debian hosts only"

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
    [[ $status == ii* ]] || missing+=("$pkg")
done

((${#missing[@]} == 0)) && exit 0

printf 'setup-host.sh: installing missing host packages: %s\n' "${missing[*]}" >&2

sudo_cmd=()
if ((EUID != 0)); then
    command -v sudo >/dev/null 2>&1 || die "not root and sudo is not available; install as root: apt-get install -y ${missing[*]}"
    sudo_cmd=(sudo)
fi

export DEBIAN_FRONTEND=noninteractive
apt_opts=(-o DPkg::Lock::Timeout=600 -q)

"${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" update >&2 \
    || die "apt-get update failed"
"${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" install -y --no-install-recommends "${missing[@]}" >&2 \
    || die "apt-get install failed for: ${missing[*]}"
