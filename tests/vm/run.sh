#!/usr/bin/env bash
# Boot a throw-away QEMU (TCG) VM with a ublk-capable kernel and run a command
# in it as root; exit with that command's exit status.
#
# Usage: tests/vm/run.sh [OPTIONS] [--] GUEST_COMMAND...
#
#   GUEST_COMMAND...     joined with spaces and run as `/bin/sh -c` (busybox
#                        ash) in /root. Call non-busybox tools by absolute path
#                        (/usr/bin/fio, /usr/sbin/mkfs.ext4, /usr/sbin/losetup, ...).
# Options:
#   --timeout SECS       whole-VM timeout, boot included (default 900)
#   --mem SIZE           guest RAM, qemu -m syntax (default 2G)
#   --smp N              guest CPUs (default 2)
#   --bin PATH           copy an executable to /usr/local/bin/ in the guest,
#                        with the shared libraries ldd lists (repeatable)
#   --tool PATH          copy a host program or shared object (a plugin) to the
#                        same absolute path in the guest, with its libraries
#                        (repeatable)
#   --file SRC:DST       copy a file or directory to the absolute guest path
#                        DST (repeatable)
#   --append ARGS        extra kernel command line arguments
#   --systemd            boot a Debian root file system (tests/vm/rootfs.sh) with
#                        systemd as PID 1 instead of the busybox one; the guest
#                        command then runs in a service (ublkd-vm.service, after
#                        multi-user.target) under /bin/sh (dash)
#   --log FILE           also write the console output to FILE
#   -h, --help           this help
#
# Exit status: the guest command's status; 124 on timeout; 125 when the guest
# never reported a status (kernel panic, crash, init failure) or on harness
# errors.
#
# Environment: UBLKD_VM_CACHE (kernel cache, default /var/cache/ublkd-vm),
# UBLKD_VM_QEMU (default qemu-system-x86_64), UBLKD_VM_CPU (the guest's CPU model,
# qemu -cpu syntax, default max; for experiments such as max,-erms, where the guest's
# user copies use rep movsq, which TCG runs 8 bytes per step instead of 1).
set -euo pipefail

PROG=run.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MARKER=UBLKD_VM_EXIT

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 125; }
log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
usage() { sed -n '/^# Usage:/,/^#   -h, --help/s/^# \{0,1\}//p' "$0"; }

timeout_secs=900
mem=2G
smp=2
extra_append=""
systemd=0
log_file=""
bins=()
files=()
tools=()

need_arg() { (($# >= 2)) || die "option $1 needs an argument (see --help)"; }
while (($#)); do
    case $1 in
        --timeout) need_arg "$@"; timeout_secs=$2; shift 2 ;;
        --timeout=*) timeout_secs=${1#*=}; shift ;;
        --mem) need_arg "$@"; mem=$2; shift 2 ;;
        --mem=*) mem=${1#*=}; shift ;;
        --smp) need_arg "$@"; smp=$2; shift 2 ;;
        --smp=*) smp=${1#*=}; shift ;;
        --bin) need_arg "$@"; bins+=("$2"); shift 2 ;;
        --bin=*) bins+=("${1#*=}"); shift ;;
        --file) need_arg "$@"; files+=("$2"); shift 2 ;;
        --tool) need_arg "$@"; tools+=("$2"); shift 2 ;;
        --file=*) files+=("${1#*=}"); shift ;;
        --append) need_arg "$@"; extra_append+=" $2"; shift 2 ;;
        --append=*) extra_append+=" ${1#*=}"; shift ;;
        --log) need_arg "$@"; log_file=$2; shift 2 ;;
        --systemd) systemd=1; shift ;;
        --log=*) log_file=${1#*=}; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option: $1 (see --help)" ;;
        *) break ;;
    esac
done
(($#)) || die "no guest command given (see --help)"
guest_cmd="$*"

[[ $timeout_secs =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a positive integer number of seconds, got '$timeout_secs'"
[[ $smp =~ ^[1-9][0-9]*$ ]] || die "--smp must be a positive integer, got '$smp'"
[[ $mem =~ ^[0-9]+[MGmgKkTt]?$ ]] || die "--mem must look like 2G or 2048M, got '$mem'"

"$HERE/setup-host.sh" || die "host setup failed"
KDIR=$("$HERE/kernel.sh") || die "could not obtain the guest kernel (tests/vm/kernel.sh failed)"
[[ -f $KDIR/vmlinuz ]] || die "kernel.sh returned '$KDIR' without vmlinuz"
KVER=$(<"$KDIR/version")

QEMU=${UBLKD_VM_QEMU:-qemu-system-x86_64}
command -v "$QEMU" >/dev/null 2>&1 || die "$QEMU not found; run tests/vm/setup-host.sh"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/ublkd-vm.XXXXXX")
qemu_pid=""
# shellcheck disable=SC2317 # invoked via trap
cleanup() {
    if [[ -n $qemu_pid ]] && kill -0 "$qemu_pid" 2>/dev/null; then
        kill -TERM "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM HUP

ROOT=$TMP/root

# --- initramfs -------------------------------------------------------------

if ((systemd)); then
    # shellcheck source=tests/vm/systemd-guest.sh
    . "$HERE/systemd-guest.sh"
    ROOTFS_TAR=$("$HERE/rootfs.sh") || die "could not obtain the root file system (tests/vm/rootfs.sh failed)"
    mkdir -p "$ROOT"
    tar -C "$ROOT" -xpf "$ROOTFS_TAR" || die "cannot unpack $ROOTFS_TAR"
    # An empty fstab, before the --file copies: a test may bring its own.
    : >"$ROOT/etc/fstab"
    mkdir -p "$ROOT"/etc/ublkd-vm "$ROOT"/usr/local/bin "$ROOT"/usr/lib/modules/"$KVER"
else
# merged-/usr layout, like the host
mkdir -p "$ROOT"/{usr/bin,usr/sbin,usr/lib/modules/"$KVER",usr/lib64,usr/local/bin,usr/local/sbin} \
    "$ROOT"/{proc,sys,dev,tmp,run,root,etc/ublkd-vm,mnt,var/tmp}
ln -s usr/bin "$ROOT/bin"
ln -s usr/sbin "$ROOT/sbin"
ln -s usr/lib "$ROOT/lib"
ln -s usr/lib64 "$ROOT/lib64"
chmod 1777 "$ROOT/tmp" "$ROOT/var/tmp"
chmod 0700 "$ROOT/root"
mknod -m 600 "$ROOT/dev/console" c 5 1 2>/dev/null || true
mknod -m 666 "$ROOT/dev/null" c 1 3 2>/dev/null || true
fi

declare -A COPIED_LIBS=()

# copy_lib HOSTPATH: copy a shared library to the same path in the guest.
copy_lib() {
    local lib=$1
    [[ -n ${COPIED_LIBS[$lib]:-} ]] && return 0
    COPIED_LIBS[$lib]=1
    # The Debian root file system has its own (same-release) libraries: keep them.
    ((systemd)) && [[ -e $ROOT$lib ]] && return 0
    mkdir -p "$ROOT$(dirname "$lib")"
    cp -L --remove-destination "$lib" "$ROOT$lib" || die "cannot copy library $lib"
}

# copy_exe HOSTPATH GUESTPATH: copy an executable plus the libraries ldd lists.
copy_exe() {
    [[ -x $1 ]] || die "not executable: $1"
    copy_obj "$1" "$2"
    chmod 0755 "$ROOT$2"
}

# copy_obj HOSTPATH GUESTPATH: copy an executable or shared object plus its libraries.
copy_obj() {
    local src=$1 dst=$2 out lib
    [[ -f $src ]] || die "file not found: $src"
    mkdir -p "$ROOT$(dirname "$dst")"
    cp -L --remove-destination "$src" "$ROOT$dst" || die "cannot copy $src"
    # ldd fails on static binaries and scripts: nothing to copy then.
    out=$(LC_ALL=C ldd "$src" 2>&1) || return 0
    if grep -q 'not found' <<<"$out"; then
        die "$src: missing shared libraries on the host:"$'\n'"$(grep 'not found' <<<"$out")"
    fi
    while read -r lib; do
        copy_lib "$lib"
    done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3; next } $1 ~ /^\// { print $1 }' <<<"$out")
}

# host_tool NAME: absolute host path of a system tool.
host_tool() {
    local d
    for d in /usr/sbin /usr/bin /sbin /bin; do
        if [[ -x $d/$1 ]]; then printf '%s\n' "$d/$1"; return 0; fi
    done
    die "host tool '$1' not found; run tests/vm/setup-host.sh"
}

if ((systemd)); then
    # The root file system has e2fsprogs and util-linux; fio comes from the host.
    copy_exe "$(host_tool fio)" /usr/bin/fio
else
# busybox and its applet links (relative, so they never point outside $ROOT).
BUSYBOX=$(host_tool busybox)
copy_exe "$BUSYBOX" /usr/bin/busybox
while read -r applet; do
    applet=${applet#/}
    case $applet in
        */*) ;;
        *) continue ;; # /linuxrc: we have our own /init
    esac
    case $applet in
        bin/*|sbin/*) applet=usr/$applet ;;
    esac
    [[ -e $ROOT/$applet || -L $ROOT/$applet ]] && continue
    dir=${applet%/*}
    [[ -d $ROOT/$dir ]] || mkdir -p "$ROOT/$dir"
    up=${dir//[!\/]/}       # one "/" per extra path component
    up=${up//\//../}
    ln -s "../${up}usr/bin/busybox" "$ROOT/$applet"
done < <("$BUSYBOX" --list-full)
[[ -L $ROOT/usr/bin/sh ]] || die "$BUSYBOX has no sh applet"

# Real tools (override the busybox applets of the same name).
copy_exe "$(host_tool fio)" /usr/bin/fio
copy_exe "$(host_tool mke2fs)" /usr/sbin/mke2fs
ln -sfn mke2fs "$ROOT/usr/sbin/mkfs.ext4"
copy_exe "$(host_tool e2fsck)" /usr/sbin/e2fsck
copy_exe "$(host_tool losetup)" /usr/sbin/losetup
copy_exe "$(host_tool blkdiscard)" /usr/sbin/blkdiscard
fi

for b in "${bins[@]}"; do
    copy_exe "$b" "/usr/local/bin/$(basename "$b")"
done
for t in "${tools[@]}"; do
    [[ $t == /* ]] || die "--tool needs an absolute path, got '$t'"
    copy_obj "$t" "$t"
done

for spec in "${files[@]}"; do
    [[ $spec == *:* ]] || die "--file expects SRC:DST, got '$spec'"
    src=${spec%:*}
    dst=${spec##*:}
    [[ $dst == /* ]] || die "--file destination must be an absolute guest path, got '$dst'"
    [[ -e $src ]] || die "--file source does not exist: $src"
    mkdir -p "$ROOT$(dirname "$dst")"
    if [[ -d $src ]]; then
        cp -aH -T "$src" "$ROOT$dst" || die "cannot copy $src"
    else
        cp -aH --remove-destination "$src" "$ROOT$dst" || die "cannot copy $src"
    fi
done

if ((systemd)); then
    setup_systemd_guest
else
# Kernel modules: /lib/modules/<name>.ko, plus /lib/modules/<kver>/ for modprobe.
cp "$KDIR"/modules/*.ko "$KDIR/modules/modules.dep" "$ROOT/usr/lib/modules/"
for ko in "$KDIR"/modules/*.ko; do
    ln -s "../${ko##*/}" "$ROOT/usr/lib/modules/$KVER/${ko##*/}"
done
cp "$KDIR/modules/modules.dep" "$ROOT/usr/lib/modules/$KVER/modules.dep"

cat >"$ROOT/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$ROOT/etc/group" <<'EOF'
root:x:0:
disk:x:6:
nogroup:x:65534:
EOF
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost\n' >"$ROOT/etc/hosts"
printf 'passwd: files\ngroup: files\nhosts: files\n' >"$ROOT/etc/nsswitch.conf"
printf 'ublkd-vm\n' >"$ROOT/etc/hostname"
: >"$ROOT/etc/fstab"
printf '%s' "$guest_cmd" >"$ROOT/etc/ublkd-vm/cmd"

cat >"$ROOT/init" <<'EOF'
#!/bin/sh
# ublkd VM test harness guest init (generated by tests/vm/run.sh).
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb LANG=C

fail() {
    echo "ublkd-vm: init: $*"
    echo "ublkd-vm: init failed, no exit status reported"
    poweroff -f
    echo o >/proc/sysrq-trigger
    sleep 60
}

mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "mount /dev"
exec </dev/null >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp || fail "mount /tmp"
mount -t tmpfs -o mode=755 tmpfs /run || fail "mount /run"
[ -d /sys/kernel/debug ] && mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
# "quiet" hid the boot chatter; from now on show warnings (KERN_WARNING and
# KERN_DEFAULT, e.g. WARN_ON() splats) as well as errors and oopses.
read -r conlevel _ </proc/sys/kernel/printk
[ "$conlevel" -ge 5 ] || echo 5 >/proc/sys/kernel/printk
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr

# load_mod NAME: insmod /lib/modules/NAME.ko after its dependencies.
load_mod() {
    local deps d
    [ -d "/sys/module/$1" ] && return 0
    deps=$(sed -n "s/^$1\.ko://p" /lib/modules/modules.dep)
    for d in $deps; do
        load_mod "${d%.ko}" || return 1
    done
    [ -d "/sys/module/$1" ] && return 0
    insmod "/lib/modules/$1.ko" || { echo "ublkd-vm: insmod $1.ko failed"; return 1; }
}
# tls, gcm, ctr: kernel TLS (AES-GCM) for nbds://; the guest has no modprobe aliases
# for the kernel to load the crypto modules by itself. veth: tests/src/remote_net.rs.
for m in configfs ublk_drv loop nbd tls gcm ctr veth; do
    load_mod "$m" || fail "cannot load module $m"
done
mount -t configfs configfs /sys/kernel/config || fail "mount configfs"
[ -e /dev/ublk-control ] || fail "/dev/ublk-control missing after loading ublk_drv"

hostname ublkd-vm
ip link set lo up || fail "ip link set lo up"

cmd=$(cat /etc/ublkd-vm/cmd)
read -r up _ </proc/uptime
echo "ublkd-vm: kernel $(uname -r), booted in ${up}s; running: $cmd"
cd /root
/bin/sh -c "$cmd"
rc=$?

tainted=$(cat /proc/sys/kernel/tainted)
[ "$tainted" = 0 ] || echo "ublkd-vm: note: kernel tainted=$tainted (warning/oops during the run?)"
read -r up _ </proc/uptime
printf '\nublkd-vm: guest command exited with %s at %ss\n' "$rc" "$up"
echo "UBLKD_VM_EXIT=$rc"
poweroff -f
echo o >/proc/sysrq-trigger
sleep 60
EOF
chmod 0755 "$ROOT/init"
fi

INITRD=$TMP/initrd.cpio
(cd "$ROOT" && find . -mindepth 1 -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet) >"$INITRD" \
    || die "cannot build the initramfs"

# --- boot --------------------------------------------------------------------

if ((systemd)); then
    append="console=ttyS0 panic=-1 quiet rdinit=/usr/lib/systemd/systemd systemd.unit=multi-user.target systemd.show_status=error$extra_append"
else
    append="console=ttyS0 panic=-1 quiet rdinit=/init$extra_append"
fi
# shellcheck disable=SC2054 # commas are qemu option syntax
qemu_cmd=(
    timeout --kill-after=15 "$timeout_secs"
    "$QEMU" -accel tcg,thread=multi -cpu "${UBLKD_VM_CPU:-max}" -smp "$smp" -m "$mem"
    -display none -vga none -monitor none -serial stdio -no-reboot -nic none
    -kernel "$KDIR/vmlinuz" -initrd "$INITRD" -append "$append"
)

CONSOLE_LOG=${log_file:-$TMP/console.log}
: >"$CONSOLE_LOG" || die "cannot write $CONSOLE_LOG"
log "booting $KVER (initramfs $(($(stat -c %s "$INITRD") / 1048576)) MiB, ${mem} RAM, $smp CPUs, timeout ${timeout_secs}s)"

# qemu runs in the background so that signals to this script are handled at
# once (cleanup kills it); its console goes through a FIFO to sed (strip the
# serial CRs, line-buffered) and tee (live to stdout + log file).
boot() {
    rm -f "$TMP/console.fifo"
    mkfifo "$TMP/console.fifo"
    start=$SECONDS
    "${qemu_cmd[@]}" </dev/null >"$TMP/console.fifo" &
    qemu_pid=$!
    sed -u 's/\r$//' <"$TMP/console.fifo" | tee -a "$CONSOLE_LOG" &
    tee_pid=$!
    qemu_rc=0
    wait "$qemu_pid" || qemu_rc=$?
    qemu_pid=""
    wait "$tee_pid" || true
    elapsed=$((SECONDS - start))
}
boot
# Under TCG the guest kernel now and then dies while it boots (seen: an int3 Oops in
# sched_clock_cpu while it unpacks the initramfs, the kernel patching its own code on
# one vCPU while the other runs it), before any program of ours ran. That says nothing
# about ublkd: boot again, up to four boots in all (on a busy host two in a row died). A
# guest whose init printed anything ("ublkd-vm: ...") is never booted again; its result
# stands.
for attempt in 2 3 4; do
    if grep -aq 'ublkd-vm: ' "$CONSOLE_LOG" || ! grep -aq 'Kernel panic' "$CONSOLE_LOG" ||
        ((qemu_rc == 124)); then
        break
    fi
    log "the guest kernel panicked while booting, before the command ran; booting again ($attempt of 4)"
    : >"$CONSOLE_LOG"
    boot
done

rc_line=$(grep -aoE "$MARKER=[0-9]+\$" "$CONSOLE_LOG" | tail -n1 || true)
if ((qemu_rc == 124 || (qemu_rc == 137 && elapsed >= timeout_secs))); then
    log "FAIL: VM timed out after ${timeout_secs}s (--timeout); guest command did not finish"
    exit 124
fi
if [[ -z $rc_line ]]; then
    if grep -aq 'Kernel panic' "$CONSOLE_LOG"; then
        log "FAIL: guest kernel panicked; no exit status reported (qemu exit $qemu_rc, ${elapsed}s)"
    else
        log "FAIL: guest ended without reporting an exit status (crash, init failure or qemu error; qemu exit $qemu_rc, ${elapsed}s)"
    fi
    exit 125
fi
rc=${rc_line#"$MARKER="}
((rc <= 255)) || rc=125
log "guest command exited with $rc (VM wall time ${elapsed}s)"
exit "$rc"
